"""Per-file tasks on a Dask distributed cluster (``--cluster ADDRESS``; ``local`` starts one).

Why Dask distributed (docs/scale.md): pure-Python wheels on the package registry (no binary
runtime, no extra index), small, a plain TCP scheduler that ``dask scheduler`` /
``dask worker`` start on any machine, and ``LocalCluster`` for tests and a single big box.

Every file is one task; the tasks run the very per-file code a local run uses (a scan in the
isolated, memory-capped child process of sdtool.scan.workers; convert's streaming writer), so
a task's memory is bounded as it is locally. Results stream back as they complete
(``as_completed``), at most ``window`` tasks in flight, so millions of files never sit in the
scheduler at once. Scan results travel as JSON text, as they do from a local scan child.

``distributed`` is imported only when a Cluster is made: nothing else here needs it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sdtool.errors import SdtoolError, UsageError

R = TypeVar("R")
LOCAL = "local"
_THREAD = threading.local()  # a worker thread's isolated scan child
#: how long to wait for the scheduler at an address
CONNECT_TIMEOUT = "20s"


class Cluster:
    """A client of the Dask scheduler at ``address``, or of a new LocalCluster (``local``)
    with ``workers`` single-threaded worker processes.

    Example:
        >>> with Cluster("local", workers=2) as c:
        ...     results = dict(c.map_unordered(len, ["a", "bb"]))
    """

    def __init__(self, address: str, *, workers: int = 2, window: int | None = None) -> None:
        try:
            import distributed
        except ImportError:
            raise UsageError(
                "--cluster needs the distributed package: pip install 'sdtool[cluster]'"
            ) from None
        self._local: Any = None
        try:
            if address == LOCAL:
                self._local = distributed.LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",
                    silence_logs=logging.ERROR,
                )
                self.client = distributed.Client(self._local)
            else:
                self.client = distributed.Client(address, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError, RuntimeError) as e:
            self.close()
            raise SdtoolError(f"cannot reach the Dask scheduler at {address}: {e}") from None
        self._version = code_version()
        self._check_workers(address)
        threads = sum(self.client.nthreads().values()) or 1
        self.window = window or max(32, 4 * threads)

    def _check_workers(self, address: str) -> None:
        """Every worker connected now must run this very sdtool: a task is a reference to an
        sdtool function, and its results must mean what they mean here (a worker with an
        older scanner would pass what this one catches). Workers that join later are checked
        by each task (``_guarded``)."""
        try:
            self.client.wait_for_workers(1, timeout=120)
            theirs = self.client.run(code_version)
        except Exception as e:  # whatever the worker side raised, as one line
            self.close()
            raise SdtoolError(
                f"the Dask workers at {address} cannot run sdtool tasks ({type(e).__name__}): "
                "install sdtool[cluster] in the workers' environment"
            ) from None
        for worker, version in sorted(theirs.items()):
            if version != self._version:
                self.close()
                raise WorkerMismatch(worker, version, self._version).as_error()

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self._local is not None:
            self._local.close()
            self._local = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map_unordered(
        self,
        fn: Callable[[Any], R],
        items: Sequence[Any],
        on_error: Callable[[Any, BaseException], R] | None = None,
    ) -> Iterator[tuple[int, R]]:
        """``fn(item)`` for each item as a task; (index, result) as each completes.

        A task that raises (or whose worker died) gives ``on_error(item, exception)``, or
        re-raises without ``on_error``.
        """
        from distributed import as_completed

        index: dict[Any, int] = {}
        todo = iter(enumerate(items))

        def submit() -> Any:
            nxt = next(todo, None)
            if nxt is None:
                return None
            fut = self.client.submit(_guarded, fn, nxt[1], self._version, pure=False)
            index[fut.key] = nxt[0]
            return fut

        first = [f for f in (submit() for _ in range(min(self.window, len(items)))) if f]
        pending = as_completed(first)
        try:
            for fut in pending:
                i = index.pop(fut.key)
                if fut.status == "finished":
                    result = fut.result()
                else:
                    exc = fut.exception()
                    if isinstance(exc, WorkerMismatch):  # never a per-file failure
                        raise exc.as_error()
                    if on_error is None:
                        raise exc
                    result = on_error(items[i], exc)
                fut.release()
                more = submit()
                if more is not None:
                    pending.add(more)
                yield i, result
        finally:
            for fut in list(pending.futures):
                fut.cancel()

    def map_ordered(
        self,
        fn: Callable[[Any], R],
        items: Sequence[Any],
        on_error: Callable[[Any, BaseException], R] | None = None,
    ) -> Iterator[R]:
        """As ``map_unordered``, yielded in input order (each as soon as it and all before
        it are done), as a local scan reports."""
        done: dict[int, R] = {}
        nxt = 0
        for i, r in self.map_unordered(fn, items, on_error):
            done[i] = r
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1


# -- the tasks (module-level: workers import them by name) ---------------------------------


def code_version() -> str:
    """This sdtool's version and a digest of every file of its package
    (``ruleset.code_version``; a module-level function here, so that ``client.run`` sends
    it by name and each worker computes its own)."""
    from sdtool.scan.ruleset import code_version as version

    return version()


class WorkerMismatch(Exception):
    """A worker runs other sdtool code than the client (raised on the worker by a task)."""

    def __init__(self, worker: str, theirs: str, ours: str) -> None:
        super().__init__(worker, theirs, ours)
        self.worker, self.theirs, self.ours = worker, theirs, ours

    def as_error(self) -> SdtoolError:
        return SdtoolError(
            f"the Dask worker {self.worker} runs sdtool {self.theirs}, this is {self.ours}: "
            "install the same sdtool on every worker"
        )


def _guarded(fn: Callable[[Any], R], item: Any, version: str) -> R:
    """``fn(item)`` on a worker whose sdtool is the client's (``code_version``), else a
    ``WorkerMismatch`` that stops the whole run: no result of other code is mixed in."""
    ours = code_version()
    if ours != version:
        from distributed import get_worker

        raise WorkerMismatch(get_worker().address, ours, version)
    return fn(item)


def scan_task(task: str) -> str:
    """One file's scan on a worker, in an isolated child as a local scan does (kept for the
    worker thread's next task, as a local scan keeps its children); JSON in and out."""
    _allow_children()
    from sdtool.scan.workers import Isolated, Task

    scanner = getattr(_THREAD, "scanner", None)
    if scanner is None:
        import sdtool.scan.containers  # noqa: F401  (loaded once here, inherited by the child)

        scanner = _THREAD.scanner = Isolated()
    d = json.loads(task)
    return json.dumps(scanner.scan(Task(d["path"], d["kwargs"])).to_dict())


def _allow_children() -> None:
    """Dask's worker processes are daemonic, and multiprocessing refuses children to daemons
    (lest they outlive it). The scan child is joined or killed before its task returns, so the
    worker may have it: clear the flag (what ``distributed.worker.daemon: False`` does)."""
    import multiprocessing as mp

    me = mp.current_process()
    if me.daemon:
        me._config["daemon"] = False  # type: ignore[attr-defined]


def scan_runner(cluster: Cluster) -> Callable[[Sequence[Any]], Iterator[Any]]:
    """A ``runner`` for ``scan_paths``: its fresh scans as tasks, reports in input order."""
    from dataclasses import replace

    from sdtool.scan.report import FileReport, Problem, ProblemKind
    from sdtool.scan.workers import crash_report

    def run(tasks: Sequence[Any]) -> Iterator[FileReport]:
        texts = [json.dumps({"path": t.path, "kwargs": t.kwargs}) for t in tasks]

        def failed(text: str, exc: BaseException) -> str:
            path = json.loads(text)["path"]
            why = f"could not scan: the cluster task failed ({type(exc).__name__})"
            rep = replace(crash_report(path, None), problems=(Problem(ProblemKind.CRASH, why),))
            return json.dumps(rep.to_dict())

        for doc in cluster.map_ordered(scan_task, texts, failed):
            yield FileReport.from_dict(json.loads(doc))

    return run


def hash_task(args: tuple[str, tuple[str, ...], str | None, bool]) -> dict[str, Any]:
    """One file's hashes on a worker, through the cache in the named folder (on the worker's
    machine) unless disabled: ``{"result": HashResult JSON, "cached": bool}`` or
    ``{"error": message}``."""
    from sdtool.ops.batch import shared_cache
    from sdtool.ops.hash import hash_cached
    from sdtool.urls import as_path

    path, names, cache_dir, use_cache = args
    cache = shared_cache(cache_dir) if use_cache else None
    try:
        result, cached = hash_cached(as_path(path), cache, algorithms=names)  # URLs stay whole
    except SdtoolError as e:
        return {"error": str(e.with_path(path))}
    except OSError as e:
        return {"error": f"{path}: {e.strerror or e}"}
    return {"result": result.to_json(), "cached": cached}


def hash_paths(
    cluster: Cluster,
    paths: Sequence[Path],
    names: tuple[str, ...],
    cache_dir: Path | None,
) -> Iterator[tuple[Path, Any, bool, str | None]]:
    """Hash ``paths`` as tasks, in input order: (path, HashResult or None, cached, error).

    ``cache_dir`` None: no cache; else each worker uses that folder on its own machine.
    """
    from sdtool.ops.hash import HashResult

    folder = None if cache_dir is None else str(cache_dir)
    args = [(str(p), names, folder, cache_dir is not None) for p in paths]

    def lost(arg: tuple[str, ...], exc: BaseException) -> dict[str, Any]:
        return {"error": f"{arg[0]}: the cluster task failed ({type(exc).__name__})"}

    for p, doc in zip(paths, cluster.map_ordered(hash_task, args, lost), strict=True):
        if "error" in doc:
            yield p, None, False, str(doc["error"])
            continue
        r = doc["result"]
        result = HashResult(
            path=p, size=int(r["size"]), safetensors=bool(r["safetensors"]),
            hashes=dict(r["hashes"]), notes=dict(r.get("notes", {})),
        )  # fmt: skip
        yield p, result, bool(doc["cached"]), None
