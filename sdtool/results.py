"""The base of every result object: frozen data, one ``to_json`` for all.

A result is a frozen dataclass deriving from ``Result``; its ``to_json`` is its fields by name,
converted by ``jsonable`` (paths and enums as their strings, nested results and dataclasses as
objects, tuples as lists). What a document spells differently is said declaratively, never in a
per-class ``to_json``:

- a field JSON names differently: ``field(metadata=json_key("global"))``; one JSON leaves out:
  ``json_key(None)``; one written converted: ``json_key(as_=rounded)`` (``rounded``,
  ``head(n)``, ``rows(...)``, ``named(...)`` below, or ``len``); one written only when another
  attribute is true: ``json_key(when="listed")``; one whose object's keys are written in
  place of its own key: ``json_key(inline=True)``;
- ``JSON_SCHEMA``: a class's schema id, written first as ``"schema"``;
- ``JSON_KEYS``: when a document also holds computed values, its keys in order, each a field
  (spelled as its metadata says), a property, or a ``(key, attribute)`` pair, or a
  ``(key, attribute, converter)`` triple.

Schemas are documented in docs/<command>.md; the file a record is about is always ``path``.

``to_json`` is for people and tools, so it may cut (``head``), rename and compute. A cache
needs the object back: ``to_record`` is every field by its own name, nothing cut, and
``from_record(cls, record)`` rebuilds an equal object from it, guided by the fields' types
(tuples, int keys, nested results). The record is plain JSON data.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

_OMIT = object()


def json_key(
    name: str | object | None = _OMIT,
    *,
    as_: Callable[[Any], Any] | None = None,
    when: str | None = None,
    inline: bool = False,
) -> dict[str, Any]:
    """Field metadata: the field's JSON key (None: left out), a converter for its value, the
    attribute that must be true for the key to be written, and whether its object's keys are
    written in place of its own."""
    meta: dict[str, Any] = {}
    if name is not _OMIT:
        meta["json"] = name
    if as_ is not None:
        meta["json_as"] = as_
    if when is not None:
        meta["json_when"] = when
    if inline:
        meta["json_inline"] = True
    return meta


def rounded(value: float) -> float:
    """Seconds and the like, as JSON gives them: to the millisecond."""
    return round(value, 3)


def head(n: int) -> Callable[[Sequence[Any]], list[Any]]:
    """A converter keeping a long list's first ``n`` items (the count goes beside it)."""
    return lambda items: list(items[:n])


def rows(*names: str) -> Callable[[Iterable[Sequence[Any]]], list[dict[str, Any]]]:
    """A converter writing tuples as objects: ``rows("source", "target")`` makes
    ``[("a", "b")]`` ``[{"source": "a", "target": "b"}]``."""
    return lambda items: [dict(zip(names, item, strict=True)) for item in items]


def named(key: str) -> Callable[[Mapping[str, Any]], list[dict[str, Any]]]:
    """A converter writing a mapping of objects as a list, each with its name under ``key``:
    ``named("name")`` makes ``{"vae": bucket}`` ``[{"name": "vae", **bucket}]``."""
    return lambda mapping: [{key: k, **jsonable(v)} for k, v in mapping.items()]


#: types ``jsonable`` returns as they are, met by their exact type before any isinstance
#: check (most values of a document; an Enum deriving from str is not one of them)
_PLAIN = frozenset({str, int, float, bool, type(None)})


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (dicts keep their order; keys become strings)."""
    t = type(value)
    if t in _PLAIN:
        return value
    if t is dict:
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    if t is list or t is tuple:
        return [jsonable(v) for v in value]
    if isinstance(value, Result):
        return value.to_json()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "to_json"):
        return value.to_json()
    return str(value)


def to_record(value: Any) -> Any:
    """``value`` as plain JSON data that ``from_record`` turns back into an equal value:
    a result or dataclass as its every field by name (``compare=False`` fields too), nothing
    left out, cut or renamed."""
    t = type(value)
    if t in _PLAIN:  # the common cases first, by exact type (as ``jsonable``)
        return value
    if t is dict:
        return {str(k): to_record(v) for k, v in value.items()}
    if t is list or t is tuple:
        return [to_record(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _NAMES.get(t) or _names(t)
        return {n: to_record(getattr(value, n)) for n in names}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): to_record(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_record(v) for v in value]
    return value


#: each dataclass's field names (``to_record``: looked up once per class, not per object)
_NAMES: dict[type, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    _NAMES[cls] = names = tuple(f.name for f in dataclasses.fields(cls))
    return names


T = TypeVar("T")


@functools.cache
def _field_types(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def from_record(cls: type[T], record: Any) -> T:
    """The ``cls`` that ``to_record`` wrote as ``record`` (ValueError / TypeError / KeyError:
    a record of another shape)."""
    out: T = _decode(cls, record)
    return out


def _decode(tp: Any, value: Any) -> Any:
    """``value`` (plain JSON data) as the type ``tp`` says: the inverse of ``to_record``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))  # X | None only
        return _decode(inner, value)
    if origin is tuple:
        items = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        if len(items) != len(value):
            raise ValueError(f"{len(value)} items for {tp}")
        return tuple(_decode(t, v) for t, v in zip(items, value, strict=True))
    if origin is list:
        return [_decode(args[0], v) for v in value]
    if origin is dict:
        kt, vt = args
        return {_decode(kt, k): _decode(vt, v) for k, v in value.items()}
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{tp.__name__}: a record is an object")
        return tp(**{n: _decode(t, value[n]) for n, t in _field_types(tp) if n in value})
    if tp in (int, float) or (isinstance(tp, type) and issubclass(tp, Enum | Path)):
        return tp(value)
    if tp in (str, bool) and not isinstance(value, tp):
        raise TypeError(f"{value!r} is no {tp.__name__}")
    return value


#: how a result class writes its keys (``_plan``)
Plan = tuple[tuple[str, str, Any, str | None, bool], ...]
_PLANS: dict[type, Plan] = {}


def _plan(cls: type) -> Plan:
    """How ``cls.to_json`` writes each key: (key, attribute, converter or None, the attribute
    that must be true or None, inline), from its fields' metadata and ``JSON_KEYS``, worked
    out once per class rather than on every call (a report holds hundreds of results)."""
    assert dataclasses.is_dataclass(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    plan = []
    for entry in getattr(cls, "JSON_KEYS", ()) or tuple(fields):
        key, attr, *conv = entry if isinstance(entry, tuple) else (entry, entry)
        meta = fields[attr].metadata if attr in fields else {}
        if conv:
            meta = {**meta, "json_as": conv[0]}
        name = meta.get("json", key)
        if name is not None:
            inline = bool(meta.get("json_inline"))
            plan.append((name, attr, meta.get("json_as"), meta.get("json_when"), inline))
    _PLANS[cls] = out = tuple(plan)
    return out


#: one entry of ``Result.JSON_KEYS``
JsonKey = str | tuple[str, str] | tuple[str, str, Callable[[Any], Any]]


class Result:
    """Mixin for result dataclasses: ``to_json`` from the fields (see the module docstring)."""

    #: the document's schema id (``"sdtool.convert/3"``), written first as ``"schema"``
    JSON_SCHEMA: ClassVar[str | None] = None
    #: the document's keys in order (fields by name, properties, (key, attribute[, converter]));
    #: empty: every field
    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.JSON_SCHEMA is not None:
            out["schema"] = self.JSON_SCHEMA
        cls = type(self)
        for name, attr, conv, when, inline in _PLANS.get(cls) or _plan(cls):
            if when is not None and not getattr(self, when):
                continue
            value = getattr(self, attr)
            if conv is not None:
                value = conv(value)
            if inline:
                out.update(jsonable(value))
            else:
                out[name] = jsonable(value)
        return out

    def to_record(self) -> dict[str, Any]:
        """The lossless form (``sdtool.results.to_record``): ``from_record`` gives it back."""
        out: dict[str, Any] = to_record(self)
        return out

    @classmethod
    def from_record(cls: type[T], record: Any) -> T:
        """The object ``to_record`` wrote (a record of another shape raises ValueError,
        TypeError or KeyError)."""
        return from_record(cls, record)
