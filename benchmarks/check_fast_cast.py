"""Check sdtool's fast float32 -> float16 cast on all 2**32 float32 bit patterns (``--fp8``:
the float32 -> float8_e4m3fn and float8_e5m2 casts against torch's ``.to()``, which needs torch;
NaNs aside there too).

Blocks of consecutive patterns go through ``sdtool.write.cast.cast`` (fast path where a block
is NaN-free and inside float16's range, numpy's cast plus the exact fixes elsewhere) and are
compared with numpy's own cast for every non-NaN value (numpy and torch round finite values
identically; NaN bits are tests/test_cast.py's business). Prints a line per 2**28 patterns and
exits 1 on the first difference. Takes about 8 minutes on one core.

    python benchmarks/check_fast_cast.py
"""

from __future__ import annotations

import sys
import time

import numpy as np

from sdtool import dtypes
from sdtool.write.cast import cast

STEP = 1 << 24


def main() -> int:
    if "--fp8" in sys.argv[1:]:
        return check_fp8()
    f32, f16 = dtypes.from_code("F32"), dtypes.from_code("F16")
    buf = np.empty(STEP * 2, np.uint8)
    t0 = time.perf_counter()
    for start in range(0, 1 << 32, STEP):
        bits = np.arange(start, start + STEP, dtype=np.uint64).astype(np.uint32)
        vals = bits.view(np.float32)
        got, _ = cast(vals, f32, f16, out=buf)
        with np.errstate(all="ignore"):
            want = vals.astype(np.float16)
        ok = np.isnan(vals) | (got.view(np.uint16) == want.view(np.uint16))
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            print(f"differs at {bits[i]:#010x}: {got.view(np.uint16)[i]:#06x} != "
                  f"{want.view(np.uint16)[i]:#06x}")  # fmt: skip
            return 1
        if (start + STEP) % (1 << 28) == 0:
            done = (start + STEP) >> 28
            print(f"{done}/16 checked, {time.perf_counter() - t0:.0f} s", flush=True)
    print("all 2**32 float32 patterns: fast cast == numpy cast (NaNs aside)")
    return 0


def check_fp8() -> int:
    import torch

    f32 = dtypes.from_code("F32")
    kinds = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    buf = np.empty(STEP, np.uint8)
    t0 = time.perf_counter()
    for start in range(0, 1 << 32, STEP):
        bits = np.arange(start, start + STEP, dtype=np.uint64).astype(np.uint32)
        vals = bits.view(np.float32)
        for code, tdt in kinds.items():
            got = cast(vals, f32, dtypes.from_code(code), out=buf)[0].view(np.uint8)
            want = torch.from_numpy(vals.copy()).to(tdt).view(torch.uint8).numpy()
            ok = np.isnan(vals) | (got == want)
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                print(f"{code} differs at {bits[i]:#010x}: {got[i]:#04x} != {want[i]:#04x}")
                return 1
        if (start + STEP) % (1 << 28) == 0:
            done = (start + STEP) >> 28
            print(f"{done}/16 checked, {time.perf_counter() - t0:.0f} s", flush=True)
    print("all 2**32 float32 patterns: fp8 e4m3fn and e5m2 casts == torch's (NaNs aside)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
