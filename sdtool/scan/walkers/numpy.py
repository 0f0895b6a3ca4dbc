"""``.npy`` files (and npz members): read as numpy.load reads them."""

from __future__ import annotations

from typing import Any

from sdtool.errors import TruncatedFile
from sdtool.scan.buffers import (
    Window,
)
from sdtool.scan.context import (
    Ctx,
    join_path,
)
from sdtool.scan.walkers.pickle import scan_pickle
from sdtool.vocab import Format


def scan_npy(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """``.npy``: read as numpy.load reads it; an object dtype (any spelling) means a pickle."""
    from sdtool.formats.numpyfile import read_npy_layout

    if member is None:
        ctx.formats.append(Format.NPY)
    try:
        layout = read_npy_layout(buf)
    except TruncatedFile as e:
        ctx.error(member, e.message)
        return
    except ValueError as e:
        # numpy.load refuses it: nothing in the file is loaded
        ctx.report.notes.append(f"{member or 'file'}: numpy refuses the npy header ({e})"[:300])
        return
    if not layout.has_object:  # plain numbers: nothing executable, but the data must be there
        available = len(buf) - layout.data_start
        if layout.nbytes > available:
            ctx.error(
                member,
                f"npy data needs {layout.nbytes} bytes but the file holds {available}; "
                "the file is truncated",
            )
        return
    ctx.report.notes.append(f"{member or 'file'}: npy object array: its data is a pickle")
    data = Window(buf, layout.data_start, len(buf) - layout.data_start)
    scan_pickle(
        ctx,
        data,
        join_path(member, "<object array pickle>") if member else "<object array pickle>",
        depth,
    )
    if member is None and ctx.formats and ctx.formats[-1] == "pickle":
        ctx.formats.pop()
