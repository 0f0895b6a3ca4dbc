"""The key-set signatures, read once from ``sdtool/data/signatures.json.gz`` (no torch).

``tools/gen_signatures.py`` writes that file from ``../shared/reference/layouts`` and from
``sdtool/data/harvested.json.gz`` (key lists harvested from the diffusers / transformers classes by
``tools/harvest_layouts.py``). Which signature means what is in ``tables.COMPONENTS``.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import cache, cached_property
from itertools import filterfalse
from pathlib import Path

from sdtool.identify.tables import COMPONENTS, OPTIONAL_AT, ComponentMeta, Shape


@dataclass(frozen=True)
class Signature:
    """A component's expected keys (relative to its prefix) and shapes per architecture."""

    id: str
    keys: tuple[str, ...]
    optional: frozenset[str]
    raw_shapes: str  # JSON text: profile -> shapes in key order (parsed on first use)
    meta: ComponentMeta

    @cached_property
    def required(self) -> tuple[str, ...]:
        return tuple(filterfalse(self.optional.__contains__, self.keys))

    @cached_property
    def shapes(self) -> dict[str, dict[str, Shape]]:
        """profile (architecture) -> key -> shape, built on first use (most files need few)."""
        return {
            p: dict(zip(self.keys, map(tuple, s), strict=True))
            for p, s in json.loads(self.raw_shapes).items()
        }


@cache
def signatures() -> dict[str, Signature]:
    """The key-set signatures, loaded once from the package data."""
    # beside the package, read directly: importlib.resources costs more to import (tempfile,
    # zipfile readers) than the read itself, and sdtool is never run from a zip
    raw = (Path(__file__).parent.parent / "data" / "signatures.json.gz").read_bytes()
    data = json.loads(gzip.decompress(raw))["signatures"]
    out: dict[str, Signature] = {}
    for sid, d in data.items():
        keys = tuple(d["keys"])
        out[sid] = Signature(
            sid,
            keys,
            frozenset(keys[i] for i in d["optional"]),
            d["shapes"],
            COMPONENTS[sid],
        )
    return out


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
