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


def tokenizer_slots(family: str) -> dict[str, str]:
    """The family pipeline's tokenizer slots -> the transformers class diffusers' hub repos use
    (CLIP's for CLIP-L/G, T5TokenizerFast for T5: Flux's tokenizer_2, SD3's tokenizer_3)."""
    comps = FAMILIES[family].components
    t5 = {"flux": "tokenizer_2"}.get(family, "tokenizer_3")
    return {  # a tokenizer whose text encoder the pipeline never has (the refiner's) is no slot
        n: "T5TokenizerFast" if n == t5 else "CLIPTokenizer"
        for n in comps
        if n.startswith("tokenizer") and comps.get(n.replace("tokenizer", "text_encoder"))
    }


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
        **({"shift_factor": VAE_SHIFT[family]} if family in VAE_SHIFT else {}),
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


# -- SD3 / Flux ----------------------------------------------------------------------------------

#: FlowMatchEulerDiscreteScheduler per family (the public repos' scheduler_config.json: SD3
#: shift 3.0; FLUX.1-dev dynamic shifting 0.5..1.15 over 256..4096 tokens; schnell shift 1.0)
FLOW_SCHEDULERS: dict[str, dict[str, Any]] = {
    "sd3": {"num_train_timesteps": 1000, "shift": 3.0},
    "flux-dev": {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
    },
    "flux-schnell": {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
}
_CLIP_L_PROJ = _CLIP_PROJ
_T5 = ("transformers", "T5EncoderModel")
_FLOW = ("FlowMatchEulerDiscreteScheduler", FLOW_SCHEDULERS["sd3"])
for _name in ("sd3", "sd3.5-large"):
    FAMILIES[_name] = Family(
        "StableDiffusion3Pipeline",
        {"transformer": ("diffusers", "SD3Transformer2DModel"),
         "vae": ("diffusers", "AutoencoderKL"),
         "text_encoder": _CLIP_L_PROJ, "tokenizer": None, "text_encoder_2": _CLIP_PROJ,
         "tokenizer_2": None, "text_encoder_3": _T5, "tokenizer_3": None, "image_encoder": None,
         "feature_extractor": None},
        _FLOW, sample_size=128, vae_scaling=1.5305,
    )  # fmt: skip
FAMILIES["flux"] = Family(
    "FluxPipeline",
    {"transformer": ("diffusers", "FluxTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
     "text_encoder": _CLIP, "tokenizer": None, "text_encoder_2": _T5, "tokenizer_2": None,
     "image_encoder": None, "feature_extractor": None},
    ("FlowMatchEulerDiscreteScheduler", FLOW_SCHEDULERS["flux-dev"]), sample_size=128,
    vae_scaling=0.3611,
)  # fmt: skip
#: 16-channel VAEs: latent shift (SD3 / Flux, single_file_utils and the convert scripts)
VAE_SHIFT = {"sd3": 0.0609, "sd3.5-large": 0.0609, "flux": 0.1159}
TEXT_ACT.update({"text_encoder_3": "t5"})


def flow_scheduler(family: str, shapes_transformer: Shapes | None) -> dict[str, Any]:
    """SD3's, or Flux dev's (guidance embedder present) / schnell's scheduler."""
    if family == "flux":
        dev = shapes_transformer is None or any(
            "guidance_embedder" in k for k in shapes_transformer
        )
        cfg = FLOW_SCHEDULERS["flux-dev" if dev else "flux-schnell"]
    else:
        cfg = FLOW_SCHEDULERS["sd3"]
    return {"_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": DIFFUSERS_VERSION, **cfg}  # fmt: skip


def sd3_config(shapes: Shapes) -> dict[str, Any]:
    """SD3Transformer2DModel: widths and depth from the shapes, heads of 64."""
    hidden, in_ch, patch, _ = shapes["pos_embed.proj.weight"]
    layers = _count(shapes, r"transformer_blocks\.(\d+)\.")
    dual = sorted(
        {
            int(m.group(1))
            for k in shapes
            if (m := re.match(r"transformer_blocks\.(\d+)\.attn2\.", k))
        }
    )
    return {
        "_class_name": "SD3Transformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "attention_head_dim": 64,
        "caption_projection_dim": shapes["context_embedder.weight"][0],
        "dual_attention_layers": dual,
        "in_channels": in_ch,
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "num_attention_heads": max(1, hidden // 64),
        "num_layers": layers,
        "out_channels": in_ch,
        "patch_size": patch,
        "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        "pos_embed_max_size": round(shapes["pos_embed.pos_embed"][1] ** 0.5),
        "qk_norm": "rms_norm" if any(".norm_q." in k for k in shapes) else None,
        "sample_size": 128,
    }


def flux_config(shapes: Shapes) -> dict[str, Any]:
    """FluxTransformer2DModel: heads of 128 (rope axes 16+56+56), depths from the shapes."""
    hidden, in_ch = shapes["x_embedder.weight"]
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": any("guidance_embedder" in k for k in shapes),
        "in_channels": in_ch,
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "num_attention_heads": max(1, hidden // 128),
        "num_layers": _count(shapes, r"transformer_blocks\.(\d+)\."),
        "num_single_layers": _count(shapes, r"single_transformer_blocks\.(\d+)\."),
        "out_channels": shapes["proj_out.weight"][0],
        "patch_size": 1,
        "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
    }


def t5_config(shapes: Shapes, dtype: str) -> dict[str, Any]:
    """T5EncoderModel (T5 v1.1 XXL layout: gated GELU, relative attention)."""
    vocab, d_model = shapes["shared.weight"]
    rel = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    q = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"]
    return {
        "architectures": ["T5EncoderModel"],
        "d_ff": shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        "d_kv": q[0] // rel[1],
        "d_model": d_model,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "dtype": dtype,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_heads": rel[1],
        "num_layers": _count(shapes, r"encoder\.block\.(\d+)\."),
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": rel[0],
        "tie_word_embeddings": False,
        "vocab_size": vocab,
    }
