"""``sdtool inspect``: a summary of a model file, from its header alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdtool.cli.options import (
    PathOrUrl,
    cache_options,
    json_option,
    jsonl_option,
    key_option,
    quiet_option,
)
from sdtool.cli.plain import Table
from sdtool.cli.render import (
    error,
    human_bytes,
    human_count,
    markup,
    print_json,
    report_console,
)
from sdtool.vocab import owner_label

if TYPE_CHECKING:
    from sdtool.model import ContainerFacts
    from sdtool.ops.inspect import InspectReport

MAX_SHOWN = 160  # characters of a metadata value or extra field in the table view


@click.command("inspect")
@click.argument("files", nargs=-1, required=True, metavar="FILE...", type=PathOrUrl())
@click.option("--tensors", "list_tensors", is_flag=True, help="List every tensor.")
@click.option(
    "--filter", "pattern", metavar="GLOB", help="List only the tensors whose name matches GLOB."
)
@key_option("Use")
@json_option("inspect")
@quiet_option("print nothing; exit 0 when every FILE can be read, 2 when one cannot")
@jsonl_option
@cache_options
def inspect_cmd(
    files: tuple[Path, ...],
    list_tensors: bool,
    pattern: str | None,
    key: str | None,
    as_json: bool,
    quiet: bool,
    as_jsonl: bool = False,
    cache_dir: Path | None = None,
    no_cache: bool = False,
) -> int:
    """Summarise each FILE: format, tensors, parameters, dtypes, components, metadata, globals.

    Reads headers and pickles only, never tensor bytes, and never runs code from the file.
    FILE may be - for standard input, or a URL (https://, hf://ORG/REPO/PATH[@REV]) read by
    range requests. With several files, --json prints a list; --jsonl one JSON object per file
    as it is read (docs/scale.md), an unchanged file's from the result cache (--cache DIR,
    --no-cache).

    \b
    Examples:
      sdtool inspect model.ckpt
      sdtool inspect model.safetensors --tensors --filter 'first_stage_model.*'
      sdtool inspect model.ckpt --json | jq .totals
      sdtool inspect loras/*.safetensors --quiet
      sdtool inspect hf://stabilityai/sdxl-turbo/sd_xl_turbo_1.0_fp16.safetensors
    """
    from sdtool.cli.batch import check_batch_options
    from sdtool.cli.stdin import spooled
    from sdtool.errors import SdtoolError
    from sdtool.ops.inspect import inspect

    check_batch_options(as_json=as_json, as_jsonl=as_jsonl, cache_dir=cache_dir, no_cache=no_cache)
    if as_jsonl:
        return write_jsonl(
            files, key, list_tensors or bool(pattern), pattern, cache_dir, cached=not no_cache
        )
    reports = []
    code = 0
    for i, file in enumerate(files):
        try:
            with spooled(file) as real:
                report = inspect(
                    real, key=key, tensors=list_tensors or bool(pattern), filter=pattern
                )
        except SdtoolError as e:
            if len(files) == 1:
                raise
            error(e.with_path(file))
            code = 2
            continue
        report = dataclasses.replace(report, path=file)
        reports.append(report)
        if not as_json and not quiet:
            if i:
                report_console().print()
            render(report)
    if as_json and not quiet:
        print_json(reports[0].to_json() if len(files) == 1 else [r.to_json() for r in reports])
    return code


#: cached lines written together, at most
BATCH = 256


def write_jsonl(
    files: tuple[Path, ...],
    key: str | None,
    tensors: bool,
    pattern: str | None,
    cache_dir: Path | None,
    *,
    cached: bool,
) -> int:
    """Each file's line (docs/scale.md): the --json object (docs/inspect.md) after the
    envelope, then ``sha256`` (null), ``ruleset`` (the verdicts that graded the pickle's
    globals), ``identify`` (the version of identification's tables and rules) and ``cached``.

    A local file's line is spliced from its body (``inspect_cache.body_of``), the same text
    for a fresh and a cached record; the cached lines that are ready together go out in one
    write, a fresh one as soon as its file is read. Returns the exit code (2: a file could
    not be read; the others are still read).
    """
    from json.encoder import encode_basestring_ascii as enc

    from sdtool.cache import open_cache
    from sdtool.cli.jsonl import JsonLines
    from sdtool.cli.stdin import is_stdin, spooled
    from sdtool.errors import SdtoolError
    from sdtool.ops import inspect_cache as ic
    from sdtool.ops.inspect import inspect
    from sdtool.scan.ruleset import identify_version, ruleset_version
    from sdtool.urls import is_url

    lines = JsonLines("inspect")
    head = lines.head + '"path": '
    tail = f', "sha256": null, "ruleset": {enc(ruleset_version())}, "identify": '
    tail += enc(identify_version()) + ', "cached": '
    settings = ic.settings_of(key, tensors, pattern)
    local = [i for i, f in enumerate(files) if not (is_stdin(f) or is_url(f))]
    cache = open_cache(cache_dir, enabled=cached and bool(local))
    found = [ic.Found(None, None)] * len(files)
    for i, hit in zip(local, ic.lookup_many([str(files[i]) for i in local], cache, settings),
                      strict=True):  # fmt: skip
        found[i] = hit
    if cache is not None:
        cache.release()  # the lookups are done; reading files may take long
    code = 0
    ready: list[str] = []
    for file, f in zip(files, found, strict=True):
        path = enc(str(file))
        if f.body is not None:
            ready.append(f"{head}{path}, {f.body[1:-1]}{tail}true}}\n")
            if len(ready) >= BATCH:
                lines.write_lines(ready)
                ready = []
            continue
        lines.write_lines(ready)
        ready = []
        try:
            with spooled(file) as real:
                report = inspect(real, key=key, tensors=tensors, filter=pattern)
        except SdtoolError as e:
            error(e.with_path(file))
            lines.write({"path": str(file), "error": str(e)})
            code = 2
            continue
        body = ic.body_of(report)
        lines.write_lines([f"{head}{path}, {body[1:-1]}{tail}false}}\n"])
        if f.identity is not None:
            ic.store(str(file), cache, f, report, body, settings)
    lines.write_lines(ready)
    return code


def _bucket_row(name: str, b: Any, total: int) -> list[str]:
    share = f"{100 * b.bytes / total:.1f}%" if total else "-"
    return [name, f"{b.tensors:,}", human_count(b.parameters), human_bytes(b.bytes), share]


def _table(title: str, *columns: str) -> Table:
    """A report table (printed as rich prints it, bold title left, no outer edge)."""
    t = Table(title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def render(r: InspectReport) -> None:
    """Print the report as tables, as rich lays them out (everything from the file is escaped;
    rich itself is imported only where its output is more than plain text: sdtool.cli.plain)."""
    from sdtool.cli.identity import identity_lines

    out = report_console()
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
        out.print_table(t)
        t = _table("\nBy component", "component", "tensors", "params", "bytes", "share")
        for name, b in r.components.items():
            t.add_row(*_bucket_row(owner_label(name), b, r.totals.bytes))
        out.print_table(t)
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
        out.print_table(t)
    if r.extra:
        t = _table("\nNon-tensor fields", "field", "value")
        t.columns[1].justify = "left"
        for k, v in r.extra.items():
            t.add_row(markup(k, 60), markup(_short(v), MAX_SHOWN))
        out.print_table(t)
    if r.globals:
        t = _table("\nGlobals in the pickle", "scan verdict", "loaded as", "global")
        for c in t.columns:
            c.justify = "left"
        for g in r.globals:
            mark = {"safe": "safe", "suspicious": "[yellow]suspicious[/yellow]"}.get(
                g.severity, "[red]dangerous[/red]"
            )
            t.add_row(mark, g.loaded_as, markup(f"{g.module}.{g.name}"))
        out.print_table(t)
        if any(g.unusual for g in r.globals):
            out.print(
                "  [dim]stand-ins are inert records: sdtool never imports or calls them. "
                "Run `sdtool scan` for what torch.load would do.[/dim]"
            )
    if r.listed and not r.tensors:
        out.print(f"\nno tensor name matches {markup(repr(r.filter))} (of {r.totals.tensors:,})")
    elif r.tensors:
        title = f"Tensors ({len(r.tensors):,})"
        if r.filter is not None:
            title = f"Tensors matching {markup(repr(r.filter))} ({len(r.tensors):,} of "
            title += f"{r.totals.tensors:,})"
        t = _table("\n" + title, "name", "dtype", "shape", "bytes")
        t.columns[2].justify = "left"
        for name, info in r.tensors:
            t.add_row(markup(name), info.type_code, str(list(info.shape)), human_bytes(info.nbytes))
        out.print_table(t)


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
