"""Route each file, and each blob inside it, to the walker of its container.

Routing is by content (sdtool.formats.sniff, shared with the loaders), never by name. Each
container has one walker module under sdtool.scan.walkers (zip, tar, pickle and legacy torch,
numpy, compressed wrappers, safetensors) or sdtool.scan.archives (7z); walkers read layouts
from sdtool.formats, report through the per-file Ctx (sdtool.scan.context) and recurse into
members only through ``Ctx.nested``, which comes back here. Byte 0 of every blob is also tried
as a pickle (pickle.load reads any file from there).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdtool.errors import SdtoolError
from sdtool.formats.sniff import HEAD, TEXT_LIMIT, describe, not_a_model_file, sniff_any
from sdtool.scan.archives import scan_archive_7z, scan_unscannable
from sdtool.scan.buffers import (
    IO_ERRORS,
    Budget,
    FileBuf,
    close_all,
)
from sdtool.scan.context import (
    MAX_DEPTH,
    Ctx,
    NotRegularFile,
    join_path,
    open_regular,
    record_stream,
    run_pickle,
)
from sdtool.scan.report import FileReport, FileScan, Problem, ProblemKind
from sdtool.scan.vm import DEFAULT_LIMITS, OPNAMES, Inst, Limits, run_stream, would_unpickle
from sdtool.scan.walkers.compressed import scan_compressed
from sdtool.scan.walkers.gguf import scan_gguf
from sdtool.scan.walkers.numpy import scan_npy
from sdtool.scan.walkers.pickle import scan_pickle
from sdtool.scan.walkers.safetensors import scan_safetensors
from sdtool.scan.walkers.tar import scan_tar
from sdtool.scan.walkers.zip import scan_zip
from sdtool.urls import is_url
from sdtool.vocab import Format, model_named


def scan_file(
    path: Path,
    *,
    limits: Limits = DEFAULT_LIMITS,
    crc: str = "read",
    budget: Budget | None = None,
) -> FileReport:
    """Scan one file. Never raises for file content; unreadable files are "not scanned"."""
    rep = FileScan(str(path))
    _scan_into(rep, path, limits, crc, budget)
    return rep.freeze()


def _scan_into(rep: FileScan, path: Path, limits: Limits, crc: str, budget: Budget | None) -> None:
    ctx = Ctx(rep, limits, crc=crc, budget=Budget(**budget.__dict__) if budget else Budget())
    ctx.budget.start()
    io_errors: list[OSError] = []
    token = IO_ERRORS.set(io_errors)
    try:
        if is_url(path):
            _scan_remote(ctx, path)
            return
        with open_regular(path) as f:
            size = rep.size = os.fstat(f.fileno()).st_size
            if size == 0:
                _empty(rep, path)
                return
            if sniff_any(f.read(HEAD), size) is Format.ZIP:
                # zips are read in small scattered pieces: plain reads keep RSS small
                scan_blob(ctx, FileBuf(f, size), None, depth=0, name=path.name)
                return
            ctx.fd = f.fileno()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                if hasattr(mm, "madvise"):  # scattered small reads: no readahead into RSS
                    mm.madvise(mmap.MADV_RANDOM)
                scan_blob(ctx, mm, None, depth=0, name=path.name)
    except NotRegularFile as e:
        rep.scanned, rep.format = False, Format.UNREADABLE
        rep.problem(ProblemKind.UNREADABLE, f"not scanned: {e} (skipped by type, never opened)")
    except OSError as e:
        rep.scanned = False
        rep.format = Format.UNREADABLE
        why = f"not scanned: cannot read the file ({e.strerror or e})"
        rep.problem(ProblemKind.UNREADABLE, why)
    except SdtoolError as e:
        rep.problems.append(Problem.of(e))
    finally:
        IO_ERRORS.reset(token)
        close_all(ctx.keep)
        if ctx.formats:
            rep.format = ctx.formats[0]
        if io_errors and not any(p.kind is ProblemKind.UNREADABLE for p in rep.problems):
            # a read or a temporary file failed and a walker carried on: say so (the cause)
            first = io_errors[0]
            why = f"cannot read all of the file ({first.strerror or first})"
            rep.problem(ProblemKind.UNREADABLE, why)


def _empty(rep: FileScan, path: Path) -> None:
    """An empty file holds nothing a loader could run: skipped, as the placeholders A1111 and
    ComfyUI ship in their model folders ("Put ... here.txt", ``put_checkpoints_here``) are;
    under a model file's name it is a download that never arrived: not scanned (exit 2)."""
    rep.format = Format.EMPTY
    if not model_named(path.name):
        rep.skipped = "empty file"
        return
    rep.scanned = False
    rep.self_contained = False  # the name decided: not a verdict for these bytes (cache)
    rep.problem(ProblemKind.NOT_SCANNED, "not scanned: the file is empty")


def _scan_remote(ctx: Ctx, path: Path) -> None:
    """A URL, read by ranges (sdtool.remote): what holds pickles is read, raw storages are not."""
    from sdtool.remote import open_url

    rep = ctx.report
    try:
        reader = open_url(path)
    except SdtoolError as e:
        rep.scanned, rep.format = False, Format.UNREADABLE
        rep.problem(ProblemKind.NOT_SCANNED, f"not scanned: {e.message}")
        return
    with reader:
        rep.size = reader.size
        if reader.size == 0:
            _empty(rep, path)
            return
        scan_blob(ctx, reader, None, depth=0, name=path.name)


def scan_blob(ctx: Ctx, buf: Any, member: str | None, *, depth: int, name: str = "") -> None:
    """Route ``buf`` (bytes or mmap) by its content."""
    size = len(buf)
    head = bytes(buf[:4096])
    kind = sniff_any(head, size)
    _check_name(ctx, member, name, kind)
    handler = _ROUTES.get(kind)
    if member is None and kind is Format.PICKLE and _text_not_a_pickle(ctx, buf, head, size, name):
        handler = None  # notes that merely start like a protocol 0 pickle: "(masterpiece) ..."
    elif handler is None and member is None and would_unpickle(buf, limits=ctx.limits):
        handler = scan_pickle  # pickle.load reads any file from byte 0, whatever it starts with
    if depth > MAX_DEPTH:
        ctx.error(
            member, f"not scanned: containers nested deeper than {MAX_DEPTH}", ProblemKind.LIMIT
        )
        return
    if handler is not scan_pickle:
        _pickle_at_zero(ctx, buf, member, kind)
    if handler is None:
        if member is None and _skip_not_a_model(ctx, buf, head, size, name):
            return
        what = describe(head, size)
        if member is None:
            ctx.report.scanned = False
            ctx.formats.append(Format.UNKNOWN)
            ctx.error(
                None,
                f"not scanned: not a format sdtool can analyse ({what})",
                ProblemKind.UNSUPPORTED,
            )
        else:
            ctx.report.notes.append(f"{member}: not analysed ({what})")
        return
    outer, ctx.depth = ctx.depth, depth
    try:
        handler(ctx, buf, member, depth)
    finally:
        ctx.depth = outer


def _skip_not_a_model(ctx: Ctx, buf: Any, head: bytes, size: int, name: str) -> bool:
    """A file that is, by content, an image, video, JSON, YAML or text: skipped, and said so.

    Under a model file's name (``vocab.MODEL_SUFFIXES``) it is never skipped: an HTML login
    page, an API's JSON error or a Git-LFS pointer saved as ``model.safetensors`` is a download
    that failed, "could not scan" with what it is. The name only ever makes the gate stricter;
    a verdict it decided is not one for the bytes alone, so it is not cached.
    """
    data = bytes(buf[:size]) if len(head) < size <= TEXT_LIMIT else head
    what = not_a_model_file(data, size)
    if what is None:
        return False
    if what.endswith("text"):  # protocol 0 pickles are text: skip only if loading it does nothing
        s = run_stream(data, limits=ctx.limits)
        if s.imports or s.calls or s.persids or s.incomplete:  # a limit: not known harmless
            return False
    if model_named(name):
        ctx.report.self_contained = False
        return False
    ctx.report.skipped = what
    ctx.formats.append(Format.UNKNOWN)  # no model format; ``skipped`` says what it is
    return True


def _text_not_a_pickle(ctx: Ctx, buf: Any, head: bytes, size: int, name: str) -> bool:
    """Text that sniffs as a protocol 0 pickle (it starts with ``(``, ``c``, ``S``, ``I`` ...
    and holds a ``.``: most sentences) but that ``pickle.load`` refuses before importing
    anything or reaching STOP: it goes the way of any other text beside the models, not to the
    pickle walker (which calls it a broken pickle). Under a model file's name it stays a pickle:
    a truncated one is "could not scan" (and, the name having decided, not cached)."""
    if head[:1] == b"\x80":
        return False
    data = bytes(buf[:size]) if len(head) < size <= TEXT_LIMIT else head
    what = not_a_model_file(data, size)
    if what is None or not what.endswith("text") or would_unpickle(buf, limits=ctx.limits):
        return False
    if model_named(name):
        ctx.report.self_contained = False
        return False
    return True


def _pickle_at_zero(ctx: Ctx, buf: Any, member: str | None, kind: Format) -> None:
    """``pickle.load`` reads any file from byte 0, whatever else the bytes are (a tar whose first
    member name is a protocol-0 pickle, a safetensors header length that starts a pickle ...).
    If byte 0 starts a pickle that imports anything, that reading is scanned too.
    """
    if not len(buf) or buf[0] not in OPNAMES:
        return
    s = run_pickle(ctx, buf, 0, len(buf))
    if not any(_importable(i.module) and _importable(i.name) for i in s.imports):
        return  # garbage as a pickle (text, code), or plain data: nothing a loader could run
    s = run_pickle(ctx, buf, 0, len(buf), oracle=True)  # recorded: cross-checked too
    what = "of no format sdtool reads" if kind is Format.UNKNOWN else f"a {kind} file"
    ctx.find(
        "suspicious",
        "polyglot",
        f"the bytes are {what} and, read from byte 0, also a pickle that imports something: "
        "pickle.load (and loaders built on it) would run it; both readings are scanned",
        member,
    )
    record_stream(ctx, s, join_path(member, "<as pickle>") if member else "<as pickle>", 0)


def _importable(name: str | None) -> bool:
    """A dotted name ``find_class`` could import (anything else fails before running)."""
    return bool(name) and all(p.isidentifier() for p in (name or "").split("."))


#: a name's extension -> the content it promises (an .npz is a zip to sniffing)
_EXT_KIND = {
    ".safetensors": Format.SAFETENSORS,
    ".npy": Format.NPY,
    ".npz": Format.ZIP,
    ".zip": Format.ZIP,
    ".7z": Format.SEVENZIP,
    ".gz": Format.GZIP,
    ".bz2": Format.BZIP2,
    ".xz": Format.XZ,
}


def _check_name(ctx: Ctx, member: str | None, name: str, kind: Format) -> None:
    """A name that lies about the content (a pickle named .safetensors)."""
    base = (member or name).rsplit("/", 1)[-1].lower()
    for ext, expected in _EXT_KIND.items():
        if base.endswith(ext) and kind is not expected:
            sev = "suspicious" if kind in (Format.PICKLE, Format.ZIP) else "info"
            ctx.find(
                sev,
                "misnamed",
                f"named {ext} but the content is {kind} (loaders go by content)",
                member,
            )
            return


_ROUTES: dict[Format, Callable[[Ctx, Any, str | None, int], None]] = {
    Format.GGUF: scan_gguf,
    Format.PICKLE: scan_pickle,
    Format.ZIP: scan_zip,
    Format.NPY: scan_npy,
    Format.TAR: scan_tar,
    Format.SAFETENSORS: scan_safetensors,
    Format.GZIP: scan_compressed("gzip"),
    Format.BZIP2: scan_compressed("bzip2"),
    Format.XZ: scan_compressed("xz"),
    Format.ZLIB: scan_compressed("zlib"),
    Format.LZMA: scan_compressed("lzma"),
    Format.JOBLIB_ZFILE: scan_compressed("joblib-zfile"),
    Format.SEVENZIP: scan_archive_7z,
    Format.RAR: scan_unscannable("rar"),
    Format.LZ4: scan_compressed("lz4"),
}

__all__ = ["Inst", "scan_blob", "scan_file"]
