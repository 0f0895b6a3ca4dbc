"""Check sdtool's Q8_0 rounding against gguf-py's on every float32 a Q8_0 block can produce.

gguf-py rounds half away from zero as ``sign(v) * (floor|v| + floor(2 (|v| - floor|v|)))``
(8 passes). sdtool adds ``copysign(0.5 - 2**-25, v)`` and truncates in the int8 cast (2
passes). The scaled values of a block lie in [-127, 127] (plus NaN), so every float32 of
magnitude <= 128 is tried, in chunks; the script prints the number of mismatches (0 expected).

    python benchmarks/check_q8_rounding.py
"""

from __future__ import annotations

import numpy as np

from sdtool.formats.ggml import _round_away


def reference(v: np.ndarray) -> np.ndarray:
    a = np.abs(v)
    f = np.floor(a)
    return (np.sign(v) * (f + np.floor(2 * (a - f)))).astype(np.int8)


def main() -> None:
    top = int(np.array(128.0, np.float32).view(np.uint32))
    step = 1 << 24
    bad = 0
    for start in range(0, top + 1, step):
        u = np.arange(start, min(start + step, top + 1), dtype=np.uint32)
        for sign in (0, 0x80000000):
            v = (u | np.uint32(sign)).view(np.float32)
            bad += int(np.count_nonzero(_round_away(v) != reference(v)))
    print(f"{2 * (top + 1):,} values checked, {bad} mismatches")


if __name__ == "__main__":
    main()
