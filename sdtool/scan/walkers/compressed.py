"""Single-file compressed wrappers (gzip, bz2, xz, lzma, zlib, lz4, joblib's ZF): decompressed
under the file's budget, then routed like any blob.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from sdtool.scan.archives import scan_unscannable
from sdtool.scan.buffers import (
    ScanLimit,
    Sink,
    chunks,
    decompress,
)
from sdtool.scan.context import (
    Ctx,
    join_path,
    scan_nested,
)
from sdtool.vocab import Format


def scan_compressed(kind: str) -> Callable[[Ctx, Any, str | None, int], None]:
    """gzip/bz2/xz/lzma/zlib wrappers (joblib compression): bounded decompression, then route."""

    def handler(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
        if member is None:
            ctx.formats.append(Format(kind))
        start = 0
        algo = kind
        if kind == "joblib-zfile":
            # joblib's read_zfile: b"ZF", a 19-byte hex length, one optional space, zlib data
            start, algo = 2 + 19, "zlib"
            if buf[start : start + 1] == b" ":
                start += 1
        elif kind == "lz4" and importlib.util.find_spec("lz4") is None:
            ctx.report.self_contained = False  # another machine, with lz4, scans it
            scan_unscannable("lz4")(ctx, buf, member, depth)
            return
        elif kind == "lzma":
            algo = "lzma-auto"  # joblib opens ']\x00' files with lzma.LZMAFile (format auto)
        path = join_path(member, f"<{kind}>") if member else f"<{kind}>"
        data, limit = inflate(ctx, chunks(buf, start), algo, len(buf) - start, member)
        if len(data):
            scan_nested(ctx, data, path, depth + 1)
        if limit is not None:
            raise limit

    return handler


def inflate(
    ctx: Ctx, pieces: Any, algo: Any, compressed: int, member: str | None
) -> tuple[Any, ScanLimit | None]:
    """Decompress under the budget: (what came out, the limit that stopped it or None).

    Past a limit, what came out before it is still returned: the caller scans it (a payload
    at the start is still found), then raises the limit to end the file's scan.
    """
    sink = Sink(ctx.budget, member or "the file", compressed, ctx.keep)
    limit = None
    try:
        why = decompress(ctx.budget, pieces, algo, sink)
    except ScanLimit as e:
        why, limit = None, e
    name = algo if isinstance(algo, str) else "LZMA"
    if why:
        ctx.error(
            member,
            f"{name} data {why}" + (": what came before is scanned" if sink.n else ""),
        )
    return sink.result(), limit
