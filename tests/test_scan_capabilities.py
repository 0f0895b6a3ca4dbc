"""Callables judged by capability, not by name (issue 12, item 3).

Every row of ``sdtool.scan.capabilities.ROWS`` is checked; the classes a word heuristic rated
"suspicious" (no "File"/"Process" in the name) are dangerous by their capability; every
allowlisted callable that calls one of its arguments is checked at its call site; and the
restricted unpickler's builders never call an argument. Positive controls run a few payloads
under the real ``pickle.loads`` in a subprocess (in tmp_path) to show the capability is real.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from sdtool.formats.unpickler import ALLOWED
from sdtool.scan import classify_global
from sdtool.scan.capabilities import ROWS, Cap, Row
from tests.scan_payloads import (
    BINUNICODE,
    EMPTY_TUPLE,
    GLOBAL,
    MARK,
    NEWOBJ,
    NONE,
    PROTO,
    REDUCE,
    STACK_GLOBAL,
    STOP,
    TUPLE,
    TUPLE1,
    TUPLE2,
    U,
    asm,
)
from tests.test_scan_evasions import scan_bytes


def _expected(row: Row) -> str:
    if row.cap is Cap.DATA or row.init_only:
        return "suspicious"
    return "dangerous"


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.module}:{r.name or '*'}" for r in ROWS])
def test_every_capability_row(row: Row) -> None:
    # each row decides the verdict of a class it covers (a made-up class for module rows)
    module = row.module.replace("*", "x")
    name = (row.name or "SomeUnlistedClass").replace("*", "X")
    sev, why = classify_global(module, name)
    if sev == "safe":  # an allowlisted pair inside a data row (e.g. collections.OrderedDict)
        assert row.cap is Cap.DATA
        return
    assert sev == _expected(row), (row, sev, why)
    assert row.reason.split(":")[0].split(" (")[0] in why


@pytest.mark.parametrize(
    ("module", "name", "capability"),
    [
        ("gzip", "GzipFile", "files"),  # GzipFile('x', 'wb') creates a file
        ("bz2", "BZ2File", "files"),
        ("lzma", "LZMAFile", "files"),
        ("zoneinfo", "ZoneInfo", "time-zone file"),  # reads a file named by the pickle
        ("torch.utils.tensorboard.writer", "SummaryWriter", "directory"),
        ("torch.utils.tensorboard", "SummaryWriter", "directory"),
        ("numpy", "DataSource", "URLs"),
        ("numpy.lib._datasource", "DataSource", "URLs"),
        ("argparse", "FileType", "open files"),
        ("torch.optim.lr_scheduler", "LambdaLR", "calls its lr_lambda"),
        ("logging.handlers", "RotatingFileHandler", "files"),
        ("logging.handlers", "SysLogHandler", "sockets"),
        ("http.server", "HTTPServer", "sockets"),
        ("socketserver", "TCPServer", "binds sockets"),
        ("tempfile", "TemporaryDirectory", "directories"),
        ("sqlite3", "Connection", "database"),
        ("zipfile", "ZipFile", "files"),
        ("tarfile", "TarFile", "files"),
        ("weakref", "finalize", "calls"),
        ("typing", "ForwardRef", "evaluates"),
        ("transformers.models.bert.tokenization_bert", "BertTokenizer", "vocabulary files"),
        ("diffusers.pipelines", "StableDiffusionPipeline", "download"),
        ("gguf", "GGUFWriter", "writes"),
        ("safetensors", "safe_open", "read files"),
        ("huggingface_hub", "HfApi", "downloads"),
        ("fsspec.implementations.local", "LocalFileSystem", "files"),
        ("mimetypes", "MimeTypes", "mime.types"),
        ("configparser", "ConfigParser", "files"),
        ("filecmp", "dircmp", "directories"),
        ("json", "JSONDecoder", "object_hook"),
        ("shelve", "DbfilenameShelf", "unpickling"),
        ("multiprocessing.managers", "BaseManager", "processes"),
        ("wave", "Wave_write", "files"),
        ("xml.dom.minidom", "Document", "closed world"),  # stdlib, not listed as data-only
    ],
)
def test_classes_without_telltale_names_are_judged_by_capability(
    tmp_path: Path, module: str, name: str, capability: str
) -> None:
    # attack: a class whose name has no "File"/"Process"/"Socket" word, called via REDUCE
    sev, why = classify_global(module, name)
    assert sev == "dangerous" and capability in why, why
    data = asm(PROTO(4), U(module), U(name), STACK_GLOBAL, U("x"), TUPLE1, REDUCE, STOP)
    assert scan_bytes(tmp_path, data).verdict == "dangerous"


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("argparse", "Namespace"),
        ("pathlib", "PosixPath"),
        ("omegaconf.dictconfig", "DictConfig"),
        ("transformers.training_args", "TrainingArguments"),
        ("transformers.models.clip.configuration_clip", "CLIPTextConfig"),
        ("torch.nn.modules.linear", "Linear"),
        ("torch.optim.adam", "Adam"),
        ("sklearn.pipeline", "Pipeline"),
        ("my_training_code.config", "RunConfig"),  # a package sdtool has no data on
        ("types", "SimpleNamespace"),
        ("uuid", "UUID"),
    ],
)
def test_data_classes_stay_suspicious(module: str, name: str) -> None:
    assert classify_global(module, name)[0] == "suspicious"


def test_functions_are_never_data() -> None:
    # a function in a data-only module is still code sdtool has not read
    assert classify_global("argparse", "_copy_items")[0] == "dangerous"
    assert classify_global("my_training_code.util", "instantiate_from_config")[0] == "dangerous"


def test_init_only_class_is_dangerous_when_its_init_runs(tmp_path: Path) -> None:
    # accelerate's PartialState initializes torch.distributed in __init__: NEWOBJ + BUILD (how
    # training_args.bin holds it) is suspicious, REDUCE (runs __init__) dangerous
    g = GLOBAL("accelerate.state", "PartialState")
    rebuilt = asm(PROTO(2), g, EMPTY_TUPLE, NEWOBJ, STOP)
    assert scan_bytes(tmp_path, rebuilt).verdict == "suspicious"
    called = asm(PROTO(2), g, EMPTY_TUPLE, REDUCE, STOP)
    assert scan_bytes(tmp_path, called).verdict == "dangerous"


# --- allowlisted callables that call an argument ------------------------------------------------


def _call(callee: tuple[str, str], *args: bytes) -> bytes:
    return asm(PROTO(2), GLOBAL(*callee), MARK, *args, TUPLE, REDUCE, STOP)


CALLS_ARG_PAYLOADS = [
    # numpy.random's Generator ctor calls its second argument with the first
    (
        ("numpy.random._pickle", "__generator_ctor"),
        (BINUNICODE("MT19937"), GLOBAL("argparse", "Namespace")),
    ),
    (
        ("numpy.random._pickle", "__randomstate_ctor"),
        (BINUNICODE("x"), GLOBAL("transformers.training_args", "TrainingArguments")),
    ),
    # __bit_generator_ctor instantiates any class it is given
    (("numpy.random._pickle", "__bit_generator_ctor"), (GLOBAL("argparse", "Namespace"),)),
    # defaultdict's factory runs for every missing key
    (("collections", "defaultdict"), (GLOBAL("argparse", "Namespace"),)),
    # copyreg._reconstructor calls base.__init__(obj, state)
    (
        ("copyreg", "_reconstructor"),
        (GLOBAL("argparse", "Namespace"), GLOBAL("argparse", "Namespace"), NONE),
    ),
    # _codecs.encode looks the codec up by name: codecs live in modules it imports
    (("_codecs", "encode"), (BINUNICODE("x"), BINUNICODE("zlib_codec"))),
    # numpy's _reconstruct creates an array of the subtype it is given
    (
        ("numpy.core.multiarray", "_reconstruct"),
        (GLOBAL("argparse", "Namespace"), EMPTY_TUPLE, BINUNICODE("b")),
    ),
    # Lightning's ModelCheckpoint.__init__ resolves its folder through fsspec
    (
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
        (BINUNICODE("s3://bucket/x"),),
    ),
]


@pytest.mark.parametrize(
    ("callee", "args"), CALLS_ARG_PAYLOADS, ids=[f"{m}.{n}" for (m, n), _ in CALLS_ARG_PAYLOADS]
)
def test_allowlisted_callable_that_calls_an_argument(
    tmp_path: Path, callee: tuple[str, str], args: tuple[bytes, ...]
) -> None:
    r = scan_bytes(tmp_path, _call(callee, *args))
    assert r.verdict == "dangerous"
    assert any(f.rule == "calls-arg" for f in r.findings), [f.message for f in r.findings]


def test_calls_arg_with_a_computed_argument(tmp_path: Path) -> None:
    # attack: the factory is the result of another (allowlisted) call, not an import
    data = asm(
        PROTO(2), GLOBAL("collections", "defaultdict"), GLOBAL("builtins", "str"), EMPTY_TUPLE,
        REDUCE, TUPLE1, REDUCE, STOP,
    )  # fmt: skip
    r = scan_bytes(tmp_path, data)
    assert any(f.rule == "calls-arg" and "computed" in f.message for f in r.findings)


@pytest.mark.parametrize(
    "args",
    [
        (GLOBAL("builtins", "list"),),
        (NONE,),
    ],
)
def test_calls_arg_with_allowlisted_argument_is_safe(tmp_path: Path, args: tuple[bytes]) -> None:
    assert scan_bytes(tmp_path, _call(("collections", "defaultdict"), *args)).verdict == "safe"
    latin = _call(("_codecs", "encode"), BINUNICODE("x"), BINUNICODE("latin1"))
    assert scan_bytes(tmp_path, latin).verdict == "safe"


def test_real_rng_states_pass_the_argument_checks(tmp_path: Path) -> None:
    import pickle

    import numpy as np

    for obj in (np.random.default_rng(1), np.random.RandomState(2), np.random.SeedSequence(3)):
        for proto in (2, 4, 5):
            r = scan_bytes(tmp_path, pickle.dumps(obj, protocol=proto))
            assert r.verdict == "safe", (obj, proto, [f.message for f in r.findings])


# --- the restricted unpickler: its builders never call an argument -------------------------------


class _Tripwire:
    """Calling it fails the test; any attribute is missing (a builder may refuse it)."""

    calls: ClassVar[list[str]] = []

    def __call__(self, *a: object, **k: object) -> object:
        _Tripwire.calls.append("called")
        raise AssertionError("an allowlisted builder called its argument")

    def __getattr__(self, name: str) -> object:
        raise AttributeError(name)


@pytest.mark.parametrize("key", sorted(ALLOWED), ids=[f"{m}.{n}" for m, n in sorted(ALLOWED)])
def test_unpickler_builders_never_call_an_argument(key: tuple[str, str]) -> None:
    obj = ALLOWED[key]()
    if not callable(obj):
        return
    _Tripwire.calls = []
    for n in range(1, 5):
        for pos in range(n):
            args = [_Tripwire() if i == pos else 0 for i in range(n)]
            try:
                obj(*args)
            except AssertionError:
                raise
            except Exception:  # refusing the argument is fine; calling it is not
                pass
    assert "called" not in _Tripwire.calls


def test_unpickler_allow_table_is_allowlisted_by_the_scanner() -> None:
    # what the restricted unpickler builds, the scanner calls safe (no disagreement)
    for module, name in ALLOWED:
        assert classify_global(module, name)[0] == "safe", (module, name)


# --- positive controls: the capabilities are real under pickle.loads --------------------------


def _load_in_child(tmp_path: Path, data: bytes) -> subprocess.CompletedProcess[str]:
    (tmp_path / "p.pkl").write_bytes(data)
    code = "import pickle,sys; pickle.loads(open('p.pkl','rb').read())"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def test_positive_control_gzipfile_creates_a_file(tmp_path: Path) -> None:
    data = asm(
        PROTO(2), GLOBAL("gzip", "GzipFile"), BINUNICODE("created.gz"), BINUNICODE("wb"),
        TUPLE2, REDUCE, STOP,
    )  # fmt: skip
    _load_in_child(tmp_path, data)
    assert (tmp_path / "created.gz").exists()
    assert scan_bytes(tmp_path, data, name="x.pkl").verdict == "dangerous"


def test_positive_control_generator_ctor_calls_its_argument(tmp_path: Path) -> None:
    # exception-oriented: os.mkdir runs, then Generator(None) raises; the side effect stays
    data = _call(
        ("numpy.random._pickle", "__generator_ctor"),
        BINUNICODE("made_by_ctor"),
        GLOBAL("os", "mkdir"),
    )
    proc = _load_in_child(tmp_path, data)
    assert proc.returncode != 0 and (tmp_path / "made_by_ctor").is_dir()
    r = scan_bytes(tmp_path, data, name="x.pkl")
    assert {"calls-arg", "global"} <= {f.rule for f in r.findings if f.severity == "dangerous"}


def test_positive_control_defaultdict_keeps_a_callable(tmp_path: Path) -> None:
    # the factory is stored and called later by the program (here: a missing key)
    data = asm(
        PROTO(2), GLOBAL("collections", "defaultdict"), GLOBAL("os", "getcwd"), TUPLE1, REDUCE,
        STOP,
    )  # fmt: skip
    (tmp_path / "p.pkl").write_bytes(data)
    code = "import pickle; d = pickle.loads(open('p.pkl','rb').read()); print(d['k'])"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == str(tmp_path)
    assert scan_bytes(tmp_path, data, name="x.pkl").verdict == "dangerous"
