"""``sdtool scan``: is it safe to load these files? Exit 0 clean, 1 dangerous, 2 could not scan."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

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
from sdtool.cli.render import console, error, human_bytes, markup, print_json, wrap, wrap_width
from sdtool.urls import is_url
from sdtool.vocab import Verdict

if TYPE_CHECKING:
    from sdtool.scan import FileReport, ScanReport

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
    from sdtool.scan import scan_paths
    from sdtool.scan.sarif import to_sarif

    if sum((as_json, as_sarif, as_jsonl)) > 1:
        raise click.UsageError("choose one of --json, --jsonl and --sarif")
    if cache_dir is not None and no_cache:
        raise click.UsageError("--cache DIR and --no-cache contradict each other")
    if sum(map(is_stdin, paths)) > 1:
        raise click.UsageError("- (standard input) can be given once")
    if cluster is not None and any(is_stdin(p) or is_url(p) for p in paths):
        raise click.UsageError("--cluster scans files the workers can read: not - or URLs")
    # standard input is spooled to a new temp file each time: nothing to cache
    cache = open_cache(cache_dir, enabled=not no_cache and not any(map(is_stdin, paths)))
    bar = None
    if bars_.enabled():
        from tqdm import tqdm

        bar = tqdm(unit="file", desc="scanning", leave=False, file=sys.stderr)
    spools: dict[str, str] = {}  # spooled temp file -> "-"
    lines = None
    if as_jsonl:
        from sdtool.cli.jsonl import JsonLines
        from sdtool.scan.ruleset import ruleset_version

        lines = JsonLines("scan")

    def progress(r: FileReport) -> None:
        if bar is not None:
            bar.update(1)
        if lines is not None:
            r.path = spools.get(r.path, r.path)
            errors(r)
            lines.write({**r.to_json(), "sha256": r.sha256, "ruleset": ruleset_version(),
                         "cached": r.cached})  # fmt: skip

    try:
        with ExitStack() as stack:
            runner = None
            cl = stack.enter_context(cluster_runner(cluster, jobs))
            if cl is not None:
                from sdtool.cluster import scan_runner

                runner = scan_runner(cl)
            real = [stack.enter_context(spooled(p)) for p in paths]
            spools.update({str(r): STDIN for given, r in zip(paths, real, strict=True)
                           if given != r})  # fmt: skip
            report = scan_paths(real, strict=strict, exclude=exclude, jobs=jobs, crc=crc,
                                progress=progress, cache=cache, sha256=with_sha256,
                                runner=runner)  # fmt: skip
        for given, r in zip(paths, real, strict=True):  # a spooled temp file is reported as -
            if given != r:
                for fr in report.files:
                    fr.path = STDIN if fr.path == str(r) else fr.path
    finally:
        if bar is not None:
            bar.close()
    if as_jsonl:
        return report.exit_code
    if as_json or as_sarif:
        for fr in report.files:
            errors(fr)
    if as_json:
        print_json(report.to_json())
    elif as_sarif:
        import json

        click.echo(json.dumps(to_sarif(report, Path.cwd()), indent=2, ensure_ascii=False))
    else:
        render(report, quiet=quiet)
    return report.exit_code


def render(report: ScanReport, *, quiet: bool = False) -> None:
    """One line per file, each finding as a wrapped block under it, then the summary line.

    What kept a file from being scanned goes to stderr (``sdtool: FILE: ...``): stdout holds
    only the report, so ``sdtool scan ... > report.txt`` stays clean.
    """
    out = console()
    width = wrap_width(out)
    for fr in report.files:
        errors(fr)
        v = fr.verdict
        if quiet and v in (Verdict.SAFE, Verdict.SKIPPED):
            continue
        label = f"[{STYLE[v]}]{v.label.upper():<11}[/{STYLE[v]}] {markup(fr.path)}"
        if fr.skipped:
            out.print(f"{label}: not a model file ({markup(fr.skipped)})")
            continue
        out.print(f"{label} [dim]({markup(fr.format)}, {human_bytes(fr.size)})[/dim]")
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
                out.print(f"[{style}]{markup(line)}[/]" if i == 0 and style else markup(line))
            for line in wrap(body, width, "      ", "      "):
                out.print(markup(line))
    s = report.summary()
    parts = [f"{s[v]} {LABEL.get(v, v.label)}" for v in Verdict if s[v]]
    out.print(
        f"\n{s['files']} file{'' if s['files'] == 1 else 's'}: "
        + (", ".join(parts) or "nothing to scan")
        + f" -> exit {report.exit_code}"
        + (" (--strict)" if report.strict else "")
    )


def errors(fr: FileReport) -> None:
    """Each reason a file could not be (fully) scanned, as one ``sdtool: FILE: ...`` line."""
    from sdtool.scan.report import ProblemKind

    for p in fr.problems:
        text = p.message.removeprefix("not scanned: ")
        missing = p.kind is ProblemKind.MISSING
        error(f"{fr.path}: {text}" if missing else f"{fr.path}: could not scan: {text}")
