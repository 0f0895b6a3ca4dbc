"""sdtool merge: every method against torch computing it on whole models, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtool.cli.main import main
from sdtool.errors import SdtoolError
from sdtool.ops import arith
from sdtool.ops import merge as merge_mod
from sdtool.ops.merge import block_of, merge, parse_block_weights

U = "model.diffusion_model."


def _model(seed: int, dtype: torch.dtype = torch.float16, inpaint: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    sd = {
        U + "input_blocks.0.0.weight": r(8, 9 if inpaint else 4, 3, 3),
        U + "input_blocks.0.0.bias": r(8),
        U + "time_embed.0.weight": r(16, 8),
        U + "input_blocks.11.0.in_layers.2.weight": r(8, 8, 3, 3),
        U + "middle_block.1.proj_in.weight": r(8, 8),
        U + "output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight": r(8, 8),
        U + "out.2.weight": r(4, 8, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": r(50, 8),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(
            77
        ).unsqueeze(0),
        "first_stage_model.decoder.conv_out.weight": r(3, 4, 3, 3),
    }
    return sd


def _save(tmp: Path, name: str, sd: dict) -> Path:
    p = tmp / name
    if name.endswith(".ckpt"):
        torch.save({"state_dict": sd}, p)
    else:
        save_file(sd, str(p))
    return p


def _same(got: dict, want: dict) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def _oracle(models: list[dict], fn, dtype: torch.dtype | None = None) -> dict:
    """The whole-model torch way: every float key of A present in all, fn on float32."""
    a = models[0]
    out = {}
    for k, v in a.items():
        if not v.is_floating_point() or any(k not in m for m in models):
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
            continue
        x = [m[k].float() for m in models]
        out[k] = fn(k, x).to(dtype or v.dtype)
    return out


@pytest.mark.parametrize("alpha", [0.3, 0.77])
def test_weighted_sum_bit_for_bit(tmp_path: Path, alpha: float) -> None:
    a, b = _model(1), _model(2, torch.float32)
    pa, pb = _save(tmp_path, "a.safetensors", a), _save(tmp_path, "b.ckpt", b)
    out = tmp_path / "out.safetensors"
    r = merge([pa, pb], out, alpha=alpha)
    want = _oracle([a, b], lambda k, x: (1 - alpha) * x[0] + alpha * x[1])
    _same(load_file(out), want)
    assert r.counts == {"merge": 9, "copy": 1}
    ids = [k for k in r.keys if k.rule == "copy"]
    assert ids[0].name.endswith("position_ids") and "I64" in ids[0].reason
    recipe = json.loads(load_file_meta(out)["sd_merge_recipe"])
    assert recipe["method"] == "weighted-sum" and recipe["alpha"] == alpha


@pytest.mark.parametrize("alpha", [0.3, -2.5, 70000.0])
def test_weighted_sum_fp16_inputs_scaled_weights(tmp_path: Path, alpha: float) -> None:
    """Two fp16 inputs: read scaled by 2**-112 with 2**112 folded into the weights (or, where
    the weight would overflow, as 70000 * 2**112 does, unscaled first): torch's bits."""
    a, b = _model(1), _model(2)
    pa, pb = _save(tmp_path, "a.safetensors", a), _save(tmp_path, "b.safetensors", b)
    out = tmp_path / "out.safetensors"
    merge([pa, pb], out, alpha=alpha, dtype="fp32")
    want = _oracle([a, b], lambda k, x: (1 - alpha) * x[0] + alpha * x[1], torch.float32)
    _same(load_file(out), want)


def _fp16_edges(seed: int) -> dict:
    """fp16 tensors with subnormals, values near fp16's largest, and (from the second model
    on) an inf or a NaN in one piece of 64 elements out of several."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(640, generator=g) * torch.tensor([1e-6, 1e-3, 1.0, 3e4]).repeat(160)
    w = w.to(torch.float16)
    if seed:
        w[70 + seed] = float("inf") if seed == 1 else float("nan")
    return {U + "out.0.bias": w, U + "out.2.weight": torch.randn(4, 8, 3, 3, generator=g).half()}


@pytest.mark.parametrize("alpha", [0.3, -2.5, 70000.0])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_add_difference_fp16_inputs_scaled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alpha: float, dtype: str
) -> None:
    """Three fp16 inputs: B and C read scaled by 2**-112, 2**112 folded into alpha (unscaled
    first where alpha * 2**112 overflows, or in a piece where the other holds an inf/NaN):
    torch's bits, subnormal differences included."""
    monkeypatch.setattr(arith, "PIECE", 64)
    ms = [_fp16_edges(i) for i in range(3)]
    ps = [_save(tmp_path, f"{i}.safetensors", m) for i, m in enumerate(ms)]
    out = tmp_path / "out.safetensors"
    merge(ps, out, method="add-difference", alpha=alpha, dtype=dtype, on_overflow="warn")
    target = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    want = _oracle(ms, lambda k, x: x[0] + alpha * (x[1] - x[2]), target)
    got = load_file(out)
    for k in want:  # bits, NaN payloads included
        bits = torch.int32 if dtype == "fp32" else torch.int16
        assert torch.equal(got[k].view(bits), want[k].view(bits)), k


def test_release_gives_back_written_pieces_behind_the_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Computed pieces leave the page cache ``lag`` bytes behind the writes (not the copied
    tensors, not on a file system that refuses), and the output is what torch computes."""
    import os

    from sdtool.write import stream

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, at, n, advice: calls.append((at, n)))
    r = stream.Release(fd=-1, lag=10)
    for at in (0, 4, 8, 12):
        r.written(at, 4)
    assert calls == [(0, 4), (4, 4)] and r.held == 8

    def refuse(*_: object) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    r = stream.Release(fd=-1, lag=0)
    r.written(0, 4)
    r.written(4, 4)  # no second try once refused
    assert not r.able

    calls.clear()
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, at, n, advice: calls.append((at, n)))
    monkeypatch.setattr(stream, "RELEASE_LAG", 0)
    a, b = _model(1), _model(2)
    pa, pb = _save(tmp_path, "a.safetensors", a), _save(tmp_path, "b.safetensors", b)
    out = tmp_path / "out.safetensors"
    merge([pa, pb], out, alpha=0.3)
    _same(load_file(out), _oracle([a, b], lambda k, x: 0.7 * x[0] + 0.3 * x[1]))
    with open(out, "rb") as f:
        base = 8 + int.from_bytes(f.read(8), "little")
    header = json.loads(out.read_bytes()[8:base])
    spans = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
    kinds = [v["dtype"] for k, v in header.items() if k != "__metadata__"]
    merged = {(base + b, e - b) for (b, e), kind in zip(spans, kinds, strict=True) if kind == "F16"}
    assert set(calls) == merged  # every merged tensor's bytes, not position_ids'


def load_file_meta(p: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        return f.metadata()


def test_add_difference_fp32_output_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arith, "PIECE", 7)  # every tensor in many pieces, on 2 threads
    ms = [_model(1), _model(2, torch.bfloat16), _model(3, torch.float32)]
    ps = [_save(tmp_path, f"{i}.safetensors", m) for i, m in enumerate(ms)]
    out = tmp_path / "out.safetensors"
    merge(ps, out, method="add-difference", alpha=1.0, dtype="fp32")
    want = _oracle(ms, lambda k, x: x[0] + 1.0 * (x[1] - x[2]), torch.float32)
    _same(load_file(out), want)


def test_dare_reproducible_and_equal_to_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ms = [_model(1, torch.float32), _model(2, torch.float32), _model(3, torch.float32)]
    ps = [_save(tmp_path, f"{i}.safetensors", m) for i, m in enumerate(ms)]
    density, alpha, seed = 0.3, 0.8, 42

    def fn(k: str, x: list[torch.Tensor]) -> torch.Tensor:
        rngs = merge_mod.dare_masks(seed, k, 2)
        total = torch.zeros_like(x[0])
        for m, rng in zip(x[1:], rngs, strict=True):
            keep = torch.from_numpy(rng.random(m.numel()).reshape(m.shape) < density)
            total += torch.where(keep, (m - x[0]) * (1 / density), 0.0)
        return x[0] + alpha * total

    out1, out2 = tmp_path / "o1.safetensors", tmp_path / "o2.safetensors"
    merge(ps, out1, method="dare", alpha=alpha, density=density, seed=seed)
    _same(load_file(out1), _oracle(ms, fn))
    # the masks do not depend on the piece size
    monkeypatch.setattr(arith, "PIECE", 6)
    merge(ps, out2, method="dare", alpha=alpha, density=density, seed=seed)
    assert out1.read_bytes() == out2.read_bytes()


@pytest.mark.parametrize(("piece", "ext"), [(None, "safetensors"), (7, "safetensors"), (5, "ckpt")])
def test_ties_equal_to_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int | None, ext: str
) -> None:
    """Whole-tensor thresholds, then the rest piece by piece (into safetensors by the writer's
    threads, into a .ckpt ahead on the pool): the bits of the whole-model way."""
    if piece is not None:
        monkeypatch.setattr(arith, "PIECE", piece)
    ms = [_model(1, torch.float32), _model(2, torch.float32), _model(3, torch.float32)]
    ps = [_save(tmp_path, f"{i}.safetensors", m) for i, m in enumerate(ms)]
    density, alpha = 0.4, 0.9

    def fn(k: str, x: list[torch.Tensor]) -> torch.Tensor:
        base = x[0]
        trimmed = []
        for m in x[1:]:
            d = m - base
            kk = max(1, int((1 - density) * d.numel()))
            thr = d.abs().flatten().kthvalue(kk).values
            trimmed.append(torch.where(d.abs() >= thr, d, 0.0))
        sign = torch.sign(sum(trimmed))
        agree = [(torch.sign(d) == sign) & (d != 0) for d in trimmed]
        s = sum(torch.where(a, d, 0.0) for a, d in zip(agree, trimmed, strict=True))
        n = sum(a.float() for a in agree)
        merged = torch.where(n > 0, s / n, 0.0)
        return base + alpha * merged

    out = tmp_path / f"o.{ext}"
    merge(ps, out, method="ties", alpha=alpha, density=density)
    got = load_file(out) if ext == "safetensors" else torch.load(out, weights_only=True)
    got.pop("__metadata__", None)  # a .ckpt keeps the recipe there
    _same(got, _oracle(ms, fn))


def test_slerp_close_to_torch(tmp_path: Path) -> None:
    a, b = _model(1, torch.float32), _model(2, torch.float32)
    ps = [_save(tmp_path, "a.safetensors", a), _save(tmp_path, "b.safetensors", b)]
    t = 0.35
    out = tmp_path / "o.safetensors"
    merge(ps, out, method="slerp", alpha=t)
    got = load_file(out)
    for k, va in a.items():
        if not va.is_floating_point():
            continue
        x, y = va.double().flatten(), b[k].double().flatten()
        na, nb = x.norm(), y.norm()
        w = torch.arccos(torch.clamp((x / na) @ (y / nb), -1, 1))
        v = (torch.sin((1 - t) * w) * x / na + torch.sin(t * w) * y / nb) / torch.sin(w)
        want = (v * ((1 - t) * na + t * nb)).reshape(va.shape).float()
        torch.testing.assert_close(got[k], want, rtol=2e-6, atol=1e-6)


def test_inpaint_slice_missing_keys_and_skips(tmp_path: Path) -> None:
    a = _model(1, torch.float32, inpaint=True)
    b = _model(2, torch.float32)
    del b[U + "out.2.weight"]
    b["only.in.b"] = torch.ones(3)
    ps = [_save(tmp_path, "a.safetensors", a), _save(tmp_path, "b.safetensors", b)]
    out = tmp_path / "o.safetensors"
    r = merge(ps, out, alpha=0.5)
    got = load_file(out)
    k = U + "input_blocks.0.0.weight"
    want = a[k].clone()
    want[:, :4] = 0.5 * a[k][:, :4] + 0.5 * b[k]
    assert torch.equal(got[k], want)
    rules = {p.name: p.rule for p in r.keys}
    assert rules[k] == "merge-slice"
    assert rules[U + "out.2.weight"] == "copy" and torch.equal(
        got[U + "out.2.weight"], a[U + "out.2.weight"]
    )
    assert r.skipped == {"only.in.b": "B"} and "only.in.b" not in got


def test_block_weights_supermerger_table() -> None:
    assert block_of(U + "time_embed.0.weight", "sd1") == "IN00"
    assert block_of(U + "input_blocks.11.0.in_layers.2.weight", "sd1") == "IN11"
    assert block_of(U + "middle_block.1.proj_in.weight", "sd1") == "M00"
    assert block_of(U + "out.2.weight", "sd1") == "OUT11"
    assert block_of(U + "out.2.weight", "sdxl") == "OUT08"
    assert (
        block_of(U + "output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight", "sd1") == "OUT03"
    )
    assert block_of("cond_stage_model.x", "sd1") == "BASE"
    w = parse_block_weights(",".join(str(i) for i in range(26)), "sdxl")
    assert w["IN08"] == 9 and w["M00"] == 13 and w["OUT00"] == 14 and w["OUT08"] == 22


def test_block_weights_merge(tmp_path: Path) -> None:
    a, b = _model(1, torch.float32), _model(2, torch.float32)
    ps = [_save(tmp_path, "a.safetensors", a), _save(tmp_path, "b.safetensors", b)]
    weights = [0.1] + [0.2] * 12 + [0.3] + [0.4] * 12
    out = tmp_path / "o.safetensors"
    merge(ps, out, block_weights=",".join(map(str, weights)))

    def fn(k: str, x: list[torch.Tensor]) -> torch.Tensor:
        t = (
            0.1
            if not k.startswith(U)
            else 0.3
            if "middle" in k
            else 0.4
            if "out" in k.split(".")[2]
            else 0.2
        )
        return (1 - t) * x[0] + t * x[1]

    _same(load_file(out), _oracle([a, b], fn))


def test_cli_dry_run_json_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _model(1), _model(2)
    ps = [str(_save(tmp_path, "a.safetensors", a)), str(_save(tmp_path, "b.safetensors", b))]
    out = tmp_path / "o.safetensors"
    assert main(["merge", *ps, str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "weighted-sum (alpha 0.5)" in text and "9 merge, 1 copy" in text
    assert "dry run: nothing written" in text and not out.exists()
    assert main(["merge", *ps, str(out), "--json", "--verify", "--dtype", "bf16"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "sdtool.merge/1" and doc["verified"] and doc["counts"]["merge"] == 9
    assert load_file(out)[U + "out.2.weight"].dtype == torch.bfloat16
    assert main(["merge", *ps, str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", *ps, str(tmp_path / "x.safetensors"), "--method", "add-difference"]) == 2
    assert "add-difference merges 3 inputs, got 2" in capsys.readouterr().err
    assert main(["merge", *ps, str(tmp_path / "x.safetensors"), "--block-weights", "1,2"]) == 2
    assert "the block weights have 2 values" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def _big(seed: int, dtype: torch.dtype) -> dict:
    """Tensors large enough for the fast (torch-converted, many-piece) path, with values that
    overflow fp16, and in the first model NaNs and infs (those pieces take the exact numpy
    cast; NaN in one input only: the payload of NaN + NaN is the hardware's choice)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 128, generator=g)
    hot = torch.randn(64, 80, generator=g) * 40000
    if seed == 0:
        hot[3, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 7e4, -7e4])
    return {
        U + "middle_block.1.proj_in.weight": w.to(dtype),
        U + "middle_block.1.proj_out.weight": hot.to(dtype),
        U + "out.0.bias": torch.randn(5000, generator=g).to(dtype),
    }


@pytest.mark.parametrize(
    ("method", "out_dtype"),
    [
        ("weighted-sum", "fp16"),
        ("add-difference", "bf16"),
        ("add-difference", "fp16"),
        ("weighted-sum", "fp16.ckpt"),
    ],
)
def test_fast_path_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, out_dtype: str
) -> None:
    """Many pieces on 2 threads, reused buffers, the bitwise conversions, tensors computed
    ahead (a few at once: a small budget), in safetensors' order or a .ckpt's: the same bits
    as torch on the whole model, overflow counts included."""
    out_dtype, _, ext = out_dtype.partition(".")
    monkeypatch.setattr(arith, "PIECE", 4099)
    monkeypatch.setattr(arith, "AHEAD_BYTES", 30_000)
    dts = [torch.float16, torch.bfloat16, torch.float32]
    n = 2 if method == "weighted-sum" else 3
    ms = [_big(i, dts[i]) for i in range(n)]
    ps = [_save(tmp_path, f"{i}.safetensors", m) for i, m in enumerate(ms)]
    out = tmp_path / f"out.{ext or 'safetensors'}"
    t = 0.3
    r = merge(ps, out, method=method, alpha=t, dtype=out_dtype, on_overflow="warn", verify=True)
    if method == "weighted-sum":
        fn = lambda k, x: (1 - t) * x[0] + t * x[1]  # noqa: E731
    else:
        fn = lambda k, x: x[0] + t * (x[1] - x[2])  # noqa: E731
    target = {"fp16": torch.float16, "bf16": torch.bfloat16}[out_dtype]
    want = _oracle(ms, fn, target)
    got = load_file(out) if not ext else torch.load(out, weights_only=True)
    got.pop("__metadata__", None)  # a .ckpt keeps the recipe there
    assert set(got) == set(want)
    for k in want:  # bits, NaN payloads included
        assert torch.equal(got[k].view(torch.int16), want[k].view(torch.int16)), k
    finite = {k: int((~torch.isfinite(v) & torch.isfinite(fn(k, [m[k].float() for m in ms]))).sum())
              for k, v in want.items()}  # fmt: skip
    assert r.overflows == {k: c for k, c in finite.items() if c}


def test_library_names_parameters_cli_names_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Library errors say ``density=`` (a caller's word); the command says ``--density``."""
    ps = [str(_save(tmp_path, f"{i}.safetensors", _model(i))) for i in range(2)]
    out = tmp_path / "x.safetensors"
    with pytest.raises(SdtoolError, match=r"^density=0\.0 is outside \(0, 1\]"):
        merge(ps, out, method="dare", density=0.0)
    with pytest.raises(SdtoolError, match=r"^block_weights='1,x' is not comma-separated"):
        merge(ps, out, block_weights="1,x")
    assert main(["merge", *ps, str(out), "--method", "dare", "--density", "0"]) == 2
    assert "--density 0.0 is outside (0, 1]" in capsys.readouterr().err
    assert main(["merge", *ps, str(out), "--block-weights", "1,x"]) == 2
    assert "--block-weights '1,x' is not comma-separated numbers" in capsys.readouterr().err


def test_merge_takes_modelfiles_and_one_options_object(tmp_path: Path) -> None:
    """merge takes ``path | ModelFile`` inputs and a MergeOptions (extending the write
    options) or its fields as keywords: the same bytes either way (issue 11.4)."""
    from sdtool.formats.open import open_model
    from sdtool.ops.merge import MergeOptions

    a, b = _save(tmp_path, "a", _model(1)), _save(tmp_path, "b", _model(2))
    by_kw, by_opts = tmp_path / "kw.safetensors", tmp_path / "opts.safetensors"
    r1 = merge([a, b], by_kw, alpha=0.3, dtype="fp32")
    with open_model(a) as ma, open_model(b) as mb:
        r2 = merge([ma, mb], by_opts, MergeOptions(alpha=0.3, dtype="fp32"))
        assert ma.read(next(iter(ma.tensors))).size > 0  # left open
    assert by_kw.read_bytes() == by_opts.read_bytes()
    assert r1.inputs == r2.inputs == [a, b] and r2.dtype == "fp32"
