"""The restricted unpickler: globals outside the allowlist are never imported or called.

Payloads are assembled opcode by opcode; each names the call path it exercises.
"""

from __future__ import annotations

import collections
import copyreg
import io
import itertools
import pickle
import sys

import pytest

from sdtool.errors import CorruptFile
from sdtool.formats.graph import collect
from sdtool.formats.unpickler import load_one
from sdtool.model import StandIn

MOD = "sdtool_test_canary_module"  # never importable: importing it would be an error


def g(module: str, name: str) -> bytes:
    """GLOBAL opcode (protocol 0-2 spelling)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def u(s: str) -> bytes:
    """BINUNICODE."""
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def load(payload: bytes) -> tuple[object, collections.Counter[tuple[str, str, bool]]]:
    seen: collections.Counter[tuple[str, str, bool]] = collections.Counter()
    return load_one(io.BytesIO(payload), seen=seen), seen


@pytest.mark.parametrize(
    ("label", "payload"),
    [
        # REDUCE: os.system("touch x")
        ("reduce", b"\x80\x02" + g("os", "system") + u("touch x") + b"\x85R."),
        # INST (protocol 0): MARK args INST module name
        ("inst", b"(" + u("x") + b"i" + MOD.encode() + b"\nf\n."),
        # OBJ: MARK cls args OBJ
        ("obj", b"\x80\x02(" + g(MOD, "f") + u("x") + b"o."),
        # NEWOBJ: cls args NEWOBJ
        ("newobj", b"\x80\x02" + g(MOD, "f") + u("x") + b"\x85\x81."),
        # NEWOBJ_EX: cls args kwargs NEWOBJ_EX
        ("newobj_ex", b"\x80\x04" + g(MOD, "f") + u("x") + b"\x85}" + u("k") + u("v") + b"s\x92."),
        # STACK_GLOBAL with operands from the stack
        ("stack_global", b"\x80\x04" + u(MOD) + u("f") + b"\x93" + u("x") + b"\x85R."),
        # builtins.exec via a Python 2 name the unpickler remaps (__builtin__ -> builtins)
        ("py2 name", b"\x80\x02" + g("__builtin__", "exec") + u("1") + b"\x85R."),
    ],
)
def test_calls_become_inert_standins(label: str, payload: bytes) -> None:
    before = set(sys.modules)
    obj, seen = load(payload)
    assert isinstance(obj, StandIn), label
    assert (obj.args and "x" in obj.args) or obj.args == ("1",) or obj.args == ("touch x",)
    assert not any(builder for (_, _, builder) in seen), "an unknown global was treated as allowed"
    assert MOD not in sys.modules and set(sys.modules) <= before | {MOD}


def test_ext_codes_go_through_the_same_door() -> None:
    """EXT1: the copyreg extension registry maps a code to (module, name); still a stand-in."""
    copyreg.add_extension(MOD, "f", 0xF3)
    try:
        obj, seen = load(b"\x80\x02\x82\xf3" + u("x") + b"\x85R.")
    finally:
        copyreg.remove_extension(MOD, "f", 0xF3)
    assert isinstance(obj, StandIn) and obj.qualname == f"{MOD}.f"
    assert seen[(MOD, "f", False)] == 1


def test_build_setitem_append_on_standins_only_record() -> None:
    # obj = f(); obj.__setstate__({'a': 1}); obj['k'] = 'v'; obj.append(2)
    payload = (
        b"\x80\x02"
        + g(MOD, "f")
        + b")R"  # call with no args
        + b"}"
        + u("a")
        + b"K\x01sb"  # BUILD {'a': 1}
        + u("k")
        + u("v")
        + b"s"  # SETITEM
        + b"K\x02a."  # APPEND
    )
    obj, _ = load(payload)
    assert isinstance(obj, StandIn)
    assert obj.state == {"a": 1} and obj.items == [("k", "v")] and obj.listitems == [2]


def test_build_on_a_builder_is_refused() -> None:
    """BUILD would set attributes on sdtool's own builder (e.g. swap its function): refused."""
    payload = b"\x80\x02" + g("torch._utils", "_rebuild_tensor_v2") + b"N}" + u("fn") + b"Ns\x86b."
    with pytest.raises(CorruptFile):
        load(payload)


def test_rebuild_from_type_v2_never_calls_an_unknown_function() -> None:
    # torch._tensor._rebuild_from_type_v2(os.system, None, ("id",), {})
    payload = (
        b"\x80\x02"
        + g("torch._tensor", "_rebuild_from_type_v2")
        + b"("
        + g("os", "system")
        + b"N"
        + u("id")
        + b"\x85}t"
        + b"R."
    )
    obj, _ = load(payload)
    assert isinstance(obj, StandIn) and obj.name == "_rebuild_from_type_v2"


def test_codecs_encode_refuses_other_codecs() -> None:
    payload = b"\x80\x02" + g("_codecs", "encode") + u("x") + u("rot13") + b"\x86R."
    with pytest.raises(CorruptFile, match="codec"):
        load(payload)


def test_numpy_object_dtype_is_refused() -> None:
    payload = (
        b"\x80\x02"
        + g("numpy.core.multiarray", "scalar")
        + g("numpy", "dtype")
        + u("O8")
        + b"\x89\x88\x87R"
        + u("x")
        + b"\x86R."
    )
    with pytest.raises(CorruptFile):
        load(payload)


def test_tensors_inside_standins_are_found() -> None:
    """A stand-in's args and state are walked: tensors in them get dotted names."""
    torch = pytest.importorskip("torch")
    from sdtool.formats.torchfile import _load_pickles, _Source

    class Holder:
        def __init__(self, t: object) -> None:
            self.t = t

        def __reduce__(self) -> tuple[object, ...]:
            return (collections.namedtuple, ("T", "a"), {"weight": self.t})

    blob = pickle.dumps({"h": Holder(torch.ones(2))}, protocol=2)
    src = _Source(io.BytesIO(blob), len(blob), data=blob)
    root, _ = _load_pickles(src)
    tensors, _extra, _ = collect(root)
    assert list(tensors) == ["h.weight"]
    assert tensors["h.weight"].shape == (2,)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_bytesio_is_read_through_peek_and_left_past_each_stop(
    protocol: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BytesIO (a zip member's pickle, a TAR member, a nested torch file) is handed to the C
    unpickler with ``peek``: it takes its input in blocks instead of one ``read`` per opcode,
    and still leaves the stream just past each STOP, whatever the opcodes (text lines at
    protocol 0, frames at 4, long byte strings past the 128 KiB block)."""
    from sdtool.formats import unpickler

    values = [
        {"a": [1, 2.5, "x" * 300], "b": (None, True)},
        list(range(50_000)),
        b"\x00\xff" * 100_000,  # a BINBYTES longer than a peeked block
        "tail",
    ]
    data = b"".join(pickle.dumps(v, protocol=protocol) for v in values)
    peeks = []
    real_peek = unpickler._Peekable.peek
    monkeypatch.setattr(
        unpickler._Peekable, "peek", lambda self, n=1: peeks.append(n) or real_peek(self, n)
    )
    f = io.BytesIO(data)
    ends = []
    for v in values:
        assert load_one(f) == v
        ends.append(f.tell())
    assert ends == list(itertools.accumulate(len(pickle.dumps(v, protocol)) for v in values))
    assert peeks  # the unpickler did take blocks through peek
    assert len(peeks) < 20  # not one call per opcode (50,000 ints)
