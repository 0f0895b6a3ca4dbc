"""``sdtool inspect``: a summary of a model file, from its header alone."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

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
    columns,
    error,
    human_bytes,
    human_count,
    markup,
    print_json,
    report_console,
    wrap,
)
from sdtool.vocab import owner_label

if TYPE_CHECKING:
    from sdtool.cache import Cache
    from sdtool.errors import SdtoolError
    from sdtool.identify.result import Identity
    from sdtool.ops.inspect_cache import Found

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
    as it is read (docs/scale.md). An unchanged local file is answered from the result cache
    (the same output; --cache DIR, --no-cache).

    \b
    Examples:
      sdtool inspect model.ckpt
      sdtool inspect model.safetensors --tensors --filter 'first_stage_model.*'
      sdtool inspect model.ckpt --json | jq .totals
      sdtool inspect loras/*.safetensors --quiet
      sdtool inspect hf://stabilityai/sdxl-turbo/sd_xl_turbo_1.0_fp16.safetensors
    """
    from sdtool.cli.batch import check_batch_options

    check_batch_options(as_json=as_json, as_jsonl=as_jsonl, cache_dir=cache_dir, no_cache=no_cache)
    tensors = list_tensors or bool(pattern)
    views = not (quiet or as_jsonl)
    answers = _answers(files, key, tensors, pattern, cache_dir, cached=not no_cache,
                       views=views, bodies=as_jsonl)  # fmt: skip
    if as_jsonl:
        return write_jsonl(answers)
    docs = []
    code = 0
    for i, a in enumerate(answers):
        if a.error is not None:
            if len(files) == 1:
                raise a.error
            error(a.error.with_path(a.file))
            code = 2
            continue
        if quiet:
            continue
        assert a.doc is not None
        docs.append(a.doc)
        if not as_json:
            if i:
                report_console().print()
            render(a.doc, a.what)
    if as_json and not quiet:
        print_json(docs[0] if len(files) == 1 else docs)
    return code


class Answer(NamedTuple):
    """One file's answer, cached or fresh."""

    file: Path
    cached: bool
    body: str | None  # the stored body (``inspect_cache.body_of``): always for --jsonl
    doc: dict[str, Any] | None  # the --json document (not for --jsonl, --quiet hits)
    what: list[str] | None  # the "What it is" lines (None: no identity)
    error: SdtoolError | None = None  # the file could not be read


def _answers(
    files: tuple[Path, ...],
    key: str | None,
    tensors: bool,
    pattern: str | None,
    cache_dir: Path | None,
    *,
    cached: bool,
    views: bool,
    bodies: bool,
) -> Iterator[Answer]:
    """Each file's answer in order: an unchanged local file's from the result cache (looked
    up for all files at once; ``views``: its document and lines decoded), the others read and,
    once the caller has used the answer, stored (``bodies``: every answer has its body).

    A cached answer loads only the cache and the lookup (sdtool.ops.inspect_cache): the readers
    and identification are imported for the first file that is read.
    """
    from sdtool.cli.stdin import is_stdin
    from sdtool.errors import SdtoolError
    from sdtool.urls import is_url

    local = [i for i, f in enumerate(files) if not (is_stdin(f) or is_url(f))]
    found: list[Found | None] = [None] * len(files)
    cache: Cache | None = None
    settings = ""
    if cached and local:  # --no-cache loads neither the cache nor sqlite3
        from sdtool.cache import Cache
        from sdtool.ops.inspect_cache import lookup_many, settings_of

        cache = Cache(cache_dir)
        settings = settings_of(key, tensors, pattern)
        paths = [str(files[i]) for i in local]
        for i, hit in zip(local, lookup_many(paths, cache, settings), strict=True):
            found[i] = hit
        cache.release()  # the lookups are done; reading files may take long
    for file, f in zip(files, found, strict=True):
        if f is not None and f.body is not None:
            from sdtool.ops.inspect_cache import view_of

            if not views:
                yield Answer(file, True, f.body, None, None)
                continue
            try:
                doc, what = view_of(f, str(file))
            except (KeyError, TypeError, ValueError):
                f = f._replace(body=None)  # a record of another shape: read the file again
            else:
                yield Answer(file, True, f.body, doc, what)
                continue
        try:
            doc, what, identity = _read(file, key, tensors, pattern)
        except SdtoolError as e:
            yield Answer(file, False, None, None, None, e)
            continue
        storing = cache is not None and f is not None and f.identity is not None
        body = None
        if storing or bodies:
            from sdtool.ops.inspect_cache import body_of

            body = body_of(doc)
        yield Answer(file, False, body, doc, what)
        if storing and body is not None and f is not None:
            from sdtool.ops.inspect_cache import store

            store(str(file), cache, f, body, identity, doc["schema"], what, settings)


def _read(
    file: Path, key: str | None, tensors: bool, pattern: str | None
) -> tuple[dict[str, Any], list[str] | None, Identity | None]:
    """Read a file: its --json document, its "What it is" lines and its identity."""
    from dataclasses import replace

    from sdtool.cli.identity import identity_lines
    from sdtool.cli.main import settle
    from sdtool.cli.stdin import spooled
    from sdtool.ops.inspect import inspect

    settle()
    with spooled(file) as real:
        report = inspect(real, key=key, tensors=tensors, filter=pattern)
    ident = report.identity
    doc = replace(report, path=file).to_json()
    return doc, None if ident is None else identity_lines(ident), ident


#: cached lines written together, at most
BATCH = 256


def write_jsonl(answers: Iterable[Answer]) -> int:
    """Each file's line (docs/scale.md): the --json object (docs/inspect.md) after the
    envelope, then ``sha256`` (null), ``ruleset`` (the verdicts that graded the pickle's
    globals), ``identify`` (the version of identification's tables and rules) and ``cached``.

    A local file's line is spliced from its body (``inspect_cache.body_of``), the same text
    for a fresh and a cached record; the cached lines that are ready together go out in one
    write, a fresh one as soon as its file is read. Returns the exit code (2: a file could
    not be read; the others are still read).
    """
    from json.encoder import encode_basestring_ascii as enc

    from sdtool.cli.jsonl import JsonLines
    from sdtool.scan.ruleset import identify_version, ruleset_version

    lines = JsonLines("inspect")
    head = lines.head + '"path": '
    tail = f', "sha256": null, "ruleset": {enc(ruleset_version())}, "identify": '
    tail += enc(identify_version()) + ', "cached": '
    code = 0
    ready: list[str] = []
    for a in answers:
        path = enc(str(a.file))
        if a.cached:
            assert a.body is not None
            ready.append(f"{head}{path}, {a.body[1:-1]}{tail}true}}\n")
            if len(ready) >= BATCH:
                lines.write_lines(ready)
                ready = []
            continue
        lines.write_lines(ready)
        ready = []
        if a.error is not None:
            error(a.error.with_path(a.file))
            lines.write({"path": str(a.file), "error": str(a.error)})
            code = 2
            continue
        assert a.body is not None
        lines.write_lines([f"{head}{path}, {a.body[1:-1]}{tail}false}}\n"])
    lines.write_lines(ready)
    return code


def _bucket_row(name: str, b: dict[str, int], total: int) -> list[str]:
    share = f"{100 * b['bytes'] / total:.1f}%" if total else "-"
    return [name, f"{b['tensors']:,}", human_count(b["parameters"]), human_bytes(b["bytes"]), share]


def _table(title: str, *columns: str) -> Table:
    """A report table (printed as rich prints it, bold title left, no outer edge)."""
    t = Table(title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def render(doc: dict[str, Any], what: list[str] | None) -> None:
    """Print a report as tables, as rich lays them out, from its --json document (docs/
    inspect.md) and its "What it is" lines: what a cached answer holds too, so a cached and a
    fresh answer print the same bytes. Everything from the file is escaped; rich itself is
    imported only where its output is more than plain text (sdtool.cli.plain)."""
    out = report_console()
    width = columns()  # long lines wrap at spaces to COLUMNS or a terminal's width
    out.print(f"[bold]{markup(doc['path'])}[/bold]")
    totals, size = doc["totals"], doc["file_size"]
    facts = [
        ("format", doc["format"] + _container_note(doc["container"])),
        ("file size", f"{human_bytes(size)} ({size:,} bytes)"),
        ("tensors", f"{totals['tensors']:,}"),
        ("parameters", f"{totals['parameters']:,} ({human_count(totals['parameters'])})"),
        ("tensor bytes", human_bytes(totals["bytes"])),
    ]
    for k, v in facts:
        for line in wrap(v, width, f"  {k:<13} ", " " * 16):
            out.print(markup(line))
    if what is not None:
        out.print("\n[bold]What it is[/bold]")
        for line in what:
            indent = "    " if line.startswith("  ") else "  "  # a component's details
            for part in wrap(line.strip(), width, indent, indent + "  "):
                out.print(markup(part))
    if totals["tensors"]:
        t = _table("\nBy dtype", "dtype", "tensors", "params", "bytes", "share")
        for name, b in doc["dtypes"].items():
            t.add_row(*_bucket_row(name, b, totals["bytes"]))
        out.print_table(t)
        t = _table("\nBy component", "component", "tensors", "params", "bytes", "share")
        for b in doc["components"]:
            t.add_row(*_bucket_row(owner_label(b["name"]), b, totals["bytes"]))
        out.print_table(t)
    if (o := doc["other_tensors"])["tensors"]:
        out.print(
            f"\n[yellow]{o['tensors']} more tensors ({human_bytes(o['bytes'])}) lie outside the "
            "state dict (e.g. optimizer state)[/yellow]"
        )
    if metadata := doc["metadata"]:
        t = _table(f"\nMetadata ({len(metadata)} keys)", "key", "value")
        t.columns[1].justify = "left"
        for k, v in metadata.items():
            t.add_row(markup(k, 60), markup(v, MAX_SHOWN))
        out.print_table(t)
    if extra := doc["extra"]:
        t = _table("\nNon-tensor fields", "field", "value")
        t.columns[1].justify = "left"
        for k, v in extra.items():
            t.add_row(markup(k, 60), markup(_short(v), MAX_SHOWN))
        out.print_table(t)
    if globals_ := doc["globals"]:
        t = _table("\nGlobals in the pickle", "scan verdict", "loaded as", "global")
        for c in t.columns:
            c.justify = "left"
        for g in globals_:
            mark = {"safe": "safe", "suspicious": "[yellow]suspicious[/yellow]"}.get(
                g["severity"], "[red]dangerous[/red]"
            )
            t.add_row(mark, g["loaded_as"], markup(f"{g['module']}.{g['name']}"))
        out.print_table(t)
        if any(g["severity"] != "safe" for g in globals_):
            out.print(
                "  [dim]stand-ins are inert records: sdtool never imports or calls them. "
                "Run `sdtool scan` for what torch.load would do.[/dim]"
            )
    rows = doc.get("tensors")  # only when tensors were asked for (the listing, maybe empty)
    if rows is not None and not rows:
        out.print(
            f"\nno tensor name matches {markup(repr(doc['filter']))} (of {totals['tensors']:,})"
        )
    elif rows:
        title = f"Tensors ({len(rows):,})"
        if doc["filter"] is not None:
            title = f"Tensors matching {markup(repr(doc['filter']))} ({len(rows):,} of "
            title += f"{totals['tensors']:,})"
        t = _table("\n" + title, "name", "dtype", "shape", "bytes")
        t.columns[2].justify = "left"
        for row in rows:
            t.add_row(
                markup(row["name"]), row["dtype"], str(row["shape"]), human_bytes(row["bytes"])
            )
        out.print_table(t)


def _container_note(c: dict[str, Any]) -> str:
    notes = []
    if prefix := c.get("prefix", ""):
        notes.append(f"folder {prefix!r}")
    if c.get("byteorder", "") == "big":
        notes.append("big-endian")
    if protocol := c.get("pickle_protocol", 0):
        notes.append(f"pickle protocol {protocol}")
    if sd_path := c.get("state_dict_path"):
        notes.append(f"tensors under {sd_path!r}")
    return f" ({', '.join(notes)})" if notes else ""


def _short(v: Any) -> str:
    import json

    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
