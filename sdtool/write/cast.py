"""Floating-point casts that give the same bits as torch's ``tensor.to(dtype)`` on CPU.

numpy and ml_dtypes round finite values to nearest-even exactly as torch does, but they differ
from torch (2.x, x86 vector kernels) in three places, each measured against torch and pinned by
tests/test_cast.py:

- torch converts float64 to the narrow formats through float32 (double rounding): so do we.
- float8_e4m3fn has no infinity: torch saturates overflow and +-inf to +-448, where ml_dtypes
  gives NaN.
- NaN bits: torch's vector kernels quiet NaNs and keep payload bits the hardware way (F16C for
  half, shifts for bfloat16), turn float32 NaNs into bfloat16 ``0xFFFF``, and so on; numpy keeps
  signalling NaNs and ml_dtypes canonicalises. The tables below give torch's bits. (torch's
  scalar fallback, ATEN_CPU_CAPABILITY=default or non-x86 builds, gives canonical NaNs instead
  in a few pairs; NaN stays NaN either way.)

Every cast goes float -> float32 -> target, which is how torch's kernels treat NaN too.

With ``SDTOOL_CAST_KERNELS=torch``, when torch is installed and a write casts at least
``TORCH_CAST_MIN_BYTES``, the writer calls ``use_torch()`` and casts go through torch's own
conversion kernels (F16C/AVX2 vectorised, about
seven times numpy's speed here): its bits are torch's by definition. Importing torch costs about a
second, so small writes keep the numpy path; a piece that may overflow or holds NaN takes the
numpy path either way, which counts the overflow.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from sdtool.dtypes import DType, from_code
from sdtool.errors import UnsupportedDtype
from sdtool.vocab import CASTABLE

U8, U16, U32, U64 = np.uint8, np.uint16, np.uint32, np.uint64

#: code -> (unsigned view dtype, exponent mask): all-ones exponent = inf or NaN.
_NONFINITE: dict[str, tuple[type[np.unsignedinteger], int]] = {
    "F64": (U64, 0x7FF0000000000000),
    "F32": (U32, 0x7F800000),
    "F16": (U16, 0x7C00),
    "BF16": (U16, 0x7F80),
    "F8_E5M2": (U8, 0x7C),
    "F8_E4M3": (U8, 0x7F),  # only S.1111.111 is NaN; there is no infinity
}


def _f16_nan_to_f32(b: np.ndarray) -> np.ndarray:
    b = b.astype(U32)
    return ((b & 0x8000) << 16) | 0x7FC00000 | ((b & 0x3FF) << 13)


#: NaN bits of the source (as unsigned ints) -> the float32 NaN bits torch makes of them.
_NAN_TO_F32: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F64": lambda b: (((b >> 32) & 0x80000000) | 0x7FC00000 | ((b & 0xFFFFFFFFFFFFF) >> 29)).astype(
        U32
    ),
    "F32": lambda b: b.astype(U32),
    "F16": _f16_nan_to_f32,
    "BF16": lambda b: b.astype(U32) << 16,
    "F8_E5M2": lambda b: _f16_nan_to_f32(b.astype(U16) << 8),
    "F8_E4M3": lambda b: ((b.astype(U32) & 0x80) << 24) | 0x7FF00000,
}

#: (float32 NaN bits, source code) -> the target's NaN bits.
_NAN_FROM_F32: dict[str, Callable[[np.ndarray, str], np.ndarray]] = {
    "F64": lambda b, s: (
        ((b.astype(U64) & 0x80000000) << 32)
        | 0x7FF8000000000000
        | ((b.astype(U64) & 0x7FFFFF) << 29)
    ),
    "F32": lambda b, s: b,
    "F16": lambda b, s: (((b >> 16) & 0x8000) | 0x7E00 | ((b & 0x7FFFFF) >> 13)).astype(U16),
    "BF16": lambda b, s: np.full(b.shape, 0xFFFF if s == "F32" else 0x7FC0, U16),
    "F8_E4M3": lambda b, s: (((b >> 24) & 0x80) | 0x7F).astype(U8),
    "F8_E5M2": lambda b, s: (((b >> 24) & 0x80) | 0x7F).astype(U8),
}

E4M3_MAX_BITS = 0x7E  # 448.0


def check_cast(src: DType, dst: DType) -> None:
    """Raise UnsupportedDtype unless ``src`` -> ``dst`` is a cast sdtool makes torch-exact."""
    if src.code not in CASTABLE or dst.code not in CASTABLE:
        raise UnsupportedDtype(
            f"cannot cast {src} to {dst}: sdtool casts between {', '.join(sorted(CASTABLE))} only"
        )


#: |x| (as float32) from which a cast to the target may leave the finite range; below it,
#: for NaN-free input, no value can overflow, so the per-element checks are skipped.
_SAFE_BELOW = {
    "F64": float("inf"),
    "F32": float("inf"),  # from F64: f32 inf after the first step shows up as inf here
    "F16": 65504.0,
    "BF16": float(np.array(0x7F7F0000, U32).view(np.float32)),
    "F8_E5M2": 57344.0,
    "F8_E4M3": 448.0,
}


#: elements per block of the fast casts. Each numpy call releases and retakes the GIL, so with
#: two cast threads the block must be large enough that the hand-offs vanish beside the work:
#: at 64 Ki elements two threads cast slower than one (2.5 against 1.7 ns a value, AMD EPYC,
#: fp16); at 256 Ki (a 1 MiB block and 2 MiB of scratch per thread, in L2/L3) 1.35 ns
FAST_BLOCK = 256 * 1024
_F16_NORMAL = U32(113 << 23)  # |x| from 2**-14 (float16's smallest normal) up: f32 bits
_F16_ROUND = U32((0xFFF - (112 << 23)) & 0xFFFFFFFF)  # rounding bias + exponent rebias
_HALF_BITS = U32(0x3F000000)  # 0.5f
_F16_SAFE_BITS = U32(0x477FE000)  # 65504.0f, float16's largest finite value


def _f32_to_f16(v: np.ndarray, out: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> bool:
    """float32 -> float16 bits, round to nearest even, when every |v| < 65504 (NaN-free);
    False, writing nothing, when some value is not (the caller then casts the exact way).

    numpy's own cast is a scalar loop (~2.6 ns a value here); these whole-block integer ops
    are vectorised and about twice as fast. The range test is one integer max over |v|'s bits
    (NaN and inf bits are above any finite value's), which the conversion needs anyway. Normal
    results: add the rounding bias (0xFFF plus the lowest kept mantissa bit, for ties to even)
    and the exponent rebias to the bits, shift by 13. Below 2**-14 (float16 subnormals and
    zeros): |v| + 0.5 rounds at float16's subnormal step in the FPU's own round-to-nearest-even,
    and the low bits are the result. Bit-identical to torch and numpy on every such value
    (benchmarks/check_fast_cast.py checks all 2**32 patterns; tests/test_cast_fast.py samples
    them).
    """
    u = v.view(U32)
    np.bitwise_and(u, U32(0x7FFFFFFF), out=t1)  # |v|
    if t1.max() >= _F16_SAFE_BITS:
        return False
    np.right_shift(t1, 13, out=t2)
    np.bitwise_and(t2, U32(1), out=t2)
    np.add(t2, t1, out=t2)
    np.add(t2, _F16_ROUND, out=t2)  # wraps for |v| < 2**-14: those are redone below
    np.right_shift(t2, 13, out=t2)
    small = np.flatnonzero(t1 < _F16_NORMAL)
    np.right_shift(u, 16, out=t1)
    np.bitwise_and(t1, U32(0x8000), out=t1)
    np.bitwise_or(t2, t1, out=t2)
    if small.size:
        tiny = np.abs(v[small]) + np.float32(0.5)
        t2[small] = (tiny.view(U32) - _HALF_BITS) | t1[small]
    np.copyto(out.view(U16), t2, casting="unsafe")  # < 2**16: nothing saturates
    return True


#: a fast kernel: (float32 block, output buffer, two uint32 scratch blocks) -> done
FastCast = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], bool]


def _f32_to_fp8(mantissa: int, bias: int, largest: float) -> FastCast:
    """A float32 -> float8 kernel (e4m3fn: 3 mantissa bits, bias 7, largest 448; e5m2: 2, 15,
    57344): float8 bits, round to nearest even, when every |v| <= ``largest`` (NaN-free);
    False, writing nothing, otherwise (the caller then casts the exact way).

    ml_dtypes' cast is a scalar loop (~5.4 ns a value on an AVX2 core, 3.6 with this); the
    method is ``_f32_to_f16``'s at float8's widths: normal results by integer rounding of the
    bits and a shift; below float8's smallest normal, ``|v| + 2**k`` (k chosen so that its
    float32 step is float8's subnormal step) rounds in the FPU, and a result of a whole
    normal's steps is the smallest normal. Subnormals are common in weights at these widths
    (|x| < 0.0156 for e4m3fn), so both results are computed for the whole block and selected
    without branches. Bit-identical to torch on every such value
    (benchmarks/check_fast_cast.py --fp8 checks all 2**32 patterns; tests/test_cast_fast.py
    samples them)."""
    shift = 23 - mantissa
    normal = U32((128 - bias) << 23)  # |x| from float8's smallest normal up: f32 bits
    # the rounding bias (half a float8 step less one) and the exponent rebias, in one add
    rounding = U32(((1 << (shift - 1)) - 1 - ((127 - bias) << 23)) & 0xFFFFFFFF)
    step_exp = 23 + 1 - bias - mantissa  # 2**step_exp's float32 step is the subnormal step
    magic, magic_bits = np.float32(2.0**step_exp), U32((127 + step_exp) << 23)
    safe = U32(int(np.array(largest, np.float32).view(U32)))

    def kernel(v: np.ndarray, out: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> bool:
        n = v.size
        np.bitwise_and(v.view(U32), U32(0x7FFFFFFF), out=t1)  # |v|
        if t1.max() > safe:
            return False
        small = np.less(t1, normal)
        np.right_shift(t1, shift, out=t2)
        np.bitwise_and(t2, U32(1), out=t2)
        np.add(t2, t1, out=t2)
        np.add(t2, rounding, out=t2)  # wraps for small |v|: those are replaced below
        np.right_shift(t2, shift, out=t2)
        o8 = out.view(U8)[:n]
        np.copyto(o8, t2, casting="unsafe")  # the normal results (< 2**8 when normal)
        np.add(t1.view(np.float32), magic, out=t2.view(np.float32))
        np.subtract(t2, magic_bits, out=t2)  # the subnormal results (< 2**8 when small)
        s8 = t1.view(U8)[:n]  # |v| is not needed any more
        np.copyto(s8, t2, casting="unsafe")
        m8 = small.view(U8)
        np.negative(m8, out=m8)  # 0xFF where small, 0 elsewhere
        np.bitwise_xor(s8, o8, out=s8)
        np.bitwise_and(s8, m8, out=s8)
        np.bitwise_xor(o8, s8, out=o8)  # o8 = small ? subnormal : normal
        np.bitwise_and(v.view(U8)[3::4], U8(0x80), out=s8)  # the sign, float32's top byte
        np.bitwise_or(o8, s8, out=o8)
        return True

    return kernel


_f32_to_e4m3 = _f32_to_fp8(mantissa=3, bias=7, largest=448.0)
_f32_to_e5m2 = _f32_to_fp8(mantissa=2, bias=15, largest=57344.0)


#: (src, dst) -> a faster exact cast of a float32 block, or False when the block holds a value
#: it does not handle (NaN, inf, or one that may round out of range)
_FAST: dict[tuple[str, str], FastCast] = {
    ("F32", "F16"): _f32_to_f16,
    ("F32", "F8_E4M3"): _f32_to_e4m3,
    ("F32", "F8_E5M2"): _f32_to_e5m2,
}


_F32_SAFE = 3.4e38  # float64 values below this stay finite in float32 (its max: 3.4028235e38)
#: a write casting at least this many source bytes imports torch for its kernels (when installed
#: and chosen: write._choose_cast_kernels)
TORCH_CAST_MIN_BYTES = 1 << 30
DEFAULT_KERNELS = "numpy"
_torch: Any = None
_torch_lock = threading.Lock()


def use_torch() -> bool:
    """Cast through torch's kernels from now on, if torch is installed; True when it is.

    Imports torch (about a second). torch warns when it wraps a read-only array (our mapped
    source bytes, which it only reads); that one warning is silenced.
    """
    global _torch
    with _torch_lock:
        if _torch is None:
            try:
                import torch
            except ImportError:
                return False
            warnings.filterwarnings(
                "ignore", message="The given NumPy array is not writable", category=UserWarning
            )
            _torch = torch
    return True


def use_numpy() -> None:
    """Back to the numpy casts (tests compare the two paths)."""
    global _torch
    _torch = None


def _as_torch(arr: np.ndarray, dt: DType) -> Any:
    """A torch view of the 1-D array ``arr`` (no copy); ml_dtypes types travel as integers."""
    if dt.lazy:
        carrier = arr.view({1: np.uint8, 2: np.int16}[dt.itemsize])
        return _torch.from_numpy(carrier).view(getattr(_torch, str(dt.torch)))
    return _torch.from_numpy(arr)


def _cast_torch(
    values: np.ndarray, src: DType, dst: DType, out: np.ndarray | None
) -> tuple[np.ndarray, int] | None:
    """torch's own conversion of a piece that cannot overflow; None: take the numpy path.
    (Sources of 16 bits and more: torch has no aminmax for float8.)"""
    tin = _as_torch(values, src)
    limit = min(_SAFE_BELOW[dst.code], _F32_SAFE if src.code == "F64" else float("inf"))
    if limit != float("inf"):
        lo, hi = _torch.aminmax(tin)  # NaN propagates: NaN fails the test below
        if not (-limit < float(lo) and float(hi) < limit):
            return None
    res = _into(out, values.size, dst) if out is not None else np.empty(values.size, dst.numpy)
    _as_torch(res, dst).copy_(tin)
    return res, 0


def cast(
    values: np.ndarray, src: DType, dst: DType, out: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """``values`` (dtype ``src``, 1-D) cast to ``dst`` with torch's bits; also the overflow count.

    The overflow count is the number of finite values that became non-finite (inf; for
    float8_e4m3fn, which has no inf, saturated to +-448). ``out``, when given, is a buffer of
    at least the output's bytes (``values.size`` times the target's item size) to cast into
    (reusing one buffer saves a page fault per 4 KiB of output); the result is a view of it.
    Otherwise a new array is returned.
    Thread-safe: numpy releases the GIL in the loops, so casts of pieces can run in parallel.
    """
    check_cast(src, dst)
    values = values.reshape(-1)
    if _torch is not None and values.size and src != dst and src.itemsize >= 2:
        done = _cast_torch(np.ascontiguousarray(values), src, dst, out)
        if done is not None:
            return done
    fast = _FAST.get((src.code, dst.code))
    if fast is not None:
        return _cast_blocks(values, src, dst, out, fast)
    widen = TO_F32.get(src.code)
    if widen is not None and dst.code == "F32":  # exact, never overflows: torch's bits
        res = _into(out, values.size, dst) if out is not None else np.empty(values.size, np.float32)
        widen(np.ascontiguousarray(values), res)
        return res, 0
    fast = _FAST.get(("F32", dst.code))
    if fast is not None and widen is not None:
        return _cast_blocks(values, src, dst, out, fast, widen)
    with np.errstate(all="ignore"):
        f = values if src.code == "F32" else values.astype(np.float32)
        if dst.code == "F32":
            res = f if f is not values else f.copy()
        elif out is not None:
            res = _into(out, values.size, dst)
            np.copyto(res, f, casting="unsafe")
        else:
            res = f.astype(dst.numpy)
        if f.size == 0:
            return res, 0
        # max/min are reductions (no temporaries) and propagate NaN: one cheap look decides
        # whether any element needs the exact handling below
        lo, hi = f.min(), f.max()
    limit = _SAFE_BELOW[dst.code]
    if -limit < lo and hi < limit and (src.code != "F64" or np.isfinite(hi)):
        return res, 0
    return res, _fix_nonfinite(values, f, res, src, dst)


def _into(out: np.ndarray, n: int, dst: DType) -> np.ndarray:
    """The first ``n`` elements of the buffer ``out`` as ``dst``."""
    return out.reshape(-1).view(np.uint8)[: n * dst.itemsize].view(dst.numpy)


def _cast_blocks(
    values: np.ndarray,
    src: DType,
    dst: DType,
    out: np.ndarray | None,
    fast: FastCast,
    widen: Callable[[np.ndarray, np.ndarray], object] | None = None,
) -> tuple[np.ndarray, int]:
    """Cast block by block (each block in cache once): NaN-free blocks inside the target's
    range take ``fast``, the others numpy's cast plus the exact NaN/overflow handling.

    ``widen``: ``values`` are 16-bit floats, each block first made float32 exactly (torch's
    bits, NaNs included: ``TO_F32``) and then cast as float32, which is what torch does
    (every cast goes through float32): bf16 or fp16 -> fp16, bf16 or fp8 at the float32
    kernels' speed instead of ml_dtypes' and numpy's scalar loops (bf16 -> e4m3fn 4.7 -> ~2
    ns a value, fp16 -> e4m3fn 6.8 -> 2.4 here).
    """
    values = np.ascontiguousarray(values)
    res = _into(out, values.size, dst) if out is not None else np.empty(values.size, dst.numpy)
    block = max(1, min(FAST_BLOCK, values.size))
    t1, t2 = np.empty(block, U32), np.empty(block, U32)
    wide = np.empty(block if widen is not None else 0, np.float32)  # the float32 of a block
    kind = src if widen is None else from_code("F32")  # what the kernels see
    overflow = 0
    with np.errstate(all="ignore"):
        for i in range(0, values.size, block):
            v, r = values[i : i + block], res[i : i + block]
            if widen is not None:
                widen(v, wide[: v.size])
                v = wide[: v.size]
            if not fast(v, r, t1[: v.size], t2[: v.size]):
                np.copyto(r, v, casting="unsafe")
                overflow += _fix_nonfinite(v, v, r, kind, dst)
    return res, overflow


_MAGIC = np.float32(2.0**112)  # float16's exponent bias (15) to float32's (127)
_DENORMAL = np.float32(2.0**-149)  # float32's smallest denormal: 0 when read as zero (DAZ)


def f16_to_f32(raw: np.ndarray, out: np.ndarray, scaled: bool = False) -> bool:
    """float16 -> float32, exactly torch's bits (NaNs quieted, payload kept), in ~5 vectorised
    passes (numpy's own cast is a scalar loop, ~3x slower). The bits sign-extended and
    shifted into float32's place, the sign's copies cleared, then one multiply by 2**112
    rebiases the exponent (subnormals become normal exactly); exponent 31 (inf/NaN) is fixed
    afterwards. tests/test_arith.py checks all 65,536 patterns against torch.

    In a thread that reads denormals as zero (MXCSR.DAZ: ``torch.set_flush_denormal(True)``,
    fast-math libraries) the multiply would flush float16's subnormals (they are float32
    denormals before it): numpy's integer conversion then, with the same NaN fix.

    ``scaled``: when the piece holds no inf/NaN, skip the multiply and return True: ``out``
    then holds the values times 2**-112 exactly (a caller folds 2**112 into its own constant
    multiply, one pass fewer); False: ``out`` holds the values."""
    u = raw.view(np.uint16)
    # an inf/NaN (exponent 31): +: 0x7C00.. as int16, the top of int16; -: 0xFC00.., the
    # top of uint16 (two 16-bit max passes: a third of float32 max and min)
    special = bool(raw.size) and bool(
        np.maximum.reduce(raw.view(np.int16)) >= 0x7C00 or np.maximum.reduce(u) >= 0xFC00
    )
    if _DENORMAL * _MAGIC == 0:
        np.copyto(out, u.view(np.float16), casting="unsafe")
    else:
        o = out.view(np.int32)
        np.copyto(o, raw.view(np.int16))  # sign-extended: bits 15..31 are the sign
        np.left_shift(o, 13, out=o)
        np.bitwise_and(o, np.int32(-0x70000001), out=o)  # keep bit 31 and bits 0..27
        if scaled and not special:
            return True
        np.multiply(out, _MAGIC, out=out)
    if special:
        idx = np.flatnonzero((u & np.uint16(0x7C00)) == np.uint16(0x7C00))
        b = u[idx].astype(np.uint32)
        m = b & np.uint32(0x3FF)
        quiet = np.where(m != 0, np.uint32(0x400000), np.uint32(0))
        bits = ((b & np.uint32(0x8000)) << np.uint32(16)) | np.uint32(0x7F800000) | (m << 13)
        out.view(np.uint32)[idx] = bits | quiet
    return False


def bf16_to_f32(raw: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 -> float32: the bits shifted up (torch's bits, NaN payloads included)."""
    o = out.view(np.uint32)
    np.copyto(o, raw.view(np.uint16))  # two plain passes: a mixed-type shift buffers
    np.left_shift(o, 16, out=o)


#: 16-bit floats -> float32, exact (torch's bits), whole or block by block: casts from them
#: (``cast``) and model arithmetic (``ops.arith``) share it
TO_F32: dict[str, Callable[[np.ndarray, np.ndarray], object]] = {
    "BF16": bf16_to_f32,
    "F16": f16_to_f32,
}


def _fix_nonfinite(
    values: np.ndarray, f: np.ndarray, res: np.ndarray, src: DType, dst: DType
) -> int:
    """Give NaNs torch's bits, saturate e4m3, count overflows; returns the overflow count."""
    view_t, mask = _NONFINITE[dst.code]
    bits = res.view(view_t)
    bad = (bits & view_t(mask)) == mask
    if not bad.any():
        return 0
    idx = np.flatnonzero(bad)
    fv = np.ascontiguousarray(f[idx])
    src_nan = np.isnan(fv)
    finite_src = np.isfinite(values[idx]) if src.code == "F64" else np.isfinite(fv)
    overflow = int(np.count_nonzero(finite_src))
    if dst.code == "F8_E4M3":  # torch saturates overflow and +-inf to +-448
        sat = idx[~src_nan]
        sign = (fv[~src_nan].view(U32) >> 24).astype(U8) & 0x80
        bits[sat] = sign | E4M3_MAX_BITS
    if src_nan.any():
        sv = np.ascontiguousarray(values[idx[src_nan]])
        sview = _NONFINITE[src.code][0]
        f32_bits = _NAN_TO_F32[src.code](sv.view(sview))
        bits[idx[src_nan]] = _NAN_FROM_F32[dst.code](f32_bits.astype(U32), src.code)
    return overflow
