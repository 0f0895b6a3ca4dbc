"""The other ways a loader may read a zip: every end record and zip64 record it may take
(``read_archives``) and the local headers walked from the start (``local_headers``). Only the
scanner asks for them, so ``inspect`` neither loads this module nor creates its two dataclasses
(~7M instructions); ``formats/zip.py`` still names them."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

from sdtool.errors import CorruptFile, TruncatedFile
from sdtool.formats.source import is_remote
from sdtool.formats.zip import (
    CENTRAL_SIG,
    EOCD64_LOC_SIG,
    EOCD64_SIG,
    EOCD_SIG,
    LOCAL_SIG,
    MAX_COMMENT,
    MAX_MEMBERS,
    ZipArchive,
    ZipMember,
    _defer,
    _locate_data,
    _u,
    _zip64_fields,
    positional_reader,
    read_archive,
)
from sdtool.records import dataclass


@dataclass(frozen=True)
class LocalHeader:
    """A local file header met walking a zip from its start (``local_headers``)."""

    name: str
    flags: int
    method: int
    data_start: int  # where the member's (compressed) data starts
    csize: int


def local_headers(
    pread: Callable[[int, int], bytes], size: int, *, max_count: int = 100_000
) -> Iterator[LocalHeader]:
    """The local headers from offset 0, back to back: what a lenient reader sees when the
    central directory is unreadable. Stops at the first bytes that are no local header, at a
    member whose sizes follow its data (flag 0x8) and at data running past ``size``."""
    pos = count = 0
    while pos + 30 <= size and count < max_count:
        hdr = pread(pos, 30)
        if hdr[:4] != LOCAL_SIG:
            return
        (_, _, flags, method, _, _, _, csize, _usize, nlen, xlen) = struct.unpack_from(
            "<4sHHHHHIIIHH", hdr
        )
        name = pread(pos + 30, nlen).decode("utf-8", "replace")
        start = pos + 30 + nlen + xlen
        if flags & 0x8 or start + csize > size:
            return
        yield LocalHeader(name, flags, method, start, csize)
        pos = start + csize
        count += 1


# -- every reading a loader may take ---------------------------------------------------------------


@dataclass(frozen=True)
class EndRecord:
    """One way to read a zip's end records: which EOCD, which zip64 record, whether offsets
    are shifted by the bytes before the archive."""

    eocd: int  # offset of the end-of-central-directory record used
    zip64: str  # "none", "before-locator" (zipfile, newer miniz) or "locator-offset" (miniz)
    shifted: bool  # member offsets shifted by the prefix (zipfile, newer miniz) or absolute

    def describe(self) -> str:
        z = {"none": "", "before-locator": ", the zip64 record before its locator",
             "locator-offset": ", the zip64 record the locator points to"}[self.zip64]  # fmt: skip
        how = "shifted by the bytes before the zip" if self.shifted else "as written"
        return f"the end record at {self.eocd}{z}, offsets {how}"


def read_archives(
    f: BinaryIO, file_size: int, max_records: int = 8
) -> list[tuple[EndRecord, ZipArchive]]:
    """Every distinct reading of the zip in ``f`` that some loader may take, the one
    ``read_archive`` takes (torch's) first.

    Readers differ: Python's zipfile (numpy.load, joblib, most tools) uses the last end record,
    the zip64 record right before the locator, and shifts member offsets by the bytes before the
    archive; torch's miniz reads the zip64 record at the locator's offset (older versions) and
    may take offsets as written; both skip an end record inside the comment only if it is cut
    short. Each combination that yields a readable central directory is returned once (two
    readings with the same members count as one).
    """
    tail_len = min(file_size, 22 + MAX_COMMENT + 20 + 56)
    f.seek(file_size - tail_len)
    tail = f.read(tail_len)
    base = file_size - tail_len
    out: list[tuple[EndRecord, ZipArchive]] = []
    seen: set[tuple[tuple[str, int, int], ...]] = set()
    with contextlib.suppress(CorruptFile, TruncatedFile):
        first = read_archive(f, file_size)
        seen.add(_signature(first))
        out.append((EndRecord(-1, "torch", True), first))
    positions: list[int] = []
    end = len(tail) - 22 + 4  # a record needs 22 bytes
    while len(positions) < max_records and (pos := tail.rfind(EOCD_SIG, 0, end)) >= 0:
        positions.append(pos)
        end = pos + 3
    for pos in positions:
        for rec in _records(tail, pos, base):
            try:
                arch = _read_with(f, file_size, tail, pos, rec)
            except (CorruptFile, TruncatedFile, struct.error):
                continue
            sig = _signature(arch)
            if sig not in seen and arch.entries:
                seen.add(sig)
                out.append((rec, arch))
    return out


def _signature(arch: ZipArchive) -> tuple[tuple[str, int, int], ...]:
    # the local header's offset decides where the data lies: comparing it needs no read
    return tuple((m.name, m.header_offset, m.compressed_size) for m in arch.entries)


def _records(tail: bytes, pos: int, base: int) -> list[EndRecord]:
    eocd = base + pos
    if pos >= 20 and tail[pos - 20 : pos - 16] == EOCD64_LOC_SIG:
        kinds = ["before-locator", "locator-offset", "none"]
    else:
        kinds = ["none"]
    return [EndRecord(eocd, k, s) for k in kinds for s in (True, False)]


def _read_with(f: BinaryIO, file_size: int, tail: bytes, pos: int, rec: EndRecord) -> ZipArchive:
    (_, _, _, _, count, cd_size, cd_offset, _) = _u("<4sHHHHIIH", tail, pos)
    start = rec.eocd
    if rec.zip64 != "none":
        (_, _, loc_off, _) = _u("<4sIQI", tail, pos - 20)
        at = rec.eocd - 20 - 56 if rec.zip64 == "before-locator" else loc_off
        if at < 0 or at + 56 > file_size:
            raise CorruptFile("zip64 end record outside the file")
        f.seek(at)
        z = f.read(56)
        if z[:4] != EOCD64_SIG:
            raise CorruptFile("no zip64 end record there")
        (_, _, _, _, _, _, _, count, cd_size, cd_offset) = _u("<4sQHHIIQQQQ", z, 0)
        start = rec.eocd - 20 - 56
    if count > MAX_MEMBERS or cd_size > file_size:
        raise CorruptFile("zip central directory is implausible")
    prefix = start - cd_size - cd_offset if rec.shifted else 0
    if prefix < 0 or cd_offset + prefix + cd_size > file_size:
        raise CorruptFile("zip central directory lies outside the file")
    f.seek(cd_offset + prefix)
    cd = f.read(cd_size)
    entries: list[ZipMember] = []
    off = 0
    while off + 46 <= len(cd) and cd[off : off + 4] == CENTRAL_SIG and len(entries) < MAX_MEMBERS:
        (_, _, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen, _, _, _, hoff) = _u(
            "<4sHHHHHHIIIHHHHHII", cd, off
        )
        name_b = cd[off + 46 : off + 46 + nlen]
        usize, csize, hoff = _zip64_fields(
            cd[off + 46 + nlen : off + 46 + nlen + xlen], usize, csize, hoff
        )
        name = name_b.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
        entries.append(ZipMember(name, method, flags, crc, csize, usize, hoff + prefix))
        off += 46 + nlen + xlen + clen
    pread = positional_reader(f)
    members: dict[str, ZipMember] = {}
    located: list[ZipMember] = []
    for m in entries:
        with contextlib.suppress(CorruptFile, TruncatedFile):
            if is_remote(f):
                _defer(pread, m, file_size, [])
            else:
                _locate_data(pread, m, file_size)
            located.append(m)
            members[m.name] = m
    return ZipArchive(members, located, prefix, file_size)
