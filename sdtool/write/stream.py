"""The streaming I/O engine every writer shares: a tensor's values as bounded pieces
(``Chunks``: pread, mmap or computed, cast on the way), reusable buffers, exact reads and
writes, kernel copies (``copy_span``), per-source descriptors, and a prefetch thread.

Memory stays about a few pieces (``CHUNK_BYTES`` each) or one tensor that must be materialised
(a deflated or strided source); nothing holds the whole model.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import mmap
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sdtool import dtypes
from sdtool.aligned import PageBuffer
from sdtool.crc import crc32
from sdtool.dtypes import DType
from sdtool.errors import TruncatedFile
from sdtool.write.cast import cast
from sdtool.write.plan import OutTensor

#: casts and buffered copies work on pieces of at most this many bytes (of the wider dtype)
CHUNK_BYTES = 16 * 1024 * 1024
#: errors after which copy_span steps down to the next way of copying
_NO_FAST_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


class BufferRing:
    """A few reusable output buffers, handed out in turn.

    A cast into a fresh 64 MiB array costs a page fault per 4 KiB (measured: twice the wall
    time of the whole fp16 conversion); reusing buffers avoids it. A buffer comes back into use
    ``slots`` pieces later, so ``slots`` must exceed the pieces in flight at once (made or
    being made, queued, being written).
    """

    def __init__(self, slots: int = 5) -> None:
        self.slots: list[PageBuffer] = []
        self.size = slots
        self.i = 0

    def next(self, nbytes: int, at: int = 0) -> np.ndarray:
        """The next buffer's ``nbytes``, placed for a read from file offset ``at``. A slot is
        as large as the largest piece it held, in powers of two (a PageBuffer is zeroed: a
        writer of small pieces, as merge's, does not hold 7 x 16 MiB)."""
        k = self.i % self.size
        self.i += 1
        if k == len(self.slots):
            self.slots.append(PageBuffer(_pow2(nbytes)))
        elif self.slots[k].size < nbytes:
            self.slots[k] = PageBuffer(_pow2(nbytes))
        return self.slots[k].array(at, nbytes)


def _pow2(n: int) -> int:
    """``n`` rounded up to a power of two, at least 64 KiB."""
    return max(1 << 16, 1 << (n - 1).bit_length())


class Chunks:
    """The values of one OutTensor, in the output dtype, as contiguous 1-D pieces.

    Reads contiguous little-endian tensors from the file (kept as they are: pread into a fresh
    buffer per piece; cast: from a read-only map whose pages are dropped once cast), anything
    else through ``ModelFile.read_info`` (one copy of that tensor at most). ``overflow``
    counts values that became inf in a cast (float8_e4m3fn: saturated). ``out_at``: the output
    file offset of the tensor's first byte; ring buffers are placed like it within a page, so a
    writer can hand their whole pages to an O_DIRECT write (bytes kept as they are too, with
    ``direct_out``; else those are placed like their source offset).
    """

    def __init__(
        self,
        t: OutTensor,
        src_fd: int | None = None,
        ring: BufferRing | None = None,
        out_at: int = 0,
        direct_out: bool = False,
    ) -> None:
        self.t = t
        self.src_fd = src_fd
        self.ring = ring
        self.direct_out = direct_out
        self.overflow = 0
        self._out = out_at  # the output offset of the next job's first byte
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[np.ndarray]:
        for job in self.jobs():
            yield job.run()

    def jobs(self) -> Iterator[Job]:
        """The pieces as jobs to run in order or on other threads (``run`` is thread-safe):
        a writer can cast several pieces at once (numpy releases the GIL) and still write
        them in order, since each job knows its output size before it runs."""
        t = self.t
        if t.pieces is not None:
            for nbytes, fill in t.pieces():
                yield self._filled(nbytes, fill)
            return
        if t.make is not None:
            arr = np.asarray(t.make())
            if arr.shape != t.shape:
                raise ValueError(f"computed tensor {t.name!r} has shape {arr.shape}, not {t.shape}")
            yield from self._pieces(arr.reshape(-1), dtypes.from_numpy(arr.dtype))
            return
        span = t.info.file_span
        if span is not None and self.src_fd is not None:
            yield from self._pread(span, self.src_fd)
            return
        arr = t.source.read_info(t.info, t.name)
        yield from self._pieces(arr.reshape(-1), t.info.dtype)

    def _job(self, part: np.ndarray, src: DType, after: Callable[[], None] | None = None) -> Job:
        """A job casting ``part`` (its output buffer taken from the ring now, in order)."""
        nbytes = part.size * self.t.dtype.itemsize
        at, self._out = self._out, self._out + nbytes
        if src == self.t.dtype:
            return Job(nbytes, lambda: np.ascontiguousarray(part))
        buf = None if self.ring is None else self.ring.next(nbytes, at)

        def run() -> np.ndarray:
            out, over = cast(part, src, self.t.dtype, out=buf)
            if over:
                with self._lock:
                    self.overflow += over
            if after is not None:
                after()
            return out

        return Job(nbytes, run)

    def _filled(self, nbytes: int, fill: Callable[[np.ndarray], None]) -> Job:
        """A job filling a buffer (taken from the ring now, in order) with a computed piece."""
        at, self._out = self._out, self._out + nbytes
        buf = np.empty(nbytes, np.uint8) if self.ring is None else self.ring.next(nbytes, at)

        def run() -> np.ndarray:
            fill(buf)
            return buf.view(self.t.dtype.numpy)

        return Job(nbytes, run)

    def _pieces(self, flat: np.ndarray, src: DType) -> Iterator[Job]:
        step = max(1, CHUNK_BYTES // max(src.itemsize, self.t.dtype.itemsize))
        for i in range(0, flat.size, step):
            yield self._job(flat[i : i + step], src)

    def _pread(self, span: tuple[int, int], fd: int) -> Iterator[Job]:
        offset, length = span
        src = self.t.info.dtype
        end = offset + length
        self.t.source.check_end(self.t.name, end)
        step = CHUNK_BYTES // max(src.itemsize, self.t.dtype.itemsize) * src.itemsize
        if src != self.t.dtype:
            yield from self._mapped(fd, offset, end, step, src)
            return
        pos = offset
        while pos < end:
            n = min(step, end - pos)
            # into a reused ring buffer when there is one (a fresh one faults in every page),
            # placed like the bytes' source offset within a page (the kernel's copy is fastest
            # so), or like their output offset for a writer that sends whole pages to O_DIRECT
            place = self._out if self.direct_out else pos
            buf = PageBuffer(n).array(place, n) if self.ring is None else self.ring.next(n, place)
            read_exact(fd, buf.data, pos, self.t)
            pos += n
            yield self._job(buf.view(src.numpy), src)

    def _mapped(self, fd: int, offset: int, end: int, step: int, src: DType) -> Iterator[Job]:
        """Cast straight from a read-only map of the tensor's bytes, dropping each piece's pages
        from this process once cast (MADV_DONTNEED), so RSS stays about the pieces in flight:
        no copy into a buffer, no page faults on fresh buffers. The map lives as long as a job
        or a view of it does (no explicit close: a job may still be running on another
        thread when this generator ends)."""
        if end == offset:
            return
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(fd, end - start, access=mmap.ACCESS_READ, offset=start)
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        pos = offset - start
        while pos < end - start:
            n = min(step, end - start - pos)
            part = np.frombuffer(mm, src.numpy, n // src.itemsize, pos)
            yield self._job(part, src, _dontneed(mm, pos, n))
            pos += n


def _dontneed(mm: mmap.mmap, pos: int, n: int) -> Callable[[], None]:
    """Drop the pages of ``mm[pos:pos + n]`` from this process (they stay in the page cache)."""

    def run() -> None:
        start = pos - pos % mmap.PAGESIZE
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED, start, pos + n - start)

    return run


@dataclass(frozen=True)
class Job:
    """One piece of a tensor's output: its size in bytes, and how to make it."""

    nbytes: int
    run: Callable[[], np.ndarray]


def read_exact(fd: int, buf: memoryview, offset: int, t: OutTensor) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; TruncatedFile when the file ends first."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            raise TruncatedFile(
                f"tensor {t.name!r}: the file ended at byte {offset + got}; "
                "the download is truncated",
                path=t.source.path,
            )
        got += n


def write_all(
    fd: int, data: bytes | bytearray | memoryview | np.ndarray, offset: int | None = None
) -> int:
    """Write every byte of ``data`` (at ``offset`` with pwrite, else at the file position)."""
    if isinstance(data, np.ndarray):  # as bytes: ml_dtypes arrays export no buffer format
        view = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
    else:
        view = memoryview(data).cast("B")
    total = len(view)
    pos = offset
    while view:
        n = os.write(fd, view) if pos is None else os.pwrite(fd, view, pos)
        view = view[n:]
        if pos is not None:
            pos += n
    return total


#: sync_file_range(2)'s flag: start writing the range's dirty pages, do not wait
_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Callable[[int, int, int, int], int] | bool | None = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages in this range to disk now, without
    waiting (Linux sync_file_range; elsewhere nothing). A writer calling this as it goes lets
    the disk write the output while the rest is computed, instead of all of it in the final
    fsync (measured: 2 GB fsync 2-7 s without, ~0.2 s with). Durability still comes from fsync."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = _load_sync_file_range()
    if _sync_file_range is not False and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # type: ignore[operator]


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


#: bytes of a computed output left in the page cache behind the newest piece written
#: (``Release``): by then their writeback, started as each was written, has finished
RELEASE_LAG = 32 * 1024 * 1024


class Release:
    """Drop the pages of written pieces from the page cache, ``lag`` bytes behind the writes
    (Linux ``posix_fadvise(DONTNEED)``; it skips pages still dirty or under writeback, and
    does not wait). Why: a new file's pages are the write's main cost once the page cache
    fills memory, each taken from other files by reclaim and, on a VM, first touched at the
    host's cost (measured here: 1 GiB in 2 MiB pwrites, writeback started per piece, fsync:
    2.0 CPU-s and 5.2 s without, 0.4-0.5 CPU-s and 1.0-1.4 s with); pages given back are
    taken again at once by the next writes. The output is then read from disk afterwards
    (``--verify`` checks what is on disk). Not thread-safe: the writing loop calls it, in order."""

    def __init__(self, fd: int, lag: int | None = None) -> None:
        self.fd, self.lag = fd, RELEASE_LAG if lag is None else lag
        self.pending: collections.deque[tuple[int, int]] = collections.deque()
        self.held = 0
        self.able = hasattr(os, "posix_fadvise")

    def written(self, offset: int, length: int) -> None:
        """``length`` bytes at ``offset`` are written and their writeback started."""
        if not self.able:
            return
        self.pending.append((offset, length))
        self.held += length
        while self.held > self.lag:
            at, n = self.pending.popleft()
            self.held -= n
            try:
                os.posix_fadvise(self.fd, at, n, os.POSIX_FADV_DONTNEED)
            except OSError:  # a file system without it: keep the pages
                self.able = False


def copy_span(
    src_fd: int,
    dst_fd: int,
    offset: int,
    length: int,
    t: OutTensor,
    progress: Callable[[int], None] | None = None,
    dst_offset: int | None = None,
) -> None:
    """Copy ``length`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` (at ``dst_offset``, else
    at its file position) without Python touching them: os.copy_file_range, else os.sendfile,
    else large buffered reads."""
    done = 0
    step = 256 * 1024 * 1024
    mode = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
    buf: PageBuffer | None = None  # the "read" way's buffer, made once
    while done < length:
        want = min(step, length - done)
        at = None if dst_offset is None else dst_offset + done
        try:
            if mode == "copy_file_range":
                n = os.copy_file_range(src_fd, dst_fd, want, offset + done, at)
            elif mode == "sendfile":
                if at is not None:
                    os.lseek(dst_fd, at, os.SEEK_SET)
                n = os.sendfile(dst_fd, src_fd, offset + done, want)
            else:
                buf = buf or PageBuffer(min(length, CHUNK_BYTES))
                view = buf.at(offset + done, min(want, buf.size))[1]
                read_exact(src_fd, view, offset + done, t)
                n = write_all(dst_fd, view, at)
        except OSError as e:
            if mode != "read" and e.errno in _NO_FAST_COPY:
                mode = "sendfile" if mode == "copy_file_range" else "read"
                continue
            raise
        if n == 0:
            raise TruncatedFile(
                f"tensor {t.name!r}: the file ended at byte {offset + done}, "
                f"{length - done} bytes short; the download is truncated",
                path=t.source.path,
            )
        done += n
        if progress is not None:
            progress(n)


#: bytes per step of ``copy_with_crc``: the buffer stays in a core's cache between the read,
#: the checksum and the write, so each byte crosses memory once each way, as in a kernel copy
CRC_COPY_BYTES = 1 << 20


def copy_with_crc(
    src_fd: int,
    dst_fd: int,
    offset: int,
    length: int,
    t: OutTensor,
    progress: Callable[[int], None] | None = None,
    write: Callable[[memoryview], object] | None = None,
) -> int:
    """Copy ``length`` bytes of ``src_fd`` from ``offset`` to ``dst_fd``'s file position (or
    to ``write``, which must copy them before it returns) and return their CRC-32 (a zip
    member's checksum): read, checksum and write one small piece at a time. (Large pieces
    measured slower: they leave the cache between the three passes.)"""
    buf = PageBuffer(min(CRC_COPY_BYTES, max(length, 1)))
    crc, done = 0, 0
    while done < length:
        n = min(buf.size, length - done)
        piece = buf.at(offset + done, n)[1]
        read_exact(src_fd, piece, offset + done, t)
        crc = crc32(piece, crc)
        if write is None:
            write_all(dst_fd, piece)
        else:
            write(piece)
        done += n
        if progress is not None:
            progress(n)
    return crc


class SourceFds:
    """One read-only descriptor per source file, all closed when the block ends."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def get(self, t: OutTensor) -> int:
        return self.of(t.source.path)

    def of(self, path: Path) -> int:
        """The descriptor of ``path`` (one per file, whoever asks)."""
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def __enter__(self) -> SourceFds:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


#: pieces cast at once: one per core of a 2-core machine (numpy's casts release the GIL)
CAST_THREADS = 2


@contextlib.contextmanager
def cast_pool(extra: int = 0) -> Iterator[tuple[ThreadPoolExecutor, threading.Semaphore]]:
    """Threads for making pieces (at most ``CAST_THREADS`` at once: take the semaphore around
    the work), plus ``extra`` that may wait for the disk meanwhile. On the way out (an error,
    Ctrl-C) queued pieces are dropped and running ones waited for, so no thread outlives the
    write or touches a closed file."""
    pool = ThreadPoolExecutor(CAST_THREADS + extra, thread_name_prefix="sdtool-cast")
    try:
        yield pool, threading.Semaphore(CAST_THREADS)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def made(job: Job, casting: threading.Semaphore) -> np.ndarray:
    """A pool thread's work: the piece, made while holding one of the ``CAST_THREADS`` slots."""
    with casting:
        return job.run()


T = TypeVar("T")
_END = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` while a background thread computes up to ``depth`` ahead.

    Reading and casting (numpy and preads release the GIL) then overlap the writes of the
    caller. An exception in the thread is re-raised here; when the caller stops early (an
    error, Ctrl-C), the thread is told to stop and is waited for.
    """
    q: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, _END))
        except BaseException as e:  # handed to the consumer
            q.put((False, e))

    worker = threading.Thread(target=run, name="sdtool-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a put() and let the thread finish
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
            worker.join(timeout=0.05)
