"""Every published scanner bypass (issue 12, item 6), rebuilt from its description.

``ADVISORIES`` maps each id to what it is (gadget, opcode trick, container trick) and the bytes
that reproduce it; docs/scan.md has the same table. Payloads are assembled opcode by opcode and
only ever scanned here, except the positive controls at the end, which run harmless payloads
under the real loader in a subprocess (in tmp_path) to show the tricks really work there.
"""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdtool.scan import FileReport, scan
from tests.scan_payloads import (
    BINGET,
    BINUNICODE,
    BUILD,
    DUP,
    EMPTY_DICT,
    GLOBAL,
    MARK,
    MEMOIZE,
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
    TUPLE1,
    TUPLE2,
    U,
    asm,
    call_global,
    stack_global_call,
)


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # "gadget", "opcode trick", "container trick"
    what: str
    build: Callable[[Path], Path]


def _file(data: bytes, name: str = "model.pkl") -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        p = tmp / name
        p.write_bytes(data)
        return p

    return build


def _gadget(module: str, name: str) -> Callable[[Path], Path]:
    return _file(stack_global_call(module, name, "id"))


def _zip(members: list[tuple[str, bytes]], name: str = "model.pt") -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        p = tmp / name
        with zipfile.ZipFile(p, "w") as z:
            for n, d in members:
                z.writestr(n, d)
        return p

    return build


PAYLOAD = call_global("os", "system", proto=2)


def _zip_patched(patch: Callable[[bytearray], None]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        p = _zip([("archive/data.pkl", PAYLOAD)])(tmp)
        data = bytearray(p.read_bytes())
        patch(data)
        p.write_bytes(bytes(data))
        return p

    return build


def _bad_crc(data: bytearray) -> None:
    crc = struct.pack("<I", zlib.crc32(PAYLOAD))
    data[:] = data.replace(crc, b"\xde\xad\xbe\xef")


def _flag_bits(data: bytearray) -> None:
    cd = data.find(b"PK\x01\x02")
    data[6:8] = struct.pack("<H", 0x1)
    data[cd + 8 : cd + 10] = struct.pack("<H", 0x1)


def _name_mismatch(data: bytearray) -> None:
    data[30 : 30 + len(b"archive/data.pkl")] = b"archive/xxxx.txt"


def _two(a: bytes, b: bytes) -> bytes:
    return a + b


# getattr(__import__('builtins'), 'eval')('1+1'): eval hidden behind a computed callable
_HIDDEN_EVAL = asm(
    PROTO(2), GLOBAL("builtins", "getattr"), GLOBAL("builtins", "__import__"),
    BINUNICODE("builtins"), TUPLE1, REDUCE, BINUNICODE("eval"), TUPLE2, REDUCE,
    BINUNICODE("1+1"), TUPLE1, REDUCE, STOP,
)  # fmt: skip
# pkgutil.resolve_name('os:system')('id'): the gadget's name is only data
_RESOLVE_NAME = asm(
    PROTO(2), GLOBAL("pkgutil", "resolve_name"), BINUNICODE("os:system"), TUPLE1, REDUCE,
    BINUNICODE("id"), TUPLE1, REDUCE, STOP,
)  # fmt: skip
# operator.methodcaller('system', 'id')(pydoc.locate('os'))
_LOCATE_METHODCALLER = asm(
    PROTO(2), GLOBAL("operator", "methodcaller"), BINUNICODE("system"), BINUNICODE("id"),
    TUPLE2, REDUCE, GLOBAL("pydoc", "locate"), BINUNICODE("os"), TUPLE1, REDUCE, TUPLE1,
    REDUCE, STOP,
)  # fmt: skip


def _operator_import(op: str, arg: str) -> bytes:
    # _operator.<op>(arg)(__import__('os'))
    return asm(
        PROTO(2), GLOBAL("_operator", op), BINUNICODE(arg), TUPLE1, REDUCE,
        GLOBAL("builtins", "__import__"), BINUNICODE("os"), TUPLE1, REDUCE, TUPLE1, REDUCE, STOP,
    )  # fmt: skip


# io.FileIO('/etc/hostname') then urllib.request.urlopen(...): read and exfiltrate
_FILEIO_URLOPEN = asm(
    PROTO(2), GLOBAL("io", "FileIO"), BINUNICODE("/etc/hostname"), TUPLE1, REDUCE, POP,
    GLOBAL("urllib.request", "urlopen"), BINUNICODE("http://127.0.0.1:9/"), TUPLE1, REDUCE,
    STOP,
)  # fmt: skip
# protocol-0 STRING operands for STACK_GLOBAL (scanners that only take unicode operands)
_STRING_OPERANDS = asm(STRING("os"), STRING("system"), STACK_GLOBAL, STRING("id"), TUPLE1, REDUCE,
                       STOP)  # fmt: skip
# exception-oriented: the payload runs, then a GET of a slot never written crashes the parser
_EXCEPTION_ORIENTED = asm(PAYLOAD[:-1], POP, BINGET(200), STOP)
# legacy torch whose magic-number slot is computed by eval (scan_pytorch bypass)
_LEGACY_EVAL_MAGIC = asm(
    call_global("builtins", "eval", "119547037146038801333356"),
    pickle.dumps(1001, protocol=2), pickle.dumps({}, protocol=2), PAYLOAD,
)  # fmt: skip
# OBJ(os.system, 'id') then POP: the call leaves nothing on the stack
_OBJ_POP = asm(
    PROTO(2), MARK, GLOBAL("os", "system"), BINUNICODE("id"), OBJ, POP, NONE, STOP
)  # fmt: skip
# the same global many times, around an allowlisted one: each import is judged
_SHADOWED = asm(
    PROTO(2), GLOBAL("collections", "OrderedDict"), POP, GLOBAL("subprocess", "getoutput"),
    POP, GLOBAL("collections", "OrderedDict"), POP, GLOBAL("subprocess", "getoutput"),
    BINUNICODE("id"), TUPLE1, REDUCE, STOP,
)  # fmt: skip
# ModelScan #85: BUILD slot-state setattr on numpy.prod, then dotted GLOBALs read them back
_MS85 = asm(
    PROTO(4), GLOBAL("numpy", "prod"), NONE, MARK, U("a"), U("os"), b"d", TUPLE2, BUILD,
    NONE, MARK, U("b"), U("system"), b"d", TUPLE2, BUILD, POP,
    GLOBAL("numpy", "prod.a"), PUT(0), GLOBAL("numpy", "prod.b"), PUT(1), POP, POP,
    b"g0\n", b"g1\n", STACK_GLOBAL, U("echo pwned"), TUPLE1, REDUCE, STOP,
)  # fmt: skip
# ModelScan #330: numpy.size / numpy.__builtins__ via STACK_GLOBAL, BUILD, eval by getattr
_MS330 = asm(
    PROTO(4), U("numpy"), U("size"), STACK_GLOBAL, MEMOIZE, MEMOIZE, U("numpy"),
    U("__builtins__"), STACK_GLOBAL, MEMOIZE, MEMOIZE, BINGET(1), EMPTY_DICT, EMPTY_DICT,
    U("shape"), BINGET(3), SETITEM, TUPLE2, BUILD, BINGET(1), BINGET(1), U("eval"), TUPLE2,
    REDUCE, U('__import__("os").system("id")'), TUPLE1, REDUCE, STOP,
)  # fmt: skip
# ModelScan #267: a nested pickle.loads of embedded bytes
_NESTED = asm(
    PROTO(2), GLOBAL("pickle", "loads"), b"C" + bytes([len(PAYLOAD)]) + PAYLOAD, TUPLE1,
    REDUCE, STOP,
)  # fmt: skip
# ModelScan #338, "invalid memo reference": the payload, then DUP/GET tricks that crash parsers
_MS338_MEMO = asm(PROTO(4), U("os"), U("system"), STACK_GLOBAL, DUP, POP, U("id"), TUPLE1,
                  REDUCE, POP, BINGET(9), STOP)  # fmt: skip

ADVISORIES: list[Case] = [
    # --- picklescan: gadgets its denylist missed
    Case("GHSA-4r9r-ch6f-vxmx", "gadget", "torch.utils.bottleneck.__main__.run_cprofile",
         _gadget("torch.utils.bottleneck.__main__", "run_cprofile")),
    Case("GHSA-86cj-95qr-2p4f", "gadget", "torch._dynamo.guards.GuardBuilder.get",
         _gadget("torch._dynamo.guards", "GuardBuilder.get")),
    Case("GHSA-f4x7-rfwp-v3xw", "gadget",
         "torch.fx.experimental.symbolic_shapes.ShapeEnv.evaluate_guards_expression",
         _gadget("torch.fx.experimental.symbolic_shapes", "ShapeEnv.evaluate_guards_expression")),
    Case("GHSA-f745-w6jp-hpxx", "gadget", "torch.utils.collect_env.run",
         _gadget("torch.utils.collect_env", "run")),
    Case("GHSA-jhph-76pp-mggw", "gadget", "torch.utils.collect_env.run_and_read_all",
         _gadget("torch.utils.collect_env", "run_and_read_all")),
    Case("GHSA-h3qp-7fh3-f8h4", "gadget", "torch.utils.data.datapipes.utils.decoder.basichandlers",
         _gadget("torch.utils.data.datapipes.utils.decoder", "basichandlers")),
    Case("GHSA-vr7h-p6mm-wpmh", "gadget", "torch.jit.unsupported_tensor_ops.execWrapper",
         _gadget("torch.jit.unsupported_tensor_ops", "execWrapper")),
    Case("GHSA-vv6j-3g6g-2pvj", "gadget", "torch.utils._config_module.ConfigModule.load_config",
         _gadget("torch.utils._config_module", "ConfigModule.load_config")),
    Case("GHSA-4whj-rm5r-c2v8", "gadget", "torch.utils.bottleneck.__main__.run_autograd_prof",
         _gadget("torch.utils.bottleneck.__main__", "run_autograd_prof")),
    Case("GHSA-5qwp-399c-mjwf", "gadget", "trace.Trace.run", _gadget("trace", "Trace.run")),
    Case("GHSA-g344-hcph-8vgg", "gadget", "trace.Trace.runctx", _gadget("trace", "Trace.runctx")),
    Case("GHSA-x696-vm39-cp64", "gadget", "profile.Profile.run",
         _gadget("profile", "Profile.run")),
    Case("GHSA-6vqj-c2q5-j97w", "gadget", "profile.Profile.runctx",
         _gadget("profile", "Profile.runctx")),
    Case("GHSA-9w88-8rmg-7g2p", "gadget", "cProfile.runctx", _gadget("cProfile", "runctx")),
    Case("GHSA-49gj-c84q-6qm9", "gadget", "cProfile.run", _gadget("cProfile", "run")),
    Case("GHSA-7wx9-6375-f5wh", "gadget", "profile.run (module level)", _gadget("profile", "run")),
    Case("GHSA-fqq6-7vqf-w3fg", "gadget", "doctest.debug_script",
         _gadget("doctest", "debug_script")),
    Case("GHSA-cj3c-v495-4xqh", "gadget", "code.InteractiveInterpreter.runcode",
         _gadget("code", "InteractiveInterpreter.runcode")),
    Case("GHSA-3vg9-h568-4w9m", "gadget", "idlelib.debugobj.ObjectTreeItem.SetText",
         _gadget("idlelib.debugobj", "ObjectTreeItem.SetText")),
    Case("GHSA-6w4w-5w54-rjvr", "gadget", "idlelib.autocomplete.AutoComplete.get_entity",
         _gadget("idlelib.autocomplete", "AutoComplete.get_entity")),
    Case("GHSA-7cq8-mj8x-j263", "gadget", "idlelib.autocomplete.AutoComplete.fetch_completions",
         _gadget("idlelib.autocomplete", "AutoComplete.fetch_completions")),
    Case("GHSA-8r4j-24qv-fmq9", "gadget", "idlelib.calltip.Calltip.fetch_tip",
         _gadget("idlelib.calltip", "Calltip.fetch_tip")),
    Case("GHSA-9xph-j2h6-g47v", "gadget", "idlelib.calltip.get_entity",
         _gadget("idlelib.calltip", "get_entity")),
    Case("GHSA-m869-42cg-3xwr", "gadget", "idlelib.run.Executive.runcode",
         _gadget("idlelib.run", "Executive.runcode")),
    Case("GHSA-j343-8v2j-ff7w", "gadget", "idlelib.pyshell.ModifiedInterpreter.runcommand",
         _gadget("idlelib.pyshell", "ModifiedInterpreter.runcommand")),
    Case("GHSA-3gf5-cxq9-w223", "gadget", "idlelib.pyshell.ModifiedInterpreter.runcode",
         _gadget("idlelib.pyshell", "ModifiedInterpreter.runcode")),
    Case("GHSA-f54q-57x4-jg88", "gadget", "lib2to3.pgen2.grammar.Grammar.loads",
         _gadget("lib2to3.pgen2.grammar", "Grammar.loads")),
    Case("GHSA-p9w7-82w4-7q8m", "gadget", "lib2to3.pgen2.pgen.ParserGenerator.make_label",
         _gadget("lib2to3.pgen2.pgen", "ParserGenerator.make_label")),
    Case("GHSA-xp4f-hrf8-rxw7", "gadget", "ensurepip._run_pip", _gadget("ensurepip", "_run_pip")),
    Case("GHSA-q77w-mwjj-7mqx", "gadget", "asyncio.unix_events._UnixSubprocessTransport._start",
         _gadget("asyncio.unix_events", "_UnixSubprocessTransport._start")),
    Case("GHSA-m273-6v24-x4m4", "gadget", "distutils.file_util.write_file",
         _gadget("distutils.file_util", "write_file")),
    Case("GHSA-4675-36f9-wf6r", "gadget", "ctypes.CDLL", _gadget("ctypes", "CDLL")),
    Case("GHSA-84r2-jw7c-4r5q", "gadget", "pydoc.locate + operator.methodcaller chain",
         _file(_LOCATE_METHODCALLER)),
    Case("GHSA-vqmv-47xg-9wpr", "gadget", "pty.spawn", _gadget("pty", "spawn")),
    Case("GHSA-hgrh-qx5j-jfwx", "gadget", "pty.spawn (unsafe-globals gap)",
         _file(call_global("pty", "spawn", "id"))),
    Case("GHSA-r8g5-cgf2-4m4m", "gadget", "numpy.f2py.crackfortran.getlincoef",
         _gadget("numpy.f2py.crackfortran", "getlincoef")),
    Case("GHSA-955r-x9j8-7rhh", "gadget", "_operator.methodcaller on __import__('os')",
         _file(_operator_import("methodcaller", "system"))),
    Case("GHSA-46h3-79wf-xr6c", "gadget", "_operator.attrgetter on __import__('os')",
         _file(_operator_import("attrgetter", "system"))),
    Case("GHSA-9726-w42j-3qjr", "gadget", "io.FileIO read + urllib.request.urlopen (SSRF)",
         _file(_FILEIO_URLOPEN)),
    Case("GHSA-m7j5-r2p5-c39r", "gadget", "logging.FileHandler creates a file",
         _file(call_global("logging", "FileHandler", "/tmp/x"))),
    Case("GHSA-9m3x-qqw2-h32h", "opcode trick", "builtins.eval reached by getattr on a "
         "computed module", _file(_HIDDEN_EVAL)),
    Case("GHSA-vvpj-8cmc-gx39", "gadget", "pkgutil.resolve_name('os:system')",
         _file(_RESOLVE_NAME)),
    Case("GHSA-g38g-8gr9-h9xp", "gadget", "codeop/compileall/py_compile/_pyrepl.pager/test",
         _gadget("codeop", "compile_command")),
    Case("GHSA-9gvj-pp9x-gcfr", "opcode trick", "STACK_GLOBAL operands as protocol-0 STRINGs",
         _file(_STRING_OPERANDS)),
    Case("GHSA-97f8-7cmv-76j2", "opcode trick", "legacy torch magic number computed by eval",
         _file(_LEGACY_EVAL_MAGIC, "payload.pt")),
    Case("GHSA-jgw4-cr84-mqxg", "container trick", "a plain pickle named pytorch_model.bin",
         _file(PAYLOAD, "pytorch_model.bin")),
    Case("GHSA-mjqp-26hc-grxg", "container trick", "zip member with a bad CRC",
         _zip_patched(_bad_crc)),
    Case("GHSA-f7qq-56ww-84cr", "gadget", "submodule of a blocked package (asyncio.unix_events)",
         _gadget("asyncio.unix_events", "_UnixSubprocessTransport._start")),
    Case("CVE-2025-1716", "gadget", "pip.main installs a package", _gadget("pip", "main")),
    Case("CVE-2025-1889", "container trick", "pickle member with a non-standard extension",
         _zip([("archive/data.pkl", b"\x80\x02}q\x00."), ("archive/extra.weights", PAYLOAD)])),
    Case("CVE-2025-1944", "container trick", "local header name differs from the central "
         "directory", _zip_patched(_name_mismatch)),
    Case("CVE-2025-1945", "container trick", "zip flag bits flipped", _zip_patched(_flag_bits)),
    Case("CVE-2025-10155", "container trick", "= GHSA-jgw4-cr84-mqxg (extension)",
         _file(PAYLOAD, "model.pt")),
    Case("CVE-2025-10156", "container trick", "= GHSA-mjqp-26hc-grxg (bad CRC)",
         _zip_patched(_bad_crc)),
    Case("CVE-2025-10157", "gadget", "= GHSA-f7qq-56ww-84cr (submodule)",
         _gadget("asyncio.unix_events", "_UnixSubprocessTransport._start")),
    # --- fickling
    Case("GHSA-mxhj-88fx-4pcv", "opcode trick", "OBJ call whose result is POPped",
         _file(_OBJ_POP)),
    Case("GHSA-wccx-j62j-r448", "opcode trick", "loader entry points not hooked (pickle.loads, "
         "_pickle): judged statically whatever the loader", _file(PAYLOAD)),
    Case("GHSA-fphw-536r-4p88", "opcode trick", "pure-Python pickle._loads entry point",
         _file(PAYLOAD)),
    Case("GHSA-cffv-grgg-g429", "opcode trick", "one analysis pass shadowing another: every "
         "import judged on its own", _file(_SHADOWED)),
    # --- ModelScan issues
    Case("modelscan#85", "opcode trick", "BUILD slot-state setattr + dotted GLOBAL + memo",
         _file(_MS85)),
    Case("modelscan#267", "gadget", "nested pickle.loads", _file(_NESTED)),
    Case("modelscan#330", "opcode trick", "numpy.__builtins__ + BUILD + computed eval",
         _file(_MS330)),
    Case("modelscan#338-primitives", "gadget", "multiprocessing.util.spawnv_passfds",
         _gadget("multiprocessing.util", "spawnv_passfds")),
    Case("modelscan#338-mlflow", "gadget", "mlflow.projects.backend.local._run_entry_point",
         _gadget("mlflow.projects.backend.local", "_run_entry_point")),
    Case("modelscan#338-pandas", "gadget", "pandas.io.parsers.readers.read_csv (exfiltration)",
         _gadget("pandas.io.parsers.readers", "read_csv")),
    Case("modelscan#338-memo", "opcode trick", "invalid memo reference after the payload",
         _file(_MS338_MEMO)),
    # --- exception-oriented payloads
    Case("exception-oriented", "opcode trick", "payload, then a deliberate parser error",
         _file(_EXCEPTION_ORIENTED)),
]  # fmt: skip

#: ids the reference store has no description of (kept visible, not silently dropped)
NOT_FOUND = ["GHSA-5j3x-jp52-966f", "GHSA-6ggj-6f2q-f7mx", "modelscan#331"]


def dangerous(r: FileReport) -> bool:
    return r.verdict == "dangerous"


@pytest.mark.parametrize("case", ADVISORIES, ids=[c.id for c in ADVISORIES])
def test_published_bypass_is_dangerous(tmp_path: Path, case: Case) -> None:
    r = scan(case.build(tmp_path))
    assert dangerous(r), (case.id, r.verdict, [f.message for f in r.findings], r.errors)


def test_more_g38g_modules(tmp_path: Path) -> None:
    # GHSA-g38g-8gr9-h9xp lists several stdlib modules; every one is dangerous by capability
    for module, name in [
        ("compileall", "compile_dir"),
        ("py_compile", "compile"),
        ("_pyrepl.pager", "pipe_pager"),
        ("test.support.script_helper", "assert_python_ok"),
        ("runpy", "run_module"),
        ("pdb", "run"),
    ]:
        assert dangerous(scan(_gadget(module, name)(tmp_path))), (module, name)


def test_exception_oriented_reports_both(tmp_path: Path) -> None:
    r = scan(_file(_EXCEPTION_ORIENTED)(tmp_path))
    assert any(f.rule == "stream-broken" for f in r.findings) and r.errors


def test_the_table_in_the_docs_lists_every_case() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "scan.md").read_text()
    for case in ADVISORIES:
        if not case.id.startswith("modelscan#338-") and case.id != "exception-oriented":
            assert case.id in doc, case.id
    for missing in NOT_FOUND:
        assert missing in doc


# --- positive controls under the real loaders -----------------------------------------------------


def _run(tmp_path: Path, code: str, data: bytes) -> subprocess.CompletedProcess[str]:
    (tmp_path / "p.pkl").write_bytes(data)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def _touch(path: str) -> bytes:
    return asm(PROTO(2), GLOBAL("logging", "FileHandler"), BINUNICODE(path), TUPLE1, REDUCE, STOP)


def test_positive_control_exception_oriented_payload_runs(tmp_path: Path) -> None:
    # the side effect happens, then the loader raises on the broken rest
    data = asm(_touch("made.txt")[:-1], POP, BINGET(200), STOP)
    proc = _run(tmp_path, "import pickle; pickle.loads(open('p.pkl','rb').read())", data)
    assert proc.returncode != 0 and (tmp_path / "made.txt").exists()


@pytest.mark.parametrize(
    "loader",
    ["pickle.loads(d)", "pickle._loads(d)", "pickle.Unpickler(io.BytesIO(d)).load()"],
)
def test_positive_control_every_entry_point_runs_it(tmp_path: Path, loader: str) -> None:
    code = f"import io, pickle; d = open('p.pkl','rb').read(); {loader}"
    _run(tmp_path, code, _touch("entry.txt"))
    assert (tmp_path / "entry.txt").exists()


def test_positive_control_torch_reads_a_bad_crc_member(tmp_path: Path) -> None:
    # torch.load reads the member whose CRC zipfile refuses (a benign tensor file here)
    import torch

    p = tmp_path / "t.pt"
    torch.save({"w": torch.zeros(2)}, p)
    raw = bytearray(p.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    crc = struct.pack("<I", info.CRC)
    raw[:] = raw.replace(crc, b"\xde\xad\xbe\xef")
    p.write_bytes(bytes(raw))
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(p).read(info.filename)
    assert torch.load(p, weights_only=True)["w"].shape == (2,)
