"""General-purpose archives people ship models in (7z), opened with well-kept readers.

A 7z is not a model format (no loader reads one), but a model inside one is loaded as soon as it
is unpacked, and scanners that cannot open 7z used to be bypassed by it (the nullifAI files: a
PyTorch file in 7z, its pickle broken after the payload). The archive is read with py7zr
(imported only here, only when a 7z is met); every member is decompressed under the file's
budget and scanned like any other blob.

An archive sdtool cannot open (a RAR: the only RAR readers on the package registry drive an
external ``unrar`` program; a 7z py7zr refuses; lz4 without the ``lz4`` package) is never called
dangerous merely because it cannot be opened: it is ``could not scan: unsupported archive``,
exit 2, with the reason, so CI fails closed without a false "malicious" label.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sdtool.errors import UnsupportedArchive
from sdtool.scan.buffers import ScanLimit, Sink, as_io
from sdtool.scan.report import ProblemKind
from sdtool.vocab import Format

if TYPE_CHECKING:
    from sdtool.scan.context import Ctx

MAX_7Z_MEMBERS = 100_000


def scan_7z(ctx: Ctx, buf: Any, member: str | None) -> str | None:
    """Scan every member of the 7z in ``buf``; or why it cannot be opened at all (py7zr is not
    installed or refuses it: then the archive is not scanned, ``could not scan``)."""
    try:
        import py7zr
        from py7zr.io import Py7zIO, WriterFactory
    except ImportError:
        ctx.report.self_contained = False  # another machine, with py7zr, scans it
        return "py7zr (the `archives` extra) is not installed"

    sinks: dict[str, Sink] = {}
    over: list[ScanLimit] = []

    class _Out(Py7zIO):
        def __init__(self, sink: Sink) -> None:
            self.sink = sink

        def write(self, s: bytes | bytearray) -> int:
            if not over:
                try:
                    self.sink.write(bytes(s))
                except ScanLimit as e:  # recorded, raised once py7zr has returned
                    over.append(e)
            return len(s)

        def read(self, size: int | None = None) -> bytes:
            return b""

        def seek(self, offset: int, whence: int = 0) -> int:
            return 0

        def flush(self) -> None:
            return None

        def size(self) -> int:
            return self.sink.n

    class _Factory(WriterFactory):
        def create(self, filename: str) -> Py7zIO:
            sink = Sink(ctx.budget, f"{member or '7z'}/{filename}", len(buf), ctx.keep)
            sinks[filename] = sink
            return _Out(sink)

    left = max(1, ctx.budget.max_bytes - ctx.budget.used_bytes)
    error = None
    try:
        with py7zr.SevenZipFile(as_io(buf), mode="r", max_extract_size=left) as z:
            names = z.getnames()
            if len(names) > MAX_7Z_MEMBERS:
                raise ScanLimit(f"a 7z archive of {len(names)} members")
            z.extract(factory=_Factory())
    except ScanLimit:
        raise
    except Exception as e:  # a third-party reader on hostile bytes: any failure
        error = f"{type(e).__name__}: {e}"[:300]
        # what py7zr (and the codecs installed beside it) refuses today, a later one may read:
        # a verdict of this machine, not of the bytes alone, so it is not cached
        ctx.report.self_contained = False
    if error is not None and not sinks:
        return f"py7zr cannot open it ({error})"
    if error is not None:
        ctx.error(
            member,
            f"7z cannot be read completely ({error}); what was unpacked is scanned",
        )
    for name, sink in sinks.items():
        data = sink.result()
        if len(data):
            ctx.nested(data, f"{member}/{name}" if member else name)
    if over:
        raise over[0]
    return None


def scan_archive_7z(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    if member is None:
        ctx.formats.append(Format.SEVENZIP)
    ctx.report.notes.append(f"{member or 'file'}: a 7z archive: every member is scanned")
    why = scan_7z(ctx, buf, member)
    if why is not None:
        ctx.formats.pop() if member is None else None
        ctx.report.notes.pop()
        scan_unscannable("7z", why)(ctx, buf, member, depth)


_SHOWN = {"rar": "RAR", "7z": "7z", "lz4": "lz4"}
#: why sdtool cannot look inside an archive of each kind (when it cannot)
UNSUPPORTED = {
    "rar": "sdtool reads no RAR (Python's RAR readers run an external unrar program)",
    "lz4": "the lz4 package is not installed",
}


def scan_unscannable(kind: str, why: str = "") -> Callable[[Ctx, Any, str | None, int], None]:
    """An archive sdtool cannot look inside: ``could not scan`` (exit 2), never a verdict."""

    def handler(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
        if member is None:
            ctx.formats.append(Format(kind))
            ctx.report.scanned = False  # nothing in it was analysed
        reason = why or UNSUPPORTED.get(kind, "sdtool has no reader for it")
        ctx.error(
            member,
            f"not scanned: {UnsupportedArchive(_SHOWN.get(kind, kind), reason).message}",
            ProblemKind.UNSUPPORTED,
        )

    return handler
