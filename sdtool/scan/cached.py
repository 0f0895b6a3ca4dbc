"""Scan verdicts through the result cache: an unchanged file is not read again.

A verdict is stored under the ruleset version (``ruleset.ruleset_version``) and the file's
content key: its SHA-256 when one is known (computed now with ``sha256=True``, or earlier by
``sdtool hash`` / a hashing scan: identical files anywhere then share one verdict), else its
identity (device, inode, size, mtime, ctime: only this very file, unchanged, shares it). So a
plain scan never reads a whole multi-GB file just to key the cache, and a hub that wants the
hashes gets content-level sharing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtool.cache import Cache, Identity, cached_sha256
from sdtool.scan.report import FileReport, Finding
from sdtool.scan.ruleset import ruleset_version
from sdtool.vocab import Format

KIND = "scan"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class CachedScan:
    """One file's report with how it was obtained."""

    report: FileReport
    sha256: str | None  # hex, when computed or known
    cached: bool  # the verdict came from the cache


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the whole file, read in large chunks (hashlib releases the GIL)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def report_from_json(doc: dict[str, Any]) -> FileReport:
    """The FileReport that ``FileReport.to_json`` described (for cached verdicts).

    Only complete verdicts are stored (``store``): a document with errors raises ValueError
    (the file is scanned again), as its problems' kinds are not in the JSON.
    """
    if doc.get("errors"):
        raise ValueError("a cached verdict has no errors")
    findings = [
        Finding(
            severity=f["severity"],
            rule=f["rule"],
            message=f["message"],
            member=f.get("member"),
            stream=f.get("stream"),
            offset=f.get("offset"),
            global_name=f.get("global"),
            usage=f.get("usage"),
        )
        for f in doc.get("findings", [])
    ]
    return FileReport(
        path=doc["path"],
        format=Format(doc.get("format", "unknown")),
        findings=findings,
        notes=list(doc.get("notes", [])),
        scanned=bool(doc.get("scanned", True)),
        streams=int(doc.get("streams", 0)),
        size=int(doc.get("size", 0)),
        skipped=doc.get("skipped"),
    )


@dataclass(frozen=True)
class Lookup:
    """What a cache lookup found, and what storing the fresh verdict needs."""

    hit: FileReport | None
    sha256: str | None
    keys: tuple[str, ...]
    identity: Identity | None
    settings: str = ""


def lookup(path: Path, cache: Cache | None, *, sha256: bool = False, settings: str = "") -> Lookup:
    """The cached verdict for this file's content under the current ruleset, if any.

    ``settings`` names the scan options a verdict depends on (CRC mode, limits).
    """
    try:
        before = Identity.of_path(path)
    except OSError:
        return Lookup(None, None, (), None, settings)
    digest = cache.sha256(before) if cache is not None else None
    if digest is None and sha256:
        try:
            digest, _ = cached_sha256(cache, path, lambda: file_sha256(path))
        except OSError:
            digest = None
    keys = tuple(k for k in (digest, before.key) if k is not None)
    if cache is not None:
        version = ruleset_version() + settings
        for key in keys:
            doc = cache.get(KIND, key, version)
            if doc is not None:
                try:
                    rep = report_from_json(doc)
                except (KeyError, TypeError, ValueError):
                    continue  # a record from an older layout: scan again
                rep.path = str(path)  # the same content may sit under another name
                return Lookup(rep, digest, keys, before, settings)
    return Lookup(None, digest, keys, before, settings)


def store(path: Path, cache: Cache | None, found: Lookup, report: FileReport) -> None:
    """Record a fresh, complete verdict if the file did not change while it was scanned.

    Only complete verdicts are stored: a report with errors (a limit hit, an unreadable member)
    is scanned again next time, since the error may be the machine's and not the file's.
    """
    if cache is None or found.identity is None or report.problems or not report.scanned:
        return
    try:
        if Identity.of_path(path) != found.identity:
            return
    except OSError:
        return
    doc = report.to_json()
    version = ruleset_version() + found.settings
    for key in found.keys:
        cache.put(KIND, key, version, doc)


def scan_cached(
    path: Path,
    scan_one: Callable[[Path], FileReport],
    cache: Cache | None,
    *,
    sha256: bool = False,
) -> CachedScan:
    """``scan_one(path)``, or its cached verdict when this content was scanned by this ruleset."""
    found = lookup(path, cache, sha256=sha256)
    if found.hit is not None:
        return CachedScan(found.hit, found.sha256, True)
    rep = scan_one(path)
    store(path, cache, found, rep)
    return CachedScan(rep, found.sha256, False)
