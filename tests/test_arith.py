"""sdtool.ops.arith: the vectorised conversions to float32 give torch's bits on every pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtool import dtypes
from sdtool.ops.arith import to_f32


@pytest.mark.parametrize("daz", [False, True])
@pytest.mark.parametrize(("code", "torch_dt"), [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_every_16_bit_pattern_converts_as_torch(
    code: str, torch_dt: torch.dtype, daz: bool
) -> None:
    """All 65,536 fp16 / bf16 patterns (subnormals, infs, quiet and signalling NaNs), in
    blocks of odd sizes, against torch's ``.float()``; also in a thread that reads denormals
    as zero (``torch.set_flush_denormal(True)``: fp16's subnormals must not be flushed)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = torch.from_numpy(bits.view(np.int16)).view(torch_dt).float().numpy().view(np.uint32)
    dt = dtypes.from_code(code).numpy
    got = np.empty(bits.size, np.float32)
    assert torch.set_flush_denormal(daz)
    try:
        for s in range(0, bits.size, 4099):
            to_f32(bits[s : s + 4099].view(dt), got[s : s + 4099])
    finally:
        torch.set_flush_denormal(False)
    assert np.array_equal(got.view(np.uint32), want)


def test_ahead_computes_in_order_out_of_order_again_and_raises() -> None:
    """``Ahead``: tensors asked in its order, out of it, twice (as --verify does) give the same
    values; at most about ``budget`` bytes are started ahead; a piece's error reaches ``get``."""
    from concurrent.futures import ThreadPoolExecutor

    from sdtool.ops.arith import Ahead, Output, Task, pieces

    f16 = dtypes.from_code("F16")
    sizes = {f"t{i}": n for i, n in enumerate([5, 70_000, 1, 300_000, 9, 0, 123_457])}
    starts: list[str] = []

    def new(name: str) -> Output:
        starts.append(name)
        return Output((sizes[name],), f16)

    def piece(name: str, out: Output, start: int, count: int) -> None:
        if name == "bad":
            raise ValueError("broken input")
        out.put(start, np.arange(start, start + count, dtype=np.float32) % 1000 + len(name))

    def want(name: str) -> np.ndarray:
        return (np.arange(sizes[name], dtype=np.float32) % 1000 + len(name)).astype(np.float16)

    tasks = [
        Task(n, k * 2, lambda n=n: new(n), lambda o, s, c, n=n: piece(n, o, s, c))
        for n, k in sizes.items()
    ]
    with ThreadPoolExecutor(2) as pool:
        ahead = Ahead(pool, tasks, budget=150_000)
        for name in ["t0", "t1", "t4", "t2", "t6", "t6", "t3", "t5", "t0"]:
            assert np.array_equal(ahead.get(name).array(), want(name)), name
        # ahead in order up to the budget; each once, except when asked again
        assert starts[:4] == ["t0", "t1", "t2", "t3"]
        assert sorted(starts) == sorted([*sizes, "t6", "t0"])
        assert sum(1 for _ in pieces(300_000)) > 1
        sizes["bad"] = 10
        bad = Ahead(
            pool, [Task("bad", 20, lambda: new("bad"), lambda o, s, c: piece("bad", o, s, c))]
        )
        with pytest.raises(ValueError, match="broken input"):
            bad.get("bad")
        bad.cancel()
