"""The restricted unpickler: it builds only plain data and lazy tensors, and never runs file code.

Safety is by construction, not by a denylist. ``find_class`` is the only door from a pickle to
Python objects (GLOBAL, STACK_GLOBAL, INST and EXT codes all go through it), and it never imports
anything: an allowlisted global maps to one of sdtool's own small builders below (which validate
their arguments and build numpy/plain values or TensorInfo records); every other global becomes a
fresh stand-in type whose "calls" only record their arguments as a ``StandIn``. What the pickle can
then do to objects on its stack (BUILD, SETITEM, APPEND, ADDITEMS) reaches only plain containers,
these builders (which refuse state) and stand-ins (which record it).

The C unpickler is used for speed (SD checkpoints carry ~2,000 tensors); it calls back only into
``find_class`` and ``persistent_load``, which are sdtool's.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import contextvars
import io
import operator
import pickle
import pickletools
import re
import reprlib
import struct
from collections.abc import Callable, Sequence
from math import prod
from typing import IO, TYPE_CHECKING, Any

from sdtool import dtypes
from sdtool.dtypes import DType
from sdtool.errors import CorruptFile, UnsupportedDtype
from sdtool.model import (
    GlobalUse,
    StandIn,
    Storage,
    TensorInfo,
    check_view,
    contiguous_strides,
)

if TYPE_CHECKING:  # numpy loads only for the numpy arrays, dtypes and scalars a pickle holds
    import numpy as np

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 3, 80, 80


def brief(v: Any) -> str:
    """A short repr of a value from a file: bounded in depth and width (a shared or deep graph
    would otherwise make ``repr`` take exponential time or overflow the stack)."""
    return _BRIEF.repr(v)


MAX_BYTES_FROM_PICKLE = 1 << 30  # a nested torch file or array inside a pickle


# -- markers: values that stand for torch/numpy types the pickle names ---------------------------


class _Frozen:
    """Base for builder objects: they refuse BUILD and attribute changes from the pickle."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise CorruptFile(f"the pickle tries to set {brief(name)} on {self!r}")

    def __setstate__(self, state: Any) -> None:
        raise CorruptFile(f"the pickle tries to set state on {self!r}")


class _TorchName(_Frozen):
    """A torch type the pickle names, standing for a dtype (None: one sdtool cannot hold)."""

    __slots__ = ("dtype", "name")
    dtype: DType | None
    name: str

    def __init__(self, name: str, dtype: DType | None) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class StorageType(_TorchName):
    """``torch.FloatStorage`` & co (dtype known) or ``torch.UntypedStorage`` (dtype None: bytes)."""

    __slots__ = ()


class TorchDType(_TorchName):
    """A ``torch.float16``-style dtype object."""

    __slots__ = ()


class Builder(_Frozen):
    """One of sdtool's own functions standing where the pickle names an allowed callable."""

    __slots__ = ("fn", "qualname")
    fn: Callable[..., Any]
    qualname: str

    def __init__(self, qualname: str, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        if isinstance(out, _COPIES):
            _charge(len(out) if not isinstance(out, bytearray) else len(out) // 64)
        return out

    def __repr__(self) -> str:
        return f"<builder {self.qualname}>"


#: what a builder's result is charged for (a tuple, not ``tuple | list | ...``: that union is
#: built again at each call, ~1 us, and a checkpoint calls a builder per tensor)
_COPIES = (tuple, list, set, frozenset, dict, bytearray)
#: items the allowed builders may copy into new containers in one load. Each copy costs one
#: opcode however large its source, so a 38 KB pickle calling torch.Size on one 20,000-item list
#: 3,000 times retains 60M items (gigabytes, minutes of graph walking); real files copy a few.
MAX_BUILT_ITEMS = 2_000_000
_built: contextvars.ContextVar[list[int]] = contextvars.ContextVar("sdtool_built")


def _charge(n: int) -> None:
    counter = _built.get(None)
    if counter is None:
        return
    counter[0] += n
    if counter[0] > MAX_BUILT_ITEMS:
        raise CorruptFile(
            f"the pickle copies more than {MAX_BUILT_ITEMS} items through constructors such as "
            "torch.Size or set() (a retained-object bomb: a small file that takes gigabytes)"
        )


class NumpyDTypeSpec:
    """``numpy.dtype(spec, align, copy)`` and its BUILD state, resolved without numpy's pickling."""

    def __init__(self, spec: Any, *_: Any) -> None:
        if isinstance(spec, bytes):
            spec = spec.decode("latin1")
        if not isinstance(spec, str) or len(spec) > 16:
            raise CorruptFile(f"numpy dtype spec {brief(spec)} is not a simple type code")
        self.spec = spec
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]

    def resolve(self) -> np.dtype:
        import numpy as np

        try:
            dt = np.dtype(self.spec)
        except TypeError:
            raise CorruptFile(f"unknown numpy dtype {self.spec!r}") from None
        if dt.hasobject or dt.kind not in "biufcSUV?":
            raise CorruptFile(f"numpy dtype {self.spec!r} holds Python objects")
        if self.byteorder == "<":
            return dt.newbyteorder("<")
        return dt.newbyteorder(">") if self.byteorder == ">" else dt

    def __repr__(self) -> str:
        return f"numpy.dtype({self.spec!r})"


class NumpyArray:
    """``numpy.core.multiarray._reconstruct`` + BUILD: a numeric array from its raw bytes."""

    def __init__(self, *_: Any) -> None:
        self.array: np.ndarray | None = None
        self.objects: Any = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise CorruptFile("malformed numpy array state in the pickle")
        _, shape, spec, fortran, raw = state
        if not isinstance(spec, NumpyDTypeSpec):
            raise CorruptFile("numpy array state without a dtype")
        if spec.spec.startswith("O"):
            self.objects = raw  # an object array: its elements were unpickled as plain data
            return
        import numpy as np

        dt = spec.resolve()
        shape = _int_tuple(shape, "numpy array shape")
        if isinstance(raw, str):
            raw = raw.encode("latin1")
        if not isinstance(raw, bytes | bytearray) or len(raw) != prod(shape) * dt.itemsize:
            raise CorruptFile("numpy array data does not match its shape")
        self.array = np.frombuffer(bytes(raw), dt).reshape(shape, order="F" if fortran else "C")

    def value(self) -> Any:
        return self.array if self.array is not None else self.objects

    def __repr__(self) -> str:
        a = self.array
        return f"<numpy array {a.dtype} {list(a.shape)}>" if a is not None else "<numpy objects>"


# -- the builders ---------------------------------------------------------------------------------


def _int_tuple(v: Any, what: str) -> tuple[int, ...]:
    if type(v) is tuple and _INT_ONLY.issuperset(map(type, v)):  # the common case, in C
        return v
    if not isinstance(v, tuple | list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in v
    ):
        raise CorruptFile(f"{what} is not a tuple of integers: {brief(v)}")
    return tuple(v)


_INT_ONLY = frozenset({int})


def _rebuild_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, *rest: Any, dtype: DType | None = None
) -> TensorInfo:
    if not isinstance(storage, Storage):
        raise CorruptFile(f"a tensor's storage is {type(storage).__name__}, not a storage")
    if not isinstance(offset, int):
        raise CorruptFile("a tensor's storage offset is not an integer")
    shape = _int_tuple(size, "tensor size")
    strides = (
        _int_tuple(stride, "tensor stride") if stride is not None else contiguous_strides(shape)
    )
    if len(strides) != len(shape):
        raise CorruptFile(f"tensor size {shape} and stride {strides} differ in length")
    dt = dtype or storage.dtype
    if dtype is not None and storage.dtype.itemsize != 1 and storage.dtype != dtype:
        raise CorruptFile(f"tensor of {dtype} over a {storage.dtype} storage")
    requires_grad = bool(rest[0]) if rest and isinstance(rest[0], bool) else False
    info = TensorInfo(dt, shape, strides, offset, storage, requires_grad=requires_grad)
    check_view(info, storage.key)
    return info


def _rebuild_tensor_v3(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    dtype: Any,
    *rest: Any,
) -> TensorInfo:
    if not isinstance(dtype, TorchDType) or dtype.dtype is None:
        raise UnsupportedDtype(f"tensor dtype {brief(dtype)} is not one sdtool can hold")
    return _rebuild_tensor(storage, offset, size, stride, requires_grad, dtype=dtype.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = True, *rest: Any) -> Any:
    if isinstance(data, TensorInfo):
        return TensorInfo(
            data.dtype,
            data.shape,
            data.strides,
            data.offset,
            data.storage,
            parameter=True,
            requires_grad=bool(requires_grad),
        )
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """torch's tensor-subclass rebuild CALLS ``func``: only an allowed builder is called."""
    if isinstance(func, Builder) and isinstance(args, tuple):
        result = func(*args)
        if isinstance(new_type, Builder) and new_type.qualname.endswith("Parameter"):
            result = _rebuild_parameter(result, True)
        return result
    return StandIn("torch._tensor", "_rebuild_from_type_v2", (func, new_type, args, state))


def _rebuild_device_tensor_from_numpy(
    data: Any, dtype: Any, device: Any, requires_grad: Any
) -> Any:
    import numpy as np

    arr = data.value() if isinstance(data, NumpyArray) else None
    if not isinstance(arr, np.ndarray):
        raise CorruptFile("a tensor from numpy without a numeric array")
    return _tensor_from_array(arr, "numpy")


def _tensor_from_array(arr: np.ndarray, key: str) -> TensorInfo:
    import numpy as np

    arr = np.ascontiguousarray(arr)
    dt = dtypes.from_numpy(arr.dtype)
    raw = arr.astype(dt.numpy, copy=False).tobytes()
    st = Storage(key, dt, len(raw), load=lambda: raw)
    return TensorInfo(dt, tuple(arr.shape), contiguous_strides(tuple(arr.shape)), 0, st)


def _size(v: Any = ()) -> tuple[int, ...]:
    return _int_tuple(v, "torch.Size")


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


def _set(items: Any = ()) -> set[Any]:
    return set(_iterable(items))


def _frozenset(items: Any = ()) -> frozenset[Any]:
    return frozenset(_iterable(items))


def _iterable(items: Any) -> list[Any]:
    if not isinstance(items, list | tuple | set | frozenset | dict):
        raise CorruptFile(f"set() of {type(items).__name__}")
    return list(items)


def _bytearray(src: Any = b"", encoding: str = "latin1", *_: Any) -> bytearray:
    if isinstance(src, str):
        src = src.encode("latin1" if encoding in ("latin1", "latin-1") else "utf-8")
    if isinstance(src, list) and len(src) <= MAX_BYTES_FROM_PICKLE:
        return bytearray(int(x) & 0xFF for x in src)
    if not isinstance(src, bytes | bytearray):
        raise CorruptFile("bytearray() of something that is not bytes")
    return bytearray(src)


def _dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    """dict / Counter / defaultdict as plain dicts (a defaultdict's factory is never called)."""
    src = [a for a in args if isinstance(a, dict | list | tuple)]
    out: dict[Any, Any] = {}
    if src:
        items = src[0].items() if isinstance(src[0], dict) else src[0]
        for kv in items:
            if not (isinstance(kv, tuple | list) and len(kv) == 2):
                raise CorruptFile("dict() of something that is not key/value pairs")
            out[kv[0]] = kv[1]
    return out


def _complex(re: Any = 0.0, im: Any = 0.0) -> complex:
    if not all(isinstance(x, int | float) for x in (re, im)):
        raise CorruptFile("complex() of non-numbers")
    return complex(re, im)


def _slice(*args: Any) -> slice:
    if not all(a is None or isinstance(a, int) for a in args) or len(args) > 3:
        raise CorruptFile("slice() of non-integers")
    return slice(*args)


def _range(*args: Any) -> range:
    if not all(isinstance(a, int) for a in args) or not 1 <= len(args) <= 3:
        raise CorruptFile("range() of non-integers")
    return range(*args)


def _codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as pickles use it (str -> bytes); no codec lookup beyond these."""
    if not isinstance(obj, str):
        raise CorruptFile("_codecs.encode of a non-string")
    enc = str(encoding).lower().replace("_", "-")
    if enc in ("latin1", "latin-1", "iso-8859-1"):
        return obj.encode("latin1")
    if enc in ("utf-8", "utf8", "ascii"):
        return obj.encode(enc)
    raise CorruptFile(f"_codecs.encode with codec {brief(encoding)}")


def _numpy_scalar(spec: Any, data: Any = None) -> Any:
    if not isinstance(spec, NumpyDTypeSpec):
        raise CorruptFile("numpy scalar without a dtype")
    dt = spec.resolve()
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise CorruptFile("numpy scalar data does not match its dtype")
    import numpy as np

    return np.frombuffer(data, dt)[0]


def _numpy_frombuffer(buf: Any, spec: Any, shape: Any, order: Any = "C") -> np.ndarray:
    """numpy's protocol-5 array reduction: raw bytes + dtype + shape."""
    if not isinstance(spec, NumpyDTypeSpec):
        raise CorruptFile("numpy array without a dtype")
    dt = spec.resolve()
    shape = _int_tuple(shape, "numpy array shape")
    if isinstance(buf, pickle.PickleBuffer):
        buf = buf.raw().tobytes()
    if not isinstance(buf, bytes | bytearray) or len(buf) != prod(shape) * dt.itemsize:
        raise CorruptFile("numpy array data does not match its shape")
    import numpy as np

    return np.frombuffer(bytes(buf), dt).reshape(shape, order="F" if order == "F" else "C")


def _numpy_dtype_class(name: str) -> Callable[..., NumpyDTypeSpec]:
    # numpy 2 pickles dtype classes such as numpy.dtypes.Float64DType; map to a type code
    code = {
        "Float64DType": "f8",
        "Float32DType": "f4",
        "Float16DType": "f2",
        "Int64DType": "i8",
        "Int32DType": "i4",
        "Int16DType": "i2",
        "Int8DType": "i1",
        "UInt64DType": "u8",
        "UInt32DType": "u4",
        "UInt16DType": "u2",
        "UInt8DType": "u1",
        "BoolDType": "?",
        "Complex64DType": "c8",
        "Complex128DType": "c16",
        "LongDType": "i8",
        "ULongDType": "u8",
        "LongLongDType": "i8",
        "ULongLongDType": "u8",
        "ByteDType": "i1",
        "UByteDType": "u1",
        "ShortDType": "i2",
        "UShortDType": "u2",
        "IntDType": "i4",
        "UIntDType": "u4",
    }.get(name)
    if code is None:
        raise KeyError(name)
    return lambda *a: NumpyDTypeSpec(code)


# (module, name) -> a factory of the object the pickle gets. Each entry is data-only by design.
_TORCH_UTILS = "torch._utils"
ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    (_TORCH_UTILS, "_rebuild_tensor"): lambda: Builder("_rebuild_tensor", _rebuild_tensor),
    (_TORCH_UTILS, "_rebuild_tensor_v2"): lambda: Builder("_rebuild_tensor_v2", _rebuild_tensor),
    (_TORCH_UTILS, "_rebuild_tensor_v3"): lambda: Builder("_rebuild_tensor_v3", _rebuild_tensor_v3),
    (_TORCH_UTILS, "_rebuild_parameter"): lambda: Builder("_rebuild_parameter", _rebuild_parameter),
    (_TORCH_UTILS, "_rebuild_parameter_with_state"): lambda: Builder(
        "_rebuild_parameter_with_state", _rebuild_parameter
    ),
    (_TORCH_UTILS, "_rebuild_device_tensor_from_numpy"): lambda: Builder(
        "_rebuild_device_tensor_from_numpy", _rebuild_device_tensor_from_numpy
    ),
    ("torch._tensor", "_rebuild_from_type_v2"): lambda: Builder(
        "_rebuild_from_type_v2", _rebuild_from_type_v2
    ),
    ("torch.nn.parameter", "Parameter"): lambda: Builder("Parameter", _rebuild_parameter),
    ("torch", "Size"): lambda: Builder("torch.Size", _size),
    ("torch", "device"): lambda: Builder("torch.device", _device),
    ("torch.storage", "UntypedStorage"): lambda: StorageType("UntypedStorage", None),
    ("torch", "UntypedStorage"): lambda: StorageType("UntypedStorage", None),
    ("builtins", "set"): lambda: Builder("set", _set),
    ("builtins", "frozenset"): lambda: Builder("frozenset", _frozenset),
    ("builtins", "bytearray"): lambda: Builder("bytearray", _bytearray),
    ("builtins", "complex"): lambda: Builder("complex", _complex),
    ("builtins", "dict"): lambda: Builder("dict", _dict),
    ("collections", "Counter"): lambda: Builder("Counter", _dict),
    ("collections", "defaultdict"): lambda: Builder("defaultdict", _dict),
    ("builtins", "slice"): lambda: Builder("slice", _slice),
    ("builtins", "range"): lambda: Builder("range", _range),
    ("_codecs", "encode"): lambda: Builder("_codecs.encode", _codecs_encode),
    ("numpy", "dtype"): lambda: NumpyDTypeSpec,
    ("numpy", "ndarray"): lambda: Builder("numpy.ndarray", lambda *a: None),
}
for _np_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    ALLOWED[(_np_core, "scalar")] = lambda: Builder("numpy scalar", _numpy_scalar)
    ALLOWED[(_np_core, "_reconstruct")] = lambda: NumpyArray
for _np_numeric in ("numpy.core.numeric", "numpy._core.numeric"):
    ALLOWED[(_np_numeric, "_frombuffer")] = lambda: Builder("numpy _frombuffer", _numpy_frombuffer)


def _storage_factory(d: DType) -> Callable[[], Any]:
    return lambda: StorageType(d.storage or "", d)


def _dtype_factory(d: DType) -> Callable[[], Any]:
    return lambda: TorchDType(d.torch or "", d)


for _d in dtypes.DTYPES.values():
    if _d.storage:
        ALLOWED[("torch", _d.storage)] = _storage_factory(_d)
    if _d.torch:
        ALLOWED[("torch", _d.torch)] = _dtype_factory(_d)


# -- the unpickler --------------------------------------------------------------------------------


def _py2_name(module: str, name: str) -> tuple[str, str]:
    """The Python 2 -> 3 renaming pickle applies (``__builtin__.set`` -> ``builtins.set``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickle ``file`` building only data, lazy tensors and inert stand-ins.

    ``persistent_load`` resolves torch's storage references (the container reader supplies it);
    ``nested`` opens a torch file held in bytes (``torch.storage._load_from_bytes``).
    ``seen`` collects every global met, across the several pickles of one file.
    """

    def __init__(
        self,
        file: IO[bytes],
        *,
        persistent_load: Callable[[Any], Any] | None = None,
        nested: Callable[[bytes], Any] | None = None,
        seen: collections.Counter[tuple[str, str, bool]] | None = None,
    ) -> None:
        # Python 2 byte strings (STRING opcodes) decode as latin-1 so binary data (numpy
        # arrays and scalars) round-trips exactly; Python 3 str (BINUNICODE) is always UTF-8.
        super().__init__(file, encoding="latin1")
        self._persistent = persistent_load
        self._nested = nested
        self.seen = seen if seen is not None else collections.Counter()
        self._standins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module, name = _py2_name(str(module), str(name))
        factory = self._factory(module, name)
        self.seen[(module, name, factory is not None)] += 1
        if factory is not None:
            return factory()
        return self._standin_type(module, name)

    def _factory(self, module: str, name: str) -> Callable[[], Any] | None:
        factory = ALLOWED.get((module, name))
        if factory is not None:
            return factory
        if module == "numpy.dtypes":
            try:
                spec = _numpy_dtype_class(name)
            except KeyError:
                return None
            return lambda: Builder(f"numpy.dtypes.{name}", spec)
        if (module, name) == ("torch.storage", "_load_from_bytes") and self._nested:
            nested = self._nested
            return lambda: Builder("_load_from_bytes", lambda b: nested(_as_bytes(b)))
        return None

    def _standin_type(self, module: str, name: str) -> type:
        key = (module, name)
        if key not in self._standins:
            self._standins[key] = _make_standin_type(module, name)
        return self._standins[key]

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise CorruptFile("a persistent reference outside a torch file")
        return self._persistent(pid)


def _as_bytes(b: Any) -> bytes:
    if isinstance(b, str):
        b = b.encode("latin1")
    if not isinstance(b, bytes | bytearray) or len(b) > MAX_BYTES_FROM_PICKLE:
        raise CorruptFile("torch.storage._load_from_bytes of something that is not bytes")
    return bytes(b)


class StandInType(type):
    """Metaclass of stand-in types, so they can be recognised after loading."""

    st_module: str
    st_name: str


def _make_standin_type(module: str, name: str) -> type:
    """A fresh type per global per load: calling or instantiating it only records a StandIn."""

    def __new__(cls: type, *args: Any, **kwargs: Any) -> StandIn:
        return StandIn(module, name, args, kwargs or None)

    t = StandInType(
        name.replace(".", "_") or "_",
        (),
        {"__new__": __new__, "__module__": "sdtool.standin", "__slots__": ()},
    )
    t.st_module = module
    t.st_name = name
    return t


def globals_met(seen: collections.Counter[tuple[str, str, bool]]) -> list[GlobalUse]:
    """The unpickler's record as GlobalUse entries, in first-met order."""
    return [GlobalUse(m, n, c, b) for (m, n, b), c in seen.items()]


def load_one(
    f: IO[bytes],
    *,
    persistent_load: Callable[[Any], Any] | None = None,
    nested: Callable[[bytes], Any] | None = None,
    seen: collections.Counter[tuple[str, str, bool]] | None = None,
) -> Any:
    """Unpickle one pickle from ``f`` (leaving ``f`` just past its STOP)."""
    src: Any = _Peekable(f) if type(f) is io.BytesIO else f  # the pickle module's file protocol
    up = RestrictedUnpickler(src, persistent_load=persistent_load, nested=nested, seen=seen)
    token = _built.set([0]) if _built.get(None) is None else None
    try:
        _check_before_loading(f)
        return up.load()
    except CorruptFile:
        raise
    except UnsupportedDtype as e:
        raise CorruptFile(str(e)) from None
    except EOFError:
        raise CorruptFile("the pickle ends before its STOP opcode; the file is truncated") from None
    except RecursionError:
        raise CorruptFile("the pickle nests too deeply") from None
    except MemoryError:
        raise CorruptFile("the pickle asks for more memory than sdtool allows") from None
    except (
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
        UnicodeError,
        struct.error,
    ) as e:
        raise CorruptFile(f"broken pickle ({type(e).__name__}: {str(e)[:200]})") from None
    finally:
        if token is not None:
            _built.reset(token)


class _Peekable:
    """A BytesIO with ``peek``: the C unpickler then takes its input 128 KiB at a time from
    ``peek`` and advances the stream by what it used, where without ``peek`` it calls ``read``
    once per opcode (a Python call and a new bytes object each). Same bytes, same end position."""

    __slots__ = ("_f", "read", "readinto", "readline")

    def __init__(self, f: io.BytesIO) -> None:
        self._f = f
        self.read = f.read
        self.readinto = f.readinto
        self.readline = f.readline

    def peek(self, n: int = 1) -> bytes:
        f = self._f
        at = f.tell()
        data = f.read(max(n, 1))
        f.seek(at)
        return data


def _check_before_loading(f: Any) -> None:
    """Refuse, in one walk over the opcodes before the C unpickler runs, what it would choke on.

    - A memo index no pickler could write: the C unpickler grows its memo table to twice the
      largest PUT index and zero-fills it, so a 120-byte pickle with LONG_BINPUT 0x56730a35
      makes it write ~23 GB. A pickler numbers memo entries from 0, one per opcode at most, so
      an index above the opcodes met so far is forged.
    - Tuples nested deeper than MAX_TUPLE_DEPTH, or whose expanded tree (shared sub-tuples
      counted each time, as hashing and comparing walk them) exceeds MAX_TUPLE_TREE items:
      CPython hashes a tuple by walking it in C with no recursion guard, so a 300,000-deep
      tuple used as a dict key overflows the C stack (a segfault) and ``t = (t, t)`` forty
      times takes 2**40 steps. Only tuples can nest while hashable (lists and dicts stop a
      hash, and no allowed builder returns nested tuples), so a stack of (depth, size) per slot
      is enough.

    Opcodes are skipped over by their argument layout (pickletools' table), nothing is decoded
    or built, so the walk costs a fraction of the load; ``f`` is left where it was.
    """
    start = f.tell()
    try:
        found = _forged_memo_put(f, start)
    finally:
        f.seek(start)
    if found is not None:
        name, index, count = found
        raise CorruptFile(
            f"pickle opcode {name} stores memo entry {index} after {count} opcodes "
            "(a forged index that would make the unpickler allocate gigabytes)"
        )


def _arg_layouts() -> dict[int, int]:
    """opcode byte -> its argument layout: n >= 0 fixed bytes, or one of the _ARG_* codes."""
    by_n = {
        pickletools.TAKEN_FROM_ARGUMENT1: _ARG_LEN1,
        pickletools.TAKEN_FROM_ARGUMENT4: _ARG_LEN4,
        pickletools.TAKEN_FROM_ARGUMENT4U: _ARG_LEN4U,
        pickletools.TAKEN_FROM_ARGUMENT8U: _ARG_LEN8U,
    }
    out: dict[int, int] = {}
    for op in pickletools.opcodes:
        arg = op.arg
        if arg is None:
            layout = 0
        elif arg.n >= 0:
            layout = arg.n
        elif arg.n == pickletools.UP_TO_NEWLINE:
            layout = _ARG_TWO_LINES if arg.name == "stringnl_noescape_pair" else _ARG_LINE
        else:
            layout = by_n[arg.n]
        out[op.code.encode("latin-1")[0]] = layout
    return out


_ARG_LINE, _ARG_TWO_LINES, _ARG_LEN1, _ARG_LEN4, _ARG_LEN4U, _ARG_LEN8U = range(-1, -7, -1)
_WIDTH = {_ARG_LEN1: 1, _ARG_LEN4: 4, _ARG_LEN4U: 4, _ARG_LEN8U: 8}
_STOP, _PUT, _BINPUT, _LONG_BINPUT = 0x2E, 0x70, 0x71, 0x72  # . p q r
_GET, _BINGET, _LONG_BINGET = 0x67, 0x68, 0x6A  # g h j
_BIN_MEMO = frozenset({_BINPUT, _LONG_BINPUT, _BINGET, _LONG_BINGET})
_WALK_CHUNK = 1 << 20
_MAX_LINE = 1 << 24  # no pickler writes a longer text argument


def _forged_memo_put(f: Any, start: int) -> tuple[str, int, int] | None:
    """(opcode name, index, opcodes before it) of the first forged memo PUT, else None; raises
    CorruptFile for tuples nested too deeply (see _check_before_loading).

    Stops, finding nothing, where the stream ends or breaks: the unpickler stops there too.
    Long arguments (tensor bytes in old pickles) are skipped by seeking, never read.

    Why the fast paths are exactly as strict as the generic step (``_GENERIC`` below, one
    opcode by its pickletools layout and stack effect): every opcode byte maps, through
    ``_FAST``, either to the generic step or to a fast kind derived from the same two tables
    (``_fast_kinds``: same argument width, same pops and pushes), so an attacker cannot pick
    an opcode the walk skips differently from the unpickler. Only the bounds checks move:
    inside a window the walk reads ahead freely (``safe`` keeps a 9-byte margin: an opcode,
    an 8-byte argument or a length prefix); at the end of the stream the window is padded
    with NUL bytes (no opcode), so a truncated argument reads padding, and the walk returns
    None as soon as it is past the real end, before judging anything the padding decided (a
    forged PUT is reported only when its index lies wholly inside the stream). The tuple
    limits are checked by the one ``_tuple_item`` for every tuple, flat items or not.
    A torch tensor record (``_TENSOR_RECORD``, ~27 opcodes) is taken in one step when it is
    plainly benign (``_tensor_record``), else opcode by opcode.
    tests/test_fast_start.py checks this walk against the generic one, opcode for opcode.
    """
    fast, widths, pops, u32 = _FAST_KIND, _FAST_WIDTH, _FAST_POPS, _U32
    record = _TENSOR_RECORD.match
    layouts, effects = _LAYOUT_TABLE, _EFFECTS
    stack: list[tuple[int, int]] = []  # (tuple depth, expanded tuple size) per stack slot
    marks: list[int] = []  # stack lengths at each MARK
    memo: dict[int, tuple[int, int]] = {}
    flat = _FLAT
    pos, count = start, 0  # pos: the stream offset of buf[0]
    while True:
        f.seek(pos)
        buf, eof = _window(f)
        end = len(buf)
        if not end:
            return None
        if eof:  # padding past the end: arguments read it, and the walk stops right after
            buf += _PAD
            safe = end
        else:
            safe = end - 9
        i = 0
        while i < safe:
            code = buf[i]
            kind = fast[code]
            if kind == 1:  # _K_PUSH: a fixed argument (or none); pushes one flat item
                stack.append(flat)
                i += widths[code]
            elif kind == 2:  # _K_LONG_BINPUT
                index = u32(buf, i + 1)[0]
                if index > count:
                    if i + 5 > end:
                        return None  # the index runs past the stream: it ends here
                    return ("LONG_BINPUT", index, count)
                if stack:
                    memo[index] = stack[-1]
                i += 5
            elif kind == 3:  # _K_BINGET
                if buf[i + 2] == 0x28 and (m := record(buf, i)) and m.end() <= safe:
                    n = _tensor_record(m, memo, count)
                    if n:  # the whole record at once: one flat item more on the stack
                        stack.append(flat)
                        count += n
                        i = m.end()
                        continue
                stack.append(memo.get(buf[i + 1], flat))
                i += 2
            elif kind == 4:  # _K_FIXED: a fixed argument (or none); pops some, pushes one
                del stack[max(0, len(stack) - pops[code]) :]
                stack.append(flat)
                i += widths[code]
            elif kind == 5:  # _K_MARK
                marks.append(len(stack))
                i += 1
            elif kind == 6:  # _K_TUPLE: down to the mark
                cut = marks.pop() if marks else 0
                items, stack[cut:] = stack[cut:], []
                stack.append(_tuple_item(items, code, count))
                i += 1
            elif kind == 7:  # _K_TUPLE_N: TUPLE1..3
                below = pops[code]
                items, stack[len(stack) - below :] = stack[len(stack) - below :], []
                stack.append(_tuple_item(items, code, count))
                i += 1
            elif kind == 8:  # _K_STR4: BINUNICODE, BINBYTES: 4-byte length, pushes one
                i += 5 + u32(buf, i + 1)[0]
                stack.append(flat)
            elif kind == 9:  # _K_STR1: SHORT_BINUNICODE and co: 1-byte length, pushes one
                i += 2 + buf[i + 1]
                stack.append(flat)
            elif kind == 10:  # _K_BINPUT
                index = buf[i + 1]
                if index > count:
                    if i + 2 > end:
                        return None
                    return ("BINPUT", index, count)
                if stack:
                    memo[index] = stack[-1]
                i += 2
            else:  # _GENERIC: every other opcode, by its layout and stack effect
                layout = layouts[code]
                if layout is None or code == _STOP:
                    return None
                i += 1
                index = -1  # the memo index a PUT/GET names (-1: MEMOIZE, the next free one)
                if layout >= 0:
                    if i + layout > end:
                        return None
                    if code in _BIN_MEMO:
                        index = int.from_bytes(buf[i : i + layout], "little")
                        if code in (_BINPUT, _LONG_BINPUT) and index > count:
                            return ("BINPUT" if code == _BINPUT else "LONG_BINPUT", index, count)
                    i += layout
                elif layout <= _ARG_LEN1:
                    width = _WIDTH[layout]
                    if i + width > end:
                        return None
                    n = int.from_bytes(buf[i : i + width], "little", signed=layout == _ARG_LEN4)
                    if n < 0:
                        return None
                    i += width + n  # past the window: the next refill seeks there
                else:
                    for _ in range(2 if layout == _ARG_TWO_LINES else 1):
                        nl = buf.find(b"\n", i, end)
                        while nl < 0:  # read on until the line ends
                            if eof or end - i > _MAX_LINE:
                                return None
                            more, eof = _window(f)
                            buf = buf[:end] + more
                            end = len(buf)
                            if eof:
                                buf += _PAD
                            safe = end if eof else end - 9
                            nl = buf.find(b"\n", i, end)
                        line, i = buf[i:nl], nl + 1
                    if code in (_PUT, _GET):
                        try:
                            index = int(line)
                        except ValueError:
                            return None
                        if code == _PUT and index > count:
                            return ("PUT", index, count)
                fx, fx_below, pushes = effects[code]
                if fx == _FX_PLAIN:
                    if fx_below:
                        del stack[max(0, len(stack) - fx_below) :]
                    if pushes:
                        stack.extend(_FLATS[pushes])
                else:
                    _stack_effect(code, fx, fx_below, index, stack, marks, memo, count)
            count += 1
        if eof:
            return None  # past the end of the stream without a STOP
        pos += i


def _window(f: Any) -> tuple[bytes, bool]:
    """The next _WALK_CHUNK bytes of ``f`` (fewer at its end), and whether the stream ends."""
    buf = f.read(_WALK_CHUNK)
    while len(buf) < _WALK_CHUNK:
        more = f.read(_WALK_CHUNK - len(buf))
        if not more:
            return buf, True
        buf += more
    return buf, False


def _tuple_item(items: list[tuple[int, int]], code: int, count: int) -> tuple[int, int]:
    """The (depth, size) of a tuple of ``items``; raise CorruptFile past the limits.

    Depth 0 is a flat item (size 1) and only that, so the deepest item (the largest pair)
    tells whether the sizes must be added up one by one."""
    deepest = max(items)[0] if items else 0
    size = 1 + (sum(map(_SIZE, items)) if deepest else len(items))
    if deepest >= MAX_TUPLE_DEPTH or size > MAX_TUPLE_TREE:
        raise CorruptFile(
            f"opcode {count} ({_OPNAME[code]}) builds a tuple nested {deepest + 1} deep with "
            f"{size} items expanded (limits {MAX_TUPLE_DEPTH} and {MAX_TUPLE_TREE}): "
            "hashing it would crash the unpickler or never end"
        )
    return deepest + 1, size


def _stack_effect(
    code: int,
    kind: int,
    below: int,
    index: int,
    stack: list[tuple[int, int]],
    marks: list[int],
    memo: dict[int, tuple[int, int]],
    count: int,
) -> None:
    """Apply one opcode to the (depth, size) stack; raise CorruptFile for a tuple too deep."""
    if kind == _FX_MARKED:  # pops down to the mark and ``below`` more, pushes one
        cut = marks.pop() if marks else 0
        del stack[max(0, cut - below) :]
        stack.append(_FLAT)
    elif kind == _FX_POP_MARK:
        cut = marks.pop() if marks else 0
        del stack[cut:]
    elif kind == _FX_MARK:
        marks.append(len(stack))
    elif kind == _FX_TUPLE:
        if below < 0:  # TUPLE: down to the mark
            cut = marks.pop() if marks else 0
            items, stack[cut:] = stack[cut:], []
        else:
            items, stack[len(stack) - below :] = stack[len(stack) - below :], []
        depth = 1 + max((x[0] for x in items), default=0)
        size = 1 + sum(x[1] for x in items)
        if depth > MAX_TUPLE_DEPTH or size > MAX_TUPLE_TREE:
            raise CorruptFile(
                f"opcode {count} ({_OPNAME[code]}) builds a tuple nested {depth} deep with "
                f"{size} items expanded (limits {MAX_TUPLE_DEPTH} and {MAX_TUPLE_TREE}): "
                "hashing it would crash the unpickler or never end"
            )
        stack.append((depth, size))
    elif kind == _FX_PUT:
        if stack:
            memo[len(memo) if index < 0 else index] = stack[-1]
    elif kind == _FX_GET:
        stack.append(memo.get(index, _FLAT))
    else:  # DUP
        stack.append(stack[-1] if stack else _FLAT)


_FX_PLAIN, _FX_MARKED, _FX_POP_MARK, _FX_MARK, _FX_TUPLE, _FX_PUT, _FX_GET, _FX_DUP = range(8)
_FLAT = (0, 1)
_FLATS = [[_FLAT] * n for n in range(4)]
_SPECIAL_FX = {
    "TUPLE": (_FX_TUPLE, -1, 1),
    "TUPLE1": (_FX_TUPLE, 1, 1),
    "TUPLE2": (_FX_TUPLE, 2, 1),
    "TUPLE3": (_FX_TUPLE, 3, 1),
    "PUT": (_FX_PUT, 0, 0),
    "BINPUT": (_FX_PUT, 0, 0),
    "LONG_BINPUT": (_FX_PUT, 0, 0),
    "MEMOIZE": (_FX_PUT, 0, 0),
    "GET": (_FX_GET, 0, 1),
    "BINGET": (_FX_GET, 0, 1),
    "LONG_BINGET": (_FX_GET, 0, 1),
    "DUP": (_FX_DUP, 0, 1),
    "MARK": (_FX_MARK, 0, 0),
    "POP_MARK": (_FX_POP_MARK, 0, 0),
}


def _stack_effects() -> list[tuple[int, int, int]]:
    """opcode byte -> (kind, items popped (below the mark for marked ones), items pushed)."""
    out = [(_FX_PLAIN, 0, 0)] * 256
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")[0]
        if op.name in _SPECIAL_FX:
            out[code] = _SPECIAL_FX[op.name]
            continue
        before, after = op.stack_before, op.stack_after
        assert pickletools.markobject not in after and len(after) <= 1, op.name
        if pickletools.markobject in before:  # LIST, DICT, INST, OBJ, APPENDS, SETITEMS ...
            assert len(after) == 1, op.name
            out[code] = (_FX_MARKED, before.index(pickletools.markobject), 1)
        else:
            out[code] = (_FX_PLAIN, len(before), len(after))
    return out


_LAYOUTS = _arg_layouts()
_LAYOUT_TABLE: list[int | None] = [_LAYOUTS.get(c) for c in range(256)]
_EFFECTS = _stack_effects()
_OPNAME = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


# the walk's fast kinds (see _forged_memo_put), each derived from the layout and effect tables
_K_PUSH, _K_LONG_BINPUT, _K_BINGET, _K_FIXED, _K_MARK, _K_TUPLE, _K_TUPLE_N = range(1, 8)
_K_STR4, _K_STR1, _K_BINPUT = range(8, 11)  # 0: the generic step
_PAD = bytes(16)  # NUL is no opcode
_U32 = struct.Struct("<I").unpack_from
_SIZE = operator.itemgetter(1)


def _fast_kinds() -> tuple[list[int], list[int], list[int]]:
    """Per opcode byte: its fast kind (0: the generic step), the bytes it takes with its fixed
    argument, the items it pops. Each from the layout and stack-effect tables, never by hand."""
    kinds, widths, pops = [0] * 256, [0] * 256, [0] * 256
    for code in range(256):
        layout = _LAYOUT_TABLE[code]
        if layout is None or code == _STOP:
            continue
        fx, below, pushes = _EFFECTS[code]
        kind = 0
        if code in _FAST_MEMO:
            kind = _FAST_MEMO[code]
        elif fx == _FX_MARK:
            kind = _K_MARK
        elif fx == _FX_TUPLE:
            kind = _K_TUPLE if below < 0 else _K_TUPLE_N
        elif fx == _FX_PLAIN and pushes == 1:
            if layout >= 0:
                kind = _K_PUSH if below == 0 else _K_FIXED
            elif below == 0 and layout in (_ARG_LEN4U, _ARG_LEN1):
                kind = _K_STR4 if layout == _ARG_LEN4U else _K_STR1
        kinds[code], widths[code], pops[code] = kind, 1 + max(layout, 0), max(below, 0)
    return kinds, widths, pops


_FAST_MEMO = {_LONG_BINPUT: _K_LONG_BINPUT, _BINPUT: _K_BINPUT, _BINGET: _K_BINGET}
_FAST_KIND, _FAST_WIDTH, _FAST_POPS = _fast_kinds()
# the unpickler decodes text opcodes with these codecs: look them up now, not lazily while a
# file is read
for _codec in ("raw-unicode-escape", "latin-1", "ascii", "utf-8"):
    codecs.lookup(_codec)


MAX_TUPLE_DEPTH = 1000
MAX_TUPLE_TREE = 50_000_000


# A tensor as torch pickles it (protocol 2, from the BINGET of _rebuild_tensor_v2 to the PUT of
# its result): ``h (( h h X<key> [q] h <numel> t [q] Q <offset> <size> [q] <stride> [q] <bool>
# h ) R [q] t [q] R [q]``, each [q] an optional BINPUT or LONG_BINPUT.
_INT = rb"(?:K.|M..|J....)"  # BININT1, BININT2, BININT
#: EMPTY_TUPLE, TUPLE1..3 of ints, or MARK, up to 64 ints, TUPLE
_INT_TUPLE = (
    rb"(\)|" + _INT + rb"\x85|" + _INT * 2 + rb"\x86|" + _INT * 3 + rb"\x87|\(" + _INT
    + rb"{0,64}t)"
)  # fmt: skip
_MEMO_GET, _MEMO_PUT = rb"(h.|j....)", rb"(q.|r....)?"
_TENSOR_RECORD = re.compile(
    rb"h.\(\(" + _MEMO_GET + _MEMO_GET + rb"X(.)\x00\x00\x00([0-9]+)" + _MEMO_PUT + _MEMO_GET
    + _INT + rb"t" + _MEMO_PUT + rb"Q" + _INT + _INT_TUPLE + _MEMO_PUT + _INT_TUPLE + _MEMO_PUT
    + rb"[\x88\x89]h.\)R" + _MEMO_PUT + rb"t" + _MEMO_PUT + rb"R" + _MEMO_PUT,
    re.DOTALL,
)  # fmt: skip
_INT_OPS = re.compile(_INT, re.DOTALL).findall
_TENSOR_OPS = 17  # the record's opcodes besides its two int tuples and its PUTs
#: an int tuple's stack item and opcodes by its last byte: EMPTY_TUPLE is a flat item,
#: TUPLE1..3 a tuple one level deep around their n ints (MARK ... TUPLE: ``_marked``)
_INT_TUPLE_ITEM = {0x29: (_FLAT, 1), **{0x84 + n: ((1, n + 1), n + 1) for n in (1, 2, 3)}}
_ID_ITEM = (1, 6)  # the storage id tuple: ("storage", type, key, device, numel)
_SEVEN_LONG_PUTS = struct.Struct("<" + "xI" * 7).unpack  # seven LONG_BINPUTs' indices at once


def _marked(op: bytes) -> tuple[tuple[int, int], int]:
    """MARK, n ints, TUPLE: a tuple one level deep, n + 2 opcodes."""
    n = len(_INT_OPS(op))
    return (1, n + 1), n + 2


def _memo_index(op: bytes) -> int:
    return op[1] if len(op) == 2 else _U32(op, 1)[0]  # BINPUT / BINGET, else the LONG_ ones


def _tensor_record(m: re.Match[bytes], memo: dict[int, tuple[int, int]], count: int) -> int:
    """The opcodes of a tensor record matched by _TENSOR_RECORD, its memo entries stored, when
    taking it at once is the same as one opcode at a time; 0 (nothing changed) otherwise.

    Opcode by opcode, the record pushes one flat item (its last REDUCE's), leaves the marks as
    they were, and stores in the memo: flat items, the (1, 6) storage id tuple, the (1, n + 1)
    int tuples and the arguments tuple (depth 2 when an int tuple is not empty) - provided
    the key is the declared length, the GETs whose items enter a tuple (storage name, type,
    device) fetch flat items, and no PUT names an index above the opcodes before the record
    (a forged one is then found and reported by the opcode-by-opcode walk). The other two
    GETs' items are popped by a REDUCE whatever they are."""
    (get_name, get_type, key_len, key, put_key, get_device, put_id, size, put_size, stride,
     put_stride, put_empty, put_args, put_tensor) = m.groups()  # fmt: skip
    if len(key) != key_len[0]:
        return 0
    if len(get_name) + len(get_type) + len(get_device) == 6:  # three BINGETs
        if memo.get(get_name[1], _FLAT)[0] or memo.get(get_type[1], _FLAT)[0]:
            return 0  # a tuple would enter the storage id
        if memo.get(get_device[1], _FLAT)[0]:
            return 0
    elif any(memo.get(_memo_index(get), _FLAT)[0] for get in (get_name, get_type, get_device)):
        return 0
    size_item, size_ops = _INT_TUPLE_ITEM.get(size[-1]) or _marked(size)
    stride_item, stride_ops = _INT_TUPLE_ITEM.get(stride[-1]) or _marked(stride)
    deep = size_item is not _FLAT or stride_item is not _FLAT
    items: tuple[tuple[int, int], ...] = (_FLAT, _ID_ITEM, size_item, stride_item, _FLAT,
             (2 if deep else 1, 5 + size_item[1] + stride_item[1]), _FLAT)  # fmt: skip
    puts = (put_key, put_id, put_size, put_stride, put_empty, put_args, put_tensor)
    if None not in puts and len(joined := b"".join(puts)) == 35:  # all LONG_BINPUT: in C
        indices: Sequence[int] = _SEVEN_LONG_PUTS(joined)
    else:
        items = tuple(item for op, item in zip(puts, items, strict=True) if op is not None)
        indices = [_memo_index(op) for op in puts if op is not None]
    if indices and max(indices) > count:
        return 0
    memo.update(zip(indices, items, strict=True))
    return _TENSOR_OPS + size_ops + stride_ops + len(indices)
