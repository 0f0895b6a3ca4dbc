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
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    # what the unpickler did with the globals, in order: ("new" | "init" | "call" | "build",
    # (module, name)); "new" without "init" is NEWOBJ, "call" is a call of a call's result,
    # ("", "<result>") names what such a call or a persistent id returned
    events: list[tuple[str, tuple[str, str]]] = field(default_factory=list)
    events_capped: bool = False


def _sink(*_: Any, **__: Any) -> None:
    return None


_EVENTS: list[tuple[str, tuple[str, str]]] = []  # in the worker: (event, (module, name))
_MAX_EVENTS = 1_000_000
_RESULT = ("", "<result>")  # what a call of an inert instance or a persistent id returns


def _note(event: str, cls: Any) -> None:
    """Record, in the worker, that the unpickler did ``event`` with a global's class."""
    if len(_EVENTS) < _MAX_EVENTS:
        _EVENTS.append((event, getattr(cls, "_sd_name", _RESULT)))


class _Swallow:
    """A method that does nothing, whether looked up on the class or on an instance."""

    def __get__(self, obj: Any, typ: Any = None) -> Any:
        return _sink


class _Recorded:
    """``__setstate__``: BUILD on an instance (or on the class itself) is recorded, then
    swallowed."""

    def __init__(self, event: str) -> None:
        self.event = event

    def __get__(self, obj: Any, typ: Any = None) -> Any:
        cls = typ if obj is None else type(obj)
        return lambda *_, **__: _note(self.event, cls)


class _InertMeta(type):
    """Classes the pickle imports: SETITEM/APPEND on the class itself are swallowed."""

    def __getattr__(cls, name: str) -> Any:
        return _sink

    def __setitem__(cls, key: Any, value: Any) -> None:
        pass


class _Inert(metaclass=_InertMeta):
    """Instances: calling, state, items, appends all swallowed (calls and BUILDs recorded);
    hashable by identity."""

    _sd_name = _RESULT
    __setstate__ = _Recorded("build")
    append = extend = add = _Swallow()

    def __new__(cls, *_: Any, **__: Any) -> _Inert:
        _note("new", cls)  # REDUCE, INST, OBJ, NEWOBJ, NEWOBJ_EX of an imported class
        return object.__new__(cls)

    def __init__(self, *_: Any, **__: Any) -> None:
        _note("init", type(self))  # REDUCE, INST, OBJ (NEWOBJ runs __new__ only)

    def __call__(self, *_: Any, **__: Any) -> _Inert:
        _note("call", type(self))  # a call of what an earlier call returned
        return object.__new__(_Inert)

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def _inert_class(module: str, name: str) -> type:
    return _InertMeta(name.replace(".", "_") or "_", (_Inert,), {"_sd_name": (module, name)})


def _probe(base: Any, imports: list[tuple[str, str]]) -> Any:
    """``base`` (the C ``pickle.Unpickler`` or Python's ``pickle._Unpickler``) with every
    global inert and recorded."""

    class Probe(base):
        def find_class(self, module: str, name: str) -> Any:
            imports.append((str(module), str(name)))
            if module in ("builtins", "__builtin__") and name in _REAL:
                return _REAL[name]
            return _inert_class(str(module), str(name))

        def persistent_load(self, pid: Any) -> Any:
            return object.__new__(_Inert)

    return Probe


_WRAPPER = ("joblib.numpy_pickle", "NumpyArrayWrapper")


def _joblib_probe(
    imports: list[tuple[str, str]], f: Any, skips: dict[int, tuple[int, bool]]
) -> Any:
    """joblib's NumpyUnpickler as joblib builds it (Python's ``pickle._Unpickler`` whose BUILD,
    on a NumpyArrayWrapper, then reads the array from the file: raw bytes, or a nested pickle
    that joblib loads with ``pickle.load``). Where the array bytes end is the opcode model's
    reading (``skips``: offset -> (end, nested)); a wrapper the model did not skip, or a skip
    with no wrapper, makes the two parsers part ways, which ``compare`` reports."""
    import pickle

    base: Any = _probe(pickle._Unpickler, imports)
    c_probe = _probe(pickle.Unpickler, imports)

    class JoblibProbe(base):
        dispatch: ClassVar[dict[int, Any]] = dict(base.dispatch)

        def load_build(self) -> None:
            base.load_build(self)
            top = self.stack[-1] if self.stack else None
            if getattr(type(top), "_sd_name", None) != _WRAPPER:
                return
            skip = skips.get(f.tell())
            if skip is None:
                raise ValueError(f"a NumpyArrayWrapper at {f.tell()} whose array was not skipped")
            self.stack.pop()
            end, nested = skip
            if nested:
                c_probe(f, encoding="latin1").load()
            else:
                f.seek(end)
            self.stack.append(object.__new__(_Inert))

        dispatch[pickle.BUILD[0]] = load_build

    return JoblibProbe


def _load_inert(data: bytes, skips: list[tuple[int, int, bool]] | None = None) -> dict[str, Any]:
    """In the worker: load ``data`` with the C unpickler (or, for a joblib stream, joblib's
    Python unpickler), every global inert, recording imports, calls and BUILDs."""
    import pickle

    imports: list[tuple[str, str]] = []
    del _EVENTS[:]
    f = io.BytesIO(data)
    if skips:
        table = {a: (b, nested) for a, b, nested in skips}
        probe = _joblib_probe(imports, f, table)
    else:
        probe = _probe(pickle.Unpickler, imports)
    out: dict[str, Any] = {"imports": imports, "stopped": False, "end": -1, "error": None}
    try:
        value = probe(f, encoding="latin1").load()
        out["stopped"] = True
        if type(value) in (int, float, str, bytes, bool, type(None)):
            out["value"] = value  # plain results are compared too (number and string parsing)
    except BaseException as e:  # every failure is data here
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    out["end"] = f.tell()
    out["events"] = list(_EVENTS)
    out["events_capped"] = len(_EVENTS) >= _MAX_EVENTS
    del _EVENTS[:]
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
            data, skips = marshal.loads(_read_exact(rfd, n))
        except EOFError:
            return
        reply = marshal.dumps(_load_inert(data, skips))
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

    def load(self, request: bytes, timeout: float, memory: int) -> dict[str, Any] | str:
        """The worker's result, or why there is none (the worker is then restarted).

        A worker found dead (it crashed on an earlier stream, or was killed from outside) is
        replaced and the stream tried once more; a stream that kills a fresh worker is reported.
        """
        out = self._load_once(request, timeout, memory)
        if out == _CRASHED:
            out = self._load_once(request, timeout, memory)
        return out

    def _load_once(self, request: bytes, timeout: float, memory: int) -> dict[str, Any] | str:
        if os.getpid() != _OWNER[0]:
            # first use, or a forked copy of a scanning process (--jobs): the parent's worker
            # and pipes are not ours (their descriptors are left alone: they may be reused)
            _OWNER[0], self.pid, self.to_child, self.from_child = os.getpid(), 0, -1, -1
        if not self.pid:
            self._start(memory)
        deadline = time.monotonic() + timeout
        try:
            _write_all(self.to_child, _LEN.pack(len(request)) + request)
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
#: the one failure that is the platform's, the same on every run (not the moment's)
NO_FORK = "the C-unpickler cross-check needs fork (not on this platform)"
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
    joblib: list[tuple[int, int, bool]] | None = None,
    timeout: float = ORACLE_TIMEOUT,
    memory: int = ORACLE_MEMORY,
) -> OracleResult:
    """Load ``buf[start:end]`` with the C unpickler (inert globals) in the bounded worker.

    ``upto``: where the opcode model stopped; only a margin past it is sent (a loader that
    agrees stops there too; one that reads further disagrees whatever it finds). ``joblib``:
    the model's joblib array spans (start, end, nested pickle?): the stream is then loaded as
    joblib.load reads it (see _joblib_probe); raw array bytes are not sent, only their place.
    """
    end = len(buf) if end is None else end
    if not hasattr(os, "fork"):
        return OracleResult(failed=NO_FORK)
    stop = end if upto is None else min(end, upto + _MARGIN)
    data, skips, removed = _compact(buf, start, stop, joblib or [])
    out = _WORKER.load(marshal.dumps((data, skips)), timeout, memory)
    if isinstance(out, str):
        return OracleResult(failed=out)
    at = int(out["end"])
    at += sum(n for where, n in removed if where <= at)  # back to offsets in ``buf``
    return OracleResult(
        imports=[(str(a), str(b)) for a, b in out["imports"]],
        stopped=bool(out["stopped"]),
        end=start + at,
        error=out["error"],
        value=out.get("value"),
        events=[(str(e), (str(m), str(n))) for e, (m, n) in out.get("events", [])],
        events_capped=bool(out.get("events_capped")),
    )


def _compact(
    buf: Any, start: int, stop: int, joblib: list[tuple[int, int, bool]]
) -> tuple[bytes, list[tuple[int, int, bool]], list[tuple[int, int]]]:
    """The bytes sent to the worker: ``buf[start:stop]`` without raw joblib array bytes (the
    worker only needs to know where they were), capped at MAX_ORACLE_BYTES; the skip table in
    the sent bytes' offsets; and (offset in the sent bytes, bytes removed there)."""
    pieces: list[bytes] = []
    skips: list[tuple[int, int, bool]] = []
    removed: list[tuple[int, int]] = []
    pos = sent = 0
    for a, b, nested in joblib:
        a, b = a - start, b - start
        if a < pos or a >= stop - start:
            continue
        pieces.append(bytes(buf[start + pos : start + a]))
        sent += a - pos
        if nested:  # the nested pickle is loaded: its bytes are sent
            skips.append((sent, sent + (b - a), True))
            pos = a
        else:
            skips.append((sent, sent, False))
            removed.append((sent, b - a))
            pos = b
        if sent > MAX_ORACLE_BYTES:
            break
    pieces.append(bytes(buf[start + pos : min(stop, start + pos + MAX_ORACLE_BYTES)]))
    data = b"".join(pieces)[:MAX_ORACLE_BYTES]
    return data, skips, removed


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
    imports = [imp for st in [s, *s.nested] for imp in st.imports]  # joblib's nested pickles
    seen = {imp.written for imp in imports if imp.written}
    computed = any(imp.module is None for imp in imports)
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
    out.extend(_compare_calls(s, o))
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


_CALLS_INIT = ("REDUCE", "INST", "OBJ")  # calls that run __init__ (NEWOBJ runs __new__ only)


def _model_counts(s: Any) -> tuple[dict[str, Counter[Any]], dict[str, int]]:
    """What the opcode model says the loader does with globals, counted as the oracle counts:
    per (module, name) as written, "new" (any call of the class), "init" (REDUCE/INST/OBJ),
    "build"; calls of anything but an import ("call"); and the model's wildcards (calls and
    BUILDs on a computed import, which may be any name)."""
    from sdtool.scan.vm import Inst, Ref

    counts: dict[str, Counter[Any]] = {k: Counter() for k in ("new", "init", "build")}
    pools = {"new": 0, "init": 0, "build": 0, "call": 0}
    for st in [s, *s.nested]:
        for c in st.calls:
            if not isinstance(c.callee, Ref):
                pools["call"] += 1
                continue
            key = c.callee.imp.written
            events = ("new", "init") if c.opcode in _CALLS_INIT else ("new",)
            for ev in events:
                if key is None:
                    pools[ev] += 1
                else:
                    counts[ev][key] += 1
        for mu in st.mutations:
            if mu.opcode != "BUILD":
                continue
            t = mu.target
            ref = t.callee if isinstance(t, Inst) else t
            key = ref.imp.written if isinstance(ref, Ref) else _RESULT
            if key is None:
                pools["build"] += 1
            else:
                counts["build"][key] += 1
    return counts, pools


_EVENT_TEXT = {
    "new": "calls or instantiates {g} {n} time(s)",
    "init": "calls {g} (running __init__, via REDUCE/INST/OBJ) {n} time(s)",
    "build": "runs BUILD (__setstate__ / setattr) on {g} {n} time(s)",
    "call": "calls the result of an earlier call {n} time(s)",
}


def _compare_calls(s: Any, o: OracleResult) -> list[tuple[str, str, int | None, str | None]]:
    """Calls and BUILDs the C unpickler performs that the opcode model did not see."""
    if o.events_capped:
        return [("info", "calls not cross-checked: more than a million of them", None, None)]
    counts, pools = _model_counts(s)
    seen: dict[str, Counter[Any]] = {k: Counter() for k in ("new", "init", "build", "call")}
    for ev, key in o.events:
        if ev in seen:
            seen[ev]["*" if ev == "call" else key] += 1
    out: list[tuple[str, str, int | None, str | None]] = []
    for ev in ("new", "init", "build", "call"):
        for key, n in seen[ev].items():
            have = pools["call"] if ev == "call" else counts[ev][key]
            missing = n - have
            if missing > 0 and pools[ev] and ev != "call":
                used = min(missing, pools[ev])  # the model's computed imports may be these
                pools[ev] -= used
                missing -= used
            if missing <= 0:
                continue
            name = None if ev == "call" or key == _RESULT else f"{key[0]}.{key[1]}"
            what = name or "what an earlier call or a persistent id returned"
            text = _EVENT_TEXT[ev].format(g=what, n=n)
            out.append(
                (
                    "dangerous",
                    f"parsers disagree: the C unpickler {text}; the opcode model saw "
                    f"{n - missing}: what the loader runs there was not analysed",
                    None,
                    name,
                )
            )
    return out


__all__ = ["OracleResult", "compare", "run_c_unpickler"]
