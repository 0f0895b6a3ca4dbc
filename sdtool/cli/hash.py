"""``sdtool hash``: the hashes Civitai, A1111 and kohya show, from one read of each file."""

from __future__ import annotations

from pathlib import Path

import click

from sdtool.cli import progress, render
from sdtool.cli.options import json_option
from sdtool.errors import SdtoolError
from sdtool.ops.hash import ALGORITHMS, SCHEMA, HashResult, hash_file, parse_algorithms
from sdtool.vocab import ExitCode


def _render(result: HashResult) -> None:
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
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-a",
    "--algorithm",
    "algorithms",
    multiple=True,
    metavar="NAME[,NAME]",
    help="Hashes to compute: " + ", ".join(ALGORITHMS) + " or all (default: all).",
)
@json_option("hash", "a JSON list")
def hash_cmd(files: tuple[Path, ...], algorithms: tuple[str, ...], as_json: bool) -> int:
    """Print SHA256, AutoV1, AutoV2, AutoV3, CRC32 and BLAKE3 of each FILE in one read.

    Hex is uppercase, as Civitai shows it. AutoV3 (the LoRA/"addnet" hash) exists only for
    safetensors files. Exit code 0 when every file was hashed, 2 when one could not be read.

    \b
    Examples:
      sdtool hash model.safetensors
      sdtool hash -a autov2,autov3 loras/*.safetensors
      sdtool hash --json model.ckpt
    """
    names = parse_algorithms(algorithms) if algorithms else tuple(ALGORITHMS)
    results: list[HashResult] = []
    code = ExitCode.OK
    for path in files:
        try:
            size = path.stat().st_size if path.is_file() else 0
            with progress.byte_bar(path.name, size) as bar:
                cb = None if bar is None else bar.absolute
                result = hash_file(path, algorithms=names, progress=cb)
        except SdtoolError as e:
            render.error(e.with_path(path))
            code = ExitCode.ERROR
            continue
        results.append(result)
        if not as_json:
            _render(result)
    if as_json:
        render.print_json({"schema": SCHEMA, "files": [r.to_json() for r in results]})
    return code
