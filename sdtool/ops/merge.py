"""``merge``: checkpoint arithmetic (weighted sum, add difference, TIES, DARE, slerp), streamed.

Each output tensor is computed from the same-named tensor of every input when the writer
reaches it, in float32 whatever the inputs' dtypes, then cast to the output dtype; nothing
holds a whole model. Elementwise methods (weighted-sum, add-difference, dare) read inputs in
pieces of ``arith.PIECE`` elements: into safetensors, the writer's two threads compute each
piece and write it (``OutTensor.pieces``: no output tensor in memory); into a .ckpt, they are
computed ahead of the writer on two threads (``arith.Ahead``: about 16 MiB of outputs). ties
first computes each delta's threshold over the whole tensor (one float32 array of its size),
then goes piece by piece the same way; slerp needs whole-tensor norms and holds one tensor per
input (float32) at a time.

The methods (``a`` = first input, ``b``, ``c`` the next, ``t`` = alpha, all float32):

============== ======== =============================================================
method         inputs   value
============== ======== =============================================================
weighted-sum   A B      (1 - t) * a + t * b   (A1111's formula; sd-mecha's lerp)
add-difference A B C    a + t * (b - c)
ties           BASE M.. base + t * ties(m_i - base; density)       (arXiv 2306.01708)
dare           BASE M.. base + t * sum_i where(keep_i, (m_i - base) * (1 / density), 0)
slerp          A B      spherical interpolation of the flattened tensors (sd-mecha)
============== ======== =============================================================

Key rules (each key gets one, reported in the plan):

* ``merge``: a floating tensor present in every input with the same shape.
* ``merge-slice``: present everywhere, same rank, the others smaller than A in some
  dimensions (A a 9-channel inpainting or 8-channel pix2pix conv_in): the common leading
  region is merged, the rest keeps A's values.
* ``copy``: kept as A has it (cast to ``dtype``): integer/bool tensors (``position_ids``),
  a key some input lacks, a shape no rule can align.
* keys that A lacks are not written (``skipped`` in the result).

Example:
    >>> r = merge(["a.safetensors", "b.ckpt"], "ab.safetensors", method="weighted-sum", alpha=0.3)
    >>> print(r.counts)
"""

from __future__ import annotations

import json
import re
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from math import prod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sdtool import __version__
from sdtool.dtypes import DType
from sdtool.errors import SdtoolError, UsageError
from sdtool.formats.open import opened, path_of
from sdtool.model import ModelFile
from sdtool.ops import arith
from sdtool.ops.arith import (
    SCRATCH,
    Ahead,
    Inputs,
    Output,
    Overflows,
    Task,
    local_span,
    pieces,
    run_pieces,
    store,
    write_result,
)
from sdtool.results import JsonKey, Result, json_key, rounded
from sdtool.vocab import CASTABLE, MERGE_METHODS, cast_target, dtype_name
from sdtool.write import WriteOptions, options_from, output_format
from sdtool.write.atomic import check_output
from sdtool.write.plan import OutTensor

SCHEMA = "sdtool.merge/1"


@dataclass(frozen=True)
class Method:
    """One merge method: how many inputs, and whether it works piece by piece."""

    name: str
    min_inputs: int
    max_inputs: int | None  # None: any number
    elementwise: bool
    summary: str
    #: computed piece by piece (elementwise, or ties: after one whole-tensor statistic)
    by_pieces: bool = True


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("weighted-sum", 2, 2, True, "(1 - alpha) * A + alpha * B"),
        Method("add-difference", 3, 3, True, "A + alpha * (B - C)"),
        Method("ties", 2, None, False, "BASE + alpha * TIES(M_i - BASE; density)"),
        Method("dare", 2, None, True, "BASE + alpha * sum(DARE(M_i - BASE; density, seed))"),
        Method("slerp", 2, 2, False, "slerp(A, B; alpha) on the flattened tensor", False),
    )
}

assert tuple(METHODS) == MERGE_METHODS, "vocab.MERGE_METHODS lists the methods for --help"

#: merge-rule names, in the order reports list them
RULES = ("merge", "merge-slice", "copy")


# -- block weights (supermerger's MBW lists) ------------------------------------------------

#: architecture -> block names after BASE, in supermerger's order (its BLOCKID / BLOCKIDXLL)
BLOCKS: dict[str, list[str]] = {
    "sd1": [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)],
    "sdxl": [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)],
}
_UNET = "model.diffusion_model."
_IN = re.compile(r"\.input_blocks\.(\d+)\.")
_OUT = re.compile(r"\.output_blocks\.(\d+)\.")


def block_of(key: str, arch: str) -> str:
    """The supermerger block a key belongs to: BASE, INnn, M00 or OUTnn (ldm key names).

    As supermerger's blockfromkey: time_embed (and SDXL label_emb) -> IN00; ``out.`` -> the
    last OUT block; everything outside ``model.diffusion_model.`` (text encoders, VAE) -> BASE.
    """
    if not key.startswith(_UNET):
        return "BASE"
    last_out = BLOCKS[arch][-1]
    rest = key[len(_UNET) :]
    if rest.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if rest.startswith("out."):
        return last_out
    if rest.startswith("middle_block."):
        return "M00"
    m = _IN.search("." + rest)
    if m:
        return f"IN{int(m.group(1)):02d}"
    m = _OUT.search("." + rest)
    if m:
        return f"OUT{int(m.group(1)):02d}"
    return "BASE"


def unet_arch(keys: Sequence[str]) -> str | None:
    """``sd1`` (12 input blocks: SD 1.x/2.x), ``sdxl`` (9) or None (no ldm UNet)."""
    found = [int(m.group(1)) for k in keys if k.startswith(_UNET) and (m := _IN.search("." + k))]
    if not found:
        return None
    return "sd1" if max(found) >= 11 else "sdxl"


def parse_block_weights(text: str, arch: str) -> dict[str, float]:
    """A supermerger weight list -> block name -> alpha.

    ``text`` is comma-separated numbers: BASE then the blocks (26 for SD 1.x/2.x, 20 for
    SDXL). A 26-value list given for SDXL is converted as supermerger's weighttoxl does
    (IN00-IN08, M00, OUT00-OUT08 taken from the SD1 positions).
    """
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UsageError(f"block_weights={text!r} is not comma-separated numbers") from None
    names = ["BASE", *BLOCKS[arch]]
    if arch == "sdxl" and len(values) == 26:
        values = values[:10] + values[13:23]
    if len(values) != len(names):
        want = "26 (SD 1.x/2.x)" if arch == "sd1" else "20 (SDXL) or 26 (converted)"
        raise UsageError(
            f"the block weights have {len(values)} values; this {arch} UNet wants {want}: "
            "BASE, IN.., M00, OUT.."
        )
    return dict(zip(names, values, strict=True))


# -- aligning inputs that name keys differently ---------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where another input holds the values of one of A's keys: one tensor, or several
    concatenated along dim 0 (diffusers' q/k/v for an OpenCLIP in_proj_weight), possibly
    shaped differently only by unit dimensions (a 1x1 conv against a Linear)."""

    keys: tuple[str, ...]
    shape: tuple[int, ...]

    def read(self, io: Inputs, m: ModelFile, start: int, count: int) -> np.ndarray:
        if len(self.keys) == 1:
            return io.f32(m, self.keys[0], start, count)
        whole = np.concatenate([io.f32(m, k) for k in self.keys])
        return whole[start : start + count]

    def read_into(
        self, io: Inputs, m: ModelFile, start: int, out: np.ndarray, slot: int
    ) -> np.ndarray:
        """``read`` into the float32 array ``out`` (``out.size`` elements)."""
        if len(self.keys) == 1:
            return io.f32_into(m, self.keys[0], start, out, slot)
        out[...] = self.read(io, m, start, out.size)
        return out

    def whole(self, io: Inputs, m: ModelFile) -> np.ndarray:
        return np.concatenate([io.f32(m, k) for k in self.keys]).reshape(self.shape)


#: identify's component name -> sdtool.layouts' diffusers component (where layouts differ)
LAYOUT_COMPONENT = {"unet": "unet", "vae": "vae"}


def align(a: ModelFile, other: ModelFile) -> tuple[dict[str, Source], list[str]]:
    """A's key -> where ``other`` holds it, and notes on how names were aligned.

    Same names first; then, component by component as ``identify`` finds them in both, other
    prefixes (a bare UNet file against a checkpoint's ``model.diffusion_model.``) and, through
    sdtool.layouts' tables for A's family, diffusers names against ldm names.
    """
    out = {k: Source((k,), other.tensors[k].shape) for k in a.tensors if k in other.tensors}
    notes: list[str] = []
    if len(out) == len(a.tensors):
        return out, notes
    from sdtool.identify import identify

    ia, ib = identify(a), identify(other)
    family = ia.architecture or ib.architecture
    theirs = {c.name: c for c in ib.components}
    for ca in ia.components:
        cb = theirs.get(ca.name)
        if cb is None or (ca.prefix == cb.prefix and ca.layout == cb.layout):
            continue
        found = 0
        for key in ca.keys:
            if key in out:
                continue
            src = _aligned(key, a.tensors[key].shape, ca, cb, other, family)
            if src is not None:
                out[key] = src
                found += 1
        if found:
            how = (
                f"{cb.layout} names through the {family} tables"
                if ca.layout != cb.layout
                else f"prefix {cb.prefix or '(none)'!r} for {ca.prefix or '(none)'!r}"
            )
            notes.append(f"{other.path.name}: {found} {ca.name} key(s) aligned by {how}")
    return out, notes


def _aligned(
    key: str,
    a_shape: tuple[int, ...],
    ca: Any,
    cb: Any,
    other: ModelFile,
    family: str | None,
) -> Source | None:
    rel = key[len(ca.prefix) :]
    if ca.layout == cb.layout:
        k = cb.prefix + rel
        return Source((k,), other.tensors[k].shape) if k in other.tensors else None
    comp = LAYOUT_COMPONENT.get(ca.name)
    if family is None or comp is None:
        return None
    try:
        from sdtool import layouts

        if ca.layout == "ldm":  # A single-file, the other diffusers
            maps = layouts.keymap(family, comp, "to_diffusers", prefix=ca.prefix)(key)
        else:
            maps = layouts.keymap(family, comp, "to_single", prefix=cb.prefix)(rel)
    except (ImportError, SdtoolError):
        return None
    keys: list[str] = []
    for mp in sorted(maps, key=lambda mp: mp.part):
        k = (cb.prefix + mp.target) if ca.layout == "ldm" else mp.target
        if k not in other.tensors or mp.kind == "join":
            return None
        keys.append(k)
    if not keys:
        return None
    shapes = [other.tensors[k].shape for k in keys]
    shape = shapes[0] if len(keys) == 1 else (sum(s[0] for s in shapes), *shapes[0][1:])
    if prod(shape) == prod(a_shape) and shape != a_shape:
        shape = a_shape  # a unit-dimension layout op (squeeze / unsqueeze): same values
    return Source(tuple(keys), shape)


# -- the plan -------------------------------------------------------------------------------


@dataclass
class KeyPlan:
    """What happens to one key of the output."""

    name: str
    rule: str  # merge | merge-slice | copy
    reason: str = ""
    alpha: float | None = None
    block: str | None = None
    region: tuple[int, ...] | None = None  # merge-slice: the merged leading region


@dataclass(frozen=True)
class MergeResult(Result):
    """What ``merge`` did (or, with ``dry_run``, would do). ``to_json`` is docs/merge.md's."""

    JSON_SCHEMA: ClassVar[str | None] = SCHEMA
    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = (
        "inputs", "output", "method", "alpha", "density", "seed", "dtype", "block_weights",
        "dry_run", "counts", "keys", "skipped", "overflows", "recipe", "notes", "output_bytes",
        "verified", "seconds",
    )  # fmt: skip

    inputs: list[Path]
    output: Path
    method: str
    alpha: float
    density: float | None
    seed: int | None
    dtype: str
    block_weights: dict[str, float] | None
    keys: list[KeyPlan] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # key (not in A) -> which inputs
    overflows: dict[str, int] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False
    output_bytes: int = 0
    verified: bool = False
    seconds: float = field(default=0.0, metadata=json_key(as_=rounded))

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(k.rule for k in self.keys)
        return {r: c[r] for r in RULES if c[r]}


def plan_keys(
    models: Sequence[ModelFile],
    method: Method,
    alpha: float,
    blocks: dict[str, float] | None,
    arch: str | None,
    sources: Sequence[dict[str, Source]] | None = None,
) -> tuple[list[KeyPlan], dict[str, str]]:
    """The rule for every key of the first model, and the keys only other inputs have.

    ``sources``: per other input, A's key -> where it holds it (``align``); default: the
    same names.
    """
    a, others = models[0], models[1:]
    if sources is None:
        sources = [
            {k: Source((k,), m.tensors[k].shape) for k in a.tensors if k in m.tensors}
            for m in others
        ]
    plans: list[KeyPlan] = []
    for name, info in a.tensors.items():
        block = block_of(name, arch) if blocks is not None and arch is not None else None
        t = blocks[block] if blocks is not None and block is not None else alpha
        if not info.dtype.is_float:
            plans.append(KeyPlan(name, "copy", f"{info.dtype} tensor: never merged"))
            continue
        if info.dtype.code not in CASTABLE:
            plans.append(KeyPlan(name, "copy", f"{info.dtype} tensor: sdtool does not compute it"))
            continue
        missing = [i for i, src in enumerate(sources, 1) if name not in src]
        if missing:
            which = ", ".join(_letter(i) for i in missing)
            plans.append(KeyPlan(name, "copy", f"not in {which}"))
            continue
        srcs = [src[name] for src in sources]
        bad = [
            i
            for i, (m, sr) in enumerate(zip(others, srcs, strict=True), 1)
            if not all(m.tensors[k].dtype.is_float for k in sr.keys)
        ]
        if bad:
            which = ", ".join(_letter(i) for i in bad)
            plans.append(KeyPlan(name, "copy", f"not floating point in {which}"))
            continue
        shapes = [sr.shape for sr in srcs]
        if all(sh == info.shape for sh in shapes):
            plans.append(KeyPlan(name, "merge", alpha=t, block=block))
            continue
        region = _region(info.shape, shapes)
        desc = ", ".join(f"{_letter(i)} {list(sh)}" for i, sh in enumerate(shapes, 1))
        if region is None or not method.elementwise:
            why = "" if region is None else f" ({method.name} needs equal shapes)"
            plans.append(
                KeyPlan(name, "copy", f"shape mismatch: A {list(info.shape)}, {desc}{why}")
            )
            continue
        plans.append(
            KeyPlan(
                name,
                "merge-slice",
                f"A {list(info.shape)}, {desc}: region {list(region)} merged, the rest is A's",
                alpha=t,
                block=block,
                region=region,
            )
        )
    skipped: dict[str, str] = {}
    for i, (m, src) in enumerate(zip(others, sources, strict=True), 1):
        used = {k for sr in src.values() for k in sr.keys}
        for name in m.tensors:
            if name not in used:
                prev = skipped.get(name)
                skipped[name] = _letter(i) if prev is None else f"{prev}, {_letter(i)}"
    return plans, skipped


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"input {i + 1}"


def _region(a: tuple[int, ...], others: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The common shape when every other input has one shape, A's rank, and fits inside A."""
    if any(s != others[0] for s in others):
        return None
    o = others[0]
    if len(o) != len(a) or any(x > y for x, y in zip(o, a, strict=True)):
        return None
    return o


# -- the arithmetic -------------------------------------------------------------------------


def weighted_sum(x: list[np.ndarray], t: float, **_: Any) -> np.ndarray:
    a, b = x
    return np.float32(1 - t) * a + np.float32(t) * b


def add_difference(x: list[np.ndarray], t: float, **_: Any) -> np.ndarray:
    a, b, c = x
    return a + np.float32(t) * (b - c)


def weighted_sum_(x: list[np.ndarray], t: float, **_: Any) -> np.ndarray:
    """``weighted_sum`` computed in place in ``x`` (the same float32 operations, same bits)."""
    a, b = x
    np.multiply(a, np.float32(1 - t), out=a)
    np.multiply(b, np.float32(t), out=b)
    return np.add(a, b, out=a)


_F16_SCALE = np.float32(2.0**112)  # what Inputs.scaled_reader's fp16 values are short of


def weighted_sum_scaled_(
    a: np.ndarray, a_scaled: bool, b: np.ndarray, b_scaled: bool, t: float
) -> np.ndarray:
    """``weighted_sum_`` of inputs read scaled by 2**-112 (``Inputs.scaled_reader``): the
    2**112 goes into the weights (``w * 2**112`` is exact in float32, and ``(w * 2**112) *
    (x * 2**-112)`` is the real number ``w * x``: rounded the same, the same bits), saving a
    multiply per input; where the weight would overflow, the input is unscaled first."""
    out = []
    for x, scaled, w in ((a, a_scaled, np.float32(1 - t)), (b, b_scaled, np.float32(t))):
        if scaled:
            with np.errstate(over="ignore"):
                big = w * _F16_SCALE
            if np.isfinite(big):
                w = big
            else:
                np.multiply(x, _F16_SCALE, out=x)
        out.append(np.multiply(x, w, out=x))
    return np.add(out[0], out[1], out=out[0])


def add_difference_(x: list[np.ndarray], t: float, **_: Any) -> np.ndarray:
    """``add_difference`` computed in place in ``x`` (the same float32 operations, same bits)."""
    a, b, c = x
    np.subtract(b, c, out=b)
    np.multiply(b, np.float32(t), out=b)
    return np.add(a, b, out=a)


def add_difference_scaled_(
    a: np.ndarray, b: np.ndarray, b_scaled: bool, c: np.ndarray, c_scaled: bool, t: float
) -> np.ndarray:
    """``add_difference_`` with B and C read scaled by 2**-112 (``Inputs.scaled_reader``; A
    as it is), saving a multiply per input: ``B' - C'`` is ``(B - C) * 2**-112`` exactly
    (normal: the same rounding, shifted; below 2**-126 the difference of two multiples of
    2**-136 is exact, as B - C then is), and ``(t * 2**112) * (B' - C')`` is the real number
    ``t * (B - C)``, rounded the same: the same bits. When only one is scaled (the other
    piece holds an inf/NaN), or ``t * 2**112`` overflows, they are unscaled first."""
    w = np.float32(t)
    if b_scaled and c_scaled:
        with np.errstate(over="ignore"):
            big = w * _F16_SCALE
        if np.isfinite(big):
            w = big
            b_scaled = c_scaled = False  # folded into the weight
    for x, scaled in ((b, b_scaled), (c, c_scaled)):
        if scaled:
            np.multiply(x, _F16_SCALE, out=x)
    np.subtract(b, c, out=b)
    np.multiply(b, w, out=b)
    return np.add(a, b, out=a)


def dare_masks(seed: int, name: str, count: int, start: int = 0) -> list[np.random.Generator]:
    """One generator per model for ``name``, positioned at element ``start`` of its stream
    (one 64-bit draw per element): the drop mask depends on (seed, key, model) only, not on the
    order of keys, the other models, or how the tensor is cut into pieces."""
    key = zlib.crc32(name.encode())
    gens = []
    for i in range(count):
        bits = np.random.PCG64([seed, key, i])
        if start:
            bits = bits.advance(start)
        gens.append(np.random.Generator(bits))
    return gens


def dare(
    x: list[np.ndarray], t: float, *, density: float, rngs: list[np.random.Generator], **_: Any
) -> np.ndarray:
    """base + t * sum_i where(keep_i, (m_i - base) * (1 / density), 0); keep_i ~ Bernoulli(density)
    drawn as ``rng.random() < density`` (float64), one draw per element in flat order."""
    base, models = x[0], x[1:]
    total = np.zeros_like(base)
    for m, rng in zip(models, rngs, strict=True):
        keep = rng.random(base.size).reshape(base.shape) < density
        total += np.where(keep, (m - base) * np.float32(1 / density), np.float32(0))
    return base + np.float32(t) * total


def ties(x: list[np.ndarray], t: float, *, density: float, **_: Any) -> np.ndarray:
    """TIES-merging: trim each delta to its top ``density`` fraction by magnitude (threshold =
    the k-th smallest |d|, k = max(1, int((1 - density) * n)); ties kept), elect the sign of
    the summed trimmed deltas, average the deltas that agree with it (0 where none does)."""
    base, models = x[0], x[1:]
    thresholds = [ties_threshold(np.abs(m - base).reshape(-1), density) for m in models]
    return ties_piece(x, t, thresholds=thresholds)


def ties_threshold(mag: np.ndarray, density: float) -> np.float32 | None:
    """The k-th smallest of a delta's magnitudes ``mag`` (flat, float32; reordered in place),
    k = max(1, int((1 - density) * n)); None: nothing is trimmed (density 1, or empty)."""
    n = mag.size
    if density >= 1 or not n:
        return None
    k = max(1, int((1 - density) * n))
    mag.partition(k - 1)
    return np.float32(mag[k - 1])


def ties_piece(
    x: list[np.ndarray], t: float, *, thresholds: Sequence[np.float32 | None], **_: Any
) -> np.ndarray:
    """``ties`` on a piece of the tensors, given each delta's threshold (``ties_threshold`` of
    the whole tensor): every step after the thresholds is elementwise, the same operations in
    the same order as on the whole tensor, so the pieces give the same bits. Computed in place
    (the models' arrays become their deltas) and in this thread's scratch for a piece: fresh
    temporaries cost a page fault and a zeroing per 4 KiB, several times the arithmetic."""
    base, models = x[0], x[1:]
    n = base.size
    tmp, total, agree_sum, agree_n = (_ties_f32(j, n) for j in range(4))
    ok, other = (_ties_f32(j, n).view(np.uint8)[:n].view(np.bool_) for j in (4, 5))
    trimmed = []
    for m, threshold in zip(models, thresholds, strict=True):
        d = np.subtract(m, base, out=m)
        if threshold is not None:  # where(|d| >= threshold, d, 0)
            np.greater_equal(np.abs(d, out=tmp), threshold, out=ok)
            np.copyto(d, np.float32(0), where=np.logical_not(ok, out=ok))
        trimmed.append(d)
    total.fill(0)
    for d in trimmed:
        np.add(total, d, out=total)
    sign = np.sign(total, out=total)
    agree_sum.fill(0)
    agree_n.fill(0)
    for d in trimmed:  # ok = (sign(d) == sign) & (d != 0); agree_sum += where(ok, d, 0)
        np.equal(np.sign(d, out=tmp), sign, out=ok)
        np.logical_and(ok, np.not_equal(d, 0, out=other), out=ok)
        tmp.fill(0)
        np.copyto(tmp, d, where=ok)
        np.add(agree_sum, tmp, out=agree_sum)
        np.add(agree_n, ok, out=agree_n)
    with np.errstate(invalid="ignore", divide="ignore"):
        merged = np.divide(agree_sum, agree_n, out=agree_sum)
    # where(agree_n > 0, agree_sum / agree_n, 0)
    np.copyto(merged, np.float32(0), where=np.logical_not(np.greater(agree_n, 0, out=ok), out=ok))
    np.multiply(merged, np.float32(t), out=merged)
    return np.add(base, merged, out=merged)


#: scratch slots of ``ties_piece``
_TIES = 3000


def _ties_f32(j: int, n: int) -> np.ndarray:
    """A float32 temporary of ``ties_piece``: this thread's scratch for a piece, else fresh."""
    return SCRATCH.f32(_TIES + j, n) if n <= arith.PIECE else np.empty(n, np.float32)


#: below this sin(angle) the tensors are treated as parallel and interpolated linearly
SLERP_EPS = 1e-6


def slerp(x: list[np.ndarray], t: float, **_: Any) -> np.ndarray:
    """Spherical interpolation of the flattened tensors, scaled by lerp(|a|, |b|, t) (as
    sd-mecha): angle w = arccos(clip(a.b / |a||b|, -1, 1)); value (sin((1-t)w) a/|a| +
    sin(tw) b/|b|) / sin w * ((1-t)|a| + t|b|). Norms and coefficients in float64; zero or
    parallel tensors fall back to the weighted sum."""
    a, b = x
    na = float(np.linalg.norm(a.astype(np.float64)))
    nb = float(np.linalg.norm(b.astype(np.float64)))
    if na == 0 or nb == 0:
        return weighted_sum(x, t)
    dot = float(np.dot(a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)))
    cos = min(1.0, max(-1.0, dot / (na * nb)))
    w = float(np.arccos(cos))
    s = float(np.sin(w))
    if s < SLERP_EPS:
        return weighted_sum(x, t)
    scale = (1 - t) * na + t * nb
    ca = np.sin((1 - t) * w) / s * scale / na
    cb = np.sin(t * w) / s * scale / nb
    return np.float32(ca) * a + np.float32(cb) * b


#: method -> the function computing it on float32 arrays
KERNELS: dict[str, Callable[..., np.ndarray]] = {
    "weighted-sum": weighted_sum,
    "add-difference": add_difference,
    "ties": ties,
    "dare": dare,
    "slerp": slerp,
}
#: elementwise method -> the kernel on pieces it may overwrite (same operations, same bits)
PIECE_KERNELS: dict[str, Callable[..., np.ndarray]] = {
    **KERNELS,
    "weighted-sum": weighted_sum_,
    "add-difference": add_difference_,
    "ties": ties_piece,
}


def _compute_fn(
    models: Sequence[ModelFile],
    sources: Sequence[dict[str, Source]],
    k: KeyPlan,
    method: Method,
    io: Inputs,
    density: float,
    seed: int,
) -> tuple[Callable[[int, int], np.ndarray], Callable[[], object] | None]:
    """Computes elements ``start .. start + count`` of key ``k`` (methods by pieces) as
    float32, in this thread's reused buffers (valid until its next piece): no allocation. And
    what to compute once before the pieces (ties' thresholds; None: nothing), which the first
    piece otherwise does."""
    in_place = PIECE_KERNELS[method.name]
    a = models[0]
    t = k.alpha if k.alpha is not None else 0.0
    is_dare = method.name == "dare"
    srcs = [(m, src[k.name]) for m, src in zip(models[1:], sources, strict=True)]

    readers: list[Callable[[int, int, int], np.ndarray]]
    if _preadable(models, sources, k.name):
        readers = [io.piece_reader(a, k.name)] + [io.piece_reader(m, sr.keys[0]) for m, sr in srcs]
    else:

        def reader(m: ModelFile, sr: Source) -> Callable[[int, int, int], np.ndarray]:
            return lambda s, c, i: sr.read_into(io, m, s, SCRATCH.f32(i, c), i)

        readers = [reader(m, sr) for m, sr in [(a, Source((k.name,), ())), *srcs]]
    if method.name == "weighted-sum" and _preadable(models, sources, k.name):
        mb, sb = srcs[0]
        ra, rb = io.scaled_reader(a, k.name), io.scaled_reader(mb, sb.keys[0])

        def compute_ws(start: int, count: int) -> np.ndarray:
            return weighted_sum_scaled_(*ra(start, count, 0), *rb(start, count, 1), t)

        return compute_ws, None
    if method.name == "add-difference" and _preadable(models, sources, k.name):
        (mb, sb), (mc, sc) = srcs
        read_a = readers[0]
        read_b, read_c = io.scaled_reader(mb, sb.keys[0]), io.scaled_reader(mc, sc.keys[0])

        def compute_ad(start: int, count: int) -> np.ndarray:
            x = read_a(start, count, 0)
            return add_difference_scaled_(x, *read_b(start, count, 1), *read_c(start, count, 2), t)

        return compute_ad, None
    ties_state = None
    if method.name == "ties":
        ties_state = _TiesThresholds(readers, a.tensors[k.name].numel, density)

    def compute(start: int, count: int) -> np.ndarray:
        if ties_state is not None:  # the whole tensor's, computed once by the first piece
            thresholds = ties_state.get()  # (before the reads: it reads into the same scratch)
            return in_place([read(start, count, i) for i, read in enumerate(readers)], t,
                            thresholds=thresholds)  # fmt: skip
        x = [read(start, count, i) for i, read in enumerate(readers)]
        rngs = dare_masks(seed, k.name, len(x) - 1, start) if is_dare else []
        return in_place(x, t, density=density, rngs=rngs)

    return compute, None if ties_state is None else ties_state.get


class _TiesThresholds:
    """Each delta's TIES threshold for one tensor, computed once, by whichever piece asks
    first: |m_i - base| is read piece by piece into one float32 array of the tensor's size,
    reused for every model (memory: that array, not every input's whole tensor)."""

    def __init__(
        self, readers: list[Callable[[int, int, int], np.ndarray]], numel: int, density: float
    ) -> None:
        self.readers, self.numel, self.density = readers, numel, density
        self.value: list[np.float32 | None] | None = None
        self.lock = threading.Lock()

    def get(self) -> list[np.float32 | None]:
        with self.lock:
            if self.value is None:
                self.value = self._compute()
            return self.value

    def _compute(self) -> list[np.float32 | None]:
        if self.density >= 1 or not self.numel:
            return [None] * (len(self.readers) - 1)
        mag = np.empty(self.numel, np.float32)
        out = []
        for i, read in enumerate(self.readers[1:], 1):
            for s, c in pieces(self.numel):
                base = self.readers[0](s, c, 0)
                d = mag[s : s + c]
                np.subtract(read(s, c, i), base, out=d)
                np.abs(d, out=d)
            out.append(ties_threshold(mag, self.density))
        return out


def _piece_fn(
    models: Sequence[ModelFile],
    sources: Sequence[dict[str, Source]],
    k: KeyPlan,
    method: Method,
    io: Inputs,
    density: float,
    seed: int,
) -> Callable[[Output, int, int], None]:
    """Computes elements ``start .. start + count`` of key ``k`` into ``out``."""
    compute, _ = _compute_fn(models, sources, k, method, io, density, seed)

    def piece(out: Output, start: int, count: int) -> None:
        out.put(start, compute(start, count))

    return piece


#: pieces of the computation per piece written (``_pieces_fn``)
WRITE_PIECES = 4
#: scratch slots whose values are dead once a piece is computed (the second and third
#: inputs' float32 values), for the cast to reuse
_DEAD_AFTER_COMPUTE = (1, 2)


def _pieces_fn(
    compute: Callable[[int, int], np.ndarray],
    name: str,
    numel: int,
    dtype: DType,
    overflows: Overflows,
    prepare: Callable[[], object] | None = None,
) -> Callable[[], Iterator[tuple[int, Callable[[np.ndarray], None]]]]:
    """``OutTensor.pieces`` of a key: each piece computed and cast into the writer's buffer
    on the thread that then writes it (no output tensor in memory). A writer's piece is
    ``WRITE_PIECES`` pieces of the computation (fewer writes and writeback calls, while each
    piece of the computation stays small enough for the cache). ``prepare`` runs before the
    pieces are handed out, on the writer's prefetch thread (ties' thresholds: while the writer's
    threads compute the tensor before, instead of one of them waiting for the other)."""

    def fill(start: int, count: int, out: np.ndarray) -> None:
        dst = out.view(dtype.numpy)
        for s, c in pieces(count):
            over = store(compute(start + s, c), dst[s : s + c], dtype, _DEAD_AFTER_COMPUTE)
            overflows.piece(name, start + s, over, dtype)

    def gen() -> Iterator[tuple[int, Callable[[np.ndarray], None]]]:
        if prepare is not None:
            prepare()
        for s, c in pieces(numel, WRITE_PIECES * arith.PIECE):
            yield c * dtype.itemsize, partial(fill, s, c)

    return gen


def _preadable(
    models: Sequence[ModelFile], sources: Sequence[dict[str, Source]], name: str
) -> bool:
    """Every input holds ``name`` as one tensor that ``Inputs`` reads in pieces with pread
    (no whole-tensor cache, which the pieces of other tensors computed at once would evict)."""
    if any(len(src[name].keys) != 1 for src in sources):
        return False
    pairs = [(models[0], name)] + [
        (m, src[name].keys[0]) for m, src in zip(models[1:], sources, strict=True)
    ]
    return all(local_span(m, m.tensors[k]) is not None for m, k in pairs)


def _maker(
    models: Sequence[ModelFile],
    sources: Sequence[dict[str, Source]],
    k: KeyPlan,
    method: Method,
    dtype: DType,
    io: Inputs,
    overflows: Overflows,
    density: float,
    seed: int,
    ahead: Ahead | None = None,
) -> Callable[[], np.ndarray]:
    """The function computing key ``k``'s output tensor when the writer asks for it (from
    ``ahead`` when it computes this key ahead)."""
    kernel = KERNELS[method.name]
    a = models[0]
    shape = a.tensors[k.name].shape
    t = k.alpha if k.alpha is not None else 0.0
    is_dare = method.name == "dare"

    def make() -> np.ndarray:
        if ahead is not None:
            return overflows.done(k.name, ahead.get(k.name))
        out = Output(shape, dtype)
        rngs = dare_masks(seed, k.name, len(models) - 1) if is_dare else []
        opts: dict[str, Any] = {"density": density, "rngs": rngs}
        if k.rule == "merge-slice":
            assert k.region is not None
            region = tuple(slice(0, n) for n in k.region)
            base = io.whole(a, k.name)
            x = [base[region]] + [
                src[k.name].whole(io, m) for m, src in zip(models[1:], sources, strict=True)
            ]
            res = base.copy()
            res[region] = kernel(x, t, **opts)
            out.put(0, res)
        elif method.by_pieces:
            piece = _piece_fn(models, sources, k, method, io, density, seed)
            run_pieces(out.flat.size, lambda s, c: piece(out, s, c), pool=io.pool)
        else:
            x = [io.whole(a, k.name)] + [
                src[k.name].whole(io, m).reshape(shape)
                for m, src in zip(models[1:], sources, strict=True)
            ]
            out.put(0, kernel(x, t, **opts))
        return overflows.done(k.name, out)

    return make


@dataclass(frozen=True, kw_only=True)
class MergeOptions(WriteOptions):
    """merge's options: the write options and the method's (see ``merge``)."""

    method: str = "weighted-sum"
    alpha: float = 0.5
    density: float = 1.0
    seed: int = 0
    block_weights: str | None = None


def merge(
    inputs: Sequence[str | Path | ModelFile],
    out: str | Path,
    options: MergeOptions | None = None,
    **changes: Any,
) -> MergeResult:
    """Merge model files into ``out`` (format by extension), streaming tensor by tensor.

    ``options`` is a MergeOptions, or its fields as keywords:

    Args:
        inputs: A, B[, C] (or BASE, M1, M2 ... for ties/dare); any format sdtool reads: paths
            or opened ModelFiles (left open).
        method: a key of ``METHODS``.
        alpha: the weight t of the method (the blocks' weights replace it per key).
        density: ties/dare: the fraction of each delta kept (0 < density <= 1).
        seed: dare: the seed of the drop masks (same seed, same output).
        block_weights: a supermerger weight list (BASE,IN00,...,M00,OUT00,...).
        dtype: output dtype for floating tensors (fp32, fp16, bf16 ...); None keeps A's.
        dry_run: only plan; nothing is read beyond headers, nothing written.
        progress: called with (bytes written, total bytes).

    Returns a MergeResult; raises SdtoolError subclasses (nothing is written then).
    """
    t0 = time.perf_counter()
    o = options_from(MergeOptions, options, changes)
    method, alpha, density, seed = o.method, o.alpha, o.density, o.seed
    block_weights, overwrite, verify, dry_run = o.block_weights, o.overwrite, o.verify, o.dry_run
    on_overflow, progress = o.on_overflow, o.progress
    dtype = dtype_name(None if o.dtype is None else o.dtype.code)  # "keep", "fp16", ...
    paths = [path_of(p) for p in inputs]
    out = Path(out)
    m = METHODS.get(method)
    if m is None:
        raise UsageError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if len(paths) < m.min_inputs or (m.max_inputs is not None and len(paths) > m.max_inputs):
        want = str(m.min_inputs) if m.min_inputs == m.max_inputs else f"at least {m.min_inputs}"
        raise UsageError(f"{method} merges {want} inputs, got {len(paths)}")
    if not 0 < density <= 1:
        raise UsageError(f"density={density} is outside (0, 1]")
    target = o.dtype
    fmt = output_format(out)
    if not dry_run:
        check_output(out, inputs=paths, overwrite=overwrite)
    with ExitStack() as stack:
        models = [stack.enter_context(opened(p)) for p in inputs]
        arch = unet_arch(list(models[0].tensors))
        blocks = None
        if block_weights is not None:
            if arch is None:
                raise UsageError(
                    "block weights need an SD 1.x/2.x or SDXL UNet with ldm key names "
                    "(model.diffusion_model.input_blocks...) in the first input",
                    path=paths[0],
                )
            blocks = parse_block_weights(block_weights, arch)
        sources: list[dict[str, Source]] = []
        notes: list[str] = []
        for other in models[1:]:
            src, how = align(models[0], other)
            sources.append(src)
            notes += how
        keys, skipped = plan_keys(models, m, alpha, blocks, arch, sources)
        used_density = density if method in ("ties", "dare") else None
        used_seed = seed if method == "dare" else None
        recipe: dict[str, Any] = {
            "type": "sdtool",
            "sdtool_version": __version__,
            "method": method,
            "formula": m.summary,
            "alpha": alpha,
            "density": used_density,
            "seed": used_seed,
            "block_weights": block_weights,
            "models": [p.name for p in paths],
            "dtype": dtype,
        }
        result = MergeResult(
            inputs=paths,
            output=out,
            method=method,
            alpha=alpha,
            density=used_density,
            seed=used_seed,
            dtype=dtype,
            block_weights=blocks,
            keys=keys,
            skipped=skipped,
            recipe=recipe,
            notes=notes,
            dry_run=dry_run,
        )
        if dry_run:
            return replace(result, seconds=time.perf_counter() - t0)
        a = models[0]
        overflows = Overflows(on_overflow)
        with Inputs() as io:
            plan: list[OutTensor] = []
            # elementwise keys read by pread: into safetensors, the writer's threads compute
            # them piece by piece, each piece written by the thread that made it; into a
            # .ckpt, they are computed ahead on the pool, in the plan's order
            early = [
                k
                for k in keys
                if k.rule == "merge" and m.by_pieces and _preadable(models, sources, k.name)
            ]
            streamed: list[KeyPlan] = []
            if fmt == "safetensors":
                streamed, early = early, []
            tasks = []
            for k in early:
                info = a.tensors[k.name]
                dt = _out_dtype(info.dtype, target)
                piece = _piece_fn(models, sources, k, m, io, density, seed)
                tasks.append(
                    Task(k.name, info.numel * dt.itemsize, partial(Output, info.shape, dt), piece)
                )
            ahead = Ahead(io.pool, tasks)
            ahead_names = {k.name for k in early}
            streamed_names = {k.name for k in streamed}
            for k in keys:
                info = a.tensors[k.name]
                out_dt = _out_dtype(info.dtype, target)
                if k.rule == "copy":
                    plan.append(OutTensor(k.name, a, info, out_dt))
                else:
                    make = _maker(
                        models, sources, k, m, out_dt, io, overflows, density, seed,
                        ahead if k.name in ahead_names else None,
                    )  # fmt: skip
                    gen = None
                    if k.name in streamed_names:
                        compute, prepare = _compute_fn(models, sources, k, m, io, density, seed)
                        gen = _pieces_fn(compute, k.name, info.numel, out_dt, overflows, prepare)
                    plan.append(OutTensor(k.name, a, info, out_dt, make, gen))
            meta = {
                "format": "pt",
                "sd_merge_recipe": json.dumps(recipe),
                "sd_merge_models": json.dumps({p.name: {"name": p.name} for p in paths}),
            }
            try:
                result = write_result(
                    result,
                    plan,
                    out,
                    t0,
                    metadata=meta,
                    overwrite=overwrite,
                    verify=verify,
                    overflows=overflows,
                    progress=progress,
                )
            finally:
                ahead.cancel()
        return result


def _out_dtype(src: DType, target: DType | None) -> DType:
    """The output dtype of a tensor: the one cast rule (``vocab.cast_target``)."""
    return cast_target(src, target)
