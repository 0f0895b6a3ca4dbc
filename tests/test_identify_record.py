"""Identity.to_record / from_record: the lossless form the cache stores gives back an equal
object (``to_json`` cuts lists and computes fields; the record keeps everything)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import sdlayouts as L
import torch
from safetensors.numpy import save_file

from sdtool import open_model
from sdtool.identify import Identity, identify


def _header(tmp: Path) -> Path:
    """An SD 1.x checkpoint with EMA, a wrong shape, a missing key, an extra and junk: every
    list of the identity is long (more than to_json keeps) or non-empty."""
    e = L.sd1(ema=True)
    e["first_stage_model.decoder.conv_in.weight"] = ("F32", (512, 8, 3, 3))
    for k in [k for k in e if k.startswith("model.diffusion_model.output_blocks.")][:30]:
        del e[k]
    for i in range(120):
        e[f"junk.{i}"] = ("F32", (2,))
    return L.write_header_only(tmp / "sd1.safetensors", L.as_dtype(e, "F16"))


def _lora(tmp: Path) -> Path:
    t = {}
    for name in ("LoRA-v1A-UNET", "LoRA-v1A-CLIP"):
        for k, s in L.txt_layout(name).items():
            t[k] = np.zeros(tuple(8 if d == -1 else d for d in s), np.float16)
    path = tmp / "lora.safetensors"
    save_file(t, str(path), metadata={"ss_network_alpha": "4", "ss_network_dim": "8"})
    return path


def _embedding(tmp: Path) -> Path:
    path = tmp / "emb.safetensors"
    save_file({"clip_l": np.zeros((2, 768), np.float32),
               "clip_g": np.zeros((2, 1280), np.float32)}, str(path))  # fmt: skip
    return path


def _hypernetwork(tmp: Path) -> Path:
    t = {}
    for width in (320, 768):
        t[f"{width}.0.linear.0.weight"] = np.zeros((width * 2, width), np.float32)
        t[f"{width}.0.linear.0.bias"] = np.zeros((width * 2,), np.float32)
    path = tmp / "h.safetensors"
    save_file(t, str(path))
    return path


def _scaled_fp8(tmp: Path) -> Path:
    e: L.Entries = {}
    for k, (dt, s) in L.flux(bare=True).items():
        if k.endswith(".weight") and len(s) == 2:
            e[k] = ("F8_E4M3", s)
            e[k[: -len("weight")] + "scale_weight"] = ("F32", ())
        else:
            e[k] = (dt, s)
    e["scaled_fp8"] = ("F8_E4M3", (0,))
    return L.write_header_only(tmp / "flux.safetensors", e)


def _unknown(tmp: Path) -> Path:
    e = L.sd1()
    e = {k: v for k, v in e.items() if not k.startswith(("cond_stage", "first_stage_model.dec"))}
    unet = [k for k in e if k.startswith("model.diffusion_model.")]
    e = {k: v for k, v in e.items() if k not in unet[:400]}
    return L.write_header_only(tmp / "unknown.safetensors", e)


def _ckpt(tmp: Path) -> Path:
    path = tmp / "m.ckpt"
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}
    torch.save({"state_dict": sd, "global_step": 3, "optimizer_states": [{}]}, path)
    return path


FILES: dict[str, Callable[[Path], Path]] = {
    "checkpoint": _header, "lora": _lora, "embedding": _embedding,
    "hypernetwork": _hypernetwork, "quantized": _scaled_fp8, "unknown": _unknown, "ckpt": _ckpt,
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(FILES))
def test_record_round_trips_to_an_equal_identity(tmp_path: Path, kind: str) -> None:
    L.need_layouts()
    with open_model(FILES[kind](tmp_path)) as m:
        ident = identify(m)
    text = json.dumps(ident.to_record(), ensure_ascii=True)  # as the cache stores it
    back = Identity.from_record(json.loads(text))
    assert back == ident
    assert back.owners() == ident.owners()  # compare=False, but part of the record
    assert back.to_json() == ident.to_json()
    assert repr(back) == repr(ident)  # the same types inside (tuples stay tuples, int keys ints)


def test_the_cases_cover_what_to_json_cuts(tmp_path: Path) -> None:
    """The record holds what to_json leaves out (full key lists, ownership), so the round trip
    above is more than to_json's."""
    L.need_layouts()
    with open_model(_header(tmp_path)) as m:
        ident = identify(m)
    doc = ident.to_json()
    assert len(ident.unknown_keys) == 120 and doc["unknown_count"] == 120
    assert len(doc["unknown_keys"]) == 100
    rec = ident.to_record()
    assert len(rec["unknown_keys"]) == 120 and rec["ownership"] == ident.owners()
    assert any(c["keys"] for c in rec["components"])


def test_a_record_of_another_shape_is_refused() -> None:
    with pytest.raises((KeyError, TypeError, ValueError)):
        Identity.from_record({"kind": "lora", "lora": {"flavour": "kohya"}})
    with pytest.raises((KeyError, TypeError, ValueError)):
        Identity.from_record(["not", "an", "object"])
