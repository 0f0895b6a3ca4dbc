"""The ruleset version: one short hash naming everything a scan verdict depends on.

A verdict is a function of the file's bytes and of the scanner's code and tables (allowlist,
capability table, rules, container walkers, format readers, sniffing). Rather than keep a
hand-bumped number in step with those tables (easy to forget, and a stale verdict is a security
bug), the version is the SHA-256 of the source and data files of the packages that decide
verdicts. Any change to them, a refactor included, invalidates cached verdicts; nothing else
does. Computed once per process from files already on disk (about 1 ms).

``identify_version`` does the same for what ``sdtool inspect`` decides about a file (its
identity: the signature tables in sdtool/data, the identify rules; its header summary; the
scan verdicts of its globals): a changed signature table invalidates cached identities, and
neither verdicts nor hashes.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import sdtool

#: packages (relative to sdtool/) whose files decide a verdict
VERDICT_SOURCES = ("scan", "formats")
#: single modules outside those packages that do
VERDICT_MODULES = ("dtypes.py", "errors.py", "model.py", "vocab.py")
#: what an inspect record adds to a verdict's sources (its identity, header summary, JSON)
IDENTIFY_SOURCES = ("identify", "data")
IDENTIFY_MODULES = ("ops/inspect.py", "ops/inspect_cache.py", "results.py")
_SUFFIXES = (".py", ".json", ".gz", ".txt")


@functools.cache
def ruleset_version() -> str:
    """``sdtool <version>+<first 16 hex of the hash>``, e.g. ``0.1.0+3f2a9c0d1e2b4a5c``."""
    return _version(VERDICT_SOURCES, VERDICT_MODULES)


@functools.cache
def identify_version() -> str:
    """As ``ruleset_version``, over the verdict's sources and identification's (tables,
    rules, the inspect record): the version of cached ``inspect`` records."""
    return _version(VERDICT_SOURCES + IDENTIFY_SOURCES, VERDICT_MODULES + IDENTIFY_MODULES)


def _version(packages: tuple[str, ...], modules: tuple[str, ...]) -> str:
    root = Path(sdtool.__file__).parent
    files = [root / m for m in modules]
    for pkg in packages:
        files.extend(p for p in (root / pkg).rglob("*") if p.suffix in _SUFFIXES)
    h = hashlib.sha256()
    for p in sorted(set(files)):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(p.read_bytes())
            h.update(b"\0")
    return f"{sdtool.__version__}+{h.hexdigest()[:16]}"
