"""The loader's own parser as a second opinion: CPython's C unpickler with an inert ``find_class``.

The opcode model (``vm.py``) sees what a hook cannot (call sites, memo tricks, frames); the C
unpickler is, by definition, what ``pickle.load`` and ``torch.load`` parse. Running it tells
exactly which globals a loader would import (every ``find_class`` call, in order) and where the
stream ends. It runs in a forked worker process (one per scanning process, started on first
use, restarted after a failure) with a memory limit and a per-stream wall-clock timeout, and
nothing it touches is real: every global is a fresh inert class whose calls, state
and items are swallowed, persistent ids are inert too, and the child leaves with ``os._exit``
(no destructors). Only pure value types are real (``str``, ``int``, ``tuple`` ...) so computed
operands (``str('os')``) come out as the loader would compute them.

``compare`` turns a disagreement between the two parsers into findings: an import the loader
makes that the model did not see, a stream the loader reads to STOP that the model could not
follow, or a different end offset. On platforms without ``fork`` the oracle is skipped (a note).
"""

from __future__ import annotations

import contextlib
import io
import marshal
import os
import select
import signal
import struct
import time
from dataclasses import dataclass, field
from typing import Any

ORACLE_TIMEOUT = 10.0  # seconds of wall clock per stream
ORACLE_MEMORY = 1 << 30  # bytes of extra heap the child may use
_REAL = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "complex": complex,
    "tuple": tuple,
    "list": list,
    "dict": dict,
    "set": set,
    "frozenset": frozenset,
    "slice": slice,
}


@dataclass
class OracleResult:
    """What the C unpickler did with one stream."""

    imports: list[tuple[str, str]] = field(default_factory=list)  # find_class calls, in order
    stopped: bool = False  # reached STOP
    end: int = -1  # offset after STOP (stopped) or where reading stopped
    error: str | None = None  # the exception that ended the load
    value: Any = None  # the loaded value when it is a plain int/float/str/bytes/bool/None
    failed: str | None = None  # the oracle itself could not run (timeout, memory, no fork)


def _sink(*_: Any, **__: Any) -> None:
    return None


class _Swallow:
    """A method that does nothing, whether looked up on the class or on an instance."""

    def __get__(self, obj: Any, typ: Any = None) -> Any:
        return _sink


class _InertMeta(type):
    """Classes the pickle imports: BUILD/SETITEM/APPEND on the class itself are swallowed."""

    def __getattr__(cls, name: str) -> Any:
        return _sink

    def __setitem__(cls, key: Any, value: Any) -> None:
        pass


class _Inert(metaclass=_InertMeta):
    """Instances: calling, state, items, appends all swallowed; hashable by identity."""

    __setstate__ = append = extend = add = _Swallow()

    def __new__(cls, *_: Any, **__: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def __call__(self, *_: Any, **__: Any) -> _Inert:
        return _Inert()

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def _load_inert(data: bytes) -> dict[str, Any]:
    """In the worker: load ``data`` with the C unpickler, every global inert."""
    import pickle

    imports: list[tuple[str, str]] = []

    class Probe(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            imports.append((str(module), str(name)))
            if module in ("builtins", "__builtin__") and name in _REAL:
                return _REAL[name]
            return _InertMeta(name.replace(".", "_") or "_", (_Inert,), {})

        def persistent_load(self, pid: Any) -> Any:
            return _Inert()

    f = io.BytesIO(data)
    out: dict[str, Any] = {"imports": imports, "stopped": False, "end": -1, "error": None}
    try:
        value = Probe(f, encoding="latin1").load()
        out["stopped"] = True
        if type(value) in (int, float, str, bytes, bool, type(None)):
            out["value"] = value  # plain results are compared too (number and string parsing)
    except BaseException as e:  # every failure is data here
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    out["end"] = f.tell()
    return out


def _limit_memory(memory: int) -> None:
    import resource

    try:
        with open("/proc/self/status", "rb") as st:
            data_kb = next(int(ln.split()[1]) for ln in st if ln.startswith(b"VmData:"))
        cap = data_kb * 1024 + memory
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    except (OSError, StopIteration, ValueError):
        pass


def _read_exact(fd: int, n: int) -> bytes:
    parts: list[bytes] = []
    while n:
        piece = os.read(fd, min(n, 1 << 20))
        if not piece:
            raise EOFError
        parts.append(piece)
        n -= len(piece)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _serve(rfd: int, wfd: int, memory: int) -> None:  # pragma: no cover - runs in the worker
    _limit_memory(memory)
    while True:
        try:
            (n,) = _LEN.unpack(_read_exact(rfd, 8))
            data = _read_exact(rfd, n)
        except EOFError:
            return
        reply = marshal.dumps(_load_inert(data))
        del data
        _write_all(wfd, _LEN.pack(len(reply)) + reply)


_LEN = struct.Struct("<Q")


class _Worker:
    """One forked worker process that loads streams on request; re-forked after a failure."""

    def __init__(self) -> None:
        self.pid = 0
        self.to_child = self.from_child = -1

    def _start(self, memory: int) -> None:
        a_r, a_w = os.pipe()
        b_r, b_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker
            try:
                os.close(a_w)
                os.close(b_r)
                _serve(a_r, b_w, memory)
            finally:
                os._exit(0)
        os.close(a_r)
        os.close(b_w)
        self.pid, self.to_child, self.from_child = pid, a_w, b_r

    def stop(self) -> None:
        """Kill and reap the worker (it is ours: started by _start, not yet reaped)."""
        if not self.pid:
            return
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self._forget()

    def _forget(self) -> None:
        for fd in (self.to_child, self.from_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pid, self.to_child, self.from_child = 0, -1, -1

    def load(self, data: bytes, timeout: float, memory: int) -> dict[str, Any] | str:
        """The worker's result, or why there is none (the worker is then restarted).

        A worker found dead (it crashed on an earlier stream, or was killed from outside) is
        replaced and the stream tried once more; a stream that kills a fresh worker is reported.
        """
        out = self._load_once(data, timeout, memory)
        if out == _CRASHED:
            out = self._load_once(data, timeout, memory)
        return out

    def _load_once(self, data: bytes, timeout: float, memory: int) -> dict[str, Any] | str:
        if os.getpid() != _OWNER[0]:
            # first use, or a forked copy of a scanning process (--jobs): the parent's worker
            # and pipes are not ours (their descriptors are left alone: they may be reused)
            _OWNER[0], self.pid, self.to_child, self.from_child = os.getpid(), 0, -1, -1
        if not self.pid:
            self._start(memory)
        deadline = time.monotonic() + timeout
        try:
            _write_all(self.to_child, _LEN.pack(len(data)) + data)
            head = self._recv(8, deadline)
            (n,) = _LEN.unpack(head)
            return dict(marshal.loads(self._recv(n, deadline)))
        except TimeoutError:
            self.stop()
            return f"the C unpickler did not finish within {timeout:g} s"
        except (OSError, EOFError, ValueError):
            self.stop()
            return _CRASHED

    def _recv(self, n: int, deadline: float) -> bytes:
        parts: list[bytes] = []
        while n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.from_child], [], [], left)
            if not ready:
                continue
            piece = os.read(self.from_child, min(n, 1 << 20))
            if not piece:
                raise EOFError
            parts.append(piece)
            n -= len(piece)
        return b"".join(parts)


_CRASHED = "the C unpickler crashed (memory limit or a fault)"
_WORKER = _Worker()
_OWNER = [0]  # the process that forked the worker (a forked scanner starts its own)
MAX_ORACLE_BYTES = 256 << 20  # bytes handed to the C unpickler per stream
_MARGIN = 1 << 16  # bytes past the model's STOP, to see whether the loader reads on


def run_c_unpickler(
    buf: Any,
    start: int = 0,
    end: int | None = None,
    *,
    upto: int | None = None,
    timeout: float = ORACLE_TIMEOUT,
    memory: int = ORACLE_MEMORY,
) -> OracleResult:
    """Load ``buf[start:end]`` with the C unpickler (inert globals) in the bounded worker.

    ``upto``: where the opcode model stopped; only a margin past it is sent (a loader that
    agrees stops there too; one that reads further disagrees whatever it finds).
    """
    end = len(buf) if end is None else end
    if not hasattr(os, "fork"):
        return OracleResult(failed="the C-unpickler cross-check needs fork (not on this platform)")
    stop = end if upto is None else min(end, upto + _MARGIN)
    stop = min(stop, start + MAX_ORACLE_BYTES)
    out = _WORKER.load(bytes(buf[start:stop]), timeout, memory)
    if isinstance(out, str):
        return OracleResult(failed=out)
    return OracleResult(
        imports=[(str(a), str(b)) for a, b in out["imports"]],
        stopped=bool(out["stopped"]),
        end=start + int(out["end"]),
        error=out["error"],
        value=out.get("value"),
    )


def compare(s: Any, o: OracleResult) -> list[tuple[str, str, int | None, str | None]]:
    """Where the loader's parser and the opcode model disagree on stream ``s``.

    Returns (severity, message, offset, global) tuples. An import the loader makes that the model
    did not see, a stream the loader reads to STOP that the model broke on, and a different end
    offset are findings; the loader failing where the model did not is not (the inert objects
    are stricter than real ones about values).
    """
    from sdtool.scan.classify import classify_global

    out: list[tuple[str, str, int | None, str | None]] = []
    if o.failed:
        return [("info", f"not cross-checked with the C unpickler: {o.failed}", None, None)]
    seen = {imp.written for imp in s.imports if imp.written}
    computed = any(imp.module is None for imp in s.imports)
    reported: set[tuple[str, str]] = set()
    for pair in o.imports:
        if pair in seen or pair in reported:
            continue
        reported.add(pair)
        sev, why = classify_global(*pair)
        if computed:
            out.append(
                (
                    "dangerous" if sev != "safe" else "info",
                    f"the C unpickler resolves a computed import to {pair[0]}.{pair[1]} ({why})",
                    None,
                    f"{pair[0]}.{pair[1]}",
                )
            )
        else:
            out.append(
                (
                    "dangerous",
                    f"parsers disagree: the C unpickler imports {pair[0]}.{pair[1]}, which the "
                    f"opcode model never saw ({why})",
                    None,
                    f"{pair[0]}.{pair[1]}",
                )
            )
    if o.stopped and s.error:
        out.append(
            (
                "dangerous",
                f"parsers disagree: the C unpickler reads this stream to its STOP (offset "
                f"{o.end}) but the opcode model broke at offset {s.error_offset} ({s.error}): "
                "what the loader runs there was not analysed",
                s.error_offset,
                None,
            )
        )
    elif o.stopped and s.stopped and o.end != s.end:
        out.append(
            (
                "dangerous",
                f"parsers disagree on where the stream ends: the C unpickler at offset {o.end}, "
                f"the opcode model at {s.end}",
                s.end,
                None,
            )
        )
    return out


__all__ = ["OracleResult", "compare", "run_c_unpickler"]
