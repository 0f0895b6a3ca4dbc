"""The safetensors writer's pipeline: pieces are cast on at most CAST_THREADS threads at once,
and a piece waiting for the disk does not hold a cast thread (the next pieces are cast while
earlier ones are written)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdtool import dtypes, open_model
from sdtool.write import OutTensor, stream, write_model
from sdtool.write import safetensors as st

WAIT = 20.0  # seconds: a failing run ends here instead of hanging


def _convert(src: Path, out: Path) -> None:
    f16 = dtypes.from_code("F16")
    with open_model(src) as m:
        write_model([OutTensor(n, m, i, f16) for n, i in m.tensors.items()], out)


def test_casts_go_on_while_earlier_pieces_are_written(tmp_path: Path, monkeypatch: Any) -> None:
    """The first CAST_THREADS pieces' writes wait until a later piece has been cast: with cast
    threads that also write their pieces, nothing would be left to cast it (the test fails at
    WAIT). The output is still numpy's cast, byte for byte."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", 64 * 1024)  # 16 Ki fp32 values a piece
    values = np.random.default_rng(5).standard_normal(16 * 1024 * 12).astype(np.float32)
    src = tmp_path / "src.safetensors"
    save_file({"w": values}, str(src))

    held = stream.CAST_THREADS
    later_cast = threading.Event()
    lock = threading.Lock()
    casting, most, casts, writes = [0], [0], [0], [0]
    real_cast, real_write = stream.cast, st._Out.write

    def cast(*a: Any, **k: Any) -> Any:
        with lock:
            casting[0] += 1
            most[0] = max(most[0], casting[0])
        try:
            return real_cast(*a, **k)
        finally:
            with lock:
                casting[0] -= 1
                casts[0] += 1
                if casts[0] > held:
                    later_cast.set()

    def write(self: Any, data: Any, at: int) -> int:
        with lock:
            writes[0] += 1
            first = writes[0] <= held
        if first:
            assert later_cast.wait(WAIT), "no piece was cast while the first ones were written"
        return real_write(self, data, at)

    monkeypatch.setattr(stream, "cast", cast)
    monkeypatch.setattr(st._Out, "write", write)
    out = tmp_path / "out.safetensors"
    _convert(src, out)
    assert casts[0] == 12
    assert 1 <= most[0] <= stream.CAST_THREADS
    assert load_file(str(out))["w"].tobytes() == values.astype(np.float16).tobytes()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_pieces_of_different_tensors_are_cast_at_once(
    tmp_path: Path, monkeypatch: Any, suffix: str
) -> None:
    """Two casts meet at a barrier, so the write fails unless two pieces are cast at the same
    time; every tensor here is one piece, so they belong to different tensors (the .ckpt
    writer cast on one thread, tensor by tensor, before). Values come back bit for bit."""
    rng = np.random.default_rng(9)
    tensors = {f"t{i}": rng.standard_normal(1000 + i).astype(np.float32) for i in range(6)}
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))
    barrier = threading.Barrier(2, timeout=WAIT)
    met = [0]
    real_cast = stream.cast

    def cast(*a: Any, **k: Any) -> Any:
        if met[0] < 2:
            met[0] += 1
            barrier.wait()  # BrokenBarrierError after WAIT when no second cast comes
        return real_cast(*a, **k)

    monkeypatch.setattr(stream, "cast", cast)
    out = tmp_path / f"out{suffix}"
    _convert(src, out)
    with open_model(out) as m:
        for name, v in tensors.items():
            assert m.read(name).tobytes() == v.astype(np.float16).tobytes()
