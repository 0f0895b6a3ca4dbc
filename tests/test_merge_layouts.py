"""sdtool merge aligns inputs that name keys differently: a diffusers-named UNet file or a bare
ldm UNet file merged into a full SD1 checkpoint (real key sets, tiny shapes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sdlayouts as L
from safetensors.numpy import load_file, save_file

from sdtool.ops.merge import merge

U = "model.diffusion_model."


@pytest.fixture(autouse=True)
def _layouts() -> None:
    L.need_layouts()


def test_diffusers_and_bare_unet_inputs_align(tmp_path: Path) -> None:
    from sdtool.layouts import keymap

    a = L.write_tiny(tmp_path / "a.safetensors", L.sd1(), seed=1)
    b_full = L.tiny_arrays(L.sd1(), seed=2)
    save_file(b_full, str(tmp_path / "b-full.safetensors"))
    to_diff = keymap("sd1", "unet", "to_diffusers")
    b_diff = {}
    for k, v in b_full.items():
        for mp in to_diff(k):
            b_diff[mp.target] = v.reshape(-1).reshape(v.shape)  # same values, diffusers name
    save_file(b_diff, str(tmp_path / "b-diffusers-unet.safetensors"))
    b_bare = {k[len(U) :]: v for k, v in b_full.items() if k.startswith(U)}
    save_file(b_bare, str(tmp_path / "b-bare-unet.safetensors"))

    ref = tmp_path / "ref.safetensors"
    merge([tmp_path / "a.safetensors", tmp_path / "b-full.safetensors"], ref, alpha=0.25)
    want = load_file(ref)
    for name in ("b-diffusers-unet", "b-bare-unet"):
        out = tmp_path / f"{name}-out.safetensors"
        r = merge([tmp_path / "a.safetensors", tmp_path / f"{name}.safetensors"], out, alpha=0.25)
        got = load_file(out)
        for k in a:
            if k.startswith(U):
                assert np.array_equal(got[k], want[k]), (name, k)
            else:  # VAE / CLIP: B has none, A's values
                assert np.array_equal(got[k], a[k]), (name, k)
        assert r.counts["merge"] == 686 and not r.skipped
        assert r.notes == [f"{name}.safetensors: 686 unet key(s) aligned by " + (
            "diffusers names through the sd1 tables" if "diffusers" in name
            else "prefix '(none)' for 'model.diffusion_model.'"
        )]  # fmt: skip
