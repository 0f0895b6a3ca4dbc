"""An opcode-exact symbolic model of the pickle machine (protocols 0-5). It never runs anything.

It keeps what the real unpickler keeps (stack, marks, memo, frames, protocol) but with symbolic
values: literal strings/numbers stay literal, containers are markers, an import is a ``Ref`` to its
``Import`` record, and a call's result is an ``Inst`` that remembers what was called. That is what
lets a STACK_GLOBAL be resolved from its real operands (fetched from the stack or memo, never
guessed from the previous opcode), and every call site be attributed to what it calls.

Deviations are deliberate and conservative: where the loader would fail (stack underflow, a memo
slot never written, an unknown opcode) the stream is reported broken at that offset, and what was
found before the break is kept. Work and memory are bounded (opcode, memo, stack, mark and
literal-size caps) with limits far above what real checkpoints need.
"""

from __future__ import annotations

import codecs
import math
import re
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdtool.scan.classify import remap_py2

# --- limits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Caps on work and memory; exceeding one makes the analysis incomplete, never "clean"."""

    max_opcodes: int = 50_000_000
    max_memo: int = 5_000_000
    max_stack: int = 5_000_000
    max_marks: int = 1_000_000
    max_literal: int = 4096  # longer strings are kept as their length only
    max_bytes_literal: int = 256
    max_kept_items: int = 256  # tuples/dicts keep their content up to this size
    max_list_items: int = 1_000_000
    max_nested_depth: int = 8  # joblib object arrays nest pickles
    oracle: bool = True  # cross-check pickle streams with the C unpickler (sdtool.scan.oracle)


DEFAULT_LIMITS = Limits()


# --- symbolic values --------------------------------------------------------------------------


@dataclass(eq=False)
class Import:
    """One import site: GLOBAL, STACK_GLOBAL or INST (or EXT), with everything done with it."""

    offset: int
    opcode: str
    module: str | None  # after Python-2 remapping; None when the operands are not literal
    name: str | None
    written: tuple[str, str] | None  # the operands as written in the stream
    uses: list[tuple[str, int]] = field(default_factory=list)  # (how, opcode offset)
    unresolved: str = ""  # why it could not be resolved

    @property
    def qualname(self) -> str:
        if self.module is None or self.name is None:
            return "<unresolved>"
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class Ref:
    """The object an import produced (a class, function or module), not yet called."""

    imp: Import


@dataclass(eq=False)
class Inst:
    """The result of a call or instantiation."""

    callee: Any
    via: str
    offset: int
    args: Any = None
    state: Any = None


@dataclass(eq=False)
class ListV:
    items: list[Any] | None = field(default_factory=list)


@dataclass(eq=False)
class DictV:
    items: dict[Any, Any] | None = field(default_factory=dict)


@dataclass(eq=False)
class SetV:
    frozen: bool = False


@dataclass(eq=False)
class Blob:
    """bytes too long to keep; only the length is remembered."""

    length: int


@dataclass(eq=False)
class Opaque:
    """A value whose content the model does not track (a persistent object, a buffer ...)."""

    what: str


class _Unhashable:
    pass


_SCALARS = (str, bytes, int, float, complex, bool, type(None))
_SYMBOLIC = (Import, Ref, Inst, ListV, DictV, SetV, Blob, Opaque, _Unhashable)


def hashable_key(v: Any, depth: int = 4) -> bool:
    """Whether ``v`` can be hashed in bounded time and stack: scalars and shallow tuples of them.

    A tuple's hash walks its items in C with no recursion guard: a 300,000-deep tuple overflows
    the C stack (a segfault), and a tuple DAG (``t = (t, t)`` forty times) takes 2**40 steps.
    Pickle values are never hashed unless this holds.
    """
    if isinstance(v, _SCALARS + _SYMBOLIC):  # symbolic values hash by identity
        return True
    if isinstance(v, tuple) and depth > 0 and len(v) <= 16:
        return all(hashable_key(x, depth - 1) for x in v)
    return False


# --- events the rules read ----------------------------------------------------------------------


@dataclass
class Call:
    offset: int
    opcode: str  # REDUCE, INST, OBJ, NEWOBJ, NEWOBJ_EX
    callee: Any
    args: Any


@dataclass
class Mutation:
    """BUILD / SETITEM(S) / APPEND(S) / ADDITEMS on something that is not a plain container."""

    offset: int
    opcode: str
    target: Any


@dataclass
class Anomaly:
    offset: int
    kind: str  # frame-straddle, stream-broken, limit, ext, persid ...
    message: str
    value: Any = None


@dataclass
class Stream:
    """Everything found in one pickle stream."""

    start: int
    end: int = -1  # offset after STOP, or where the stream broke
    stopped: bool = False  # reached STOP
    error: str | None = None  # why the loader would fail (the stream is broken)
    error_offset: int = -1
    incomplete: str | None = None  # a limit was hit: the analysis stopped early
    protocol: int = 0
    imports: list[Import] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    mutations: list[Mutation] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    persids: list[tuple[int, Any]] = field(default_factory=list)
    result: Any = None  # the value STOP returned
    nested: list[Stream] = field(default_factory=list)  # joblib object-array pickles
    # joblib arrays inlined between opcodes: (start, end, nested pickle?) of each, the bytes
    # joblib's NumpyUnpickler reads after BUILD of a NumpyArrayWrapper (the oracle skips them too)
    joblib_skips: list[tuple[int, int, bool]] = field(default_factory=list)
    oracle: Any = None  # what the C unpickler did with the same bytes (oracle.OracleResult)
    # the 'pickle' member of torch's TAR format: its persistent ids are keys of the tensors and
    # storages the tar's other members hold (legacy_load looks up int(id)), set by the walker
    persid_keys: bool = False


class _Broken(Exception):
    """The loader would raise here."""


class _Limit(Exception):
    """A work/memory cap was reached."""


def _names() -> dict[int, str]:
    import pickletools  # data tables only: opcode names, never used to load anything

    return {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


OPNAMES = _names()
_UNPACK_D = struct.Struct(">d").unpack_from
_UNPACK_I = struct.Struct("<i").unpack_from
_UNPACK_UI = struct.Struct("<I").unpack_from
_UNPACK_H = struct.Struct("<H").unpack_from
_UNPACK_Q = struct.Struct("<Q").unpack_from

Buffer = Any  # bytes, memoryview or mmap: anything indexable by int and slice


class Machine:
    """Runs one pickle stream symbolically from ``start``; ``run()`` returns a Stream."""

    def __init__(
        self,
        buf: Buffer,
        start: int = 0,
        end: int | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        depth: int = 0,
    ) -> None:
        self.buf = buf
        self.pos = start
        self.end = len(buf) if end is None else end
        self.limits = limits
        self.depth = depth
        self.s = Stream(start)
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.frame_end = -1  # end offset of the current frame, -1 outside frames
        self.op_offset = start

    # -- reading ---------------------------------------------------------------------------------

    def _read(self, n: int) -> Buffer:
        p = self.pos
        if n < 0 or p + n > self.end:
            raise _Broken(f"needs {n} bytes at offset {p} but the stream ends at {self.end}")
        self.pos = p + n
        fe = self.frame_end
        if fe >= 0 and p < fe < p + n:
            self._straddle(p, n)
        return self.buf[p : p + n]

    def _straddle(self, p: int, n: int) -> None:
        self.s.anomalies.append(
            Anomaly(
                self.op_offset,
                "frame-straddle",
                f"{OPNAMES.get(self.buf[self.op_offset], '?')} at {self.op_offset} reads bytes "
                f"{p}..{p + n} across the frame end {self.frame_end}: the C and Python unpicklers "
                "read this differently",
            )
        )
        self.frame_end = -1

    def _line(self) -> bytes:
        p = self.pos
        i = self.buf.find(b"\n", p, self.end) if hasattr(self.buf, "find") else -1
        if i < 0:
            raise _Broken(f"a text argument at offset {p} has no end of line")
        self.pos = i + 1
        fe = self.frame_end
        if fe >= 0 and p < fe < i + 1:
            self._straddle(p, i + 1 - p)
        return bytes(self.buf[p:i])

    def _str(
        self, raw: bytes | Buffer, encoding: str = "utf-8", errors: str = "surrogatepass"
    ) -> Any:
        n = len(raw)
        if n > self.limits.max_literal:
            if errors == "strict":  # still validated, as the loader does
                self._decode(raw, encoding, errors)
            return Opaque(f"str of {n} bytes")
        return self._decode(raw, encoding, errors)

    @staticmethod
    def _decode(raw: bytes | Buffer, encoding: str, errors: str) -> str:
        try:
            return bytes(raw).decode(encoding, errors)
        except UnicodeDecodeError as e:
            raise _Broken(f"string is not valid {encoding}: {e}") from None

    def _bytes(self, raw: Buffer) -> Any:
        n = len(raw)
        return bytes(raw) if n <= self.limits.max_bytes_literal else Blob(n)

    # -- stack -----------------------------------------------------------------------------------

    def _push(self, v: Any) -> None:
        self.stack.append(v)
        if len(self.stack) > self.limits.max_stack:
            raise _Limit(f"stack deeper than {self.limits.max_stack} items")

    def _pop(self) -> Any:
        fence = self.marks[-1] if self.marks else 0
        if len(self.stack) <= fence:
            raise _Broken("stack underflow")
        return self.stack.pop()

    def _top(self) -> Any:
        fence = self.marks[-1] if self.marks else 0
        if len(self.stack) <= fence:
            raise _Broken("stack underflow")
        return self.stack[-1]

    def _pop_mark(self) -> list[Any]:
        if not self.marks:
            raise _Broken("no MARK on the stack")
        m = self.marks.pop()
        items = self.stack[m:]
        del self.stack[m:]
        return items

    def _memo_put(self, idx: int) -> None:
        if idx < 0:
            raise _Broken(f"negative memo index {idx}")
        self.memo[idx] = self._top()
        if len(self.memo) > self.limits.max_memo:
            raise _Limit(f"memo larger than {self.limits.max_memo} entries")

    def _memo_get(self, idx: int) -> None:
        try:
            v = self.memo[idx]
        except KeyError:
            raise _Broken(f"memo slot {idx} was never written") from None
        self._push(v)

    # -- helpers for imports and calls -------------------------------------------------------------

    def _import(self, opcode: str, module: Any, name: Any) -> Import:
        off = self.op_offset
        if isinstance(module, str) and isinstance(name, str):
            mod, nm = (module, name)
            if self.s.protocol < 3:
                mod, nm = remap_py2(module, name)
            imp = Import(off, opcode, mod, nm, (module, name))
        else:
            why = f"operands are {_describe(module)} and {_describe(name)}, not literal strings"
            imp = Import(off, opcode, None, None, None, unresolved=why)
        self.s.imports.append(imp)
        return imp

    def _call(self, opcode: str, callee: Any, args: Any) -> Inst:
        off = self.op_offset
        self.s.calls.append(Call(off, opcode, callee, args))
        if isinstance(callee, Ref):
            callee.imp.uses.append((opcode, off))
        return Inst(callee, opcode, off, args)

    def _mutate(self, opcode: str, target: Any) -> None:
        if isinstance(target, (ListV, DictV, SetV)):
            return
        self.s.mutations.append(Mutation(self.op_offset, opcode, target))
        cls = target.callee if isinstance(target, Inst) else target
        if isinstance(cls, Ref):
            cls.imp.uses.append((opcode, self.op_offset))

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> Stream:
        s = self.s
        try:
            self._loop()
        except _Broken as e:
            s.error, s.error_offset = str(e), self.op_offset
            s.end = self.op_offset
        except _Limit as e:
            s.incomplete, s.error_offset = str(e), self.op_offset
            s.end = self.op_offset
        except (ValueError, OverflowError, IndexError, struct.error, RecursionError) as e:
            s.error, s.error_offset = f"{type(e).__name__}: {e}", self.op_offset
            s.end = self.op_offset
        return s

    def _loop(self) -> None:
        s = self.s
        buf = self.buf
        handlers = _HANDLERS
        max_ops = self.limits.max_opcodes
        ops = 0
        while True:
            p = self.pos
            if p >= self.end:
                self.op_offset = p
                raise _Broken(f"the stream ends at {p} before STOP (truncated)")
            self.op_offset = p
            fe = self.frame_end
            if fe >= 0 and p >= fe:
                if p > fe:  # pragma: no cover - _read flags straddles first
                    self._straddle(p, 1)
                self.frame_end = -1
            code = buf[p]
            self.pos = p + 1
            ops += 1
            if ops > max_ops:
                raise _Limit(f"more than {max_ops} opcodes")
            h = handlers.get(code)
            if h is None:
                raise _Broken(f"unknown opcode {code:#04x}")
            if h(self):  # STOP
                s.stopped = True
                s.end = self.pos
                return


# --- opcode handlers (return True only for STOP) ------------------------------------------------


def _describe(v: Any) -> str:
    if isinstance(v, str):
        return "a literal string"
    if isinstance(v, Inst):
        return "a value computed at load time"
    if isinstance(v, Ref):
        return f"an imported object ({v.imp.qualname})"
    if isinstance(v, Opaque):
        return v.what
    return f"a {type(v).__name__}"


def op_mark(m: Machine) -> None:
    m.marks.append(len(m.stack))
    if len(m.marks) > m.limits.max_marks:
        raise _Limit(f"more than {m.limits.max_marks} nested MARKs")


def op_stop(m: Machine) -> bool:
    m.s.result = m._pop()
    return True


def op_pop(m: Machine) -> None:
    fence = m.marks[-1] if m.marks else 0
    if m.marks and len(m.stack) == fence:
        m.marks.pop()  # POP at a mark drops the mark (both unpicklers)
        return
    m._pop()


def op_pop_mark(m: Machine) -> None:
    m._pop_mark()


def op_dup(m: Machine) -> None:
    m._push(m._top())


# Text arguments are parsed as CPython's C unpickler parses them (Modules/_pickle.c): the line is
# copied and NUL-terminated, so C string functions stop at the first NUL byte; a line of fewer than
# 2 bytes (with its newline) is a "pickle data was truncated" error.


def _c_line(m: Machine) -> tuple[bytes, int]:
    """The text argument up to its first NUL (as C sees it) and the line length with newline."""
    line = m._line()
    n = len(line) + 1
    if n < 2:
        raise _Broken("a numeric text argument is empty (the C unpickler: bad readline)")
    nul = line.find(b"\0")
    return (line if nul < 0 else line[:nul]), n


_FLOAT_TEXT = re.compile(
    rb"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity|nan)", re.IGNORECASE
)


def op_float(m: Machine) -> None:
    # PyOS_string_to_double: no leading space, no underscores, overflow is an error
    text, _ = _c_line(m)
    if not _FLOAT_TEXT.fullmatch(text):
        raise _Broken(f"FLOAT argument {text[:40]!r} is not a float (the C unpickler refuses)")
    v = float(text)
    if math.isinf(v) and b"inf" not in text.lower():
        raise _Broken("FLOAT argument overflows")
    m._push(v)


_SPACE = b" \t\n\v\f\r"
_STRTOL = re.compile(rb"[ \t\n\v\f\r]*[+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _strtol(text: bytes) -> int | None:
    """C ``strtol(s, &end, 0)`` consuming all of ``text`` (None: it stops early or overflows)."""
    if not text:
        return 0  # no digits: strtol returns 0 with end at the NUL, which C accepts
    if not _STRTOL.fullmatch(text):
        return None
    body = text.lstrip(_SPACE)
    sign = -1 if body[:1] == b"-" else 1
    body = body.lstrip(b"+-")
    if body[:2] in (b"0x", b"0X"):
        v = int(body[2:], 16)
    elif body[:1] == b"0":
        v = int(body, 8)
    else:
        v = int(body)
    v *= sign
    return v if -(1 << 63) <= v < (1 << 63) else None


def _pylong(text: bytes, base: int) -> Any:
    """``PyLong_FromString(text, NULL, base)`` (what ``int(bytes, base)`` calls)."""
    try:
        v = int(text, base)
    except ValueError as e:
        raise _Broken(f"invalid integer argument {text[:40]!r} ({e})"[:200]) from None
    return v if v.bit_length() <= 512 else Opaque("big int")


def op_int(m: Machine) -> None:
    # strtol base 0 ("010" is 8, "0x10" is 16); "00"/"01" and other 2-byte 0/1 are booleans;
    # what strtol cannot take falls back to PyLong_FromString base 0
    text, n = _c_line(m)
    v = _strtol(text)
    if v is None:
        m._push(_pylong(text, 0))
    elif n == 3 and v in (0, 1):
        m._push(bool(v))
    else:
        m._push(v)


def op_long(m: Machine) -> None:
    # a trailing "L" is cut (C overwrites it with NUL), then PyLong_FromString base 0
    line = m._line()
    if len(line) + 1 < 2:
        raise _Broken("LONG argument is empty")
    if line.endswith(b"L"):
        line = line[:-1]
    nul = line.find(b"\0")
    m._push(_pylong(line if nul < 0 else line[:nul], 0))


def op_binint(m: Machine) -> None:
    m._push(_UNPACK_I(m._read(4))[0])


def op_binint1(m: Machine) -> None:
    m._push(m._read(1)[0])


def op_binint2(m: Machine) -> None:
    m._push(_UNPACK_H(m._read(2))[0])


def _long_bytes(m: Machine, n: int) -> None:
    raw = m._read(n)
    if n > 64:
        m._push(Opaque("big int"))
    else:
        m._push(int.from_bytes(bytes(raw), "little", signed=True))


def op_long1(m: Machine) -> None:
    _long_bytes(m, m._read(1)[0])


def op_long4(m: Machine) -> None:
    n = _UNPACK_I(m._read(4))[0]
    if n < 0:
        raise _Broken("LONG4 with a negative length")
    _long_bytes(m, n)


def op_none(m: Machine) -> None:
    m._push(None)


def op_newtrue(m: Machine) -> None:
    m._push(True)


def op_newfalse(m: Machine) -> None:
    m._push(False)


def op_binfloat(m: Machine) -> None:
    m._push(_UNPACK_D(m._read(8))[0])


def op_string(m: Machine) -> None:
    # quotes stripped, then PyBytes_DecodeEscape (octal, \\x, \\n ...; a bad \\x is an error)
    line = m._line()
    if len(line) >= 2 and line[0] == line[-1] and line[:1] in (b"'", b'"'):
        body = line[1:-1]
    else:
        raise _Broken("the STRING opcode argument must be quoted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes are kept, with a warning
            raw = codecs.escape_decode(body)[0]
    except ValueError as e:
        raise _Broken(f"STRING argument has a bad escape: {e}") from None
    m._push(m._str(raw, "latin-1"))  # Python 3 decodes protocol-0 strings to str


def op_binstring(m: Machine) -> None:
    n = _UNPACK_I(m._read(4))[0]
    if n < 0:
        raise _Broken("BINSTRING with a negative length")
    m._push(m._str(m._read(n), "latin-1"))


def op_short_binstring(m: Machine) -> None:
    m._push(m._str(m._read(m._read(1)[0]), "latin-1"))


def op_unicode(m: Machine) -> None:
    m._push(m._str(m._line(), "raw-unicode-escape"))


def op_binunicode(m: Machine) -> None:
    m._push(m._str(m._read(_UNPACK_UI(m._read(4))[0])))


def op_short_binunicode(m: Machine) -> None:
    m._push(m._str(m._read(m._read(1)[0])))


def op_binunicode8(m: Machine) -> None:
    m._push(m._str(m._read(_UNPACK_Q(m._read(8))[0])))


def op_binbytes(m: Machine) -> None:
    m._push(m._bytes(m._read(_UNPACK_UI(m._read(4))[0])))


def op_short_binbytes(m: Machine) -> None:
    m._push(m._bytes(m._read(m._read(1)[0])))


def op_binbytes8(m: Machine) -> None:
    m._push(m._bytes(m._read(_UNPACK_Q(m._read(8))[0])))


def op_bytearray8(m: Machine) -> None:
    m._read(_UNPACK_Q(m._read(8))[0])
    m._push(Opaque("bytearray"))


def op_next_buffer(m: Machine) -> None:
    # no loader people use passes out-of-band buffers: the unpickler stops here
    raise _Broken("NEXT_BUFFER without out-of-band buffers (torch.load and pickle.load pass none)")


def op_readonly_buffer(m: Machine) -> None:
    m._top()


def _tuple(m: Machine, items: list[Any]) -> Any:
    if len(items) > m.limits.max_kept_items:
        return Opaque(f"tuple of {len(items)} items")
    return tuple(items)


def op_tuple(m: Machine) -> None:
    m._push(_tuple(m, m._pop_mark()))


def op_empty_tuple(m: Machine) -> None:
    m._push(())


def op_tuple1(m: Machine) -> None:
    a = m._pop()
    m._push((a,))


def op_tuple2(m: Machine) -> None:
    b = m._pop()
    a = m._pop()
    m._push((a, b))


def op_tuple3(m: Machine) -> None:
    c = m._pop()
    b = m._pop()
    a = m._pop()
    m._push((a, b, c))


def op_empty_list(m: Machine) -> None:
    m._push(ListV())


def op_list(m: Machine) -> None:
    items = m._pop_mark()
    m._push(ListV(items if len(items) <= m.limits.max_list_items else None))


def op_empty_dict(m: Machine) -> None:
    m._push(DictV())


def _dict_update(m: Machine, d: DictV, items: list[Any]) -> None:
    if len(items) % 2:
        raise _Broken("odd number of items for a dict")
    if d.items is None:
        return
    if len(d.items) + len(items) // 2 > m.limits.max_kept_items:
        d.items = None
        return
    for i in range(0, len(items), 2):
        k = items[i]
        if not hashable_key(k):  # a symbolic, deep or wide key: kept unhashed
            k = _Unhashable()
        d.items[k] = items[i + 1]


def op_dict(m: Machine) -> None:
    d = DictV()
    _dict_update(m, d, m._pop_mark())
    m._push(d)


def op_empty_set(m: Machine) -> None:
    m._push(SetV())


def op_frozenset(m: Machine) -> None:
    m._pop_mark()
    m._push(SetV(frozen=True))


def op_append(m: Machine) -> None:
    v = m._pop()
    target = m._top()
    if isinstance(target, ListV):
        _list_add(m, target, [v])
    else:
        m._mutate("APPEND", target)


def op_appends(m: Machine) -> None:
    items = m._pop_mark()
    target = m._top()
    if isinstance(target, ListV):
        _list_add(m, target, items)
    else:
        m._mutate("APPENDS", target)


def _list_add(m: Machine, target: ListV, items: list[Any]) -> None:
    if target.items is None:
        return
    if len(target.items) + len(items) > m.limits.max_list_items:
        target.items = None
    else:
        target.items.extend(items)


def op_setitem(m: Machine) -> None:
    v = m._pop()
    k = m._pop()
    target = m._top()
    if isinstance(target, DictV):
        _dict_update(m, target, [k, v])
    else:
        m._mutate("SETITEM", target)


def op_setitems(m: Machine) -> None:
    items = m._pop_mark()
    target = m._top()
    if isinstance(target, DictV):
        _dict_update(m, target, items)
    else:
        if len(items) % 2:
            raise _Broken("odd number of items for SETITEMS")
        m._mutate("SETITEMS", target)


def op_additems(m: Machine) -> None:
    m._pop_mark()
    target = m._top()
    if not isinstance(target, SetV) or target.frozen:
        m._mutate("ADDITEMS", target)


def op_build(m: Machine) -> None:
    state = m._pop()
    target = m._top()
    if isinstance(target, Inst):
        target.state = state
    if isinstance(target, Inst) and isinstance(target.callee, Ref):
        target.callee.imp.uses.append(("BUILD", m.op_offset))
        m.s.mutations.append(Mutation(m.op_offset, "BUILD", target))
        _joblib_inline(m, target)
        return
    if isinstance(target, (ListV, DictV, SetV, str, bytes, int, float, tuple)) or target is None:
        return  # the loader fails on these (no __dict__): nothing runs
    m._mutate("BUILD", target)


def _memo_index(m: Machine) -> int:
    text, _ = _c_line(m)
    v = _pylong(text, 10)
    if not isinstance(v, int) or v >= 1 << 63:
        raise _Broken("memo index does not fit a Py_ssize_t")
    return v


def op_get(m: Machine) -> None:
    m._memo_get(_memo_index(m))


def op_binget(m: Machine) -> None:
    m._memo_get(m._read(1)[0])


def op_long_binget(m: Machine) -> None:
    m._memo_get(_UNPACK_UI(m._read(4))[0])


def op_put(m: Machine) -> None:
    m._memo_put(_memo_index(m))


def op_binput(m: Machine) -> None:
    m._memo_put(m._read(1)[0])


def op_long_binput(m: Machine) -> None:
    m._memo_put(_UNPACK_UI(m._read(4))[0])


def op_memoize(m: Machine) -> None:
    m._memo_put(len(m.memo))


def op_global(m: Machine) -> None:
    module = m._str(m._line(), "utf-8", "strict")
    name = m._str(m._line(), "utf-8", "strict")
    m._push(Ref(m._import("GLOBAL", module, name)))


def op_stack_global(m: Machine) -> None:
    name = m._pop()
    module = m._pop()
    for v in (module, name):
        if not isinstance(v, (str, Ref, Inst, Opaque)):
            # a literal that is not a str: the loader raises "STACK_GLOBAL requires str"
            raise _Broken(f"STACK_GLOBAL operand is {_describe(v)}, not a str (the loader refuses)")
    m._push(Ref(m._import("STACK_GLOBAL", module, name)))


def op_inst(m: Machine) -> None:
    args = m._pop_mark()  # the C unpickler finds the MARK before it reads the names
    module = m._str(m._line(), "utf-8", "strict")
    name = m._str(m._line(), "utf-8", "strict")
    ref = Ref(m._import("INST", module, name))
    m._push(m._call("INST", ref, _tuple(m, args)))


def op_obj(m: Machine) -> None:
    items = m._pop_mark()
    if not items:
        raise _Broken("OBJ without a class")
    m._push(m._call("OBJ", items[0], _tuple(m, items[1:])))


def op_reduce(m: Machine) -> None:
    args = m._pop()
    func = m._pop()
    m._push(m._call("REDUCE", func, args))


def op_newobj(m: Machine) -> None:
    args = m._pop()
    cls = m._pop()
    m._push(m._call("NEWOBJ", cls, args))


def op_newobj_ex(m: Machine) -> None:
    kwargs = m._pop()
    args = m._pop()
    cls = m._pop()
    m._push(m._call("NEWOBJ_EX", cls, (args, kwargs)))


def _ext(m: Machine, code: int) -> None:
    if code <= 0:
        raise _Broken("EXT specifies code <= 0")
    imp = m._import("EXT", None, None)
    imp.unresolved = (
        f"extension code {code} names a global through the copyreg registry, which the file "
        "does not control statically"
    )
    imp.written = ("<copyreg extension>", str(code))
    m.s.anomalies.append(Anomaly(m.op_offset, "ext", f"EXT code {code}", code))
    m._push(Ref(imp))


def op_ext1(m: Machine) -> None:
    _ext(m, m._read(1)[0])


def op_ext2(m: Machine) -> None:
    _ext(m, _UNPACK_H(m._read(2))[0])


def op_ext4(m: Machine) -> None:
    _ext(m, _UNPACK_I(m._read(4))[0])


def op_persid(m: Machine) -> None:
    pid = m._str(m._line(), "ascii")
    m.s.persids.append((m.op_offset, pid))
    m._push(Opaque("persistent object"))


def op_binpersid(m: Machine) -> None:
    pid = m._pop()
    m.s.persids.append((m.op_offset, pid))
    m._push(Inst(Opaque("persistent_load"), "BINPERSID", m.op_offset, pid))


def op_proto(m: Machine) -> None:
    v = m._read(1)[0]
    if v > 5:
        raise _Broken(f"unsupported pickle protocol {v}")
    m.s.protocol = v


def op_frame(m: Machine) -> None:
    n = _UNPACK_Q(m._read(8))[0]
    if m.frame_end >= 0 and m.pos < m.frame_end:
        m.s.anomalies.append(
            Anomaly(
                m.op_offset,
                "frame-straddle",
                f"FRAME at {m.op_offset} starts inside the previous frame (ends at {m.frame_end})",
            )
        )
    if m.pos + n > m.end:
        # the C unpickler reads the whole frame at once: a short one ends the load here
        raise _Broken(f"FRAME declares {n} bytes but only {m.end - m.pos} remain (truncated)")
    m.frame_end = m.pos + n


# --- joblib inline arrays ------------------------------------------------------------------------


def _joblib_inline(m: Machine, wrapper: Inst) -> None:
    """After BUILD of a joblib NumpyArrayWrapper, the array bytes (or a nested pickle) follow."""
    imp = wrapper.callee.imp
    if (imp.module, imp.name) != ("joblib.numpy_pickle", "NumpyArrayWrapper"):
        return
    state = wrapper.state
    if not isinstance(state, DictV) or state.items is None:
        raise _Broken("NumpyArrayWrapper state is not a dict: the array bytes cannot be skipped")
    st = state.items
    shape, dtype = st.get("shape"), st.get("dtype")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _Broken("NumpyArrayWrapper shape is not a tuple of ints")
    count = 1
    for d in shape:
        count *= d
    m.frame_end = -1  # joblib writes the array outside any frame
    start = m.pos
    if _dtype_is_object(dtype):  # the array follows as a whole nested pickle
        if m.depth >= m.limits.max_nested_depth:
            raise _Limit("joblib object arrays nested too deeply")
        sub = Machine(m.buf, m.pos, m.end, limits=m.limits, depth=m.depth + 1).run()
        m.s.nested.append(sub)
        m.s.joblib_skips.append((start, sub.end, True))
        if not sub.stopped:
            raise _Broken(f"the nested pickle of an object array broke: {sub.error}")
        m.pos = sub.end
        return
    if st.get("numpy_array_alignment_bytes") is not None:
        pad = m._read(1)[0]  # newer joblib: a padding length, then padding
        m._read(pad)
    itemsize = _dtype_itemsize(dtype)
    if itemsize is None:
        raise _Broken(
            "NumpyArrayWrapper dtype is not understood: the array bytes cannot be skipped"
        )
    m._read(count * itemsize)
    m.s.joblib_skips.append((start, m.pos, False))


def _dtype_is_object(dtype: Any) -> bool:
    from sdtool.scan import npdtype  # the dtype as numpy rebuilds it (every object spelling)

    obj = npdtype.is_object(dtype)
    if obj is None:
        raise _Broken(
            "NumpyArrayWrapper dtype is not understood: the array bytes cannot be skipped"
        )
    return obj


def _dtype_itemsize(dtype: Any) -> int | None:
    """Item size of a symbolic ``numpy.dtype(code, align, copy)`` with its BUILD state."""
    from sdtool.scan import npdtype

    return npdtype.itemsize(dtype)


_HANDLER_FUNCS: dict[str, Callable[[Machine], Any]] = {
    "MARK": op_mark,
    "STOP": op_stop,
    "POP": op_pop,
    "POP_MARK": op_pop_mark,
    "DUP": op_dup,
    "FLOAT": op_float,
    "INT": op_int,
    "BININT": op_binint,
    "BININT1": op_binint1,
    "LONG": op_long,
    "BININT2": op_binint2,
    "NONE": op_none,
    "PERSID": op_persid,
    "BINPERSID": op_binpersid,
    "REDUCE": op_reduce,
    "STRING": op_string,
    "BINSTRING": op_binstring,
    "SHORT_BINSTRING": op_short_binstring,
    "UNICODE": op_unicode,
    "BINUNICODE": op_binunicode,
    "APPEND": op_append,
    "BUILD": op_build,
    "GLOBAL": op_global,
    "DICT": op_dict,
    "EMPTY_DICT": op_empty_dict,
    "APPENDS": op_appends,
    "GET": op_get,
    "BINGET": op_binget,
    "INST": op_inst,
    "LONG_BINGET": op_long_binget,
    "LIST": op_list,
    "EMPTY_LIST": op_empty_list,
    "OBJ": op_obj,
    "PUT": op_put,
    "BINPUT": op_binput,
    "LONG_BINPUT": op_long_binput,
    "SETITEM": op_setitem,
    "TUPLE": op_tuple,
    "EMPTY_TUPLE": op_empty_tuple,
    "SETITEMS": op_setitems,
    "BINFLOAT": op_binfloat,
    "PROTO": op_proto,
    "NEWOBJ": op_newobj,
    "EXT1": op_ext1,
    "EXT2": op_ext2,
    "EXT4": op_ext4,
    "TUPLE1": op_tuple1,
    "TUPLE2": op_tuple2,
    "TUPLE3": op_tuple3,
    "NEWTRUE": op_newtrue,
    "NEWFALSE": op_newfalse,
    "LONG1": op_long1,
    "LONG4": op_long4,
    "BINBYTES": op_binbytes,
    "SHORT_BINBYTES": op_short_binbytes,
    "SHORT_BINUNICODE": op_short_binunicode,
    "BINUNICODE8": op_binunicode8,
    "BINBYTES8": op_binbytes8,
    "EMPTY_SET": op_empty_set,
    "ADDITEMS": op_additems,
    "FROZENSET": op_frozenset,
    "NEWOBJ_EX": op_newobj_ex,
    "STACK_GLOBAL": op_stack_global,
    "MEMOIZE": op_memoize,
    "FRAME": op_frame,
    "BYTEARRAY8": op_bytearray8,
    "NEXT_BUFFER": op_next_buffer,
    "READONLY_BUFFER": op_readonly_buffer,
}

_HANDLERS: dict[int, Callable[[Machine], Any]] = {
    code: _HANDLER_FUNCS[name] for code, name in OPNAMES.items() if name in _HANDLER_FUNCS
}
assert len(_HANDLERS) == len(OPNAMES), "every pickle opcode has a handler"


def run_stream(
    buf: Buffer,
    start: int = 0,
    end: int | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
    oracle: bool = False,
) -> Stream:
    """Model one pickle stream of ``buf`` beginning at ``start``.

    ``oracle``: also load the same bytes with CPython's C unpickler (inert globals, bounded
    child process, ``sdtool.scan.oracle``) and keep its result on ``Stream.oracle`` so the rules
    can report where the two parsers disagree. A joblib pickle (arrays inline between opcodes)
    is loaded as joblib loads it: by Python's own ``pickle._Unpickler`` that, after BUILD of a
    ``NumpyArrayWrapper``, reads the array (``joblib_skips``) or its nested pickle.
    """
    s = Machine(buf, start, end, limits=limits).run()
    if oracle and limits.oracle:
        from sdtool.scan.oracle import run_c_unpickler

        upto = s.end if s.stopped else None
        s.oracle = run_c_unpickler(
            buf, start, len(buf) if end is None else end, upto=upto, joblib=s.joblib_skips
        )
    return s


def _importable(imp: Import) -> bool:
    """An import a loader could perform: dotted identifiers (``lass X(Module):`` is not)."""
    written = imp.written
    return written is not None and all(
        all(p.isidentifier() for p in part.split(".")) for part in written
    )


def would_unpickle(buf: Buffer, *, limits: Limits = DEFAULT_LIMITS) -> bool:
    """True when ``pickle.load`` of ``buf`` from byte 0 imports something or reaches STOP.

    For files no sniffer names: ``pickle.load`` reads any file from byte 0, whatever its first
    opcode. Both the opcode model and the C unpickler are asked.
    """
    s = Machine(buf, 0, None, limits=limits).run()
    if s.stopped or any(_importable(i) for i in s.imports) or any(not i.written for i in s.imports):
        return True
    if s.incomplete:  # a limit stopped the walk: what pickle.load reaches after it is unknown
        return True
    if not limits.oracle or s.error_offset <= 0:
        return False  # both parsers refuse the first opcode alike
    from sdtool.scan.oracle import run_c_unpickler

    o = run_c_unpickler(buf, 0, len(buf))
    return o.stopped or bool(o.imports)
