"""``sdtool merge A B [C] OUT``: checkpoint arithmetic, streamed tensor by tensor."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import click

from sdtool.cli import render
from sdtool.cli.options import (
    dry_run_option,
    dtype_option,
    json_option,
    quiet_option,
    write_options,
)
from sdtool.errors import UsageError
from sdtool.vocab import MERGE_METHODS, ExitCode

if TYPE_CHECKING:  # the library (numpy) loads when the command runs, not for --help
    from sdtool.ops.merge import MergeResult

#: keys listed per rule in the text plan (all of them are in --json)
LIST_LIMIT = 20


@click.command("merge")
@click.argument(
    "paths", nargs=-1, required=True, metavar="A B [C...] OUT", type=click.Path(path_type=Path)
)
@click.option(
    "--method",
    type=click.Choice(list(MERGE_METHODS)),
    default="weighted-sum",
    show_default=True,
    help="weighted-sum: (1-alpha)A + alpha B; add-difference: A + alpha(B - C); "
    "ties/dare: BASE + alpha * merged deltas of M1.. ; slerp: spherical A->B.",
)
@click.option("--alpha", type=float, default=0.5, show_default=True, help="The method's weight.")
@click.option(
    "--density",
    type=float,
    default=1.0,
    show_default=True,
    help="ties/dare: the fraction of each delta kept.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="dare: the drop masks' seed.")
@click.option(
    "--block-weights",
    metavar="W,W,...",
    help="Per-block alphas as supermerger writes them: BASE,IN00..,M00,OUT.. "
    "(26 values for SD 1.x/2.x, 20 for SDXL).",
)
@dtype_option()
@write_options
@dry_run_option
@json_option("merge")
@quiet_option("print nothing but errors; the exit code tells")
def merge_cmd(
    paths: tuple[Path, ...],
    method: str,
    alpha: float,
    density: float,
    seed: int,
    block_weights: str | None,
    dtype: str | None,
    overwrite: bool,
    verify: bool,
    on_overflow: str,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
) -> int:
    """Merge model files into OUT, streamed one tensor at a time.

    Memory is about the largest tensor times the number of inputs. Computation is float32
    whatever the inputs' dtypes; the output keeps A's dtypes unless --dtype. A is the primary:
    its keys are the output's; integer tensors (position_ids), keys another input lacks and
    unalignable shapes keep A's values; a smaller B inside A (9-channel inpainting conv_in) is
    merged over the common channels. The recipe goes into the metadata (sd_merge_recipe).

    \b
    Examples:
      sdtool merge a.safetensors b.ckpt ab.safetensors --alpha 0.3
      sdtool merge a.sft b.sft c.sft out.sft --method add-difference --alpha 1
      sdtool merge base.sft m1.sft m2.sft out.sft --method ties --density 0.2
      sdtool merge a.sft b.sft ab.sft --dry-run \\
        --block-weights 0.5,1,1,1,1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
    """
    from sdtool.ops.merge import merge

    if len(paths) < 3:
        raise UsageError(f"give at least two inputs and OUT (got {len(paths)} paths)")
    *inputs, out = paths
    result = merge(
        inputs,
        out,
        method=method,
        alpha=alpha,
        density=density,
        seed=seed,
        block_weights=block_weights,
        dtype=dtype,
        overwrite=overwrite,
        verify=verify,
        dry_run=dry_run,
        on_overflow=on_overflow,
    )
    if quiet:
        pass
    elif as_json:
        render.print_json(result.to_json())
    else:
        render_merge(result)
    return ExitCode.OK


def render_merge(r: MergeResult) -> None:
    """The plan (rules, blocks, what is copied or skipped), then what was written."""
    out = render.console()
    names = ", ".join(f"{chr(65 + i)}={render.markup(p)}" for i, p in enumerate(r.inputs))
    out.print(f"{r.method} (alpha {r.alpha:g}) of {names}")
    counts = ", ".join(f"{n:,} {rule}" for rule, n in r.counts.items())
    out.print(f"  keys: {counts}; {len(r.skipped):,} skipped (not in A)")
    if r.block_weights is not None:
        per: Counter[str] = Counter(k.block for k in r.keys if k.block is not None)
        cells = [f"{b}={w:g} ({per[b]})" for b, w in r.block_weights.items()]
        out.print(f"  blocks: {', '.join(cells)}")
    reasons: dict[str, list[str]] = defaultdict(list)
    for k in r.keys:
        if k.rule != "merge":
            reasons[f"{k.rule}: {k.reason}"].append(k.name)
    for why, keys in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(render.markup(k, 90) for k in keys[:LIST_LIMIT])
        more = f" (+{len(keys) - LIST_LIMIT} more)" if len(keys) > LIST_LIMIT else ""
        out.print(f"  {render.markup(why)} [{len(keys)}]: {shown}{more}")
    if r.skipped:
        keys = list(r.skipped)
        shown = ", ".join(render.markup(k, 90) for k in keys[:LIST_LIMIT])
        more = f" (+{len(keys) - LIST_LIMIT} more)" if len(keys) > LIST_LIMIT else ""
        out.print(f"  skipped, not in A [{len(keys)}]: {shown}{more}")
    for note in r.notes:
        out.print(f"  {render.markup(note)}")
    if r.dry_run:
        merged = [k for k in r.keys if k.rule == "merge"]
        for k in merged[:LIST_LIMIT]:
            where = f" ({k.block})" if k.block else ""
            out.print(f"  merge {render.markup(k.name, 90)}: alpha {k.alpha:g}{where}")
        if len(merged) > LIST_LIMIT:
            out.print(f"  (+{len(merged) - LIST_LIMIT} more merged; --json lists every key)")
    render_written(r, r.dtype, [f"{len(r.keys):,} tensors"])


class Written(Protocol):
    """What ``render_written`` reads of a merge / bake / extract / resize result."""

    @property
    def output(self) -> Path: ...
    @property
    def dry_run(self) -> bool: ...
    @property
    def overflows(self) -> dict[str, int]: ...
    @property
    def output_bytes(self) -> int: ...
    @property
    def verified(self) -> bool: ...
    @property
    def seconds(self) -> float: ...


def render_written(r: Written, dtype: str, how: list[str] | None = None) -> None:
    """The end of every arithmetic command's report: overflow warnings, then ``dry run:
    nothing written`` or ``wrote OUT: [how, ]size[, verified] in N s``."""
    for name, n in r.overflows.items():
        render.warn(f"{n} value(s) of {name!r} overflowed to inf in the cast to {dtype}")
    if r.dry_run:
        render.console().print("dry run: nothing written")
        return
    how = [*(how or []), render.human_bytes(r.output_bytes)] + (["verified"] if r.verified else [])
    render.console().print(
        f"wrote {render.markup(r.output)}: {', '.join(how)} in {r.seconds:.1f} s"
    )
