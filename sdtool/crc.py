"""CRC-32 (zlib's polynomial, as zip members and Civitai's CRC32 use it) at memory speed.

CPython's zlib (1.2.x here) computes CRC-32 a word at a time, about 1 GB/s; ISA-L's folded
CRC (python-isal, a declared dependency) runs at several GB/s with the same results. A platform
without an isal wheel falls back to zlib's. Both release the GIL on large buffers.
"""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal ships wheels for the common platforms
    from zlib import crc32

__all__ = ["crc32"]
