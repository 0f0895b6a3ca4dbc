"""``--verify``: reopen a written file and compare it bit for bit with what was meant."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sdtool.aligned import PageBuffer
from sdtool.errors import VerificationError
from sdtool.model import ModelFile
from sdtool.write.plan import OutTensor
from sdtool.write.stream import Chunks, SourceFds, read_exact


def verify_output(
    plan: Sequence[OutTensor], written: Path, metadata: dict[str, str] | None
) -> None:
    """Reopen ``written`` and compare every tensor's bytes (and the metadata) with the plan.

    The expected bytes are recomputed from the sources (their bytes, or the torch-exact cast),
    piece by piece, so memory stays bounded. Raises VerificationError on the first difference.
    """
    from sdtool.formats.open import open_model

    with open_model(written) as m, SourceFds() as fds:
        want = {t.name for t in plan}
        if set(m.tensors) != want:
            missing, extra = sorted(want - set(m.tensors)), sorted(set(m.tensors) - want)
            raise VerificationError(
                f"the output's tensors differ from the plan (missing {missing[:3]}, "
                f"unexpected {extra[:3]})"
            )
        out_fd = os.open(written, os.O_RDONLY)
        try:
            for t in plan:
                _verify_tensor(t, m, out_fd, fds.get(t))
        finally:
            os.close(out_fd)
        if metadata is not None and m.metadata != metadata:
            raise VerificationError("the output's metadata differs from what was written")


def _verify_tensor(t: OutTensor, m: ModelFile, out_fd: int, src_fd: int) -> None:
    info = m.tensors[t.name]
    if info.dtype != t.dtype or info.shape != t.shape:
        raise VerificationError(
            f"tensor {t.name!r} reads back as {info.describe()}, expected {t.dtype} {list(t.shape)}"
        )
    span = info.file_span
    flat = None if span is not None else m.read_info(info, t.name).reshape(-1)
    pos = 0
    buf: PageBuffer | None = None  # reused; placed for each read (see sdtool.aligned)
    for piece in Chunks(t, src_fd):
        expect = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
        if span is not None:
            if buf is None or buf.size < expect.size:
                buf = PageBuffer(expect.size)
            got = buf.array(span[0] + pos, expect.size)
            read_exact(out_fd, got.data, span[0] + pos, t)
        else:
            assert flat is not None
            n = piece.size
            start = pos // t.dtype.itemsize
            got = np.ascontiguousarray(flat[start : start + n]).view(np.uint8)
        if not np.array_equal(got, expect):
            first = int(np.flatnonzero(got != expect)[0]) + pos
            raise VerificationError(
                f"tensor {t.name!r} differs from its source at element {first // t.dtype.itemsize}"
            )
        pos += expect.size
