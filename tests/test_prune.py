"""prune / extract on SD-shaped checkpoints from ../shared/reference/layouts (small shapes, real
key sets and dtypes, EMA and training state added); outputs compared with safetensors' reader."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import sdlayouts as L
from safetensors.numpy import load_file, save_file

from sdtool import dtypes, open_model
from sdtool.cli.main import main
from sdtool.errors import UsageError
from sdtool.identify.engine import ema_key
from sdtool.ops.prune import PruneOptions, extract, plan_extract, plan_prune, prune

F16 = dtypes.from_code("F16")


def sd1_file(
    tmp_path: Path, *, ema: bool = True, name: str = "sd1.safetensors"
) -> tuple[Path, dict[str, np.ndarray]]:
    e = L.sd1(ema=ema)
    path = tmp_path / name
    return path, L.write_tiny(path, e, metadata={"modelspec.title": "t"})


def unet_keys(arrays: dict[str, np.ndarray]) -> list[str]:
    return [k for k in arrays if k.startswith("model.diffusion_model.")]


def test_ema_only_keys_and_values(tmp_path: Path) -> None:
    src, arrays = sd1_file(tmp_path)
    out = tmp_path / "out.safetensors"
    with open_model(src) as m:
        r = prune(m, out, PruneOptions(ema="only"), verify=True)
    got = load_file(str(out))
    inference = {k for k in arrays if not k.startswith("model_ema.")}
    assert set(got) == inference  # decay and num_updates gone too
    for k in unet_keys(arrays):
        assert got[k].tobytes() == arrays[ema_key(k)].tobytes(), k
        assert got[k].tobytes() != arrays[k].tobytes()
    vae = "first_stage_model.decoder.conv_in.weight"
    assert got[vae].tobytes() == arrays[vae].tobytes()
    assert r.write is not None and r.write.verified
    reasons = {d.reason: len(d.names) for d in r.plan.dropped}
    assert reasons == {
        "EMA copy: its weights now sit under the model keys": 686,
        "EMA bookkeeping (decay / num_updates): not a weight": 2,
    }
    with open_model(out) as o:
        assert o.metadata == {"modelspec.title": "t"}  # metadata carried


def test_no_ema_keeps_raw_weights_and_ints_never_cast(tmp_path: Path) -> None:
    src, arrays = sd1_file(tmp_path)
    out = tmp_path / "out.safetensors"
    with open_model(src) as m:
        prune(m, out, PruneOptions(ema="drop", dtype=F16))
    got = load_file(str(out))
    assert not any(k.startswith("model_ema.") for k in got)
    for k in unet_keys(arrays):
        assert got[k].dtype == np.float16
        assert got[k].tobytes() == arrays[k].astype(np.float16).tobytes()
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert got[pid].dtype == np.int64 and got[pid].tolist() == [list(range(77))]


def test_default_keeps_everything_and_reports_training_state(tmp_path: Path) -> None:
    src, arrays = sd1_file(tmp_path)
    with open_model(src) as m:
        m.extra = {"optimizer_states": [{}], "lr_schedulers": [], "global_step": 5, "foo": 1}
        plan = plan_prune(m, PruneOptions())
    assert {t.name for t in plan.tensors} == set(arrays)
    assert plan.dropped == []
    assert dict(plan.dropped_entries) == {
        "optimizer_states": "optimizer state",
        "lr_schedulers": "learning-rate scheduler state",
        "global_step": "training step counter",
        "foo": "non-weight data outside the state dict",
    }


def test_ema_only_refuses_without_ema_and_when_incomplete(tmp_path: Path) -> None:
    src, _ = sd1_file(tmp_path, ema=False)
    with open_model(src) as m, pytest.raises(UsageError, match="no EMA weights"):
        plan_prune(m, PruneOptions(ema="only"))
    e = L.sd1(ema=True)
    gone = [k for k in e if k.startswith("model_ema.diffusion_modelout")][:4]
    for k in gone:
        del e[k]
    path = tmp_path / "partial.safetensors"
    arrays = L.write_tiny(path, e)
    with open_model(path) as m:
        with pytest.raises(UsageError, match="incomplete: 4 of 686 UNet keys"):
            plan_prune(m, PruneOptions(ema="only"))
        plan = plan_prune(m, PruneOptions(ema="only", allow_partial_ema=True))
    src_of = {t.name: t.info for t in plan.tensors}
    raw = [k for k in unet_keys(arrays) if ema_key(k) in gone]
    assert len(raw) == 4
    with open_model(path) as m:
        for k in raw:
            assert src_of[k] is m.tensors[k] or src_of[k].storage.key == k
    assert any("4 keep the raw weights" in c for c in plan.changes)


def test_sdxl_keeps_both_text_encoders(tmp_path: Path) -> None:
    path = tmp_path / "sdxl.safetensors"
    arrays = L.write_tiny(path, L.sdxl())
    out = tmp_path / "out.safetensors"
    with open_model(path) as m:
        prune(m, out, PruneOptions(dtype=F16))
    got = load_file(str(out))
    cond = {k for k in arrays if k.startswith("conditioner.")}
    assert len(cond) == 178 + 374 and cond <= set(got)
    assert set(got) == set(arrays)


@pytest.mark.parametrize("part", ["vae", "text-encoder", "unet"])
def test_drop_parts(tmp_path: Path, part: str) -> None:
    src, arrays = sd1_file(tmp_path)
    prefix = {
        "vae": "first_stage_model.",
        "text-encoder": "cond_stage_model.",
        "unet": "model.diffusion_model.",
    }[part]
    with open_model(src) as m:
        plan = plan_prune(m, PruneOptions(drop=frozenset({part})))
    names = {t.name for t in plan.tensors}
    assert not any(k.startswith(prefix) for k in names)
    assert names == {k for k in arrays if not k.startswith(prefix)}
    assert [d.reason for d in plan.dropped] == [f"--drop {part}"]


def test_extract_round_trip_and_bake_vae(tmp_path: Path) -> None:
    src, arrays = sd1_file(tmp_path)
    vae_out = tmp_path / "vae.safetensors"
    with open_model(src) as m:
        extract(m, vae_out, component="vae", verify=True)
    vae = load_file(str(vae_out))
    assert set(vae) == {
        k[len("first_stage_model.") :] for k in arrays if k.startswith("first_stage_model.")
    }
    with open_model(vae_out) as v:
        from sdtool.identify import identify

        assert identify(v).kind == "vae"
    # a different VAE, bare layout, baked into the checkpoint
    other = {k: (v + 1).astype(v.dtype) for k, v in vae.items()}
    other["loss.logvar"] = np.zeros((), np.float32)
    other_path = tmp_path / "other-vae.safetensors"
    save_file(other, str(other_path))
    baked = tmp_path / "baked.safetensors"
    with open_model(src) as m, open_model(other_path) as v:
        r = prune(m, baked, PruneOptions(bake_vae=v), verify=True)
    got = load_file(str(baked))
    assert set(got) == set(arrays)
    for k, val in other.items():
        if k != "loss.logvar":
            assert got["first_stage_model." + k].tobytes() == val.tobytes()
    assert any("VAE replaced" in c for c in r.plan.changes)
    # and extracting the baked VAE gives the other VAE back
    again = tmp_path / "again.safetensors"
    with open_model(baked) as m:
        extract(m, again, component="vae")
    back = load_file(str(again))
    assert {k: v.tobytes() for k, v in back.items()} == {
        k: v.tobytes() for k, v in other.items() if k != "loss.logvar"
    }


def test_bake_vae_checks_shapes(tmp_path: Path) -> None:
    src, _ = sd1_file(tmp_path)
    e = L.from_txt("VAE-v1-SD", "first_stage_model.")
    bad = L.tiny_arrays(e)
    bad["first_stage_model.decoder.conv_in.weight"] = np.zeros((3, 3, 3, 2), np.float32)
    p = tmp_path / "bad-vae.safetensors"
    save_file(bad, str(p))
    with open_model(src) as m, open_model(p) as v, pytest.raises(UsageError, match="does not fit"):
        plan_prune(m, PruneOptions(bake_vae=v))


def test_fix_clip_restores_int64_arange(tmp_path: Path) -> None:
    e = L.sd1(ema=False)
    arrays = L.tiny_arrays(e)
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    arrays[pid] = (np.arange(77, dtype=np.float32) + 0.4).reshape(1, 77).astype(np.float16)
    path = tmp_path / "broken.safetensors"
    save_file(arrays, str(path))
    out = tmp_path / "fixed.safetensors"
    with open_model(path) as m:
        r = prune(m, out, PruneOptions(fix_clip=True, dtype=F16), verify=True)
    got = load_file(str(out))
    assert got[pid].dtype == np.int64 and got[pid].tolist() == [list(range(77))]
    assert any("stored as F16" in c for c in r.plan.changes)


def test_extract_unet_ema_and_text_encoders(tmp_path: Path) -> None:
    src, arrays = sd1_file(tmp_path)
    with open_model(src) as m:
        plan = plan_extract(m, "unet", ema=True)
        te = plan_extract(m, "text-encoder")
    assert {t.name for t in plan.tensors} == {
        k[len("model.diffusion_model.") :] for k in unet_keys(arrays)
    }
    assert all(t.info.storage.key.startswith("model_ema.") for t in plan.tensors)
    assert all(t.name.startswith("text_model.") for t in te.tensors)
    path = tmp_path / "sdxl.safetensors"
    L.write_tiny(path, L.sdxl())
    with open_model(path) as m:
        with pytest.raises(UsageError, match="2 text encoders"):
            plan_extract(m, "text-encoder")
        g = plan_extract(m, "clip-g")
    assert len(g.tensors) == 374 and all(
        t.name.startswith(
            ("transformer.", "token_", "ln_final", "positional", "text_proj", "logit")
        )
        for t in g.tensors
    )


def test_cli_dry_run_json_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = sd1_file(tmp_path)
    out = tmp_path / "out.safetensors"
    assert main(["prune", str(src), str(out), "--ema-only", "--dtype", "fp16", "--dry-run"]) == 0
    assert not out.exists()
    text = capsys.readouterr().out
    assert "dry run: 1,143 tensors would be written" in text
    assert main(["prune", str(src), str(out), "--no-ema", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "sdtool.prune/2" and data["output"]["tensors"] == 1143
    assert data["before"]["total"]["tensors"] == 1831
    assert main(["prune", str(src), str(out), "--ema-only"]) == 2  # exists, no --overwrite
    plain, _ = sd1_file(tmp_path, ema=False, name="plain.safetensors")
    assert main(["prune", str(plain), str(tmp_path / "x.safetensors"), "--ema-only"]) == 2
    assert "no EMA weights" in capsys.readouterr().err
    assert main(["extract", str(src), str(tmp_path / "u.ckpt"), "-c", "unet", "--dry-run"]) == 0


def test_torch_checkpoint_with_training_state(tmp_path: Path) -> None:
    """A Lightning checkpoint saved by torch: training state dropped, EMA moved, ints kept."""
    if importlib.util.find_spec("sdtool.formats.torchfile") is None:
        pytest.skip("the torch loader is not on this branch yet")
    torch = pytest.importorskip("torch")
    arrays = L.tiny_arrays(L.sd1(ema=True))
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    ckpt = {
        "state_dict": sd,
        "global_step": 3,
        "epoch": 1,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}],
        "lr_schedulers": [],
    }
    path = tmp_path / "train.ckpt"
    torch.save(ckpt, path)
    out = tmp_path / "ema.safetensors"
    with open_model(path) as m:
        r = prune(m, out, PruneOptions(ema="only", dtype=F16), verify=True)
    got = load_file(str(out))
    assert set(got) == {k for k in arrays if not k.startswith("model_ema.")}
    ref = torch.load(path, weights_only=True)["state_dict"]
    for k in unet_keys(arrays):
        assert got[k].tobytes() == ref[ema_key(k)].half().numpy().tobytes()
    keys = {k for k, _ in r.plan.dropped_entries}
    assert {"optimizer_states", "lr_schedulers", "global_step", "epoch"} <= keys
