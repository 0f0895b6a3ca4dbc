"""The policy tables: what a pickle may import, and how bad the rest is.

The decision is allowlist-first: an import is *safe* only when its exact (module, qualname) pair
is listed here (each entry with the reason it is inert). Everything else is *suspicious* when it
looks like a data class, and *dangerous* otherwise. The denylist (known gadgets) never makes
anything safe: it only labels an import dangerous with a precise reason, and catches gadgets that
a name heuristic would rate too mildly (``logging.FileHandler`` looks like a class).

Names are compared after the unpickler's own rewriting: Python-2 names remapped as
``_compat_pickle`` does it (for protocol < 3) and module aliases folded (``posix`` -> ``os``).
"""

from __future__ import annotations

import _compat_pickle  # data tables only (the stdlib's Python-2 name mapping)
import re

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
    ("numpy.ma.core", "_mareconstruct"): _NUMPY,
    ("numpy.ma.core", "MaskedArray"): "numpy masked array: ndarray subclass",
    ("numpy.random._pickle", "__randomstate_ctor"): "numpy RNG state object",
    ("numpy.random._pickle", "__generator_ctor"): "numpy RNG state object",
    ("numpy.random._pickle", "__bit_generator_ctor"): "numpy RNG state object",
    ("numpy.random.mtrand", "RandomState"): "numpy RNG state object",
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

_STORAGE_NAMES = [
    "Float",
    "Double",
    "Half",
    "BFloat16",
    "Long",
    "Int",
    "Short",
    "Char",
    "Byte",
    "Bool",
    "ComplexFloat",
    "ComplexDouble",
    "QInt8",
    "QUInt8",
    "QInt32",
    "QUInt4x2",
    "QUInt2x4",
    "Float8_e4m3fn",
    "Float8_e5m2",
    "Untyped",
]
for _n in _STORAGE_NAMES:
    SAFE[("torch", f"{_n}Storage")] = _STORAGE
    SAFE[("torch.cuda", f"{_n}Storage")] = _STORAGE

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

#: builders whose *first argument* the loader calls: allowed only with a tensor builder there
CALLS_FIRST_ARG = {
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch._tensor", "_rebuild_from_type"),
}
TENSOR_BUILDERS = {k for k, v in SAFE.items() if v == _TENSOR_BUILDER} | {
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
}

#: persistent-id tags the torch loaders produce (anything else is a finding)
TORCH_PERSID_TAGS = {"storage", "module"}


# --- suspicious: not provably inert, but data-like; reported lower than a gadget ------------

SUSPICIOUS: dict[str, str] = {
    "argparse": "a namespace of attributes: data, but an arbitrary class instance",
    "pathlib": "a path object: data, but names files",
    "omegaconf": "omegaconf config containers (hyper_parameters of training checkpoints)",
    "transformers": "transformers training arguments/config classes",
    "accelerate": "accelerate state classes",
    "__torch__": "TorchScript class: only loadable by torch.jit, which runs the archive's code",
    "sklearn": "scikit-learn estimator: library class instance",
    "torchtext": "torchtext vocabulary class",
    "torch.optim": "torch optimizer class instance",
    "torch.nn.modules": "a whole nn.Module pickled (its class is imported and instantiated)",
    "typing": "typing construct",
    "enum": "enum class",
    "datetime": "date/time value",
    "decimal": "decimal value",
    "fractions": "fraction value",
    "uuid": "UUID value",
    "lightning": "Lightning class instance",
    "joblib.numpy_pickle": "old joblib array wrapper: the data lives in side files",
}


# --- the denylist: labels severity and gives the reason (never needed to be dangerous) -------

#: module (or package prefix) -> why importing anything from it is dangerous
DANGEROUS_MODULES: dict[str, str] = {
    "os": "runs commands / touches files and processes",
    "subprocess": "runs commands",
    "pty": "spawns processes",
    "shutil": "copies/removes files, runs archivers",
    "sys": "interpreter internals (sys.modules tricks, exit)",
    "runpy": "runs Python code",
    "importlib": "loads other code",
    "pkgutil": "resolves/loads arbitrary objects",
    "zipimport": "loads code from archives",
    "imp": "loads other code",
    "pydoc": "locates objects by name, runs pagers (shell commands)",
    "code": "interactive interpreter: runs Python source",
    "codeop": "compiles Python source",
    "cProfile": "profiler: runs Python source",
    "profile": "profiler: runs Python source",
    "trace": "tracer: runs Python source",
    "timeit": "runs Python source",
    "pdb": "debugger: runs Python source",
    "bdb": "debugger: runs Python source",
    "doctest": "runs Python source",
    "idlelib": "IDLE internals: run Python source",
    "lib2to3": "grammar loaders: unpickle/execute",
    "_pyrepl": "REPL internals: run pagers and code",
    "test": "CPython test helpers: run interpreters",
    "_aix_support": "runs commands",
    "_osx_support": "runs commands",
    "distutils": "build helpers: write files, run compilers",
    "setuptools": "build helpers: write files, run compilers",
    "pip": "installs packages (runs their code)",
    "ensurepip": "installs packages (runs their code)",
    "venv": "creates environments, runs pip",
    "ctypes": "calls native code",
    "_ctypes": "calls native code",
    "cffi": "calls native code",
    "marshal": "loads code objects",
    "types": "creates code and function objects",
    "pickle": "nested unpickling (runs whatever that pickle says)",
    "pickletools": "pickle internals",
    "shelve": "nested unpickling of a file",
    "dill": "pickles code: nested unpickling",
    "cloudpickle": "rebuilds functions from code objects",
    "copyreg": "registers reducers (only _reconstructor is allowlisted)",
    "copy": "calls __reduce_ex__/__deepcopy__ of arbitrary objects",
    "functools": "partial/reduce call arbitrary functions",
    "operator": "attrgetter/methodcaller/itemgetter reach arbitrary attributes and call them",
    "inspect": "introspection helpers that reach arbitrary objects",
    "gc": "reaches every live object",
    "builtins": "eval/exec/compile/open/getattr/__import__ run code or touch files",
    "io": "opens files",
    "codecs": "opens files",
    "tempfile": "creates files",
    "glob": "lists files",
    "fileinput": "opens files",
    "linecache": "reads files",
    "logging": "handlers open files and sockets",
    "socket": "network access",
    "ssl": "network access",
    "select": "network access",
    "selectors": "network access",
    "asyncio": "subprocess and network internals",
    "http": "network access",
    "httplib": "network access",
    "urllib": "network access",
    "urllib2": "network access",
    "urllib3": "network access",
    "requests": "network access",
    "aiohttp": "network access",
    "httpx": "network access",
    "ftplib": "network access",
    "smtplib": "network access",
    "imaplib": "network access / runs commands (IMAP4_stream)",
    "poplib": "network access",
    "telnetlib": "network access",
    "nntplib": "network access",
    "xmlrpc": "network access",
    "webbrowser": "opens URLs / runs browsers",
    "multiprocessing": "spawns processes, unpickles",
    "concurrent": "runs callables in workers",
    "threading": "runs callables in threads",
    "signal": "installs handlers",
    "atexit": "registers callables",
    "sched": "runs callables",
    "platform": "runs commands",
    "tkinter": "GUI: runs Tcl code",
    "turtle": "GUI: runs Tcl code",
    "sqlite3": "opens database files",
    "dbm": "opens files",
    "mailbox": "opens files",
    "zipfile": "opens files",
    "tarfile": "opens/extracts files",
    "numpy.testing": "runstring executes Python source",
    "numpy.f2py": "compiles and evaluates expressions",
    "numpy.distutils": "runs compilers",
    "numpy.lib.npyio": "loads files (with pickles)",
    "numpy.load": "loads files (with pickles)",
    "torch.hub": "downloads and runs code",
    "torch.jit": "compiles/loads TorchScript code",
    "torch._inductor": "compiles and loads native code",
    "torch._dynamo": "guard expressions are evaluated",
    "torch.fx": "evaluates generated code",
    "torch.utils.cpp_extension": "compiles and loads native code",
    "torch.utils.bottleneck": "profiles (runs) scripts",
    "torch.utils.collect_env": "runs commands",
    "torch.utils._config_module": "loads pickled configs",
    "torch.utils.data.datapipes": "decoders that unpickle/eval",
    "torch.serialization": "nested torch.load",
    "torch.package": "loads packaged code",
    "torch.multiprocessing": "spawns processes",
    "torch.distributed": "network access / remote calls",
    "torch.cuda.memory": "loads native allocators",
    "torch.ops": "calls native operators",
    "torch.library": "registers native code",
    "torch.storage": "_load_from_bytes is a nested torch.load",
    "torch.load": "nested torch.load",
    "joblib": "nested loading of files",
    "keras": "lambda layers run code",
    "tensorflow": "runs graph code",
    "IPython": "runs shell and Python code",
    "jinja2": "template evaluation",
    "yaml": "unsafe loaders construct arbitrary objects",
}

#: exact pairs with their own reason (more precise than the module entry)
DANGEROUS_NAMES: dict[tuple[str, str], str] = {
    ("builtins", "eval"): "evaluates Python source",
    ("builtins", "exec"): "executes Python source",
    ("builtins", "compile"): "compiles Python source",
    ("builtins", "open"): "opens files",
    ("builtins", "__import__"): "imports any module",
    ("builtins", "getattr"): "reaches any attribute (e.g. os.system)",
    ("builtins", "setattr"): "overwrites any attribute",
    ("builtins", "delattr"): "deletes any attribute",
    ("builtins", "globals"): "reaches module globals",
    ("builtins", "locals"): "reaches frame locals",
    ("builtins", "vars"): "reaches object dicts",
    ("builtins", "breakpoint"): "starts a debugger",
    ("builtins", "input"): "reads the terminal",
    ("builtins", "apply"): "calls any function (Python 2)",
    ("builtins", "execfile"): "executes a file (Python 2)",
    ("builtins", "memoryview"): "raw memory views",
    ("builtins", "type"): "creates classes",
    ("os", "system"): "runs a shell command",
    ("os", "popen"): "runs a shell command",
    ("os", "environ"): "the process environment (SETITEM changes it)",
    ("subprocess", "Popen"): "runs a command",
    ("subprocess", "getoutput"): "runs a shell command",
    ("torch", "load"): "nested torch.load (re-export of torch.serialization.load)",
    ("torch.storage", "_load_from_bytes"): "nested torch.load of embedded bytes",
    ("torch", "_load_from_bytes"): "nested torch.load of embedded bytes",
    ("pickle", "loads"): "nested unpickling of embedded bytes",
    ("pickle", "load"): "nested unpickling of a file",
    ("marshal", "loads"): "loads a code object",
    ("types", "CodeType"): "creates a code object",
    ("types", "FunctionType"): "creates a function from a code object",
    ("numpy", "load"): "loads files (with pickles)",
    ("numpy", "fromfile"): "reads files",
    ("numpy", "loadtxt"): "reads files",
    ("logging", "FileHandler"): "opens (creates) a file",
    ("io", "FileIO"): "opens a file",
    ("io", "open"): "opens a file",
    ("uuid", "_get_command_stdout"): "runs a command",
}

#: words in a class name that mark it as code/IO rather than data (for unknown classes)
CODE_WORDS = re.compile(
    r"Popen|Process|Thread|Handler|Interpreter|Console|Loader|Importer|Pipe|Shell|Socket|"
    r"Connection|Session|Client|Server|Request|Executor|Pool|CDLL|DLL|File|Compiler|Code|"
    r"Function|Command|Runner|Debugger|Profile|Trace|Timer|Pickler|Unpickler|Module|Exec|Eval"
)
