"""convert --lora-format on LoHa / LoKr (LyCORIS) modules: renamed between namings, and split /
fused exactly where the namings disagree (Flux ``qkv``), or refused with the reason.

Oracle: the modules' deltas computed with torch (LoHa ``(w1_a @ w1_b) * (w2_a @ w2_b)``, LoKr
``kron(w1, w2)``, times alpha / rank; shared/reference/CONVERSIONS.md section 4), compared per
diffusers module against the rows of the fused module's delta.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtool.errors import UsageError
from sdtool.ops.lora_format import convert_lora_format

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def loha(stem: str, out: int, inp: int, rank: int, alpha: float | None, g) -> dict:
    sd = {
        f"{stem}.hada_w1_a": torch.randn(out, rank, generator=g),
        f"{stem}.hada_w1_b": torch.randn(rank, inp, generator=g),
        f"{stem}.hada_w2_a": torch.randn(out, rank, generator=g),
        f"{stem}.hada_w2_b": torch.randn(rank, inp, generator=g),
    }
    if alpha is not None:
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    return sd


def loha_delta(sd: dict, stem: str) -> torch.Tensor:
    w1 = sd[f"{stem}.hada_w1_a"] @ sd[f"{stem}.hada_w1_b"]
    w2 = sd[f"{stem}.hada_w2_a"] @ sd[f"{stem}.hada_w2_b"]
    r = sd[f"{stem}.hada_w1_b"].shape[0]
    a = sd[f"{stem}.alpha"].item() if f"{stem}.alpha" in sd else r
    return w1 * w2 * (a / r)


def lokr_delta(sd: dict, stem: str) -> torch.Tensor:
    w1 = sd.get(f"{stem}.lokr_w1")
    if w1 is None:
        w1 = sd[f"{stem}.lokr_w1_a"] @ sd[f"{stem}.lokr_w1_b"]
    w2 = sd.get(f"{stem}.lokr_w2")
    scale = 1.0
    if w2 is None:
        w2 = sd[f"{stem}.lokr_w2_a"] @ sd[f"{stem}.lokr_w2_b"]
        scale = sd[f"{stem}.alpha"].item() / sd[f"{stem}.lokr_w2_b"].shape[0]
    return torch.kron(w1, w2) * scale


def _round_trip(tmp_path: Path, sd: dict, to: str) -> dict:
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src))
    mid = tmp_path / f"{to}.safetensors"
    convert_lora_format(src, mid, to=to, verify=True)
    back = tmp_path / "back.safetensors"
    convert_lora_format(mid, back, to="kohya", overwrite=True)
    again = load_file(back)
    assert sorted(again) == sorted(sd)
    assert all(torch.equal(again[k], v) for k, v in sd.items())
    return load_file(mid)


@pytest.mark.parametrize("to", ["diffusers", "comfy", "peft"])
def test_sd1_loha_lokr_renamed(tmp_path: Path, to: str):
    g = _g()
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = loha(stem, 32, 32, 4, 2.0, g)
    k = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"
    sd[k + ".lokr_w1"] = torch.randn(4, 8, generator=g)
    sd[k + ".lokr_w2_a"] = torch.randn(16, 2, generator=g)
    sd[k + ".lokr_w2_b"] = torch.randn(2, 32, generator=g)
    sd[k + ".alpha"] = torch.tensor(1.0)
    mid = _round_trip(tmp_path, sd, to)
    name = {
        "diffusers": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "peft": "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "comfy": "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    }[to]
    assert torch.equal(mid[name + ".hada_w2_b"], sd[stem + ".hada_w2_b"])
    assert mid[name + ".alpha"].item() == 2.0  # LyCORIS kinds keep .alpha in every naming


def test_flux_loha_and_lokr_split_and_join(tmp_path: Path):
    g = _g()
    h = 8
    qkv, lin1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"
    sd = loha(qkv, 3 * h, h, 2, 1.0, g) | loha(lin1, 7 * h, h, 3, None, g)
    k = "lora_unet_double_blocks_0_txt_attn_qkv"
    sd[k + ".lokr_w1"] = torch.randn(3, 2, generator=g)  # kron rows 3 x 8: one w1 row per part
    sd[k + ".lokr_w2_a"] = torch.randn(h, 2, generator=g)
    sd[k + ".lokr_w2_b"] = torch.randn(2, 4, generator=g)
    sd[k + ".alpha"] = torch.tensor(4.0)
    src = tmp_path / "k.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "d.safetensors"
    r = convert_lora_format(src, out, to="diffusers", family="flux")
    assert sorted(r.split) == sorted([qkv, lin1, k])
    d = load_file(out)
    pre = "transformer.transformer_blocks.0.attn."
    parts = {
        qkv: [pre + n for n in ("to_q", "to_k", "to_v")],
        lin1: [
            f"transformer.single_transformer_blocks.0.{n}"
            for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        ],
        k: [pre + n for n in ("add_q_proj", "add_k_proj", "add_v_proj")],
    }
    for stem, names in parts.items():
        whole = (lokr_delta if stem == k else loha_delta)(sd, stem)
        at = 0
        for n in names:
            one = lokr_delta(d, n) if stem == k else loha_delta(d, n)
            torch.testing.assert_close(one, whole[at : at + one.shape[0]], rtol=0, atol=0)
            at += one.shape[0]
        assert at == whole.shape[0]
    back = tmp_path / "k2.safetensors"
    convert_lora_format(out, back, to="kohya")
    again = load_file(back)
    assert sorted(again) == sorted(sd)
    assert all(torch.equal(again[n], v) for n, v in sd.items())


def test_loha_parts_block_diagonal_and_lokr_refusals(tmp_path: Path):
    g = _g()
    h = 8
    sd = {}
    for n in ("to_q", "to_k", "to_v"):  # different factors per part
        sd |= loha(f"transformer.transformer_blocks.0.attn.{n}", h, h, 2, 1.0, g)
    src = tmp_path / "d.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "k.safetensors"
    r = convert_lora_format(src, out, to="kohya", family="flux")
    assert r.rank_grown == {"double_blocks.0.img_attn.qkv": (2, 6)}
    k = load_file(out)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    assert k[stem + ".alpha"].item() == 3.0  # scale 0.5 at rank 6
    fused = loha_delta(k, stem)
    for i, n in enumerate(("to_q", "to_k", "to_v")):
        torch.testing.assert_close(
            fused[h * i : h * i + h], loha_delta(sd, f"transformer.transformer_blocks.0.attn.{n}")
        )
    # LoKr: w1 rows that do not split, and parts that share no w2
    bad = {
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.randn(2, 2, generator=g),
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.randn(12, 4, generator=g),
    }
    save_file(bad, str(src))
    with pytest.raises(UsageError, match="w1 has 2 rows, which do not split"):
        convert_lora_format(src, tmp_path / "x.safetensors", to="diffusers", family="flux")
    parts = {}
    for n in ("to_q", "to_k", "to_v"):
        parts[f"transformer.transformer_blocks.0.attn.{n}.lokr_w1"] = torch.randn(1, 2)
        parts[f"transformer.transformer_blocks.0.attn.{n}.lokr_w2"] = torch.randn(h, 4)
    save_file(parts, str(src))
    with pytest.raises(UsageError, match="do not share w2"):
        convert_lora_format(src, tmp_path / "x.safetensors", to="kohya", family="flux")


def test_dry_run_lists_every_part(tmp_path: Path):
    g = _g()
    sd = {}
    for n in ("to_q", "to_k", "to_v"):
        sd[f"transformer.transformer_blocks.0.attn.{n}.lora_A.weight"] = torch.randn(
            2, 8, generator=g
        )
        sd[f"transformer.transformer_blocks.0.attn.{n}.lora_B.weight"] = torch.randn(
            8, 2, generator=g
        )
    src = tmp_path / "d.safetensors"
    save_file(sd, str(src))
    r = convert_lora_format(
        src, tmp_path / "k.safetensors", to="kohya", family="flux", dry_run=True
    )
    assert r.mapping == [
        (f"transformer.transformer_blocks.0.attn.{n}", "lora_unet_double_blocks_0_img_attn_qkv")
        for n in ("to_q", "to_k", "to_v")
    ]
    assert r.fused == ["double_blocks.0.img_attn.qkv"] and r.written == 1
    assert not (tmp_path / "k.safetensors").exists()
