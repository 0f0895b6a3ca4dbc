"""The safetensors reader: values equal safetensors' own reader; broken headers are explained."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdtool import open_model
from sdtool.errors import CorruptFile, TruncatedFile


def test_values_equal_reference(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    data = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "i": np.array([1, 2, 3], dtype=np.int64),
        "e": np.zeros((0, 3), dtype=np.float16),
    }
    save_file(data, str(p), metadata={"k": "v"})
    ref = load_file(str(p))
    with open_model(p) as m:
        assert m.format == "safetensors"
        assert m.metadata == {"k": "v"}
        assert set(m.tensors) == set(ref)
        for name, arr in ref.items():
            got = m.read(name)
            assert got.dtype == arr.dtype and got.shape == arr.shape
            assert got.tobytes() == arr.tobytes()


def test_truncated_is_explained(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(p))
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(TruncatedFile, match="truncated"):
        open_model(p)


def test_overlapping_offsets_rejected(tmp_path: Path) -> None:
    header = (
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    )
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CorruptFile, match="hole or overlap"):
        open_model(p)
