"""``sdtool scan``: is it safe to load these files? Exit 0 clean, 1 dangerous, 2 could not scan."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from rich.table import Table

from sdtool.cli import progress as bars_
from sdtool.cli.options import jobs_option, json_option
from sdtool.cli.render import console, error, human_bytes, markup, print_json
from sdtool.scan import FileReport, ScanReport, scan_paths
from sdtool.scan.report import VERDICTS
from sdtool.scan.sarif import to_sarif

STYLE = {
    "dangerous": "bold red",
    "suspicious": "yellow",
    "error": "magenta",
    "not_scanned": "magenta",
    "safe": "green",
    "info": "dim",
}


@click.command("scan")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--strict", is_flag=True, help="Fail (exit 1) on suspicious files too.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip paths matching GLOB.")
@jobs_option("Scan")
@json_option("scan")
@click.option("--sarif", "as_sarif", is_flag=True, help="Print SARIF 2.1.0.")
@click.option("--crc", type=click.Choice(["read", "all"]), default="read", show_default=True,
              help="Check zip CRC-32 of the members read, or of every member.")  # fmt: skip
@click.option("--quiet", "-q", is_flag=True, help="Only list files that are not safe.")
def scan_cmd(
    paths: tuple[Path, ...],
    strict: bool,
    exclude: tuple[str, ...],
    jobs: int,
    as_json: bool,
    as_sarif: bool,
    crc: str,
    quiet: bool,
) -> int:
    """Check model files for anything loading them could run, without running anything.

    PATHS are files or directories (scanned recursively). Every file is routed by its content,
    whatever its name; files sdtool cannot analyse are listed as "not scanned".

    Exit codes: 0 nothing dangerous, 1 dangerous found (or suspicious with --strict),
    2 something could not be scanned (dangerous wins).

    \b
    Examples:
      sdtool scan model.ckpt
      sdtool scan ~/models --exclude '*.png' --jobs 2
      sdtool scan downloads/ --strict --sarif > scan.sarif
    """
    if as_json and as_sarif:
        raise click.UsageError("choose one of --json and --sarif")
    for p in paths:  # a mistyped argument is a user error: say so on stderr, scan the rest
        if not os.path.lexists(p):
            error(f"{p}: no such file or directory")
    progress = None
    bar = None
    if bars_.enabled():
        from tqdm import tqdm

        bar = tqdm(unit="file", desc="scanning", leave=False, file=sys.stderr)

        def progress(r: FileReport) -> None:
            bar.update(1)

    try:
        report = scan_paths(paths, strict=strict, exclude=exclude, jobs=jobs, crc=crc,
                            progress=progress)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        print_json(report.to_json())
    elif as_sarif:
        click.echo(json.dumps(to_sarif(report, Path.cwd()), indent=2, ensure_ascii=False))
    else:
        render(report, quiet=quiet)
    return report.exit_code


def render(report: ScanReport, *, quiet: bool = False) -> None:
    """One block per file (verdict, findings table, errors), then the summary line."""
    out = console()
    for fr in report.files:
        if quiet and fr.verdict == "safe":
            continue
        v = fr.verdict
        out.print(
            f"[{STYLE[v]}]{v.label.upper():<11}[/{STYLE[v]}] {markup(fr.path)} "
            f"[dim]({markup(fr.format)}, {human_bytes(fr.size)})[/dim]"
        )
        shown = [f for f in fr.findings if f.severity != "info" or v != "safe"]
        if shown:
            t = Table(show_edge=False, pad_edge=False, box=None, padding=(0, 1))
            for col in ("severity", "rule", "where", "global", "usage / message"):
                t.add_column(col, overflow="fold")
            for f in sorted(shown, key=lambda f: ("dangerous", "suspicious").index(f.severity)
                            if f.severity in ("dangerous", "suspicious") else 2):  # fmt: skip
                where = f.member or ""
                if f.stream:
                    where += f" #{f.stream}"
                if f.offset is not None:
                    where += f" @{f.offset}"
                t.add_row(
                    f"[{STYLE.get(f.severity, '')}]{f.severity}[/]",
                    f.rule,
                    markup(where.strip(), 60),
                    markup(f.global_name or "", 70),
                    markup(f"{f.usage}: {f.message}" if f.usage else f.message, 160),
                )
            out.print(t)
        for e in fr.errors:
            out.print(f"    [magenta]error:[/magenta] {markup(e, 200)}")
    s = report.summary()
    parts = [f"{s[v]} {v.label}" for v in VERDICTS if s[v]]
    out.print(
        f"\n{s['files']} file{'' if s['files'] == 1 else 's'}: "
        + (", ".join(parts) or "nothing to scan")
        + f" -> exit {report.exit_code}"
        + (" (--strict)" if report.strict else "")
    )
