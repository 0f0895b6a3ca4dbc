"""The opcode model agrees with CPython's C unpickler (issue 12, items 0 and 2).

Explicit cases for every argument encoding the C unpickler parses its own way (STRING escapes,
INT/LONG/FLOAT text, NUL-terminated lines, binary pickles without PROTO, any first opcode), then
a hypothesis differential test: generated opcode streams are modelled by the VM and loaded by the
C unpickler (inert globals, in the bounded worker); wherever the loader reaches STOP the model
must too, at the same offset, with the same imports and the same plain result.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdtool.scan import vm as vmmod
from sdtool.scan.oracle import run_c_unpickler
from sdtool.scan.rules import analyse
from sdtool.scan.vm import run_stream
from sdtool.vocab import Verdict
from tests.scan_payloads import (
    BINUNICODE,
    GLOBAL,
    POP,
    PROTO,
    REDUCE,
    STACK_GLOBAL,
    STOP,
    TUPLE1,
    U,
    asm,
)
from tests.test_scan_evasions import dangerous_globals, scan_bytes


def _both(data: bytes) -> tuple[Any, Any]:
    return run_stream(data), run_c_unpickler(data)


@pytest.mark.parametrize(
    ("line", "value"),
    [
        (b"I01\n", True),  # INT 01/00 are the protocol-0 booleans
        (b"I00\n", False),
        (b"I+1\n", True),  # any 2-character 0/1 is a boolean in C
        (b"I 0\n", False),
        (b"I010\n", 8),  # strtol base 0: octal
        (b"I0x10\n", 16),  # and hex
        (b"I1_000\n", 1000),  # strtol stops at "_": PyLong_FromString takes it
        (b"I 7 \n", 7),
        (b"I5\x00junk\n", 5),  # the copied line is NUL-terminated: C stops at the NUL
        (b"I99999999999999999999999\n", 99999999999999999999999),  # overflow -> PyLong
        (b"L12L\n", 12),  # LONG with its Python-2 "L"
        (b"L0x1fL\n", 31),
        (b"L-5\n", -5),
        (b"F1.5\n", 1.5),
        (b"F1e3\x00x\n", 1000.0),
        (b"S'o\\163'\n", "os"),  # STRING: octal escapes
        (b"S'\\x6fs'\n", "os"),
        (b'S"a\\nb"\n', "a\nb"),
        (b"S'\\u006f'\n", "\\u006f"),  # bytes escapes: \u is not one (kept as written)
    ],
)
def test_text_arguments_parse_as_the_c_unpickler(line: bytes, value: object) -> None:
    data = line + STOP
    s, o = _both(data)
    assert o.stopped and o.value == value and type(o.value) is type(value)
    assert s.stopped and s.end == o.end
    assert s.result == value and type(s.result) is type(value)


@pytest.mark.parametrize(
    "line",
    [
        b"I010x\n",  # neither strtol nor PyLong takes it
        b"I08\n",  # not octal, and PyLong base 0 refuses leading zeros
        b"I\n",  # too short
        b"F1_0\n",  # PyOS_string_to_double takes no underscores
        b"F 1.0\n",  # nor leading space
        b"F1e999\n",  # overflow is an error
        b"S'abc\n",  # unbalanced quotes
        b"S'\\x4'\n",  # a bad \x escape
        b"L\n",
    ],
)
def test_text_arguments_the_c_unpickler_refuses(line: bytes) -> None:
    s, o = _both(line + STOP)
    assert not o.stopped
    assert not s.stopped and s.error


def test_string_escapes_name_the_import(tmp_path: Path) -> None:
    # attack: STACK_GLOBAL operands spelled with octal/hex escapes in protocol-0 STRINGs
    data = b"S'\\157\\163'\nS'\\x73ystem'\n" + STACK_GLOBAL + BINUNICODE("id") + TUPLE1 + REDUCE
    assert dangerous_globals(scan_bytes(tmp_path, data + STOP)) == {"os.system"}


def test_binary_pickle_without_proto(tmp_path: Path) -> None:
    # attack: protocol-4 opcodes with no PROTO (the unpickler needs none; Python-2 names remap)
    data = asm(U("os"), U("system"), STACK_GLOBAL, U("id"), TUPLE1, REDUCE, STOP)
    s, o = _both(data)
    assert o.stopped and s.stopped and s.end == o.end
    assert dangerous_globals(scan_bytes(tmp_path, data, name="x.bin")) == {"os.system"}


@pytest.mark.parametrize(
    "first",
    [b"I1\n" + POP, b"F1.0\n" + POP, b"N" + POP, b"\x88" + POP, b"K\x01" + POP, b"]" + POP],
)
def test_any_first_opcode_is_still_a_pickle(tmp_path: Path, first: bytes) -> None:
    # attack: a first opcode no sniffer expects; pickle.load reads any file from byte 0
    data = first + asm(GLOBAL("os", "system"), BINUNICODE("id"), TUPLE1, REDUCE, STOP)
    r = scan_bytes(tmp_path, data, name="weights.bin")
    assert r.verdict == "dangerous", (r.format, r.errors)


def test_non_pickles_are_not_forced_into_pickles(tmp_path: Path) -> None:
    # text whose first bytes are opcodes the loader fails on at once (BINGET of no memo)
    # (plain text is, by content, no model file: listed as skipped since issue 10's CI gate)
    r = scan_bytes(tmp_path, b"hello world\n", name="notes.txt")
    assert r.verdict == Verdict.SKIPPED
    assert r.streams == 0 and not r.findings


def test_computed_import_is_resolved_by_the_loader(tmp_path: Path) -> None:
    data = asm(
        PROTO(4), GLOBAL("builtins", "str"), U("os"), TUPLE1, REDUCE, U("system"), STACK_GLOBAL,
        U("id"), TUPLE1, REDUCE, STOP,
    )  # fmt: skip
    r = scan_bytes(tmp_path, data)
    msgs = [f.message for f in r.findings if f.rule == "parser-disagreement"]
    assert any("resolves a computed import to os.system" in m for m in msgs)


def test_a_stream_the_model_cannot_follow_is_never_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the safety net: were the model to break where the loader does not (a parser bug), the
    # disagreement itself makes the file dangerous
    data = pickle.dumps({"a": 1.5}, protocol=2)

    def broken(m: Any) -> None:
        raise vmmod._Broken("simulated model bug")

    monkeypatch.setitem(vmmod._HANDLERS, ord("G"), broken)  # BINFLOAT
    s = run_stream(data, oracle=True)
    findings, _ = analyse(s, member=None, index=0)
    assert any(f.rule == "parser-disagreement" and f.severity == "dangerous" for f in findings)


def test_disagreement_on_the_end_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    data = pickle.dumps([1, 2], protocol=2)
    real = vmmod.op_stop

    def early(m: Any) -> bool:
        m.pos -= 0  # STOP where the loader stops ...
        out = real(m)
        m.pos += 1  # ... but report one byte more
        return out

    monkeypatch.setitem(vmmod._HANDLERS, ord("."), early)
    s = run_stream(data + b"\x00", oracle=True)
    findings, _ = analyse(s, member=None, index=0)
    assert any("where the stream ends" in f.message for f in findings)


def test_every_corpus_style_benign_pickle_agrees(tmp_path: Path) -> None:
    import collections

    import numpy as np

    objs = [
        {"a": [1, 2.5, "x", b"y" * 300, None, True], "s": {1}, "c": 1j},
        collections.OrderedDict(w=np.zeros((2, 3), np.float16)),
        [np.float64(1.5), np.int32(3), list(range(300))],
    ]
    for obj in objs:
        for proto in range(6):
            data = pickle.dumps(obj, protocol=proto)
            s, o = _both(data)
            assert o.stopped and s.stopped and s.end == o.end, (proto, s.error)
            r = scan_bytes(tmp_path, data)
            assert not [f for f in r.findings if f.rule == "parser-disagreement"]


# --- hypothesis: generated opcode streams ---------------------------------------------------------

_TEXT = st.text(alphabet="0123456789+-_ xXLabcef.\x00", max_size=6)
_NAMES = st.sampled_from(
    [
        ("collections", "OrderedDict"),
        ("builtins", "str"),
        ("__builtin__", "set"),
        ("copy_reg", "_reconstructor"),
        ("os", "system"),
        ("torch._utils", "_rebuild_tensor_v2"),
    ]
)


def _line(op: bytes) -> st.SearchStrategy[bytes]:
    return _TEXT.map(lambda t: op + t.encode("latin-1") + b"\n")


_STRING_BODY = st.text(alphabet="ab\\'\"0123x7n\x00", max_size=6).map(
    lambda t: b"S'" + t.encode("latin-1") + b"'\n"
)
_SIMPLE = st.sampled_from(
    [
        b"(", b"t", b")", b"l", b"]", b"d", b"}", b"a", b"e", b"s", b"u", b"0", b"1", b"2",
        b"N", b"\x88", b"\x89", b"\x85", b"\x86", b"\x87", b"\x8f", b"\x90", b"\x91", b"\x94",
        b"R", b"b", b"\x81", b"o", b"\x93", b".",
    ]
)  # fmt: skip
_PUSH = st.one_of(
    _line(b"I"),
    _line(b"L"),
    _line(b"F"),
    _STRING_BODY,
    st.integers(0, 255).map(lambda n: b"K" + bytes([n])),
    st.text(alphabet="os_ystem", max_size=6).map(lambda t: U(t)),
    _NAMES.map(lambda mn: GLOBAL(*mn)),
)
#: mostly well-formed: values pushed (and popped, memoized, paired), then STOP
_VALUES = st.tuples(
    st.sampled_from([b"", b"\x80\x02", b"\x80\x04"]),
    st.lists(
        st.tuples(_PUSH, st.sampled_from([b"0", b"q\x00", b"p1\n0", b"\x85", b"(t"])),
        max_size=4,
    ),
    _PUSH,
).map(lambda t: t[0] + b"".join(a + b for a, b in t[1]) + t[2] + b".")
_OPS = st.one_of(
    _SIMPLE,
    _SIMPLE,
    _line(b"I"),
    _line(b"L"),
    _line(b"F"),
    _line(b"g"),
    _line(b"p"),
    _STRING_BODY,
    st.integers(0, 5).map(lambda n: b"\x80" + bytes([n])),
    st.integers(0, 255).map(lambda n: b"K" + bytes([n])),
    st.integers(0, 3).map(lambda n: b"q" + bytes([n])),
    st.integers(0, 3).map(lambda n: b"h" + bytes([n])),
    st.text(alphabet="os_ystem", max_size=6).map(lambda t: U(t)),
    _NAMES.map(lambda mn: GLOBAL(*mn)),
    _NAMES.map(lambda mn: b"(" + b"i" + mn[0].encode() + b"\n" + mn[1].encode() + b"\n"),
    st.binary(min_size=1, max_size=2),
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(st.one_of(_VALUES, st.lists(_OPS, min_size=1, max_size=12).map(b"".join)), st.booleans())
def test_differential_vm_against_c_unpickler(data: bytes, stop: bool) -> None:
    data += b"." if stop else b""
    s = run_stream(data)  # never raises
    o = run_c_unpickler(data)
    assert o.failed is None
    seen = [i.written for i in s.imports]
    computed = any(w is None for w in seen)
    # every import the loader makes, the model saw (or could not resolve and flagged)
    missing = [p for p in o.imports if p not in seen]
    assert not missing or computed, (data, o.imports, seen)
    # every call and BUILD the loader performs, the model saw (issue 12: calls compared too)
    from sdtool.scan.oracle import _compare_calls

    assert not _compare_calls(s, o), (data, o.events, s.calls, s.mutations)
    if o.stopped:
        # a stream the loader reads to STOP, the model follows to the same offset
        assert s.stopped, (data, s.error, s.error_offset)
        assert s.end == o.end, (data, s.end, o.end)
        if o.value is not None and type(s.result) in (int, float, str, bytes, bool):
            assert _same(s.result, o.value), (data, s.result, o.value)


# --- the bounded worker ------------------------------------------------------------------------


def test_worker_memory_bomb_is_bounded() -> None:
    # LONG_BINPUT of index 2**31 makes the C unpickler size its memo at 2**32 slots (32 GiB):
    # the worker's heap limit turns that into an error, quickly, and the worker survives
    data = asm(PROTO(2), b"N", b"r" + (1 << 31).to_bytes(4, "little"), STOP)
    o = run_c_unpickler(data)
    assert o.failed is None and not o.stopped and "Memory" in (o.error or "")
    assert run_c_unpickler(pickle.dumps([1])).stopped


def test_worker_timeout_and_crash_restart() -> None:
    import os
    import signal

    from sdtool.scan import oracle

    big = pickle.dumps(list(range(200_000)), protocol=2)
    o = run_c_unpickler(big, timeout=1e-6)
    assert o.failed and "did not finish" in o.failed
    assert run_c_unpickler(pickle.dumps([1])).stopped  # restarted
    os.kill(oracle._WORKER.pid, signal.SIGKILL)
    assert run_c_unpickler(pickle.dumps([2])).stopped  # restarted after a crash


def test_forked_scanners_each_get_a_worker(tmp_path: Path) -> None:
    from sdtool.scan import scan_paths

    for i in range(3):
        (tmp_path / f"{i}.pkl").write_bytes(asm(GLOBAL("os", "system"), STOP))
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"a": 1}))
    rep = scan_paths([tmp_path], jobs=2)
    assert [f.verdict for f in rep.files] == ["dangerous"] * 3 + ["safe"]


# --- calls, BUILDs, and the streams the cross-check used to skip (issue 12 gap d) -------------


def _drop(monkeypatch: pytest.MonkeyPatch, opcode: bytes, record_as: str | None = None) -> None:
    """Simulate a model bug: ``opcode`` runs but its call is not recorded (or recorded as
    ``record_as``), so only the cross-check can notice what the loader does there."""
    real = vmmod._HANDLERS[opcode[0]]

    def silent(m: Any) -> Any:
        before = len(m.s.calls), len(m.s.mutations)
        out = real(m)
        if record_as is None:
            del m.s.calls[before[0] :]
            del m.s.mutations[before[1] :]
        else:
            for c in m.s.calls[before[0] :]:
                c.opcode = record_as
        return out

    monkeypatch.setitem(vmmod._HANDLERS, opcode[0], silent)


def _disagreements(s: Any) -> list[str]:
    findings, _ = analyse(s, member=None, index=0)
    return [f.message for f in findings if f.rule == "parser-disagreement"]


def test_a_call_the_model_missed_is_a_disagreement(monkeypatch: pytest.MonkeyPatch) -> None:
    data = asm(PROTO(2), GLOBAL("collections", "OrderedDict"), b")", REDUCE, STOP)
    assert _disagreements(run_stream(data, oracle=True)) == []
    _drop(monkeypatch, REDUCE)
    msgs = _disagreements(run_stream(data, oracle=True))
    assert any("calls or instantiates collections.OrderedDict 1 time(s)" in m for m in msgs)
    assert any("running __init__" in m for m in msgs)


def test_newobj_recorded_for_reduce_is_a_disagreement(monkeypatch: pytest.MonkeyPatch) -> None:
    """REDUCE runs __init__, NEWOBJ does not: the capability table tells them apart
    (accelerate's PartialState), so the cross-check does too."""
    data = asm(PROTO(2), GLOBAL("collections", "OrderedDict"), b")", REDUCE, STOP)
    _drop(monkeypatch, REDUCE, record_as="NEWOBJ")
    msgs = _disagreements(run_stream(data, oracle=True))
    assert msgs and all("running __init__" in m for m in msgs)


def test_a_build_the_model_missed_is_a_disagreement(monkeypatch: pytest.MonkeyPatch) -> None:
    data = asm(PROTO(2), GLOBAL("argparse", "Namespace"), b")\x81}b", STOP)  # NEWOBJ + BUILD
    assert _disagreements(run_stream(data, oracle=True)) == []
    _drop(monkeypatch, b"b")
    msgs = _disagreements(run_stream(data, oracle=True))
    assert any("runs BUILD" in m and "argparse.Namespace" in m for m in msgs)


def test_a_call_of_a_call_result_the_model_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    # getattr(x, 'y')(...): the second REDUCE calls what the first returned
    data = asm(
        PROTO(2), GLOBAL("builtins", "getattr"), GLOBAL("collections", "OrderedDict"),
        U("fromkeys"), b"\x86", REDUCE, b")", REDUCE, STOP,
    )  # fmt: skip
    assert _disagreements(run_stream(data, oracle=True)) == []
    real = vmmod._HANDLERS[REDUCE[0]]
    seen = [0]

    def second_silent(m: Any) -> Any:
        seen[0] += 1
        n = len(m.s.calls)
        out = real(m)
        if seen[0] == 2:
            del m.s.calls[n:]
        return out

    monkeypatch.setitem(vmmod._HANDLERS, REDUCE[0], second_silent)
    msgs = _disagreements(run_stream(data, oracle=True))
    assert any("calls the result of an earlier call 1 time(s)" in m for m in msgs)


def _joblib_bytes() -> bytes:
    import io

    import joblib
    import numpy as np

    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = collections_od(), "x"
    buf = io.BytesIO()
    joblib.dump({"raw": np.arange(1000.0), "obj": arr, "raw2": np.ones((3, 3), np.int8)}, buf)
    return buf.getvalue()


def collections_od() -> Any:
    import collections

    return collections.OrderedDict(a=1)


def test_joblib_streams_are_cross_checked_as_joblib_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """joblib.load is Python's pickle._Unpickler reading each array after BUILD of its
    NumpyArrayWrapper (an object array as a nested pickle.load): the cross-check loads the
    stream the same way, reaches the same STOP, and reports a call the model missed in the
    nested pickle."""
    data = _joblib_bytes()
    s = run_stream(data, oracle=True)
    assert len(s.joblib_skips) == 3 and s.nested
    assert s.oracle.failed is None and s.oracle.stopped, s.oracle
    assert s.oracle.end == s.end == len(data)
    assert ("new", ("collections", "OrderedDict")) in s.oracle.events  # in the nested pickle
    assert _disagreements(s) == []
    _drop(monkeypatch, REDUCE)
    assert any(
        "collections.OrderedDict" in m for m in _disagreements(run_stream(data, oracle=True))
    )


def test_joblib_array_skipped_differently_is_a_disagreement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the model and joblib part ways over an array's extent, the loader's reading is
    not the model's: the cross-check fails to reach the model's STOP or ends elsewhere."""
    data = _joblib_bytes()
    real = vmmod._joblib_inline

    def off_by_8(m: Any, wrapper: Any) -> None:
        real(m, wrapper)
        if m.s.joblib_skips and not m.s.joblib_skips[-1][2]:
            a, b, nested = m.s.joblib_skips[-1]
            m.s.joblib_skips[-1] = (a, b - 8, nested)  # the oracle is told 8 bytes fewer

    monkeypatch.setattr(vmmod, "_joblib_inline", off_by_8)
    s = run_stream(data, oracle=True)
    assert s.stopped and not (s.oracle.stopped and s.oracle.end == s.end)


def test_legacy_torch_streams_and_concatenated_pickles_are_cross_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf, _use_new_zipfile_serialization=False)
    legacy = buf.getvalue()
    p = tmp_path / "old.pt"
    p.write_bytes(legacy)
    r = scan_bytes(tmp_path, legacy)
    assert r.verdict == Verdict.SAFE, r.findings
    _drop(monkeypatch, REDUCE)  # the object pickle (stream 3) rebuilds its tensor by REDUCE
    r = scan_bytes(tmp_path, legacy)
    hits = [f for f in r.findings if f.rule == "parser-disagreement"]
    assert hits and {f.stream for f in hits} == {3}, [(f.stream, f.message) for f in hits]
    assert any("torch._utils._rebuild_tensor_v2" in f.message for f in hits)
    # a second pickle after the first (concatenated): cross-checked too
    two = pickle.dumps([1], 2) + asm(
        PROTO(2), GLOBAL("collections", "OrderedDict"), b")", REDUCE, STOP
    )
    r = scan_bytes(tmp_path, two)
    hits = [f for f in r.findings if f.rule == "parser-disagreement"]
    assert hits and {f.stream for f in hits} == {1}


def test_torch_tar_records_are_cross_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import struct
    import tarfile

    record = asm(PROTO(2), b"G" + struct.pack(">d", 1.5), U("cpu"), GLOBAL("torch", "FloatStorage"),
                 b"\x87", STOP)  # fmt: skip
    members = {
        "sys_info": pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2),
        "storages": b"\x80\x02K\x01."
        + record
        + struct.pack("<q", 1)
        + b"\0" * 4
        + pickle.dumps([], 2),
        "tensors": b"\x80\x02K\x00.",
        "pickle": pickle.dumps({}, 2),
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    r = scan_bytes(tmp_path, out.getvalue())
    assert not [f for f in r.findings if f.rule == "parser-disagreement"], r.findings

    def broken(m: Any) -> None:
        raise vmmod._Broken("simulated model bug")

    monkeypatch.setitem(vmmod._HANDLERS, ord("G"), broken)  # BINFLOAT, only in the record
    r = scan_bytes(tmp_path, out.getvalue())
    hits = [f for f in r.findings if f.rule == "parser-disagreement"]
    assert hits and all(f.member == "storages" and f.stream == 1 for f in hits), r.findings
