"""convert --lora-format: kohya <-> diffusers <-> PEFT <-> ComfyUI names, alpha carried exactly.

The oracle: diffusers' own load_lora_weights + fuse_lora on a tiny SD1 pipeline gives the same
fused weights for the kohya file and for sdtool's diffusers-format rename of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdtool.cli.main import main
from sdtool.errors import UsageError
from sdtool.ops.layout import to_diffusers
from sdtool.ops.lora_format import convert_lora_format

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.test_layout_convert import tiny_checkpoint  # noqa: E402

#: kohya module -> (down shape, up shape) for the tiny SD1 model (32-wide UNet, 32-wide CLIP)
KOHYA_SD1 = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((4, 32), (32, 4)),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ((4, 32, 1, 1), (32, 4, 1, 1)),
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2": ((2, 256), (64, 2)),
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj": ((4, 32), (32, 4)),
}
ALPHA = {"lora_unet_down_blocks_0_attentions_0_proj_in": 1.5}


def kohya_lora(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd = {}
    for stem, (down, up) in KOHYA_SD1.items():
        sd[stem + ".lora_down.weight"] = torch.randn(down, generator=g)
        sd[stem + ".lora_up.weight"] = torch.randn(up, generator=g)
        sd[stem + ".alpha"] = torch.tensor(ALPHA.get(stem, 2.5))
    save_file(sd, str(path), metadata={"ss_network_dim": "4"})
    return sd


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sd1")
    tiny_checkpoint(d / "m.safetensors", "sd1")
    to_diffusers(d / "m.safetensors", d / "pipe")
    return d / "pipe"


def _unet_only(src: Path, dst: Path) -> Path:
    """diffusers 0.42 cannot load kohya text-encoder LoRAs ("Could not automatically infer state
    dict type" in convert_state_dict_to_diffusers): the oracle compares the UNet part."""
    save_file({k: v for k, v in load_file(src).items() if k.startswith("lora_unet_")}, str(dst))
    return dst


def transformers_te(folder: Path) -> dict[str, torch.Tensor]:
    import transformers

    return transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()


def _fused(folder: Path, lora: Path) -> dict[str, torch.Tensor]:
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        folder, tokenizer=None, local_files_only=True
    )
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora()
    out = {"unet." + k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora" not in k}
    out.update(
        {"te." + k: v.clone() for k, v in pipe.text_encoder.state_dict().items() if "lora" not in k}
    )
    return {k.replace(".base_layer.", "."): v for k, v in out.items()}  # PEFT's wrapper


def test_kohya_to_diffusers_fuses_the_same(tmp_path: Path, sd1_folder: Path):
    src = tmp_path / "k.safetensors"
    kohya = kohya_lora(src)
    dif = tmp_path / "d.safetensors"
    r = convert_lora_format(src, dif, to="diffusers", verify=True)
    assert r.family == "sd1" and r.modules == 4
    got = load_file(dif)
    assert "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight" in got
    assert "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight" in got
    from safetensors import safe_open

    with safe_open(dif, "pt") as f:
        cfg = json.loads(f.metadata()["lora_adapter_metadata"])
    assert cfg["unet.alpha_pattern"]["down_blocks.0.attentions.0.proj_in"] == 1.5
    a = _fused(sd1_folder, _unet_only(src, tmp_path / "ku.safetensors"))
    b = _fused(sd1_folder, dif)
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert len(changed) == 1 and changed[0].startswith("te.")  # the UNet fuses the same
    base = diffusers.UNet2DConditionModel.from_pretrained(sd1_folder / "unet").state_dict()
    assert not torch.equal(
        base["down_blocks.0.attentions.0.proj_in.weight"],
        a["unet.down_blocks.0.attentions.0.proj_in.weight"],
    )
    # the text encoder's module, fused by diffusers from sdtool's file: W + (B @ A) * alpha / r
    stem = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    up, down = kohya[stem + ".lora_up.weight"], kohya[stem + ".lora_down.weight"]
    w = transformers_te(sd1_folder)[changed[0].removeprefix("te.")]
    assert torch.equal(b[changed[0]], w + (up @ down) * (2.5 / 4))
    # and back: every tensor, alpha included, bit for bit under its kohya name
    back = tmp_path / "k2.safetensors"
    convert_lora_format(dif, back, to="kohya")
    again = load_file(back)
    assert sorted(again) == sorted(kohya)
    assert all(torch.equal(again[k], v) for k, v in kohya.items())


@pytest.mark.parametrize("fmt", ["comfy", "peft"])
def test_round_trips(tmp_path: Path, fmt: str):
    src = tmp_path / "k.safetensors"
    kohya = kohya_lora(src)
    if fmt == "peft":
        with pytest.raises(UsageError, match="text"):
            convert_lora_format(src, tmp_path / "x.safetensors", to="peft")
        unet_only = {k: v for k, v in kohya.items() if k.startswith("lora_unet_")}
        save_file(unet_only, str(src))
        kohya = unet_only
    mid = tmp_path / f"{fmt}.safetensors"
    convert_lora_format(src, mid, to=fmt, family="sd1")
    names = list(load_file(mid))
    if fmt == "comfy":
        assert "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight" in names
    else:
        assert "base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight" in names
    back = tmp_path / "back.safetensors"
    convert_lora_format(mid, back, to="kohya", family="sd1")
    again = load_file(back)
    assert sorted(again) == sorted(kohya)
    assert all(torch.equal(again[k], v) for k, v in kohya.items())


def test_sdxl_kohya_names_are_ldm(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(
            2, 8, generator=g
        ),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(
            8, 2, generator=g
        ),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(
            2, 8, generator=g
        ),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(
            8, 2, generator=g
        ),
    }
    src = tmp_path / "xl.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "d.safetensors"
    r = convert_lora_format(src, out, to="diffusers")
    assert r.family == "sdxl-base"
    got = load_file(out)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in got
    assert "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight" in got
    back = tmp_path / "k.safetensors"
    assert main(["convert", str(out), str(back), "--lora-format", "kohya"]) == 0
    again = load_file(back)
    # the module without alpha gets alpha = rank (scale 1, what loaders assume without one)
    assert again.pop("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha").item() == 2.0
    assert sorted(again) == sorted(sd)
    assert all(torch.equal(again[k], v) for k, v in sd.items())
    assert np.isclose(
        float(sd["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"]), 1.0
    )
