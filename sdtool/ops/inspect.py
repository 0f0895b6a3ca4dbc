"""``inspect``: what a model file holds, from its header and pickle alone (no tensor bytes).

The report is a plain result object; ``to_json`` is the documented, stable schema (docs/inspect.md).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar

from sdtool.formats.open import open_model
from sdtool.identify import Identity
from sdtool.identify import identify as identify_model
from sdtool.model import (
    ContainerFacts,
    GlobalUse,
    ModelFile,
    TensorInfo,
    tensor_leaves,
    to_plain,
)
from sdtool.records import dataclass
from sdtool.results import JsonKey, Result, json_key, named
from sdtool.scan.classify import classify_global

SCHEMA = "sdtool.inspect/3"


@dataclass(frozen=True)
class Bucket(Result):
    """Tensors, parameters and bytes of one group."""

    tensors: int = 0
    parameters: int = 0
    bytes: int = 0

    @classmethod
    def of(cls, infos: Iterable[TensorInfo]) -> Bucket:
        """The bucket of these tensors."""
        n = params = size = 0
        for t in infos:
            n, params, size = n + 1, params + t.numel, size + t.nbytes
        return cls(n, params, size)


def _buckets(groups: dict[str, list[TensorInfo]]) -> dict[str, Bucket]:
    """Each group's bucket, largest first."""
    out = {k: Bucket.of(v) for k, v in groups.items()}
    return dict(sorted(out.items(), key=lambda kv: -kv[1].bytes))


@dataclass(frozen=True)
class GlobalReport(Result):
    """A global the loader met: built by sdtool, or an inert stand-in, with scan's severity."""

    module: str
    name: str
    count: int
    loaded_as: str  # "builder" | "stand-in"
    severity: str  # "safe" | "suspicious" | "dangerous" (scan's classification)
    reason: str = ""

    @property
    def unusual(self) -> bool:
        return self.severity != "safe"


def _tensor_rows(tensors: list[tuple[str, TensorInfo]]) -> list[dict[str, Any]]:
    return [
        {"name": n, "dtype": t.type_code, "shape": list(t.shape), "bytes": t.nbytes}
        for n, t in tensors
    ]


@dataclass(frozen=True)
class InspectReport(Result):
    """What ``inspect`` found; ``to_json`` is the documented schema (docs/inspect.md)."""

    JSON_SCHEMA: ClassVar[str | None] = SCHEMA
    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = (
        "path", "format", "file_size", "totals", "dtypes", "components", "metadata", "extra",
        "other_tensors", "container", "globals", "identity", "filter", "tensors",
    )  # fmt: skip

    path: Path
    format: str
    file_size: int
    totals: Bucket
    dtypes: dict[str, Bucket]
    components: dict[str, Bucket] = field(metadata=json_key(as_=named("name")))
    metadata: dict[str, str]
    extra: Any
    other_tensors: Bucket
    container: ContainerFacts = field(metadata=json_key(as_=lambda c: to_plain(c.to_json())))
    globals: list[GlobalReport]
    #: the listing, when tensors were asked for (``listed``)
    tensors: list[tuple[str, TensorInfo]] = field(
        default_factory=list, metadata=json_key(as_=_tensor_rows, when="listed")
    )
    identity: Identity | None = None
    listed: bool = False  # tensors were asked for: ``tensors`` is the (maybe empty) listing
    #: the glob the listing was filtered with
    filter: str | None = field(default=None, metadata=json_key(when="listed"))


def _classify(g: GlobalUse) -> tuple[str, str]:
    """What ``sdtool scan`` makes of this global (the loader only stood it in or built it)."""
    severity, reason = classify_global(g.module, g.name)
    return str(severity), str(reason)


def inspect_model(
    model: ModelFile, *, tensors: bool = False, filter: str | None = None, identify: bool = True
) -> InspectReport:
    """Summarise an opened model (never reads tensor bytes)."""
    by_dtype: dict[str, list[TensorInfo]] = {}
    by_comp: dict[str, list[TensorInfo]] = {}
    identity = identify_model(model) if identify else None
    # one ownership of keys: identify's (so this table and "components: ..." agree)
    owners = identity.owners() if identity is not None else {}
    for name, t in model.tensors.items():
        by_dtype.setdefault(t.type_code, []).append(t)
        by_comp.setdefault(owners.get(name, "unknown"), []).append(t)
    listed = (
        [
            (n, t)
            for n, t in model.tensors.items()
            if filter is None or fnmatch.fnmatchcase(n, filter)
        ]
        if tensors
        else []
    )
    globals_ = [
        GlobalReport(
            g.module, g.name, g.count, "builder" if g.builder else "stand-in", *_classify(g)
        )
        for g in model.globals
    ]
    return InspectReport(
        path=model.path,
        format=model.format,
        file_size=model.file_size,
        totals=Bucket.of(model.tensors.values()),
        dtypes=_buckets(by_dtype),
        components=_buckets(by_comp),
        metadata=model.metadata,
        extra=to_plain(model.extra),
        other_tensors=Bucket.of(tensor_leaves(model.extra)),
        container=model.container,
        globals=globals_,
        tensors=listed,
        identity=identity,
        listed=tensors,
        filter=filter if tensors else None,
    )


def inspect(
    path: str | Path, *, key: str | None = None, tensors: bool = False, filter: str | None = None
) -> InspectReport:
    """Open ``path`` and summarise it.

    Example:
        >>> report = inspect("model.safetensors")
        >>> report.totals.parameters
    """
    with open_model(path, key=key) as model:
        return inspect_model(model, tensors=tensors, filter=filter)
