"""Read buffers placed where the kernel copies into them fastest.

Why: ``pread`` copies page-cache pages into the caller's buffer with ``rep movsb``, which runs
about 3.5x slower when the destination lies a few bytes (up to ~31) after the source within a
4 KiB page (4K aliasing: each load seems to depend on a store just made). Measured on this
machine's AMD EPYC, ``preadv`` of a cached 2 GB file in 1 MiB reads: 0.28-0.30 s of system time
when buffer and file offset agree modulo 4096, 0.97-1.03 s when the buffer is 16 bytes ahead.
And 16 bytes ahead is where a large ``bytearray`` or ``np.empty`` starts (glibc serves them
from mmap'd chunks behind a 16-byte header) for a read at a page-aligned file offset. So every
buffer that ``pread`` fills with more than a few pages is a ``PageBuffer``: each read is placed
at the same offset within a page as the bytes it reads.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

PAGE = mmap.PAGESIZE

#: below this a buffer is not placed: the copy is short, and finding the address costs an
#: import of ctypes
SMALL = 16 * PAGE


class PageBuffer:
    """A reusable read buffer of ``size`` bytes (plus a spare page to place reads in).

    ``at(file_offset, n)`` gives ``n`` bytes of it whose address agrees with ``file_offset``
    modulo the page size. ``raw`` and the offset it returns allow a memcmp of two placed reads
    (``raw.startswith(other_view, offset)``).
    """

    __slots__ = ("base", "raw", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        if size < SMALL:
            self.raw, self.base = bytearray(size), -1
            return
        import ctypes

        self.raw = bytearray(size + PAGE)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.raw))

    @property
    def address(self) -> int:
        """Where ``raw[0]`` lies in memory (for a memcmp through ctypes): the export that finds
        it ends at once, so ``raw`` stays free to be read into."""
        if self.base >= 0:
            return self.base
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self.raw))

    def offset(self, file_offset: int) -> int:
        """Where in ``raw`` a read of the bytes at ``file_offset`` goes."""
        return 0 if self.base < 0 else (file_offset - self.base) % PAGE

    def at(self, file_offset: int, n: int) -> tuple[int, memoryview]:
        """The offset in ``raw`` and a view of ``n`` bytes there, for a read at ``file_offset``."""
        if n > self.size:
            raise ValueError(f"a read of {n} bytes into a buffer of {self.size}")
        offset = self.offset(file_offset)
        return offset, memoryview(self.raw)[offset : offset + n]

    def array(self, file_offset: int, n: int) -> np.ndarray:
        """``at``'s bytes as a writable uint8 array."""
        import numpy as np

        offset, _ = self.at(file_offset, n)
        return np.frombuffer(self.raw, np.uint8, n, offset)
