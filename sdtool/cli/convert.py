"""``sdtool convert``: IN OUT, or many inputs into --out-dir; streamed, atomic, verifiable."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdtool.cli import progress as bars_
from sdtool.cli.batch import check_batch_options, cluster_runner
from sdtool.cli.options import (
    batch_options,
    dry_run_option,
    dtype_option,
    jobs_option,
    json_option,
    key_option,
    quiet_option,
    write_options,
)
from sdtool.cli.render import console, error, human_bytes, markup, print_json, warn
from sdtool.errors import UsageError
from sdtool.ops.outname import derived
from sdtool.vocab import TO_SUFFIX, ExitCode, Progress, parse_dtype

if TYPE_CHECKING:
    from sdtool.ops.convert import BatchResult, ConvertResult


@click.command("convert")
@click.argument(
    # str, not Path: "out/" keeps its slash (a folder meant, see ops.outname.derived)
    "paths",
    nargs=-1,
    required=True,
    metavar="IN... OUT",
    type=click.Path(),
)
@dtype_option(keep=True)
@key_option("Convert")
@click.option("--metadata", "meta", multiple=True, metavar="KEY=VALUE", help="Add metadata.")
@click.option("--no-metadata", is_flag=True, help="Do not carry the input's metadata/fields.")
@write_options
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Batch mode: every PATH is an input (files or folders); outputs go here.",
)
@click.option(
    "--to",
    type=click.Choice([*TO_SUFFIX, "diffusers", "single"]),
    default=None,
    help="Batch mode: the output format (default safetensors). diffusers: a single-file "
    "checkpoint to a diffusers folder; single: a diffusers folder/component to one file.",
)
@click.option(
    "--max-shard-size",
    metavar="SIZE",
    help="Write .safetensors shards of at most SIZE (5GB, 500MB: powers of 10) plus an index.",
)
@click.option(
    "--family", help="Layouts: the model family (sd1, sd2, sdxl, sdxl-refiner, sd3, flux)."
)
@click.option(
    "--prediction-type",
    type=click.Choice(["epsilon", "v_prediction"]),
    help="--to diffusers: the scheduler's prediction type (default: the family's).",
)
@click.option(
    "--components", metavar="LIST", help="--to single: unet,vae,text-encoder,text-encoder-2."
)
@click.option(
    "--tokenizers-from",
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="--to diffusers: copy tokenizer*/ from this diffusers folder (sdtool ships none).",
)
@click.option(
    "--lora-format",
    type=click.Choice(["kohya", "diffusers", "peft", "comfy", "ai-toolkit"]),
    help="Rename a LoRA file's modules into this naming (alpha carried; docs/layouts.md).",
)
@dry_run_option
@click.option(
    "--quant",
    metavar="TYPE",
    help="GGUF output: Q8_0, Q6_K, Q5_K_M, Q5_1, Q5_0, Q4_K_M, Q4_1, Q4_0, F16 or BF16 "
    "(ComfyUI-GGUF's layout; docs/gguf.md).",
)
@click.option(
    "--fp8-scaled",
    is_flag=True,
    help="With --dtype fp8_e4m3fn: Linear weights as scaled fp8 with per-tensor scales.",
)
@click.option(
    "--fp8-format",
    type=click.Choice(["comfy", "comfy-mixed", "diffusers"]),
    default="comfy",
    show_default=True,
    help="Spelling of the scales: comfy (scale_weight + scaled_fp8), comfy-mixed "
    "(weight_scale + comfy_quant) or diffusers (weight_scale).",
)
@jobs_option("Batch mode: convert")
@json_option("convert")
@quiet_option("print nothing when all goes well (warnings and errors still on stderr)")
@batch_options(cluster=True)
def convert_cmd(
    paths: tuple[str, ...],
    dtype: str,
    key: str | None,
    meta: tuple[str, ...],
    no_metadata: bool,
    overwrite: bool,
    verify: bool,
    on_overflow: str,
    out_dir: Path | None,
    to: str | None,
    jobs: int,
    as_json: bool,
    max_shard_size: str | None = None,
    family: str | None = None,
    prediction_type: str | None = None,
    components: str | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    lora_format: str | None = None,
    tokenizers_from: Path | None = None,
    quant: str | None = None,
    fp8_scaled: bool = False,
    fp8_format: str = "comfy",
    as_jsonl: bool = False,
    resume: bool = False,
    cache_dir: Path | None = None,
    no_cache: bool = False,
    cluster: str | None = None,
) -> int:
    """Convert IN to OUT (format by OUT's extension), or many inputs into --out-dir.

    OUT is optional: without it, IN.ckpt becomes IN.safetensors beside it (IN-fp16.safetensors
    with --dtype fp16, IN-Q8_0.gguf with --quant Q8_0); an existing folder as OUT receives that
    name. OUT: .safetensors/.sft or .ckpt/.pt/.pth/.bin (torch's zip; both streamed: memory
    stays about one tensor), or .gguf (ComfyUI-GGUF's layout, --quant). The input's metadata and
    non-tensor fields (global_step, ...) go into the safetensors __metadata__ (a .ckpt: fields
    as entries, metadata under __metadata__). Output is written to a temp file and renamed: an
    error or Ctrl-C leaves nothing behind. Batch mode exits 1 if any file failed; --resume skips
    the outputs an earlier run wrote and that are unchanged since, --jsonl prints one JSON object
    per file as it finishes, --cluster runs the files on a Dask cluster (docs/scale.md).

    \b
    Examples:
      sdtool convert model.ckpt model.safetensors
      sdtool convert model.ckpt --dtype fp16 --verify
      sdtool convert model.ckpt converted/
      sdtool convert downloads/ --out-dir converted/ --jobs 2
      sdtool convert mirror/ --out-dir st/ --resume --jsonl > done.jsonl
      sdtool convert flux-dev.safetensors out/model.safetensors --max-shard-size 5GB
      sdtool convert sdxl.safetensors sdxl-diffusers/ --to diffusers --verify
      sdtool convert sdxl-diffusers/ sdxl.safetensors --components unet,vae
      sdtool convert sd15.safetensors out/ --to diffusers --dry-run
      sdtool convert flux1-dev.safetensors flux1-dev-Q8_0.gguf --quant Q8_0
      sdtool convert flux1-dev.safetensors fp8.safetensors --dtype fp8_e4m3fn --fp8-scaled
    """
    _one_blas_thread()
    from sdtool.cli.layout import LAYOUT_TARGETS, run_layout, run_lora_format, wants_layout
    from sdtool.ops.convert import (
        BatchResult,
        ConvertOptions,
        convert,
        convert_batch,
        parse_metadata,
    )

    files = tuple(Path(p) for p in paths)
    if lora_format is not None:
        if out_dir is not None or len(paths) != 2:
            raise UsageError("--lora-format converts one LoRA file to one output")
        return run_lora_format(
            files[0], files[1], to=lora_format, family=family, overwrite=overwrite,
            verify=verify, dry_run=dry_run, as_json=as_json,
        )  # fmt: skip
    if out_dir is None and len(paths) == 2 and wants_layout(to, files[0]):
        return run_layout(
            files[0], files[1], to=to, family=family, prediction_type=prediction_type,
            components=components, overwrite=overwrite, verify=verify, dry_run=dry_run,
            max_shard_size=max_shard_size, as_json=as_json, tokenizers_from=tokenizers_from,
        )  # fmt: skip
    if to in LAYOUT_TARGETS:
        raise UsageError(f"--to {to} converts one input to one output (no --out-dir)")
    if family or components or prediction_type or tokenizers_from:
        raise UsageError(
            "--family/--components/--prediction-type/--tokenizers-from: with --to diffusers|single"
        )
    to = to or "safetensors"
    options = ConvertOptions(
        max_shard_size=max_shard_size,
        dry_run=dry_run,
        dtype=parse_dtype(dtype),
        key=key,
        metadata=parse_metadata(meta),
        carry_metadata=not no_metadata,
        overwrite=overwrite,
        verify=verify,
        on_overflow=on_overflow,
        quant=quant,
        fp8_scaled=fp8_scaled,
        fp8_format=fp8_format,
    )
    bars = bars_.enabled()
    if out_dir is None:
        batch_only = [f"--{n}" for n in BATCH_ONLY if _given(n)]
        if batch_only:
            verb = "applies" if len(batch_only) == 1 else "apply"
            raise UsageError(f"{'/'.join(batch_only)} {verb} to batch mode: add --out-dir DIR")
        if len(paths) > 2:
            raise UsageError(
                f"give IN [OUT], or inputs with --out-dir DIR (got {len(paths)} paths)"
            )
        src = files[0]
        out = paths[1] if len(paths) == 2 else None  # as given: derived() reads "out/"
        if quant is not None:  # GGUF: IN-Q8_0.gguf (an OUT that is not .gguf: convert refuses)
            dst = derived(src, out, [quant.upper()], ext=".gguf")
        else:
            dst = derived(src, out, ["" if dtype in (None, "keep") else dtype])
        with _sigterm_interrupts(), _bars(bars) as progress:
            result = convert(src, dst, options, progress=_single(progress, src))
        if as_json and not quiet:  # the same document as a batch of one: one shape to parse
            _details(result)  # warnings still reach stderr; stdout holds only the JSON
            print_json(BatchResult([result]).to_json())
        elif quiet:
            _details(result)
        else:
            render_one(result)
        return ExitCode.OK
    check_batch_options(as_json=as_json, as_jsonl=as_jsonl, cache_dir=cache_dir,
                        no_cache=no_cache, resume=resume)  # fmt: skip
    if quant is not None and to != "safetensors":  # before the folder is made
        raise UsageError(f"--quant writes GGUF; it does not combine with --to {to}")
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = None
    if as_jsonl:
        from sdtool.cli.jsonl import JsonLines

        lines = JsonLines("convert")
        bars = False

    def on_result(r: ConvertResult) -> None:
        if lines is not None:
            _details(r)
            if r.status == "failed":
                error(r.error or r.path)
            lines.write(jsonl_record(r))

    with _sigterm_interrupts(), _bars(bars) as progress, cluster_runner(cluster, jobs) as runner:
        batch = convert_batch(
            files, out_dir, options, to=to, jobs=jobs, file_progress=_per_file(progress),
            on_result=on_result, resume=resume, cache_dir=cache_dir, runner=runner,
        )  # fmt: skip
    if as_jsonl:  # a record per input; the files left out are named by --json and the text
        if batch.ignored:
            warn(f"{len(batch.ignored)} file(s) in the folders hold nothing to convert and were "
                 "left out (--json lists them with the reason)")  # fmt: skip
    elif as_json or quiet:
        for r in batch.results:
            _details(r)
            if r.status == "failed":
                error(r.error or r.path)
        if not quiet:
            print_json(batch.to_json())
    else:
        render_batch(batch)
    return ExitCode.FINDINGS if batch.failed else ExitCode.OK


def _one_blas_thread() -> None:
    """Before numpy is first imported: OpenBLAS starts one spinning thread per core when it
    loads (40-90 ms of CPU here), and convert multiplies no matrices (its threads are
    sdtool's own). Only when numpy is not loaded yet and the user has not chosen."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


#: a batch's progress: ``(file, done, total)``, each file's bar fed by a ``vocab.Progress``
FileProgress = Callable[[Path, int, int], None]
BATCH_ONLY = ("to", "jobs", "jsonl", "resume", "cluster")


def jsonl_record(r: ConvertResult) -> dict[str, Any]:
    """A --jsonl record: the result object (docs/convert.md) plus the batch envelope."""
    return {**r.to_json(), "size": r.input_bytes, "sha256": None}


def _given(param: str) -> bool:
    """Whether the user typed option ``param`` (not just its default)."""
    source = click.get_current_context().get_parameter_source(param)
    return source is click.core.ParameterSource.COMMANDLINE


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Treat SIGTERM (kill, a CI timeout) like Ctrl-C while converting, so temp files are
    removed on the way out; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _single(progress: FileProgress | None, src: Path) -> Progress | None:
    return None if progress is None else (lambda done, total: progress(src, done, total))


def _per_file(
    progress: FileProgress | None,
) -> Callable[[Path], Progress | None] | None:
    return None if progress is None else (lambda src: _single(progress, src))


@contextmanager
def _bars(enabled: bool) -> Iterator[FileProgress | None]:
    """tqdm bars on stderr (TTY only): one per file in flight plus an overall one, in bytes."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    lock = threading.Lock()
    files: dict[Path, Any] = {}
    last: dict[Path, int] = {}
    overall = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="all", position=0)

    def progress(src: Path, done: int, total: int) -> None:
        with lock:
            bar = files.get(src)
            if bar is None:
                bar = files[src] = tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=src.name[-40:], leave=False, position=len(files),
                )  # fmt: skip
                overall.total += total
                overall.refresh()
                last[src] = 0
            bar.update(done - last[src])
            overall.update(done - last[src])
            last[src] = done
            if done >= total:
                bar.close()

    try:
        yield progress
    finally:
        for bar in files.values():
            bar.close()
        overall.close()


def _line(r: ConvertResult) -> str:
    size = f"{human_bytes(r.input_bytes)} -> {human_bytes(r.output_bytes)}"
    how = [f"{r.tensors:,} tensors", size]
    if r.cast:
        how.append(f"{r.cast:,} cast to {r.dtype}")
    if r.verified:
        how.append("verified")
    return f"{markup(r.path)} -> {markup(r.output)}: {', '.join(how)}"


def _details(r: ConvertResult) -> None:
    for old, new in r.renamed.items():
        warn(f"{r.path}: tensor {old!r} written as {new!r}")
    for name, n in r.overflows.items():
        warn(f"{r.path}: {n} value(s) of {name!r} overflowed to inf in the cast to {r.dtype}")
    for item in r.not_carried:
        warn(f"{r.path}: not carried: {item}")
    for note in r.notes:
        warn(f"{r.path}: {note}")


def render_one(r: ConvertResult) -> None:
    """One converted file: a line, then warnings for anything changed or left out."""
    console().print(f"converted {_line(r)}")
    _details(r)


def render_batch(b: BatchResult) -> None:
    """A line per file, then the summary."""
    out = console()
    for r in b.results:
        if r.status == "converted":
            out.print(f"converted {_line(r)}")
            _details(r)
        elif r.status == "skipped":
            out.print(f"skipped   {markup(r.path)}: {markup(r.output)} exists (--overwrite)")
        elif r.status == "resumed":
            out.print(f"resumed   {markup(r.path)}: {markup(r.output)} already written")
        else:  # the reason goes to stderr as the one-line error every command prints
            out.print(f"[red]failed[/red]    {markup(r.path)}")
            error(r.error or r.path)
    for i in b.ignored:
        out.print(f"ignored   {markup(i.path)}: {markup(i.reason)}")
    s = b.to_json()["summary"]
    more = f", {s['ignored']} ignored" if s["ignored"] else ""
    out.print(
        f"\n{s['converted']} converted, {s['skipped']} skipped, "
        + (f"{s['resumed']} resumed, " if s["resumed"] else "")
        + f"{s['failed']} failed{more}; "
        f"{human_bytes(s['input_bytes'])} -> {human_bytes(s['output_bytes'])}"
    )
