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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from sdtool.cache import default_dir
from sdtool.errors import SdtoolError, UsageError
from sdtool.formats.open import opened
from sdtool.model import ModelFile, tensor_leaves, to_plain
from sdtool.ops.batch import Resume, Runner, options_digest, record_from_json, run_batch, run_one
from sdtool.ops.outname import derived
from sdtool.results import JsonKey, Result, json_key, rounded
from sdtool.vocab import TO_SUFFIX, Format, Progress, dtype_name
from sdtool.write import (
    OUT_FORMATS,
    WriteOptions,
    options_from,
    output_format,
    write_model,
)
from sdtool.write.plan import OutTensor

SCHEMA = "sdtool.convert/3"
#: non-tensor fields whose JSON is longer than this are left out of the metadata (with a note)
MAX_METADATA_VALUE = 64 * 1024
#: textual-inversion embeddings: the A1111 .pt layout -> the name A1111 reads in safetensors
TI_PREFIX, TI_NAME = "string_to_param.", "emb_params"
#: what open_model reads, as sniffing names it: a folder's files are inputs by content (as scan
#: decides), never by extension; a plain pickle is one only if it holds tensors
READABLE = frozenset({Format.SAFETENSORS, Format.ZIP, Format.TAR, Format.GGUF, Format.NPY})
#: names that make bytes convert cannot read a broken model (an input that fails with the
#: reason) rather than a file to leave out
MODEL_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".sft", ".npy", ".npz"})
#: why a pickle in a folder is left out when it holds no tensor anywhere
NO_TENSORS = "no tensors"
#: --to choice -> output extension


@dataclass(frozen=True, kw_only=True)
class ConvertOptions(WriteOptions):
    """convert's options: the shared write options, and what to read and carry.

    Attributes:
        key: a dotted path to the sub-dict to convert instead of the state dict.
        metadata: extra ``__metadata__`` entries (they win over carried ones).
        carry_metadata: carry the input's metadata and non-tensor fields.
        quant: for a ``.gguf`` output, the GGUF type (``Q8_0``, ``Q4_K_M``, ``F16`` ...;
            default F16, or BF16 for a mostly-bf16 model), in ComfyUI-GGUF's layout
            (docs/gguf.md).
        fp8_scaled: with dtype float8_e4m3fn, write Linear weights as scaled fp8 with
            per-tensor scales in ``fp8_format``'s spelling (``comfy``, ``comfy-mixed`` or
            ``diffusers``); other tensors keep their dtype. Scaled-fp8 inputs converted to
            fp16/bf16/fp32 always have their scales applied.
    """

    key: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    carry_metadata: bool = True
    max_shard_size: str | int | None = None  # shards + index (docs/layouts.md)
    quant: str | None = None
    fp8_scaled: bool = False
    fp8_format: str = "comfy"


@dataclass(frozen=True)
class ConvertResult(Result):
    """One file's conversion. ``to_json`` is the documented --json object (docs/convert.md)."""

    path: Path  # the input
    output: Path
    status: str = "converted"  # converted | skipped | resumed | failed
    error: str | None = None
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
    seconds: float = field(default=0.0, metadata=json_key(as_=rounded))
    output_sha256: str | None = None  # when computed (--resume records it)


def parse_metadata(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings -> a dict; UsageError for a pair without ``=``."""
    out: dict[str, str] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise UsageError(f"--metadata wants KEY=VALUE, got {p!r}")
        out[k] = v
    return out


def carried_fields(m: ModelFile) -> dict[str, Any]:
    """The non-tensor top-level fields of ``m`` (global_step, epoch ...) as plain data (what a
    .ckpt output gets back as top-level entries); fields holding tensors are not carried."""
    return {
        str(k): to_plain(v) for k, v in m.extra.items() if not any(True for _ in tensor_leaves(v))
    }


def build_metadata(
    m: ModelFile, *, carry: bool = True, add: dict[str, str] | None = None, fields: bool = True
) -> tuple[dict[str, str], list[str], list[str]]:
    """The output ``__metadata__``, what was not carried (tensors outside the state dict), notes.

    ``carry``: the input's metadata and (``fields``) its non-tensor fields, JSON per top-level
    key (a .ckpt output carries the fields as entries instead); ``format: pt`` is always set
    unless the input or ``add`` says otherwise; ``add`` wins.
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
        for key, plain in (carried_fields(m) if fields else {}).items():
            if key in meta:
                continue
            enc = json.dumps(plain, ensure_ascii=False)
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
    src: str | Path | ModelFile,
    out: str | Path | None = None,
    options: ConvertOptions | None = None,
    **changes: Any,
) -> ConvertResult:
    """Convert the model file ``src`` to ``out`` (format by ``out``'s extension).

    Convert is prune keeping everything (``plan_prune`` with default options: every tensor,
    cast by the one cast rule), plus the input's metadata and non-tensor fields carried.

    Args:
        src: a path, or an opened ModelFile (left open).
        out: the output; None: ``<stem>[-<dtype>].safetensors`` beside ``src`` (inside ``out``
            when it is an existing folder).
        options: ConvertOptions (dtype, key, metadata, carry_metadata, and the write options
            overwrite, verify, on_overflow, progress); ``changes`` may give them as keywords.

    Returns a ConvertResult; raises SdtoolError subclasses (nothing is written then).

    Example:
        >>> r = convert("model.ckpt", "model.safetensors", dtype="fp16", verify=True)
        >>> print(r.tensors, r.output_bytes)
    """
    t0 = time.perf_counter()
    opts = options_from(ConvertOptions, options, changes)
    src_path = src.path if isinstance(src, ModelFile) else Path(src)
    out = derived(src_path, out, [dtype_name(opts.dtype.code) if opts.dtype else ""])
    if out.suffix.lower() == ".gguf" or opts.quant is not None:
        return _convert_gguf(src, out, opts, t0)
    # here, not at the top: GGUF export needs no identify tables (~30 ms of start-up)
    from sdtool.ops.prune import PruneOptions, plan_prune

    output_format(out)  # refuse a bad extension before reading anything
    with opened(src, key=opts.key) as m:
        if not m.tensors:
            holders = [k for k, v in m.extra.items() if any(True for _ in tensor_leaves(v))]
            hint = f" (tensors lie under {holders[:3]}: pick one with key=...)" if holders else ""
            raise UsageError(f"holds no state-dict tensors to convert{hint}", path=m.path)
        plan = plan_prune(m, PruneOptions(dtype=opts.dtype))
        renamed = _renames(m)
        tensors = [
            replace(t, name=renamed[t.name]) if t.name in renamed else t for t in plan.tensors
        ]
        tensors, fp8_notes = _fp8(m, tensors, opts)
        fmt = OUT_FORMATS[out.suffix.lower()]
        ckpt = fmt != "safetensors"
        meta, not_carried, meta_notes = build_metadata(
            m, carry=opts.carry_metadata, add=opts.metadata, fields=not ckpt
        )
        fields = carried_fields(m) if ckpt and opts.carry_metadata else None
        notes = list(plan.notes) + fp8_notes
        result = ConvertResult(
            path=m.path,
            output=out,
            status="planned" if opts.dry_run else "converted",
            input_format=str(m.format),
            output_format=fmt,
            dtype=dtype_name(None if opts.dtype is None else opts.dtype.code),
            tensors=len(tensors),
            input_bytes=m.file_size,
            renamed=renamed,
            not_carried=not_carried,
            notes=notes + meta_notes,
        )
        if opts.dry_run:
            return result
        if opts.max_shard_size is not None:
            if ckpt:
                raise UsageError("max_shard_size= needs a .safetensors output", path=out)
            from sdtool.ops.shards import write_sharded

            sharded = write_sharded(tensors, out, opts, metadata=meta)
            w = sharded.combined()
            if sharded.index is not None:
                out = sharded.index
                notes.append(f"written as {len(sharded.files)} shards indexed by {out.name}")
                result = replace(result, output=out, notes=notes + meta_notes)
        else:
            w = write_model(tensors, out, opts, metadata=meta, fields=fields)
        return replace(
            result,
            tensors=w.tensors,
            cast=w.cast,
            copied=w.copied,
            output_bytes=w.nbytes,
            overflows=w.overflows,
            metadata_keys=sorted(meta) if w.metadata_written else [],
            verified=w.verified,
            seconds=time.perf_counter() - t0,
        )


def _fp8(
    m: ModelFile, tensors: list[OutTensor], opts: ConvertOptions
) -> tuple[list[OutTensor], list[str]]:
    """Scaled fp8: write it (``fp8_scaled``), or apply the scales of a scaled input."""
    from sdtool.ops.fp8scaled import dequant_plan, scaled_plan

    if opts.fp8_scaled:
        if opts.dtype is None or opts.dtype.code != "F8_E4M3":
            raise UsageError('fp8_scaled=True needs dtype="fp8_e4m3fn"')
        return scaled_plan(m, tensors, opts.fp8_format)
    return dequant_plan(m, tensors, opts.dtype)


def _convert_gguf(
    src: str | Path | ModelFile, out: Path, opts: ConvertOptions, t0: float
) -> ConvertResult:
    """convert() to a ComfyUI-GGUF file (sdtool.ops.gguf_export)."""
    from sdtool.ops.gguf_export import QUANTS, plan_export, quant_count, write_gguf_plan
    from sdtool.write.atomic import atomic_output

    quant = opts.quant
    if out.suffix.lower() != ".gguf":
        raise UsageError(f"quant= writes GGUF: name the output *.gguf, not {out.name!r}")
    if opts.dtype is not None:
        raise UsageError("dtype= does not apply to GGUF output (quant= chooses its type)")
    if quant is not None and quant.upper() not in QUANTS:
        raise UsageError(f"quant= must be one of {', '.join(QUANTS)}, not {quant!r}")
    with opened(src, key=opts.key) as m:
        q = (quant or ("BF16" if _mostly_bf16(m) else "F16")).upper()
        try:
            plan = plan_export(m, q)
        except SdtoolError as e:
            raise e.with_path(m.path) from None
        total = sum(t.nbytes for t in plan.tensors)
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            if opts.progress is not None:
                opts.progress(done, total)

        notes = list(plan.notes)
        if plan.dropped:
            notes.append(
                f"{len(plan.dropped)} tensor(s) not part of the {plan.arch} model left out "
                f"(e.g. {plan.dropped[0]!r})"
            )
        types = ", ".join(f"{k} {v}" for k, v in sorted(plan.types.items()))
        notes.insert(0, f"GGUF architecture {plan.arch!r}, {q}: {types}")
        result = ConvertResult(
            path=m.path,
            output=out,
            status="planned" if opts.dry_run else "converted",
            input_format=str(m.format),
            output_format="gguf",
            dtype=q,
            tensors=len(plan.tensors),
            cast=quant_count(plan),
            input_bytes=m.file_size,
            notes=notes,
        )
        if opts.dry_run:
            return result
        with atomic_output(out, inputs=[m.path], overwrite=opts.overwrite) as f:
            try:
                write_gguf_plan(plan, f, progress=step)
            except SdtoolError as e:
                raise e.with_path(m.path) from None
            if opts.verify:
                from sdtool.ops.gguf_export import verify_gguf

                verify_gguf(plan, Path(str(f.name)))
        return replace(
            result,
            output_bytes=out.stat().st_size,
            verified=opts.verify,
            seconds=time.perf_counter() - t0,
        )


def _mostly_bf16(m: ModelFile) -> bool:
    counts: dict[str, int] = {}
    for t in m.tensors.values():
        counts[t.type_code] = counts.get(t.type_code, 0) + 1
    return bool(counts) and max(counts, key=lambda k: counts[k]) == "BF16"


def _renames(m: ModelFile) -> dict[str, str]:
    """A textual-inversion embedding's one ``string_to_param.*`` tensor -> ``emb_params``."""
    ti = [n for n in m.tensors if n.startswith(TI_PREFIX)]
    return {ti[0]: TI_NAME} if len(ti) == 1 and len(m.tensors) == 1 else {}


# -- batch ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ignored(Result):
    """A file a folder walk left out: by its content nothing convert converts."""

    path: Path
    reason: str  # "no tensors", "PNG image", "JSON text", "text", "a gzip file, not ..."


@dataclass(frozen=True)
class BatchResult(Result):
    """Every file's result, in input order, and the folder files left out."""

    JSON_SCHEMA: ClassVar[str | None] = SCHEMA
    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = ("results", "summary", "ignored")

    results: list[ConvertResult]
    ignored: list[Ignored] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def summary(self) -> dict[str, int]:
        """Files per status, files left out, and the converted files' bytes in and out."""
        done = [r for r in self.results if r.status == "converted"]
        return {
            "converted": len(done),
            "skipped": self.count("skipped"),
            "resumed": self.count("resumed"),
            "failed": self.failed,
            "ignored": len(self.ignored),
            "input_bytes": sum(r.input_bytes for r in done),
            "output_bytes": sum(r.output_bytes for r in done),
        }


def batch_targets(
    inputs: Sequence[Path], out_dir: Path, to: str = "safetensors", *, quant: str | None = None
) -> list[tuple[Path, Path]]:
    """(input, output) pairs: files as given, folders searched recursively for model files
    (by content; sub-folders mirrored under ``out_dir``). The output folder is never searched.
    With ``quant`` (a GGUF type) the outputs are ``.gguf`` files."""
    return batch_inputs(inputs, out_dir, to, quant=quant)[0]


def batch_inputs(
    inputs: Sequence[Path], out_dir: Path, to: str = "safetensors", *, quant: str | None = None
) -> tuple[list[tuple[Path, Path]], list[Ignored]]:
    """``batch_targets``, and the folders' files left out, each with why (``not_convertible``)."""
    if to not in TO_SUFFIX:
        raise UsageError(f"to={to!r} is not one of {', '.join(TO_SUFFIX)}")
    if quant is not None and to != "safetensors":
        raise UsageError(f"quant= writes GGUF; it does not combine with to={to!r}")
    ext = ".gguf" if quant is not None else TO_SUFFIX[to]
    out_dir = Path(out_dir)
    pairs: list[tuple[Path, Path]] = []
    ignored: list[Ignored] = []
    for inp in map(Path, inputs):
        if inp.is_dir():
            for f in sorted(inp.rglob("*")):
                if not f.is_file() or _inside(f, out_dir):
                    continue
                why = not_convertible(f)
                if why is not None:
                    ignored.append(Ignored(f, why))
                    continue
                pairs.append((f, out_dir / f.relative_to(inp).with_suffix(ext)))
        elif _plain_pickle(inp):  # named, but a pickle of plain data: nothing to convert
            ignored.append(Ignored(inp, NO_TENSORS))
        else:
            pairs.append((inp, out_dir / (inp.stem + ext)))
    return pairs, ignored


def not_convertible(path: Path) -> str | None:
    """Why a file found in a folder is no input, or None. Content decides, as scan does.

    A format open_model reads (safetensors, a torch zip or TAR, GGUF, npy) is an input whatever
    its name. A pickle (a legacy torch file, or any ``.pkl``) is read by the restricted loader
    (nothing runs): an input if it holds a tensor anywhere, else left out as "no tensors". An
    image, JSON, YAML or text is left out whatever its name. Anything else (a cut-short
    download, an archive, unknown bytes, a pickle the loader cannot read) is an input only
    under a model file name (``MODEL_SUFFIXES``), so its conversion fails with the reason;
    under another name it is left out with that reason. A file that cannot be read is an input
    (it fails).
    """
    from sdtool.formats.sniff import TEXT_LIMIT, describe, not_a_model_file, sniff

    try:
        kind, head, size = sniff(path)
    except SdtoolError:
        return None
    if kind in READABLE:
        return None
    model_name = path.suffix.lower() in MODEL_SUFFIXES
    if kind is Format.PICKLE:
        try:
            return None if _holds_tensors(path) else NO_TENSORS
        except SdtoolError as e:
            return None if model_name else f"a pickle sdtool cannot read ({e.message})"
    data = head
    if len(head) < size <= TEXT_LIMIT:
        try:
            data = path.read_bytes()
        except OSError:
            return None
    what = not_a_model_file(data, size)
    if what is not None:
        return what
    if model_name:
        return None
    if kind is not Format.UNKNOWN:
        return f"a {kind.value} file, not a model file sdtool converts"
    return describe(head, size)


def _plain_pickle(path: Path) -> bool:
    """A file given by name that is a pickle the restricted loader reads and finds no tensor in
    (any other file given by name is an input, and fails if it cannot be converted)."""
    from sdtool.formats.sniff import sniff

    try:
        return sniff(path)[0] is Format.PICKLE and not _holds_tensors(path)
    except SdtoolError:
        return False


def _holds_tensors(path: Path) -> bool:
    """Whether the restricted loader finds a tensor anywhere in the pickle (state dict or not)."""
    with opened(path) as m:
        return bool(m.tensors) or any(True for v in m.extra.values() for _ in tensor_leaves(v))


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ConvertJob:
    """One file of a batch, picklable (it may run on a cluster worker).

    ``owner``: the input that claims ``dst`` (the first in input order); another input that
    maps to the same output fails. ``resume``: skip an output recorded as written and
    unchanged, and record new ones (sdtool.ops.batch).
    """

    src: Path
    dst: Path
    options: ConvertOptions
    owner: Path
    resume: Resume | None = None


def result_from_json(doc: dict[str, Any]) -> ConvertResult:
    """The ConvertResult that ``ConvertResult.to_json`` described."""
    return record_from_json(ConvertResult, doc)


def convert_job(job: ConvertJob, progress: Progress | None = None) -> ConvertResult:
    """Convert one file of a batch; every failure becomes a ``failed`` result."""

    def work(size: int, overwrite: bool) -> tuple[ConvertResult, Path | None]:
        opts = replace(job.options, progress=progress, overwrite=overwrite)
        result = convert(job.src, job.dst, opts)
        return result, result.output if result.status == "converted" else None

    return run_one(
        ConvertResult, job.src, job.dst, job.owner, job.resume, job.options.overwrite, work,
        "convert",
    )  # fmt: skip


def convert_batch(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    options: ConvertOptions | None = None,
    *,
    to: str = "safetensors",
    jobs: int = 1,
    file_progress: Callable[[Path], Progress | None] | None = None,
    on_result: Callable[[ConvertResult], None] | None = None,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    runner: Runner | None = None,
    **changes: Any,
) -> BatchResult:
    """Convert files and folders into ``out_dir``; existing outputs are skipped unless
    ``overwrite``. ``options``/``changes`` are convert's (dtype, key, metadata, verify ...);
    ``file_progress(input)`` gives each file's ``progress(done, total)``; ``on_result`` sees
    each file's result as it finishes. A failed file is recorded with its error and the rest
    go on; Ctrl-C stops everything (finished files stay).

    ``resume``: skip outputs recorded in the cache (``cache_dir``, default the user's) as
    written from the same input with the same options and unchanged since (status
    ``resumed``); any other existing output is redone. ``runner``: run the files on a cluster
    (sdtool.cluster) instead of ``jobs`` threads.
    """
    opts = options_from(ConvertOptions, options, changes)
    if jobs < 1:
        raise UsageError(f"jobs={jobs} must be at least 1")
    pairs, ignored = batch_inputs([Path(p) for p in inputs], Path(out_dir), to, quant=opts.quant)
    owner: dict[Path, Path] = {}
    for src, dst in pairs:  # claim outputs in input order so duplicates fail deterministically
        owner.setdefault(dst, src)
    base = replace(opts, progress=None)
    rs = Resume(Path(cache_dir) if cache_dir else default_dir(), options_digest(base, to=to))
    work = [ConvertJob(s, d, base, owner[d], rs if resume else None) for s, d in pairs]
    cancel = threading.Event()

    def one(job: ConvertJob) -> ConvertResult:
        shown = file_progress(job.src) if file_progress is not None else None

        def cb(done: int, total: int) -> None:
            if cancel.is_set():  # Ctrl-C in the main thread: stop here, temp file goes
                raise KeyboardInterrupt
            if shown is not None:
                shown(done, total)

        return convert_job(job, cb)

    if runner is not None:

        def lost(job: ConvertJob, e: BaseException) -> ConvertResult:
            why = f"{job.src}: the cluster task failed ({type(e).__name__}: {e})"
            return ConvertResult(job.src, job.dst, status="failed", error=why)

        results = run_batch(work, convert_job, on_result=on_result, runner=runner, on_error=lost)
    else:
        results = run_batch(work, one, jobs=jobs, on_result=on_result, cancel=cancel)
    return BatchResult(results, ignored)
