"""``sdtool scan``: decide, without running anything, whether loading a file could run code.

Public entry points:
    scan(path) -> FileReport             one file, routed by content
    scan_paths(paths) -> ScanReport      files and directories (recursive), for the CLI
    classify_global(module, name)        ("safe" | "suspicious" | "dangerous", reason)

Example:
    >>> report = scan("model.ckpt")
    >>> report.verdict, [f.message for f in report.findings]
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtool.formats.shards import INDEX_RE, expand_shards
from sdtool.scan.classify import classify_global
from sdtool.scan.report import FileReport, Finding, ProblemKind, ScanReport
from sdtool.urls import as_path, is_url

if TYPE_CHECKING:
    from sdtool.cache import Cache
    from sdtool.scan.cached import Lookup
    from sdtool.scan.vm import Limits

# the pickle machine and the container walker load on first scan, so that importing
# sdtool.scan.classify (inspect's verdict column) stays cheap


def __getattr__(name: str) -> Any:
    if name == "Limits":
        from sdtool.scan.vm import Limits

        return Limits
    raise AttributeError(f"module 'sdtool.scan' has no attribute {name!r}")


__all__ = [
    "FileReport",
    "Finding",
    "Limits",
    "ScanReport",
    "classify_global",
    "iter_files",
    "scan",
    "scan_paths",
]


def scan(path: str | Path, *, limits: Limits | None = None, crc: str = "read") -> FileReport:
    """Scan one file and return its FileReport (never raises for file content).

    A file's verdict does not depend on ``--strict`` (``ScanReport.exit_code`` does).

    Args:
        path: any file; the format is decided by content, never by extension.
        limits: caps on opcodes, memo, stack and literal sizes (None: the defaults).
        crc: "read" checks the CRC-32 of every zip member that is read; "all" of every member.
    """
    from sdtool.scan.containers import scan_file
    from sdtool.scan.vm import DEFAULT_LIMITS

    return scan_file(as_path(path), limits=limits or DEFAULT_LIMITS, crc=crc)


def iter_files(paths: Iterable[str | Path], exclude: Iterable[str] = ()) -> Iterator[Path | str]:
    """Every file under ``paths`` (recursively, sorted), minus ``exclude`` globs.

    Yields a str (an error message) for a path that does not exist, so nothing is skipped
    silently.
    """
    pats = list(exclude)

    def excluded(p: Path) -> bool:
        s = p.as_posix()
        return any(fnmatch.fnmatch(s, pat) or fnmatch.fnmatch(p.name, pat) for pat in pats)

    for raw in paths:
        if is_url(raw) or is_url(str(raw)):  # a remote file: read by ranges, never walked
            yield as_path(str(raw))
            continue
        p = Path(raw)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    fp = Path(root) / name
                    if INDEX_RE.match(name):  # a shard index: its shards sit beside it
                        continue
                    if not excluded(fp):
                        yield fp
                dirs[:] = [d for d in dirs if not excluded(Path(root) / d)]
        elif p.exists():
            if not excluded(p):
                yield from expand_shards([p])  # an index: its shards
        else:
            yield str(p)


def _missing(path: str) -> FileReport:
    rep = FileReport(path, scanned=False)
    rep.problem(ProblemKind.MISSING, "not scanned: no such file or directory")
    return rep


def scan_paths(
    paths: Iterable[str | Path],
    *,
    strict: bool = False,
    exclude: Iterable[str] = (),
    jobs: int = 1,
    limits: Limits | None = None,
    crc: str = "read",
    progress: Callable[[FileReport], None] | None = None,
    cache: Cache | None = None,
    sha256: bool = False,
    isolate: bool = True,
    runner: Callable[[list[Any]], Iterator[FileReport]] | None = None,
) -> ScanReport:
    """Scan files and directories, each file in a worker process (``jobs`` of them at once).

    A worker that crashes or runs past the per-file time limit costs only its file, which is
    reported as could not scan (see sdtool.scan.workers); ``isolate=False`` scans in this
    process instead. ``progress`` is called with each FileReport as it completes (in input
    order). With a ``cache``, a file whose content was scanned before by this ruleset and
    these options is not read again (sdtool.scan.cached); ``sha256`` also computes each file's
    SHA-256 (on ``FileReport.sha256``), which lets identical files anywhere share one verdict.
    ``runner(tasks)`` scans the workers' tasks elsewhere (sdtool.cluster), reports in order.
    """
    from sdtool.scan.cached import lookup, store
    from sdtool.scan.containers import scan_file
    from sdtool.scan.vm import DEFAULT_LIMITS

    limits = limits or DEFAULT_LIMITS
    targets = list(iter_files(paths, exclude))
    report = ScanReport(strict=strict)
    settings = f"|crc={crc}|limits={limits!r}"
    found = {
        i: lookup(t, cache, sha256=sha256, settings=settings)
        for i, t in enumerate(targets)
        if isinstance(t, Path) and (cache is not None or sha256) and not is_url(t)
    }
    if cache is not None:
        cache.release()  # the lookups are done; scanning may take long
    todo = [t for i, t in enumerate(targets) if isinstance(t, Path) and _miss(found.get(i))]

    def fresh() -> Iterator[FileReport]:
        if not isolate:
            for t in todo:
                yield scan_file(t, limits=limits, crc=crc)
            return
        from dataclasses import asdict

        from sdtool.scan.workers import Task, run_isolated

        kwargs = {"crc": crc, "limits": asdict(limits)}
        tasks = [Task(os.fspath(t), kwargs) for t in todo]
        yield from (runner(tasks) if runner else run_isolated(tasks, jobs=max(1, jobs)))

    scanned = fresh()
    for i, t in enumerate(targets):
        if not isinstance(t, Path):
            r = _missing(t)
        else:
            f = found.get(i)
            if f is not None and f.hit is not None:
                r, r.cached = f.hit, True
            else:
                r = next(scanned)
                if f is not None:
                    store(t, cache, f, r)
            r.sha256 = f.sha256 if f is not None else None
        report.files.append(r)
        if progress is not None:
            progress(r)
    return report


def _miss(found: Lookup | None) -> bool:
    return found is None or found.hit is None
