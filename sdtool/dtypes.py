"""The one dtype table: safetensors code <-> numpy dtype <-> torch names <-> item size.

Every reader and writer looks dtypes up here, so a new dtype is one row, not a new branch.
bf16 and the float8 formats have no numpy dtype of their own; ml_dtypes provides them. ml_dtypes
takes about a second to import, so it is imported only when one of those numpy dtypes is first
needed (reading bf16/fp8 values, casting); listing and scanning never need it. numpy itself is
imported only when a row's numpy dtype is asked for: listing a file's tensors needs only the
codes and item sizes, so ``sdtool inspect`` starts without numpy.
"""

from __future__ import annotations

import sys
from dataclasses import field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from sdtool.errors import UnsupportedDtype
from sdtool.records import dataclass
from sdtool.vocab import DTYPE_NAMES

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type as every format spells it."""

    code: str  # safetensors spelling, e.g. "F32"; the canonical name inside sdtool
    np_type: str = field(repr=False)  # a numpy dtype name, or the name of an ml_dtypes type
    itemsize: int
    torch: str | None  # attribute of the torch module, e.g. "float32"
    storage: str | None  # legacy typed-storage class, e.g. "FloatStorage"
    kind: str  # "float", "int", "uint", "bool" or "complex"

    @cached_property
    def numpy(self) -> np.dtype:
        """The little-endian numpy dtype (bf16/fp8: ml_dtypes' type, imported on first use)."""
        import numpy as np

        t: Any = self.np_type
        if self.lazy:
            import ml_dtypes

            t = getattr(ml_dtypes, t)
        return np.dtype(t).newbyteorder("<")

    @property
    def lazy(self) -> bool:
        """True for the dtypes whose numpy type comes from ml_dtypes."""
        return self.np_type not in _NUMPY_NAMES

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    def __str__(self) -> str:
        return self.code


#: numpy's own dtype names -> item size (the other rows name ml_dtypes types: float8 types are
#: 1 byte, bfloat16 2); a test checks these against numpy
_NUMPY_NAMES = {
    "float64": 8, "float32": 4, "float16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16,
}  # fmt: skip


def _d(code: str, np_dtype: str, torch: str | None, storage: str | None, kind: str) -> DType:
    size = _NUMPY_NAMES.get(np_dtype, 2 if np_dtype == "bfloat16" else 1)
    return DType(code, np_dtype, size, torch, storage, kind)


#: code -> DType. Order matters nowhere; lookups go through the indexes below.
DTYPES: dict[str, DType] = {
    d.code: d
    for d in (
        _d("F64", "float64", "float64", "DoubleStorage", "float"),
        _d("F32", "float32", "float32", "FloatStorage", "float"),
        _d("F16", "float16", "float16", "HalfStorage", "float"),
        _d("BF16", "bfloat16", "bfloat16", "BFloat16Storage", "float"),
        _d("F8_E4M3", "float8_e4m3fn", "float8_e4m3fn", "Float8_e4m3fnStorage", "float"),
        _d("F8_E5M2", "float8_e5m2", "float8_e5m2", "Float8_e5m2Storage", "float"),
        _d("F8_E4M3FNUZ", "float8_e4m3fnuz", "float8_e4m3fnuz", None, "float"),
        _d("F8_E5M2FNUZ", "float8_e5m2fnuz", "float8_e5m2fnuz", None, "float"),
        _d("F8_E8M0", "float8_e8m0fnu", "float8_e8m0fnu", None, "float"),
        _d("I64", "int64", "int64", "LongStorage", "int"),
        _d("I32", "int32", "int32", "IntStorage", "int"),
        _d("I16", "int16", "int16", "ShortStorage", "int"),
        _d("I8", "int8", "int8", "CharStorage", "int"),
        _d("U64", "uint64", "uint64", None, "uint"),
        _d("U32", "uint32", "uint32", None, "uint"),
        _d("U16", "uint16", "uint16", None, "uint"),
        _d("U8", "uint8", "uint8", "ByteStorage", "uint"),
        _d("BOOL", "bool", "bool", "BoolStorage", "bool"),
        _d("C64", "complex64", "complex64", "ComplexFloatStorage", "complex"),
        _d("C128", "complex128", "complex128", "ComplexDoubleStorage", "complex"),
    )
}

_BY_STORAGE = {d.storage: d for d in DTYPES.values() if d.storage}
_BY_TORCH = {d.torch: d for d in DTYPES.values() if d.torch}
# what users type: sdtool's own names (vocab.DTYPE_NAMES: fp16, bf16 ...), and torch's aliases
# (torch.float == torch.float32 pickles as "float32", but users type these on the command line)
_ALIASES = {
    **DTYPE_NAMES,
    "fp64": "F64",
    "double": "F64",
    "float": "F32",
    "half": "F16",
    "long": "I64",
    "int": "I32",
}


def from_code(code: str) -> DType:
    """The dtype for a safetensors code such as ``"F16"``."""
    try:
        return DTYPES[code]
    except KeyError:
        raise UnsupportedDtype(f"unknown dtype {code!r}") from None


#: the one table of torch storage classes and their element sizes: the dtypes' own, and those
#: sdtool cannot hold as tensors (quantized, untyped), which the scanner still needs to step over
#: a legacy file's raw storage bytes (scan.allowlist's storage classes are these names)
STORAGE_ITEMSIZE: dict[str, int] = {
    **{name: d.itemsize for name, d in _BY_STORAGE.items()},
    "QInt8Storage": 1, "QUInt8Storage": 1, "QInt32Storage": 4, "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1, "UntypedStorage": 1,
}  # fmt: skip


def storage_itemsize(name: str) -> int | None:
    """Bytes per element of the torch storage class ``name`` ("HalfStorage"), None if unknown."""
    return STORAGE_ITEMSIZE.get(name)


def from_storage(name: str) -> DType:
    """The dtype of a torch typed-storage class name such as ``"HalfStorage"``."""
    try:
        return _BY_STORAGE[name]
    except KeyError:
        raise UnsupportedDtype(f"unknown torch storage type {name!r}") from None


def from_torch(name: str) -> DType:
    """The dtype for a torch dtype attribute name such as ``"bfloat16"``."""
    try:
        return _BY_TORCH[name]
    except KeyError:
        raise UnsupportedDtype(f"unknown torch dtype {name!r}") from None


def from_numpy(dt: np.dtype) -> DType:
    """The dtype matching a numpy dtype (either byte order)."""
    le = dt.newbyteorder("<") if dt.byteorder not in ("|", "=") else dt
    # an ml_dtypes dtype can only exist once ml_dtypes is imported: do not import it to compare
    have_ml = "ml_dtypes" in sys.modules
    for d in DTYPES.values():
        if (have_ml or not d.lazy) and d.numpy == le:
            return d
    raise UnsupportedDtype(f"numpy dtype {dt} has no tensor equivalent")


def parse(name: str) -> DType:
    """A dtype from what a user may type: ``fp16``, ``F16``, ``float16``, ``bf16`` ..."""
    key = name.strip()
    if key.upper() in DTYPES:
        return DTYPES[key.upper()]
    if key.lower() in _ALIASES:
        return DTYPES[_ALIASES[key.lower()]]
    if key.lower() in _BY_TORCH:
        return _BY_TORCH[key.lower()]
    raise UnsupportedDtype(f"unknown dtype {name!r}")
