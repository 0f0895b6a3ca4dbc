"""What an imported callable can do when a pickle builds or calls it: the capability table.

A global that is not on the allowlist (``allowlist.SAFE``) is judged by its *capability*, never
by the words in its name. Each row maps a module (and its submodules) or a ``(module, qualname)``
pattern to one capability with the reason; the most specific row wins (a qualname row over a
module row, a longer module over a shorter one). A qualname row also matches the same qualname in
every submodule, so re-exports are covered (``numpy.DataSource`` and
``numpy.lib._datasource.DataSource``).

Everything with a system capability is **dangerous**: it runs code, opens or writes files,
creates directories, loads native code, imports or discovers modules, spawns processes, opens
sockets, calls one of its arguments, or reaches interpreter internals. Only ``DATA`` rows (classes
built from data that touch nothing when built) make a class **suspicious**; a function is never
data (calling it is running code sdtool has not read).

Where no row matches, the default is decided by the package, from data shipped here and not by
importing anything:

* the **standard library is a closed world**: a module of ``sys.stdlib_module_names`` that is not
  listed ``DATA`` counts as having system capabilities (most do: files, processes, imports);
* the **common ML packages are closed worlds** too (torch, numpy, transformers, diffusers,
  accelerate, lightning, joblib ...): their top-level row names their system capability and only
  the listed data subpackages (``torch.nn.modules``, ``torch.optim``, ``omegaconf`` ...) are data;
* a package sdtool has **no data on** (the user's own training code, a niche library): a class is
  suspicious (it cannot be judged; ``--strict`` fails on it), a function dangerous.

Rows with ``init_only`` mark classes whose system access is in ``__init__`` alone: rebuilt by
NEWOBJ (``cls.__new__``) and BUILD (state) they stay suspicious; called with REDUCE/INST/OBJ
(which runs ``__init__``) they are dangerous.
"""

from __future__ import annotations

import sys
from enum import Enum
from fnmatch import fnmatchcase

from sdtool.records import dataclass


class Cap(Enum):
    """One capability. Every one but DATA makes a callable dangerous."""

    EXEC = "runs code"
    FILES = "opens, reads or writes files"
    DIRS = "creates directories"
    NATIVE = "loads native code"
    IMPORT = "imports or discovers modules"
    PROCESS = "spawns processes or threads"
    NETWORK = "opens sockets"
    CALLS_ARG = "calls one of its arguments"
    INTERNALS = "reaches interpreter internals or arbitrary attributes"
    SYSTEM = "may touch the system (a closed-world module not listed as data-only)"
    DATA = "builds data only"


@dataclass(frozen=True)
class Row:
    """``module`` (fnmatch pattern, matches its submodules too) [+ ``name`` qualname pattern]."""

    module: str
    name: str | None
    cap: Cap
    reason: str
    init_only: bool = False


E, F, D, N, I_, P, W, C, X, DATA = (
    Cap.EXEC,
    Cap.FILES,
    Cap.DIRS,
    Cap.NATIVE,
    Cap.IMPORT,
    Cap.PROCESS,
    Cap.NETWORK,
    Cap.CALLS_ARG,
    Cap.INTERNALS,
    Cap.DATA,
)

# fmt: off
ROWS: tuple[Row, ...] = (
    # --- standard library: modules with system capabilities (reasons; the default is the same)
    Row("os", None, P, "runs commands, touches files and processes"),
    Row("os", "system", P, "runs a shell command"),
    Row("os", "popen", P, "runs a shell command"),
    Row("os", "environ", X, "the process environment (SETITEM changes it)"),
    Row("subprocess", None, P, "runs commands"),
    Row("subprocess", "Popen", P, "runs a command"),
    Row("subprocess", "getoutput", P, "runs a shell command"),
    Row("pty", None, P, "spawns processes"),
    Row("shutil", None, F, "copies/removes files, runs archivers"),
    Row("sys", None, X, "interpreter internals (sys.modules tricks, exit)"),
    Row("runpy", None, E, "runs Python code"),
    Row("importlib", None, I_, "loads other code"),
    Row("pkgutil", None, I_, "resolves and loads arbitrary objects"),
    Row("zipimport", None, I_, "loads code from archives"),
    Row("imp", None, I_, "loads other code"),
    Row("modulefinder", None, I_, "finds and reads module sources"),
    Row("pydoc", None, E, "locates objects by name, runs pagers (shell commands)"),
    Row("code", None, E, "interactive interpreter: runs Python source"),
    Row("codeop", None, E, "compiles Python source"),
    Row("cProfile", None, E, "profiler: runs Python source"),
    Row("profile", None, E, "profiler: runs Python source"),
    Row("trace", None, E, "tracer: runs Python source"),
    Row("timeit", None, E, "runs Python source"),
    Row("pdb", None, E, "debugger: runs Python source"),
    Row("bdb", None, E, "debugger: runs Python source"),
    Row("doctest", None, E, "runs Python source"),
    Row("idlelib", None, E, "IDLE internals: run Python source"),
    Row("lib2to3", None, E, "grammar loaders: unpickle and execute"),
    Row("_pyrepl", None, E, "REPL internals: run pagers and code"),
    Row("test", None, E, "CPython test helpers: run interpreters"),
    Row("distutils", None, P, "build helpers: write files, run compilers"),
    Row("ensurepip", None, P, "installs packages (runs their code)"),
    Row("venv", None, P, "creates environments, runs pip"),
    Row("ctypes", None, N, "calls native code"),
    Row("_ctypes", None, N, "calls native code"),
    Row("marshal", None, E, "loads code objects"),
    Row("marshal", "loads", E, "loads a code object"),
    Row("types", None, E, "creates code and function objects"),
    Row("types", "CodeType", E, "creates a code object"),
    Row("types", "FunctionType", E, "creates a function from a code object"),
    Row("types", "SimpleNamespace", DATA, "a namespace of attributes"),
    Row("pickle", None, E, "nested unpickling (runs whatever that pickle says)"),
    Row("pickle", "loads", E, "nested unpickling of embedded bytes"),
    Row("pickle", "load", E, "nested unpickling of a file"),
    Row("pickletools", None, E, "pickle internals"),
    Row("shelve", None, E, "nested unpickling of a file"),
    Row("copyreg", None, C, "registers reducers; __newobj__ calls the class it is given"),
    Row("copy", None, C, "calls __reduce_ex__/__deepcopy__ of arbitrary objects"),
    Row("functools", None, C, "partial/reduce/singledispatch call the functions they are given"),
    Row("operator", None, X, "attrgetter/methodcaller/itemgetter reach any attribute and call it"),
    Row("itertools", None, C, "starmap/accumulate/groupby call the functions they are given"),
    Row("inspect", None, X, "introspection helpers that reach arbitrary objects"),
    Row("gc", None, X, "reaches every live object"),
    Row("weakref", None, C, "finalize calls its function at exit or collection"),
    Row("atexit", None, C, "registers callables run at exit"),
    Row("sched", None, C, "runs callables"),
    Row("json", None, C, "decoders call their object_hook/parse_* arguments"),
    Row("typing", None, E, "ForwardRef compiles source that get_type_hints evaluates"),
    *(
        Row("typing", n, DATA, "a typing special form (omegaconf records it as a node type)")
        for n in ("Any", "Union", "Optional", "List", "Dict", "Tuple", "Set", "FrozenSet",
                  "Sequence", "Mapping", "Callable", "Type", "Literal", "ClassVar", "Final")
    ),
    Row("dataclasses", None, E, "make_dataclass generates and execs source"),
    Row("abc", None, E, "creates classes (runs __init_subclass__ of the bases)"),
    Row("builtins", None, E, "eval/exec/compile/open/getattr/__import__ run code or touch files"),
    Row("builtins", "eval", E, "evaluates Python source"),
    Row("builtins", "exec", E, "executes Python source"),
    Row("builtins", "compile", E, "compiles Python source"),
    Row("builtins", "open", F, "opens files"),
    Row("builtins", "__import__", I_, "imports any module"),
    Row("builtins", "getattr", X, "reaches any attribute (e.g. os.system)"),
    Row("builtins", "setattr", X, "overwrites any attribute"),
    Row("builtins", "delattr", X, "deletes any attribute"),
    Row("builtins", "globals", X, "reaches module globals"),
    Row("builtins", "locals", X, "reaches frame locals"),
    Row("builtins", "vars", X, "reaches object dicts"),
    Row("builtins", "breakpoint", E, "starts a debugger"),
    Row("builtins", "input", F, "reads the terminal"),
    Row("builtins", "apply", C, "calls any function (Python 2)"),
    Row("builtins", "execfile", E, "executes a file (Python 2)"),
    Row("builtins", "memoryview", X, "raw memory views"),
    Row("builtins", "type", E, "creates classes"),
    Row("builtins", "map", C, "calls its function on every item"),
    Row("builtins", "filter", C, "calls its function on every item"),
    Row("builtins", "sorted", C, "calls its key function"),
    Row("builtins", "min", C, "calls its key function"),
    Row("builtins", "max", C, "calls its key function"),
    Row("builtins", "iter", C, "iter(callable, sentinel) calls its first argument"),
    Row("builtins", "property", C, "its getter runs on attribute access"),
    Row("io", None, F, "opens files"),
    Row("io", "FileIO", F, "opens a file"),
    Row("io", "open", F, "opens a file"),
    Row("codecs", None, F, "opens files; codec lookup imports encodings modules"),
    Row("encodings", None, I_, "codec modules, found by importing them by name"),
    Row("tempfile", None, F, "creates files and directories"),
    Row("glob", None, F, "lists files"),
    Row("fileinput", None, F, "opens files"),
    Row("linecache", None, F, "reads files"),
    Row("filecmp", None, F, "reads files and directories"),
    Row("zoneinfo", None, F, "ZoneInfo(key) reads a time-zone file named by the pickle"),
    Row("netrc", None, F, "reads a file"),
    Row("mimetypes", None, F, "MimeTypes reads mime.types files"),
    Row("configparser", None, F, "reads files, interpolates"),
    Row("gzip", None, F, "GzipFile opens (creates) files"),
    Row("bz2", None, F, "BZ2File opens (creates) files"),
    Row("lzma", None, F, "LZMAFile opens (creates) files"),
    Row("wave", None, F, "opens files"),
    Row("aifc", None, F, "opens files"),
    Row("sunau", None, F, "opens files"),
    Row("logging", None, F, "handlers open files and sockets"),
    Row("logging", "FileHandler", F, "opens (creates) a file"),
    Row("socket", None, W, "network access"),
    Row("ssl", None, W, "network access"),
    Row("select", None, W, "network access"),
    Row("selectors", None, W, "network access"),
    Row("asyncio", None, P, "subprocess and network internals"),
    Row("http", None, W, "network access (http.server binds sockets)"),
    Row("socketserver", None, W, "binds sockets"),
    Row("urllib", None, W, "network access"),
    Row("ftplib", None, W, "network access"),
    Row("smtplib", None, W, "network access"),
    Row("imaplib", None, W, "network access / runs commands (IMAP4_stream)"),
    Row("poplib", None, W, "network access"),
    Row("telnetlib", None, W, "network access"),
    Row("nntplib", None, W, "network access"),
    Row("xmlrpc", None, W, "network access"),
    Row("webbrowser", None, P, "opens URLs / runs browsers"),
    Row("multiprocessing", None, P, "spawns processes, unpickles"),
    Row("concurrent", None, P, "runs callables in workers"),
    Row("threading", None, P, "runs callables in threads"),
    Row("_thread", None, P, "runs callables in threads"),
    Row("signal", None, C, "installs handlers"),
    Row("platform", None, P, "runs commands"),
    Row("uuid", None, P, "getnode and friends run commands"),
    Row("uuid", "_get_command_stdout", P, "runs a command"),
    Row("tkinter", None, E, "GUI: runs Tcl code"),
    Row("turtle", None, E, "GUI: runs Tcl code"),
    Row("sqlite3", None, F, "opens database files"),
    Row("dbm", None, F, "opens files"),
    Row("mailbox", None, F, "opens files"),
    Row("zipfile", None, F, "opens files"),
    Row("tarfile", None, F, "opens and extracts files"),
    Row("_aix_support", None, P, "runs commands"),
    Row("_osx_support", None, P, "runs commands"),
    # --- standard library: data-only modules (classes built from data)
    Row("argparse", None, DATA, "a namespace of attributes: data, but an arbitrary class instance"),
    Row("argparse", "FileType", F, "its instances open files when called"),
    Row("pathlib", None, DATA, "a path object: data, but names files"),
    Row("collections", None, DATA, "container classes"),
    Row("datetime", None, DATA, "date/time value"),
    Row("decimal", None, DATA, "decimal value"),
    Row("fractions", None, DATA, "fraction value"),
    Row("numbers", None, DATA, "number ABCs"),
    Row("enum", None, DATA, "enum class"),
    Row("ipaddress", None, DATA, "address value"),
    Row("array", None, DATA, "typed array"),
    Row("random", None, DATA, "random generator state"),
    Row("statistics", None, DATA, "distribution value"),
    Row("string", None, DATA, "templates and formatters"),
    Row("struct", None, DATA, "a compiled struct format"),
    Row("textwrap", None, DATA, "text wrapper settings"),
    Row("re", None, DATA, "regex flags"),
    Row("uuid", "UUID", DATA, "UUID value"),
    Row("uuid", "SafeUUID", DATA, "UUID flag"),
    # --- torch: a closed world (hub, jit, fx, inductor, cpp_extension, serialization ...)
    Row("torch", None, E, "torch: loaders, compilers and hubs that run code (only listed "
                         "submodules are data)"),
    Row("torch", "load", E, "nested torch.load (re-export of torch.serialization.load)"),
    Row("torch", "_load_from_bytes", E, "nested torch.load of embedded bytes"),
    Row("torch.storage", "_load_from_bytes", E, "nested torch.load of embedded bytes"),
    Row("torch.serialization", None, E, "nested torch.load"),
    Row("torch.hub", None, W, "downloads and runs code"),
    Row("torch.jit", None, E, "compiles and loads TorchScript code"),
    Row("torch._inductor", None, N, "compiles and loads native code"),
    Row("torch._dynamo", None, E, "guard expressions are evaluated"),
    Row("torch.fx", None, E, "evaluates generated code"),
    Row("torch.package", None, E, "loads packaged code"),
    Row("torch.utils.cpp_extension", None, N, "compiles and loads native code"),
    Row("torch.utils.tensorboard", None, D, "SummaryWriter creates its log directory and files"),
    Row("torch.utils.data.datapipes", None, E, "decoders that unpickle or eval"),
    Row("torch.multiprocessing", None, P, "spawns processes"),
    Row("torch.distributed", None, W, "network access / remote calls"),
    Row("torch.ops", None, N, "calls native operators"),
    Row("torch.library", None, N, "registers native code"),
    Row("torch.classes", None, N, "load_library loads shared libraries"),
    Row("torch.optim.lr_scheduler", "LambdaLR", C, "calls its lr_lambda when built"),
    Row("torch.optim.lr_scheduler", "MultiplicativeLR", C, "calls its lr_lambda when built"),
    Row("torch.nn.modules", None, DATA, "a whole nn.Module pickled (its class is instantiated)"),
    Row("torch.nn.quantized", None, DATA, "a quantized nn.Module"),
    Row("torch.ao.nn", None, DATA, "a quantized nn.Module"),
    Row("torch.nn.parameter", None, DATA, "parameter classes"),
    Row("torch.optim", None, DATA, "torch optimizer class instance"),
    Row("torch.return_types", None, DATA, "named tuples of results"),
    Row("__torch__", None, DATA, "TorchScript class: only loadable by torch.jit, which runs the "
                                 "archive's code"),
    # --- numpy: file/URL readers, native loaders, compilers; the array modules are data
    Row("numpy", None, DATA, "numpy value class"),
    Row("numpy", "DataSource", W, "opens files and URLs"),
    Row("numpy", "memmap", F, "maps (creates) a file"),
    Row("numpy", "NpzFile", F, "opens a file"),
    Row("numpy", "load", F, "loads files (with pickles)"),
    Row("numpy", "fromfile", F, "reads files"),
    Row("numpy", "loadtxt", F, "reads files"),
    Row("numpy.lib.npyio", None, F, "loads files (with pickles)"),
    Row("numpy.lib._npyio_impl", None, F, "loads files (with pickles)"),
    Row("numpy.lib.format", None, F, "open_memmap opens files"),
    Row("numpy.lib._datasource", None, W, "opens files and URLs"),
    Row("numpy.ctypeslib", None, N, "load_library loads shared libraries"),
    Row("numpy.testing", None, E, "runstring executes Python source"),
    Row("numpy.f2py", None, E, "compiles and evaluates expressions"),
    Row("numpy.distutils", None, P, "runs compilers"),
    Row("numpy._pytesttester", None, P, "runs the test suite"),
    # --- ML libraries seen in training checkpoints
    Row("transformers", None, W, "from_pretrained downloads and loads files, tokenizers open "
                                 "vocabulary files when built, remote code runs"),
    Row("transformers.training_args", None, DATA, "transformers training arguments"),
    Row("transformers.trainer_utils", None, DATA, "transformers training enums"),
    Row("transformers.trainer_pt_utils", "AcceleratorConfig", DATA, "accelerator settings"),
    Row("transformers.configuration_utils", None, DATA, "model configuration"),
    Row("transformers.models.*.configuration_*", None, DATA, "model configuration"),
    Row("transformers.generation.configuration_utils", None, DATA, "generation configuration"),
    Row("transformers.utils.quantization_config", None, DATA, "quantization configuration"),
    Row("accelerate", None, P, "launches processes and initializes distributed state"),
    Row("accelerate.utils.dataclasses", None, DATA, "accelerate settings"),
    Row("accelerate.state", "PartialState", W, "its __init__ initializes torch.distributed "
        "(sockets) from the environment", init_only=True),
    Row("accelerate.state", "AcceleratorState", W, "its __init__ initializes torch.distributed "
        "(sockets) from the environment", init_only=True),
    Row("diffusers", None, W, "pipelines download and load files, remote code runs"),
    Row("diffusers.configuration_utils", None, DATA, "configuration dict"),
    Row("diffusers.schedulers", None, DATA, "scheduler settings"),
    Row("lightning", None, P, "trainers spawn processes, loggers create directories"),
    Row("lightning.fabric.utilities.data", None, DATA, "hyper-parameter dict"),
    Row("lightning.pytorch.utilities.parsing", None, DATA, "hyper-parameter dict"),
    Row("lightning.pytorch.callbacks", None, DATA, "callback state", init_only=True),
    Row("omegaconf", None, DATA, "omegaconf config containers (training hyper-parameters)"),
    Row("sklearn", None, DATA, "scikit-learn estimator: library class instance"),
    Row("sklearn.datasets", None, W, "downloads and reads data files"),
    Row("torchtext.vocab", None, DATA, "torchtext vocabulary class"),
    Row("joblib", None, F, "Memory creates cache directories, Parallel spawns workers, nested "
                           "loading of files"),
    Row("joblib.numpy_pickle", "NDArrayWrapper", DATA, "old joblib array wrapper: numpy.load "
        "(no pickles) of a side file next to the pickle"),
    Row("joblib.numpy_pickle", "ZNDArrayWrapper", DATA, "old joblib array wrapper: a zlib side "
        "file next to the pickle"),
    # --- packages whose every callable touches the system
    Row("safetensors", None, F, "safe_open/load_file read files"),
    Row("gguf", None, F, "GGUFReader maps files, GGUFWriter writes them"),
    Row("huggingface_hub", None, W, "downloads files"),
    Row("fsspec", None, W, "opens local and remote files"),
    Row("filelock", None, F, "creates lock files"),
    Row("datasets", None, W, "downloads and writes data files"),
    Row("requests", None, W, "network access"),
    Row("urllib3", None, W, "network access"),
    Row("httpx", None, W, "network access"),
    Row("aiohttp", None, W, "network access"),
    Row("httplib", None, W, "network access"),
    Row("urllib2", None, W, "network access"),
    Row("setuptools", None, P, "build helpers: write files, run compilers"),
    Row("pip", None, P, "installs packages (runs their code)"),
    Row("pkg_resources", None, I_, "finds and loads entry points"),
    Row("importlib_metadata", None, I_, "finds and loads entry points"),
    Row("cffi", None, N, "calls native code"),
    Row("numba", None, N, "compiles native code"),
    Row("triton", None, N, "compiles native code"),
    Row("dill", None, E, "pickles code: nested unpickling"),
    Row("cloudpickle", None, E, "rebuilds functions from code objects"),
    Row("keras", None, E, "lambda layers run code"),
    Row("tensorflow", None, E, "runs graph code"),
    Row("IPython", None, E, "runs shell and Python code"),
    Row("jinja2", None, E, "template evaluation"),
    Row("yaml", None, E, "unsafe loaders construct arbitrary objects"),
    Row("sympy", None, E, "sympify evaluates strings"),
    Row("PIL", None, F, "opens image files"),
    Row("PIL.Image", "Image", DATA, "an image (decoded from bytes)"),
    Row("h5py", None, F, "opens files"),
    Row("tensorboard", None, D, "writers create directories and files"),
    Row("tensorboardX", None, D, "writers create directories and files"),
    Row("wandb", None, W, "network access, spawns processes"),
    Row("onnxruntime", None, N, "loads models and native providers"),
    Row("pandas.io", None, F, "readers and writers open files"),
    Row("scipy.io", None, F, "readers and writers open files"),
)
# fmt: on

#: the standard library: a closed world (a module not listed as data-only is system)
STDLIB = frozenset(sys.stdlib_module_names)


@dataclass(frozen=True)
class Judgement:
    """What the table says about one global: its capability and why."""

    cap: Cap | None  # None: a package sdtool has no data on
    reason: str
    row: Row | None = None

    @property
    def init_only(self) -> bool:
        return self.row is not None and self.row.init_only


def _module_matches(pattern: str, module: str) -> int:
    """The specificity of ``pattern`` for ``module`` (0: no match): dotted parts matched."""
    parts = module.split(".")
    want = pattern.split(".")
    if len(want) > len(parts):
        return 0
    head = ".".join(parts[: len(want)])
    if head == pattern or ("*" in pattern and fnmatchcase(head, pattern)):
        return len(want)
    return 0


def _build_index() -> tuple[dict[str, list[Row]], list[Row]]:
    by_top: dict[str, list[Row]] = {}
    globbed: list[Row] = []
    for row in ROWS:
        top = row.module.split(".")[0]
        if "*" in top:
            globbed.append(row)
        else:
            by_top.setdefault(top, []).append(row)
    return by_top, globbed


_BY_TOP, _GLOBBED = _build_index()


def lookup(module: str, qualname: str) -> Judgement:
    """The capability of ``module.qualname`` (module canonical: ``posix`` already ``os``)."""
    top = module.split(".")[0]
    best: tuple[int, int, Row] | None = None
    for row in (*_BY_TOP.get(top, ()), *_GLOBBED):
        depth = _module_matches(row.module, module)
        if not depth:
            continue
        if row.name is not None and not fnmatchcase(qualname, row.name):
            continue
        rank = (1 if row.name is not None else 0, depth)
        if best is None or rank > best[:2]:
            best = (*rank, row)
    if best is not None:
        row = best[2]
        return Judgement(row.cap, row.reason, row)
    if top in STDLIB:
        return Judgement(
            Cap.SYSTEM,
            "a standard-library module not listed as data-only (the standard library is a "
            "closed world: files, processes, imports)",
        )
    return Judgement(None, "")


__all__ = ["ROWS", "Cap", "Judgement", "Row", "lookup"]
