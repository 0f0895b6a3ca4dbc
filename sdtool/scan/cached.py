"""Scan verdicts through the result cache: an unchanged file is not read again.

A verdict is stored under the ruleset version (``ruleset.ruleset_version``) and the file's
content key: its SHA-256 when one is known (computed now with ``sha256=True``, or earlier by
``sdtool hash`` / a hashing scan: identical files anywhere then share one verdict), else its
identity (device, inode, size, mtime, ctime: only this very file, unchanged, shares it). So a
plain scan never reads a whole multi-GB file just to key the cache, and a hub that wants the
hashes gets content-level sharing.

What is stored is what the bytes and the ruleset decide (``storable``), a "could not scan"
included when its every problem is ``ProblemKind.reproducible`` (truncated, corrupt, over a
content limit, unsupported): scanning the same bytes again gives it again. Never stored: what
depends on the machine or the moment (a missing or unreadable file, an I/O error, time or
memory running out, a killed worker, a crashed rule, a failed C-unpickler cross-check) or on
other files, beyond what ``FileReport.depends`` records (``FileReport.self_contained``).
A joblib pickle's verdict depends on the side files ``joblib.load`` reads beside it: it is
stored with their identities (or their absence) and trusted only while they are unchanged.

A stored text is the report's JSON after ``path`` (``body_of``), followed, for a report with
problems or side files, by a newline and ``[problems' [kind, member] pairs, side files' [name,
identity]]`` as JSON (the body, encoded with ``ensure_ascii``, holds no raw newline): a JSON
line is spliced from the body alone.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from sdtool.cache import Cache, Identity, cached_sha256, file_sha256
from sdtool.scan.report import FileReport, Finding, Problem, ProblemKind
from sdtool.scan.ruleset import ruleset_version
from sdtool.vocab import Format, Verdict

KIND = "scan"


@dataclass(frozen=True)
class CachedScan:
    """One file's report with how it was obtained."""

    report: FileReport
    sha256: str | None  # hex, when computed or known
    cached: bool  # the verdict came from the cache


def report_from_json(
    doc: dict[str, Any], path: str | None = None, kinds: list[Any] | None = None
) -> FileReport:
    """The FileReport that ``FileReport.to_json`` described (for cached verdicts); ``path``
    when the document does not name it (a stored body); ``kinds``: its problems' ``[kind,
    member]`` pairs, which the JSON does not hold.

    A document with errors but no kinds for them, or kinds that are not reproducible, raises
    ValueError (the file is scanned again).
    """
    errors = doc.get("errors") or []
    kinds = kinds or []
    if len(kinds) != len(errors):
        raise ValueError("a cached verdict's errors need their kinds")
    problems = [
        Problem(ProblemKind(k), str(msg), m) for (k, m), msg in zip(kinds, errors, strict=True)
    ]
    if not all(p.kind.reproducible for p in problems):
        raise ValueError("a cached verdict holds only reproducible problems")
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
        path=doc["path"] if path is None else path,
        format=Format(doc.get("format", "unknown")),
        findings=tuple(findings),
        problems=tuple(problems),
        notes=tuple(doc.get("notes", [])),
        scanned=bool(doc.get("scanned", True)),
        streams=int(doc.get("streams", 0)),
        size=int(doc.get("size", 0)),
        skipped=doc.get("skipped"),
    )


def body_of(report: FileReport) -> str:
    """The report's ``to_json`` fields after ``path``, encoded once: what the cache stores and
    what a JSON line carries between the path and the batch's own fields (a line is spliced
    from it, never decoded and encoded again)."""
    doc = report.to_json()
    del doc["path"]  # the same content may sit under another name
    return json.dumps(doc, ensure_ascii=True)


def storable(report: FileReport) -> bool:
    """Whether the bytes and the ruleset alone decide this report (see the module's doc)."""
    return report.self_contained and all(p.kind.reproducible for p in report.problems)


def stored_of(report: FileReport) -> str:
    """What the cache stores for a ``storable`` report: its body, then (when it has problems
    or dependencies) a newline and ``[problems, depends]``: the problems' ``[kind, member]``
    pairs, the side files' ``[name, identity or null]``."""
    body = body_of(report)
    if not report.problems and not report.depends:
        return body
    problems = [[p.kind.value, p.member] for p in report.problems]
    depends = [[name, ident and list(ident)] for name, ident in report.depends]
    return body + "\n" + json.dumps([problems, depends], ensure_ascii=True)


def _unchanged(path: str, depends: list[Any]) -> bool:
    """Whether each side file beside ``path`` is as it was when the verdict was made."""
    base = Path(path).parent
    for name, ident in depends:
        try:
            st = os.stat(base / str(name))
            now: list[int] | None = list(Identity.of(st))
        except OSError:
            now = None
        if now != ident:
            return False
    return True


#: a body this module wrote begins with format, size and verdict (``FileReport.to_json``'s
#: order), so they are read without decoding the rest
_HEAD = re.compile(r'\{"format": "([a-z0-9-]+)", "size": ([0-9]+), "verdict": "([a-z_]+)", ')
_VERDICTS = {v.value: v for v in Verdict}


def _complete(text: str) -> Verdict | None:
    """The verdict of a stored complete verdict (no problems, no side files), checked by its
    head and keys without decoding it; None for any other text."""
    m = _HEAD.match(text)
    # the quoted keys cannot occur inside a JSON string (its quotes are escaped there)
    if (
        m is None
        or ', "scanned": true, ' not in text
        or '"errors": [], "notes": [' not in text
        or text[-1] != "}"  # a text with a tail ends with its list, "]"
    ):
        return None
    return _VERDICTS.get(m.group(3))


def parse_body(text: str, path: str) -> tuple[Verdict, str, FileReport | None] | None:
    """(verdict, body, report) of a stored text (``stored_of``): a complete verdict's is
    checked by its head and returned undecoded (report None); one with problems is decoded
    (report: it, under ``path``); one of another layout is decoded and encoded again. None
    when it is nothing ``store`` would have stored (then the file is scanned again)."""
    v = _complete(text)
    if v is not None:
        return v, text, None
    body, _, tail = text.partition("\n")
    try:
        kinds, depends = json.loads(tail) if tail else (None, [])
        if depends and not _unchanged(path, depends):
            return None  # a side file changed: scan again
        rep = report_from_json(json.loads(body), path, kinds)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not rep.scanned and not rep.problems:  # never stored so: not a verdict to trust
        return None
    again = body_of(rep)
    return rep.verdict, again, rep if rep.problems else None


def head_of(body: str) -> tuple[str, int] | None:
    """(format, size) from the head of a stored body, undecoded (None: not this layout)."""
    m = _HEAD.match(body)
    return None if m is None else (m.group(1), int(m.group(2)))


def report_from_body(body: str, path: str) -> FileReport:
    """The FileReport a stored body describes, under ``path``."""
    return report_from_json(json.loads(body), path)


class Lookup(NamedTuple):
    """What a cache lookup found, and what storing the fresh verdict needs."""

    hit: str | None  # the stored body (``body_of``) of this content's verdict, undecoded
    sha256: str | None
    identity: Identity | None  # of a miss (to store its verdict); None for a hit
    settings: str = ""
    verdict: Verdict | None = None  # the hit's
    report: FileReport | None = None  # the hit decoded, when it has problems (to show them)

    @property
    def keys(self) -> tuple[str, ...]:
        """Where the verdict is stored: its SHA-256 (when known) and its identity."""
        ident = self.identity
        return tuple(k for k in (self.sha256, ident and ident.key) if k)


_new = tuple.__new__  # a NamedTuple without its Python __new__ (one per file of a rerun)


def lookup_many(
    targets: Sequence[tuple[str, os.stat_result | None] | tuple[str, os.stat_result | None, str]],
    cache: Cache | None,
    *,
    sha256: bool = False,
    settings: str = "",
) -> list[Lookup]:
    """The cached verdicts of many files (path, its stat or None, ...) under this ruleset.

    One query answers a few hundred files (``Cache.lookup_many``): each file's verdict by its
    identity, else by its recorded SHA-256. ``sha256``: a file whose SHA-256 is not recorded
    is read and hashed now (its verdict then looked up by that hash). ``settings`` names the
    scan options a verdict depends on (CRC mode, limits).
    """
    version = ruleset_version() + settings
    out = [Lookup(None, None, None, settings)] * len(targets)
    live = [i for i, t in enumerate(targets) if t[1] is not None]
    stats: list[os.stat_result] = [targets[i][1] for i in live]  # type: ignore[misc]
    answers: Sequence[tuple[str | None, str | None]] = (
        cache.lookup_stats(KIND, version, stats)
        if cache is not None
        else [(None, None)] * len(live)
    )
    for i, st, (digest, text) in zip(live, stats, answers, strict=True):
        if text is not None and (digest is not None or not sha256):
            v = _complete(text)  # the common hit (a rerun: every file), undecoded
            if v is not None:  # a hit stores nothing: no identity needed
                out[i] = _new(Lookup, (text, digest, None, settings, v, None))
                continue
        path = targets[i][0]
        ident = Identity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if digest is None and sha256:  # asked for: hashed once, even for a verdict by identity
            try:
                digest, _ = cached_sha256(cache, path, lambda p=path: file_sha256(Path(p)))
            except OSError:
                digest = None
            if cache is not None and digest is not None and text is None:
                text = cache.get_text(KIND, digest, version)
        parsed = None if text is None else parse_body(text, path)
        if parsed is None:
            out[i] = Lookup(None, digest, ident, settings)
        else:
            out[i] = Lookup(parsed[1], digest, ident, settings, parsed[0], parsed[2])
    return out


def lookup(path: Path, cache: Cache | None, *, sha256: bool = False, settings: str = "") -> Lookup:
    """The cached verdict for this file's content under the current ruleset, if any."""
    try:
        st: os.stat_result | None = os.stat(path)
    except OSError:
        st = None
    return lookup_many([(str(path), st)], cache, sha256=sha256, settings=settings)[0]


def store(path: Path | str, cache: Cache | None, found: Lookup, report: FileReport) -> None:
    """Record a fresh verdict if the bytes decide it (``storable``) and the file did not
    change while it was scanned. A "could not scan" that the machine caused (unreadable, out
    of time or memory, a crash) is not stored: the next run scans the file again.
    """
    if cache is None or found.identity is None or not storable(report):
        return
    try:
        if Identity.of_path(path) != found.identity:
            return
    except OSError:
        return
    text = stored_of(report)
    version = ruleset_version() + found.settings
    for key in found.keys:
        cache.put_text(KIND, key, version, text, path)


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
        rep = found.report or report_from_body(found.hit, str(path))
        return CachedScan(replace(rep, cached=True, sha256=found.sha256), found.sha256, True)
    rep = scan_one(path)
    store(path, cache, found, rep)
    return CachedScan(rep, found.sha256, False)
