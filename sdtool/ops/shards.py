"""Writing sharded safetensors as huggingface_hub / transformers / diffusers do.

Facts (huggingface_hub ``serialization/_base.py`` split_state_dict_into_shards_factory,
parse_size_to_int; diffusers ``models/modeling_utils.py`` save_pretrained): sizes are bytes or
KB/MB/GB/TB in powers of 10; tensors are taken in plan order, a new shard starts when the next
tensor would overflow the current one, a tensor larger than the limit gets a shard of its own
(placed before the shard being filled); one shard -> the plain name and no index; otherwise
``{stem}-{i:05d}-of-{n:05d}.safetensors`` and ``{stem}.safetensors.index.json`` =
``{"metadata": {"total_size": N}, "weight_map": {...}}`` (indent 2, sorted keys, final newline),
total_size = the tensors' bytes. Shards carry the same ``__metadata__`` (``format: pt``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdtool.errors import OutputError, UsageError
from sdtool.formats.shards import SHARD_RE
from sdtool.write import OutTensor, WriteOptions, WriteResult, write_model
from sdtool.write.atomic import atomic_output

SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([KMGT]B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (powers of 10, as huggingface_hub); a plain number is bytes."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE.match(text)
        if not m:
            raise UsageError(f"max_shard_size= wants a size like 5GB or 500MB, not {text!r}")
        size = int(float(m[1]) * SIZE_UNITS[m[2].upper()]) if m[2] else int(float(m[1]))
    if size <= 0:
        raise UsageError("max_shard_size= must be positive")
    return size


def split_plan(plan: Sequence[OutTensor], max_size: int) -> list[list[OutTensor]]:
    """Greedy, in plan order, as huggingface_hub splits a state dict."""
    shards: list[list[OutTensor]] = []
    current: list[OutTensor] = []
    size = 0
    for t in plan:
        n = t.nbytes
        if n > max_size:
            shards.append([t])
            continue
        if size + n > max_size and current:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += n
    if current:
        shards.append(current)
    return shards


@dataclass(frozen=True)
class ShardedResult:
    """What ``write_sharded`` wrote: one WriteResult per file, and the index (None: one file)."""

    files: list[WriteResult]
    index: Path | None = None
    total_size: int = 0
    removed: list[Path] = field(default_factory=list)  # stale shards of an earlier set

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def combined(self) -> WriteResult:
        """One WriteResult for the whole set (path: the index, or the one file)."""
        first = self.files[0]
        return replace(
            first,
            path=self.index or first.path,
            tensors=sum(f.tensors for f in self.files),
            nbytes=self.nbytes,
            copied=sum(f.copied for f in self.files),
            cast=sum(f.cast for f in self.files),
            overflows={k: v for f in self.files for k, v in f.overflows.items()},
            verified=all(f.verified for f in self.files),
        )


def shard_name(out: Path, i: int, n: int) -> Path:
    stem = out.name.removesuffix(".safetensors")
    return out.with_name(f"{stem}-{i:05d}-of-{n:05d}.safetensors")


def index_name(out: Path) -> Path:
    """``model.safetensors`` -> ``model.safetensors.index.json``; a variant
    (``x.fp16.safetensors``) goes before ``.json`` as diffusers names it."""
    stem = out.name.removesuffix(".safetensors")
    base, dot, variant = stem.rpartition(".")
    if dot and variant in ("fp16", "bf16", "fp32", "ema", "non_ema"):
        return out.with_name(f"{base}.safetensors.index.{variant}.json")
    return out.with_name(f"{stem}.safetensors.index.json")


def write_sharded(
    plan: Sequence[OutTensor],
    out: Path,
    options: WriteOptions | None = None,
    *,
    max_shard_size: int | str | None = None,
    metadata: dict[str, str] | None = None,
    **changes: Any,
) -> ShardedResult:
    """Write ``plan`` as ``out`` or as shards of ``out`` plus an index.

    ``max_shard_size`` defaults to ``options.max_shard_size`` (ConvertOptions has one). Every
    shard is written under a temporary name first; only when all are written (and verified) are
    they renamed into place, stale shards of the same stem removed, and the index written
    (atomically). Existing targets are refused unless ``overwrite``.
    """
    opts = options if options is not None else WriteOptions()
    if changes:
        opts = replace(opts, **changes)
    limit = max_shard_size if max_shard_size is not None else getattr(opts, "max_shard_size", None)
    if limit is None:
        raise UsageError("write_sharded needs max_shard_size")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise OutputError("sharded output must be .safetensors", path=out)
    groups = split_plan(plan, parse_size(limit))
    total = sum(t.nbytes for t in plan)
    if len(groups) <= 1:
        return ShardedResult([write_model(plan, out, opts, metadata=metadata)], None, total)
    n = len(groups)
    finals = [shard_name(out, i + 1, n) for i in range(n)]
    index = index_name(out)
    if not opts.overwrite:
        for p in [*finals, index]:
            if p.exists():
                raise OutputError(f"{p.name} exists (pass overwrite=True to replace it)", path=p)
    temps = [p.with_name(f".sdtool-{os.getpid()}-{p.name}") for p in finals]
    written: list[WriteResult] = []
    tmp_opts = replace(opts, overwrite=True)
    try:
        for group, tmp in zip(groups, temps, strict=True):
            written.append(write_model(group, tmp, tmp_opts, metadata=metadata))
        for i, (tmp, final) in enumerate(zip(temps, finals, strict=True)):
            os.replace(tmp, final)
            written[i] = replace(written[i], path=final)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    removed = _remove_stale(out, set(finals))
    weight_map = {
        t.name: final.name for group, final in zip(groups, finals, strict=True) for t in group
    }
    text = json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True
    )
    with atomic_output(index, inputs=set(), overwrite=True) as f:
        f.write((text + "\n").encode())
    return ShardedResult(written, index, total, removed)


def _remove_stale(out: Path, keep: set[Path]) -> list[Path]:
    """Shards of an earlier set with the same stem (another shard count), as diffusers does."""
    stem = out.name.removesuffix(".safetensors")
    gone = []
    for p in out.parent.iterdir():
        m = SHARD_RE.match(p.name)
        if m and m["stem"] == stem and p not in keep:
            p.unlink()
            gone.append(p)
    return gone
