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


#: float8 code -> torch dtype, largest finite value's float32 bits, where overflow starts
FP8 = {
    "F8_E4M3": ("float8_e4m3fn", 0x43E00000, 464.0),  # saturates to +-448
    "F8_E5M2": ("float8_e5m2", 0x47600000, 61440.0),  # rounds to +-inf
}


def _torch_f8(bits: np.ndarray, code: str) -> np.ndarray:
    t = torch.from_numpy(bits.view(np.float32).copy()).to(getattr(torch, FP8[code][0]))
    return t.view(torch.uint8).numpy()


@pytest.mark.parametrize("code", sorted(FP8))
def test_fp8_fast_path_equals_torch(code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 -> float8 through the fast kernel: every exponent up to the largest finite
    value's with the mantissas where rounding to 2 or 3 bits can go wrong, both signs; no
    block falls back."""
    rng = np.random.default_rng(17)
    exps = np.arange(144, dtype=np.uint32) << 23
    low = [0, 1, 0x7FFFF, 0x80000, 0x80001, 0xFFFFF, 0x100000, 0x100001, 0x180000, 0x1FFFFF,
           0x200000, 0x200001, 0x300000, 0x700000, 0x7FFFFF]  # fmt: skip
    mants = np.concatenate([np.array(low, np.uint32), rng.integers(0, 2**23, 3000, np.uint32)])
    bits = (exps[:, None] | mants[None, :]).reshape(-1)
    bits = bits[bits <= FP8[code][1]]
    bits = np.concatenate([bits, bits | np.uint32(0x80000000)])
    rng.shuffle(bits)
    used: list[bool] = []
    real = cast_mod._FAST[("F32", code)]

    def spy(*args: np.ndarray) -> bool:
        used.append(real(*args))
        return used[-1]

    monkeypatch.setitem(cast_mod._FAST, ("F32", code), spy)
    got, overflow = cast(bits.view(np.float32), F32, dtypes.from_code(code))
    assert used and all(used) and overflow == 0
    g, want = got.view(np.uint8), _torch_f8(bits, code)
    bad = np.flatnonzero(g != want)
    assert bad.size == 0, [(hex(bits[i]), hex(g[i]), hex(want[i])) for i in bad[:5]]


@pytest.mark.parametrize("code", sorted(FP8))
@pytest.mark.parametrize("block", [1, 7, 4096])
def test_fp8_blocks_mixing_fast_and_exact(
    block: int, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks with NaN, inf or values past the largest take the exact path; the rest the fast
    one; together torch's bits (NaN aside: torch's NaN bits are the format's, sign kept) and
    the count of finite values that overflowed."""
    monkeypatch.setattr(cast_mod, "FAST_BLOCK", block)
    rng = np.random.default_rng(19)
    vals = (rng.standard_normal(50_000) * np.exp(rng.uniform(-18, 12, 50_000))).astype(np.float32)
    vals[::997] = np.nan
    vals[5::1231] = np.float32(np.inf)
    vals[11::883] = np.float32(-1.1 * FP8[code][2])
    buf = np.full(vals.size + 3, 0xCD, np.uint8)
    got, overflow = cast(vals, F32, dtypes.from_code(code), out=buf)
    g, want = got.view(np.uint8), _torch_f8(vals.view(np.uint32), code)
    nan = np.isnan(vals)
    assert np.array_equal(g[~nan], want[~nan])
    assert np.all(np.isnan(torch.from_numpy(g[nan].copy()).view(getattr(torch, FP8[code][0]))
                           .float().numpy()))  # fmt: skip
    assert overflow == int(np.count_nonzero(np.isfinite(vals) & (np.abs(vals) >= FP8[code][2])))


@pytest.mark.parametrize(
    ("src", "dst"), [("BF16", "F16"), ("BF16", "F8_E4M3"), ("BF16", "F8_E5M2"),
                     ("F16", "F8_E4M3"), ("F16", "F8_E5M2")],
)  # fmt: skip
@pytest.mark.parametrize("block", [7, 4096, 1 << 18])
def test_16_bit_sources_widened_equal_torch(
    src: str, dst: str, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 and fp16 sources go through float32 block by block: every source pattern,
    shuffled (so small blocks mix NaN-free in-range ones, the fast kernels, with others, the
    exact path), and every finite one under 400, against torch's own src -> dst; overflow
    counts too. The finite sample must take the kernels on every block (else this fails)."""
    monkeypatch.setattr(cast_mod, "FAST_BLOCK", block)
    s, d = dtypes.from_code(src), dtypes.from_code(dst)
    kernel, fast_blocks = cast_mod._FAST[("F32", dst)], []

    def counted(*args: np.ndarray) -> bool:
        done = kernel(*args)
        fast_blocks.append(done)
        return done

    monkeypatch.setitem(cast_mod._FAST, ("F32", dst), counted)
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    np.random.default_rng(10).shuffle(bits)
    with np.errstate(all="ignore"):
        wide = bits.view(s.numpy).astype(np.float64)
    small = np.abs(wide) < 400
    for sample, src_f in ((bits, wide), (bits[small], wide[small])):
        fast_blocks.clear()
        want = torch.from_numpy(sample.copy()).view(getattr(torch, s.torch))
        want = want.to(getattr(torch, d.torch))
        want_bits = want.view(torch.uint16 if d.itemsize == 2 else torch.uint8).numpy()
        got, overflow = cast(sample.view(s.numpy), s, d)
        g = got.view(want_bits.dtype)
        bad = np.flatnonzero(g != want_bits)
        assert bad.size == 0, [(hex(sample[i]), hex(g[i]), hex(want_bits[i])) for i in bad[:5]]
        if src_f is not wide:  # no NaN, nothing out of range: every block took the kernel
            assert fast_blocks and all(fast_blocks)
        if dst == "F8_E4M3":  # saturates: overflow is what lies past 464 (ties to 448)
            expect = np.isfinite(src_f) & (np.abs(src_f) > 464)
        else:
            expect = np.isfinite(src_f) & ~np.isfinite(want.float().numpy())
        assert overflow == int(np.count_nonzero(expect))


@pytest.mark.parametrize("dst", ["F8_E4M3", "F8_E5M2"])
def test_fp16_subnormals_with_denormals_as_zero(dst: str) -> None:
    """A thread that reads denormals as zero (torch.set_flush_denormal(True) sets MXCSR.DAZ)
    still casts float16's subnormals as torch does: the widening multiply would flush them
    (e5m2 keeps many of them), so such blocks take numpy's integer conversion."""
    f16, d = dtypes.from_code("F16"), dtypes.from_code(dst)
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    sub = bits[(bits & 0x7C00) == 0]  # zeros and subnormals, both signs
    want = torch.from_numpy(sub.copy()).view(torch.float16).to(getattr(torch, d.torch))
    want_bits = want.view(torch.uint8).numpy()
    assert torch.set_flush_denormal(True)
    try:
        got = cast(sub.view(np.float16), f16, d)[0].view(np.uint8)
    finally:
        torch.set_flush_denormal(False)
    assert np.array_equal(got, want_bits)


@pytest.mark.parametrize("src", ["F16", "BF16"])
def test_16_bit_to_f32_is_the_shared_widening(src: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16/bf16 -> fp32 (``convert --dtype fp32`` of a half model) is the vectorised widening,
    into the caller's buffer, with torch's bits on every pattern (test_cast checks them too)."""
    s = dtypes.from_code(src)
    calls: list[int] = []
    conv = cast_mod.TO_F32[src]

    def counted(raw: np.ndarray, out: np.ndarray) -> object:
        calls.append(raw.size)
        return conv(raw, out)

    monkeypatch.setitem(cast_mod.TO_F32, src, counted)
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    buf = np.zeros(bits.size * 4 + 3, np.uint8)
    got, overflow = cast(bits.view(s.numpy), s, F32, out=buf)
    want = torch.from_numpy(bits.copy()).view(getattr(torch, s.torch)).float().numpy()
    assert calls == [bits.size] and overflow == 0 and np.shares_memory(got, buf)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
