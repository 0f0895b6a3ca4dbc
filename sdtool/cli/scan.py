"""``sdtool scan``: is it safe to load these files? Exit 0 clean, 1 dangerous, 2 could not scan."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdtool.cli import progress as bars_
from sdtool.cli.options import (
    PathOrUrl,
    cache_options,
    cluster_option,
    jobs_option,
    json_option,
    jsonl_option,
)
from sdtool.cli.render import (
    columns,
    error,
    human_bytes,
    markup,
    print_json,
    report_console,
    wrap,
)
from sdtool.vocab import Verdict

if TYPE_CHECKING:
    from sdtool.scan import FileReport, ScanReport
    from sdtool.scan.report import Scanned

STYLE = {
    "dangerous": "bold red",
    "suspicious": "yellow",
    "error": "magenta",
    "not_scanned": "magenta",
    "safe": "green",
    "skipped": "dim",
    "info": "dim",
}
RANK = {"dangerous": 0, "suspicious": 1}  # findings listed worst first
LABEL = {"skipped": "skipped (not model files)"}  # how the summary names a verdict
_LABELS = {v: f"{v.label.upper():<11}" for v in Verdict}  # the first column, padded


@click.command("scan")
@click.argument("paths", nargs=-1, required=True, type=PathOrUrl())
@click.option("--strict", is_flag=True, help="Fail (exit 1) on suspicious files too.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip paths matching GLOB.")
@jobs_option("Scan")
@json_option("scan")
@click.option("--sarif", "as_sarif", is_flag=True, help="Print SARIF 2.1.0.")
@click.option("--crc", type=click.Choice(["read", "all"]), default="read", show_default=True,
              help="Check zip CRC-32 of the members read, or of every member.")  # fmt: skip
@click.option("--quiet", "-q", is_flag=True, help="Only list files that are not safe.")
@jsonl_option
@click.option("--sha256", "with_sha256", is_flag=True,
              help="Also compute each file's SHA-256 (in --jsonl records; keys the cache by "
                   "content, so copies share a verdict).")  # fmt: skip
@cache_options
@cluster_option
def scan_cmd(
    paths: tuple[Path, ...],
    strict: bool,
    exclude: tuple[str, ...],
    jobs: int,
    as_json: bool,
    as_sarif: bool,
    crc: str,
    quiet: bool,
    as_jsonl: bool,
    with_sha256: bool,
    cache_dir: Path | None,
    no_cache: bool,
    cluster: str | None = None,
) -> int:
    """Check model files for anything loading them could run, without running anything.

    PATHS are files or directories (scanned recursively), - for standard input, or URLs
    (https://, hf://ORG/REPO/PATH[@REV]: only what holds pickles is fetched). Every file
    is routed by its content, whatever its name. Files that are by content no model and nothing
    a loader runs (images, JSON, YAML, text) are listed as skipped and counted; files sdtool
    cannot analyse, truncated or corrupt ones included, as "could not scan" (on stderr).

    Exit codes: 0 nothing dangerous, 1 dangerous found (or suspicious with --strict),
    2 something could not be scanned (dangerous wins).

    \b
    Examples:
      sdtool scan model.ckpt
      sdtool scan ~/models --exclude '*.png' --jobs 2
      sdtool scan downloads/ --strict --sarif > scan.sarif
      sdtool scan --jsonl --sha256 /mirror > verdicts.jsonl   # a rerun reads only new files
      sdtool scan --jsonl --cluster tcp://scheduler:8786 /mnt/mirror > verdicts.jsonl
    """
    from sdtool.cache import open_cache
    from sdtool.cli.batch import cluster_runner
    from sdtool.cli.stdin import STDIN, is_stdin, spooled
    from sdtool.scan import scan_items, scan_paths
    from sdtool.scan.sarif import to_sarif

    if sum((as_json, as_sarif, as_jsonl)) > 1:
        raise click.UsageError("choose one of --json, --jsonl and --sarif")
    if cache_dir is not None and no_cache:
        raise click.UsageError("--cache DIR and --no-cache contradict each other")
    if sum(map(is_stdin, paths)) > 1:
        raise click.UsageError("- (standard input) can be given once")
    if cluster is not None and any(map(is_stdin, paths)):  # URLs: each worker fetches its own
        raise click.UsageError("--cluster scans files the workers can read: not - (stdin)")
    # standard input is spooled to a new temp file each time: nothing to cache
    cache = open_cache(cache_dir, enabled=not no_cache and not any(map(is_stdin, paths)))
    bar = None
    if bars_.enabled():
        from tqdm import tqdm

        bar = tqdm(unit="file", desc="scanning", leave=False, file=sys.stderr)
    spools: dict[str, str] = {}  # spooled temp file -> "-"

    def on_result(r: FileReport) -> None:
        if bar is not None:
            bar.update(1)

    try:
        with ExitStack() as stack:
            runner = None
            if cluster is not None:  # reached only when some file is not in the cache

                def runner(tasks: list[Any]) -> Iterator[FileReport]:
                    from sdtool.cluster import scan_runner

                    cl = stack.enter_context(cluster_runner(cluster, jobs))
                    assert cl is not None
                    yield from scan_runner(cl)(tasks)

            real = [stack.enter_context(spooled(p)) for p in paths]
            spools.update({str(r): STDIN for given, r in zip(paths, real, strict=True)
                           if given != r})  # fmt: skip
            options: dict[str, Any] = {"exclude": exclude, "jobs": jobs, "crc": crc, "cache": cache,
                       "sha256": with_sha256, "runner": runner}  # fmt: skip
            if as_jsonl:
                return write_jsonl(scan_items(real, **options), spools, bar, strict=strict)
            if not (as_json or as_sarif):
                done = []
                for batch in scan_items(real, **options):
                    done.append(batch)
                    if bar is not None:
                        bar.update(len(batch))
                if bar is not None:
                    bar.close()
                    bar = None
                return render_items(done, quiet=quiet, strict=strict, spools=spools)
            report = scan_paths(real, strict=strict, on_result=on_result, **options)
        if spools:  # a spooled temp file is reported as -
            files = tuple(replace(fr, path=spools.get(fr.path, fr.path)) for fr in report.files)
            report = replace(report, files=files)
    finally:
        if bar is not None:
            bar.close()
    for fr in report.files:
        errors(fr)
    if as_json:
        print_json(report.to_json())
    else:
        import json

        click.echo(json.dumps(to_sarif(report, Path.cwd()), indent=2, ensure_ascii=False))
    return report.exit_code


def write_jsonl(
    batches: Iterable[list[Scanned]], spools: dict[str, str], bar: Any, *, strict: bool
) -> int:
    """Each file's JSON line, a batch of ready results in one write; the exit code.

    A line is spliced from the file's stored JSON (``Scanned.body``, the same text for a fresh
    and a cached verdict), so a cached verdict is never decoded and encoded again.
    """
    from json.encoder import encode_basestring_ascii as enc

    from sdtool.cli.jsonl import JsonLines
    from sdtool.scan.report import exit_code
    from sdtool.scan.ruleset import ruleset_version

    lines = JsonLines("scan")
    head = lines.head + '"path": '
    tail = ', "ruleset": ' + enc(ruleset_version()) + ', "cached": '
    verdicts: set[Verdict] = set()
    failed = False
    for batch in batches:
        out = []
        for item in batch:
            path = spools.get(item.path, item.path) if spools else item.path
            if item.errors:
                failed = True
                errors(replace(item.report, path=path))
            verdicts.add(item.verdict)
            sha = enc(item.sha256) if item.sha256 else "null"
            body = item.stored
            if body is None:
                body = item.body
            cached = "true}\n" if item.cached else "false}\n"
            out.append(f'{head}{enc(path)}, {body[1:-1]}, "sha256": {sha}{tail}{cached}')
        lines.write_lines(out)
        if bar is not None:
            bar.update(len(batch))
    return exit_code(verdicts, failed, strict=strict)


def render(report: ScanReport, *, quiet: bool = False) -> None:
    """One line per file, each finding as a wrapped block under it, then the summary line.

    What kept a file from being scanned goes to stderr (``sdtool: FILE: ...``): stdout holds
    only the report, so ``sdtool scan ... > report.txt`` stays clean.
    """
    from sdtool.scan.report import Scanned

    items = [[Scanned(fr.path, report=fr, sha256=fr.sha256, cached=fr.cached)]
             for fr in report.files]  # fmt: skip
    render_items(items, quiet=quiet, strict=report.strict)


def render_items(batches: Iterable[list[Scanned]], *, quiet: bool = False,
                 strict: bool = False, spools: dict[str, str] | None = None) -> int:  # fmt: skip
    """``render`` of results as they come (``scan_items``); returns the exit code.

    The lines of a batch are printed at once through ``sdtool.cli.plain`` (plain text off a
    terminal, without rich, byte for byte what rich prints; rich otherwise), and a cached safe
    file's line is made from its stored format and size without decoding the rest: a rerun
    over an unchanged tree prints as fast as it looks up.
    """
    from sdtool.scan.cached import head_of
    from sdtool.scan.report import exit_code

    out = report_console()
    width = columns()  # wrap only to an asked or a terminal's width (rich never wraps here)
    counts = dict.fromkeys(Verdict, 0)
    failed = False
    for batch in batches:
        text: list[str] = []
        for item in batch:
            v = item.verdict
            counts[v] += 1
            path = spools.get(item.path, item.path) if spools else item.path
            if item.errors:
                failed = True
                errors(replace(item.report, path=path))
            if quiet and v in (Verdict.SAFE, Verdict.SKIPPED):
                continue
            fast = head_of(item.stored) if v is Verdict.SAFE and item.stored else None
            if fast is not None:  # safe: format and size are all its line shows
                text.append(_line(v, path, f"({fast[0]}, {human_bytes(fast[1])})"))
            else:
                fr = item.report
                if fr.path != path:
                    fr = replace(fr, path=path)
                text.extend(_file_lines(fr, width))
        if text:
            out.print("\n".join(text))
    code = exit_code({v for v, n in counts.items() if n}, failed, strict=strict)
    files = sum(counts.values())
    parts = [f"{counts[v]} {LABEL.get(v, v.label)}" for v in Verdict if counts[v]]
    out.print(
        f"\n{files} file{'' if files == 1 else 's'}: "
        + (", ".join(parts) or "nothing to scan")
        + f" -> exit {code}"
        + (" (--strict)" if strict else "")
    )
    return code


def _line(v: Verdict, path: str, rest: str) -> str:
    """A file's first line (markup): its verdict label, its path and ``rest``."""
    return f"[{STYLE[v]}]{_LABELS[v]}[/{STYLE[v]}] {markup(path)} [dim]{markup(rest)}[/dim]"


def _file_lines(fr: FileReport, width: int | None) -> list[str]:
    """A file's lines (markup): its verdict line, then each finding shown as a wrapped block."""
    v = fr.verdict
    if fr.skipped:
        label = f"[{STYLE[v]}]{_LABELS[v]}[/{STYLE[v]}]"
        return [f"{label} {markup(fr.path)}: not a model file ({markup(fr.skipped)})"]
    lines = [_line(v, fr.path, f"({fr.format}, {human_bytes(fr.size)})")]
    shown = [f for f in fr.findings if f.severity != "info" or v != "safe"]
    for f in sorted(shown, key=lambda f: RANK.get(f.severity, 9)):
        where = f.member or ""
        if f.stream:
            where += f" #{f.stream}"
        if f.offset is not None:
            where += f" @{f.offset}"
        head = f"{f.severity} {f.rule}" + (f" {where.strip()}" if where.strip() else "")
        if f.global_name:
            head += f": {f.global_name}"
        body = f"{f.usage}: {f.message}" if f.usage else f.message
        style = STYLE.get(f.severity, "")
        for i, line in enumerate(wrap(head, width, "  ", "      ")):
            lines.append(f"[{style}]{markup(line)}[/]" if i == 0 and style else markup(line))
        lines.extend(markup(line) for line in wrap(body, width, "      ", "      "))
    return lines


def errors(fr: FileReport) -> None:
    """Each reason a file could not be (fully) scanned, as one ``sdtool: FILE: ...`` line."""
    from sdtool.scan.report import ProblemKind

    for p in fr.problems:
        text = p.message.removeprefix("not scanned: ")
        missing = p.kind is ProblemKind.MISSING
        error(f"{fr.path}: {text}" if missing else f"{fr.path}: could not scan: {text}")
