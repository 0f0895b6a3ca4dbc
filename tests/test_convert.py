"""convert(): round trips equal torch's tensors bit for bit; what goes in and what is carried."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtool.errors import OutputError, UsageError
from sdtool.ops.convert import convert
from sdtool.write.atomic import TEMP_SUFFIX

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert _bits(got[k]) == _bits(w), k


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 6, generator=g)
    return {
        "model.diffusion_model.w": w,
        "model.diffusion_model.b": torch.randn(6, generator=g).to(torch.float16),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "first_stage_model.bf": torch.randn(3, 3, generator=g).to(torch.bfloat16),
        "flag": torch.tensor([True, False]),
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-42, 3.0e38]),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_to_safetensors_to_ckpt(tmp_path: Path, legacy: bool) -> None:
    sd = _sd()
    src = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd, "global_step": 7}, src, _use_new_zipfile_serialization=not legacy)
    r = convert(src, tmp_path / "m.safetensors", verify=True)
    assert r.verified and r.copied == len(sd) and r.cast == 0
    _same(load_file(tmp_path / "m.safetensors"), sd)
    r2 = convert(tmp_path / "m.safetensors", tmp_path / "back.ckpt", verify=True)
    assert r2.output_format == "torch-zip"
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)
    # the metadata travels too (was dropped: issue 10 item 3), under the one key __metadata__
    assert back.pop("__metadata__") == {"format": "pt", "global_step": "7"}
    _same(back, sd)


@pytest.mark.parametrize(
    ("choice", "tdtype"),
    [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32),
     ("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)],
)  # fmt: skip
def test_safetensors_dtype_change_equals_torch(tmp_path: Path, choice: str, tdtype) -> None:  # type: ignore[no-untyped-def]
    sd = _sd()
    save_file(sd, tmp_path / "in.safetensors")
    r = convert(
        tmp_path / "in.safetensors", tmp_path / "o.safetensors", dtype=choice,
        verify=True, on_overflow="warn",
    )  # fmt: skip
    want = {k: (v.to(tdtype) if v.is_floating_point() else v) for k, v in sd.items()}
    _same(load_file(tmp_path / "o.safetensors"), want)
    assert r.tensors == len(sd)
    if choice == "fp16":  # 3e38 and inf: only the finite one counts as overflow
        assert r.overflows == {"special": 1}


def test_overflow_fails_by_default(tmp_path: Path) -> None:
    save_file({"x": torch.tensor([1e6])}, tmp_path / "in.safetensors")
    with pytest.raises(UsageError, match="overflows"):
        convert(tmp_path / "in.safetensors", tmp_path / "o.safetensors", dtype="fp16")
    assert not (tmp_path / "o.safetensors").exists()


def test_tied_sliced_and_strided_tensors(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"emb.weight": base, "head.weight": base, "slice": base[1:3], "t": base.t(),
          "col": base[:, 2]}  # fmt: skip
    torch.save(sd, tmp_path / "tied.pt")
    r = convert(tmp_path / "tied.pt", tmp_path / "tied.safetensors", verify=True)
    assert r.tensors == 5
    _same(load_file(tmp_path / "tied.safetensors"), {k: v.contiguous() for k, v in sd.items()})


def test_metadata_and_fields_carried(tmp_path: Path) -> None:
    sd = {"w": torch.ones(2)}
    opt = {"state": {0: {"exp_avg": torch.zeros(2), "step": 3}}, "param_groups": [{"lr": 0.1}]}
    ckpt = {"state_dict": sd, "global_step": 1000, "epoch": 3, "optimizer_states": [opt],
            "hyper_parameters": {"lr": 1e-4, "name": "x"}}  # fmt: skip
    torch.save(ckpt, tmp_path / "m.ckpt")
    r = convert(tmp_path / "m.ckpt", tmp_path / "m.safetensors", metadata={"note": "hi"})
    with open(tmp_path / "m.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    assert meta["format"] == "pt" and meta["note"] == "hi"
    assert json.loads(meta["global_step"]) == 1000 and json.loads(meta["epoch"]) == 3
    assert json.loads(meta["hyper_parameters"]) == {"lr": 1e-4, "name": "x"}
    assert "optimizer_states" not in meta
    assert any(s.startswith("optimizer_states: 1 tensor") for s in r.not_carried)
    convert(tmp_path / "m.ckpt", tmp_path / "bare.safetensors", carry_metadata=False)
    with open(tmp_path / "bare.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["__metadata__"] == {"format": "pt"}


def test_safetensors_metadata_carried(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "in.safetensors", metadata={"ss_network_dim": "8"})
    r = convert(tmp_path / "in.safetensors", tmp_path / "o.safetensors", verify=True)
    assert r.metadata_keys == ["format", "ss_network_dim"]


def test_textual_inversion_to_emb_params(tmp_path: Path) -> None:
    vec = torch.randn(2, 768)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "neg",
                "step": 1419}, tmp_path / "neg.pt")  # fmt: skip
    r = convert(tmp_path / "neg.pt", tmp_path / "neg.safetensors")
    assert r.renamed == {"string_to_param.*": "emb_params"}
    got = load_file(tmp_path / "neg.safetensors")
    assert list(got) == ["emb_params"] and _bits(got["emb_params"]) == _bits(vec)


def test_hypernetwork_int_keys_become_strings(tmp_path: Path) -> None:
    hn = {768: [{"linear.0.weight": torch.ones(2, 2)}], 320: [{"linear.0.bias": torch.ones(2)}],
          "layer_structure": [1, 2, 1], "name": "hn"}  # fmt: skip
    torch.save(hn, tmp_path / "hn.pt")
    convert(tmp_path / "hn.pt", tmp_path / "hn.safetensors", verify=True)
    assert set(load_file(tmp_path / "hn.safetensors")) == {
        "768.0.linear.0.weight", "320.0.linear.0.bias"}  # fmt: skip


def test_key_picks_a_subdict(tmp_path: Path) -> None:
    torch.save(
        {"state_dict": {"a": torch.ones(1)}, "ema": {"b": torch.zeros(3)}}, tmp_path / "m.pt"
    )
    convert(tmp_path / "m.pt", tmp_path / "o.safetensors", key="ema")
    assert set(load_file(tmp_path / "o.safetensors")) == {"b"}


def test_no_tensors_is_explained(tmp_path: Path) -> None:
    torch.save({"epoch": 1}, tmp_path / "e.pt")
    with pytest.raises(UsageError, match="no state-dict tensors"):
        convert(tmp_path / "e.pt", tmp_path / "o.safetensors")


def test_interrupt_leaves_nothing_and_input_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.save(_sd(), tmp_path / "m.pt")
    before = (tmp_path / "m.pt").read_bytes()
    calls = {"n": 0}

    def stop(done: int, total: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    for dtype in ("keep", "fp16"):
        with pytest.raises(KeyboardInterrupt):
            convert(tmp_path / "m.pt", tmp_path / "o.safetensors", dtype=dtype, progress=stop)
        calls["n"] = 0
        assert not (tmp_path / "o.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    assert (tmp_path / "m.pt").read_bytes() == before


def test_deterministic_output(tmp_path: Path) -> None:
    torch.save(_sd(), tmp_path / "m.pt")
    convert(tmp_path / "m.pt", tmp_path / "a.safetensors", dtype="fp16", on_overflow="warn")
    convert(tmp_path / "m.pt", tmp_path / "b.safetensors", dtype="fp16", on_overflow="warn")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_bad_extension_before_reading(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="extension"):
        convert(tmp_path / "missing.ckpt", tmp_path / "o.onnx")
