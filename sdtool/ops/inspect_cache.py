"""Inspect records through the result cache: an unchanged file is not opened again.

What ``sdtool inspect`` decides about a file (its header summary, its identity, the scan
verdicts of its pickle's globals) is a function of its bytes, its base name (identification
reads a prediction or an EMA hint from it) and the tables and rules that
``ruleset.identify_version`` hashes. A record is therefore stored as the scan verdicts are
(``Cache.lookup_many``: under the file's identity, and under its SHA-256 when one is recorded,
kind ``inspect``, version ``identify_version() + settings``) with the base name it was made
under, and trusted only for a file of that name whose identity is unchanged. The table view,
``--json``, ``--quiet`` and ``--jsonl`` share the records (the settings are the same).

The stored text is four lines, JSON data all (never code):

1. the body: the ``--json`` document's fields after ``path``, then ``size`` (``body_of``):
   the ``--jsonl`` line is spliced from it as it is, so a cached and a fresh line are the same
   bytes but the ``cached`` flag, and ``view_of`` gives the ``--json`` document back;
2. the base name, as a JSON string;
3. the identity's lossless record (``Identity.to_record``; ``null`` when there is none), from
   which ``identity_of`` rebuilds an equal ``Identity`` (``to_json``, in the body, cuts long
   lists and leaves the tensor ownership out), as a JSON string: ``RECORD`` then the record's
   JSON deflated and in base64 (its key lists and per-key ownership are ~260 KB for an SD 1.5
   checkpoint, ~20 KB so: every cached file's row, and every cached answer reads it);
4. what the other views add to the body: ``{"schema": the --json schema, "what": the table
   view's "What it is" lines (null: no identity)}``, so that a cached answer is printed
   without loading identification's tables.

This module loads no more than the lookup needs (the cache when it is used, the identity
class only when an identity is rebuilt): a cached answer never imports the readers, and
``--no-cache`` never imports sqlite3.

Not stored: a file that cannot be read (the error depends on the moment), one that changed
while it was read, standard input, a URL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii as _enc
from typing import TYPE_CHECKING, Any, NamedTuple

from sdtool.scan.ruleset import identify_version

if TYPE_CHECKING:
    from sdtool.cache import Cache, Identity
    from sdtool.identify.result import Identity as Identified

KIND = "inspect"


#: how line 3 holds the identity's record (a new layout is a new version: old rows unused)
RECORD = "zlib+base64:"


def settings_of(key: str | None, tensors: bool, filter: str | None) -> str:
    """The options a record depends on, appended to its version (after a ``|``), and the
    record's layout."""
    return "|" + json.dumps([key, tensors, filter], ensure_ascii=True) + "|" + RECORD


def body_of(doc: dict[str, Any]) -> str:
    """The stored body of a report's ``--json`` document (``InspectReport.to_json``): its
    fields without schema and path, then ``size`` (the file's), encoded once."""
    # a line has its own schema; the same bytes may sit under another path
    body = {k: v for k, v in doc.items() if k not in ("schema", "path")}
    body["size"] = doc["file_size"]
    return json.dumps(body, ensure_ascii=True, default=str)


def stored_of(
    body: str, name: str, identity: Identified | None, schema: str, what: list[str] | None
) -> str:
    """What the cache stores: the body, the base name, the identity's record, the views'
    additions (module doc)."""
    record = "null" if identity is None else _enc(_pack(identity.to_record()))
    views = json.dumps({"schema": schema, "what": what}, ensure_ascii=True)
    return f"{body}\n{_enc(name)}\n{record}\n{views}"


class Found(NamedTuple):
    """A lookup: the stored body (None: not cached) and what storing a fresh record needs."""

    body: str | None
    identity: Identity | None
    keys: tuple[str, ...] = ()  # where a fresh record is stored: SHA-256 (when known), identity
    text: str | None = None  # a hit's whole stored text (``view_of``)


def lookup_many(paths: Sequence[str], cache: Cache | None, settings: str) -> list[Found]:
    """Each file's cached body under this version and settings: one query per few hundred
    files; a file that cannot be stat'ed, or whose record was made under another base name,
    is not cached."""
    from sdtool.cache import Identity

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
        out[i] = Found(body, ident, keys, None if body is None else text)
    return out


def _body(text: str, name: str) -> str | None:
    """The body of a stored text made under ``name`` (None: another name, another layout)."""
    parts = text.split("\n", 3)
    if len(parts) != 4 or parts[1] != _enc(name) or not parts[3].startswith('{"schema": '):
        return None
    body = parts[0]
    return body if body.startswith('{"format": ') and body.endswith("}") else None


def view_of(found: Found, path: str) -> tuple[dict[str, Any], list[str] | None]:
    """A hit as the fresh report's views see it: its ``--json`` document under ``path`` and
    its "What it is" lines (ValueError, KeyError, TypeError: a record of another shape)."""
    assert found.body is not None and found.text is not None
    views = json.loads(found.text.split("\n", 3)[3])
    what = views["what"]
    if not (what is None or (isinstance(what, list) and all(isinstance(x, str) for x in what))):
        raise TypeError("the stored lines are not text")
    doc: dict[str, Any] = {"schema": str(views["schema"]), "path": path}
    doc.update(json.loads(found.body))
    del doc["size"]  # the body's own addition (body_of)
    return doc, what


def identity_of(text: str) -> Identified | None:
    """The ``Identity`` a stored text holds (None: none, or a record of another shape)."""
    from sdtool.identify.result import Identity as Identified

    parts = text.split("\n", 3)
    if len(parts) != 4 or parts[2] == "null":
        return None
    try:
        return Identified.from_record(_unpack(json.loads(parts[2])))
    except (KeyError, TypeError, ValueError):
        return None


def _pack(record: Any) -> str:
    import base64
    import zlib

    raw = json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return RECORD + base64.b64encode(zlib.compress(raw, 6)).decode("ascii")


def _unpack(text: Any) -> Any:
    """The record ``_pack`` stored (ValueError: not one)."""
    import base64
    import binascii
    import zlib

    if not isinstance(text, str) or not text.startswith(RECORD):
        raise ValueError("not a packed record")
    try:
        return json.loads(zlib.decompress(base64.b64decode(text[len(RECORD) :], validate=True)))
    except (binascii.Error, zlib.error) as e:
        raise ValueError(str(e)) from None


def store(
    path: str,
    cache: Cache | None,
    found: Found,
    body: str,
    identity: Identified | None,
    schema: str,
    what: list[str] | None,
    settings: str,
) -> None:
    """Record a fresh report (its body, identity, schema and "What it is" lines), unless the
    file changed while it was read."""
    from sdtool.cache import Identity

    if cache is None or found.identity is None:
        return
    try:
        if Identity.of(os.stat(path)) != found.identity:
            return
    except OSError:
        return
    text = stored_of(body, os.path.basename(path), identity, schema, what)
    version = identify_version() + settings
    for key in found.keys:
        cache.put_text(KIND, key, version, text, path)
