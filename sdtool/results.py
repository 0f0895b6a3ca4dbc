"""The base of every result object: frozen data, one ``to_json`` for all.

A result is a frozen dataclass deriving from ``Result``; its ``to_json`` is its fields by name,
converted by ``jsonable`` (paths and enums as their strings, nested results and dataclasses as
objects, tuples as lists). A field that JSON spells differently says so with
``field(metadata={"json": "name"})``; one that JSON leaves out with ``{"json": None}``.
Schemas are documented in docs/<command>.md; the file a record is about is always ``path``.
"""

from __future__ import annotations

import dataclasses
import os
from enum import Enum
from typing import Any


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (dicts keep their order; keys become strings)."""
    if isinstance(value, Result):
        return value.to_json()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "to_json"):
        return value.to_json()
    return str(value)


class Result:
    """Mixin for result dataclasses: ``to_json`` from the fields (see the module docstring)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        assert dataclasses.is_dataclass(self)
        for f in dataclasses.fields(self):
            name = f.metadata.get("json", f.name)
            if name is not None:
                out[name] = jsonable(getattr(self, f.name))
        return out
