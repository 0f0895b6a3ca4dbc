"""``dataclass`` for the classes on the start-up paths: the same class, three methods shared.

In Python 3.11 ``dataclasses.dataclass`` writes the source of every method it adds and
compiles it with ``exec``: ``__init__``, ``__repr__``, ``__eq__``, and for a frozen class
``__hash__``, ``__setattr__`` and ``__delattr__``. Parsing and compiling that text is most of
what a class costs to create (~2K instructions a character; ``sdtool inspect`` creates 34 classes
on its way, 182 ``exec`` calls). This ``dataclass`` lets ``dataclasses`` build ``__init__`` as
usual, and gives ``__repr__``, ``__eq__`` and ``__hash__`` as closures over the class's field
names instead: no source, no ``exec``. They answer exactly what the generated ones answer (same
field selection: ``repr``, ``compare``, ``hash``; same tuples compared and hashed; same text,
``...`` on recursion), are installed under the same rules (never over a method the class defines
itself; ``__hash__`` set, set to None or left as ``dataclasses`` decides from ``eq``, ``frozen``,
``unsafe_hash`` and an explicit ``__hash__``), and ``dataclasses.fields``, ``replace`` and
``asdict`` see an ordinary dataclass. The one visible difference is ``__dataclass_params__``,
which records ``repr=False, eq=False``.

The frozen guards (``__setattr__``, ``__delattr__``) are closures too: up to Python 3.12
``dataclasses`` gets them from its ``_frozen_get_del_attr(cls, fields, globals)``, which is
``_frozen_guards`` for the length of the call (the same tests, errors and fallback; everything
else, ``__dataclass_params__.frozen`` and the frozen-inheritance checks included, is
``dataclasses``' own). Elsewhere ``dataclasses`` compiles them as usual.

Type checkers see ``dataclasses.dataclass`` itself.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from operator import attrgetter
from reprlib import recursive_repr
from typing import TYPE_CHECKING, Any

__all__ = ["dataclass"]

if TYPE_CHECKING:
    from dataclasses import dataclass as dataclass
else:

    def dataclass(cls: type | None = None, /, **options: Any) -> Any:
        """``dataclasses.dataclass`` with ``__repr__``, ``__eq__`` and ``__hash__`` not compiled
        from source (see the module's docstring); same arguments."""

        def wrap(cls: type) -> type:
            return _shared_methods(cls, **options)

        return wrap if cls is None else wrap(cls)


def _shared_methods(
    cls: type,
    *,
    repr: bool = True,
    eq: bool = True,
    frozen: bool = False,
    unsafe_hash: bool = False,
    **options: Any,
) -> type:
    """Run ``dataclasses`` without its repr and eq, then install the shared ones under its rules."""
    # What dataclasses reads before it adds anything (its hash-action table's inputs).
    own = cls.__dict__
    class_hash = own.get("__hash__", dataclasses.MISSING)
    has_explicit_hash = not (
        class_hash is dataclasses.MISSING or (class_hash is None and "__eq__" in own)
    )
    defines_repr = "__repr__" in own
    defines_eq = "__eq__" in own
    generate = getattr(dataclasses, _GUARDS) if frozen and _SHARE_FROZEN else None
    try:
        if generate is not None:
            setattr(dataclasses, _GUARDS, _frozen_guards)
        cls = dataclasses.dataclass(
            cls, repr=False, eq=False, frozen=frozen, unsafe_hash=unsafe_hash, **options
        )
    finally:
        if generate is not None:
            setattr(dataclasses, _GUARDS, generate)
    fields = dataclasses.fields(cls)
    if repr and not defines_repr:
        cls.__repr__ = _method(cls, _repr_fn(tuple(f.name for f in fields if f.repr)))  # type: ignore[method-assign]
    if eq and not defines_eq:
        cls.__eq__ = _method(cls, _eq_fn(_getter(tuple(f.name for f in fields if f.compare))))  # type: ignore[method-assign]
    # dataclasses' _hash_action table, for the cases its eq=False call above did not decide.
    if eq and not unsafe_hash and not has_explicit_hash:
        hashed = _getter(tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash)))
        cls.__hash__ = _method(cls, _hash_fn(hashed)) if frozen else None  # type: ignore[assignment,method-assign]
    return cls


def _method(cls: type, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` named as the class's own method (as ``dataclasses`` names what it adds)."""
    fn.__qualname__ = f"{cls.__qualname__}.{fn.__name__}"
    return fn


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """The tuple of these attributes (what the generated methods build: ``(self.a,self.b,)``)."""
    if len(names) >= 2:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda self: (one(self),)
    return lambda self: ()


def _repr_fn(names: tuple[str, ...]) -> Callable[[Any], str]:
    @recursive_repr()
    def __repr__(self: Any) -> str:
        return (
            self.__class__.__qualname__
            + "("
            + ", ".join([f"{name}={getattr(self, name)!r}" for name in names])
            + ")"
        )

    return __repr__


def _eq_fn(key: Callable[[Any], tuple[Any, ...]]) -> Callable[[Any, Any], Any]:
    def __eq__(self: Any, other: Any) -> Any:
        if other.__class__ is self.__class__:
            return key(self) == key(other)
        return NotImplemented

    return __eq__


def _hash_fn(key: Callable[[Any], tuple[Any, ...]]) -> Callable[[Any], int]:
    def __hash__(self: Any) -> int:
        return hash(key(self))

    return __hash__


#: dataclasses' generator of the frozen guards, taking (cls, fields, globals) up to 3.12
_GUARDS = "_frozen_get_del_attr"
_SHARE_FROZEN = sys.version_info < (3, 13) and hasattr(dataclasses, _GUARDS)


def _frozen_guards(
    cls: Any, fields: list[dataclasses.Field[Any]], globals: dict[str, Any]
) -> tuple[Callable[..., None], Callable[..., None]]:
    """What ``dataclasses._frozen_get_del_attr`` returns, as closures over the field names:
    the same tests (the class itself, or a field name), the same error, the same fallback."""
    names = tuple(f.name for f in fields)
    error = dataclasses.FrozenInstanceError

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in names:
            raise error(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in names:
            raise error(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)

    return _method(cls, __setattr__), _method(cls, __delattr__)
