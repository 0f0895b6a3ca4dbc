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
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sdtool.dtypes import DType
from sdtool.errors import UnsupportedDtype

#: dtypes a cast may start from or go to.
CASTABLE = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

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


def cast(
    values: np.ndarray, src: DType, dst: DType, out: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """``values`` (dtype ``src``, 1-D) cast to ``dst`` with torch's bits; also the overflow count.

    The overflow count is the number of finite values that became non-finite (inf; for
    float8_e4m3fn, which has no inf, saturated to +-448). ``out``, when given, is a buffer of
    at least ``values.nbytes`` bytes to cast into (reusing one buffer saves a page fault per
    4 KiB of output); the result is a view of it. Otherwise a new array is returned.
    """
    check_cast(src, dst)
    values = values.reshape(-1)
    with np.errstate(all="ignore"):
        f = values if src.code == "F32" else values.astype(np.float32)
        if dst.code == "F32":
            res = f if f is not values else f.copy()
        elif out is not None:
            res = out.reshape(-1).view(np.uint8)[: values.size * dst.itemsize].view(dst.numpy)
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
