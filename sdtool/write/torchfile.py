"""Writing .ckpt/.pt/.pth/.bin: torch's own zip format, through torch.save.

The output is a flat ``{name: tensor}`` dict, what ``torch.save(model.state_dict())`` writes and
what every loader accepts. Unlike the safetensors writer this one is memory-bound: torch.save
needs the whole dict at once, so the output's tensors are all in memory before it writes
(each tensor is still read and cast chunk by chunk). torch files have no metadata map, so
the plan's metadata is not written (convert reports that). torch is imported here only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import numpy as np

from sdtool.errors import MissingExtra
from sdtool.write.plan import OutTensor
from sdtool.write.stream import Chunks

#: dtypes torch.from_numpy cannot take (ml_dtypes types): passed as same-size integers, then
#: viewed as the torch dtype
_VIA_CARRIER = frozenset({"BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"})
_CARRIER = {1: np.uint8, 2: np.int16}


def import_torch() -> Any:
    """torch, or MissingExtra naming the extra that installs it."""
    try:
        import torch
    except ImportError:
        raise MissingExtra(
            "writing .ckpt/.pt/.pth/.bin needs PyTorch, which is not installed: "
            "pip install 'sdtool[torch]', or write .safetensors instead"
        ) from None
    return torch


def write_torch(
    plan: Sequence[OutTensor],
    f: BinaryIO,
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write ``plan`` as a torch zip file into ``f``; return overflow counts by tensor name."""
    torch = import_torch()
    state: dict[str, Any] = {}
    overflows: dict[str, int] = {}
    for t in plan:
        out = np.empty(t.info.numel, t.dtype.numpy)
        pos = 0
        chunks = Chunks(t)
        for piece in chunks:
            out[pos : pos + piece.size] = piece
            pos += piece.size
        if chunks.overflow:
            overflows[t.name] = chunks.overflow
        if t.dtype.code in _VIA_CARRIER:
            carrier = out.view(_CARRIER[t.dtype.itemsize])
            tensor = torch.from_numpy(carrier).view(getattr(torch, str(t.dtype.torch)))
        else:
            tensor = torch.from_numpy(out)
        state[t.name] = tensor.reshape(t.shape)
        if progress is not None:
            progress(t.nbytes)
    torch.save(state, f)
    return overflows
