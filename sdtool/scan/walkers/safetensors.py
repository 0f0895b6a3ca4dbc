"""safetensors files: the reference rules, lint, and anything hidden after the tensors."""

from __future__ import annotations

import re
from typing import Any

from sdtool.errors import SdtoolError
from sdtool.formats import zip as zipfmt
from sdtool.formats.sniff import sniff_bytes
from sdtool.scan.buffers import (
    as_file,
)
from sdtool.scan.context import (
    Ctx,
    join_path,
    scan_nested,
)
from sdtool.scan.walkers.pickle import is_zip_tail
from sdtool.scan.walkers.zip import scan_archive
from sdtool.vocab import Format

_CODE_RE = re.compile(
    r"__import__|\bimport\s+\w|\beval\s*\(|\bexec\s*\(|os\.system|subprocess|<script|"
    r"\bcurl\s|\bwget\s|powershell|/bin/(?:ba)?sh|base64\s*-d"
)
_URL_RE = re.compile(r"\b(?:https?|ftp|file)://", re.IGNORECASE)


def scan_safetensors(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """Reference-rule validation plus lint of the header and what surrounds the tensors."""
    from sdtool.formats.safetensors import read_header

    if member is None:
        ctx.formats.append(Format.SAFETENSORS)
    size = len(buf)
    try:
        header = read_header(as_file(buf), size)
    except SdtoolError as e:  # truncated or corrupt: no loader reads it, and neither can the scan
        ctx.error(member, f"breaks the safetensors rules: {e.message}")
        _safetensors_tail(ctx, buf, member, depth, None)
        return
    raw = header.raw
    if raw[:1] in (b" ", b"\t", b"\n", b"\r"):
        ctx.find(
            "info",
            "safetensors-lint",
            "the header starts with whitespace (the reference accepts it; other parsers may not)",
            member,
        )
    if header.duplicate_keys:
        ctx.find(
            "suspicious",
            "safetensors-lint",
            f"duplicate header keys {header.duplicate_keys[:5]} (parsers disagree on which wins)",
            member,
        )
    unknown = sorted(
        {
            k
            for e in header.entries.values()
            for k in e
            if k not in ("dtype", "shape", "data_offsets")
        }
    )
    if unknown:
        ctx.find(
            "info",
            "safetensors-lint",
            f"unknown per-tensor fields {unknown[:5]}",
            member,
        )
    for k, v in header.metadata.items():
        if _CODE_RE.search(v) or _CODE_RE.search(k):
            ctx.find(
                "suspicious",
                "safetensors-metadata",
                f"metadata {k!r} looks like code or a shell command",
                member,
            )
        elif _URL_RE.search(v):
            ctx.find("info", "safetensors-metadata", f"metadata {k!r} holds a URL", member)
    _safetensors_tail(ctx, buf, member, depth, header)


def _safetensors_tail(ctx: Ctx, buf: Any, member: str | None, depth: int, header: Any) -> None:
    """A pickle or zip hidden after the tensors (or appended to the file)."""
    from sdtool.formats.safetensors import lenient_data_end

    size = len(buf)
    if header is not None:
        end = header.data_end
    else:
        if size < 8:
            return
        end = lenient_data_end(buf)
    if is_zip_tail(buf) or bytes(buf[end : end + 4]) == zipfmt.LOCAL_SIG:
        ctx.find(
            "suspicious",
            "safetensors-hidden",
            "a zip is hidden after the safetensors data",
            member,
        )
        try:
            arch = zipfmt.read_archive(as_file(buf), size)
            scan_archive(
                ctx,
                buf,
                arch,
                join_path(member, "<hidden zip>") if member else "<hidden zip>",
                depth + 1,
            )
        except SdtoolError:
            pass
        return
    if end < size:
        tail = bytes(buf[end:])
        if sniff_bytes(tail[:4096], len(tail)) is Format.PICKLE:
            ctx.find(
                "suspicious",
                "safetensors-hidden",
                f"a pickle is hidden after the tensors at offset {end}",
                member,
            )
            scan_nested(
                ctx,
                tail,
                join_path(member, "<hidden pickle>") if member else "<hidden pickle>",
                depth + 1,
            )
