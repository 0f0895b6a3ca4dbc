"""GGUF files: plain data (no pickles, nothing executable), checked by the GGUF rules."""

from __future__ import annotations

from typing import Any

from sdtool.errors import SdtoolError
from sdtool.formats.sniff import sniff_bytes
from sdtool.scan.context import Ctx, join_path, scan_nested
from sdtool.vocab import Format


def scan_gguf(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """GGUF is plain data (no pickles, nothing executable): a header that keeps every GGUF rule
    is safe; one that breaks them cannot be scanned (a loader's parser may be attacked by it).
    Bytes hidden after the last tensor are checked like a safetensors tail."""
    from sdtool.formats.gguf import read_header

    if member is None:
        ctx.formats.append(Format.GGUF)
    try:
        header = read_header(buf, len(buf))
    except SdtoolError as e:
        if member is None:
            ctx.report.scanned = False
        ctx.error(member, f"not scanned: breaks the GGUF rules: {e.message}")
        return
    end = -(-header.data_end // header.alignment) * header.alignment
    tail = bytes(buf[end : end + 4096]) if end < len(buf) else b""
    if tail and sniff_bytes(tail, len(buf) - end) in (Format.PICKLE, Format.ZIP):
        ctx.find(
            "suspicious",
            "gguf-hidden",
            f"a pickle or zip is hidden after the GGUF tensors at offset {end}",
            member,
        )
        data = bytes(buf[end:])
        scan_nested(ctx, data, join_path(member, "<hidden data>"), depth + 1)
