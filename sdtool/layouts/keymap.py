"""The key-map engine: prefix rules with suffix tables, resolved key by key, and exact inverses.

A family's table (``sdtool/layouts/<family>.py``) is a list of ``Rule``: "keys under this source
prefix go under that target prefix, and the rest of the key is renamed by this suffix table".
Suffix-table entries (``Target``) may rename, split one tensor into parts along dim 0, or apply an
exact shape transform (``OPS``). ``KeyMap`` resolves one key to its ``Mapping`` list;
``KeyMap.inverse()`` builds the opposite direction mechanically (a split becomes a join), so each
family is written once, in the direction its source documents, and both directions agree by
construction (tests check the round trip and compare with diffusers' own conversion).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from sdtool.errors import UsageError

#: Exact per-tensor transforms, each with its inverse. Shape-driven, so a bias passes unchanged.
#: squeeze: [C,C,1,1] -> [C,C] (a 1x1 conv as a Linear); unsqueeze: the reverse.
#: transpose: 2-D transpose; swap_halves: the two halves of dim 0 exchanged
#: (shift,scale <-> scale,shift).
OPS: dict[str, str] = {
    "copy": "copy",
    "squeeze": "unsqueeze",
    "unsqueeze": "squeeze",
    "transpose": "transpose",
    "swap_halves": "swap_halves",
}


def apply_op(op: str, array: np.ndarray) -> np.ndarray:
    """Apply one of ``OPS`` to an array (exact: only views, reshapes and copies)."""
    if op == "copy":
        return array
    if op == "squeeze":
        return array.reshape(array.shape[:2]) if array.ndim == 4 else array
    if op == "unsqueeze":
        return array.reshape(*array.shape, 1, 1) if array.ndim == 2 else array
    if op == "transpose":
        return np.ascontiguousarray(array.T) if array.ndim == 2 else array
    if op == "swap_halves":
        half = array.shape[0] // 2
        return np.concatenate([array[half:], array[:half]])
    raise ValueError(f"unknown op {op!r}")


def op_shape(op: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape ``apply_op(op, x)`` gives for an ``x`` of ``shape``."""
    if op == "squeeze" and len(shape) == 4:
        return shape[:2]
    if op == "unsqueeze" and len(shape) == 2:
        return (*shape, 1, 1)
    if op == "transpose" and len(shape) == 2:
        return shape[::-1]
    return shape


def part_rows(total: int, parts: tuple[int, ...], index: int) -> tuple[int, int]:
    """Rows [start, stop) of piece ``index`` when ``total`` rows divide in the ratio ``parts``."""
    unit, rest = divmod(total, sum(parts))
    if rest:
        raise UsageError(f"{total} rows do not split in the ratio {':'.join(map(str, parts))}")
    start = unit * sum(parts[:index])
    return start, start + unit * parts[index]


@dataclass(frozen=True)
class Target:
    """One suffix-table entry: the target name(s) and how the tensor gets there.

    One name: a rename with ``op``. Several names: the source splits along dim 0 in the ratio
    ``parts`` (default equal), piece i going to ``names[i]``.
    """

    names: tuple[str, ...]
    op: str = "copy"
    parts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}")
        if len(self.names) > 1 and not self.parts:
            object.__setattr__(self, "parts", (1,) * len(self.names))


def rename(name: str, op: str = "copy") -> Target:
    return Target((name,), op)


def split(*names: str, parts: tuple[int, ...] = ()) -> Target:
    return Target(tuple(names), "copy", parts)


Suffixes = MappingABC[str, "str | Target"]


@dataclass(frozen=True)
class Rule:
    """Keys starting with ``source`` + "." go under ``target`` + "."; the rest through ``suffixes``.

    A suffix-table key matches the remainder whole or up to a dot (longest wins); an unmatched
    remainder is kept as it is. ``source == ""`` would match everything and is not allowed.
    """

    source: str
    target: str
    suffixes: Suffixes = field(default_factory=dict)
    op: str = "copy"  # applied when the key is the prefix itself (a whole-key rule)


@dataclass(frozen=True)
class Mapping:
    """Where one source tensor goes.

    ``kind``: "copy" (the whole tensor, through ``op``); "split" (rows ``part`` of ``parts`` of
    the source, sliced exactly); "join" (the source is piece ``part`` of ``parts`` of the target,
    concatenated along dim 0 in ``part`` order).
    """

    source: str
    target: str
    op: str = "copy"
    kind: Literal["copy", "split", "join"] = "copy"
    part: int = 0
    parts: tuple[int, ...] = ()


def _match(table: MappingABC[str, object], key: str) -> str | None:
    """The longest entry of ``table`` equal to ``key`` or to ``key`` up to one of its dots."""
    if key in table:
        return key
    cut = key.rfind(".")
    while cut > 0:
        if key[:cut] in table:
            return key[:cut]
        cut = key.rfind(".", 0, cut)
    return None


@dataclass
class KeyMap:
    """A resolved direction of a family's table: ``keymap(key)`` -> the key's Mapping list.

    Keys no rule covers give ``()``. ``rules`` are already prefixed (the checkpoint prefix of the
    single-file side is part of them).
    """

    rules: list[Rule]
    joins: bool = False  # this direction was inverted from splits (some targets are joins)
    _by_prefix: dict[str, list[Rule]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Rules may share a source prefix (an inverted table where two modules fill one
        diffusers module, e.g. SD3's x and context blocks): their suffix tables then decide,
        and a remainder none of them lists is not mapped."""
        self._by_prefix = {}
        for rule in self.rules:
            if not rule.source:
                raise ValueError("a rule needs a source prefix")
            self._by_prefix.setdefault(rule.source, []).append(rule)

    def __call__(self, key: str) -> tuple[Mapping, ...]:
        prefix = _match(self._by_prefix, key)
        if prefix is None:
            return ()
        rules = self._by_prefix[prefix]
        rest = key[len(prefix) + 1 :] if len(key) > len(prefix) else ""
        rule, hit = rules[0], None
        if rest:
            for candidate in rules:
                if (hit := _match(candidate.suffixes, rest)) is not None:
                    rule = candidate
                    break
        if hit is None:
            if len(rules) > 1:
                return ()
            return (Mapping(key, _join(rule.target, rest), rule.op if not rest else "copy"),)
        entry = rule.suffixes[hit]
        tail = rest[len(hit) :]
        if isinstance(entry, str):
            return (Mapping(key, _join(rule.target, entry) + tail),)
        names = [_join(rule.target, n) + tail for n in entry.names]
        if isinstance(entry, _JoinTarget):
            return (Mapping(key, names[0], entry.op, "join", entry.part, entry.parts),)
        if len(names) == 1:
            return (Mapping(key, names[0], entry.op),)
        return tuple(
            Mapping(key, n, entry.op, "split", i, entry.parts) for i, n in enumerate(names)
        )

    def mapping(self, keys: Iterable[str]) -> tuple[dict[str, tuple[Mapping, ...]], list[str]]:
        """(key -> mappings for the keys some rule covers, the keys none covers)."""
        found: dict[str, tuple[Mapping, ...]] = {}
        missing: list[str] = []
        for key in keys:
            maps = self(key)
            if maps:
                found[key] = maps
            else:
                missing.append(key)
        return found, missing

    def rename_dict(self, keys: Iterable[str]) -> dict[str, str]:
        """source key -> target key for keys mapped whole (no split/join, any op)."""
        out: dict[str, str] = {}
        for key in keys:
            maps = self(key)
            if len(maps) == 1 and maps[0].kind == "copy":
                out[key] = maps[0].target
        return out

    def inverse(self) -> KeyMap:
        """The opposite direction: every rename reversed, every split a join, every op inverted."""
        rules = []
        for rule in self.rules:
            inv: dict[str, str | Target] = {}
            for src, entry in rule.suffixes.items():
                if isinstance(entry, str):
                    _put(inv, entry, src)
                elif isinstance(entry, _JoinTarget):
                    raise ValueError("a joined table cannot be inverted again")
                elif len(entry.names) == 1:
                    _put(inv, entry.names[0], rename(src, OPS[entry.op]))
                else:
                    for i, name in enumerate(entry.names):
                        _put(inv, name, _JoinTarget((src,), OPS[entry.op], entry.parts, part=i))
            rules.append(Rule(rule.target, rule.source, inv, OPS[rule.op]))
        return KeyMap(rules, joins=True)


@dataclass(frozen=True)
class _JoinTarget(Target):
    """An inverted split entry: the source is piece ``part`` of the one target name."""

    part: int = 0


def _put(table: dict[str, str | Target], key: str, value: str | Target) -> None:
    if key in table:
        raise ValueError(f"suffix {key!r} has two sources; the table cannot be inverted")
    table[key] = value


def _join(prefix: str, rest: str) -> str:
    if not rest:
        return prefix
    return f"{prefix}.{rest}" if prefix else rest


def prefixed(rules: Iterable[Rule], source_prefix: str = "", target_prefix: str = "") -> list[Rule]:
    """The rules with a checkpoint prefix put in front of each side ("" = none)."""
    return [
        Rule(
            _join(source_prefix.rstrip("."), r.source),
            _join(target_prefix.rstrip("."), r.target),
            r.suffixes,
            r.op,
        )
        for r in rules
    ]
