"""The key-set signatures, read once from ``sdtool/data/signatures.json.gz`` (no torch).

``tools/gen_signatures.py`` writes that file from ``../shared/reference/layouts`` and from
``sdtool/data/harvested.json.gz`` (key lists harvested from the diffusers / transformers classes by
``tools/harvest_layouts.py``). Which signature means what is in ``tables.COMPONENTS``.

Unpacking it (gunzip and JSON of 2.7 MB) cost more than the rest of identifying a file, on every
run, so the first run keeps the same tables, in the shipped order, as one marshal file of plain
tuples and strings in the user's cache folder (``compact_path``), named and stamped by the
shipped file's CRC-32 and length: later runs read that, and a changed package file, a
different Python or a damaged cache file only make one run unpack the shipped file again.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import sys
import zlib
from functools import cache, cached_property
from itertools import filterfalse
from pathlib import Path

from sdtool.identify.tables import COMPONENTS, OPTIONAL_AT, ComponentMeta, Shape
from sdtool.records import dataclass

#: package data, beside the package, read directly: importlib.resources costs more to import
#: (tempfile, zipfile readers) than the read itself, and sdtool is never run from a zip
DATA = Path(__file__).parent.parent / "data" / "signatures.json.gz"
#: the compact form's layout; a new one is a new file name (old ones are left, a few MB)
COMPACT_FORMAT = 1

#: per signature, in the shipped order: (id, keys, optional key numbers, marshalled shapes)
Compact = tuple[tuple[str, tuple[str, ...], tuple[int, ...], bytes], ...]


@dataclass(frozen=True)
class Signature:
    """A component's expected keys (relative to its prefix) and shapes per architecture."""

    id: str
    keys: tuple[str, ...]
    optional: frozenset[str]
    raw_shapes: bytes  # marshal: profile -> shapes in key order (unpacked on first use)
    meta: ComponentMeta

    @cached_property
    def required(self) -> tuple[str, ...]:
        return tuple(filterfalse(self.optional.__contains__, self.keys))

    @cached_property
    def shape_lists(self) -> dict[str, tuple[Shape, ...]]:
        """profile (architecture) -> shapes in key order, unpacked on first use."""
        return marshal.loads(self.raw_shapes)

    @cached_property
    def shapes(self) -> dict[str, dict[str, Shape]]:
        """profile (architecture) -> key -> shape, built on first use (most files need few)."""
        return {p: dict(zip(self.keys, s, strict=True)) for p, s in self.shape_lists.items()}


@cache
def signatures() -> dict[str, Signature]:
    """The key-set signatures, loaded once from the package data (or its compact copy)."""
    return {
        sid: Signature(
            sid, keys, frozenset(map(keys.__getitem__, optional)), shapes, COMPONENTS[sid]
        )
        for sid, keys, optional, shapes in _compact()
    }


def compact_path(raw: bytes) -> Path:
    """Where the compact copy of the shipped ``raw`` bytes lives: the result cache's folder
    (``$SDTOOL_CACHE_DIR``, ``$XDG_CACHE_HOME/sdtool``, ``~/.cache/sdtool``; sdtool.cache's
    rule, not imported: it loads sqlite3), one name per content, format and Python."""
    folder = os.environ.get("SDTOOL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdtool"
    )
    tag = sys.implementation.cache_tag
    return Path(
        folder, f"signatures-{zlib.crc32(raw):08x}-{len(raw)}-{COMPACT_FORMAT}-{tag}.marshal"
    )


def _compact() -> Compact:
    """The tables from the compact copy when it is this data's, else unpacked (and kept)."""
    raw = DATA.read_bytes()
    stamp = (COMPACT_FORMAT, zlib.crc32(raw), len(raw))
    path = compact_path(raw)
    try:
        found = marshal.loads(_private_bytes(path))
        if type(found) is tuple and len(found) == 2 and found[0] == stamp and _laid_out(found[1]):
            return found[1]
    except (OSError, EOFError, ValueError, TypeError):
        pass  # absent, unreadable, damaged or not private: unpacked again below
    tables = unpack(raw)
    _keep(path, marshal.dumps((stamp, tables)))
    return tables


def _private_bytes(path: Path) -> bytes:
    """The bytes of ``path`` if only this user could have written it (the file and its folder
    owned by us, neither writable by group or others, as ssh checks its files), else OSError.

    marshal is not hardened against hostile bytes (a crafted file can crash the interpreter),
    so a copy in a folder others can write (a shared or restored CI cache) is not read."""
    with open(path, "rb") as f:
        if hasattr(os, "geteuid"):  # POSIX; elsewhere the folder's ACLs decide
            me = os.geteuid()
            for st in (os.fstat(f.fileno()), os.stat(path.parent)):
                if st.st_uid != me or st.st_mode & 0o022:
                    raise PermissionError(f"{path}: not private to this user")
        return f.read()


def _laid_out(tables: object) -> bool:
    """``Compact``'s layout down to each signature's fields (not every key: that costs more
    than it guards; the stamp and marshal's own checks answer for the rest)."""
    return type(tables) is tuple and all(
        type(t) is tuple
        and len(t) == 4
        and (type(t[0]), type(t[1]), type(t[2]), type(t[3])) == (str, tuple, tuple, bytes)
        and t[0] in COMPONENTS
        for t in tables
    )


def unpack(raw: bytes) -> Compact:
    """The shipped gzip'd JSON as the compact tables (what ``_compact`` keeps)."""
    import gzip
    import json

    out = []
    for sid, d in json.loads(gzip.decompress(raw))["signatures"].items():
        shapes = {p: tuple(map(tuple, s)) for p, s in json.loads(d["shapes"]).items()}
        out.append((sid, tuple(d["keys"]), tuple(d["optional"]), marshal.dumps(shapes)))
    return tuple(out)


def _keep(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole (a temp name, then a rename), or not at all: a cache
    folder that cannot be written only costs later runs the unpacking."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private: _private_bytes
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@cache
def optional_at(sid: str, prefix: str) -> frozenset[str]:
    starts = OPTIONAL_AT.get((sid, prefix), ())
    if not starts:
        return frozenset()
    return frozenset(k for k in signatures()[sid].keys if k.startswith(starts))


@cache
def component_index() -> dict[str, list[tuple[str, bool]]]:
    """relative key -> [(signature id, via alias)]: how any file key is traced to components.

    The whole index (50,000 keys); a file needs only ``index_for`` its own keys' tails."""
    index: dict[str, list[tuple[str, bool]]] = {}
    for sid, sig in signatures().items():
        for key in sig.keys:
            index.setdefault(key, []).append((sid, False))
            for old, new in sig.meta.aliases:
                if key.startswith(old):
                    index.setdefault(new + key[len(old) :], []).append((sid, True))
    return index


def index_for(tails: set[str]) -> dict[str, list[tuple[str, bool]]]:
    """``component_index()`` cut down to the relative keys in ``tails``: the same lists, in the
    same order, without building the whole index (a file has some thousand tails; the index,
    50,000 keys, took more time to build than the rest of identification).

    A signature's keys are distinct (tests/test_identify.py), so a signature adds one
    ``(id, False)`` per key in ``tails``: a set intersection, in C. Aliased keys (one signature)
    go the long way, in key order, as ``component_index`` does."""
    index: dict[str, list[tuple[str, bool]]] = {}
    for sid, sig in signatures().items():
        if sig.meta.aliases:
            for key in sig.keys:
                if key in tails:
                    index.setdefault(key, []).append((sid, False))
                for old, new in sig.meta.aliases:
                    if key.startswith(old) and (alias := new + key[len(old) :]) in tails:
                        index.setdefault(alias, []).append((sid, True))
            continue
        entry = (sid, False)
        for key in tails.intersection(sig.keys):
            index.setdefault(key, []).append(entry)
    return index
