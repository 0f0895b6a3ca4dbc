"""``sdtool diff A B``: tensor-by-tensor comparison; exit 0 identical, 1 different, 2 error."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdtool.cli import progress, render
from sdtool.cli.options import json_option, quiet_option

if TYPE_CHECKING:
    from sdtool.ops.diff import DiffResult, TensorDiff
from sdtool.vocab import ExitCode


def _fmt_diff(x: float | int | None) -> str:
    if x is None:
        return "-"
    return str(x) if isinstance(x, int) else f"{x:.6g}"


def _line(t: TensorDiff) -> list[str] | None:
    """The parts of a tensor's line: the labelled name first, then its details."""
    name = render.markup(t.name)
    a = f"{t.dtype_a} {list(t.shape_a or ())}"
    b = f"{t.dtype_b} {list(t.shape_b or ())}"
    if t.status == "missing":
        return [f"[red]- {name}[/]", a]
    if t.status == "extra":
        return [f"[green]+ {name}[/]", b]
    if t.status == "shape":
        return [f"[yellow]shape[/]   {name}", f"{a} -> {b}"]
    cast = " after the cast" if t.status == "dtype" else ""
    if t.changed is None:  # --fast: known to differ, elements not counted
        values = f"differs{cast}; elements not counted (--fast)"
    else:
        values = f"{t.changed:,} of {t.numel:,} differ{cast}, max |a-b| {_fmt_diff(t.max_abs_diff)}"
    if t.nan_mismatch:
        values += f", {t.nan_mismatch:,} NaN on one side"
    if t.status == "dtype":
        label = "changed" if t.counted_as == "changed" else "dtype  "
        return [f"[yellow]{label}[/] {name}", f"{t.dtype_a} -> {t.dtype_b}", f"({values})"]
    if t.status == "changed":
        return [f"[yellow]changed[/] {name}", a, f"({values})"]
    return None


def _print_fitted(out: Any, parts: list[str], width: int | None) -> None:
    """A tensor's line; too wide for the output, its details go on an indented line of their
    own (the name is never cut)."""
    from rich.text import Text

    line = "  " + "  ".join(parts)
    if width is None or Text.from_markup(line).cell_len <= width:
        out.print(line)
        return
    out.print("  " + parts[0])
    out.print("      " + "  ".join(parts[1:]))


def _render(r: DiffResult, *, summary_only: bool = False) -> None:
    out = render.console()
    if summary_only:
        out.print(_summary(r))
        return
    for label, path, fmt in (("A", r.a, r.format_a), ("B", r.b, r.format_b)):
        out.print(f"{label}: {render.markup(path)} ({fmt})")
    width = render.wrap_width(out)
    for t in r.tensors:
        line = _line(t)
        if line is not None:
            _print_fitted(out, line, width)
    for label, keys in (
        ("metadata only in A", r.metadata_a_only),
        ("metadata only in B", r.metadata_b_only),
        ("metadata changed", r.metadata_changed),
    ):
        if keys:
            out.print(f"  {label}: {', '.join(render.markup(k, 80) for k in keys)}")
    out.print(_summary(r))


def _summary(r: DiffResult) -> str:
    """The totals line: tensors by how they compare, the largest difference, the verdict."""
    c = r.counts
    order = ("equal", "changed", "dtype", "shape", "missing", "extra")
    summary = ", ".join(f"{c[s]:,} {s}" for s in order)
    verdict = "[green]identical[/]" if r.identical else "[red]different[/]"
    if r.fast and not r.identical:  # the maximum is not computed under --fast
        return f"{summary}; {verdict}"
    return f"{summary}; max |a-b| {_fmt_diff(r.max_abs_diff)}; {verdict}"


@click.command("diff")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option(
    "--dtype-tolerant",
    is_flag=True,
    help="Count a dtype change as identical when A cast to B's dtype equals B bit for bit.",
)
@click.option(
    "--fast",
    is_flag=True,
    help="Decide each tensor from its bytes: stop at its first difference, no element counts.",
)
@click.option("--summary", "summary_only", is_flag=True, help="Print only the totals line.")
@json_option("diff")
@quiet_option("print nothing; the exit code says identical (0) or different (1)")
def diff_cmd(
    a: Path,
    b: Path,
    dtype_tolerant: bool,
    fast: bool,
    summary_only: bool,
    as_json: bool,
    quiet: bool,
) -> int:
    """Compare model files A and B tensor by tensor.

    Lists tensors only in A (-) or only in B (+), shape and dtype changes, and for each changed
    tensor how many elements differ and the largest absolute difference. Values are compared bit
    for bit, streamed one tensor at a time; pieces whose bytes are equal are never decoded, so
    equal files compare at the speed of reading them. --fast also skips counting: a tensor is
    read only up to its first difference. The totals count a tensor whose values changed as
    "changed", its dtype changed or not; "dtype" counts tensors whose one change is the dtype.
    Exit code 0 when identical, 1 when they differ, 2 on errors: use it in CI to confirm a
    conversion.

    \b
    Examples:
      sdtool diff model.ckpt model.safetensors
      sdtool diff --dtype-tolerant model.safetensors model-fp16.safetensors
      sdtool diff --json base.safetensors finetuned.safetensors
      sdtool diff --summary model.ckpt model-pruned.safetensors
      sdtool diff --fast --summary base.safetensors finetuned.safetensors
    """
    if as_json and summary_only:
        raise click.UsageError("--summary is for the text report; --json always has the totals")
    from sdtool.ops.diff import diff

    with progress.byte_bar("comparing") as bar:
        cb = None if bar is None else bar.absolute
        result = diff(a, b, dtype_tolerant=dtype_tolerant, fast=fast, progress=cb)
    if quiet:
        pass
    elif as_json:
        render.print_json(result.to_json())
    else:
        _render(result, summary_only=summary_only)
    return ExitCode.OK if result.identical else ExitCode.FINDINGS
