"""A tiny pickle assembler for the scanner's tests: payloads are written opcode by opcode.

Nothing here is ever unpickled. Each helper returns the bytes of one opcode with its argument,
so a test reads like a disassembly: ``asm(PROTO(2), GLOBAL("os", "system"), ...)``.
"""

from __future__ import annotations

import struct


def asm(*parts: bytes) -> bytes:
    return b"".join(parts)


MARK = b"("
STOP = b"."
POP = b"0"
DUP = b"2"
NONE = b"N"
REDUCE = b"R"
BUILD = b"b"
TUPLE = b"t"
EMPTY_TUPLE = b")"
TUPLE1 = b"\x85"
TUPLE2 = b"\x86"
TUPLE3 = b"\x87"
EMPTY_DICT = b"}"
EMPTY_LIST = b"]"
SETITEM = b"s"
SETITEMS = b"u"
APPEND = b"a"
APPENDS = b"e"
EMPTY_SET = b"\x8f"
ADDITEMS = b"\x90"
OBJ = b"o"
NEWOBJ = b"\x81"
NEWOBJ_EX = b"\x92"
STACK_GLOBAL = b"\x93"
MEMOIZE = b"\x94"
NEWFALSE = b"\x89"
NEWTRUE = b"\x88"
BINPERSID = b"Q"


def PROTO(n: int) -> bytes:
    return b"\x80" + bytes([n])


def GLOBAL(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def INST(module: str, name: str) -> bytes:
    return b"i" + module.encode() + b"\n" + name.encode() + b"\n"


def U(s: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def BINUNICODE(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def STRING(s: str) -> bytes:
    """Protocol-0 STRING: a quoted repr on one line."""
    return b"S'" + s.encode() + b"'\n"


def BINSTRING(s: str) -> bytes:
    return b"U" + bytes([len(s)]) + s.encode()


def BININT1(n: int) -> bytes:
    return b"K" + bytes([n])


def BINPUT(i: int) -> bytes:
    return b"q" + bytes([i])


def BINGET(i: int) -> bytes:
    return b"h" + bytes([i])


def LONG_BINPUT(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def LONG_BINGET(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


def PUT(i: int) -> bytes:
    return b"p" + str(i).encode() + b"\n"


def GET(i: int) -> bytes:
    return b"g" + str(i).encode() + b"\n"


def EXT1(code: int) -> bytes:
    return b"\x82" + bytes([code])


def EXT2(code: int) -> bytes:
    return b"\x83" + struct.pack("<H", code)


def EXT4(code: int) -> bytes:
    return b"\x84" + struct.pack("<i", code)


def FRAME(n: int) -> bytes:
    return b"\x95" + struct.pack("<Q", n)


def SHORT_BINBYTES(b: bytes) -> bytes:
    return b"C" + bytes([len(b)]) + b


def LONG1(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def call_global(module: str, name: str, arg: str = "id", proto: int = 2) -> bytes:
    """``module.name(arg)``: the classic REDUCE payload (GLOBAL below protocol 4)."""
    if proto >= 4:
        return asm(PROTO(proto), U(module), U(name), STACK_GLOBAL, U(arg), TUPLE1, REDUCE, STOP)
    return asm(PROTO(proto), GLOBAL(module, name), BINUNICODE(arg), TUPLE1, REDUCE, STOP)


def stack_global_call(module: str, name: str, arg: str = "id") -> bytes:
    """Protocol 4 ``module.name(arg)`` with a dotted qualname allowed (STACK_GLOBAL)."""
    return call_global(module, name, arg, proto=4)
