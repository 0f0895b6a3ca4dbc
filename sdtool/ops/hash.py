"""The hashes model sites and UIs show, all from one read of the file.

Civitai, AUTOMATIC1111 and kohya identify a model by several hashes (FORMATS.md section 5):

=======  =============================================================================
SHA256   the whole file
AutoV1   A1111's legacy "model hash": sha256(file[0x100000:0x110000]), first 8 hex
AutoV2   the first 10 hex of the whole file's SHA-256
AutoV3   SHA-256 of the bytes after the safetensors header (skip 8 + N) = A1111/kohya
         "addnet" hash = kohya ``sshs_model_hash`` = ModelSpec ``hash_sha256``
CRC32    zlib's CRC-32 as Civitai prints it: 4 bytes little-endian, uppercase hex
BLAKE3   the whole file
=======  =============================================================================

The file is read once, in large chunks; each hasher runs in its own thread (hashlib, the CRC-32
and blake3 release the GIL on large buffers), so on a machine with free cores the wall time is
that of the slowest hash and the disk, not the sum. Hex is uppercase, as Civitai shows it.
torch is never imported here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import queue
import re
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sdtool.aligned import PageBuffer
from sdtool.crc import crc32
from sdtool.errors import CorruptFile, FileAccessError, UsageError
from sdtool.formats.sniff import HEAD, sniff_bytes
from sdtool.results import Result
from sdtool.urls import is_url
from sdtool.vocab import Format, Progress

if TYPE_CHECKING:
    from sdtool.cache import Cache

CHUNK = 16 << 20  # bytes per read: large enough that per-chunk overhead vanishes
BUFFERS = 4  # chunks in flight: the reader stays ahead while the hashers catch up
AUTOV1_RANGE = (0x100000, 0x110000)
CIVITAI_AUTOV1_MIN = 2 << 20  # Civitai shows no AutoV1 for files under 2 MiB

SCHEMA = "sdtool.hash/2"


class _Crc32:
    """CRC-32 (sdtool.crc: ISA-L's when installed) behind the hashlib interface; digest is the
    CRC's 4 bytes little-endian."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: Any) -> None:
        self._crc = crc32(data, self._crc)

    def digest(self) -> bytes:
        return struct.pack("<I", self._crc)

    def hexdigest(self) -> str:
        return self.digest().hex()


def _blake3() -> Any:
    import blake3  # a declared dependency; imported here so `import sdtool` stays cheap

    return blake3.blake3()


@dataclass(frozen=True)
class Algorithm:
    """One reported hash: the hasher it reads (several share one) and how its text is cut."""

    name: str  # key in HashResult.hashes and --json
    label: str  # how Civitai/A1111 name it
    hasher: str  # key in _HASHERS
    digits: int | None  # leading hex digits shown; None = all
    doc: str


#: every hash sdtool reports, in display order
ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("sha256", "SHA256", "sha256", None, "SHA-256 of the whole file"),
        Algorithm("autov1", "AutoV1", "autov1", 8, "sha256(file[0x100000:0x110000])[:8] (A1111)"),
        Algorithm("autov2", "AutoV2", "sha256", 10, "first 10 hex of the file's SHA-256"),
        Algorithm("autov3", "AutoV3", "autov3", None, "SHA-256 after the safetensors header"),
        Algorithm("crc32", "CRC32", "crc32", None, "zlib CRC-32, bytes little-endian"),
        Algorithm("blake3", "BLAKE3", "blake3", None, "BLAKE3 of the whole file"),
    )
}

#: hasher key -> constructor; a hasher reads the range _plan gives it
_HASHERS: dict[str, Callable[[], Any]] = {
    "sha256": hashlib.sha256,
    "autov1": hashlib.sha256,
    "autov3": hashlib.sha256,
    "crc32": _Crc32,
    "blake3": _blake3,
}


@dataclass(frozen=True)
class HashResult(Result):
    """The hashes of one file.

    ``hashes`` maps an algorithm name (see ALGORITHMS) to uppercase hex, or None when it does
    not apply (AutoV3 of a non-safetensors file); ``notes`` says why, or warns, per algorithm.
    """

    path: Path
    size: int
    safetensors: bool
    hashes: dict[str, str | None]
    notes: dict[str, str] = field(default_factory=dict)

    # to_json (Result's): the documented --json record (docs/hash.md), the fields in order


def parse_algorithms(names: Iterable[str]) -> tuple[str, ...]:
    """Normalise user-typed algorithm names (``AutoV2``, ``sha256``, ``all``) in display order."""
    wanted: set[str] = set()
    for raw in names:
        for part in raw.split(","):
            key = part.strip().lower().replace("-", "")
            if not key:
                continue
            if key == "all":
                wanted.update(ALGORITHMS)
            elif key in ALGORITHMS:
                wanted.add(key)
            else:
                raise UsageError(
                    f"unknown hash {part.strip()!r}; choose from {', '.join(ALGORITHMS)} or all"
                )
    return tuple(a for a in ALGORITHMS if a in wanted)


class _Feeder(threading.Thread):
    """One hasher in its own thread, fed byte ranges in file order through a queue."""

    def __init__(self, hasher: Any, start: int, end: int, done: queue.Queue[int]) -> None:
        super().__init__(daemon=True)
        self.hasher = hasher
        self.start_at, self.end_at = start, end  # absolute file range this hasher wants
        self.inbox: queue.Queue[tuple[int, memoryview] | None] = queue.Queue()
        self.done = done
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            idx, view = item
            try:
                if self.error is None:
                    self.hasher.update(view)
            except BaseException as e:  # reported by hash_file after the join
                self.error = e
            finally:
                view.release()
                self.done.put(idx)


def _autov3_start(f: BinaryIO, head: bytes, size: int) -> tuple[int | None, str | None]:
    """Where the AutoV3 range begins (8 + N), or None and why there is none."""
    if sniff_bytes(head, size) is not Format.SAFETENSORS:
        return None, "not a safetensors file; AutoV3 exists only for safetensors"
    from sdtool.formats.safetensors import read_header

    try:
        return read_header(f, size).data_start, None
    except CorruptFile as e:
        # A1111 and kohya hash whatever follows 8 + N without checking the header; so do we,
        # and say the file is damaged.
        (n,) = struct.unpack_from("<Q", head)
        return 8 + n, f"computed, but the safetensors header is invalid: {e.message}"


def hash_file(
    path: str | Path,
    *,
    algorithms: Iterable[str] = tuple(ALGORITHMS),
    progress: Progress | None = None,
    chunk_size: int = CHUNK,
) -> HashResult:
    """Compute the requested hashes of ``path`` in one read pass.

    Args:
        path: any file (AutoV3 needs safetensors; the others hash raw bytes).
        algorithms: names from ALGORITHMS (default: all of them).
        progress: called as ``progress(bytes_done, bytes_total)`` after each chunk.
        chunk_size: bytes per read.

    Returns:
        HashResult with uppercase hex per algorithm (None where one does not apply).

    Raises:
        FileAccessError when the file cannot be read; UsageError for an unknown algorithm;
        CorruptFile when the file changes size while it is read.

    Example:
        >>> hash_file("model.safetensors", algorithms=["autov2", "autov3"]).hashes
        {'autov2': '6CE0161689', 'autov3': '...'}
    """
    names = parse_algorithms(algorithms)
    if not names:
        raise UsageError("no hash algorithm requested")
    if is_url(path):  # one streamed pass over HTTP (sdtool.remote)
        from sdtool.remote import open_url

        with open_url(path) as r, r.open() as f:
            return _hash_open(r.path, f, names, progress, max(chunk_size, 1 << 16), size=r.size)
    p = Path(path)
    try:
        if p.is_dir():
            raise FileAccessError("is a directory, not a file", path=p)
        with open(p, "rb") as f:
            return _hash_open(p, f, names, progress, max(chunk_size, 1 << 16))
    except FileNotFoundError:
        raise FileAccessError("no such file", path=p) from None
    except PermissionError:
        raise FileAccessError("permission denied", path=p) from None
    except OSError as e:
        raise FileAccessError(f"cannot read: {e.strerror or e}", path=p) from None


CACHE_KIND = "hashes"


def hash_cached(
    path: str | Path,
    cache: Cache | None,
    *,
    algorithms: Iterable[str] = tuple(ALGORITHMS),
    progress: Progress | None = None,
) -> tuple[HashResult, bool]:
    """``hash_file`` through the result cache: (result, whether it came from the cache).

    Hashes are stored under the file's SHA-256 and its identity (sdtool.cache), for this
    sdtool version; a file whose identity changed is hashed again, and a file that changes
    while it is read is not recorded.
    """
    from sdtool import __version__
    from sdtool.cache import Identity

    if is_url(path):  # a remote file has no identity to key the cache by
        return hash_file(path, algorithms=algorithms, progress=progress), False
    p = Path(path)
    names = parse_algorithms(algorithms)
    try:
        ident = Identity.of_path(p) if cache is not None and p.is_file() else None
    except OSError:
        ident = None
    if cache is None or ident is None:
        return hash_file(p, algorithms=names, progress=progress), False
    known = cache.sha256(ident)
    keys = [k for k in (known, ident.key) if k]
    for key in keys:
        doc = cache.get(CACHE_KIND, key, __version__)
        if doc is not None and all(n in doc.get("hashes", {}) for n in names):
            return HashResult(
                path=p,
                size=int(doc["size"]),
                safetensors=bool(doc["safetensors"]),
                hashes={n: doc["hashes"][n] for n in names},
                notes={n: v for n, v in doc.get("notes", {}).items() if n in names},
            ), True
    result = hash_file(p, algorithms=names, progress=progress)
    try:
        unchanged = Identity.of_path(p) == ident
    except OSError:
        unchanged = False
    if unchanged:
        sha = (result.hashes.get("sha256") or "").lower()
        if sha:
            cache.put_sha256(ident, sha, p)
        record = record_text(result.size, result.safetensors, result.hashes, result.notes)
        for key in dict.fromkeys(k for k in (sha or known, ident.key) if k):
            cache.put_text(CACHE_KIND, key, __version__, record, p)
    return result, False


def record_text(size: int, safetensors: bool, hashes: dict[str, Any], notes: dict[str, Any]) -> str:
    """A file's hashes as the cache stores them: HashResult's JSON without the path, encoded
    once, so a JSON line can be spliced from it."""
    doc = {"size": size, "safetensors": safetensors, "hashes": hashes, "notes": notes}
    return json.dumps(doc, ensure_ascii=True)


@functools.cache
def _layout(names: tuple[str, ...]) -> re.Pattern[str]:
    """A stored record in ``record_text``'s layout holding exactly ``names``, in order."""
    hashes = ", ".join(f'"{n}": (?:"[0-9A-F]*"|null)' for n in names)
    return re.compile(
        r'\{"size": [0-9]+, "safetensors": (?:true|false), "hashes": \{'
        + hashes
        + r'\}, "notes": \{.*\}\}',
        re.DOTALL,
    )


def cached_many(
    files: Sequence[tuple[str, os.stat_result | None]],
    cache: Cache | None,
    *,
    algorithms: Iterable[str] = tuple(ALGORITHMS),
) -> list[str | None]:
    """``hash_cached``'s cache hits for many files (path, its stat or None) at once.

    One query answers a few hundred files (``Cache.lookup_many``: by identity, else by the
    identity's recorded SHA-256). Each hit is a ``record_text`` holding exactly the requested
    hashes (as stored, undecoded, when it was stored so); None where this sdtool has not
    recorded every requested hash for exactly this file.
    """
    from sdtool import __version__
    from sdtool.cache import Identity

    names = parse_algorithms(algorithms)
    out: list[str | None] = [None] * len(files)
    if cache is None:
        return out
    layout = _layout(names)
    live = [(i, Identity.of(st)) for i, (_, st) in enumerate(files) if st is not None]
    answers = cache.lookup_many(CACHE_KIND, __version__, [d for _, d in live])
    for (i, _), (_, text) in zip(live, answers, strict=True):
        if text is None:
            continue
        if layout.fullmatch(text):
            out[i] = text
            continue
        try:  # stored for other hashes too, or in another layout: cut to these
            doc = json.loads(text)
            hashes, notes = doc["hashes"], doc.get("notes", {})
            if all(n in hashes for n in names):
                out[i] = record_text(
                    int(doc["size"]),
                    bool(doc["safetensors"]),
                    {n: hashes[n] for n in names},
                    {n: v for n, v in notes.items() if n in names},
                )
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not a record this sdtool wrote: hash the file again
    return out


def walk_files(paths: Iterable[Path]) -> list[tuple[Path | str, os.stat_result | None]]:
    """Each path as given, a folder as every file under it (recursively, in sorted path
    order, symlinked folders not followed), each with its stat (None: none could be had;
    the hash says why). Files found in folders are strings (no Path built for each); the
    stat comes from ``os.scandir``, so a cached rerun costs one system call per file."""
    out: list[tuple[Path | str, os.stat_result | None]] = []
    for f in paths:
        if is_url(f) or not os.path.isdir(f):
            try:
                st: os.stat_result | None = os.stat(f) if not is_url(f) else None
            except (OSError, ValueError):
                st = None
            out.append((f, st))
            continue
        top = str(f)
        found: list[tuple[list[str], str, os.stat_result]] = []
        _walk_sorted(top, "" if top == "." else top.rstrip("/") + "/", [], found)
        found.sort(key=lambda t: t[0])
        out.extend((p, st) for _, p, st in found)
    return out


def _walk_sorted(
    folder: str, prefix: str, parts: list[str], found: list[tuple[list[str], str, os.stat_result]]
) -> None:
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError:
        return
    for e in entries:
        try:
            if e.is_dir():
                if not e.is_symlink():
                    _walk_sorted(e.path, prefix + e.name + "/", [*parts, e.name], found)
                continue
            if not e.is_file():
                continue
            found.append(([*parts, e.name], prefix + e.name, e.stat()))
        except OSError:
            continue


def _hash_open(
    p: Path,
    f: BinaryIO,
    names: tuple[str, ...],
    progress: Progress | None,
    chunk: int,
    *,
    size: int | None = None,
) -> HashResult:
    if size is None:
        size = os.fstat(f.fileno()).st_size
    head = f.read(HEAD)
    notes: dict[str, str] = {}
    is_st = sniff_bytes(head, size) is Format.SAFETENSORS
    ranges: dict[str, tuple[int, int]] = {}
    for name in names:
        key = ALGORITHMS[name].hasher
        if key == "autov3":
            start, why = _autov3_start(f, head, size)
            if why:
                notes["autov3"] = why
            if start is None:
                continue
            ranges[key] = (start, size)
        elif key == "autov1":
            ranges[key] = AUTOV1_RANGE
            if size < CIVITAI_AUTOV1_MIN:
                notes["autov1"] = "Civitai shows no AutoV1 for files under 2 MiB"
        else:
            ranges[key] = (0, size)

    digests = _read_and_hash(f, size, ranges, progress, chunk)
    if digests is None:
        raise CorruptFile("the file changed size while it was being hashed; try again", path=p)
    hashes: dict[str, str | None] = {}
    for name in names:
        algo = ALGORITHMS[name]
        hx = digests.get(algo.hasher)
        hashes[name] = None if hx is None else hx[: algo.digits].upper()
    return HashResult(p, size, is_st, hashes, notes)


def _read_and_hash(
    f: BinaryIO,
    size: int,
    ranges: dict[str, tuple[int, int]],
    progress: Progress | None,
    chunk: int,
) -> dict[str, str] | None:
    """Read ``f`` once; feed each hasher its range; hex digests by hasher key (None: resized)."""
    with contextlib.suppress(AttributeError, OSError):  # a hint; not every OS has it
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    done: queue.Queue[int] = queue.Queue()
    feeders = {k: _Feeder(_HASHERS[k](), s, e, done) for k, (s, e) in ranges.items()}
    for t in feeders.values():
        t.start()
    chunk = max(1, min(chunk, size + 1))  # a small file needs one small buffer (+1: see EOF)
    count = min(BUFFERS, size // chunk + 1)
    # page-aligned, as every read starts at a multiple of ``chunk`` (see sdtool.aligned)
    bufs = [PageBuffer(chunk).at(0, chunk)[1] for _ in range(count)]
    pending = [0] * count  # hashers still reading each buffer
    free = list(range(count))
    pos = 0
    f.seek(0)
    try:
        while True:
            while not free:  # wait for the slowest hasher to let a buffer go
                idx = done.get()
                pending[idx] -= 1
                if pending[idx] == 0:
                    free.append(idx)
            idx = free.pop()
            n = f.readinto(bufs[idx])  # type: ignore[attr-defined]
            if not n:
                break
            view = memoryview(bufs[idx])
            for t in feeders.values():
                lo, hi = max(t.start_at, pos), min(t.end_at, pos + n)
                if lo < hi:
                    pending[idx] += 1
                    t.inbox.put((idx, view[lo - pos : hi - pos]))
            view.release()
            pos += n
            if pending[idx] == 0:
                free.append(idx)
            if progress is not None:
                progress(pos, size)
    finally:
        for t in feeders.values():
            t.inbox.put(None)
        for t in feeders.values():
            t.join()
    for t in feeders.values():
        if t.error is not None:
            raise t.error
    if pos != size:
        return None
    return {k: t.hasher.hexdigest() for k, t in feeders.items()}
