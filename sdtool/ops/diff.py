"""Compare two model files tensor by tensor: what a conversion kept, what a fine-tune changed.

Both files are opened lazily (any format ``open_model`` reads) and compared by name: tensors only
in A ("missing" from B), only in B ("extra"), shape and dtype changes, and for every pair of equal
shape the element values, through bounded windows of both files (mapped, or read where a file
cannot be mapped) so memory stays near a few windows, whatever the model's size.

Values are compared bit for bit (a NaN equals a NaN only with the same payload; +0 and -0
differ). For changed elements the largest absolute difference is computed in float64 (floats,
complex) or exactly (integers); elements NaN on exactly one side are counted apart and left out
of the maximum. When dtypes differ, A is cast to B's dtype (round to nearest even, as torch's
``.half()``/``.bfloat16()``) and compared bit for bit with B, so "B is exactly A converted" is
checkable; the maximum difference is between the original values.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from sdtool.aligned import PageBuffer
from sdtool.errors import TruncatedFile, UnsupportedDtype
from sdtool.formats.open import open_model
from sdtool.model import ModelFile, TensorInfo
from sdtool.results import JsonKey, Result, json_key
from sdtool.vocab import Progress

if TYPE_CHECKING:  # numpy is imported only to decode a piece that differs (docs/diff.md)
    import numpy as np

#: elements per compared piece and side: 512 KiB of fp32. Smaller pieces cost more Python
#: per byte and, as the two workers then take turns on the GIL more often, more context
#: switches and system time: 256 KiB ones (a worker's two buffers as large as a core's
#: 512 KiB L2 here) 1,700 switches and 4-20 % more user time, 128 KiB ones 23,000 (docs/diff.md)
CHUNK_ELEMENTS = 128 << 10

SCHEMA = "sdtool.diff/2"

#: status -> what it means; the order is the display order
STATUSES: dict[str, str] = {
    "missing": "in A only",
    "extra": "in B only",
    "shape": "shape differs (values not compared)",
    "dtype": "dtype differs (A cast to B's dtype, then compared bit for bit)",
    "changed": "same dtype and shape, some elements differ",
    "equal": "same dtype, shape and bits",
}


def json_number(x: float | int | None) -> float | int | str | None:
    """JSON has no infinity: an infinite difference is the string ``"inf"``."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return x


@dataclass(frozen=True)
class TensorDiff(Result):
    """How one tensor name compares between A and B."""

    name: str
    status: str  # a key of STATUSES
    dtype_a: str | None = None
    dtype_b: str | None = None
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    numel: int = 0  # elements compared (0 when values were not compared)
    changed: int | None = 0  # elements whose bits differ (after the cast when dtypes differ);
    # None: the tensor differs, elements not counted (``fast``)
    nan_mismatch: int = 0  # elements NaN on exactly one side
    #: over compared elements; None: not compared
    max_abs_diff: float | int | None = field(default=None, metadata=json_key(as_=json_number))

    @property
    def counted_as(self) -> str:
        """The status the totals count this tensor under: a dtype change whose values also
        changed (after the cast) is counted as "changed", not as a dtype-only change."""
        if self.status == "dtype" and (self.changed or self.changed is None or self.nan_mismatch):
            return "changed"
        return self.status


@dataclass(frozen=True)
class DiffResult(Result):
    """The comparison of two files; ``tensors`` in A's order, then B's extra names."""

    JSON_SCHEMA: ClassVar[str | None] = SCHEMA
    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = (
        ("a", "side_a"), ("b", "side_b"), "identical", "dtype_tolerant", "fast", "counts",
        "changed_elements", ("max_abs_diff", "max_abs_diff", json_number),
        ("metadata", "metadata_changes"), "tensors",
    )  # fmt: skip

    a: Path
    b: Path
    format_a: str
    format_b: str
    tensors: list[TensorDiff]
    dtype_tolerant: bool = False
    metadata_a_only: list[str] = field(default_factory=list)
    metadata_b_only: list[str] = field(default_factory=list)
    metadata_changed: list[str] = field(default_factory=list)
    fast: bool = False  # compared by bytes only: changed tensors have no element counts

    def count(self, status: str) -> int:
        """Tensors counted under ``status``: "changed" holds every tensor whose values differ,
        its dtype changed or not; "dtype" only those whose one change is the dtype (A cast to
        B's dtype equals B bit for bit)."""
        return sum(1 for t in self.tensors if t.counted_as == status)

    @property
    def counts(self) -> dict[str, int]:
        return {s: self.count(s) for s in STATUSES}

    @property
    def max_abs_diff(self) -> float | int | None:
        values = [t.max_abs_diff for t in self.tensors if t.max_abs_diff is not None]
        return max(values) if values else None

    @property
    def identical(self) -> bool:
        """Same names, shapes, dtypes and bits; with dtype_tolerant, B may be A cast exactly."""
        for t in self.tensors:
            if t.status == "equal":
                continue
            if (
                t.status == "dtype"
                and self.dtype_tolerant
                and t.changed == 0
                and not t.nan_mismatch
            ):
                continue
            return False
        return True

    @property
    def side_a(self) -> dict[str, Any]:
        return {"path": self.a, "format": self.format_a}

    @property
    def side_b(self) -> dict[str, Any]:
        return {"path": self.b, "format": self.format_b}

    @property
    def changed_elements(self) -> int | None:
        """Elements whose bits differ over all tensors (None when ``fast`` did not count)."""
        return None if self.fast else sum(t.changed or 0 for t in self.tensors)

    @property
    def metadata_changes(self) -> dict[str, list[str]]:
        return {
            "a_only": self.metadata_a_only,
            "b_only": self.metadata_b_only,
            "changed": self.metadata_changed,
        }


def diff(
    a: str | Path,
    b: str | Path,
    *,
    dtype_tolerant: bool = False,
    fast: bool = False,
    progress: Progress | None = None,
) -> DiffResult:
    """Compare the tensors of model files ``a`` and ``b``.

    Args:
        a, b: model files in any format open_model reads.
        dtype_tolerant: count a tensor whose dtype differs as identical when A cast to B's
            dtype equals B bit for bit (e.g. B is A converted to fp16); it is still listed.
        fast: decide each tensor from its bytes alone: reading a tensor stops at its first
            differing piece, and changed tensors get no element counts or largest difference
            (``changed`` and ``max_abs_diff`` are None). The verdict is the same as without it.
        progress: called as ``progress(bytes_done, bytes_total)`` over A's compared tensors.

    Returns:
        DiffResult; ``.identical`` is what `sdtool diff` turns into exit code 0.

    Raises:
        SdtoolError when either file cannot be opened or its tensor bytes cannot be read.

    Example:
        >>> r = diff("model.ckpt", "model.safetensors")
        >>> r.identical, r.counts["changed"]
    """
    with open_model(a) as ma, open_model(b) as mb:
        return _diff_models(ma, mb, dtype_tolerant, fast, progress)


def _diff_models(
    ma: ModelFile, mb: ModelFile, dtype_tolerant: bool, fast: bool, progress: Progress | None
) -> DiffResult:
    rows: list[TensorDiff | _Pair] = []  # pairs become records once compared
    pairs: list[_Pair] = []
    for name, ta in ma.tensors.items():
        tb = mb.tensors.get(name)
        if tb is None:
            rows.append(TensorDiff(name, "missing", dtype_a=str(ta.dtype), shape_a=ta.shape))
        elif ta.shape != tb.shape:
            rows.append(TensorDiff(name, "shape", str(ta.dtype), str(tb.dtype), ta.shape, tb.shape))
        else:
            pairs.append(_Pair(name, ta, tb, "equal" if ta.dtype == tb.dtype else "dtype"))
            rows.append(pairs[-1])
    for name, tb in mb.tensors.items():
        if name not in ma.tensors:
            rows.append(TensorDiff(name, "extra", dtype_b=str(tb.dtype), shape_b=tb.shape))
    _compare_all(ma, mb, pairs, fast, progress)
    tensors = [r.record(fast) if isinstance(r, _Pair) else r for r in rows]
    ka, kb = ma.metadata, mb.metadata
    return DiffResult(
        ma.path,
        mb.path,
        str(ma.format),
        str(mb.format),
        tensors,
        dtype_tolerant,
        metadata_a_only=[k for k in ka if k not in kb],
        metadata_b_only=[k for k in kb if k not in ka],
        metadata_changed=[k for k in ka if k in kb and ka[k] != kb[k]],
        fast=fast,
    )


@dataclass
class _Pair:
    """Two tensors of the same name and shape, and what their comparison found so far."""

    name: str
    ta: TensorInfo
    tb: TensorInfo
    status: str  # "equal" (same dtype) or "dtype"
    changed: int | None = 0  # None: differs, not counted (fast)
    nan_mismatch: int = 0
    worst: float | int = 0
    decided: bool = False  # fast mode: a difference was found, stop reading this pair

    def record(self, fast: bool) -> TensorDiff:
        """The pair's frozen record, once every piece is folded in."""
        status = self.status
        if status == "equal" and (self.changed or self.changed is None):
            status = "changed"
        exact = not fast or status == "equal"  # fast: no decoding, no maximum
        ta, tb = self.ta, self.tb
        return TensorDiff(
            self.name, status, str(ta.dtype), str(tb.dtype), ta.shape, tb.shape, ta.numel,
            self.changed, self.nan_mismatch, self.worst if exact else None,
        )  # fmt: skip


@dataclass
class _Task:
    """Elements [start, stop) of one pair: the unit a worker compares (and then drops the
    pages of from this process)."""

    pair: _Pair
    sides: tuple[_Side, _Side]
    start: int
    stop: int


@dataclass
class _Tally:
    """What a task found, folded into its pair under the lock when the task ends."""

    changed: int = 0
    nan_mismatch: int = 0
    worst: float | int = 0
    differs: bool = False


#: pieces per task (4 MiB of fp32): a worker claims a task (under a lock), maps its window of
#: each side and reports its progress once for all its pieces
TASK_PIECES = 8


def _workers() -> int:
    """Workers, the caller's thread one of them: memcmp (through ctypes, page faults and
    all), preads and numpy release the GIL, so one per core, at most two (both read memory
    through the same bus)."""
    return max(1, min(2, os.cpu_count() or 1))


def _compare_all(
    ma: ModelFile, mb: ModelFile, pairs: list[_Pair], fast: bool, progress: Progress | None
) -> None:
    """Compare every pair's values in tasks of a few pieces, on the caller's thread and a
    few more.

    A worker claims a task and maps, on each side, the window of the file that holds the
    task's bytes (``_Side.window``), compares them piece by piece with one libc memcmp on the
    mapped addresses and unmaps both: the memcmp reads the page cache's own pages, with no
    copy out of it (the copy is all of ``cat``'s system time), and RSS holds only the open
    windows. Where a file cannot be mapped, the pieces are read with preads into two small
    buffers per worker instead. A piece whose bytes are equal on both sides is never decoded,
    so two equal files are compared at the speed of reading them. Nothing is handed from
    thread to thread per piece (a queue hand-off costs more than a memcmp). A pair whose
    values must be materialised (a compressed or strided source) is one task. ``progress``
    is called from the caller's thread, after each of its own tasks and once at the end: no
    thread waits for news from the others (an idle caller woken per task cost 10,000 futex
    calls and 16,000 context switches over two 7.7 GB files).
    """
    total = sum(p.ta.nbytes for p in pairs)
    lock = threading.Lock()
    stop = threading.Event()
    done = [0]  # bytes of A compared, under the lock
    errors: list[BaseException] = []
    files = _Files()
    tasks = _tasks(ma, mb, pairs, files)

    def work(report: Progress | None) -> None:
        bufs: list[PageBuffer | None] = [None, None]
        try:
            while not stop.is_set():
                with lock:
                    task = next(tasks, None)
                if task is None:
                    break
                p = task.pair
                if fast and p.decided:
                    continue
                tally = _run_task(task, bufs, fast, stop)
                with lock:
                    _fold(p, tally, fast)
                    done[0] += (task.stop - task.start) * p.ta.dtype.itemsize
                    now = done[0]
                if report is not None:
                    report(now, total)
        except BaseException as e:  # the first one is raised in the caller's thread
            stop.set()
            with lock:
                errors.append(e)

    threads = [
        threading.Thread(target=work, args=(None,), name=f"sdtool-diff-{i}")
        for i in range(1, _workers())
    ]
    try:
        for t in threads:
            t.start()
        work(progress)
        for t in threads:  # before ``stop``: the others may still be in their last task
            t.join()
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:
                t.join()
        files.close()
    if errors:
        raise errors[0]
    if progress is not None:
        progress(done[0], total)


def _tasks(ma: ModelFile, mb: ModelFile, pairs: list[_Pair], files: _Files) -> Iterator[_Task]:
    """Every pair in tasks, in A's order: pairs whose bytes lie in both files in runs of
    TASK_PIECES pieces, the others whole (materialised once, by one worker)."""
    for p in pairs:
        sides = (_Side.of(ma, p.name, p.ta, files), _Side.of(mb, p.name, p.tb, files))
        if sides[0].values is not None or sides[1].values is not None:
            yield _Task(p, sides, 0, p.ta.numel)
            continue
        step = max(1, CHUNK_ELEMENTS) * TASK_PIECES
        for start in range(0, p.ta.numel, step):
            yield _Task(p, sides, start, min(start + step, p.ta.numel))


def _run_task(
    task: _Task, bufs: list[PageBuffer | None], fast: bool, stop: threading.Event
) -> _Tally:
    """Compare a task piece by piece through a window on each side (``_Side.window``), both
    closed when the task ends, by an error too."""
    p, (sa, sb) = task.pair, task.sides
    tally = _Tally()
    step = max(1, CHUNK_ELEMENTS)
    with (
        sa.window(task.start, task.stop, bufs, 0) as wa,
        sb.window(task.start, task.stop, bufs, 1) as wb,
    ):
        for start in range(task.start, task.stop, step):
            if stop.is_set() or (fast and (p.decided or tally.differs)):
                break
            end = min(start + step, task.stop)
            _compare_piece(p.ta, p.tb, wa.piece(start, end), wb.piece(start, end), fast, tally)
    return tally


def _fold(p: _Pair, tally: _Tally, fast: bool) -> None:
    """Add a task's tally to its pair (under the lock)."""
    if fast:
        if tally.differs:
            p.changed, p.decided = None, True
        return
    if p.changed is not None:
        p.changed += tally.changed
    p.nan_mismatch += tally.nan_mismatch
    p.worst = max(p.worst, tally.worst)


def _compare_piece(
    ta: TensorInfo, tb: TensorInfo, piece_a: Any, piece_b: Any, fast: bool, tally: _Tally
) -> None:
    """Fold one piece of a pair into the tally (bytes first, decoding only a difference)."""
    same_dtype = ta.dtype == tb.dtype
    if same_dtype and isinstance(piece_a, _Raw) and isinstance(piece_b, _Raw):
        if _same_bytes(piece_a, piece_b):
            return
        if fast:  # one dtype: the bits differ where the bytes do; nothing to decode
            tally.differs = True
            return
    import numpy as np  # only now: equal bytes need no numpy (its import is 0.2 CPU-s)

    ca = _values(piece_a, ta)
    cb = _values(piece_b, tb)
    if same_dtype:
        mask = _bits_differ(ca, cb)
        n_changed = int(np.count_nonzero(mask))
        if n_changed == 0:
            return
    else:
        ca_cast = _cast_like(ca, ta, tb)
        n_changed = int(np.count_nonzero(_bits_differ(ca_cast, cb)))
        # the true difference, not the rounding's: compare the original values everywhere
        mask = None
    if n_changed:
        tally.differs = True
    if fast:
        return
    tally.changed += n_changed
    va, vb = (ca, cb) if mask is None else (ca[mask], cb[mask])
    if same_dtype and ta.dtype.kind in ("int", "uint"):
        tally.worst = max(tally.worst, _max_int_diff(va, vb))
    else:
        d, nan_mismatch = _max_float_diff(va, vb)
        tally.nan_mismatch += nan_mismatch
        tally.worst = max(tally.worst, d)


def _cast_like(ca: np.ndarray, ta: TensorInfo, tb: TensorInfo) -> np.ndarray:
    """A's values in B's dtype, with the bits sdtool's convert (and torch's ``.to()``) give."""
    import numpy as np

    from sdtool.write.cast import cast, check_cast

    try:
        check_cast(ta.dtype, tb.dtype)
    except UnsupportedDtype:
        with np.errstate(all="ignore"):
            return ca.astype(tb.dtype.numpy)
    return cast(np.ascontiguousarray(ca), ta.dtype, tb.dtype)[0]


class _Raw(NamedTuple):
    """A piece's bytes as they lie in the file: ``size`` bytes at address ``addr``, in a
    mapped window of the file or in a worker's read buffer; ``source[offset:offset + size]``
    are the same bytes for decoding (a copy out of a mapping, which so keeps no export that
    would stop it from closing; a view of a buffer)."""

    addr: int
    size: int
    source: mmap.mmap | memoryview
    offset: int


def _values(piece: Any, info: TensorInfo) -> np.ndarray:
    """A piece as elements: raw bytes are decoded from their source, arrays pass through."""
    import numpy as np

    if not isinstance(piece, _Raw):
        return piece
    return np.frombuffer(piece.source[piece.offset : piece.offset + piece.size], info.dtype.numpy)


def _same_bytes(a: _Raw, b: _Raw) -> bool:
    """Are two pieces' bytes equal: one libc memcmp on their addresses (it lets go of the GIL;
    on a mapped window it reads the page cache's own pages)."""
    return a.size == b.size and _memcmp()(a.addr, b.addr, a.size) == 0


@functools.cache
def _memcmp() -> Callable[[int, int, int], int]:
    """libc's memcmp through ctypes, its argument types set once (loaded on first use)."""
    import ctypes

    fn = ctypes.CDLL(None).memcmp
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


#: windows start and end at multiples of 2 MiB in the file (or at its end): a 2 MiB folio of
#: the page cache inside a window is then mapped by one page-table entry (a PMD) instead of
#: 512, and this machine's kernel time for mapping the pair halved (docs/diff.md)
WINDOW_ALIGN = 2 << 20


def _map(fd: int, offset: int, length: int) -> mmap.mmap:
    """``length`` bytes of ``fd`` from ``offset`` (a multiple of WINDOW_ALIGN), mapped.
    ACCESS_COPY (MAP_PRIVATE) because ctypes finds the address of writable buffers only; the
    pages stay the page cache's own, mapped read-only, as nothing writes to them."""
    return mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=offset)


class _Files:
    """One read-only descriptor per file, read sequentially (a hint for read-ahead), all
    closed when the comparison ends; and which of them cannot be mapped (read with preads)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.unmappable: set[int] = set()

    def of(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            return self._fds[path]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass
class _Side:
    """One side of a pair: where its raw bytes lie (``fd``, ``offset``), or how to get its
    values when they do not lie in the file as they are (``values``, materialised once)."""

    name: str
    item: int
    fd: int = -1
    offset: int = 0
    path: Path | None = None
    files: _Files | None = None
    values: Callable[[], np.ndarray] | None = None
    _flat: np.ndarray | None = None

    @classmethod
    def of(cls, m: ModelFile, name: str, info: TensorInfo, files: _Files) -> _Side:
        holder, hinfo = m.locate(name) if name in m.tensors else (m, info)
        span = hinfo.file_span
        item = info.dtype.itemsize
        if span is None:
            return cls(name, item, values=lambda: holder.read_info(hinfo, name).reshape(-1))
        offset, nbytes = span
        holder.check_end(name, offset + nbytes)
        return cls(name, item, files.of(holder.path), offset, holder.path, files)

    def window(self, start: int, stop: int, bufs: list[PageBuffer | None], which: int) -> _Window:
        """Elements [start, stop), handed out piece by piece: mapped from the file (one
        page-aligned window, never past the file's end), else read piece by piece into
        ``bufs[which]`` (the file cannot be mapped), or slices of the materialised values."""
        if self.values is not None:
            if self._flat is None:
                self._flat = self.values()
            return _Values(self._flat)
        at, n = self.offset + start * self.item, (stop - start) * self.item
        files = self.files
        if files is not None and self.fd not in files.unmappable:
            size = os.fstat(self.fd).st_size
            if size < at + n:
                raise self.shrank()
            base = at - at % WINDOW_ALIGN
            end = min(size, -(-(at + n) // WINDOW_ALIGN) * WINDOW_ALIGN)
            try:
                return _Mapped(_map(self.fd, base, end - base), at - base, start, self.item)
            except ValueError:  # mmap's own size check: the file shrank since the fstat
                raise self.shrank() from None
            except OSError:  # a file system that cannot map: read this file from now on
                files.unmappable.add(self.fd)
        buf = bufs[which]
        if buf is None or buf.size < min(n, CHUNK_ELEMENTS * self.item):
            buf = bufs[which] = PageBuffer(CHUNK_ELEMENTS * self.item)
        return _Read(self, buf)

    def shrank(self) -> TruncatedFile:
        return TruncatedFile(f"tensor {self.name!r} ends early; the file shrank", path=self.path)


class _Window:
    """A task's elements of one side; ``piece`` gives elements [start, stop) of the tensor
    (within the window), ``close`` (or leaving a ``with``) releases what it holds."""

    __slots__ = ()

    def piece(self, start: int, stop: int) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> _Window:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Mapped(_Window):
    """A window mapped from the file: pieces are addresses in it, no copy. Mapped file pages
    count in the process's RSS while mapped: a window is a task's bytes (TASK_PIECES pieces),
    unmapped when the task ends."""

    __slots__ = ("addr", "first", "item", "lead", "mm")

    def __init__(self, mm: mmap.mmap, lead: int, first: int, item: int) -> None:
        import ctypes

        self.mm, self.lead, self.first, self.item = mm, lead, first, item
        # the address; the export that finds it ends with this line, so ``close`` can unmap
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))

    def piece(self, start: int, stop: int) -> _Raw:
        at = self.lead + (start - self.first) * self.item
        return _Raw(self.addr + at, (stop - start) * self.item, self.mm, at)

    def close(self) -> None:
        self.mm.close()


class _Read(_Window):
    """A window read piece by piece with preads into a worker's buffer, placed as the bytes
    lie in their pages (``sdtool.aligned``): where the file cannot be mapped."""

    __slots__ = ("addr", "buf", "side")

    def __init__(self, side: _Side, buf: PageBuffer) -> None:
        self.side, self.buf, self.addr = side, buf, buf.address

    def piece(self, start: int, stop: int) -> _Raw:
        side = self.side
        want = (stop - start) * side.item
        at = side.offset + start * side.item
        offset, view = self.buf.at(at, want)
        got = 0
        while got < want:
            k = os.preadv(side.fd, [view[got:]], at + got)
            if k == 0:
                raise side.shrank()
            got += k
        return _Raw(self.addr + offset, want, view, 0)


class _Values(_Window):
    """A window of materialised values: pieces are slices."""

    __slots__ = ("flat",)

    def __init__(self, flat: np.ndarray) -> None:
        self.flat = flat

    def piece(self, start: int, stop: int) -> np.ndarray:
        return self.flat[start:stop]


def _bits_differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per element: do the bytes differ? (same dtype and length)"""
    import numpy as np

    size = a.dtype.itemsize
    if size <= 8:
        u = np.dtype(f"<u{size}")
        return a.view(u) != b.view(u)
    words = size // 8
    return (a.view("<u8").reshape(-1, words) != b.view("<u8").reshape(-1, words)).any(axis=1)


def _max_int_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest |a - b| exactly: the difference of the larger and the smaller, modulo 2**64."""
    import numpy as np

    if a.size == 0:
        return 0
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    return int((hi.astype(np.uint64) - lo.astype(np.uint64)).max())


def _max_float_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """(largest |a - b| in float64/complex128 ignoring NaNs, elements NaN on one side only)."""
    import numpy as np

    if a.size == 0:
        return 0.0, 0
    wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
    with np.errstate(all="ignore"):  # signalling NaNs warn as they widen
        fa, fb = a.astype(wide), b.astype(wide)
    nan_a, nan_b = np.isnan(fa), np.isnan(fb)
    one_nan = int(np.count_nonzero(nan_a != nan_b))
    keep = ~(nan_a | nan_b)
    fa, fb = fa[keep], fb[keep]
    if fa.size == 0:
        return 0.0, one_nan
    with np.errstate(all="ignore"):
        d = np.where(fa == fb, 0.0, np.abs(fa - fb))  # inf == inf: 0; inf vs finite: inf
    return float(d.max()), one_nan
