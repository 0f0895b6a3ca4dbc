"""Layout tables: single-file (ldm / sgm / BFL / SAI) names <-> diffusers names, as data.

The API other modules use::

    from sdtool.layouts import keymap
    to_diff = keymap("sd1", "unet", "to_diffusers")
    to_diff("model.diffusion_model.input_blocks.1.1.proj_in.weight")
    # (Mapping(source=..., target='down_blocks.0.attentions.0.proj_in.weight', op='copy', ...),)
    back = keymap("sdxl-base", "text_encoder_2", "to_single")
    back("text_model.encoder.layers.0.self_attn.k_proj.weight")
    # (Mapping(..., target='conditioner.embedders.1.model.transformer.resblocks.0.attn.
    #           in_proj_weight', kind='join', part=1, parts=(1, 1, 1)),)

Single-file keys carry their checkpoint prefix (``model.diffusion_model.``, ``first_stage_model.``,
...; ``prefix=""`` for a bare component file); diffusers keys are those of the component folder's
file (``unet/diffusion_pytorch_model.safetensors``, ``text_encoder/model.safetensors``, with the
hub's ``text_model.`` prefix). Each family table is written once, single file -> diffusers; the
other direction is its exact inverse (``KeyMap.inverse``). docs/layouts.md lists the sources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from sdtool.errors import UsageError
from sdtool.layouts import mmdit, sd
from sdtool.layouts.keymap import (
    OPS,
    KeyMap,
    Mapping,
    Rule,
    Target,
    apply_op,
    op_shape,
    part_rows,
    prefixed,
)

__all__ = [
    "COMPONENTS",
    "DIRECTIONS",
    "FAMILY_ALIASES",
    "OPS",
    "KeyMap",
    "Mapping",
    "Rule",
    "Target",
    "apply_op",
    "components",
    "family_name",
    "keymap",
    "op_shape",
    "part_rows",
    "single_prefix",
]

DIRECTIONS = ("to_diffusers", "to_single")


@dataclass(frozen=True)
class Component:
    """A family's component: its prefix in a single file, its table (single -> diffusers)."""

    prefix: str
    rules: Callable[[], list[Rule]]


_SD_VAE = Component("first_stage_model.", sd.vae_rules)
_CLIP_L_SDXL = Component("conditioner.embedders.0.transformer.", sd.hf_clip_rules)

#: family -> diffusers component name -> Component
COMPONENTS: dict[str, dict[str, Component]] = {
    "sd1": {
        "unet": Component("model.diffusion_model.", lambda: sd.unet_rules(sd.UNET_BLOCKS["sd1"])),
        "vae": _SD_VAE,
        "text_encoder": Component("cond_stage_model.transformer.", sd.hf_clip_rules),
    },
    "sd2": {
        "unet": Component("model.diffusion_model.", lambda: sd.unet_rules(sd.UNET_BLOCKS["sd2"])),
        "vae": _SD_VAE,
        "text_encoder": Component(
            "cond_stage_model.model.", lambda: sd.openclip_rules(23, projection=False)
        ),
    },
    "sdxl-base": {
        "unet": Component(
            "model.diffusion_model.", lambda: sd.unet_rules(sd.UNET_BLOCKS["sdxl-base"])
        ),
        "vae": _SD_VAE,
        "text_encoder": _CLIP_L_SDXL,
        "text_encoder_2": Component(
            "conditioner.embedders.1.model.", lambda: sd.openclip_rules(32, projection=True)
        ),
    },
    "sdxl-refiner": {
        "unet": Component(
            "model.diffusion_model.", lambda: sd.unet_rules(sd.UNET_BLOCKS["sdxl-refiner"])
        ),
        "vae": _SD_VAE,
        "text_encoder_2": Component(
            "conditioner.embedders.0.model.", lambda: sd.openclip_rules(32, projection=True)
        ),
    },
}

_T5 = lambda: mmdit.hf_rules("encoder", "shared")  # noqa: E731
_CLIP_HF_PROJ = lambda: mmdit.hf_rules("text_model", "text_projection")  # noqa: E731


def _sd3(depth: int) -> dict[str, Component]:
    return {
        "transformer": Component("model.diffusion_model.", lambda: mmdit.sd3_rules(depth)),
        "vae": Component("first_stage_model.", lambda: sd.vae_rules(quant_conv=False)),
        "text_encoder": Component("text_encoders.clip_l.transformer.", _CLIP_HF_PROJ),
        "text_encoder_2": Component("text_encoders.clip_g.transformer.", _CLIP_HF_PROJ),
        "text_encoder_3": Component("text_encoders.t5xxl.transformer.", _T5),
    }


COMPONENTS["sd3"] = _sd3(24)
COMPONENTS["sd3.5-large"] = _sd3(38)
COMPONENTS["flux"] = {
    "transformer": Component("model.diffusion_model.", mmdit.flux_rules),
    "vae": Component("vae.", lambda: sd.vae_rules(quant_conv=False)),
    "text_encoder": Component("text_encoders.clip_l.transformer.", sd.hf_clip_rules),
    "text_encoder_2": Component("text_encoders.t5xxl.transformer.", _T5),
}

#: other spellings accepted for a family
FAMILY_ALIASES: dict[str, str] = {
    "sd15": "sd1",
    "sd1.x": "sd1",
    "sd21": "sd2",
    "sd2.x": "sd2",
    "sdxl": "sdxl-base",
    "sdxl_base": "sdxl-base",
    "sdxl_refiner": "sdxl-refiner",
    "sd3.5-medium": "sd3",
    "sd35-large": "sd3.5-large",
    "flux-dev": "flux",
    "flux-schnell": "flux",
    "flux1": "flux",
}


def family_name(family: str) -> str:
    """The canonical family name (identify's architecture names); UsageError if unknown."""
    name = FAMILY_ALIASES.get(family.lower(), family.lower())
    if name not in COMPONENTS:
        raise UsageError(f"no layout tables for family {family!r}; known: {', '.join(COMPONENTS)}")
    return name


def components(family: str) -> list[str]:
    """The diffusers component names a family's tables cover."""
    return list(COMPONENTS[family_name(family)])


def single_prefix(family: str, component: str) -> str:
    """The checkpoint prefix of ``component``'s keys in a single file (model.diffusion_model.)."""
    return _component(family, component).prefix


def _component(family: str, component: str) -> Component:
    fam = COMPONENTS[family_name(family)]
    if component not in fam:
        raise UsageError(
            f"family {family!r} has no component {component!r}; it has {', '.join(fam)}"
        )
    return fam[component]


def keymap(
    family: str, component: str, direction: str = "to_diffusers", *, prefix: str | None = None
) -> KeyMap:
    """The key map of one component of one family, in one direction.

    Args:
        family: "sd1", "sd2", "sdxl-base", "sdxl-refiner", "sd3" (SD3 and 3.5 medium: 24
            blocks), "sd3.5-large" (38), "flux" (aliases in FAMILY_ALIASES).
        component: a diffusers component name: "unet", "transformer", "vae", "text_encoder",
            "text_encoder_2", "text_encoder_3".
        direction: "to_diffusers" (single-file key -> diffusers key) or "to_single".
        prefix: the single-file side's checkpoint prefix; None = the family's usual one
            (``single_prefix``), "" for a bare component file (a ComfyUI UNet, a VAE file).

    Returns:
        A ``KeyMap``: call it with a key to get its ``Mapping`` tuple (empty: not covered).

    Raises:
        UsageError: unknown family, component or direction.
    """
    if direction not in DIRECTIONS:
        raise UsageError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
    comp = _component(family, component)
    return _keymap(
        family_name(family), component, direction, comp.prefix if prefix is None else prefix
    )


@cache
def _keymap(family: str, component: str, direction: str, prefix: str) -> KeyMap:
    forward = KeyMap(prefixed(COMPONENTS[family][component].rules(), prefix))
    return forward if direction == "to_diffusers" else forward.inverse()
