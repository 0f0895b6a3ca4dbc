"""``sdtool hash``: the hashes Civitai, A1111 and kohya show, from one read of each file."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdtool.cli import progress, render
from sdtool.cli.options import (
    PathOrUrl,
    cache_options,
    cluster_option,
    complete_from,
    json_option,
    jsonl_option,
    quiet_option,
)
from sdtool.errors import SdtoolError
from sdtool.vocab import HASH_NAMES, ExitCode

if TYPE_CHECKING:  # the hashing machinery (and the cache's sqlite3) load when a file is hashed
    from sdtool.cache import Cache
    from sdtool.ops.hash import HashResult


@click.command("hash")
@click.argument("files", nargs=-1, metavar="FILE...", type=PathOrUrl())
@click.option(
    "-a",
    "--algorithm",
    "algorithms",
    multiple=True,
    metavar="NAME[,NAME]",
    shell_complete=complete_from([*HASH_NAMES, "all"]),
    help="Hashes to compute: " + ", ".join(HASH_NAMES) + " or all (default: all).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "sha256sum"]),
    default="table",
    show_default=True,
    help="sha256sum: one line 'HEX  FILE' per file, as sha256sum -c reads it.",
)
@click.option(
    "-c",
    "--check",
    "check",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="SUMS",
    help="Check the files listed in SUMS (sha256sum's format) and say OK or FAILED for each.",
)
@json_option("hash", "a JSON list")
@jsonl_option
@cache_options
@quiet_option("print nothing but errors (with --check: only the files that FAILED)")
@cluster_option
def hash_cmd(
    files: tuple[Path, ...],
    algorithms: tuple[str, ...],
    fmt: str,
    check: Path | None,
    as_json: bool,
    as_jsonl: bool,
    cache_dir: Path | None,
    no_cache: bool,
    quiet: bool,
    cluster: str | None = None,
) -> int:
    """Print SHA256, AutoV1, AutoV2, AutoV3, CRC32 and BLAKE3 of each FILE in one read.

    Hex is uppercase, as Civitai shows it. AutoV3 (the LoRA/"addnet" hash) exists only for
    safetensors files. Folders are hashed recursively; - reads standard input; a URL (https://,
    hf://ORG/REPO/PATH[@REV]) is streamed once, never saved. Exit code 0 when
    every file was hashed (and, with --check, matched), 1 when a check FAILED, 2 when a file
    could not be read.

    \b
    Examples:
      sdtool hash model.safetensors
      sdtool hash -a autov2,autov3 loras/
      sdtool hash --format sha256sum models/ > SHA256SUMS
      sdtool hash --check SHA256SUMS
      sdtool hash --jsonl /mirror/models > hashes.jsonl   # cached: a rerun reads nothing
    """
    import json

    from sdtool.cache import open_cache
    from sdtool.ops.hash import SCHEMA, parse_algorithms, walk_files

    if as_json and as_jsonl:
        raise click.UsageError("choose one of --json and --jsonl")
    if cache_dir is not None and no_cache:
        raise click.UsageError("--cache DIR and --no-cache contradict each other")
    cache = open_cache(cache_dir, enabled=not no_cache)
    if check is not None:
        if files or as_json or as_jsonl or fmt != "table" or algorithms:
            raise click.UsageError(
                "--check SUMS takes no FILE, --json, --jsonl, --format or --algorithm"
            )
        return _check(check, quiet=quiet, cache=cache)
    if fmt == "sha256sum" and as_jsonl:
        raise click.UsageError("--format sha256sum prints SHA256 only: drop --jsonl")
    if not files:
        raise click.UsageError("give at least one FILE (or --check SUMS)")
    if fmt == "sha256sum" and (as_json or algorithms):
        raise click.UsageError("--format sha256sum prints SHA256 only: drop --json/--algorithm")
    names = ("sha256",) if fmt == "sha256sum" else (
        parse_algorithms(algorithms) if algorithms else HASH_NAMES
    )  # fmt: skip
    code = ExitCode.OK
    lines = None
    if as_jsonl:
        from sdtool.cli.jsonl import JsonLines

        lines = JsonLines("hash")
    from json.encoder import encode_basestring_ascii as enc

    records: list[dict[str, Any]] = []
    table = not (as_jsonl or as_json or quiet or fmt == "sha256sum")
    if table:  # plain text off a terminal, without rich (byte for byte what rich prints)
        out = render.report_console()
    entries = walk_files(_shards(files))  # a shard index or folder: its shards
    head = "" if lines is None else lines.head + '"path": '
    for batch in _outcomes(entries, names, cache, cluster):
        text: list[str] = []
        for path, stored, cached in batch:
            name = str(path)
            if stored is None:
                code = ExitCode.ERROR
                if lines is not None:
                    text.append(lines.line({"path": name, "error": True}))
                continue
            if lines is not None:  # spliced from the stored text: nothing decoded
                m = _SHA256.search(stored)
                sha = f'"{m.group(1).lower()}"' if m else "null"
                tail = "true}\n" if cached else "false}\n"
                text.append(f'{head}{enc(name)}, {stored[1:-1]}, "sha256": {sha}, "cached": {tail}')
                continue
            rec = json.loads(stored)
            if as_json:
                records.append({"path": name, **rec})
            elif quiet:
                continue
            elif fmt == "sha256sum":
                text.append(_sum_line(rec["hashes"]["sha256"] or "", name) + "\n")
            else:
                text.extend(_lines(name, rec))
        if lines is not None:
            lines.write_lines(text)
        elif table and text:
            out.print("\n".join(text))
        elif text:
            click.echo("".join(text), nl=False)
    if as_json and not quiet:
        render.print_json({"schema": SCHEMA, "files": records})
    return code


#: cached results printed per write
BATCH = 512
Outcome = tuple[Path | str, str | None, bool]
_SHA256 = re.compile(r'"sha256": "([0-9A-F]{64})"')


def _outcomes(
    entries: list[tuple[Path | str, os.stat_result | None]],
    names: tuple[str, ...],
    cache: Cache | None,
    cluster: str | None,
) -> Iterator[list[Outcome]]:
    """Each file's (path, record or None, cached) in input order, in batches: a run of
    results from the cache, or one fresh result, hashed here or as a task on ``--cluster``.
    A record is HashResult's JSON without the path, as text (``record_text``). What the
    cache answers is never sent to the cluster, nor is one reached when it answers all."""
    from sdtool.ops.hash import cached_many

    if cluster is not None and any(str(p) == "-" for p, _ in entries):  # URLs: fetched there
        raise click.UsageError("--cluster hashes files the workers can read: not - (stdin)")
    local = [(str(p), st) for p, st in entries]  # stdin and URLs have no stat: not cached
    known = cached_many(local, cache, algorithms=names)
    misses = [p for (p, _), rec in zip(entries, known, strict=True) if rec is None]
    fresh = (_hashed_here if cluster is None else _hashed_there)(misses, names, cache, cluster)
    batch: list[Outcome] = []
    for (path, _), rec in zip(entries, known, strict=True):
        if rec is not None:
            batch.append((path, rec, True))
            if len(batch) < BATCH:
                continue
        if batch:
            yield batch
            batch = []
        if rec is None:
            yield [next(fresh)]
    if batch:
        yield batch


def _hashed_here(
    paths: list[Path | str], names: tuple[str, ...], cache: Cache | None, cluster: str | None
) -> Iterator[Outcome]:
    for path in paths:
        given = path if isinstance(path, Path) else Path(path)  # a URL stays whole
        result, cached = _hash_one(given, names, cache)
        yield path, _record(result), cached


def _hashed_there(
    paths: list[Path | str], names: tuple[str, ...], cache: Cache | None, cluster: str | None
) -> Iterator[Outcome]:
    """The files as tasks on the cluster (reached on the first one), in input order."""
    from sdtool.cli.batch import cluster_runner
    from sdtool.cluster import hash_paths

    with cluster_runner(cluster) as cl:
        assert cl is not None
        folder = None if cache is None else cache.directory
        todo = [p if isinstance(p, Path) else Path(p) for p in paths]  # a URL stays whole
        for path, result, cached, err in hash_paths(cl, todo, names, folder):
            if err is not None:
                render.error(err)
            yield path, _record(result), cached


def _record(result: HashResult | None) -> str | None:
    """HashResult's JSON record without its path, as the cache gives it."""
    from sdtool.ops.hash import record_text

    if result is None:
        return None
    return record_text(result.size, result.safetensors, result.hashes, result.notes)


def _shards(files: tuple[Path, ...]) -> list[Path]:
    """``files``, a shard index or a folder of one shard set as its shards (the shard reader,
    which loads numpy, only where a name says there may be shards)."""
    if not any(_maybe_shards(f) for f in files):
        return list(files)
    from sdtool.formats.shards import expand_shards

    return expand_shards(files)


def _maybe_shards(f: Path) -> bool:
    if not f.is_dir():
        return ".safetensors.index" in f.name
    try:
        with os.scandir(f) as it:
            return any(".safetensors.index" in e.name or _SHARD.search(e.name) for e in it)
    except OSError:
        return False


_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def _lines(name: str, rec: dict[str, Any]) -> list[str]:
    """A file's hashes as markup lines."""
    from sdtool.ops.hash import ALGORITHMS

    lines = [f"[bold]{render.markup(name)}[/]  ({render.human_bytes(rec['size'])})"]
    for algo, value in rec["hashes"].items():
        note = rec["notes"].get(algo)
        line = f"  {ALGORITHMS[algo].label:<7} {value if value is not None else '-'}"
        if note:
            line += f"  [dim]({render.markup(note)})[/]"
        lines.append(line)
    return lines


def _hash_one(
    path: Path, names: tuple[str, ...], cache: Cache | None
) -> tuple[HashResult | None, bool]:
    """Hash one file (``-``: standard input, never cached); an error becomes one line on
    stderr. Returns (result or None, whether it came from the cache)."""
    from sdtool.cli.stdin import spooled
    from sdtool.ops.hash import hash_cached

    try:
        with spooled(path) as real:
            size = real.stat().st_size if real.is_file() else 0
            with progress.byte_bar(path.name or "-", size) as bar:
                cb = None if bar is None else bar.absolute
                use = cache if real == path else None
                result, cached = hash_cached(real, use, algorithms=names, progress=cb)
    except SdtoolError as e:
        render.error(e.with_path(path))
        return None, False
    return dataclasses.replace(result, path=path), cached


def _sum_line(hexdigest: str, name: str) -> str:
    """A line sha256sum -c accepts: lowercase hex, two spaces, the name (escaped as
    sha256sum does when it holds a backslash or a newline)."""
    if "\\" in name or "\n" in name:
        return "\\" + hexdigest.lower() + "  " + name.replace("\\", "\\\\").replace("\n", "\\n")
    return f"{hexdigest.lower()}  {name}"


#: a line ``sha256sum -c`` checks: GNU's ``HASH  FILE`` (`` *FILE`` in binary mode) or BSD's
#: ``SHA256 (FILE) = HASH`` (``sha256sum --tag``, ``shasum -a 256 --tag``); a leading backslash
#: says the name is escaped
_SUM_LINE = re.compile(
    r"^(?P<esc>\\)?(?:(?P<hex>[0-9a-fA-F]{64}) [ *](?P<name>.+)"
    r"|SHA256 \((?P<tagged>.+)\) = (?P<taghex>[0-9a-fA-F]{64}))$"
)


def _check(sums: Path, *, quiet: bool, cache: Cache | None) -> int:
    """sha256sum -c: each listed file hashed and compared; relative names from the cwd."""
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SdtoolError(f"cannot read the checksum file: {e}", path=sums) from None
    if not any(_SUM_LINE.match(ln) for ln in lines):
        raise SdtoolError("no 'SHA256  FILE' line in the checksum file", path=sums)
    code, failed, bad_lines = ExitCode.OK, 0, 0
    for line in lines:
        m = _SUM_LINE.match(line)
        if m is None:
            bad_lines += line.strip() != ""
            continue
        name, want = m["name"] or m["tagged"], m["hex"] or m["taghex"]
        if m["esc"]:  # sha256sum's escapes: \\ and \n
            name = re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), name)
        result, _ = _hash_one(Path(name), ("sha256",), cache)
        if result is None:
            code = ExitCode.ERROR
            continue
        ok = (result.hashes["sha256"] or "").lower() == want.lower()
        if not ok:
            failed += 1
        if not ok or not quiet:
            click.echo(f"{render.escape(name)}: {'OK' if ok else 'FAILED'}")
    if bad_lines:
        render.warn(f"{sums}: {bad_lines} line(s) are not 'SHA256  FILE' and were ignored")
    if failed:
        render.warn(f"{failed} computed checksum(s) did NOT match")
    return ExitCode.FINDINGS if failed and code == ExitCode.OK else code
