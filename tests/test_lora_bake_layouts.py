"""lora bake onto full SD1 / SDXL checkpoints (real key sets, tiny shapes): LoRAs that name
modules the diffusers way reach the ldm / OpenCLIP keys through sdtool.layouts, split q/k/v
LoRAs patch their rows of a fused in_proj_weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sdlayouts as L
from safetensors.numpy import load_file, save_file

from sdtool.ops.lora.bake import bake

U = "model.diffusion_model."
RNG = np.random.default_rng(5)


def pair(rank: int, out: int, inp: int, *, conv: tuple[int, int] | None = None) -> tuple:
    down = RNG.standard_normal((rank, inp, *(conv or ()))).astype(np.float32)
    up = RNG.standard_normal((out, rank, *((1, 1) if conv else ()))).astype(np.float32)
    return up, down


def delta(up: np.ndarray, down: np.ndarray) -> np.ndarray:
    import torch

    u, d = torch.from_numpy(up), torch.from_numpy(down)
    if d.ndim == 4:
        return torch.nn.functional.conv2d(d.permute(1, 0, 2, 3), u).permute(1, 0, 2, 3).numpy()
    return (u @ d).numpy()


def test_sd1_kohya_diffusers_names_onto_ldm(tmp_path: Path) -> None:
    base = L.write_tiny(tmp_path / "sd1.safetensors", L.sd1())
    # SD1 kohya LoRAs use diffusers module paths (library/original_unet.py)
    mods = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
            U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", pair(2, 3, 3)
        ),
        "lora_unet_down_blocks_0_resnets_0_conv1": (
            U + "input_blocks.1.0.in_layers.2.weight", pair(2, 3, 3, conv=(3, 3))
        ),
        "lora_unet_up_blocks_3_attentions_2_proj_out": (
            U + "output_blocks.11.1.proj_out.weight", pair(1, 3, 3)
        ),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            pair(2, 3, 3),
        ),
    }  # fmt: skip
    lora = {}
    for stem, (_, (up, down)) in mods.items():
        lora |= {stem + ".lora_up.weight": up, stem + ".lora_down.weight": down}
        lora[stem + ".alpha"] = np.array(1.0, np.float32)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    out = tmp_path / "out.safetensors"
    r = bake(tmp_path / "sd1.safetensors", [tmp_path / "lora.safetensors"], out)
    assert r.loras[0].matched == 4 and not r.loras[0].unmatched
    got = load_file(out)
    for _stem, (key, (up, down)) in mods.items():
        w = base[key].astype(np.float32)
        want = w + np.float32(1.0 / up.shape[1]) * delta(up, down).reshape(w.shape)
        assert np.array_equal(got[key], want.astype(base[key].dtype)), key
    changed = [k for k in got if not np.array_equal(got[k], base[k])]
    assert sorted(changed) == sorted(k for k, _ in mods.values())


def test_sdxl_native_diffusers_and_split_te2(tmp_path: Path) -> None:
    base = L.write_tiny(tmp_path / "sdxl.safetensors", L.sdxl())
    inproj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    mods = {
        # SDXL kohya: ldm names
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (
            U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", None, pair(2, 3, 3)
        ),
        # diffusers / PEFT names
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k": (
            U + "input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight", None, pair(2, 3, 3)
        ),
        # HF CLIP-G k_proj: rows 1:2 of OpenCLIP's fused in_proj_weight (tiny: 3 rows)
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (inproj, (1, 2), pair(2, 1, 3)),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj": (
            inproj, (2, 3), pair(1, 1, 3)
        ),
    }  # fmt: skip
    lora = {}
    for stem, (_, _, (up, down)) in mods.items():
        if stem.startswith("lora_"):
            lora |= {stem + ".lora_up.weight": up, stem + ".lora_down.weight": down}
        else:
            lora |= {stem + ".lora_B.weight": up, stem + ".lora_A.weight": down}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    out = tmp_path / "out.safetensors"
    r = bake(tmp_path / "sdxl.safetensors", [(tmp_path / "lora.safetensors", 0.5)], out)
    assert r.loras[0].matched == 4 and not r.loras[0].unmatched
    got = load_file(out)
    want = {k: v.astype(np.float32) for k, v in base.items() if v.dtype.kind == "f"}
    for key, rows, (up, down) in mods.values():
        region = want[key] if rows is None else want[key][rows[0] : rows[1]]
        region += np.float32(0.5) * delta(up, down).reshape(region.shape)
    for key, v in want.items():
        assert np.array_equal(got[key], v.astype(base[key].dtype)), key


@pytest.fixture(autouse=True)
def _layouts() -> None:
    L.need_layouts()


def test_extract_names_and_round_trip(tmp_path: Path) -> None:
    """Extract from full SD1 / SDXL checkpoints: kohya names per family, and baking the
    full-rank LoRA back reproduces TUNED on every extracted key."""
    from sdtool.ops.lora.extract import extract

    for fam, entries, names in (
        ("sd1", L.sd1(), {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
                U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
                "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        }),
        ("sdxl", L.sdxl(), {
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
                U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
            "lora_te2_text_model_encoder_layers_0_self_attn_k_proj":
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "lora_te1_text_model_encoder_layers_0_mlp_fc1":
                "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        }),
    ):  # fmt: skip
        base = L.write_tiny(tmp_path / f"{fam}.safetensors", entries)
        tuned = dict(base)
        for key in set(names.values()):
            tuned[key] = base[key] + RNG.standard_normal(base[key].shape).astype(base[key].dtype)
        save_file(tuned, str(tmp_path / f"{fam}-tuned.safetensors"))
        out = tmp_path / f"{fam}-lora.safetensors"
        res = extract(
            tmp_path / f"{fam}-tuned.safetensors", tmp_path / f"{fam}.safetensors", out,
            rank=8, dtype="fp32",
        )  # fmt: skip
        got = {m.name: m.source for m in res.modules}
        for name, key in names.items():
            assert got[name] == key, (fam, name)
        baked = tmp_path / f"{fam}-baked.safetensors"
        bake(tmp_path / f"{fam}.safetensors", [out], baked, dtype="fp32")
        b = load_file(baked)
        for key in set(names.values()):
            np.testing.assert_allclose(b[key], tuned[key].astype(np.float32), rtol=0, atol=1e-5)


def test_flux_split_lora_patches_fused_rows(tmp_path: Path) -> None:
    """diffusers / ai-toolkit Flux LoRAs name split q/k/v and proj_mlp modules: each patches
    its rows of the BFL checkpoint's fused qkv / linear1; norm_out's halves are swapped back."""
    from sdtool import layouts

    if "flux" not in layouts.COMPONENTS:
        pytest.skip("sdtool.layouts has no Flux tables in this build")
    entries = L.flux()
    base = L.tiny_arrays(entries)
    qkv = U + "double_blocks.0.img_attn.qkv.weight"
    lin1 = U + "single_blocks.0.linear1.weight"
    ada = U + "final_layer.adaLN_modulation.1.weight"
    for key, shape in ((qkv, (6, 3)), (lin1, (14, 3)), (ada, (4, 3))):
        base[key] = RNG.standard_normal(shape).astype(base[key].dtype)
    save_file(base, str(tmp_path / "flux.safetensors"))
    mods = {
        "transformer.transformer_blocks.0.attn.to_k": (qkv, (2, 4), pair(1, 2, 3)),
        "transformer.single_transformer_blocks.0.proj_mlp": (lin1, (6, 14), pair(2, 8, 3)),
        "transformer.norm_out.linear": (ada, None, pair(1, 4, 3)),
        "lora_unet_double_blocks_0_img_attn_qkv": (qkv, None, pair(2, 6, 3)),
    }
    lora = {}
    for stem, (_, _, (up, down)) in mods.items():
        if stem.startswith("lora_"):
            lora |= {stem + ".lora_up.weight": up, stem + ".lora_down.weight": down}
        else:
            lora |= {stem + ".lora_B.weight": up, stem + ".lora_A.weight": down}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    out = tmp_path / "out.safetensors"
    r = bake(tmp_path / "flux.safetensors", [tmp_path / "lora.safetensors"], out, dtype="fp32")
    assert r.loras[0].matched == 4, r.loras[0].unmatched
    want = {k: v.astype(np.float32) for k, v in base.items() if v.dtype.kind == "f"}
    for stem, (key, rows, (up, down)) in sorted(mods.items()):  # bake's order: by name
        d = delta(up, down)
        if stem == "transformer.norm_out.linear":  # diffusers (scale, shift) -> BFL (shift, scale)
            d = np.concatenate([d[2:], d[:2]])
        region = want[key] if rows is None else want[key][rows[0] : rows[1]]
        region += d
    got = load_file(out)
    for key in (qkv, lin1, ada):
        assert np.array_equal(got[key], want[key]), key


def _bake_and_check(tmp_path: Path, base: dict, mods: dict, name: str) -> None:
    """Write ``base`` and a LoRA of ``mods`` (stem -> (base key, rows, (up, down))), bake it at
    fp32, and compare every patched tensor with base + up @ down (scale 1: no alpha)."""
    save_file(base, str(tmp_path / f"{name}.safetensors"))
    lora = {}
    for stem, (_, _, (up, down)) in mods.items():
        if stem.startswith("lora_"):
            lora |= {stem + ".lora_up.weight": up, stem + ".lora_down.weight": down}
        else:
            lora |= {stem + ".lora_B.weight": up, stem + ".lora_A.weight": down}
    save_file(lora, str(tmp_path / f"{name}-lora.safetensors"))
    out = tmp_path / f"{name}-out.safetensors"
    r = bake(tmp_path / f"{name}.safetensors", [tmp_path / f"{name}-lora.safetensors"], out,
             dtype="fp32")  # fmt: skip
    assert r.loras[0].matched == len(mods), r.loras[0].unmatched
    want = {k: v.astype(np.float32) for k, v in base.items() if v.dtype.kind == "f"}
    for _stem, (key, rows, (up, down)) in sorted(mods.items()):  # bake's order: by name
        region = want[key] if rows is None else want[key][rows[0] : rows[1]]
        region += delta(up, down)
    got = load_file(out)
    for key, _, _ in mods.values():
        assert np.array_equal(got[key], want[key]), key
    untouched = set(base) - {key for key, _, _ in mods.values()}
    assert all(np.array_equal(got[k], base[k].astype(got[k].dtype)) for k in untouched)


TE_L = "text_encoders.clip_l.transformer.text_model.encoder.layers."
TE_G = "text_encoders.clip_g.transformer.text_model.encoder.layers."
T5 = "text_encoders.t5xxl.transformer.encoder.block."


def test_sd3_text_encoder_loras_every_naming(tmp_path: Path) -> None:
    """SD3 (MMDiT, SAI single file with CLIP-L, CLIP-G and T5-XXL): kohya's lora_te1_/te2_/
    te3_ (sd-scripts' lora_sd3: te3 is T5, HF T5 module paths) and diffusers/PEFT's
    text_encoder / text_encoder_2 / text_encoder_3 reach their encoders' weights; kohya's
    lora_unet_ names the MMDiT by SAI paths."""
    base = L.tiny_arrays(L.sd3())
    qkv = U + "joint_blocks.0.x_block.attn.qkv.weight"
    base[qkv] = RNG.standard_normal((9, 3)).astype(base[qkv].dtype)
    mods = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv": (qkv, None, pair(2, 9, 3)),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
            TE_L + "0.self_attn.q_proj.weight", None, pair(2, 3, 3)),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": (
            TE_G + "0.mlp.fc1.weight", None, pair(2, 3, 3)),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (
            T5 + "0.layer.0.SelfAttention.q.weight", None, pair(1, 3, 3)),
        "lora_te3_encoder_block_0_layer_1_DenseReluDense_wo": (
            T5 + "0.layer.1.DenseReluDense.wo.weight", None, pair(2, 3, 3)),
        "text_encoder.text_model.encoder.layers.1.self_attn.k_proj": (
            TE_L + "1.self_attn.k_proj.weight", None, pair(2, 3, 3)),
        "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj": (
            TE_G + "1.self_attn.out_proj.weight", None, pair(1, 3, 3)),
        "text_encoder_3.encoder.block.1.layer.0.SelfAttention.v": (
            T5 + "1.layer.0.SelfAttention.v.weight", None, pair(2, 3, 3)),
    }  # fmt: skip
    _bake_and_check(tmp_path, base, mods, "sd3")


def test_flux_text_encoder_loras(tmp_path: Path) -> None:
    """Flux with CLIP-L and T5-XXL in the file: kohya's lora_te1_ (CLIP-L) and lora_te3_ (T5,
    sd-scripts' lora_flux), diffusers' text_encoder (CLIP-L), and a BFL-named kohya
    transformer module in the same LoRA."""
    base = L.tiny_arrays(L.flux())
    lin2 = U + "single_blocks.0.linear2.weight"
    mods = {
        "lora_unet_single_blocks_0_linear2": (lin2, None, pair(2, 3, 3)),
        "lora_te1_text_model_encoder_layers_0_mlp_fc2": (
            TE_L + "0.mlp.fc2.weight", None, pair(2, 3, 3)),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_o": (
            T5 + "0.layer.0.SelfAttention.o.weight", None, pair(1, 3, 3)),
        "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0": (
            T5 + "1.layer.1.DenseReluDense.wi_0.weight", None, pair(2, 3, 3)),
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj": (
            TE_L + "1.self_attn.v_proj.weight", None, pair(2, 3, 3)),
    }  # fmt: skip
    _bake_and_check(tmp_path, base, mods, "flux")
