"""The one vocabulary: formats, verdicts, exit codes, dtype names, the cast rule, results' JSON;
and the promise that what the unpickler builds, the scanner calls safe."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sdtool import dtypes
from sdtool.errors import UnsupportedDtype
from sdtool.formats.sniff import sniff_any, sniff_bytes
from sdtool.formats.unpickler import ALLOWED, _numpy_dtype_class
from sdtool.results import Result
from sdtool.scan.classify import classify_global
from sdtool.vocab import (
    CASTABLE,
    COMPONENTS,
    DTYPE_NAMES,
    ExitCode,
    Format,
    Severity,
    Verdict,
    cast_target,
    dtype_name,
    parse_dtype,
)

F16, F32, I64, BOOL = (dtypes.from_code(c) for c in ("F16", "F32", "I64", "BOOL"))


def test_every_global_the_unpickler_builds_is_safe_for_the_scanner() -> None:
    """If the loader builds a global, the scanner must not call a file using it unsafe (and
    vice versa inspect's "scan verdict" column would contradict the loader)."""
    unsafe = {k: classify_global(*k) for k in ALLOWED if classify_global(*k)[0] != "safe"}
    assert unsafe == {}
    for name in ("BoolDType", "Float32DType", "Int64DType", "Float16DType"):
        _numpy_dtype_class(name)  # the loader builds these numpy.dtypes classes ...
        assert classify_global("numpy.dtypes", name)[0] == "safe"  # ... and scan agrees


def test_load_from_bytes_is_the_documented_exception() -> None:
    """sdtool opens an embedded torch file with its own restricted reader, but torch.load runs
    a full nested torch.load on it: to the scanner (is it safe for torch?) it stays dangerous."""
    assert ("torch.storage", "_load_from_bytes") not in ALLOWED
    assert classify_global("torch.storage", "_load_from_bytes")[0] == "dangerous"


def test_enums_are_their_spelling() -> None:
    assert Format.TORCH_ZIP == "torch-zip" and str(Format.TORCH_ZIP) == "torch-zip"
    assert f"{Format.NPY}" == "npy" and json.dumps([Format.SEVENZIP]) == '["7z"]'
    assert {"not_scanned": 1}[Verdict.NOT_SCANNED] == 1  # hashed as the string
    assert Verdict.NOT_SCANNED.label == "not scanned"
    assert all(" " not in v.value for v in Verdict)  # verdicts are JSON keys in the summary
    assert len({f.value for f in Format}) == len(Format)
    assert Severity.DANGEROUS.rank > Severity.SUSPICIOUS.rank > Severity.INFO.rank
    assert [int(c) for c in (ExitCode.OK, ExitCode.FINDINGS, ExitCode.ERROR)] == [0, 1, 2]


def test_sniff_speaks_format() -> None:
    assert sniff_bytes(b"PK\x03\x04" + bytes(40), 44) is Format.ZIP
    assert sniff_bytes(b"\x80\x02}q\x00.", 6) is Format.PICKLE
    assert sniff_bytes(b"\x93NUMPY", 6) is Format.NPY


def test_one_sniffer_for_scan() -> None:
    """The scanner's one extra start: numpy.load opens an end-of-central-directory record as
    an npz (zipfile finds the real end record), torch.load does not."""
    eocd = b"PK\x05\x06" + bytes(18)
    assert sniff_bytes(eocd, 22) is Format.UNKNOWN
    assert sniff_any(eocd, 22) is Format.ZIP
    assert sniff_any(b"\x80\x02}q\x00.", 6) is Format.PICKLE


def test_dtype_names_and_the_cast_rule() -> None:
    assert parse_dtype(None) is None and parse_dtype("keep") is None
    assert parse_dtype("fp16") == F16 and parse_dtype("half") == F16 and parse_dtype(F16) == F16
    assert dtype_name("F16") == "fp16" and dtype_name(None) == "keep"
    with pytest.raises(UnsupportedDtype):
        parse_dtype("int8")
    for code in DTYPE_NAMES.values():
        assert code in CASTABLE
    assert cast_target(F32, F16) == F16  # floats take the target
    assert cast_target(I64, F16) == I64 and cast_target(BOOL, F16) == BOOL  # never ints, bools
    assert cast_target(F32, None) == F32
    e8m0 = dtypes.from_code("F8_E8M0")
    assert cast_target(e8m0, F16) == e8m0  # a float sdtool does not cast keeps its dtype


def test_component_names_have_one_spelling() -> None:
    assert all(name == c.name and " " not in name for name, c in COMPONENTS.items())


@dataclass(frozen=True)
class _Inner(Result):
    path: Path
    fmt: Format = field(default=Format.NPY, metadata={"json": "format"})
    hidden: int = field(default=0, metadata={"json": None})


@dataclass(frozen=True)
class _Outer(Result):
    items: list[_Inner]
    counts: dict[Verdict, int]


def test_result_to_json() -> None:
    doc = _Outer([_Inner(Path("a/b.npy"))], {Verdict.SAFE: 2}).to_json()
    assert doc == {"items": [{"path": "a/b.npy", "format": "npy"}], "counts": {"safe": 2}}


def test_identify_speaks_the_component_names() -> None:
    """identify's key-set signatures name components (and their roles) as vocab does."""
    from sdtool.identify import tables

    for meta in tables.COMPONENTS.values():
        assert meta.name in COMPONENTS, meta.name
        assert COMPONENTS[meta.name].role == meta.role, meta.name


def test_user_dtype_names_parse_everywhere() -> None:
    for name, code in DTYPE_NAMES.items():
        assert dtypes.parse(name).code == code


def test_one_table_of_storage_classes() -> None:
    """The storage classes the scanner allows are the one table's (dtypes.STORAGE_ITEMSIZE),
    whose sizes agree with the dtype table's."""
    from sdtool.dtypes import DTYPES, STORAGE_ITEMSIZE
    from sdtool.scan.allowlist import SAFE

    allowed = {name for mod, name in SAFE if mod == "torch" and name.endswith("Storage")}
    assert allowed - {"TypedStorage"} == set(STORAGE_ITEMSIZE)
    for d in DTYPES.values():
        if d.storage:
            assert STORAGE_ITEMSIZE[d.storage] == d.itemsize
