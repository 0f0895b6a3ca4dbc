"""``sdtool convert IN OUT.gguf --quant``: ComfyUI-GGUF's layout on tiny per-family files, bytes
equal to gguf-py's quantize, round trips, and the refusals."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from sdtool.cli.main import main
from sdtool.formats import ggml
from sdtool.formats.open import open_model

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

T = gguf.GGMLQuantizationType


def _r(*shape: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g) * 0.05).to(dtype)


def flux_sd(dtype: torch.dtype = torch.bfloat16, prefix: str = "") -> dict[str, torch.Tensor]:
    sd = {
        "double_blocks.0.img_attn.proj.weight": _r(256, 256, dtype=dtype),
        "double_blocks.0.img_attn.proj.bias": _r(256, dtype=dtype),
        "double_blocks.0.img_attn.qkv.weight": _r(768, 256, dtype=dtype),
        "double_blocks.0.img_mlp.0.weight": _r(1024, 256, dtype=dtype),
        "double_blocks.0.img_attn.norm.key_norm.scale": _r(64, dtype=dtype),
        "img_in.weight": _r(256, 64, dtype=dtype),
        "final_layer.linear.weight": _r(64, 256, dtype=dtype),
        "guidance_in.in_layer.weight": _r(256, 256, dtype=dtype),
        "single_blocks.0.linear2.weight": _r(256, 320, dtype=dtype),  # rows of 320: not K-able
        "small.weight": _r(16, 32, dtype=dtype),
    }
    return {prefix + k: v for k, v in sd.items()}


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def _convert(src: Path, out: Path, *args: str) -> None:
    assert main(["convert", str(src), str(out), *args]) == 0


def _reader(path: Path) -> tuple[dict[str, object], dict[str, object]]:
    r = gguf.GGUFReader(str(path))
    return {t.name: t for t in r.tensors}, dict(r.fields)


def _field(fields: dict[str, object], key: str) -> object:
    return fields[key].contents()  # type: ignore[attr-defined]


def test_flux_q8_0_layout_and_bytes(tmp_path: Path) -> None:
    sd = flux_sd(prefix="model.diffusion_model.")
    sd["vae.decoder.conv_in.weight"] = _r(4, 4)
    src = _save(sd, tmp_path / "flux.safetensors")
    out = tmp_path / "flux-Q8_0.gguf"
    _convert(src, out, "--quant", "Q8_0", "--verify")
    tensors, fields = _reader(out)
    assert _field(fields, "general.architecture") == "flux"
    assert _field(fields, "general.file_type") == 7
    assert _field(fields, "general.quantization_version") == 2
    types = {n: t.tensor_type.name for n, t in tensors.items()}  # type: ignore[attr-defined]
    assert types == {
        "double_blocks.0.img_attn.proj.weight": "Q8_0",
        "double_blocks.0.img_attn.proj.bias": "F32",  # 1-D bf16 -> F32
        "double_blocks.0.img_attn.qkv.weight": "Q8_0",
        "double_blocks.0.img_mlp.0.weight": "Q8_0",
        "double_blocks.0.img_attn.norm.key_norm.scale": "F32",
        "img_in.weight": "BF16",  # never quantized for Flux: stays in its base type
        "final_layer.linear.weight": "BF16",
        "guidance_in.in_layer.weight": "BF16",
        "single_blocks.0.linear2.weight": "Q8_0",
        "small.weight": "Q8_0",  # <= 1024 elements: F32 base, but llama-quantize quantizes it
    }
    # every quantized tensor's bytes are gguf-py's quantize of the source values
    for name, t in tensors.items():
        src_v = sd["model.diffusion_model." + name].float().numpy()
        want = gguf.quants.quantize(src_v, t.tensor_type)  # type: ignore[attr-defined]
        got = np.asarray(t.data)  # type: ignore[attr-defined]
        assert np.array_equal(want.view(np.uint8).reshape(-1), got.view(np.uint8).reshape(-1)), name


def test_flux_q4_k_m_mix_and_fallback(tmp_path: Path) -> None:
    src = _save(flux_sd(), tmp_path / "flux.safetensors")
    out = tmp_path / "flux-Q4_K_M.gguf"
    _convert(src, out, "--quant", "Q4_K_M")
    tensors, fields = _reader(out)
    types = {n: t.tensor_type.name for n, t in tensors.items()}  # type: ignore[attr-defined]
    assert _field(fields, "general.file_type") == 15
    assert types["double_blocks.0.img_attn.qkv.weight"] == "Q5_K"  # fused qkv bumped
    assert types["double_blocks.0.img_attn.proj.weight"] == "Q4_K"
    assert types["single_blocks.0.linear2.weight"] == "F16"  # rows of 320: K-quant fallback
    assert types["small.weight"] == "F16"  # rows of 32
    assert types["img_in.weight"] == "BF16"


def test_f16_round_trip_is_bit_exact(tmp_path: Path) -> None:
    sd = flux_sd(torch.float16)
    src = _save(sd, tmp_path / "flux16.safetensors")
    out = tmp_path / "flux16.gguf"
    _convert(src, out, "--quant", "F16")
    back = tmp_path / "back.safetensors"
    _convert(out, back)
    got = load_file(back)
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == torch.float16 and torch.equal(
            got[k].view(torch.int16), v.view(torch.int16)
        ), k


@pytest.mark.parametrize(("quant", "levels"), [("Q8_0", 127), ("Q4_K_M", 15)])
def test_quantized_round_trip_within_bound(tmp_path: Path, quant: str, levels: int) -> None:
    sd = flux_sd(torch.float32)
    src = _save(sd, tmp_path / "flux32.safetensors")
    out = tmp_path / "q.gguf"
    _convert(src, out, "--quant", quant)
    back = tmp_path / "back.safetensors"
    _convert(out, back)
    got = load_file(back)
    for k, v in sd.items():
        x = v.numpy()
        y = got[k].float().numpy()
        assert y.shape == x.shape, k
        span = float(np.abs(x).max()) * (2 if levels != 127 else 1)
        assert np.abs(y - x).max() <= span / levels + 1e-6, k


def test_sdxl_reshape_orig_shape_and_kept_tensors(tmp_path: Path) -> None:
    sd = {
        "model.diffusion_model.input_blocks.0.0.weight": _r(320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": _r(64, 64, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight": _r(
            320, 320
        ),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": _r(
            320, 1280
        ),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": _r(256, 512),
        "model.diffusion_model.time_embed.0.weight": _r(1280, 320),
        "model.diffusion_model.label_emb.0.0.weight": _r(1280, 256),
        "model.diffusion_model.out.2.weight": _r(4, 320, 3, 3),
        "model.diffusion_model.input_blocks.3.0.op.weight": _r(16, 16, 3, 3),
        "model.diffusion_model.input_blocks.6.0.op.weight": _r(32, 32, 3, 3),
        "model.diffusion_model.output_blocks.2.2.conv.weight": _r(8, 8, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": _r(8, 8, 3, 3),
        "model.diffusion_model.input_blocks.1.0.in_layers.0.bias": _r(320),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": _r(768),
    }
    src = _save(sd, tmp_path / "sdxl.safetensors")
    out = tmp_path / "sdxl.gguf"
    _convert(src, out, "--quant", "Q4_K_M", "--verify")
    tensors, fields = _reader(out)
    assert _field(fields, "general.architecture") == "sdxl"
    t = {
        n: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)))
        for n, t in tensors.items()
    }  # type: ignore[attr-defined]
    # [64,64,3,3]: last dim 3, 36864 elements = 144 x 256 -> reshaped, then quantized
    assert t["input_blocks.1.0.in_layers.2.weight"] == ("Q4_K", (144, 256))
    key = "comfy.gguf.orig_shape.input_blocks.1.0.in_layers.2.weight"
    assert fields[key].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]  # type: ignore[attr-defined]
    assert _field(fields, key) == [64, 64, 3, 3]
    assert t["input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight"][0] == "Q6_K"  # v bumped
    assert t["input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"][0] == "Q6_K"  # ffn down
    assert t["input_blocks.1.1.proj_in.weight"] == ("Q4_K", (256, 512))  # last dim % 256 == 0
    assert t["input_blocks.0.0.weight"][0] == "BF16"  # conv in: never quantized
    assert t["out.2.weight"][0] == "BF16"
    assert t["time_embed.0.weight"][0] == "BF16"
    assert t["label_emb.0.0.weight"][0] == "BF16"
    assert t["input_blocks.1.0.in_layers.0.bias"][0] == "F32"
    assert not any(n.startswith("conditioner") for n in t)
    with open_model(out) as m:  # the loader's view: original shapes
        assert m.tensors["input_blocks.1.0.in_layers.2.weight"].shape == (64, 64, 3, 3)


def test_sd3_pos_embed_keeps_its_leading_unit_dim(tmp_path: Path) -> None:
    sd = {
        "joint_blocks.0.x_block.attn.qkv.weight": _r(768, 256),
        "joint_blocks.0.x_block.mlp.fc2.weight": _r(256, 1024),
        "pos_embed": _r(1, 1024, 256),
        "x_embedder.proj.weight": _r(256, 16, 2, 2),
        "context_embedder.weight": _r(256, 4096),
        "final_layer.linear.weight": _r(64, 256),
    }
    src = _save(sd, tmp_path / "sd3.safetensors")
    out = tmp_path / "sd3.gguf"
    _convert(src, out, "--quant", "Q5_K_M")
    tensors, fields = _reader(out)
    assert _field(fields, "general.architecture") == "sd3"
    t = {
        n: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)))
        for n, t in tensors.items()
    }  # type: ignore[attr-defined]
    assert t["pos_embed"] == ("BF16", (1, 1024, 256))
    assert t["joint_blocks.0.x_block.attn.qkv.weight"][0] == "Q6_K"
    assert t["joint_blocks.0.x_block.mlp.fc2.weight"][0] == "Q5_K"
    assert t["context_embedder.weight"][0] == "BF16"
    assert t["final_layer.linear.weight"][0] == "BF16"


def test_wan_5d_and_modulation(tmp_path: Path) -> None:
    sd = {
        "blocks.0.self_attn.norm_q.weight": _r(256),
        "blocks.0.self_attn.q.weight": _r(256, 256),
        "blocks.0.self_attn.v.weight": _r(256, 256),
        "blocks.0.ffn.2.weight": _r(256, 512),
        "blocks.0.modulation": _r(1, 6, 256),
        "text_embedding.2.weight": _r(256, 256),
        "head.modulation": _r(1, 2, 256),
        "head.head.weight": _r(64, 256),
        "patch_embedding.weight": _r(256, 16, 1, 2, 2),
    }
    src = _save(sd, tmp_path / "wan.safetensors")
    out = tmp_path / "wan.gguf"
    _convert(src, out, "--quant", "Q4_K_M")
    tensors, fields = _reader(out)
    assert _field(fields, "general.architecture") == "wan"
    t = {
        n: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)))
        for n, t in tensors.items()
    }  # type: ignore[attr-defined]
    assert t["patch_embedding.weight"] == ("F32", (256, 16, 1, 2, 2))  # 5-D: F32, all dims
    assert t["blocks.0.modulation"] == ("F32", (1, 6, 256))  # hiprec, leading 1 kept
    assert t["blocks.0.self_attn.v.weight"][0] == "Q6_K"
    assert t["blocks.0.ffn.2.weight"][0] == "Q6_K"
    assert t["blocks.0.self_attn.q.weight"][0] == "Q4_K"
    assert t["text_embedding.2.weight"][0] == "BF16" and t["head.head.weight"][0] == "BF16"
    with open_model(out) as m:
        assert np.array_equal(
            m.read("patch_embedding.weight"), sd["patch_embedding.weight"].float().numpy()
        )


# ComfyUI-GGUF loader.py's T5 map (llama.cpp names -> original names), applied in order
T5_SD_MAP = [
    ("enc.", "encoder."), (".blk.", ".block."), ("token_embd", "shared"),
    ("output_norm", "final_layer_norm"), ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"), ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"), ("attn_norm", "layer.0.layer_norm"),
    ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"), ("ffn_down", "layer.1.DenseReluDense.wo"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"), ("ffn_norm", "layer.1.layer_norm"),
]  # fmt: skip


def test_t5_encoder_names_map_back_through_comfyui_gguf(tmp_path: Path) -> None:
    sd = {"shared.weight": _r(512, 256), "encoder.embed_tokens.weight": _r(512, 256)}
    for i in range(2):
        p = f"encoder.block.{i}."
        for w in "qkvo":
            sd[p + f"layer.0.SelfAttention.{w}.weight"] = _r(256, 256, seed=i)
        sd[p + "layer.0.layer_norm.weight"] = _r(256)
        sd[p + "layer.1.DenseReluDense.wi_0.weight"] = _r(512, 256)
        sd[p + "layer.1.DenseReluDense.wi_1.weight"] = _r(512, 256)
        sd[p + "layer.1.DenseReluDense.wo.weight"] = _r(256, 512)
        sd[p + "layer.1.layer_norm.weight"] = _r(256)
    sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = _r(32, 64)
    sd["encoder.final_layer_norm.weight"] = _r(256)
    src = _save(sd, tmp_path / "t5.safetensors")
    out = tmp_path / "t5.gguf"
    _convert(src, out, "--quant", "Q8_0")
    tensors, fields = _reader(out)
    assert _field(fields, "general.architecture") == "t5encoder"
    back = {}
    for name in tensors:
        orig = name
        for a, b in T5_SD_MAP:
            orig = orig.replace(a, b)
        back[orig] = name
    assert set(back) == set(sd) - {"encoder.embed_tokens.weight"}
    types = {n: t.tensor_type.name for n, t in tensors.items()}  # type: ignore[attr-defined]
    assert types["enc.blk.0.attn_rel_b.weight"] == "BF16"
    assert types["enc.blk.1.ffn_down.weight"] == "Q8_0"
    assert types["enc.output_norm.weight"] == "F32"


@pytest.mark.parametrize(
    ("sd", "message"),
    [
        ({"transformer_blocks.0.attn.norm_added_k.weight": _r(4)}, "diffusers-format flux"),
        ({"some.weight": _r(4, 4)}, "ComfyUI-GGUF loads"),
        ({"double_blocks.0.img_attn.proj.weight": _r(4, 4), "x" * 130: _r(4)}, "longer than 127"),
    ],
)
def test_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sd: dict, message: str
) -> None:
    src = _save(sd, tmp_path / "m.safetensors")
    out = tmp_path / "m.gguf"
    assert main(["convert", str(src), str(out), "--quant", "Q8_0"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_bad_quant_and_bad_combinations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _save(flux_sd(), tmp_path / "f.safetensors")
    assert main(["convert", str(src), str(tmp_path / "o.gguf"), "--quant", "Q3_K_S"]) == 2
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--quant", "Q8_0"]) == 2
    assert main(["convert", str(src), str(tmp_path / "o.gguf"), "--dtype", "fp16"]) == 2
    errs = capsys.readouterr().err.splitlines()
    assert len(errs) == 3 and re.search(r"--quant must be one of", errs[0]), errs


def test_default_type_follows_the_main_dtype(tmp_path: Path) -> None:
    src = _save(flux_sd(), tmp_path / "f.safetensors")
    out = tmp_path / "f.gguf"
    _convert(src, out)
    tensors, fields = _reader(out)
    assert _field(fields, "general.file_type") == 32
    assert {t.tensor_type.name for t in tensors.values()} == {"BF16", "F32"}  # type: ignore[attr-defined]


def test_quantizer_handles_every_choice() -> None:
    from sdtool.ops.gguf_export import QUANTS

    x = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    for base, _ in QUANTS.values():
        assert ggml.quantize(x, base).size == ggml.get(base).nbytes(512)


def test_quant_without_out_derives_a_gguf_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``convert IN --quant Q8_0`` writes IN-Q8_0.gguf beside IN (a GGUF input: its stem);
    --quant with an OUT that is not .gguf is one line, exit 2, nothing written."""
    src = _save(flux_sd(), tmp_path / "f.safetensors")
    assert main(["convert", str(src), "--quant", "q8_0", "-q"]) == 0
    out = tmp_path / "f-Q8_0.gguf"
    tensors, _ = _reader(out)
    assert tensors["double_blocks.0.img_attn.proj.weight"].tensor_type.name == "Q8_0"  # type: ignore[attr-defined]
    assert main(["convert", str(out), "--quant", "Q4_0", "-q"]) == 0
    assert (tmp_path / "f-Q8_0-Q4_0.gguf").exists()
    folder = tmp_path / "into"
    folder.mkdir()
    assert main(["convert", str(src), str(folder), "--quant", "BF16", "-q"]) == 0
    assert (folder / "f-BF16.gguf").exists()
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["convert", str(src), str(tmp_path / "o.ckpt"), "--quant", "Q8_0"]) == 2
    err = capsys.readouterr().err
    assert "name the output *.gguf" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_k_quant_of_inf_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sd = flux_sd()
    w = sd["double_blocks.0.img_attn.proj.weight"].clone()
    w.view(-1)[3] = float("inf")
    sd["double_blocks.0.img_attn.proj.weight"] = w
    src = _save(sd, tmp_path / "f.safetensors")
    out = tmp_path / "f.gguf"
    assert main(["convert", str(src), str(out), "--quant", "Q4_K_M"]) == 2
    err = capsys.readouterr().err
    assert "inf or NaN" in err and "img_attn.proj.weight" in err and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]


def test_batch_out_dir_with_quant_writes_gguf_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Batch mode (``--out-dir``) with --quant derives ``<stem>.gguf`` (sub-folders mirrored),
    each a GGUF gguf-py opens; --quant with --to ckpt is one line, exit 2."""
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    _save(flux_sd(), models / "a.safetensors")
    _save(flux_sd(), models / "sub" / "b.safetensors")
    out = tmp_path / "out"
    assert main(["convert", str(models), "--out-dir", str(out), "--quant", "Q8_0", "-q"]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["a.gguf", "sub/b.gguf"]
    for name in written:
        tensors, fields = _reader(out / name)
        assert _field(fields, "general.file_type") == 7
        assert tensors["double_blocks.0.img_attn.proj.weight"].tensor_type.name == "Q8_0"  # type: ignore[attr-defined]
    capsys.readouterr()
    other = tmp_path / "other"
    args = ["convert", str(models), "--out-dir", str(other), "--quant", "Q8_0", "--to", "ckpt"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--quant" in err and err.count("\n") == 1, err
    assert not other.exists()


def test_writer_starts_writeback_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GGUF writer asks the kernel to start writing each finished stretch of the file
    (contiguous ranges from 0, in order); the file is the same as without the hint."""
    from sdtool.write import gguf as writer

    src = _save(flux_sd(), tmp_path / "f.safetensors")
    plain = tmp_path / "plain.gguf"
    monkeypatch.setattr(writer, "_writeback_starter", lambda: None)
    _convert(src, plain, "--quant", "Q8_0", "-q")
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(writer, "_writeback_starter", lambda: lambda fd, o, n: calls.append((o, n)))
    monkeypatch.setattr(writer, "WRITEBACK_BYTES", 4096)
    hinted = tmp_path / "hinted.gguf"
    _convert(src, hinted, "--quant", "Q8_0", "-q")
    assert hinted.read_bytes() == plain.read_bytes()
    assert len(calls) > 3 and calls[0][0] == 0
    assert all(o == po + pn for (po, pn), (o, _) in itertools.pairwise(calls))
    end = calls[-1][0] + calls[-1][1]
    assert hinted.stat().st_size - 4096 < end <= hinted.stat().st_size


def test_direct_write_gives_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large output goes through O_DIRECT (write/direct.py): the file is the one the page-cache
    path writes, byte for byte (chunks, the padded tail truncated back), and no write-back
    hints are sent for it."""
    from sdtool.write import direct
    from sdtool.write import gguf as writer

    src = _save(flux_sd(), tmp_path / "f.safetensors")
    plain = tmp_path / "plain.gguf"
    _convert(src, plain, "--quant", "Q8_0", "-q")
    used: list[bool] = []
    real = writer._direct

    def spy(f: object, nbytes: int) -> object:
        w = real(f, nbytes)  # type: ignore[arg-type]
        used.append(w is not None)
        return w

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(writer, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(direct, "CHUNK", 16 * 4096)
    monkeypatch.setattr(writer, "_direct", spy)
    monkeypatch.setattr(writer, "_writeback_starter", lambda: lambda fd, o, n: calls.append((o, n)))
    monkeypatch.setattr(writer, "WRITEBACK_BYTES", 4096)
    out = tmp_path / "direct.gguf"
    _convert(src, out, "--quant", "Q8_0", "--verify", "-q")  # read back from the disk
    assert used == [True] and calls == []
    assert out.read_bytes() == plain.read_bytes()


def test_direct_write_disk_full_is_one_line_and_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno

    from sdtool.write import direct
    from sdtool.write import gguf as writer

    def full(fd: int, data: memoryview, at: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    src = _save(flux_sd(), tmp_path / "f.safetensors")
    monkeypatch.setattr(writer, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(direct.os, "pwrite", full)
    out = tmp_path / "full.gguf"
    assert main(["convert", str(src), str(out), "--quant", "Q8_0", "-q"]) != 0
    err = capsys.readouterr().err
    assert "disk is full" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


# The families the tests above do not cover: a tiny file of each (its detection keys, a tensor of
# each rule) and the type ComfyUI-GGUF's convert.py + lcpp.patch give every tensor (Q8_0).
# name -> shape, wanted type (None: the tensor is dropped); Q = quantized, B = kept bf16.
Q, B = "Q8_0", "BF16"
FAMILIES: dict[str, dict[str, tuple[tuple[int, ...], str | None]]] = {
    "aura": {
        "double_layers.3.modX.1.weight": ((64, 64), Q),
        "double_layers.0.attn.w1q.weight": ((64, 64), Q),
        "t_embedder.mlp.0.weight": ((64, 64), B),
        "init_x_linear.weight": ((64, 64), B),
        "modF.1.weight": ((64, 64), B),
        "cond_seq_linear.weight": ((64, 64), B),
        "final_linear.weight": ((64, 64), B),
        "positional_encoding": ((1, 64, 64), B),  # leading unit dim kept (gguf_set_tensor_ndim)
        "register_tokens": ((1, 32, 64), B),
    },
    "hidream": {
        "caption_projection.0.linear.weight": ((64, 64), B),
        "double_stream_blocks.0.block.ff_i.shared_experts.w3.weight": ((64, 64), Q),
        "double_stream_blocks.0.block.ff_i.gate.weight": ((64, 64), "F32"),  # hiprec
        "x_embedder.proj.weight": ((64, 64), B),
        "t_embedder.timestep_embedder.linear_1.weight": ((64, 64), B),
        "final_layer.linear.weight": ((64, 64), B),
    },
    "cosmos": {
        "net.blocks.0.mlp.layer1.weight": ((64, 64), Q),
        "net.blocks.0.adaln_modulation_cross_attn.1.weight": ((64, 64), Q),
        "net.blocks.0.self_attn.q_proj._extra_state": ((64,), None),  # keys_ignore
        "net.pos_embedder.dim_spatial_range": ((64, 64), "F32"),  # hiprec
        "net.x_embedder.proj.1.weight": ((64, 64), B),
        "net.t_embedding_norm.weight": ((64, 64), B),
        "net.final_layer.linear.weight": ((64, 64), B),
    },
    "ltxv": {
        "adaln_single.emb.timestep_embedder.linear_2.weight": ((64, 64), B),
        "transformer_blocks.27.scale_shift_table": ((6, 64), "F32"),  # hiprec
        "caption_projection.linear_2.weight": ((64, 64), B),
        "transformer_blocks.0.attn1.to_q.weight": ((64, 64), Q),
        "patchify_proj.weight": ((64, 64), B),
        "proj_out.weight": ((64, 64), B),
    },
    "hyvid": {
        "double_blocks.0.img_attn_proj.weight": ((64, 64), Q),
        "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight": ((64, 64), B),
        "img_in.proj.weight": ((64, 16, 1, 2, 2), "F32"),  # 5-D: fix_5d_tensors.py, F32
        "vector_in.in_layer.weight": ((64, 64), B),
        "final_layer.linear.weight": ((64, 64), B),
    },
    "lumina2": {
        "cap_embedder.1.weight": ((64, 64), B),
        "context_refiner.0.attention.qkv.weight": ((192, 64), B),
        "noise_refiner.0.attention.out.weight": ((64, 64), B),
        "layers.0.attention.qkv.weight": ((192, 64), Q),
        "layers.0.feed_forward.w2.weight": ((64, 64), Q),
        "x_embedder.weight": ((64, 64), B),
    },
    "sd1": {
        **{
            k: ((64, 64, 3, 3), Q)  # reshaped to [144, 256] (2-D), so quantized
            for k in (
                "input_blocks.3.0.op.weight",
                "input_blocks.6.0.op.weight",
                "input_blocks.9.0.op.weight",
                "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight",
                "output_blocks.8.2.conv.weight",
            )
        },
        "input_blocks.1.1.proj_in.weight": ((320, 320), Q),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ((320, 768), Q),
        "time_embed.0.weight": ((1280, 320), B),
        "out.2.weight": ((4, 320, 3, 3), B),
    },
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_family_rules(tmp_path: Path, family: str) -> None:
    """Detection, the never-quantize lists, keys_hiprec (F32), keys_ignore, ``net.`` stripped,
    5-D tensors in F32 and leading unit dims kept, for each family, as Q8_0."""
    spec = FAMILIES[family]
    sd = {k: _r(*shape) for k, (shape, _) in spec.items()}
    src = _save({("model.diffusion_model." + k if family == "sd1" else k): v
                 for k, v in sd.items()}, tmp_path / f"{family}.safetensors")  # fmt: skip
    out = tmp_path / f"{family}.gguf"
    _convert(src, out, "--quant", "Q8_0", "--verify", "-q")
    tensors, fields = _reader(out)
    assert _field(fields, "general.architecture") == family
    strip = "net." if family == "cosmos" else ""
    got = {
        n: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)))  # type: ignore[attr-defined]
        for n, t in tensors.items()
    }
    want = {}
    for k, (shape, typ) in spec.items():
        if typ is not None:
            name = k.removeprefix(strip)
            if family == "sd1" and len(shape) > 1 and shape[-1] % 256 and np.prod(shape) % 256 == 0:
                shape = (int(np.prod(shape)) // 256, 256)  # convert.py's shape fix
            want[name] = (typ, shape)
    assert got == want


def test_short_writes_of_an_unbuffered_file_are_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unbuffered file's write may take fewer bytes than it is given (it says so only in its
    return value): the plain path writes the rest, and the file is the same byte for byte."""
    import os

    from sdtool.formats.open import open_model
    from sdtool.ops.gguf_export import plan_export, write_gguf_plan
    from sdtool.write import gguf as writer

    src = _save(flux_sd(), tmp_path / "f.safetensors")
    monkeypatch.setattr(writer, "DIRECT_MIN_BYTES", 1 << 62)  # the plain path

    def write(out: Path) -> bytes:
        with open(out, "wb", buffering=0) as f:
            write_gguf_plan(plan_export(open_model(src), "Q8_0"), f)
        return out.read_bytes()

    plain = write(tmp_path / "plain.gguf")
    real_write = os.write
    short: list[int] = []

    def stingy(fd: int, data: bytes) -> int:
        n = real_write(fd, memoryview(data)[: max(1, len(data) // 3)])
        short.append(len(data) - n)
        return n

    monkeypatch.setattr(os, "write", stingy)
    assert write(tmp_path / "short.gguf") == plain
    assert any(short)


@pytest.mark.parametrize("quant", ["Q8_0", "F16"])
def test_verify_streams_pieces_and_catches_any_changed_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quant: str
) -> None:
    """``verify_gguf`` compares piece by piece (many pieces per tensor here, several workers)
    and finds one changed byte in the last piece of a tensor, or a shortened output."""
    from sdtool.errors import VerificationError
    from sdtool.formats.open import open_model
    from sdtool.ops.gguf_export import plan_export, verify_gguf, write_gguf_plan
    from sdtool.write import gguf as writer

    monkeypatch.setattr(ggml, "PIECE_ELEMENTS", 64)
    monkeypatch.setattr(writer, "AHEAD", 1)
    src = _save(flux_sd(), tmp_path / "f.safetensors")
    plan = plan_export(open_model(src), quant)
    out = tmp_path / "f.gguf"
    with open(out, "wb") as f:
        write_gguf_plan(plan, f)
    verify_gguf(plan, out)  # a good file passes
    good = out.read_bytes()
    tensors, _ = _reader(out)
    t = max(tensors.values(), key=lambda t: t.n_bytes)  # type: ignore[attr-defined]
    end = t.data_offset + t.n_bytes  # type: ignore[attr-defined]
    assert t.n_bytes > 4 * ggml.get(quant).nbytes(64)  # type: ignore[attr-defined]
    for at in (t.data_offset, end - 1):  # type: ignore[attr-defined]
        bad = bytearray(good)
        bad[at] ^= 0x40
        out.write_bytes(bad)
        with pytest.raises(VerificationError, match=re.escape(repr(t.name))):  # type: ignore[attr-defined]
            verify_gguf(plan, out)
    out.write_bytes(good[: len(good) - 1])
    with pytest.raises(VerificationError):
        verify_gguf(plan, out)
