"""safetensors: header parsing with the reference reader's rules (write/safetensors.py writes).


The header is parsed by hand (not safe_open) because sdtool needs what safe_open hides: the exact
offsets for zero-copy moves, the raw header for AutoV3 hashing and lint, and errors that explain
a truncated download or a file that is not safetensors at all.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from math import prod
from typing import Any, BinaryIO

from sdtool import dtypes
from sdtool.errors import CorruptFile, TruncatedFile, UnsupportedDtype
from sdtool.formats.source import Input, input_path, input_size, open_input
from sdtool.model import ContainerFacts, ModelFile, Storage, TensorInfo, contiguous_strides
from sdtool.vocab import Format

MAX_HEADER = 100_000_000  # the reference reader's limit


@dataclass(frozen=True)
class SafetensorsFacts(ContainerFacts):
    """A safetensors file's container facts."""

    header_bytes: int = 0  # N, the JSON's length
    data_start: int = 0  # 8 + N
    duplicate_keys: list[str] = field(default_factory=list)  # keys the JSON gives twice


@dataclass
class Header:
    """A parsed, validated safetensors header."""

    length: int  # N, the JSON's byte length
    entries: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"} in file order
    metadata: dict[str, str]
    raw: bytes
    duplicate_keys: list[str]

    @property
    def data_start(self) -> int:
        return 8 + self.length

    @property
    def data_end(self) -> int:
        """Where the last tensor's bytes end (what follows is no tensor's)."""
        ends = (e["data_offsets"][1] for e in self.entries.values())
        return self.data_start + max(ends, default=0)


def lenient_data_end(buf: Any) -> int:
    """Where the tensor data of the safetensors bytes ``buf`` (bytes or a mapping, at least 8
    bytes) ends as a lenient reader takes it, for a header the rules reject: 8 + the declared
    header length (capped at the bytes), plus the largest ``data_offsets`` end of any entry
    (nothing when the header is no JSON object)."""
    (n,) = struct.unpack_from("<Q", bytes(buf[:8]))
    end = min(8 + n, len(buf))
    return end + _loose_data_length(bytes(buf[8:end]))


def _loose_data_length(raw: bytes) -> int:
    """The data length a header declares, read leniently (for a header the rules reject)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
        ends = [
            e["data_offsets"][1]
            for k, e in obj.items()
            if k != "__metadata__"
            and isinstance(e, dict)
            and isinstance(e.get("data_offsets"), list)
        ]
        return max((x for x in ends if isinstance(x, int) and x >= 0), default=0)
    except (ValueError, AttributeError, IndexError, TypeError, KeyError):
        return 0


def _pairs_hook(dups: list[str]) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                dups.append(k)
            out[k] = v
        return out

    return hook


def read_header(f: BinaryIO, file_size: int) -> Header:
    """Read and validate the header of the safetensors file ``f`` (reference rules)."""
    f.seek(0)
    first = f.read(8)
    if len(first) < 8:
        raise TruncatedFile("the file is shorter than a safetensors header length (8 bytes)")
    (n,) = struct.unpack("<Q", first)
    if n > MAX_HEADER:
        raise CorruptFile(
            f"header length {n} is over the 100 MB limit: this is not a safetensors file "
            "(a Git-LFS pointer, an HTML page or a renamed .ckpt?)"
        )
    if 8 + n > file_size:
        raise TruncatedFile(
            f"the header needs {8 + n} bytes but the file has {file_size}; "
            "the download is truncated"
        )
    raw = f.read(n)
    dups: list[str] = []
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs_hook(dups))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFile(f"the header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CorruptFile("the header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CorruptFile("__metadata__ must map strings to strings")
    entries: dict[str, dict[str, Any]] = {}
    for name, ent in obj.items():
        if not isinstance(ent, dict):
            raise CorruptFile(f"tensor {name!r}: entry is not an object")
        dt, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
        if not isinstance(dt, str):
            raise CorruptFile(f"tensor {name!r}: missing dtype")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CorruptFile(f"tensor {name!r}: shape must be a list of non-negative integers")
        if not (
            isinstance(offs, list)
            and len(offs) == 2
            and all(isinstance(o, int) and o >= 0 for o in offs)
            and offs[0] <= offs[1]
        ):
            raise CorruptFile(f"tensor {name!r}: data_offsets must be [begin, end]")
        entries[name] = ent
    _check_offsets(entries, file_size - 8 - n)
    return Header(n, entries, dict(meta), raw, dups)


def _check_offsets(entries: dict[str, dict[str, Any]], buffer_len: int) -> None:
    expected = 0
    for name, e in sorted(entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = e["data_offsets"]
        try:
            itemsize = dtypes.from_code(e["dtype"]).itemsize
        except UnsupportedDtype:
            raise CorruptFile(f"tensor {name!r}: unknown dtype {e['dtype']!r}") from None
        want = prod(e["shape"]) * itemsize
        if end - begin != want:
            raise CorruptFile(
                f"tensor {name!r}: {e['dtype']} {e['shape']} needs {want} bytes, "
                f"data_offsets give {end - begin}"
            )
        if begin != expected:
            raise CorruptFile(
                f"tensor {name!r} begins at {begin}, expected {expected} (hole or overlap)"
            )
        expected = end
    if expected > buffer_len:
        raise TruncatedFile(
            f"the tensors need {expected} bytes of data but the file holds {buffer_len}; "
            "the download is truncated"
        )
    if expected != buffer_len:
        raise CorruptFile(f"{buffer_len - expected} unexpected bytes after the last tensor")


def read_safetensors(path: Input) -> ModelFile:
    """Open a safetensors file lazily (header only)."""
    size = input_size(path)
    with open_input(path) as f:
        try:
            header = read_header(f, size)
        except CorruptFile as e:
            raise e.with_path(input_path(path)) from None
    tensors: dict[str, TensorInfo] = {}
    start = header.data_start
    by_offset = sorted(header.entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"]))
    for name, ent in by_offset:  # file order: where the bytes lie
        dt = dtypes.from_code(ent["dtype"])
        begin, end = ent["data_offsets"]
        shape = tuple(ent["shape"])
        strides = contiguous_strides(shape)
        storage = Storage(name, dt, end - begin, file_offset=start + begin)
        tensors[name] = TensorInfo(dt, shape, strides, 0, storage)
    container = SafetensorsFacts(
        header_bytes=header.length, data_start=start, duplicate_keys=header.duplicate_keys
    )
    return ModelFile(
        path, Format.SAFETENSORS, tensors, metadata=header.metadata, container=container
    )


# -- writing ----------------------------------------------------------------------------------
#
# Hand-written rather than safetensors.save_file: save_file needs every tensor in memory at
# once (a 7.7 GB checkpoint needs 7.7 GB, usually twice), while this writer computes the header
# from the plan first and then streams one tensor at a time, moving bytes that need no change
# with copy_file_range. It follows the Rust writer's conventions so its output is what
# safetensors itself would write: tensors ordered by dtype (descending, in the order below)
# then by name, ``__metadata__`` first, compact JSON, header padded with spaces to a multiple
# of 8. Same plan -> same bytes -> same AutoV3 hash.
