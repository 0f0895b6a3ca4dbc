"""Build SD-shaped safetensors files from ../shared/reference/layouts (independent of sdtool).

Two ways, as the signatures need:
- ``write_header_only``: the real shapes with a sparse, all-zero data section (``os.truncate``),
  so a 7 GB SDXL checkpoint costs a few hundred KB of header and no disk blocks; open_model
  reads only the header.
- ``write_tiny``: real key names and dtypes with every dimension cut to at most ``TINY``, filled
  with distinct random values, for tests that read tensors (prune, extract).

The layouts are parsed here with their own small parser so that tests check sdtool's generated
tables against the source, not against themselves.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from functools import cache
from math import prod
from pathlib import Path

import numpy as np
import pytest

LAYOUTS = Path(
    os.environ.get("SDTOOL_LAYOUTS")  # a worktree outside /work: point this at shared's copy
    or Path(__file__).resolve().parents[2] / "shared" / "reference" / "layouts"
)
TINY = 3

Entries = dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)

_YAML_LINE = re.compile(r"^    (\S+): \{shape: \[([^\]]*)\], dtype: (\w+)(.*)\}\s*$")
_YAML_COMP = re.compile(r"^  (\w+):\s*$")
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "F8_E4M3": 1}
_NUMPY = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def need_layouts() -> Path:
    if not (LAYOUTS / "README.md").is_file():
        pytest.skip(f"the reference layouts are absent ({LAYOUTS})")
    return LAYOUTS


@cache
def yaml_layout(name: str) -> dict[str, dict[str, tuple[str, tuple[int, ...], bool]]]:
    """component -> key -> (dtype, shape, optional) of layouts/<name>.yaml."""
    out: dict[str, dict[str, tuple[str, tuple[int, ...], bool]]] = {}
    comp = None
    for line in (need_layouts() / f"{name}.yaml").read_text().splitlines():
        if m := _YAML_COMP.match(line):
            comp = out.setdefault(m.group(1), {})
        elif (m := _YAML_LINE.match(line)) and comp is not None:
            shape = tuple(int(s) for s in m.group(2).split(",") if s.strip())
            comp[m.group(1)] = (_DTYPES[m.group(3)], shape, "optional: true" in m.group(4))
    return out


@cache
def txt_layout(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of layouts/toolkit/<name>.txt."""
    out = {}
    for line in (need_layouts() / "toolkit" / f"{name}.txt").read_text().splitlines():
        if line.strip():
            key, shape = line.split(" ", 1)
            out[key] = tuple(json.loads(shape))
    return out


def from_yaml(name: str, comps: Iterable[str], *, optional: bool = True) -> Entries:
    y = yaml_layout(name)
    return {
        k: (dt, shape) for c in comps for k, (dt, shape, opt) in y[c].items() if optional or not opt
    }


def from_txt(name: str, prefix: str, dtype: str = "F32") -> Entries:
    return {
        prefix + k: ("I64" if k.endswith("position_ids") else dtype, shape)
        for k, shape in txt_layout(name).items()
    }


HARVESTED = Path(__file__).resolve().parents[1] / "sdtool" / "data" / "harvested.json.gz"


@cache
def _harvest() -> dict[str, dict[str, list]]:  # type: ignore[type-arg]
    import gzip

    return json.loads(gzip.decompress(HARVESTED.read_bytes()))["models"]


def harvested(model: str, prefix: str = "") -> Entries:
    """A model's keys, shapes and dtypes as harvested from its diffusers / transformers class
    (tools/harvest_layouts.py): the file a diffusers ``save_pretrained`` writes."""
    d = _harvest()[model]
    return {
        prefix + k: (dt, tuple(s))
        for k, s, dt in zip(d["keys"], d["shapes"], d["dtypes"], strict=True)
    }


def ema_of(entries: Entries) -> Entries:
    """The ``model_ema.`` twin of every ``model.diffusion_model.`` entry, plus decay/num_updates."""
    out: Entries = {
        "model_ema." + k[len("model.") :].replace(".", ""): v
        for k, v in entries.items()
        if k.startswith("model.diffusion_model.")
    }
    out["model_ema.decay"] = ("F32", ())
    out["model_ema.num_updates"] = ("I32", ())
    return out


# -- whole checkpoints, by architecture ----------------------------------------------------------


def sd1(*, ema: bool = False, unet: str = "UNET-v1-SD") -> Entries:
    e = from_yaml("sd1-ldm", ["diffuser", "vae", "clip_l", "scheduler"])
    if unet != "UNET-v1-SD":
        e.update(from_txt(unet, "model.diffusion_model."))
    if ema:
        e.update(ema_of(e))
    return e


def sd2(unet: str = "UNET-v2-SD") -> Entries:
    e = from_txt(unet, "model.diffusion_model.")
    e.update(from_txt("VAE-v1-SD", "first_stage_model."))
    e.update(from_txt("CLIP-v2-SD", "cond_stage_model.model."))
    if unet == "UNET-v2-Depth":
        e.update(from_txt("Depth-v2-SD", "depth_model.model."))
    return e


def sdxl() -> Entries:
    return from_yaml("sdxl-sgm", ["diffuser", "vae", "clip_l", "clip_g"], optional=False)


def sdxl_refiner() -> Entries:
    e = from_txt("UNET-XL-Refiner", "model.diffusion_model.")
    e.update(from_txt("VAE-v1-SD", "first_stage_model."))
    e.update(from_txt("CLIP-XL-SD", "conditioner.embedders.0.model."))
    return e


def sd3() -> Entries:
    return from_yaml("sd3-comfyui", ["diffuser", "vae", "clip_l", "clip_g", "t5xxl"])


def flux(*, dev: bool = True, bare: bool = False) -> Entries:
    e = from_yaml("flux-flux", ["diffuser"] if bare else ["diffuser", "clip_l", "t5xxl", "vae"])
    if not dev:
        e = {k: v for k, v in e.items() if ".guidance_in." not in k}
    if bare:
        e = {k.removeprefix("model.diffusion_model."): v for k, v in e.items()}
    return e


def strip_prefix(entries: Entries, prefix: str, new: str = "") -> Entries:
    return {new + k[len(prefix) :]: v for k, v in entries.items() if k.startswith(prefix)}


def as_dtype(entries: Entries, dtype: str) -> Entries:
    """Floats to ``dtype``; integer tensors keep theirs."""
    return {k: (dtype if dt.startswith(("F", "BF")) else dt, s) for k, (dt, s) in entries.items()}


# -- writers -------------------------------------------------------------------------------------


def write_header_only(path: Path, entries: Entries, metadata: dict[str, str] | None = None) -> Path:
    """A valid safetensors file with real shapes and a sparse all-zero data section."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for name, (dt, shape) in entries.items():
        n = prod(shape) * _ITEMSIZE[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + off)
    return path


def tiny_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(d, TINY) for d in shape)


def tiny_arrays(entries: Entries, seed: int = 0) -> dict[str, np.ndarray]:
    """Small distinct values per tensor; int64 position_ids keep their real [1, 77] arange."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dt, shape) in entries.items():
        if name.endswith("position_ids"):
            out[name] = np.arange(prod(shape), dtype=np.int64).reshape(shape)
        elif dt in ("I64", "I32"):
            out[name] = np.array(rng.integers(0, 1000, tiny_shape(shape)), dtype=_NUMPY[dt])
        else:
            arr = rng.standard_normal(tiny_shape(shape)).astype(np.float32)
            out[name] = arr.astype(_NUMPY.get(dt, np.float32))
    return out


def write_tiny(
    path: Path, entries: Entries, metadata: dict[str, str] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write a small-shaped safetensors file with the real key set; return what was written."""
    from safetensors.numpy import save_file

    arrays = tiny_arrays(entries, seed)
    save_file(arrays, str(path), metadata=metadata)
    return arrays
