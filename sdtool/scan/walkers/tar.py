"""Tar files: torch's oldest format (record by record) or any other tar, links included."""

from __future__ import annotations

import struct
from typing import Any

from sdtool.dtypes import storage_itemsize
from sdtool.scan.buffers import (
    Window,
    as_file,
)
from sdtool.scan.context import (
    MAX_MEMBER,
    Ctx,
    join_path,
    record_stream,
    run_pickle,
    scan_nested,
)
from sdtool.scan.vm import (
    Ref,
)
from sdtool.vocab import Format


def scan_tar(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """torch's oldest format (sys_info, pickle, storages, tensors) or any other tar."""
    import tarfile

    try:
        tf = tarfile.open(fileobj=as_file(buf), mode="r:")  # noqa: SIM115 - closed with buf
        infos = tf.getmembers()
    except (
        tarfile.TarError,
        OSError,
        EOFError,
        ValueError,
    ) as e:  # ValueError: seek past end
        ctx.error(member, f"tar cannot be read: {e}")
        return
    names = {i.name for i in infos}
    torch_tar = {"sys_info", "pickle", "storages", "tensors"} <= names
    if member is None:
        ctx.formats.append(Format.TORCH_TAR if torch_tar else Format.TAR)
    for info in infos:
        path = join_path(member, info.name)
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
            scan_nested(ctx, data, path, depth + 1)


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
    s = run_pickle(ctx, data, 0, len(data), oracle=True)
    record_stream(ctx, s, path, 0)
    count = s.result if s.stopped and isinstance(s.result, int) else None
    if count is None:
        return
    pos, index = s.end, 1
    for _ in range(min(count, 10_000_000)):
        r = run_pickle(ctx, data, pos, len(data), oracle=True)
        record_stream(ctx, r, path, index)
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
                path,
                f"cannot skip the raw bytes of record {index - 1}; the rest is not analysed",
            )
            return
    if pos < len(data):  # storage views list (storages) follows; scan what remains
        r = run_pickle(ctx, data, pos, len(data), oracle=True)
        if r.stopped or r.imports:
            record_stream(ctx, r, path, index)
