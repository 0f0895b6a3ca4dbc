"""Scaled fp8: per-tensor scales that make float8_e4m3fn weights usable, written and read.

Writing (``convert ... --dtype fp8_e4m3fn --fp8-scaled``): each Linear weight (2-D ``*.weight``)
outside the family's keep list becomes float8_e4m3fn with a float32 scale::

    scale = max|W| / 448       (float32; 1 when W is all zero)
    q     = (float32(W) / scale).to(float8_e4m3fn)      (round to nearest even, as torch)

and everything else (norms, biases, embeddings, patch embeddings, first and last layers,
convolutions: ComfyUI's scaled ops replace Linear only) keeps its dtype. Three spellings
(``--fp8-format``):

``comfy``        ComfyUI's original: ``<layer>.scale_weight`` (f32 scalar) and the marker
                 ``<prefix>scaled_fp8``, an empty float8_e4m3fn tensor whose dtype names the
                 format (comfy/model_detection.py, comfy/ops.py scaled_fp8_ops).
``comfy-mixed``  ComfyUI's mixed precision: ``<layer>.weight_scale`` (f32 scalar) and
                 ``<layer>.comfy_quant``, uint8 UTF-8 JSON ``{"format": "float8_e4m3fn"}``
                 (comfy/quant_ops.py).
``diffusers``    ``<layer>.weight_scale`` alone (no marker).

Reading: a float8 ``<layer>.weight`` with a one-element ``scale_weight`` or ``weight_scale``
sibling is scaled; converting it to fp16/bf16/fp32 gives ``(float32(q) * scale).to(dtype)``,
and the scale, marker, ``comfy_quant`` and input-scale tensors are not written.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sdtool import dtypes
from sdtool.dtypes import DType
from sdtool.errors import UsageError
from sdtool.model import ModelFile, Storage, TensorInfo
from sdtool.write.cast import cast
from sdtool.write.plan import OutTensor

FP8_MAX = np.float32(448.0)
FORMATS = ("comfy", "comfy-mixed", "diffusers")
SCALE_KEYS = ("scale_weight", "weight_scale")
#: tensors a scaled file carries besides weights and scales; dropped when dequantizing
AUX_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2")
MARKER = "scaled_fp8"
#: kept in higher precision in every family (substrings of the key without its prefix)
ALWAYS_KEEP = ("norm", "embed", "emb.", "pos_", "_in.", "final_layer", "proj_out", "head.")

F32 = dtypes.from_code("F32")
F8 = dtypes.from_code("F8_E4M3")


@dataclass
class Scaled:
    """A scaled weight found in a file: the weight's name and its scale tensor's name."""

    weight: str
    scale: str


def find_scaled(m: ModelFile) -> dict[str, Scaled]:
    """weight name -> Scaled, for every float8 weight with a one-element scale beside it."""
    out: dict[str, Scaled] = {}
    for name, info in m.tensors.items():
        if not name.endswith(".weight") or not info.dtype.code.startswith("F8_"):
            continue
        base = name[: -len("weight")]
        for k in SCALE_KEYS:
            s = m.tensors.get(base + k)
            if s is not None and s.numel == 1:
                out[name] = Scaled(name, base + k)
                break
    return out


def is_aux(name: str, m: ModelFile) -> bool:
    """A scale, marker or companion tensor of a scaled-fp8 file."""
    if name.endswith(AUX_SUFFIXES) or name == MARKER or name.endswith("." + MARKER):
        return True
    if name.endswith(SCALE_KEYS) and m.tensors[name].numel == 1:
        return m.tensors.get(name.rsplit(".", 1)[0] + ".weight") is not None
    return False


def dequantized(m: ModelFile, s: Scaled) -> Callable[[], np.ndarray]:
    """The weight's real values: float32(q) * scale, in float32."""

    def make() -> np.ndarray:
        q = m.read(s.weight)
        scale = np.float32(np.asarray(m.read(s.scale), np.float32).reshape(-1)[0])
        return q.astype(np.float32) * scale

    return make


def dequant_plan(
    m: ModelFile, plan: list[OutTensor], dtype: DType | None
) -> tuple[list[OutTensor], list[str]]:
    """Replace scaled weights by their dequantized values (cast to ``dtype``, or to bf16 when
    keeping) and drop scales and markers. Returns the plan and notes."""
    scaled = find_scaled(m)
    if not scaled:
        return plan, []
    target = dtype if dtype is not None and not dtype.code.startswith("F8_") else None
    if target is None:
        return plan, [
            f"{len(scaled)} scaled-fp8 weight(s) kept scaled (convert with --dtype "
            "bf16/fp16/fp32 to apply the scales)"
        ]
    out: list[OutTensor] = []
    dropped = 0
    for t in plan:
        s = scaled.get(t.name)
        if s is not None:
            out.append(OutTensor(t.name, m, t.info, target, make=dequantized(m, s)))
        elif is_aux(t.name, m):
            dropped += 1
        else:
            out.append(t)
    return out, [
        f"{len(scaled)} scaled-fp8 weight(s) multiplied by their scales; {dropped} scale/marker "
        "tensor(s) not written"
    ]


def _keep(name: str, info: TensorInfo, keep: tuple[str, ...]) -> bool:
    if not name.endswith(".weight") or len(info.shape) != 2 or not info.dtype.is_float:
        return True
    return any(k in name for k in keep)


def _scalar_info(key: str) -> TensorInfo:
    return TensorInfo(F32, (), (), 0, Storage(key, F32, 4))


def _marker_info() -> TensorInfo:
    return TensorInfo(F8, (0,), (1,), 0, Storage(MARKER, F8, 0))


class _Scales:
    """Each weight's scale, computed once (weights and scales are written by several threads)."""

    def __init__(self, m: ModelFile) -> None:
        self.m = m
        self.done: dict[str, np.float32] = {}
        self.lock = threading.Lock()

    def get(self, name: str) -> np.float32:
        with self.lock:
            if name in self.done:
                return self.done[name]
        w = self.m.read(name)
        with np.errstate(invalid="ignore"):
            amax = np.float32(np.abs(w).max().astype(np.float32)) if w.size else np.float32(0)
        if not np.isfinite(amax):
            raise UsageError(
                f"tensor {name!r} holds inf or NaN: it cannot be scaled to fp8", path=self.m.path
            )
        scale = np.float32(1) if amax == 0 else np.float32(amax / FP8_MAX)
        with self.lock:
            self.done[name] = scale
        return scale


def scaled_plan(
    m: ModelFile, plan: list[OutTensor], fmt: str = "comfy"
) -> tuple[list[OutTensor], list[str]]:
    """The plan for ``--dtype fp8_e4m3fn --fp8-scaled``: scaled fp8 Linear weights plus their
    scales in ``fmt``'s spelling; every other tensor keeps its source dtype."""
    from sdtool.ops.gguf_export import ARCHS, _strip, detect  # it imports this module

    if fmt not in FORMATS:
        raise UsageError(f"fp8_format= must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if find_scaled(m):
        raise UsageError("the input is already scaled fp8")
    names, _ = _strip(list(m.tensors))
    bare = {src: new for new, src in names.items()}
    try:
        arch = detect(set(names))
    except UsageError:
        arch = None
    keep = ALWAYS_KEEP + (arch.keep + arch.keep_exact if arch is not None and arch in ARCHS else ())
    scales = _Scales(m)
    out: list[OutTensor] = []
    n = 0
    prefix = ""
    for t in plan:
        info = t.info
        short = bare.get(t.name)
        if short is None or _keep(short, info, keep):  # outside the diffusion model: as is
            out.append(OutTensor(t.name, m, info, info.dtype))
            continue
        n += 1
        if not prefix and short != t.name:
            prefix = t.name[: len(t.name) - len(short)]
        out.append(OutTensor(t.name, m, info, F8, make=_quantize(m, t.name, scales)))
        base = t.name[: -len("weight")]
        skey = base + ("scale_weight" if fmt == "comfy" else "weight_scale")
        out.append(OutTensor(skey, m, _scalar_info(skey), F32, make=_scale(t.name, scales)))
        if fmt == "comfy-mixed":
            raw = np.frombuffer(json.dumps({"format": "float8_e4m3fn"}).encode(), np.uint8)
            u8 = dtypes.from_code("U8")
            qi = TensorInfo(u8, (raw.size,), (1,), 0, Storage(base + "comfy_quant", u8, raw.size))
            out.append(OutTensor(base + "comfy_quant", m, qi, u8, make=_const(raw)))
    if n and fmt == "comfy":
        out.append(
            OutTensor(prefix + MARKER, m, _marker_info(), F8, make=lambda: np.zeros(0, F8.numpy))
        )
    return out, [f"{n} Linear weight(s) written as scaled float8_e4m3fn ({fmt} spelling)"]


def _quantize(m: ModelFile, name: str, scales: _Scales) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        scale = scales.get(name)
        w = m.read(name)
        v = w.astype(np.float32) / scale
        q, _ = cast(v.reshape(-1), F32, F8)
        return q.reshape(w.shape)

    return make


def _const(a: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: a


def _scale(name: str, scales: _Scales) -> Callable[[], np.ndarray]:
    return lambda: np.asarray(scales.get(name), np.float32).reshape(())
