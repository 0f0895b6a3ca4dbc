"""``convert --lora-format``: one LoRA file renamed between kohya, diffusers, PEFT, ai-toolkit
and ComfyUI namings, with fused <-> split modules re-factored exactly.

Every module is first read into one canonical form: its component and its diffusers path
(``transformer_blocks.0.attn.to_q``), each tensor a *piece* (a source tensor, or an exact view
of it computed when written: a row slice, a half swap, a concatenation). Then it is written in
the target naming.

Names: kohya and ComfyUI store ``<module>.alpha``; diffusers stores PEFT's ``lora_alpha`` /
``alpha_pattern`` (and ``r`` / ``rank_pattern``) in the ``lora_adapter_metadata`` JSON
prefixed by component, PEFT the same unprefixed; ai-toolkit stores no alpha (scale 1). A module
without any alpha gets alpha = rank (scale 1, what every loader assumes then). UNet /
transformer paths move between diffusers paths and single-file paths (SDXL's ldm names, Flux's
BFL names, SD3's SAI names) through sdtool.layouts' key maps.

Fused <-> split (Flux ``img_attn.qkv`` / ``linear1``, SD3 ``attn.qkv`` against diffusers'
``to_q/to_k/to_v`` / ``proj_mlp``; ``delta = s * up @ down``, ``s = alpha / rank``):

- fused -> split is exact: every part keeps ``down`` and ``alpha`` and takes its rows of
  ``up`` (LoHa: rows of ``w1_a`` and ``w2_a``; LoKr: rows of ``w1`` when they divide). When
  ``up`` is block-diagonal (kohya's ``split_qkv`` files) and the rank divides, each part gets its
  own rank chunk instead (as kohya's and diffusers' converters do), provided the part's alpha
  (``alpha * rank_part / rank``) is exact, so the scale stays the same double.
- split -> fused is exact when the parts share ``down`` (bitwise), rank and alpha: ``up`` rows
  are concatenated (a missing part's rows are zeros). Otherwise the fused module gets the
  concatenated / block-diagonal form: ``down`` = the parts' downs stacked along the rank,
  ``up`` = block-diagonal, rank = the sum of ranks, alpha = ``s * rank`` (exact when the parts
  share the scale ``s``; different scales are refused). The rank grows; the result says so.
- Parts that came from one fused module of the input are written back as that module's own
  tensors, so fused -> split -> fused returns every tensor bit for bit.

Refused, with the reason: LoKr parts into one fused module (separate Kronecker products are not
one), a LoKr split whose ``w1`` rows do not divide, Tucker factors and DoRA magnitudes of a fused
/ split module, DoRA between kohya and PEFT namings (different tensors), a full-weight part
missing from a join.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sdtool import dtypes
from sdtool.dtypes import DType
from sdtool.errors import UsageError
from sdtool.formats.open import open_model
from sdtool.layouts import family_name, keymap, part_rows
from sdtool.layouts import lora as T
from sdtool.model import ModelFile, Storage, TensorInfo, contiguous_strides
from sdtool.ops.lora.names import LoraModule, parse_lora
from sdtool.results import Result, json_key, rounded, rows
from sdtool.write import OutTensor, write_model

MAIN = {"sd3": "transformer", "sd3.5-large": "transformer", "flux": "transformer"}
_DORA = ("dora", "magnitude")
#: (rank-side factor, row-side factor) pairs stacked / block-diagonalised when parts fuse
_FACTOR_PAIRS = {
    "lora": (("down", "up"),),
    "loha": (("hada_w1_b", "hada_w1_a"), ("hada_w2_b", "hada_w2_a")),
}
_PEFT_SIDE = {"kohya": 0, "comfy": 0, "diffusers": 1, "peft": 1, "ai-toolkit": 1}


@dataclass(frozen=True)
class LoraFormatResult(Result):
    """What ``convert_lora_format`` wrote (or would, for a dry run)."""

    JSON_SCHEMA: ClassVar[str | None] = "sdtool.lora-format/1"

    input: Path = field(metadata=json_key("path"))
    output: Path
    family: str
    to: str = field(metadata=json_key("lora_format"))
    modules: int = 0
    written: int = 0
    #: old stem -> new stem
    mapping: list[tuple[str, str]] = field(
        default_factory=list, metadata=json_key(as_=rows("source", "target"))
    )
    split: list[str] = field(default_factory=list)  # fused input modules written as parts
    fused: list[str] = field(default_factory=list)  # output modules joined from parts
    rank_grown: dict[str, tuple[int, int]] = field(default_factory=dict)  # new: (part, fused)
    notes: list[str] = field(default_factory=list)
    output_bytes: int = 0
    verified: bool = False
    dry_run: bool = False
    seconds: float = field(default=0.0, metadata=json_key(as_=rounded))


# -- pieces: output tensors as exact views of input tensors ----------------------------------


@dataclass(frozen=True)
class Piece:
    """One tensor of a module: a source tensor (``key``) or values computed when written."""

    shape: tuple[int, ...]
    dtype: DType
    key: str | None = None
    make: Callable[[], np.ndarray] | None = None

    def array(self, m: ModelFile) -> np.ndarray:
        if self.make is not None:
            return self.make()
        assert self.key is not None
        return m.read(self.key)

    def raw(self, m: ModelFile) -> bytes:
        return np.ascontiguousarray(self.array(m)).tobytes()

    def out(self, name: str, m: ModelFile) -> OutTensor:
        if self.make is None:
            assert self.key is not None
            return OutTensor(name, *m.locate(self.key), self.dtype)
        make = self.make
        n = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

        def load() -> bytes:
            return np.ascontiguousarray(make()).tobytes()

        info = TensorInfo(
            self.dtype, self.shape, contiguous_strides(self.shape), 0,
            Storage(name, self.dtype, n, load=load),
        )  # fmt: skip
        return OutTensor(name, m, info, self.dtype, make)


def _computed(shape: tuple[int, ...], dtype: DType, make: Callable[[], np.ndarray]) -> Piece:
    return Piece(tuple(shape), dtype, None, make)


def _rows(m: ModelFile, p: Piece, a: int, b: int, cols: np.ndarray | None = None) -> Piece:
    """Rows [a, b) of a piece (and only columns ``cols``)."""
    if cols is not None:
        shape = (b - a, len(cols), *p.shape[2:])
        return _computed(shape, p.dtype, lambda: p.array(m)[a:b][:, cols])
    return _computed((b - a, *p.shape[1:]), p.dtype, lambda: p.array(m)[a:b])


def _swap(m: ModelFile, p: Piece) -> Piece:
    if p.shape[0] % 2:
        raise UsageError(f"{p.shape[0]} rows have no halves to swap")
    h = p.shape[0] // 2
    return _computed(p.shape, p.dtype, lambda: np.concatenate([p.array(m)[h:], p.array(m)[:h]]))


def _zeros(shape: tuple[int, ...], dtype: DType) -> Piece:
    return _computed(shape, dtype, lambda: np.zeros(shape, dtype=dtype.numpy))


def _concat(m: ModelFile, pieces: list[Piece], axis: int = 0) -> Piece:
    shape = list(pieces[0].shape)
    shape[axis] = sum(p.shape[axis] for p in pieces)
    return _computed(
        tuple(shape), pieces[0].dtype,
        lambda: np.concatenate([p.array(m) for p in pieces], axis=axis),
    )  # fmt: skip


def _block_diag(m: ModelFile, blocks: list[Piece | tuple[int, ...]]) -> Piece:
    """Blocks along the diagonal (2-D, or 4-D with trailing 1x1); a shape = zero rows, no cols."""
    rows = [b.shape[0] if isinstance(b, Piece) else b[0] for b in blocks]
    cols = [b.shape[1] if isinstance(b, Piece) else 0 for b in blocks]
    real = [b for b in blocks if isinstance(b, Piece)]
    dtype, tail = real[0].dtype, real[0].shape[2:]
    shape = (sum(rows), sum(cols), *tail)

    def make() -> np.ndarray:
        out = np.zeros(shape, dtype=dtype.numpy)
        r = c = 0
        for b, nr, nc in zip(blocks, rows, cols, strict=True):
            if isinstance(b, Piece):
                out[r : r + nr, c : c + nc] = b.array(m)
            r, c = r + nr, c + nc
        return out

    return _computed(shape, dtype, make)


def _zero_bits(arr: np.ndarray) -> bool:
    return not np.ascontiguousarray(arr).view(np.uint8).any()


def _exact_float(x: Fraction) -> float | None:
    f = float(x)
    return f if Fraction(f) == x else None


# -- the canonical module ------------------------------------------------------------------


@dataclass
class Mod:
    """One adapted module in canonical form: component, diffusers path, pieces by role."""

    stem: str
    comp: str
    path: str
    kind: str
    t: dict[str, Piece]
    alpha: float | None = None  # None: none given (scale 1)
    alpha_key: str | None = None  # the input's .alpha tensor, copied while alpha is unchanged
    origin: tuple[str, int] | None = None  # (fused input stem, part) when split from one
    whole: Mod | None = None  # that fused module, to write back unchanged
    stems: tuple[str, ...] = ()  # the input modules joined into this one

    @property
    def rank(self) -> int | None:
        t = self.t
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            for r in ("lokr_w2_b", "lokr_w1_b"):
                if r in t:
                    return t[r].shape[0]
        return None

    def rows(self) -> int:
        """Output rows of the adapted weight."""
        t = self.t
        if self.kind == "lokr":
            return _lokr_w1_rows(self) * _lokr_w2_rows(self)
        return t[T.ROW_ROLES[self.kind][0]].shape[0]

    def scale(self) -> Fraction | None:
        r = self.rank
        if r is None:
            return None
        return Fraction(r if self.alpha is None else self.alpha) / r


def _lokr_w1_rows(mod: Mod) -> int:
    return (mod.t.get("lokr_w1") or mod.t["lokr_w1_a"]).shape[0]


def _lokr_w2_rows(mod: Mod) -> int:
    if "lokr_t2" in mod.t:
        raise UsageError(f"LoKr module {mod.stem!r} has a Tucker w2: not re-factored")
    return (mod.t.get("lokr_w2") or mod.t["lokr_w2_a"]).shape[0]


def _read_module(m: ModelFile, mod: LoraModule, comp: str, path: str) -> Mod:
    kind = mod.kind or "?"
    t = {
        role: Piece(tuple(m.tensors[k].shape), m.tensors[k].dtype, k)
        for role, k in mod.keys.items()
        if role != "alpha"
    }
    alpha_key = mod.keys.get("alpha")
    alpha = float(np.asarray(m.read(alpha_key), dtype=np.float64)) if alpha_key else None
    return Mod(mod.stem, comp, path, kind, t, alpha, alpha_key)


# -- fused -> parts, half swaps --------------------------------------------------------------


def _swapped(m: ModelFile, mod: Mod) -> Mod:
    """The module of a weight whose dim-0 halves are exchanged (adaLN shift/scale)."""
    t = dict(mod.t)
    if mod.kind == "lokr":
        w1 = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
        if t[w1].shape[0] % 2:
            raise UsageError(f"LoKr module {mod.stem!r}: w1 has odd rows; halves cannot swap")
        t[w1] = _swap(m, t[w1])
    else:
        for role in T.ROW_ROLES.get(mod.kind, ()):
            t[role] = _swap(m, t[role])
    if {"dora", "magnitude"} & set(t):
        raise UsageError(f"module {mod.stem!r}: DoRA magnitudes of a swapped weight not carried")
    return replace(mod, t=t, alpha_key=mod.alpha_key)


def _split(m: ModelFile, mod: Mod, parts: tuple[int, ...]) -> list[Mod | None]:
    """The fused module ``mod`` as one module per part (rows in the ratio ``parts``); None
    for a part whose delta is zero (its rows of a block-diagonal ``up`` are all zero)."""
    if {"dora", "magnitude", "mid", "hada_t1", "hada_t2", "lokr_t2"} & set(mod.t):
        raise UsageError(
            f"module {mod.stem!r} is fused in one naming and split in the other, and its "
            "Tucker / DoRA tensors do not split by rows"
        )
    total = mod.rows()
    spans = [part_rows(total, parts, i) for i in range(len(parts))]
    compact = _compact_spans(m, mod, spans)
    out: list[Mod | None] = []
    for i, (a, b) in enumerate(spans):
        t = dict(mod.t)
        alpha, alpha_key = mod.alpha, mod.alpha_key
        if compact is not None:
            if compact[i] is None:
                out.append(None)
                continue
            cols, alpha = compact[i]  # type: ignore[misc]
            t["down"] = _pick(m, t["down"], cols)
            t["up"] = _rows(m, t["up"], a, b, cols)
            alpha_key = None
        elif mod.kind == "lokr":
            w2 = _lokr_w2_rows(mod)
            if a % w2 or b % w2:
                raise UsageError(
                    f"LoKr module {mod.stem!r}: its w1 has {_lokr_w1_rows(mod)} rows, which do "
                    f"not split in the ratio {':'.join(map(str, parts))}"
                )
            w1 = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
            t[w1] = _rows(m, t[w1], a // w2, b // w2)
        else:
            for role in T.ROW_ROLES[mod.kind]:
                t[role] = _rows(m, t[role], a, b)
        out.append(Mod(mod.stem, mod.comp, "", mod.kind, t, alpha, alpha_key, (mod.stem, i), mod))
    return out


def _pick(m: ModelFile, p: Piece, idx: np.ndarray) -> Piece:
    """Rows ``idx`` of a piece (a rank chunk of ``down``)."""
    return _computed((len(idx), *p.shape[1:]), p.dtype, lambda: p.array(m)[idx])


def _compact_spans(
    m: ModelFile, mod: Mod, spans: list[tuple[int, int]]
) -> list[tuple[np.ndarray, float | None] | None] | None:
    """Per part, (its rank columns, its alpha) when the parts' rows of ``up`` use disjoint rank
    columns (kohya's ``split_qkv``: block-diagonal), so each part can keep only its columns
    (and the matching rows of ``down``) with the same scale exactly; None for a part using no
    column (a zero delta). None when the columns overlap or an alpha would not be exact."""
    rank = mod.rank
    if mod.kind != "lora" or rank is None or mod.t["up"].shape[2:] not in ((), (1, 1)):
        return None
    up = mod.t["up"].array(m)
    used = []
    for a, b in spans:
        block = np.ascontiguousarray(up[a:b]).reshape(b - a, rank, -1).view(np.uint8)
        used.append(np.flatnonzero(block.any(axis=(0, 2))))
    flat = np.concatenate(used)
    if len(flat) != len(np.unique(flat)) or all(len(u) == rank for u in used):
        return None
    out: list[tuple[np.ndarray, float | None] | None] = []
    for cols in used:
        if not len(cols):
            out.append(None)
            continue
        alpha: float | None = None
        if mod.alpha is not None:
            alpha = _exact_float(Fraction(mod.alpha) * len(cols) / rank)
            if alpha is None:
                return None
        out.append((cols, alpha))
    return out


# -- parts -> fused ------------------------------------------------------------------------


def _fuse(m: ModelFile, target: str, parts: dict[int, Mod], ratio: tuple[int, ...]) -> Mod:
    """One module of the fused weight ``target`` from the modules of its parts."""
    fused = _fuse_parts(m, target, parts, ratio)
    fused.stems = tuple(dict.fromkeys(parts[i].stem for i in sorted(parts)))
    return fused


def _fuse_parts(m: ModelFile, target: str, parts: dict[int, Mod], ratio: tuple[int, ...]) -> Mod:
    mods = [parts[i] for i in sorted(parts)]
    first = mods[0]
    whole = first.whole
    if whole is not None and all(
        p.whole is whole and p.origin == (whole.stem, i) for i, p in parts.items()
    ):  # parts this run split from one input module (a missing one had a zero delta)
        return replace(whole, path=target, origin=None, whole=None)
    kinds = {p.kind for p in mods}
    if len(kinds) > 1:
        raise UsageError(f"the parts of {target!r} are different kinds ({', '.join(kinds)})")
    for p in mods:
        if {"dora", "magnitude", "mid", "hada_t1", "hada_t2"} & set(p.t):
            raise UsageError(
                f"module {p.stem!r}: Tucker / DoRA tensors of a part cannot join a fused module"
            )
    if len({p.t[r].dtype for p in mods for r in p.t}) > 1:
        raise UsageError(f"the parts of {target!r} mix dtypes")
    unit = {Fraction(p.rows(), ratio[i]) for i, p in parts.items()}  # rows per ratio unit
    if len(unit) != 1 or next(iter(unit)).denominator != 1:
        raise UsageError(f"the parts of {target!r} have rows out of the ratio {ratio}")
    u = int(next(iter(unit)))
    kind = first.kind
    if kind == "lokr":
        return _fuse_lokr(m, target, parts, ratio, u)
    if kind in ("full", "bias"):
        role = T.ROW_ROLES[kind][0]
        tail = first.t[role].shape[1:]
        pieces = [
            parts[i].t[role] if i in parts else _zeros((u * ratio[i], *tail), first.t[role].dtype)
            for i in range(len(ratio))
        ]
        return Mod(first.stem, first.comp, target, kind, {role: _concat(m, pieces)})
    shared = ("down",) if kind == "lora" else ("hada_w1_b", "hada_w2_b")
    rows_of = T.ROW_ROLES[kind]
    same = len({(p.rank, p.alpha) for p in mods}) == 1 and all(
        len({p.t[r].raw(m) for p in mods}) == 1 for r in shared
    )
    if same:
        t = {r: first.t[r] for r in shared}
        for role in rows_of:
            tail = first.t[role].shape[1:]
            t[role] = _concat(
                m,
                [
                    parts[i].t[role]
                    if i in parts
                    else _zeros((u * ratio[i], *tail), first.t[role].dtype)
                    for i in range(len(ratio))
                ],
            )
        keys = {p.alpha_key for p in mods}
        key = keys.pop() if len(keys) == 1 else None
        return Mod(first.stem, first.comp, target, kind, t, first.alpha, key)
    scales = {p.scale() for p in mods}
    if len(scales) != 1:
        raise UsageError(
            f"the parts of {target!r} have different alpha/rank scales "
            f"({', '.join(str(float(s)) for s in scales if s is not None)}); one fused module "
            "has one scale"
        )
    rank = sum(p.rank or 0 for p in mods)
    s = scales.pop()
    alpha = None if all(p.alpha is None for p in mods) else _exact_float(Fraction(s or 1) * rank)
    if alpha is None and any(p.alpha is not None for p in mods):
        raise UsageError(f"the fused alpha of {target!r} is not a float")
    t = {}
    pairs = _FACTOR_PAIRS[kind]
    for low, high in pairs:
        t[low] = _concat(m, [p.t[low] for p in mods])
        t[high] = _block_diag(
            m,
            [parts[i].t[high] if i in parts else (u * ratio[i],) for i in range(len(ratio))],
        )
    return Mod(first.stem, first.comp, target, kind, t, alpha, None)


def _fuse_lokr(
    m: ModelFile, target: str, parts: dict[int, Mod], ratio: tuple[int, ...], u: int
) -> Mod:
    """kron(w1_i, w2) stacked = kron(stack(w1_i), w2): exact when the parts share w2 (and
    w1_b, alpha), w1 rows stacked (a missing part: zero rows). Otherwise refused."""
    mods = [parts[i] for i in sorted(parts)]
    first = mods[0]
    w1 = "lokr_w1" if "lokr_w1" in first.t else "lokr_w1_a"
    shared = sorted(r for r in first.t if r != w1)
    same = (
        all(sorted(p.t) == sorted(first.t) for p in mods)
        and len({p.alpha for p in mods}) == 1
        and all(len({p.t[r].raw(m) for p in mods}) == 1 for r in shared)
    )
    if not same:
        raise UsageError(
            f"LoKr parts of {target!r} cannot join: their Kronecker products do not share "
            "w2, so no one product covers the fused rows"
        )
    w2 = _lokr_w2_rows(first)
    if any((u * ratio[i]) % w2 for i in range(len(ratio))):
        raise UsageError(f"LoKr parts of {target!r}: w2's {w2} rows do not divide every part")
    tail = first.t[w1].shape[1:]
    stacked = _concat(
        m,
        [
            parts[i].t[w1] if i in parts else _zeros((u * ratio[i] // w2, *tail), first.t[w1].dtype)
            for i in range(len(ratio))
        ],
    )
    t = {r: first.t[r] for r in shared}
    t[w1] = stacked
    keys = {p.alpha_key for p in mods}
    return Mod(
        first.stem,
        first.comp,
        target,
        "lokr",
        t,
        first.alpha,
        keys.pop() if len(keys) == 1 else None,
    )


# -- names -------------------------------------------------------------------------------------


def _split_stem(stem: str) -> tuple[str, str] | None:
    """(component id, dotted module path) of a stem in any naming."""
    for prefix, comp in T.DOTTED_PREFIXES:
        if stem.startswith(prefix):
            return comp, stem[len(prefix) :]
    for prefix, comp in T.UNDERSCORE_PREFIXES:
        if stem.startswith(prefix):
            return comp, T.dotted(stem[len(prefix) :])
    return None


def _deepest(paths: list[str], block: str) -> int:
    found = [p.split(".") for p in paths if p.startswith(block + ".")]
    return max((int(f[1]) for f in found if len(f) > 1 and f[1].isdigit()), default=-1)


def _detect(paths: list[str], comps: set[str], widths: set[int]) -> tuple[str, bool]:
    """(family, guessed) from a LoRA's UNet / transformer module paths and input widths."""
    unet = " ".join(paths)
    if "double_blocks" in unet or "single_transformer_blocks" in unet or "single_blocks" in unet:
        return "flux", False
    deepest = max(_deepest(paths, "joint_blocks"), _deepest(paths, "transformer_blocks"))
    sd3 = "joint_blocks" in unet or deepest >= 19  # Flux has 19 double blocks
    if sd3 or ("te3" in comps and "transformer_blocks" in unet):
        return ("sd3.5-large" if deepest >= 24 else "sd3"), False
    if "transformer_blocks" in unet and not any(
        p.startswith(("down_blocks", "up_blocks", "mid_block", "input_blocks")) for p in paths
    ):  # diffusers names of the first blocks only: Flux is 3072 wide, SD3 64 per block
        return ("flux" if 3072 in widths or not widths else "sd3"), 3072 not in widths
    sd1_ldm = any(  # SD1/SD2 have attention at input 1-2, output 9-11; SDXL has 9 blocks
        p.startswith(("input_blocks.1.1.", "input_blocks.2.1.", "output_blocks.9.",
                      "output_blocks.10.", "output_blocks.11."))
        for p in paths
    )  # fmt: skip
    if "te2" in comps or (("input_blocks" in unet or "output_blocks" in unet) and not sd1_ldm):
        return "sdxl-base", False
    return "sd1", False


def _alphas(m: ModelFile) -> dict[str, dict[str, Any]]:
    """diffusers / PEFT LoraConfig kwargs per component prefix ("" for PEFT's unprefixed)."""
    raw = m.metadata.get("lora_adapter_metadata")
    try:
        cfg = json.loads(raw) if raw else {}
    except ValueError:
        cfg = {}
    out: dict[str, dict[str, Any]] = {}
    for k, v in cfg.items() if isinstance(cfg, dict) else ():
        comp, dot, name = str(k).rpartition(".")
        out.setdefault(comp if dot else "", {})[name if dot else str(k)] = v
    return out


def _pattern(stem: str, pattern: dict[str, Any], default: Any) -> Any:
    best = None
    for pat, value in (pattern or {}).items():
        if (stem == pat or stem.endswith("." + pat)) and (best is None or len(pat) > len(best[0])):
            best = (pat, value)
    return default if best is None else best[1]


def _canonical(m: ModelFile, fam: str, main: str, mod: Mod) -> list[Mod]:
    """``mod`` (UNet / transformer, any naming) as modules under diffusers paths."""
    maps = keymap(fam, main, "to_diffusers", prefix="")(mod.path + ".weight")
    if not maps:
        return [mod]  # already a diffusers path
    targets = [mp.target.removesuffix(".weight") for mp in maps]
    if len(maps) == 1 and maps[0].kind == "copy":
        if maps[0].op == "swap_halves":
            mod = _swapped(m, mod)
        elif maps[0].op != "copy":
            raise UsageError(f"module {mod.stem!r}: its weight changes shape ({maps[0].op})")
        return [replace(mod, path=targets[0])]
    if maps[0].kind != "split":
        raise UsageError(f"module {mod.stem!r}: no rule for its weight ({maps[0].kind})")
    pieces = _split(m, mod, maps[0].parts)
    return [replace(p, path=t) for p, t in zip(pieces, targets, strict=True) if p is not None]


def _single(m: ModelFile, fam: str, main: str, mods: list[Mod], res: LoraFormatResult) -> list[Mod]:
    """Canonical UNet / transformer modules under single-file paths, parts fused."""
    km = keymap(fam, main, "to_single", prefix="")
    out: list[Mod] = []
    groups: dict[str, tuple[tuple[int, ...], dict[int, Mod]]] = {}
    for mod in mods:
        maps = km(mod.path + ".weight")
        if not maps:
            out.append(mod)
            continue
        mp = maps[0]
        target = mp.target.removesuffix(".weight")
        if mp.kind == "join":
            ratio, parts = groups.setdefault(target, (mp.parts, {}))
            if mp.part in parts:
                raise UsageError(f"two modules adapt part {mp.part} of {target!r}")
            parts[mp.part] = mod
            continue
        if mp.op == "swap_halves":
            mod = _swapped(m, mod)
        elif mp.op != "copy":
            raise UsageError(f"module {mod.stem!r}: its weight changes shape ({mp.op})")
        out.append(replace(mod, path=target))
    for target, (ratio, parts) in groups.items():
        fused = _fuse(m, target, parts, ratio)
        out.append(fused)
        res.fused.append(target)
        ranks = {p.rank for p in parts.values()}
        if fused.rank is not None and fused.rank not in ranks:
            res.rank_grown[target] = (max(r or 0 for r in ranks), fused.rank)
    return out


def _scalar(name: str, value: float, like: ModelFile) -> OutTensor:
    exact32 = float(np.float32(value)) == value
    dt = dtypes.from_code("F32" if exact32 else "F64")
    arr = np.array(value, dtype=np.float32 if exact32 else np.float64)
    info = TensorInfo(dt, (), (), 0, Storage(name, dt, dt.itemsize, load=arr.tobytes))

    def make() -> np.ndarray:
        return arr

    return OutTensor(name, like, info, dt, make)


def convert_lora_format(
    src: str | Path,
    out: str | Path,
    *,
    to: str,
    family: str | None = None,
    overwrite: bool = False,
    verify: bool = False,
    dry_run: bool = False,
) -> LoraFormatResult:
    """Rename the LoRA ``src`` into the ``to`` naming (kohya, diffusers, peft, comfy,
    ai-toolkit), splitting or fusing modules where the namings disagree (exactly)."""
    t0 = time.perf_counter()
    if to not in T.FORMATS:
        raise UsageError(f"--lora-format must be one of {', '.join(T.FORMATS)}, not {to!r}")
    side = _PEFT_SIDE[to]
    src, out = Path(src), Path(out)
    with open_model(src) as m:
        parsed = parse_lora(m.tensors)
        if not parsed.modules:
            raise UsageError("holds no LoRA modules (lora_down/up, lora_A/B)", path=src)
        where: dict[str, tuple[str, str]] = {}
        for stem, lm in parsed.modules.items():
            found = _split_stem(stem)
            if found is None:
                raise UsageError(f"cannot tell what module {stem!r} adapts", path=src)
            for role in lm.keys:
                if role != "alpha" and T.SUFFIX.get(role, (None, None))[side] is None:
                    why = " (DoRA differs between kohya and PEFT)" if role in _DORA else ""
                    raise UsageError(
                        f"module {stem!r}: its {role!r} tensor has no {to} spelling{why}", path=src
                    )
            where[stem] = found
        comps = {c for c, _ in where.values()}
        guessed = False
        if family:
            fam = family_name(family)
        else:
            widths = {
                m.tensors[lm.keys["down"]].shape[1]
                for s, lm in parsed.modules.items()
                if "down" in lm.keys
                and where[s][0] == "unet"
                and len(m.tensors[lm.keys["down"]].shape) > 1
            }
            fam, guessed = _detect([p for c, p in where.values() if c == "unet"], comps, widths)
        main = MAIN.get(fam, "unet")
        res = LoraFormatResult(src, out, fam, to, modules=len(where), dry_run=dry_run)
        if guessed:
            res.notes.append(f"the family was guessed as {fam}; say --family if it is not")
        cfgs = _alphas(m)
        mods: list[Mod] = []
        try:
            for stem, (comp, path) in where.items():
                if fam == "flux":
                    comp = T.FLUX_COMPONENTS.get(comp, comp)
                mod = _read_module(m, parsed.modules[stem], comp, path)
                if mod.alpha is None and mod.kind == "lora":
                    dcomp = main if comp == "unet" else T.DIFFUSERS_COMPONENT[comp]
                    cfg = cfgs.get(dcomp, cfgs.get("", {}))
                    name = path.removeprefix("text_model.")
                    a = _pattern(name, cfg.get("alpha_pattern", {}), cfg.get("lora_alpha"))
                    mod.alpha = None if a is None else float(a)
                if comp == "unet":
                    got = _canonical(m, fam, main, mod)
                    if len(got) > 1:
                        res.split.append(stem)
                    mods.extend(got)
                else:
                    mods.append(mod)
            if to == "comfy" or (to == "kohya" and fam in T.KOHYA_SINGLE_NAMES):
                unet = _single(m, fam, main, [x for x in mods if x.comp == "unet"], res)
                mods = unet + [x for x in mods if x.comp != "unet"]
            plan, meta_cfg = _plan(m, mods, fam, main, to, res)
        except UsageError as e:
            raise e.with_path(src) from None
        meta = {k: v for k, v in m.metadata.items() if k != "lora_adapter_metadata"}
        meta.setdefault("format", "pt")
        if meta_cfg:
            meta["lora_adapter_metadata"] = _pack(meta_cfg)
        if parsed.unknown:
            res.notes.append(f"{len(parsed.unknown)} key(s) belong to no module and are left out")
        for target, (a, b) in res.rank_grown.items():
            res.notes.append(
                f"{target}: its parts have different down factors, so the fused module has "
                f"them stacked (rank {a} per part -> {b}, block-diagonal up; exact, larger)"
            )
        if dry_run:
            return replace(res, written=len(mods), seconds=time.perf_counter() - t0)
        w = write_model(plan, out, metadata=meta, overwrite=overwrite, verify=verify)
        return replace(
            res,
            written=len(mods),
            output_bytes=w.nbytes,
            verified=w.verified,
            seconds=time.perf_counter() - t0,
        )


def _plan(
    m: ModelFile, mods: list[Mod], fam: str, main: str, to: str, res: LoraFormatResult
) -> tuple[list[OutTensor], dict[str, dict[str, Any]]]:
    side = _PEFT_SIDE[to]
    plan: list[OutTensor] = []
    meta_cfg: dict[str, dict[str, Any]] = {}
    single_te = fam in ("sd1", "sd2")
    seen: set[str] = set()
    for mod in mods:
        comp, path = mod.comp, mod.path
        dcomp = main if comp == "unet" else T.DIFFUSERS_COMPONENT[comp]
        if to == "kohya":
            new = T.kohya_prefix(fam, comp, single_te) + "_" + path.replace(".", "_")
        elif to == "comfy":
            te = T.COMFY_TE.get(fam, {})
            if comp == "unet":
                new = "diffusion_model." + path
            elif comp in te:
                new = f"{te[comp]}.{path}"
            else:
                raise UsageError(f"no ComfyUI name for {comp} of {fam}")
        elif to == "peft":
            if comp != "unet":
                raise UsageError(
                    "the PEFT format holds one model: this LoRA also adapts text encoders "
                    "(use --lora-format diffusers)"
                )
            new = f"base_model.model.{path}"
        else:
            new = f"{dcomp}.{path}"
        if new in seen:
            raise UsageError(f"two modules would both be named {new!r}")
        seen.add(new)
        for role, piece in mod.t.items():
            suffix = T.SUFFIX[role][side]
            assert suffix is not None
            plan.append(piece.out(new + suffix, m))
        rank = mod.rank
        if mod.kind == "lora" and side == 1:
            assert rank is not None
            value = float(rank if mod.alpha is None else mod.alpha)
            if to == "ai-toolkit":
                if value != rank:
                    raise UsageError(
                        f"module {mod.stem!r} has alpha {value:g} at rank {rank}: ai-toolkit "
                        "files carry no alpha (scale 1); use --lora-format diffusers"
                    )
            else:
                bucket = "" if to == "peft" else dcomp
                c = meta_cfg.setdefault(
                    bucket, {"rank_pattern": {}, "alpha_pattern": {}, "target_modules": []}
                )
                # PEFT matches by suffix: without "text_model." it fits transformers' CLIP
                # before and after 5.6 (which flattened CLIPTextModel)
                name = path.removeprefix("text_model.") if comp != "unet" else path
                c["rank_pattern"][name] = rank
                c["alpha_pattern"][name] = int(value) if value == int(value) else value
                c["target_modules"].append(name)
        elif mod.alpha_key is not None:  # kohya / ComfyUI, and LyCORIS kinds everywhere
            key = mod.alpha_key
            plan.append(OutTensor(new + ".alpha", *m.locate(key), m.tensors[key].dtype))
        elif rank is not None and (mod.kind == "lora" or mod.alpha is not None):
            value = float(rank if mod.alpha is None else mod.alpha)
            plan.append(_scalar(new + ".alpha", value, m))
        res.mapping.extend((stem, new) for stem in mod.stems or (mod.stem,))
    return plan, meta_cfg


def _pack(meta_cfg: dict[str, dict[str, Any]]) -> str:
    packed: dict[str, Any] = {}
    for bucket, c in meta_cfg.items():
        ranks, alphas = c["rank_pattern"], c["alpha_pattern"]
        first = next(iter(ranks))
        cfg_out = {
            "r": ranks[first],
            "lora_alpha": alphas[first],
            "rank_pattern": ranks,
            "alpha_pattern": alphas,
            "target_modules": sorted(c["target_modules"]),
            "use_dora": False,
            "lora_bias": False,
        }
        for k, v in cfg_out.items():
            packed[f"{bucket}.{k}" if bucket else k] = v
    return json.dumps(packed, indent=2, sort_keys=True)
