"""Zip files (torch zip, TorchScript, npz, any zip) in every reading a loader may take."""

from __future__ import annotations

import zlib
from typing import Any

from sdtool.errors import CorruptFile, SdtoolError
from sdtool.formats import zip as zipfmt
from sdtool.formats import zip_readings
from sdtool.formats.sniff import sniff_bytes
from sdtool.scan.buffers import (
    ScanLimit,
    Window,
    as_file,
    chunks,
)
from sdtool.scan.context import (
    MAX_MEMBER,
    Ctx,
    join_path,
    run_pickle,
    scan_nested,
)
from sdtool.scan.report import ProblemKind
from sdtool.scan.walkers.compressed import inflate
from sdtool.vocab import Format


def scan_zip(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """A zip in every reading a loader may take (torch's first; see zip_readings.read_archives)."""
    try:
        arch = zipfmt.read_archive(as_file(buf), len(buf))
        error = None
    except SdtoolError as e:
        arch, error = None, e
    readings = [a for rec, a in zip_readings.read_archives(as_file(buf), len(buf)) if a is not arch]
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
    scan_archive(ctx, buf, arch, member, depth)
    # keyed by the local header (it decides where the data lies) so that comparing readings
    # reads no local header: a remote file reads only the members it scans
    done = {(m.header_offset, m.compressed_size) for m in arch.entries}
    for n, other in enumerate(readings, start=1):
        new = [m for m in other.entries if (m.header_offset, m.compressed_size) not in done]
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
            done.add((m.header_offset, m.compressed_size))
            if m.name.endswith("/") and m.size == 0:
                continue
            path = join_path(member, f"<reading {n}>/{m.name}")
            _scan_member(ctx, buf, m, path, depth, shadowed=False)


def scan_archive(
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
        ctx.find(
            "suspicious",
            IRREGULAR_RULES[irr.kind],
            irr.message + " (torch reads the central directory; other tools may not)",
            member,
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
        path = join_path(member, m.name)
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
            data = _member_data(ctx, buf, m, join_path(member, name))
        except SdtoolError:
            continue
        s = run_pickle(ctx, data, 0, len(data), oracle=True)
        ctx.parsed[join_path(member, name)] = s  # scanned again below: parse once
        for _, pid in s.persids:
            if (
                isinstance(pid, tuple)
                and len(pid) >= 3
                and pid[0] == "storage"
                and isinstance(pid[2], str)
            ):
                out.add(f"{prefix}data/{pid[2]}")
    return out


#: the scan rule of each zip irregularity the reader records
IRREGULAR_RULES = {
    zipfmt.Irregular.PREFIX: "zip-prefix",
    zipfmt.Irregular.ENTRY_COUNT: "zip-irregular",
    zipfmt.Irregular.DUPLICATE_NAME: "zip-duplicate",
    zipfmt.Irregular.LOCAL_NAME: "zip-name-mismatch",
    zipfmt.Irregular.FLAG_BITS: "zip-flags",
}
assert set(IRREGULAR_RULES) == set(zipfmt.Irregular), "every irregularity has a rule"


#: zip compression methods zipfile reads (numpy.load opens npz files with zipfile); torch's
#: miniz reads only stored and deflate, so a method it lacks never reaches torch.load.
def _member_data(ctx: Ctx, buf: Any, m: zipfmt.ZipMember, path: str) -> Any:
    """A member's bytes: a window for stored members, decompressed under the budget otherwise.

    Raises CorruptFile for a method no loader reads; a member that stops decompressing midway
    yields what came before (the loader would have read it too) and an error.
    """
    if m.method == zipfmt.STORED:
        return Window(buf, m.data_offset, m.compressed_size)
    algo = zipfmt.METHODS.get(m.method)
    if algo is None:
        raise CorruptFile(f"compression method {m.method}, which no model loader reads")
    raw = Window(buf, m.data_offset, m.compressed_size)
    start = 0
    dec: Any = algo
    if algo == "zip-lzma":
        import lzma

        properties, start = zipfmt.lzma_header(raw)
        try:
            decode = lzma._decode_filter_properties  # type: ignore[attr-defined] # zipfile's own
            props = decode(lzma.FILTER_LZMA1, properties)
            dec = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[props])
        except (lzma.LZMAError, ValueError) as e:
            raise CorruptFile(f"LZMA member header is broken ({e})") from None
    data, limit = inflate(ctx, chunks(raw, start), dec, m.compressed_size, path)
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
        ctx.error(path, f"not scanned: {e.message}", ProblemKind.NOT_SCANNED)
        return
    if not m.flags & 0x1:  # an encrypted member's CRC is of the plaintext
        _check_crc(ctx, buf, m, path, data)
    if shadowed:
        path += " (shadowed duplicate)"
    if m.flags & 0x1:
        kind = sniff_bytes(data[:4096], len(data))
        if kind is Format.UNKNOWN:
            ctx.error(path, "not scanned: the member is encrypted", ProblemKind.NOT_SCANNED)
            return
    scan_nested(ctx, data, path, depth + 1)
    if ctx.pending is not None:
        raise ctx.pending


def _scan_local_headers(ctx: Ctx, buf: Any, member: str | None, depth: int) -> None:
    """A zip whose directory is unreadable: walk the local headers (what a lenient reader sees)."""
    for h in zip_readings.local_headers(lambda off, n: bytes(buf[off : off + n]), len(buf)):
        raw: Any = Window(buf, h.data_start, h.csize)
        path = join_path(member, h.name)
        limit = None
        if h.method == zipfmt.DEFLATED:
            raw, limit = inflate(ctx, chunks(raw), "deflate", h.csize, path)
        if len(raw):
            scan_nested(ctx, raw, path, depth + 1)
        if limit is not None:
            raise limit
