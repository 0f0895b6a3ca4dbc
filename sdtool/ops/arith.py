"""Streaming arithmetic helpers shared by merge and the LoRA commands.

Model arithmetic reads the same tensor from several files, computes in float32 and writes the
result in the output dtype. ``Inputs`` reads pieces of input tensors with ``pread`` (so a
2 GB input never piles up in the process as mapped pages), ``Output`` collects a result in the
output dtype piece by piece with sdtool's torch-exact cast. Memory is then about one output
tensor plus a few pieces per input, whatever the model's size.

Speed: pieces are read into per-thread buffers that are reused (no page faults, no zeroing),
converted to float32 by vectorised bit operations (numpy's fp16 cast is a scalar loop),
computed with in-place numpy ops and cast straight into the output, on ``WORKERS`` threads of
one pool (numpy and ``pread`` release the GIL). No torch: importing it alone costs ~220 MiB
of RSS and seconds of start-up, more than a whole merge's working set.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from sdtool import dtypes
from sdtool.aligned import PageBuffer
from sdtool.dtypes import DType
from sdtool.errors import TruncatedFile
from sdtool.model import ModelFile, TensorInfo
from sdtool.vocab import Progress
from sdtool.write.cast import TO_F32, _f32_to_f16, cast, f16_to_f32
from sdtool.write.plan import OutTensor

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

#: elements per piece of an elementwise computation (1 MiB of float32 per input: a piece of
#: every input stays in a core's cache between the conversion and the arithmetic)
PIECE = 256 * 1024
#: threads computing pieces of one tensor at once
WORKERS = 2
F32 = dtypes.from_code("F32")


class Scratch(threading.local):
    """Per-thread buffers reused from piece to piece (a fresh buffer costs a page fault and a
    zeroing per 4 KiB: as much as the arithmetic itself)."""

    def __init__(self) -> None:
        self.bufs: dict[int, np.ndarray] = {}
        self.reads: dict[int, PageBuffer] = {}

    def read(self, slot: int, file_offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` of this thread's read buffer ``slot``, placed for a ``pread`` from
        ``file_offset`` (sdtool.aligned: the kernel's copy runs 3.5x slower into a buffer a
        few bytes ahead of its source within a page)."""
        buf = self.reads.get(slot)
        if buf is None or buf.size < nbytes:
            buf = self.reads[slot] = PageBuffer(max(nbytes, PIECE * 4))
        return buf.array(file_offset, nbytes)

    def get(self, slot: int, nbytes: int) -> np.ndarray:
        """At least ``nbytes`` bytes (uint8) of this thread's buffer ``slot``."""
        buf = self.bufs.get(slot)
        if buf is None or buf.size < nbytes:
            buf = self.bufs[slot] = np.empty(max(nbytes, PIECE * 4), np.uint8)
        return buf[:nbytes]

    def f32(self, slot: int, count: int) -> np.ndarray:
        """``count`` float32 values of this thread's buffer ``slot``."""
        return self.get(slot, count * 4).view(np.float32)


SCRATCH = Scratch()
#: scratch slots: float32 pieces of the inputs use 0..; raw bytes use RAW + i
RAW = 1000
TMP = 2000


def to_f32(raw: np.ndarray, out: np.ndarray) -> None:
    """Convert ``raw`` (a float dtype sdtool casts) into the float32 array ``out``, exactly
    (fp16/bf16/fp8 -> float32 is exact; float64 rounds to nearest, as numpy and torch do)."""
    fast = TO_F32.get(dtypes.from_numpy(raw.dtype).code)
    if fast is not None:
        fast(raw, out)
    else:
        np.copyto(out, raw, casting="unsafe")


def compute_dtype(info: TensorInfo) -> bool:
    """True for tensors arithmetic may touch: floating point (integers and bools never)."""
    return info.dtype.is_float


def local_span(m: ModelFile, info: TensorInfo) -> tuple[int, int] | None:
    """The tensor's bytes in a local file, to ``pread``; None for a remote file (its own
    reader fetches ranges) or a tensor that is not stored as is."""
    return info.file_span if getattr(m, "source", None) is None else None


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
        self._pool: ThreadPoolExecutor | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The ``WORKERS`` threads computing pieces, for as long as these inputs are open."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="sdtool-arith")
            return self._pool

    def _fd(self, m: ModelFile) -> int:
        with self._lock:
            fd = self._fds.get(id(m))
            if fd is None:
                fd = self._fds[id(m)] = os.open(m.path, os.O_RDONLY)
            return fd

    def raw(
        self,
        m: ModelFile,
        name: str,
        start: int = 0,
        count: int | None = None,
        into: np.ndarray | None = None,
    ) -> np.ndarray:
        """Elements ``start .. start + count`` of the flattened tensor, in its own dtype
        (read into the uint8 buffer ``into`` when given and the tensor lies in the file as is)."""
        info = m.tensors[name]
        count = info.numel - start if count is None else count
        span = local_span(m, info)
        item = info.dtype.itemsize
        if span is not None:
            offset = span[0] + start * item
            buf = np.empty(count * item, np.uint8) if into is None else into[: count * item]
            _pread_into(self._fd(m), buf, offset, name, m.path)
            return buf.view(info.dtype.numpy)
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
        if a.dtype == np.float32:
            return a
        out = np.empty(a.size, np.float32)
        to_f32(a, out)
        return out

    def f32_into(
        self, m: ModelFile, name: str, start: int, out: np.ndarray, slot: int = 0
    ) -> np.ndarray:
        """Elements ``start .. start + out.size`` as float32, into ``out`` (no allocation:
        float32 tensors are read straight into it, others through this thread's scratch
        buffer ``slot``)."""
        info = m.tensors[name]
        local = local_span(m, info) is not None
        if info.dtype.code == "F32" and local:
            self.raw(m, name, start, out.size, into=out.view(np.uint8))
            return out
        if local:
            raw = self.raw(m, name, start, out.size, SCRATCH.get(RAW + slot, out.size * 8))
        else:
            raw = self.raw(m, name, start, out.size)
        to_f32(raw, out)
        return out

    def piece_reader(self, m: ModelFile, name: str) -> Callable[[int, int, int], np.ndarray]:
        """``read(start, count, slot)``: elements ``start .. start + count`` of a tensor that
        lies in a local file as is (``local_span``), as float32, in this thread's scratch
        (``slot``: one per input of a computation; valid until this thread's next read of the
        slot). The lookups ``f32_into`` makes per piece (span, dtype, converter: ~20 us of
        Python per input and piece) are made once here."""
        info = m.tensors[name]
        span = local_span(m, info)
        if span is None:
            raise ValueError(f"{name!r} is not stored as is in a local file")
        fd, base, path = self._fd(m), span[0], m.path
        item, npdt, code = info.dtype.itemsize, info.dtype.numpy, info.dtype.code
        conv = TO_F32.get(code)

        def read(start: int, count: int, slot: int) -> np.ndarray:
            offset = base + start * item
            buf = SCRATCH.read(slot, offset, count * item)
            _pread_into(fd, buf, offset, name, path)
            if code == "F32":
                return buf.view(np.float32)  # read in place (the computation may overwrite it)
            out = SCRATCH.f32(slot, count)
            if conv is not None:
                conv(buf.view(npdt), out)
            else:
                np.copyto(out, buf.view(npdt), casting="unsafe")
            return out

        return read

    def scaled_reader(
        self, m: ModelFile, name: str
    ) -> Callable[[int, int, int], tuple[np.ndarray, bool]]:
        """``piece_reader``'s ``read``, returning ``(values, scaled)``: for fp16, ``scaled``
        (True unless the piece holds an inf/NaN) says the values are times 2**-112 (exactly:
        ``cast.f16_to_f32``'s ``scaled``); other dtypes are never scaled."""
        read = self.piece_reader(m, name)
        info = m.tensors[name]
        if info.dtype.code != "F16":
            return lambda start, count, slot: (read(start, count, slot), False)
        span = local_span(m, info)
        assert span is not None
        fd, base, path = self._fd(m), span[0], m.path

        def read_scaled(start: int, count: int, slot: int) -> tuple[np.ndarray, bool]:
            offset = base + start * 2
            buf = SCRATCH.read(slot, offset, count * 2)
            _pread_into(fd, buf, offset, name, path)
            out = SCRATCH.f32(slot, count)
            return out, f16_to_f32(buf.view(np.float16), out, scaled=True)

        return read_scaled

    def whole(self, m: ModelFile, name: str) -> np.ndarray:
        """The whole tensor as float32, in its shape."""
        return self.f32(m, name).reshape(m.tensors[name].shape)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._cache.clear()

    def __enter__(self) -> Inputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pread_into(fd: int, buf: np.ndarray, offset: int, name: str, path: Path) -> None:
    """Fill the uint8 array ``buf`` from ``fd`` at ``offset`` (TruncatedFile at the end)."""
    view = buf.data
    got, n = 0, len(view)
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise TruncatedFile(
                f"tensor {name!r}: the file ended at byte {offset + got}; "
                "the download is truncated",
                path=path,
            )
        got += k


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
        over = store(values, self.flat[start : start + values.size], self.dtype)
        if over:
            with self._lock:
                self.overflow += over

    def array(self) -> np.ndarray:
        return self.flat.reshape(self.shape)


def store(
    values: np.ndarray, dst: np.ndarray, dtype: DType, temps: tuple[int, int] = (TMP, TMP + 1)
) -> int:
    """Cast the flat float32 ``values`` into ``dst`` (``dtype``, as torch's ``.to()``); the
    number of finite values that became inf. ``temps``: the scratch slots the fp16 cast may
    use (a caller passes slots whose values are dead, e.g. the inputs' of a computed piece:
    1 MiB less in the core's cache per piece); slots holding ``values`` are not used."""
    if dtype.code == "F32":
        dst[...] = values
        return 0
    if dtype.code == "F16":
        # sdtool.write.cast's exact float16 kernel on the whole piece, its scratch reused
        n = values.size * 4
        t1, t2 = (SCRATCH.get(i, n) for i in temps)
        if np.may_share_memory(values, t1) or np.may_share_memory(values, t2):
            t1, t2 = SCRATCH.get(TMP, n), SCRATCH.get(TMP + 1, n)
        if _f32_to_f16(values, dst, t1.view(np.uint32), t2.view(np.uint32)):
            return 0  # else a value needs the exact path
    return cast(values, F32, dtype, out=dst)[1]  # straight into ``dst``


def run_pieces(
    numel: int,
    work: Callable[[int, int], None],
    step: int | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> None:
    """Call ``work(start, count)`` for every piece, on ``WORKERS`` threads when there are
    several pieces (numpy and preads release the GIL, so pieces compute on both cores):
    those of ``pool`` (``Inputs.pool``), else a pool made for this call."""
    parts = list(pieces(numel, step))
    if len(parts) <= 1 or WORKERS <= 1:
        for start, count in parts:
            work(start, count)
        return
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(
                ThreadPoolExecutor(WORKERS, thread_name_prefix="sdtool-arith")
            )
        futures = [pool.submit(work, s, c) for s, c in parts]
        try:
            for f in futures:
                f.result()
        finally:
            for f in futures:
                f.cancel()


#: output bytes computed ahead of the tensor the writer asks for (``Ahead``)
AHEAD_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Task:
    """One elementwise output tensor: its size, how to allocate it, how to fill one piece."""

    name: str
    nbytes: int
    new: Callable[[], Output]
    piece: Callable[[Output, int, int], None]  # (out, start, count): compute and ``out.put``


class Ahead:
    """Elementwise tensors computed ahead, piece by piece, on ``pool``, in ``tasks``' order
    (the order the writer will ask for them): while the writer waits for, then writes, one
    tensor, both workers are already on the pieces of the next ones, with no pause at the
    end of each tensor (a tensor of 7 pieces no longer leaves one worker idle for the last).

    ``get(name)`` returns the finished Output; about ``budget`` bytes of outputs are computed
    ahead of it, each task once. A name asked before its turn is computed then; one asked
    again (as --verify does) is computed again, without look-ahead. Thread-safe."""

    def __init__(
        self, pool: ThreadPoolExecutor, tasks: Sequence[Task], budget: int | None = None
    ) -> None:
        self.pool = pool
        self.tasks = list(tasks)
        self.where = {t.name: i for i, t in enumerate(self.tasks)}
        self.budget = AHEAD_BYTES if budget is None else budget
        self.next = 0  # the next task to start ahead
        self.started: set[str] = set()
        self.running: dict[str, tuple[Output, list[Future[None]], int]] = {}
        self.held = 0  # bytes of outputs started and not yet handed out
        self._lock = threading.Lock()

    def _start(self, t: Task) -> None:
        out = t.new()
        futures = [self.pool.submit(t.piece, out, s, c) for s, c in pieces(out.flat.size)]
        self.running[t.name] = (out, futures, t.nbytes)
        self.started.add(t.name)
        self.held += t.nbytes

    def _top_up(self) -> None:
        while self.next < len(self.tasks) and self.held < self.budget:
            t = self.tasks[self.next]
            self.next += 1
            if t.name not in self.started:
                self._start(t)

    def get(self, name: str) -> Output:
        with self._lock:
            if name not in self.running:
                self._start(self.tasks[self.where[name]])
            self._top_up()
            out, futures, _ = self.running[name]
        try:
            for f in futures:
                f.result()
        finally:
            with self._lock:
                _, _, nbytes = self.running.pop(name)
                self.held -= nbytes
                self._top_up()
        return out

    def cancel(self) -> None:
        """Drop the pieces not started (an error ended the write)."""
        with self._lock:
            for _, futures, _ in self.running.values():
                for f in futures:
                    f.cancel()
            self.running.clear()


def pieces(numel: int, step: int | None = None) -> Iterator[tuple[int, int]]:
    """(start, count) pieces covering ``numel`` elements (``PIECE`` each unless ``step``: read
    when called, so that tests may make pieces small)."""
    step = PIECE if step is None else step
    for s in range(0, numel, step):
        yield s, min(step, numel - s)


class Overflows:
    """Values that became inf in the cast to the output dtype, by tensor (thread-safe), and
    what to do about them (``on_overflow``: ``fail`` or ``warn``)."""

    def __init__(self, on_overflow: str = "fail") -> None:
        self.counts: dict[str, int] = {}
        self.on_overflow = on_overflow
        self._pieces: dict[str, dict[int, int]] = {}
        self._lock = threading.Lock()

    def done(self, name: str, out: Output) -> np.ndarray:
        """``out``'s array once computed: CastOverflow (nothing is written) when the cast
        overflowed and ``on_overflow`` is ``fail``, else the count is recorded."""
        if out.overflow and self.on_overflow == "fail":
            from sdtool.write import CastOverflow

            raise CastOverflow(
                f"the cast to {out.dtype} overflows to inf in {name!r} ({out.overflow} values); "
                'nothing was written. Keep a wider dtype, or pass on_overflow="warn"',
                {name: out.overflow},
            )
        self.set(name, out.overflow)
        return out.array()

    def piece(self, name: str, start: int, n: int, dtype: DType) -> None:
        """Record ``n`` overflows in the piece of ``name`` at ``start`` (CastOverflow when
        ``on_overflow`` is ``fail``: the writer stops, nothing is written); the tensor's count
        is the sum over its pieces (a recomputed piece counts once)."""
        if not n:
            return
        if self.on_overflow == "fail":
            from sdtool.write import CastOverflow

            raise CastOverflow(
                f"the cast to {dtype} overflows to inf in {name!r} ({n} values from element "
                f'{start} on); nothing was written. Keep a wider dtype, or pass on_overflow="warn"',
                {name: n},
            )
        with self._lock:
            per = self._pieces.setdefault(name, {})
            per[start] = n
            self.counts[name] = sum(per.values())

    def set(self, name: str, n: int) -> None:
        """Record ``n`` for ``name`` (a recomputation, e.g. by --verify, counts once)."""
        if n:
            with self._lock:
                self.counts[name] = n


#: a frozen arithmetic result: a dataclass with ``overflows``, ``output_bytes``, ``verified``
#: and ``seconds`` fields about its output
Written = TypeVar("Written", bound="DataclassInstance")


def write_result(
    result: Written,
    plan: Sequence[OutTensor],
    out: Path,
    t0: float,
    *,
    metadata: dict[str, str],
    overwrite: bool,
    verify: bool,
    overflows: Overflows | None = None,
    progress: Progress | None = None,
) -> Written:
    """Write ``plan`` to ``out`` (sdtool's atomic writer); ``result`` with its output fields
    filled: the overflows (the computed tensors' and the writer's casts'), size, verification,
    time."""
    from sdtool.write import write_model

    w = write_model(
        plan,
        out,
        metadata=metadata,
        overwrite=overwrite,
        verify=verify,
        on_overflow="fail" if overflows is None else overflows.on_overflow,
        progress=progress,
    )
    return replace(
        result,
        overflows={**(overflows.counts if overflows else {}), **w.overflows},
        output_bytes=w.nbytes,
        verified=w.verified,
        seconds=time.perf_counter() - t0,
    )
