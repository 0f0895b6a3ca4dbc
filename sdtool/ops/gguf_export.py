"""Export a diffusion model (or a T5 text encoder) to GGUF in the layout ComfyUI-GGUF loads.

The rules are ComfyUI-GGUF's (city96/ComfyUI-GGUF ``tools/convert.py``, ``tools/lcpp.patch``,
``tools/fix_5d_tensors.py``, ``loader.py``), done in one streamed pass instead of its
three steps (convert to F16/BF16 GGUF, patched ``llama-quantize``, 5-D fix):

1. Keys: ``model.diffusion_model.`` / ``model.`` is stripped (keys without it are dropped: a
   full checkpoint's VAE and text encoders), or ``net.`` when every key has it. The
   architecture is detected from key sets (``ARCHS``, in convert.py's order); diffusers-format
   Flux/SD3/AuraFlow are refused (ComfyUI-GGUF cannot load them). Names over 127 characters
   are refused.
2. Base type (convert.py): BF16 for a bf16 tensor, else F16; F32 for an fp32/bf16 tensor that
   is 1-D, has <= 1024 elements, or matches the architecture's ``hiprec`` keys.
   SD1/SDXL only: a tensor with > 1 dims, >= 512 elements, a multiple of 256 elements and a
   last dim not a multiple of 256 is stored as [n/256, 256], its shape in the INT32 array
   KV ``comfy.gguf.orig_shape.<name>``. Tensors with more than 4 dims (Wan, HunyuanVideo
   conv3d) are written in F32 with all their dims, as fix_5d_tensors.py adds them back.
3. Quantized types (lcpp.patch): only tensors named ``*weight`` with exactly two ggml dims,
   outside the architecture's never-quantize list; the ``_K_M`` mixes and the Q4_0/Q5_0
   ffn-down bump as the patch defines them; a K-quant row not a multiple of 256 (or a
   Q4_0..Q8_0 row not a multiple of 32) falls back to F16.

Values are quantized from the source values widened to float32 (ComfyUI-GGUF's pipeline goes
through an F16 file first for fp32 sources; sdtool does not, so nothing is rounded twice).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdtool.errors import SdtoolError, UsageError
from sdtool.formats import ggml
from sdtool.formats.gguf import KV, T_ARRAY, T_INT32, T_STRING, T_UINT32
from sdtool.model import ModelFile, TensorInfo
from sdtool.ops.fp8scaled import Scaled, dequantized, find_scaled, is_aux
from sdtool.write.gguf import OutGGUF, Span, write_gguf
from sdtool.write.gguf import verify_gguf as _verify

MAX_NAME = 127
QUANT_THRESHOLD = 1024  # convert.py: tensors up to this many elements stay F32
REARRANGE_THRESHOLD = 512
MAX_GGML_DIMS = 4

#: --quant choice -> (base quantized type, llama.cpp file type id)
QUANTS: dict[str, tuple[str, int]] = {
    "F16": ("F16", 1),
    "BF16": ("BF16", 32),
    "Q8_0": ("Q8_0", 7),
    "Q6_K": ("Q6_K", 18),
    "Q5_K_M": ("Q5_K", 17),
    "Q5_1": ("Q5_1", 9),
    "Q5_0": ("Q5_0", 8),
    "Q4_K_M": ("Q4_K", 15),
    "Q4_1": ("Q4_1", 3),
    "Q4_0": ("Q4_0", 2),
}


@dataclass(frozen=True)
class Arch:
    """One architecture as ComfyUI-GGUF's convert.py + lcpp.patch treat it."""

    name: str
    detect: tuple[tuple[str, ...], ...]  # any key set fully present detects it
    banned: tuple[str, ...] = ()  # keys of the diffusers layout it cannot load
    hiprec: tuple[str, ...] = ()  # substrings kept F32 (raw nn.Parameters)
    ignore: tuple[str, ...] = ()  # substrings of keys dropped
    shape_fix: bool = False  # the [n/256, 256] reshape (SD1/SDXL)
    keep: tuple[str, ...] = ()  # substrings never quantized
    keep_exact: tuple[str, ...] = ()  # names never quantized
    image: bool = True  # lcpp.patch image-model rules (exactly 2 dims); False: llama.cpp's


# fmt: off
ARCHS: tuple[Arch, ...] = (
    Arch(
        "flux",
        (
            ("transformer_blocks.0.attn.norm_added_k.weight",),
            ("double_blocks.0.img_attn.proj.weight",),
        ),
        banned=("transformer_blocks.0.attn.norm_added_k.weight",),
        keep=("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    ),
    Arch(
        "sd3",
        (
            ("transformer_blocks.0.attn.add_q_proj.weight",),
            ("joint_blocks.0.x_block.attn.qkv.weight",),
        ),
        banned=("transformer_blocks.0.attn.add_q_proj.weight",),
        keep=(
            "final_layer.",
            "time_text_embed.",
            "context_embedder.",
            "t_embedder.",
            "y_embedder.",
            "x_embedder.",
        ),
        keep_exact=("proj_out.weight", "pos_embed"),
    ),
    Arch(
        "aura",
        (
            ("double_layers.3.modX.1.weight",),
            ("joint_transformer_blocks.3.ff_context.out_projection.weight",),
        ),
        banned=("joint_transformer_blocks.3.ff_context.out_projection.weight",),
        keep=("t_embedder.", "init_x_linear."),
        keep_exact=(
            "modF.1.weight",
            "cond_seq_linear.weight",
            "final_linear.weight",
            "positional_encoding",
            "register_tokens",
        ),
    ),
    Arch(
        "hidream",
        (
            (
                "caption_projection.0.linear.weight",
                "double_stream_blocks.0.block.ff_i.shared_experts.w3.weight",
            ),
        ),
        hiprec=(".ff_i.gate.weight", "img_emb.emb_pos"),
        keep=(
            "p_embedder.",
            "t_embedder.",
            "x_embedder.",
            "final_layer.",
            ".ff_i.gate.weight",
            "caption_projection.",
        ),
    ),
    Arch(
        "cosmos",
        (("blocks.0.mlp.layer1.weight", "blocks.0.adaln_modulation_cross_attn.1.weight"),),
        hiprec=("pos_embedder",),
        ignore=("_extra_state", "accum_"),
        keep=(
            "p_embedder.",
            "t_embedder.",
            "t_embedding_norm.",
            "x_embedder.",
            "pos_embedder.",
            "final_layer.",
        ),
    ),
    Arch(
        "ltxv",
        (
            (
                "adaln_single.emb.timestep_embedder.linear_2.weight",
                "transformer_blocks.27.scale_shift_table",
                "caption_projection.linear_2.weight",
            ),
        ),
        hiprec=("scale_shift_table",),
        keep=(
            "adaln_single.",
            "caption_projection.",
            "patchify_proj.",
            "proj_out.",
            "scale_shift_table",
        ),
    ),
    Arch(
        "hyvid",
        (
            (
                "double_blocks.0.img_attn_proj.weight",
                "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight",
            ),
        ),
        keep=("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    ),
    Arch(
        "wan",
        (("blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation"),),
        hiprec=(".modulation",),
        keep=(
            "modulation.",
            "patch_embedding.",
            "text_embedding.",
            "time_projection.",
            "time_embedding.",
            "img_emb.",
            "head.",
        ),
    ),
    Arch(
        "sdxl",
        (
            ("down_blocks.0.downsamplers.0.conv.weight", "add_embedding.linear_1.weight"),
            (
                "input_blocks.3.0.op.weight",
                "input_blocks.6.0.op.weight",
                "output_blocks.2.2.conv.weight",
                "output_blocks.5.2.conv.weight",
            ),
            ("label_emb.0.0.weight",),
        ),
        shape_fix=True,
        keep=(
            "class_embedding.",
            "time_embedding.",
            "add_embedding.",
            "time_embed.",
            "label_emb.",
            "conv_in.",
            "conv_out.",
        ),
        keep_exact=("input_blocks.0.0.weight", "out.2.weight"),
    ),
    Arch(
        "sd1",
        (
            ("down_blocks.0.downsamplers.0.conv.weight",),
            (
                "input_blocks.3.0.op.weight",
                "input_blocks.6.0.op.weight",
                "input_blocks.9.0.op.weight",
                "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight",
                "output_blocks.8.2.conv.weight",
            ),
        ),
        shape_fix=True,
        keep=(
            "class_embedding.",
            "time_embedding.",
            "add_embedding.",
            "time_embed.",
            "label_emb.",
            "conv_in.",
            "conv_out.",
        ),
        keep_exact=("input_blocks.0.0.weight", "out.2.weight"),
    ),
    Arch(
        "lumina2",
        (("cap_embedder.1.weight", "context_refiner.0.attention.qkv.weight"),),
        keep=(
            "t_embedder.",
            "x_embedder.",
            "final_layer.",
            "cap_embedder.",
            "context_refiner.",
            "noise_refiner.",
        ),
    ),
)
#: T5 encoders (flux/sd3's t5xxl): llama.cpp's "t5encoder" names, which ComfyUI-GGUF maps back
T5 = Arch("t5encoder", (("encoder.block.0.layer.0.SelfAttention.q.weight",),), image=False,
          keep=("attn_rel_b.",))
T5_NAMES: tuple[tuple[str, str], ...] = (
    (r"^shared\.", "token_embd."),
    (r"^encoder\.final_layer_norm\.", "enc.output_norm."),
    (
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.",
        r"enc.blk.\1.attn_rel_b.",
    ),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkv])\.", r"enc.blk.\1.attn_\2."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.o\.", r"enc.blk.\1.attn_o."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"enc.blk.\1.attn_norm."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"enc.blk.\1.ffn_gate."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"enc.blk.\1.ffn_up."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi\.", r"enc.blk.\1.ffn_up."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"enc.blk.\1.ffn_down."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"enc.blk.\1.ffn_norm."),
)
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "transformer.")

# lcpp.patch img_tensor_get_type: name substrings -> the type each mix gives them
_V = ("attn_v.weight", ".to_v.weight", ".v.weight", ".attn.w1v.weight", ".attn.w2v.weight",
      "_attn.v_proj.weight")
_QKV = ("attn_qkv.weight", "attn.qkv.weight", "attention.qkv.weight")
_FFN_DOWN = ("ffn_down", ".ffn.2.weight", ".ff.net.2.weight", ".mlp.layer2.weight",
             ".adaln_modulation_mlp.2.weight", ".feed_forward.w2.weight")
MIX: dict[str, dict[str, str]] = {
    # quant -> {rule: type}
    "Q4_K_M": {"v": "Q6_K", "qkv": "Q5_K", "ffn_down": "Q6_K"},
    "Q5_K_M": {"v": "Q6_K", "qkv": "Q6_K", "ffn_down": "Q6_K"},
    "Q4_0": {"ffn_down": "Q4_1"},
    "Q5_0": {"ffn_down": "Q5_1"},
}
# fmt: on


def _rule(name: str) -> str | None:
    if any(s in name for s in _V):
        return "v"
    if any(s in name for s in _QKV):
        return "qkv"
    if any(s in name for s in _FFN_DOWN) or ("experts." in name and ".w2.weight" in name):
        return "ffn_down"
    return None


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml's n_dims: the innermost-first dims up to the last one above 1 (at least 1)."""
    ne = tuple(reversed(shape))
    return max([i + 1 for i, d in enumerate(ne) if d > 1], default=1)


@dataclass
class GGUFExport:
    """The planned GGUF: architecture, KV pairs, tensors (and, once written, its size)."""

    arch: str
    quant: str
    tensors: list[OutGGUF]
    kv: list[tuple[str, KV]]
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nbytes: int = 0
    types: dict[str, int] = field(default_factory=dict)


def _strip(keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """convert.py's strip_prefix: (new name -> source name, dropped source names)."""
    for pfx in ("model.diffusion_model.", "model."):
        if any(k.startswith(pfx) for k in keys):
            kept = {k.replace(pfx, ""): k for k in keys if pfx in k}
            return kept, [k for k in keys if pfx not in k]
    if keys and all(k.startswith("net.") for k in keys):
        return {k.replace("net.", ""): k for k in keys}, []
    return {k: k for k in keys}, []


def detect(names: set[str]) -> Arch | None:
    """The architecture whose key set is present (ARCHS order), T5, or None."""
    for arch in ARCHS:
        for keys in arch.detect:
            if all(k in names for k in keys):
                if any(k in names for k in arch.banned):
                    raise UsageError(
                        f"a diffusers-format {arch.name} model: ComfyUI-GGUF loads the original "
                        "layout only (convert it to a single file first)"
                    )
                return arch
    if any(all(k in names for k in keys) for keys in T5.detect):
        return T5
    return None


def _t5_names(names: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    out: dict[str, str] = {}
    dropped: list[str] = []
    for new, src in names.items():
        n = new
        for pfx in T5_PREFIXES:
            if n.startswith(pfx):
                n = n[len(pfx) :]
                break
        for pat, rep in T5_NAMES:
            m = re.sub(pat, rep, n)
            if m != n:
                out[m] = src
                break
        else:
            dropped.append(src)  # encoder.embed_tokens (tied to shared), decoder.*
    return out, dropped


def base_type(arch: Arch, name: str, info: TensorInfo) -> str:
    """convert.py's type for a tensor before llama-quantize."""
    if not info.dtype.is_float:
        return "F32"
    src = info.dtype.code
    base = "BF16" if src == "BF16" else "F16"
    if src in ("F32", "BF16") and (
        len(info.shape) == 1 or info.numel <= QUANT_THRESHOLD or any(h in name for h in arch.hiprec)
    ):
        base = "F32"
    return base


def quant_type(arch: Arch, name: str, shape: tuple[int, ...], quant: str) -> tuple[str | None, str]:
    """lcpp.patch: the quantized type of a tensor (None: keep its base type) and a note."""
    if not name.endswith("weight"):
        return None, ""
    nd = ggml_n_dims(shape)
    if (arch.image and nd != 2) or (not arch.image and nd < 2):
        return None, ""
    if any(k in name for k in arch.keep) or name in arch.keep_exact:
        return None, ""
    base = QUANTS[quant][0]
    rule = _rule(name)
    t = MIX.get(quant, {}).get(rule or "", base)
    row = shape[-1]
    block = ggml.get(t).block
    if row % block:
        return "F16", f"{name}: rows of {row} are not whole {t} blocks ({block}); written as F16"
    return t, ""


def plan_export(m: ModelFile, quant: str, *, threads: int = 1) -> GGUFExport:
    """Decide every tensor's name, stored shape and type (reads no tensor bytes)."""
    if quant not in QUANTS:
        raise UsageError(f"quant= must be one of {', '.join(QUANTS)}, not {quant!r}")
    names, dropped = _strip(list(m.tensors))
    arch = detect(set(names))
    if arch is None:
        raise UsageError(
            "not a model ComfyUI-GGUF loads from GGUF (Flux, SD3, SD1/SDXL UNet, AuraFlow, "
            "HiDream, Cosmos, LTXV, HunyuanVideo, Wan, Lumina2, or a T5 encoder): "
            "its keys match none of them"
        )
    if arch is T5:
        names, more = _t5_names(names)
        dropped += more
        if (
            "token_embd.weight" in names
            and m.tensors[names["token_embd.weight"]].shape[0] > 100_000
        ):
            raise UsageError(
                "a UMT5 encoder: ComfyUI-GGUF rebuilds its tokenizer from llama.cpp's "
                "tokenizer metadata, which sdtool does not write; use llama.cpp's converter"
            )
    long = [n for n in names if len(n) > MAX_NAME]
    if long:
        raise UsageError(
            f"tensor names longer than {MAX_NAME} characters cannot be loaded by "
            f"ComfyUI-GGUF: {long[:3]}"
        )
    kv: list[tuple[str, KV]] = [
        ("general.architecture", KV(T_STRING, arch.name)),
        ("general.quantization_version", KV(T_UINT32, 2)),
    ]
    main = _main_dtype(m, names)
    file_type = QUANTS[quant][1]
    kv.append(("general.file_type", KV(T_UINT32, file_type)))
    out: list[OutGGUF] = []
    notes: list[str] = []
    scaled = find_scaled(m)
    if scaled:
        notes.append(f"{len(scaled)} scaled-fp8 weight(s) multiplied by their scales")
    for new, src in names.items():
        if any(s in new for s in arch.ignore) or (scaled and is_aux(src, m)):
            dropped.append(src)
            continue
        info = m.tensors[src]
        shape = info.shape
        typ = base_type(arch, new, info)
        if len(shape) > MAX_GGML_DIMS:
            read = _reader(m, src, info, scaled=scaled.get(src))
            out.append(OutGGUF(new, shape, "F32", read, info.type_code, span=_span(m, src, info)))
            notes.append(f"{new}: {len(shape)}-D, written as F32 (ComfyUI-GGUF's 5-D fix)")
            continue
        if (
            arch.shape_fix
            and len(shape) > 1
            and info.numel >= REARRANGE_THRESHOLD
            and info.numel % 256 == 0
            and shape[-1] % 256
        ):
            kv.append((f"comfy.gguf.orig_shape.{new}", KV(T_ARRAY, list(shape), T_INT32)))
            shape = (info.numel // 256, 256)
        if quant in ("F16", "BF16"):
            typ = typ if typ == "F32" else quant
        else:
            qt, note = quant_type(arch, new, shape, quant)
            if qt is not None:
                typ = qt
            if note:
                notes.append(note)
        read = _reader(m, src, info, f16=typ == "F16", scaled=scaled.get(src))
        span = None if src in scaled else _span(m, src, info)
        out.append(OutGGUF(new, shape, typ, read, info.type_code, span=span))
    if main == "BF16" and quant == "F16":
        notes.append("bf16 tensors written as F16 (ComfyUI-GGUF keeps bf16 models in BF16)")
    types: dict[str, int] = {}
    for t in out:
        types[t.type] = types.get(t.type, 0) + 1
    return GGUFExport(arch.name, quant, out, kv, dropped, notes, types=types)


def _main_dtype(m: ModelFile, names: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for src in names.values():
        c = m.tensors[src].type_code
        counts[c] = counts.get(c, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else "F32"


def _span(m: ModelFile, name: str, info: TensorInfo) -> Span | None:
    """Where the tensor's values lie raw in the file (None: they must be computed)."""
    span = info.file_span
    if span is None or not info.dtype.is_float:
        return None
    off, n = span
    if n != info.numel * info.dtype.itemsize:
        return None

    def check() -> None:
        m.check_end(name, off + n)

    # bf16 as its bits: the encoders read them without ml_dtypes (whose import costs ~1.5 s)
    dtype = ggml.BF16_BITS if info.type_code == "BF16" else np.dtype(info.dtype.numpy)
    return Span(Path(m.path), off, dtype, check)


def _reader(
    m: ModelFile,
    name: str,
    info: TensorInfo,
    *,
    f16: bool = False,
    scaled: Scaled | None = None,
) -> Callable[[], np.ndarray]:
    """The tensor's values, read with pread when its bytes lie in the file (so the source
    is not mapped: resident memory stays about this one tensor)."""

    def read() -> np.ndarray:
        span = info.file_span
        if scaled is not None:
            values = dequantized(m, scaled)()
        elif span is not None:
            off, n = span
            m.check_end(name, off + n)
            buf = np.empty(n, np.uint8)
            fd = os.open(m.path, os.O_RDONLY)
            try:
                view, got = buf.data, 0
                while got < n:
                    k = os.preadv(fd, [view[got:]], off + got)
                    if k <= 0:
                        raise SdtoolError(
                            f"tensor {name!r} ends early; the file shrank", path=m.path
                        )
                    got += k
            finally:
                os.close(fd)
            values = buf.view(info.dtype.numpy).reshape(info.shape)
        else:
            values = m.read_info(info, name)
        if f16 and values.dtype.kind == "f" and values.dtype.itemsize > 2:
            with np.errstate(over="ignore", invalid="ignore"):
                half = values.astype(np.float16)
            over = int(np.count_nonzero(np.isinf(half) & np.isfinite(values)))
            if over:
                raise UsageError(
                    f"tensor {name!r}: {over} value(s) overflow float16; write BF16 or a "
                    "quantized type instead",
                    path=m.path,
                )
            return half
        return values

    return read


def write_gguf_plan(
    plan: GGUFExport,
    f: Any,
    *,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Stream the planned tensors to the open binary file ``f`` (``write/gguf.py``)."""
    plan.nbytes = write_gguf(
        f, plan.kv, plan.tensors, threads=threads or ggml.default_threads(), progress=progress
    )
    return plan.nbytes


def verify_gguf(plan: GGUFExport, written: Path) -> None:
    """Re-read ``written``: every tensor's stored bytes equal a fresh quantization of its
    source values, and the header names the planned types and shapes."""
    _verify(plan.tensors, written)


def quant_count(plan: GGUFExport) -> int:
    return sum(1 for t in plan.tensors if ggml.get(t.type).quantized)
