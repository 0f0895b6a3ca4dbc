"""numpy ``.npy`` and ``.npz`` files, read without np.load (no pickle can ever run).

The ``.npy`` header is parsed by hand: magic, version (1.0 with a u16 header length; 2.0/3.0 with
u32), then a Python-literal dict (``descr``, ``fortran_order``, ``shape``) evaluated with
``ast.literal_eval`` on a size-capped string. Raw data follows the header; its bytes become a
Storage at their file offset, so convert can copy them without Python touching them. Object
arrays (``descr '|O'``) hold a pickle, not numbers: they are refused with a pointer to
``sdtool scan``.

A ``.npy`` file yields one tensor named ``array``. A ``.npz`` (a zip of ``.npy`` members, as
np.savez/np.savez_compressed write it) yields one tensor per member, named after the member
without ``.npy`` (``np.savez(f, w=...)`` -> tensor ``w``).
"""

from __future__ import annotations

import ast
import contextlib
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

from sdtool import dtypes
from sdtool.dtypes import DType
from sdtool.errors import CorruptFile, TruncatedFile, UnsupportedDtype
from sdtool.formats.zip import (
    DEFLATED,
    STORED,
    ZipArchive,
    ZipIrregularity,
    ZipMember,
    read_member,
)
from sdtool.model import ContainerFacts, ModelFile, Storage, TensorInfo, contiguous_strides
from sdtool.vocab import Format

MAGIC = b"\x93NUMPY"
#: numpy itself refuses to literal_eval headers over 10,000 bytes by default; real headers for
#: plain dtypes are well under 1 KiB. Anything larger is refused before it is decoded.
MAX_HEADER = 65_536
#: the tensor name a .npy file's single array gets
NPY_TENSOR = "array"

#: (kind letter, itemsize) of a numpy ``descr`` -> safetensors code. Only plain numeric dtypes.
_DESCR: dict[tuple[str, int], str] = {
    ("f", 2): "F16",
    ("f", 4): "F32",
    ("f", 8): "F64",
    ("i", 1): "I8",
    ("i", 2): "I16",
    ("i", 4): "I32",
    ("i", 8): "I64",
    ("u", 1): "U8",
    ("u", 2): "U16",
    ("u", 4): "U32",
    ("u", 8): "U64",
    ("b", 1): "BOOL",
    ("c", 8): "C64",
    ("c", 16): "C128",
}
_PY2_LONG = re.compile(r"\b(\d+)[lL]\b")
_DESCR_RE = re.compile(r"^([<>|=])([a-zA-Z])(\d+)$")  # e.g. "<f4", "|b1"; "|O" is handled first


class PickledArray(UnsupportedDtype):
    """An object array (``descr '|O'``): its data is a pickle of Python objects, not numbers."""


@dataclass(frozen=True)
class NpyFacts(ContainerFacts):
    """A ``.npy`` file's container facts."""

    npy_version: str = ""  # "1.0", "2.0", "3.0"
    fortran_order: bool = False
    trailing_bytes: int = 0  # bytes after the array


@dataclass(frozen=True)
class NpzFacts(ContainerFacts):
    """A ``.npz`` file's container facts."""

    other_members: list[str] = field(default_factory=list)  # members that are not .npy
    irregularities: tuple[ZipIrregularity, ...] = ()  # what the zip reader noticed


@dataclass(frozen=True)
class NpyHeader:
    """A parsed .npy header: where the data starts (relative to the .npy start) and its layout."""

    version: tuple[int, int]
    dtype: DType
    big_endian: bool
    fortran_order: bool
    shape: tuple[int, ...]
    data_start: int

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize

    @property
    def strides(self) -> tuple[int, ...]:
        """Element strides: C order, or the reversed C strides of the reversed shape (Fortran)."""
        if not self.fortran_order:
            return contiguous_strides(self.shape)
        return tuple(reversed(contiguous_strides(tuple(reversed(self.shape)))))


def parse_npy_header(head: bytes, what: str) -> NpyHeader:
    """Parse the header at the start of ``head`` (which must hold all of it).

    ``what`` names the array in messages. Raises CorruptFile/TruncatedFile/PickledArray.
    """
    if head[:6] != MAGIC:
        raise CorruptFile(f"{what}: not a .npy array (no \\x93NUMPY magic)")
    if len(head) < 10:
        raise TruncatedFile(f"{what}: the .npy header is cut short")
    major, minor = head[6], head[7]
    if major not in (1, 2, 3):
        raise CorruptFile(f"{what}: unknown .npy format version {major}.{minor}")
    if len(head) < _header_start(head):
        raise TruncatedFile(f"{what}: the .npy header is cut short")
    start, hlen = _preamble(head)
    if hlen > MAX_HEADER:
        raise CorruptFile(
            f"{what}: the .npy header declares {hlen} bytes, over sdtool's {MAX_HEADER}-byte "
            "limit (plain numeric arrays need far less)"
        )
    if len(head) < start + hlen:
        raise TruncatedFile(
            f"{what}: the .npy header needs {start + hlen} bytes but only {len(head)} are there; "
            "the file is truncated"
        )
    raw = head[start : start + hlen]
    try:
        text = raw.decode("utf-8" if major == 3 else "latin-1")
        try:
            d = ast.literal_eval(text)
        except SyntaxError:
            # Python 2 wrote longs as 2L in shapes; numpy reads them, so do we
            d = ast.literal_eval(_PY2_LONG.sub(r"\1", text))
    except (UnicodeDecodeError, ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise CorruptFile(f"{what}: the .npy header is not a Python literal ({e})") from None
    if not isinstance(d, dict) or not {"descr", "fortran_order", "shape"} <= d.keys():
        raise CorruptFile(f"{what}: the .npy header lacks descr/fortran_order/shape")
    descr, fortran, shape = d["descr"], d["fortran_order"], d["shape"]
    if not isinstance(fortran, bool):
        raise CorruptFile(f"{what}: fortran_order must be True or False")
    if not (
        isinstance(shape, tuple)
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise CorruptFile(f"{what}: shape must be a tuple of non-negative integers")
    dt, big = _dtype_of(descr, what)
    return NpyHeader((major, minor), dt, big, fortran, shape, start + hlen)


@dataclass(frozen=True)
class NpyLayout:
    """Where a .npy's parts lie, as ``numpy.load(allow_pickle=True)`` reads them."""

    version: tuple[int, int]
    nbytes: int  # bytes of a plain array's data (what numpy.load reads after the header)
    has_object: bool  # numpy unpickles the data (from ``data_start``) instead of reading numbers
    data_start: int


#: header bytes numpy.load (allow_pickle=True: no size limit) may need; the scanner reads this
#: much at most before deciding
MAX_LAYOUT_HEADER = 16 << 20


def _header_start(head: bytes) -> int:
    """Where the header dict starts: version 1.x has a u16 length at byte 8, later ones a u32."""
    return 10 if head[6:7] == b"\x01" else 12


def _preamble(head: bytes) -> tuple[int, int]:
    """(where the header dict starts, its declared length) of the .npy starting with ``head``,
    which holds at least ``_header_start(head)`` bytes. The version is not checked here."""
    start = _header_start(head)
    return start, struct.unpack_from("<H" if start == 10 else "<I", head, 8)[0]


def read_npy_layout(buf: Any) -> NpyLayout:
    """The layout of the .npy in ``buf`` (bytes or a mapping: ``len`` and slices), as
    ``numpy.load(allow_pickle=True)`` reads it (``npy_layout``), reading at most the declared
    header (``MAX_LAYOUT_HEADER`` bytes).

    Raises TruncatedFile when the header does not fit the bytes (or the limit), ValueError
    where numpy.load refuses the header (then nothing of the file is loaded).
    """
    if len(buf) < 12:
        raise TruncatedFile("npy header is cut short")
    head = bytes(buf[:12])
    start, hlen = _preamble(head)
    need = start + hlen
    if need > min(len(buf), MAX_LAYOUT_HEADER):
        raise TruncatedFile(f"npy header of {need} bytes does not fit the file (or sdtool's limit)")
    return npy_layout(bytes(buf[:need]))


def npy_layout(head: bytes) -> NpyLayout:
    """The layout of the .npy whose magic and header are in ``head``, read by numpy's own
    header reader (so every spelling of an object dtype numpy accepts is recognised: ``'O'``,
    ``'|O'``, ``'object'``, structured and subarray dtypes with object fields ...).

    Raises ValueError where numpy.load raises (nothing of the file would be loaded).
    """
    import io

    from numpy.lib import format as npformat

    impl: Any = npformat
    with contextlib.suppress(ImportError):
        from numpy.lib import _format_impl as impl  # numpy 2 keeps the reader here
    fp = io.BytesIO(head)
    try:
        version = npformat.read_magic(fp)
        read_header = getattr(impl, "_read_array_header", None)
        if read_header is None:  # pragma: no cover - numpy without the private reader
            raise ValueError("this numpy has no header reader sdtool knows")
        with warnings.catch_warnings():  # numpy warns about Python 2 headers it still reads
            warnings.simplefilter("ignore")
            shape, _, dt = read_header(fp, version, max_header_size=1 << 64)
        return NpyLayout(version, int(dt.itemsize) * prod(shape), bool(dt.hasobject), fp.tell())
    except ValueError:
        raise
    except Exception as e:  # numpy's reader on hostile bytes (tokenize.TokenError ...)
        raise ValueError(f"{type(e).__name__}: {e}") from None


def _dtype_of(descr: object, what: str) -> tuple[DType, bool]:
    if not isinstance(descr, str):
        raise UnsupportedDtype(
            f"{what}: a structured numpy dtype {descr!r}; only plain numeric arrays are read"
        )
    m = _DESCR_RE.match(descr)
    if descr.lstrip("<>|=")[:1] == "O":
        raise PickledArray(
            f"{what}: an object array: it holds pickled Python objects, not numbers, and "
            "loading it would run the pickle; check it with `sdtool scan`"
        )
    code = _DESCR.get((m.group(2), int(m.group(3)))) if m else None
    if m is None or code is None:
        raise UnsupportedDtype(f"{what}: numpy dtype {descr!r} has no tensor equivalent")
    return dtypes.from_code(code), m.group(1) == ">" and int(m.group(3)) > 1


def _info(h: NpyHeader, storage: Storage) -> TensorInfo:
    return TensorInfo(h.dtype, h.shape, h.strides, 0, storage)


def read_npy(path: Path) -> ModelFile:
    """Open a ``.npy`` file lazily: one tensor named ``array`` at its file offset."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12 + MAX_HEADER)
    try:
        h = parse_npy_header(head, "array")
    except CorruptFile as e:
        raise e.with_path(path) from None
    if h.data_start + h.nbytes > size:
        raise TruncatedFile(
            f"the array {h.dtype} {list(h.shape)} needs bytes up to {h.data_start + h.nbytes} "
            f"but the file has {size}; the file is truncated",
            path=path,
        )
    st = Storage(NPY_TENSOR, h.dtype, h.nbytes, file_offset=h.data_start, big_endian=h.big_endian)
    container = NpyFacts(
        npy_version=f"{h.version[0]}.{h.version[1]}",
        fortran_order=h.fortran_order,
        trailing_bytes=size - h.data_start - h.nbytes,
    )
    return ModelFile(path, Format.NPY, {NPY_TENSOR: _info(h, st)}, container=container)


def read_npz(path: Path, archive: ZipArchive) -> ModelFile:
    """Open a ``.npz`` (zip of .npy members) lazily: member ``name.npy`` -> tensor ``name``.

    Stored members keep their file offset (zero-copy); deflated members are inflated on read.
    Members that are not ``.npy`` are listed in ``container.other_members``. A member of a
    non-numeric dtype (strings, structured) refuses the whole file rather than be dropped
    silently, and an object array (a pickle) refuses it with PickledArray.
    """
    tensors: dict[str, TensorInfo] = {}
    other: list[str] = []
    with open(path, "rb") as f:
        for m in archive:
            if not m.name.endswith(".npy") or m.name.endswith("/"):
                other.append(m.name)
                continue
            name = m.name[: -len(".npy")]
            h = _member_header(f, m)
            if h.data_start + h.nbytes > m.size:
                raise TruncatedFile(
                    f"npz member {m.name!r}: the array {h.dtype} {list(h.shape)} needs "
                    f"{h.data_start + h.nbytes} bytes but the member holds {m.size}",
                    path=path,
                )
            if m.method == STORED:
                st = Storage(
                    name,
                    h.dtype,
                    h.nbytes,
                    file_offset=m.data_offset + h.data_start,
                    big_endian=h.big_endian,
                )
            else:
                st = Storage(
                    name,
                    h.dtype,
                    h.nbytes,
                    load=_member_loader(path, m, h.data_start, h.nbytes),
                    big_endian=h.big_endian,
                )
            tensors[name] = _info(h, st)
    container = NpzFacts(other_members=other, irregularities=tuple(archive.irregularities))
    return ModelFile(path, Format.NPZ, tensors, container=container)


def _member_header(f: BinaryIO, m: ZipMember) -> NpyHeader:
    what = f"npz member {m.name!r}"
    if m.method == STORED:
        if m.compressed_size != m.size:
            raise CorruptFile(f"{what} is stored but its sizes disagree")
        f.seek(m.data_offset)
        head = f.read(min(m.size, 12 + MAX_HEADER))
    elif m.method == DEFLATED:
        f.seek(m.data_offset)
        d = zlib.decompressobj(-15)
        head = b""
        left = m.compressed_size
        try:
            while len(head) < 12 + MAX_HEADER and left > 0:
                chunk = f.read(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
                head += d.decompress(chunk, 12 + MAX_HEADER - len(head))
                if len(head) >= 12 and _header_complete(head):
                    break
        except zlib.error as e:
            raise CorruptFile(f"{what} does not inflate: {e}") from None
    else:
        raise CorruptFile(f"{what} uses compression method {m.method}, not supported")
    return parse_npy_header(head, what)


def _header_complete(head: bytes) -> bool:
    if head[:6] != MAGIC:
        return True  # let the parser explain
    if head[6] == 1:
        return len(head) >= 10 + struct.unpack_from("<H", head, 8)[0]
    return len(head) >= 12 and len(head) >= 12 + struct.unpack_from("<I", head, 8)[0]


def _member_loader(path: Path, m: ZipMember, start: int, nbytes: int) -> Callable[[], bytes]:
    def load() -> bytes:
        with open(path, "rb") as f:
            data = read_member(f, m)
        if len(data) < start + nbytes:
            raise TruncatedFile(
                f"npz member {m.name!r} inflates to {len(data)} bytes, needs {start + nbytes}",
                path=path,
            )
        return data[start : start + nbytes]

    return load
