"""PageBuffer places each read at its source's offset within a page (sdtool.aligned says why)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from sdtool.aligned import PAGE, SMALL, PageBuffer


def address(view: memoryview) -> int:
    return np.frombuffer(view, np.uint8).__array_interface__["data"][0]


@pytest.mark.parametrize("file_offset", [0, 1, 13, 16, PAGE - 1, PAGE, 5 * PAGE + 61, 2**33 + 7])
def test_reads_land_at_their_offset_within_a_page(file_offset: int) -> None:
    buf = PageBuffer(1 << 20)
    offset, view = buf.at(file_offset, 1 << 20)
    assert address(view) % PAGE == file_offset % PAGE
    assert offset + len(view) <= len(buf.raw)
    # raw[offset:] is the view: a memcmp against raw at offset compares the read bytes
    view[:4] = b"abcd"
    assert buf.raw.startswith(b"abcd", offset)
    arr = buf.array(file_offset, 4096)
    assert arr.__array_interface__["data"][0] == address(view)
    assert arr.flags.writeable


def test_small_buffers_are_plain() -> None:
    buf = PageBuffer(SMALL - 1)
    assert len(buf.raw) == SMALL - 1
    assert buf.at(12345, 10)[0] == 0


def test_a_read_larger_than_the_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="a read of"):
        PageBuffer(1 << 20).at(0, (1 << 20) + 1)


def test_the_base_address_is_the_bytearrays() -> None:
    buf = PageBuffer(1 << 20)
    assert buf.base == ctypes.addressof(ctypes.c_char.from_buffer(buf.raw))
