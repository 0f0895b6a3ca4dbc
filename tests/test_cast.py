"""Casts equal torch's ``.to(dtype)`` bit for bit: every 8/16-bit pattern, random and special
32/64-bit patterns (NaN payloads, infinities, subnormals, overflow, double-rounding cases)."""

from __future__ import annotations

import numpy as np
import pytest

from sdtool import dtypes
from sdtool.errors import UnsupportedDtype
from sdtool.vocab import CASTABLE
from sdtool.write import cast as cast_mod
from sdtool.write.cast import cast

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True, params=["numpy", "torch"])
def backend(request: pytest.FixtureRequest) -> object:
    """Every test runs on both paths: sdtool's numpy casts and torch's kernels (use_torch)."""
    if request.param == "torch":
        assert cast_mod.use_torch()
    yield request.param
    cast_mod.use_numpy()


#: torch's x86 vector kernels fix NaN bits; its scalar fallback canonicalises a few differently
VECTOR_NAN = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
UINT = {1: (np.uint8, torch.uint8), 2: (np.uint16, torch.uint16), 4: (np.uint32, torch.uint32),
        8: (np.uint64, torch.uint64)}  # fmt: skip


def _patterns(code: str) -> np.ndarray:
    """Bit patterns (unsigned ints) covering the source dtype."""
    size = dtypes.from_code(code).itemsize
    if size <= 2:
        return np.arange(2 ** (8 * size), dtype=np.uint32).astype(UINT[size][0])
    rng = np.random.default_rng(1234)
    if size == 4:
        special = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001,
                   0xFF815466, 0x7FFFFFFF, 0x00000001, 0x807FFFFF, 0x33800000, 0x33000001,
                   0x477FE000, 0x477FF000, 0x43E00000, 0x43E7FFFF, 0x43E80000, 0x7F7FFFFF,
                   0x47600000, 0x37800000, 0x3B800000, 0x3B7FFFFF]  # fmt: skip
        rand = rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
        return np.concatenate([np.array(special, np.uint32), rand])
    vals = np.concatenate(
        [
            rng.standard_normal(200_000) * np.exp(rng.uniform(-40, 15, 200_000)),
            [1 + 2**-11 + 2**-40, 1 + 2**-8 + 2**-40, 1 + 2**-4 + 2**-40, 448 + 16 - 2**-30,
             464.0, 65520 - 2**-20, 1e300, -1e300, 2**-25 + 2**-60, 5e-324, np.inf, -np.inf],
        ]
    )  # fmt: skip
    nans = np.array(
        [0x7FF0000000000001, 0x7FF8000000000000, 0xFFF8000000000000, 0x7FF8123456789ABC,
         0xFFF0000020000000, 0xFFFFFFFFFFFFFFFF], np.uint64,
    )  # fmt: skip
    return np.concatenate([vals.view(np.uint64), nans])


def _torch_cast(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    sd, dd = dtypes.from_code(src), dtypes.from_code(dst)
    t = torch.from_numpy(bits.copy()).view(UINT[sd.itemsize][1]).view(getattr(torch, sd.torch))
    out = t.to(getattr(torch, dd.torch))
    return out.view(UINT[dd.itemsize][1]).numpy().view(UINT[dd.itemsize][0])


PAIRS = [(s, d) for s in sorted(CASTABLE) for d in sorted(CASTABLE) if s != d]


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_cast_equals_torch(src: str, dst: str) -> None:
    sd, dd = dtypes.from_code(src), dtypes.from_code(dst)
    bits = _patterns(src)
    want = _torch_cast(bits, src, dst)
    got_arr, overflow = cast(bits.view(sd.numpy), sd, dd)
    got = got_arr.view(UINT[dd.itemsize][0])
    buf = np.full(bits.size * dd.itemsize + 7, 0xAB, np.uint8)  # a reused buffer: same bits
    into, overflow_into = cast(bits.view(sd.numpy), sd, dd, out=buf)
    assert np.array_equal(into.view(UINT[dd.itemsize][0]), got) and overflow_into == overflow
    with np.errstate(all="ignore"):
        src_f = bits.view(sd.numpy).astype(np.float64)
        want_f = want.view(dd.numpy).astype(np.float64)
        got_f = got_arr.astype(np.float64)
    nan = np.isnan(src_f)
    # NaN stays NaN everywhere; exact NaN bits where torch uses its vector kernels
    assert np.array_equal(np.isnan(got_f), np.isnan(want_f))
    if VECTOR_NAN:
        assert np.array_equal(got, want), [
            (hex(b), hex(g), hex(w)) for b, g, w in zip(bits, got, want, strict=True) if g != w
        ][:5]
    else:
        assert np.array_equal(got[~nan], want[~nan])
    # overflow: finite in, inf (or e4m3's saturated 448) out
    if dd.code == "F8_E4M3":
        expect = int(
            np.count_nonzero(np.isfinite(src_f) & (np.abs(src_f) > 464))
        )  # 464 ties to 448
    else:
        expect = int(np.count_nonzero(np.isfinite(src_f) & np.isinf(want_f)))
    assert overflow == expect


def test_overflow_counted_fp16() -> None:
    f32 = dtypes.from_code("F32")
    vals = np.array([1.0, 70000.0, -1e10, np.inf, np.nan, 65504.0], np.float32)
    out, overflow = cast(vals, f32, dtypes.from_code("F16"))
    assert overflow == 2
    assert out.dtype == np.float16 and np.isinf(out[1]) and out[5] == 65504


def test_integer_cast_refused() -> None:
    with pytest.raises(UnsupportedDtype):
        cast(np.zeros(2, np.int64), dtypes.from_code("I64"), dtypes.from_code("F16"))


def test_torch_path_taken_for_safe_pieces_only(backend: str) -> None:
    """With torch on, a finite in-range piece is converted by torch's kernel (same bits as
    .to()); a piece with NaN or an overflow goes the numpy way, which counts the overflow."""
    f32, f16 = dtypes.from_code("F32"), dtypes.from_code("F16")
    rng = np.random.default_rng(5)
    vals = (rng.standard_normal(100_003) * 0.02).astype(np.float32)
    vals[::997] = np.float32(3e-6)  # float16 subnormals
    want = torch.from_numpy(vals).half().numpy().view(np.uint16)
    got, over = cast(vals, f32, f16)
    assert np.array_equal(got.view(np.uint16), want) and over == 0
    via_torch = cast_mod._cast_torch(vals, f32, f16, None) if backend == "torch" else None
    if backend == "torch":
        assert via_torch is not None and np.array_equal(via_torch[0].view(np.uint16), want)
        big = vals.copy()
        big[7] = np.float32(1e6)
        assert cast_mod._cast_torch(big, f32, f16, None) is None
        got, over = cast(big, f32, f16)
        assert over == 1 and got.view(np.uint16)[7] == 0x7C00
