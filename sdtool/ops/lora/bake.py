"""``bake``: LoRA / LoCon / LoHa / LoKr / DoRA files merged into a base checkpoint, streamed.

Every module of every LoRA is matched to a base key (``names``); each patched base tensor is
computed when the writer reaches it: the base tensor in float32, plus, LoRA by LoRA in the
order given, ``strength * scale * delta`` on the rows the module covers (a split q/k/v LoRA
patches its slice of a fused weight), DoRA modules renormalised (``math.dora``); then cast to
the base's dtype (or ``dtype``). Unpatched tensors are copied as they are. Modules that match
nothing are reported (``BakeResult.unmatched``); ``strict`` makes them an error.

Example:
    >>> r = bake("sdxl.safetensors", [("style.safetensors", 0.8)], "baked.safetensors")
    >>> r.patched, r.unmatched
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sdtool import __version__
from sdtool.dtypes import DType
from sdtool.errors import SdtoolError, UsageError
from sdtool.formats.open import opened, path_of
from sdtool.model import ModelFile
from sdtool.ops.arith import Inputs, Output, Overflows, write_result
from sdtool.ops.lora import math as lm
from sdtool.ops.lora.names import (
    BaseTarget,
    LoraModule,
    ModuleId,
    native_ids,
    parse_lora,
)
from sdtool.results import JsonKey, Result, json_key, rounded
from sdtool.vocab import CASTABLE, dtype_name
from sdtool.write import WriteOptions, options_from, output_format
from sdtool.write.atomic import check_output
from sdtool.write.plan import OutTensor

SCHEMA = "sdtool.lora-bake/1"


class UnmatchedModules(SdtoolError):
    """``strict=True`` and some LoRA module matched no base key (the command exits 1)."""


@dataclass
class Patch:
    """One LoRA module applied to one base tensor (or a row range of it)."""

    lora: int  # index into the LoRA list
    module: LoraModule
    kind: str
    target: BaseTarget
    strength: float
    scale: float  # alpha / rank (1 without alpha)
    dora: str | None = None  # the role holding the DoRA magnitude


@dataclass(frozen=True)
class LoraReport:
    """One LoRA file: what it holds and where its modules went."""

    path: Path
    strength: float
    modules: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    matched: int = 0
    dora: int = 0
    unmatched: dict[str, str] = field(default_factory=dict)  # module stem -> why
    unknown_keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BakeResult(Result):
    """What ``bake`` did (or would do). ``to_json`` is docs/lora.md's ``sdtool.lora-bake/1``."""

    JSON_SCHEMA: ClassVar[str | None] = SCHEMA
    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = (
        "base", "output", "dtype", "dry_run", "loras", "patched", "overflows", "tensors",
        "output_bytes", "verified", "seconds",
    )  # fmt: skip

    base: Path
    output: Path
    loras: list[LoraReport]
    dtype: str
    patched: dict[str, list[str]] = field(default_factory=dict)  # base key -> module stems
    overflows: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False
    output_bytes: int = 0
    tensors: int = 0
    verified: bool = False
    seconds: float = field(default=0.0, metadata=json_key(as_=rounded))

    @property
    def unmatched(self) -> int:
        return sum(len(r.unmatched) for r in self.loras)


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """``path[:strength]`` -> (path, strength); the strength defaults to 1.0."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


# -- matching -------------------------------------------------------------------------------


def base_index(base: ModelFile) -> dict[ModuleId, BaseTarget]:
    """Every id a LoRA module may use for a base weight -> where its delta goes."""
    bare = _bare_component(base)
    index: dict[ModuleId, BaseTarget] = {}
    for key in base.tensors:
        for mid, target in native_ids(key, bare):
            index.setdefault(mid, target)
    for mid, target in layout_ids(base):
        index.setdefault(mid, target)
    return index


def _bare_component(base: ModelFile) -> str:
    """The component of keys without a checkpoint prefix: a bare text encoder file's keys
    start with ``text_model.`` / ``encoder.``; anything else is taken as a UNet/transformer."""
    keys = list(base.tensors)
    if keys and all(k.startswith(("text_model.", "encoder.", "shared.")) for k in keys):
        return "te3" if any(k.startswith("encoder.block.") for k in keys) else "te1"
    return "unet"


#: diffusers component -> LoRA component
LAYOUT_COMPONENTS = {
    "unet": "unet",
    "transformer": "unet",
    "text_encoder": "te1",
    "text_encoder_2": "te2",
    "text_encoder_3": "te3",
}


def layout_ids(base: ModelFile) -> list[tuple[ModuleId, BaseTarget]]:
    """The diffusers names of the base's weights, through sdtool.layouts' tables when the
    base's family has them (SD1 kohya LoRAs and diffusers/PEFT LoRAs use these)."""
    try:
        from sdtool import layouts
    except ImportError:  # the layout tables are not in this build
        return []
    from sdtool.identify import identify

    family = identify(base).architecture
    if family is None:
        return []
    try:
        comps = layouts.components(family)
    except SdtoolError:
        return []
    out: list[tuple[ModuleId, BaseTarget]] = []
    for comp in comps:
        lora_comp = LAYOUT_COMPONENTS.get(comp)
        if lora_comp is None:
            continue
        for prefix in _prefixes(layouts, family, comp, base):
            kmap = layouts.keymap(family, comp, "to_diffusers", prefix=prefix)
            for key, info in base.tensors.items():
                if not key.startswith(prefix) or not info.dtype.is_float:
                    continue
                for mp in kmap(key):
                    if mp.kind == "join" or not mp.target.endswith(".weight"):
                        continue
                    rows = None
                    if mp.kind == "split":
                        try:
                            rows = layouts.part_rows(info.shape[0], mp.parts, mp.part)
                        except SdtoolError:  # rows that do not split in the table's ratio
                            continue
                    path = mp.target[: -len(".weight")].replace(".", "_")
                    out.append(((lora_comp, path), BaseTarget(key, rows, mp.op, family)))
    return out


def _prefixes(layouts: Any, family: str, comp: str, base: ModelFile) -> list[str]:
    """The checkpoint prefix the base uses for ``comp``: the family's usual one, or none."""
    usual = layouts.single_prefix(family, comp)
    if usual and any(k.startswith(usual) for k in base.tensors):
        return [usual]
    return [""] if comp in ("unet", "transformer") else []


def _expected_numel(kind: str, shapes: dict[str, tuple[int, ...]]) -> int:
    """How many elements the module's delta has, from its factors' shapes."""
    if kind == "lora":
        up, down = shapes["up"], shapes["down"]
        if "mid" in shapes:
            return up[0] * down[1] * prod(shapes["mid"][2:])
        return up[0] * prod(down[1:])
    if kind == "loha":
        a, b = shapes["hada_w1_a"], shapes["hada_w1_b"]
        if "hada_t1" in shapes:
            return a[1] * b[1] * prod(shapes["hada_t1"][2:])
        return a[0] * prod(b[1:])
    if kind == "lokr":
        return _lokr_numel(shapes, "1") * _lokr_numel(shapes, "2")
    if kind == "full":
        return prod(shapes["diff"])
    return prod(shapes["diff_b"])


def _lokr_numel(shapes: dict[str, tuple[int, ...]], i: str) -> int:
    if f"lokr_w{i}" in shapes:
        return prod(shapes[f"lokr_w{i}"])
    a, b = shapes[f"lokr_w{i}_a"], shapes[f"lokr_w{i}_b"]
    if i == "2" and "lokr_t2" in shapes:
        return a[1] * b[1] * prod(shapes["lokr_t2"][2:])
    return a[0] * prod(b[1:])


def peft_alphas(lora: ModelFile) -> tuple[float | None, dict[str, float]]:
    """lora_alpha and alpha_pattern from diffusers' ``lora_adapter_metadata`` (PEFT config)."""
    raw = lora.metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None, {}
    if not isinstance(cfg, dict):
        return None, {}
    alpha = cfg.get("lora_alpha")
    pattern = cfg.get("alpha_pattern") or {}
    return (
        float(alpha) if isinstance(alpha, int | float) else None,
        {str(k): float(v) for k, v in pattern.items() if isinstance(v, int | float)},
    )


def plan_patches(
    base: ModelFile,
    loras: Sequence[tuple[ModelFile, float]],
    io: Inputs,
) -> tuple[dict[str, list[Patch]], list[LoraReport]]:
    """Match every LoRA module to a base target; base key -> patches in LoRA order."""
    index = base_index(base)
    patches: dict[str, list[Patch]] = {}
    reports: list[LoraReport] = []
    for li, (lora, strength) in enumerate(loras):
        parsed = parse_lora(lora.tensors)
        kinds_seen: dict[str, int] = {}
        unmatched: dict[str, str] = {}
        matched = dora_modules = 0
        peft_alpha, pattern = peft_alphas(lora)
        # sorted: modules that patch one tensor (a fused qkv and its q) apply in name order
        for stem, mod in sorted(parsed.modules.items()):
            kind = mod.kind
            assert kind is not None
            kinds_seen[kind] = kinds_seen.get(kind, 0) + 1
            mid = mod.id
            if mid is None:
                unmatched[stem] = "unknown module naming"
                continue
            # a module may carry a bias diff beside its weight factors: two patches
            kinds = [kind] + (["bias"] if kind != "bias" and "diff_b" in mod.keys else [])
            made: list[tuple[str, Patch]] = []
            for kd in kinds:
                found = _target(index.get(mid), kd, base)
                if isinstance(found, str):
                    unmatched[stem] = found
                    break
                shapes = {r: lora.tensors[k].shape for r, k in mod.keys.items()}
                why = _fits(kd, shapes, found, base)
                if why is not None:
                    unmatched[stem] = why
                    break
                alpha = None
                if "alpha" in mod.keys:
                    alpha = float(io.f32(lora, mod.keys["alpha"]).reshape(-1)[0])
                elif peft_alpha is not None:
                    alpha = pattern_alpha(stem, pattern, peft_alpha)
                dora = None
                if kd != "bias":
                    dora = next((r for r in ("dora", "magnitude") if r in mod.keys), None)
                scale = lm.scale_of(kd, shapes, alpha)
                made.append((found.key, Patch(li, mod, kd, found, strength, scale, dora)))
            else:
                matched += 1
                dora_modules += any(p.dora is not None for _, p in made)
                for key, patch in made:
                    patches.setdefault(key, []).append(patch)
        reports.append(
            LoraReport(
                lora.path, strength, len(parsed.modules), kinds_seen, matched, dora_modules,
                unmatched, parsed.unknown,
            )
        )  # fmt: skip
    return patches, reports


def _target(target: BaseTarget | None, kind: str, base: ModelFile) -> BaseTarget | str:
    """The base target of a module kind (a bias diff goes to the weight's ``.bias``), or why
    there is none."""
    if target is None:
        return "no base key has this module"
    if kind == "bias":
        target = BaseTarget(
            target.key[: -len(".weight")] + ".bias", target.rows, target.op, target.via
        )
    if target.key not in base.tensors:
        return f"the base has no {target.key!r}"
    return target


def _fits(
    kind: str, shapes: dict[str, tuple[int, ...]], target: BaseTarget, base: ModelFile
) -> str | None:
    """Why the module's delta cannot patch ``target`` (size or dtype), or None."""
    info = base.tensors[target.key]
    if not info.dtype.is_float or info.dtype.code not in CASTABLE:
        return f"{target.key!r} is {info.dtype}: not patched"
    rows = target.rows or (0, info.shape[0] if info.shape else 1)
    want = (rows[1] - rows[0]) * prod(info.shape[1:])
    have = _expected_numel(kind, shapes)
    if have == want:
        return None
    where = f" rows {rows[0]}:{rows[1]}" if target.rows else ""
    return f"its {kind} delta has {have} values, {target.key!r} {list(info.shape)}{where} {want}"


def pattern_alpha(stem: str, pattern: dict[str, float], default: float) -> float:
    """PEFT's alpha_pattern: the longest pattern the module name ends with wins."""
    best = None
    for pat, value in pattern.items():
        if (stem == pat or stem.endswith("." + pat)) and (best is None or len(pat) > len(best[0])):
            best = (pat, value)
    return default if best is None else best[1]


# -- the arithmetic -------------------------------------------------------------------------


def patched_tensor(
    base: ModelFile,
    key: str,
    patches: Sequence[Patch],
    loras: Sequence[ModelFile],
    io: Inputs,
) -> np.ndarray:
    """The base tensor ``key`` in float32 with every patch applied, in order."""
    w = np.array(io.whole(base, key), dtype=np.float32, copy=True)
    for p in patches:
        lora = loras[p.lora]
        shapes = {r: lora.tensors[k].shape for r, k in p.module.keys.items()}

        def get(role: str, lora: ModelFile = lora, p: Patch = p) -> np.ndarray:
            k = p.module.keys[role]
            return io.f32(lora, k).reshape(lora.tensors[k].shape)

        region = w if p.target.rows is None else w[p.target.rows[0] : p.target.rows[1]]
        d = lm.raw_delta(p.kind, get, set(shapes), _natural_shape(p, region.shape))
        d = _to_base(d, p.target.op).reshape(region.shape)
        delta = np.float32(p.strength * p.scale) * d
        if p.dora is not None:
            region[...] = lm.dora(region, delta, get(p.dora))
        else:
            region += delta
    return w


def _natural_shape(p: Patch, region: tuple[int, ...]) -> tuple[int, ...]:
    """The delta's shape in the LoRA's own layout (before the layout op back to the base)."""
    if p.target.op in ("transpose",) and len(region) == 2:
        return region[::-1]
    return region


def _to_base(d: np.ndarray, op: str) -> np.ndarray:
    """Apply the inverse of the layout op (LoRA/diffusers layout -> base layout)."""
    if op == "copy" or op in ("squeeze", "unsqueeze"):
        return d  # a reshape to the region's shape does it
    if op == "transpose":
        return np.ascontiguousarray(d.T)
    if op == "swap_halves":
        half = d.shape[0] // 2
        return np.concatenate([d[half:], d[:half]])
    raise ValueError(f"unknown layout op {op!r}")


@dataclass(frozen=True, kw_only=True)
class BakeOptions(WriteOptions):
    """bake's options: the write options (``dtype``: of floating tensors; None keeps the
    base's), and ``strict``: raise UnmatchedModules (nothing written) when a module matches
    no base key."""

    strict: bool = False


def bake(
    base: str | Path | ModelFile,
    loras: Sequence[str | Path | ModelFile | tuple[str | Path | ModelFile, float]],
    out: str | Path,
    options: BakeOptions | None = None,
    **changes: Any,
) -> BakeResult:
    """Bake LoRAs into ``base``, writing ``out`` (format by extension).

    Args:
        base: a path, or an opened ModelFile (left open).
        loras: LoRA files, each a path or ModelFile (``path:strength`` strings accepted) or
            (path or ModelFile, strength).
        options: BakeOptions, or its fields as keywords (``dtype``, ``strict``, ``dry_run``:
            match and report only, ``overwrite``, ``verify``, ``on_overflow``, ``progress``).

    Returns a BakeResult; raises SdtoolError subclasses (nothing is written then).
    """
    t0 = time.perf_counter()
    o = options_from(BakeOptions, options, changes)
    dtype, strict, dry_run, overwrite = o.dtype, o.strict, o.dry_run, o.overwrite
    verify, on_overflow, progress = o.verify, o.on_overflow, o.progress
    base_p, out = path_of(base), Path(out)
    given: list[tuple[str | Path | ModelFile, float]] = [
        (x[0], float(x[1]))
        if isinstance(x, tuple)
        else (x, 1.0)
        if isinstance(x, ModelFile)
        else parse_lora_arg(str(x))
        for x in loras
    ]
    specs = [(path_of(src), s) for src, s in given]
    if not specs:
        raise UsageError("give at least one LoRA")
    from sdtool.ops.merge import _out_dtype

    target_dt = dtype
    output_format(out)
    if not dry_run:
        check_output(out, inputs=[base_p, *(p for p, _ in specs)], overwrite=overwrite)
    with ExitStack() as stack:
        bm = stack.enter_context(opened(base))
        lms = [stack.enter_context(opened(src)) for src, _ in given]
        io = stack.enter_context(Inputs())
        patches, reports = plan_patches(
            bm, [(m, s) for m, (_, s) in zip(lms, specs, strict=True)], io
        )
        result = BakeResult(
            base=base_p,
            output=out,
            loras=reports,
            dtype=dtype_name(None if dtype is None else dtype.code),
            patched={k: [p.module.stem for p in ps] for k, ps in patches.items()},
            dry_run=dry_run,
            tensors=len(bm.tensors),
        )
        if strict and result.unmatched:
            first = next((r, s) for r in reports for s in r.unmatched)
            raise UnmatchedModules(
                f"{result.unmatched} LoRA module(s) match no base key (first: "
                f"{first[1]!r} in {first[0].path.name}: {first[0].unmatched[first[1]]}); "
                "nothing was written",
            )
        if dry_run:
            return replace(result, seconds=time.perf_counter() - t0)
        overflows = Overflows(on_overflow)
        plan: list[OutTensor] = []
        for key, info in bm.tensors.items():
            want = _out_dtype(info.dtype, target_dt)
            ps = patches.get(key)
            if ps is None:
                plan.append(OutTensor(key, bm, info, want))
                continue
            plan.append(
                OutTensor(key, bm, info, want, _maker(bm, key, ps, lms, io, want, overflows))
            )
        recipe = {
            "type": "sdtool-lora-bake",
            "sdtool_version": __version__,
            "base": base_p.name,
            "loras": [{"name": p.name, "strength": s} for p, s in specs],
        }
        from sdtool.ops.convert import build_metadata

        meta, _, _ = build_metadata(bm, add={"sdtool_lora_bake": json.dumps(recipe)})
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
    return result


def _maker(
    base: ModelFile,
    key: str,
    patches: Sequence[Patch],
    loras: Sequence[ModelFile],
    io: Inputs,
    dtype: DType,
    overflows: Overflows,
) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        try:
            w = patched_tensor(base, key, patches, loras, io)
        except SdtoolError as e:
            raise e.with_path(loras[patches[0].lora].path) from None
        out = Output(w.shape, dtype)
        out.put(0, w)
        return overflows.done(key, out)

    return make
