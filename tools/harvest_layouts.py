"""Harvest key names, shapes and dtypes from the public model classes (facts, not code).

Each entry builds one diffusers / transformers class on the meta device (no memory, no weights,
no network) with the released model's configuration, and records its state-dict keys, shapes
and dtypes. The result is written to ``sdtool/data/harvested.json.gz``; sdtool reads that file
at run time and never imports diffusers or transformers.

    python tools/harvest_layouts.py            # needs torch, diffusers, transformers

The configurations below are the published ``config.json`` values of the named repositories
(only the fields that change key names or shapes).
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "sdtool" / "data" / "harvested.json.gz"

_SDXL_UNET = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
_SDXL_CONTROLNET = {k: v for k, v in _SDXL_UNET.items() if k != "up_block_types"}
_SD3 = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
    "pos_embed_max_size": 192,
}  # fmt: skip
_WAN_14B = {
    "patch_size": (1, 2, 2), "num_attention_heads": 40, "attention_head_dim": 128,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
}  # fmt: skip


@dataclass(frozen=True)
class Harvest:
    """One class with one configuration: where it comes from and how to build it."""

    id: str
    module: str  # "diffusers" or "transformers"
    cls: str
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the released model whose config this is
    config_cls: str | None = None  # transformers: the config class
    # a class that the released model extends: modules copied under new names (old prefix,
    # new prefix) and parameters added (name -> shape), facts of the released model's class
    copies: tuple[tuple[str, str], ...] = ()
    adds: dict[str, tuple[int, ...]] = field(default_factory=dict)


HARVESTS: tuple[Harvest, ...] = (
    Harvest("unet-sdxl-diffusers", "diffusers", "UNet2DConditionModel", _SDXL_UNET,
            "stabilityai/stable-diffusion-xl-base-1.0 unet"),
    Harvest("controlnet-sd1-diffusers", "diffusers", "ControlNetModel",
            {"cross_attention_dim": 768}, "lllyasviel/control_v11p_sd15_canny"),
    Harvest("controlnet-sdxl-diffusers", "diffusers", "ControlNetModel", _SDXL_CONTROLNET,
            "diffusers/controlnet-canny-sdxl-1.0"),
    Harvest("t2i-adapter-sd1-diffusers", "diffusers", "T2IAdapter",
            {"in_channels": 3, "channels": [320, 640, 1280, 1280], "num_res_blocks": 2,
             "downscale_factor": 8, "adapter_type": "full_adapter"},
            "TencentARC/t2iadapter_canny_sd15v2"),
    Harvest("t2i-adapter-sdxl-diffusers", "diffusers", "T2IAdapter",
            {"in_channels": 3, "channels": [320, 640, 1280, 1280], "num_res_blocks": 2,
             "downscale_factor": 16, "adapter_type": "full_adapter_xl"},
            "TencentARC/t2i-adapter-canny-sdxl-1.0"),
    Harvest("flux-diffusers", "diffusers", "FluxTransformer2DModel", {"guidance_embeds": True},
            "black-forest-labs/FLUX.1-dev transformer"),
    Harvest("sd3-diffusers", "diffusers", "SD3Transformer2DModel", _SD3,
            "stabilityai/stable-diffusion-3-medium-diffusers transformer"),
    Harvest("sd35-large-diffusers", "diffusers", "SD3Transformer2DModel",
            {**_SD3, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
             "qk_norm": "rms_norm"},
            "stabilityai/stable-diffusion-3.5-large transformer"),
    Harvest("sd35-medium-diffusers", "diffusers", "SD3Transformer2DModel",
            {**_SD3, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
             "dual_attention_layers": tuple(range(13))},
            "stabilityai/stable-diffusion-3.5-medium transformer"),
    Harvest("chroma-diffusers", "diffusers", "ChromaTransformer2DModel", {},
            "lodestones/Chroma1-HD transformer"),
    Harvest("auraflow-diffusers", "diffusers", "AuraFlowTransformer2DModel", {},
            "fal/AuraFlow-v0.3 transformer"),
    Harvest("pixart-alpha-diffusers", "diffusers", "PixArtTransformer2DModel",
            {"sample_size": 128, "use_additional_conditions": True},
            "PixArt-alpha/PixArt-XL-2-1024-MS transformer"),
    Harvest("pixart-sigma-diffusers", "diffusers", "PixArtTransformer2DModel",
            {"sample_size": 128, "use_additional_conditions": False},
            "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer"),
    Harvest("hunyuan-dit-diffusers", "diffusers", "HunyuanDiT2DModel",
            {"sample_size": 128, "patch_size": 2, "in_channels": 4, "num_attention_heads": 16,
             "attention_head_dim": 88, "num_layers": 40, "hidden_size": 1408,
             "cross_attention_dim": 1024, "cross_attention_dim_t5": 2048,
             "pooled_projection_dim": 1024, "text_len": 77, "text_len_t5": 256,
             "mlp_ratio": 4.3637, "learn_sigma": True, "use_style_cond_and_image_meta_size": False},
            "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers transformer"),
    Harvest("wan21-14b-diffusers", "diffusers", "WanTransformer3DModel", _WAN_14B,
            "Wan-AI/Wan2.1-T2V-14B-Diffusers transformer"),
    Harvest("wan21-1.3b-diffusers", "diffusers", "WanTransformer3DModel",
            {**_WAN_14B, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer"),
    Harvest("wan21-i2v-14b-diffusers", "diffusers", "WanTransformer3DModel",
            {**_WAN_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
            "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers transformer"),
    Harvest("wan22-5b-diffusers", "diffusers", "WanTransformer3DModel",
            {**_WAN_14B, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30,
             "in_channels": 48, "out_channels": 48},
            "Wan-AI/Wan2.2-TI2V-5B-Diffusers transformer"),
    Harvest("wan21-vae-diffusers", "diffusers", "AutoencoderKLWan", {},
            "Wan-AI/Wan2.1-T2V-14B-Diffusers vae"),
    Harvest("wan22-vae-diffusers", "diffusers", "AutoencoderKLWan",
            {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True,
             "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16,
             "scale_factor_temporal": 4},
            "Wan-AI/Wan2.2-TI2V-5B-Diffusers vae"),
    Harvest("ltxv-diffusers", "diffusers", "LTXVideoTransformer3DModel", {},
            "Lightricks/LTX-Video transformer"),
    Harvest("lumina2-diffusers", "diffusers", "Lumina2Transformer2DModel", {},
            "Alpha-VLLM/Lumina-Image-2.0 transformer"),
    Harvest("qwen-image", "diffusers", "QwenImageTransformer2DModel", {},
            "Qwen/Qwen-Image transformer"),
    Harvest("hidream", "diffusers", "HiDreamImageTransformer2DModel",
            {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 16,
             "num_single_layers": 32, "attention_head_dim": 128, "num_attention_heads": 20,
             "caption_channels": [4096, 4096], "text_emb_dim": 2048, "num_routed_experts": 4,
             "num_activated_experts": 2, "axes_dims_rope": (64, 32, 32),
             "max_resolution": (128, 128), "llama_layers": list(range(32)) + [31] * 16},
            "HiDream-ai/HiDream-I1-Full transformer"),
    Harvest("svd-diffusers", "diffusers", "UNetSpatioTemporalConditionModel", {},
            "stabilityai/stable-video-diffusion-img2vid-xt unet"),
    Harvest("clip-l", "transformers", "CLIPTextModel",
            {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
             "num_hidden_layers": 12, "projection_dim": 768},
            "openai/clip-vit-large-patch14 (text model)", "CLIPTextConfig"),
    Harvest("clip-g", "transformers", "CLIPTextModelWithProjection",
            {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
             "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu"},
            "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (SDXL text_encoder_2)", "CLIPTextConfig"),
    Harvest("t5xxl", "transformers", "T5EncoderModel",
            {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
             "vocab_size": 32128, "feed_forward_proj": "gated-gelu"},
            "google/t5-v1_1-xxl (encoder)", "T5Config"),
    Harvest("umt5xxl", "transformers", "UMT5EncoderModel",
            {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
             "vocab_size": 256384, "feed_forward_proj": "gated-gelu"},
            "google/umt5-xxl (encoder; Wan's text encoder)", "UMT5Config"),
    Harvest("llama-3.1-8b", "transformers", "LlamaForCausalLM",
            {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
            "meta-llama/Llama-3.1-8B-Instruct (HiDream's fourth text encoder)", "LlamaConfig"),
    Harvest("gemma-2-2b", "transformers", "Gemma2ForCausalLM",
            {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
             "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
             "vocab_size": 256000},
            "google/gemma-2-2b (Lumina 2's text encoder)", "Gemma2Config"),
    Harvest("qwen2.5-7b", "transformers", "Qwen2ForCausalLM",
            {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
            "Qwen/Qwen2.5-VL-7B-Instruct language model (Qwen-Image's text encoder)",
            "Qwen2Config"),
    # OmniGen2's transformer (OmniGen2/OmniGen2, config.json) is Lumina 2's blocks and
    # combined timestep/caption embedder with a reference-image patch embedder and refiner and
    # an image-index embedding (OmniGen2Transformer2DModel, VectorSpaceLab/OmniGen2)
    Harvest("omnigen2", "diffusers", "Lumina2Transformer2DModel",
            {"hidden_size": 2520, "num_layers": 32, "num_refiner_layers": 2,
             "num_attention_heads": 21, "num_kv_heads": 7, "axes_dim_rope": (40, 40, 40),
             "axes_lens": (1024, 1664, 1664), "cap_feat_dim": 2048},
            "OmniGen2/OmniGen2 transformer (Lumina 2 class + OmniGen2's reference-image modules)",
            copies=(("noise_refiner.", "ref_image_refiner."),
                    ("x_embedder.", "ref_image_patch_embedder.")),
            adds={"image_index_embedding": (5, 2520)}),
    # the marker-key families in diffusers naming, each with its class defaults (the release
    # named: the defaults are its config)
    Harvest("flux2-diffusers", "diffusers", "Flux2Transformer2DModel", {},
            "black-forest-labs/FLUX.2-dev transformer (class defaults)"),
    Harvest("hunyuan-video-diffusers", "diffusers", "HunyuanVideoTransformer3DModel", {},
            "hunyuanvideo-community/HunyuanVideo transformer (class defaults)"),
    Harvest("hunyuan-video15-diffusers", "diffusers", "HunyuanVideo15Transformer3DModel", {},
            "HunyuanVideo-1.5 transformer (class defaults)"),
    Harvest("mochi-diffusers", "diffusers", "MochiTransformer3DModel", {},
            "genmo/mochi-1-preview transformer (class defaults)"),
    Harvest("cosmos-diffusers", "diffusers", "CosmosTransformer3DModel", {},
            "nvidia/Cosmos-1.0-Diffusion-7B transformer (class defaults)"),
    Harvest("stable-audio-diffusers", "diffusers", "StableAudioDiTModel", {},
            "stabilityai/stable-audio-open-1.0 transformer (class defaults)"),
    Harvest("kandinsky5-diffusers", "diffusers", "Kandinsky5Transformer3DModel", {},
            "Kandinsky 5 transformer (class defaults)"),
    Harvest("z-image-diffusers", "diffusers", "ZImageTransformer2DModel", {},
            "Tongyi-MAI/Z-Image-Turbo transformer (class defaults)"),
    Harvest("wan-vace-diffusers", "diffusers", "WanVACETransformer3DModel", {},
            "Wan VACE transformer (class defaults)"),
    Harvest("ace-step-diffusers", "diffusers", "AceStepTransformer1DModel", {},
            "ACE-Step transformer (class defaults)"),
    Harvest("cogvideox-diffusers", "diffusers", "CogVideoXTransformer3DModel", {},
            "THUDM/CogVideoX-2b transformer (class defaults)"),
    # families whose diffusers naming is ComfyUI's own (its model_detection.py markers are in
    # the class's keys), each with its class defaults
    Harvest("qwen-image-21", "diffusers", "QwenImage21Transformer2DModel", {},
            "Qwen-Image 2.1 transformer (class defaults)"),
    Harvest("ideogram4", "diffusers", "Ideogram4Transformer2DModel", {},
            "Ideogram 4 transformer (class defaults)"),
    Harvest("kandinsky6", "diffusers", "Kandinsky6Transformer3DModel", {},
            "Kandinsky 6 transformer (class defaults)"),
    Harvest("ernie-image", "diffusers", "ErnieImageTransformer2DModel", {},
            "ERNIE-Image transformer (class defaults)"),
    Harvest("joyimage", "diffusers", "JoyImageEditTransformer3DModel", {},
            "JoyImage-Edit transformer (class defaults)"),
)  # fmt: skip

_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}


def build(h: Harvest) -> Any:
    import importlib

    import torch

    mod = importlib.import_module(h.module)
    cls = getattr(mod, h.cls)
    with torch.device("meta"):
        if h.config_cls is not None:
            return cls(getattr(mod, h.config_cls)(**h.config))
        return cls(**h.config)


def harvest(h: Harvest) -> dict[str, Any]:
    model = build(h)
    sd = dict(model.state_dict())
    for old, new in h.copies:
        sd |= {new + k[len(old) :]: t for k, t in list(sd.items()) if k.startswith(old)}
    for name, shape in h.adds.items():
        sd[name] = next(iter(sd.values())).new_empty(shape)
    return {
        "source": f"{h.module}.{h.cls} — {h.source}",
        "keys": list(sd),
        "shapes": [list(t.shape) for t in sd.values()],
        "dtypes": [_DTYPE[str(t.dtype).removeprefix("torch.")] for t in sd.values()],
    }


def encode(data: dict[str, Any]) -> bytes:
    raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    return gzip.compress(raw, compresslevel=9, mtime=0)


def main(argv: list[str]) -> int:
    only = set(argv)
    data: dict[str, Any] = {}
    if only and OUT.exists():
        known = {h.id for h in HARVESTS}
        old = json.loads(gzip.decompress(OUT.read_bytes()))["models"]
        data = {k: v for k, v in old.items() if k in known}
    progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    for h in HARVESTS:
        if only and h.id not in only:
            continue
        data[h.id] = harvest(h)
        progress(f"{h.id:28} {len(data[h.id]['keys']):5} keys")
    OUT.write_bytes(encode({"generated_by": "tools/harvest_layouts.py", "models": data}))
    print(f"{OUT.relative_to(ROOT)}: {OUT.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
