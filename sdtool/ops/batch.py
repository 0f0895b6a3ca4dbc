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

from sdtool.cache import Cache, Identity

OUTPUT_KIND = "output"
_CHUNK = 8 << 20

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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
        self.cache.put(OUTPUT_KIND, before.key, self._version(dst), doc)
        return sha


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
