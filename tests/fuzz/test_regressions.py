"""Inputs the fuzzers found that once escaped a reader as a non-SdtoolError; each stays refused."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import pytest
from harness import exercise
from seeds import _tar

from sdtool import open_model
from sdtool.errors import CorruptFile


def _tar_with(**override: bytes) -> bytes:
    """The TAR seed with some members replaced."""
    with tarfile.open(fileobj=io.BytesIO(_tar())) as src:
        members = {m.name: src.extractfile(m).read() for m in src.getmembers()}  # type: ignore[union-attr]
    members.update(override)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


TAR_CASES = {
    # a tensor record that is an int, not (key, storage id, ...): was TypeError
    "tensor-record-int": _tar_with(tensors=pickle.dumps(1, 2) + pickle.dumps(5, 2)),
    # a tensor naming storage 9, which does not exist: was KeyError
    "unknown-storage": _tar_with(
        tensors=pickle.dumps(1, 2)
        + pickle.dumps((1, 9, None), 2)
        + struct.pack("<ii", 1, 0)
        + struct.pack("<qqq", 1, 1, 0)
    ),
    # a storage view of a root storage that does not exist: was KeyError
    "view-of-nothing": _tar_with(storages=pickle.dumps(0, 2) + pickle.dumps([(1, 7, 0, 1)], 2)),
}


@pytest.mark.parametrize("name", sorted(TAR_CASES))
def test_tar_malformed_records(tmp_path: Path, name: str) -> None:
    p = tmp_path / f"{name}.pt"
    p.write_bytes(TAR_CASES[name])
    with pytest.raises(CorruptFile, match="TAR torch file: malformed records"):
        open_model(p)
    assert exercise(p) == "refused:CorruptFile"


def test_tar_cut_inside_first_member(tmp_path: Path) -> None:
    """The TAR seed cut at 516 bytes: tarfile raised ValueError (seek out of range) in the
    scanner's tar walk and in the loader."""
    p = tmp_path / "cut.pt"
    p.write_bytes(_tar()[:516])
    assert exercise(p) == "refused:CorruptFile"
    from sdtool.scan import scan

    scan(p)  # reports the problem as a finding, raises nothing


def test_npy_v2_cut_in_header_length(tmp_path: Path) -> None:
    """An npy 2.0 file cut at 11 bytes: the scanner's u32 header-length read raised
    struct.error (found by run_long.py)."""
    from sdtool.scan import scan

    p = tmp_path / "cut.npy"
    p.write_bytes(b"\x93NUMPY\x02\x00" + b"v\x00\x00")
    assert exercise(p).startswith("refused:")
    scan(p)
