"""GGUF (llama.cpp, ComfyUI-GGUF): read the header lazily, hand out tensors (writing:
``sdtool/write/gguf.py``).

Layout (gguf-py's gguf_reader.py / gguf_writer.py; all little-endian)::

    "GGUF"  version u32 (2 or 3)  tensor_count u64  kv_count u64
    kv_count x  (key string, value type u32, value)
    tensor_count x  (name string, n_dims u32, dims u64[n_dims] innermost first, type u32,
                     offset u64 from the data start)
    zero padding to ``general.alignment`` (u32, a power of two; default 32)
    tensor data, each at its offset (the writer pads each to the alignment)

A string is a u64 byte length and UTF-8; an array is an element type u32, a count u64 and the
elements. The reader treats the file as hostile data: every length, count, dimension and
offset is checked against the bytes that remain and against fixed limits *before* anything
is allocated or looped over, so a 40-byte file that declares 2**64 tensors is refused at
once. Nothing in a GGUF file is executable; a file that breaks these rules is "corrupt".

Tensors come out under their stored names. ComfyUI-GGUF's ``comfy.gguf.orig_shape.<name>``
KV (the [n/256, 256] reshape it does for SD1/SDXL) restores a tensor's original shape, as its
loader does. Quantized tensors are QuantTensorInfo: their values (``ModelFile.read``) are the
float32 numbers gguf-py's ``dequantize`` gives, bit for bit.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from math import prod
from typing import Any

import numpy as np

from sdtool import dtypes
from sdtool.errors import CorruptFile, TruncatedFile
from sdtool.formats import ggml
from sdtool.formats.source import Input, RangeReader
from sdtool.model import (
    ContainerFacts,
    ModelFile,
    Storage,
    TensorInfo,
    check_view,
    contiguous_strides,
)
from sdtool.vocab import Format

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."

# Limits a real file never reaches; each is checked before anything is allocated.
MAX_KEY = 1 << 16  # bytes in a key or tensor name
MAX_STRING = 1 << 28  # bytes in one string value
MAX_ARRAY = 1 << 28  # elements in one array value
MAX_DIMS = 8  # ggml has 4; ComfyUI-GGUF's 5-D fix files have 5
MAX_DEPTH = 3  # arrays of arrays
MAX_ELEMENTS = 1 << 50  # elements in one tensor
MAX_COUNT = 1 << 20  # tensors, and metadata entries, in one file
MAX_CARRIED_ARRAY = 64  # longer arrays stay out of ModelFile.metadata (tokenizer vocabularies)

#: GGUF value type -> (name, struct format or None, size of the smallest encoding)
VALUE_TYPES: dict[int, tuple[str, str | None, int]] = {
    0: ("UINT8", "<B", 1),
    1: ("INT8", "<b", 1),
    2: ("UINT16", "<H", 2),
    3: ("INT16", "<h", 2),
    4: ("UINT32", "<I", 4),
    5: ("INT32", "<i", 4),
    6: ("FLOAT32", "<f", 4),
    7: ("BOOL", "<?", 1),
    8: ("STRING", None, 8),
    9: ("ARRAY", None, 12),
    10: ("UINT64", "<Q", 8),
    11: ("INT64", "<q", 8),
    12: ("FLOAT64", "<d", 8),
}
T_STRING, T_ARRAY, T_UINT32, T_INT32 = 8, 9, 4, 5
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
#: smallest possible KV (empty key, u8 value) and tensor info (empty name, 0 dims)
MIN_KV, MIN_TENSOR_INFO = 8 + 4 + 1, 8 + 4 + 4 + 8


@dataclass
class KV:
    """One metadata entry: its value type (and the element type of an array)."""

    type: int
    value: Any
    item_type: int | None = None

    @property
    def type_name(self) -> str:
        name = VALUE_TYPES[self.type][0]
        if self.type == T_ARRAY and self.item_type is not None:
            return f"{name}[{VALUE_TYPES[self.item_type][0]}]"
        return name


@dataclass
class TensorEntry:
    """One tensor as the header declares it (dims innermost first, as stored)."""

    name: str
    dims: tuple[int, ...]
    type: ggml.GGMLType
    offset: int  # from the data start

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (outermost first)."""
        return tuple(reversed(self.dims))

    @property
    def numel(self) -> int:
        return prod(self.dims)

    @property
    def nbytes(self) -> int:
        return self.type.nbytes(self.numel)


@dataclass
class Header:
    version: int
    kv: dict[str, KV]
    tensors: list[TensorEntry]
    alignment: int
    data_start: int
    header_end: int  # end of the tensor infos (before padding)

    @property
    def data_end(self) -> int:
        """End of the last tensor's bytes."""
        return max(
            (self.data_start + t.offset + t.nbytes for t in self.tensors), default=self.data_start
        )


class _Cursor:
    """Bounds-checked little-endian reads over a byte buffer (bytes, mmap, or slicable file)."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise TruncatedFile(
                f"the GGUF header ends early: {what} needs bytes {self.pos}..{self.pos + n} "
                f"but the file has {self.size}"
            )
        b = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return b

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack("<Q", self.take(8, what))[0])

    def left(self) -> int:
        return self.size - self.pos

    def string(self, what: str, limit: int) -> str:
        n = self.u64(f"the length of {what}")
        if n > limit or n > self.left():
            raise CorruptFile(
                f"{what} declares {n} bytes at offset {self.pos - 8}, more than "
                f"{'the file holds' if n > self.left() else f'the limit of {limit}'}"
            )
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFile(f"{what} at offset {self.pos - n} is not UTF-8") from None


def _value(c: _Cursor, vtype: int, what: str, depth: int = 0) -> tuple[Any, int | None]:
    if vtype not in VALUE_TYPES:
        raise CorruptFile(f"{what} has unknown value type {vtype}")
    if vtype == T_STRING:
        return c.string(what, MAX_STRING), None
    if vtype == T_ARRAY:
        if depth >= MAX_DEPTH:
            raise CorruptFile(f"{what} nests arrays deeper than {MAX_DEPTH}")
        itype = c.u32(f"the element type of {what}")
        if itype not in VALUE_TYPES:
            raise CorruptFile(f"{what} is an array of unknown value type {itype}")
        count = c.u64(f"the length of {what}")
        least = VALUE_TYPES[itype][2]
        if count > MAX_ARRAY or count * least > c.left():
            raise CorruptFile(
                f"{what} declares {count} elements of at least {least} bytes, more than "
                f"{'the file holds' if count * least > c.left() else f'the limit {MAX_ARRAY}'}"
            )
        if itype in _NUMPY:
            raw = c.take(count * VALUE_TYPES[itype][2], what)
            return np.frombuffer(raw, _NUMPY[itype]).tolist(), itype
        return [_value(c, itype, what, depth + 1)[0] for _ in range(count)], itype
    fmt = VALUE_TYPES[vtype][1]
    assert fmt is not None
    (v,) = struct.unpack(fmt, c.take(struct.calcsize(fmt), what))
    return v, None


def read_header(buf: Any, size: int) -> Header:
    """Parse and check a GGUF header from ``buf`` (anything sliceable to bytes) of ``size`` bytes.

    Raises CorruptFile / TruncatedFile (without a path) for any rule broken.
    """
    c = _Cursor(buf, size)
    if c.take(4, "the magic") != MAGIC:
        raise CorruptFile("not a GGUF file (no GGUF magic)")
    version = c.u32("the version")
    if version not in VERSIONS:
        if version & 0xFFFF == 0 and version >> 16 in VERSIONS:
            raise CorruptFile("a big-endian GGUF file; sdtool reads little-endian GGUF only")
        raise CorruptFile(f"GGUF version {version}; sdtool reads versions 2 and 3")
    n_tensors = c.u64("the tensor count")
    n_kv = c.u64("the metadata count")
    if n_kv > MAX_COUNT or n_tensors > MAX_COUNT:
        raise CorruptFile(
            f"declares {n_tensors} tensors and {n_kv} metadata entries (at most {MAX_COUNT} each)"
        )
    if n_kv * MIN_KV > c.left():
        raise CorruptFile(f"declares {n_kv} metadata entries; the file cannot hold that many")
    if n_tensors * MIN_TENSOR_INFO > c.left():
        raise CorruptFile(f"declares {n_tensors} tensors; the file cannot hold that many")
    kv: dict[str, KV] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", MAX_KEY)
        vtype = c.u32(f"the type of metadata {key!r}")
        value, itype = _value(c, vtype, f"metadata {key!r}")
        if key in kv:
            raise CorruptFile(f"metadata key {key!r} appears twice")
        kv[key] = KV(vtype, value, itype)
    entries: list[TensorEntry] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"the name of tensor #{i}", MAX_KEY)
        n_dims = c.u32(f"the dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise CorruptFile(f"tensor {name!r} declares {n_dims} dimensions (at most {MAX_DIMS})")
        dims = tuple(c.u64(f"a dimension of tensor {name!r}") for _ in range(n_dims))
        tid = c.u32(f"the type of tensor {name!r}")
        offset = c.u64(f"the offset of tensor {name!r}")
        gt = ggml.BY_ID.get(tid)
        if gt is None:
            raise CorruptFile(f"tensor {name!r} has unknown ggml type {tid}")
        numel = 1
        for d in dims:
            numel *= d
            if numel > MAX_ELEMENTS:
                raise CorruptFile(
                    f"tensor {name!r} declares dimensions {list(dims)}: too many elements"
                )
        if dims and dims[0] % gt.block:
            raise CorruptFile(
                f"tensor {name!r}: a row of {dims[0]} is not a whole number of "
                f"{gt.name} blocks ({gt.block})"
            )
        if name in names:
            raise CorruptFile(f"tensor {name!r} appears twice")
        names.add(name)
        entries.append(TensorEntry(name, dims, gt, offset))
    align = DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        a = kv["general.alignment"]
        if a.type != T_UINT32 or a.value == 0 or a.value & (a.value - 1):
            raise CorruptFile("general.alignment must be a UINT32 power of two")
        align = int(a.value)
    header_end = c.pos
    data_start = -(-header_end // align) * align
    for t in entries:
        end = data_start + t.offset + t.nbytes
        if end > size:
            raise TruncatedFile(
                f"tensor {t.name!r} ends at byte {end} but the file has {size} bytes; "
                "the download is truncated"
            )
    return Header(version, kv, entries, align, data_start, header_end)


# -- the ModelFile --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QuantTensorInfo(TensorInfo):
    """A block-quantized GGUF tensor: ``dtype`` is F32 (what dequantizing gives), ``shape`` the
    logical shape; the stored bytes (``nbytes``) are ``ggml_type`` blocks."""

    ggml_type: str = ""

    @property
    def type_code(self) -> str:
        return self.ggml_type

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    @property
    def file_span(self) -> tuple[int, int] | None:
        return None  # the values are not the stored bytes

    def describe(self) -> str:
        return f"{self.ggml_type} {list(self.shape)}"


@dataclass(frozen=True)
class GGUFFacts(ContainerFacts):
    """A GGUF file's container facts."""

    gguf_version: int = 0
    alignment: int = DEFAULT_ALIGNMENT
    architecture: str | None = None  # general.architecture
    kv_count: int = 0
    types: dict[str, int] = field(default_factory=dict)  # ggml type -> tensors
    kv_not_in_metadata: list[str] = field(default_factory=list)  # long arrays (vocabularies)


class GGUFModel(ModelFile):
    """A ModelFile over a GGUF file; quantized tensors are dequantized on read."""

    header: Header
    kv: dict[str, KV]

    def read_info(self, info: TensorInfo, name: str = "?") -> np.ndarray:
        if not isinstance(info, QuantTensorInfo):
            return super().read_info(info, name)
        st = info.storage
        assert st.file_offset is not None
        if st.file_offset + st.nbytes > self.file_size:
            raise TruncatedFile(f"tensor {name!r} runs past the end of the file", path=self.path)
        raw = self._span(st.file_offset, st.nbytes)
        values = ggml.dequantize(raw, info.ggml_type, threads=ggml.default_threads())
        return values.reshape(info.shape)


def orig_shape(kv: dict[str, KV], name: str) -> tuple[int, ...] | None:
    """ComfyUI-GGUF's original shape for ``name`` (an ARRAY of INT32, torch order), if any."""
    entry = kv.get(ORIG_SHAPE_PREFIX + name)
    if entry is None:
        return None
    if entry.type != T_ARRAY or entry.item_type != T_INT32 or not all(v >= 0 for v in entry.value):
        raise CorruptFile(f"{ORIG_SHAPE_PREFIX}{name} must be an ARRAY of non-negative INT32")
    return tuple(int(v) for v in entry.value)


def _metadata(kv: dict[str, KV]) -> tuple[dict[str, str], list[str]]:
    """The KV entries as ModelFile.metadata strings; long arrays are left out (and named)."""
    meta: dict[str, str] = {}
    left: list[str] = []
    for k, e in kv.items():
        if k.startswith(ORIG_SHAPE_PREFIX):
            continue
        if e.type == T_ARRAY and len(e.value) > MAX_CARRIED_ARRAY:
            left.append(k)
            continue
        meta[k] = e.value if isinstance(e.value, str) else json.dumps(e.value)
    return meta, left


def read_gguf(path: Input) -> GGUFModel:
    """Open a GGUF file: parse and check the header; tensor bytes stay on disk."""
    if isinstance(path, RangeReader):  # remote: the header through the block cache
        return _model(path, read_header(path, path.size))
    size = path.stat().st_size
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            header = read_header(mm, size)
        finally:
            if isinstance(mm, mmap.mmap):
                mm.close()
    return _model(path, header)


def _model(path: Input, header: Header) -> GGUFModel:
    tensors: dict[str, TensorInfo] = {}
    for t in header.tensors:
        shape = orig_shape(header.kv, t.name) or t.shape
        if prod(shape) != t.numel:
            raise CorruptFile(
                f"{ORIG_SHAPE_PREFIX}{t.name} is {list(shape)} but the tensor has "
                f"{t.numel} elements"
            )
        at = header.data_start + t.offset
        if t.type.quantized:
            st = Storage(t.name, dtypes.from_code("U8"), t.nbytes, file_offset=at)
            info: TensorInfo = QuantTensorInfo(
                dtypes.from_code("F32"),
                shape,
                contiguous_strides(shape),
                0,
                st,
                ggml_type=t.type.name,
            )
        else:
            assert t.type.dtype is not None
            dt = dtypes.from_code(t.type.dtype)
            st = Storage(t.name, dt, t.nbytes, file_offset=at)
            info = TensorInfo(dt, shape, contiguous_strides(shape), 0, st)
            check_view(info, t.name)
        tensors[t.name] = info
    meta, left = _metadata(header.kv)
    arch = header.kv.get("general.architecture")
    container = GGUFFacts(
        gguf_version=header.version,
        alignment=header.alignment,
        architecture=arch.value if arch is not None and isinstance(arch.value, str) else None,
        kv_count=len(header.kv),
        types=_type_counts(header.tensors),
        kv_not_in_metadata=left,
    )
    m = GGUFModel(path, Format.GGUF, tensors, metadata=meta, container=container)
    m.header, m.kv = header, header.kv
    return m


def _type_counts(entries: Iterable[TensorEntry]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in entries:
        out[t.type.name] = out.get(t.type.name, 0) + 1
    return out
