"""convert --lora-format on Flux and SD3 LoRAs: kohya's fused modules (``img_attn.qkv``,
``linear1``, SAI ``attn.qkv``) <-> diffusers' split ones (``to_q/to_k/to_v``, ``proj_mlp``).

Oracle: diffusers' ``load_lora_weights`` + ``fuse_lora`` on tiny Flux / SD3 pipelines (built
from diffusers classes with small widths). The rule the fused weights are checked against is
PEFT's merge, ``W + (B @ A) * (alpha / r)`` per split module, bit for bit; against the original
fused LoRA (``W + rows of (up @ down) * alpha / rank``) to float32 rounding (the row slice is
exact; the products differ only in how the rank sum is accumulated / where the scale goes).
diffusers' own kohya-Flux converter assumes the full 3072 width for ``linear1`` (dims
3072x3 + 12288), so the original kohya file is loaded through diffusers only for the double
blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtool.cli.main import main
from sdtool.errors import UsageError
from sdtool.ops.layout import to_diffusers
from sdtool.ops.lora_format import convert_lora_format

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.test_layout_convert import tiny_mmdit  # noqa: E402

H = {"flux": 128, "sd3": 64}  # the tiny transformers' widths


def _pipe_folder(tmp: Path, family: str) -> Path:
    tiny_mmdit(tmp / "m.safetensors", family)
    to_diffusers(tmp / "m.safetensors", tmp / "pipe")
    return tmp / "pipe"


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pipe_folder(tmp_path_factory.mktemp("flux"), "flux")


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pipe_folder(tmp_path_factory.mktemp("sd3"), "sd3")


def _load(folder: Path, family: str):
    tokens = {"tokenizer": None, "tokenizer_2": None}
    if family == "sd3":
        tokens["tokenizer_3"] = None
    return diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, **tokens)


def _fused(folder: Path, family: str, lora: Path | None) -> dict[str, torch.Tensor]:
    pipe = _load(folder, family)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.fuse_lora()
    sd = pipe.transformer.state_dict()
    return {k.replace(".base_layer.", "."): v.clone() for k, v in sd.items() if "lora_" not in k}


def _lora(path: Path, modules: dict[str, tuple[tuple, tuple, float | None]], **blocks) -> dict:
    """A kohya LoRA: stem -> (down shape, up shape, alpha); ``blocks`` = stem -> parts for
    block-diagonal up factors (kohya's split_qkv)."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for stem, (down, up, alpha) in modules.items():
        sd[stem + ".lora_down.weight"] = torch.randn(down, generator=g)
        u = torch.randn(up, generator=g)
        n = blocks.get(stem)
        if n:  # zero everything off the diagonal blocks
            rows, r = up[0] // sum(n), down[0] // len(n)
            mask = torch.zeros(up)
            at = 0
            for j, k in enumerate(n):
                mask[at : at + rows * k, j * r : (j + 1) * r] = 1
                at += rows * k
            u[mask == 0] = 0.0  # +0.0: kohya's zeros
        sd[stem + ".lora_up.weight"] = u
        if alpha is not None:
            sd[stem + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return sd


def _peft_rule(base: dict, lora: Path, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """W + (B @ A) * (lora_alpha / r) for every module of a diffusers-format LoRA file."""
    sd = load_file(lora)
    with safe_open(lora, "pt") as f:
        cfg = json.loads(f.metadata()["lora_adapter_metadata"])
    out = {}
    for k, a in sd.items():
        if not k.endswith(".lora_A.weight") or not k.startswith(prefix):
            continue
        path = k[len(prefix) : -len(".lora_A.weight")]
        b = sd[k.replace("lora_A", "lora_B")]
        comp = prefix.rstrip(".")
        scale = cfg[f"{comp}.alpha_pattern"][path] / cfg[f"{comp}.rank_pattern"][path]
        out[path + ".weight"] = base[path + ".weight"] + (b @ a) * scale
    return out


FLUX_KOHYA = {  # stem: (down, up, alpha); h = 128, mlp 512, linear1 rows 3h + 4h
    "lora_unet_double_blocks_0_img_attn_qkv": ((4, 128), (384, 4), 2.5),
    "lora_unet_double_blocks_1_txt_attn_qkv": ((6, 128), (384, 6), 6.0),  # split_qkv
    "lora_unet_double_blocks_0_img_mlp_0": ((4, 128), (512, 4), 4.0),
    "lora_unet_double_blocks_1_img_mod_lin": ((4, 128), (768, 4), None),
    "lora_unet_single_blocks_0_linear1": ((4, 128), (896, 4), 3.0),
    "lora_unet_single_blocks_1_linear1": ((8, 128), (896, 8), 8.0),  # split_qkv 1:1:1:4
    "lora_unet_single_blocks_1_linear2": ((4, 640), (128, 4), 4.0),
    "lora_unet_final_layer_adaLN_modulation_1": ((4, 128), (256, 4), 4.0),  # halves swapped
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ((2, 32), (32, 2), 2.0),
}
FLUX_BLOCKS = {
    "lora_unet_double_blocks_1_txt_attn_qkv": (1, 1, 1),
    "lora_unet_single_blocks_1_linear1": (1, 1, 1, 4),
}


@pytest.mark.slow
def test_flux_kohya_to_diffusers_fuses_the_same(tmp_path: Path, flux_folder: Path):
    src = tmp_path / "k.safetensors"
    kohya = _lora(src, FLUX_KOHYA, **FLUX_BLOCKS)
    dif = tmp_path / "d.safetensors"
    r = convert_lora_format(src, dif, to="diffusers", verify=True)
    assert r.family == "flux" and r.modules == 9
    assert sorted(r.split) == sorted([k for k in FLUX_KOHYA if "qkv" in k or "linear1" in k])
    got = load_file(dif)
    p = "transformer.transformer_blocks.0.attn."
    # a general fused module: every part keeps down and alpha, up's rows are sliced
    for i, q in enumerate(("to_q", "to_k", "to_v")):
        assert torch.equal(
            got[p + q + ".lora_A.weight"],
            kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"],
        )
        assert torch.equal(
            got[p + q + ".lora_B.weight"],
            kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"][128 * i : 128 * i + 128],
        )
    # split_qkv: each part takes its rank chunk, alpha scaled with the rank (scale kept)
    assert got["transformer.transformer_blocks.1.attn.add_k_proj.lora_A.weight"].shape == (2, 128)
    assert got["transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight"].shape == (512, 2)
    with safe_open(dif, "pt") as f:
        cfg = json.loads(f.metadata()["lora_adapter_metadata"])
    alphas = cfg["transformer.alpha_pattern"]
    assert alphas["transformer_blocks.1.attn.add_k_proj"] == 2
    assert alphas["transformer_blocks.0.attn.to_q"] == 2.5
    assert alphas["transformer_blocks.1.norm1.linear"] == 4  # no alpha: rank
    assert "text_encoder.encoder.layers.0.self_attn.q_proj" not in alphas
    assert cfg["text_encoder.alpha_pattern"]["encoder.layers.0.self_attn.q_proj"] == 2
    # halves swapped: diffusers' norm_out.linear is (scale, shift), BFL's (shift, scale)
    up = kohya["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(
        got["transformer.norm_out.linear.lora_B.weight"], torch.cat([up[128:], up[:128]])
    )

    base = _fused(flux_folder, "flux", None)
    ours = _fused(flux_folder, "flux", dif)
    rule = _peft_rule(base, dif)
    assert len(rule) == 18
    for k, w in rule.items():  # diffusers' fuse is PEFT's merge, bit for bit
        assert torch.equal(ours[k], w), k
    assert all(torch.equal(ours[k], v) for k, v in base.items() if k not in rule)
    # against the original fused factors: rows of (up @ down) * alpha / rank
    single = {
        "double_blocks.0.img_attn.qkv": ("transformer_blocks.0.attn.", ("to_q", "to_k", "to_v")),
        "single_blocks.1.linear1": (
            "single_transformer_blocks.1.",
            ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
        ),
    }
    for fused, (pre, names) in single.items():
        stem = "lora_unet_" + fused.replace(".", "_")
        d, u = kohya[stem + ".lora_down.weight"], kohya[stem + ".lora_up.weight"]
        delta = (u @ d) * (kohya[stem + ".alpha"].item() / d.shape[0])
        at = 0
        for n in names:
            w = base[pre + n + ".weight"]
            torch.testing.assert_close(
                ours[pre + n + ".weight"], w + delta[at : at + w.shape[0]], rtol=1e-6, atol=1e-6
            )
            at += w.shape[0]
    # diffusers' own kohya-Flux conversion of the original (double blocks only, see above)
    doubles = tmp_path / "kd.safetensors"
    save_file({k: v for k, v in kohya.items() if "double_blocks" in k}, str(doubles))
    theirs = _fused(flux_folder, "flux", doubles)
    for k, w in theirs.items():
        if k.startswith("transformer_blocks."):
            torch.testing.assert_close(ours[k], w, rtol=1e-6, atol=1e-6)
    # and back: the fused modules are the input's own tensors again, bit for bit
    back = tmp_path / "k2.safetensors"
    convert_lora_format(dif, back, to="kohya")
    again = load_file(back)
    kohya.setdefault("lora_unet_double_blocks_1_img_mod_lin.alpha", torch.tensor(4.0))
    assert sorted(again) == sorted(kohya)
    assert all(torch.equal(again[k], v) for k, v in kohya.items())


def _peft_file(path: Path, modules: dict[str, tuple[int, int, int]], alpha: float) -> dict:
    """A diffusers-format Flux LoRA: path -> (rank, in, out); lora_alpha in the metadata."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for p, (r, i, o) in modules.items():
        sd[f"transformer.{p}.lora_A.weight"] = torch.randn(r, i, generator=g)
        sd[f"transformer.{p}.lora_B.weight"] = torch.randn(o, r, generator=g)
    cfg = {
        "transformer.r": 2,
        "transformer.lora_alpha": alpha,
        "transformer.target_modules": sorted(modules),
    }
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(cfg)})
    return sd


FLUX_SPLIT = {
    "transformer_blocks.0.attn.to_q": (2, 128, 128),
    "transformer_blocks.0.attn.to_k": (2, 128, 128),
    "transformer_blocks.0.attn.to_v": (2, 128, 128),
    "transformer_blocks.1.attn.add_q_proj": (2, 128, 128),  # add_k_proj not adapted
    "transformer_blocks.1.attn.add_v_proj": (2, 128, 128),
    "single_transformer_blocks.0.attn.to_q": (2, 128, 128),
    "single_transformer_blocks.0.attn.to_k": (2, 128, 128),
    "single_transformer_blocks.0.attn.to_v": (2, 128, 128),
    "single_transformer_blocks.0.proj_mlp": (2, 128, 512),
    "single_transformer_blocks.0.proj_out": (2, 640, 128),
}


@pytest.mark.slow
def test_flux_split_to_kohya_block_diagonal(tmp_path: Path, flux_folder: Path):
    src = tmp_path / "d.safetensors"
    peft = _peft_file(src, FLUX_SPLIT, alpha=4)  # scale 2
    k = tmp_path / "k.safetensors"
    r = convert_lora_format(src, k, to="kohya")
    assert r.rank_grown == {
        "double_blocks.0.img_attn.qkv": (2, 6),
        "double_blocks.1.txt_attn.qkv": (2, 4),
        "single_blocks.0.linear1": (2, 8),
    }
    kohya = load_file(k)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert kohya[qkv + ".lora_down.weight"].shape == (6, 128)
    assert kohya[qkv + ".lora_up.weight"].shape == (384, 6)
    assert kohya[qkv + ".alpha"].item() == 12.0  # scale 2 kept at rank 6
    assert kohya["lora_unet_double_blocks_1_txt_attn_qkv.alpha"].item() == 8.0
    assert kohya["lora_unet_single_blocks_0_linear2.alpha"].item() == 4.0
    up = kohya["lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight"]
    assert not up[128:256].any()  # add_k_proj: zero rows
    # diffusers loads the kohya file (double blocks: its converter's split widths are Flux's
    # real ones for linear1) and fuses what it fuses from the diffusers file
    doubles = tmp_path / "kd.safetensors"
    save_file({n: v for n, v in kohya.items() if "double_blocks" in n}, str(doubles))
    a = _fused(flux_folder, "flux", src)
    b = _fused(flux_folder, "flux", doubles)
    for n, w in b.items():
        if n.startswith("transformer_blocks."):
            torch.testing.assert_close(w, a[n], rtol=1e-6, atol=1e-6)
    # back to diffusers: block-diagonal ups give each part its own rank chunk again
    back = tmp_path / "d2.safetensors"
    convert_lora_format(k, back, to="diffusers")
    again = load_file(back)
    assert sorted(again) == sorted(peft)
    assert all(torch.equal(again[n], v) for n, v in peft.items())


def test_flux_names_te_and_refusals(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.randn(2, 8),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.randn(8, 2),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 8, generator=g),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(24, 2, generator=g),
    }
    src = tmp_path / "k.safetensors"
    save_file(sd, str(src))
    d = tmp_path / "d.safetensors"
    r = convert_lora_format(src, d, to="diffusers", dry_run=True)
    assert ("lora_te3_encoder_block_0_layer_0_SelfAttention_q",
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q") in r.mapping  # fmt: skip
    c = tmp_path / "c.safetensors"
    assert main(["convert", str(src), str(c), "--lora-format", "comfy"]) == 0
    names = set(load_file(c))
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in names
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.alpha" in names
    # ai-toolkit: diffusers names, no alpha, so alpha must equal the rank
    a = tmp_path / "a.safetensors"
    convert_lora_format(src, a, to="ai-toolkit")
    assert "transformer.transformer_blocks.0.attn.to_k.lora_B.weight" in load_file(a)
    sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = torch.tensor(1.0)
    save_file(sd, str(src))
    with pytest.raises(UsageError, match="ai-toolkit files carry no alpha"):
        convert_lora_format(src, tmp_path / "a2.safetensors", to="ai-toolkit")
    # parts with different scales cannot share one alpha
    peft = tmp_path / "p.safetensors"
    _peft_file(peft, {k: v for k, v in FLUX_SPLIT.items() if ".0.attn.to_" in k}, alpha=2)
    with safe_open(peft, "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["lora_adapter_metadata"])
    cfg["transformer.alpha_pattern"] = {"transformer_blocks.0.attn.to_k": 3}
    save_file(load_file(peft), str(peft), metadata={"lora_adapter_metadata": json.dumps(cfg)})
    with pytest.raises(UsageError, match="different alpha/rank scales"):
        convert_lora_format(peft, tmp_path / "k4.safetensors", to="kohya")
    assert main(["convert", str(peft), str(tmp_path / "k3.safetensors"),
                 "--lora-format", "kohya"]) == 2  # fmt: skip


SD3_KOHYA = {  # h = 64; the tiny SD3 has 24 joint blocks, block 23 is context-pre-only
    "lora_unet_joint_blocks_0_x_block_attn_qkv": ((4, 64), (192, 4), 2.0),
    "lora_unet_joint_blocks_0_context_block_attn_qkv": ((3, 64), (192, 3), 1.5),
    "lora_unet_joint_blocks_0_x_block_mlp_fc1": ((4, 64), (256, 4), 4.0),
    "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1": ((2, 64), (128, 2), 2.0),
    "lora_unet_joint_blocks_23_x_block_attn_proj": ((2, 64), (64, 2), 1.0),
    "lora_unet_final_layer_adaLN_modulation_1": ((2, 64), (128, 2), 2.0),
}


@pytest.mark.slow
def test_sd3_kohya_to_diffusers_fuses_the_same(tmp_path: Path, sd3_folder: Path):
    src = tmp_path / "k.safetensors"
    kohya = _lora(src, SD3_KOHYA)
    dif = tmp_path / "d.safetensors"
    r = convert_lora_format(src, dif, to="diffusers")
    assert r.family == "sd3"
    got = load_file(dif)
    assert "transformer.transformer_blocks.0.attn.add_v_proj.lora_B.weight" in got
    up = kohya["lora_unet_joint_blocks_23_context_block_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(
        got["transformer.transformer_blocks.23.norm1_context.linear.lora_B.weight"],
        torch.cat([up[64:], up[:64]]),
    )
    base = _fused(sd3_folder, "sd3", None)
    ours = _fused(sd3_folder, "sd3", dif)
    rule = _peft_rule(base, dif)
    assert len(rule) == 10
    for k, w in rule.items():
        assert torch.equal(ours[k], w), k
    assert all(torch.equal(ours[k], v) for k, v in base.items() if k not in rule)
    stem = "lora_unet_joint_blocks_0_context_block_attn_qkv"
    d, u = kohya[stem + ".lora_down.weight"], kohya[stem + ".lora_up.weight"]
    delta = (u @ d) * 0.5
    for i, n in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        k = f"transformer_blocks.0.attn.{n}.weight"
        torch.testing.assert_close(
            ours[k], base[k] + delta[64 * i : 64 * i + 64], rtol=1e-6, atol=1e-6
        )
    back = tmp_path / "k2.safetensors"
    convert_lora_format(dif, back, to="kohya")
    again = load_file(back)
    assert sorted(again) == sorted(kohya)
    assert all(torch.equal(again[k], v) for k, v in kohya.items())
