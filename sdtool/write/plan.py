"""A write plan: the output tensors, each saying where its values come from and what to write.

Every writer (safetensors, torch) takes a sequence of OutTensor and streams it: convert, prune
and extract build theirs (EMA swaps, dropped parts, computed fixes) and hand it to
``sdtool.write.write_model``. A plan holds no tensor data: values are read from ``source``
when the writer reaches them, cast in bounded pieces (``stream.Chunks``), written, let go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import prod

import numpy as np

from sdtool.dtypes import DType
from sdtool.model import ModelFile, TensorInfo
from sdtool.vocab import CASTABLE, cast_target


@dataclass(frozen=True, eq=False)
class OutTensor:
    """One tensor of the output.

    Attributes:
        name: its name in the output.
        source: the opened file its values come from.
        info: what to read there (may be a tensor outside ``source.tensors``).
        dtype: the dtype to write; a torch-exact cast when it differs from the values' dtype.
        make: computed values instead of reading ``info`` (e.g. prune's --fix-clip); must
            return an array of ``info.shape``; its own dtype is cast to ``dtype`` if needed.
        pieces: with ``make``, the same values as pieces that writers take instead (nothing
            holds the whole tensor; the safetensors writer runs them on its threads): in order,
            ``(nbytes, fill)``, ``fill(out)`` writing the piece's bytes, in ``dtype``, into the
            uint8 array ``out`` of ``nbytes``.
    """

    name: str
    source: ModelFile
    info: TensorInfo
    dtype: DType
    make: Callable[[], np.ndarray] | None = None
    pieces: Callable[[], Iterable[tuple[int, Callable[[np.ndarray], None]]]] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def nbytes(self) -> int:
        """Bytes this tensor takes in the output."""
        return prod(self.info.shape) * self.dtype.itemsize

    @property
    def is_cast(self) -> bool:
        return self.make is None and self.dtype != self.info.dtype

    @property
    def copy_span(self) -> tuple[int, int] | None:
        """(offset, length) in the source file when the output bytes are exactly those bytes."""
        if self.make is not None or self.dtype != self.info.dtype:
            return None
        return self.info.file_span


def source_order(t: OutTensor) -> tuple[int, int]:
    """Where a tensor's bytes sit in its source: reading in this order reads files front to back."""
    st = t.info.storage
    start = st.file_offset if st.file_offset is not None else 0
    return (0 if t.make is None else 1, start + t.info.offset * t.info.dtype.itemsize)


def cast_plan(
    model: ModelFile, dtype: DType | None, renamed: dict[str, str] | None = None
) -> tuple[list[OutTensor], list[str]]:
    """Every tensor of ``model`` (under its name, or ``renamed``'s), cast by the one cast rule
    (``vocab.cast_target``), and notes on floating tensors of a dtype sdtool does not cast."""
    renamed = renamed or {}
    kept: dict[str, int] = {}
    plan: list[OutTensor] = []
    for name, info in model.tensors.items():
        target = cast_target(info.dtype, dtype)
        if dtype is not None and info.dtype.is_float and info.dtype.code not in CASTABLE:
            kept[info.dtype.code] = kept.get(info.dtype.code, 0) + 1
        plan.append(OutTensor(renamed.get(name, name), model, info, target))
    notes = [
        f"{n} {code} tensor(s) kept as {code}: sdtool does not cast that dtype"
        for code, n in kept.items()
    ]
    return plan, notes
