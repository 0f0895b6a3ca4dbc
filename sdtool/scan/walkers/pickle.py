"""Pickle files: plain and concatenated pickles, legacy torch (five pickles then raw storages),
bytes after the last STOP, and the files a joblib pickle makes joblib.load read beside it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sdtool.dtypes import storage_itemsize
from sdtool.errors import SdtoolError
from sdtool.formats import zip as zipfmt
from sdtool.formats.torchfile import LEGACY_MAGIC, LEGACY_PICKLES, legacy_storages
from sdtool.scan.buffers import (
    as_file,
)
from sdtool.scan.context import (
    MAX_MEMBER,
    MAX_STREAMS,
    Ctx,
    NotRegularFile,
    join_path,
    open_regular,
    record_stream,
    run_pickle,
    scan_nested,
)
from sdtool.scan.report import ProblemKind
from sdtool.scan.vm import (
    DictV,
    Inst,
    ListV,
    Ref,
    Stream,
)
from sdtool.scan.walkers.zip import scan_archive
from sdtool.vocab import Format

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
            with open_regular(target) as f:
                st = os.fstat(f.fileno())  # before the read: a change after it shows
                data = f.read(MAX_MEMBER)
        except (OSError, NotRegularFile):
            ctx.report.depends.append((name, None))  # the verdict holds while it is absent
            ctx.report.notes.append(f"{member or 'file'}: joblib side file {name!r} is absent")
            continue
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        ctx.report.depends.append((name, ident))  # ... and while this file is unchanged
        scan_nested(ctx, data, join_path(member, f"<side file {name}>"), depth + 1)


def scan_pickle(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """Every stream of a pickle file: legacy torch's five, concatenated pickles, trailing data."""
    end = len(buf)
    s0 = ctx.parsed.pop(member or "", None) or run_pickle(ctx, buf, 0, end, oracle=True)
    record_stream(ctx, s0, member, 0)
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
        if buf[pos : pos + 4] == zipfmt.LOCAL_SIG or is_zip_tail(buf):
            break
        if not _looks_like_pickle(buf, pos):
            break
        s = run_pickle(ctx, buf, pos, end, oracle=True)
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
        record_stream(ctx, s, member, index)
        index += 1
        pos = s.end if s.stopped else -1
        if index > MAX_STREAMS:
            ctx.error(
                member,
                f"more than {MAX_STREAMS} pickle streams: the rest is not analysed",
                ProblemKind.LIMIT,
            )
            return
    if pos < 0:
        return
    _trailing(ctx, buf, pos, member, depth)


def _looks_like_pickle(buf: Any, pos: int) -> bool:
    b = buf[pos]
    return (b == 0x80 and pos + 1 < len(buf) and buf[pos + 1] <= 5) or b in b"(cI]}NSV\x95"


def is_zip_tail(buf: Any) -> bool:
    """A zip appended to bytes that do not start as one (zipfile finds it from the end)."""
    return zipfmt.has_end_record(buf) and bytes(buf[:4]) != zipfmt.LOCAL_SIG


def _trailing(ctx: Ctx, buf: Any, pos: int, member: str | None, depth: int) -> None:
    """Bytes after the last pickle: an appended zip (polyglot), or data no loader reads."""
    end = len(buf)
    if is_zip_tail(buf):
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
            scan_archive(
                ctx,
                buf,
                arch,
                join_path(member, "<appended zip>") if member else "<appended zip>",
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
    """Streams 2-5 of a legacy torch file, then skip the raw storages where the format's
    layout (``torchfile.legacy_storages``) puts them."""
    end = len(buf)
    streams: list[Stream] = []
    for i, what in enumerate(LEGACY_PICKLES[1:], start=1):
        if pos >= end:
            ctx.error(member, f"legacy torch file ends before its {what} pickle")
            return -1
        s = run_pickle(ctx, buf, pos, end, oracle=True)
        record_stream(ctx, s, member, i)
        streams.append(s)
        if not s.stopped:
            return -1
        pos = s.end
    keys = streams[3].result
    types = _legacy_storage_types(streams[2])
    if not isinstance(keys, ListV) or keys.items is None:
        ctx.error(member, "legacy torch storage key list is not a list: storages not skipped")
        return -1
    if not all(isinstance(k, str) for k in keys.items):  # torch writes string keys
        ctx.error(member, "legacy torch storage key is not a string: storages not skipped")
        return -1

    def pread(offset: int, n: int) -> bytes:
        if member is None and ctx.fd is not None:  # no mapped pages across the file
            return os.pread(ctx.fd, n, offset)
        return bytes(buf[offset : offset + n])

    def itemsize(key: Any) -> int | None:
        return storage_itemsize(types.get(key, "") + "Storage")

    try:
        for span, _ in legacy_storages(pread, pos, end, list(keys.items), itemsize):
            pos = span.end
    except SdtoolError as e:
        ctx.error(member, f"{e.message}; the rest is not analysed")
        return -1
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
