"""``sdtool lora bake|extract|resize``: LoRA arithmetic, streamed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from sdtool.cli import render
from sdtool.cli.merge import render_written
from sdtool.cli.options import (
    dry_run_option,
    dtype_option,
    json_option,
    quiet_option,
    write_options,
)
from sdtool.errors import UsageError
from sdtool.vocab import ExitCode, dtype_name

F = TypeVar("F", bound=Callable[..., Any])
LIST_LIMIT = 20

#: the dtypes a LoRA is written in (its factors are never fp8)
LORA_DTYPES = ("F16", "BF16", "F32")


@click.group("lora")
def lora_cmd() -> None:
    """Bake LoRAs into a checkpoint, extract one from a fine-tune, or resize one.

    \b
    Examples:
      sdtool lora bake sdxl.safetensors style.safetensors:0.8 baked.safetensors
      sdtool lora extract tuned.safetensors base.safetensors lora.safetensors --rank 32
      sdtool lora resize lora.safetensors small.safetensors --rank 8
    """


@lora_cmd.command("bake")
@click.argument("paths", nargs=-1, required=True, metavar="BASE LORA[:STRENGTH]... OUT", type=str)
@click.option("--strict", is_flag=True, help="Exit 1, writing nothing, if a module matches no key.")
@dtype_option()
@write_options
@dry_run_option
@json_option("lora")
@quiet_option("print nothing but errors; the exit code tells")
def bake_cmd(
    paths: tuple[str, ...],
    strict: bool,
    dtype: str | None,
    overwrite: bool,
    verify: bool,
    on_overflow: str,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
) -> int:
    """Bake LoRAs into BASE, writing OUT: W + strength * alpha/rank * up @ down.

    LoRA, LoCon (incl. Tucker), LoHa, LoKr, DoRA and full diffs, in kohya, LyCORIS,
    diffusers, PEFT, ai-toolkit and ComfyUI naming, onto UNet/transformer and text-encoder
    weights; several LoRAs apply in the order given. Computation is float32; OUT keeps the
    base's dtypes unless --dtype. Modules that match no base key are listed (--strict: exit 1).

    \b
    Examples:
      sdtool lora bake sd15.safetensors detail.safetensors out.safetensors
      sdtool lora bake sdxl.safetensors a.safetensors:0.7 b.safetensors:-0.3 out.safetensors
      sdtool lora bake flux.safetensors lora.safetensors out.safetensors --dry-run
    """
    from sdtool.ops.lora.bake import UnmatchedModules, bake

    if len(paths) < 3:
        raise UsageError(f"give BASE, at least one LORA and OUT (got {len(paths)} paths)")
    base, *loras, out = paths
    try:
        result = bake(
            Path(base),
            loras,
            Path(out),
            dtype=dtype,
            strict=strict,
            overwrite=overwrite,
            verify=verify,
            dry_run=dry_run,
            on_overflow=on_overflow,
        )
    except UnmatchedModules as e:
        render.error(e)
        return ExitCode.FINDINGS  # strict and some LoRA module matched nothing
    if quiet:
        pass
    elif as_json:
        render.print_json(result.to_json())
    else:
        _render_bake(result)
    return ExitCode.OK


def _render_bake(r: object) -> None:
    from sdtool.ops.lora.bake import BakeResult

    assert isinstance(r, BakeResult)
    out = render.console()
    for rep in r.loras:
        kinds = ", ".join(f"{n} {k}" for k, n in rep.kinds.items())
        out.print(
            f"{render.markup(rep.path)} x{rep.strength:g}: {rep.matched} of {rep.modules} "
            f"modules matched ({kinds}{f', {rep.dora} DoRA' if rep.dora else ''})"
        )
        for stem, why in list(rep.unmatched.items())[:LIST_LIMIT]:
            out.print(f"  unmatched {render.markup(stem, 100)}: {render.markup(why)}")
        if len(rep.unmatched) > LIST_LIMIT:
            out.print(f"  (+{len(rep.unmatched) - LIST_LIMIT} more unmatched; --json lists all)")
        if rep.unknown_keys:
            shown = ", ".join(render.markup(k, 80) for k in rep.unknown_keys[:5])
            out.print(f"  {len(rep.unknown_keys)} key(s) not part of any module: {shown}")
    out.print(f"{len(r.patched):,} of {r.tensors:,} base tensors patched")
    if r.dry_run:
        for key, stems in list(r.patched.items())[:LIST_LIMIT]:
            out.print(f"  {render.markup(key, 90)} <- {render.markup(', '.join(stems), 120)}")
        if len(r.patched) > LIST_LIMIT:
            out.print(f"  (+{len(r.patched) - LIST_LIMIT} more; --json lists all)")
    render_written(r, r.dtype)


def _rank_options(f: F) -> F:
    """--rank, --conv-rank, the dynamic-rank options and --clamp-quantile."""
    opts = [
        click.option(
            "--sv-ratio",
            type=float,
            help="Dynamic rank: keep singular values above largest / RATIO (kohya).",
        ),
        click.option(
            "--sv-fro",
            type=float,
            help="Dynamic rank: keep this fraction of the Frobenius norm (kohya).",
        ),
        click.option(
            "--sv-cumulative",
            type=float,
            help="Dynamic rank: keep this fraction of the singular values' sum (kohya).",
        ),
        click.option(
            "--clamp-quantile",
            type=float,
            default=1.0,
            show_default=True,
            help="Clamp the factors at this quantile, as kohya (0.99); 1.0 does not clamp.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@lora_cmd.command("extract")
@click.argument("tuned", type=click.Path(path_type=Path))
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--rank", type=int, default=32, show_default=True, help="Rank (or the cap).")
@click.option(
    "--conv-rank",
    type=int,
    default=0,
    show_default=True,
    help="Rank of kxk convs (LoCon); 0 leaves them out, as kohya does by default.",
)
@_rank_options
@click.option(
    "--dtype",
    type=click.Choice([dtype_name(code) for code in LORA_DTYPES]),
    default="fp16",
    show_default=True,
    help="The LoRA's dtype.",
)
@write_options
@dry_run_option
@json_option("lora")
@quiet_option("print nothing but errors; the exit code tells")
def extract_cmd(
    tuned: Path,
    base: Path,
    out: Path,
    rank: int,
    conv_rank: int,
    sv_ratio: float | None,
    sv_fro: float | None,
    sv_cumulative: float | None,
    clamp_quantile: float,
    dtype: str,
    overwrite: bool,
    verify: bool,
    on_overflow: str,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
) -> int:
    """Extract a kohya-format LoRA of TUNED - BASE (SVD per layer) into OUT.

    UNet/transformer and text-encoder Linear and 1x1 conv weights (kxk convs with
    --conv-rank); names as kohya writes them for the family, loadable by ComfyUI and A1111;
    ss_* metadata. Layers whose difference is zero are left out and listed.

    \b
    Examples:
      sdtool lora extract tuned.safetensors sd15.safetensors lora.safetensors --rank 32
      sdtool lora extract tuned.sft base.sft lora.sft --rank 64 --sv-fro 0.9 --conv-rank 16
    """
    from sdtool.ops.lora.extract import extract

    r = extract(
        tuned, base, out, rank=rank, conv_rank=conv_rank, sv_ratio=sv_ratio, sv_fro=sv_fro,
        sv_cumulative=sv_cumulative, clamp_quantile=clamp_quantile, dtype=dtype,
        overwrite=overwrite, verify=verify, dry_run=dry_run,
    )  # fmt: skip
    if not quiet:
        _render_op(r, as_json)
    return ExitCode.OK


@lora_cmd.command("resize")
@click.argument("src", metavar="IN", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--rank", type=int, default=8, show_default=True, help="New rank (or the cap).")
@click.option("--conv-rank", type=int, help="New rank of kxk convs (default: --rank).")
@_rank_options
@dtype_option()
@write_options
@dry_run_option
@json_option("lora")
@quiet_option("print nothing but errors; the exit code tells")
def resize_cmd(
    src: Path,
    out: Path,
    rank: int,
    conv_rank: int | None,
    sv_ratio: float | None,
    sv_fro: float | None,
    sv_cumulative: float | None,
    clamp_quantile: float,
    dtype: str | None,
    overwrite: bool,
    verify: bool,
    on_overflow: str,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
) -> int:
    """Resize a LoRA's modules to a new rank by SVD of up @ down, keeping each one's scale.

    \b
    Examples:
      sdtool lora resize lora.safetensors small.safetensors --rank 8
      sdtool lora resize lora.safetensors dyn.safetensors --rank 64 --sv-fro 0.95
    """
    from sdtool.ops.lora.extract import resize

    r = resize(
        src, out, rank=rank, conv_rank=conv_rank, sv_ratio=sv_ratio, sv_fro=sv_fro,
        sv_cumulative=sv_cumulative, clamp_quantile=clamp_quantile, dtype=dtype,
        overwrite=overwrite, verify=verify, dry_run=dry_run,
    )  # fmt: skip
    if not quiet:
        _render_op(r, as_json)
    return ExitCode.OK


def _render_op(r: object, as_json: bool) -> None:
    from sdtool.ops.lora.extract import LoraOpResult

    assert isinstance(r, LoraOpResult)
    if as_json:
        render.print_json(r.to_json())
        return
    out = render.console()
    ranks: dict[int, int] = {}
    for m in r.modules:
        ranks[m.rank] = ranks.get(m.rank, 0) + 1
    spread = ", ".join(f"{n} x rank {k}" for k, n in sorted(ranks.items()))
    out.print(f"{len(r.modules):,} modules ({spread or 'none'})")
    if r.zero:
        shown = ", ".join(render.markup(z, 90) for z in r.zero[:LIST_LIMIT])
        out.print(f"  left out, zero difference [{len(r.zero)}]: {shown}")
    if r.not_targets:
        shown = ", ".join(render.markup(z, 90) for z in r.not_targets[:LIST_LIMIT])
        out.print(f"  changed but not extracted [{len(r.not_targets)}]: {shown}")
    for k, why in list(r.skipped.items())[:LIST_LIMIT]:
        out.print(f"  skipped {render.markup(k, 90)}: {render.markup(why)}")
    render_written(r, r.dtype)
