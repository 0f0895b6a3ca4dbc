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


def identity_key(ident: Identity) -> str:
    return f"id:{ident.dev}:{ident.ino}:{ident.size}:{ident.mtime_ns}:{ident.ctime_ns}"


def report_from_json(doc: dict[str, Any]) -> FileReport:
    """The FileReport that ``FileReport.to_json`` described (for cached verdicts)."""
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
        errors=list(doc.get("errors", [])),
        notes=list(doc.get("notes", [])),
        scanned=bool(doc.get("scanned", True)),
        streams=int(doc.get("streams", 0)),
        size=int(doc.get("size", 0)),
    )


def scan_cached(
    path: Path,
    scan_one: Callable[[Path], FileReport],
    cache: Cache | None,
    *,
    sha256: bool = False,
) -> CachedScan:
    """``scan_one(path)``, or its cached verdict when this content was scanned by this ruleset.

    Only complete verdicts are stored: a report with errors (a limit hit, an unreadable member)
    is scanned again next time, since the error may be the machine's and not the file's.
    """
    try:
        before = Identity.of_path(path)
    except OSError:
        return CachedScan(scan_one(path), None, False)
    version = ruleset_version()
    digest = cache.sha256(before) if cache is not None else None
    if digest is None and sha256:
        digest, _ = cached_sha256(cache, path, lambda: file_sha256(path))
    keys = [k for k in (digest, identity_key(before)) if k is not None]
    if cache is not None:
        for key in keys:
            hit = cache.get(KIND, key, version)
            if hit is not None:
                rep = report_from_json(hit)
                rep.path = str(path)  # the same content may sit under another name
                return CachedScan(rep, digest, True)
    rep = scan_one(path)
    if cache is not None and not rep.errors and rep.scanned:
        try:
            unchanged = Identity.of_path(path) == before
        except OSError:
            unchanged = False
        if unchanged:
            doc = rep.to_json()
            for key in keys:
                cache.put(KIND, key, version, doc)
    return CachedScan(rep, digest, False)
