"""Byte sources for the container walkers, and the per-file budget that bounds them.

A walker sees every blob as a read-only byte sequence (``len``, int index, contiguous slices),
whether it is the file itself (an mmap, or pread for scattered zip reads), a window of it (a
stored zip member, a tar member: never copied), or decompressed bytes (kept in memory up to
``SPILL`` bytes, then in an unlinked temporary file that is mapped back). Every decompressed byte
and every opcode is charged to the file's ``Budget``; running out raises ``ScanLimit``, which
ends the file's scan as ``could not scan: limit`` with what was found so far kept.
"""

from __future__ import annotations

import bz2
import contextlib
import io
import lzma
import mmap
import os
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from sdtool.errors import ScanLimit, ScanOutOfResources
from sdtool.formats.source import RangeReader

SPILL = 64 << 20  # decompressed bytes kept in memory; more go to a temporary file
CHUNK = 1 << 20


@dataclass
class Budget:
    """What one file may cost: decompressed bytes, opcodes, wall time, a ratio per blob."""

    max_bytes: int = 1 << 30  # decompressed bytes, all members and wrappers together
    max_ratio: int = 1000  # decompressed / compressed per blob (deflate's own maximum is 1032)
    max_opcodes: int = 100_000_000  # pickle opcodes, all streams together
    seconds: float = 300.0
    used_bytes: int = 0
    used_opcodes: int = 0
    deadline: float = field(default=0.0)

    def start(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    def charge_opcodes(self, n: int) -> None:
        self.used_opcodes += n
        if self.used_opcodes > self.max_opcodes:
            raise ScanLimit(f"more than {self.max_opcodes} pickle opcodes in one file")

    def opcodes_left(self) -> int:
        return max(1, self.max_opcodes - self.used_opcodes)

    def check_time(self) -> None:
        if self.deadline and time.monotonic() > self.deadline:
            raise ScanOutOfResources(f"the file took longer than {self.seconds:g} s")


class Window:
    """A read-only byte sequence over part of another (a member inside its container).

    It also reads like a file (read/seek/tell), for readers such as tarfile and the zip reader.
    """

    def __init__(self, base: Any, start: int, length: int) -> None:
        if isinstance(base, Window):  # flatten nested windows
            start, base = base.start + start, base.base
        self.base: Any = base
        self.start: int = start
        self.length: int = max(0, length)
        self.pos = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, int):
            if key < 0:
                key += self.length
            if not 0 <= key < self.length:
                raise IndexError("index out of range")
            return self.base[self.start + key]
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise ValueError("slices must be contiguous")
        if stop <= start:
            return b""
        return bytes(self.base[self.start + start : self.start + stop])

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        end = self.length if end is None else min(end, self.length)
        if hasattr(self.base, "find"):
            i = self.base.find(sub, self.start + start, self.start + end)
            return i - self.start if i >= 0 else -1
        return _find(self, sub, start, end)

    def read(self, n: int = -1) -> bytes:
        end = self.length if n is None or n < 0 else min(self.length, self.pos + n)
        out = self[self.pos : end] if end > self.pos else b""
        self.pos = max(self.pos, end)
        return out

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off if whence == 0 else (self.pos + off if whence == 1 else self.length + off)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


#: the OSErrors met reading the file or spilling to temporary files during the current
#: ``scan_file`` (a list it sets): whatever a walker made of one (a broken member, a note),
#: the report is then the machine's, not the bytes', and is never cached
IO_ERRORS: ContextVar[list[OSError] | None] = ContextVar("sdtool_scan_io_errors", default=None)


def io_error(e: OSError) -> OSError:
    """Record ``e`` for the current scan (see IO_ERRORS) and return it, to be raised."""
    seen = IO_ERRORS.get()
    if seen is not None:
        seen.append(e)
    return e


class FileBuf:
    """A read-only byte sequence over an open file (len, slices via pread) for zip walking."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, int):
            if key < 0:
                key += self.size
            if not 0 <= key < self.size:
                raise IndexError("FileBuf index out of range")
            start, stop = key, key + 1
        else:
            start, stop, step = key.indices(self.size)
            if step != 1:
                raise ValueError("FileBuf slices must be contiguous")
        try:
            data = os.pread(self.f.fileno(), max(0, stop - start), start) if stop > start else b""
        except OSError as e:
            raise io_error(e) from None
        return data[0] if isinstance(key, int) else data

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        return _find(self, sub, start, self.size if end is None else min(end, self.size))


def _find(buf: Any, sub: bytes, start: int, end: int) -> int:
    """``buf.find`` by reading pieces (for sources that are not in memory)."""
    pos = start
    while pos < end:
        piece = bytes(buf[pos : min(end, pos + CHUNK + len(sub) - 1)])
        i = piece.find(sub)
        if i >= 0:
            return pos + i
        pos += CHUNK
    return -1


def as_file(buf: Any) -> BinaryIO:
    """A file-like view of ``buf`` for readers that seek and read."""
    if isinstance(buf, FileBuf):
        return buf.f
    if isinstance(buf, RangeReader):  # remote bytes: reads go through its block cache
        return buf.open()
    if isinstance(buf, mmap.mmap):
        return buf  # type: ignore[return-value]  # mmap has seek/read
    if isinstance(buf, Window):
        buf.seek(0)
        return buf  # type: ignore[return-value]
    return io.BytesIO(buf)


class _RawReader(io.RawIOBase):
    """A real io object over any byte sequence (for readers that insist on one)."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        piece = bytes(self.buf[self.pos : self.pos + len(b)])
        b[: len(piece)] = piece
        self.pos += len(piece)
        return len(piece)

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off if whence == 0 else (self.pos + off if whence == 1 else len(self.buf) + off)
        return self.pos

    def tell(self) -> int:
        return self.pos


def as_io(buf: Any) -> io.BufferedReader:
    """``buf`` as a buffered binary io object."""
    return io.BufferedReader(_RawReader(buf), buffer_size=CHUNK)


def chunks(buf: Any, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
    """``buf[start:stop]`` in pieces of CHUNK bytes."""
    stop = len(buf) if stop is None else stop
    for pos in range(start, stop, CHUNK):
        yield bytes(buf[pos : min(stop, pos + CHUNK)])


class Sink:
    """Collects decompressed bytes under the budget: memory first, then a temporary file."""

    def __init__(self, budget: Budget, what: str, compressed: int, keep: list[Any]) -> None:
        self.budget, self.what, self.keep = budget, what, keep
        self.cap = max(1 << 20, compressed * budget.max_ratio)
        self.mem = bytearray()
        self.file: BinaryIO | None = None
        self.n = 0

    def write(self, b: bytes) -> None:
        """Keep ``b``; past the ratio cap or the budget, keep what fits, then raise ScanLimit."""
        ratio_room = self.cap - self.n
        budget_room = self.budget.max_bytes - self.budget.used_bytes
        if len(b) <= min(ratio_room, budget_room):
            self._keep(b)
            return
        self._keep(b[: max(0, min(ratio_room, budget_room))])
        if ratio_room <= budget_room:
            raise ScanLimit(
                f"{self.what}: decompressed data exceeds {self.budget.max_ratio} times its "
                "compressed size (a decompression bomb)"
            )
        raise ScanLimit(
            f"{self.what}: decompressed data exceeds the file's budget of "
            f"{self.budget.max_bytes} bytes (a decompression bomb)"
        )

    def _keep(self, b: bytes) -> None:
        self.n += len(b)
        self.budget.used_bytes += len(b)
        try:
            if self.file is None and len(self.mem) + len(b) > SPILL:
                self.file = tempfile.TemporaryFile(prefix="sdtool-scan-")  # noqa: SIM115 - kept
                self.keep.append(self.file)
                self.file.write(self.mem)
                self.mem = bytearray()
            if self.file is not None:
                self.file.write(b)
            else:
                self.mem += b
        except OSError as e:  # a full or read-only temporary folder: this machine's
            raise io_error(e) from None

    def result(self) -> Any:
        if self.file is None:
            return bytes(self.mem)
        self.file.flush()
        mm = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        self.keep.append(mm)
        return mm


def _gzip_next(rest: bytes) -> bytes | None:
    rest = rest.lstrip(b"\x00")  # the gzip module skips zero padding between members
    return rest if rest[:2] == b"\x1f\x8b" else None


DECOMPRESSORS: dict[str, tuple[Callable[[], Any], Callable[[bytes], bytes | None] | None]] = {
    # algorithm: (a new decompressor, where a following stream starts (the loaders read on))
    "gzip": (lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), _gzip_next),
    "zlib": (lambda: zlib.decompressobj(), None),
    "deflate": (lambda: zlib.decompressobj(-15), None),
    "bzip2": (lambda: bz2.BZ2Decompressor(), lambda r: r if r[:3] == b"BZh" else None),
    "xz": (
        lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ),
        lambda r: (lambda s: s if s[:6] == b"\xfd7zXZ\x00" else None)(r.lstrip(b"\x00")),
    ),
    "lzma": (lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE), None),
    "lzma-auto": (lambda: lzma.LZMADecompressor(format=lzma.FORMAT_AUTO), None),
}


def _lz4() -> Any:
    import lz4.frame  # optional (joblib reads lz4 files only when it is installed)

    return lz4.frame.LZ4FrameDecompressor()


DECOMPRESSORS["lz4"] = (_lz4, lambda r: r if r[:4] == b"\x04\x22\x4d\x18" else None)


def decompress(budget: Budget, pieces: Iterator[bytes], algo: str | Any, sink: Sink) -> str | None:
    """Feed ``pieces`` through the ``algo`` decompressor into ``sink``.

    Concatenated streams are followed as gzip.open / bz2.open / lzma.open follow them. Returns
    None, or why the data stopped decompressing (what came before is in the sink).
    """
    if isinstance(algo, str):
        make, follow = DECOMPRESSORS[algo]
        d = make()
    else:  # a ready decompressor object (zip's raw LZMA)
        d, follow = algo, None
    try:
        for piece in pieces:
            data = piece
            while True:
                budget.check_time()
                out = d.decompress(data, CHUNK)
                sink.write(out)
                if getattr(d, "eof", False):
                    rest = d.unused_data + (
                        d.unconsumed_tail if hasattr(d, "unconsumed_tail") else b""
                    )
                    nxt = follow(rest) if follow and rest else None
                    if nxt is None:
                        return None
                    d, data = (DECOMPRESSORS[algo][0])(), nxt
                    continue
                if hasattr(d, "unconsumed_tail"):  # zlib: more input waiting, or done
                    data = d.unconsumed_tail
                    if not data and len(out) < CHUNK:
                        break
                elif d.needs_input:
                    break
                else:
                    data = b""
        if not getattr(d, "eof", True):
            return "the compressed data ends early (truncated)"
    except (zlib.error, OSError, EOFError, ValueError, lzma.LZMAError) as e:
        return f"does not decompress: {e}"
    return None


def close_all(keep: list[Any]) -> None:
    for obj in reversed(keep):
        with contextlib.suppress(Exception):
            obj.close()
    keep.clear()
