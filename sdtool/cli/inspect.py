"""``sdtool inspect``: a summary of a model file, from its header alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from sdtool.cli.identity import identity_lines
from sdtool.cli.options import json_option, key_option
from sdtool.cli.render import console, human_bytes, human_count, markup, print_json
from sdtool.model import ContainerFacts
from sdtool.ops.inspect import InspectReport, inspect

MAX_SHOWN = 160  # characters of a metadata value or extra field in the table view


@click.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--tensors", "list_tensors", is_flag=True, help="List every tensor.")
@click.option(
    "--filter", "pattern", metavar="GLOB", help="With --tensors: only names matching GLOB."
)
@key_option("Use")
@json_option("inspect")
def inspect_cmd(
    file: Path, list_tensors: bool, pattern: str | None, key: str | None, as_json: bool
) -> int:
    """Summarise FILE: format, tensors, parameters, dtypes, components, metadata, globals.

    Reads headers and pickles only, never tensor bytes, and never runs code from the file.

    \b
    Examples:
      sdtool inspect model.ckpt
      sdtool inspect model.safetensors --tensors --filter 'first_stage_model.*'
      sdtool inspect model.ckpt --json | jq .totals
    """
    report = inspect(file, key=key, tensors=list_tensors or bool(pattern), filter=pattern)
    if as_json:
        print_json(report.to_json())
    else:
        render(report)
    return 0


def _bucket_row(name: str, b: Any, total: int) -> list[str]:
    share = f"{100 * b.bytes / total:.1f}%" if total else "-"
    return [name, f"{b.tensors:,}", human_count(b.parameters), human_bytes(b.bytes), share]


def _table(title: str, *columns: str) -> Table:
    t = Table(
        title=title, title_justify="left", title_style="bold", show_edge=False, pad_edge=False
    )
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def render(r: InspectReport) -> None:
    """Print the report as rich tables (everything from the file is escaped)."""
    out = console()
    out.print(f"[bold]{markup(r.path)}[/bold]")
    facts = [
        ("format", markup(r.format + _container_note(r.container))),
        ("file size", f"{human_bytes(r.file_size)} ({r.file_size:,} bytes)"),
        ("tensors", f"{r.totals.tensors:,}"),
        ("parameters", f"{r.totals.parameters:,} ({human_count(r.totals.parameters)})"),
        ("tensor bytes", human_bytes(r.totals.bytes)),
    ]
    for k, v in facts:
        out.print(f"  {k:<13} {v}")
    if r.identity is not None:
        out.print("\n[bold]What it is[/bold]")
        for line in identity_lines(r.identity):
            out.print(f"  {markup(line)}")
    if r.totals.tensors:
        t = _table("\nBy dtype", "dtype", "tensors", "params", "bytes", "share")
        for name, b in r.dtypes.items():
            t.add_row(*_bucket_row(name, b, r.totals.bytes))
        out.print(t)
        t = _table("\nBy component", "component", "tensors", "params", "bytes", "share")
        for name, b in r.components.items():
            t.add_row(*_bucket_row(name, b, r.totals.bytes))
        out.print(t)
    if r.other_tensors.tensors:
        o = r.other_tensors
        out.print(
            f"\n[yellow]{o.tensors} more tensors ({human_bytes(o.bytes)}) lie outside the "
            "state dict (e.g. optimizer state)[/yellow]"
        )
    if r.metadata:
        t = _table(f"\nMetadata ({len(r.metadata)} keys)", "key", "value")
        t.columns[1].justify = "left"
        for k, v in r.metadata.items():
            t.add_row(markup(k, 60), markup(v, MAX_SHOWN))
        out.print(t)
    if r.extra:
        t = _table("\nNon-tensor fields", "field", "value")
        t.columns[1].justify = "left"
        for k, v in r.extra.items():
            t.add_row(markup(k, 60), markup(_short(v), MAX_SHOWN))
        out.print(t)
    if r.globals:
        t = _table("\nGlobals in the pickle", "global", "loaded as", "scan verdict")
        for g in r.globals:
            mark = {"safe": "safe", "suspicious": "[yellow]suspicious[/yellow]"}.get(
                g.severity, "[red]dangerous[/red]"
            )
            t.add_row(markup(f"{g.module}.{g.name}", 90), g.loaded_as, mark)
        out.print(t)
        if any(g.unusual for g in r.globals):
            out.print(
                "  [dim]stand-ins are inert records: sdtool never imports or calls them. "
                "Run `sdtool scan` for what torch.load would do.[/dim]"
            )
    if r.tensors:
        t = _table(f"\nTensors ({len(r.tensors)})", "name", "dtype", "shape", "bytes")
        t.columns[2].justify = "left"
        for name, info in r.tensors:
            t.add_row(markup(name), info.type_code, str(list(info.shape)), human_bytes(info.nbytes))
        out.print(t)


def _container_note(c: ContainerFacts) -> str:
    notes = []
    if prefix := getattr(c, "prefix", ""):
        notes.append(f"folder {prefix!r}")
    if getattr(c, "byteorder", "") == "big":
        notes.append("big-endian")
    if protocol := getattr(c, "pickle_protocol", 0):
        notes.append(f"pickle protocol {protocol}")
    if c.state_dict_path:
        notes.append(f"tensors under {c.state_dict_path!r}")
    return f" ({', '.join(notes)})" if notes else ""


def _short(v: Any) -> str:
    import json

    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
