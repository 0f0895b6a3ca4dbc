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
from collections.abc import Callable

import numpy as np

from sdtool import dtypes
from sdtool.write.cast import cast

STEP = 1 << 24


#: a reference cast: float32 values -> the target's bits as unsigned integers
Reference = Callable[[np.ndarray], np.ndarray]


def _numpy_f16(vals: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return vals.astype(np.float16).view(np.uint16)


def _torch_to(name: str) -> Reference:
    import torch

    tdt = getattr(torch, name)
    return lambda vals: torch.from_numpy(vals.copy()).to(tdt).view(torch.uint8).numpy()


def check(references: dict[str, Reference], what: str) -> int:
    """Every float32 pattern through ``cast`` to each target code, against its reference
    (NaNs aside); 1 on the first difference."""
    f32 = dtypes.from_code("F32")
    buf = np.empty(STEP * 2, np.uint8)
    t0 = time.perf_counter()
    for start in range(0, 1 << 32, STEP):
        bits = np.arange(start, start + STEP, dtype=np.uint64).astype(np.uint32)
        vals = bits.view(np.float32)
        for code, reference in references.items():
            want = reference(vals)
            got = cast(vals, f32, dtypes.from_code(code), out=buf)[0].view(want.dtype)
            ok = np.isnan(vals) | (got == want)
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                print(f"{code} differs at {bits[i]:#010x}: {got[i]:#x} != {want[i]:#x}")
                return 1
        if (start + STEP) % (1 << 28) == 0:
            done = (start + STEP) >> 28
            print(f"{done}/16 checked, {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"all 2**32 float32 patterns: {what} (NaNs aside)")
    return 0


def main() -> int:
    if "--fp8" in sys.argv[1:]:
        refs = {"F8_E4M3": _torch_to("float8_e4m3fn"), "F8_E5M2": _torch_to("float8_e5m2")}
        return check(refs, "fp8 e4m3fn and e5m2 casts == torch's")
    return check({"F16": _numpy_f16}, "fast cast == numpy cast")


if __name__ == "__main__":
    sys.exit(main())
