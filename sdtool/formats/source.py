"""Where a reader gets bytes: a local path, or a ``RangeReader`` (random access to remote bytes).

Readers take ``Input = Path | RangeReader``. A local path keeps its fast paths (pread with
read-ahead off, mmap, copy_file_range); a RangeReader offers ``size`` and ``pread(offset, n)``
and keeps what it fetched in a block cache, so the scattered small reads of a header, a zip's
end records and directory, or a pickle member cost one request each at most and never twice.
``sdtool.remote.HttpFile`` is the HTTP one; the readers do not know about HTTP.

A RangeReader is also a read-only byte sequence (``len``, int index, contiguous slices,
``find``), the form the scanner's walkers read, and ``open()`` gives a seekable file object
for readers that seek and read (the zip reader, tarfile, the unpickler).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, cast

BLOCK = 64 << 10  # bytes per cached block (a zip local header costs one)
CACHE = 64 << 20  # cached bytes at most; larger single reads bypass the cache
STREAM = 1 << 20  # a file object's reads this long, past the cache, become one streamed read


class RangeReader:
    """Random access to ``size`` bytes fetched by ``_fetch(offset, n)``, cached in blocks.

    Subclasses implement ``_fetch`` (one request for a contiguous range) and may override
    ``stream`` (one sequential pass) and ``close``. ``requests`` and ``fetched`` count what was
    asked of the source.
    """

    #: readers that would read every zip member's local header at open defer it (see formats.zip)
    remote = True

    def __init__(self, path: Path, size: int, *, block: int = BLOCK, cache: int = CACHE) -> None:
        self.path = path
        self.size = size
        self.block = block
        self.cache_limit = cache
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self.requests = 0
        self.fetched = 0

    # -- what a subclass provides -----------------------------------------------------------------

    def _fetch(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset`` (in range), in one request."""
        raise NotImplementedError

    def stream(self, offset: int = 0) -> Any:
        """The bytes from ``offset`` to the end, in pieces (an iterator of bytes)."""
        pos = offset
        while pos < self.size:
            n = min(1 << 20, self.size - pos)
            yield self.pread(pos, n)
            pos += n

    def close(self) -> None:
        """Release connections and temporary files."""
        self._blocks.clear()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------------

    def seed(self, offset: int, data: bytes) -> None:
        """Cache ``data``, fetched at ``offset`` (e.g. the first request's body)."""
        b = self.block
        first = -(-offset // b)  # whole blocks only
        for i in range(first, (offset + len(data)) // b + 1):
            start = i * b - offset
            piece = data[start : start + b]
            if len(piece) == b or (i * b + len(piece) == self.size and piece):
                self._keep(i, piece)

    def pread(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer at the end of the file)."""
        if offset < 0:
            raise ValueError("negative offset")
        end = min(self.size, offset + max(0, n))
        if end <= offset:
            return b""
        b = self.block
        first, last = offset // b, (end - 1) // b
        if first == last and (hit := self._blocks.get(first)) is not None:  # the common case
            return hit[offset - first * b : end - first * b]
        if (last - first + 1) * b > self.cache_limit // 2:  # a big read: straight through
            self.requests += 1
            self.fetched += end - offset
            return self._fetch(offset, end - offset)
        i = first
        while i <= last:  # fetch each run of missing blocks with one request
            if i in self._blocks:
                self._blocks.move_to_end(i)
                i += 1
                continue
            j = i
            while j + 1 <= last and j + 1 not in self._blocks:
                j += 1
            lo, hi = i * b, min(self.size, (j + 1) * b)
            self.requests += 1
            self.fetched += hi - lo
            data = self._fetch(lo, hi - lo)
            for k in range(i, j + 1):
                self._keep(k, data[(k - i) * b : (k - i + 1) * b])
            i = j + 1
        pieces = [self._blocks[k] for k in range(first, last + 1)]
        joined = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return joined[offset - first * b : end - first * b]

    def cached_run(self, offset: int, n: int) -> int:
        """How many of the ``n`` bytes at ``offset`` are in the cache, counting from ``offset``."""
        b, pos, end = self.block, offset, min(self.size, offset + n)
        while pos < end and pos // b in self._blocks:
            pos = (pos // b + 1) * b
        return max(0, min(pos, end) - offset)

    def _keep(self, i: int, data: bytes) -> None:
        self._blocks[i] = data
        self._blocks.move_to_end(i)
        while len(self._blocks) * self.block > self.cache_limit and len(self._blocks) > 1:
            self._blocks.popitem(last=False)

    # -- as a byte sequence (the scanner's walkers) -----------------------------------------------

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, int):  # the pickle machine reads opcodes one byte at a time
            if key < 0:
                key += self.size
            if not 0 <= key < self.size:
                raise IndexError("index out of range")
            hit = self._blocks.get(key // self.block)
            return hit[key % self.block] if hit is not None else self.pread(key, 1)[0]
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise ValueError("slices must be contiguous")
        return self.pread(start, stop - start) if stop > start else b""

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        end = self.size if end is None else min(end, self.size)
        pos, step = max(0, start), 1 << 20
        while pos < end:
            piece = self.pread(pos, min(end, pos + step + len(sub) - 1) - pos)
            i = piece.find(sub)
            if i >= 0:
                return pos + i
            pos += step
        return -1

    # -- as a file --------------------------------------------------------------------------------

    def open(self) -> BinaryIO:
        """A seekable, unbuffered file object over the bytes (the block cache is its buffer)."""
        return cast(BinaryIO, RangeIO(self))


class RangeIO(io.RawIOBase):
    """A file object over a RangeReader: read, readinto, seek, tell; no fileno.

    Reads go through the block cache, except long sequential reads past it (hashing a whole
    file): those continue one streamed response (``RangeReader.stream``) until a seek.
    """

    remote = True

    def __init__(self, reader: RangeReader) -> None:
        self.reader, self.pos = reader, 0
        self._stream: Any = None  # an iterator of pieces, positioned at self._stream_at
        self._stream_at = -1
        self._left = b""  # the rest of the last piece

    def close(self) -> None:
        self._end_stream()
        super().close()

    def _end_stream(self) -> None:
        if self._stream is not None and hasattr(self._stream, "close"):
            self._stream.close()
        self._stream, self._stream_at, self._left = None, -1, b""

    def _from_stream(self, n: int) -> bytes:
        if self._stream is None or self._stream_at != self.pos:
            self._end_stream()
            self._stream, self._stream_at = iter(self.reader.stream(self.pos)), self.pos
        if not self._left:
            self._left = next(self._stream, b"")
        data, self._left = self._left[:n], self._left[n:]
        self._stream_at += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def read(self, n: int | None = -1) -> bytes:
        size = self.reader.size
        if n is None or n < 0:
            n = size - self.pos
        n = max(0, min(n, size - self.pos))
        if n < STREAM and self._stream_at != self.pos:
            data = self.reader.pread(self.pos, n)
            self.pos += len(data)
            return data
        pieces, want = [], n
        while want > 0:
            cached = self.reader.cached_run(self.pos, want)
            if cached and self._stream_at != self.pos:
                piece = self.reader.pread(self.pos, cached)
            elif want >= STREAM or self._stream_at == self.pos:
                piece = self._from_stream(want)
            else:
                piece = self.reader.pread(self.pos, want)
            if not piece:
                break
            pieces.append(piece)
            self.pos += len(piece)
            want -= len(piece)
        return b"".join(pieces)

    def seek(self, off: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.reader.size}[whence]
        if base + off < 0:
            raise ValueError("negative seek position")
        self.pos = base + off
        return self.pos

    def tell(self) -> int:
        return self.pos


#: what a reader accepts: a local file, or remote bytes
Input = Path | RangeReader


def input_size(src: Input) -> int:
    """The file's size."""
    return src.size if isinstance(src, RangeReader) else src.stat().st_size


def open_input(src: Input) -> BinaryIO:
    """The file opened for reading (a context manager)."""
    return src.open() if isinstance(src, RangeReader) else open(src, "rb")


def input_path(src: Input) -> Path:
    """The name to report the file by (a UrlPath for remote bytes)."""
    return src.path if isinstance(src, RangeReader) else src


def is_remote(f: object) -> bool:
    """Whether ``f`` (a file object or a byte source) reads remote bytes: scattered reads cost a
    request each, so readers defer what they can."""
    return bool(getattr(f, "remote", False))
