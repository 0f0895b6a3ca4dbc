"""diffusers folder configs, from sdtool's own tables and the tensors' shapes (never the network).

What a single file does not say comes from the family table here; what it does say (widths,
channel counts, layer counts, vocabulary, latent channels) is read from the shapes of the
diffusers-named tensors, so tiny test models with the real key structure get consistent configs.

Sources (facts only): diffusers ``src/diffusers/loaders/single_file_utils.py``
(``create_unet_diffusers_config_from_ldm``, ``create_vae_diffusers_config_from_ldm``,
``SCHEDULER_DEFAULT_CONFIG``, the default image sizes ``DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP``),
the pipelines' ``__init__`` signatures (``src/diffusers/pipelines/*/pipeline_*.py``), the public
model repos' ``model_index.json`` / ``scheduler_config.json`` as summarised in
shared/reference/CONVERSIONS.md section 1 and ``kohya-ss/sd-scripts library/model_util.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: the diffusers release these configs were checked against (written as _diffusers_version)
DIFFUSERS_VERSION = "0.42.0"

Shapes = Mapping[str, tuple[int, ...]]

#: one scheduler config for the SD 1.x/2.x/SDXL noise schedule (scaled_linear 0.00085..0.012)
_SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class Family:
    """What a family's diffusers folder looks like beyond the tensors."""

    pipeline: str
    #: diffusers component -> (library, class); None entries are written as [null, null]
    components: dict[str, tuple[str, str] | None]
    scheduler: tuple[str, dict[str, Any]]
    flags: dict[str, Any] = field(default_factory=dict)
    #: UNet facts: block types per level, heads rule, linear projection, image size (latents)
    down_blocks: tuple[str, ...] = ()
    heads: int | None = None  # fixed head count (SD1); None: width / 64 per level
    linear_projection: bool = True
    sample_size: int = 64
    vae_scaling: float = 0.18215
    prediction_type: str = "epsilon"


_CA, _DB = "CrossAttnDownBlock2D", "DownBlock2D"
_UP = {_CA: "CrossAttnUpBlock2D", _DB: "UpBlock2D"}
_CLIP = ("transformers", "CLIPTextModel")
_CLIP_PROJ = ("transformers", "CLIPTextModelWithProjection")

FAMILIES: dict[str, Family] = {
    "sd1": Family(
        "StableDiffusionPipeline",
        {
            "vae": ("diffusers", "AutoencoderKL"),
            "text_encoder": _CLIP,
            "tokenizer": None,
            "unet": ("diffusers", "UNet2DConditionModel"),
            "safety_checker": None,
            "feature_extractor": None,
            "image_encoder": None,
        },
        (
            "PNDMScheduler",
            {
                **_SD_SCHEDULE,
                "skip_prk_steps": True,
                "set_alpha_to_one": False,
                "prediction_type": "epsilon",
            },
        ),
        {"requires_safety_checker": False},
        down_blocks=(_CA, _CA, _CA, _DB),
        heads=8,
        linear_projection=False,
        sample_size=64,
    ),
    "sd2": Family(
        "StableDiffusionPipeline",
        {
            "vae": ("diffusers", "AutoencoderKL"),
            "text_encoder": _CLIP,
            "tokenizer": None,
            "unet": ("diffusers", "UNet2DConditionModel"),
            "safety_checker": None,
            "feature_extractor": None,
            "image_encoder": None,
        },
        ("DDIMScheduler", {**_SD_SCHEDULE, "clip_sample": False, "set_alpha_to_one": False}),
        {"requires_safety_checker": False},
        down_blocks=(_CA, _CA, _CA, _DB),
        sample_size=96,
        prediction_type="v_prediction",
    ),
    "sdxl-base": Family(
        "StableDiffusionXLPipeline",
        {
            "vae": ("diffusers", "AutoencoderKL"),
            "text_encoder": _CLIP,
            "text_encoder_2": _CLIP_PROJ,
            "tokenizer": None,
            "tokenizer_2": None,
            "unet": ("diffusers", "UNet2DConditionModel"),
            "image_encoder": None,
            "feature_extractor": None,
        },
        (
            "EulerDiscreteScheduler",
            {**_SD_SCHEDULE, "interpolation_type": "linear", "use_karras_sigmas": False},
        ),
        {"force_zeros_for_empty_prompt": True},
        down_blocks=(_DB, _CA, _CA),
        sample_size=128,
        vae_scaling=0.13025,
    ),
    "sdxl-refiner": Family(
        "StableDiffusionXLImg2ImgPipeline",
        {
            "vae": ("diffusers", "AutoencoderKL"),
            "text_encoder": None,
            "text_encoder_2": _CLIP_PROJ,
            "tokenizer": None,
            "tokenizer_2": None,
            "unet": ("diffusers", "UNet2DConditionModel"),
            "image_encoder": None,
            "feature_extractor": None,
        },
        (
            "EulerDiscreteScheduler",
            {**_SD_SCHEDULE, "interpolation_type": "linear", "use_karras_sigmas": False},
        ),
        {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True},
        down_blocks=(_DB, _CA, _CA, _DB),
        sample_size=128,
        vae_scaling=0.13025,
    ),
}

#: what a text encoder is, by family and component: (OpenCLIP-derived, activation)
TEXT_ACT: dict[str, str] = {"text_encoder": "quick_gelu", "text_encoder_2": "gelu"}


def model_index(family: str, present: set[str]) -> dict[str, Any]:
    """``model_index.json``: components written get their class, the rest [null, null]."""
    fam = FAMILIES[family]
    out: dict[str, Any] = {"_class_name": fam.pipeline, "_diffusers_version": DIFFUSERS_VERSION}
    out.update(fam.flags)
    for name, lib in fam.components.items():
        out[name] = list(lib) if lib is not None and name in present else [None, None]
    out["scheduler"] = ["diffusers", fam.scheduler[0]]
    return dict(sorted(out.items(), key=lambda kv: (not kv[0].startswith("_"), kv[0])))


def scheduler_config(family: str, prediction_type: str | None = None) -> dict[str, Any]:
    fam = FAMILIES[family]
    cls, cfg = fam.scheduler
    pred = prediction_type or fam.prediction_type
    return {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **cfg,
            "prediction_type": pred}  # fmt: skip


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def unet_config(family: str, shapes: Shapes, prediction_type: str | None = None) -> dict[str, Any]:
    """UNet2DConditionModel config from the family table and the diffusers-named shapes."""
    fam = FAMILIES[family]
    levels = len(fam.down_blocks)
    channels = [shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)]
    depth = []
    for i, kind in enumerate(fam.down_blocks):
        n = _count(shapes, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")
        depth.append(n if kind == _CA else 1)
    to_k = next(v for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))
    heads: int | list[int] = (
        fam.heads if fam.heads is not None else [max(1, c // 64) for c in channels]
    )
    pred = prediction_type or fam.prediction_type
    cfg: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": channels,
        "center_input_sample": False,
        "cross_attention_dim": to_k[1],
        "down_block_types": list(fam.down_blocks),
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": shapes["conv_in.weight"][1],
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": shapes["conv_out.weight"][0],
        "sample_size": fam.sample_size if pred == "v_prediction" or family != "sd2" else 64,
        "transformer_layers_per_block": depth if len(set(depth)) > 1 else depth[0],
        "up_block_types": [_UP[b] for b in reversed(fam.down_blocks)],
        "use_linear_projection": fam.linear_projection,
    }
    if "add_embedding.linear_1.weight" in shapes:
        cfg["addition_embed_type"] = "text_time"
        cfg["addition_time_embed_dim"] = 256
        cfg["projection_class_embeddings_input_dim"] = shapes["add_embedding.linear_1.weight"][1]
    return cfg


def vae_config(family: str, shapes: Shapes) -> dict[str, Any]:
    """AutoencoderKL config (SD 1.x/2.x/SDXL VAE)."""
    fam = FAMILIES[family]
    levels = _count(shapes, r"encoder\.down_blocks\.(\d+)\.")
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [
            shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)
        ],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": True,
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "latent_channels": shapes["encoder.conv_out.weight"][0] // 2,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "sample_size": fam.sample_size * 8,
        "scaling_factor": fam.vae_scaling,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
    }


def clip_config(component: str, shapes: Shapes, dtype: str) -> dict[str, Any]:
    """CLIPTextConfig (transformers) from the shapes; the hub's token ids (bos 0, eos 2, pad 1:
    the legacy argmax pooling the SD repos use)."""
    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    proj = shapes.get("text_projection.weight")
    return {
        "architectures": ["CLIPTextModelWithProjection" if proj else "CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "dtype": dtype,
        "eos_token_id": 2,
        "hidden_act": TEXT_ACT[component],
        "hidden_size": width,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
        "model_type": "clip_text_model",
        "num_attention_heads": max(1, width // 64),
        "num_hidden_layers": _count(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
        "pad_token_id": 1,
        "projection_dim": proj[0] if proj else width,
        "vocab_size": vocab,
    }
