"""A zip reader that sees what torch sees: members through the central directory, no CRC check.

Written by hand because Python's zipfile differs from torch's reader exactly where it matters:
zipfile checks CRCs and local/central name agreement on read, and finds an archive anywhere in a
file, so a file zipfile accepts may load differently in torch (and vice versa). Both the loader and
the scanner use this one reader; the scanner also reports the irregularities it records.
Every declared size and offset is checked against the file before use.
"""

from __future__ import annotations

import contextlib
import encodings.cp437  # noqa: F401 - loaded up front: no imports while reading a file
import io
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import field
from enum import Enum
from typing import Any, BinaryIO

from sdtool.errors import CorruptFile, TruncatedFile
from sdtool.formats.source import is_remote
from sdtool.records import dataclass

EOCD_SIG = b"PK\x05\x06"
EOCD64_SIG = b"PK\x06\x06"
EOCD64_LOC_SIG = b"PK\x06\x07"
CENTRAL_SIG = b"PK\x01\x02"
LOCAL_SIG = b"PK\x03\x04"
STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14
#: the compressed member methods a model loader may meet -> the codec that reads them
METHODS: dict[int, str] = {DEFLATED: "deflate", BZIP2: "bzip2", LZMA: "zip-lzma"}
MAX_MEMBERS = 10_000_000
MAX_COMMENT = 0xFFFF
#: how far from the end zipfile looks for the end record: a 64 KiB comment plus the record
#: (CPython's zipfile._EndRecData: ``filesize - (1 << 16) - sizeEndCentDir``)
EOCD_SEARCH = (1 << 16) + 22


@dataclass
class ZipMember:
    """One central-directory entry, with where its data begins in the file."""

    name: str
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int  # absolute offset of the local header
    local_name: str | None = None
    _offset: int = field(default=-1, repr=False)
    #: reads the local header when ``data_offset`` is first asked for (remote files only)
    _locate: Callable[[ZipMember], None] | None = field(default=None, repr=False, compare=False)

    @property
    def data_offset(self) -> int:
        """Absolute offset of the member's bytes (after the local header)."""
        if self._offset < 0 and self._locate is not None:
            self._locate(self)
        return self._offset

    @data_offset.setter
    def data_offset(self, value: int) -> None:
        self._offset = value

    @property
    def stored(self) -> bool:
        return self.method == STORED


class Irregular(Enum):
    """What the reader noticed that other zip readers may take differently."""

    PREFIX = "prefix"  # bytes before the archive (a polyglot or a self-extractor)
    ENTRY_COUNT = "entry-count"  # the central directory and the end record disagree on the count
    DUPLICATE_NAME = "duplicate-name"  # two entries with one name (the last one is used)
    LOCAL_NAME = "local-name"  # the local header names the member differently
    FLAG_BITS = "flag-bits"  # encrypted / patched-data flag bits


@dataclass(frozen=True)
class ZipIrregularity:
    """One irregularity: its kind, the member it concerns (if any), and a sentence for people."""

    kind: Irregular
    message: str
    member: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass
class ZipArchive:
    """The members of a zip (last one wins for duplicate names, as torch and zipfile do)."""

    members: dict[str, ZipMember]
    entries: list[ZipMember]  # every central-directory entry, duplicates included
    prefix_bytes: int  # bytes before the archive proper (a polyglot or self-extractor)
    file_size: int
    irregularities: list[ZipIrregularity] = field(default_factory=list)

    def __iter__(self) -> Iterator[ZipMember]:
        return iter(self.members.values())


def lzma_header(raw: Any) -> tuple[Any, int]:
    """An LZMA member's filter properties and where its raw LZMA stream starts: the member
    data begins with a 2-byte version, a 2-byte properties size, then the properties."""
    head = bytes(raw[:4])
    psize = int.from_bytes(head[2:4], "little") if len(head) == 4 else 0
    return raw[4 : 4 + psize], 4 + psize


def _u(fmt: str, buf: bytes, off: int) -> tuple[int, ...]:
    return struct.unpack_from(fmt, buf, off)


def has_end_record(buf: Any) -> bool:
    """Whether an end-of-central-directory record lies where zipfile looks for one: in the
    last EOCD_SEARCH bytes of ``buf`` (bytes or a mapping)."""
    return bytes(buf[max(0, len(buf) - EOCD_SEARCH) :]).rfind(EOCD_SIG) >= 0


def read_archive(f: BinaryIO, file_size: int) -> ZipArchive:
    """Parse the central directory of the zip in ``f``. Raises CorruptFile/TruncatedFile."""
    tail_len = min(file_size, 22 + MAX_COMMENT + 20 + 56)
    f.seek(file_size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(EOCD_SIG)
    if pos < 0 or len(tail) - pos < 22:
        raise TruncatedFile(
            "zip end-of-central-directory record not found; the file is truncated or not a zip"
        )
    eocd_abs = file_size - tail_len + pos
    (_, _, _, _, count, cd_size, cd_offset, _) = _u("<4sHHHHIIH", tail, pos)
    eocd_start = eocd_abs
    # zip64: the locator sits 20 bytes before the EOCD
    if pos >= 20 and tail[pos - 20 : pos - 16] == EOCD64_LOC_SIG:
        (_, _, eocd64_off, _) = _u("<4sIQI", tail, pos - 20)
        if eocd64_off + 56 > file_size:
            raise CorruptFile("zip64 end record points past the end of the file")
        f.seek(eocd64_off)
        rec = f.read(56)
        if rec[:4] != EOCD64_SIG:
            # tolerate a prefix: look just before the locator
            guess = eocd_abs - 20 - 56
            f.seek(max(guess, 0))
            rec = f.read(56)
            if rec[:4] != EOCD64_SIG:
                raise CorruptFile("zip64 end record is missing")
            eocd64_off = guess
        (_, _, _, _, _, _, _, count, cd_size, cd_offset) = _u("<4sQHHIIQQQQ", rec, 0)
        eocd_start = eocd64_off
    if count > MAX_MEMBERS:
        raise CorruptFile(f"zip declares {count} members, more than sdtool accepts")
    # bytes before the archive: where the central directory really is vs where it says it is
    prefix = eocd_start - cd_size - cd_offset
    if prefix < 0 or cd_size > file_size:
        raise CorruptFile("zip central directory lies outside the file")
    f.seek(cd_offset + prefix)
    cd = f.read(cd_size)
    if len(cd) < cd_size:
        raise TruncatedFile("zip central directory is cut short")
    entries: list[ZipMember] = []
    irregular: list[ZipIrregularity] = []
    if prefix:
        irregular.append(
            ZipIrregularity(Irregular.PREFIX, f"{prefix} bytes before the zip archive")
        )
    off = 0
    while off + 46 <= len(cd) and cd[off : off + 4] == CENTRAL_SIG:
        (_, _, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen, _, _, _, hoff) = (
            _CENTRAL(cd, off)
        )
        name_b = cd[off + 46 : off + 46 + nlen]
        if xlen:
            extra = cd[off + 46 + nlen : off + 46 + nlen + xlen]
            usize, csize, hoff = _zip64_fields(extra, usize, csize, hoff)
        entries.append(
            ZipMember(_name(name_b, flags), method, flags, crc, csize, usize, hoff + prefix)
        )
        off += 46 + nlen + xlen + clen
        if len(entries) > count:
            break
    if len(entries) != count:
        irregular.append(
            ZipIrregularity(
                Irregular.ENTRY_COUNT,
                f"central directory lists {len(entries)} entries, end record says {count}",
            )
        )
    members: dict[str, ZipMember] = {}
    pread = positional_reader(f)
    remote = is_remote(f)
    for m in entries:
        if m.name in members:
            irregular.append(
                ZipIrregularity(
                    Irregular.DUPLICATE_NAME,
                    f"duplicate member name {m.name!r} (the last one is used)",
                    m.name,
                )
            )
        members[m.name] = m
        if remote:
            _defer(pread, m, file_size, irregular)
        else:
            _locate_data(pread, m, file_size)
            irregular.extend(_local_name(m))
        if m.flags & 0x61:
            irregular.append(
                ZipIrregularity(
                    Irregular.FLAG_BITS,
                    f"member {m.name!r} has flag bits {m.flags:#x} (encrypted/patched)",
                    m.name,
                )
            )
    return ZipArchive(members, entries, prefix, file_size, irregular)


_LOCAL_LENGTHS = struct.Struct("<HH").unpack_from
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII").unpack_from


def _name(raw: bytes, flags: int) -> str:
    """A member name: UTF-8 when flagged so; otherwise UTF-8 if it decodes, else cp437."""
    if flags & 0x800:
        return raw.decode("utf-8", errors="replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp437", errors="replace")


def _zip64_fields(extra: bytes, usize: int, csize: int, hoff: int) -> tuple[int, int, int]:
    i = 0
    while i + 4 <= len(extra):
        tag, ln = struct.unpack_from("<HH", extra, i)
        body = extra[i + 4 : i + 4 + ln]
        if tag == 1:
            vals = [v[0] for v in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if hoff == 0xFFFFFFFF and vals:
                hoff = vals.pop(0)
        i += 4 + ln
    return usize, csize, hoff


def positional_reader(f: BinaryIO) -> Callable[[int, int], bytes]:
    """read(offset, n) that does not disturb the page cache more than it must.

    Local headers are spread over the whole file (one per tensor); buffered seeks and reads make
    the kernel read ahead at each, pulling ~1 GB of a 7.7 GB checkpoint into memory. Unbuffered
    preads with read-ahead off touch one page per header.
    """
    try:
        fd = f.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd = -1
    if fd < 0:

        def read(offset: int, n: int) -> bytes:
            f.seek(offset)
            return f.read(n)

        return read
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return lambda offset, n: os.pread(fd, n, offset)


def _defer(
    pread: Callable[[int, int], bytes],
    m: ZipMember,
    file_size: int,
    irregular: list[ZipIrregularity],
) -> None:
    """Remote bytes: a local header costs a request, and a checkpoint has one per tensor, so
    each is read when its member's data is first asked for (the pickles, not the storages).
    What can be checked without it is checked now."""
    if m.header_offset + 30 + m.compressed_size > file_size:
        raise TruncatedFile(
            f"zip member {m.name!r} needs bytes up to {m.header_offset + 30 + m.compressed_size}"
            f" but the file has {file_size}; the download is truncated"
        )

    def locate(m: ZipMember) -> None:
        m._locate = None
        _locate_data(pread, m, file_size)
        irregular.extend(_local_name(m))

    m._locate = locate


def _local_name(m: ZipMember) -> list[ZipIrregularity]:
    """The local header names the member differently from the central directory."""
    if m.local_name is None or m.local_name == m.name:
        return []
    text = f"member {m.name!r} is named {m.local_name!r} in its local header"
    return [ZipIrregularity(Irregular.LOCAL_NAME, text, m.name)]


def _locate_data(pread: Callable[[int, int], bytes], m: ZipMember, file_size: int) -> None:
    if m.header_offset + 30 > file_size:
        raise TruncatedFile(f"zip member {m.name!r} starts past the end of the file")
    hdr = pread(m.header_offset, 30 + 256)
    if hdr[:4] != LOCAL_SIG:
        raise CorruptFile(f"zip member {m.name!r} has no local header where the directory says")
    nlen, xlen = _LOCAL_LENGTHS(hdr, 26)
    raw_name = hdr[30 : 30 + nlen] if nlen <= 256 else pread(m.header_offset + 30, nlen)
    m.local_name = raw_name.decode("utf-8", errors="replace")
    m._offset = start = m.header_offset + 30 + nlen + xlen
    if start + m.compressed_size > file_size:
        raise TruncatedFile(
            f"zip member {m.name!r} needs bytes up to {start + m.compressed_size} but "
            f"the file has {file_size}; the download is truncated"
        )


def read_member(f: BinaryIO, m: ZipMember, limit: int | None = None) -> bytes:
    """The member's bytes, inflated if deflated (no CRC check, as torch). ``limit`` caps size."""
    if limit is not None and m.size > limit:
        raise CorruptFile(f"zip member {m.name!r} declares {m.size} bytes, over the limit {limit}")
    f.seek(m.data_offset)
    raw = f.read(m.compressed_size)
    if m.method == STORED:
        return raw
    if m.method == DEFLATED:
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(raw, m.size if m.size else 0)
        except zlib.error as e:
            raise CorruptFile(f"zip member {m.name!r} does not inflate: {e}") from None
        return out
    raise CorruptFile(f"zip member {m.name!r} uses compression method {m.method}, not supported")


#: names that live in ``zip_readings.py`` (the scanner's lenient readings), still named here
_READINGS = frozenset({"EndRecord", "LocalHeader", "local_headers", "read_archives"})


def __getattr__(name: str) -> Any:
    if name in _READINGS:
        from sdtool.formats import zip_readings

        return getattr(zip_readings, name)
    raise AttributeError(f"module 'sdtool.formats.zip' has no attribute {name!r}")
