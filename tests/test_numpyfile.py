"""The numpy readers: values equal np.load's (numbers only); bad headers are explained."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from sdtool import open_model
from sdtool.errors import CorruptFile, TruncatedFile, UnsupportedDtype
from sdtool.formats.numpyfile import (
    NPY_TENSOR,
    PickledArray,
    parse_npy_header,
    read_npy_layout,
    read_npz,
)
from sdtool.formats.zip import read_archive
from sdtool.model import ModelFile

ARRAYS = {
    "f32": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    "f16": np.linspace(-3, 3, 10, dtype=np.float16),
    "f64_big": np.arange(6, dtype=">f8").reshape(2, 3),
    "i64_big": np.arange(5, dtype=">i8"),
    "fortran": np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
    "fortran_big": np.asfortranarray(np.arange(12, dtype=">f4").reshape(2, 3, 2)),
    "u8": np.arange(7, dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "c64": np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "scalar": np.array(3.5, dtype=np.float64),
}


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype.newbyteorder("<") or got.dtype == want.dtype
    assert (
        np.ascontiguousarray(got).tobytes()
        == np.ascontiguousarray(want.astype(want.dtype.newbyteorder("<"))).tobytes()
    )


@pytest.mark.parametrize("name", list(ARRAYS))
def test_npy_equals_np_load(tmp_path: Path, name: str) -> None:
    p = tmp_path / f"{name}.npy"
    np.save(p, ARRAYS[name])
    want = np.load(p, allow_pickle=False)
    with open_model(p) as m:
        assert m.format == "npy"
        assert list(m.tensors) == [NPY_TENSOR]
        _same(m.read(NPY_TENSOR), want)


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_npy_header_versions(tmp_path: Path, version: tuple[int, int]) -> None:
    arr = np.arange(10, dtype=np.int16)
    p = tmp_path / "a.npy"
    with open(p, "wb") as f:
        np.lib.format.write_array(f, arr, version=version)
    with open_model(p) as m:
        assert m.container.npy_version == f"{version[0]}.{version[1]}"
        _same(m.read(NPY_TENSOR), arr)


def test_fortran_strides_reversed(tmp_path: Path) -> None:
    p = tmp_path / "f.npy"
    np.save(p, ARRAYS["fortran"])
    with open_model(p) as m:
        info = m.tensors[NPY_TENSOR]
        assert info.strides == (1, 3)
        assert info.file_span is None  # not C-contiguous: convert must not copy bytes as-is


def test_big_endian_storage(tmp_path: Path) -> None:
    p = tmp_path / "b.npy"
    np.save(p, ARRAYS["f64_big"])
    with open_model(p) as m:
        assert m.tensors[NPY_TENSOR].storage.big_endian
        assert m.read(NPY_TENSOR).dtype == np.dtype("<f8")


def test_object_array_refused(tmp_path: Path) -> None:
    p = tmp_path / "o.npy"
    np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(PickledArray, match=r"pickled Python objects.*sdtool scan"):
        open_model(p)


def test_truncated_data(tmp_path: Path) -> None:
    p = tmp_path / "t.npy"
    np.save(p, np.ones(1000, np.float32))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(TruncatedFile, match="truncated"):
        open_model(p)


def test_huge_declared_header_refused(tmp_path: Path) -> None:
    p = tmp_path / "h.npy"
    p.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + b"{" * 100)
    with pytest.raises(CorruptFile, match="limit"):
        open_model(p)


def test_header_not_a_literal(tmp_path: Path) -> None:
    header = b"{'descr': __import__('os').system('true'), 'fortran_order': False, 'shape': ()}"
    p = tmp_path / "x.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header)
    with pytest.raises(CorruptFile, match="not a Python literal"):
        open_model(p)


def test_structured_dtype_refused(tmp_path: Path) -> None:
    p = tmp_path / "s.npy"
    np.save(p, np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")]))
    with pytest.raises(UnsupportedDtype, match="structured"):
        open_model(p)


def _npz(p: Path) -> ModelFile:
    with open(p, "rb") as f:
        archive = read_archive(f, p.stat().st_size)
    return read_npz(p, archive)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_equals_np_load(tmp_path: Path, save) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "a.npz"
    save(p, **ARRAYS)
    with np.load(p, allow_pickle=False) as ref, _npz(p) as m:
        assert m.format == "npz"
        assert set(m.tensors) == set(ref.files)
        for name in ref.files:
            _same(m.read(name), ref[name])
        stored = save is np.savez
        assert all((t.storage.file_offset is not None) == stored for t in m.tensors.values())


def test_npz_object_member_refused(tmp_path: Path) -> None:
    p = tmp_path / "o.npz"
    np.savez(p, ok=np.ones(2), bad=np.array([None], dtype=object))
    with pytest.raises(PickledArray, match=r"'bad.npy'.*sdtool scan"):
        _npz(p)


def test_python2_long_shape(tmp_path: Path) -> None:
    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (2L,), }"
    header += b" " * (64 - 10 - len(header) - 1) + b"\n"
    p = tmp_path / "py2.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 16)
    with open_model(p) as m:
        assert m.tensors[NPY_TENSOR].shape == (2,)


def test_npz_string_member_refused(tmp_path: Path) -> None:
    p = tmp_path / "s.npz"
    np.savez(p, data=np.arange(3.0), format=np.array(b"csc"))
    with pytest.raises(UnsupportedDtype, match=r"'format\.npy'"):
        _npz(p)


def test_one_header_description_for_reader_and_scanner(tmp_path: Path) -> None:
    """The scanner's view (numpy.load's reading) and the reader's parse agree on where the data
    lies; a header that does not fit the bytes is TruncatedFile for both."""
    p = tmp_path / "a.npy"
    np.save(p, np.arange(6, dtype=np.float32).reshape(2, 3))
    raw = p.read_bytes()
    layout = read_npy_layout(raw)
    assert layout.data_start == parse_npy_header(raw, "a").data_start == len(raw) - 24
    assert layout.nbytes == 24 and not layout.has_object and layout.version == (1, 0)
    for cut in (raw[:11], raw[:40]):
        with pytest.raises(TruncatedFile):
            read_npy_layout(cut)
        with pytest.raises(TruncatedFile):
            parse_npy_header(cut, "a")
