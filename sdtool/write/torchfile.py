"""Writing .ckpt/.pt/.pth/.bin: torch's zip layout, emitted here, streamed, without torch.

The file is what ``torch.save`` (2.13) writes for a dict: a stored (uncompressed) zip whose
members are ``archive/data.pkl`` (a protocol-2 pickle of the dict, tensors as
``torch._utils._rebuild_tensor_v2``/``_v3`` calls on persistent storage ids), the records
``.format_version`` ("1"), ``.storage_alignment`` ("64"), ``byteorder`` ("little"), one
``data/N`` member per tensor (its bytes, little-endian, aligned to 64 bytes by an ``FB``
padding field as torch does), ``version`` ("3\\n") and ``.data/serialization_id``; local
headers without sizes followed by data descriptors, zip64 records where sizes or offsets need
them, and a zip64 end record, as torch's miniz writer does. ``torch.load(weights_only=True)``
reads it.

Each tensor goes through ``stream.Chunks`` (pread or a map, cast in bounded pieces), its CRC-32
computed on the way, so memory stays about a few pieces whatever the model's size. The output
is deterministic: zero timestamps, and a serialization id derived from the pickle.

The dict holds the tensors under their names, then the non-tensor ``fields`` (global_step,
epoch ...) as plain data, then the metadata map under ``METADATA_KEY`` (``__metadata__``, the
safetensors name), which sdtool's reader turns back into ``ModelFile.metadata``.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from sdtool.crc import crc32
from sdtool.errors import CorruptFile, OutputError
from sdtool.formats.torchfile import METADATA_KEY
from sdtool.write.direct import MIN_BYTES, DirectWriter, for_file
from sdtool.write.plan import OutTensor
from sdtool.write.stream import (
    BufferRing,
    Chunks,
    SourceFds,
    cast_pool,
    copy_with_crc,
    made,
    prefetch,
    write_all,
)

PREFETCH = 4  # steps queued ahead of the one being written (2 pieces being made, 2 made)
#: outputs whose tensors hold at least this many bytes are written with O_DIRECT (direct.py)
DIRECT_MIN_BYTES = MIN_BYTES

ARCHIVE = "archive"
ALIGNMENT = 64
#: sizes and offsets at or above this need zip64 fields (a test lowers it)
ZIP64_LIMIT = 0xFFFFFFFF
#: dtypes torch.save pickles with their legacy storage class (``torch.FloatStorage`` ...) and
#: ``_rebuild_tensor_v2``; every other dtype (float8, uint16/32/64 ...) goes as an
#: ``UntypedStorage`` of bytes and ``_rebuild_tensor_v3`` with the dtype, as torch 2.13 writes
LEGACY_STORAGE = frozenset(
    {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64", "C128"}
)
_FLAGS = 0x0808  # bit 3: sizes in a data descriptor; bit 11: UTF-8 names
_RECORDS_BEFORE = (
    (".format_version", b"1"),
    (".storage_alignment", b"64"),
    ("byteorder", b"little"),
)


@dataclass(frozen=True)
class _Entry:
    name: str
    offset: int  # of the local header
    crc: int
    size: int


class _Zip:
    """A stored zip written front to back into a file descriptor, torch's way."""

    def __init__(self, fd: int, direct: DirectWriter | None = None) -> None:
        self.fd = fd
        self.direct = direct
        self.pos = 0
        self.entries: list[_Entry] = []

    def put(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (through the O_DIRECT writer when there is one)."""
        if self.direct is None:
            write_all(self.fd, data)
        else:
            self.direct.write(data)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self.put(data)
        self.pos += len(memoryview(data).cast("B"))

    def begin(self, name: str) -> int:
        """Write a local header whose data starts on a 64-byte boundary; return its offset."""
        raw = name.encode("utf-8")
        start = self.pos
        pad = -(start + 30 + len(raw) + 4) % ALIGNMENT
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        self._write(
            struct.pack(
                "<4s5H3L2H", b"PK\x03\x04", 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(raw), len(extra)
            )
            + raw
            + extra
        )
        return start

    def end(self, name: str, start: int, crc: int, size: int) -> None:
        """The data descriptor after a member's bytes (8-byte sizes when zip64 needs them)."""
        if size >= ZIP64_LIMIT:
            self._write(struct.pack("<4sLQQ", b"PK\x07\x08", crc, size, size))
        else:
            self._write(struct.pack("<4s3L", b"PK\x07\x08", crc, size, size))
        self.entries.append(_Entry(name, start, crc, size))

    def member(self, name: str, data: bytes) -> None:
        start = self.begin(name)
        self._write(data)
        self.end(name, start, crc32(data), len(data))

    def finish(self) -> None:
        """The central directory, the zip64 end record and locator, the end record."""
        cd_start = self.pos
        for e in self.entries:
            raw = e.name.encode("utf-8")
            z64 = b""
            size32 = offset32 = e.size
            if e.size >= ZIP64_LIMIT:
                z64 += struct.pack("<QQ", e.size, e.size)
                size32 = 0xFFFFFFFF
            offset32 = e.offset
            if e.offset >= ZIP64_LIMIT:
                z64 += struct.pack("<Q", e.offset)
                offset32 = 0xFFFFFFFF
            extra = struct.pack("<HH", 1, len(z64)) + z64 if z64 else b""
            self._write(
                struct.pack(
                    "<4s6H3L5H2L",
                    b"PK\x01\x02",
                    0,  # made by
                    0,  # needed
                    _FLAGS,
                    0,  # stored
                    0,  # time
                    0,  # date
                    e.crc,
                    size32,
                    size32,
                    len(raw),
                    len(extra),
                    0,  # comment
                    0,  # disk
                    0,  # internal attributes
                    0,  # external attributes
                    offset32,
                )
                + raw
                + extra
            )
        cd_size = self.pos - cd_start
        eocd64 = self.pos
        n = len(self.entries)
        self._write(
            struct.pack(
                "<4sQ2H2L4Q", b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, n, n, cd_size, cd_start
            )
        )
        self._write(struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd64, 1))
        self._write(
            struct.pack(
                "<4s4H2LH",
                b"PK\x05\x06",
                0,
                0,
                min(n, 0xFFFF),
                min(n, 0xFFFF),
                min(cd_size, 0xFFFFFFFF),
                min(cd_start, 0xFFFFFFFF),
                0,
            )
        )


# -- the pickle -----------------------------------------------------------------------------------


class _Pickle:
    """A protocol-2 pickle of plain data and tensors, opcode by opcode (no memo needed)."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")

    def glob(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def value(self, v: Any, depth: int = 0) -> None:
        if depth > 100:
            raise OutputError("a field nests deeper than 100 levels; it cannot be written")
        o = self.out
        if v is None:
            o += b"N"
        elif v is True or v is False:
            o += b"\x88" if v else b"\x89"
        elif isinstance(v, int):
            self.integer(v)
        elif isinstance(v, float):
            o += b"G" + struct.pack(">d", v)
        elif isinstance(v, str):
            raw = v.encode("utf-8", "surrogatepass")
            o += b"X" + struct.pack("<L", len(raw)) + raw
        elif isinstance(v, dict):
            o += b"}"
            if v:
                o += b"("
                for k, item in v.items():
                    self.value(k, depth + 1)
                    self.value(item, depth + 1)
                o += b"u"
        elif isinstance(v, list):
            o += b"]"
            if v:
                o += b"("
                for item in v:
                    self.value(item, depth + 1)
                o += b"e"
        elif isinstance(v, tuple):
            self.tuple(v, depth)
        else:
            raise OutputError(f"cannot write a {type(v).__name__} into a .ckpt field")

    def integer(self, v: int) -> None:
        if 0 <= v < 0x100:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 0x10000:
            self.out += b"M" + struct.pack("<H", v)
        elif -0x80000000 <= v < 0x80000000:
            self.out += b"J" + struct.pack("<i", v)
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw

    def tuple(self, items: Sequence[Any], depth: int = 0) -> None:
        if len(items) <= 3:
            for item in items:
                self.value(item, depth + 1)
            self.out += (b")", b"\x85", b"\x86", b"\x87")[len(items)]
        else:
            self.out += b"("
            for item in items:
                self.value(item, depth + 1)
            self.out += b"t"

    def tensor(self, t: OutTensor, key: str) -> None:
        """``_rebuild_tensor_v2(storage, 0, shape, strides, False, OrderedDict())``, or ``_v3``
        with an untyped storage and the dtype for dtypes without a legacy storage class."""
        dt = t.dtype
        numel = 1
        for d in t.shape:
            numel *= d
        strides = []
        acc = 1
        for d in reversed(t.shape):
            strides.append(acc)
            acc *= d
        v3 = dt.code not in LEGACY_STORAGE or dt.storage is None
        o = self.out
        self.glob("torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2")
        o += b"(("
        self.value("storage")
        if v3:
            self.glob("torch.storage", "UntypedStorage")
        else:
            self.glob("torch", str(dt.storage))
        self.value(key)
        self.value("cpu")
        self.integer(numel * dt.itemsize if v3 else numel)
        o += b"tQ"
        self.integer(0)
        self.tuple(t.shape)
        self.tuple(tuple(reversed(strides)))
        o += b"\x89"
        self.glob("collections", "OrderedDict")
        o += b")R"
        if v3:
            self.glob("torch", str(dt.torch))
        o += b"tR"


def write_torch(
    plan: Sequence[OutTensor],
    f: BinaryIO,
    *,
    metadata: dict[str, str] | None = None,
    fields: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write ``plan`` (then ``fields``, then ``metadata`` under METADATA_KEY) as a torch zip
    into the empty file ``f``; return overflow counts by tensor name. ``progress`` receives
    byte counts as tensor bytes are written."""
    names = {t.name for t in plan}
    if metadata:  # the metadata map owns its key
        fields = {k: v for k, v in (fields or {}).items() if k != METADATA_KEY}
    clash = sorted(names & set(fields or {}) | (names & {METADATA_KEY}))
    if clash:
        raise OutputError(f"a field and a tensor are both named {clash[0]!r}")
    pkl = _Pickle()
    pkl.out += b"}"
    if plan or fields or metadata:
        pkl.out += b"("
        for i, t in enumerate(plan):
            pkl.value(t.name)
            pkl.tensor(t, str(i))
        for k, v in (fields or {}).items():
            pkl.value(str(k))
            pkl.value(v)
        if metadata:
            pkl.value(METADATA_KEY)
            pkl.value({str(k): str(v) for k, v in metadata.items()})
        pkl.out += b"u"
    pkl.out += b"."
    data_pkl = bytes(pkl.out)
    # a large output skips the page cache: no copy into it and no flusher threads on the
    # cores the casts and the CRC need
    direct = for_file(f, sum(t.nbytes for t in plan), DIRECT_MIN_BYTES)
    with direct or contextlib.nullcontext():
        return _write_members(_Zip(f.fileno(), direct), plan, data_pkl, progress)


def _write_members(
    z: _Zip,
    plan: Sequence[OutTensor],
    data_pkl: bytes,
    progress: Callable[[int], None] | None,
) -> dict[str, int]:
    """Every member, then the central directory; overflow counts by tensor name."""
    z.member(f"{ARCHIVE}/data.pkl", data_pkl)
    for name, value in _RECORDS_BEFORE:
        z.member(f"{ARCHIVE}/{name}", value)
    overflows: dict[str, int] = {}
    start, crc, size = 0, 0, 0
    with SourceFds() as fds, cast_pool() as pool:
        for kind, i, t, item in prefetch(_steps(plan, fds, pool), depth=PREFETCH):
            name = f"{ARCHIVE}/data/{i}"
            if kind == "copy":  # bytes as they are: one tight read-checksum-write loop
                span = t.copy_span
                assert span is not None
                start = z.begin(name)
                crc = copy_with_crc(fds.get(t), z.fd, span[0], span[1], t, progress, z.put)
                z.pos += span[1]
                z.end(name, start, crc, span[1])
            elif kind == "begin":
                start, crc, size = z.begin(name), 0, 0
            elif kind == "piece":  # made on the pool's threads, checksummed and written here
                view = _bytes_of(item.result())
                z.put(view)
                crc = crc32(view, crc)
                n = len(view)
                z.pos += n
                size += n
                if progress is not None:
                    progress(n)
            else:  # "done"
                if size != t.nbytes:
                    raise CorruptFile(
                        f"tensor {t.name!r} gave {size} bytes, expected {t.nbytes}",
                        path=t.source.path,
                    )
                if item.overflow:
                    overflows[t.name] = item.overflow
                z.end(name, start, crc, size)
    z.member(f"{ARCHIVE}/version", b"3\n")
    digest = int.from_bytes(hashlib.sha256(data_pkl).digest()[:16], "big")
    z.member(f"{ARCHIVE}/.data/serialization_id", f"{digest:040d}"[:40].encode())
    z.finish()
    return overflows


def _steps(
    plan: Sequence[OutTensor], fds: SourceFds, pool: tuple[ThreadPoolExecutor, threading.Semaphore]
) -> Iterator[tuple[str, int, OutTensor, Any]]:
    """What to do, tensor by tensor, in member order: ("copy", i, t, None) for bytes that go as
    they are, else ("begin", ...), ("piece", i, t, future piece) per piece, ("done", i, t,
    chunks). Runs in the prefetch thread, handing each piece to the pool as it goes, across
    tensor boundaries: ``CAST_THREADS`` pieces are made at once while the caller checksums
    and writes earlier ones."""
    # a ring slot is reused ``slots`` pieces later: in flight at most are the queue's depth,
    # the step the prefetch thread holds, the piece being made for it, and the one written
    ring = BufferRing(slots=PREFETCH + 3)
    for i, t in enumerate(plan):
        span = t.copy_span
        if span is not None:
            t.source.check_end(t.name, span[0] + span[1])
            yield "copy", i, t, None
            continue
        yield "begin", i, t, None
        chunks = Chunks(t, fds.get(t) if t.make is None else None, ring)
        for job in chunks.jobs():
            yield "piece", i, t, pool[0].submit(made, job, pool[1])
        yield "done", i, t, chunks


def _bytes_of(piece: Any) -> memoryview:
    """A piece's bytes for the CRC (ml_dtypes arrays export no buffer format of their own)."""
    import numpy as np

    return np.ascontiguousarray(piece).reshape(-1).view(np.uint8).data
