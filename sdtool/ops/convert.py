"""``convert``: one model file to safetensors or torch format, streamed, atomic, verifiable.

What goes in: the state dict (the loader unwraps ``state_dict``; ``key=`` picks another
sub-dict), under its dotted names, every tensor independent and contiguous (tied and sliced
tensors are written once per name). A textual-inversion embedding's single
``string_to_param.*`` tensor becomes ``emb_params``, the name A1111 reads. Non-tensor fields
(global_step, epoch, a TI's name/step ...) and the input's ``__metadata__`` go into the output
``__metadata__``, one JSON-encoded string per top-level key, plus ``format: pt``. Tensors that
lie outside the state dict (optimizer state) are not written and are listed in
``ConvertResult.not_carried``: nothing is dropped silently.

``convert_batch`` runs convert over files and folders into an output folder, in parallel, one
failure not stopping the rest.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdtool import dtypes
from sdtool.dtypes import DType
from sdtool.errors import SdtoolError, UsageError
from sdtool.formats.cast import CASTABLE
from sdtool.formats.open import open_model
from sdtool.formats.plan import OutTensor
from sdtool.model import ModelFile, tensor_leaves, to_plain
from sdtool.ops.write import OUT_FORMATS, output_format, write_model

#: --dtype choice -> dtype code (None: keep every tensor's dtype)
DTYPE_CHOICES: dict[str, str | None] = {
    "keep": None,
    "fp32": "F32",
    "fp16": "F16",
    "bf16": "BF16",
    "fp8_e4m3fn": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2",
}
#: non-tensor fields whose JSON is longer than this are left out of the metadata (with a note)
MAX_METADATA_VALUE = 64 * 1024
#: textual-inversion embeddings: the A1111 .pt layout -> the name A1111 reads in safetensors
TI_PREFIX, TI_NAME = "string_to_param.", "emb_params"
#: files convert_batch picks up inside folders
MODEL_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".sft", ".npy", ".npz"})
#: --to choice -> output extension
TO_SUFFIX = {"safetensors": ".safetensors", "ckpt": ".ckpt"}


@dataclass
class ConvertResult:
    """One file's conversion. ``to_json`` is the documented --json object (docs/convert.md)."""

    input: Path
    output: Path
    status: str = "converted"  # converted | skipped | failed
    input_format: str = ""
    output_format: str = ""
    dtype: str = "keep"
    tensors: int = 0
    cast: int = 0
    copied: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    overflows: dict[str, int] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    not_carried: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata_keys: list[str] = field(default_factory=list)
    verified: bool = False
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "input": str(self.input),
            "output": str(self.output),
            "status": self.status,
            "error": self.error,
            "input_format": self.input_format,
            "output_format": self.output_format,
            "dtype": self.dtype,
            "tensors": self.tensors,
            "cast": self.cast,
            "copied": self.copied,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "overflows": self.overflows,
            "renamed": self.renamed,
            "not_carried": self.not_carried,
            "notes": self.notes,
            "metadata_keys": self.metadata_keys,
            "verified": self.verified,
            "seconds": round(self.seconds, 3),
        }


def parse_dtype(name: str) -> DType | None:
    """A --dtype choice -> the target dtype (None for keep); UsageError for anything else."""
    if name not in DTYPE_CHOICES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, not {name!r}")
    code = DTYPE_CHOICES[name]
    return None if code is None else dtypes.from_code(code)


def parse_metadata(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings -> a dict; UsageError for a pair without ``=``."""
    out: dict[str, str] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise UsageError(f"--metadata wants KEY=VALUE, got {p!r}")
        out[k] = v
    return out


def build_plan(
    m: ModelFile, dtype: DType | None
) -> tuple[list[OutTensor], dict[str, str], list[str]]:
    """The output tensors of ``m`` cast to ``dtype``, the renames made, and notes.

    Floating tensors are cast (the ones sdtool casts torch-exactly); integer, bool and complex
    tensors keep their dtype (int64 ``position_ids`` stays int64).
    """
    renamed: dict[str, str] = {}
    ti = [n for n in m.tensors if n.startswith(TI_PREFIX)]
    if len(ti) == 1 and len(m.tensors) == 1:
        renamed[ti[0]] = TI_NAME
    notes: list[str] = []
    kept: dict[str, int] = {}
    plan: list[OutTensor] = []
    for name, info in m.tensors.items():
        target = info.dtype
        if dtype is not None and info.dtype.is_float:
            if info.dtype.code in CASTABLE:
                target = dtype
            else:
                kept[info.dtype.code] = kept.get(info.dtype.code, 0) + 1
        holder, held = m.locate(name)  # a shard's own file for sharded input: bytes copy as-is
        plan.append(OutTensor(renamed.get(name, name), holder, held, target))
    for code, n in kept.items():
        notes.append(f"{n} {code} tensor(s) kept as {code}: sdtool does not cast that dtype")
    return plan, renamed, notes


def build_metadata(
    m: ModelFile, *, carry: bool = True, add: dict[str, str] | None = None
) -> tuple[dict[str, str], list[str], list[str]]:
    """The output ``__metadata__``, what was not carried (tensors outside the state dict), notes.

    ``carry``: the input's metadata and its non-tensor fields (JSON per top-level key);
    ``format: pt`` is always set unless the input or ``add`` says otherwise; ``add`` wins.
    """
    meta: dict[str, str] = {}
    not_carried: list[str] = []
    notes: list[str] = []
    for k, v in m.extra.items():
        leaves = list(tensor_leaves(v))
        if leaves:
            size = sum(t.nbytes for t in leaves)
            not_carried.append(
                f"{k}: {len(leaves)} tensor(s), {size} bytes (outside the state dict)"
            )
    if carry:
        meta.update(m.metadata)
        for k, v in m.extra.items():
            key = str(k)
            if key in meta or any(True for _ in tensor_leaves(v)):
                continue
            enc = json.dumps(to_plain(v), ensure_ascii=False)
            if len(enc) > MAX_METADATA_VALUE:
                notes.append(
                    f"field {key!r} left out of the metadata: {len(enc)} bytes of JSON "
                    f"(over {MAX_METADATA_VALUE})"
                )
                continue
            meta[key] = enc
    meta.setdefault("format", "pt")
    meta.update(add or {})
    return meta, not_carried, notes


def convert(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str = "keep",
    key: str | None = None,
    metadata: dict[str, str] | None = None,
    carry_metadata: bool = True,
    overwrite: bool = False,
    verify: bool = False,
    on_overflow: str = "fail",
    max_shard_size: str | int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertResult:
    """Convert the model file ``src`` to ``out`` (format by ``out``'s extension).

    ``src`` may be a shard index or a folder holding a shard set (read as one model);
    ``max_shard_size`` (``"5GB"``, powers of 10) writes ``out`` as shards plus an index when the
    tensors do not fit in one (docs/layouts.md).

    Args:
        dtype: ``keep``, ``fp32``, ``fp16``, ``bf16``, ``fp8_e4m3fn`` or ``fp8_e5m2``: the
            dtype of floating tensors, cast exactly as torch's ``.to()``.
        key: a dotted path to the sub-dict to convert instead of the state dict.
        metadata: extra ``__metadata__`` entries (they win over carried ones).
        carry_metadata: carry the input's metadata and non-tensor fields.
        on_overflow: ``fail`` or ``warn`` when a cast makes finite values inf.
        progress: called with (bytes written so far, bytes the output's tensors take).

    Returns a ConvertResult; raises SdtoolError subclasses (nothing is written then).

    Example:
        >>> r = convert("model.ckpt", "model.safetensors", dtype="fp16", verify=True)
        >>> print(r.tensors, r.output_bytes)
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    target = parse_dtype(dtype)
    output_format(out)  # refuse a bad extension before reading anything
    with open_model(src, key=key) as m:
        if not m.tensors:
            holders = [k for k, v in m.extra.items() if any(True for _ in tensor_leaves(v))]
            hint = f" (tensors lie under {holders[:3]}: pick one with --key)" if holders else ""
            raise UsageError(f"holds no state-dict tensors to convert{hint}", path=src)
        plan, renamed, notes = build_plan(m, target)
        meta, not_carried, meta_notes = build_metadata(m, carry=carry_metadata, add=metadata)
        total = sum(t.nbytes for t in plan)
        done = 0
        lock = threading.Lock()

        def step(n: int) -> None:
            nonlocal done
            with lock:
                done += n
            if progress is not None:
                progress(done, total)

        fmt = OUT_FORMATS[out.suffix.lower()]
        if fmt != "safetensors" and (lost := sorted(set(meta) - {"format"})):
            notes.append(
                f"metadata not written ({', '.join(lost[:5])}): a .ckpt has no place for it"
            )
        if max_shard_size is not None:
            if fmt != "safetensors":
                raise UsageError("--max-shard-size needs a .safetensors output", path=out)
            from sdtool.ops.shards import write_sharded

            sharded = write_sharded(
                plan, out, max_shard_size=max_shard_size, metadata=meta, overwrite=overwrite,
                verify=verify, on_overflow=on_overflow, progress=step,
            )  # fmt: skip
            w = sharded.files[0]
            if sharded.index is not None:
                out = sharded.index
                notes.append(f"written as {len(sharded.files)} shards indexed by {out.name}")
                w = replace(
                    w, path=out, tensors=len(plan), nbytes=sharded.nbytes,
                    copied=sum(f.copied for f in sharded.files),
                    cast=sum(f.cast for f in sharded.files),
                    overflows={k: v for f in sharded.files for k, v in f.overflows.items()},
                )  # fmt: skip
        else:
            w = write_model(
                plan,
                out,
                metadata=meta,
                overwrite=overwrite,
                verify=verify,
                on_overflow=on_overflow,
                progress=step,
            )
        return ConvertResult(
            input=src,
            output=out,
            input_format=m.format,
            output_format=w.format,
            dtype=dtype,
            tensors=w.tensors,
            cast=w.cast,
            copied=w.copied,
            input_bytes=m.file_size,
            output_bytes=w.nbytes,
            overflows=w.overflows,
            renamed=renamed,
            not_carried=not_carried,
            notes=notes + meta_notes,
            metadata_keys=sorted(meta) if w.metadata_written else [],
            verified=w.verified,
            seconds=time.perf_counter() - t0,
        )


# -- batch ----------------------------------------------------------------------------------


@dataclass
class BatchResult:
    """Every file's result, in input order."""

    results: list[ConvertResult]

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def failed(self) -> int:
        return self.count("failed")

    def to_json(self) -> dict[str, Any]:
        done = [r for r in self.results if r.status == "converted"]
        return {
            "schema": "sdtool.convert/1",
            "results": [r.to_json() for r in self.results],
            "summary": {
                "converted": len(done),
                "skipped": self.count("skipped"),
                "failed": self.failed,
                "input_bytes": sum(r.input_bytes for r in done),
                "output_bytes": sum(r.output_bytes for r in done),
            },
        }


def batch_targets(
    inputs: Sequence[Path], out_dir: Path, to: str = "safetensors"
) -> list[tuple[Path, Path]]:
    """(input, output) pairs: files as given, folders searched recursively for model files
    (sub-folders mirrored under ``out_dir``). The output folder itself is never searched."""
    if to not in TO_SUFFIX:
        raise UsageError(f"--to must be one of {', '.join(TO_SUFFIX)}, not {to!r}")
    ext = TO_SUFFIX[to]
    out_dir = Path(out_dir)
    pairs: list[tuple[Path, Path]] = []
    for inp in map(Path, inputs):
        if inp.is_dir():
            for f in sorted(inp.rglob("*")):
                if not f.is_file() or f.suffix.lower() not in MODEL_SUFFIXES:
                    continue
                if _inside(f, out_dir):
                    continue
                pairs.append((f, out_dir / f.relative_to(inp).with_suffix(ext)))
        else:
            pairs.append((inp, out_dir / (inp.stem + ext)))
    return pairs


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def convert_batch(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    to: str = "safetensors",
    jobs: int = 1,
    overwrite: bool = False,
    progress: Callable[[Path, int, int], None] | None = None,
    **options: Any,
) -> BatchResult:
    """Convert files and folders into ``out_dir``; existing outputs are skipped unless
    ``overwrite``. ``options`` are convert's (dtype, key, metadata, verify ...). ``progress`` is
    called with (input, bytes written, total) per file. A failed file is recorded with its
    error and the rest go on; Ctrl-C stops everything (finished files stay)."""
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    pairs = batch_targets([Path(p) for p in inputs], Path(out_dir), to)
    seen: dict[Path, Path] = {}

    def one(pair: tuple[Path, Path]) -> ConvertResult:
        src, dst = pair
        size = src.stat().st_size if src.exists() else 0
        if dst in seen and seen[dst] != src:
            return ConvertResult(
                src, dst, status="failed", input_bytes=size,
                error=f"{src}: {seen[dst]} already converts to {dst}",
            )  # fmt: skip
        if dst.exists() and not overwrite:
            return ConvertResult(src, dst, status="skipped", input_bytes=size)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)

            def cb(done: int, total: int) -> None:
                if cancel.is_set():  # Ctrl-C in the main thread: stop here, temp file goes
                    raise KeyboardInterrupt
                if progress is not None:
                    progress(src, done, total)

            return convert(src, dst, overwrite=overwrite, progress=cb, **options)
        except SdtoolError as e:
            return ConvertResult(src, dst, status="failed", input_bytes=size, error=str(e))
        except OSError as e:
            msg = f"{src}: {e.strerror or e}"
            return ConvertResult(src, dst, status="failed", input_bytes=size, error=msg)

    for src, dst in pairs:  # claim outputs in input order so duplicates fail deterministically
        seen.setdefault(dst, src)
    cancel = threading.Event()
    if jobs == 1:
        return BatchResult([one(p) for p in pairs])
    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(one, p) for p in pairs]
    try:
        results = [f.result() for f in futures]
    except BaseException:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return BatchResult(results)
