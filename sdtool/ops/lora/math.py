"""The weight deltas of LoRA, LoCon (incl. Tucker), LoHa, LoKr and DoRA, in float32.

Formulas (s = alpha / rank, alpha missing -> s = 1; rank = the down factor's rows):

* LoRA / LoCon: ``delta = s * up @ down`` (kohya networks/merge_lora.py); 1x1 convs on the
  squeezed factors; kxk convs ``up [out, r, 1, 1]`` with ``down [r, in, k, k]``:
  ``delta[o, i, :, :] = sum_r up[o, r] down[r, i, :, :]`` (computed as PEFT does, a 1x1
  convolution of the permuted down factor, when torch is installed).
* Tucker LoCon (``lora_mid [r, r, k, k]``): ``delta = einsum("ijkl,oi,jm->omkl", mid, up, down)``.
* LoHa: ``delta = s * (w1_a @ w1_b) * (w2_a @ w2_b)``, rank = w1_b rows; with Tucker factors
  ``w = einsum("ijkl,jr,ip->prkl", t, w_b, w_a)`` (comfy/weight_adapter/loha.py).
* LoKr: ``delta = kron(w1, w2)`` (each factor whole or ``a @ b``; w2 may be Tucker), times s
  only when a factor is low-rank (rank = w2_b's rows, else w1_b's), else 1
  (comfy/weight_adapter/lokr.py).
* full: ``delta = diff``; bias: ``delta = diff_b``.
* DoRA (PEFT tuners/lora/dora.py): ``W' = m * V / ||V||`` with ``V = W + k * delta``, the norm
  per output row (``m`` of shape [out] or [out, 1]) or per input column (LyCORIS [1, in]).

The products use torch when it is installed (the same kernels as PEFT/diffusers, so a baked
weight equals ``fuse_lora``'s bit for bit), numpy otherwise (equal up to float32 rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

from sdtool.errors import CorruptFile

Array = np.ndarray
Get = Callable[[str], Array]  # role -> float32 factor


@cache
def _torch() -> Any:
    try:
        import torch
    except ImportError:  # pragma: no cover - the tests run with torch
        return None
    return torch


def mm(a: Array, b: Array) -> Array:
    """float32 matrix product (torch's kernel when available)."""
    torch = _torch()
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    if torch is None:
        return a @ b
    return (torch.from_numpy(a) @ torch.from_numpy(b)).numpy()


def conv_updown(up: Array, down: Array) -> Array:
    """The kxk conv delta of ``up [out, r, 1, 1]`` and ``down [r, in, k, k]``: [out, in, k, k]."""
    torch = _torch()
    if torch is None:
        out, r = up.shape[:2]
        return (up.reshape(out, r) @ down.reshape(r, -1)).reshape(out, *down.shape[1:])
    f = torch.nn.functional.conv2d
    d = torch.from_numpy(np.ascontiguousarray(down, np.float32))
    u = torch.from_numpy(np.ascontiguousarray(up, np.float32))
    return f(d.permute(1, 0, 2, 3), u).permute(1, 0, 2, 3).contiguous().numpy()


def einsum(spec: str, *xs: Array) -> Array:
    torch = _torch()
    if torch is None:
        return np.einsum(spec, *xs).astype(np.float32)
    ts = [torch.from_numpy(np.ascontiguousarray(x, np.float32)) for x in xs]
    return torch.einsum(spec, *ts).numpy()


def kron(a: Array, b: Array) -> Array:
    torch = _torch()
    if torch is None:
        return np.kron(a, b).astype(np.float32)
    ta = torch.from_numpy(np.ascontiguousarray(a, np.float32))
    tb = torch.from_numpy(np.ascontiguousarray(b, np.float32))
    return torch.kron(ta, tb).numpy()


def _flat2(x: Array) -> Array:
    """A factor as a matrix: [a, b, 1, 1] -> [a, b]; 2-D unchanged."""
    if x.ndim == 4 and x.shape[2:] == (1, 1):
        return x.reshape(x.shape[:2])
    return x


def rank_of(kind: str, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The rank alpha is divided by, None when the module's scale is 1 whatever its alpha."""
    if kind == "lora":
        return shapes["down"][0]
    if kind == "loha":
        return shapes["hada_w1_b"][0]
    if kind == "lokr":
        if "lokr_w2_b" in shapes:
            return shapes["lokr_w2_b"][0]
        if "lokr_w1_b" in shapes:
            return shapes["lokr_w1_b"][0]
        return None
    return None


def scale_of(kind: str, shapes: dict[str, tuple[int, ...]], alpha: float | None) -> float:
    """alpha / rank, or 1 (no alpha, or a module kind without rank)."""
    rank = rank_of(kind, shapes)
    if alpha is None or rank is None or rank == 0:
        return 1.0
    return alpha / rank


def raw_delta(kind: str, get: Get, roles: set[str], shape: tuple[int, ...]) -> Array:
    """The module's product (before the scale), reshaped to the target ``shape``."""
    if kind == "lora":
        up, down = get("up"), get("down")
        if "mid" in roles:
            mid = get("mid")
            d = einsum("ijkl,oi,jm->omkl", mid, _flat2(up), _flat2(down))
        elif down.ndim == 4 and down.shape[2:] != (1, 1):
            d = conv_updown(up, down)
        else:
            d = mm(_flat2(up), _flat2(down))
    elif kind == "loha":
        w1 = _hada(get, roles, "1")
        w2 = _hada(get, roles, "2")
        d = w1 * w2
    elif kind == "lokr":
        w1 = _lokr(get, roles, "1")
        w2 = _lokr(get, roles, "2")
        if len(shape) == 4 and w1.ndim == 2:
            w1 = w1[:, :, None, None]
        if w2.ndim == 2 and len(shape) == 4:
            w2 = w2[:, :, None, None]
        d = kron(w1, w2)
    elif kind == "full":
        d = get("diff")
    elif kind == "bias":
        d = get("diff_b")
    else:  # pragma: no cover - parse_lora keeps only known kinds
        raise ValueError(kind)
    if d.size != int(np.prod(shape)):
        raise CorruptFile(f"its {kind} factors give {list(d.shape)}, the base has {list(shape)}")
    return d.reshape(shape)


def _hada(get: Get, roles: set[str], i: str) -> Array:
    a, b = get(f"hada_w{i}_a"), get(f"hada_w{i}_b")
    if f"hada_t{i}" in roles:
        return einsum("ijkl,jr,ip->prkl", get(f"hada_t{i}"), b, a)
    return mm(a, b)


def _lokr(get: Get, roles: set[str], i: str) -> Array:
    if f"lokr_w{i}" in roles:
        return get(f"lokr_w{i}")
    a, b = get(f"lokr_w{i}_a"), get(f"lokr_w{i}_b")
    if i == "2" and "lokr_t2" in roles:
        return einsum("ijkl,jr,ip->prkl", get("lokr_t2"), b, a)
    return mm(a, b)


def dora(weight: Array, delta: Array, magnitude: Array) -> Array:
    """PEFT's DoRA merge: ``m / ||V|| * V`` with ``V = weight + delta`` (delta already scaled).

    The norm is per output row when ``magnitude`` has ``out`` entries ([out] or [out, 1, ...]),
    per input column when it is LyCORIS's [1, in, ...] form.
    """
    v = np.ascontiguousarray(weight + delta, np.float32)
    out = v.shape[0]
    m = np.ascontiguousarray(magnitude, np.float32).reshape(-1)
    rows = m.size == out
    torch = _torch()
    if torch is None:
        axis = tuple(i for i in range(v.ndim) if i != (0 if rows else 1))
        norm = np.sqrt(np.sum(np.square(v, dtype=np.float64), axis=axis)).astype(np.float32)
    else:
        tv = torch.from_numpy(v)
        dims = tuple(i for i in range(v.ndim) if i != (0 if rows else 1))
        norm = torch.linalg.norm(tv, dim=1) if v.ndim == 2 and rows else tv.norm(p=2, dim=dims)
        norm = norm.numpy()
    factor = m / norm
    shape = (out,) + (1,) * (v.ndim - 1) if rows else (1, -1) + (1,) * (v.ndim - 2)
    return factor.reshape(shape) * v
