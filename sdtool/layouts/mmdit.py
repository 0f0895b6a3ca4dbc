"""SD3 / SD3.5 (MMDiT, SAI names) and Flux.1 (BFL names) transformer tables -> diffusers.

Sources (facts only): diffusers ``src/diffusers/loaders/single_file_utils.py``
(``convert_sd3_transformer_checkpoint_to_diffusers``,
``convert_flux_transformer_checkpoint_to_diffusers``, ``swap_scale_shift``),
``scripts/convert_sd3_to_diffusers.py``, ``scripts/convert_flux_to_diffusers.py``;
``comfyanonymous/ComfyUI comfy/utils.py`` (MMDIT_MAP_*, flux_to_diffusers) for the same facts seen
from the other side; layouts checked on shared/reference/layouts sd3-comfyui and flux-flux.

Fused q/k/v split in equal thirds along dim 0; Flux's single-block ``linear1`` in the ratio
1:1:1:4 (q, k, v, MLP: 3072, 3072, 3072, 12288 at full size); the final adaLN (and SD3's last
context-block adaLN) are stored shift,scale by SAI/BFL and scale,shift by diffusers: halves swapped.
"""

from __future__ import annotations

from sdtool.layouts.keymap import Rule, Target, rename, split

#: (shift, scale) -> (scale, shift) for a weight and its bias
SWAP: dict[str, str | Target] = {
    "weight": rename("weight", "swap_halves"),
    "bias": rename("bias", "swap_halves"),
}


def _qkv(prefix: str, q: str, k: str, v: str) -> dict[str, str | Target]:
    return {
        f"{prefix}.weight": split(f"{q}.weight", f"{k}.weight", f"{v}.weight"),
        f"{prefix}.bias": split(f"{q}.bias", f"{k}.bias", f"{v}.bias"),
    }


# -- SD3 -----------------------------------------------------------------------------------------

SD3_X: dict[str, str | Target] = {
    **_qkv("attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.ln_q": "attn.norm_q",
    "attn.ln_k": "attn.norm_k",
    "attn.proj": "attn.to_out.0",
    **_qkv("attn2.qkv", "attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "attn2.ln_q": "attn2.norm_q",
    "attn2.ln_k": "attn2.norm_k",
    "attn2.proj": "attn2.to_out.0",
    "adaLN_modulation.1": "norm1.linear",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
SD3_CONTEXT: dict[str, str | Target] = {
    **_qkv("attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "attn.ln_q": "attn.norm_added_q",
    "attn.ln_k": "attn.norm_added_k",
    "attn.proj": "attn.to_add_out",
    "adaLN_modulation.1": "norm1_context.linear",
    "mlp.fc1": "ff_context.net.0.proj",
    "mlp.fc2": "ff_context.net.2",
}
#: the last block's context side is "pre only": its adaLN is half-swapped like the final layer
SD3_CONTEXT_LAST: dict[str, str | Target] = {
    **{k: v for k, v in SD3_CONTEXT.items() if k != "adaLN_modulation.1"},
    "adaLN_modulation.1.weight": rename("norm1_context.linear.weight", "swap_halves"),
    "adaLN_modulation.1.bias": rename("norm1_context.linear.bias", "swap_halves"),
}
SD3_FIXED: tuple[tuple[str, str], ...] = (
    ("pos_embed", "pos_embed.pos_embed"),
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.linear", "proj_out"),
)


def sd3_rules(depth: int) -> list[Rule]:
    """SD3 MMDiT with ``depth`` joint blocks (24: SD3 / 3.5 medium; 38: 3.5 large)."""
    rules = [Rule(a, b) for a, b in SD3_FIXED]
    rules.append(Rule("final_layer.adaLN_modulation.1", "norm_out.linear", SWAP))
    for i in range(depth):
        ctx = SD3_CONTEXT_LAST if i == depth - 1 else SD3_CONTEXT
        rules.append(Rule(f"joint_blocks.{i}.x_block", f"transformer_blocks.{i}", SD3_X))
        rules.append(Rule(f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}", ctx))
    return rules


# -- Flux ----------------------------------------------------------------------------------------

FLUX_DOUBLE: dict[str, str | Target] = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    **_qkv("img_attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
    **_qkv("txt_attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
#: linear1 = q, k, v and the MLP input, rows in the ratio 1:1:1:4 (mlp_ratio 4)
FLUX_LINEAR1 = (1, 1, 1, 4)
FLUX_SINGLE: dict[str, str | Target] = {
    "linear1.weight": split(
        "attn.to_q.weight",
        "attn.to_k.weight",
        "attn.to_v.weight",
        "proj_mlp.weight",
        parts=FLUX_LINEAR1,
    ),
    "linear1.bias": split(
        "attn.to_q.bias", "attn.to_k.bias", "attn.to_v.bias", "proj_mlp.bias", parts=FLUX_LINEAR1
    ),
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "linear2": "proj_out",
    "modulation.lin": "norm.linear",
}
FLUX_FIXED: tuple[tuple[str, str], ...] = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)


def flux_rules(double: int = 19, single: int = 38) -> list[Rule]:
    """Flux.1 (dev, schnell and their Fill/Depth/Canny variants: 19 double + 38 single blocks)."""
    rules = [Rule(a, b) for a, b in FLUX_FIXED]
    rules.append(Rule("final_layer.adaLN_modulation.1", "norm_out.linear", SWAP))
    rules += [
        Rule(f"double_blocks.{i}", f"transformer_blocks.{i}", FLUX_DOUBLE) for i in range(double)
    ]
    rules += [
        Rule(f"single_blocks.{i}", f"single_transformer_blocks.{i}", FLUX_SINGLE)
        for i in range(single)
    ]
    return rules


def hf_rules(*modules: str) -> list[Rule]:
    """A transformers model stored under a prefix with its own names (SD3/Flux text encoders)."""
    return [Rule(m, m) for m in modules]
