"""Scaled fp8: writing in the three spellings and reading them back, each against a torch
computation bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtool.cli.main import main

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*s: int) -> torch.Tensor:
        return (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16)

    return {
        "model.diffusion_model.double_blocks.0.img_attn.proj.weight": r(64, 64),
        "model.diffusion_model.double_blocks.0.img_attn.proj.bias": r(64),
        "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": r(16),
        "model.diffusion_model.double_blocks.0.img_mlp.0.weight": r(256, 64) * 40,
        "model.diffusion_model.double_blocks.0.zero.weight": torch.zeros(
            8, 8, dtype=torch.bfloat16
        ),
        "model.diffusion_model.img_in.weight": r(64, 16),
        "model.diffusion_model.final_layer.linear.weight": r(16, 64),
        "model.diffusion_model.double_blocks.0.conv.weight": r(8, 8, 3, 3),
        "vae.decoder.mid.attn.q.weight": r(8, 8),
    }


def _torch_scaled(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: scale = max|W| / 448 in float32 (1 for an all-zero W), q = W / scale."""
    amax = w.float().abs().max()
    scale = torch.where(amax == 0, torch.tensor(1.0), amax / 448.0).float()
    return (w.float() / scale).to(torch.float8_e4m3fn), scale


SCALED = {
    "model.diffusion_model.double_blocks.0.img_attn.proj.weight",
    "model.diffusion_model.double_blocks.0.img_mlp.0.weight",
    "model.diffusion_model.double_blocks.0.zero.weight",
}


@pytest.mark.parametrize(
    ("fmt", "scale_key"),
    [("comfy", "scale_weight"), ("comfy-mixed", "weight_scale"), ("diffusers", "weight_scale")],
)
def test_write_and_read_scaled_fp8(tmp_path: Path, fmt: str, scale_key: str) -> None:
    sd = _sd()
    src = tmp_path / "m.safetensors"
    save_file(sd, src)
    out = tmp_path / "fp8.safetensors"
    argv = ["convert", str(src), str(out), "--dtype", "fp8_e4m3fn", "--fp8-scaled"]
    assert main([*argv, "--fp8-format", fmt, "--verify"]) == 0
    got = load_file(out)
    for name, w in sd.items():
        if name in SCALED:
            q, scale = _torch_scaled(w)
            assert got[name].dtype == torch.float8_e4m3fn
            assert torch.equal(got[name].view(torch.uint8), q.view(torch.uint8)), name
            s = got[name[: -len("weight")] + scale_key]
            assert s.dtype == torch.float32 and s.shape == () and torch.equal(s, scale), name
        else:  # norms, biases, embeddings, first/last layers, convs, the VAE: as they were
            assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], w), name
    marker = got.get("model.diffusion_model.scaled_fp8")
    if fmt == "comfy":
        assert marker is not None and marker.dtype == torch.float8_e4m3fn and marker.numel() == 0
    else:
        assert marker is None
    if fmt == "comfy-mixed":
        cq = got["model.diffusion_model.double_blocks.0.img_mlp.0.comfy_quant"]
        assert json.loads(bytes(cq.numpy().tobytes())) == {"format": "float8_e4m3fn"}
    # reading: the scales are applied, scales and markers are not written
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(out), str(back), "--dtype", "bf16", "--verify"]) == 0
    rb = load_file(back)
    assert set(rb) == set(sd)
    for name in SCALED:
        q, scale = _torch_scaled(sd[name])
        want = (q.float() * scale).to(torch.bfloat16)
        assert torch.equal(rb[name].view(torch.int16), want.view(torch.int16)), name


def test_scaled_fp8_needs_the_fp8_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m.safetensors"
    save_file(_sd(), src)
    out = tmp_path / "o.safetensors"
    assert main(["convert", str(src), str(out), "--dtype", "fp16", "--fp8-scaled"]) == 2
    assert '--fp8-scaled needs --dtype "fp8_e4m3fn"' in capsys.readouterr().err
    assert not out.exists()


def test_gguf_export_applies_the_scale(tmp_path: Path) -> None:
    """A scaled-fp8 Flux exported to GGUF carries the real weights, not the raw fp8 codes."""
    gguf = pytest.importorskip("gguf")
    sd = _sd()
    src = tmp_path / "m.safetensors"
    save_file(sd, src)
    fp8 = tmp_path / "fp8.safetensors"
    assert main(["convert", str(src), str(fp8), "--dtype", "fp8_e4m3fn", "--fp8-scaled"]) == 0
    out = tmp_path / "m.gguf"
    assert main(["convert", str(fp8), str(out), "--quant", "F16"]) == 0
    r = gguf.GGUFReader(str(out))
    names = {t.name: t for t in r.tensors}
    assert "scaled_fp8" not in names and not any(n.endswith("scale_weight") for n in names)
    name = "double_blocks.0.img_mlp.0.weight"
    q, scale = _torch_scaled(sd["model.diffusion_model." + name])
    want = (q.float() * scale).half()
    got = torch.from_numpy(names[name].data.copy())
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


XL = "model.diffusion_model."


@pytest.mark.parametrize(
    ("sd", "scaled"),
    [
        (  # SDXL (ComfyUI keys): the never-quantize list and transformer projections stay
            {
                XL + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (64, 64),
                XL + "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (64, 256),
                XL + "input_blocks.1.1.proj_in.weight": (64, 64),
                XL + "input_blocks.1.1.norm.weight": (64,),
                XL + "time_embed.0.weight": (256, 64),
                XL + "label_emb.0.0.weight": (256, 128),
                XL + "input_blocks.0.0.weight": (64, 4, 3, 3),
                XL + "input_blocks.3.0.op.weight": (64, 64, 3, 3),
                XL + "input_blocks.6.0.op.weight": (64, 64, 3, 3),
                XL + "output_blocks.2.2.conv.weight": (64, 64, 3, 3),
                XL + "output_blocks.5.2.conv.weight": (64, 64, 3, 3),
            },
            {"transformer_blocks.0.attn1.to_q.", "transformer_blocks.0.ff.net.2."},
        ),
        (  # Wan: modulation, patch/text/time embeddings and the head stay
            {
                "blocks.0.self_attn.norm_q.weight": (64,),
                "blocks.0.self_attn.q.weight": (64, 64),
                "blocks.0.ffn.2.weight": (64, 128),
                "blocks.0.modulation": (1, 6, 64),
                "text_embedding.2.weight": (64, 64),
                "time_projection.1.weight": (384, 64),
                "head.modulation": (1, 2, 64),
                "head.head.weight": (16, 64),
                "patch_embedding.weight": (64, 16, 1, 2, 2),
            },
            {"blocks.0.self_attn.q.", "blocks.0.ffn.2."},
        ),
    ],
    ids=["sdxl", "wan"],
)
def test_scaled_fp8_keeps_each_familys_layers(
    tmp_path: Path, sd: dict[str, tuple[int, ...]], scaled: set[str]
) -> None:
    """Only the family's Linear weights become fp8; the rest keeps its dtype and values."""
    g = torch.Generator().manual_seed(1)
    tensors = {k: (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16) for k, s in sd.items()}
    src = tmp_path / "m.safetensors"
    save_file(tensors, src)
    out = tmp_path / "fp8.safetensors"
    assert main(["convert", str(src), str(out), "--dtype", "fp8_e4m3fn", "--fp8-scaled"]) == 0
    got = load_file(out)
    fp8 = {k for k, v in got.items() if v.dtype == torch.float8_e4m3fn and v.numel()}
    assert {next(s for s in scaled if s in k) for k in fp8} == scaled and len(fp8) == len(scaled)
    for k, v in tensors.items():
        if k not in fp8:
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v), k
