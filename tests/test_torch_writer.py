"""The .ckpt writer: torch's zip layout emitted without torch, streamed; torch.load reads it bit
for bit; non-tensor fields and metadata survive; zip64; deterministic; a full disk is one line."""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sdtool import open_model
from sdtool.ops.convert import convert
from sdtool.write import torchfile as writer

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _bits(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "w": base,
        "t": base.t(),  # strided: written contiguous
        "h": torch.randn(6, generator=g).half(),
        "bf": torch.randn(3, 3, generator=g).bfloat16(),
        "pos": torch.arange(77)[None],
        "flag": torch.tensor([True, False]),
        "u16": torch.tensor([1, 2, 65535], dtype=torch.int32).to(torch.uint16),  # _v3 path
        "e4": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "fnuz": torch.zeros(3, dtype=torch.float8_e4m3fnuz),  # no legacy storage class
        "c": torch.randn(2, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def _same(got: dict, want: dict[str, torch.Tensor]) -> None:  # type: ignore[type-arg]
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert _bits(got[k]) == _bits(w), k


FIELDS = {"global_step": 1000, "epoch": 3, "hp": {"lr": 1e-4, "names": ["a"], "n": None,
          "big": 2**40, "neg": -5, "ok": True}}  # fmt: skip


def test_ckpt_to_ckpt_bit_for_bit_with_fields(tmp_path: Path) -> None:
    sd = _sd()
    torch.save({"state_dict": sd, **FIELDS}, tmp_path / "m.ckpt")
    r = convert(tmp_path / "m.ckpt", tmp_path / "o.ckpt", verify=True)
    assert r.verified and r.output_format == "torch-zip"
    got = torch.load(tmp_path / "o.ckpt", weights_only=True)
    _same(got, sd)
    assert {k: got[k] for k in FIELDS} == FIELDS  # fields go back as top-level entries
    assert list(got)[: len(sd)] == list(sd)


def test_records_and_members_as_torch_writes_them(tmp_path: Path) -> None:
    sd = {"a": torch.ones(2, 3), "b": torch.zeros(5, dtype=torch.int64)}
    torch.save(sd, tmp_path / "ref.pt")
    convert(tmp_path / "ref.pt", tmp_path / "ours.pt")
    ref = zipfile.ZipFile(tmp_path / "ref.pt")
    ours = zipfile.ZipFile(tmp_path / "ours.pt")
    rel = [n.split("/", 1)[1] for n in ref.namelist()]
    assert [n.split("/", 1)[1] for n in ours.namelist()] == rel
    for n in rel:
        if n not in ("data.pkl", ".data/serialization_id"):
            assert ours.read(f"archive/{n}") == ref.read(f"{ref.namelist()[0].split('/')[0]}/{n}")
    assert ours.testzip() is None  # every CRC right
    for info in ours.infolist():  # stored, 64-byte aligned data, as torch's writer does
        assert info.compress_type == zipfile.ZIP_STORED
        with open(tmp_path / "ours.pt", "rb") as f:
            f.seek(info.header_offset + 26)
            n, e = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        assert (info.header_offset + 30 + n + e) % 64 == 0
    assert len(ours.read("archive/.data/serialization_id")) == 40


def test_casts_and_deterministic_bytes(tmp_path: Path) -> None:
    sd = _sd()
    torch.save(sd, tmp_path / "m.pt")
    for name in ("a.ckpt", "b.ckpt"):
        convert(tmp_path / "m.pt", tmp_path / name, dtype="bf16", verify=True)
    assert (tmp_path / "a.ckpt").read_bytes() == (tmp_path / "b.ckpt").read_bytes()
    got = torch.load(tmp_path / "a.ckpt", weights_only=True)
    castable = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)
    want = {k: (v.to(torch.bfloat16) if v.dtype in castable else v) for k, v in sd.items()}
    _same(got, want)


def test_safetensors_metadata_survives_a_ckpt(tmp_path: Path) -> None:
    meta = {"ss_network_dim": "8", "ss_tag_frequency": '{"a": 1}', "modelspec.title": "x"}
    save_file({"lora_up.weight": torch.ones(4, 2)}, tmp_path / "in.safetensors", metadata=meta)
    convert(tmp_path / "in.safetensors", tmp_path / "mid.ckpt", verify=True)
    mid = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert mid[writer.METADATA_KEY] == {**meta, "format": "pt"}
    with open_model(tmp_path / "mid.ckpt") as m:
        assert m.metadata == {**meta, "format": "pt"} and list(m.tensors) == ["lora_up.weight"]
    convert(tmp_path / "mid.ckpt", tmp_path / "back.safetensors", verify=True)
    with safe_open(tmp_path / "back.safetensors", "pt") as f:
        assert f.metadata() == {**meta, "format": "pt"}


def test_fields_round_trip_through_safetensors_metadata(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2)}, **FIELDS}, tmp_path / "m.ckpt")
    convert(tmp_path / "m.ckpt", tmp_path / "m.safetensors")
    convert(tmp_path / "m.safetensors", tmp_path / "back.ckpt")
    meta = torch.load(tmp_path / "back.ckpt", weights_only=True)[writer.METADATA_KEY]
    assert {k: json.loads(meta[k]) for k in FIELDS} == FIELDS


def test_zip64_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes and offsets past 4 GiB use zip64 fields; forced here for every member."""
    monkeypatch.setattr(writer, "ZIP64_LIMIT", 0)
    sd = _sd()
    torch.save(sd, tmp_path / "m.pt")
    convert(tmp_path / "m.pt", tmp_path / "o.ckpt", verify=True)
    _same(torch.load(tmp_path / "o.ckpt", weights_only=True), sd)
    assert zipfile.ZipFile(tmp_path / "o.ckpt").testzip() is None


def test_written_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = {"w": torch.arange(6, dtype=torch.float32)}
    torch.save(sd, tmp_path / "m.pt")
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "torch", None)  # import torch -> ImportError
        convert(tmp_path / "m.pt", tmp_path / "o.pt", verify=True)
    _same(torch.load(tmp_path / "o.pt", weights_only=True), sd)


def test_torch_reads_from_a_buffer_too(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "m.pt")
    convert(tmp_path / "m.pt", tmp_path / "o.pt")
    got = torch.load(io.BytesIO((tmp_path / "o.pt").read_bytes()), weights_only=True)
    assert torch.equal(got["w"], torch.ones(3))


def _limit_fsize() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_full_disk_is_one_line_and_exit_2(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    torch.save({f"t{i}": torch.randn(256, 256, generator=g) for i in range(8)}, tmp_path / "m.pt")
    out = tmp_path / "out" / "m.ckpt"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "sdtool", "convert", str(tmp_path / "m.pt"), str(out)],
        capture_output=True, text=True, timeout=120, env=env, preexec_fn=_limit_fsize,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk is full" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_copied_tensors_checksum_piece_by_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes copied as they are go through the read-checksum-write loop in many small pieces;
    every member's CRC-32 is right (zipfile checks them) and torch reads the values."""
    from sdtool.write import stream

    monkeypatch.setattr(stream, "CRC_COPY_BYTES", 7)
    sd = _sd()
    save_file({k: v.contiguous() for k, v in sd.items() if k != "t"}, tmp_path / "m.safetensors")
    convert(tmp_path / "m.safetensors", tmp_path / "o.ckpt", verify=True)
    assert zipfile.ZipFile(tmp_path / "o.ckpt").testzip() is None
    _same(
        torch.load(tmp_path / "o.ckpt", weights_only=True),
        {k: v for k, v in sd.items() if k != "t"},
    )


def test_truncated_source_to_ckpt_leaves_nothing(tmp_path: Path) -> None:
    from sdtool.errors import TruncatedFile

    save_file({"a": torch.ones(64), "b": torch.ones(1024)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(TruncatedFile):
        convert(tmp_path / "cut.safetensors", tmp_path / "o.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors", "m.safetensors"]


_PEAK = """
import resource, sys
from sdtool.cli.main import main
rc = main(sys.argv[1:])
print(rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def _peak_kib(argv: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", _PEAK, *argv], capture_output=True, text=True, env=env, timeout=300
    )
    rc, kib = r.stdout.split()[-2:]
    assert rc == "0", r.stderr
    return int(kib)


@pytest.mark.parametrize("dtype", ["keep", "fp16"])
def test_writing_a_ckpt_streams(tmp_path: Path, dtype: str) -> None:
    """Memory is about the largest tensor, not the model: 128 MiB of 8 MiB tensors written as
    .ckpt grow the peak RSS by far less than the model over converting one small tensor (the
    same imports and code paths)."""
    import numpy as np
    from safetensors.numpy import save_file as save_np

    rng = np.random.default_rng(0)
    save_np({f"t{i}": rng.random(2 << 20, np.float32) for i in range(16)}, tmp_path / "big.st")
    save_np({"t": rng.random(16, np.float32)}, tmp_path / "small.st")
    base = _peak_kib(["convert", str(tmp_path / "small.st"), str(tmp_path / "small.ckpt"),
                      "--dtype", dtype, "-q"])  # fmt: skip
    big = _peak_kib(["convert", str(tmp_path / "big.st"), str(tmp_path / "big.ckpt"),
                     "--dtype", dtype, "-q"])  # fmt: skip
    assert (tmp_path / "big.ckpt").stat().st_size > (64 if dtype == "fp16" else 128) << 20
    assert big - base < 48 << 10, (base, big)  # KiB: under 6 tensors' worth, 128 MiB of model
