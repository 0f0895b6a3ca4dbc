"""Scan files in worker processes, so one bad file never takes the others down.

Each file is scanned in a child process. A child that dies (a segfault, the kernel's OOM killer,
a ``--jobs`` worker killed from outside) or runs past the per-file time limit costs only the file
it was scanning: that file's report says why it could not be scanned, a fresh child takes the
next file, and every other file is reported as usual. Children get a data-segment limit, so an
allocation bomb ends in a MemoryError (reported as a limit) rather than in swapping.

Results come back as JSON, never as pickles: the parent unpickles nothing a child produced.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import multiprocessing as mp
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from sdtool.errors import ScanOutOfResources, ScanWorkerDied
from sdtool.scan.report import FileReport, Problem

#: per-file wall-clock limit (seconds) before the child is killed
FILE_TIMEOUT = 600.0
#: data-segment limit of a child (heap and anonymous mappings; read-only file maps do not count)
MEMORY_LIMIT = 4 << 30


@dataclass(frozen=True)
class Task:
    path: str
    kwargs: dict[str, Any]


def _child(conn: Connection, memory_limit: int) -> None:
    """Worker loop: receive a task as JSON, scan it, send the FileReport as JSON."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        cap = memory_limit if hard == resource.RLIM_INFINITY else min(memory_limit, hard)
        if soft == resource.RLIM_INFINITY or soft > cap:
            resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    faulthandler.disable()  # a crash is reported by the parent, as the file's error
    from sdtool.scan.containers import scan_file
    from sdtool.scan.vm import Limits
    from sdtool.urls import as_path

    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        task = json.loads(raw)
        kwargs = dict(task["kwargs"])
        if "limits" in kwargs:
            kwargs["limits"] = Limits(**kwargs["limits"])
        try:
            rep = scan_file(as_path(task["path"]), **kwargs)
        except MemoryError:
            rep = limit_report(task["path"], f"the scan needed more than {memory_limit} bytes")
        conn.send_bytes(json.dumps(rep.to_dict()).encode())


def limit_report(path: str, why: str) -> FileReport:
    """The report of a file whose scan ran out of this machine's time or memory."""
    return FileReport(path, problems=(Problem.of(ScanOutOfResources(why)),))


def crash_report(path: str, exitcode: int | None) -> FileReport:
    if exitcode is not None and exitcode < 0:
        try:
            how = f"signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            how = f"signal {-exitcode}"
    else:
        how = f"exit status {exitcode}"
    died = ScanWorkerDied(
        f"could not scan: the scanner process died on this file ({how}); the other "
        "files were scanned"
    )
    return FileReport(path, scanned=False, problems=(Problem.of(died),))


class _Worker:
    def __init__(self, ctx: Any, memory_limit: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child, memory_limit), daemon=True)
        self.proc.start()
        child.close()
        self.index: int | None = None  # the task it is working on
        self.started = 0.0

    def give(self, index: int, task: Task) -> None:
        self.index, self.started = index, time.monotonic()
        self.conn.send_bytes(json.dumps({"path": task.path, "kwargs": task.kwargs}).encode())

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)


def _context() -> Any:
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def run_isolated(
    tasks: Sequence[Task],
    *,
    jobs: int = 1,
    timeout: float = FILE_TIMEOUT,
    memory_limit: int = MEMORY_LIMIT,
) -> Iterator[FileReport]:
    """Scan ``tasks`` in ``jobs`` child processes; yield their FileReports in task order."""
    ctx = _context()
    workers: list[_Worker] = []
    done: dict[int, FileReport] = {}
    nxt, emitted = 0, 0
    try:
        while emitted < len(tasks):
            while nxt < len(tasks) and (
                len(workers) < jobs or any(w.index is None for w in workers)
            ):
                idle = next((w for w in workers if w.index is None), None)
                if idle is None:
                    idle = _Worker(ctx, memory_limit)
                    workers.append(idle)
                idle.give(nxt, tasks[nxt])
                nxt += 1
            busy = [w for w in workers if w.index is not None]
            if busy:
                soonest = min(w.started for w in busy) + timeout - time.monotonic()
                ready = wait(
                    [w.conn for w in busy] + [w.proc.sentinel for w in busy],
                    timeout=max(0.0, min(soonest, 1.0)),
                )
                for w in busy:
                    _collect(w, ready, tasks, done, timeout, workers)
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1
    finally:
        for w in workers:
            w.stop()


def _collect(
    w: _Worker,
    ready: list[Any],
    tasks: Sequence[Task],
    done: dict[int, FileReport],
    timeout: float,
    workers: list[_Worker],
) -> None:
    index = w.index
    assert index is not None
    path = tasks[index].path
    if w.conn in ready:
        try:
            done[index] = FileReport.from_dict(json.loads(w.conn.recv_bytes()))
            w.index = None
            return
        except (EOFError, OSError):
            pass  # it died while answering: handled as a death below
    if w.proc.sentinel in ready or not w.proc.is_alive():
        w.proc.join(5)
        done[index] = crash_report(path, w.proc.exitcode)
    elif time.monotonic() - w.started > timeout:
        done[index] = limit_report(path, f"scanning took longer than {timeout:g} s")
    else:
        return
    w.stop()
    workers.remove(w)


class Isolated:
    """One reusable isolated child that scans tasks one at a time, as ``run_isolated`` does
    for a list (a cluster worker's per-file tasks use it: sdtool.cluster). A child that dies
    or runs past ``timeout`` costs its task only; the next task gets a fresh child."""

    def __init__(self, *, timeout: float = FILE_TIMEOUT, memory_limit: int = MEMORY_LIMIT) -> None:
        self.timeout = timeout
        self.memory_limit = memory_limit
        self._worker: _Worker | None = None

    def scan(self, task: Task) -> FileReport:
        if self._worker is None:
            self._worker = _Worker(_context(), self.memory_limit)
        w = self._worker
        workers = [w]
        done: dict[int, FileReport] = {}
        w.give(0, task)
        while 0 not in done:
            left = w.started + self.timeout - time.monotonic()
            ready = wait([w.conn, w.proc.sentinel], timeout=max(0.0, min(left, 1.0)))
            _collect(w, ready, [task], done, self.timeout, workers)
        if not workers:  # it died or was stopped: the next task starts a fresh one
            self._worker = None
        return done[0]

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
