"""``sdtool prune`` and ``sdtool extract``: keep what the model needs, stream it out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sdtool.cli import progress
from sdtool.cli.options import (
    batch_options,
    complete_from,
    dry_run_option,
    dtype_option,
    jobs_option,
    json_option,
    quiet_option,
    write_options,
)
from sdtool.cli.render import (
    console,
    human_bytes,
    human_count,
    markup,
    print_json,
    print_table,
    warn,
    wrap,
    wrap_width,
)
from sdtool.ops.outname import derived
from sdtool.vocab import DROP_TARGETS, EXTRACT_TARGETS, ExitCode, parse_dtype

if TYPE_CHECKING:
    from sdtool.ops.prune import PruneResult

F = TypeVar("F", bound=Callable[..., Any])


def common(f: F) -> F:
    """The options prune and extract share, spelled as everywhere else (sdtool/cli/options.py)."""
    quiet = quiet_option("print nothing when all goes well (warnings and errors on stderr)")
    for opt in reversed(
        [
            dtype_option(),
            dry_run_option,
            json_option("prune", "the report as JSON"),
            write_options,
            quiet,
        ]
    ):
        f = opt(f)
    return f


@click.command("prune")
@click.argument(
    # str, not Path: "out/" keeps its slash (a folder meant, see ops.outname.derived)
    "paths",
    nargs=-1,
    required=True,
    metavar="IN [OUT]",
    type=click.Path(),
)
@click.option(
    "--ema-only", is_flag=True, help="Put the EMA weights under the model keys; drop model_ema.*."
)
@click.option(
    "--no-ema", is_flag=True, help="Drop the EMA copy (model_ema.*); keep the raw weights."
)
@click.option(
    "--allow-partial-ema",
    is_flag=True,
    help="With --ema-only: UNet keys without an EMA twin keep their raw weights.",
)
@click.option(
    "--drop",
    "drop",
    multiple=True,
    metavar="PART",
    shell_complete=complete_from(list(DROP_TARGETS)),
    help=f"Drop a part: {', '.join(DROP_TARGETS)} (repeatable).",
)
@click.option(
    "--bake-vae",
    type=click.Path(path_type=Path),
    metavar="VAE_FILE",
    help="Replace the VAE with this file's (bare or prefixed; shapes checked).",
)
@click.option(
    "--fix-clip",
    is_flag=True,
    help="Rewrite broken CLIP position_ids (float or wrong values) as int64 arange(77).",
)
@common
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Batch mode: every PATH is an input (files or folders); outputs go here.",
)
@jobs_option("Batch mode: prune")
@batch_options()
def prune_cmd(
    paths: tuple[str, ...],
    ema_only: bool,
    no_ema: bool,
    allow_partial_ema: bool,
    drop: tuple[str, ...],
    bake_vae: Path | None,
    fix_clip: bool,
    dtype: str | None,
    dry_run: bool,
    as_json: bool,
    overwrite: bool,
    verify: bool,
    on_overflow: str,
    quiet: bool,
    out_dir: Path | None = None,
    jobs: int = 1,
    as_jsonl: bool = False,
    resume: bool = False,
    cache_dir: Path | None = None,
    no_cache: bool = False,
) -> int:
    """Keep the model weights of IN, drop training state, write OUT (any format).

    OUT is optional: IN-pruned[-emaonly|-noema][-fp16].safetensors beside IN (or inside OUT
    when OUT is an existing folder). What is kept follows the identified architecture
    (SD 1/2, SDXL, SD3, Flux), never a prefix list. Training state (optimizer, schedulers,
    callbacks, loops) is dropped and reported. Batch mode: IN... --out-dir DIR prunes every
    file (folders searched) into DIR; --resume skips outputs an earlier run wrote, --jsonl
    prints one JSON object per file as it finishes (docs/scale.md).

    \b
    Examples:
      sdtool prune sd15.ckpt sd15-emaonly-fp16.safetensors --ema-only --dtype fp16
      sdtool prune sd15.ckpt --ema-only --dtype fp16
      sdtool prune model.ckpt model.safetensors --no-ema --fix-clip --dry-run
      sdtool prune model.safetensors baked.safetensors --bake-vae vae-ft-mse.safetensors
      sdtool prune checkpoints/ --out-dir pruned/ --ema-only --resume --jsonl
    """
    if ema_only and no_ema:
        raise click.UsageError("--ema-only and --no-ema exclude each other")
    from sdtool.formats.open import open_model
    from sdtool.ops.prune import PruneOptions, parse_drop, prune

    ema = "only" if ema_only else "drop" if no_ema else "keep"
    if out_dir is not None:
        if bake_vae is not None:
            raise click.UsageError("--bake-vae prunes one model: not with --out-dir")
        opts = PruneOptions(
            ema=ema, allow_partial_ema=allow_partial_ema, drop=parse_drop(drop),
            fix_clip=fix_clip, dtype=parse_dtype(dtype), dry_run=dry_run, overwrite=overwrite,
            verify=verify, on_overflow=on_overflow,
        )  # fmt: skip
        return _batch(
            tuple(Path(p) for p in paths), out_dir, opts, jobs=jobs, as_json=as_json,
            as_jsonl=as_jsonl, quiet=quiet,
            resume=resume, cache_dir=cache_dir, no_cache=no_cache,
        )  # fmt: skip
    given = [n for n in ("jobs", "jsonl", "resume") if _given(n)]
    if given:
        raise click.UsageError(f"--{'/--'.join(given)}: batch mode only, add --out-dir DIR")
    if len(paths) > 2:
        raise click.UsageError(f"give IN [OUT], or inputs with --out-dir DIR (got {len(paths)})")
    src, out_arg = Path(paths[0]), (paths[1] if len(paths) == 2 else None)
    ema_tag = {"only": "emaonly", "drop": "noema"}.get(ema, "")
    out = derived(src, out_arg, ["pruned", ema_tag, dtype or ""])  # as given: it reads "out/"
    with open_model(src) as model:
        vae = open_model(bake_vae) if bake_vae else None
        try:
            with progress.byte_bar(f"writing {out.name}") as bar:
                opts = PruneOptions(
                    ema=ema,
                    allow_partial_ema=allow_partial_ema,
                    drop=parse_drop(drop),
                    bake_vae=vae,
                    fix_clip=fix_clip,
                    dtype=parse_dtype(dtype),
                    dry_run=dry_run,
                    overwrite=overwrite,
                    verify=verify,
                    on_overflow=on_overflow,
                    progress=None if bar is None else bar.absolute,
                )
                result = prune(model, out, opts)
        finally:
            if vae is not None:
                vae.close()
    return report(result, src, out, dry_run=dry_run, as_json=as_json, quiet=quiet)


def _given(param: str) -> bool:
    source = click.get_current_context().get_parameter_source(param)
    return source is click.core.ParameterSource.COMMANDLINE


def _batch(
    paths: tuple[Path, ...],
    out_dir: Path,
    opts: Any,
    *,
    jobs: int,
    as_json: bool,
    as_jsonl: bool,
    quiet: bool,
    resume: bool,
    cache_dir: Path | None,
    no_cache: bool,
) -> int:
    """prune IN... --out-dir DIR: a line per file (or JSON / JSON Lines), exit 1 if one failed."""
    from sdtool.cli.batch import check_batch_options
    from sdtool.cli.render import error
    from sdtool.ops.prune_batch import PruneItem, prune_batch

    check_batch_options(as_json=as_json, as_jsonl=as_jsonl, cache_dir=cache_dir,
                        no_cache=no_cache, resume=resume)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = None
    if as_jsonl:
        from sdtool.cli.jsonl import JsonLines

        lines = JsonLines("prune")

    def on_result(r: PruneItem) -> None:
        if r.status == "failed":
            error(r.error or r.path)
        if lines is not None:
            lines.write({**r.to_json(), "size": r.input_bytes, "sha256": None})
        elif not (as_json or quiet):
            out = console()
            if r.status == "failed":
                out.print(f"[red]failed[/red]    {markup(r.path)}")
            else:
                note = {"skipped": " exists (--overwrite)", "resumed": " already written"}
                out.print(
                    f"{r.status:<9} {markup(r.path)} -> {markup(r.output)}"
                    + note.get(r.status, f" ({human_bytes(r.output_bytes)})")
                )

    batch = prune_batch(paths, out_dir, opts, jobs=jobs, on_result=on_result, resume=resume,
                        cache_dir=cache_dir)  # fmt: skip
    if as_json and not quiet:
        print_json(batch.to_json())
    elif lines is not None and batch.ignored:  # folder files with nothing to prune (convert's rule)
        warn(f"{len(batch.ignored)} file(s) in the folders hold nothing to prune and were left "
             "out (--json lists them with the reason)")  # fmt: skip
    elif not (as_json or quiet):
        for i in batch.ignored:
            console().print(f"ignored   {markup(i.path)}: {markup(i.reason)}")
    return ExitCode.FINDINGS if batch.failed else ExitCode.OK


@click.command("extract")
@click.argument("src", metavar="IN", type=click.Path(path_type=Path))
@click.argument("out", metavar="[OUT]", required=False, type=click.Path())  # "out/" kept
@click.option(
    "--component",
    "-c",
    required=True,
    type=click.Choice(list(EXTRACT_TARGETS)),
    help="The part to extract.",
)
@click.option("--ema-only", is_flag=True, help="With --component unet: take the EMA weights.")
@common
def extract_cmd(
    src: Path,
    out: str | None,
    component: str,
    ema_only: bool,
    dtype: str | None,
    dry_run: bool,
    as_json: bool,
    overwrite: bool,
    verify: bool,
    on_overflow: str,
    quiet: bool,
) -> int:
    """Write one component of IN to OUT with its prefix stripped (the standalone layout).

    OUT is optional: IN-COMPONENT[-ema][-fp16].safetensors beside IN (or inside OUT when OUT
    is an existing folder).

    \b
    Examples:
      sdtool extract sd15.ckpt vae.safetensors --component vae
      sdtool extract sd15.ckpt --component vae
      sdtool extract sdxl.safetensors clip_g.safetensors --component clip-g --dtype fp16
      sdtool extract sd15.ckpt unet-ema.safetensors -c unet --ema-only
    """
    from sdtool.formats.open import open_model
    from sdtool.ops.prune import ExtractOptions, extract

    dst = derived(src, out, [component, "ema" if ema_only else "", dtype or ""])
    with open_model(src) as model, progress.byte_bar(f"writing {dst.name}") as bar:
        opts = ExtractOptions(
            component=component,
            ema=ema_only,
            dtype=parse_dtype(dtype),
            dry_run=dry_run,
            overwrite=overwrite,
            verify=verify,
            on_overflow=on_overflow,
            progress=None if bar is None else bar.absolute,
        )
        result = extract(model, dst, opts)
    return report(result, src, dst, dry_run=dry_run, as_json=as_json, quiet=quiet)


def report(
    result: PruneResult, src: Path, out: Path, *, dry_run: bool, as_json: bool, quiet: bool
) -> int:
    """The before/after table, what was dropped or changed and why, then what was written."""
    w = result.write
    if w is not None:
        for tname, n in w.overflows.items():
            warn(f"{src}: {n} value(s) of {tname!r} overflowed to inf in the cast")
    if quiet:
        return ExitCode.OK
    if as_json:
        print_json(result.to_json())
        return ExitCode.OK
    from rich.table import Table

    p = result.plan
    c = console()
    arch = p.identity.architecture_label
    c.print(f"{markup(src)}: {markup(p.identity.kind)}" + (f" ({markup(arch)})" if arch else ""))
    t = Table(show_edge=False, pad_edge=False, box=None, padding=(0, 1))
    t.add_column("\ncomponent")
    for when in ("before", "after"):
        for i, col in enumerate(("tensors", "params", "bytes")):
            t.add_column(f"{when if i == 0 else ''}\n{col}", justify="right")
    for name in dict.fromkeys([*p.before, *p.after]):
        t.add_row(markup(name), *_cells(p.before.get(name)), *_cells(p.after.get(name)))
    t.add_row("total", *_cells(p.total("before")), *_cells(p.total("after")), style="bold")
    print_table(c, t)
    width = wrap_width(c)

    def say(text: str) -> None:  # long lines wrap at spaces to COLUMNS or the terminal
        for line in wrap(text, width, "", "  "):
            c.print(markup(line))

    for d in p.dropped:
        say(f"dropped {d.totals.tensors:,} tensors ({human_bytes(d.totals.bytes)}): {d.reason}")
    for key, why in p.dropped_entries:
        say(f"dropped entry {key}: {why}")
    for ch in p.changes:
        say(f"changed: {ch}")
    for note in p.notes:
        say(f"note: {note}")
    if dry_run or w is None:
        say(f"dry run: {len(p.tensors):,} tensors would be written to {out}; nothing written")
    else:
        extra = ", verified bit for bit" if w.verified else ""
        say(f"wrote {w.path} ({w.format}, {w.tensors:,} tensors, {human_bytes(w.nbytes)}{extra})")
    return ExitCode.OK


def _cells(t: Any) -> tuple[str, str, str]:
    """tensors, parameters, bytes of one component (``-`` where it is absent)."""
    if t is None:
        return "-", "-", "-"
    return f"{t.tensors:,}", human_count(t.parameters), human_bytes(t.bytes)
