"""Tar files: torch's oldest format (record by record) or any other tar, links included."""

from __future__ import annotations

from typing import Any

from sdtool.dtypes import storage_itemsize
from sdtool.errors import SdtoolError
from sdtool.formats.torchfile import TAR_MEMBERS, tar_records
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
from sdtool.scan.report import ProblemKind
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
    torch_tar = set(TAR_MEMBERS) <= names
    _check_end(ctx, buf, tf.offset, infos, member)
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
            ctx.error(path, "not scanned: member too large", ProblemKind.LIMIT)
            continue
        elif info.issparse():
            f = tf.extractfile(info)
            data = f.read() if f is not None else b""
        else:  # tarfile located it (long GNU/pax names included): a window, never a copy
            data = Window(buf, info.offset_data, info.size)
        if torch_tar and info.name in ("storages", "tensors"):
            _scan_tar_records(ctx, data, path, info.name)
            continue
        if torch_tar and info.name == "pickle":  # parsed here to say what its persistent ids are
            s = run_pickle(ctx, data, 0, len(data), oracle=True)
            s.persid_keys = True
            ctx.parsed[path] = s  # the pickle walker takes it (any other route leaves it)
        scan_nested(ctx, data, path, depth + 1)


def _check_end(ctx: Ctx, buf: Any, end: int, infos: list[Any], member: str | None) -> None:
    """A tar ends with zero blocks. tarfile stops quietly at a cut or broken header after the
    first, and lists a member whose data runs past the end: a tar cut at a member boundary (or
    anywhere) would read as a smaller, complete archive (a torch TAR checkpoint without its
    tensors scanning SAFE). Without its end-of-archive blocks (two zero blocks: POSIX) it is
    truncated."""
    block = bytes(buf[end : end + 1024])
    if len(block) == 1024 and not any(block):
        return
    last = f" after {infos[-1].name!r}" if infos else ""
    ctx.error(
        member,
        f"the tar ends without its end-of-archive blocks{last} (at {end} of {len(buf)} bytes): "
        "truncated (members after it may be missing)",
    )


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
        loaded = torch_tar and info.name in TAR_MEMBERS
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


class _Stop(Exception):
    """A record's pickle broke: the walk ends there (the break is already reported)."""


def _scan_tar_records(ctx: Ctx, data: Any, path: str, which: str) -> None:
    """Legacy tar 'storages'/'tensors': every pickle where the format's layout
    (``torchfile.tar_records``) puts it, raw bytes skipped."""
    index = [0]

    def load(pos: int, what: str) -> tuple[Any, int]:
        r = run_pickle(ctx, data, pos, len(data), oracle=True)
        if what != "views" or r.stopped or r.imports:
            record_stream(ctx, r, path, index[0])
        index[0] += 1
        if not r.stopped:
            raise _Stop
        return r.result, r.end

    def itemsize(record: Any) -> int | None:
        t = record[2] if isinstance(record, tuple) and len(record) == 3 else None
        return storage_itemsize(t.imp.name) if isinstance(t, Ref) and t.imp.name else None

    def pread(pos: int, n: int) -> bytes:
        return bytes(data[pos : pos + n])

    try:
        for _ in tar_records(which, len(data), pread, load, itemsize):
            pass
    except _Stop:
        return
    except SdtoolError as e:
        ctx.error(path, f"{e.message}; the rest is not analysed")
