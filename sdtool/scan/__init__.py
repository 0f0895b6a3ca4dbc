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
import gc
import operator
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sdtool.urls import as_path, is_url
from sdtool.vocab import Verdict, model_named

if TYPE_CHECKING:
    from sdtool.cache import Cache
    from sdtool.scan.cached import Lookup
    from sdtool.scan.classify import classify_global
    from sdtool.scan.report import FileReport, Finding, Scanned, ScanReport
    from sdtool.scan.vm import Limits

# the pickle machine and the container walker load on first scan, so that importing
# sdtool.scan.classify (inspect's verdict column) stays cheap; the allowlist loads on first
# use, so that a rerun answered from the cache loads neither; the report's dataclasses load
# when a scan reports, not when inspect imports sdtool.scan.classify (~27M instructions)

_REPORT_NAMES = frozenset(
    {"FileReport", "Finding", "Problem", "ProblemKind", "ScanReport", "Scanned"}
)


def __getattr__(name: str) -> Any:
    if name in _REPORT_NAMES:
        from sdtool.scan import report

        return getattr(report, name)
    if name == "Limits":
        from sdtool.scan.vm import Limits

        return Limits
    if name == "classify_global":  # loads the allowlist: not needed by a cached rerun
        from sdtool.scan.classify import classify_global

        return classify_global
    raise AttributeError(f"module 'sdtool.scan' has no attribute {name!r}")


__all__ = [
    "FileReport",
    "Finding",
    "Limits",
    "ScanReport",
    "classify_global",
    "iter_files",
    "scan",
    "scan_items",
    "scan_paths",
]


def scan(path: str | Path, *, limits: Limits | None = None, crc: str = "read") -> FileReport:
    """Scan one file and return its FileReport (never raises for file content).

    A file's verdict does not depend on ``--strict`` (``ScanReport.exit_code`` does). A path
    that does not exist or is a folder raises FileAccessError, as ``inspect`` and ``hash_file``
    do (``scan_paths`` reports it as a file it could not scan instead).

    Args:
        path: any file; the format is decided by content, never by extension.
        limits: caps on opcodes, memo, stack and literal sizes (None: the defaults).
        crc: "read" checks the CRC-32 of every zip member that is read; "all" of every member.
    """
    from sdtool.scan.containers import scan_file
    from sdtool.scan.vm import DEFAULT_LIMITS

    target = as_path(path)
    if not is_url(str(target)) and not os.path.isfile(target):
        from sdtool.errors import FileAccessError

        if os.path.isdir(target):
            raise FileAccessError("is a directory, not a model file", path=target)
        if not os.path.lexists(target):
            raise FileAccessError("no such file", path=target)
    return scan_file(target, limits=limits or DEFAULT_LIMITS, crc=crc)


class Target(NamedTuple):
    """A file to scan as the walk found it: its path (as ``str(Path)`` spells it), its stat
    (None when it cannot be stat'ed: the scan says why), or a URL, or a path that is missing."""

    path: str
    st: os.stat_result | None
    kind: str = "file"  # "file" | "url" | "missing"


def iter_files(paths: Iterable[str | Path], exclude: Iterable[str] = ()) -> Iterator[Path | str]:
    """Every file under ``paths`` (recursively, sorted), minus ``exclude`` globs.

    Yields a str (an error message) for a path that does not exist, so nothing is skipped
    silently.
    """
    for t in walk(paths, exclude):
        yield t.path if t.kind == "missing" else as_path(t.path)


def walk(paths: Iterable[str | Path], exclude: Iterable[str] = ()) -> Iterator[Target]:
    """``iter_files`` as Targets, each with the stat the walk got anyway (``os.scandir``):
    a file's identity for the cache costs no second system call, and no Path is built."""
    pats = list(exclude)

    def excluded(s: str, name: str) -> bool:
        return any(fnmatch.fnmatch(s, pat) or fnmatch.fnmatch(name, pat) for pat in pats)

    for raw in paths:
        if is_url(raw) or is_url(str(raw)):  # a remote file: read by ranges, never walked
            yield Target(str(raw), None, "url")
            continue
        p = Path(raw)
        top = str(p)
        if os.path.isdir(top):
            yield from _walk_dir(top, excluded if pats else None)
        elif p.exists():
            if not (pats and excluded(p.as_posix(), p.name)):
                for f in _shards(p):  # an index: its shards
                    yield Target(str(f), _stat(f))
        else:
            yield Target(top, None, "missing")


def _walk_dir(top: str, excluded: Callable[[str, str], bool] | None) -> Iterator[Target]:
    """``os.walk``'s order (a folder's files sorted, then its subfolders sorted, symlinked
    folders not followed, unreadable ones skipped), with each file's stat."""
    try:
        with os.scandir(top) as it:
            entries = list(it)
    except OSError:
        return
    files: list[os.DirEntry[str]] = []
    dirs: list[os.DirEntry[str]] = []
    for e in entries:
        try:
            is_dir = e.is_dir()
        except OSError:
            is_dir = False
        (dirs if is_dir else files).append(e)
    files.sort(key=_NAME)
    prefix = "" if top == "." else top if top.endswith("/") else top + "/"
    for e in files:
        name = e.name  # a shard index is listed too (skipped as JSON text): nothing silently
        fp = prefix + name
        if excluded is not None and excluded(fp, name):
            continue
        try:
            st: os.stat_result | None = e.stat()
        except OSError:
            st = None
        yield _new(Target, (fp, st, "file"))  # as Target(fp, st), without its Python __new__
    dirs.sort(key=_NAME)
    for e in dirs:
        fp = prefix + e.name
        if excluded is not None and excluded(fp, e.name):
            continue
        try:
            if e.is_symlink():
                continue
        except OSError:
            continue
        yield from _walk_dir(fp, excluded)


_new = tuple.__new__
_NAME = operator.attrgetter("name")  # a sort key without a Python call per entry


def _stat(p: Path) -> os.stat_result | None:
    try:
        return os.stat(p)
    except OSError:
        return None


def _maybe_index(name: str) -> bool:
    """A cheap test before the shard index pattern (whose module loads numpy)."""
    return name.endswith(".json") and ".safetensors.index" in name


def _shards(p: Path) -> list[Path]:
    if not _maybe_index(p.name):
        return [p]
    from sdtool.formats.shards import expand_shards

    return expand_shards([p])


def _missing(path: str) -> FileReport:
    from sdtool.scan.report import FileReport, Problem, ProblemKind

    why = Problem(ProblemKind.MISSING, "not scanned: no such file or directory")
    return FileReport(path, scanned=False, problems=(why,))


def scan_paths(
    paths: Iterable[str | Path],
    *,
    strict: bool = False,
    exclude: Iterable[str] = (),
    jobs: int = 1,
    limits: Limits | None = None,
    crc: str = "read",
    on_result: Callable[[FileReport], None] | None = None,
    cache: Cache | None = None,
    sha256: bool = False,
    isolate: bool = True,
    runner: Callable[[list[Any]], Iterator[FileReport]] | None = None,
) -> ScanReport:
    """Scan files and directories, each file in a worker process (``jobs`` of them at once).

    A worker that crashes or runs past the per-file time limit costs only its file, which is
    reported as could not scan (see sdtool.scan.workers); ``isolate=False`` scans in this
    process instead. ``on_result`` is called with each FileReport as it completes (in input
    order), as the batch verbs' ``on_result`` is. With a ``cache``, a file whose content was
    scanned before by this ruleset and these options is not read again (sdtool.scan.cached);
    ``sha256`` also computes each file's SHA-256 (on ``FileReport.sha256``), which lets
    identical files anywhere share one verdict.
    ``runner(tasks)`` scans the workers' tasks elsewhere (sdtool.cluster), reports in order.
    """
    from sdtool.scan.report import ScanReport

    files: list[FileReport] = []
    for batch in scan_items(
        paths, exclude=exclude, jobs=jobs, limits=limits, crc=crc, cache=cache,
        sha256=sha256, isolate=isolate, runner=runner,
    ):  # fmt: skip
        for item in batch:
            r = item.report
            files.append(r)
            if on_result is not None:
                on_result(r)
    return ScanReport(tuple(files), strict=strict)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused: the walk and the lookups build a few objects per
    file that all stay alive (nothing for it to find), and would otherwise trigger a young
    collection every few hundred files, each walking what was just built."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


#: at most this many ready results per batch ``scan_items`` yields
BATCH = 512


def scan_items(
    paths: Iterable[str | Path],
    *,
    exclude: Iterable[str] = (),
    jobs: int = 1,
    limits: Limits | None = None,
    crc: str = "read",
    cache: Cache | None = None,
    sha256: bool = False,
    isolate: bool = True,
    runner: Callable[[list[Any]], Iterator[FileReport]] | None = None,
) -> Iterator[list[Scanned]]:
    """``scan_paths``' files as they complete, in input order, in batches: each batch holds
    the results ready now (cached verdicts, up to BATCH of them), or one fresh scan.

    What is cached costs a stat from the walk and a share of one query per few hundred
    files; its verdict stays the stored JSON until ``Scanned.report`` is asked for, and no
    worker process starts, nor does the scanner load, unless some file must be scanned.
    """
    from sdtool.scan.cached import lookup_many, store
    from sdtool.scan.report import Scanned

    # the limits are part of a verdict's key; the defaults' by name (they live in scan/vm.py,
    # whose source is in the ruleset version: a new default is a new ruleset)
    settings = f"|crc={crc}|limits={'default' if limits is None else repr(limits)}"
    with _gc_paused():
        targets = list(walk(paths, exclude))
        found: list[Lookup | None] = [None] * len(targets)
        if cache is not None or sha256:
            local = [i for i, t in enumerate(targets) if t.kind == "file"]
            known = lookup_many(
                [targets[i] for i in local], cache, sha256=sha256, settings=settings
            )
            for i, hit in zip(local, known, strict=True):
                # a file skipped as no model is never one under a model's name: the same bytes
                # named model.ckpt (a copy, by SHA-256) are scanned, and fail, afresh
                if hit.verdict is not Verdict.SKIPPED or not model_named(targets[i].path):
                    found[i] = hit
    if cache is not None:
        cache.release()  # the lookups are done; scanning may take long
    todo = [
        t.path
        for t, f in zip(targets, found, strict=True)
        if t.kind != "missing" and (f is None or f.hit is None)
    ]

    def fresh() -> Iterator[FileReport]:
        from sdtool.scan.containers import scan_file
        from sdtool.scan.vm import DEFAULT_LIMITS

        lim = limits or DEFAULT_LIMITS
        if not isolate:
            for t in todo:
                yield scan_file(as_path(t), limits=lim, crc=crc)
            return
        from dataclasses import asdict

        from sdtool.scan.workers import Task, run_isolated

        kwargs = {"crc": crc, "limits": asdict(lim)}
        tasks = [Task(t, kwargs) for t in todo]
        yield from (runner(tasks) if runner else run_isolated(tasks, jobs=max(1, jobs)))

    scanned = fresh()  # a generator: nothing starts until a file needs it
    batch: list[Scanned] = []
    for t, f in zip(targets, found, strict=True):
        if t.kind == "missing":
            batch.append(Scanned(t.path, report=_missing(t.path)))
        elif f is not None and f.hit is not None:
            batch.append(Scanned(t.path, f.report, f.hit, f.verdict, f.sha256, True))
        else:
            if batch:
                yield batch
                batch = []
            r = next(scanned)
            if f is not None:
                store(t.path, cache, f, r)
            yield [Scanned(t.path, report=r, sha256=f.sha256 if f is not None else None)]
            continue
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
