"""A safetensors file whose header length starts with byte 0x80 is still safetensors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from sdtool.formats.open import open_model
from sdtool.formats.sniff import sniff_bytes
from sdtool.vocab import Format


def test_header_length_0x280_is_not_a_pickle(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (0x280 - len(header))  # length 0x0280: the file starts 80 02 like a pickle
    data = struct.pack("<Q", len(header)) + header + b"\0\0\x80\x3f"
    assert data[:2] == b"\x80\x02"
    assert sniff_bytes(data[:4096], len(data)) is Format.SAFETENSORS
    p = tmp_path / "m.safetensors"
    p.write_bytes(data)
    with open_model(p) as m:
        assert m.format == "safetensors" and float(m.read("w")[0]) == 1.0
