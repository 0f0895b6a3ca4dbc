"""The blocked float32 -> float16 fast path equals torch bit for bit: every exponent with
random, tie and boundary mantissas, both signs, and blocks mixing fast and exact handling."""

from __future__ import annotations

import numpy as np
import pytest

from sdtool import dtypes
from sdtool.write import cast as cast_mod
from sdtool.write.cast import cast

torch = pytest.importorskip("torch")
F32, F16 = dtypes.from_code("F32"), dtypes.from_code("F16")


def _torch_f16(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(bits.view(np.float32).copy()).half().numpy().view(np.uint16)


def _in_range_patterns() -> np.ndarray:
    """float32 bit patterns with |x| < 65504: every exponent 0..142 with the mantissas where
    rounding can go wrong (ties, just above and below them, all ones, zero) and random ones."""
    rng = np.random.default_rng(7)
    exps = np.arange(143, dtype=np.uint32) << 23
    low = [0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FF000, 0x7FEFFF, 0x7FFFFF]
    mants = np.concatenate([np.array(low, np.uint32), rng.integers(0, 2**23, 3000, np.uint32)])
    bits = (exps[:, None] | mants[None, :]).reshape(-1)
    bits = np.concatenate([bits, [0x477FDFFF, 0x477FE000]]).astype(np.uint32)  # 65503.99, 65504
    bits = bits[bits.view(np.float32) < 65504]
    return np.concatenate([bits, bits | np.uint32(0x80000000)])


def test_fast_path_equals_torch() -> None:
    bits = _in_range_patterns()
    rng = np.random.default_rng(8)
    rng.shuffle(bits)
    got, overflow = cast(bits.view(np.float32), F32, F16)
    assert overflow == 0
    want = _torch_f16(bits)
    g = got.view(np.uint16)
    bad = np.flatnonzero(g != want)
    assert bad.size == 0, [(hex(bits[i]), hex(g[i]), hex(want[i])) for i in bad[:5]]


@pytest.mark.parametrize("block", [1, 7, 4096])
def test_blocks_mixing_fast_and_exact(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cast_mod, "FAST_BLOCK", block)
    rng = np.random.default_rng(9)
    vals = (rng.standard_normal(50_000) * np.exp(rng.uniform(-20, 12, 50_000))).astype(np.float32)
    vals[::997] = np.nan
    vals[5::1231] = np.float32(np.inf)
    vals[11::883] = np.float32(-7e4)
    bits = vals.view(np.uint32)
    buf = np.full(vals.nbytes + 3, 0xCD, np.uint8)
    got, overflow = cast(vals, F32, F16, out=buf)
    assert np.array_equal(got.view(np.uint16), _torch_f16(bits))
    assert overflow == int(np.count_nonzero(np.isfinite(vals) & (np.abs(vals) >= 65520)))
    assert cast(vals[:0], F32, F16)[0].size == 0
