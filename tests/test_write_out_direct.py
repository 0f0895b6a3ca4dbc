"""The O_DIRECT paths of the safetensors writer (cast pieces' whole blocks go to disk from
their buffers) and of the .ckpt writer (a DirectWriter): the file is byte for byte the plain
path's, a filesystem that refuses O_DIRECT (at open or at a write) gets plain writes, and a
full disk is still one clean error."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdtool import dtypes, open_model
from sdtool.errors import OutputError
from sdtool.write import OutTensor, stream, torchfile, write_model
from sdtool.write import direct as direct_mod
from sdtool.write import safetensors as st
from sdtool.write.atomic import TEMP_SUFFIX

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")

REAL_PWRITE = os.pwrite


def _source(tmp_path: Path) -> Path:
    """Tensors of odd sizes, so pieces start and end inside blocks; an int tensor is copied."""
    rng = np.random.default_rng(3)
    sizes = [1, 7, 1000, 4099, 16384, 33333, 70001, 2048, 5]
    tensors = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
    tensors["ids"] = np.arange(77, dtype=np.int64)
    p = tmp_path / "src.safetensors"
    save_file(tensors, str(p), metadata={"format": "pt"})
    return p


def _convert(src: Path, out: Path, code: str) -> None:
    dt = dtypes.from_code(code)
    with open_model(src) as m:
        plan = [
            OutTensor(n, m, i, dt if i.dtype.is_float else i.dtype) for n, i in m.tensors.items()
        ]
        write_model(plan, out, metadata={"format": "pt"})


def _takes_direct(folder: Path) -> bool:
    """Whether the filesystem of ``folder`` opens a file for O_DIRECT writes."""
    fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        d = direct_mod.reopen_direct(fd)
    finally:
        os.close(fd)
    if d is not None:
        os.close(d)
    return d is not None


def _spy(monkeypatch: pytest.MonkeyPatch, fail: int | None = None) -> dict[str, Any]:
    """Record the O_DIRECT descriptors and their writes; with ``fail``, they raise that errno."""
    seen: dict[str, Any] = {"fds": set(), "direct": 0, "bytes": 0}
    real_reopen = direct_mod.reopen_direct

    def reopen(fd: int) -> int | None:
        d = real_reopen(fd)
        if d is not None:
            seen["fds"].add(d)
        return d

    def pwrite(fd: int, data: Any, at: int) -> int:
        if fd in seen["fds"]:
            assert at % direct_mod.ALIGN == 0 and len(memoryview(data)) % direct_mod.ALIGN == 0
            if fail is not None:
                raise OSError(fail, os.strerror(fail))
            seen["direct"] += 1
            seen["bytes"] += len(memoryview(data))
        return REAL_PWRITE(fd, data, at)

    monkeypatch.setattr(st, "reopen_direct", reopen)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(st, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 64 * 1024)  # several pieces per large tensor
    return seen


def _plain(tmp_path: Path, src: Path, code: str, monkeypatch: pytest.MonkeyPatch) -> bytes:
    with monkeypatch.context() as mp:
        mp.setattr(st, "DIRECT_MIN_BYTES", 1 << 62)
        mp.setattr(stream, "CHUNK_BYTES", 64 * 1024)
        ref = tmp_path / f"plain-{code}.safetensors"
        _convert(src, ref, code)
    return ref.read_bytes()


@pytest.mark.parametrize("code", ["F16", "BF16", "F8_E4M3", "F32"])  # F32: bytes kept as they are
def test_direct_bytes_equal_the_plain_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    src = _source(tmp_path)
    want = _plain(tmp_path, src, code, monkeypatch)
    seen = _spy(monkeypatch)
    out = tmp_path / f"direct-{code}.safetensors"
    _convert(src, out, code)
    assert out.read_bytes() == want
    if _takes_direct(tmp_path):  # most bytes went straight to disk
        assert seen["direct"] > 0 and seen["bytes"] > len(want) // 2


@pytest.mark.parametrize("where", ["open", "write"])
def test_refused_o_direct_falls_back_to_plain_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    src = _source(tmp_path)
    want = _plain(tmp_path, src, "F16", monkeypatch)
    if where == "open":  # as tmpfs or a FUSE filesystem answers the O_DIRECT open
        _spy(monkeypatch)
        real_open = os.open

        def refuse(path: Any, flags: int, *a: Any) -> int:
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *a)

        monkeypatch.setattr(direct_mod.os, "open", refuse)
    else:
        _spy(monkeypatch, fail=errno.EINVAL)
    out = tmp_path / "o.safetensors"
    _convert(src, out, "F16")
    assert out.read_bytes() == want


def test_full_disk_on_a_direct_write_is_one_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _source(tmp_path)
    seen = _spy(monkeypatch, fail=errno.ENOSPC)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if not _takes_direct(tmp_path):
        pytest.skip("the tmp folder's filesystem refuses O_DIRECT")
    with pytest.raises(OutputError, match="disk is full"):
        _convert(src, out_dir / "o.safetensors", "F16")
    assert seen["fds"] and list(out_dir.iterdir()) == []
    assert not [p for p in out_dir.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _ckpt_plain(tmp_path: Path, src: Path, code: str, monkeypatch: pytest.MonkeyPatch) -> bytes:
    with monkeypatch.context() as mp:
        mp.setattr(torchfile, "DIRECT_MIN_BYTES", 1 << 62)
        ref = tmp_path / f"plain-{code}.ckpt"
        _convert(src, ref, code)
    return ref.read_bytes()


def _ckpt_spy(monkeypatch: pytest.MonkeyPatch, fail: int | None = None) -> dict[str, int]:
    """Count the .ckpt writer's O_DIRECT writes; with ``fail``, the first raises that errno."""
    seen = {"direct": 0}

    def pwrite(fd: int, data: Any, at: int) -> int:
        if _is_direct(fd):
            seen["direct"] += 1
            if fail is not None and seen["direct"] == 1:
                raise OSError(fail, os.strerror(fail))
        return REAL_PWRITE(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(torchfile, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(direct_mod, "CHUNK", 4 * direct_mod.ALIGN)  # many writes, a short tail
    monkeypatch.setattr(stream, "CHUNK_BYTES", 64 * 1024)
    return seen


@pytest.mark.parametrize("code", ["F16", "BF16", "F8_E4M3", "F32"])
def test_ckpt_direct_bytes_equal_the_plain_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    """F32: every tensor is a copy span (read, CRC, write) into the O_DIRECT writer."""
    src = _source(tmp_path)
    want = _ckpt_plain(tmp_path, src, code, monkeypatch)
    seen = _ckpt_spy(monkeypatch)
    out = tmp_path / f"direct-{code}.ckpt"
    _convert(src, out, code)
    assert out.read_bytes() == want
    if _takes_direct(tmp_path):
        assert seen["direct"] > len(want) // (4 * direct_mod.ALIGN) - 2


def test_ckpt_refused_o_direct_falls_back_to_plain_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _source(tmp_path)
    want = _ckpt_plain(tmp_path, src, "F16", monkeypatch)
    _ckpt_spy(monkeypatch, fail=errno.EINVAL)
    out = tmp_path / "o.ckpt"
    _convert(src, out, "F16")
    assert out.read_bytes() == want


def test_ckpt_full_disk_on_a_direct_write_is_one_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _takes_direct(tmp_path):
        pytest.skip("the tmp folder's filesystem refuses O_DIRECT")
    src = _source(tmp_path)
    seen = _ckpt_spy(monkeypatch, fail=errno.ENOSPC)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(OutputError, match="disk is full"):
        _convert(src, out_dir / "o.ckpt", "F16")
    assert seen["direct"] >= 1 and list(out_dir.iterdir()) == []
