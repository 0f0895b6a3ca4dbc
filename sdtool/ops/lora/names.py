"""LoRA file keys -> modules, and base-model keys -> the names LoRA trainers give them.

A LoRA file is a set of modules, each a handful of tensors under one stem
(``lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight``,
``transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight``). ``parse_lora`` groups the
keys by stem and role (``ROLES``); ``module_id`` turns any stem into one canonical id,
(component, path with "." -> "_"), the way kohya names modules, so every naming meets the same
index: kohya (``lora_unet_``, ``lora_te_``/``lora_te1_``/``lora_te2_``/``lora_te3_``),
LyCORIS/OneTrainer (``lycoris_``, ``lora_transformer_``), diffusers/PEFT/ai-toolkit
(``unet.``, ``transformer.``, ``text_encoder.``, ``text_encoder_2.``, ``text_encoder_3.``,
``base_model.model.``), ComfyUI (``diffusion_model.``) and diffusers' old attention-processor
names (``attn1.processor.to_q_lora``).

``base_ids`` gives, for a base checkpoint key, every id a LoRA may use for it: its own path
under its component (SDXL kohya LoRAs use ldm names, Flux kohya LoRAs BFL names, text encoders
HF names), and, through ``sdtool.layouts`` when the family has tables, its diffusers path (SD1
kohya LoRAs and every diffusers/PEFT LoRA), possibly a row slice of a fused tensor (q/k/v of an
OpenCLIP ``in_proj_weight``, Flux's ``qkv``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sdtool.layouts.lora import DOTTED_PREFIXES, UNDERSCORE_PREFIXES

#: key suffix -> role of the tensor in its module; longest suffixes are tried first
ROLES: dict[str, str] = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down",  # diffusers' old attention processors: to_q_lora.down.weight
    "_lora.up.weight": "up",
    ".alpha": "alpha",
    ".dora_scale": "dora",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector.default.weight": "magnitude",
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1",
    ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "lokr_t2",
    ".diff": "diff",
    ".diff_b": "diff_b",
}
_SUFFIXES = sorted(ROLES, key=len, reverse=True)

#: module kinds: the roles that make one (checked in this order)
KINDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("lora", frozenset({"up", "down"})),
    ("loha", frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})),
    ("lokr", frozenset()),  # any lokr_* role; checked by prefix below
    ("full", frozenset({"diff"})),
    ("bias", frozenset({"diff_b"})),
)

#: diffusers' old attention-processor module names -> the Linear they adapt
_PROCESSOR = re.compile(
    r"\.processor\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj)(?:_lora)?$"
)
_PROCESSOR_TARGET = {"to_out": "to_out.0"}

ModuleId = tuple[str, str]  # (component, path with "_" for ".")


@dataclass
class LoraModule:
    """One adapted module of a LoRA file: its tensors by role."""

    stem: str
    keys: dict[str, str] = field(default_factory=dict)  # role -> tensor name

    @property
    def kind(self) -> str | None:
        roles = set(self.keys)
        for kind, need in KINDS:
            if kind == "lokr":
                if any(r.startswith("lokr_") for r in roles):
                    return kind
            elif need <= roles:
                return kind
        return None

    @property
    def id(self) -> ModuleId | None:
        return module_id(self.stem)


@dataclass
class ParsedLora:
    """A LoRA file's modules, and the keys that belong to none (reported, not used)."""

    modules: dict[str, LoraModule]
    unknown: list[str]


def parse_lora(keys: Iterable[str]) -> ParsedLora:
    """Group LoRA tensor names into modules by stem and role (``ROLES``)."""
    modules: dict[str, LoraModule] = {}
    unknown: list[str] = []
    for key in keys:
        for suffix in _SUFFIXES:
            if key.endswith(suffix) and len(key) > len(suffix):
                stem = key[: -len(suffix)]
                role = ROLES[suffix]
                modules.setdefault(stem, LoraModule(stem)).keys[role] = key
                break
        else:
            unknown.append(key)
    # a stem with only alpha / dora_scale / magnitude is no module of its own
    for stem in [s for s, m in modules.items() if m.kind is None]:
        unknown.extend(modules.pop(stem).keys.values())
    return ParsedLora(modules, sorted(unknown))


def module_id(stem: str) -> ModuleId | None:
    """The canonical (component, underscore path) of a LoRA module stem, None if unknown."""
    m = _PROCESSOR.search(stem)
    if m:
        target = _PROCESSOR_TARGET.get(m.group(1), m.group(1))
        stem = stem[: m.start()] + "." + target + stem[m.end() :]
    for prefix, comp in UNDERSCORE_PREFIXES:
        if stem.startswith(prefix):
            return comp, stem[len(prefix) :].replace(".", "_")
    for prefix, comp in DOTTED_PREFIXES:
        if stem.startswith(prefix):
            return comp, stem[len(prefix) :].replace(".", "_")
    return None


# -- the base side --------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseTarget:
    """Where a LoRA module's delta goes: a base key, optionally a row range of it, and the
    exact transform from the LoRA's layout to the base's (sdtool.layouts OPS inverse)."""

    key: str
    rows: tuple[int, int] | None = None  # [start, stop) along dim 0 of the base tensor
    op: str = "copy"
    via: str = "native"  # "native" or the family whose layout table named it


#: checkpoint prefix -> component, for base keys whose component uses the names LoRAs use
BASE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "unet"),
    ("cond_stage_model.transformer.", "te1"),
    ("conditioner.embedders.0.transformer.", "te1"),
    ("text_encoders.clip_l.transformer.", "te1"),
    ("text_encoders.clip_g.transformer.", "te2"),
    ("text_encoders.t5xxl.transformer.", "te3"),
)
#: keys under these prefixes are never a LoRA target (VAE, EMA copies, noise schedules)
NOT_TARGETS = ("first_stage_model.", "model_ema.", "vae.", "betas", "alphas_cumprod")

#: a callable giving (component, diffusers path without ".weight", target) for a base key
Aliases = Callable[[str, tuple[int, ...]], list[tuple[str, str, BaseTarget]]]


def native_ids(key: str, bare_component: str = "unet") -> list[tuple[ModuleId, BaseTarget]]:
    """The ids a base ``*.weight`` key has under its own names."""
    if not key.endswith(".weight") or key.startswith(NOT_TARGETS):
        return []
    stem = key[: -len(".weight")]
    for prefix, comp in BASE_PREFIXES:
        if stem.startswith(prefix):
            return [((comp, stem[len(prefix) :].replace(".", "_")), BaseTarget(key))]
    if any(stem.startswith(p) for p in ("cond_stage_model.", "conditioner.", "text_encoders.")):
        return []  # a text encoder whose names no LoRA uses (OpenCLIP): layouts may map it
    return [((bare_component, stem.replace(".", "_")), BaseTarget(key))]
