"""The policy tables: what a pickle may import, and how bad the rest is.

The decision is allowlist-first: an import is *safe* only when its exact (module, qualname) pair
is listed here (each entry with the reason it is inert), and, for the few allowlisted callables
that call one of their arguments, only when that argument passes ``ARG_CHECKS``. Everything else
is judged by what it can do (``sdtool.scan.capabilities``), never by its name.

Names are compared after the unpickler's own rewriting: Python-2 names remapped as
``_compat_pickle`` does it (for protocol < 3) and module aliases folded (``posix`` -> ``os``).
"""

from __future__ import annotations

import _compat_pickle  # data tables only (the stdlib's Python-2 name mapping)
import re

from sdtool.dtypes import STORAGE_ITEMSIZE

# --- module aliases: the same module under another name --------------------------------------

#: module spelling -> the module it really is (for classification; the unpickler imports either)
MODULE_ALIASES: dict[str, str] = {
    "posix": "os",
    "nt": "os",
    "posixpath": "os.path",
    "ntpath": "os.path",
    "_io": "io",
    "_operator": "operator",
    "_pickle": "pickle",
    "cPickle": "pickle",
    "_functools": "functools",
    "_socket": "socket",
    "_thread": "threading",
    "thread": "threading",
    "__builtin__": "builtins",
    "_codecs": "_codecs",  # kept apart: _codecs.encode is allowlisted, codecs.open is not
    "numpy.core": "numpy._core",
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core.numeric": "numpy._core.numeric",
    "numpy.core._multiarray_umath": "numpy._core._multiarray_umath",
    "_posixsubprocess": "subprocess",
    "_subprocess": "subprocess",
    "_winapi": "subprocess",
    "pytorch_lightning": "lightning.pytorch",
    "lightning_fabric": "lightning.fabric",
}

#: Python-2 module names the unpickler rewrites (protocol < 3), from the stdlib's table
PY2_IMPORTS: dict[str, str] = dict(_compat_pickle.IMPORT_MAPPING)
#: Python-2 (module, name) pairs the unpickler rewrites (protocol < 3)
PY2_NAMES: dict[tuple[str, str], tuple[str, str]] = dict(_compat_pickle.NAME_MAPPING)


# --- the allowlist: exact (module, qualname) pairs, each with why it is inert ----------------

_TENSOR_BUILDER = (
    "torch tensor builder: makes a tensor from a storage and sizes, calls nothing else"
)
_STORAGE = "torch storage class: only named in a persistent id, never called by the loader"
_DTYPE = "torch dtype object: a constant"
_NUMPY = "numpy array/scalar reconstruction from bytes: builds data only"

SAFE: dict[tuple[str, str], str] = {
    ("collections", "OrderedDict"): "ordered dict: plain data",
    ("collections", "defaultdict"): "dict subclass: plain data (its factory is checked on its own)",
    ("collections", "Counter"): "dict subclass: plain data",
    ("collections", "deque"): "sequence: plain data",
    ("builtins", "set"): "plain data",
    ("builtins", "frozenset"): "plain data",
    ("builtins", "bytearray"): "plain data",
    ("builtins", "bytes"): "plain data",
    ("builtins", "complex"): "plain data",
    ("builtins", "slice"): "plain data",
    ("builtins", "range"): "plain data",
    ("builtins", "dict"): "plain data",
    ("builtins", "list"): "plain data",
    ("builtins", "tuple"): "plain data",
    ("builtins", "int"): "plain data",
    ("builtins", "float"): "plain data",
    ("builtins", "str"): "plain data",
    ("builtins", "bool"): "plain data",
    ("builtins", "object"): "base class named by copyreg._reconstructor: creates an empty object",
    ("_codecs", "encode"): "turns a latin-1 str into bytes (how protocol 2 pickles bytes)",
    ("copyreg", "_reconstructor"): "object.__new__ on the class it is given (classified itself)",
    ("torch._utils", "_rebuild_tensor"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_tensor_v2"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_tensor_v3"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_parameter"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_parameter_with_state"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_qtensor"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_sparse_tensor"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_sparse_csr_tensor"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_nested_tensor"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_wrapper_subclass"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_xla_tensor"): _TENSOR_BUILDER,
    ("torch._utils", "_rebuild_mtia_tensor"): _TENSOR_BUILDER,
    ("torch._tensor", "_rebuild_from_type"): "tensor subclass rebuild (checked: calls its 1st arg)",
    (
        "torch._tensor",
        "_rebuild_from_type_v2",
    ): "tensor subclass rebuild (checked: calls its 1st arg)",
    ("torch", "Size"): "tuple of ints",
    ("torch", "device"): "device name: a constant",
    ("torch", "Tensor"): "tensor class (as a subclass marker)",
    ("torch.storage", "UntypedStorage"): _STORAGE,
    ("torch.storage", "TypedStorage"): _STORAGE,
    ("torch", "UntypedStorage"): _STORAGE,
    ("torch", "TypedStorage"): _STORAGE,
    ("torch.nn.parameter", "Parameter"): "nn.Parameter: a tensor with requires_grad",
    ("torch.nn.parameter", "Buffer"): "nn.Buffer: a tensor marker",
    ("torch.nn.modules.container", "ParameterDict"): "dict of Parameters",
    ("torch.nn.modules.container", "ParameterList"): "list of Parameters",
    ("torch.jit._pickle", "build_intlist"): "TorchScript list builder: returns its argument",
    ("torch.jit._pickle", "build_tensorlist"): "TorchScript list builder: returns its argument",
    ("torch.jit._pickle", "build_doublelist"): "TorchScript list builder: returns its argument",
    ("torch.jit._pickle", "build_boollist"): "TorchScript list builder: returns its argument",
    ("torch.jit._pickle", "build_tensor_from_id"): "TorchScript tensor table lookup",
    ("torch.jit._pickle", "restore_type_tag"): "TorchScript type tag: returns its argument",
    ("numpy", "dtype"): _NUMPY,
    ("numpy", "ndarray"): _NUMPY,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY,
    ("numpy._core.multiarray", "scalar"): _NUMPY,
    ("numpy._core.numeric", "_frombuffer"): _NUMPY,
    ("numpy.matrixlib.defmatrix", "matrix"): "numpy matrix: ndarray subclass",
    ("numpy", "matrix"): "numpy matrix: ndarray subclass (numpy 2 spelling)",
    ("torch.serialization", "_get_layout"): (
        "looks a torch.layout constant up by its name (sparse tensors); loads nothing"
    ),
    ("numpy.ma.core", "_mareconstruct"): _NUMPY,
    ("numpy.ma.core", "MaskedArray"): "numpy masked array: ndarray subclass",
    ("numpy.random._pickle", "__randomstate_ctor"): "numpy RNG state object",
    ("numpy.random._pickle", "__generator_ctor"): "numpy RNG state object",
    ("numpy.random._pickle", "__bit_generator_ctor"): "numpy RNG state object",
    ("numpy.random.mtrand", "RandomState"): "numpy RNG state object",
    ("numpy.random._pcg64", "PCG64"): "numpy bit generator (state restored by BUILD)",
    ("numpy.random._pcg64", "PCG64DXSM"): "numpy bit generator (state restored by BUILD)",
    ("numpy.random._mt19937", "MT19937"): "numpy bit generator (state restored by BUILD)",
    ("numpy.random._philox", "Philox"): "numpy bit generator (state restored by BUILD)",
    ("numpy.random._sfc64", "SFC64"): "numpy bit generator (state restored by BUILD)",
    ("numpy.random.bit_generator", "SeedSequence"): "numpy seed sequence: numbers",
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"): (
        "Cython unpickle helper: __new__ of the class it is given (checked), then its state"
    ),
    ("numpy._core._internal", "_convert_to_stringdtype_kwargs"): (
        "numpy StringDType from its options (coerce, na_object)"
    ),
    ("datetime", "datetime"): "plain data",
    ("datetime", "date"): "plain data",
    ("datetime", "time"): "plain data",
    ("datetime", "timedelta"): "plain data",
    ("datetime", "timezone"): "plain data",
    ("joblib.numpy_pickle", "NumpyArrayWrapper"): "joblib inline array header (data follows)",
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"): (
        "Lightning callback state in SD 1.x training checkpoints: attributes only"
    ),
}

# every torch storage class: the one table (sdtool.dtypes.STORAGE_ITEMSIZE, which the scanner
# also steps over legacy raw storages with)
for _name in STORAGE_ITEMSIZE:
    SAFE[("torch", _name)] = _STORAGE
    SAFE[("torch.cuda", _name)] = _STORAGE

#: torch's legacy tensor types (``torch._tensor_classes``, checked against torch by the tests)
TENSOR_TYPES = (
    "BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short",
)  # fmt: skip
_TENSOR_TYPE = (
    "torch legacy tensor type: the TAR format names it in each tensor record and never calls it; "
    "called, it makes a tensor from sizes, a sequence or a storage (torch's weights_only allows it)"
)
for _module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse"):
    for _name in TENSOR_TYPES:
        if not (_module.endswith("sparse") and _name == "Bool"):  # no sparse BoolTensor
            SAFE[(_module, f"{_name}Tensor")] = _TENSOR_TYPE

_TORCH_CONSTANTS = [
    "float32",
    "float",
    "float64",
    "double",
    "float16",
    "half",
    "bfloat16",
    "complex32",
    "complex64",
    "cfloat",
    "complex128",
    "cdouble",
    "uint8",
    "int8",
    "int16",
    "short",
    "int32",
    "int",
    "int64",
    "long",
    "bool",
    "uint16",
    "uint32",
    "uint64",
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits8",
    "bits16",
    "per_tensor_affine",
    "per_channel_affine",
    "per_tensor_symmetric",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
    "contiguous_format",
    "channels_last",
    "channels_last_3d",
    "preserve_format",
    "strided",
    "sparse_coo",
    "sparse_csr",
]
for _n in _TORCH_CONSTANTS:
    SAFE[("torch", _n)] = _DTYPE

_NUMPY_SCALARS = [
    "bool_",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "longdouble",
    "complex64",
    "complex128",
    "clongdouble",
    "str_",
    "bytes_",
    "void",
    "datetime64",
    "timedelta64",
    "intc",
    "uintc",
    "int_",
    "uint",
    "longlong",
    "ulonglong",
    "half",
    "single",
    "double",
    "csingle",
    "cdouble",
    "object_",
]
for _n in _NUMPY_SCALARS:
    SAFE[("numpy", _n)] = "numpy scalar type: a constant"

#: numpy 2 dtype classes: numpy.dtypes.Float64DType and friends
SAFE_PATTERNS: list[tuple[str, re.Pattern[str], str]] = [
    ("numpy.dtypes", re.compile(r"[A-Za-z0-9]+DType\Z"), "numpy dtype class: a constant"),
]

#: allowlisted callables that call (or look up by name) what one of their arguments names: each
#: (argument position, requirement, what the callable does with it). ``-1``/"no-args": the call
#: itself must have no arguments. Requirements: "tensor-builder" (an allowlisted tensor builder),
#: "safe-global" (an allowlisted import), "safe-global-or-absent", "safe-global-or-none",
#: "global" (an import, judged on its own; not a computed value), "name-or-safe-global" (a
#: literal string or an allowlisted import), "codec" (a literal name of a built-in codec).
ARG_CHECKS: dict[tuple[str, str], tuple[tuple[int, str, str], ...]] = {
    ("torch._tensor", "_rebuild_from_type_v2"): (
        (0, "tensor-builder", "calls it with the remaining arguments"),
        (1, "safe-global", "turns the result into this tensor subclass"),
    ),
    ("torch._tensor", "_rebuild_from_type"): (
        (0, "tensor-builder", "calls it with the remaining arguments"),
        (1, "safe-global", "turns the result into this tensor subclass"),
    ),
    ("torch._utils", "_rebuild_wrapper_subclass"): (
        (0, "safe-global", "makes an instance of this class"),
    ),
    ("numpy._core.multiarray", "_reconstruct"): (
        (0, "safe-global", "creates an array of this subtype (runs its __array_finalize__)"),
    ),
    ("numpy.ma.core", "_mareconstruct"): (
        (0, "safe-global", "calls this class's __new__"),
        (1, "safe-global", "creates an array of this class"),
    ),
    ("numpy.random._pickle", "__generator_ctor"): (
        (1, "safe-global-or-absent", "calls it with the first argument (bit_generator_ctor)"),
    ),
    ("numpy.random._pickle", "__randomstate_ctor"): (
        (1, "safe-global-or-absent", "calls it with the first argument (bit_generator_ctor)"),
    ),
    ("numpy.random._pickle", "__bit_generator_ctor"): (
        (0, "name-or-safe-global", "instantiates the class it is given"),
    ),
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"): (
        (0, "safe-global", "calls this class's __new__"),
    ),
    ("collections", "defaultdict"): (
        (0, "safe-global-or-none", "calls it (default_factory) for every missing key"),
    ),
    ("copyreg", "_reconstructor"): (
        (0, "global", "object.__new__ of this class"),
        (1, "safe-global", "calls this base's __new__ and __init__"),
    ),
    ("_codecs", "encode"): (
        (1, "codec", "looks the codec up by name (importing encodings.<name>)"),
    ),
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"): (
        (
            -1,
            "no-args",
            "its __init__ resolves the checkpoint folder through fsspec, which "
            "imports filesystem modules by protocol",
        ),
    ),
}
#: codecs ``_codecs.encode`` may name: built into the interpreter, found without an import
BUILTIN_CODECS = frozenset({"latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii"})

TENSOR_BUILDERS = {k for k, v in SAFE.items() if v == _TENSOR_BUILDER} | {
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
}

#: persistent-id tags the torch loaders produce (anything else is a finding)
TORCH_PERSID_TAGS = {"storage", "module"}
