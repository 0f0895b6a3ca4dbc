"""``sdtool convert`` between layouts: single file <-> diffusers folder (--to diffusers|single)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sdtool.cli.render import console, human_bytes, markup, print_json, warn
from sdtool.errors import UsageError
from sdtool.vocab import ExitCode

if TYPE_CHECKING:  # the layout engine loads when a layout conversion runs, not for --help
    from sdtool.ops.layout import LayoutResult

LAYOUT_TARGETS = ("diffusers", "single")


def wants_layout(to: str | None, src: Path) -> bool:
    """A layout conversion: ``--to diffusers|single``, or a diffusers folder as input."""
    if to in LAYOUT_TARGETS:
        return True
    return src.is_dir() and (src / "model_index.json").is_file()


def run_layout(
    src: Path,
    dst: Path,
    *,
    to: str | None,
    family: str | None,
    prediction_type: str | None,
    components: str | None,
    overwrite: bool,
    verify: bool,
    dry_run: bool,
    max_shard_size: str | None,
    as_json: bool,
    tokenizers_from: Path | None = None,
) -> int:
    from sdtool.ops.layout import to_diffusers, to_single

    if to == "diffusers":
        if components:
            raise UsageError("--components chooses what goes into a single file (--to single)")
        result = to_diffusers(
            src, dst, family=family, prediction_type=prediction_type, overwrite=overwrite,
            verify=verify, dry_run=dry_run, max_shard_size=max_shard_size,
            tokenizers_from=tokenizers_from,
        )  # fmt: skip
    else:
        if tokenizers_from:
            raise UsageError("--tokenizers-from applies to --to diffusers")
        if max_shard_size:
            raise UsageError("--max-shard-size applies to --to diffusers (and plain conversions)")
        chosen = [c.strip() for c in components.split(",") if c.strip()] if components else None
        result = to_single(
            src, dst, family=family, components_=chosen, overwrite=overwrite, verify=verify,
            dry_run=dry_run,
        )  # fmt: skip
    if as_json:
        print_json(result.to_json())
    else:
        render(result)
    return ExitCode.OK


def render(r: LayoutResult) -> None:
    out = console()
    if r.dry_run:
        for source, target, how in r.mapping:
            out.print(
                f"{markup(source)} -> {markup(target)}" + (f"  ({how})" if how != "rename" else "")
            )
        for key in r.extras:
            out.print(f"{markup(key)} -> extras")
        out.print(
            f"dry run ({r.family}, {r.direction}): {len(r.mapping)} mapped, "
            f"{len(r.extras)} kept aside; nothing written"
        )
    else:
        n = sum(r.files.values())
        what = f"{len(r.files)} file(s), {n:,} tensors, {human_bytes(r.output_bytes)}"
        if r.verified:
            what += ", verified"
        out.print(
            f"converted {markup(r.input)} -> {markup(r.output)} ({r.family}, {r.direction}): {what}"
        )
    for note in r.notes:
        warn(f"{r.input}: {note}")


def run_lora_format(
    src: Path,
    dst: Path,
    *,
    to: str,
    family: str | None,
    overwrite: bool,
    verify: bool,
    dry_run: bool,
    as_json: bool,
) -> int:
    from sdtool.ops.lora_format import convert_lora_format

    r = convert_lora_format(
        src, dst, to=to, family=family, overwrite=overwrite, verify=verify, dry_run=dry_run
    )
    if as_json:
        print_json(r.to_json())
        return ExitCode.OK
    out = console()
    if r.dry_run:
        for old, new in r.mapping:
            out.print(f"{markup(old)} -> {markup(new)}")
    what = f"{r.modules} modules ({r.family}) as {to}"
    if r.split:
        what += f", {len(r.split)} fused split into parts"
    if r.fused:
        what += f", {len(r.fused)} fused from parts"
    if not r.dry_run:
        what += f", {human_bytes(r.output_bytes)}" + (", verified" if r.verified else "")
    out.print(
        f"{'planned' if r.dry_run else 'converted'} {markup(r.input)} -> {markup(r.output)}: {what}"
    )
    for note in r.notes:
        warn(f"{r.input}: {note}")
    return ExitCode.OK
