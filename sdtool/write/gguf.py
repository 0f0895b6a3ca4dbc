"""The GGUF output format: header, then every tensor streamed in pieces through the encoders.

A GGUF is written in one sequential pass (``write_gguf``): the header (KV pairs and tensor
infos with their offsets, padded to the alignment), then each tensor's bytes padded to the
alignment. Tensors are cut into pieces of about ``ggml.PIECE_ELEMENTS`` values; a pool of
``threads`` workers reads each piece (``pread`` straight from the source file when the values
lie there raw, a ``Span``) and encodes it (``ggml.encode_into``: F32/F16/BF16 or a quantized
type) into one of a few reusable output buffers, while the calling thread writes finished
pieces in order. Memory is therefore a constant (the buffers and each worker's scratch),
plus one tensor for sources whose values must be computed whole (a pickle's storages, a
dequantized GGUF, scaled fp8).

What goes where (names, types, shapes: ComfyUI-GGUF's layout) is ``ops/gguf_export.py``'s
plan; this module writes any list of ``OutGGUF``. The reader is ``formats/gguf.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sdtool.errors import SdtoolError, UsageError, VerificationError
from sdtool.formats import ggml
from sdtool.formats.gguf import DEFAULT_ALIGNMENT, KV, MAGIC, T_ARRAY, T_STRING, VALUE_TYPES
from sdtool.write.direct import MIN_BYTES, DirectWriter, for_file
from sdtool.write.stream import start_writeback, write_all

#: output buffers in flight per worker thread (pieces encoded ahead of the writing thread)
AHEAD = 3
#: after this many bytes written, the kernel is asked to start writing them to disk
#: (``sync_file_range``, Linux), so the closing fsync does not wait for the whole file
WRITEBACK_BYTES = 32 << 20
#: outputs of at least this many bytes are written with O_DIRECT (``write/direct.py``: no
#: page-cache copy, no flusher threads on the encoders' cores); smaller ones through the cache
DIRECT_MIN_BYTES = MIN_BYTES


@dataclass(frozen=True)
class Span:
    """A tensor's values stored raw in a file: ``dtype`` (little-endian), C order, from
    ``offset``. ``check`` raises the reader's error when the file is too short for them."""

    path: Path
    offset: int
    dtype: np.dtype
    check: Callable[[], None] | None = None


@dataclass
class OutGGUF:
    """One tensor of a GGUF being written: its stored shape (numpy order), type, and how to
    get its values (``values()`` returns an array of ``numel`` elements, any float dtype;
    ``span``, when set, says where they lie raw in a file, so pieces are read as needed)."""

    name: str
    shape: tuple[int, ...]
    type: str
    values: Callable[[], np.ndarray]
    source_dtype: str = ""
    notes: list[str] = field(default_factory=list)
    span: Span | None = None

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return ggml.get(self.type).nbytes(self.numel)


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(vtype: int, value: Any, item_type: int | None = None) -> bytes:
    if vtype == T_STRING:
        return _pack_string(value)
    if vtype == T_ARRAY:
        assert item_type is not None
        body = b"".join(_pack_value(item_type, v) for v in value)
        return struct.pack("<IQ", item_type, len(value)) + body
    fmt = VALUE_TYPES[vtype][1]
    assert fmt is not None
    return struct.pack(fmt, value)


def header_bytes(
    kv: Sequence[tuple[str, KV]], tensors: Sequence[OutGGUF], alignment: int
) -> tuple[bytes, list[int]]:
    """The header (padded to the alignment) and each tensor's offset from the data start."""
    parts = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(kv))]
    for k, e in kv:
        parts += [
            _pack_string(k),
            struct.pack("<I", e.type),
            _pack_value(e.type, e.value, e.item_type),
        ]
    offsets, pos = [], 0
    for t in tensors:
        offsets.append(pos)
        dims = tuple(reversed(t.shape)) or (1,)
        parts += [
            _pack_string(t.name),
            struct.pack("<I", len(dims)),
            struct.pack(f"<{len(dims)}Q", *dims),
            struct.pack("<IQ", ggml.get(t.type).id, pos),
        ]
        pos += -(-t.nbytes // alignment) * alignment
    head = b"".join(parts)
    return head + b"\0" * (-len(head) % alignment), offsets


#: one piece's job: encode into the given output buffer, return the bytes to write
Job = Callable[[np.ndarray], np.ndarray]


def _piece_elements(t: OutGGUF) -> int:
    block = ggml.get(t.type).block
    return max(1, ggml.PIECE_ELEMENTS // block) * block


def _encode(t: OutGGUF, src: np.ndarray, out: np.ndarray, use_torch: bool = True) -> None:
    try:
        ggml.encode_into(t.type, src, out, use_torch=use_torch)
    except ggml.F16Overflow as e:
        raise UsageError(
            f"tensor {t.name!r}: {e.count} value(s) overflow float16; write BF16 or a "
            "quantized type instead"
        ) from None
    except ggml.NonFinite as e:
        raise UsageError(
            f"tensor {t.name!r}: {e.count} value(s) are inf or NaN, which {t.type} cannot "
            "hold (llama.cpp's K-quants have no rule for them); use Q8_0, F16 or BF16"
        ) from None


def _pread(fd: int, buf: np.ndarray, offset: int, name: str) -> None:
    view, got = memoryview(buf.data), 0
    while got < buf.size:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k <= 0:
            raise SdtoolError(f"tensor {name!r} ends early; the file shrank")
        got += k


def _torch_pays(tensors: Sequence[OutGGUF]) -> bool:
    return ggml.torch_pays(sum(t.numel for t in tensors if t.type == "Q8_0"))


def _jobs(t: OutGGUF, fds: dict[Path, int], use_torch: bool) -> Iterator[tuple[Job, int]]:
    """The pieces of ``t``: (job, output bytes) in file order."""
    gt = ggml.get(t.type)
    per = _piece_elements(t)
    n = t.numel
    if n % gt.block:
        raise ValueError(f"tensor {t.name!r}: {n} values are not whole {t.type} blocks")
    span = t.span
    if span is not None:
        if span.check is not None:
            span.check()
        fd = fds.get(span.path)
        if fd is None:
            fd = fds[span.path] = os.open(span.path, os.O_RDONLY)
        item = span.dtype.itemsize

        def from_file(a: int, b: int) -> Job:
            def run(out: np.ndarray) -> np.ndarray:
                raw = ggml._scratch("raw", (b - a) * item, np.uint8)
                _pread(fd, raw, span.offset + a * item, t.name)
                o = out[: gt.nbytes(b - a)]
                _encode(t, raw.view(span.dtype), o, use_torch)
                return o

            return run

        for a in range(0, n, per):
            b = min(n, a + per)
            yield from_file(a, b), gt.nbytes(b - a)
        return
    values = t.values()
    if values.size != n:
        raise ValueError(f"tensor {t.name!r} has {values.size} values, not {n}")
    flat = values.reshape(-1)

    def from_array(a: int, b: int) -> Job:
        def run(out: np.ndarray) -> np.ndarray:
            o = out[: gt.nbytes(b - a)]
            _encode(t, flat[a:b], o, use_torch)
            return o

        return run

    for a in range(0, n, per):
        b = min(n, a + per)
        yield from_array(a, b), gt.nbytes(b - a)


def _writeback_starter() -> Callable[[int, int, int], None] | None:
    """``start(fd, offset, nbytes)``: begin writing that range of the file to disk without
    waiting (``stream.start_writeback``: a no-op where the kernel cannot); None: never."""
    return start_writeback


def _direct(f: BinaryIO, nbytes: int) -> DirectWriter | None:
    """A DirectWriter for ``f`` when the output is large and ``f`` an unbuffered file."""
    return for_file(f, nbytes, DIRECT_MIN_BYTES)


def _writer(f: BinaryIO, fd: int | None) -> Callable[[Any], object]:
    """``f.write``, or for an unbuffered file (whose ``write`` may write less than it is given,
    and says so only in its return value) a write of every byte through its descriptor."""
    if fd is not None and isinstance(f, io.RawIOBase):
        return lambda data: write_all(fd, data)
    return f.write


def _file_fd(f: BinaryIO) -> int | None:
    try:
        return f.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def write_gguf(
    f: BinaryIO,
    kv: Sequence[tuple[str, KV]],
    tensors: Sequence[OutGGUF],
    *,
    alignment: int = DEFAULT_ALIGNMENT,
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Stream a GGUF file to ``f``: the header, then each tensor in pieces encoded on
    ``threads`` workers and written in order by this thread. Returns the bytes written.

    A large output to a file goes through ``DirectWriter`` (O_DIRECT). Otherwise every
    ``WRITEBACK_BYTES`` the kernel is asked to start writing the finished part to disk, so the
    caller's closing fsync overlaps the encoding instead of following it."""
    head, _ = header_bytes(kv, tensors, alignment)
    size = len(head) + sum(-(-t.nbytes // alignment) * alignment for t in tensors)
    direct = _direct(f, size)
    fd = _file_fd(f)
    put = _writer(f, fd) if direct is None else direct.write
    start = _writeback_starter() if fd is not None and direct is None else None
    put(head)
    total = len(head)
    synced = 0
    biggest = max((ggml.get(t.type).nbytes(_piece_elements(t)) for t in tensors), default=0)
    free: list[np.ndarray] = []
    window: deque[tuple[Future[np.ndarray], np.ndarray, int]] = deque()
    fds: dict[Path, int] = {}
    threads = max(1, threads)
    use_torch = _torch_pays(tensors)

    def flush_one() -> None:
        nonlocal total, synced
        fut, buf, pad = window.popleft()
        data = fut.result()
        put(data.data)
        if pad:
            put(b"\0" * pad)
        total += data.size + pad
        free.append(buf)
        if start is not None and fd is not None and total - synced >= WRITEBACK_BYTES:
            f.flush()
            start(fd, synced, total - synced)
            synced = total
        if progress is not None:
            progress(data.size)

    pool = ThreadPoolExecutor(threads, thread_name_prefix="sdtool-gguf")
    try:
        with direct or contextlib.nullcontext():  # closed when done, stopped on an error
            for t in tensors:
                last = None
                for job, _nbytes in _jobs(t, fds, use_torch):
                    if len(window) >= AHEAD * threads + 1:
                        flush_one()
                    buf = free.pop() if free else np.empty(biggest, np.uint8)
                    last = (pool.submit(job, buf), buf, 0)
                    window.append(last)
                pad = -t.nbytes % alignment
                if last is not None and pad:
                    window[-1] = (last[0], last[1], pad)
                elif pad:  # an empty tensor: nothing to encode, only padding
                    put(b"\0" * pad)
                    total += pad
            while window:
                flush_one()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fd in fds.values():
            os.close(fd)
    return total


def verify_gguf(tensors: Sequence[OutGGUF], written: Path, threads: int | None = None) -> None:
    """Re-read ``written``: the header names the planned types and shapes, and every tensor's
    stored bytes equal a fresh encoding of its source values.

    Streams as the writer does: each piece is encoded again on ``threads`` workers into a
    reused buffer and compared with the same bytes ``pread`` from the output (no mapping of
    the output, no whole tensor encoded at once), so memory is a few pieces per worker plus,
    as for writing, one tensor for sources whose values must be computed whole."""
    from sdtool.formats.gguf import read_gguf

    threads = max(1, threads or ggml.default_threads())
    use_torch = _torch_pays(tensors)
    try:
        m = read_gguf(written)
    except SdtoolError as e:  # the output itself is damaged (shortened, say)
        raise VerificationError(f"the output does not read back: {e}") from None
    try:
        entries = {e.name: e for e in m.header.tensors}
        starts: list[int] = []
        for t in tensors:
            entry = entries.get(t.name)
            if entry is None or entry.type.name != t.type or entry.shape != t.shape:
                raise VerificationError(f"tensor {t.name!r} reads back differently from the plan")
            starts.append(m.header.data_start + entry.offset)
    finally:
        m.close()
    biggest = max((ggml.get(t.type).nbytes(_piece_elements(t)) for t in tensors), default=0)
    free: list[tuple[np.ndarray, np.ndarray]] = []
    window: deque[tuple[Future[bool], tuple[np.ndarray, np.ndarray], str]] = deque()
    fds: dict[Path, int] = {}
    out_fd = os.open(written, os.O_RDONLY)

    def check(job: Job, bufs: tuple[np.ndarray, np.ndarray], at: int, n: int, name: str) -> bool:
        got = bufs[1][:n]
        try:
            _pread(out_fd, got, at, name)
        except SdtoolError:  # the output shrank: it differs
            return False
        return bool(np.array_equal(job(bufs[0]), got))

    def settle_one() -> None:
        fut, bufs, name = window.popleft()
        ok = fut.result()
        free.append(bufs)
        if not ok:
            raise VerificationError(f"tensor {name!r} differs from its source after writing")

    pool = ThreadPoolExecutor(threads, thread_name_prefix="sdtool-gguf-verify")
    try:
        for t, at in zip(tensors, starts, strict=True):
            for job, nbytes in _jobs(t, fds, use_torch):
                if len(window) >= AHEAD * threads + 1:
                    settle_one()
                bufs = (
                    free.pop()
                    if free
                    else (np.empty(biggest, np.uint8), np.empty(biggest, np.uint8))
                )
                window.append((pool.submit(check, job, bufs, at, nbytes, t.name), bufs, t.name))
                at += nbytes
        while window:
            settle_one()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        os.close(out_fd)
        for fd in fds.values():
            os.close(fd)
