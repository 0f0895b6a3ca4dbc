"""ggml's tensor types: the block formats, and numpy (de)quantizers for them.

One table (``GGML_TYPES``) names every type a GGUF file can declare (id, elements per block,
bytes per block). Dequantizers follow gguf-py's ``quants.dequantize`` operation for
operation (float32 arithmetic, the same rounding at every step), so their output is bit for
bit gguf-py's. Quantizers for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16 and F16 follow gguf-py's
``quants.quantize`` the same way (equal bytes); Q4_K, Q5_K and Q6_K follow llama.cpp's
reference C algorithm (``quantize_row_q*_K_ref`` without an importance matrix), with sums
accumulated in the C loop's order. docs/gguf.md lists the block layouts.

Everything works on whole arrays of blocks, in pieces of about ``PIECE_BLOCKS`` blocks (small
enough to stay in cache) and on ``threads`` threads (numpy releases the GIL).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdtool.errors import UnsupportedDtype

QK_K = 256
#: the "all zero" threshold of llama.cpp's K-quant helpers
GROUP_MAX_EPS = np.float32(1e-15)
#: elements per work piece (a multiple of 256): about 1 MiB of float32, cache-sized
PIECE_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: ``block`` elements are stored in ``size`` bytes.

    ``dtype`` is the sdtool dtype code of a plain (unblocked) type, else None.
    """

    name: str
    id: int
    block: int
    size: int
    dtype: str | None = None

    @property
    def quantized(self) -> bool:
        return self.dtype is None

    def nbytes(self, numel: int) -> int:
        """Bytes ``numel`` elements take (``numel`` a multiple of ``block``)."""
        return numel // self.block * self.size


def _t(name: str, id: int, block: int, size: int, dtype: str | None = None) -> GGMLType:
    return GGMLType(name, id, block, size, dtype)


#: name -> type; ids and sizes as gguf-py's constants.GGML_QUANT_SIZES
GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        _t("F32", 0, 1, 4, "F32"),
        _t("F16", 1, 1, 2, "F16"),
        _t("Q4_0", 2, 32, 18),
        _t("Q4_1", 3, 32, 20),
        _t("Q5_0", 6, 32, 22),
        _t("Q5_1", 7, 32, 24),
        _t("Q8_0", 8, 32, 34),
        _t("Q8_1", 9, 32, 40),
        _t("Q2_K", 10, 256, 84),
        _t("Q3_K", 11, 256, 110),
        _t("Q4_K", 12, 256, 144),
        _t("Q5_K", 13, 256, 176),
        _t("Q6_K", 14, 256, 210),
        _t("Q8_K", 15, 256, 292),
        _t("IQ2_XXS", 16, 256, 66),
        _t("IQ2_XS", 17, 256, 74),
        _t("IQ3_XXS", 18, 256, 98),
        _t("IQ1_S", 19, 256, 50),
        _t("IQ4_NL", 20, 32, 18),
        _t("IQ3_S", 21, 256, 110),
        _t("IQ2_S", 22, 256, 82),
        _t("IQ4_XS", 23, 256, 136),
        _t("I8", 24, 1, 1, "I8"),
        _t("I16", 25, 1, 2, "I16"),
        _t("I32", 26, 1, 4, "I32"),
        _t("I64", 27, 1, 8, "I64"),
        _t("F64", 28, 1, 8, "F64"),
        _t("IQ1_M", 29, 256, 56),
        _t("BF16", 30, 1, 2, "BF16"),
        _t("TQ1_0", 34, 256, 54),
        _t("TQ2_0", 35, 256, 66),
        _t("MXFP4", 39, 32, 17),
        _t("NVFP4", 40, 64, 36),
        _t("Q1_0", 41, 128, 18),
    )
}
BY_ID: dict[int, GGMLType] = {t.id: t for t in GGML_TYPES.values()}

_F16 = np.dtype("<f2")
_F32 = np.float32

#: bfloat16 values as their raw bits, for callers that should not import ml_dtypes (its import
#: alone costs over a second of CPU): a one-field record of uint16; every encoder accepts it
#: wherever it accepts ml_dtypes' bfloat16
BF16_BITS = np.dtype([("bf16", "<u2")])


def is_bf16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` holds bfloat16 values (ml_dtypes' type or ``BF16_BITS``)."""
    return dtype == BF16_BITS or str(dtype) == "bfloat16"


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 bytes (n, 2) -> float32 (n, 1)."""
    return np.ascontiguousarray(raw).view(_F16).astype(_F32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32): low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


# -- dequantizers: (n, size) uint8 -> (n, block) float32 ---------------------------------------


def _dq_bf16(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b).view("<u2").astype(np.uint32) << 16).view(_F32)


def _dq_q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 2:18]).astype(np.int8) - np.int8(8)
    return _f16(b[:, 0:2]) * q.astype(_F32)


def _dq_q4_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 4:20]).astype(_F32)
    return _f16(b[:, 0:2]) * q + _f16(b[:, 2:4])


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian u32 -> (n, 32) bits, bit j is element j's."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _dq_q5_0(b: np.ndarray) -> np.ndarray:
    q = (_nibbles(b[:, 6:22]) | (_fifth_bits(b[:, 2:6]) << 4)).astype(np.int8) - np.int8(16)
    return _f16(b[:, 0:2]) * q.astype(_F32)


def _dq_q5_1(b: np.ndarray) -> np.ndarray:
    q = (_nibbles(b[:, 8:24]) | (_fifth_bits(b[:, 4:8]) << 4)).astype(_F32)
    return _f16(b[:, 0:2]) * q + _f16(b[:, 2:4])


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(_F32) * _f16(b[:, 0:2])


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """K-quant 2-bit fields: (n, 64) bytes -> (n, 256); element (half h, shift s, l) is
    (qs[32h + l] >> 2s) & 3."""
    n = qs.shape[0]
    q = qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return (q & 3).reshape(n, 256)


def _dq_q2_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc = b[:, 0:16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & 0x0F).astype(_F32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).astype(_F32)).reshape(n, 16, 1)
    q = _crumbs(b[:, 16:80]).reshape(n, 16, 16).astype(_F32)
    return (dl * q - ml).reshape(n, 256)


def _q3_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K's 12 scale bytes -> 16 signed 6-bit scales (n, 16) int8."""
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)
    hi: np.ndarray = s[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(
        1, 4, 1
    )
    hi = (hi & 3).reshape(-1, 16)
    return (low | (hi << 4)).astype(np.int8) - np.int8(32)


def _dq_q3_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = _f16(b[:, 108:110])
    dl = (d * _q3_scales(b[:, 96:108]).astype(_F32)).reshape(n, 16, 1)
    ql = _crumbs(b[:, 32:96])
    hm = b[:, 0:32].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    hbit = (hm & 1).reshape(n, 256)
    q = (ql.astype(np.int8) - ((hbit ^ 1) << 2).astype(np.int8)).astype(_F32)
    return (dl * q.reshape(n, 16, 16)).reshape(n, 256)


def _k4_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes -> 8 six-bit scales and 8 six-bit mins, (n, 8) each."""
    a, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _dq_k45(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc, mn = _k4_scale_min(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.astype(_F32)).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.astype(_F32)).reshape(n, 8, 1)
    return (d * q.reshape(n, 8, 32).astype(_F32) - dm).reshape(n, 256)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 256): chunk c's 32 low nibbles, then its 32 high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, 256)


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    return _dq_k45(b, _k_nibbles(b[:, 16:144]))


def _dq_q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    hi = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = _k_nibbles(b[:, 48:176]) | ((hi & 1).reshape(n, 256) << 4)
    return _dq_k45(b, q)


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(_F32)
    d = (_f16(b[:, 208:210]) * sc).reshape(n, 16, 1)
    ql: np.ndarray = b[:, 0:128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(
        1, 1, 2, 1
    )
    ql = (ql & 0x0F).reshape(n, 8, 32)
    qh: np.ndarray = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(
        1, 1, 4, 1
    )
    qh = (qh & 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(_F32)
    return (d * q).reshape(n, 256)


DEQUANTIZE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "BF16": _dq_bf16,
    "Q4_0": _dq_q4_0,
    "Q4_1": _dq_q4_1,
    "Q5_0": _dq_q5_0,
    "Q5_1": _dq_q5_1,
    "Q8_0": _dq_q8_0,
    "Q2_K": _dq_q2_k,
    "Q3_K": _dq_q3_k,
    "Q4_K": _dq_q4_k,
    "Q5_K": _dq_q5_k,
    "Q6_K": _dq_q6_k,
}


# -- quantizers (gguf-py's numpy reference, bit for bit): (n, block) float32 -> (n, size) ------


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, _F32(0), _F32(1) / d)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per block, the value whose magnitude is largest (the first of equals), (n, 1)."""
    i = np.abs(x).argmax(axis=1)[:, None]
    return np.take_along_axis(x, i, axis=1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _halfbytes(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v.astype(_F16)).view(np.uint8)


#: float32 bit patterns (sign cleared) whose float16 is normal: [2**-14, 65520)
_F16_NORMAL = (np.uint32(0x38800000), np.uint32(0x477FF000))


def _f16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> float16 bits, rounded to nearest even: numpy's ``astype(float16)``, bit for
    bit, in a few integer passes (numpy converts one element at a time, ~10x slower, and ~60 ns
    per value when the result is subnormal). Values whose float16 is zero or subnormal are
    |v| * 2**24 (exact) rounded to the nearest even integer: the subnormal's bits. Overflow,
    inf and NaN go through numpy."""
    b = np.ascontiguousarray(v, dtype=_F32).view(np.uint32)
    a = b & np.uint32(0x7FFFFFFF)
    r = a + (np.uint32(0x0FFF) + ((a >> 13) & np.uint32(1)))
    sign = (b >> 16) & np.uint32(0x8000)
    h = ((r >> 13) - np.uint32(0x1C000)) | sign
    small = a < _F16_NORMAL[0]
    if small.any():
        m = np.rint(a[small].view(_F32) * _F32(2.0**24))
        h[small] = m.astype(np.uint32) | sign[small]
    big = a >= _F16_NORMAL[1]
    if big.any():
        with np.errstate(over="ignore"):
            h[big] = v.reshape(-1)[big].astype(_F16).view(np.uint16)
    return h.astype(np.uint16)


def _q_trunc(v: np.ndarray, top: int) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.trunc(v).astype(np.uint8).clip(0, top)


def _q_q4_0(x: np.ndarray) -> np.ndarray:
    d = _signed_absmax(x) / _F32(-8)
    q = _q_trunc(x * _inverse(d) + _F32(8.5), 15)
    return np.concatenate([_halfbytes(d), _pack_nibbles(q)], axis=1)


def _q_q4_1(x: np.ndarray) -> np.ndarray:
    mx, mn = x.max(axis=1, keepdims=True), x.min(axis=1, keepdims=True)
    d = (mx - mn) / _F32(15)
    q = _q_trunc((x - mn) * _inverse(d) + _F32(0.5), 15)
    return np.concatenate([_halfbytes(d), _halfbytes(mn), _pack_nibbles(q)], axis=1)


def _fifth_pack(q: np.ndarray) -> np.ndarray:
    return np.packbits(q >> 4, axis=1, bitorder="little")


def _q_q5_0(x: np.ndarray) -> np.ndarray:
    d = _signed_absmax(x) / _F32(-16)
    q = _q_trunc(x * _inverse(d) + _F32(16.5), 31)
    return np.concatenate([_halfbytes(d), _fifth_pack(q), _pack_nibbles(q)], axis=1)


def _q_q5_1(x: np.ndarray) -> np.ndarray:
    mx, mn = x.max(axis=1, keepdims=True), x.min(axis=1, keepdims=True)
    d = (mx - mn) / _F32(31)
    q = _q_trunc((x - mn) * _inverse(d) + _F32(0.5), 31)
    parts = [_halfbytes(d), _halfbytes(mn), _fifth_pack(q), _pack_nibbles(q)]
    return np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class _Legacy:
    """One of Q4_0/Q4_1/Q5_0/Q5_1 as gguf-py computes it: ``top`` the largest level; symmetric
    types scale by the signed absmax over ``-(top + 1) / 2`` and add ``bias``; the others scale
    (x - min) by (max - min) / top and add 0.5. Byte offsets of the min, fifth bits and nibbles."""

    top: int
    symmetric: bool
    bias: float
    m_at: int | None
    qh_at: int | None
    qs_at: int


_LEGACY: dict[str, _Legacy] = {
    "Q4_0": _Legacy(15, True, 8.5, None, None, 2),
    "Q4_1": _Legacy(15, False, 0.5, 2, None, 4),
    "Q5_0": _Legacy(31, True, 16.5, None, 2, 6),
    "Q5_1": _Legacy(31, False, 0.5, 2, 4, 8),
}
_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_LOW_BITS = np.uint64(0x0101010101010101)
#: (8 bytes of 0/1, as a uint64) * this >> 56: the 8 bits packed, byte k -> bit k
_GATHER_BITS = np.uint64(0x0102040810204080)


def _row_max_min(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's max and min (float32 (n, 32)), as numpy's row reductions give them. The
    tree's answer is exact except for the sign of a zero result (which of -0.0 / +0.0 wins
    depends on the order of comparisons): rows whose max or min is zero are redone by numpy's
    reduction. NaN propagates either way (such rows are redone whole by the caller)."""
    flat = x.reshape(-1)
    n = x.shape[0]
    mx = _block_reduce(np.maximum, flat, n, "tree")
    mn = _block_reduce(np.minimum, flat, n, "tree2")
    zero = (mx == 0) | (mn == 0)
    if zero.any():
        mx[zero] = x[zero].max(axis=1)
        mn[zero] = x[zero].min(axis=1)
    return mx, mn


def _legacy_into(qtype: str, x: np.ndarray, out: np.ndarray) -> None:
    """Q4_0/Q4_1/Q5_0/Q5_1 of float32 blocks ``x`` (n, 32) into ``out`` (n, size): gguf-py's
    arithmetic step for step (the same float32 operations in the same order), on per-thread
    scratch and with the nibble and fifth-bit packing done on 64-bit words. Its truncation
    is the cast itself: every scaled value of a block with a finite scale and inverse lies
    in [0.5, top + 1.5]. Blocks without (inf/NaN inputs, scales whose inverse overflows) are
    redone by the plain port (``QUANTIZE``), so every byte is gguf-py's."""
    spec = _LEGACY[qtype]
    n = x.shape[0]
    v = _scratch("v", x.size, _F32).reshape(n, 32)
    if spec.symmetric:
        np.abs(x, out=v)
        top = np.take_along_axis(x, v.argmax(axis=1)[:, None], axis=1)[:, 0]
        d = top / _F32(-(spec.top + 1) // 2)
        inv = _inverse(d)
        np.multiply(x, inv[:, None], out=v)
        mn = None
    else:
        mx, mn = _row_max_min(x)
        d = (mx - mn) / _F32(spec.top)
        inv = _inverse(d)
        np.subtract(x, mn[:, None], out=v)
        v *= inv[:, None]
    v += _F32(spec.bias)
    q = _scratch("q", x.size, np.uint8).reshape(n, 32)
    np.copyto(q, v, casting="unsafe")  # truncates toward zero: the values are positive
    np.minimum(q, np.uint8(spec.top), out=q)
    w = q.view(np.uint64)  # (n, 4): elements 0-15 in words 0-1, 16-31 in words 2-3
    packed = _scratch("p", 2 * n, np.uint64).reshape(n, 2)
    np.bitwise_and(w[:, 2:4], _LOW_NIBBLES, out=packed)
    packed <<= np.uint64(4)
    packed |= w[:, 0:2] & _LOW_NIBBLES
    out[:, spec.qs_at : spec.qs_at + 16] = packed.view(np.uint8)
    out[:, 0:2] = _f16_bits(d).view(np.uint8).reshape(n, 2)
    if mn is not None and spec.m_at is not None:
        out[:, spec.m_at : spec.m_at + 2] = _f16_bits(mn).view(np.uint8).reshape(n, 2)
    if spec.qh_at is not None:
        fifth = (w >> np.uint64(4)) & _LOW_BITS
        fifth *= _GATHER_BITS
        fifth >>= np.uint64(56)
        out[:, spec.qh_at : spec.qh_at + 4] = fifth.astype(np.uint8)
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(d) & np.isfinite(inv))
    if bad.any():
        out[bad] = QUANTIZE[qtype](x[bad])


#: the largest float32 below 0.5: adding it (with v's sign) and truncating rounds half away
#: from zero exactly for |v| <= 128 (benchmarks/check_q8_rounding.py tries every such float)
_HALF_DOWN = np.float32(0.5) - np.float32(2.0**-25)
_HALF_DOWN_BITS = np.array(_HALF_DOWN, np.float32).view(np.uint32)


def _nudge(v: np.ndarray) -> np.ndarray:
    """Add copysign(0.5 - 2**-25, v) in place: truncating the result rounds v half away from
    zero (ggml's roundf) for |v| <= 128."""
    v += np.copysign(_HALF_DOWN, v)
    return v


def _round_away(v: np.ndarray) -> np.ndarray:
    """ggml's roundf for Q8_0's scaled values (|v| <= 127, or NaN), as int8."""
    with np.errstate(invalid="ignore"):
        return _nudge(v.astype(np.float32, copy=True)).astype(np.int8)  # the cast truncates


def _round_away_torch(v: np.ndarray) -> np.ndarray:
    """The torch kernel's rounding of finite |v| <= 128 (the check script compares it with
    gguf-py's formula on every such float32)."""
    torch = _torch()
    tv = torch.from_numpy(np.array(v, np.float32))
    out = np.empty(v.shape, np.int8)
    _torch_round_into(torch, tv, torch.empty_like(tv), torch.from_numpy(out))
    return out


def _q8_scales(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-block max |x| (n,) -> (d, 1/d or 0), as gguf-py computes them (float32)."""
    d = m / _F32(127)
    return d, _inverse(d)


def _q_q8_0(x: np.ndarray) -> np.ndarray:
    """d = max|x| / 127; q = x/d rounded half away from zero (ggml's roundf), as gguf-py.

    The plain numpy kernel on (n, 32) float32 blocks; ``_q8_0_into`` is the one the writer
    uses (scratch buffers, torch when installed) and falls back to this for odd blocks.
    """
    n = x.shape[0]
    out = np.empty((n, 34), np.uint8)
    _q8_0_numpy(x.reshape(-1), out)
    return out


def _block_reduce(op: np.ufunc, v: np.ndarray, n: int, name: str) -> np.ndarray:
    """``op`` (np.maximum / np.minimum) over each of the ``n`` runs of ``v`` (flat, a power of
    two values per run): a tree of strided 1-D passes (pairs, then pairs of pairs ...), about
    2.4x numpy's row reduction, which loops over the rows of 32 one by one. The result is a
    view of the per-thread scratch ``name``."""
    cur = op(v[0::2], v[1::2], out=_scratch(name, v.size // 2, v.dtype))
    while cur.size > n:
        h = cur.size // 2
        cur = op(cur[0::2], cur[1::2], out=cur[:h])  # numpy buffers the overlap
    return cur


def _row_max_abs(a: np.ndarray) -> np.ndarray:
    """Each row's max of ``a`` (|x| values, float32 (n, k)), as numpy's float max gives it.

    The max is taken over the bit patterns as uint32 (ordered as the non-negative floats
    are, so the result is exact whatever the order of comparisons). A row holding NaN is
    redone with the float max, so its NaN is the one numpy picks."""
    m = _block_reduce(np.maximum, a.reshape(-1).view(np.uint32), a.shape[0], "tree")
    nan = m > np.uint32(0x7F800000)
    if nan.any():
        m[nan] = a[nan].max(axis=1).view(np.uint32)
    return m.view(_F32)


#: a Q8_0 block as one record: d (2 bytes) and the 32 levels, so the levels made contiguous are
#: copied into the blocks by one 1-D loop of 32-byte items (numpy iterates an (n, 32) copy or
#: cast row by row)
_Q8_RECORD = np.dtype([("d", "V2"), ("q", "V32")])


def _q8_0_numpy(src: np.ndarray, out: np.ndarray) -> None:
    """Q8_0 of ``src`` (n*32 values, any float dtype) into ``out`` (n, 34), numpy only, in flat
    passes over per-thread scratch (no temporaries per piece).

    The levels are rounded on the magnitudes, trunc(|x| / d + (0.5 - 2**-25)), and the sign
    put back by bits: float32 arithmetic is symmetric in the sign, so this is gguf-py's
    rounding of x / d, and the scalar add is cheaper than adding a signed constant."""
    n = out.shape[0]
    x = _widen_into(src, "x")
    a = _scratch("a", x.size, _F32)
    np.bitwise_and(x.view(np.uint32), np.uint32(0x7FFFFFFF), out=a.view(np.uint32))  # |x|
    d, inv = _q8_scales(_row_max_abs(a.reshape(n, 32)))
    np.multiply(a.reshape(n, 32), inv[:, None], out=a.reshape(n, 32))
    a += _HALF_DOWN
    u = x.view(np.uint32)
    u &= np.uint32(0x80000000)
    a.view(np.uint32).__ior__(u)
    rec = _records(out, _Q8_RECORD)
    if rec is None:
        out[:, 0:2] = _f16_bits(d).view(np.uint8).reshape(n, 2)
        with np.errstate(invalid="ignore"):  # the cast truncates toward zero (NaN: as numpy)
            np.copyto(out[:, 2:].view(np.int8), a.reshape(n, 32), casting="unsafe")
        return
    q = _scratch("q8", x.size, np.int8)
    with np.errstate(invalid="ignore"):  # the cast truncates toward zero (NaN: as numpy does)
        np.copyto(q, a, casting="unsafe")
    rec["q"] = q.view("V32")
    rec["d"] = _f16_bits(d).view("V2")


def _records(out: np.ndarray, record: np.dtype) -> np.ndarray | None:
    """``out`` (n, record size) uint8 as n records, or None when it is not contiguous."""
    if not out.flags.c_contiguous:
        return None
    return out.reshape(-1).view(record)


def _torch_round_into(torch: Any, v: Any, tmp: Any, out: Any) -> None:
    """v + copysign(0.5 - 2**-25, v), truncated into the int8 tensor ``out`` (v is changed)."""
    torch.copysign(_TORCH_HALF_DOWN[0], v, out=tmp)
    v.add_(tmp)
    out.copy_(v)  # float -> int8 truncates toward zero (finite values in [-128, 128] only)


_TORCH_HALF_DOWN: list[Any] = []


def _q8_0_torch(src: np.ndarray, out: np.ndarray) -> None:
    """Q8_0 with torch's vectorised kernels (one thread each): widen, |x|, row max, scale,
    round, cast into ``out``. Every step is exact or one IEEE operation, as numpy's; blocks
    whose scale or inverse is not finite (inf/NaN inputs, all-denormal blocks) are redone by
    the numpy kernel, so the bytes are gguf-py's in every case (tests/test_gguf.py)."""
    torch = _torch()
    if not _TORCH_HALF_DOWN:
        _TORCH_HALF_DOWN.append(torch.tensor(float(_HALF_DOWN), dtype=torch.float32))
    n = out.shape[0]
    size = n * 32
    x = _scratch_torch("tx", size)
    x.copy_(_as_torch(torch, src))
    a = _scratch_torch("ta", size)
    torch.abs(x, out=a)
    m = a.view(n, 32).amax(dim=1).numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        d, inv = _q8_scales(m)
    torch.mul(x.view(n, 32), torch.from_numpy(inv)[:, None], out=a.view(n, 32))
    bad = ~(np.isfinite(d) & np.isfinite(inv))
    if bad.any():
        a.view(n, 32)[torch.from_numpy(bad)] = 0.0  # finite until redone below
    tout = torch.from_numpy(out)
    _torch_round_into(torch, a.view(n, 32), x.view(n, 32), tout[:, 2:].view(torch.int8))
    # float32 -> float16 rounds to nearest even as numpy does (all finite d >= 0 compared)
    tout[:, 0:2].view(torch.float16).copy_(torch.from_numpy(d)[:, None])
    if bad.any():
        rows = np.flatnonzero(bad)
        fix = np.empty((rows.size, 34), np.uint8)
        _q8_0_numpy(widen(src.reshape(n, 32)[rows]).reshape(-1), fix)
        out[rows] = fix


def _as_torch(torch: Any, src: np.ndarray) -> Any:
    """A torch view of a float numpy array (bfloat16 through its bits)."""
    if is_bf16(src.dtype):
        return torch.from_numpy(np.ascontiguousarray(src).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(src))


#: Q8_0 values above which importing torch (about 1.5 s of CPU) pays for itself: its kernel
#: saves about 1 ns per value over numpy's (benchmarks/bench_gguf.py)
TORCH_MIN_ELEMENTS = 2 << 30


def torch_pays(q8_elements: int) -> bool:
    """Whether the Q8_0 kernel should use torch for this many values (when installed)."""
    return q8_elements >= TORCH_MIN_ELEMENTS


def _q8_0_into(src: np.ndarray, out: np.ndarray, use_torch: bool = True) -> None:
    torch_reads = is_bf16(src.dtype) or str(src.dtype) in _TORCH_SOURCES
    if use_torch and torch_reads and _torch() is not None:
        _q8_0_torch(src, out)
    else:
        _q8_0_numpy(src, out)


_TORCH_SOURCES = frozenset({"float16", "float32"})


# -- per-thread scratch -----------------------------------------------------------------------

_LOCAL = threading.local()


def _scratch(name: str, size: int, dtype: Any) -> np.ndarray:
    """A reusable per-thread buffer of ``size`` elements (contents undefined): pieces reuse
    the same memory, so quantizing allocates (and page-faults) nothing per piece."""
    bufs: dict[str, np.ndarray] = _LOCAL.__dict__.setdefault("np", {})
    dt = np.dtype(dtype)
    nbytes = size * dt.itemsize
    b = bufs.get(name)
    if b is None or b.size < nbytes:
        b = np.empty(max(nbytes, PIECE_ELEMENTS * 4), np.uint8)
        bufs[name] = b
    return b[:nbytes].view(dt)


def _scratch_torch(name: str, size: int) -> Any:
    """A per-thread float32 torch tensor of ``size`` elements sharing a numpy scratch."""
    torch = _torch()
    return torch.from_numpy(_scratch(name, size, _F32))


def _widen_into(src: np.ndarray, name: str) -> np.ndarray:
    """``src`` as float32 in the per-thread scratch ``name`` (bf16 by a shift, f16 by bits:
    both exact)."""
    x = _scratch(name, src.size, _F32)
    if is_bf16(src.dtype):
        u = np.ascontiguousarray(src).view(np.uint16)
        np.left_shift(u, 16, out=x.view(np.uint32), dtype=np.uint32)
    elif not (src.dtype == _F16 and _f16_into(src, x, name)):
        np.copyto(x, src.reshape(-1), casting="unsafe")
    return x


#: 2**112: float32 bits ``(h & 0x7FFF) << 13`` times this are the float16 ``h``'s magnitude
_F16_SCALE = np.float32(2.0**112)
#: the smallest float32 subnormal: times 2**112 it is not zero unless this thread's FPU treats
#: subnormal inputs as zero (DAZ, which some libraries set), when the bit trick would be wrong
_SUBNORMAL = np.array([1], np.uint32).view(_F32)


def _f16_into(src: np.ndarray, x: np.ndarray, name: str) -> bool:
    """float16 -> float32 into ``x`` by bits, 3x numpy's conversion (which goes element by
    element): the magnitude's bits moved up 13 places read as a float32 that is 2**-112 times
    the value (float16 subnormals become float32 subnormals), multiplied by 2**112 (exact),
    then the sign bit. Returns False, having written nothing, for pieces holding inf or NaN
    (numpy's conversion keeps their payloads; the caller uses it) or on an FPU set to DAZ."""
    h = np.ascontiguousarray(src).reshape(-1).view(np.uint16)
    t = _scratch(name + ".t16", h.size, np.uint16)
    np.bitwise_and(h, np.uint16(0x7FFF), out=t)
    if (h.size and t.max() >= 0x7C00) or not (_SUBNORMAL * _F16_SCALE)[0]:
        return False
    xb = x.view(np.uint32)
    np.left_shift(t, 13, out=xb, dtype=np.uint32)
    x *= _F16_SCALE
    np.bitwise_and(h, np.uint16(0x8000), out=t)
    sign = _scratch(name + ".s32", h.size, np.uint32)
    np.left_shift(t, 16, out=sign, dtype=np.uint32)
    xb |= sign
    return True


_TORCH: list[Any] = []


def _torch() -> Any:
    """torch when it is installed (``SDTOOL_NO_TORCH=1``: never), else None. Imported on first
    use: only quantizing ever asks. Sets torch's intra-op threads to 1 for this process."""
    if not _TORCH:
        import importlib.util

        mod = None
        if importlib.util.find_spec("torch") is not None and not os.environ.get("SDTOOL_NO_TORCH"):
            import torch

            # sdtool runs its own threads over pieces; torch's intra-op threads would only
            # spin against them (measured: 10x slower on a busy 2-core machine)
            torch.set_num_threads(1)
            mod = torch
        _TORCH.append(mod)
    return _TORCH[0]


def widen(part: np.ndarray) -> np.ndarray:
    """Values as contiguous float32 (bf16 by a shift: exact, and 3x numpy's cast)."""
    if is_bf16(part.dtype):
        u = np.ascontiguousarray(part).view(np.uint16)
        return np.left_shift(u, 16, dtype=np.uint32).view(_F32)
    return np.ascontiguousarray(part, dtype=_F32)


def _q_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: NaN made quiet, round to nearest even."""
    n = np.ascontiguousarray(x).view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(1 << 22), n)
    r = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16
    return r.astype(np.uint16).view(np.uint8)


def _q_f16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(_F16)).view(np.uint8)


def _q_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=_F32).view(np.uint8)


# -- K-quants (llama.cpp's quantize_row_q*_K_ref, vectorised over blocks) ---------------------


def _nearest(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int (round half to even), kept in float32: the levels are small
    integers, exact in float32, so no integer round trip is needed."""
    return np.rint(v)


def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the first axis in index order, as the C loops add (not pairwise).

    The K-quant helpers keep sub-blocks transposed, (elements, sub-blocks), C-contiguous:
    numpy reduces such an outer axis row by row (``acc += row``), which is the C loop's
    order (tests/test_gguf.py checks it against the explicit loop, bit for bit).
    """
    return np.add.reduce(np.ascontiguousarray(terms), axis=0)


def _k_buf(name: str, like: np.ndarray) -> np.ndarray:
    """Per-thread float32 scratch shaped like ``like`` (the K-quant search's work arrays)."""
    return _scratch(name, like.size, _F32).reshape(like.shape)


def _levels(
    iscale: np.ndarray, v: np.ndarray, lo: np.float32, hi: np.float32, out: np.ndarray
) -> np.ndarray:
    """clip(nearest_int(iscale * v), lo, hi) into ``out``."""
    np.multiply(iscale, v, out=out)
    np.rint(out, out=out)
    return np.clip(out, lo, hi, out=out)


def _make_qkx2(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants (use_mad false) over sub-blocks x (n, m) -> (scale, the_min, L).

    Every full-size step runs in place on per-thread scratch (no temporaries); the float32
    operations and their order are the C loop's."""
    mn = np.minimum(x.min(axis=0), _F32(0))
    mx = x.max(axis=0)
    t, xm, L, la, wl, diff = (_k_buf(k, x) for k in ("kt", "kxm", "kL", "kla", "kwl", "kd"))
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(np.multiply(w, x, out=t))
    flat = mx == mn
    top = _F32(nmax)
    zero = _F32(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rng = mx - mn
        iscale = np.where(flat, zero, top / rng)
        scale = _F32(1) / iscale
        np.subtract(x, mn, out=xm)
        _levels(iscale, xm, zero, top, L)

        def error(s: np.ndarray, m: np.ndarray, lv: np.ndarray) -> np.ndarray:
            """sum of w * (s * L + m - x)**2 per sub-block."""
            d = np.multiply(s, lv, out=diff)
            d += m
            d -= x
            d *= d
            d *= w
            return _seq_sum(d)

        best = error(scale, mn, L)
        for step in range(nstep + 1):
            isc = np.where(flat, zero, (_F32(rmin) + _F32(rdelta) * _F32(step) + top) / rng)
            _levels(isc, xm, zero, top, la)
            np.multiply(w, la, out=wl)
            sum_l = _seq_sum(wl)
            sum_l2 = _seq_sum(np.multiply(wl, la, out=t))
            sum_xl = _seq_sum(np.multiply(wl, x, out=t))
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, zero, this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min, la)
            better = (D > 0) & (cur < best) & ~flat
            if better.any():
                np.copyto(L, la, where=better)
                best = np.where(better, cur, best)
                scale = np.where(better, this_scale, scale)
                mn = np.where(better, this_min, mn)
    scale = np.where(flat, zero, scale).astype(_F32)
    return scale, (-mn).astype(_F32), np.where(flat, zero, L)


def _quant_k45(
    x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray]:
    """The shared part of Q4_K and Q5_K: the 16 head bytes (d, dmin, 12 packed 6-bit scales
    and mins) and the final levels L (n, 256) uint8."""
    n = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(n * 8, 32).T)  # (32, sub-blocks)
    av = np.sqrt(_seq_sum(sub * sub) / _F32(32))
    w = av + np.abs(sub)
    scales, mins, L = _make_qkx2(sub, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    L = L.T.reshape(n, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    with np.errstate(divide="ignore"):
        inv_s = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
        inv_m = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
    ls = np.minimum(_nearest(inv_s[:, None] * scales).astype(np.int32).astype(np.uint8), 63)
    lm = np.minimum(_nearest(inv_m[:, None] * mins).astype(np.int32).astype(np.uint8), 63)
    packed = np.empty((n, 12), np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    d16 = (max_scale / _F32(63)).astype(_F16)
    dmin16 = (max_min / _F32(63)).astype(_F16)
    sc, m = _k4_scale_min(packed)
    d = (d16.astype(_F32)[:, None] * sc.astype(_F32))[:, :, None]
    dm = (dmin16.astype(_F32)[:, None] * m.astype(_F32))[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        lnew = np.clip(_nearest((x.reshape(n, 8, 32) + dm) / d), 0, _F32(nmax))
    L = np.where(d != 0, lnew, L).astype(np.uint8).reshape(n, 256)
    head = np.concatenate(
        [d16.view(np.uint8).reshape(n, 2), dmin16.view(np.uint8).reshape(n, 2), packed], axis=1
    )
    return head, L


def _q_q4_k(x: np.ndarray) -> np.ndarray:
    head, L = _quant_k45(x, 15, -1.0, 0.1, 20)
    n = x.shape[0]
    c = L.reshape(n, 4, 2, 32)
    qs = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([head, qs], axis=1)


def _q_q5_k(x: np.ndarray) -> np.ndarray:
    head, L = _quant_k45(x, 31, -0.5, 0.1, 15)
    n = x.shape[0]
    c = L.reshape(n, 4, 2, 32)
    qs = ((c[:, :, 0] & 0x0F) | ((c[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
    bits = (c >> 4).reshape(n, 8, 32)  # bit 2c: chunk c's first 32 levels, 2c+1: its next 32
    qh = np.zeros((n, 32), np.uint8)
    for k in range(8):
        qh |= bits[:, k] << k
    return np.concatenate([head, qh, qs], axis=1)


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(rmse_type 1, no weights) over sub-blocks x (n, m) -> (scale, L + nmax).

    In place on per-thread scratch, the C loop's float32 operations in its order."""
    i = np.abs(x).argmax(axis=0)[None, :]
    mx = np.take_along_axis(x, i, axis=0)[0]
    zero = np.abs(mx) < GROUP_MAX_EPS
    w, wx, t, lvl, lv = (_k_buf(k, x) for k in ("qw", "qwx", "qt", "ql", "qlv"))
    np.multiply(x, x, out=w)
    np.multiply(w, x, out=wx)
    lo, hi = _F32(-nmax), _F32(nmax - 1)

    def fit(iscale: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _levels(iscale, x, lo, hi, out)
        sumlx = _seq_sum(np.multiply(wx, out, out=t))
        wll = np.multiply(w, out, out=t)
        wll *= out
        return sumlx, _seq_sum(wll)

    with np.errstate(divide="ignore", invalid="ignore"):
        sumlx, suml2 = fit(np.where(zero, _F32(0), _F32(-nmax) / mx), lvl)
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            isc = np.where(zero, _F32(0), -(_F32(nmax) + _F32(0.1) * _F32(step)) / mx)
            slx, sl2 = fit(isc, lv)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            if better.any():
                np.copyto(lvl, lv, where=better)
                scale = np.where(better, slx / sl2, scale)
                best = np.where(better, scale * slx, best)
    scale = np.where(zero, _F32(0), scale).astype(_F32)
    return scale, np.where(zero, _F32(0), lvl + _F32(nmax))


def _q_q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(n * 16, 16).T)  # (16, sub-blocks)
    scales, L = _make_qx(sub, 32)
    scales, L = scales.reshape(n, 16), L.T.reshape(n, 16, 16)
    max_scale = _signed_absmax(scales)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, _F32(1), _F32(-128) / max_scale)
        d16 = np.where(zero, _F32(0), _F32(1) / iscale).astype(_F16)
        sc = np.minimum(_nearest(iscale[:, None] * scales), 127).astype(np.int8)
        sc = np.where(zero[:, None], np.int8(0), sc)
        d = (d16.astype(_F32)[:, None] * sc.astype(_F32))[:, :, None]
        lnew = np.clip(_nearest(x.reshape(n, 16, 16) / d), -32, 31) + _F32(32)
    L = np.where(d != 0, lnew, L)
    L = np.where(zero[:, None, None], 0, L).astype(np.uint8).reshape(n, 2, 4, 32)
    ql = np.empty((n, 2, 64), np.uint8)
    ql[:, :, 0:32] = (L[:, :, 0] & 0x0F) | ((L[:, :, 2] & 0x0F) << 4)
    ql[:, :, 32:64] = (L[:, :, 1] & 0x0F) | ((L[:, :, 3] & 0x0F) << 4)
    h = L >> 4
    qh = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)
    parts = [
        ql.reshape(n, 128),
        qh.reshape(n, 64),
        sc.view(np.uint8),
        d16.view(np.uint8).reshape(n, 2),
    ]
    return np.concatenate(parts, axis=1)


QUANTIZE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _q_f32,
    "F16": _q_f16,
    "BF16": _q_bf16,
    "Q4_0": _q_q4_0,
    "Q4_1": _q_q4_1,
    "Q5_0": _q_q5_0,
    "Q5_1": _q_q5_1,
    "Q8_0": _q_q8_0,
    "Q4_K": _q_q4_k,
    "Q5_K": _q_q5_k,
    "Q6_K": _q_q6_k,
}
#: K-quants: sdtool's port of llama.cpp's C reference (gguf-py has none to compare with)
K_QUANTS = frozenset({"Q4_K", "Q5_K", "Q6_K"})


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _pieces(n_blocks: int, block: int) -> list[tuple[int, int]]:
    per = max(1, PIECE_ELEMENTS // block)
    return [(i, min(n_blocks, i + per)) for i in range(0, n_blocks, per)]


def _run(jobs: list[Callable[[], None]], threads: int) -> None:
    if threads <= 1 or len(jobs) <= 1:
        for j in jobs:
            j()
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for f in [pool.submit(j) for j in jobs]:
            f.result()


def plain_numpy(name: str) -> np.dtype:
    """The numpy dtype of a plain (unblocked) type such as F16."""
    from sdtool import dtypes

    code = get(name).dtype
    if code is None:
        raise UnsupportedDtype(f"{name} is a block-quantized type")
    return np.dtype(dtypes.from_code(code).numpy)


def get(name: str) -> GGMLType:
    try:
        return GGML_TYPES[name]
    except KeyError:
        raise UnsupportedDtype(f"unknown ggml type {name!r}") from None


def quantize(values: np.ndarray, qtype: str, *, threads: int = 1) -> np.ndarray:
    """``values`` (any float dtype, size a multiple of the block) -> the type's bytes (1-D uint8).

    The values are widened to float32 first (as gguf-py does); pieces run on ``threads``.
    Raises UnsupportedDtype for a type sdtool does not quantize, ValueError for a size that is
    not a multiple of the block.
    """
    t = get(qtype)
    if qtype not in QUANTIZE:
        raise UnsupportedDtype(f"sdtool does not quantize to {qtype}")
    flat = values.reshape(-1)
    if flat.size % t.block:
        raise ValueError(f"{flat.size} values are not a whole number of {qtype} blocks ({t.block})")
    n = flat.size // t.block
    out = np.empty((n, t.size), np.uint8)

    def job(a: int, b: int) -> Callable[[], None]:
        return lambda: encode_into(qtype, flat[a * t.block : b * t.block], out[a:b])

    _run([job(a, b) for a, b in _pieces(n, t.block)], threads)
    return out.reshape(-1)


class F16Overflow(ValueError):
    """Finite values that float16 cannot hold (``count`` of them)."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} value(s) overflow float16")
        self.count = count


class NonFinite(ValueError):
    """inf or NaN given to a K-quant (``count`` of them): llama.cpp's reference has no rule
    for them (its rounding helper is undefined there), so sdtool refuses."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} value(s) are inf or NaN")
        self.count = count


def encode_into(qtype: str, src: np.ndarray, out: np.ndarray, *, use_torch: bool = True) -> None:
    """Encode the values ``src`` (1-D, any float dtype, whole blocks) as ``qtype`` into ``out``
    (their bytes: (blocks, size) or flat uint8). F16 from a wider type raises F16Overflow when
    a finite value becomes inf; BF16 from bfloat16 keeps the bits (NaNs made quiet, as ggml's
    conversion does); the rest is gguf-py's / ggml's conversion of the float32 values. The
    K-quants raise NonFinite for inf or NaN values. ``use_torch``: Q8_0 may use torch's kernel
    (when installed; the bytes are the same either way)."""
    t = get(qtype)
    n = src.size // t.block
    out = out.reshape(n, t.size)
    bf16 = is_bf16(src.dtype)
    if qtype == "Q8_0":
        _q8_0_into(src, out, use_torch)
    elif qtype == "BF16" and bf16:
        u = np.ascontiguousarray(src).view(np.uint16)
        o = out.reshape(-1).view(np.uint16)
        np.copyto(o, u)
        nan = (u & 0x7FFF) > 0x7F80
        if nan.any():
            o[nan] |= np.uint16(0x40)
    elif qtype == "F16":
        o16 = out.reshape(-1).view(_F16)
        wide = _widen_into(src, "x") if bf16 else src  # bfloat16 -> float32 is exact
        with np.errstate(over="ignore", invalid="ignore"):
            np.copyto(o16, wide, casting="unsafe")
        if (src.dtype.kind == "f" and src.dtype.itemsize > 2) or bf16:
            over = int(np.count_nonzero(np.isinf(o16) & np.isfinite(wide)))
            if over:
                raise F16Overflow(over)
    elif qtype == "F32":
        o32 = out.reshape(-1).view(_F32)
        if bf16:
            u = np.ascontiguousarray(src).view(np.uint16)
            np.left_shift(u, 16, out=o32.view(np.uint32), dtype=np.uint32)
        else:
            np.copyto(o32, src, casting="unsafe")
    else:
        x = _widen_into(src, "x").reshape(n, t.block)
        if qtype in K_QUANTS:
            bad = x.size - int(np.count_nonzero(np.isfinite(x)))
            if bad:
                raise NonFinite(bad)
        with np.errstate(all="ignore"):  # tiny blocks: scales overflow, then decode as 0
            if qtype in _LEGACY:
                _legacy_into(qtype, x, out)
            else:
                out[...] = QUANTIZE[qtype](x)


def dequantize(raw: np.ndarray, qtype: str, *, threads: int = 1) -> np.ndarray:
    """A quantized type's bytes (1-D uint8) -> float32 values, exactly as gguf-py's dequantize."""
    t = get(qtype)
    fn = DEQUANTIZE.get(qtype)
    if fn is None:
        raise UnsupportedDtype(
            f"sdtool cannot dequantize {qtype} tensors (it reads F32/F16/BF16, Q4_0-Q8_0 "
            "and Q2_K-Q6_K)"
        )
    if raw.size % t.size:
        raise ValueError(f"{raw.size} bytes are not a whole number of {qtype} blocks")
    n = raw.size // t.size
    blocks = raw.reshape(n, t.size)
    out = np.empty((n, t.block), _F32)

    def job(a: int, b: int) -> Callable[[], None]:
        def run() -> None:
            out[a:b] = fn(blocks[a:b])

        return run

    _run([job(a, b) for a, b in _pieces(n, t.block)], threads)
    return out.reshape(-1)
