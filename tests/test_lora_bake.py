"""sdtool lora bake: every module kind against torch on whole tensors, and against diffusers'
fuse_lora on a tiny UNet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtool.cli.main import main
from sdtool.ops.lora.bake import bake, parse_lora_arg
from sdtool.ops.lora.names import module_id, parse_lora

U = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0."
G = torch.Generator().manual_seed(0)


def r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def _base() -> dict[str, torch.Tensor]:
    """SDXL-shaped names (ldm UNet, HF CLIP-L), small shapes."""
    return {
        U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": r(16, 16),
        U + "input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight": r(16, 16),
        U + "input_blocks.4.1.transformer_blocks.0.attn1.to_v.weight": r(16, 16),
        U + "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight": r(16, 16),
        U + "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.bias": r(16),
        U + "input_blocks.4.1.proj_in.weight": r(16, 16),
        U + "input_blocks.1.0.in_layers.2.weight": r(8, 6, 3, 3),
        U + "input_blocks.1.0.skip_connection.weight": r(8, 6, 1, 1),
        U + "middle_block.1.proj_out.weight": r(16, 16),
        U + "output_blocks.0.0.out_layers.3.weight": r(8, 8, 3, 3),
        TE1 + "self_attn.q_proj.weight": r(12, 12),
        TE1 + "mlp.fc1.weight": r(24, 12),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[
            None
        ],
        "first_stage_model.decoder.conv_out.weight": r(3, 4, 3, 3),
    }


def k(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def _lora() -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """One module of every kind; returns the file's tensors and, per base key, the oracle's
    recipe."""
    sd: dict[str, torch.Tensor] = {}
    want: dict[str, tuple] = {}
    q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    sd |= {k(q) + ".lora_down.weight": r(4, 16), k(q) + ".lora_up.weight": r(16, 4)}
    sd[k(q) + ".alpha"] = torch.tensor(2.0)
    want[U + q + ".weight"] = ("lora", k(q), 2.0 / 4)
    conv = "input_blocks.1.0.in_layers.2"  # LoCon 3x3
    sd |= {k(conv) + ".lora_down.weight": r(2, 6, 3, 3), k(conv) + ".lora_up.weight": r(8, 2, 1, 1)}
    sd[k(conv) + ".alpha"] = torch.tensor(1.0)
    want[U + conv + ".weight"] = ("conv", k(conv), 1.0 / 2)
    skip = "input_blocks.1.0.skip_connection"  # 1x1 conv
    sd |= {k(skip) + ".lora_down.weight": r(3, 6, 1, 1), k(skip) + ".lora_up.weight": r(8, 3, 1, 1)}
    want[U + skip + ".weight"] = ("lora", k(skip), 1.0)  # no alpha: scale 1
    tuck = "output_blocks.0.0.out_layers.3"  # Tucker LoCon
    sd |= {
        k(tuck) + ".lora_down.weight": r(2, 8, 1, 1),
        k(tuck) + ".lora_mid.weight": r(2, 2, 3, 3),
        k(tuck) + ".lora_up.weight": r(8, 2, 1, 1),
        k(tuck) + ".alpha": torch.tensor(4.0),
    }
    want[U + tuck + ".weight"] = ("tucker", k(tuck), 4.0 / 2)
    kk = "input_blocks.4.1.transformer_blocks.0.attn1.to_k"  # LoHa
    sd |= {
        k(kk) + ".hada_w1_a": r(16, 3), k(kk) + ".hada_w1_b": r(3, 16),
        k(kk) + ".hada_w2_a": r(16, 3), k(kk) + ".hada_w2_b": r(3, 16),
        k(kk) + ".alpha": torch.tensor(1.5),
    }  # fmt: skip
    want[U + kk + ".weight"] = ("loha", k(kk), 1.5 / 3)
    v = "input_blocks.4.1.transformer_blocks.0.attn1.to_v"  # LoKr, w2 low-rank
    sd |= {
        k(v) + ".lokr_w1": r(4, 2), k(v) + ".lokr_w2_a": r(4, 2), k(v) + ".lokr_w2_b": r(2, 8),
        k(v) + ".alpha": torch.tensor(1.0),
    }  # fmt: skip
    want[U + v + ".weight"] = ("lokr", k(v), 1.0 / 2)
    o = "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0"  # full diff + bias diff
    sd |= {k(o) + ".diff": r(16, 16), k(o) + ".diff_b": r(16)}
    want[U + o + ".weight"] = ("diff", k(o), 1.0)
    want[U + o + ".bias"] = ("diff_b", k(o), 1.0)
    p = "input_blocks.4.1.proj_in"  # DoRA (kohya dora_scale [out, 1])
    sd |= {
        k(p) + ".lora_down.weight": r(4, 16), k(p) + ".lora_up.weight": r(16, 4),
        k(p) + ".alpha": torch.tensor(4.0), k(p) + ".dora_scale": r(16, 1).abs(),
    }  # fmt: skip
    want[U + p + ".weight"] = ("dora", k(p), 1.0)
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    sd |= {te + ".lora_down.weight": r(2, 12), te + ".lora_up.weight": r(12, 2)}
    sd[te + ".alpha"] = torch.tensor(2.0)
    want[TE1 + "self_attn.q_proj.weight"] = ("lora", te, 1.0)
    sd["lora_unet_no_such_module.lora_down.weight"] = r(2, 4)
    sd["lora_unet_no_such_module.lora_up.weight"] = r(4, 2)
    return sd, want


def _oracle(base: dict, lora: dict, want: dict, strength: float) -> dict:
    out = dict(base)
    for key, (kind, stem, scale) in want.items():
        w = base[key].float()
        s = strength * scale
        f = {n[len(stem) + 1 :]: t.float() for n, t in lora.items() if n.startswith(stem + ".")}
        if kind == "lora":
            up, down = f["lora_up.weight"], f["lora_down.weight"]
            d = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        elif kind == "conv":
            d = torch.nn.functional.conv2d(
                f["lora_down.weight"].permute(1, 0, 2, 3), f["lora_up.weight"]
            ).permute(1, 0, 2, 3)
        elif kind == "tucker":
            d = torch.einsum(
                "ijkl,oi,jm->omkl",
                f["lora_mid.weight"],
                f["lora_up.weight"].flatten(1),
                f["lora_down.weight"].flatten(1),
            )
        elif kind == "loha":
            d = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        elif kind == "lokr":
            d = torch.kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"])
        elif kind in ("diff", "diff_b"):
            d = f[kind]
        else:  # dora
            up, down, m = f["lora_up.weight"], f["lora_down.weight"], f["dora_scale"]
            vv = w + (strength * 4.0 / 4) * (up @ down)
            out[key] = (m.reshape(-1) / torch.linalg.norm(vv, dim=1)).view(-1, 1) * vv
            continue
        out[key] = w + s * d
    return out


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_bake_every_kind_bit_for_bit(tmp_path: Path, strength: float) -> None:
    base = _base()
    lora, want = _lora()
    bp, lp = tmp_path / "base.safetensors", tmp_path / "lora.safetensors"
    save_file(base, str(bp))
    save_file(lora, str(lp))
    out = tmp_path / "out.safetensors"
    res = bake(bp, [f"{lp}:{strength}"], out, dtype="fp32")
    got = load_file(out)
    expect = _oracle(base, lora, want, strength)
    for key, t in expect.items():
        assert torch.equal(got[key], t), key
    rep = res.loras[0]
    assert rep.matched == 9 and rep.dora == 1
    assert rep.unmatched == {"lora_unet_no_such_module": "no base key has this module"}
    assert rep.kinds == {"lora": 7, "loha": 1, "lokr": 1, "full": 1}
    assert set(res.patched) == set(want)


def test_two_loras_in_order_and_fp16_output(tmp_path: Path) -> None:
    base = {k: v for k, v in _base().items() if "to_q" in k or "position_ids" in k}
    q = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    stem = k("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    l1 = {stem + ".lora_down.weight": r(4, 16), stem + ".lora_up.weight": r(16, 4)}
    l2 = {
        "unet." + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight": r(2, 16),
        "unet." + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_B.weight": r(16, 2),
    }
    paths = []
    for i, sd in enumerate([base, l1, l2]):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file(
            {kk: v.half() if v.is_floating_point() else v for kk, v in sd.items()}, str(paths[-1])
        )
    out = tmp_path / "o.safetensors"
    bake(paths[0], [(paths[1], 0.5), (paths[2], -1.0)], out)
    w = base[q + ".weight"].half().float()
    a = l1[stem + ".lora_up.weight"].half().float() @ l1[stem + ".lora_down.weight"].half().float()
    b2 = [v.half().float() for v in l2.values()]
    w = w + 0.5 * a
    w = w + -1.0 * (b2[1] @ b2[0])
    got = load_file(out)
    assert got[q + ".weight"].dtype == torch.float16
    assert torch.equal(got[q + ".weight"], w.half())


def test_names_every_trainer_spelling() -> None:
    assert module_id("lora_unet_down_blocks_0_attentions_0_proj_in") == (
        "unet", "down_blocks_0_attentions_0_proj_in"
    )  # fmt: skip
    assert module_id("lora_te_text_model_encoder_layers_0_mlp_fc1") == (
        "te1", "text_model_encoder_layers_0_mlp_fc1"
    )  # fmt: skip
    assert module_id("transformer.single_transformer_blocks.0.attn.to_q") == (
        "unet", "single_transformer_blocks_0_attn_to_q"
    )  # fmt: skip
    assert module_id("text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj")[0] == "te2"
    old = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    assert module_id(old) == (
        "unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    )  # fmt: skip
    parsed = parse_lora(["a.lora_A.weight", "a.lora_B.weight", "a.alpha", "stray", "b.alpha"])
    assert list(parsed.modules) == ["a"] and parsed.unknown == ["b.alpha", "stray"]
    assert parse_lora_arg("x.safetensors:0.5") == (Path("x.safetensors"), 0.5)
    assert parse_lora_arg("C:x.safetensors") == (Path("C:x.safetensors"), 1.0)


def test_cli_strict_dry_run_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _base()
    lora, _ = _lora()
    bp, lp = tmp_path / "base.safetensors", tmp_path / "lora.safetensors"
    save_file(base, str(bp))
    save_file(lora, str(lp))
    out = tmp_path / "out.safetensors"
    assert main(["lora", "bake", str(bp), str(lp), str(out), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "1 LoRA module(s) match no base key" in err and not out.exists()
    assert main(["lora", "bake", str(bp), f"{lp}:0.5", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "9 of 10 modules matched" in text and "lora_unet_no_such_module" in text
    assert not out.exists()
    assert main(["lora", "bake", str(bp), str(lp), str(out), "--json", "--verify"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "sdtool.lora-bake/1" and doc["verified"]
    assert json.loads(_meta(out)["sdtool_lora_bake"])["loras"][0]["strength"] == 1.0


def _meta(p: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        return f.metadata()


def test_equals_diffusers_fuse_lora(tmp_path: Path) -> None:
    """A PEFT LoRA on a tiny diffusers UNet: sdtool's bake of the saved file equals the
    UNet's weights after fuse_lora, bit for bit (Linear, 1x1 and 3x3 conv targets)."""
    pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    base_sd = {kk: v.clone().contiguous() for kk, v in unet.state_dict().items()}
    cfg = LoraConfig(
        r=4, lora_alpha=6, init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv_shortcut"],
    )  # fmt: skip
    unet.add_adapter(cfg)
    lora_sd = {"unet." + kk: v.contiguous() for kk, v in get_peft_model_state_dict(unet).items()}
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 6})}
    bp, lp = tmp_path / "unet.safetensors", tmp_path / "lora.safetensors"
    save_file(base_sd, str(bp))
    save_file(lora_sd, str(lp), metadata=meta)
    unet.fuse_lora(lora_scale=1.0)
    fused = {
        kk.replace(".base_layer", ""): v for kk, v in unet.state_dict().items() if "lora_" not in kk
    }
    out = tmp_path / "out.safetensors"
    res = bake(bp, [lp], out)
    assert not res.loras[0].unmatched and res.loras[0].matched == len(lora_sd) // 2
    got = load_file(out)
    assert set(got) == set(base_sd)
    for kk, v in fused.items():
        assert torch.equal(got[kk], v), kk
    assert sum(not torch.equal(got[kk], base_sd[kk]) for kk in got) == res.loras[0].matched


def _tiny_transformer(family: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if family == "sd3":
        return SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
            num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
            pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8,
        )  # fmt: skip
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=6,
        axes_dims_rope=(2, 2, 4),
    )  # fmt: skip


#: the modules diffusers' own SD3 / Flux LoRA trainers target (train_dreambooth_lora_*.py)
TRANSFORMER_TARGETS = {
    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
            "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj"],
    "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
             "to_add_out", "ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out", "norm.linear"],
}  # fmt: skip


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_mmdit_and_flux_equal_diffusers_fuse_lora(tmp_path: Path, family: str) -> None:
    """A PEFT LoRA on a tiny diffusers SD3 (MMDiT) / Flux transformer, saved the way
    diffusers' trainers save it (``transformer.`` prefix, PEFT's lora_A / lora_B): sdtool's
    bake of the bare transformer file equals the weights after ``fuse_lora``, bit for bit."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = _tiny_transformer(family)
    base_sd = {kk: v.clone().contiguous() for kk, v in model.state_dict().items()}
    cfg = LoraConfig(
        r=2, lora_alpha=3, init_lora_weights=False, target_modules=TRANSFORMER_TARGETS[family]
    )
    model.add_adapter(cfg)
    lora_sd = {
        "transformer." + kk: v.contiguous() for kk, v in get_peft_model_state_dict(model).items()
    }
    meta = {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 3})}
    bp, lp = tmp_path / f"{family}.safetensors", tmp_path / "lora.safetensors"
    save_file(base_sd, str(bp))
    save_file(lora_sd, str(lp), metadata=meta)
    model.fuse_lora(lora_scale=1.0)
    fused = {
        kk.replace(".base_layer", ""): v
        for kk, v in model.state_dict().items()
        if "lora_" not in kk
    }
    out = tmp_path / "out.safetensors"
    res = bake(bp, [lp], out)
    assert not res.loras[0].unmatched and res.loras[0].matched == len(lora_sd) // 2
    got = load_file(out)
    assert set(got) == set(base_sd)
    for kk, v in fused.items():
        assert torch.equal(got[kk], v), kk
    assert sum(not torch.equal(got[kk], base_sd[kk]) for kk in got) == res.loras[0].matched
