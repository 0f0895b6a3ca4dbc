"""LoRA naming tables: kohya, diffusers, PEFT and ComfyUI spellings of one adapted module.

Sources (facts only): ``kohya-ss/sd-scripts networks/lora.py`` (``lora_unet_`` / ``lora_te_`` /
``lora_te1_`` / ``lora_te2_`` prefixes, "." -> "_", ``.lora_down/.lora_up/.alpha``; SD1/SD2 UNets
under diffusers paths, SDXL's under SAI/ldm paths), diffusers
``src/diffusers/loaders/lora_base.py`` / ``lora_pipeline.py`` (``unet.`` / ``text_encoder.`` /
``text_encoder_2.`` / ``transformer.`` prefixes, ``lora_A`` / ``lora_B``, the
``lora_adapter_metadata`` JSON of LoraConfig kwargs prefixed by component, read back by
``_create_lora_config``), PEFT (``base_model.model.`` prefix, ``lora_alpha`` / ``r``,
``alpha_pattern`` / ``rank_pattern``), ComfyUI ``comfy/lora.py`` (``diffusion_model.`` +
single-file names, ``text_encoders.<clip>.transformer.``); shared/reference/CONVERSIONS.md
section 3.
"""

from __future__ import annotations

FORMATS = ("kohya", "diffusers", "peft", "comfy", "ai-toolkit")
#: formats that name modules by diffusers paths, with PEFT's lora_A / lora_B
PEFT_FORMATS = frozenset({"diffusers", "peft", "ai-toolkit"})

#: module-name parts that contain "_" themselves (kept whole when "_" becomes "."), longest
#: first when they overlap. UNet (diffusers and ldm), CLIP, T5, MMDiT and Flux names.
JOINED: tuple[str, ...] = (
    "single_transformer_blocks", "transformer_blocks", "down_blocks", "up_blocks", "mid_block",
    "input_blocks", "output_blocks", "middle_block", "proj_in", "proj_out", "to_q", "to_k",
    "to_v", "to_out", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut", "time_emb_proj",
    "time_embedding", "time_embed", "label_emb", "add_embedding", "linear_1", "linear_2",
    "in_layers", "out_layers", "emb_layers", "skip_connection", "text_model", "self_attn",
    "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2",
    "text_projection", "wi_0", "wi_1", "double_blocks", "single_blocks", "img_attn", "txt_attn",
    "img_mlp", "txt_mlp", "img_mod", "txt_mod", "final_layer", "adaLN_modulation", "img_in",
    "txt_in", "time_in", "vector_in", "guidance_in", "in_layer", "out_layer", "add_q_proj",
    "add_k_proj", "add_v_proj", "to_add_out", "norm1_context", "ff_context", "proj_mlp",
    "x_embedder", "context_embedder", "norm_out", "time_text_embed", "timestep_embedder",
    "text_embedder", "guidance_embedder", "joint_blocks", "x_block", "context_block",
    "t_embedder", "y_embedder", "pos_embed",
)  # fmt: skip
_JOINED = sorted({tuple(t.split("_")) for t in JOINED}, key=len, reverse=True)


def dotted(path: str) -> str:
    """A kohya module path ("." written "_") back to its dotted form, using ``JOINED``."""
    parts = path.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for tok in _JOINED:
            if tuple(parts[i : i + len(tok)]) == tok:
                out.append("_".join(tok))
                i += len(tok)
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


#: our component ids (as sdtool.ops.lora.names gives them) -> the diffusers component
DIFFUSERS_COMPONENT = {"te1": "text_encoder", "te2": "text_encoder_2", "te3": "text_encoder_3"}
#: kohya prefix per component; SD 1.x/2.x have one text encoder, written lora_te
KOHYA_PREFIX = {"unet": "lora_unet", "te1": "lora_te1", "te2": "lora_te2", "te3": "lora_te3"}
KOHYA_SINGLE_TE = "lora_te"

#: module-stem prefix -> the component it adapts, kohya-style underscore names (none nests in
#: another, so the order does not matter)
UNDERSCORE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("lora_transformer_", "unet"),
    ("lycoris_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te1"),
)
#: module-stem prefix -> component, dotted names (diffusers, PEFT, ComfyUI, ai-toolkit); a prefix
#: comes before any shorter one it starts with
DOTTED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("base_model.model.", "unet"),
    ("model.diffusion_model.", "unet"),
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
#: ComfyUI's text-encoder prefixes per family
COMFY_TE = {
    "sd1": {"te1": "text_encoders.clip_l.transformer"},
    "sd2": {"te1": "text_encoders.clip_h.transformer"},
    "sdxl-base": {"te1": "text_encoders.clip_l.transformer",
                  "te2": "text_encoders.clip_g.transformer"},
    "sdxl-refiner": {"te2": "text_encoders.clip_g.transformer"},
    "sd3": {"te1": "text_encoders.clip_l.transformer", "te2": "text_encoders.clip_g.transformer",
            "te3": "text_encoders.t5xxl.transformer"},
    "flux": {"te1": "text_encoders.clip_l.transformer", "te2": "text_encoders.t5xxl.transformer"},
}  # fmt: skip
#: families whose kohya LoRAs name the UNet / transformer by single-file (ldm, BFL) paths
KOHYA_SINGLE_NAMES = frozenset({"sdxl-base", "sdxl-refiner", "flux", "sd3", "sd3.5-large"})

#: role (sdtool.ops.lora.names) -> key suffix in kohya / LyCORIS / ComfyUI files and in
#: diffusers / PEFT / ai-toolkit files; None: that naming has no spelling for it. LoHa / LoKr
#: keep LyCORIS' suffixes everywhere (PEFT's LoHa / LoKr layers use the same names).
SUFFIX: dict[str, tuple[str | None, str | None]] = {
    "down": (".lora_down.weight", ".lora_A.weight"),
    "up": (".lora_up.weight", ".lora_B.weight"),
    "mid": (".lora_mid.weight", None),
    "dora": (".dora_scale", None),
    "magnitude": (None, ".lora_magnitude_vector"),
    **{r: ("." + r, "." + r) for r in (
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
        "diff", "diff_b",
    )},
}  # fmt: skip
#: per kind, the roles whose rows are the adapted weight's output rows (a row slice of the
#: fused weight slices them; a half swap swaps them). LoKr's rows are w1's blocks (below).
ROW_ROLES = {
    "lora": ("up",),
    "loha": ("hada_w1_a", "hada_w2_a"),
    "full": ("diff",),
    "bias": ("diff_b",),
}
#: Flux's text encoders: kohya (``networks/lora_flux.py``) writes T5 as ``lora_te3``, ComfyUI as
#: ``text_encoders.t5xxl``; diffusers' FluxPipeline calls it ``text_encoder_2``
FLUX_COMPONENTS = {"te3": "te2"}
KOHYA_PREFIX_FAMILY = {"flux": {"te2": "lora_te3"}}


def kohya_prefix(family: str | None, comp: str, single_te: bool) -> str:
    """kohya's module-name prefix (without the joining underscore) for component ``comp``:
    the family's own where it has one, ``lora_te`` for the only text encoder of SD 1.x/2.x."""
    own = KOHYA_PREFIX_FAMILY.get(family or "", {}).get(comp)
    if own:
        return own
    return KOHYA_SINGLE_TE if comp == "te1" and single_te else KOHYA_PREFIX[comp]
