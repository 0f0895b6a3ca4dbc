"""The common model of a model file: lazy tensors, the non-tensor rest, and container facts.

Every reader (safetensors, torch zip/legacy/TAR, plain pickle, numpy) produces a ModelFile; every
operation (inspect, convert, prune, scan's summary, identify, diff) consumes one. Opening reads
headers and pickles only; tensor bytes are read when ``ModelFile.read`` asks for them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import field
from math import prod
from operator import mul
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sdtool.dtypes import DType
from sdtool.errors import CorruptFile, MissingExtra, TruncatedFile
from sdtool.records import dataclass
from sdtool.results import Result
from sdtool.vocab import Format

if TYPE_CHECKING:  # numpy loads when tensor values are read, not to list them
    import numpy as np


@dataclass(eq=False)
class Storage:
    """One run of raw tensor bytes, shared by every tensor that views it.

    ``file_offset`` is set when the bytes sit uncompressed in the file (safetensors, stored zip
    members, legacy torch), so they can be mmapped or copied without Python touching them.
    Otherwise ``load`` returns them (a deflated zip member, a nested in-memory torch file).
    Mutable only while a reader builds it (legacy torch files give offsets after the pickle).
    """

    key: str
    dtype: DType
    nbytes: int
    file_offset: int | None = None
    load: Callable[[], bytes] | None = None
    big_endian: bool = False

    @property
    def numel(self) -> int:
        return self.nbytes // self.dtype.itemsize


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """A tensor's description and where its bytes live; reading them is ModelFile.read's job.

    ``strides`` and ``offset`` are in elements of ``dtype``, as torch counts them.
    """

    dtype: DType
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    storage: Storage
    parameter: bool = False
    requires_grad: bool = False

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize  # numel's product, without its call

    @property
    def type_code(self) -> str:
        """The stored element type: the dtype's code, or a block format (GGUF's ``Q4_K``)."""
        return self.dtype.code

    @property
    def is_contiguous(self) -> bool:
        """C-contiguous (torch's default layout); size-0/1 dimensions never break it."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    @property
    def file_span(self) -> tuple[int, int] | None:
        """(absolute offset, length) of this tensor's bytes when they lie in the file as-is."""
        st = self.storage
        if st.file_offset is None or st.big_endian or not self.is_contiguous:
            return None
        return st.file_offset + self.offset * self.dtype.itemsize, self.nbytes

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)}"

    def __setstate__(self, state: Any) -> None:
        """Old pickles BUILD a Parameter with ``(requires_grad, ...)``; keep only that flag."""
        if isinstance(state, tuple) and state and isinstance(state[0], bool):
            object.__setattr__(self, "requires_grad", state[0])


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a C-contiguous tensor of ``shape``."""
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def check_view(info: TensorInfo, where: str) -> None:
    """Raise CorruptFile unless every element the view addresses lies inside its storage."""
    shape, strides = info.shape, info.strides
    if min(shape, default=0) < 0 or min(strides, default=0) < 0 or info.offset < 0:
        raise CorruptFile(f"tensor {where!r} has a negative size, stride or offset")
    if prod(shape) == 0:
        return
    if len(shape) != len(strides):
        raise ValueError(f"tensor {where!r}: {len(shape)} sizes but {len(strides)} strides")
    # sum((n - 1) * s), in C: a checkpoint has thousands of tensors
    last = info.offset + sum(map(mul, shape, strides)) - sum(strides)
    if (last + 1) * info.dtype.itemsize > info.storage.nbytes:
        raise CorruptFile(
            f"tensor {where!r} reaches element {last} but its storage "
            f"{info.storage.key!r} holds {info.storage.numel}"
        )


@dataclass(eq=False)
class StandIn:
    """An inert record of an object the file asked for by a global sdtool does not allow.

    It is never called and never imported: it only remembers what the pickle said to do with it
    (call it with ``args``, set ``state``, add ``items``), so tensors inside it can still be found
    and its contents can be shown.
    """

    module: str
    name: str
    args: tuple[Any, ...] | None = None  # None: the global itself, never called
    kwargs: dict[str, Any] | None = None
    state: Any = None
    items: list[tuple[Any, Any]] = field(default_factory=list)
    listitems: list[Any] = field(default_factory=list)

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<{self.qualname}>"

    # What the unpickler may do to an object on its stack; each only records.
    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.listitems.append(value)

    def extend(self, values: Any) -> None:
        self.listitems.extend(values if isinstance(values, list | tuple) else [values])

    def add(self, value: Any) -> None:
        self.listitems.append(value)

    def __call__(self, *args: Any, **kwargs: Any) -> StandIn:
        return StandIn(self.module, f"{self.name}()", args, kwargs or None)


@dataclass(frozen=True)
class GlobalUse:
    """A global the unpickler met, how often, and whether sdtool built it or stood it in."""

    module: str
    name: str
    count: int
    builder: bool  # True: mapped to one of sdtool's own data builders; False: an inert StandIn


@dataclass(frozen=True)
class ContainerFacts(Result):
    """Facts about a file's container, typed per format (each reader defines its subclass:
    ``SafetensorsFacts``, ``ZipFacts``, ``LegacyFacts``, ``TarFacts``, ``PickleFacts``,
    ``NpyFacts``, ``NpzFacts``). ``state_dict_path``: where the tensors were found in a pickle
    ("" at the root or for formats without one)."""

    state_dict_path: str = ""


class ByteSource(Protocol):
    """Bytes that are not a local file (``sdtool.formats.source.RangeReader``: a remote file)."""

    path: Path
    size: int

    def pread(self, offset: int, n: int) -> bytes: ...

    def close(self) -> None: ...


class ModelFile:
    """An opened model file: ordered tensors with data on demand, plus everything else it holds.

    Attributes:
        path: the file (a ``sdtool.urls.UrlPath`` for a remote one).
        source: for a remote file, where its bytes come from (closed with the ModelFile);
            None for a local file, which is memory-mapped.
        format: the ``vocab.Format``: SAFETENSORS, TORCH_ZIP, TORCH_LEGACY, TORCH_TAR, PICKLE,
            NPY or NPZ.
        tensors: name -> TensorInfo, in file order (state-dict tensors, dotted names).
        metadata: the safetensors ``__metadata__`` map (empty for other formats).
        extra: the non-tensor rest as plain data (global_step, epoch, ...); tensors that lie
            outside the state dict (optimizer state) stay here as TensorInfo leaves.
        container: typed facts about the container (ContainerFacts: zip prefix, byteorder,
            version records ...).
        globals: every global the unpickler met.
    """

    def __init__(
        self,
        path: Path | ByteSource,
        format: Format,
        tensors: dict[str, TensorInfo],
        *,
        metadata: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        container: ContainerFacts | None = None,
        globals: list[GlobalUse] | None = None,
    ) -> None:
        self.source: ByteSource | None = None if isinstance(path, Path) else path
        self.path: Path = path if isinstance(path, Path) else path.path
        self.format = format
        self.tensors = tensors
        self.metadata = metadata or {}
        self.extra = extra or {}
        self.container = container if container is not None else ContainerFacts()
        self.globals = globals or []
        self.file_size = self.source.size if self.source else self.path.stat().st_size
        self._mmap: mmap.mmap | None = None

    # -- data on demand -------------------------------------------------------------------------

    def read(self, name: str, framework: str = "np") -> Any:
        """The tensor's values as a numpy array (little-endian, torch's layout and dtype).

        A view over a read-only mmap of the file when the bytes lie in it; a fresh array
        otherwise (deflated members, big-endian files). Raises TruncatedFile when the file is
        shorter than the tensor needs. ``framework="pt"`` returns a torch tensor instead (a
        copy, any dtype bf16 and fp8 included; needs torch), as safetensors' ``safe_open``.

        Example:
            >>> w = model.read("model.diffusion_model.out.2.weight", framework="pt")
        """
        arr = self.read_info(self.tensors[name], name)
        if framework == "np":
            return arr
        if framework == "pt":
            return to_torch(arr, self.tensors[name].dtype)
        raise ValueError(f"framework must be 'np' or 'pt', not {framework!r}")

    def locate(self, name: str) -> tuple[ModelFile, TensorInfo]:
        """The file that holds tensor ``name`` and its info there (a shard for sharded models):
        what a writer copies bytes from."""
        return self, self.tensors[name]

    def check_end(self, name: str, end: int) -> None:
        """TruncatedFile unless the file reaches byte ``end`` (where tensor ``name`` ends):
        every reader and writer asks this before reading a tensor's bytes."""
        if end > self.file_size:
            raise TruncatedFile(
                f"tensor {name!r} needs bytes up to {end} but the file has {self.file_size}; "
                "the download is truncated",
                path=self.path,
            )

    def read_info(self, info: TensorInfo, name: str = "?") -> np.ndarray:
        """Like ``read`` for a TensorInfo that may not be in ``tensors`` (e.g. optimizer state)."""
        import numpy as np

        st = info.storage
        check_view(info, name)
        if st.file_offset is not None:
            self.check_end(name, st.file_offset + st.nbytes)
            base = self._span(st.file_offset, st.nbytes)
        else:
            assert st.load is not None, "a storage has either a file offset or a loader"
            raw = st.load()
            if len(raw) < st.nbytes:
                raise TruncatedFile(
                    f"storage {st.key!r} of tensor {name!r} holds {len(raw)} bytes, "
                    f"needs {st.nbytes}",
                    path=self.path,
                )
            base = np.frombuffer(raw, np.uint8, st.nbytes)
        dt = info.dtype.numpy.newbyteorder(">") if st.big_endian else info.dtype.numpy
        item = info.dtype.itemsize
        # stride over opaque items: as_strided rebuilds the dtype from its typestr, which loses
        # ml_dtypes' identity (bf16/fp8 all say "<f1"/"<V2"); view as the real dtype afterwards
        elems = base[: st.nbytes - st.nbytes % item].view(np.dtype(f"V{item}"))
        arr = np.lib.stride_tricks.as_strided(
            elems[info.offset :] if info.numel else elems[:0],
            shape=info.shape,
            strides=tuple(s * item for s in info.strides),
            writeable=False,
        ).view(dt)
        if st.big_endian:
            arr = arr.astype(info.dtype.numpy)
        return arr

    def _span(self, offset: int, n: int) -> np.ndarray:
        """``n`` bytes at ``offset`` as uint8: a view of the mapped file, or (a remote file)
        fetched from the source."""
        import numpy as np

        if self.source is not None:
            return np.frombuffer(self.source.pread(offset, n), np.uint8)
        return np.frombuffer(self._map(), np.uint8, n, offset)

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the file mapping (arrays still viewing it keep it alive until they go)."""
        if self.source is not None:
            self.source.close()
        if self._mmap is not None:
            # numpy views may still be exported; then the GC closes the map with them
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ModelFile {os.fspath(self.path)!r} {self.format} {len(self.tensors)} tensors>"


def tensor_leaves(obj: Any, depth: int = 0, seen: set[int] | None = None) -> Iterator[TensorInfo]:
    """Every TensorInfo inside unpickled data (dicts, sequences, stand-ins' args and state).

    Each container is visited once: a pickle can share one list 60 levels deep (2**60 paths
    from 120 bytes).
    """
    seen = set() if seen is None else seen
    if depth > 64 or id(obj) in seen:
        return
    if isinstance(obj, TensorInfo):
        yield obj
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for v in obj.values():
            yield from tensor_leaves(v, depth + 1, seen)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from tensor_leaves(v, depth + 1, seen)
    elif isinstance(obj, StandIn):
        for part in (obj.args, obj.state, obj.items, obj.listitems):
            yield from tensor_leaves(part, depth + 1, seen)


def to_plain(
    obj: Any, *, max_depth: int = 64, max_items: int = 10_000, max_nodes: int = 200_000
) -> Any:
    """A JSON-able copy of unpickled data: what inspect --json and convert's metadata carry.

    Dicts keep their (stringified) keys, tuples/sets become lists, bytes become
    ``{"__bytes__": len, "hex": first 64 bytes}``, numpy scalars their Python value, a
    TensorInfo ``{"__tensor__": "F32 [3, 4]"}``, a StandIn
    ``{"__global__": "mod.name", "args": ..., "state": ...}``.
    Depth, fan-out and the total node count are capped so hostile graphs stay small (cut parts
    say ``"..."``): a pickle can share one list 60 levels deep, 2**60 paths from 120 bytes.
    """
    budget = [max_nodes]
    # a numpy value can only be in the graph once numpy is imported: do not import it to ask
    np_types = _numpy_types()

    def conv(o: Any, depth: int) -> Any:
        budget[0] -= 1
        if depth > max_depth or budget[0] < 0:
            return "..."
        if o is None or isinstance(o, bool | int | str):
            return o
        if isinstance(o, float):
            return o if o == o and o not in (float("inf"), float("-inf")) else repr(o)
        if np_types and isinstance(o, np_types[0]):
            return conv(o.item(), depth)
        if isinstance(o, TensorInfo):
            return {"__tensor__": o.describe()}
        if isinstance(o, bytes | bytearray):
            return {"__bytes__": len(o), "hex": bytes(o[:64]).hex()}
        if isinstance(o, complex):
            return {"__complex__": [o.real, o.imag]}
        if isinstance(o, dict):
            items = list(o.items())
            out = {str(k): conv(v, depth + 1) for k, v in items[:max_items]}
            if len(items) > max_items:
                out["..."] = f"{len(items) - max_items} more"
            return out
        if isinstance(o, list | tuple | set | frozenset):
            seq = list(o)
            res = [conv(v, depth + 1) for v in seq[:max_items]]
            if len(seq) > max_items:
                res.append(f"... {len(seq) - max_items} more")
            return res
        if isinstance(o, StandIn):
            d: dict[str, Any] = {"__global__": o.qualname}
            if o.args is not None:
                d["args"] = conv(o.args, depth + 1)
            if o.kwargs:
                d["kwargs"] = conv(o.kwargs, depth + 1)
            if o.state is not None:
                d["state"] = conv(o.state, depth + 1)
            if o.items:
                d["items"] = conv(o.items, depth + 1)
            if o.listitems:
                d["listitems"] = conv(o.listitems, depth + 1)
            return d
        if np_types and isinstance(o, np_types[1]):
            return {"__array__": f"{o.dtype} {list(o.shape)}"}
        return repr(o)

    return conv(obj, 0)


def _numpy_types() -> tuple[type[Any], type[Any]] | None:
    """(numpy.generic, numpy.ndarray) if numpy is loaded, else None (no value can be numpy's)."""
    np = sys.modules.get("numpy")
    return None if np is None else (np.generic, np.ndarray)


def to_torch(arr: np.ndarray, dtype: DType) -> Any:
    """A torch tensor holding a copy of ``arr`` (of sdtool dtype ``dtype``); torch imported here.

    numpy has no bf16/fp8 of its own (ml_dtypes' types are opaque to torch): those travel as
    same-size integers and are viewed as the torch dtype, bit for bit.
    """
    try:
        import torch
    except ImportError:
        raise MissingExtra(
            "framework='pt' needs PyTorch, which is not installed: pip install 'sdtool[torch]'"
        ) from None
    import numpy as np

    data = np.array(arr, copy=True, order="C")
    if dtype.lazy:  # an ml_dtypes type
        carrier = data.view({1: np.uint8, 2: np.int16}[dtype.itemsize])
        return torch.from_numpy(carrier).view(getattr(torch, str(dtype.torch)))
    return torch.from_numpy(data)
