"""The numpy dtype a pickled ``numpy.dtype(code, align, copy)`` + BUILD state stands for.

joblib reads a NumpyArrayWrapper's data by its rebuilt dtype: ``dtype.hasobject`` means a nested
pickle follows, otherwise ``count * dtype.itemsize`` raw bytes. The scanner must decide the same
way for every spelling (an ``'O'`` code, a structured or subarray dtype with an object field, a
state whose element size disagrees with its code), so the dtype is rebuilt by numpy itself from
the literal values the pickle holds (a copy, never a shared builtin dtype). No pickle is involved
and nothing the file names is imported.
"""

from __future__ import annotations

from typing import Any

from sdtool.scan.vm import DictV, Inst, ListV

MAX_DEPTH = 16


def rebuild(v: Any, depth: int = 0) -> Any:
    """A numpy dtype for a symbolic dtype value, or None when it cannot be rebuilt."""
    import numpy as np

    if depth > MAX_DEPTH or not isinstance(v, Inst) or not isinstance(v.args, tuple):
        return None
    args = v.args
    if not args or not isinstance(args[0], str) or len(args) > 3:
        return None
    if not all(isinstance(a, bool | int) for a in args[1:]):
        return None
    try:
        dt = np.dtype(args[0], bool(args[1]) if len(args) > 1 else False, True)
        if v.state is not None:
            state = _plain(v.state, depth + 1)
            if state is None:
                return None
            dt.__setstate__(state)  # type: ignore[attr-defined]
        return dt
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, MemoryError):
        return None


def _plain(v: Any, depth: int) -> Any:
    """Symbolic state -> the values numpy's __setstate__ would receive (None: not rebuildable)."""
    if depth > MAX_DEPTH:
        return None
    if v is None or isinstance(v, str | bytes | int | float | bool):
        return v
    if isinstance(v, Inst):
        return rebuild(v, depth)
    if isinstance(v, tuple | ListV):
        items = v if isinstance(v, tuple) else v.items
        if items is None:
            return None
        out = [_plain(x, depth + 1) for x in items]
        if any(o is None and x is not None for o, x in zip(out, items, strict=True)):
            return None
        return tuple(out) if isinstance(v, tuple) else out
    if isinstance(v, DictV) and v.items is not None:
        d = {}
        for k, x in v.items.items():
            px = _plain(x, depth + 1)
            if not isinstance(k, str) or px is None:
                return None
            d[k] = px
        return d
    return None


def is_object(v: Any) -> bool | None:
    """Whether joblib would read a nested pickle for this dtype (None: cannot tell)."""
    dt = rebuild(v)
    return None if dt is None else bool(dt.hasobject)


def itemsize(v: Any) -> int | None:
    dt = rebuild(v)
    return None if dt is None else int(dt.itemsize)
