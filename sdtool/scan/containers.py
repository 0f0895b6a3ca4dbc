"""Walk a file the way the loaders read it and hand every pickle stream to the VM.

Routing is by content (sdtool.formats.sniff, shared with the loaders), never by name. Zips are
read through sdtool.formats.zip (central directory, no CRC check, as torch does), and the
irregularities that make other tools read them differently are reported. Nested containers
(zips, tars, compressed wrappers) are followed to a bounded depth and decompressed size.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import mmap
import os
import re
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sdtool.dtypes import storage_itemsize
from sdtool.errors import CorruptFile, SdtoolError
from sdtool.formats import zip as zipfmt
from sdtool.formats.sniff import describe, sniff_bytes
from sdtool.formats.torchfile import LEGACY_MAGIC
from sdtool.scan.buffers import (
    Budget,
    FileBuf,
    ScanLimit,
    Sink,
    Window,
    as_file,
    chunks,
    close_all,
    decompress,
)
from sdtool.scan.report import FileReport, Finding
from sdtool.scan.rules import analyse
from sdtool.scan.vm import (
    DEFAULT_LIMITS,
    OPNAMES,
    DictV,
    Inst,
    Limits,
    ListV,
    Ref,
    Stream,
    run_stream,
)
from sdtool.vocab import Format

MAX_DEPTH = 4  # containers inside containers
MAX_STREAMS = 1000  # pickle streams per member
MAX_MEMBER = 2 << 30  # bytes of one member (stored ones are windows, never copied)


_CODE_RE = re.compile(
    r"__import__|\bimport\s+\w|\beval\s*\(|\bexec\s*\(|os\.system|subprocess|<script|"
    r"\bcurl\s|\bwget\s|powershell|/bin/(?:ba)?sh|base64\s*-d"
)
_URL_RE = re.compile(r"\b(?:https?|ftp|file)://", re.I)


@dataclass
class Ctx:
    """Per-file scan state."""

    report: FileReport
    limits: Limits = DEFAULT_LIMITS
    budget: Budget = field(default_factory=Budget)
    keep: list[Any] = field(default_factory=list)  # temporary files and maps to close at the end
    pending: ScanLimit | None = None  # a limit met reading a member: raised once it is scanned
    depth: int = 0  # nesting depth of the container being walked
    crc: str = "read"  # "read": check CRC of members that are read; "all": every member
    formats: list[Format] = field(default_factory=list)
    parsed: dict[str, Stream] = field(default_factory=dict)  # member -> its first stream
    fd: int | None = None  # the top-level file, for scattered reads that should not fault pages

    def find(self, severity: str, rule: str, message: str, member: str | None, **kw: Any) -> None:
        self.report.add(Finding(severity, rule, message, member, **kw))

    def error(self, member: str | None, message: str) -> None:
        self.report.errors.append(f"{member}: {message}" if member else message)

    def nested(self, data: Any, path: str, depth: int | None = None) -> None:
        """Scan ``data`` (a member of the container being walked) like any other blob: the one
        way every walker recurses. ``depth`` defaults to one below the current container."""
        _scan_nested(self, data, path, self.depth + 1 if depth is None else depth)


def _join(parent: str | None, child: str) -> str:
    return f"{parent}/{child}" if parent else child


# --- entry: route one blob by content -----------------------------------------------------------


_SPECIAL = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)


def _special(mode: int) -> str | None:
    """What a non-regular file is ("a named pipe" ...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _SPECIAL if test(mode)), "not a regular file")


def _open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading, never blocking on a pipe or touching a device.

    The type is checked before opening (a FIFO blocks ``open`` until a writer comes; opening a
    tape device rewinds it) and again on the open descriptor (the path may have changed).
    """
    what = _special(os.stat(path).st_mode)
    if what is None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        if _special(os.fstat(fd).st_mode) is None:
            return os.fdopen(fd, "rb")
        os.close(fd)
        what = "not a regular file"
    raise _NotRegular(what)


class _NotRegular(Exception):
    pass


def scan_file(
    path: Path, *, limits: Limits = DEFAULT_LIMITS, crc: str = "read", budget: Budget | None = None
) -> FileReport:
    """Scan one file. Never raises for file content; unreadable files are "not scanned"."""
    rep = FileReport(str(path))
    ctx = Ctx(rep, limits, crc=crc, budget=Budget(**budget.__dict__) if budget else Budget())
    ctx.budget.start()
    try:
        with _open_regular(path) as f:
            size = rep.size = os.fstat(f.fileno()).st_size
            if size == 0:
                rep.scanned, rep.format = False, Format.EMPTY
                rep.errors.append("not scanned: the file is empty")
                return rep
            if f.read(4) in (zipfmt.LOCAL_SIG, zipfmt.EOCD_SIG):
                # zips are read in small scattered pieces: plain reads keep RSS small
                scan_blob(ctx, FileBuf(f, size), None, depth=0, name=path.name)
                return rep
            ctx.fd = f.fileno()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                if hasattr(mm, "madvise"):  # scattered small reads: no readahead into RSS
                    mm.madvise(mmap.MADV_RANDOM)
                scan_blob(ctx, mm, None, depth=0, name=path.name)
    except _NotRegular as e:
        rep.scanned, rep.format = False, Format.UNREADABLE
        rep.errors.append(f"not scanned: {e} (skipped by type, never opened)")
    except OSError as e:
        rep.scanned = False
        rep.format = Format.UNREADABLE
        rep.errors.append(f"not scanned: cannot read the file ({e.strerror or e})")
    except SdtoolError as e:
        rep.errors.append(e.message)
    finally:
        close_all(ctx.keep)
        if ctx.formats:
            rep.format = ctx.formats[0]
    return rep


def scan_blob(ctx: Ctx, buf: Any, member: str | None, *, depth: int, name: str = "") -> None:
    """Route ``buf`` (bytes or mmap) by its content."""
    size = len(buf)
    head = bytes(buf[:4096])
    kind = sniff_bytes(head, size)
    extra = _extra_kind(head)
    kind_name = extra if kind is Format.UNKNOWN and extra else kind.value
    _check_name(ctx, member, name, kind_name)
    handler = _ROUTES.get(kind_name)
    if depth > MAX_DEPTH:
        ctx.error(member, f"not scanned: containers nested deeper than {MAX_DEPTH}")
        return
    if kind_name != "pickle":
        _pickle_at_zero(ctx, buf, member, kind_name)
    if handler is None:
        what = describe(head, size)
        if member is None:
            ctx.report.scanned = False
            ctx.formats.append(Format.UNKNOWN)
            ctx.error(None, f"not scanned: not a format sdtool can analyse ({what})")
        else:
            ctx.report.notes.append(f"{member}: not analysed ({what})")
        return
    outer, ctx.depth = ctx.depth, depth
    try:
        handler(ctx, buf, member, depth)
    finally:
        ctx.depth = outer


def _pickle_at_zero(ctx: Ctx, buf: Any, member: str | None, kind: str) -> None:
    """``pickle.load`` reads any file from byte 0, whatever else the bytes are (a tar whose first
    member name is a protocol-0 pickle, a safetensors header length that starts a pickle ...).
    If byte 0 starts a pickle that imports anything, that reading is scanned too.
    """
    if not len(buf) or buf[0] not in OPNAMES:
        return
    s = _run(ctx, buf, 0, len(buf))
    if not any(_importable(i.module) and _importable(i.name) for i in s.imports):
        return  # garbage as a pickle (text, code), or plain data: nothing a loader could run
    what = "of no format sdtool reads" if kind == "unknown" else f"a {kind} file"
    ctx.find(
        "suspicious",
        "polyglot",
        f"the bytes are {what} and, read from byte 0, also a pickle that imports something: "
        "pickle.load (and loaders built on it) would run it; both readings are scanned",
        member,
    )
    _record(ctx, s, _join(member, "<as pickle>") if member else "<as pickle>", 0)


def _importable(name: str | None) -> bool:
    """A dotted name ``find_class`` could import (anything else fails before running)."""
    return bool(name) and all(p.isidentifier() for p in (name or "").split("."))


def _extra_kind(head: bytes) -> str | None:
    """The one start the scanner routes differently from torch.load's sniffing: numpy.load
    opens a file starting with an end-of-central-directory record as npz (zipfile finds the
    real end record), torch.load does not."""
    return "zip" if head[:4] == zipfmt.EOCD_SIG else None


_EXT_KIND = {
    ".safetensors": "safetensors",
    ".npy": "npy",
    ".npz": "zip",
    ".zip": "zip",
    ".7z": "7z",
    ".gz": "gzip",
    ".bz2": "bzip2",
    ".xz": "xz",
}


def _check_name(ctx: Ctx, member: str | None, name: str, kind: str) -> None:
    """A name that lies about the content (a pickle named .safetensors)."""
    base = (member or name).rsplit("/", 1)[-1].lower()
    for ext, expected in _EXT_KIND.items():
        if base.endswith(ext) and kind != expected and not (ext == ".npz" and kind == "zip"):
            sev = "suspicious" if kind in ("pickle", "zip") else "info"
            ctx.find(
                sev,
                "misnamed",
                f"named {ext} but the content is {kind} (loaders go by content)",
                member,
            )
            return


# --- pickles ------------------------------------------------------------------------------------


def _run(ctx: Ctx, buf: Any, start: int, end: int) -> Stream:
    """One pickle stream through the VM, its opcodes charged to the file's budget (as the bytes
    it walked: every opcode takes at least one)."""
    ctx.budget.check_time()
    left = ctx.budget.opcodes_left()
    limits = ctx.limits
    if left < limits.max_opcodes:
        limits = dataclasses.replace(limits, max_opcodes=left)
    s = run_stream(buf, start, end, limits=limits)
    ctx.budget.charge_opcodes(max(s.end, s.error_offset, start) - start)
    return s


_SIDE_FILE_WRAPPERS = {
    # joblib < 0.10 wrote arrays to files beside the pickle; joblib.load still reads them:
    # NDArrayWrapper with numpy.load(allow_pickle=True) (so an object .npy, or any file that is
    # not .npy/.npz, is unpickled), ZNDArrayWrapper as zlib-compressed raw array bytes
    ("joblib.numpy_pickle", "NDArrayWrapper"): True,
    ("joblib.numpy_pickle_compat", "NDArrayWrapper"): True,
    ("joblib.numpy_pickle", "ZNDArrayWrapper"): False,
    ("joblib.numpy_pickle_compat", "ZNDArrayWrapper"): False,
}


def _side_files(ctx: Ctx, s: Stream, member: str | None, depth: int) -> None:
    """Files a joblib pickle makes joblib.load read from beside it: scanned as part of it."""
    for mut in s.mutations:
        t = mut.target
        if not (mut.opcode == "BUILD" and isinstance(t, Inst) and isinstance(t.callee, Ref)):
            continue
        unpickles = _SIDE_FILE_WRAPPERS.get((t.callee.imp.module or "", t.callee.imp.name or ""))
        state = t.state.items if isinstance(t.state, DictV) else None
        name = state.get("filename") if unpickles is not None and state else None
        if not isinstance(name, str):
            continue
        base = Path(ctx.report.path).parent
        target = base / name
        outside = Path(name).is_absolute() or ".." in Path(name).parts
        if outside:
            ctx.find(
                "dangerous" if unpickles else "suspicious",
                "joblib-side-file",
                f"joblib.load reads {name!r}, outside the model's folder"
                + (
                    " with numpy.load(allow_pickle=True): whatever pickle is there runs"
                    if unpickles
                    else ""
                ),
                member,
            )
            continue
        if not unpickles:
            continue  # zlib-compressed raw array bytes: nothing in them is unpickled
        try:
            with _open_regular(target) as f:
                data = f.read(MAX_MEMBER)
        except (OSError, _NotRegular):
            ctx.report.notes.append(f"{member or 'file'}: joblib side file {name!r} is absent")
            continue
        _scan_nested(ctx, data, _join(member, f"<side file {name}>"), depth + 1)


def _record(ctx: Ctx, s: Stream, member: str | None, index: int) -> None:
    ctx.report.streams += 1 + len(s.nested)
    findings, errors = analyse(s, member=member, index=index)
    ctx.report.findings.extend(findings)
    for e in errors:
        ctx.error(member, e)
    where = f"stream {index}" if index else "pickle"
    for sub in [s, *s.nested]:
        if sub.error:
            ctx.error(member, f"{where} broken at offset {sub.error_offset}: {sub.error}")
            if any(f.severity == "dangerous" for f in findings):
                ctx.find(
                    "info",
                    "stream-broken",
                    f"{where} breaks at offset {sub.error_offset} after its payload: the loader "
                    "runs what comes before the break",
                    member,
                    stream=index,
                    offset=sub.error_offset,
                )
        if sub.incomplete:
            ctx.error(
                member, f"{where} analysis stopped at offset {sub.error_offset}: {sub.incomplete}"
            )


def scan_pickle(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """Every stream of a pickle file: legacy torch's five, concatenated pickles, trailing data."""
    end = len(buf)
    s0 = ctx.parsed.pop(member or "", None) or _run(ctx, buf, 0, end)
    _record(ctx, s0, member, 0)
    if member is None or member.startswith("<"):  # the file itself, or its decompressed body
        _side_files(ctx, s0, member, depth)
    if s0.stopped and s0.result == LEGACY_MAGIC:
        ctx.formats.append(Format.TORCH_LEGACY)
        pos = _scan_legacy(ctx, buf, s0.end, member)
    else:
        ctx.formats.append(Format.PICKLE)
        pos = s0.end if s0.stopped else -1
    index = 1
    while 0 <= pos < end:
        if buf[pos : pos + 4] == b"PK\x03\x04" or _is_zip_tail(buf):
            break
        if not _looks_like_pickle(buf, pos):
            break
        s = _run(ctx, buf, pos, end)
        if not s.stopped and not s.imports:
            break  # not a pickle after all: trailing data
        ctx.find(
            "info",
            "concatenated-pickle",
            f"another pickle stream at offset {pos} (loaders that read several pickles run it)",
            member,
            stream=index,
            offset=pos,
        )
        _record(ctx, s, member, index)
        index += 1
        pos = s.end if s.stopped else -1
        if index > MAX_STREAMS:
            ctx.error(member, f"more than {MAX_STREAMS} pickle streams: the rest is not analysed")
            return
    if pos < 0:
        return
    _trailing(ctx, buf, pos, member, depth)


def _looks_like_pickle(buf: Any, pos: int) -> bool:
    b = buf[pos]
    return (b == 0x80 and pos + 1 < len(buf) and buf[pos + 1] <= 5) or b in b"(cI]}NSV\x95"


def _is_zip_tail(buf: Any) -> bool:
    n = len(buf)
    tail = bytes(buf[max(0, n - 22 - 0xFFFF) :])
    return tail.rfind(zipfmt.EOCD_SIG) >= 0 and bytes(buf[:4]) != b"PK\x03\x04"


def _trailing(ctx: Ctx, buf: Any, pos: int, member: str | None, depth: int) -> None:
    """Bytes after the last pickle: an appended zip (polyglot), or data no loader reads."""
    end = len(buf)
    if _is_zip_tail(buf):
        try:
            arch = zipfmt.read_archive(as_file(buf), end)
        except SdtoolError:
            arch = None
        if arch is not None and arch.entries:
            ctx.find(
                "suspicious",
                "polyglot",
                "a pickle with a zip appended: torch.load reads the pickle, zip tools (and "
                "scanners that trust them) see the zip; both are scanned",
                member,
                offset=arch.prefix_bytes,
            )
            _scan_archive(
                ctx,
                buf,
                arch,
                _join(member, "<appended zip>") if member else "<appended zip>",
                depth + 1,
            )
            return
    if pos < end:
        rest = bytes(buf[pos : min(end, pos + 64)])
        if rest.strip(b"\x00\n\r\t ") == b"" and end - pos <= 64:
            return
        ctx.find(
            "info",
            "trailing-data",
            f"{end - pos} bytes after the last pickle stream (offset {pos}) that no loader reads",
            member,
            offset=pos,
        )


def _scan_legacy(ctx: Ctx, buf: Any, pos: int, member: str | None) -> int:
    """Streams 2-5 of a legacy torch file, then skip the raw storages by their counts."""
    end = len(buf)
    names = ("protocol version", "sys_info", "object", "storage keys")
    streams: list[Stream] = []
    for i, what in enumerate(names, start=1):
        if pos >= end:
            ctx.error(member, f"legacy torch file ends before its {what} pickle")
            return -1
        s = _run(ctx, buf, pos, end)
        _record(ctx, s, member, i)
        streams.append(s)
        if not s.stopped:
            return -1
        pos = s.end
    keys = streams[3].result
    types = _legacy_storage_types(streams[2])
    if not isinstance(keys, ListV) or keys.items is None:
        ctx.error(member, "legacy torch storage key list is not a list: storages not skipped")
        return -1
    for key in keys.items:
        if not isinstance(key, str):  # torch writes string keys; anything else is forged
            ctx.error(member, "legacy torch storage key is not a string: storages not skipped")
            return -1
        itemsize = storage_itemsize(types.get(key, "") + "Storage")
        if pos + 8 > end:
            ctx.error(member, f"legacy torch storage {key!r} is cut short (truncated download)")
            return -1
        if member is None and ctx.fd is not None:  # pread: no mapped pages across the file
            raw = os.pread(ctx.fd, 8, pos)
        else:
            raw = bytes(buf[pos : pos + 8])
        (count,) = struct.unpack_from("<q", raw)
        if itemsize is None or count < 0 or pos + 8 + count * itemsize > end:
            ctx.error(
                member,
                f"legacy torch storage {key!r}: cannot skip {count} elements of "
                f"{types.get(key, 'unknown type')} at offset {pos}; the rest is not analysed",
            )
            return -1
        pos += 8 + count * itemsize
    ctx.report.notes.append(
        f"{member or 'file'}: legacy torch file: 5 pickles and {len(keys.items)} raw storages"
    )
    return pos


def _legacy_storage_types(s: Stream) -> dict[Any, str]:
    out: dict[Any, str] = {}
    for _, pid in s.persids:
        if isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage":
            t = pid[1]
            if not isinstance(pid[2], str):
                continue
            if isinstance(t, Ref) and t.imp.name and t.imp.name.endswith("Storage"):
                out[pid[2]] = t.imp.name[: -len("Storage")]
    return out


# --- zips ---------------------------------------------------------------------------------------


def scan_zip(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """A zip in every reading a loader may take (torch's first; see zipfmt.read_archives)."""
    try:
        arch = zipfmt.read_archive(as_file(buf), len(buf))
        error = None
    except SdtoolError as e:
        arch, error = None, e
    readings = [a for rec, a in zipfmt.read_archives(as_file(buf), len(buf)) if a is not arch]
    readings = [a for a in readings if a.entries]
    if arch is None:
        if not readings:
            assert error is not None
            ctx.error(member, f"zip cannot be read: {error.message}")
            if member is None:
                ctx.formats.append(Format.ZIP)
            _scan_local_headers(ctx, buf, member, depth)
            return
        arch = readings.pop(0)  # torch cannot read it; zipfile (numpy, joblib) can
    _scan_archive(ctx, buf, arch, member, depth)
    done = {(m.data_offset, m.compressed_size) for m in arch.entries}
    for n, other in enumerate(readings, start=1):
        new = [m for m in other.entries if (m.data_offset, m.compressed_size) not in done]
        if not new:
            continue
        names = ", ".join(m.name for m in new[:5]) + (" ..." if len(new) > 5 else "")
        ctx.find(
            "suspicious",
            "zip-ambiguous",
            f"zip readers disagree: another reading of the end records (zip64 record, offsets, "
            f"or an end record in the comment) lists other members ({names}); "
            "torch's miniz and Python's zipfile may each take a different one: all are scanned",
            member,
        )
        for m in new:
            done.add((m.data_offset, m.compressed_size))
            if m.name.endswith("/") and m.size == 0:
                continue
            path = _join(member, f"<reading {n}>/{m.name}")
            _scan_member(ctx, buf, m, path, depth, shadowed=False)


def _scan_archive(
    ctx: Ctx, buf: Any, arch: zipfmt.ZipArchive, member: str | None, depth: int
) -> None:
    names = [m.name for m in arch.entries]
    torchscript = [n for n in names if n.endswith(("constants.pkl", "bytecode.pkl"))]
    code = [n for n in names if "/code/" in f"/{n}" and n.endswith(".py")]
    is_torch = any(n.endswith("data.pkl") for n in names)
    if member is None:
        if torchscript:
            ctx.formats.append(Format.TORCHSCRIPT)
        elif is_torch:
            ctx.formats.append(Format.TORCH_ZIP)
        elif names and all(n.endswith(".npy") for n in names):
            ctx.formats.append(Format.NPZ)
        else:
            ctx.formats.append(Format.ZIP)
    for irr in arch.irregularities:
        rule, sev = "zip-irregular", "suspicious"
        if "duplicate" in irr:
            rule = "zip-duplicate"
        elif "local header" in irr:
            rule = "zip-name-mismatch"
        elif "flag bits" in irr:
            rule = "zip-flags"
        elif "before the zip" in irr:
            rule = "zip-prefix"
        ctx.find(
            sev, rule, irr + " (torch reads the central directory; other tools may not)", member
        )
    if torchscript or code:
        shown = ", ".join(code[:20]) + (f" and {len(code) - 20} more" if len(code) > 20 else "")
        ctx.find(
            "suspicious",
            "torchscript",
            f"TorchScript archive: executable code, only loadable by torch.jit.load, which runs "
            f"it ({len(code)} code members: {shown or 'none listed'})",
            member,
        )
    storage_keys = _referenced_storages(ctx, buf, arch, member)
    for m in arch.entries:
        if m.name.endswith("/") and m.size == 0:
            continue
        path = _join(member, m.name)
        last = arch.members.get(m.name) is m
        if m.name in storage_keys and last:
            if ctx.crc == "all":
                _check_crc(ctx, buf, m, path)
            continue  # raw tensor bytes the loader maps; never unpickled
        _scan_member(ctx, buf, m, path, depth, shadowed=not last)


def _referenced_storages(
    ctx: Ctx, buf: Any, arch: zipfmt.ZipArchive, member: str | None
) -> set[str]:
    """Members that data.pkl names as raw storages (``<prefix>/data/<key>``)."""
    out: set[str] = set()
    for name, m in arch.members.items():
        if not name.endswith("data.pkl") or m.size > MAX_MEMBER:
            continue
        prefix = name[: -len("data.pkl")]
        try:
            data = _member_data(ctx, buf, m, _join(member, name))
        except SdtoolError:
            continue
        s = _run(ctx, data, 0, len(data))
        ctx.parsed[_join(member, name)] = s  # scanned again below: parse once
        for _, pid in s.persids:
            if (
                isinstance(pid, tuple)
                and len(pid) >= 3
                and pid[0] == "storage"
                and isinstance(pid[2], str)
            ):
                out.add(f"{prefix}data/{pid[2]}")
    return out


#: zip compression methods zipfile reads (numpy.load opens npz files with zipfile); torch's
#: miniz reads only stored and deflate, so a method it lacks never reaches torch.load.
ZIP_METHODS = {8: "deflate", 12: "bzip2", 14: "zip-lzma"}


def _member_data(ctx: Ctx, buf: Any, m: zipfmt.ZipMember, path: str) -> Any:
    """A member's bytes: a window for stored members, decompressed under the budget otherwise.

    Raises CorruptFile for a method no loader reads; a member that stops decompressing midway
    yields what came before (the loader would have read it too) and an error.
    """
    if m.method == zipfmt.STORED:
        return Window(buf, m.data_offset, m.compressed_size)
    algo = ZIP_METHODS.get(m.method)
    if algo is None:
        raise CorruptFile(f"compression method {m.method}, which no model loader reads")
    raw = Window(buf, m.data_offset, m.compressed_size)
    start = 0
    dec: Any = algo
    if algo == "zip-lzma":  # zipfile: 2-byte version, 2-byte properties size, properties
        import lzma

        head = raw[:4]
        psize = int.from_bytes(head[2:4], "little") if len(head) == 4 else 0
        try:
            props = lzma._decode_filter_properties(lzma.FILTER_LZMA1, raw[4 : 4 + psize])  # type: ignore[attr-defined]
            dec = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[props])
        except (lzma.LZMAError, ValueError) as e:
            raise CorruptFile(f"LZMA member header is broken ({e})") from None
        start = 4 + psize
    data, limit = _inflate(ctx, chunks(raw, start), dec, m.compressed_size, path)
    if limit is not None:
        ctx.pending = ctx.pending or limit
    return data


def _check_crc(ctx: Ctx, buf: Any, m: zipfmt.ZipMember, path: str, data: Any = None) -> None:
    if data is None:
        try:
            data = _member_data(ctx, buf, m, path)
        except SdtoolError:
            return
    crc = 0
    for piece in chunks(data):
        crc = zlib.crc32(piece, crc)
    crc &= 0xFFFFFFFF
    if crc != m.crc:
        ctx.find(
            "suspicious",
            "zip-crc",
            f"CRC-32 is {crc:08x} but the directory says {m.crc:08x}: torch ignores it, "
            "zipfile refuses the member",
            path,
        )


def _scan_member(
    ctx: Ctx, buf: Any, m: zipfmt.ZipMember, path: str, depth: int, *, shadowed: bool
) -> None:
    try:
        data = _member_data(ctx, buf, m, path)
    except ScanLimit:
        raise
    except SdtoolError as e:
        ctx.error(path, f"not scanned: {e.message}")
        return
    if not m.flags & 0x1:  # an encrypted member's CRC is of the plaintext
        _check_crc(ctx, buf, m, path, data)
    if shadowed:
        path += " (shadowed duplicate)"
    if m.flags & 0x1:
        kind = sniff_bytes(data[:4096], len(data))
        if kind is Format.UNKNOWN:
            ctx.error(path, "not scanned: the member is encrypted")
            return
    _scan_nested(ctx, data, path, depth + 1)
    if ctx.pending is not None:
        raise ctx.pending


def _scan_nested(ctx: Ctx, data: Any, path: str, depth: int) -> None:
    before = len(ctx.formats)
    scan_blob(ctx, data, path, depth=depth)
    del ctx.formats[before:]  # only the outermost format names the file


def _scan_local_headers(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """A zip whose directory is unreadable: walk the local headers (what a lenient reader sees)."""
    pos = 0
    n = len(buf)
    count = 0
    while pos + 30 <= n and bytes(buf[pos : pos + 4]) == zipfmt.LOCAL_SIG and count < 100_000:
        (_, _, flags, method, _, _, _, csize, _usize, nlen, xlen) = struct.unpack_from(
            "<4sHHHHHIIIHH", bytes(buf[pos : pos + 30])
        )
        name = bytes(buf[pos + 30 : pos + 30 + nlen]).decode("utf-8", "replace")
        start = pos + 30 + nlen + xlen
        if flags & 0x8 or start + csize > n:
            break
        raw: Any = Window(buf, start, csize)
        limit = None
        if method == zipfmt.DEFLATED:
            raw, limit = _inflate(ctx, chunks(raw), "deflate", csize, _join(member, name))
        if len(raw):
            _scan_nested(ctx, raw, _join(member, name), depth + 1)
        if limit is not None:
            raise limit
        pos = start + csize
        count += 1


# --- other containers -----------------------------------------------------------------------------


def scan_npy(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """``.npy``: read as numpy.load reads it; an object dtype (any spelling) means a pickle."""
    from sdtool.formats.numpyfile import MAX_LAYOUT_HEADER, npy_header_length, npy_layout

    if member is None:
        ctx.formats.append(Format.NPY)
    head = bytes(buf[:12])
    if len(head) < 12:
        ctx.error(member, "npy header is cut short")
        return
    need = npy_header_length(head)
    if need > min(len(buf), MAX_LAYOUT_HEADER):
        ctx.error(member, f"npy header of {need} bytes does not fit the file (or sdtool's limit)")
        return
    try:
        layout = npy_layout(bytes(buf[:need]))
    except ValueError as e:
        # numpy.load refuses it: nothing in the file is loaded
        ctx.report.notes.append(f"{member or 'file'}: numpy refuses the npy header ({e})"[:300])
        return
    if not layout.has_object:
        return  # plain numbers: nothing executable
    ctx.report.notes.append(f"{member or 'file'}: npy object array: its data is a pickle")
    data = Window(buf, layout.data_start, len(buf) - layout.data_start)
    scan_pickle(
        ctx,
        data,
        _join(member, "<object array pickle>") if member else "<object array pickle>",
        depth,
    )
    if member is None and ctx.formats and ctx.formats[-1] == "pickle":
        ctx.formats.pop()


def scan_tar(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """torch's oldest format (sys_info, pickle, storages, tensors) or any other tar."""
    import tarfile

    try:
        tf = tarfile.open(fileobj=as_file(buf), mode="r:")  # noqa: SIM115 - closed with buf
        infos = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # ValueError: seek past end
        ctx.error(member, f"tar cannot be read: {e}")
        return
    names = {i.name for i in infos}
    torch_tar = {"sys_info", "pickle", "storages", "tensors"} <= names
    if member is None:
        ctx.formats.append(Format.TORCH_TAR if torch_tar else Format.TAR)
    for info in infos:
        path = _join(member, info.name)
        if info.issym() or info.islnk():
            data = _tar_link(ctx, tf, info, path, torch_tar)
            if data is None:
                continue
        elif not info.isfile():
            continue
        elif info.size > MAX_MEMBER:
            ctx.error(path, "not scanned: member too large")
            continue
        elif info.issparse():
            f = tf.extractfile(info)
            data = f.read() if f is not None else b""
        else:  # tarfile located it (long GNU/pax names included): a window, never a copy
            data = Window(buf, info.offset_data, info.size)
        if torch_tar and info.name in ("storages", "tensors"):
            _scan_tar_records(ctx, data, path, info.name)
        else:
            _scan_nested(ctx, data, path, depth + 1)


_TORCH_TAR_NAMES = ("sys_info", "pickle", "storages", "tensors")


def _tar_link(ctx: Ctx, tf: Any, info: Any, path: str, torch_tar: bool) -> Any:
    """A hard or symbolic link: torch's tar loader extracts and reads it, so does tarfile.

    A link to a member of the archive reads that member's bytes (scanned under the link's name,
    as the loader would read them); a link out of the archive reads whatever file it points to
    on the loading machine, which no scan of this file can see.
    """
    import tarfile

    kind = "symbolic" if info.issym() else "hard"
    try:
        f = tf.extractfile(info)
    except (tarfile.TarError, KeyError, OSError):
        f = None
    if f is None:
        loaded = torch_tar and info.name in _TORCH_TAR_NAMES
        ctx.find(
            "dangerous" if loaded else "suspicious",
            "tar-link",
            f"{kind} link to {info.linkname!r}, outside the archive: extracting it reads "
            + (
                "that file as the pickle torch.load runs"
                if loaded
                else "whatever that path holds on the loading machine"
            ),
            path,
        )
        return None
    ctx.find(
        "info",
        "tar-link",
        f"{kind} link to {info.linkname!r}: its bytes are scanned under this name too",
        path,
    )
    return f.read(MAX_MEMBER)


def _scan_tar_records(ctx: Ctx, data: Any, path: str, which: str) -> None:
    """Legacy tar 'storages'/'tensors': a count pickle, then per record a pickle + raw bytes."""
    s = _run(ctx, data, 0, len(data))
    _record(ctx, s, path, 0)
    count = s.result if s.stopped and isinstance(s.result, int) else None
    if count is None:
        return
    pos, index = s.end, 1
    for _ in range(min(count, 10_000_000)):
        r = _run(ctx, data, pos, len(data))
        _record(ctx, r, path, index)
        index += 1
        if not r.stopped:
            return
        pos = r.end
        try:
            if which == "storages":
                t = r.result[2] if isinstance(r.result, tuple) and len(r.result) == 3 else None
                name = t.imp.name if isinstance(t, Ref) and t.imp.name else ""
                itemsize = storage_itemsize(name)
                if itemsize is None:
                    raise KeyError(name)
                (n,) = struct.unpack("<q", bytes(data[pos : pos + 8]))
                pos += 8 + n * itemsize
            else:
                (ndim,) = struct.unpack("<i", bytes(data[pos : pos + 4]))
                pos += 8 + 16 * ndim + 8
        except (KeyError, struct.error, TypeError):
            ctx.error(
                path, f"cannot skip the raw bytes of record {index - 1}; the rest is not analysed"
            )
            return
    if pos < len(data):  # storage views list (storages) follows; scan what remains
        r = _run(ctx, data, pos, len(data))
        if r.stopped or r.imports:
            _record(ctx, r, path, index)


def scan_compressed(kind: str) -> Callable[[Ctx, Any, str | None, int], None]:
    """gzip/bz2/xz/lzma/zlib wrappers (joblib compression): bounded decompression, then route."""

    def handler(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
        if member is None:
            ctx.formats.append(Format(kind))
        start = 0
        algo = kind
        if kind == "joblib-zfile":
            # joblib's read_zfile: b"ZF", a 19-byte hex length, one optional space, zlib data
            start, algo = 2 + 19, "zlib"
            if buf[start : start + 1] == b" ":
                start += 1
        elif kind == "lz4" and importlib.util.find_spec("lz4") is None:
            scan_unscannable("lz4")(ctx, buf, member, depth)
            return
        elif kind == "lzma":
            algo = "lzma-auto"  # joblib opens ']\x00' files with lzma.LZMAFile (format auto)
        path = _join(member, f"<{kind}>") if member else f"<{kind}>"
        data, limit = _inflate(ctx, chunks(buf, start), algo, len(buf) - start, member)
        if len(data):
            _scan_nested(ctx, data, path, depth + 1)
        if limit is not None:
            raise limit

    return handler


def _inflate(
    ctx: Ctx, pieces: Any, algo: Any, compressed: int, member: str | None
) -> tuple[Any, ScanLimit | None]:
    """Decompress under the budget: (what came out, the limit that stopped it or None).

    Past a limit, what came out before it is still returned: the caller scans it (a payload
    at the start is still found), then raises the limit to end the file's scan.
    """
    sink = Sink(ctx.budget, member or "the file", compressed, ctx.keep)
    limit = None
    try:
        why = decompress(ctx.budget, pieces, algo, sink)
    except ScanLimit as e:
        why, limit = None, e
    name = algo if isinstance(algo, str) else "LZMA"
    if why:
        ctx.error(
            member, f"{name} data {why}" + (": what came before is scanned" if sink.n else "")
        )
    return sink.result(), limit


def scan_archive_7z(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    from sdtool.scan.archives import scan_7z

    if member is None:
        ctx.formats.append(Format.SEVENZIP)
    ctx.report.notes.append(f"{member or 'file'}: a 7z archive: every member is scanned")
    if not scan_7z(ctx, buf, member):
        ctx.formats.pop() if member is None else None
        scan_unscannable("7z")(ctx, buf, member, depth)


def scan_unscannable(kind: str) -> Callable[[Ctx, Any, str | None, int], None]:
    """7z/rar/lz4: sdtool cannot look inside, so by policy the archive counts as dangerous."""

    def handler(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
        if member is None:
            ctx.formats.append(Format(kind))
        ctx.find(
            "dangerous",
            "unscannable-archive",
            f"a {kind} archive: sdtool cannot look inside it, and model loaders never need one; "
            "treated as dangerous by policy (unpack it and scan the contents)",
            member,
        )

    return handler


def scan_safetensors(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """Reference-rule validation plus lint of the header and what surrounds the tensors."""
    from sdtool.formats.safetensors import read_header

    if member is None:
        ctx.formats.append(Format.SAFETENSORS)
    size = len(buf)
    try:
        header = read_header(as_file(buf), size)
    except SdtoolError as e:
        ctx.find(
            "suspicious",
            "safetensors-invalid",
            f"breaks the safetensors rules: {e.message}",
            member,
        )
        _safetensors_tail(ctx, buf, member, depth, None)
        return
    raw = header.raw
    if raw[:1] in (b" ", b"\t", b"\n", b"\r"):
        ctx.find(
            "info",
            "safetensors-lint",
            "the header starts with whitespace (the reference accepts it; other parsers may not)",
            member,
        )
    if header.duplicate_keys:
        ctx.find(
            "suspicious",
            "safetensors-lint",
            f"duplicate header keys {header.duplicate_keys[:5]} (parsers disagree on which wins)",
            member,
        )
    unknown = sorted(
        {
            k
            for e in header.entries.values()
            for k in e
            if k not in ("dtype", "shape", "data_offsets")
        }
    )
    if unknown:
        ctx.find("info", "safetensors-lint", f"unknown per-tensor fields {unknown[:5]}", member)
    for k, v in header.metadata.items():
        if _CODE_RE.search(v) or _CODE_RE.search(k):
            ctx.find(
                "suspicious",
                "safetensors-metadata",
                f"metadata {k!r} looks like code or a shell command",
                member,
            )
        elif _URL_RE.search(v):
            ctx.find("info", "safetensors-metadata", f"metadata {k!r} holds a URL", member)
    _safetensors_tail(ctx, buf, member, depth, header)


def _safetensors_tail(ctx: Ctx, buf: Any, member: str | None, depth: int, header: Any) -> None:
    """A pickle or zip hidden after the tensors (or appended to the file)."""
    size = len(buf)
    if header is not None:
        end = header.data_start + max(
            (e["data_offsets"][1] for e in header.entries.values()), default=0
        )
    else:
        if size < 8:
            return
        (n,) = struct.unpack_from("<Q", bytes(buf[:8]))
        end = 8 + n if 8 + n <= size else size
        end += _loose_data_length(bytes(buf[8:end]))
    if _is_zip_tail(buf) or bytes(buf[end : end + 4]) == b"PK\x03\x04":
        ctx.find(
            "suspicious", "safetensors-hidden", "a zip is hidden after the safetensors data", member
        )
        try:
            arch = zipfmt.read_archive(as_file(buf), size)
            _scan_archive(
                ctx,
                buf,
                arch,
                _join(member, "<hidden zip>") if member else "<hidden zip>",
                depth + 1,
            )
        except SdtoolError:
            pass
        return
    if end < size:
        tail = bytes(buf[end:])
        if sniff_bytes(tail[:4096], len(tail)) is Format.PICKLE:
            ctx.find(
                "suspicious",
                "safetensors-hidden",
                f"a pickle is hidden after the tensors at offset {end}",
                member,
            )
            _scan_nested(
                ctx,
                tail,
                _join(member, "<hidden pickle>") if member else "<hidden pickle>",
                depth + 1,
            )


def _loose_data_length(raw: bytes) -> int:
    """The data length a header declares, read leniently (for a header the rules reject)."""
    import json

    try:
        obj = json.loads(raw.decode("utf-8"))
        ends = [
            e["data_offsets"][1]
            for k, e in obj.items()
            if k != "__metadata__"
            and isinstance(e, dict)
            and isinstance(e.get("data_offsets"), list)
        ]
        return max((x for x in ends if isinstance(x, int) and x >= 0), default=0)
    except (ValueError, AttributeError, IndexError, TypeError, KeyError):
        return 0


_ROUTES: dict[str, Callable[[Ctx, Any, str | None, int], None]] = {
    "pickle": scan_pickle,
    "zip": scan_zip,
    "npy": scan_npy,
    "tar": scan_tar,
    "safetensors": scan_safetensors,
    "gzip": scan_compressed("gzip"),
    "bzip2": scan_compressed("bzip2"),
    "xz": scan_compressed("xz"),
    "zlib": scan_compressed("zlib"),
    "lzma": scan_compressed("lzma"),
    "joblib-zfile": scan_compressed("joblib-zfile"),
    "7z": scan_archive_7z,
    "rar": scan_unscannable("rar"),
    "lz4": scan_compressed("lz4"),
}

__all__ = ["Inst", "scan_blob", "scan_file"]
