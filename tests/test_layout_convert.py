"""single file <-> diffusers folder on tiny models with the real key structure.

The single files are built from tiny random diffusers / transformers models (mapped to
single-file names by sdtool's tables, which test_layouts_keymap checks against diffusers).
The diffusers folder sdtool writes is compared tensor by tensor with diffusers' own single-file
conversion of the same file, loaded with DiffusionPipeline.from_pretrained offline, and
converted back to a single file equal bit for bit to the input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtool.cli.main import main
from sdtool.errors import OutputError, UsageError
from sdtool.ops.layout import EXTRAS, to_diffusers, to_single

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.test_layouts_keymap import _to_single  # noqa: E402

CA, DB = "CrossAttnDownBlock2D", "DownBlock2D"
UP = {CA: "CrossAttnUpBlock2D", DB: "UpBlock2D"}
#: family -> (down blocks, UNet extras, text encoders: component -> (projection, act))
TINY = {
    "sd1": ((CA, CA, CA, DB), {"attention_head_dim": 8}, {"text_encoder": False}),
    "sd2": (
        (CA, CA, CA, DB),
        {"attention_head_dim": 1, "use_linear_projection": True},
        {"text_encoder": False},
    ),
    "sdxl-base": (
        (DB, CA, CA),
        {
            "attention_head_dim": 1,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 32 + 6 * 256,
            "transformer_layers_per_block": [1, 2, 2],
        },
        {"text_encoder": False, "text_encoder_2": True},
    ),
    "sdxl-refiner": (
        (DB, CA, CA, DB),
        {
            "attention_head_dim": 1,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 32 + 5 * 256,
            "transformer_layers_per_block": 2,
        },
        {"text_encoder_2": True},
    ),
}
#: where diffusers' single-file code finds each OpenCLIP text encoder
OPENCLIP_PREFIX = {
    ("sd2", "text_encoder"): "cond_stage_model.model.",
    ("sdxl-base", "text_encoder_2"): "conditioner.embedders.1.model.",
    ("sdxl-refiner", "text_encoder_2"): "conditioner.embedders.0.model.",
}


def tiny_checkpoint(path: Path, family: str) -> dict[str, torch.Tensor]:
    """A tiny single-file checkpoint of ``family`` plus keys no diffusers model holds."""
    down, unet_kw, texts = TINY[family]
    torch.manual_seed(0)
    width = [32, 32, 64, 64][: len(down)]
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=width, layers_per_block=2, cross_attention_dim=32,
        down_block_types=down, up_block_types=tuple(UP[b] for b in reversed(down)), **unet_kw,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
    )  # fmt: skip
    sd: dict[str, torch.Tensor] = {}
    sd.update(_to_single(family, "unet", unet.state_dict()))
    sd.update(_to_single(family, "vae", vae.state_dict()))
    for comp, proj in texts.items():
        openclip = (family, comp) in OPENCLIP_PREFIX
        cfg = transformers.CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=1,
            vocab_size=50, max_position_embeddings=7, projection_dim=32,
            hidden_act="gelu" if openclip else "quick_gelu",
        )  # fmt: skip
        te = (transformers.CLIPTextModelWithProjection if proj else transformers.CLIPTextModel)(cfg)
        state = {
            k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
            for k, v in te.state_dict().items()
        }
        sd.update(_to_single(family, comp, state))
        if openclip:
            prefix = OPENCLIP_PREFIX[(family, comp)]
            sd[prefix + "logit_scale"] = torch.tensor(4.6)
            if not proj:
                sd[prefix + "text_projection"] = torch.randn(32, 32)
        else:
            prefix = (
                "cond_stage_model.transformer."
                if family == "sd1"
                else "conditioner.embedders.0.transformer."
            )
            sd[prefix + "text_model.embeddings.position_ids"] = torch.arange(7)[None]
    sd["alphas_cumprod"] = torch.rand(10, dtype=torch.float64)
    sd["model_ema.decay"] = torch.tensor(0.999)
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, str(path), metadata={"modelspec.title": "tiny " + family})
    return sd


def _oracle(family: str, comp: str, single: dict, cfg: dict) -> dict[str, torch.Tensor]:
    """diffusers' own single-file conversion of one component."""
    if comp == "unet":
        return sfu.convert_ldm_unet_checkpoint(single, cfg)
    if comp == "vae":
        return sfu.convert_ldm_vae_checkpoint(single, cfg)
    if (family, comp) in OPENCLIP_PREFIX:
        return sfu.convert_open_clip_checkpoint(
            None, single, prefix=OPENCLIP_PREFIX[(family, comp)]
        )
    out = sfu.convert_ldm_clip_checkpoint(single)
    return out


@pytest.mark.parametrize(
    "family",
    [
        "sd1",
        "sdxl-base",
        pytest.param("sd2", marks=pytest.mark.slow),
        pytest.param("sdxl-refiner", marks=pytest.mark.slow),
    ],
)
def test_single_to_diffusers_matches_diffusers_and_round_trips(tmp_path: Path, family: str):
    src = tmp_path / "m.safetensors"
    single = tiny_checkpoint(src, family)
    out = tmp_path / "pipe"
    r = to_diffusers(src, out, verify=True)
    assert r.family == family and r.verified
    index = json.loads((out / "model_index.json").read_text())
    for comp in [
        c for c, lib in index.items() if isinstance(lib, list) and lib[0] and c != "scheduler"
    ]:
        cfg = json.loads((out / comp / "config.json").read_text())
        weights = next((out / comp).glob("*.safetensors"))
        ours = load_file(weights)
        theirs = _oracle(family, comp, single, cfg)
        theirs = {k: v for k, v in theirs.items() if not k.endswith("position_ids")}
        assert sorted(ours) == sorted(theirs), comp
        for k, v in theirs.items():
            assert ours[k].dtype == v.dtype and torch.equal(ours[k], v.contiguous()), (comp, k)
    extras = load_file(out / EXTRAS)
    assert "alphas_cumprod" in extras and "model_ema.decay" in extras
    # diffusers loads the folder offline (SD1/SD2 need a tokenizer argument: none is written)
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, tokenizer=None, local_files_only=True)
    assert type(pipe).__name__ == index["_class_name"]
    ref = sfu.convert_ldm_unet_checkpoint(
        single, json.loads((out / "unet/config.json").read_text())
    )
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # and back: every tensor under its original name, bit for bit, metadata carried
    back = tmp_path / "back.safetensors"
    r2 = to_single(out, back, verify=True)
    assert r2.family == family
    again = load_file(back)
    assert sorted(again) == sorted(single)
    assert all(again[k].dtype == v.dtype and torch.equal(again[k], v) for k, v in single.items())
    from safetensors import safe_open

    with safe_open(back, "pt") as f:
        assert f.metadata()["modelspec.title"] == "tiny " + family


def test_components_bare_files_dry_run_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    src = tmp_path / "m.safetensors"
    single = tiny_checkpoint(src, "sd1")
    out = tmp_path / "pipe"
    dry = to_diffusers(src, out, dry_run=True)
    assert not out.exists() and dry.extras and len(dry.mapping) > 900
    assert ("model.diffusion_model.out.2.weight", "unet/conv_out.weight", "rename") in dry.mapping
    assert main(["convert", str(src), str(out), "--to", "diffusers"]) == 0
    with pytest.raises(OutputError):
        to_diffusers(src, out)
    assert main(["convert", str(src), str(out), "--to", "diffusers"]) == 2
    # only the UNet and VAE, with their checkpoint prefixes
    part = tmp_path / "part.safetensors"
    assert main(["convert", str(out), str(part), "--components", "unet,vae"]) == 0
    got = load_file(part)
    want = {k for k in single if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    assert set(got) == want
    # a component folder and a component file: bare names, as ComfyUI's loaders read them
    for comp_src in (out / "unet", out / "unet" / "diffusion_pytorch_model.safetensors"):
        bare = tmp_path / "unet.safetensors"
        assert main(["convert", str(comp_src), str(bare), "--to", "single", "--overwrite"]) == 0
        got = load_file(bare)
        assert set(got) == {
            k.removeprefix("model.diffusion_model.")
            for k in single
            if k.startswith("model.diffusion_model.")
        }
    capsys.readouterr()
    assert (
        main(
            ["convert", str(src), str(tmp_path / "d2"), "--to", "diffusers", "--dry-run", "--json"]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "sdtool.layout/1" and doc["dry_run"] and not (tmp_path / "d2").exists()
    assert main(["convert", str(out), str(tmp_path / "x.safetensors"), "--components", "foo"]) == 2
    with pytest.raises(UsageError):
        to_diffusers(src, tmp_path / "d3", family="sd9")


def test_sharded_components(tmp_path: Path):
    src = tmp_path / "m.safetensors"
    single = tiny_checkpoint(src, "sd1")
    out = tmp_path / "pipe"
    to_diffusers(src, out, max_shard_size="2MB")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = diffusers.UNet2DConditionModel.from_pretrained(out / "unet")
    assert model.conv_in.weight.shape[1] == 4
    back = tmp_path / "back.safetensors"
    to_single(out, back, verify=True)
    assert set(load_file(back)) == set(single)


# -- SD3 / Flux ----------------------------------------------------------------------------------


def _hf_state(model) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    if isinstance(model, transformers.CLIPTextModel):
        state = {
            k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()
        }
    return state


def tiny_mmdit(path: Path, family: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    if family == "sd3":
        tr = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=1, joint_attention_dim=32, caption_projection_dim=64,
            pooled_projection_dim=32, out_channels=16, pos_embed_max_size=8,
        )  # fmt: skip
    else:
        tr = diffusers.FluxTransformer2DModel(
            num_layers=2, num_single_layers=2, attention_head_dim=128, num_attention_heads=1,
            joint_attention_dim=32, pooled_projection_dim=32, in_channels=16, guidance_embeds=True,
        )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    clip = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
        vocab_size=50, max_position_embeddings=7, projection_dim=32,
    )  # fmt: skip
    t5 = transformers.T5Config(
        d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2, vocab_size=50,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )  # fmt: skip
    sd: dict[str, torch.Tensor] = {}
    sd.update(_to_single(family, "transformer", tr.state_dict()))
    sd.update(_to_single(family, "vae", vae.state_dict()))
    clip_cls = (
        transformers.CLIPTextModelWithProjection if family == "sd3" else transformers.CLIPTextModel
    )
    texts = {"text_encoder": clip_cls(clip)}
    if family == "sd3":
        texts["text_encoder_2"] = transformers.CLIPTextModelWithProjection(clip)
        texts["text_encoder_3"] = transformers.T5EncoderModel(t5)
    else:
        texts["text_encoder_2"] = transformers.T5EncoderModel(t5)
    for comp, model in texts.items():
        sd.update(_to_single(family, comp, _hf_state(model)))
    sd["model.model_sampling.sigmas"] = torch.rand(5)
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_mmdit_single_to_diffusers_and_back(tmp_path: Path, family: str):
    src = tmp_path / "m.safetensors"
    single = tiny_mmdit(src, family)
    out = tmp_path / "pipe"
    r = to_diffusers(src, out, verify=True)
    assert r.family == family and r.extras == ["model.model_sampling.sigmas"]
    if family == "sd3":  # diffusers' converter (its Flux one assumes the full 3072 width)
        ours = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
        theirs = sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(single))
        assert sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    tokens = {k: None for k in ("tokenizer", "tokenizer_2", "tokenizer_3")}
    if family == "flux":
        tokens.pop("tokenizer_3")
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, local_files_only=True, **tokens)
    assert type(pipe).__name__ == (
        "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline"
    )
    assert pipe.vae.config.latent_channels == 16 and not pipe.vae.config.use_quant_conv
    back = tmp_path / "back.safetensors"
    to_single(out, back, verify=True)
    again = load_file(back)
    assert sorted(again) == sorted(single)
    assert all(torch.equal(again[k], v) for k, v in single.items())
    # a bare transformer file (BFL / ComfyUI diffusion model) converts on its own
    bare = tmp_path / "bare.safetensors"
    assert main(["convert", str(out / "transformer"), str(bare), "--to", "single"]) == 0
    assert set(load_file(bare)) == {
        k.removeprefix("model.diffusion_model.")
        for k in single
        if k.startswith("model.diffusion_model.")
    }
    out2 = tmp_path / "pipe2"
    assert main(["convert", str(bare), str(out2), "--to", "diffusers"]) == 0
    assert (out2 / "transformer" / "config.json").is_file() and not (out2 / "vae").exists()
