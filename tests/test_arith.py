"""sdtool.ops.arith: the vectorised conversions to float32 give torch's bits on every pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtool import dtypes
from sdtool.ops.arith import to_f32


@pytest.mark.parametrize(("code", "torch_dt"), [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_every_16_bit_pattern_converts_as_torch(code: str, torch_dt: torch.dtype) -> None:
    """All 65,536 fp16 / bf16 patterns (subnormals, infs, quiet and signalling NaNs), in
    blocks of odd sizes, against torch's ``.float()``."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = torch.from_numpy(bits.view(np.int16)).view(torch_dt).float().numpy().view(np.uint32)
    dt = dtypes.from_code(code).numpy
    got = np.empty(bits.size, np.float32)
    for s in range(0, bits.size, 4099):
        to_f32(bits[s : s + 4099].view(dt), got[s : s + 4099])
    assert np.array_equal(got.view(np.uint32), want)
