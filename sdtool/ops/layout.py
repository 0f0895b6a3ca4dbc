"""Single file <-> diffusers folder, streamed through the writer, using sdtool.layouts' tables.

``to_diffusers``: a single-file checkpoint (ldm / sgm names) -> a diffusers folder
(``model_index.json``, one folder per component with its config, ``scheduler/``). Every tensor is
written as a view of its source where it can be (renames, row slices of fused q/k/v, 1x1-conv
squeezes, transposes: bytes copied as they are); only joins and half-swaps are computed, one
tensor at a time. Tensors no diffusers component has a slot for (EMA weights, the noise
schedule, CLIP's ``position_ids``, OpenCLIP's ``logit_scale``...) and the input's metadata go to
``single_file_extras.safetensors`` at the folder's root, so ``to_single`` gives every tensor back
bit for bit under its original name. Tokenizers are copied from ``tokenizers_from`` (a diffusers
folder) or not written (sdtool has no vocabulary files and never downloads): model_index.json
lists them as [null, null]; load with ``tokenizer=None`` / ``tokenizer=...``.

``to_single``: a diffusers folder, a component folder or a component file -> one file as ComfyUI
/ A1111 load it (a whole checkpoint with its prefixes; a lone component without them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sdtool.errors import OutputError, SdtoolError, UsageError
from sdtool.formats.open import open_model
from sdtool.layouts import Mapping, components, family_name, keymap, op_shape, part_rows
from sdtool.layouts import configs as C
from sdtool.model import ModelFile, Storage, TensorInfo, contiguous_strides
from sdtool.results import Result, json_key, rounded, rows
from sdtool.write import OutTensor, write_model

EXTRAS = "single_file_extras.safetensors"
#: the weights file of each kind of component folder
WEIGHTS = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}
#: keys a component's table maps but its diffusers model has no slot for (kept in EXTRAS)
NO_SLOT = ("embeddings.position_ids",)
#: single-file keys of a component that go to EXTRAS although under its prefix (no slot)
COMPONENT_NAMES = {"text-encoder": "text_encoder", "text-encoder-2": "text_encoder_2"}


@dataclass(frozen=True)
class LayoutResult(Result):
    """What a layout conversion wrote (or would write, for a dry run)."""

    JSON_SCHEMA: ClassVar[str | None] = "sdtool.layout/1"

    input: Path = field(metadata=json_key("path"))
    output: Path
    direction: str  # to_diffusers | to_single
    family: str
    files: dict[str, int] = field(default_factory=dict)  # relative path -> tensors
    #: source, target, how
    mapping: list[tuple[str, str, str]] = field(
        default_factory=list, metadata=json_key(as_=rows("source", "target", "how"))
    )
    extras: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output_bytes: int = 0
    verified: bool = False
    dry_run: bool = False
    seconds: float = field(default=0.0, metadata=json_key(as_=rounded))


# -- family detection ---------------------------------------------------------------------------

#: a single-file key prefix that only one family has -> the family (first match wins)
SINGLE_MARKERS: tuple[tuple[str, str], ...] = (
    ("conditioner.embedders.1.model.", "sdxl-base"),
    ("conditioner.embedders.0.model.", "sdxl-refiner"),
    ("cond_stage_model.model.", "sd2"),
    ("cond_stage_model.transformer.", "sd1"),
)
#: UNet cross-attention width -> family (the context the UNet was trained with)
CROSS_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl-base", 1280: "sdxl-refiner"}


def unet_family(
    tensors: dict[str, TensorInfo], level: str, add: str, proj: str, per_level: int = 1
) -> str:
    """SD1 / SD2 / SDXL base / refiner from a UNet's structure alone (tiny widths too): SDXL has
    the text_time embedding (3 levels base, 4 refiner); SD1 projects attention with 1x1 convs,
    SD2 with Linear layers (diffusers' use_linear_projection)."""
    n = 0
    while any(level.format(n * per_level + (per_level > 1)) in k for k in tensors):
        n += 1
    if any(add in k for k in tensors):
        return "sdxl-base" if n <= 3 else "sdxl-refiner"
    dims = {len(info.shape) for k, info in tensors.items() if k.endswith(proj)}
    return "sd1" if 4 in dims else "sd2"


def detect_single(m: ModelFile) -> str:
    """The family of a single-file checkpoint, from its text-encoder prefix or UNet width."""
    blocks = {
        k.split("joint_blocks.", 1)[1].split(".", 1)[0] for k in m.tensors if "joint_blocks." in k
    }
    if blocks:
        return "sd3.5-large" if len(blocks) >= 38 else "sd3"
    if any("double_blocks." in k for k in m.tensors):
        return "flux"
    for prefix, fam in SINGLE_MARKERS:
        if any(k.startswith(prefix) for k in m.tensors):
            return fam
    if any(".input_blocks." in k or k.startswith("input_blocks.") for k in m.tensors):
        return unet_family(m.tensors, "input_blocks.{}.", "label_emb.", "proj_in.weight", 3)
    raise UsageError(
        "cannot tell the model family (SD1, SD2, SDXL base/refiner) from the keys; pass --family",
        path=m.path,
    )


# -- plans ----------------------------------------------------------------------------------------


def _view(holder: ModelFile, info: TensorInfo, m: Mapping) -> TensorInfo | None:
    """``info`` through ``m`` as a view of the same bytes, or None when values must be computed."""
    shape = op_shape(m.op, info.shape)
    if m.kind == "split":
        a, b = part_rows(shape[0], m.parts, m.part)
        if m.op != "copy":
            return None
        return TensorInfo(
            info.dtype, (b - a, *shape[1:]), info.strides, info.offset + a * info.strides[0],
            info.storage,
        )  # fmt: skip
    if m.op == "copy":
        return info
    if m.op in ("squeeze", "unsqueeze"):
        if not info.is_contiguous:
            return None
        return TensorInfo(info.dtype, shape, contiguous_strides(shape), info.offset, info.storage)
    if m.op == "transpose" and len(info.shape) == 2:
        return TensorInfo(info.dtype, shape, info.strides[::-1], info.offset, info.storage)
    return None


def _computed(
    name: str, dtype: Any, shape: tuple[int, ...], make: Callable[[], np.ndarray]
) -> TensorInfo:
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def load() -> bytes:
        return np.ascontiguousarray(make()).tobytes()

    return TensorInfo(
        dtype, shape, contiguous_strides(shape), 0, Storage(name, dtype, n, load=load)
    )


def build_component_plan(model: ModelFile, maps: dict[str, tuple[Mapping, ...]]) -> list[OutTensor]:
    """OutTensors for one output file from resolved mappings (views where possible)."""
    from sdtool.layouts import apply_op

    plan: list[OutTensor] = []
    joins: dict[str, list[tuple[int, str, Mapping]]] = {}
    for key, ms in maps.items():
        holder, info = model.locate(key)
        for m in ms:
            if m.kind == "join":
                joins.setdefault(m.target, []).append((m.part, key, m))
                continue
            view = _view(holder, info, m)
            if view is not None:
                plan.append(OutTensor(m.target, holder, view, view.dtype))
                continue

            def make(h: ModelFile = holder, i: TensorInfo = info, mm: Mapping = m) -> np.ndarray:
                arr = apply_op(mm.op, h.read_info(i, mm.source))
                if mm.kind == "split":
                    a, b = part_rows(arr.shape[0], mm.parts, mm.part)
                    arr = arr[a:b]
                return arr

            shape = op_shape(m.op, info.shape)
            if m.kind == "split":
                a, b = part_rows(shape[0], m.parts, m.part)
                shape = (b - a, *shape[1:])
            ci = _computed(m.target, info.dtype, shape, make)
            plan.append(OutTensor(m.target, holder, ci, info.dtype, make))
    for target, pieces in joins.items():
        pieces.sort()
        if [p for p, _, _ in pieces] != list(range(len(pieces[0][2].parts))):
            missing = sorted(set(range(len(pieces[0][2].parts))) - {p for p, _, _ in pieces})
            raise UsageError(f"cannot build {target!r}: piece(s) {missing} of it are missing")
        infos = [model.locate(k) for _, k, _ in pieces]
        ops = [m.op for _, _, m in pieces]
        dtype = infos[0][1].dtype
        rows = sum(op_shape(o, i.shape)[0] for o, (_, i) in zip(ops, infos, strict=True))
        shape = (rows, *op_shape(ops[0], infos[0][1].shape)[1:])

        def make_join(
            parts: list[tuple[ModelFile, TensorInfo]] = infos, o: list[str] = ops, t: str = target
        ) -> np.ndarray:
            return np.concatenate(
                [apply_op(op, h.read_info(i, t)) for op, (h, i) in zip(o, parts, strict=True)]
            )

        ci = _computed(target, dtype, shape, make_join)
        plan.append(OutTensor(target, infos[0][0], ci, dtype, make_join))
    return plan


def _how(ms: Sequence[Mapping]) -> str:
    m = ms[0]
    if m.kind == "split":
        return f"split rows {':'.join(map(str, m.parts))}"
    if m.kind == "join":
        return f"join piece {m.part + 1}/{len(m.parts)}"
    return "rename" if m.op == "copy" else m.op


# -- folder output ------------------------------------------------------------------------------


class _FolderOutput:
    """A temp folder beside ``out`` that becomes ``out`` only when everything was written."""

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out = out
        if out.exists() and not overwrite:
            raise OutputError("exists (pass overwrite=True to replace it)", path=out)
        if out.exists() and not out.is_dir():
            raise OutputError("exists and is not a folder", path=out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(
            tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".sdtool-tmp", dir=out.parent)
        )

    def commit(self) -> None:
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.sdtool-old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _write(
    plan: list[OutTensor], path: Path, meta: dict[str, str], verify: bool,
    max_shard_size: str | int | None,
) -> tuple[int, int]:  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    if max_shard_size is not None:
        from sdtool.ops.shards import write_sharded

        r = write_sharded(plan, path, max_shard_size=max_shard_size, metadata=meta, verify=verify)
        return len(plan), r.nbytes
    w = write_model(plan, path, metadata=meta, verify=verify)
    return w.tensors, w.nbytes


def to_diffusers(
    src: str | Path,
    out_dir: str | Path,
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    overwrite: bool = False,
    verify: bool = False,
    dry_run: bool = False,
    max_shard_size: str | int | None = None,
    tokenizers_from: str | Path | None = None,
) -> LayoutResult:
    """Write the single-file checkpoint ``src`` as the diffusers folder ``out_dir``.

    Args:
        family: "sd1", "sd2", "sdxl-base", "sdxl-refiner"; None: told from the keys.
        prediction_type: the scheduler's ("epsilon", "v_prediction"); None: the family's
            (SD2: v_prediction, as diffusers assumes; the file does not say).
        verify: re-read every written file and compare it bit for bit with its sources.
        dry_run: resolve the mapping and return it; write nothing.
        max_shard_size: shard each component's weights (``"5GB"``), with an index.
        tokenizers_from: a diffusers folder (or a hub snapshot of one) whose ``tokenizer*/``
            folders are copied in for the family's tokenizer slots (sdtool ships none).

    Raises UsageError for a family sdtool has no tables for, OutputError for an existing
    ``out_dir`` without ``overwrite``; nothing is left behind on any error.
    """
    t0 = time.perf_counter()
    src, out_dir = Path(src), Path(out_dir)
    with open_model(src) as m:
        fam = family_name(family) if family else detect_single(m)
        res = LayoutResult(src, out_dir, "to_diffusers", fam, dry_run=dry_run)
        route = {_prefix(fam, comp): comp for comp in components(fam)}
        main = components(fam)[0]  # unet / transformer
        if not any(k.startswith(p) for k in m.tensors for p in route):
            route = {"": main}  # a bare UNet / transformer file (ComfyUI, BFL)
        per: dict[str, dict[str, tuple[Mapping, ...]]] = {c: {} for c in components(fam)}
        extras: list[str] = []
        for key in m.tensors:
            pre, comp = next(((p, c) for p, c in route.items() if key.startswith(p)), ("", None))
            maps = keymap(fam, comp, prefix=pre)(key) if comp else ()
            if not maps or any(m_.target.endswith(NO_SLOT) for m_ in maps):
                extras.append(key)
                continue
            per[comp][key] = maps  # type: ignore[index]
            res.mapping.extend((key, f"{comp}/{m_.target}", _how([m_])) for m_ in maps)
        res.extras.extend(extras)
        present = {c for c, maps in per.items() if maps}
        for comp in components(fam):
            if comp not in present:
                res.notes.append(
                    f"no {comp} in the input: model_index.json lists it as [null, null]"
                )
        tokens = _tokenizer_sources(fam, tokenizers_from)
        missing = [t for t in C.tokenizer_slots(fam) if t not in tokens]
        if missing:
            res.notes.append(
                f"no {', '.join(missing)} written (sdtool ships no vocabularies and downloads "
                "nothing): model_index.json lists them as [null, null]; add them with "
                "--tokenizers-from DIR (a diffusers folder of the family, e.g. a hub snapshot "
                "in ~/.cache/huggingface/hub); "
                + (
                    "the pipeline loads without them"
                    if fam.startswith("sdxl")
                    else "load with DiffusionPipeline.from_pretrained(out, "
                    + ", ".join(f"{t}=None" for t in missing)
                    + ")"
                )
            )
        if dry_run:
            return replace(res, seconds=time.perf_counter() - t0)
        folder = _FolderOutput(out_dir, overwrite)
        output_bytes = 0
        transformer_shapes: dict[str, tuple[int, ...]] | None = None
        try:
            for comp in sorted(present):
                plan = build_component_plan(m, per[comp])
                shapes = {t.name: t.shape for t in plan}
                lib = C.FAMILIES[fam].components[comp]
                assert lib is not None
                dtype = str(plan[0].dtype.numpy) if plan else "float32"
                cfg = _config(fam, comp, shapes, prediction_type, _torch_dtype_name(dtype))
                if comp == "transformer":
                    transformer_shapes = shapes
                _write_json(folder.tmp / comp / "config.json", cfg)
                rel = f"{comp}/{WEIGHTS[lib[0]]}"
                n, size = _write(plan, folder.tmp / rel, {"format": "pt"}, verify, max_shard_size)
                res.files[rel] = n
                output_bytes += size
            if fam in ("sd3", "sd3.5-large", "flux"):
                sched = C.flow_scheduler(fam, transformer_shapes)
            else:
                sched = C.scheduler_config(fam, prediction_type)
            _write_json(folder.tmp / "scheduler" / "scheduler_config.json", sched)
            index = C.model_index(fam, present)
            for slot, (srcdir, cls) in tokens.items():
                shutil.copytree(srcdir, folder.tmp / slot)  # symlinks (hub cache) followed
                index[slot] = ["transformers", cls]
                res.files[f"{slot}/"] = sum(1 for p in (folder.tmp / slot).rglob("*"))
            _write_json(folder.tmp / "model_index.json", index)
            if extras or m.metadata:
                meta = {**m.metadata, "sdtool.layout.family": fam}
                plan = [OutTensor(k, *m.locate(k), m.tensors[k].dtype) for k in extras]
                plan = [OutTensor(t.name, t.source, t.info, t.info.dtype) for t in plan]
                n, size = _write(plan, folder.tmp / EXTRAS, meta, verify, None)
                res.files[EXTRAS] = n
                output_bytes += size
            folder.commit()
        except BaseException:
            folder.abort()
            raise
        seconds = time.perf_counter() - t0
        return replace(res, output_bytes=output_bytes, verified=verify, seconds=seconds)


#: files a tokenizer folder needs, by transformers class (any one group suffices)
_TOKENIZER_FILES = {
    "CLIPTokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
    "T5TokenizerFast": (("spiece.model",), ("tokenizer.json",)),
}


def _tokenizer_sources(fam: str, folder: str | Path | None) -> dict[str, tuple[Path, str]]:
    """slot -> (the folder to copy, its class) for the family's tokenizer slots found in
    ``folder``; UsageError for a folder that is not there or a slot without its files."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--tokenizers-from: {folder} is not a folder")
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    out: dict[str, tuple[Path, str]] = {}
    for slot, default in C.tokenizer_slots(fam).items():
        d = folder / slot
        if not d.is_dir():
            continue
        entry = index.get(slot)
        cls = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else default
        if not any(all((d / f).is_file() for f in group) for group in _TOKENIZER_FILES[default]):
            need = " or ".join("+".join(g) for g in _TOKENIZER_FILES[default])
            raise UsageError(f"--tokenizers-from: {d} lacks the {default} files ({need})")
        out[slot] = (d, cls)
    if not out:
        raise UsageError(
            f"--tokenizers-from: {folder} has none of {', '.join(C.tokenizer_slots(fam))}/"
        )
    return out


def _config(
    fam: str, comp: str, shapes: dict[str, tuple[int, ...]], prediction_type: str | None, dtype: str
) -> dict[str, Any]:
    """The component's config.json from sdtool's tables and the written tensors' shapes."""
    if comp == "unet":
        return C.unet_config(fam, shapes, prediction_type)
    if comp == "transformer":
        return C.flux_config(shapes) if fam == "flux" else C.sd3_config(shapes)
    if comp == "vae":
        return C.vae_config(fam, shapes)
    if "shared.weight" in shapes:
        return C.t5_config(shapes, dtype)
    return C.clip_config(comp, shapes, dtype)


def _torch_dtype_name(numpy_name: str) -> str:
    return {"float16": "float16", "bfloat16": "bfloat16"}.get(numpy_name, "float32")


def _prefix(family: str, comp: str) -> str:
    from sdtool.layouts import single_prefix

    return single_prefix(family, comp)


# -- diffusers -> single file ---------------------------------------------------------------------


@dataclass
class _Source:
    """One component to read: its weights (opened), its table's component name."""

    component: str
    model: ModelFile


def _open_component(folder: Path, comp: str) -> ModelFile | None:
    d = folder / comp
    if not d.is_dir():
        return None
    return open_model(d)


def detect_diffusers(folder: Path) -> str:
    """The family of a diffusers folder, from model_index.json and the UNet's config."""
    try:
        index = json.loads((folder / "model_index.json").read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"model_index.json cannot be read ({e})", path=folder) from None
    cls = index.get("_class_name", "")
    if cls == "StableDiffusionXLPipeline":
        return "sdxl-base"
    if cls == "StableDiffusionXLImg2ImgPipeline":
        return "sdxl-refiner"
    if cls == "FluxPipeline":
        return "flux"
    if cls == "StableDiffusion3Pipeline":
        try:
            cfg = json.loads((folder / "transformer" / "config.json").read_text("utf-8"))
        except (OSError, json.JSONDecodeError):
            cfg = {}
        return "sd3.5-large" if cfg.get("num_layers") == 38 else "sd3"
    if cls == "StableDiffusionPipeline":
        try:
            cfg = json.loads((folder / "unet" / "config.json").read_text("utf-8"))
        except (OSError, json.JSONDecodeError):
            cfg = {}
        return "sd2" if cfg.get("use_linear_projection") else "sd1"
    raise UsageError(f"no layout tables for the pipeline {cls!r}", path=folder)


#: diffusers component-file keys -> which component they belong to
COMPONENT_MARKERS: tuple[tuple[str, str], ...] = (
    ("conv_in.weight", "unet"),
    ("x_embedder.weight", "transformer"),
    ("pos_embed.proj.weight", "transformer"),
    ("encoder.conv_in.weight", "vae"),
    ("text_model.embeddings.token_embedding.weight", "text_encoder"),
    ("embeddings.token_embedding.weight", "text_encoder"),
)


def to_single(
    src: str | Path,
    out: str | Path,
    *,
    family: str | None = None,
    components_: Sequence[str] | None = None,
    overwrite: bool = False,
    verify: bool = False,
    dry_run: bool = False,
) -> LayoutResult:
    """Write a diffusers folder (or one component folder / file) as one single file.

    A whole folder gives a checkpoint with the single-file prefixes (``model.diffusion_model.``,
    ``first_stage_model.``, ...) plus everything ``single_file_extras.safetensors`` kept; one
    component gives a bare component file (ComfyUI's UNet / VAE loaders read those).
    ``components_``: which of unet, vae, text-encoder, text-encoder-2 go in (default: all).
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    opened: list[ModelFile] = []
    try:
        sources: list[_Source] = []
        extras: ModelFile | None = None
        bare = not (src.is_dir() and (src / "model_index.json").is_file())
        if not bare:
            fam = family_name(family) if family else detect_diffusers(src)
            want = _wanted(components_, components(fam))
            for comp in components(fam):
                if comp in want and (mf := _open_component(src, comp)) is not None:
                    opened.append(mf)
                    sources.append(_Source(comp, mf))
            if components_ is None and (src / EXTRAS).is_file():
                extras = open_model(src / EXTRAS)
                opened.append(extras)
        else:
            mf = open_model(src)
            opened.append(mf)
            comp = _component_of(mf)
            fam = family_name(family) if family else _family_of_component(mf, comp)
            sources.append(_Source(comp, mf))
        res = LayoutResult(src, out, "to_single", fam, dry_run=dry_run)
        plan: list[OutTensor] = []
        for s in sources:
            km = keymap(fam, s.component, "to_single", prefix="" if bare else None)
            maps, missing = {}, []
            for key in s.model.tensors:
                found = km(_hub_name(s.component, key))
                if found:
                    maps[key] = found
                else:
                    missing.append(key)
            if missing:
                raise UsageError(
                    f"{len(missing)} {s.component} tensor(s) have no single-file name "
                    f"(first: {missing[0]!r}); is this a {fam} model?",
                    path=s.model.path,
                )
            plan += build_component_plan(s.model, maps)
            res.mapping.extend(
                (f"{s.component}/{k}", ms[0].target, _how(ms)) for k, ms in maps.items()
            )
        meta: dict[str, str] = {"format": "pt"}
        if extras is not None:
            for k in extras.tensors:
                plan.append(OutTensor(k, *extras.locate(k), extras.tensors[k].dtype))
                res.extras.append(k)
            meta.update({k: v for k, v in extras.metadata.items() if k != "sdtool.layout.family"})
        if not plan:
            raise UsageError("nothing to write: no component found", path=src)
        if dry_run:
            return replace(res, seconds=time.perf_counter() - t0)
        w = write_model(plan, out, metadata=meta, overwrite=overwrite, verify=verify)
        res.files[out.name] = w.tensors
        seconds = time.perf_counter() - t0
        return replace(res, output_bytes=w.nbytes, verified=w.verified, seconds=seconds)
    except SdtoolError:
        raise
    finally:
        for mf in opened:
            mf.close()


def _hub_name(component: str, key: str) -> str:
    """transformers >= 5.6 saves CLIPTextModel without ``text_model.``; the tables use the hub's."""
    if component.startswith("text_encoder") and key.startswith(
        ("embeddings.", "encoder.layers.", "final_layer_norm.")
    ):
        return "text_model." + key
    return key


def _wanted(chosen: Sequence[str] | None, available: list[str]) -> set[str]:
    if chosen is None:
        return set(available)
    out = set()
    for c in chosen:
        name = COMPONENT_NAMES.get(c, c)
        if name not in available:
            raise UsageError(f"--components: no {c!r} here; choose from {', '.join(available)}")
        out.add(name)
    return out


def _component_of(m: ModelFile) -> str:
    for key, comp in COMPONENT_MARKERS:
        if key in m.tensors:
            return comp
    raise UsageError(
        "not a diffusers UNet, VAE or CLIP text encoder (no conv_in / encoder.conv_in / "
        "token_embedding)",
        path=m.path,
    )


def _family_of_component(m: ModelFile, comp: str) -> str:
    if comp == "vae":
        return "sd1"  # the SD VAE layout is the same in SD1, SD2 and SDXL
    if comp == "unet":
        return unet_family(m.tensors, "down_blocks.{}.", "add_embedding.", "proj_in.weight")
    if comp == "transformer":
        if "x_embedder.weight" in m.tensors:
            return "flux"
        n = {k.split(".")[1] for k in m.tensors if k.startswith("transformer_blocks.")}
        return "sd3.5-large" if len(n) >= 38 else "sd3"
    raise UsageError("cannot tell the family of this component; pass --family", path=m.path)
