"""sdtool.layouts key maps against diffusers' own single-file conversion (the oracle).

Two kinds of check per component:
- full size, no data: every key of the real layout (shared/reference/layouts) maps, and the
  mapped keys and shapes are exactly those of the diffusers / transformers model built from the
  real config on the meta device;
- tiny size, real data: a tiny diffusers model's weights, mapped to single-file names by sdtool,
  then converted back by ``diffusers.loaders.single_file_utils``, give the same tensors bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdtool.errors import UsageError
from sdtool.layouts import apply_op, keymap, op_shape, part_rows
from tests import sdlayouts as L

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

SD1_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD2_UNET = {
    **SD1_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
SDXL_UNET = {
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
REFINER_UNET = {
    "block_out_channels": (384, 768, 1536, 1536),
    "down_block_types": (
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": 4,
    "attention_head_dim": (6, 12, 24, 24),
    "cross_attention_dim": 1280,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2560,
}
SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}


def _meta_state(cls, config: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = cls(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _clip(
    width: int, layers: int, heads: int, ff: int, projection: bool, **kw
) -> dict[str, tuple[int, ...]]:
    cfg = transformers.CLIPTextConfig(
        hidden_size=width,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=width,
        vocab_size=49408,
        max_position_embeddings=77,
        **kw,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    with torch.device("meta"):
        model = cls(cfg)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if (
        not projection
    ):  # transformers >= 5.6 flattens CLIPTextModel; files keep the hub's text_model.
        state = {
            k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()
        }
    return state


def _mapped_shapes(family: str, component: str, entries: L.Entries) -> tuple[dict, list[str]]:
    km = keymap(family, component)
    out: dict[str, tuple[int, ...]] = {}
    unmapped = []
    for key, (_dt, shape) in entries.items():
        maps = km(key)
        if not maps:
            unmapped.append(key)
        for m in maps:
            s = op_shape(m.op, shape)
            if m.kind == "split":
                a, b = part_rows(s[0], m.parts, m.part)
                s = (b - a, *s[1:])
            assert m.target not in out, m.target
            out[m.target] = s
    return out, unmapped


def _sdxl_all() -> L.Entries:
    return L.from_yaml("sdxl-sgm", ["diffuser", "vae", "clip_l", "clip_g"])


FULL = [
    (
        "sd1",
        "unet",
        lambda: L.sd1(),
        "model.diffusion_model.",
        lambda: _meta_state(diffusers.UNet2DConditionModel, SD1_UNET),
    ),
    (
        "sd2",
        "unet",
        lambda: L.sd2(),
        "model.diffusion_model.",
        lambda: _meta_state(diffusers.UNet2DConditionModel, SD2_UNET),
    ),
    (
        "sdxl-base",
        "unet",
        _sdxl_all,
        "model.diffusion_model.",
        lambda: _meta_state(diffusers.UNet2DConditionModel, SDXL_UNET),
    ),
    (
        "sdxl-refiner",
        "unet",
        lambda: L.sdxl_refiner(),
        "model.diffusion_model.",
        lambda: _meta_state(diffusers.UNet2DConditionModel, REFINER_UNET),
    ),
    (
        "sd1",
        "vae",
        lambda: L.sd1(),
        "first_stage_model.",
        lambda: _meta_state(diffusers.AutoencoderKL, SD_VAE),
    ),
    (
        "sdxl-base",
        "vae",
        _sdxl_all,
        "first_stage_model.",
        lambda: _meta_state(diffusers.AutoencoderKL, SD_VAE),
    ),
    (
        "sd1",
        "text_encoder",
        lambda: L.sd1(),
        "cond_stage_model.transformer.",
        lambda: _clip(768, 12, 12, 3072, False),
    ),
    (
        "sd2",
        "text_encoder",
        lambda: L.sd2(),
        "cond_stage_model.model.",
        lambda: _clip(1024, 23, 16, 4096, False, hidden_act="gelu"),
    ),
    (
        "sdxl-base",
        "text_encoder",
        lambda: _sdxl_all(),
        "conditioner.embedders.0.transformer.",
        lambda: _clip(768, 12, 12, 3072, False),
    ),
    (
        "sdxl-base",
        "text_encoder_2",
        _sdxl_all,
        "conditioner.embedders.1.model.",
        lambda: _clip(1280, 32, 20, 5120, True),
    ),
    (
        "sdxl-refiner",
        "text_encoder_2",
        lambda: L.sdxl_refiner(),
        "conditioner.embedders.0.model.",
        lambda: _clip(1280, 32, 20, 5120, True),
    ),
]

#: single-file keys that have no slot in the diffusers model (kept aside by the converter)
NO_SLOT = ("position_ids", "logit_scale", "resblocks.23.", "cond_stage_model.model.text_projection")


@pytest.mark.parametrize(
    ("family", "component", "entries", "prefix", "reference"),
    FULL,
    ids=[f"{f}-{c}" for f, c, *_ in FULL],
)
def test_full_layout_maps_onto_the_diffusers_model(family, component, entries, prefix, reference):
    comp = {k: v for k, v in entries().items() if k.startswith(prefix)}
    mapped, unmapped = _mapped_shapes(family, component, comp)
    assert all(any(n in k for n in NO_SLOT) for k in unmapped), unmapped
    ref = reference()
    mapped = {k: v for k, v in mapped.items() if not k.endswith("position_ids")}
    assert mapped == ref


@pytest.mark.parametrize(
    ("family", "component", "entries", "prefix", "reference"),
    FULL,
    ids=[f"{f}-{c}" for f, c, *_ in FULL],
)
def test_inverse_returns_every_key(family, component, entries, prefix, reference):
    """to_single(to_diffusers(k)) == k for every key, through splits and joins."""
    fwd, back = keymap(family, component), keymap(family, component, "to_single")
    for key in entries():
        if not key.startswith(prefix):
            continue
        for m in fwd(key):
            (b,) = back(m.target)
            assert b.target == key
            assert (b.op, b.kind, b.part) == (
                {"squeeze": "unsqueeze", "unsqueeze": "squeeze"}.get(m.op, m.op),
                "join" if m.kind == "split" else "copy",
                m.part,
            )


# -- tiny models with real data against diffusers' converters ------------------------------------


def _tiny_unet(**over):
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        norm_num_groups=8,
        block_out_channels=(16, 16, 32, 32),
        cross_attention_dim=16,
        attention_head_dim=4,
        down_block_types=SD1_UNET["down_block_types"],
        up_block_types=SD1_UNET["up_block_types"],
    )
    cfg.update(over)
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**cfg)


def _to_single(family: str, component: str, state: dict) -> dict:
    """sdtool: diffusers state dict -> single-file state dict (joins by concatenation)."""
    km = keymap(family, component, "to_single")
    out: dict = {}
    pieces: dict[str, dict[int, np.ndarray]] = {}
    for key, t in state.items():
        (m,) = km(key)
        arr = apply_op(m.op, t.numpy())
        if m.kind == "join":
            pieces.setdefault(m.target, {})[m.part] = arr
        else:
            out[m.target] = arr
    for target, parts in pieces.items():
        out[target] = np.concatenate([parts[i] for i in sorted(parts)])
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("family", "over"),
    [
        ("sd1", {}),
        (
            "sdxl-base",
            dict(
                block_out_channels=(16, 32, 32),
                down_block_types=SDXL_UNET["down_block_types"],
                up_block_types=SDXL_UNET["up_block_types"],
                transformer_layers_per_block=(1, 2, 2),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=4,
                projection_class_embeddings_input_dim=16 + 6 * 4,
            ),
        ),
        (
            "sdxl-refiner",
            dict(
                block_out_channels=(16, 16, 32, 32),
                down_block_types=REFINER_UNET["down_block_types"],
                up_block_types=REFINER_UNET["up_block_types"],
                transformer_layers_per_block=2,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=4,
                projection_class_embeddings_input_dim=16 + 5 * 4,
            ),
        ),
    ],
)
def test_unet_round_trip_through_diffusers_converter(family, over):
    unet = _tiny_unet(**over)
    state = unet.state_dict()
    single = _to_single(family, "unet", state)
    assert all(k.startswith("model.diffusion_model.") for k in single)
    back = sfu.convert_ldm_unet_checkpoint(single, dict(unet.config))
    _same(back, state)
    fwd = keymap(family, "unet")
    assert {m.target for k in single for m in fwd(k)} == set(state)


def test_vae_round_trip_through_diffusers_converter():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=SD_VAE["down_block_types"],
        up_block_types=SD_VAE["up_block_types"],
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=4,
    )
    state = vae.state_dict()
    single = _to_single("sd1", "vae", state)
    assert single["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    back = sfu.convert_ldm_vae_checkpoint(single, dict(vae.config))
    _same(back, state)


@pytest.mark.parametrize(
    ("family", "component"), [("sdxl-base", "text_encoder_2"), ("sdxl-refiner", "text_encoder_2")]
)
def test_openclip_round_trip_through_diffusers_converter(family, component):
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        projection_dim=16,
        vocab_size=50,
        max_position_embeddings=7,
    )
    model = transformers.CLIPTextModelWithProjection(cfg)
    state = model.state_dict()
    single = _to_single(family, component, state)
    prefix = (
        "conditioner.embedders.1.model."
        if family == "sdxl-base"
        else "conditioner.embedders.0.model."
    )
    w = single[prefix + "transformer.resblocks.1.attn.in_proj_weight"]
    assert w.shape == (48, 16)
    assert torch.equal(w[16:32], state["text_model.encoder.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(single[prefix + "text_projection"], state["text_projection.weight"].T)
    back = sfu.convert_open_clip_checkpoint(model, single, prefix=prefix)
    _same(back, state)


def test_hf_clip_is_a_prefix_rename():
    km = keymap("sd1", "text_encoder")
    (m,) = km("cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight")
    assert m.target == "text_model.encoder.layers.3.mlp.fc1.weight" and m.op == "copy"
    oracle = sfu.convert_ldm_clip_checkpoint({m.source: 1})
    assert list(oracle) == [m.target]


def test_bare_prefix_and_errors():
    km = keymap("sd1", "unet", prefix="")
    (m,) = km("input_blocks.4.0.emb_layers.1.weight")
    assert m.target == "down_blocks.1.resnets.0.time_emb_proj.weight"
    assert keymap("sdxl", "unet") is keymap("sdxl-base", "unet")
    assert km("nothing.here") == ()
    with pytest.raises(UsageError):
        keymap("sd9", "unet")
    with pytest.raises(UsageError):
        keymap("sd1", "text_encoder_2")
    with pytest.raises(UsageError):
        keymap("sd1", "unet", "sideways")


# -- SD3 / Flux ----------------------------------------------------------------------------------

SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
)  # fmt: skip
MMDIT = {
    "sd3": ("sd3-comfyui", lambda: _meta_state(diffusers.SD3Transformer2DModel, SD3_MEDIUM)),
    "flux": (
        "flux-flux",
        lambda: _meta_state(diffusers.FluxTransformer2DModel, {"guidance_embeds": True}),
    ),
}


def _bf16_free(entries: L.Entries) -> L.Entries:
    return {k: ("F32", s) for k, (_dt, s) in entries.items()}


@pytest.mark.parametrize("family", list(MMDIT))
def test_mmdit_full_layout_maps_onto_the_diffusers_model(family):
    layout, reference = MMDIT[family]
    comp = L.from_yaml(layout, ["diffuser"])
    comp = {k: v for k, v in comp.items() if k.startswith("model.diffusion_model.")}
    mapped, unmapped = _mapped_shapes(family, "transformer", comp)
    assert unmapped == []
    assert mapped == reference()
    fwd, back = keymap(family, "transformer"), keymap(family, "transformer", "to_single")
    for key in comp:
        for m in fwd(key):
            (b,) = back(m.target)
            assert b.target == key and b.part == m.part


@pytest.mark.parametrize("family", list(MMDIT))
def test_mmdit_split_and_swap_match_diffusers(family):
    """Real key structure and real dim 0 (what diffusers slices), other dims cut to 2."""
    layout, _ = MMDIT[family]
    comp = L.from_yaml(layout, ["diffuser"])
    rng = np.random.default_rng(0)
    single = {
        k: torch.from_numpy(
            rng.standard_normal((s[0], *(min(d, 2) for d in s[1:]))).astype(np.float32)
        )
        for k, (_dt, s) in comp.items()
        if k.startswith("model.diffusion_model.") and s
    }
    km = keymap(family, "transformer")
    ours = {}
    for key, t in single.items():
        for m in km(key):
            arr = apply_op(m.op, t.numpy())
            if m.kind == "split":
                a, b = part_rows(arr.shape[0], m.parts, m.part)
                arr = arr[a:b]
            ours[m.target] = torch.from_numpy(np.ascontiguousarray(arr))
    convert = (
        sfu.convert_sd3_transformer_checkpoint_to_diffusers
        if family == "sd3"
        else sfu.convert_flux_transformer_checkpoint_to_diffusers
    )
    theirs = convert(dict(single))
    _same(ours, theirs)


@pytest.mark.parametrize(
    ("family", "layout", "comps", "prefix", "reference"),
    [
        (
            "flux",
            "flux-flux",
            ["vae"],
            "vae.",
            lambda: _meta_state(
                diffusers.AutoencoderKL,
                {
                    **SD_VAE,
                    "latent_channels": 16,
                    "use_quant_conv": False,
                    "use_post_quant_conv": False,
                },
            ),
        ),
        (
            "sd3",
            "sd3-comfyui",
            ["vae"],
            "first_stage_model.",
            lambda: _meta_state(
                diffusers.AutoencoderKL,
                {
                    **SD_VAE,
                    "latent_channels": 16,
                    "use_quant_conv": False,
                    "use_post_quant_conv": False,
                },
            ),
        ),
        (
            "sd3",
            "sd3-comfyui",
            ["clip_g"],
            "text_encoders.clip_g.transformer.",
            lambda: _clip(1280, 32, 20, 5120, True),
        ),
    ],
)
def test_mmdit_vae_and_text_encoders(family, layout, comps, prefix, reference):
    comp = {k: v for k, v in L.from_yaml(layout, comps).items() if k.startswith(prefix)}
    component = "vae" if comps == ["vae"] else "text_encoder_2"
    mapped, unmapped = _mapped_shapes(family, component, comp)
    assert unmapped == []
    assert mapped == reference()
