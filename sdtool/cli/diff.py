"""``sdtool diff A B``: tensor-by-tensor comparison; exit 0 identical, 1 different, 2 error."""

from __future__ import annotations

from pathlib import Path

import click

from sdtool.cli import progress, render
from sdtool.cli.options import json_option
from sdtool.ops.diff import DiffResult, TensorDiff, diff
from sdtool.vocab import ExitCode


def _fmt_diff(x: float | int | None) -> str:
    if x is None:
        return "-"
    return str(x) if isinstance(x, int) else f"{x:.6g}"


def _line(t: TensorDiff) -> str | None:
    name = render.markup(t.name)
    a = f"{t.dtype_a} {list(t.shape_a or ())}"
    b = f"{t.dtype_b} {list(t.shape_b or ())}"
    if t.status == "missing":
        return f"  [red]- {name}[/]  {a}"
    if t.status == "extra":
        return f"  [green]+ {name}[/]  {b}"
    if t.status == "shape":
        return f"  [yellow]shape[/]   {name}  {a} -> {b}"
    cast = " after the cast" if t.status == "dtype" else ""
    values = f"{t.changed:,} of {t.numel:,} differ{cast}, max |a-b| {_fmt_diff(t.max_abs_diff)}"
    if t.nan_mismatch:
        values += f", {t.nan_mismatch:,} NaN on one side"
    if t.status == "dtype":
        return f"  [yellow]dtype[/]   {name}  {t.dtype_a} -> {t.dtype_b}  ({values})"
    if t.status == "changed":
        return f"  [yellow]changed[/] {name}  {a}  ({values})"
    return None


def _render(r: DiffResult) -> None:
    out = render.console()
    for label, path, fmt in (("A", r.a, r.format_a), ("B", r.b, r.format_b)):
        out.print(f"{label}: {render.markup(path)} ({fmt})")
    for t in r.tensors:
        line = _line(t)
        if line is not None:
            out.print(line)
    for label, keys in (
        ("metadata only in A", r.metadata_a_only),
        ("metadata only in B", r.metadata_b_only),
        ("metadata changed", r.metadata_changed),
    ):
        if keys:
            out.print(f"  {label}: {', '.join(render.markup(k, 80) for k in keys)}")
    c = r.counts
    order = ("equal", "changed", "dtype", "shape", "missing", "extra")
    summary = ", ".join(f"{c[s]:,} {s}" for s in order)
    verdict = "[green]identical[/]" if r.identical else "[red]different[/]"
    out.print(f"{summary}; max |a-b| {_fmt_diff(r.max_abs_diff)}; {verdict}")


@click.command("diff")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option(
    "--dtype-tolerant",
    is_flag=True,
    help="Count a dtype change as identical when A cast to B's dtype equals B bit for bit.",
)
@json_option("diff")
def diff_cmd(a: Path, b: Path, dtype_tolerant: bool, as_json: bool) -> int:
    """Compare model files A and B tensor by tensor.

    Lists tensors only in A (-) or only in B (+), shape and dtype changes, and for each changed
    tensor how many elements differ and the largest absolute difference. Values are compared bit
    for bit, streamed one tensor at a time. Exit code 0 when identical, 1 when they differ,
    2 on errors: use it in CI to confirm a conversion.

    \b
    Examples:
      sdtool diff model.ckpt model.safetensors
      sdtool diff --dtype-tolerant model.safetensors model-fp16.safetensors
      sdtool diff --json base.safetensors finetuned.safetensors
    """
    with progress.byte_bar("comparing") as bar:
        cb = None if bar is None else bar.absolute
        result = diff(a, b, dtype_tolerant=dtype_tolerant, progress=cb)
    if as_json:
        render.print_json(result.to_json())
    else:
        _render(result)
    return ExitCode.OK if result.identical else ExitCode.FINDINGS
