"""One test per evasion of SCANNING.md: gadgets, name tricks and opcode tricks.

Every payload is assembled opcode by opcode (tests/scan_payloads.py) and only ever scanned.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from sdtool.scan import FileReport, Limits, scan
from tests.scan_payloads import (
    ADDITEMS,
    APPEND,
    BINGET,
    BININT1,
    BINPUT,
    BINSTRING,
    BINUNICODE,
    BUILD,
    DUP,
    EMPTY_DICT,
    EMPTY_SET,
    EMPTY_TUPLE,
    EXT1,
    EXT2,
    EXT4,
    FRAME,
    GET,
    GLOBAL,
    INST,
    LONG_BINGET,
    LONG_BINPUT,
    MARK,
    MEMOIZE,
    NEWOBJ,
    NEWOBJ_EX,
    NONE,
    OBJ,
    POP,
    PROTO,
    PUT,
    REDUCE,
    SETITEM,
    STACK_GLOBAL,
    STOP,
    STRING,
    TUPLE,
    TUPLE1,
    TUPLE2,
    U,
    asm,
    call_global,
    stack_global_call,
)


def scan_bytes(tmp_path: Path, data: bytes, name: str = "payload.pkl", **kw: object) -> FileReport:
    p = tmp_path / name
    p.write_bytes(data)
    return scan(p, **kw)  # type: ignore[arg-type]


def dangerous_globals(r: FileReport) -> set[str]:
    return {f.global_name for f in r.findings if f.severity == "dangerous" and f.global_name}


# --- gadgets: every family of SCANNING.md, called via REDUCE -----------------------------------

GADGETS = [
    ("os", "system"),  # shell command
    ("posix", "system"),  # what pickle.dumps(os.system) writes on Linux
    ("nt", "system"),  # ... and on Windows
    ("subprocess", "Popen"),
    ("subprocess", "check_output"),
    ("pty", "spawn"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "compile"),
    ("builtins", "open"),
    ("builtins", "__import__"),
    ("builtins", "getattr"),
    ("builtins", "setattr"),
    ("builtins", "breakpoint"),
    ("runpy", "_run_code"),
    ("runpy", "run_path"),
    ("importlib", "import_module"),
    ("pkgutil", "resolve_name"),
    ("pydoc", "locate"),
    ("pydoc", "pipepager"),
    ("code", "InteractiveInterpreter.runsource"),
    ("code", "InteractiveInterpreter.runcode"),
    ("code", "InteractiveConsole.push"),
    ("cProfile", "run"),
    ("profile", "run"),
    ("trace", "Trace.run"),
    ("timeit", "timeit"),
    ("pdb", "run"),
    ("bdb", "Bdb.run"),
    ("doctest", "debug_script"),
    ("doctest", "debug_src"),
    ("idlelib.pyshell", "ModifiedInterpreter.runcode"),
    ("lib2to3.pgen2.grammar", "Grammar.loads"),
    ("numpy.testing._private.utils", "runstring"),
    ("numpy.f2py.crackfortran", "getlincoef"),
    ("ctypes", "CDLL"),
    ("marshal", "loads"),
    ("types", "CodeType"),
    ("types", "FunctionType"),
    ("pickle", "loads"),  # nested pickles
    ("_pickle", "loads"),
    ("torch.storage", "_load_from_bytes"),  # nested torch.load
    ("torch", "load"),
    ("torch.serialization", "load"),
    ("torch.hub", "load"),
    ("torch.jit", "load"),
    ("torch._inductor.codecache", "compile_file"),
    ("torch.utils.cpp_extension", "load_inline"),
    ("functools", "partial"),
    ("functools", "reduce"),
    ("operator", "attrgetter"),
    ("operator", "itemgetter"),
    ("operator", "methodcaller"),
    ("shutil", "rmtree"),
    ("socket", "create_connection"),
    ("urllib.request", "urlopen"),
    ("requests", "get"),
    ("webbrowser", "open"),
    ("pip", "main"),
    ("ensurepip", "_run_pip"),
    ("venv", "create"),
    ("asyncio.unix_events", "_UnixSubprocessTransport._start"),
    ("multiprocessing", "Process"),
    ("uuid", "_get_command_stdout"),
    ("_posixsubprocess", "fork_exec"),
    ("zipimport", "zipimporter"),
    ("sys", "modules"),  # sys.modules tricks
    ("logging", "FileHandler"),
    ("_io", "FileIO"),
    ("io", "open"),
]


@pytest.mark.parametrize(("module", "name"), GADGETS, ids=[f"{m}.{n}" for m, n in GADGETS])
def test_gadget_called_via_reduce_is_dangerous(tmp_path: Path, module: str, name: str) -> None:
    # attack: import a gadget and call it with REDUCE (protocol 4 so dotted names resolve)
    r = scan_bytes(tmp_path, stack_global_call(module, name))
    assert r.verdict == "dangerous"
    f = next(f for f in r.findings if f.rule == "global" and f.severity == "dangerous")
    assert f.offset is not None and f.usage and "REDUCE" in f.usage
    assert f.member is None and f.stream == 0


def test_gadget_only_imported_is_still_dangerous(tmp_path: Path) -> None:
    # attack: an import alone runs the module's import code; the usage says it was not called
    r = scan_bytes(tmp_path, asm(PROTO(2), GLOBAL("os", "system"), STOP))
    assert r.verdict == "dangerous"
    assert r.findings[0].usage == "only imported"


# --- name tricks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "name", "reaches"),
    [
        ("pathlib", "os.system", "os"),  # dotted qualname through a re-exported module
        ("builtins", "eval.__call__", "builtins.eval"),  # dotted qualname on a gadget
        ("builtins", "object.__getattribute__", ""),  # attribute walk to a method
        ("collections", "OrderedDict.fromkeys", ""),  # a method of an allowlisted class
    ],
)
def test_dotted_qualnames_are_resolved(
    tmp_path: Path, module: str, name: str, reaches: str
) -> None:
    # attack: STACK_GLOBAL with a dotted name walks attributes after the import
    r = scan_bytes(tmp_path, stack_global_call(module, name))
    assert r.verdict == "dangerous"
    assert reaches in next(f.message for f in r.findings if f.rule == "global")


def test_reexport_torch_load_is_dangerous(tmp_path: Path) -> None:
    # attack: torch.load is a re-export of torch.serialization.load; both are nested loaders
    for mod in ("torch", "torch.serialization"):
        assert scan_bytes(tmp_path, call_global(mod, "load")).verdict == "dangerous"


@pytest.mark.parametrize(
    ("module", "name", "resolved"),
    [
        ("cPickle", "loads", "pickle.loads"),  # Python-2 module renamed by the unpickler
        ("commands", "getoutput", "subprocess.getoutput"),  # commands -> subprocess
        ("urllib", "urlretrieve", "urllib.request.urlretrieve"),  # NAME_MAPPING entry
        ("__builtin__", "eval", "builtins.eval"),  # __builtin__ -> builtins
        ("__builtin__", "apply", "builtins.apply"),
    ],
)
def test_python2_names_are_remapped_under_protocol_2(
    tmp_path: Path, module: str, name: str, resolved: str
) -> None:
    # attack: a Python-2 spelling that a string-matching denylist does not know
    r = scan_bytes(tmp_path, call_global(module, name, proto=2))
    assert r.verdict == "dangerous"
    assert resolved in dangerous_globals(r)


def test_python2_remap_applies_without_a_proto_opcode(tmp_path: Path) -> None:
    # attack: protocol 0 text pickle (no PROTO opcode: the unpickler's protocol is 0)
    r = scan_bytes(
        tmp_path, asm(GLOBAL("cPickle", "loads"), MARK, STRING("x"), TUPLE, REDUCE, STOP)
    )
    assert dangerous_globals(r) == {"pickle.loads"}


@pytest.mark.parametrize(
    ("module", "name"),
    [("posix", "system"), ("nt", "system"), ("_io", "open"), ("_operator", "attrgetter")],
)
def test_module_aliases(tmp_path: Path, module: str, name: str) -> None:
    # attack: the C-level module name instead of the public one
    assert scan_bytes(tmp_path, call_global(module, name)).verdict == "dangerous"


# --- opcode tricks ------------------------------------------------------------------------------


def test_stack_global_operands_from_the_memo(tmp_path: Path) -> None:
    # attack: STACK_GLOBAL whose operands are BINGET of memoized strings, not adjacent literals
    data = asm(
        PROTO(4), U("os"), BINPUT(1), POP, U("system"), LONG_BINPUT(7), POP,
        BINGET(1), LONG_BINGET(7), STACK_GLOBAL, U("id"), TUPLE1, REDUCE, STOP,
    )  # fmt: skip
    assert dangerous_globals(scan_bytes(tmp_path, data)) == {"os.system"}


def test_memo_overwritten_is_tracked_exactly(tmp_path: Path) -> None:
    # attack: memo slot first holds a benign name, then (after DUP) the gadget's; a scanner that
    # guesses the memo from the previous opcode sees "collections"
    data = asm(
        PROTO(4), U("collections"), MEMOIZE, POP,
        U("os"), DUP, PUT(0), POP, POP,
        GET(0), U("system"), STACK_GLOBAL, U("id"), TUPLE1, REDUCE, STOP,
    )  # fmt: skip
    assert dangerous_globals(scan_bytes(tmp_path, data)) == {"os.system"}
    # and the mirror image is not a false alarm
    benign = asm(
        PROTO(4), U("os"), MEMOIZE, POP, U("collections"), PUT(0), POP,
        GET(0), U("OrderedDict"), STACK_GLOBAL, EMPTY_TUPLE, REDUCE, STOP,
    )  # fmt: skip
    assert scan_bytes(tmp_path, benign).verdict == "safe"


def test_memo_written_after_build(tmp_path: Path) -> None:
    # attack: the memoized value is what BUILD left on the stack, not the opcode before PUT
    data = asm(
        PROTO(4), GLOBAL("collections", "OrderedDict"), EMPTY_TUPLE, REDUCE, EMPTY_DICT, BUILD,
        BINPUT(0), POP, U("os"), U("system"), STACK_GLOBAL, BINGET(0), TUPLE1, REDUCE, STOP,
    )  # fmt: skip
    assert dangerous_globals(scan_bytes(tmp_path, data)) == {"os.system"}


def test_get_of_unwritten_memo_slot_keeps_the_payload(tmp_path: Path) -> None:
    # attack: the payload runs, then a GET of a never-written slot crashes the parser
    data = asm(call_global("os", "system")[:-1], POP, BINGET(42), STOP)
    r = scan_bytes(tmp_path, data)
    assert r.verdict == "dangerous"
    assert any("never written" in e for e in r.errors)


def test_computed_stack_global_operand_is_dangerous(tmp_path: Path) -> None:
    # attack: the module name is computed at load time (here str('os') through an allowlisted
    # callable), so no literal names the import
    data = asm(
        PROTO(4), GLOBAL("builtins", "str"), U("os"), TUPLE1, REDUCE,
        U("system"), STACK_GLOBAL, U("id"), TUPLE1, REDUCE, STOP,
    )  # fmt: skip
    r = scan_bytes(tmp_path, data)
    assert r.verdict == "dangerous"
    assert any(f.rule == "unresolved-global" for f in r.findings)


def test_getattr_computed_callable(tmp_path: Path) -> None:
    # attack: getattr(module, "system")(cmd) - the call's callee is the result of another call
    data = asm(
        PROTO(2), GLOBAL("builtins", "getattr"), GLOBAL("os", "path"), BINUNICODE("join"),
        TUPLE2, REDUCE, BINUNICODE("a"), TUPLE1, REDUCE, STOP,
    )  # fmt: skip
    r = scan_bytes(tmp_path, data)
    assert {f.rule for f in r.findings} >= {"global", "computed-call"}


def test_protocol0_string_operands_for_stack_global(tmp_path: Path) -> None:
    # attack: STACK_GLOBAL operands written as protocol-0 STRING / BINSTRING opcodes
    data = asm(STRING("os"), BINSTRING("system"), STACK_GLOBAL, STRING("id"), TUPLE1, REDUCE, STOP)
    assert dangerous_globals(scan_bytes(tmp_path, data)) == {"os.system"}


def test_inst_call_path(tmp_path: Path) -> None:
    # attack: INST imports and calls in one opcode (no REDUCE at all)
    r = scan_bytes(tmp_path, asm(MARK, STRING("id"), INST("os", "system"), STOP))
    f = next(f for f in r.findings if f.rule == "global")
    assert f.severity == "dangerous" and "INST" in (f.usage or "")


def test_obj_call_path(tmp_path: Path) -> None:
    # attack: OBJ calls the first item after MARK with the rest as arguments
    data = asm(PROTO(2), MARK, GLOBAL("subprocess", "Popen"), BINUNICODE("id"), OBJ, STOP)
    f = scan_bytes(tmp_path, data).findings[0]
    assert f.severity == "dangerous" and "OBJ" in (f.usage or "")


def test_newobj_call_path(tmp_path: Path) -> None:
    # attack: NEWOBJ calls cls.__new__(cls, *args)
    data = asm(PROTO(2), GLOBAL("subprocess", "Popen"), BINUNICODE("id"), TUPLE1, NEWOBJ, STOP)
    assert "NEWOBJ" in (scan_bytes(tmp_path, data).findings[0].usage or "")


def test_newobj_ex_call_path(tmp_path: Path) -> None:
    # attack: NEWOBJ_EX with keyword arguments
    data = asm(
        PROTO(4), U("subprocess"), U("Popen"), STACK_GLOBAL, U("id"), TUPLE1, EMPTY_DICT,
        NEWOBJ_EX, STOP,
    )  # fmt: skip
    assert "NEWOBJ_EX" in (scan_bytes(tmp_path, data).findings[0].usage or "")


def test_build_setattr_on_an_allowlisted_function(tmp_path: Path) -> None:
    # attack: BUILD on an imported function/module sets its attributes (only safe globals appear)
    data = asm(
        PROTO(2), GLOBAL("torch._utils", "_rebuild_tensor_v2"), EMPTY_DICT,
        BINUNICODE("__code__"), NONE, SETITEM, BUILD, STOP,
    )  # fmt: skip
    r = scan_bytes(tmp_path, data)
    assert r.verdict == "dangerous"
    assert any(f.rule == "mutates-non-data" and "BUILD" in f.message for f in r.findings)


def test_setitem_on_os_environ(tmp_path: Path) -> None:
    # attack: SETITEM on os.environ (LD_PRELOAD ...) calls its __setitem__
    data = asm(
        PROTO(2), GLOBAL("os", "environ"), BINUNICODE("LD_PRELOAD"), BINUNICODE("x"), SETITEM, STOP
    )
    r = scan_bytes(tmp_path, data)
    assert any(f.rule == "mutates-non-data" and "SETITEM" in f.message for f in r.findings)


def test_append_and_additems_on_a_class(tmp_path: Path) -> None:
    # attack: APPEND/ADDITEMS on an imported (allowlisted) class call its methods, not a list's
    for op in (asm(NONE, APPEND), asm(MARK, NONE, ADDITEMS)):
        data = asm(PROTO(4), GLOBAL("collections", "OrderedDict"), op, STOP)
        assert scan_bytes(tmp_path, data).verdict == "dangerous"
    benign = asm(PROTO(4), EMPTY_SET, MARK, BININT1(1), ADDITEMS, STOP)
    assert scan_bytes(tmp_path, benign).verdict == "safe"


@pytest.mark.parametrize("ext", [EXT1(1), EXT2(300), EXT4(70000)], ids=["EXT1", "EXT2", "EXT4"])
def test_ext_opcodes_are_unresolvable(tmp_path: Path, ext: bytes) -> None:
    # attack: EXT1/2/4 fetch a global from the copyreg extension registry
    r = scan_bytes(tmp_path, asm(PROTO(2), ext, EMPTY_TUPLE, REDUCE, STOP))
    assert r.verdict == "dangerous"
    assert any(f.rule == "unresolved-global" for f in r.findings)


def test_payload_followed_by_garbage(tmp_path: Path) -> None:
    # attack: the loader runs the payload, then fails on junk: dangerous AND reported broken
    data = asm(call_global("os", "system")[:-1], b"\xff\xfe garbage")
    r = scan_bytes(tmp_path, data)
    assert r.verdict == "dangerous"
    assert r.errors and any(f.rule == "stream-broken" for f in r.findings)


def test_junk_after_stop(tmp_path: Path) -> None:
    # attack: a complete payload then junk bytes that make parsers that read on choke
    r = scan_bytes(tmp_path, call_global("os", "system") + b"\x00\xffjunk" * 10)
    assert r.verdict == "dangerous"
    assert any(f.rule == "trailing-data" for f in r.findings)


def test_second_pickle_in_the_file(tmp_path: Path) -> None:
    # attack: a benign first pickle, the payload in the second (loaders that read twice run it)
    data = pickle.dumps({"a": 1}, protocol=2) + call_global("os", "system")
    r = scan_bytes(tmp_path, data)
    assert r.verdict == "dangerous"
    assert next(f for f in r.findings if f.rule == "global").stream == 1


def test_frame_straddle(tmp_path: Path) -> None:
    # attack: a protocol 4 FRAME declared shorter than the opcode that begins inside it
    body = asm(U("os"), U("system"), STACK_GLOBAL)
    data = asm(PROTO(4), FRAME(5), body, U("id"), TUPLE1, REDUCE, STOP)
    r = scan_bytes(tmp_path, data)
    assert any(f.rule == "frame-straddle" for f in r.findings)
    # a well-framed stream from CPython has no straddle, even with a large bytes object
    ok = pickle.dumps({"k": b"x" * 200_000, "v": list(range(1000))}, protocol=5)
    assert scan_bytes(tmp_path, ok).verdict == "safe"


def test_rebuild_from_type_v2_calls_its_first_argument(tmp_path: Path) -> None:
    # attack: torch._tensor._rebuild_from_type_v2(func, ...) calls func: only a tensor builder
    # may be there (both globals are allowlisted on their own)
    def payload(mod: str, name: str) -> bytes:
        # _rebuild_from_type_v2(func, new_type, args, state)
        return asm(
            PROTO(2), GLOBAL("torch._tensor", "_rebuild_from_type_v2"), MARK, GLOBAL(mod, name),
            GLOBAL("torch.nn.parameter", "Parameter"), EMPTY_TUPLE, EMPTY_DICT, TUPLE, REDUCE,
            STOP,
        )  # fmt: skip

    bad = scan_bytes(tmp_path, payload("collections", "OrderedDict"))
    assert any(f.rule == "calls-arg" for f in bad.findings)
    good = scan_bytes(tmp_path, payload("torch._utils", "_rebuild_tensor_v2"))
    assert not any(f.rule == "calls-arg" for f in good.findings)


def test_resource_exhaustion_is_bounded_not_dangerous(tmp_path: Path) -> None:
    # attack: millions of opcodes / deep MARK nesting / memo fan-out to exhaust the scanner
    small = Limits(max_opcodes=1000, max_marks=100, max_memo=100)
    many_ops = asm(PROTO(2), EMPTY_DICT, *([NONE, POP] * 2000), STOP)
    deep = asm(PROTO(2), MARK * 500, STOP)
    memo = asm(PROTO(2), NONE, *[LONG_BINPUT(i) for i in range(500)], STOP)
    for data in (many_ops, deep, memo):
        r = scan_bytes(tmp_path, data, limits=small)
        assert r.verdict == "error" and any("stopped" in e for e in r.errors), r.errors


def test_big_benign_pickle_is_safe_and_fast(tmp_path: Path) -> None:
    # no false alarm from the caps on a big benign pickle (500,000-entry dict)
    data = pickle.dumps({f"k{i}": i * 0.5 for i in range(500_000)}, protocol=4)
    r = scan_bytes(tmp_path, data)
    assert r.verdict == "safe" and not r.errors


def test_truncated_stream_keeps_earlier_findings(tmp_path: Path) -> None:
    # attack: a truncated stream (the loader runs what it read before the end)
    data = call_global("os", "system", proto=2)[:-1]
    r = scan_bytes(tmp_path, data)
    assert r.verdict == "dangerous" and any("truncated" in e for e in r.errors)


def test_benign_pickles_every_protocol_are_safe(tmp_path: Path) -> None:
    import collections

    obj = {"a": [1, 2.5, "x", b"yy", None, True], "s": {1}, "f": frozenset([2]), "c": 1j}
    obj["od"] = collections.OrderedDict(a=1)
    for proto in range(6):
        r = scan_bytes(tmp_path, pickle.dumps(obj, protocol=proto))
        assert r.verdict == "safe", (proto, r.findings, r.errors)
