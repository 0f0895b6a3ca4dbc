"""torch.save's containers: zip (torch >= 1.6), legacy 5-pickle, the oldest TAR, and plain pickles.

Each reader finds where every storage's bytes are and runs the restricted unpickler over the
object pickle; no tensor bytes are read. The decision between formats follows torch.load: a zip
iff the file starts with a local header; otherwise a TAR with torch's members; otherwise pickles,
where a first pickle equal to torch's magic number means the legacy format.
"""

from __future__ import annotations

import collections
import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sdtool import dtypes
from sdtool.errors import (
    CorruptFile,
    TorchScriptFile,
    TruncatedFile,
    UnknownFormat,
)
from sdtool.formats import zip as zipr
from sdtool.formats.graph import collect
from sdtool.formats.sniff import sniff_bytes
from sdtool.formats.source import Input, RangeReader, input_path, input_size, open_input
from sdtool.formats.unpickler import StorageType, brief, globals_met, load_one
from sdtool.model import ContainerFacts, ModelFile, Storage, TensorInfo, check_view
from sdtool.records import dataclass
from sdtool.vocab import Format

if TYPE_CHECKING:  # tarfile (and shutil) load only for torch's oldest TAR format
    import tarfile

    from sdtool.formats.torchfacts import LegacyFacts, PickleFacts, RawSpan, TarFacts

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_PICKLE_MEMBER = 1 << 30
Seen = collections.Counter[tuple[str, str, bool]]


# -- what each container says about itself --------------------------------------------------------


@dataclass(frozen=True)
class ZipFacts(ContainerFacts):
    """A torch zip (torch.save since 1.6)."""

    prefix: str = ""  # the archive's top folder
    byteorder: str = "little"  # the ``byteorder`` record
    records: dict[str, str] = field(default_factory=dict)  # version, .format_version ...
    data_pkl_bytes: int = 0
    pickle_protocol: int = 0
    storages: int = 0
    members: int = 0
    deflated_storages: int = 0
    irregularities: tuple[zipr.ZipIrregularity, ...] = ()  # what the zip reader noticed


@dataclass
class _Source:
    """Where storage bytes come from: the file itself (mmap-able offsets) or bytes in memory."""

    f: BinaryIO
    size: int
    path: Path | None = None  # set for the real file
    data: bytes | None = None  # set for a nested torch file held in a pickle
    reader: RangeReader | None = None  # set for a remote file
    seen: Seen = field(default_factory=collections.Counter)

    def storage(self, key: str, dtype: dtypes.DType, nbytes: int, offset: int) -> Storage:
        if self.data is None:
            return Storage(key, dtype, nbytes, file_offset=offset)
        data = self.data
        return Storage(key, dtype, nbytes, load=lambda: data[offset : offset + nbytes])

    def nested(self, blob: bytes) -> Any:
        """``torch.storage._load_from_bytes``: a whole torch file inside the pickle."""
        src = _Source(io.BytesIO(blob), len(blob), data=blob, seen=self.seen)
        kind = sniff_bytes(blob[:4096], len(blob))
        if kind is Format.ZIP:
            return _load_zip(src, zipr.read_archive(src.f, src.size))[0]
        return _load_pickles(src)[0]


def read_torch(path: Input, kind: Format, *, key: str | None = None) -> ModelFile:
    """Open a torch file (zip, legacy, TAR) or plain pickle lazily."""
    size = input_size(path)
    container: ContainerFacts
    with open_input(path) as f:
        reader = path if isinstance(path, RangeReader) else None
        src = _Source(f, size, path=input_path(path), reader=reader)
        if kind is Format.ZIP:
            archive = zipr.read_archive(f, size)
            if _is_npz(archive):
                if not isinstance(path, Path):
                    raise UnknownFormat("an npz archive: download it to read it")
                from sdtool.formats.numpyfile import read_npz

                return read_npz(path, archive)
            root, container = _load_zip(src, archive)
            fmt = Format.TORCH_ZIP
        elif kind is Format.TAR:
            root, container = _load_tar(src)
            fmt = Format.TORCH_TAR
        else:
            from sdtool.formats.torchfacts import LegacyFacts

            root, container = _load_pickles(src)
            fmt = Format.TORCH_LEGACY if isinstance(container, LegacyFacts) else Format.PICKLE
    tensors, extra, sd_path = collect(root, key)
    container = replace(container, state_dict_path=sd_path)
    return ModelFile(
        path,
        fmt,
        tensors,
        metadata=_metadata_entry(extra),
        extra=extra,
        container=container,
        globals=globals_met(src.seen),
    )


#: the top-level entry in which a .ckpt written by sdtool keeps a safetensors metadata map
METADATA_KEY = "__metadata__"


def _metadata_entry(extra: dict[str, Any]) -> dict[str, str] | None:
    """Take a ``__metadata__`` map of strings (sdtool's .ckpt output) out of ``extra``: it is
    the file's metadata, as in safetensors, so it round-trips through safetensors."""
    meta = extra.get(METADATA_KEY)
    if isinstance(meta, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        del extra[METADATA_KEY]
        return dict(meta)
    return None


# -- zip ------------------------------------------------------------------------------------------


def _is_npz(archive: zipr.ZipArchive) -> bool:
    names = list(archive.members)
    return bool(names) and all(n.endswith(".npy") for n in names)


def _find_prefix(archive: zipr.ZipArchive) -> str:
    """The archive's top folder, as torch's reader takes it (from the first record)."""
    if not archive.entries:
        raise CorruptFile("the zip archive is empty")
    first = archive.entries[0].name
    prefix = first.split("/", 1)[0] + "/" if "/" in first else ""
    if prefix + "data.pkl" in archive.members:
        return prefix
    for name in archive.members:  # tolerate writers that order members differently
        if name.endswith("/data.pkl") and name.count("/") == 1:
            return name[: -len("data.pkl")]
    return "" if "data.pkl" in archive.members else prefix


def _load_zip(src: _Source, archive: zipr.ZipArchive) -> tuple[Any, ZipFacts]:
    prefix = _find_prefix(archive)
    members = archive.members
    names = "\n".join(members)  # one look for a whole checkpoint's 2,000 names, in C
    code = (
        [n for n in members if n.startswith(prefix + "code/") or n.endswith(".py")]
        if "code/" in names or ".py" in names
        else []
    )
    if prefix + "constants.pkl" in members or code:
        lite = " (lite interpreter)" if prefix + "bytecode.pkl" in members else ""
        raise TorchScriptFile(
            f"a TorchScript archive{lite}: executable code ({len(code)} code files), not a state "
            "dict; sdtool does not load it (run `sdtool scan` to see what it holds)"
        )
    pkl = members.get(prefix + "data.pkl")
    if pkl is None:
        raise UnknownFormat(
            f"a zip archive without data.pkl ({len(members)} members): not a torch checkpoint"
        )

    def record(name: str) -> str | None:
        m = members.get(prefix + name)
        if m is None or m.size > 4096:
            return None
        return zipr.read_member(src.f, m).decode("utf-8", "replace").strip()

    big = record("byteorder") == "big"
    cache: dict[str, Storage] = {}

    def persistent_load(pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and _text(pid[0]) == "storage"):
            raise CorruptFile(f"unexpected persistent id {brief(pid)}")
        stype, key, _, numel = pid[1], _text(pid[2]), pid[3], pid[4]
        if not isinstance(stype, StorageType) or not isinstance(numel, int) or numel < 0:
            raise CorruptFile(f"malformed storage reference for key {brief(key)}")
        dtype = stype.dtype or dtypes.DTYPES["U8"]
        nbytes = numel * dtype.itemsize
        if key in cache:
            return _retype(cache[key], dtype, nbytes)
        m = members.get(f"{prefix}data/{key}")
        if m is None:
            raise CorruptFile(f"storage {brief(key)} has no member {prefix}data/{key}")
        if m.size < nbytes:
            raise CorruptFile(
                f"storage {brief(key)} needs {nbytes} bytes, its member holds {m.size}"
            )
        if m.stored and src.reader is None:
            st = src.storage(key, dtype, nbytes, m.data_offset)
        else:  # deflated, or remote: its local header is read when its bytes are
            st = Storage(key, dtype, nbytes, load=_member_loader(src, m))
        st.big_endian = big
        cache[key] = st
        return st

    raw = zipr.read_member(src.f, pkl, limit=MAX_PICKLE_MEMBER)
    root = load_one(
        io.BytesIO(raw), persistent_load=persistent_load, nested=src.nested, seen=src.seen
    )
    container = ZipFacts(
        prefix=prefix.rstrip("/"),
        byteorder="big" if big else "little",
        records={
            n: v
            for n in (
                "version",
                ".format_version",
                ".storage_alignment",
                ".data/version",
                ".data/serialization_id",
            )
            if (v := record(n)) is not None
        },
        data_pkl_bytes=len(raw),
        pickle_protocol=raw[1] if raw[:1] == b"\x80" else 0,
        storages=len(cache),
        members=len(archive.entries),
        deflated_storages=sum(1 for k in cache if not members[f"{prefix}data/{k}"].stored),
        irregularities=tuple(archive.irregularities),
    )
    return root, container


def _retype(st: Storage, dtype: dtypes.DType, nbytes: int) -> Storage:
    """The same bytes viewed under another storage dtype (rare: two typed views of one key)."""
    if st.dtype == dtype:
        return st
    return Storage(st.key, dtype, min(nbytes, st.nbytes), st.file_offset, st.load, st.big_endian)


def _member_loader(src: _Source, m: zipr.ZipMember) -> Callable[[], bytes]:
    if src.data is not None:
        data = src.data
        return lambda: zipr.read_member(io.BytesIO(data), m)
    if src.reader is not None:
        reader = src.reader
        return lambda: zipr.read_member(reader.open(), m)
    path = src.path

    def load() -> bytes:
        assert path is not None
        with open(path, "rb") as f:
            return zipr.read_member(f, m)

    return load


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("ascii", "replace")
    return str(v) if isinstance(v, str | int) else brief(v)  # str() of a shared graph explodes


# -- layouts: where the pickles and the raw bytes of legacy and TAR files lie ---------------------
# The reader below and the scanner's walkers (sdtool.scan.walkers) both walk these; each brings
# its own way to read a pickle (the restricted unpickler, or the opcode model) and to know a
# storage's element size (a StorageType, or the storage class's name).

#: the five pickles of a legacy file, in order (raw storages follow the last one)
LEGACY_PICKLES = ("magic number", "protocol version", "sys_info", "object", "storage keys")
#: the TAR format's members that torch.load unpickles
TAR_MEMBERS = ("sys_info", "pickle", "storages", "tensors")


def legacy_storages(
    pread: Callable[[int, int], bytes],
    pos: int,
    size: int,
    keys: list[Any],
    itemsize: Callable[[Any], int | None],
) -> Iterator[tuple[RawSpan, int]]:
    """The raw storages of a legacy file, after its five pickles (``pos``: where the last one
    ends), in storage-key order: (span, element count) each. ``itemsize(key)`` is None for a
    key whose element size is unknown. Raises TruncatedFile / CorruptFile where the layout
    cannot be followed; what was yielded before stays valid."""
    from sdtool.formats.torchfacts import RawSpan

    for key in keys:
        width = itemsize(key)
        if pos + 8 > size:
            raise TruncatedFile(
                f"storage {brief(key)} needs bytes up to {pos + 8} but the file has {size}; "
                "the download is truncated"
            )
        (count,) = struct.unpack("<q", pread(pos, 8))
        if width is None or count < 0:
            raise CorruptFile(
                f"legacy torch storage {brief(key)}: cannot skip {count} elements of unknown "
                f"size at offset {pos}"
            )
        span = RawSpan(key, pos, 8 + count * width)
        yield span, count
        if span.end > size:
            raise TruncatedFile(
                f"storage {brief(key)} needs bytes up to {span.end} but the file has {size}; "
                "the download is truncated"
            )
        pos = span.end


def tar_records(
    which: str,
    size: int,
    pread: Callable[[int, int], bytes],
    load: Callable[[int, str], tuple[Any, int]],
    itemsize: Callable[[Any], int | None],
) -> Iterator[tuple[str, int, Any, RawSpan | None]]:
    """The records of a TAR file's ``storages`` or ``tensors`` member (``size`` bytes): a count
    pickle, then per record a pickle and raw bytes (``storages``: an int64 element count and
    the elements, ``itemsize(record)`` bytes each; ``tensors``: int32 rank, 4 bytes, shape,
    stride and an int64 offset), then (``storages``) a pickle of storage views.

    ``load(pos, what)`` reads the pickle at ``pos`` ("count", "record" or "views") and returns
    (value, end); ``itemsize(record)`` is called on every record before its raw bytes are
    read (it may raise for a malformed one). Yields (what, pickle offset, value, the raw span
    after it or None). A count that is not a non-negative int ends the walk (the caller judges
    it). Raises CorruptFile / TruncatedFile where the records cannot be followed.
    """
    from sdtool.formats.torchfacts import RawSpan

    count, pos = load(0, "count")
    yield "count", 0, count, None
    if not isinstance(count, int) or count < 0:
        return
    for index in range(count):
        at = pos
        value, pos = load(at, "record")
        width = itemsize(value)  # first: the caller may refuse a malformed record here
        if which == "storages":
            raw = pread(pos, 8)
            key = value[0] if isinstance(value, tuple) and value else value
            if width is None or len(raw) < 8:
                raise CorruptFile(f"TAR torch file: bad storage record {index}")
            (n,) = struct.unpack("<q", raw)
            span = RawSpan(key, pos, 8 + n * width)
            if n < 0 or span.end > size:
                raise CorruptFile(f"TAR torch file: storage {brief(key)} runs past its member")
        else:
            raw = pread(pos, 4)
            if len(raw) < 4:
                raise TruncatedFile(f"TAR torch file: tensor record {index} is cut short")
            (ndim,) = struct.unpack("<i", raw)
            if not 0 <= ndim <= 64:
                raise CorruptFile("TAR torch file: bad tensor rank")
            span = RawSpan(index, pos, 8 + 16 * ndim + 8)
            if span.end > size:
                raise TruncatedFile(f"TAR torch file: tensor record {index} is cut short")
        yield "record", at, value, span
        pos = span.end
    if which == "storages" and pos < size:
        views, end = load(pos, "views")
        if end > size:
            raise CorruptFile("TAR torch file: the storage records run past their member")
        yield "views", pos, views, None


def tensor_record_fields(raw: bytes) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(shape, stride, storage offset) from a TAR tensor record's raw span."""
    (ndim,) = struct.unpack_from("<i", raw, 0)
    shape = struct.unpack_from(f"<{ndim}q", raw, 8)
    stride = struct.unpack_from(f"<{ndim}q", raw, 8 + 8 * ndim)
    (offset,) = struct.unpack_from("<q", raw, 8 + 16 * ndim)
    return shape, stride, offset


# -- legacy and plain pickles ---------------------------------------------------------------------


def _load_pickles(src: _Source) -> tuple[Any, LegacyFacts | PickleFacts]:
    from sdtool.formats.torchfacts import LegacyFacts, PickleFacts

    f = src.f
    f.seek(0)
    head = f.read(2)
    f.seek(0)
    try:
        first = load_one(f, nested=src.nested, seen=src.seen)
    except CorruptFile:
        if any(m.startswith(("joblib.", "sklearn.")) for m, _, _ in src.seen):
            raise UnknownFormat(
                "a joblib pickle (scikit-learn style), not a model file sdtool reads; "
                "`sdtool scan` checks it"
            ) from None
        raise
    if first != LEGACY_MAGIC or isinstance(first, bool):
        protocol = head[1] if head[:1] == b"\x80" else 0
        return first, PickleFacts(pickle_protocol=protocol)
    proto = load_one(f, seen=src.seen)
    if proto != LEGACY_PROTOCOL:
        raise CorruptFile(f"legacy torch file with protocol version {brief(proto)}, expected 1001")
    sys_info = load_one(f, seen=src.seen)
    little = not (isinstance(sys_info, dict) and sys_info.get("little_endian") is False)
    storages: dict[str, Storage] = {}
    views: list[tuple[Storage, Storage, int]] = []

    def persistent_load(pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise CorruptFile(f"unexpected persistent id {brief(pid)}")
        tag = _text(pid[0])
        if tag == "module" and len(pid) >= 2:
            return pid[1]  # a pickled nn.Module's class (source-check record): a stand-in
        if tag != "storage" or len(pid) != 6:
            raise CorruptFile(f"unexpected persistent id {brief(pid)}")
        stype, key, _, numel, view = pid[1], _text(pid[2]), pid[3], pid[4], pid[5]
        if not isinstance(stype, StorageType) or not isinstance(numel, int) or numel < 0:
            raise CorruptFile(f"malformed storage reference for key {brief(key)}")
        dtype = stype.dtype or dtypes.DTYPES["U8"]
        if key not in storages:
            storages[key] = Storage(key, dtype, numel * dtype.itemsize, big_endian=not little)
        root_st = storages[key]
        if view is None:
            return root_st
        vkey, voff, vsize = view
        vst = Storage(_text(vkey), dtype, int(vsize) * dtype.itemsize, big_endian=not little)
        views.append((vst, root_st, int(voff) * dtype.itemsize))
        return vst

    root = load_one(f, persistent_load=persistent_load, nested=src.nested, seen=src.seen)
    keys = load_one(f, seen=src.seen)
    if not isinstance(keys, list):
        raise CorruptFile("legacy torch file: the storage key list is missing")
    pos = f.tell()
    pread = zipr.positional_reader(f)  # one page per count header, no read-ahead

    def itemsize(k: Any) -> int:
        st = storages.get(_text(k))
        if st is None:
            raise CorruptFile(f"legacy torch file lists storage {brief(k)} that no tensor uses")
        return st.dtype.itemsize

    for span, count in legacy_storages(pread, pos, src.size, keys, itemsize):
        st = storages[_text(span.key)]
        if count * st.dtype.itemsize != st.nbytes:
            raise CorruptFile(
                f"storage {st.key!r} holds {count} elements, its tensors expect {st.numel}"
            )
        fixed = src.storage(st.key, st.dtype, st.nbytes, span.offset + 8)
        st.file_offset, st.load = fixed.file_offset, fixed.load
        pos = span.end
    for vst, root_st, off in views:
        if root_st.file_offset is not None:
            vst.file_offset = root_st.file_offset + off
        elif root_st.load is not None:
            parent = root_st.load
            vst.load = lambda p=parent, o=off, n=vst.nbytes: p()[o : o + n]
    if unset := [s.key for s in storages.values() if s.file_offset is None and s.load is None]:
        raise CorruptFile(f"legacy torch file: storages {unset[:3]} have no data")
    container = LegacyFacts(
        protocol_version=proto,
        sys_info=sys_info,
        byteorder="little" if little else "big",
        storages=len(storages),
        pickle_protocol=head[1] if head[:1] == b"\x80" else 0,
        trailing_bytes=src.size - pos,
    )
    return root, container


# -- the oldest TAR format ------------------------------------------------------------------------


def _load_tar(src: _Source) -> tuple[Any, TarFacts]:
    """torch < 0.4: a tar of ``storages`` (pickles + raw data), ``tensors`` and ``pickle``."""
    import tarfile

    try:
        src.f.seek(0)
        tar = tarfile.open(fileobj=src.f, mode="r:")  # noqa: SIM115 - members only, no extraction
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, ValueError) as e:  # ValueError: a member seeks past the end
        raise CorruptFile(f"broken tar archive: {e}") from None
    if not {"storages", "tensors", "pickle"} <= set(members):
        raise UnknownFormat(f"a tar archive without torch's members ({sorted(members)[:5]})")
    try:
        return _load_tar_members(src, members)
    except (TypeError, ValueError, KeyError, IndexError, struct.error) as e:
        # records of the wrong shape or naming storages that do not exist (found by fuzzing)
        raise CorruptFile(
            f"TAR torch file: malformed records ({type(e).__name__}: {e})"[:300]
        ) from None


def _load_tar_members(src: _Source, members: dict[str, tarfile.TarInfo]) -> tuple[Any, TarFacts]:
    from sdtool.formats.torchfacts import TarFacts

    f = src.f
    objects: dict[Any, Any] = {}
    st_m = members["storages"]
    base = st_m.offset_data

    def load(pos: int, what: str) -> tuple[Any, int]:
        f.seek(base + pos)
        return load_one(f, seen=src.seen), f.tell() - base

    def pread(pos: int, n: int) -> bytes:
        f.seek(base + pos)
        return f.read(n)

    def itemsize(args: Any) -> int:
        if not (isinstance(args, tuple) and len(args) == 3 and isinstance(args[2], StorageType)):
            raise CorruptFile("TAR torch file: bad storage record")
        return (args[2].dtype or dtypes.DTYPES["U8"]).itemsize

    count: Any = None
    views: Any = None
    for what, _, value, span in tar_records("storages", st_m.size, pread, load, itemsize):
        if what == "count":
            count = value
            if not isinstance(count, int) or count < 0:
                raise CorruptFile("TAR torch file: bad storage count")
        elif what == "record":
            assert span is not None
            key, _, stype = value
            dtype = stype.dtype or dtypes.DTYPES["U8"]
            objects[key] = src.storage(str(key), dtype, span.length - 8, base + span.offset + 8)
        else:
            views = value
    for target, root_key, offset, numel in views if isinstance(views, list) else []:
        base_st = objects[root_key]
        off, nbytes = offset * base_st.dtype.itemsize, numel * base_st.dtype.itemsize
        if off < 0 or nbytes < 0 or off + nbytes > base_st.nbytes:
            raise CorruptFile(f"TAR torch file: view {brief(target)} lies outside its storage")
        objects[target] = _sub_storage(base_st, str(target), off, nbytes)
    # the tensors and pickle members are small: read each whole, so no record reads past it
    t = _member_bytes(src, members["tensors"])
    tdata = t.getvalue()

    def tload(pos: int, what: str) -> tuple[Any, int]:
        t.seek(pos)
        return load_one(t, seen=src.seen), t.tell()

    def tensor_record(value: Any) -> None:
        _key, _storage_id, _ = value  # a record of the wrong shape is malformed

    for what, _, value, span in tar_records(
        "tensors", len(tdata), lambda p, n: tdata[p : p + n], tload, tensor_record
    ):
        if what != "record":
            continue
        assert span is not None
        key, storage_id, _ = value
        shape, stride, offset = tensor_record_fields(tdata[span.offset : span.end])
        st = objects[storage_id]
        info = TensorInfo(st.dtype, tuple(shape), tuple(stride), offset, st)
        check_view(info, str(key))
        objects[key] = info

    def persistent_load(pid: Any) -> Any:
        if isinstance(pid, tuple):
            return pid[0]
        try:
            return objects[int(pid)]
        except (KeyError, ValueError, TypeError):
            raise CorruptFile(f"TAR torch file: unknown object {brief(pid)}") from None

    root = load_one(
        _member_bytes(src, members["pickle"]), persistent_load=persistent_load, seen=src.seen
    )
    return root, TarFacts(storages=count, members=sorted(members))


def _member_bytes(src: _Source, m: tarfile.TarInfo) -> io.BytesIO:
    if m.size > MAX_PICKLE_MEMBER:
        raise CorruptFile(f"TAR torch file: member {m.name!r} declares {m.size} bytes")
    src.f.seek(m.offset_data)
    data = src.f.read(m.size)
    if len(data) < m.size:
        raise TruncatedFile(f"TAR torch file: member {m.name!r} is cut short")
    return io.BytesIO(data)


def _sub_storage(base: Storage, key: str, off: int, nbytes: int) -> Storage:
    if base.file_offset is not None:
        return Storage(key, base.dtype, nbytes, file_offset=base.file_offset + off)
    parent = base.load
    assert parent is not None
    return Storage(key, base.dtype, nbytes, load=lambda: parent()[off : off + nbytes])


#: classes that live in ``torchfacts.py`` (loaded off the zip path), still named here
_FACTS = frozenset({"LegacyFacts", "PickleFacts", "RawSpan", "TarFacts"})


def __getattr__(name: str) -> Any:
    if name in _FACTS:
        from sdtool.formats import torchfacts

        return getattr(torchfacts, name)
    raise AttributeError(f"module 'sdtool.formats.torchfile' has no attribute {name!r}")
