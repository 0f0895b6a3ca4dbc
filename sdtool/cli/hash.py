"""``sdtool hash``: the hashes Civitai, A1111 and kohya show, from one read of each file."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

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


def _render(result: HashResult) -> None:
    from sdtool.ops.hash import ALGORITHMS

    out = render.console()
    out.print(f"[bold]{render.markup(result.path)}[/]  ({render.human_bytes(result.size)})")
    for name, value in result.hashes.items():
        label = ALGORITHMS[name].label
        note = result.notes.get(name)
        shown = value if value is not None else "-"
        line = f"  {label:<7} {shown}"
        if note:
            line += f"  [dim]({render.markup(note)})[/]"
        out.print(line)


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
    from sdtool.cache import open_cache
    from sdtool.ops.hash import SCHEMA, parse_algorithms

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
    results: list[HashResult] = []
    code = ExitCode.OK
    lines = None
    if as_jsonl:
        from sdtool.cli.jsonl import JsonLines

        lines = JsonLines("hash")
    from sdtool.formats.shards import expand_shards

    paths = _expand(tuple(expand_shards(files)))  # a shard index or folder: its shards
    for path, result, cached in _outcomes(paths, names, cache, cluster):
        if result is None:
            code = ExitCode.ERROR
            if lines is not None:
                lines.write({"path": str(path), "error": True})
            continue
        if lines is not None:
            sha = result.hashes.get("sha256")
            lines.write({**result.to_json(), "sha256": sha and sha.lower(), "cached": cached})
            continue
        results.append(result)
        if quiet or as_json:
            continue
        if fmt == "sha256sum":
            click.echo(_sum_line(result.hashes["sha256"] or "", str(path)))
        else:
            _render(result)
    if as_json and not quiet:
        render.print_json({"schema": SCHEMA, "files": [r.to_json() for r in results]})
    return code


def _outcomes(
    paths: list[Path], names: tuple[str, ...], cache: Cache | None, cluster: str | None
) -> Iterator[tuple[Path, HashResult | None, bool]]:
    """Each file's (path, result or None, cached), here or as tasks on ``--cluster``."""
    if cluster is None:
        for path in paths:
            yield path, *_hash_one(path, names, cache)
        return
    from sdtool.cli.batch import cluster_runner
    from sdtool.cluster import hash_paths
    from sdtool.urls import is_url

    if any(str(p) == "-" or is_url(p) for p in paths):
        raise click.UsageError("--cluster hashes files the workers can read: not - or URLs")
    with cluster_runner(cluster) as cl:
        assert cl is not None
        folder = None if cache is None else cache.directory
        for path, result, cached, err in hash_paths(cl, paths, names, folder):
            if err is not None:
                render.error(err)
            yield path, result, cached


def _expand(files: tuple[Path, ...]) -> list[Path]:
    """Files as given; folders become every file under them, recursively, sorted."""
    out: list[Path] = []
    for f in files:
        if f.is_dir():
            out.extend(sorted(p for p in f.rglob("*") if p.is_file()))
        else:
            out.append(f)
    return out


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


_SUM_LINE = re.compile(r"^(\\)?([0-9a-fA-F]{64}) [ *](.+)$")


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
        name = m.group(3)
        if m.group(1):  # sha256sum's escapes: \\ and \n
            name = re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), name)
        result, _ = _hash_one(Path(name), ("sha256",), cache)
        if result is None:
            code = ExitCode.ERROR
            continue
        ok = (result.hashes["sha256"] or "").lower() == m.group(2).lower()
        if not ok:
            failed += 1
        if not ok or not quiet:
            click.echo(f"{render.escape(name)}: {'OK' if ok else 'FAILED'}")
    if bad_lines:
        render.warn(f"{sums}: {bad_lines} line(s) are not 'SHA256  FILE' and were ignored")
    if failed:
        render.warn(f"{failed} computed checksum(s) did NOT match")
    return ExitCode.FINDINGS if failed and code == ExitCode.OK else code
