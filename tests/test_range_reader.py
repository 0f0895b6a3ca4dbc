"""formats.source.RangeReader: the block cache every remote read goes through (no HTTP here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtool.formats.source import RangeReader


class Bytes(RangeReader):
    """A RangeReader over bytes in memory that records each fetch."""

    def __init__(self, data: bytes, **kw: int) -> None:
        super().__init__(Path("mem"), len(data), **kw)
        self.data = data
        self.calls: list[tuple[int, int]] = []

    def _fetch(self, offset: int, n: int) -> bytes:
        assert offset >= 0 and offset + n <= self.size
        self.calls.append((offset, n))
        return self.data[offset : offset + n]


DATA = (bytes(range(256)) * 40)[:10_000]  # holds no b"NEEDLE"


def test_reads_are_exact_and_cached_by_block() -> None:
    r = Bytes(DATA, block=1000)
    assert r.pread(1500, 1000) == DATA[1500:2500]
    assert r.calls == [(1000, 2000)]  # the two blocks it touches, in one request
    assert r.pread(1000, 2000) == DATA[1000:3000] and len(r.calls) == 1
    assert r.pread(500, 3000) == DATA[500:3500]
    assert r.calls[1:] == [(0, 1000), (3000, 1000)]  # each missing run once
    assert r.pread(9990, 100) == DATA[9990:] and r.pread(10_000, 5) == b""
    assert r[9999] == DATA[9999] and r[-1] == DATA[-1] and r[2:7] == DATA[2:7]
    assert r.requests == len(r.calls) and r.fetched == sum(n for _, n in r.calls)
    with pytest.raises(IndexError):
        r[10_000]


def test_seeded_bytes_cost_nothing() -> None:
    r = Bytes(DATA, block=1000)
    r.seed(0, DATA[:2500])  # whole blocks only: 0-1999
    assert r.pread(0, 2000) == DATA[:2000] and r.calls == []
    assert r.cached_run(0, 5000) == 2000 and r.cached_run(2000, 10) == 0
    tail = Bytes(DATA, block=1000)
    tail.seed(0, DATA)  # the last, short block too
    assert tail.pread(9500, 600) == DATA[9500:] and tail.calls == []


def test_the_cache_is_bounded_and_big_reads_bypass_it() -> None:
    r = Bytes(DATA, block=1000, cache=3000)
    for off in range(0, 10_000, 1000):
        assert r.pread(off, 10) == DATA[off : off + 10]
    assert len(r._blocks) * r.block <= 3000
    r.calls.clear()
    assert r.pread(0, 9000) == DATA[:9000]
    assert r.calls == [(0, 9000)] and len(r._blocks) <= 3


def test_find_and_the_file_view() -> None:
    r = Bytes(DATA + b"NEEDLE" + DATA, block=512)
    assert r.find(b"NEEDLE") == len(DATA)  # across the 1 MiB search chunks' edges too
    assert r.find(b"NEEDLE", len(DATA) + 1) == -1
    f = r.open()
    f.seek(len(DATA))
    assert f.read(6) == b"NEEDLE" and f.tell() == len(DATA) + 6
    f.seek(-3, 2)
    assert f.read() == DATA[-3:]
    f.seek(0)
    assert f.read() == DATA + b"NEEDLE" + DATA  # a long read streams past the cache
