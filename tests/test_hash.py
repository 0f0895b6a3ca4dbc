"""sdtool hash: every hash equals an independent computation over the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import blake3
import numpy as np
import pytest
from safetensors.numpy import save_file

from sdtool import hash_file
from sdtool.cli.main import main
from sdtool.errors import FileAccessError, UsageError
from sdtool.ops.hash import ALGORITHMS

HELLO = b"hello world"


def _reference(data: bytes, *, safetensors: bool) -> dict[str, str | None]:
    """The hashes computed the way A1111/kohya/Civitai describe them, without sdtool."""
    sha = hashlib.sha256(data).hexdigest().upper()
    autov3 = None
    if safetensors:
        (n,) = struct.unpack("<Q", data[:8])
        autov3 = hashlib.sha256(data[8 + n :]).hexdigest().upper()
    return {
        "sha256": sha,
        "autov1": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8].upper(),
        "autov2": sha[:10],
        "autov3": autov3,
        "crc32": zlib.crc32(data).to_bytes(4, "little").hex().upper(),
        "blake3": blake3.blake3(data).hexdigest().upper(),
    }


def test_hello_world_known_values(tmp_path: Path) -> None:
    p = tmp_path / "hello.txt"
    p.write_bytes(HELLO)
    r = hash_file(p)
    # published values (FORMATS.md section 5 for the CRC, the BLAKE3/SHA-256 test vectors)
    assert r.hashes["crc32"] == "85114A0D"
    assert r.hashes["sha256"] == "B94D27B9934D3E08A52E52D7DA7DABFAC484EFE37A5380EE9088F7ACE2EFCDE9"
    assert r.hashes["autov2"] == "B94D27B993"
    assert r.hashes["blake3"] == "D74981EFA70A0C880B8D8C1985D075DBCBF679B99A5F9914E5AAF96B831A9E24"
    assert r.hashes["autov1"] == "E3B0C442"  # A1111 hashes the empty range of a small file
    assert r.hashes["autov3"] is None and "safetensors" in r.notes["autov3"]
    assert "2 MiB" in r.notes["autov1"]
    assert r.hashes == _reference(HELLO, safetensors=False)


@pytest.mark.parametrize("chunk", [1 << 16, (1 << 16) + 7, 1 << 20, 16 << 20])
def test_big_safetensors_every_chunking(tmp_path: Path, chunk: int) -> None:
    """Ranges that start and end inside chunks (AutoV1 window, header end) still hash exactly."""
    rng = np.random.default_rng(0)
    p = tmp_path / "m.safetensors"
    save_file(
        {"a": rng.standard_normal((700, 1000), dtype=np.float32), "b": np.arange(5)},
        str(p),
        metadata={"ss_network_dim": "8"},
    )
    data = p.read_bytes()
    assert len(data) > 2 << 20
    seen: list[tuple[int, int]] = []
    r = hash_file(p, chunk_size=chunk, progress=lambda d, t: seen.append((d, t)))
    assert r.safetensors and r.size == len(data)
    assert r.hashes == _reference(data, safetensors=True)
    assert r.notes == {}
    assert seen[-1] == (len(data), len(data))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_autov3_matches_kohya_metadata_style(tmp_path: Path) -> None:
    """AutoV3 is the SHA-256 of the tensor buffer alone: the header and metadata do not count."""
    t = {"w": np.ones((4, 4), np.float16)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(t, str(a))
    save_file(t, str(b), metadata={"modelspec.title": "renamed"})
    ra, rb = hash_file(a), hash_file(b)
    assert ra.hashes["autov3"] == rb.hashes["autov3"]
    assert ra.hashes["sha256"] != rb.hashes["sha256"]
    buffer = np.ones(16, np.float16).tobytes()
    assert ra.hashes["autov3"] == hashlib.sha256(buffer).hexdigest().upper()


def test_damaged_safetensors_still_hashed_with_a_note(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(p))
    p.write_bytes(p.read_bytes()[:-100])  # a truncated download
    data = p.read_bytes()
    r = hash_file(p)
    assert r.hashes == _reference(data, safetensors=True)
    assert "invalid" in r.notes["autov3"] and "truncated" in r.notes["autov3"]


def test_subset_and_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.bin"
    p.write_bytes(b"")
    r = hash_file(p, algorithms=["AutoV2", "crc32"])
    assert list(r.hashes) == ["autov2", "crc32"]
    assert r.hashes == {"autov2": "E3B0C44298", "crc32": "00000000"}
    with pytest.raises(UsageError, match="unknown hash 'md5'"):
        hash_file(p, algorithms=["md5"])


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileAccessError, match="no such file"):
        hash_file(tmp_path / "missing.safetensors")
    with pytest.raises(FileAccessError, match="directory"):
        hash_file(tmp_path)


def test_cli_text_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "hello.txt"
    p.write_bytes(HELLO)
    assert main(["hash", str(p)]) == 0
    out = capsys.readouterr().out
    assert "CRC32   85114A0D" in out and "AutoV2  B94D27B993" in out
    assert main(["hash", str(p), str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert "85114A0D" in captured.out  # the readable file is still reported
    assert captured.err.strip() == f"sdtool: {tmp_path / 'nope'}: no such file"
    assert main(["hash", "-a", "md5", str(p)]) == 2


def test_cli_json_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(p))
    assert main(["hash", "--json", str(p)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "sdtool.hash/2"
    records = doc["files"]
    assert len(records) == 1
    rec = records[0]
    assert set(rec) == {"path", "size", "safetensors", "hashes", "notes"}
    assert rec["safetensors"] is True and rec["size"] == p.stat().st_size
    assert list(rec["hashes"]) == list(ALGORITHMS)
    assert rec["hashes"] == _reference(p.read_bytes(), safetensors=True)


def test_hash_does_not_import_torch(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(p))
    code = (
        "import sys; from sdtool.cli.main import main; rc = main(['hash', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(p)], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "AutoV3" in proc.stdout
