"""Compare two model files tensor by tensor: what a conversion kept, what a fine-tune changed.

Both files are opened lazily (any format ``open_model`` reads) and compared by name: tensors only
in A ("missing" from B), only in B ("extra"), shape and dtype changes, and for every pair of equal
shape the element values, streamed one tensor pair at a time in bounded chunks so memory stays
near one chunk, whatever the model's size.

Values are compared bit for bit (a NaN equals a NaN only with the same payload; +0 and -0
differ). For changed elements the largest absolute difference is computed in float64 (floats,
complex) or exactly (integers); elements NaN on exactly one side are counted apart and left out
of the maximum. When dtypes differ, A is cast to B's dtype (round to nearest even, as torch's
``.half()``/``.bfloat16()``) and compared bit for bit with B, so "B is exactly A converted" is
checkable; the maximum difference is between the original values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdtool.errors import TruncatedFile
from sdtool.formats.open import open_model
from sdtool.model import ModelFile, TensorInfo
from sdtool.results import Result
from sdtool.vocab import Progress

CHUNK_ELEMENTS = 4 << 20  # elements per compared slice: temporaries stay near 200 MB at most

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


@dataclass
class TensorDiff:
    """How one tensor name compares between A and B."""

    name: str
    status: str  # a key of STATUSES
    dtype_a: str | None = None
    dtype_b: str | None = None
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    numel: int = 0  # elements compared (0 when values were not compared)
    changed: int = 0  # elements whose bits differ (after the cast when dtypes differ)
    nan_mismatch: int = 0  # elements NaN on exactly one side
    max_abs_diff: float | int | None = None  # over compared elements; None: not compared

    @property
    def counted_as(self) -> str:
        """The status the totals count this tensor under: a dtype change whose values also
        changed (after the cast) is counted as "changed", not as a dtype-only change."""
        if self.status == "dtype" and (self.changed or self.nan_mismatch):
            return "changed"
        return self.status

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "shape_a": None if self.shape_a is None else list(self.shape_a),
            "shape_b": None if self.shape_b is None else list(self.shape_b),
            "numel": self.numel,
            "changed": self.changed,
            "nan_mismatch": self.nan_mismatch,
            "max_abs_diff": _json_number(self.max_abs_diff),
        }


@dataclass(frozen=True)
class DiffResult(Result):
    """The comparison of two files; ``tensors`` in A's order, then B's extra names."""

    a: Path
    b: Path
    format_a: str
    format_b: str
    tensors: list[TensorDiff]
    dtype_tolerant: bool = False
    metadata_a_only: list[str] = field(default_factory=list)
    metadata_b_only: list[str] = field(default_factory=list)
    metadata_changed: list[str] = field(default_factory=list)

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

    def to_json(self) -> dict[str, Any]:
        """The documented --json record (docs/diff.md)."""
        return {
            "schema": SCHEMA,
            "a": {"path": os.fspath(self.a), "format": self.format_a},
            "b": {"path": os.fspath(self.b), "format": self.format_b},
            "identical": self.identical,
            "dtype_tolerant": self.dtype_tolerant,
            "counts": self.counts,
            "changed_elements": sum(t.changed for t in self.tensors),
            "max_abs_diff": _json_number(self.max_abs_diff),
            "metadata": {
                "a_only": self.metadata_a_only,
                "b_only": self.metadata_b_only,
                "changed": self.metadata_changed,
            },
            "tensors": [t.to_json() for t in self.tensors],
        }


def _json_number(x: float | int | None) -> float | int | str | None:
    """JSON has no infinity: an infinite difference is the string ``"inf"``."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return x


def diff(
    a: str | Path,
    b: str | Path,
    *,
    dtype_tolerant: bool = False,
    progress: Progress | None = None,
) -> DiffResult:
    """Compare the tensors of model files ``a`` and ``b``.

    Args:
        a, b: model files in any format open_model reads.
        dtype_tolerant: count a tensor whose dtype differs as identical when A cast to B's
            dtype equals B bit for bit (e.g. B is A converted to fp16); it is still listed.
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
        return _diff_models(ma, mb, dtype_tolerant, progress)


def _diff_models(
    ma: ModelFile, mb: ModelFile, dtype_tolerant: bool, progress: Progress | None
) -> DiffResult:
    tensors: list[TensorDiff] = []

    total = sum(
        t.nbytes
        for n, t in ma.tensors.items()
        if n in mb.tensors and t.shape == mb.tensors[n].shape
    )
    done = 0
    for name, ta in ma.tensors.items():
        tb = mb.tensors.get(name)
        if tb is None:
            tensors.append(TensorDiff(name, "missing", dtype_a=str(ta.dtype), shape_a=ta.shape))
            continue
        td = TensorDiff(
            name, "equal", str(ta.dtype), str(tb.dtype), ta.shape, tb.shape, numel=ta.numel
        )
        if ta.shape != tb.shape:
            td.status, td.numel = "shape", 0
        else:
            _compare_values(ma, mb, name, ta, tb, td)
            if ta.dtype != tb.dtype:
                td.status = "dtype"
            elif td.changed:
                td.status = "changed"
            done += ta.nbytes
            if progress is not None:
                progress(done, total)
        tensors.append(td)
    for name, tb in mb.tensors.items():
        if name not in ma.tensors:
            tensors.append(TensorDiff(name, "extra", dtype_b=str(tb.dtype), shape_b=tb.shape))
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
    )


def _compare_values(
    ma: ModelFile, mb: ModelFile, name: str, ta: TensorInfo, tb: TensorInfo, td: TensorDiff
) -> None:
    """Fill td.changed / nan_mismatch / max_abs_diff, one bounded chunk at a time."""
    worst: float | int = 0
    exact_ints = ta.dtype == tb.dtype and ta.dtype.kind in ("int", "uint")
    chunks_b = _chunks(mb, tb, name)
    for ca in _chunks(ma, ta, name):
        cb = next(chunks_b)
        if ta.dtype != tb.dtype:
            with np.errstate(all="ignore"):
                ca_cast = ca.astype(cb.dtype)
        else:
            ca_cast = ca
        mask = _bits_differ(ca_cast, cb)
        n_changed = int(np.count_nonzero(mask))
        if ta.dtype != tb.dtype:
            # the true difference, not the rounding's: compare the original values everywhere
            mask = np.ones(ca.shape, bool)
        elif n_changed == 0:
            continue
        td.changed += n_changed
        va, vb = ca[mask], cb[mask]
        if exact_ints:
            worst = max(worst, _max_int_diff(va, vb))
        else:
            d, nan_mismatch = _max_float_diff(va, vb)
            td.nan_mismatch += nan_mismatch
            worst = max(worst, d)
    td.max_abs_diff = worst


def _chunks(m: ModelFile, info: TensorInfo, name: str) -> Iterator[np.ndarray]:
    """The tensor's elements in file order, CHUNK_ELEMENTS at a time, as 1-D arrays.

    Bytes that lie in the file as-is are read with plain reads, so the resident memory is one
    chunk (an mmap would leave the whole file resident); other storages go through
    ModelFile.read_info (a copy only for a rare non-contiguous view).
    """
    dt = info.dtype.numpy
    span = info.file_span
    if span is None:
        flat = m.read_info(info, name).reshape(-1)
        for start in range(0, max(flat.size, 1), CHUNK_ELEMENTS):
            yield flat[start : start + CHUNK_ELEMENTS]
        return
    offset, nbytes = span
    if offset + nbytes > m.file_size:
        raise TruncatedFile(
            f"tensor {name!r} needs bytes up to {offset + nbytes} but the file has "
            f"{m.file_size}; the download is truncated",
            path=m.path,
        )
    step = CHUNK_ELEMENTS * dt.itemsize
    with open(m.path, "rb") as f:
        f.seek(offset)
        for start in range(0, max(nbytes, 1), step):
            want = min(step, nbytes - start)
            data = f.read(want)
            if len(data) != want:
                raise TruncatedFile(f"tensor {name!r} ends early; the file shrank", path=m.path)
            yield np.frombuffer(data, dt)


def _bits_differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per element: do the bytes differ? (same dtype and length)"""
    size = a.dtype.itemsize
    if size <= 8:
        u = np.dtype(f"<u{size}")
        return a.view(u) != b.view(u)
    words = size // 8
    return (a.view("<u8").reshape(-1, words) != b.view("<u8").reshape(-1, words)).any(axis=1)


def _max_int_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest |a - b| exactly: the difference of the larger and the smaller, modulo 2**64."""
    if a.size == 0:
        return 0
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    return int((hi.astype(np.uint64) - lo.astype(np.uint64)).max())


def _max_float_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """(largest |a - b| in float64/complex128 ignoring NaNs, elements NaN on one side only)."""
    if a.size == 0:
        return 0.0, 0
    wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
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
