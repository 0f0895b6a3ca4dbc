"""``sdtool hash``: the hashes Civitai, A1111 and kohya show, from one read of each file."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from sdtool.cli import render
from sdtool.errors import SdtoolError
from sdtool.ops.hash import ALGORITHMS, HashResult, hash_file, parse_algorithms

EXIT_OK, EXIT_ERROR = 0, 2


@contextlib.contextmanager
def _progress_bar(path: Path, size: int) -> Iterator[Callable[[int, int], None] | None]:
    """A tqdm bar on stderr when it is a terminal; no callback otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=render.escape(path.name, 40),
        leave=False,
        file=sys.stderr,
    ) as bar:

        def update(done: int, total: int) -> None:
            bar.update(done - bar.n)

        yield update


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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (schema: docs/hash.md).")
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
    code = EXIT_OK
    for path in files:
        try:
            size = path.stat().st_size if path.is_file() else 0
            with _progress_bar(path, size) as progress:
                result = hash_file(path, algorithms=names, progress=progress)
        except SdtoolError as e:
            click.echo(f"sdtool: {render.escape(e.with_path(path))}", err=True)
            code = EXIT_ERROR
            continue
        results.append(result)
        if not as_json:
            _render(result)
    if as_json:
        render.print_json([r.to_json() for r in results])
    return code
