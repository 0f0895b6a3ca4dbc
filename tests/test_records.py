"""sdtool.records.dataclass: the classes it makes behave as ``dataclasses.dataclass``'s, with
``__repr__``, ``__eq__`` and ``__hash__`` not compiled from source (a fast start, issue 10.4).

Each case defines the same class twice, once with each decorator, and compares what the two
answer: repr text, equality, hashes (or their absence), the frozen guards, fields, replace."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from sdtool import records


def both(
    body: Callable[[Callable[..., Any]], type],
) -> tuple[type, type]:
    """The class ``body`` defines, made by dataclasses and by sdtool.records."""
    return body(dataclasses.dataclass), body(records.dataclass)


def plain(dc: Callable[..., Any]) -> type:
    @dc
    class Point:
        x: int
        y: float = 1.5
        tags: tuple[str, ...] = ()

    return Point


def frozen(dc: Callable[..., Any]) -> type:
    @dc(frozen=True)
    class Row:
        name: str
        size: int = dataclasses.field(default=0, compare=False)
        note: str = dataclasses.field(default="", repr=False)
        weight: float = dataclasses.field(default=0.0, hash=False)

    return Row


def one_field(dc: Callable[..., Any]) -> type:
    @dc(frozen=True)
    class One:
        value: float

    return One


def no_fields(dc: Callable[..., Any]) -> type:
    @dc(frozen=True)
    class Empty:
        pass

    return Empty


def own_methods(dc: Callable[..., Any]) -> type:
    @dc(frozen=True)
    class Own:
        a: int

        def __repr__(self) -> str:
            return "own"

        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return 7

    return Own


def own_eq_only(dc: Callable[..., Any]) -> type:
    @dc(frozen=True)
    class OwnEq:
        a: int

        def __eq__(self, other: object) -> bool:
            return isinstance(other, OwnEq)

    return OwnEq


def unsafe(dc: Callable[..., Any]) -> type:
    @dc(unsafe_hash=True)
    class Unsafe:
        a: int
        b: list[int] = dataclasses.field(default_factory=list, hash=False)

    return Unsafe


def no_eq(dc: Callable[..., Any]) -> type:
    @dc(frozen=True, eq=False, repr=False)
    class Bare:
        a: int

    return Bare


def child(dc: Callable[..., Any]) -> type:
    @dc(frozen=True)
    class Base:
        a: int

    @dc(frozen=True)
    class Child(Base):
        b: str = "x"

    return Child


def subclassed(dc: Callable[..., Any]) -> type:
    @dc(frozen=True)
    class Frozen:
        a: int

    class Sub(Frozen):  # not a dataclass: the frozen guards let it set its own attributes
        pass

    return Sub


CASES: dict[str, tuple[Callable[[Callable[..., Any]], type], list[tuple[Any, ...]]]] = {
    "plain": (plain, [(1,), (1, 2.0, ("a",)), (1, float("nan"))]),
    "frozen": (frozen, [("a",), ("a", 3, "n", 2.0), ("b", 1)]),
    "one_field": (one_field, [(1.0,), (float("nan"),), (2,)]),
    "no_fields": (no_fields, [()]),
    "own_methods": (own_methods, [(1,), (2,)]),
    "own_eq_only": (own_eq_only, [(1,), (2,)]),
    "unsafe": (unsafe, [(1,), (1, [2])]),
    "no_eq": (no_eq, [(1,)]),
    "child": (child, [(1,), (1, "y")]),
    "subclassed": (subclassed, [(1,), (2,)]),
}


def answers(cls: type, args_list: list[tuple[Any, ...]]) -> list[Any]:
    """Everything observable about instances of cls built from args_list."""
    made = [cls(*args) for args in args_list]
    out: list[Any] = [
        [f.name for f in dataclasses.fields(cls)],
        cls.__hash__ is None,
        "__hash__" in cls.__dict__,
    ]
    for obj in made:
        shown = cls.__repr__ is not object.__repr__
        out.append((repr(obj), str(obj), f"{obj!r}") if shown else "object's repr")
        try:
            out.append(hash(obj) if cls.__hash__ is not object.__hash__ else "identity")
        except TypeError as e:
            out.append(f"TypeError: {e}")
        out.append([obj == other for other in made])
        out.append([obj == other for other in [cls(*args) for args in args_list]])
        out.append(obj == object())
        out.append(obj.__eq__(object()))
        out.append(dataclasses.asdict(obj))
        if dataclasses.fields(cls):
            name = dataclasses.fields(cls)[0].name
            try:
                setattr(obj, name, getattr(obj, name))
                out.append("set")
            except dataclasses.FrozenInstanceError as e:
                out.append(f"frozen: {e}")
            out.append(dataclasses.replace(obj) == obj)
        victim = cls(*args_list[made.index(obj)])  # changed below: not one of ``made``
        names = [*[f.name for f in dataclasses.fields(cls)][:1], "other"]  # "other": no field
        for name, attempt in itertools.product(names, ("set", "del")):
            try:
                if attempt == "set":
                    setattr(victim, name, 1)
                else:
                    delattr(victim, name)
                out.append(f"{attempt} {name}")
            except (dataclasses.FrozenInstanceError, AttributeError) as e:
                out.append(f"{type(e).__name__}: {e}")
    return out


@pytest.mark.parametrize("case", CASES)
def test_same_answers_as_dataclasses(case: str) -> None:
    body, args_list = CASES[case]
    reference, ours = both(body)
    assert answers(ours, args_list) == answers(reference, args_list)
    assert ours.__qualname__.split(".")[-1] == reference.__qualname__.split(".")[-1]


def test_repr_of_a_cycle_is_cut() -> None:
    @records.dataclass
    class Node:
        next: Any = None

    node = Node()
    node.next = node
    assert repr(node) == "test_repr_of_a_cycle_is_cut.<locals>.Node(next=...)"


def test_no_method_compiled_from_source() -> None:
    """The point of it: repr, eq and hash are not exec'd, nor (up to Python 3.12, where
    dataclasses generates them in ``_frozen_get_del_attr``) the frozen guards; dataclasses'
    own keeps ``__init__``."""
    made: list[str] = []
    real = dataclasses._create_fn  # type: ignore[attr-defined]

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        made.append(name)
        return real(name, *args, **kwargs)

    dataclasses._create_fn = spy  # type: ignore[attr-defined]
    try:
        frozen(records.dataclass)
    finally:
        dataclasses._create_fn = real  # type: ignore[attr-defined]
    if records._SHARE_FROZEN:
        assert made == ["__init__"]
    else:
        assert sorted(made) == ["__delattr__", "__init__", "__setattr__"]
    assert getattr(dataclasses, records._GUARDS, None) is not records._frozen_guards  # put back


def test_inspect_path_classes_use_it() -> None:
    """The classes the inspect path creates are built by sdtool.records (their params say
    repr=False, eq=False) and still compare, hash and print as dataclasses."""
    from sdtool.identify.keysets import Signature
    from sdtool.identify.result import Identity
    from sdtool.model import TensorInfo
    from sdtool.ops.inspect import InspectReport

    for cls in (Identity, Signature, InspectReport):
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert (params.repr, params.eq) == (False, False)
        assert cls.__eq__.__qualname__ == f"{cls.__qualname__}.__eq__"
    assert TensorInfo.__eq__ is object.__eq__  # eq=False stays eq=False
