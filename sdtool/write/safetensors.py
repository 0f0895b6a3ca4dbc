"""Writing safetensors: the header laid out the reference writer's way, then every tensor
streamed to its offset (kernel copies for bytes that do not change, cast pieces on two threads).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from sdtool.errors import CorruptFile, OutputError
from sdtool.formats.safetensors import MAX_HEADER
from sdtool.write.direct import ALIGN, MIN_BYTES, reopen_direct
from sdtool.write.plan import OutTensor, source_order
from sdtool.write.stream import (
    BufferRing,
    Chunks,
    Job,
    Release,
    SourceFds,
    cast_pool,
    copy_span,
    made,
    prefetch,
    start_writeback,
    write_all,
)

#: safetensors' Dtype enum order (ascending); the writer sorts by it descending.
DTYPE_ORDER: tuple[str, ...] = (
    "BOOL",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
)
_RANK = {code: i for i, code in enumerate(DTYPE_ORDER)}
PREFETCH = 6  # steps queued ahead of the caller (2 casting, 2 being written, 2 waiting)
#: threads that only wait for the disk: a cast thread hands its piece over and casts the next
#: while the piece is written (a cast thread that wrote its own pieces left its core idle for
#: each O_DIRECT write: 1.1 of 2 cores busy in the fp16 convert)
WRITE_THREADS = 2
#: outputs at least this large send their pieces' whole pages to disk with O_DIRECT
DIRECT_MIN_BYTES = MIN_BYTES


@dataclass(frozen=True)
class Placed:
    """An output tensor and its [begin, end) in the data buffer."""

    tensor: OutTensor
    begin: int
    end: int


def layout(
    plan: Sequence[OutTensor], metadata: dict[str, str] | None
) -> tuple[bytes, list[Placed]]:
    """The complete header (length prefix included) and where each tensor goes.

    Raises OutputError for a dtype safetensors cannot hold or a name given twice.
    """
    seen: set[str] = set()
    for t in plan:
        if t.dtype.code not in _RANK:
            raise OutputError(
                f"tensor {t.name!r} is {t.dtype}, which safetensors cannot store "
                "(cast it, or write a .ckpt)"
            )
        if t.name in seen:
            raise OutputError(f"two output tensors are named {t.name!r}")
        seen.add(t.name)
    ordered = sorted(plan, key=lambda t: (-_RANK[t.dtype.code], t.name))
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    placed: list[Placed] = []
    pos = 0
    for t in ordered:
        placed.append(Placed(t, pos, pos + t.nbytes))
        obj[t.name] = {
            "dtype": t.dtype.code,
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.nbytes],
        }
        pos += t.nbytes
    try:
        js = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise OutputError(f"a tensor name or metadata value is not valid Unicode: {e}") from None
    js += b" " * (-len(js) % 8)
    if len(js) > MAX_HEADER:
        raise OutputError(f"the header would be {len(js)} bytes, over safetensors' 100 MB limit")
    return struct.pack("<Q", len(js)) + js, placed


def write_safetensors(
    plan: Sequence[OutTensor],
    f: BinaryIO,
    *,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Stream ``plan`` into the empty file ``f`` as safetensors; return overflow counts by name.

    The file is sized first, then each tensor is written at its offset, in source order; cast
    pieces are cast on ``CAST_THREADS`` threads and written (pwrite at their own offsets) on
    ``WRITE_THREADS`` more.
    Peak memory is a few pieces of a cast (``CHUNK_BYTES`` of the wider dtype each) or one
    tensor that must be materialised (a deflated or strided source), plus a constant.
    ``progress`` receives byte counts as they are written.
    """
    header, placed = layout(plan, metadata)
    fd = f.fileno()
    write_all(fd, header)
    base = len(header)
    os.ftruncate(fd, base + (placed[-1].end if placed else 0))
    # Tensors go to their places in safetensors' order, but are read in the order they lie in
    # their sources: reading a 7 GB file front to back instead of jumping around is what keeps
    # this at the speed of cp once the file no longer fits the page cache.
    order = sorted(placed, key=lambda p: (str(p.tensor.source.path), *source_order(p.tensor)))
    overflows: dict[str, int] = {}
    release = Release(fd)  # computed pieces: their pages leave the page cache once written
    size = base + (placed[-1].end if placed else 0)
    with _output(fd, size) as out, SourceFds() as fds, cast_pool(WRITE_THREADS) as pool:
        steps = _steps(order, fds, pool, out, base)
        for kind, p, item in prefetch(steps, depth=PREFETCH):
            t = p.tensor
            if kind == "copy":
                span = t.copy_span
                assert span is not None
                copy_span(fds.get(t), fd, span[0], span[1], t, progress, base + p.begin)
            elif kind == "piece":
                at, future = item
                written = future.result()  # in order: errors surface, the ring slot is free
                if t.pieces is not None:
                    release.written(at, written)
                if progress is not None:
                    progress(written)
            elif item.overflow:  # "done": a cast tensor is complete
                overflows[t.name] = item.overflow
    return overflows


class _Out:
    """Where cast pieces go. With ``direct`` (an O_DIRECT descriptor of the same file), a
    piece's whole 4 KiB blocks go straight from its buffer to disk, with no copy into the page
    cache and no flusher threads on the cores the casts need (its buffer is placed like its
    offset within a page: ``Chunks(out_at=)``); its partial edge blocks, and every other
    write, go through ``fd``. Each block is written one way only, so the page cache never
    holds a stale copy. A filesystem that refuses an O_DIRECT write (EINVAL) gets plain
    writes from then on: the bytes are the same."""

    def __init__(self, fd: int, direct: int | None) -> None:
        self.fd = fd
        self.direct = direct

    def write(self, data: np.ndarray, at: int) -> int:
        """Write the piece ``data`` at offset ``at``; its byte count."""
        view = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        n = view.size
        a = -at % ALIGN  # the first whole block
        b = a + max(0, n - a) // ALIGN * ALIGN  # the end of the last one
        if self.direct is None or b <= a or (view.ctypes.data + a) % ALIGN:
            write_all(self.fd, view, at)
            start_writeback(self.fd, at, n)  # the disk writes while the next pieces are made
            return n
        if a:
            write_all(self.fd, view[:a], at)
        self._direct(view[a:b], at + a)
        if b < n:
            write_all(self.fd, view[b:], at + b)
        return n

    def _direct(self, view: np.ndarray, at: int) -> None:
        done, n = 0, view.size
        while done < n:
            fd = self.direct
            if fd is None:
                write_all(self.fd, view[done:], at + done)
                return
            try:
                k = os.pwrite(fd, view[done:].data, at + done)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = None  # closed by _output; the rest (and later pieces) plainly
                continue
            if k <= 0:
                raise OSError(errno.EIO, "a write wrote nothing")
            done += k


@contextlib.contextmanager
def _output(fd: int, size: int) -> Iterator[_Out]:
    """An ``_Out`` for ``fd``, with an O_DIRECT descriptor when the output is large enough."""
    direct = reopen_direct(fd) if size >= DIRECT_MIN_BYTES else None
    try:
        yield _Out(fd, direct)
    finally:
        if direct is not None:
            os.close(direct)


def _cast_and_write(job: Job, out: _Out, at: int, casting: threading.Semaphore) -> int:
    """Make the piece (at most ``CAST_THREADS`` at once: the cores), then write it (any number
    of threads may wait for the disk at once)."""
    return out.write(made(job, casting), at)


def _steps(
    order: list[Placed],
    fds: SourceFds,
    pool: tuple[ThreadPoolExecutor, threading.Semaphore],
    out: _Out,
    base: int,
) -> Iterator[tuple[str, Placed, Any]]:
    """What to do, tensor by tensor: ("copy", p, None) for bytes that move as they are, else
    ("piece", p, (file offset, future byte count)) per chunk and ("done", p, chunks). Runs in
    the prefetch thread and hands each piece to ``pool``, which casts it and writes it at its
    offset in ``fd``: casts and writes (both release the GIL) run on both cores at once."""
    # a ring slot is reused ``slots`` pieces later: in flight are at most the queue's depth,
    # the step the prefetch thread holds, and the one being written
    ring = BufferRing(slots=PREFETCH + 3)
    for p in order:
        t = p.tensor
        span = t.copy_span
        if span is not None and out.direct is None:
            t.source.check_end(t.name, span[0] + span[1])
            yield "copy", p, None
            continue
        # with an O_DIRECT output, bytes kept as they are go as pieces too (read into ring
        # buffers placed like their output offset, written on the pool's threads): measured
        # on the 7.7 GB checkpoint, the page-cache copy (copy_file_range) took 2-3x the time
        # of the .ckpt writer's O_DIRECT copy of the same bytes
        direct = out.direct is not None
        chunks = Chunks(t, fds.get(t), ring, out_at=base + p.begin, direct_out=direct)
        written = 0
        for job in chunks.jobs():
            at = base + p.begin + written
            yield "piece", p, (at, pool[0].submit(_cast_and_write, job, out, at, pool[1]))
            written += job.nbytes
        if written != p.end - p.begin:
            raise CorruptFile(
                f"tensor {t.name!r} gave {written} bytes, expected {p.end - p.begin}",
                path=t.source.path,
            )
        yield "done", p, chunks
