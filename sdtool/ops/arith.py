"""Streaming arithmetic helpers shared by merge and the LoRA commands.

Model arithmetic reads the same tensor from several files, computes in float32 and writes the
result in the output dtype. ``Inputs`` reads pieces of input tensors with ``pread`` (so a
2 GB input never piles up in the process as mapped pages), ``Output`` collects a result in the
output dtype piece by piece with sdtool's torch-exact cast. Memory is then about one output
tensor plus a few pieces per input, whatever the model's size.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sdtool import dtypes
from sdtool.dtypes import DType
from sdtool.errors import TruncatedFile
from sdtool.model import ModelFile, TensorInfo
from sdtool.write.cast import cast

#: elements per piece of an elementwise computation (4 MiB of float32 per input)
PIECE = 1024 * 1024
#: threads computing pieces of one tensor at once
WORKERS = 2
F32 = dtypes.from_code("F32")


def compute_dtype(info: TensorInfo) -> bool:
    """True for tensors arithmetic may touch: floating point (integers and bools never)."""
    return info.dtype.is_float


class Inputs:
    """Read (pieces of) tensors of several opened models as float32 arrays.

    Contiguous tensors that lie in the file as-is are read with ``os.pread`` into a fresh
    buffer; anything else (deflated zip members, strided or big-endian tensors) is loaded whole
    once and kept until another tensor of the same model is asked for. Thread-safe.
    """

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}
        self._cache: dict[int, tuple[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def _fd(self, m: ModelFile) -> int:
        with self._lock:
            fd = self._fds.get(id(m))
            if fd is None:
                fd = self._fds[id(m)] = os.open(m.path, os.O_RDONLY)
            return fd

    def raw(self, m: ModelFile, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """Elements ``start .. start + count`` of the flattened tensor, in its own dtype."""
        info = m.tensors[name]
        count = info.numel - start if count is None else count
        span = info.file_span
        item = info.dtype.itemsize
        if span is not None:
            offset = span[0] + start * item
            buf = bytearray(count * item)
            view = memoryview(buf)
            fd = self._fd(m)
            got = 0
            while got < len(buf):
                n = os.preadv(fd, [view[got:]], offset + got)
                if n == 0:
                    raise TruncatedFile(
                        f"tensor {name!r}: the file ended at byte {offset + got}; "
                        "the download is truncated",
                        path=m.path,
                    )
                got += n
            return np.frombuffer(buf, info.dtype.numpy)
        with self._lock:
            hit = self._cache.get(id(m))
        if hit is None or hit[0] != name:
            arr = np.ascontiguousarray(m.read_info(info, name)).reshape(-1)
            with self._lock:
                self._cache[id(m)] = (name, arr)
        else:
            arr = hit[1]
        return arr[start : start + count]

    def f32(self, m: ModelFile, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """Like ``raw``, upcast to float32 (exact for fp16/bf16/fp8; fp64 rounds)."""
        a = self.raw(m, name, start, count)
        return a if a.dtype == np.float32 else a.astype(np.float32)

    def whole(self, m: ModelFile, name: str) -> np.ndarray:
        """The whole tensor as float32, in its shape."""
        return self.f32(m, name).reshape(m.tensors[name].shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._cache.clear()

    def __enter__(self) -> Inputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Output:
    """One result tensor in the output dtype, filled piece by piece from float32 values."""

    def __init__(self, shape: tuple[int, ...], dtype: DType) -> None:
        self.dtype = dtype
        self.shape = shape
        self.flat = np.empty(int(np.prod(shape, dtype=np.int64)), dtype.numpy)
        self.overflow = 0
        self._lock = threading.Lock()

    def put(self, start: int, values: np.ndarray) -> None:
        """Store float32 ``values`` at flat position ``start`` (cast as torch's ``.to()``)."""
        values = values.reshape(-1)
        dst = self.flat[start : start + values.size]
        if self.dtype.code == "F32":
            dst[...] = values
            return
        res, over = cast(values, F32, self.dtype)
        dst[...] = res
        if over:
            with self._lock:
                self.overflow += over

    def array(self) -> np.ndarray:
        return self.flat.reshape(self.shape)


def run_pieces(numel: int, work: Callable[[int, int], None], step: int | None = None) -> None:
    """Call ``work(start, count)`` for every piece, on ``WORKERS`` threads when there are
    several pieces (numpy and preads release the GIL, so pieces compute on both cores)."""
    parts = list(pieces(numel, PIECE if step is None else step))
    if len(parts) <= 1 or WORKERS <= 1:
        for start, count in parts:
            work(start, count)
        return
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="sdtool-arith") as pool:
        for f in [pool.submit(work, s, c) for s, c in parts]:
            f.result()


def pieces(numel: int, step: int = PIECE) -> Iterator[tuple[int, int]]:
    """(start, count) pieces covering ``numel`` elements."""
    for s in range(0, numel, step):
        yield s, min(step, numel - s)


class Overflows:
    """Values that became inf in the cast to the output dtype, by tensor (thread-safe)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def set(self, name: str, n: int) -> None:
        """Record ``n`` for ``name`` (a recomputation, e.g. by --verify, counts once)."""
        if n:
            with self._lock:
                self.counts[name] = n
