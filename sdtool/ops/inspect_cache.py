"""Inspect records through the result cache: an unchanged file is not opened again.

What ``sdtool inspect`` decides about a file (its header summary, its identity, the scan
verdicts of its pickle's globals) is a function of its bytes, its base name (identification
reads a prediction or an EMA hint from it) and the tables and rules that
``ruleset.identify_version`` hashes. A record is therefore stored as the scan verdicts are
(``Cache.lookup_many``: under the file's identity, and under its SHA-256 when one is recorded,
kind ``inspect``, version ``identify_version() + settings``) with the base name it was made
under, and trusted only for a file of that name whose identity is unchanged.

The stored text is three lines:

1. the body: the ``--jsonl`` line's fields after ``path`` (``body_of``), spliced into a line
   as it is, so a cached and a fresh line are the same bytes but the ``cached`` flag;
2. the base name, as a JSON string;
3. the identity's lossless record (``Identity.to_record``; ``null`` when there is none), from
   which ``identity_of`` rebuilds an equal ``Identity`` (``to_json``, in the body, cuts long
   lists and leaves the tensor ownership out).

Not stored: a file that cannot be read (the error depends on the moment), one that changed
while it was read, standard input, a URL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii as _enc
from typing import NamedTuple

from sdtool.cache import Cache, Identity
from sdtool.identify.result import Identity as Identified
from sdtool.ops.inspect import InspectReport
from sdtool.scan.ruleset import identify_version

KIND = "inspect"


def settings_of(key: str | None, tensors: bool, filter: str | None) -> str:
    """The options a record depends on, appended to its version (after a ``|``)."""
    return "|" + json.dumps([key, tensors, filter], ensure_ascii=True)


def body_of(report: InspectReport) -> str:
    """The ``--jsonl`` line's fields after ``path`` (``to_json`` without its schema and path,
    then ``size``), encoded once."""
    doc = report.to_json()
    del doc["schema"], doc["path"]  # the line's own schema; the same bytes may sit elsewhere
    doc["size"] = report.file_size
    return json.dumps(doc, ensure_ascii=True, default=str)


def stored_of(report: InspectReport, body: str, name: str) -> str:
    """What the cache stores: the body, the base name, the identity's record (module doc)."""
    ident = report.identity
    record = "null" if ident is None else json.dumps(ident.to_record(), ensure_ascii=True)
    return f"{body}\n{_enc(name)}\n{record}"


class Found(NamedTuple):
    """A lookup: the stored body (None: not cached) and what storing a fresh record needs."""

    body: str | None
    identity: Identity | None
    keys: tuple[str, ...] = ()  # where a fresh record is stored: SHA-256 (when known), identity


def lookup_many(paths: Sequence[str], cache: Cache | None, settings: str) -> list[Found]:
    """Each file's cached body under this version and settings: one query per few hundred
    files; a file that cannot be stat'ed, or whose record was made under another base name,
    is not cached."""
    out = [Found(None, None)] * len(paths)
    live: list[tuple[int, str, Identity]] = []
    for i, p in enumerate(paths):
        try:
            live.append((i, p, Identity.of(os.stat(p))))
        except OSError:
            continue
    if cache is None or not live:
        return out
    version = identify_version() + settings
    answers = cache.lookup_many(KIND, version, [d for _, _, d in live])
    for (i, path, ident), (digest, text) in zip(live, answers, strict=True):
        keys = tuple(k for k in (digest, ident.key) if k)
        body = None if text is None else _body(text, os.path.basename(path))
        out[i] = Found(body, ident, keys)
    return out


def _body(text: str, name: str) -> str | None:
    """The body of a stored text made under ``name`` (None: another name, another layout)."""
    parts = text.split("\n", 2)
    if len(parts) != 3 or parts[1] != _enc(name):
        return None
    body = parts[0]
    return body if body.startswith('{"format": ') and body.endswith("}") else None


def identity_of(text: str) -> Identified | None:
    """The ``Identity`` a stored text holds (None: none, or a record of another shape)."""
    parts = text.split("\n", 2)
    if len(parts) != 3 or parts[2] == "null":
        return None
    try:
        return Identified.from_record(json.loads(parts[2]))
    except (KeyError, TypeError, ValueError):
        return None


def store(
    path: str, cache: Cache | None, found: Found, report: InspectReport, body: str, settings: str
) -> None:
    """Record a fresh report, unless the file changed while it was read."""
    if cache is None or found.identity is None:
        return
    try:
        if Identity.of(os.stat(path)) != found.identity:
            return
    except OSError:
        return
    text = stored_of(report, body, os.path.basename(path))
    version = identify_version() + settings
    for key in found.keys:
        cache.put_text(KIND, key, version, text, path)
