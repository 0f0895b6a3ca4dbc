"""Check sdtool's Q8_0 rounding steps against gguf-py's / numpy's on every float32 they meet.

1. Rounding. gguf-py rounds half away from zero as
   ``sign(v) * (floor|v| + floor(2 (|v| - floor|v|)))`` (8 passes). sdtool adds
   ``copysign(0.5 - 2**-25, v)`` and truncates in the int8 cast (torch's kernel:
   ``torch.copysign``, ``add_``, ``copy_`` to int8; numpy's kernel the same on the magnitude,
   ``|v| + (0.5 - 2**-25)``, with v's sign bit put back before the cast). The scaled values of
   a block lie in [-127, 127] (plus NaN, which both kernels leave to numpy), so every float32 of
   magnitude <= 128 is tried.
2. Scales. d goes to float16 by integer rounding (``ggml._f16_bits``) instead of numpy's
   ``astype(float16)``; every float32 bit pattern is tried.

Prints the number of mismatches of each (0 expected). Takes a few minutes.

    python benchmarks/check_q8_rounding.py
"""

from __future__ import annotations

import importlib.util

import numpy as np

from sdtool.formats.ggml import (
    _HALF_DOWN,
    _HALF_DOWN_BITS,
    _f16_bits,
    _round_away,
    _round_away_torch,
)


def reference(v: np.ndarray) -> np.ndarray:
    a = np.abs(v)
    f = np.floor(a)
    return (np.sign(v) * (f + np.floor(2 * (a - f)))).astype(np.int8)


def numpy_kernel(v: np.ndarray) -> np.ndarray:
    """The numpy kernel's steps: sign bit over the constant, add, truncating cast."""
    c = (v.view(np.uint32) & np.uint32(0x80000000)) | _HALF_DOWN_BITS
    return (v + c.view(np.float32)).astype(np.int8)


def magnitude_kernel(v: np.ndarray) -> np.ndarray:
    """The numpy kernel's steps: |v| + (0.5 - 2**-25), v's sign bit put back, truncating cast."""
    r = np.abs(v) + _HALF_DOWN
    r.view(np.uint32)[...] |= v.view(np.uint32) & np.uint32(0x80000000)
    return r.astype(np.int8)


def main() -> None:
    top = int(np.array(128.0, np.float32).view(np.uint32))
    step = 1 << 24
    kernels = {
        "numpy (copysign)": _round_away,
        "numpy (bits)": numpy_kernel,
        "numpy (magnitude)": magnitude_kernel,
    }
    if importlib.util.find_spec("torch") is not None:
        kernels["torch"] = _round_away_torch
    bad = dict.fromkeys(kernels, 0)
    for start in range(0, top + 1, step):
        u = np.arange(start, min(start + step, top + 1), dtype=np.uint32)
        for sign in (0, 0x80000000):
            v = (u | np.uint32(sign)).view(np.float32)
            want = reference(v)
            for name, fn in kernels.items():
                bad[name] += int(np.count_nonzero(fn(v) != want))
    for name, n in bad.items():
        print(f"rounding, {name}: {2 * (top + 1):,} values checked, {n} mismatches")
    wrong = 0
    for start in range(0, 1 << 32, step):
        v = np.arange(start, start + step, dtype=np.uint64).astype(np.uint32).view(np.float32)
        with np.errstate(all="ignore"):
            wrong += int(np.count_nonzero(_f16_bits(v) != v.astype(np.float16).view(np.uint16)))
    print(f"float16 scales: {1 << 32:,} float32 values checked, {wrong} mismatches")


if __name__ == "__main__":
    main()
