"""safetensors: header parsing with the reference reader's rules, and a streaming writer.

The header is parsed by hand (not safe_open) because sdtool needs what safe_open hides: the exact
offsets for zero-copy moves, the raw header for AutoV3 hashing and lint, and errors that explain
a truncated download or a file that is not safetensors at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

from sdtool import dtypes
from sdtool.errors import CorruptFile, OutputError, TruncatedFile, UnsupportedDtype
from sdtool.formats.plan import (
    BufferRing,
    Chunks,
    Job,
    OutTensor,
    SourceFds,
    copy_span,
    prefetch,
    source_order,
    write_all,
)
from sdtool.model import ModelFile, Storage, TensorInfo, contiguous_strides

MAX_HEADER = 100_000_000  # the reference reader's limit


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


def read_safetensors(path: Path) -> ModelFile:
    """Open a safetensors file lazily (header only)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            header = read_header(f, size)
        except CorruptFile as e:
            raise e.with_path(path) from None
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
    container = {
        "header_bytes": header.length,
        "data_start": start,
        "duplicate_keys": header.duplicate_keys,
    }
    return ModelFile(path, "safetensors", tensors, metadata=header.metadata, container=container)


# -- writing ----------------------------------------------------------------------------------
#
# Hand-written rather than safetensors.save_file: save_file needs every tensor in memory at
# once (a 7.7 GB checkpoint needs 7.7 GB, usually twice), while this writer computes the header
# from the plan first and then streams one tensor at a time, moving bytes that need no change
# with copy_file_range. It follows the Rust writer's conventions so its output is what
# safetensors itself would write: tensors ordered by dtype (descending, in the order below)
# then by name, ``__metadata__`` first, compact JSON, header padded with spaces to a multiple
# of 8. Same plan -> same bytes -> same AutoV3 hash.

#: safetensors' Dtype enum order (ascending); the writer sorts by it descending.
DTYPE_ORDER: tuple[str, ...] = (
    "BOOL",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
)
_RANK = {code: i for i, code in enumerate(DTYPE_ORDER)}
PREFETCH = 4  # steps queued ahead of the write (2 casting, 2 cast and waiting)
CAST_THREADS = 2  # pieces cast at once (numpy's casts release the GIL)


@dataclass(frozen=True)
class Placed:
    """An output tensor and its [begin, end) in the data buffer."""

    tensor: OutTensor
    begin: int
    end: int


def layout(
    plan: Sequence[OutTensor], metadata: dict[str, str] | None
) -> tuple[bytes, list[Placed]]:
    """The complete header (length prefix included) and where each tensor goes.

    Raises OutputError for a dtype safetensors cannot hold or a name given twice.
    """
    seen: set[str] = set()
    for t in plan:
        if t.dtype.code not in _RANK:
            raise OutputError(
                f"tensor {t.name!r} is {t.dtype}, which safetensors cannot store "
                "(cast it, or write a .ckpt)"
            )
        if t.name in seen:
            raise OutputError(f"two output tensors are named {t.name!r}")
        seen.add(t.name)
    ordered = sorted(plan, key=lambda t: (-_RANK[t.dtype.code], t.name))
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    placed: list[Placed] = []
    pos = 0
    for t in ordered:
        placed.append(Placed(t, pos, pos + t.nbytes))
        obj[t.name] = {
            "dtype": t.dtype.code,
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.nbytes],
        }
        pos += t.nbytes
    try:
        js = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise OutputError(f"a tensor name or metadata value is not valid Unicode: {e}") from None
    js += b" " * (-len(js) % 8)
    if len(js) > MAX_HEADER:
        raise OutputError(f"the header would be {len(js)} bytes, over safetensors' 100 MB limit")
    return struct.pack("<Q", len(js)) + js, placed


def write_safetensors(
    plan: Sequence[OutTensor],
    f: BinaryIO,
    *,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Stream ``plan`` into the empty file ``f`` as safetensors; return overflow counts by name.

    The file is sized first, then each tensor is written at its offset, in source order; cast
    pieces are cast and written (pwrite at their own offsets) on ``CAST_THREADS`` threads.
    Peak memory is a few pieces of a cast (``CHUNK_BYTES`` of the wider dtype each) or one
    tensor that must be materialised (a deflated or strided source), plus a constant.
    ``progress`` receives byte counts as they are written.
    """
    header, placed = layout(plan, metadata)
    fd = f.fileno()
    write_all(fd, header)
    base = len(header)
    os.ftruncate(fd, base + (placed[-1].end if placed else 0))
    # Tensors go to their places in safetensors' order, but are read in the order they lie in
    # their sources: reading a 7 GB file front to back instead of jumping around is what keeps
    # this at the speed of cp once the file no longer fits the page cache.
    order = sorted(placed, key=lambda p: (str(p.tensor.source.path), *source_order(p.tensor)))
    overflows: dict[str, int] = {}
    with SourceFds() as fds, _casts() as pool:
        steps = _steps(order, fds, pool, fd, base)
        for kind, p, item in prefetch(steps, depth=PREFETCH):
            t = p.tensor
            if kind == "copy":
                span = t.copy_span
                assert span is not None
                copy_span(fds.get(t), fd, span[0], span[1], t, progress, base + p.begin)
            elif kind == "piece":
                written = item.result()  # in order: errors surface, the ring slot is free
                if progress is not None:
                    progress(written)
            elif item.overflow:  # "done": a cast tensor is complete
                overflows[t.name] = item.overflow
    return overflows


def _cast_and_write(job: Job, fd: int, at: int) -> int:
    return write_all(fd, job.run(), at)


@contextlib.contextmanager
def _casts() -> Iterator[ThreadPoolExecutor]:
    """The cast threads; on the way out (an error, Ctrl-C) queued casts are dropped and running
    ones waited for, so no thread outlives the write or touches a closed file."""
    pool = ThreadPoolExecutor(CAST_THREADS, thread_name_prefix="sdtool-cast")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _steps(
    order: list[Placed], fds: SourceFds, pool: ThreadPoolExecutor, fd: int, base: int
) -> Iterator[tuple[str, Placed, Any]]:
    """What to do, tensor by tensor: ("copy", p, None) for bytes that move as they are, else
    ("piece", p, future byte count) per chunk and ("done", p, chunks). Runs in the prefetch
    thread and hands each piece to ``pool``, which casts it and writes it at its offset in
    ``fd``: casts and writes (both release the GIL) run on both cores at once."""
    # a ring slot is reused ``slots`` pieces later: in flight are at most the queue's depth,
    # the step the prefetch thread holds, and the one being written
    ring = BufferRing(slots=PREFETCH + 3)
    for p in order:
        t = p.tensor
        span = t.copy_span
        if span is not None:
            if span[0] + span[1] > t.source.file_size:
                raise TruncatedFile(
                    f"tensor {t.name!r} needs bytes up to {span[0] + span[1]} but the file "
                    f"has {t.source.file_size}; the download is truncated",
                    path=t.source.path,
                )
            yield "copy", p, None
            continue
        chunks = Chunks(t, fds.get(t), ring)
        written = 0
        for job in chunks.jobs():
            yield "piece", p, pool.submit(_cast_and_write, job, fd, base + p.begin + written)
            written += job.nbytes
        if written != p.end - p.begin:
            raise CorruptFile(
                f"tensor {t.name!r} gave {written} bytes, expected {p.end - p.begin}",
                path=t.source.path,
            )
        yield "done", p, chunks
