"""``sdtool lora bake|extract|resize``: LoRA arithmetic, streamed."""

from __future__ import annotations

from pathlib import Path

import click

from sdtool.cli import render
from sdtool.cli.options import dry_run_option, dtype_option, json_option, write_options
from sdtool.errors import UsageError

EXIT_OK, EXIT_UNMATCHED = 0, 1
LIST_LIMIT = 20


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
def bake_cmd(
    paths: tuple[str, ...],
    strict: bool,
    dtype: str | None,
    overwrite: bool,
    verify: bool,
    on_overflow: str,
    dry_run: bool,
    as_json: bool,
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
        return EXIT_UNMATCHED
    if as_json:
        render.print_json(result.to_json())
    else:
        _render_bake(result)
    return EXIT_OK


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
    for name, n in r.overflows.items():
        render.warn(f"{n} value(s) of {name!r} overflowed to inf in the cast to {r.dtype}")
    if r.dry_run:
        out.print("dry run: nothing written")
        return
    how = [render.human_bytes(r.output_bytes)] + (["verified"] if r.verified else [])
    out.print(f"wrote {render.markup(r.output)}: {', '.join(how)} in {r.seconds:.1f} s")
