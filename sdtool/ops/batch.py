"""Batches of one-file jobs (convert / prune ``--out-dir``): results as each file finishes,
resumable outputs, and the same jobs run on threads here or on a cluster.

Resume: after an output is written, the result cache (sdtool.cache) records

    (input identity, options digest, output path) -> output identity, output SHA-256, result

where the options digest names everything that changes the output bytes (dtype, key, metadata,
format, verify ...; not ``overwrite`` or a progress callback) and the sdtool version. A later
run with ``--resume`` skips a file only when the input still has that identity and the output
on disk still has the recorded identity (device, inode, size, mtime, ctime): an output that was
replaced, touched or truncated since, or written by something else, is redone. The record is
made only when the input did not change while it was converted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sdtool.cache import Cache, Identity, file_sha256
from sdtool.errors import SdtoolError

OUTPUT_KIND = "output"

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class Runner(Protocol):
    """Runs ``fn`` over ``items``; yields (index, result) in completion order (sdtool.cluster)."""

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        on_error: Callable[[Any, BaseException], Any] | None = None,
    ) -> Iterator[tuple[int, Any]]: ...


def options_digest(options: Any, **extra: Any) -> str:
    """A short hash of the options that decide an output's bytes (and the sdtool version)."""
    from sdtool import __version__

    changes = {
        n: v
        for n, v in (("progress", None), ("overwrite", False))
        if any(f.name == n for f in dataclasses.fields(options))
    }
    text = repr(dataclasses.replace(options, **changes)) + repr(sorted(extra.items()))
    return hashlib.sha256(f"{__version__}|{text}".encode()).hexdigest()[:32]


_CACHES: dict[str, Cache] = {}
_CACHES_LOCK = threading.Lock()


def shared_cache(directory: str | Path | None) -> Cache:
    """One Cache per folder per process (thread-safe), so a job sent to a cluster worker as a
    folder name reuses its connection."""
    key = os.fspath(directory) if directory is not None else ""
    with _CACHES_LOCK:
        if key not in _CACHES:
            _CACHES[key] = Cache(directory)
        return _CACHES[key]


@dataclass(frozen=True)
class Resume:
    """Where a batch records its outputs and how it checks them (picklable: a folder name).

    ``directory`` None: the default cache folder.
    """

    directory: Path | None
    digest: str

    @property
    def cache(self) -> Cache:
        return shared_cache(self.directory)

    def _version(self, dst: Path) -> str:
        return f"{self.digest}|{os.path.abspath(dst)}"

    def done(self, src: Path, dst: Path) -> dict[str, Any] | None:
        """The record of ``dst`` written from this very ``src`` with these options, if the
        output on disk is still exactly what was written (else None: redo it)."""
        try:
            ident = Identity.of_path(src)
        except OSError:
            return None
        doc = self.cache.get(OUTPUT_KIND, ident.key, self._version(dst))
        self.cache.release()
        if doc is None:
            return None
        try:  # the file written: dst, or the index of a sharded output
            out = Identity.of_path(doc.get("written") or dst)
        except (OSError, TypeError):
            return None
        if doc.get("identity") != list(out):
            return None
        return doc

    def record(
        self,
        src: Path,
        before: Identity,
        dst: Path,
        result: dict[str, Any],
        written: Path | None = None,
    ) -> str | None:
        """Record ``dst`` (just written from ``src``, whose identity was ``before``; the file
        on disk is ``written``, e.g. a shard index, else ``dst``); returns its SHA-256, or None
        when nothing was recorded (the input changed meanwhile, or the output is gone)."""
        path = written or dst
        try:
            out = Identity.of_path(path)
            sha = file_sha256(path)
            if Identity.of_path(src) != before or Identity.of_path(path) != out:
                return None
        except OSError:
            return None
        doc = {
            "identity": list(out),
            "sha256": sha,
            "result": result,
            "written": os.path.abspath(path),
        }
        self.cache.put(OUTPUT_KIND, before.key, self._version(dst), doc, src)
        return sha


def record_from_json(cls: type[R], doc: dict[str, Any]) -> R:
    """The per-file result of class ``cls`` that its ``to_json`` described (a resume record)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kw = {k: v for k, v in doc.items() if k in names}
    return cls(**{**kw, "path": Path(doc["path"]), "output": Path(doc["output"])})


def run_one(
    cls: type[R],
    src: Path,
    dst: Path,
    owner: Path,
    resume: Resume | None,
    overwrite: bool,
    work: Callable[[int, bool], tuple[R, Path | None]],
    verb: str,
) -> R:
    """The steps every one-file job of a batch shares, around ``work(size, overwrite)``, which
    makes the output and returns (result, the file written or None when nothing was): refuse a
    second input mapping to ``owner``'s output, answer from a resume record, skip an existing
    output unless overwriting, turn every failure into a ``failed`` result of class ``cls``
    (fields path, output, status, error, input_bytes, seconds, output_sha256), and record what
    was written for the next ``--resume``."""
    try:
        size = src.stat().st_size
    except OSError:
        size = 0

    def failed(error: str) -> R:
        return cls(src, dst, status="failed", input_bytes=size, error=error)  # type: ignore[call-arg]

    if owner != src:
        return failed(f"{src}: {owner} already {verb}s to {dst}")
    if resume is not None:
        doc = resume.done(src, dst)
        if doc is not None:
            try:
                old = record_from_json(cls, doc["result"])
            except (KeyError, TypeError, ValueError):
                old = None
            if old is not None:
                return dataclasses.replace(
                    old, path=src, status="resumed", seconds=0.0,  # type: ignore[type-var]
                    output_sha256=doc.get("sha256"),
                )  # fmt: skip
        overwrite = True  # not verifiably ours: redo it
    if dst.exists() and not overwrite:
        return cls(src, dst, status="skipped", input_bytes=size)  # type: ignore[call-arg]
    try:
        before = Identity.of_path(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        result, written = work(size, overwrite)
    except SdtoolError as e:
        return failed(str(e))
    except OSError as e:
        return failed(f"{src}: {e.strerror or e}")
    if resume is not None and written is not None:
        sha = resume.record(src, before, dst, result.to_json(), written=written)  # type: ignore[attr-defined]
        result = dataclasses.replace(result, output_sha256=sha)  # type: ignore[type-var]
    return result


def run_batch(
    items: Sequence[I],
    one: Callable[[I], R],
    *,
    jobs: int = 1,
    on_result: Callable[[R], None] | None = None,
    cancel: threading.Event | None = None,
    runner: Runner | None = None,
    on_error: Callable[[I, BaseException], R] | None = None,
) -> list[R]:
    """``one(item)`` for every item, ``jobs`` at once (threads) or on ``runner`` (a cluster:
    ``one`` must then be picklable); ``on_result`` sees each result as it finishes, the list
    comes back in input order. Ctrl-C sets ``cancel`` and waits for running items to stop.
    ``on_error(item, exception)``: the result of a cluster task that failed (a dead worker)."""
    results: dict[int, R] = {}

    def done(i: int, r: R) -> None:
        results[i] = r
        if on_result is not None:
            on_result(r)

    if runner is not None:
        for i, r in runner.map_unordered(one, items, on_error):
            done(i, r)
    elif jobs <= 1:
        for i, item in enumerate(items):
            done(i, one(item))
    else:
        pool = ThreadPoolExecutor(max_workers=jobs)
        futures: dict[Future[R], int] = {pool.submit(one, it): i for i, it in enumerate(items)}
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in sorted(finished, key=futures.__getitem__):
                    done(futures[f], f.result())
        except BaseException:
            if cancel is not None:
                cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
    return [results[i] for i in range(len(items))]
