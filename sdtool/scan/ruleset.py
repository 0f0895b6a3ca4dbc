"""The ruleset version: one short hash naming everything a scan verdict depends on.

A verdict is a function of the file's bytes and of the scanner's code and tables (allowlist,
capability table, rules, container walkers, format readers, sniffing). Rather than keep a
hand-bumped number in step with those tables (easy to forget, and a stale verdict is a security
bug), the version is the SHA-256 of the source and data files of the packages that decide
verdicts. Any change to them, a refactor included, invalidates cached verdicts; nothing else
does. Computed once per process from files already on disk (about 2 ms and hashlib's import),
or, when none of those files changed since (the same size, mtime, ctime and inode, as the
result cache trusts a file's identity), read from a memo in the cache folder
(``ruleset-memo.json``): a rerun's start-up stats the sources instead of hashing them.

``identify_version`` does the same for what ``sdtool inspect`` decides about a file (its
identity: the signature tables in sdtool/data, the identify rules; its header summary; the
scan verdicts of its globals): a changed signature table invalidates cached identities, and
neither verdicts nor hashes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import sdtool

#: packages (relative to sdtool/) whose files decide a verdict
VERDICT_SOURCES = ("scan", "formats")
#: single modules outside those packages that do
VERDICT_MODULES = ("dtypes.py", "errors.py", "model.py", "vocab.py")
#: what an inspect record adds to a verdict's sources (its identity, header summary, JSON,
#: and the "What it is" lines it keeps for the table view)
IDENTIFY_SOURCES = ("identify", "data")
IDENTIFY_MODULES = ("cli/identity.py", "ops/inspect.py", "ops/inspect_cache.py", "results.py")
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


@functools.cache
def code_version() -> str:
    """As ``ruleset_version``, over every file of the package: what a cluster worker must
    share with its client (sdtool.cluster), so two installs of one release with different
    code (a development tree, a patched scanner) differ too."""
    return _version((".",), ())


def _version(packages: tuple[str, ...], modules: tuple[str, ...]) -> str:
    root = str(Path(sdtool.__file__).parent)
    files = _sources(root, packages, modules)
    # what the memo trusts: each file's name and identity (any edit changes mtime and ctime)
    stamp = ";".join(
        f"{rel}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_dev}:{st.st_ino}"
        for rel, st in files
    )
    name = f"{root}|{','.join(packages + modules)}"  # several installs share the memo
    memo = _memo()
    entry = memo.get(name)
    if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp:
        return str(entry[1])
    import hashlib  # only when the sources changed: its import costs a rerun ~4 ms

    h = hashlib.sha256()
    for rel, _ in files:
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    version = f"{sdtool.__version__}+{h.hexdigest()[:16]}"
    memo[name] = [stamp, version]
    _save_memo(memo)
    return version


def _sources(
    root: str, packages: tuple[str, ...], modules: tuple[str, ...]
) -> list[tuple[str, os.stat_result]]:
    """The hashed files, sorted by their path under ``root``, each with its stat."""
    found: dict[str, os.stat_result] = {}
    for m in modules:
        with contextlib.suppress(OSError):
            found[m] = os.stat(os.path.join(root, m))
    for pkg in packages:
        for top, dirs, names in os.walk(os.path.join(root, pkg)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(top, root).replace(os.sep, "/")
            for n in names:
                if os.path.splitext(n)[1] in _SUFFIXES:
                    with contextlib.suppress(OSError):
                        found[f"{rel}/{n}"] = os.stat(os.path.join(top, n))
    return sorted(found.items())


def _memo_path() -> Path:
    from sdtool.cache import default_dir

    return default_dir() / "ruleset-memo.json"


def _memo() -> dict[str, object]:
    try:
        with open(_memo_path(), encoding="utf-8") as f:
            memo = json.load(f)
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _save_memo(memo: dict[str, object]) -> None:
    """Write the memo whole (a temp file renamed over it): a reader never sees half of it;
    failing to write it only costs the next run the hashing."""
    path = _memo_path()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(memo, f)
        os.replace(tmp, path)
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
