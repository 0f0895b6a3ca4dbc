"""SD 1.x / 2.x / SDXL tables, single file (ldm / sgm names) -> diffusers.

Sources (facts only, no code): ``huggingface/diffusers
src/diffusers/loaders/single_file_utils.py`` (``DIFFUSERS_TO_LDM_MAPPING``,
``convert_ldm_unet_checkpoint``, ``update_unet_resnet_ldm_to_diffusers``,
``convert_ldm_vae_checkpoint``, ``update_vae_attentions_ldm_to_diffusers``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``,
``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``); the block structure
(levels with cross-attention, 2 resnets per down level, 3 per up level) from
``kohya-ss/sd-scripts library/model_util.py`` / ``sdxl_model_util.py`` and the real key lists in
shared/reference/layouts (sd1-ldm, sdxl-sgm, toolkit/UNET-XL-Refiner). The installed diffusers is
the tests' oracle for every table here.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdtool.layouts.keymap import Rule, Target, rename, split

# -- UNet ------------------------------------------------------------------------------------------

#: ldm ResBlock part -> diffusers ResnetBlock2D part (update_unet_resnet_ldm_to_diffusers).
UNET_RESNET: dict[str, str | Target] = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

#: Whole-module renames outside the blocks (DIFFUSERS_TO_LDM_MAPPING["unet"]).
UNET_FIXED: tuple[tuple[str, str], ...] = (
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
)

#: SDXL's pooled-text + size conditioning (addition_embed_type "text_time").
UNET_ADD_EMBED: tuple[tuple[str, str], ...] = (
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
)


@dataclass(frozen=True)
class UNetBlocks:
    """The block structure that decides the key map: cross-attention per down level, from the top.

    Up levels mirror the down levels. ``layers_per_block`` resnets per down level, one more per up
    level; the last down level has no downsampler, the last up level no upsampler.
    """

    attention: tuple[bool, ...]
    layers_per_block: int = 2
    add_embedding: bool = False


UNET_BLOCKS: dict[str, UNetBlocks] = {
    "sd1": UNetBlocks((True, True, True, False)),
    "sd2": UNetBlocks((True, True, True, False)),
    "sdxl-base": UNetBlocks((False, True, True), add_embedding=True),
    "sdxl-refiner": UNetBlocks((False, True, True, False), add_embedding=True),
}


def unet_rules(blocks: UNetBlocks) -> list[Rule]:
    """ldm UNet module prefix -> diffusers UNet2DConditionModel prefix, for one block structure."""
    rules = [Rule(a, b) for a, b in UNET_FIXED]
    if blocks.add_embedding:
        rules += [Rule(a, b) for a, b in UNET_ADD_EMBED]
    levels, per = len(blocks.attention), blocks.layers_per_block
    for i, attn in enumerate(blocks.attention):
        for j in range(per):
            n = 1 + i * (per + 1) + j
            rules.append(Rule(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", UNET_RESNET))
            if attn:
                rules.append(Rule(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}"))
        if i < levels - 1:
            n = 1 + i * (per + 1) + per
            rules.append(Rule(f"input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
    rules += [
        Rule("middle_block.0", "mid_block.resnets.0", UNET_RESNET),
        Rule("middle_block.1", "mid_block.attentions.0"),
        Rule("middle_block.2", "mid_block.resnets.1", UNET_RESNET),
    ]
    for i in range(levels):
        attn = blocks.attention[levels - 1 - i]
        for j in range(per + 1):
            n = i * (per + 1) + j
            rules.append(Rule(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", UNET_RESNET))
            if attn:
                rules.append(Rule(f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}"))
        if i < levels - 1:
            n = i * (per + 1) + per
            slot = 2 if attn else 1
            rules.append(Rule(f"output_blocks.{n}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv"))
    return rules


# -- VAE -------------------------------------------------------------------------------------------

VAE_RESNET: dict[str, str | Target] = {"nin_shortcut": "conv_shortcut"}

#: The mid-block attention: 1x1 convs in ldm, Linear in diffusers
#: (update_vae_attentions_ldm_to_diffusers).
VAE_ATTENTION: dict[str, str | Target] = {
    "norm": "group_norm",
    "q.weight": rename("to_q.weight", "squeeze"),
    "k.weight": rename("to_k.weight", "squeeze"),
    "v.weight": rename("to_v.weight", "squeeze"),
    "proj_out.weight": rename("to_out.0.weight", "squeeze"),
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}


def vae_rules(levels: int = 4, layers_per_block: int = 2, quant_conv: bool = True) -> list[Rule]:
    """ldm AutoencoderKL prefix -> diffusers AutoencoderKL prefix (decoder levels reversed)."""
    rules = []
    for part in ("encoder", "decoder"):
        rules += [
            Rule(f"{part}.conv_in", f"{part}.conv_in"),
            Rule(f"{part}.conv_out", f"{part}.conv_out"),
            Rule(f"{part}.norm_out", f"{part}.conv_norm_out"),
            Rule(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET),
            Rule(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET),
            Rule(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION),
        ]
    for i in range(levels):
        for j in range(layers_per_block):
            rules.append(
                Rule(
                    f"encoder.down.{i}.block.{j}",
                    f"encoder.down_blocks.{i}.resnets.{j}",
                    VAE_RESNET,
                )
            )
        if i < levels - 1:
            rules.append(
                Rule(
                    f"encoder.down.{i}.downsample.conv",
                    f"encoder.down_blocks.{i}.downsamplers.0.conv",
                )
            )
        ldm = levels - 1 - i
        for j in range(layers_per_block + 1):
            rules.append(
                Rule(
                    f"decoder.up.{ldm}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", VAE_RESNET
                )
            )
        if i < levels - 1:
            rules.append(
                Rule(f"decoder.up.{ldm}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
            )
    if quant_conv:
        rules += [Rule("quant_conv", "quant_conv"), Rule("post_quant_conv", "post_quant_conv")]
    return rules


# -- text encoders ---------------------------------------------------------------------------------


def hf_clip_rules() -> list[Rule]:
    """A transformers CLIP text model stored under a prefix: the names are already HF names."""
    return [Rule("text_model", "text_model")]


#: OpenCLIP resblock part -> HF CLIPEncoderLayer part (DIFFUSERS_TO_LDM_MAPPING["openclip"]);
#: in_proj [3W, W] splits in rows q, k, v (convert_open_clip_checkpoint).
OPENCLIP_LAYER: dict[str, str | Target] = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
    "attn.in_proj_weight": split(
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"
    ),
    "attn.in_proj_bias": split(
        "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"
    ),
}


def openclip_rules(layers: int, projection: bool) -> list[Rule]:
    """OpenCLIP text tower -> HF CLIPTextModel(WithProjection).

    ``layers``: how many resblocks diffusers keeps (SD2 keeps 23 of 24: the last is unused
    because SD2 conditions on the penultimate layer). ``projection``: CLIPTextModelWithProjection
    (SDXL's bigG), whose ``text_projection.weight`` is OpenCLIP's ``text_projection`` transposed.
    """
    rules = [
        Rule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        Rule("token_embedding", "text_model.embeddings.token_embedding"),
        Rule("ln_final", "text_model.final_layer_norm"),
    ]
    rules += [
        Rule(f"transformer.resblocks.{n}", f"text_model.encoder.layers.{n}", OPENCLIP_LAYER)
        for n in range(layers)
    ]
    if projection:
        rules.append(Rule("text_projection", "text_projection.weight", op="transpose"))
    return rules
