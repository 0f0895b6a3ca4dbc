"""sdtool lora extract / resize: full-rank extract baked back reproduces TUNED; ranks follow
kohya's rules; resize keeps each module's scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtool.cli.main import main
from sdtool.errors import SdtoolError
from sdtool.ops.lora.bake import bake
from sdtool.ops.lora.extract import choose_rank, extract, factor, resize

U = "model.diffusion_model."
TE = "conditioner.embedders.0.transformer.text_model."
G = torch.Generator().manual_seed(3)


def r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def _pair(tmp: Path) -> tuple[Path, Path, dict, dict]:
    base = {
        U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": r(24, 16),
        U + "input_blocks.4.1.proj_in.weight": r(16, 16, 1, 1),
        U + "input_blocks.1.0.in_layers.2.weight": r(8, 6, 3, 3),
        U + "middle_block.1.proj_out.weight": r(16, 16),
        U + "middle_block.1.norm.weight": r(16),
        TE + "encoder.layers.0.self_attn.q_proj.weight": r(12, 12),
        TE + "embeddings.token_embedding.weight": r(30, 12),
        TE + "embeddings.position_ids": torch.arange(77)[None],
    }
    tuned = {k: (v + 0.1 * torch.randn(v.shape, generator=G) if v.is_floating_point() else v)
             for k, v in base.items()}  # fmt: skip
    tuned[U + "middle_block.1.proj_out.weight"] = base[U + "middle_block.1.proj_out.weight"]
    bp, tp = tmp / "base.safetensors", tmp / "tuned.safetensors"
    save_file(base, str(bp))
    save_file(tuned, str(tp))
    return tp, bp, tuned, base


def test_full_rank_extract_baked_back_is_tuned(tmp_path: Path) -> None:
    tp, bp, tuned, _base = _pair(tmp_path)
    out = tmp_path / "lora.safetensors"
    res = extract(tp, bp, out, rank=64, conv_rank=64, dtype="fp32")
    names = {m.name: m.rank for m in res.modules}
    assert names == {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": 16,
        "lora_unet_input_blocks_4_1_proj_in": 16,
        "lora_unet_input_blocks_1_0_in_layers_2": 8,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": 12,  # one TE: lora_te_
    }
    assert res.zero == ["lora_unet_middle_block_1_proj_out"]
    assert sorted(res.not_targets) == [
        TE + "embeddings.token_embedding.weight (an embedding, not a Linear/Conv)",
        U + "middle_block.1.norm.weight",
    ]
    lora = load_file(out)
    assert lora["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"].shape == (8, 8, 1, 1)
    assert lora["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (8, 6, 3, 3)
    assert float(lora["lora_unet_input_blocks_4_1_proj_in.alpha"]) == 16.0
    baked = tmp_path / "baked.safetensors"
    bake(bp, [out], baked)
    got = load_file(baked)
    for k in res.modules:
        torch.testing.assert_close(got[k.source], tuned[k.source], rtol=0, atol=2e-6)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "64"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "64", "conv_alpha": "64.0"}


def test_low_rank_extract_is_the_best_approximation(tmp_path: Path) -> None:
    tp, bp, tuned, base = _pair(tmp_path)
    out = tmp_path / "lora.safetensors"
    extract(tp, bp, out, rank=4, dtype="fp32")
    lora = load_file(out)
    key = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    d = (tuned[key] - base[key]).double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    mine = lora[stem + ".lora_up.weight"].double() @ lora[stem + ".lora_down.weight"].double()
    torch.testing.assert_close(mine, best, rtol=0, atol=1e-5)


def test_choose_rank_is_kohyas() -> None:
    s = np.array([10, 5, 2, 1, 0.5, 0.1], np.float32)

    def kohya(method: str, p: float, cap: int) -> int:  # networks/resize_lora.py, restated
        t = torch.from_numpy(s)
        if method == "sv_ratio":
            i = int(torch.sum(t > t[0] / p))
        elif method == "sv_cumulative":
            i = int(torch.searchsorted(torch.cumsum(t, 0) / t.sum(), p)) + 1
        else:
            i = int(torch.searchsorted(torch.cumsum(t**2, 0) / (t**2).sum(), p**2)) + 1
        return min(max(1, min(i, len(s) - 1)) + 1, cap)

    for method, p in [("sv_ratio", 3.0), ("sv_ratio", 50.0), ("sv_cumulative", 0.8),
                      ("sv_fro", 0.9), ("sv_fro", 0.999), ("sv_cumulative", 0.1)]:  # fmt: skip
        for cap in (2, 4, 16):
            assert choose_rank(s, cap, method, p) == kohya(method, p, cap), (method, p, cap)
    assert choose_rank(np.zeros(4, np.float32), 8, "sv_fro", 0.9) == 1
    assert choose_rank(s, 32, None, None) == 6


def test_clamp_quantile() -> None:
    m = torch.randn(20, 10, generator=G).numpy()
    up, down, _k, _ = factor(m, rank=3, method=None, param=None, clamp_quantile=0.9)
    u0, d0, _, _ = factor(m, rank=3, method=None, param=None, clamp_quantile=1.0)
    hi = np.quantile(np.concatenate([u0.ravel(), d0.ravel()]), 0.9)
    assert np.array_equal(up, np.clip(u0, -hi, hi)) and np.array_equal(down, np.clip(d0, -hi, hi))


def test_resize_keeps_scale(tmp_path: Path) -> None:
    stem = "lora_unet_input_blocks_4_1_proj_in"
    sd = {
        stem + ".lora_down.weight": r(8, 16),
        stem + ".lora_up.weight": r(24, 8),
        stem + ".alpha": torch.tensor(4.0),
        "lora_unet_x_conv.lora_down.weight": r(8, 6, 3, 3),
        "lora_unet_x_conv.lora_up.weight": r(8, 8, 1, 1),
        "lora_unet_x_conv.alpha": torch.tensor(8.0),
        "lora_unet_h.hada_w1_a": r(4, 2),
        "lora_unet_h.hada_w1_b": r(2, 4),
        "lora_unet_h.hada_w2_a": r(4, 2),
        "lora_unet_h.hada_w2_b": r(2, 4),
    }
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src), metadata={"ss_network_dim": "8", "ss_network_alpha": "4.0"})
    out = tmp_path / "out.safetensors"
    res = resize(src, out, rank=8, dtype="fp32")  # full rank: the same deltas
    assert res.skipped == {"lora_unet_h": "a loha module: copied unchanged"}
    got = load_file(out)
    for s_, a in ((stem, 4.0), ("lora_unet_x_conv", 8.0)):
        up, down = sd[s_ + ".lora_up.weight"], sd[s_ + ".lora_down.weight"]
        want = a / 8 * (up.flatten(1) @ down.flatten(1))
        k = got[s_ + ".lora_down.weight"].shape[0]
        have = (
            float(got[s_ + ".alpha"])
            / k
            * (got[s_ + ".lora_up.weight"].flatten(1) @ got[s_ + ".lora_down.weight"].flatten(1))
        )
        torch.testing.assert_close(have, want, rtol=0, atol=5e-5)
    assert torch.equal(got["lora_unet_h.hada_w1_a"], sd["lora_unet_h.hada_w1_a"])
    small = tmp_path / "small.safetensors"
    res = resize(src, small, rank=2)
    got = load_file(small)
    assert got[stem + ".lora_down.weight"].shape == (2, 16)
    assert float(got[stem + ".alpha"]) == 4.0 / 8 * 2


def test_cli_extract_and_resize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tp, bp, _, _ = _pair(tmp_path)
    out = tmp_path / "lora.safetensors"
    assert main(["lora", "extract", str(tp), str(bp), str(out), "--rank", "4", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "3 modules (3 x rank 4)" in text and "zero difference [1]" in text
    assert not out.exists()
    assert main(["lora", "extract", str(tp), str(bp), str(out), "--json", "--verify"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "sdtool.lora-extract/1" and doc["verified"]
    up = load_file(out)["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"]
    assert up.dtype == torch.float16
    small = tmp_path / "small.safetensors"
    assert main(["lora", "resize", str(out), str(small), "--rank", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schema"] == "sdtool.lora-resize/1"
    assert main(["lora", "resize", str(out), str(small), "--sv-fro", "2"]) == 2
    assert "--sv-fro 2.0 must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SdtoolError, match=r"^rank=0 must be at least 1"):
        extract(tp, bp, tmp_path / "r0.safetensors", rank=0)
    assert main(["lora", "extract", str(tp), str(bp), str(tmp_path / "r0.sft"), "--rank", "0"]) == 2
    assert "--rank 0 must be at least 1" in capsys.readouterr().err


def test_fixed_rank_factors_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At a fixed rank the plan needs no SVD (a dry run does none); writing factors each module
    once, when the writer reaches it, and a tiny difference (largest singular value under
    MIN_SV: choose_rank's 1) is padded to the planned rank with zeros."""
    from sdtool.ops.lora import extract as ex

    tp, bp, tuned, base = _pair(tmp_path)
    calls: list[tuple[int, ...]] = []
    real = ex.factor

    def counting(m: np.ndarray, **kw: object) -> tuple:
        calls.append(m.shape)
        return real(m, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ex, "factor", counting)
    res = extract(tp, bp, tmp_path / "dry.safetensors", rank=4, dry_run=True)
    assert calls == [] and [m.rank for m in res.modules] == [4, 4, 4]
    assert all(m.fro_kept is None for m in res.modules)
    key = TE + "encoder.layers.0.self_attn.q_proj.weight"
    tuned[key] = base[key] + 1e-8 * torch.randn(base[key].shape, generator=G)
    save_file(tuned, str(tp), metadata=None)
    out = tmp_path / "lora.safetensors"
    res = extract(tp, bp, out, rank=4, dtype="fp32")
    assert len(calls) == 3 and all(m.fro_kept is not None for m in res.modules)
    got = load_file(out)
    stem = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    up, down = got[stem + ".lora_up.weight"], got[stem + ".lora_down.weight"]
    assert up.shape == (12, 4) and down.shape == (4, 12)
    assert not up[:, 1:].any() and not down[1:].any()


def test_resize_fixed_rank_streams_tucker_and_zero_modules(tmp_path: Path) -> None:
    """At a fixed rank the SVD runs when the writer reaches a module: a Tucker LoCon
    (lora_mid) resized at full rank keeps its delta; a zero module keeps the fixed rank
    (zero factors); a dynamic rank factors first and gives the same Tucker delta."""
    tk, z = "lora_unet_t_conv", "lora_unet_zero_proj"
    sd = {
        tk + ".lora_down.weight": r(4, 6, 1, 1),
        tk + ".lora_mid.weight": r(4, 4, 3, 3),
        tk + ".lora_up.weight": r(5, 4, 1, 1),
        tk + ".alpha": torch.tensor(2.0),
        z + ".lora_down.weight": torch.zeros(4, 7),
        z + ".lora_up.weight": r(3, 4),
        z + ".alpha": torch.tensor(4.0),
    }
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src))
    mid = sd[tk + ".lora_mid.weight"]
    up, down = sd[tk + ".lora_up.weight"].flatten(1), sd[tk + ".lora_down.weight"].flatten(1)
    want = 2.0 / 4 * torch.einsum("ijkl,oi,jm->omkl", mid, up, down).flatten(1)
    for i, kw in enumerate([{"rank": 64}, {"rank": 64, "sv_ratio": 1e9}]):
        out = tmp_path / f"out{i}.safetensors"
        res = resize(src, out, dtype="fp32", **kw)  # type: ignore[arg-type]
        got = load_file(out)
        k = got[tk + ".lora_down.weight"].shape[0]
        have = (
            float(got[tk + ".alpha"])
            / k
            * (got[tk + ".lora_up.weight"].flatten(1) @ got[tk + ".lora_down.weight"].flatten(1))
        )
        torch.testing.assert_close(have, want, rtol=0, atol=5e-5)
        ranks = {m.name: m.rank for m in res.modules}
        assert ranks[tk] == min(5, 54) if i == 0 else ranks[tk] <= 5
        assert all(m.fro_kept is not None for m in res.modules)
        zu, zd = got[z + ".lora_up.weight"], got[z + ".lora_down.weight"]
        assert zu.shape[1] == (3 if i == 0 else 1) and not (zu @ zd).any()


def test_verbs_take_a_modelfile_and_one_options_object(tmp_path: Path) -> None:
    """extract, resize and bake take ``path | ModelFile`` and one options object (sharing
    the write options) or its fields as keywords: the same bytes either way (issue 11.4)."""
    from sdtool.formats.open import open_model
    from sdtool.ops.lora.bake import BakeOptions
    from sdtool.ops.lora.extract import LoraExtractOptions, LoraResizeOptions

    tp, bp, _tuned, _base = _pair(tmp_path)
    by_kw, by_opts = tmp_path / "kw.safetensors", tmp_path / "opts.safetensors"
    a = extract(tp, bp, by_kw, rank=4, dtype="fp32")
    with open_model(tp) as tm, open_model(bp) as bm:
        b = extract(tm, bm, by_opts, LoraExtractOptions(rank=4, dtype="fp32"))
        for m in (tm, bm):  # a ModelFile given is left open: still readable
            assert m.read(next(iter(m.tensors))).size > 0
    assert by_kw.read_bytes() == by_opts.read_bytes()
    assert (a.dtype, b.dtype, b.inputs) == ("fp32", "fp32", [tp, bp])

    small_kw, small_opts = tmp_path / "r-kw.safetensors", tmp_path / "r-opts.safetensors"
    resize(by_kw, small_kw, rank=2)
    with open_model(by_kw) as lm:
        resize(lm, small_opts, LoraResizeOptions(rank=2))
    assert small_kw.read_bytes() == small_opts.read_bytes()

    baked_kw, baked_opts = tmp_path / "b-kw.safetensors", tmp_path / "b-opts.safetensors"
    bake(bp, [(small_kw, 0.5)], baked_kw, dtype="fp16")
    with open_model(bp) as bm, open_model(small_kw) as lm:
        res = bake(bm, [(lm, 0.5)], baked_opts, BakeOptions(dtype="fp16"))
    assert baked_kw.read_bytes() == baked_opts.read_bytes()
    assert res.dtype == "fp16" and res.base == bp
    with pytest.raises(SdtoolError, match="unknown option"):
        extract(tp, bp, tmp_path / "x.safetensors", ranks=4)
