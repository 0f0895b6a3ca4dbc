# ruff: noqa: E501  (the case tables read best one row per line)
"""identify() on one header-only file per family and kind (issue 13).

Inputs, as facts, never sdtool's own tables:
- diffusers / transformers naming: the key lists harvested from the public model classes on the
  meta device (``sdtool/data/harvested.json.gz``, ``tools/harvest_layouts.py``);
- original (ComfyUI / BFL / SAI / Wan) naming: ``../shared/reference/layouts`` where it has the
  family, else the marker keys and shapes that ComfyUI's ``comfy/model_detection.py`` (and
  diffusers' ``single_file_utils``) read, with shapes of the released models;
- diffusers' own ``infer_diffusers_model_type`` is the oracle where it knows the family.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import sdlayouts as L

from sdtool import open_model
from sdtool.cli.identity import identity_lines
from sdtool.identify import Identity, identify

E = L.Entries


def ident_of(
    tmp_path: Path, entries: E, *, metadata: dict[str, str] | None = None, name: str = "m"
) -> Identity:
    path = L.write_header_only(tmp_path / f"{name}.safetensors", entries, metadata)
    with open_model(path) as m:
        return identify(m)


def bf16(shapes: dict[str, tuple[int, ...]]) -> E:
    return {k: ("BF16", s) for k, s in shapes.items()}


def blocks(n: int, template: dict[str, tuple[int, ...]], prefix: str = "blocks") -> E:
    return bf16({f"{prefix}.{i}.{k}": s for i in range(n) for k, s in template.items()})


# -- original-naming headers from ComfyUI's detection facts ---------------------------------------


def chroma() -> E:
    """Flux's BFL layout without guidance_in / time_in / vector_in, with the distilled guidance
    layer (ComfyUI: ``distilled_guidance_layer.norms.0.scale`` and no ``img_in`` need)."""
    e = {
        k: v
        for k, v in L.flux(bare=True).items()
        if not k.startswith(("guidance_in.", "time_in.", "vector_in."))
    }
    e.update(
        bf16(
            {
                "distilled_guidance_layer.in_proj.weight": (5120, 64),
                "distilled_guidance_layer.in_proj.bias": (5120,),
                "distilled_guidance_layer.out_proj.weight": (3072, 5120),
            }
        )
    )
    for i in range(5):
        e.update(
            bf16({
                f"distilled_guidance_layer.layers.{i}.in_layer.weight": (5120, 5120),
                f"distilled_guidance_layer.layers.{i}.out_layer.weight": (5120, 5120),
                f"distilled_guidance_layer.norms.{i}.scale": (5120,),
            })
        )  # fmt: skip
    return e


def wan(
    dim: int = 5120, in_dim: int = 16, layers: int = 40, ffn: int = 13824, i2v: bool = False
) -> E:
    e = bf16({
        "patch_embedding.weight": (dim, in_dim, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, 4096), "text_embedding.2.weight": (dim, dim),
        "time_embedding.0.weight": (dim, 256), "time_embedding.2.weight": (dim, dim),
        "time_projection.1.weight": (dim * 6, dim),
        "head.modulation": (1, 2, dim), "head.head.weight": (4 * 16, dim),
    })  # fmt: skip
    block = {
        "modulation": (1, 6, dim),
        **{f"{a}.{p}.weight": (dim, dim) for a in ("self_attn", "cross_attn") for p in "qkvo"},
        "self_attn.norm_q.weight": (dim,), "self_attn.norm_k.weight": (dim,),
        "norm3.weight": (dim,), "ffn.0.weight": (ffn, dim), "ffn.2.weight": (dim, ffn),
    }  # fmt: skip
    if i2v:
        block |= {"cross_attn.k_img.weight": (dim, dim), "cross_attn.v_img.weight": (dim, dim)}
        e |= bf16({"img_emb.proj.0.bias": (1280,), "img_emb.proj.1.weight": (1280, 1280)})
    return e | blocks(layers, block)


def wan_vae(v22: bool = False) -> E:
    e = bf16({
        "encoder.conv1.weight": (96, 3, 3, 3, 3), "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.middle.0.residual.0.gamma": (384, 1, 1, 1),
        "decoder.head.2.weight": (3, 96, 3, 3, 3), "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
    })  # fmt: skip
    if v22:
        e |= bf16({"decoder.upsamples.0.upsamples.0.residual.2.weight": (1024, 1024, 3, 3, 3)})
    return e


def svd() -> E:
    """SD2-shaped UNet (context 1024, 8 in-channels) with temporal layers and label_emb 768."""
    e = L.from_txt("UNET-v2-SD", "model.diffusion_model.", "F16")
    e["model.diffusion_model.input_blocks.0.0.weight"] = ("F16", (320, 8, 3, 3))
    for b, c in ((1, 320), (2, 320), (4, 640), (5, 640), (7, 1280), (8, 1280)):
        pre = f"model.diffusion_model.input_blocks.{b}.1.time_stack.0."
        e |= {
            pre + "attn1.to_q.weight": ("F16", (c, c)),
            pre + "attn2.to_q.weight": ("F16", (c, c)),
        }
        e[f"model.diffusion_model.input_blocks.{b}.1.time_mixer.mix_factor"] = ("F16", (1,))
    e["model.diffusion_model.label_emb.0.0.weight"] = ("F16", (1280, 768))
    e |= L.from_txt("VAE-v1-SD", "first_stage_model.", "F16")
    e["first_stage_model.decoder.time_mix_blocks.0.weight"] = ("F16", (512,))
    return e


def cascade(stage: str, lite: bool = False) -> E:
    if stage == "c":
        w = 1536 if lite else 2048
        return bf16({
            "clf.1.weight": (16, w, 1, 1), "clip_txt_mapper.weight": (w, 1280),
            "clip_txt_pooled_mapper.weight": (w * 4, 1280), "embedding.1.weight": (w, 16, 1, 1),
            "down_blocks.0.0.channelwise.0.weight": (w * 4, w),
        })  # fmt: skip
    c = 576 if lite else 640
    return bf16({
        "clf.1.weight": (16, 320, 1, 1), "clip_mapper.weight": (5120, 1280),
        "embedding.1.weight": (320, 64, 1, 1), "down_blocks.1.0.channelwise.0.weight": (c * 4, c),
    })  # fmt: skip


def sd35(large: bool) -> E:
    """SD3's SAI layout grown to 3.5 large (38 blocks, qk-norm) or medium (MMDiT-X attn2)."""
    e = L.strip_prefix(L.sd3(), "model.diffusion_model.", "model.diffusion_model.")
    pre = "model.diffusion_model.joint_blocks."
    if large:
        tmpl = {k[len(pre + "22.") :]: v for k, v in e.items() if k.startswith(pre + "22.")}
        for i in range(24, 38):
            e |= {f"{pre}{i}.{k}": v for k, v in tmpl.items()}
        e[pre + "37.x_block.mlp.fc1.weight"] = ("F16", (9728, 2432))
        e[pre + "0.context_block.adaLN_modulation.1.bias"] = ("F16", (2432 * 6,))
    else:
        for i in range(13):
            e |= {
                f"{pre}{i}.x_block.attn2.qkv.weight": ("F16", (4608, 1536)),
                f"{pre}{i}.x_block.attn2.proj.weight": ("F16", (1536, 1536)),
            }
    for i in range(38 if large else 24):
        for side in ("context_block", "x_block"):
            e[f"{pre}{i}.{side}.attn.ln_q.weight"] = ("F16", (64,))
            e[f"{pre}{i}.{side}.attn.ln_k.weight"] = ("F16", (64,))
    return e


def flux_variant(in_features: int) -> E:
    e = L.flux(bare=True)
    e["img_in.weight"] = ("BF16", (3072, in_features))
    return e


def ssd1b() -> E:
    """SDXL's SGM layout with ComfyUI's SSD_1B transformer depths: input [0,0,2,2,4,4], middle -1,
    output (listed from output_blocks.8 down to 0) [0,0,0,1,1,2,10,4,4]."""
    e = L.sdxl()
    depth_in = dict(zip((1, 2, 4, 5, 7, 8), (0, 0, 2, 2, 4, 4), strict=True))
    depth_out = dict(zip(range(8, -1, -1), (0, 0, 0, 1, 1, 2, 10, 4, 4), strict=True))
    keep = {}
    for k, v in e.items():
        parts = k.split(".")
        if k.startswith("model.diffusion_model.middle_block.") and parts[3] in ("1", "2"):
            continue
        if (
            len(parts) > 6
            and parts[2] in ("input_blocks", "output_blocks")
            and parts[5] == "transformer_blocks"
        ):
            depth = (depth_in if parts[2] == "input_blocks" else depth_out)[int(parts[3])]
            if int(parts[6]) >= depth:
                continue
        keep[k] = v
    return keep


def distilled_sdxl(
    depth_in: dict[int, int], depth_out: dict[int, int], drop: tuple[int, ...] = ()
) -> E:
    """SDXL's SGM layout with other transformer depths per input / output block (ComfyUI
    supported_models.py gives the encoder's); ``drop``: input/output blocks removed (KOALA keeps
    one res block per level: the removed blocks' keys go, the rest keep SDXL's numbering)."""
    keep = {}
    for k, v in L.sdxl().items():
        parts = k.split(".")
        if k.startswith("model.diffusion_model.middle_block.") and parts[3] in ("1", "2"):
            continue
        if len(parts) > 3 and parts[2] in ("input_blocks", "output_blocks"):
            n = int(parts[3])
            if parts[2] == "input_blocks" and n in drop:
                continue
            if len(parts) > 6 and parts[5] == "transformer_blocks":
                depth = (depth_in if parts[2] == "input_blocks" else depth_out).get(n, 0)
                if int(parts[6]) >= depth:
                    continue
        keep[k] = v
    return keep


def koala(depth: int, middle: int | None) -> E:
    """KOALA in SGM naming, after ComfyUI's KOALA_700M / KOALA_1B configs: one res block per
    level (input blocks 1, 3, 5), two per level on the way up (output blocks 0-5), encoder depths
    [0, 2, depth], decoder [depth, depth, 2, 2, 0, 0], a middle block of depth ``middle`` or
    none. Built from SDXL's layout: its blocks renumbered, shapes as SDXL's."""
    inp = {1: 1, 3: 2, 4: 3, 6: 4, 7: 5}  # SDXL input block -> KOALA's
    out = {0: 0, 2: 1, 3: 2, 5: 3, 6: 4, 8: 5}
    depth_in, depth_out = {3: 2, 5: depth}, {0: depth, 1: depth, 2: 2, 3: 2}
    pre = "model.diffusion_model."
    e: E = {}
    for k, v in L.sdxl().items():
        if not k.startswith(pre):
            e[k] = v
            continue
        parts = k[len(pre) :].split(".")
        if parts[0] == "middle_block":
            if middle is None or (
                len(parts) > 3 and parts[2] == "transformer_blocks" and int(parts[3]) >= middle
            ):
                continue
        elif parts[0] in ("input_blocks", "output_blocks"):
            table, depths = (inp, depth_in) if parts[0] == "input_blocks" else (out, depth_out)
            n = table.get(int(parts[1]))
            if n is None:
                continue
            if (
                len(parts) > 4
                and parts[3] == "transformer_blocks"
                and int(parts[4]) >= depths.get(n, 0)
            ):
                continue
            parts[1] = str(n)
        e[pre + ".".join(parts)] = v
    return e


def distilled_sdxl_diffusers(depth: tuple[int, int], layers: int = 2, middle: int | None = 10) -> E:
    """The harvested SDXL diffusers UNet with other depths in down blocks 1 and 2 (the up blocks
    mirrored), ``layers`` res/attention blocks per down level (``layers + 1`` up) and a middle
    block of depth ``middle`` or none (ComfyUI's diffusers configs for Vega / KOALA)."""
    out = {}
    for k, v in L.harvested("unet-sdxl-diffusers").items():
        parts = k.split(".")
        deep = len(parts) > 5 and parts[4] == "transformer_blocks" and middle is not None
        if parts[0] == "mid_block" and (middle is None or (deep and int(parts[5]) >= middle)):
            continue
        per_level = layers + (parts[0] == "up_blocks")
        blocks = parts[0] in ("down_blocks", "up_blocks") and parts[2] in ("attentions", "resnets")
        if blocks and int(parts[3]) >= per_level:
            continue
        if (
            parts[0] != "mid_block"
            and len(parts) > 5
            and parts[2] == "attentions"
            and parts[4] == "transformer_blocks"
        ):
            level = int(parts[1]) if parts[0] == "down_blocks" else 2 - int(parts[1])
            if level in (1, 2) and int(parts[5]) >= depth[level - 1]:
                continue
        out[k] = v
    return out


def sdxs(attention_at_0: bool, width: int) -> E:
    """SD 1.x's diffusers UNet (layouts sd1-kohya) cut to SDXS's shape (ComfyUI SD_XS /
    SD09_XS): three levels of one res block (two on the way up), attention at level 0 or not,
    cross-attention width ``width``."""
    out: E = {}
    for k, (dt, sh) in L.strip_prefix(L.from_yaml("sd1-kohya", ["diffuser"]), "unet.").items():
        parts = k.split(".")
        if parts[0] == "down_blocks":
            if parts[1] == "3" or (parts[2] in ("attentions", "resnets") and parts[3] != "0"):
                continue
            if parts[1] == "0" and parts[2] == "attentions" and not attention_at_0:
                continue
        third = len(parts) > 3 and parts[2] in ("attentions", "resnets") and parts[3] == "2"
        if parts[0] == "up_blocks" and (parts[1] == "0" or third):
            continue
        if k.endswith("attn2.to_k.weight") or k.endswith("attn2.to_v.weight"):
            sh = (sh[0], width)
        out[k] = (dt, sh)
    return out


NATIVE: dict[str, Callable[[], E]] = {
    "chroma": chroma,
    "flux-fill": lambda: flux_variant(384),
    "flux-depth": lambda: flux_variant(128),
    "sd3.5-large": lambda: sd35(True),
    "sd3.5-medium": lambda: sd35(False),
    "svd": svd,
    "cascade-c": lambda: cascade("c"),
    "cascade-c-lite": lambda: cascade("c", lite=True),
    "cascade-b": lambda: cascade("b"),
    "cascade-b-lite": lambda: cascade("b", lite=True),
    "auraflow": lambda: bf16({
        "double_layers.0.attn.w1q.weight": (3072, 3072), "double_layers.0.attn.w2q.weight": (3072, 3072),
        "cond_seq_linear.weight": (3072, 2048), "t_embedder.mlp.0.weight": (3072, 256),
        "positional_encoding": (1, 1024, 3072), "single_layers.0.attn.w1q.weight": (3072, 3072),
    }),
    "hunyuan-dit": lambda: bf16({
        "mlp_t5.0.weight": (8192, 2048), "extra_embedder.0.weight": (5632, 3968),
        "x_embedder.proj.weight": (1408, 4, 2, 2), "blocks.0.attn1.Wqkv.weight": (4224, 1408),
        "pooler.q_proj.weight": (1024, 1024),
    }),
    "pixart-alpha": lambda: bf16({
        "t_block.1.weight": (6912, 1152), "ar_embedder.mlp.0.weight": (384, 256),
        "csize_embedder.mlp.0.weight": (384, 256), "x_embedder.proj.weight": (1152, 4, 2, 2),
        "y_embedder.y_embedding": (120, 4096), "pos_embed": (1, 4096, 1152),
        "blocks.0.attn.qkv.weight": (3456, 1152),
    }),
    "pixart-sigma": lambda: bf16({
        "t_block.1.weight": (6912, 1152), "x_embedder.proj.weight": (1152, 4, 2, 2),
        "y_embedder.y_embedding": (300, 4096), "blocks.0.attn.qkv.weight": (3456, 1152),
    }),
    "ltxv": lambda: bf16({
        "adaln_single.emb.timestep_embedder.linear_1.bias": (2048,), "patchify_proj.weight": (2048, 128),
        "caption_projection.linear_1.weight": (2048, 4096), "scale_shift_table": (2, 2048),
        "transformer_blocks.0.attn1.to_q.weight": (2048, 2048),
        "transformer_blocks.0.attn2.to_k.weight": (2048, 2048),
        "transformer_blocks.27.scale_shift_table": (6, 2048),
    }),
    "lumina2": lambda: bf16({
        "cap_embedder.0.weight": (2304,), "cap_embedder.1.weight": (2304, 2304),
        "noise_refiner.0.attention.k_norm.weight": (96,), "x_embedder.weight": (2304, 64),
        "layers.0.attention.qkv.weight": (4608, 2304), "t_embedder.mlp.0.weight": (1024, 256),
    }),
    "wan-t2v-14b": wan,
    "wan-t2v-1.3b": lambda: wan(1536, 16, 30, 8960),
    "wan-i2v-14b": lambda: wan(in_dim=36, i2v=True),
    "wan22-i2v-14b": lambda: wan(in_dim=36),
    "wan22-ti2v-5b": lambda: wan(3072, 48, 30, 14336),
    "wan-vae-2.1": wan_vae,
    "wan-vae-2.2": lambda: wan_vae(True),
    "ssd-1b": ssd1b,
    # ComfyUI Segmind_Vega: transformer_depth [0,0,1,1,2,2], output [0,0,0,1,1,1,2,2,2] (from
    # output block 8 down to 0), no middle transformer
    "segmind-vega": lambda: distilled_sdxl({4: 1, 5: 1, 7: 2, 8: 2}, {0: 2, 1: 2, 2: 2, 3: 1, 4: 1, 5: 1}),
    "koala-700m": lambda: koala(5, None),
    "koala-1b": lambda: koala(6, 6),
    "t2i-adapter-sd1": lambda: bf16({
        "conv_in.weight": (320, 192, 3, 3), "body.0.block1.weight": (320, 320, 3, 3),
        "body.0.block2.weight": (320, 320, 3, 3), "body.2.in_conv.weight": (640, 320, 1, 1),
    }),
    "t2i-adapter-sdxl": lambda: bf16({
        "conv_in.weight": (320, 768, 3, 3), "body.0.block1.weight": (320, 320, 3, 3),
        "body.0.block2.weight": (320, 320, 3, 3),
    }),
    "ip-adapter-sd15": lambda: bf16(
        {"image_proj.proj.weight": (3072, 1024), "image_proj.norm.weight": (768,)}
        | {f"ip_adapter.{i}.to_{kv}_ip.weight": (320, 768) for i in range(1, 32, 2) for kv in "kv"}
    ),
    "ip-adapter-plus-sdxl": lambda: bf16(
        {"image_proj.latents": (1, 16, 1280), "image_proj.proj_in.weight": (1280, 1664)}
        | {f"ip_adapter.{i}.to_{kv}_ip.weight": (640, 2048) for i in range(1, 140, 2) for kv in "kv"}
    ),
    "ip-adapter-flux": lambda: bf16(
        {"ip_adapter_proj_model.proj.weight": (12288, 768), "ip_adapter_proj_model.norm.weight": (3072,)}
        | {f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight": (3072, 4096)
           for i in range(19) for kv in "kv"}
    ),
}  # fmt: skip

# name -> (entries, kind, architecture, variant (substring) or None, model or None)
Case = tuple[Callable[[], E], str, str | None, str | None, str | None]
CASES: dict[str, Case] = {
    # original naming
    "chroma": (NATIVE["chroma"], "unet", "chroma", None, None),
    "flux-fill": (NATIVE["flux-fill"], "unet", "flux-dev", "Fill", None),
    "flux-depth": (NATIVE["flux-depth"], "unet", "flux-dev", "Depth/Canny", None),
    "sd3.5-large": (NATIVE["sd3.5-large"], "unet", "sd3.5-large", None, None),
    "sd3.5-medium": (NATIVE["sd3.5-medium"], "unet", "sd3.5-medium", None, None),
    "svd": (NATIVE["svd"], "checkpoint", "svd", "img2vid", None),
    "cascade-c": (NATIVE["cascade-c"], "unet", "stable-cascade-c", None, None),
    "cascade-c-lite": (NATIVE["cascade-c-lite"], "unet", "stable-cascade-c", "lite", None),
    "cascade-b": (NATIVE["cascade-b"], "unet", "stable-cascade-b", None, None),
    "cascade-b-lite": (NATIVE["cascade-b-lite"], "unet", "stable-cascade-b", "lite", None),
    "auraflow": (NATIVE["auraflow"], "unet", "auraflow", None, None),
    "hunyuan-dit": (NATIVE["hunyuan-dit"], "unet", "hunyuan-dit", "v1.0/v1.1", None),
    "pixart-alpha": (NATIVE["pixart-alpha"], "unet", "pixart-alpha", None, None),
    "pixart-sigma": (NATIVE["pixart-sigma"], "unet", "pixart-sigma", None, None),
    "ltxv": (NATIVE["ltxv"], "unet", "ltxv", None, None),
    "lumina2": (NATIVE["lumina2"], "unet", "lumina2", None, None),
    "wan-t2v-14b": (NATIVE["wan-t2v-14b"], "unet", "wan", "14B, T2V", None),
    "wan-t2v-1.3b": (NATIVE["wan-t2v-1.3b"], "unet", "wan", "1.3B, T2V", None),
    "wan-i2v-14b": (NATIVE["wan-i2v-14b"], "unet", "wan", "2.1 I2V", None),
    "wan22-i2v-14b": (NATIVE["wan22-i2v-14b"], "unet", "wan", "14B, I2V", None),
    "wan22-ti2v-5b": (NATIVE["wan22-ti2v-5b"], "unet", "wan", "5B (2.2 TI2V), TI2V", None),
    "wan-vae-2.1": (NATIVE["wan-vae-2.1"], "vae", "wan", "2.1 VAE", "VAE"),
    "wan-vae-2.2": (NATIVE["wan-vae-2.2"], "vae", "wan", "2.2 VAE", "VAE"),
    "ssd-1b": (NATIVE["ssd-1b"], "checkpoint", "ssd-1b", None, None),
    "segmind-vega": (NATIVE["segmind-vega"], "checkpoint", "segmind-vega", None, None),
    "koala-700m": (NATIVE["koala-700m"], "checkpoint", "koala-700m", None, None),
    "koala-1b": (NATIVE["koala-1b"], "checkpoint", "koala-1b", None, None),
    "segmind-vega-diffusers": (lambda: distilled_sdxl_diffusers((1, 2), middle=None), "unet", "segmind-vega", None, None),
    "koala-700m-diffusers": (lambda: distilled_sdxl_diffusers((2, 5), layers=1, middle=None), "unet", "koala-700m", None, None),
    "koala-1b-diffusers": (lambda: distilled_sdxl_diffusers((2, 6), layers=1, middle=6), "unet", "koala-1b", None, None),
    "omnigen2": (lambda: L.harvested("omnigen2"), "unet", "omnigen2", None, None),
    "sdxs": (lambda: sdxs(False, 768), "unet", "sdxs", None, None),
    # diffusers naming that is ComfyUI's own: the key set and ComfyUI's marker row agree
    "qwen-image-2.1": (lambda: L.harvested("qwen-image-21"), "unet", "qwen-image-2.1", None, None),
    "ideogram4": (lambda: L.harvested("ideogram4"), "unet", "ideogram4", None, None),
    "kandinsky6": (lambda: L.harvested("kandinsky6"), "unet", "kandinsky6", None, None),
    "ernie-image": (lambda: L.harvested("ernie-image"), "unet", "ernie-image", None, None),
    "joyimage": (lambda: L.harvested("joyimage"), "unet", "joyimage", None, None),
    "sdxs-0.9": (lambda: sdxs(True, 1024), "unet", "sdxs-0.9", None, None),
    # the marker-key families in diffusers naming: the whole key list of the class
    "flux2-diffusers": (lambda: L.harvested("flux2-diffusers"), "unet", "flux2", None, None),
    "hunyuan-video-diffusers": (lambda: L.harvested("hunyuan-video-diffusers"), "unet", "hunyuan-video", None, None),
    "hunyuan-video15-diffusers": (lambda: L.harvested("hunyuan-video15-diffusers"), "unet", "hunyuan-video", "1.5", None),
    "mochi-diffusers": (lambda: L.harvested("mochi-diffusers"), "unet", "mochi", None, None),
    "cosmos-diffusers": (lambda: L.harvested("cosmos-diffusers"), "unet", "cosmos", None, None),
    "stable-audio-diffusers": (lambda: L.harvested("stable-audio-diffusers"), "unet", "stable-audio", None, None),
    "kandinsky5-diffusers": (lambda: L.harvested("kandinsky5-diffusers"), "unet", "kandinsky5", None, None),
    "z-image-diffusers": (lambda: L.harvested("z-image-diffusers"), "unet", "z-image", None, None),
    "wan-vace-diffusers": (lambda: L.harvested("wan-vace-diffusers"), "unet", "wan", "VACE, 14B", None),
    "ace-step-diffusers": (lambda: L.harvested("ace-step-diffusers"), "unet", "ace-step", None, None),
    "cogvideox-diffusers": (lambda: L.harvested("cogvideox-diffusers"), "unet", "cogvideox", None, None),
    "t2i-adapter-sd1": (NATIVE["t2i-adapter-sd1"], "t2i-adapter", "sd1", None, "T2I-Adapter"),
    "t2i-adapter-sdxl": (NATIVE["t2i-adapter-sdxl"], "t2i-adapter", "sdxl-base", None, "T2I-Adapter"),
    "ip-adapter-sd15": (NATIVE["ip-adapter-sd15"], "ip-adapter", "sd1", None, "IP-Adapter"),
    "ip-adapter-plus-sdxl": (NATIVE["ip-adapter-plus-sdxl"], "ip-adapter", "sdxl-base", "plus", "IP-Adapter"),
    "ip-adapter-flux": (NATIVE["ip-adapter-flux"], "ip-adapter", "flux", None, "IP-Adapter"),
    # diffusers / transformers naming (harvested from the classes)
    "unet-sdxl-diffusers": (lambda: L.harvested("unet-sdxl-diffusers"), "unet", "sdxl-base", None, None),
    "controlnet-sd1-diffusers": (lambda: L.harvested("controlnet-sd1-diffusers"), "controlnet", "sd1", None, "ControlNet"),
    "controlnet-sdxl-diffusers": (lambda: L.harvested("controlnet-sdxl-diffusers"), "controlnet", "sdxl-base", None, "ControlNet"),
    "t2i-adapter-sd1-diffusers": (lambda: L.harvested("t2i-adapter-sd1-diffusers"), "t2i-adapter", "sd1", None, None),
    "t2i-adapter-sdxl-diffusers": (lambda: L.harvested("t2i-adapter-sdxl-diffusers"), "t2i-adapter", "sdxl-base", None, None),
    "flux-dev-diffusers": (lambda: L.harvested("flux-diffusers"), "unet", "flux-dev", None, None),
    "flux-schnell-diffusers": (
        lambda: {k: v for k, v in L.harvested("flux-diffusers").items() if "guidance_embedder" not in k},
        "unet", "flux-schnell", None, None),
    "sd3-diffusers": (lambda: L.harvested("sd3-diffusers"), "unet", "sd3", None, None),
    "sd3.5-large-diffusers": (lambda: L.harvested("sd35-large-diffusers"), "unet", "sd3.5-large", None, None),
    "sd3.5-medium-diffusers": (lambda: L.harvested("sd35-medium-diffusers"), "unet", "sd3.5-medium", None, None),
    "chroma-diffusers": (lambda: L.harvested("chroma-diffusers"), "unet", "chroma", None, None),
    "auraflow-diffusers": (lambda: L.harvested("auraflow-diffusers"), "unet", "auraflow", None, None),
    "pixart-alpha-diffusers": (lambda: L.harvested("pixart-alpha-diffusers"), "unet", "pixart-alpha", None, None),
    "pixart-sigma-diffusers": (lambda: L.harvested("pixart-sigma-diffusers"), "unet", "pixart-sigma", None, None),
    "hunyuan-dit-diffusers": (lambda: L.harvested("hunyuan-dit-diffusers"), "unet", "hunyuan-dit", None, None),
    "wan-14b-diffusers": (lambda: L.harvested("wan21-14b-diffusers"), "unet", "wan", "T2V", None),
    "wan-1.3b-diffusers": (lambda: L.harvested("wan21-1.3b-diffusers"), "unet", "wan", "1.3B, T2V", None),
    "wan-5b-diffusers": (lambda: L.harvested("wan22-5b-diffusers"), "unet", "wan", "5B (2.2 TI2V), TI2V", None),
    "wan-i2v-diffusers": (lambda: L.harvested("wan21-i2v-14b-diffusers"), "unet", "wan", "I2V", None),
    "wan21-vae-diffusers": (lambda: L.harvested("wan21-vae-diffusers"), "vae", "wan", "2.1 VAE", "VAE"),
    "wan22-vae-diffusers": (lambda: L.harvested("wan22-vae-diffusers"), "vae", "wan", "2.2 VAE", "VAE"),
    "ltxv-diffusers": (lambda: L.harvested("ltxv-diffusers"), "unet", "ltxv", None, None),
    "lumina2-diffusers": (lambda: L.harvested("lumina2-diffusers"), "unet", "lumina2", None, None),
    "qwen-image": (lambda: L.harvested("qwen-image"), "unet", "qwen-image", None, None),
    "hidream": (lambda: L.harvested("hidream"), "unet", "hidream", None, None),
    "svd-diffusers": (lambda: L.harvested("svd-diffusers"), "unet", "svd", None, None),
    # text encoders by model
    "clip-l": (lambda: L.from_txt("CLIP-v1-SD", "text_model."), "text-encoder", None, None, "CLIP-L"),
    "clip-g": (lambda: L.strip_prefix(L.from_yaml("sdxl-kohya", ["clip_g"]), "te2."), "text-encoder", None, None, "CLIP-G"),
    "t5xxl": (lambda: L.strip_prefix(L.from_yaml("sd3-comfyui", ["t5xxl"]), "text_encoders.t5xxl.transformer."), "text-encoder", None, None, "T5-XXL"),
    "clip-l-transformers5": (lambda: L.harvested("clip-l"), "text-encoder", None, None, "CLIP-L"),
    "clip-g-transformers5": (lambda: L.harvested("clip-g"), "text-encoder", None, None, "CLIP-G"),
    "umt5xxl": (lambda: L.harvested("umt5xxl"), "text-encoder", None, None, "UMT5-XXL"),
    "llama-3.1-8b": (lambda: L.harvested("llama-3.1-8b"), "text-encoder", None, None, "Llama 3.1 8B"),
    "gemma-2-2b": (lambda: L.harvested("gemma-2-2b"), "text-encoder", None, None, "Gemma 2 2B"),
    "qwen2.5-7b": (lambda: L.harvested("qwen2.5-7b"), "text-encoder", None, None, "Qwen2.5 7B"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_family(tmp_path: Path, case: str) -> None:
    make, kind, arch, variant, model = CASES[case]
    ident = ident_of(tmp_path, make())
    text = "\n".join(identity_lines(ident))
    assert ident.kind == kind, text
    assert ident.architecture == arch, text
    if variant is None:
        assert ident.variant is None, text
    else:
        assert variant in (ident.variant or ""), text
    if model is not None:
        assert ident.model == model, text
    assert ident.unknown_keys == (), text
    assert not [c for c in ident.components if c.missing or c.mismatches], text
    assert not any(n.startswith("conflicting") for n in ident.notes), text


def test_chroma_is_not_flux_schnell(tmp_path: Path) -> None:
    ident = ident_of(tmp_path, chroma())
    assert ident.architecture == "chroma" and ident.prediction == "flow"
    assert "distilled_guidance_layer.in_proj.weight" in (ident.architecture_source or "")


def test_svd_is_not_sd2_pix2pix(tmp_path: Path) -> None:
    ident = ident_of(tmp_path, svd())
    assert (ident.architecture, ident.variant) == ("svd", "img2vid")
    vae = ident.component("vae")
    assert vae is not None and vae.extra == ("first_stage_model.decoder.time_mix_blocks.0.weight",)


def test_playground_v25_edm(tmp_path: Path) -> None:
    e = L.sdxl() | {"edm_mean": ("F32", (1, 4, 1, 1)), "edm_std": ("F32", (1, 4, 1, 1))}
    ident = ident_of(tmp_path, e)
    assert (ident.architecture, ident.variant, ident.prediction) == (
        "sdxl-base",
        "Playground v2.5",
        "edm",
    )
    assert ident.unknown_keys == ()


def test_hypernetwork_serving_both_widths(tmp_path: Path) -> None:
    e = {
        f"{w}.{i}.linear.{j}.{p}": ("F32", (w * 2, w) if p == "weight" else (w * 2,))
        for w in (320, 640, 768, 1024, 1280)
        for i in (0, 1)
        for j in (0, 1)
        for p in ("weight", "bias")
    }
    ident = ident_of(tmp_path, e)
    assert (ident.kind, ident.architecture) == ("hypernetwork", "sd1-sd2")
    assert ident.architecture_label == "SD 1.x and 2.x"


# -- quantization --------------------------------------------------------------------------------


def _scaled(entries: E, suffixes: tuple[str, ...], *, marker: str | None = None) -> E:
    out: E = {}
    for k, (dt, s) in entries.items():
        if k.endswith(".weight") and len(s) == 2:
            out[k] = ("F8_E4M3", s)
            for suf in suffixes:
                out[k[: -len("weight")] + suf] = ("F32", ())
        else:
            out[k] = (dt, s)
    if marker:
        out[marker] = ("F8_E4M3", (0,))
    return out


@pytest.mark.parametrize(
    ("suffixes", "marker", "scheme"),
    [
        (("scale_weight",), "scaled_fp8", "scaled fp8 (ComfyUI scaled_fp8)"),
        (("scale_weight", "scale_input"), None, "scaled fp8 (ComfyUI scale_weight)"),
        (("weight_scale", "comfy_quant"), None, "ComfyUI mixed quantization (comfy_quant)"),
        (("weight_scale", "input_scale"), None, "per-layer scales (weight_scale"),
    ],
)
def test_scaled_fp8_is_quantization_not_unknown(
    tmp_path: Path, suffixes: tuple[str, ...], marker: str | None, scheme: str
) -> None:
    e = _scaled(L.flux(bare=True), suffixes, marker=marker)
    ident = ident_of(tmp_path, e)
    assert (ident.kind, ident.architecture) == ("unet", "flux-dev")
    assert ident.unknown_keys == ()
    assert ident.quantization is not None
    assert any(s.startswith(scheme) for s in ident.quantization.schemes), ident.quantization
    assert "fp8 e4m3 weights" in ident.quantization.schemes
    flux = ident.component("flux")
    assert flux is not None and flux.complete and not flux.mismatches and not flux.extra
    assert set(ident.owners().values()) <= {"flux", "quantization"}


def test_scaled_fp8_under_a_checkpoint_prefix(tmp_path: Path) -> None:
    e = _scaled(L.flux(), ("scale_weight",), marker="model.diffusion_model.scaled_fp8")
    ident = ident_of(tmp_path, e)
    assert ident.kind == "checkpoint" and ident.unknown_keys == ()
    flux = ident.component("flux")
    assert flux is not None and not flux.extra
    assert ident.owners()["model.diffusion_model.scaled_fp8"] == "flux"


def test_bitsandbytes_nf4(tmp_path: Path) -> None:
    e: E = {}
    for k, (_, s) in L.flux(bare=True).items():
        if k.endswith(".weight") and len(s) == 2:
            n = s[0] * s[1]
            e[k] = ("U8", (n // 2, 1))
            for side in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
                e[f"{k}.{side}"] = ("F32", (64,))
            e[f"{k}.quant_state.bitsandbytes__nf4"] = ("U8", (100,))
        else:
            e[k] = ("BF16", s)
    ident = ident_of(tmp_path, e)
    assert ident.architecture == "flux-dev" and ident.unknown_keys == ()
    assert ident.quantization is not None and "bitsandbytes 4-bit" in ident.quantization.schemes
    flux = ident.component("flux")
    assert flux is not None and not flux.mismatches  # packed shapes are not compared


def test_gguf_style_names_are_reported(tmp_path: Path) -> None:
    e = bf16({"token_embd.weight": (32128, 4096), "enc.blk.0.attn_q.weight": (4096, 4096)})
    ident = ident_of(tmp_path, e)
    assert ident.quantization is not None
    assert "llama.cpp (GGUF) tensor names" in ident.quantization.schemes


# -- LoRAs ---------------------------------------------------------------------------------------


def lora(mods: dict[str, tuple[int, int]], fmt: str, rank: int = 4) -> E:
    """module -> (in, out); fmt: "kohya" (.lora_down/.lora_up/.alpha), "peft", "xlabs",
    "processor" (old diffusers attention processors), "lokr"."""
    out: E = {}
    for m, (i, o) in mods.items():
        if fmt == "kohya":
            out |= {
                f"{m}.lora_down.weight": ("F16", (rank, i)),
                f"{m}.lora_up.weight": ("F16", (o, rank)),
                f"{m}.alpha": ("F16", ()),
            }
        elif fmt == "peft":
            out |= {
                f"{m}.lora_A.weight": ("F16", (rank, i)),
                f"{m}.lora_B.weight": ("F16", (o, rank)),
            }
        elif fmt in ("xlabs", "processor"):
            out |= {f"{m}.down.weight": ("F16", (rank, i)), f"{m}.up.weight": ("F16", (o, rank))}
        elif fmt == "lokr":
            out |= {
                f"{m}.lokr_w1": ("F16", (8, 8)),
                f"{m}.lokr_w2_a": ("F16", (o // 8, rank)),
                f"{m}.lokr_w2_b": ("F16", (rank, i // 8)),
                f"{m}.alpha": ("F16", ()),
            }
    return out  # fmt: skip


LORA_CASES: dict[str, tuple[E, dict[str, str] | None, str | None, str | None]] = {
    # name: (tensors, metadata, architecture, trainer (substring))
    "flux-kohya": (lora({"lora_unet_double_blocks_0_img_attn_qkv": (3072, 9216), "lora_unet_single_blocks_0_linear1": (3072, 21504)}, "kohya"),
                   {"ss_base_model_version": "flux1", "ss_network_dim": "4"}, "flux", "kohya sd-scripts"),
    "flux-ai-toolkit": (lora({"transformer.single_transformer_blocks.0.attn.to_k": (3072, 3072), "transformer.transformer_blocks.0.attn.add_k_proj": (3072, 3072)}, "peft"),
                        {"software": '{"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit"}'}, "flux", "ai-toolkit"),
    "flux-xlabs": (lora({f"double_blocks.{i}.processor.{p}_lora{n}": (3072, 9216 if p == "qkv" else 3072) for i in range(2) for p in ("qkv", "proj") for n in (1, 2)}, "xlabs"),
                   None, "flux", "XLabs"),
    "flux-onetrainer": (lora({"lora_transformer_single_transformer_blocks_0_attn_to_k": (3072, 3072)}, "kohya"), None, "flux", "OneTrainer"),
    "flux-metadata-only": (lora({"lora_unet_some_module": (64, 64)}, "kohya"), {"ss_base_model_version": "flux1"}, "flux", "kohya"),
    "sd3-kohya": (lora({"lora_unet_joint_blocks_0_x_block_attn_qkv": (1536, 4608)}, "kohya"), None, "sd3", "kohya"),
    "sd3.5-large-peft": (lora({"transformer.transformer_blocks.0.attn.add_k_proj": (2432, 2432)}, "peft"), None, "sd3.5-large", "diffusers"),
    "sdxl-lokr": (lora({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640), "lora_te2_text_model_encoder_layers_0_mlp_fc1": (1280, 5120)}, "lokr"),
                  {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'}, "sdxl-base", "kohya"),
    "sd1-attn-processor": (lora({f"down_blocks.0.attentions.0.transformer_blocks.0.attn{a}.processor.to_{p}_lora": (768 if a == 2 and p in "kv" else 320, 320) for a in (1, 2) for p in "qkv"}, "processor"),
                           None, "sd1", "attention processors"),
    "wan-ai-toolkit": (lora({"diffusion_model.blocks.0.cross_attn.k": (5120, 5120), "diffusion_model.blocks.0.self_attn.q": (5120, 5120)}, "peft"), None, "wan", "diffusers / PEFT"),
    "qwen-image": (lora({"transformer.transformer_blocks.0.img_mlp.net.0.proj": (3072, 12288)}, "peft"), None, "qwen-image", "PEFT"),
    "hidream": (lora({"transformer.double_stream_blocks.0.block.attn1.to_q": (2560, 2560)}, "peft"), None, "hidream", "PEFT"),
    "lumina2": (lora({"transformer.layers.0.attention.to_q": (2304, 2304)}, "peft"), None, "lumina2", "PEFT"),
    "auraflow": (lora({"transformer.joint_transformer_blocks.0.attn.to_q": (3072, 3072)}, "peft"), None, "auraflow", "PEFT"),
    "hunyuan-video-musubi": (lora({"lora_unet_double_blocks_19_img_attn_qkv": (3072, 9216), "lora_unet_single_blocks_39_linear1": (3072, 21504)}, "kohya"), None, "hunyuan-video", "kohya"),
    "ltxv-peft": (lora({"transformer.transformer_blocks.0.attn1.to_k": (2048, 2048)}, "peft"), None, "ltxv", "PEFT"),
    "omnigen2-refiner": (lora({"transformer.ref_image_refiner.0.attn.to_q": (2520, 2520), "transformer.layers.0.attn.to_q": (2520, 2520)}, "peft"), None, "omnigen2", "PEFT"),
    "omnigen2-layers-only": (lora({"transformer.layers.0.attn.to_q": (2520, 2520)}, "peft"), None, "omnigen2", "PEFT"),
    "lumina2-diffusers": (lora({"transformer.layers.0.attn.to_q": (2304, 2304)}, "peft"), None, "lumina2", "PEFT"),
    "chroma": (lora({"lora_unet_distilled_guidance_layer_layers_0_in_layer": (5120, 5120), "lora_unet_double_blocks_0_img_attn_qkv": (3072, 9216)}, "kohya"), None, "chroma", "kohya"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_architecture_and_trainer(tmp_path: Path, case: str) -> None:
    tensors, meta, arch, trainer = LORA_CASES[case]
    ident = ident_of(tmp_path, tensors, metadata=meta)
    text = "\n".join(identity_lines(ident))
    assert ident.kind == "lora" and ident.lora is not None, text
    assert ident.architecture == arch, text
    if trainer:
        assert trainer in (ident.lora.trainer or ""), text
    assert ident.unknown_keys == (), text


# -- unknown files ------------------------------------------------------------------------------


def test_unknown_far_from_everything_names_nothing(tmp_path: Path) -> None:
    e = dict(list(L.sd1().items())[:30])  # 30 keys of 1,131
    e |= {f"junk.{i}": ("F32", (2,)) for i in range(200)}
    ident = ident_of(tmp_path, e)
    assert ident.kind == "unknown" and ident.nearest is None
    assert (ident.nearest_reason or "").startswith("nothing close")


def test_unknown_close_says_what_it_would_take_in_one_line(tmp_path: Path) -> None:
    flux = L.flux(bare=True)
    e = dict(list(flux.items())[: len(flux) * 2 // 5])  # 40% of the Flux transformer
    e |= {"extra.thing": ("F32", (1,)), "extra.other": ("F32", (1,))}
    ident = ident_of(tmp_path, e)
    assert ident.kind == "unknown", identity_lines(ident)
    assert ident.nearest == "Flux transformer bare"
    reason = ident.nearest_reason or ""
    assert "\n" not in reason
    assert reason.startswith("would need ") and "Flux transformer keys missing" in reason
    assert reason.endswith(", 2 extra keys")


# -- the oracle: diffusers' own detection on the same headers ------------------------------------

#: our (architecture, variant word) -> diffusers' infer_diffusers_model_type answer
ORACLE = {
    "chroma": "chroma",
    "flux-fill": "flux-fill",
    "flux-depth": "flux-depth",
    "sd3.5-large": "sd35_large",
    "cascade-c": "stable_cascade_stage_c",
    "cascade-c-lite": "stable_cascade_stage_c_lite",
    "cascade-b": "stable_cascade_stage_b",
    "cascade-b-lite": "stable_cascade_stage_b_lite",
    "auraflow": "auraflow",
    "ltxv": "ltx-video",
    "wan-t2v-14b": "wan-t2v-14B",
    "wan-t2v-1.3b": "wan-t2v-1.3B",
    "wan-i2v-14b": "wan-i2v-14B",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ORACLE))
def test_diffusers_detection_agrees(case: str) -> None:
    torch = pytest.importorskip("torch")
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    entries = NATIVE[case]()
    with torch.device("meta"):
        ckpt = {k: torch.empty(s) for k, (_, s) in entries.items()}
    assert sfu.infer_diffusers_model_type(ckpt) == ORACLE[case]


#: Rows told by marker keys alone (ComfyUI model_detection.py facts), one small file each.
MARKER_ONLY: dict[str, tuple[dict[str, tuple[int, ...]], str, str | None]] = {
    "flux2": ({"double_stream_modulation_img.lin.weight": (36864, 6144), "double_blocks.0.img_attn.qkv.weight": (18432, 6144), "img_in.weight": (6144, 128)}, "flux2", None),
    "chroma-radiance": ({"distilled_guidance_layer.in_proj.weight": (5120, 64), "double_blocks.0.img_attn.qkv.weight": (9216, 3072), "nerf_blocks.0.norm.scale": (64,), "img_in_patch.weight": (3072, 3, 16, 16)}, "chroma", "Radiance"),
    "hunyuan-video": ({"txt_in.individual_token_refiner.blocks.0.norm1.weight": (3072,), "img_in.proj.weight": (3072, 16, 1, 2, 2)}, "hunyuan-video", None),
    "mochi": ({"t5_yproj.weight": (3072, 4096), "blocks.0.attn.qkv_x.weight": (9216, 3072)}, "mochi", None),
    "cosmos": ({"blocks.0.mlp.layer1.weight": (8192, 2048), "x_embedder.proj.1.weight": (2048, 68)}, "cosmos", None),
    "stable-audio": ({"transformer.rotary_pos_emb.inv_freq": (32,), "postprocess_conv.weight": (64, 64, 1)}, "stable-audio", None),
    "z-image": ({"cap_embedder.1.weight": (3840, 2560), "noise_refiner.0.attention.k_norm.weight": (128,)}, "z-image", None),
    "wan-vace": ({"head.modulation": (1, 2, 5120), "vace_patch_embedding.weight": (5120, 96, 1, 2, 2), "patch_embedding.weight": (5120, 16, 1, 2, 2)}, "wan", "VACE"),
    "controlnet-sdxl-mid-diffusers": ({"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3), "add_embedding.linear_1.weight": (1280, 2816), "down_blocks.1.attentions.0.norm.weight": (640,), "conv_in.weight": (320, 4, 3, 3)}, "sdxl-base", None),
    "hunyuan3d": ({"latent_in.weight": (1024, 64), "cond_in.weight": (1024, 1536)}, "hunyuan3d", None),
    "kandinsky5": ({"visual_transformer_blocks.0.cross_attention.key_norm.weight": (128,), "visual_embeddings.in_layer.bias": (1792,)}, "kandinsky5", None),
    "sd-x4-upscaler": ({"input_blocks.0.0.weight": (256, 7, 3, 3), "out.2.weight": (4, 256, 3, 3), "label_emb.weight": (1000, 1024)}, "sd-x4-upscaler", None),
    "ip-adapter-faceid": ({"ip_adapter.1.to_k_ip.weight": (320, 768), "image_proj.proj.0.weight": (1024, 512)}, "sd1", "FaceID"),
    # ComfyUI model_detection.py families beyond images, and variants it tells apart
    "hunyuan-video-1.5": ({"txt_in.individual_token_refiner.blocks.0.norm1.weight": (2048,), "img_in.proj.weight": (2048, 65, 1, 1, 1), "cond_type_embedding.weight": (3, 2048)}, "hunyuan-video", "1.5"),
    "ltx-2": ({"adaln_single.emb.timestep_embedder.linear_1.bias": (4096,), "audio_adaln_single.linear.weight": (12288, 2048), "patchify_proj.weight": (4096, 128)}, "ltxv", "LTX-2"),
    "wan-camera": ({"head.modulation": (1, 2, 5120), "control_adapter.conv.weight": (5120, 1536, 2, 2), "patch_embedding.weight": (5120, 16, 1, 2, 2)}, "wan", "camera"),
    "wan-s2v": ({"head.modulation": (1, 2, 5120), "casual_audio_encoder.encoder.final_linear.weight": (5120, 1024), "patch_embedding.weight": (5120, 16, 1, 2, 2)}, "wan", "S2V"),
    "wan-humo": ({"head.modulation": (1, 2, 5120), "audio_proj.audio_proj_glob_1.layer.bias": (1536,), "patch_embedding.weight": (5120, 16, 1, 2, 2)}, "wan", "HuMo"),
    "wan-animate": ({"head.modulation": (1, 2, 5120), "face_adapter.fuser_blocks.0.k_norm.weight": (128,), "patch_embedding.weight": (5120, 36, 1, 2, 2)}, "wan", "Animate"),
    "cosmos-predict1": ({"blocks.block0.blocks.0.block.attn.to_q.0.weight": (4096, 4096), "x_embedder.proj.1.weight": (4096, 68)}, "cosmos", "Predict 1"),
    "anima": ({"blocks.0.mlp.layer1.weight": (8192, 2048), "x_embedder.proj.1.weight": (2048, 68), "llm_adapter.blocks.0.cross_attn.q_proj.weight": (1024, 1024)}, "cosmos", "Anima"),
    "hunyuan3d-2.1": ({"t_embedder.mlp.2.weight": (2048, 2048), "blocks.0.attn1.k_norm.weight": (128,), "x_embedder.weight": (2048, 64)}, "hunyuan3d", "2.1"),
    "ace-step": ({"genre_embedder.weight": (2560, 2560), "transformer_blocks.0.attn.to_q.weight": (2560, 2560)}, "ace-step", None),
    "ace-step-1.5": ({"encoder.lyric_encoder.layers.0.input_layernorm.weight": (2048,), "decoder.layers.0.self_attn_norm.weight": (2048,), "decoder.layers.0.mlp.gate_proj.weight": (6144, 2048)}, "ace-step", "1.5"),
    "cogvideox": ({"blocks.0.norm1.linear.weight": (18432, 512), "patch_embed.proj.weight": (3072, 16, 2, 2), "patch_embed.text_proj.weight": (3072, 4096)}, "cogvideox", None),
    "seedvr2-3b": ({"blocks.31.mlp.all.proj_in_gate.weight": (6912, 2560), "blocks.0.attn.proj_qkv.vid.weight": (7680, 2560)}, "seedvr2", "3B"),
    "seedvr2-7b": ({"blocks.35.mlp.all.proj_in_gate.weight": (8192, 3072)}, "seedvr2", "7B"),
    "krea2": ({"txtfusion.projector.weight": (4096, 12), "first.weight": (3072, 64), "blocks.0.attn.wq.weight": (3072, 3072)}, "krea2", None),
    "minimax-h3": ({"video_patch_proj.weight": (3072, 192), "audio_patch_proj.weight": (3072, 64)}, "minimax-h3", None),
    "minimax-music3": ({"cond_layer_logits": (8,), "latent_conditioners.0.weight": (1024, 64), "diffusion_transformer.transformer.layers.0.self_attn.to_qkv.weight": (3072, 1024)}, "minimax-music3", None),
    "hidream-o1": ({"t_embedder1.mlp.0.weight": (2560, 256), "x_embedder.proj1.weight": (2560, 64)}, "hidream-o1", None),
    "boogu": ({"double_stream_layers.0.img_instruct_attn.processor.img_to_q.weight": (2520, 2520), "x_embedder.weight": (2520, 64)}, "boogu", None),
    "lens": ({"transformer_blocks.0.attn.norm_added_q.weight": (64,), "transformer_blocks.0.img_mlp.w1.weight": (8192, 2048), "img_in.weight": (2048, 64)}, "lens", None),
    "mage-flow": ({"txt_norm.weight": (2560,), "proj_out.weight": (128, 3072), "img_in.weight": (3072, 128)}, "mage-flow", None),
    "ovis-image": ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "double_blocks.0.img_mlp.gate_proj.weight": (12288, 3072), "txt_norm.scale": (2048,), "img_in.weight": (3072, 64)}, "ovis-image", None),
    "longcat-image": ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "txt_in.weight": (3072, 3584), "img_in.weight": (3072, 64)}, "longcat-image", None),
    "newbie": ({"cap_embedder.1.weight": (2304, 2304), "noise_refiner.0.attention.k_norm.weight": (96,), "clip_text_pooled_proj.0.weight": (1024,)}, "lumina2", "NewBie"),
    "z-image-pixel": ({"cap_embedder.1.weight": (3840, 2560), "noise_refiner.0.attention.k_norm.weight": (128,), "dec_net.cond_embed.weight": (256, 3840)}, "z-image", "pixel space"),
    "kandinsky5-lite-image": ({"visual_transformer_blocks.0.cross_attention.key_norm.weight": (128,), "visual_embeddings.in_layer.bias": (2560,)}, "kandinsky5", "lite (image)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MARKER_ONLY))
def test_marker_only_families(tmp_path: Path, case: str) -> None:
    shapes, arch, variant = MARKER_ONLY[case]
    ident = ident_of(tmp_path, bf16(shapes))
    text = "\n".join(identity_lines(ident))
    assert ident.architecture == arch, text
    assert variant is None or variant in (ident.variant or ""), text
    assert ident.unknown_keys == (), text


def test_qwen25_vl_text_encoder_with_vision_tower(tmp_path: Path) -> None:
    e = L.harvested("qwen2.5-7b") | bf16({
        "visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14),
        "visual.blocks.0.attn.qkv.weight": (3840, 1280), "visual.blocks.0.norm1.weight": (1280,),
        "visual.merger.mlp.0.weight": (5120, 5120), "visual.merger.ln_q.weight": (1280,),
    })  # fmt: skip
    ident = ident_of(tmp_path, e)
    assert ident.kind == "text-encoder" and ident.unknown_keys == ()
    assert ident.model == "Qwen2.5 7B + Qwen2.5-VL vision tower"


@pytest.mark.slow
@pytest.mark.parametrize(
    "model", ["t2i-adapter-sd1-diffusers", "controlnet-sd1-diffusers", "clip-l"]
)
def test_harvest_is_what_the_classes_build(model: str) -> None:
    """The stored harvest is the classes' state dict on the meta device (re-harvested here)."""
    pytest.importorskip("diffusers")
    import importlib.util

    tool = Path(__file__).resolve().parents[1] / "tools" / "harvest_layouts.py"
    spec = importlib.util.spec_from_file_location("harvest_layouts", tool)
    assert spec is not None and spec.loader is not None
    h = importlib.util.module_from_spec(spec)
    sys.modules["harvest_layouts"] = h  # dataclasses look their module up
    spec.loader.exec_module(h)
    row = next(x for x in h.HARVESTS if x.id == model)
    fresh = h.harvest(row)
    stored = L._harvest()[model]
    assert (fresh["keys"], fresh["shapes"], fresh["dtypes"]) == (
        stored["keys"],
        stored["shapes"],
        stored["dtypes"],
    )


def test_sd21_unclip_and_zero123_variants(tmp_path: Path) -> None:
    e = L.sd2() | {"model.diffusion_model.label_emb.0.0.weight": ("F32", (1280, 2048))}
    ident = ident_of(tmp_path, e, name="unclip")
    assert (ident.architecture, ident.variant) == ("sd2", "unCLIP (OpenCLIP-H image embedding)")
    e = L.sd1(unet="UNET-v1-Pix2Pix") | {"cc_projection.weight": ("F32", (768, 772))}
    ident = ident_of(tmp_path, e, name="zero123")
    assert ident.variant is not None and "Stable Zero123" in ident.variant
    assert ident.unknown_keys == ()


def test_gguf_file_names_its_block_quantization(tmp_path: Path) -> None:
    """A city96-style GGUF (original key names, Q8_0 blocks) read through sdtool's GGUF reader."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    path = tmp_path / "flux.gguf"
    w = gguf.GGUFWriter(str(path), arch="flux")
    x = np.zeros((32, 64), np.float32)
    for k, (_, s) in L.flux(bare=True).items():
        if len(s) == 2:
            w.add_tensor(k, quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(k, np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_model(path) as m:
        ident = identify(m)
    assert (ident.kind, ident.architecture) == ("unet", "flux-dev")  # names, not shapes
    assert "Q8_0" in ident.precision and ident.unknown_keys == ()
    assert ident.quantization is not None and "GGUF Q8_0 blocks" in ident.quantization.schemes


def test_omnigen2_is_not_lumina2(tmp_path: Path) -> None:
    """OmniGen2 carries Lumina 2's blocks and ComfyUI's OmniGen2 marker
    (``time_caption_embed.timestep_embedder.linear_1.bias``) is in diffusers' Lumina 2 too: the
    reference-image modules and the width tell them apart, both ways."""
    ident = ident_of(tmp_path, L.harvested("omnigen2"), name="omnigen2")
    assert ident.architecture == "omnigen2" and ident.unknown_keys == ()
    ident = ident_of(tmp_path, L.harvested("lumina2-diffusers"), name="lumina2")
    assert ident.architecture == "lumina2"
    c = ident.components[0]
    assert c.signature == "lumina2-diffusers" and c.complete and not c.mismatches


def test_svd_named_by_its_image_conditioner(tmp_path: Path) -> None:
    """SVD's OpenCLIP-H image encoder under conditioner.embedders.0.open_clip.model.visual. is
    a component of its own that names the architecture, beside the UNet's temporal layers."""
    pre = "conditioner.embedders.0.open_clip.model.visual."
    cond = {
        pre + "conv1.weight": ("F16", (1280, 3, 14, 14)), pre + "class_embedding": ("F16", (1280,)),
        pre + "positional_embedding": ("F16", (257, 1280)), pre + "ln_pre.weight": ("F16", (1280,)),
        pre + "proj": ("F16", (1280, 1024)), pre + "ln_post.weight": ("F16", (1280,)),
    }  # fmt: skip
    for i in range(32):
        cond[f"{pre}transformer.resblocks.{i}.attn.in_proj_weight"] = ("F16", (3840, 1280))
        cond[f"{pre}transformer.resblocks.{i}.mlp.c_fc.weight"] = ("F16", (5120, 1280))
    ident = ident_of(tmp_path, svd() | cond)
    text = "\n".join(identity_lines(ident))
    assert (ident.kind, ident.architecture) == ("checkpoint", "svd"), text
    enc = ident.component("clip-vision-h")
    assert enc is not None and enc.prefix == pre and len(enc.keys) == len(cond), text
    assert "OpenCLIP-H image encoder under" in (ident.architecture_source or ""), text
    assert ident.unknown_keys == (), text
    # the conditioner alone (no UNet) still says SVD
    ident = ident_of(tmp_path, cond, name="cond")
    assert ident.architecture == "svd" and ident.unknown_keys == ()


def test_torchao_flattened_weights(tmp_path: Path) -> None:
    """torchao saves a quantized weight as ``<module>._weight_qdata`` + ``._weight_scale``
    (prototype/safetensors flatten_tensor_state_dict): read as the weight, scale set aside."""
    e: E = {}
    for k, (dt, s) in L.flux(bare=True).items():
        if k.endswith(".weight") and len(s) == 2:
            mod = k[: -len(".weight")]
            e[mod + "._weight_qdata"] = ("F8_E4M3", s)
            e[mod + "._weight_scale"] = ("F32", (s[0], 1))
        else:
            e[k] = (dt, s)
    ident = ident_of(tmp_path, e)
    text = "\n".join(identity_lines(ident))
    assert (ident.kind, ident.architecture) == ("unet", "flux-dev"), text
    assert ident.unknown_keys == (), text
    assert ident.quantization is not None and "torchao" in ident.quantization.schemes, text
    flux = ident.component("flux")
    assert flux is not None and flux.complete and not flux.missing, text
    assert set(ident.owners()) == set(e)


def test_docs_table_lists_every_family_with_its_source() -> None:
    """docs/identify.md's family table holds every harvested signature and marker-key row of
    the tables (tools/identify_table.py), and no generated row the tables no longer have."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "identify_table", root / "tools" / "identify_table.py"
    )
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    want = tool.rows()
    docs = (root / "docs" / "identify.md").read_text().splitlines()
    assert tool.NOTE in docs
    missing = [r for r in want if r not in docs]
    assert not missing, "run tools/identify_table.py: " + "\n".join(missing[:5])
    from sdtool.identify.tables import FAMILIES

    ends = tuple(f" | {f.source} |" for f in FAMILIES)
    generated = [
        line
        for line in docs
        if "diffusers/transformers naming: key set `" in line
        or (" | marker keys `" in line and line.endswith(ends))
    ]
    stale = [line for line in generated if line not in want]
    assert not stale, stale[:5]
