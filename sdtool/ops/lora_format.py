"""``convert --lora-format``: one LoRA file renamed between kohya, diffusers, PEFT and ComfyUI.

Every module keeps its tensors bit for bit (down/A, up/B are the same matrices under every
naming); only names and where alpha lives change: kohya and ComfyUI store ``<module>.alpha``,
diffusers stores PEFT's ``lora_alpha`` / ``alpha_pattern`` (and ``r`` / ``rank_pattern``) in the
``lora_adapter_metadata`` JSON prefixed by component, PEFT the same unprefixed. A module without
any alpha gets alpha = rank (scale 1, what every loader assumes then). The UNet / transformer
names move between diffusers paths and single-file paths (SDXL's ldm names, for kohya and
ComfyUI) through sdtool.layouts' key maps. Fused Flux / SD3 attention (kohya's
``img_attn_qkv`` against diffusers' ``to_q/to_k/to_v``) would need the factors split or
block-diagonalised: refused with a message, not approximated.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdtool import dtypes
from sdtool.errors import UsageError
from sdtool.formats.open import open_model
from sdtool.layouts import family_name, keymap
from sdtool.layouts import lora as T
from sdtool.model import ModelFile, Storage, TensorInfo
from sdtool.ops.lora.names import parse_lora
from sdtool.write import OutTensor, write_model

MAIN = {"sd3": "transformer", "sd3.5-large": "transformer", "flux": "transformer"}
_DOTTED_PREFIXES = (
    ("base_model.model.", "unet"),
    ("diffusion_model.", "unet"),
    ("transformer.", "unet"),
    ("unet.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder_3.", "te3"),
    ("text_encoder.", "te1"),
    ("text_encoders.clip_l.transformer.", "te1"),
    ("text_encoders.clip_h.transformer.", "te1"),
    ("text_encoders.clip_g.transformer.", "te2"),
    ("text_encoders.t5xxl.transformer.", "te3"),
)
_UNDERSCORE_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te1"),
)


@dataclass
class LoraFormatResult:
    """What ``convert_lora_format`` wrote (or would, for a dry run)."""

    input: Path
    output: Path
    family: str
    to: str
    modules: int = 0
    mapping: list[tuple[str, str]] = field(default_factory=list)  # old stem -> new stem
    notes: list[str] = field(default_factory=list)
    output_bytes: int = 0
    verified: bool = False
    dry_run: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": "sdtool.lora-format/1",
            "path": str(self.input),
            "output": str(self.output),
            "family": self.family,
            "lora_format": self.to,
            "modules": self.modules,
            "mapping": [{"source": a, "target": b} for a, b in self.mapping],
            "notes": self.notes,
            "output_bytes": self.output_bytes,
            "verified": self.verified,
            "dry_run": self.dry_run,
            "seconds": round(self.seconds, 3),
        }


def _split_stem(stem: str) -> tuple[str, str] | None:
    """(component id, dotted module path) of a stem in any naming."""
    for prefix, comp in _DOTTED_PREFIXES:
        if stem.startswith(prefix):
            return comp, stem[len(prefix) :]
    for prefix, comp in _UNDERSCORE_PREFIXES:
        if stem.startswith(prefix):
            return comp, T.dotted(stem[len(prefix) :])
    return None


def _detect(paths: dict[str, str], comps: set[str]) -> str:
    unet = " ".join(p for p in paths.values())
    if "double_blocks" in unet or "single_transformer_blocks" in unet or "single_blocks" in unet:
        return "flux"
    if "joint_blocks" in unet or ("te3" in comps and "transformer_blocks" in unet):
        return "sd3"
    if "te2" in comps or "input_blocks" in unet or "output_blocks" in unet:
        return "sdxl-base"
    return "sd1"


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


def _to_diffusers_path(family: str, main: str, path: str) -> str:
    """A UNet / transformer module path in diffusers names (from ldm / BFL names if need be)."""
    maps = keymap(family, main, "to_diffusers", prefix="")(path + ".weight")
    one = len(maps) == 1 and maps[0].kind == "copy" and maps[0].op == "copy"
    if one and maps[0].target.endswith(".weight"):
        return maps[0].target[: -len(".weight")]
    if maps:
        raise UsageError(
            f"module {path!r} is fused in one naming and split in the other "
            f"({len(maps)} parts); converting it would change the factors"
        )
    return path  # already a diffusers path


def _to_single_path(family: str, main: str, path: str) -> str:
    maps = keymap(family, main, "to_single", prefix="")(path + ".weight")
    if len(maps) == 1 and maps[0].kind == "copy" and maps[0].op == "copy":
        return maps[0].target[: -len(".weight")]
    if maps:
        raise UsageError(
            f"module {path!r} is split in diffusers names and fused in single-file names; "
            "converting it would change the factors"
        )
    return path


def _scalar(name: str, value: float, like: ModelFile) -> OutTensor:
    dt = dtypes.from_code("F32")
    arr = np.array(value, dtype=np.float32)
    info = TensorInfo(dt, (), (), 0, Storage(name, dt, 4, load=arr.tobytes))

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
    """Rename the LoRA ``src`` into the ``to`` naming (kohya, diffusers, peft, comfy)."""
    t0 = time.perf_counter()
    if to not in T.FORMATS:
        raise UsageError(f"--lora-format must be one of {', '.join(T.FORMATS)}, not {to!r}")
    src, out = Path(src), Path(out)
    with open_model(src) as m:
        parsed = parse_lora(m.tensors)
        if not parsed.modules:
            raise UsageError("holds no LoRA modules (lora_down/up, lora_A/B)", path=src)
        where: dict[str, tuple[str, str]] = {}
        for stem, mod in parsed.modules.items():
            if mod.kind != "lora":
                raise UsageError(
                    f"module {stem!r} is {mod.kind}: only LoRA (down/up) modules are renamed",
                    path=src,
                )
            found = _split_stem(stem)
            if found is None:
                raise UsageError(f"cannot tell what module {stem!r} adapts", path=src)
            where[stem] = found
        comps = {c for c, _ in where.values()}
        fam = family_name(family) if family else _detect(
            {s: p for s, (c, p) in where.items() if c == "unet"}, comps
        )  # fmt: skip
        main = MAIN.get(fam, "unet")
        res = LoraFormatResult(src, out, fam, to, modules=len(where), dry_run=dry_run)
        cfgs = _alphas(m)
        plan: list[OutTensor] = []
        meta_cfg: dict[str, dict[str, Any]] = {}
        single_te = fam in ("sd1", "sd2")
        for stem, (comp, path) in where.items():
            mod = parsed.modules[stem]
            if comp == "unet":
                path = _to_diffusers_path(fam, main, path)
            down_key, up_key = mod.keys["down"], mod.keys["up"]
            rank = m.tensors[down_key].shape[0]
            dcomp = main if comp == "unet" else T.DIFFUSERS_COMPONENT[comp]
            alpha_key = mod.keys.get("alpha")
            cfg = cfgs.get(dcomp, cfgs.get("", {}))
            alpha = (
                None
                if alpha_key
                else _pattern(path, cfg.get("alpha_pattern", {}), cfg.get("lora_alpha"))
            )
            if to in ("kohya", "comfy"):
                if to == "kohya":
                    name_path = (
                        _to_single_path(fam, main, path)
                        if comp == "unet" and fam in T.KOHYA_SINGLE_NAMES
                        else path
                    )
                    prefix = (
                        T.KOHYA_SINGLE_TE if comp == "te1" and single_te else T.KOHYA_PREFIX[comp]
                    )
                    new = prefix + "_" + name_path.replace(".", "_")
                else:
                    te = T.COMFY_TE.get(fam, {})
                    if comp == "unet":
                        new = "diffusion_model." + _to_single_path(fam, main, path)
                    elif comp in te:
                        new = f"{te[comp]}.{path}"
                    else:
                        raise UsageError(f"no ComfyUI name for {comp} of {fam}", path=src)
                plan.append(
                    OutTensor(
                        new + ".lora_down.weight", *m.locate(down_key), m.tensors[down_key].dtype
                    )
                )
                plan.append(
                    OutTensor(new + ".lora_up.weight", *m.locate(up_key), m.tensors[up_key].dtype)
                )
                if alpha_key:
                    plan.append(
                        OutTensor(new + ".alpha", *m.locate(alpha_key), m.tensors[alpha_key].dtype)
                    )
                else:
                    plan.append(_scalar(new + ".alpha", float(rank if alpha is None else alpha), m))
            else:
                if to == "peft":
                    if comp != "unet":
                        raise UsageError(
                            "the PEFT format holds one model: this LoRA also adapts text "
                            "encoders (use --lora-format diffusers)",
                            path=src,
                        )
                    new, bucket = f"base_model.model.{path}", ""
                else:
                    new, bucket = f"{dcomp}.{path}", dcomp
                plan.append(
                    OutTensor(
                        new + ".lora_A.weight", *m.locate(down_key), m.tensors[down_key].dtype
                    )
                )
                plan.append(
                    OutTensor(new + ".lora_B.weight", *m.locate(up_key), m.tensors[up_key].dtype)
                )
                if alpha_key:
                    alpha = float(np.asarray(m.read(alpha_key), dtype=np.float64))
                value = float(rank if alpha is None else alpha)
                c = meta_cfg.setdefault(
                    bucket, {"rank_pattern": {}, "alpha_pattern": {}, "target_modules": []}
                )
                # PEFT matches by suffix: without "text_model." it fits transformers' CLIP
                # before and after 5.6 (which flattened CLIPTextModel)
                name = path.removeprefix("text_model.") if comp != "unet" else path
                c["rank_pattern"][name] = rank
                c["alpha_pattern"][name] = int(value) if value == int(value) else value
                c["target_modules"].append(name)
            res.mapping.append((stem, new))
        meta = {k: v for k, v in m.metadata.items() if k != "lora_adapter_metadata"}
        meta.setdefault("format", "pt")
        if meta_cfg:
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
            meta["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
        if parsed.unknown:
            res.notes.append(f"{len(parsed.unknown)} key(s) belong to no module and are left out")
        if dry_run:
            res.seconds = time.perf_counter() - t0
            return res
        w = write_model(plan, out, metadata=meta, overwrite=overwrite, verify=verify)
        res.output_bytes = w.nbytes
        res.verified = w.verified
        res.seconds = time.perf_counter() - t0
        return res
