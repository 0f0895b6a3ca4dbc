"""Analysis passes over one modelled pickle stream. One rule = one small class naming its attack.

Each rule reads the ``Stream`` the VM produced and yields findings; ``analyse`` runs them all and
turns a rule that crashes into an error finding (never into "clean").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from sdtool.scan.allowlist import CALLS_FIRST_ARG, TENSOR_BUILDERS, TORCH_PERSID_TAGS
from sdtool.scan.classify import canonical_module, classify_global
from sdtool.scan.report import Finding
from sdtool.scan.vm import Blob, DictV, Import, Inst, ListV, Opaque, Ref, SetV, Stream


def _usage(imp: Import) -> str:
    if not imp.uses:
        return "only imported"
    by: dict[str, list[int]] = {}
    for how, off in imp.uses:
        by.setdefault(how, []).append(off)
    parts = []
    for how, offs in by.items():
        verb = "called via" if how in CALLS else "used by"
        more = f" ({len(offs)}x)" if len(offs) > 1 else ""
        parts.append(f"{verb} {how} at {offs[0]}{more}")
    return "; ".join(parts)


CALLS = frozenset({"REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"})


def _key(imp: Import) -> tuple[str, str] | None:
    if imp.module is None or imp.name is None:
        return None
    return canonical_module(imp.module), imp.name


def _is_safe_ref(v: Any) -> bool:
    return isinstance(v, Ref) and _key(v.imp) is not None and _sev(v.imp) == "safe"


def _sev(imp: Import) -> str:
    assert imp.module is not None and imp.name is not None
    return classify_global(imp.module, imp.name)[0]


class Rule:
    """Base: ``check`` yields findings for one stream."""

    id: ClassVar[str] = ""

    def check(self, s: Stream) -> Iterator[Finding]:  # pragma: no cover - interface
        raise NotImplementedError


class GlobalImports(Rule):
    """Imports of anything but allowlisted globals (os.system, eval, an unknown class ...).

    One finding per distinct global per stream, at its first import, with how it is used.
    """

    id = "global"

    def check(self, s: Stream) -> Iterator[Finding]:
        seen: dict[tuple[str, str], Import] = {}
        for imp in s.imports:
            k = _key(imp)
            if k is None:
                continue
            if k in seen:
                seen[k].uses.extend(imp.uses)
                continue
            seen[k] = Import(
                imp.offset, imp.opcode, imp.module, imp.name, imp.written, list(imp.uses)
            )
        for imp in seen.values():
            assert imp.module is not None and imp.name is not None
            sev, why = classify_global(imp.module, imp.name)
            if sev == "safe":
                continue
            written = ""
            if imp.written and imp.written != (imp.module, imp.name):
                written = f" (written as {imp.written[0]} {imp.written[1]})"
            yield Finding(
                sev,
                self.id,
                f"{imp.opcode} imports {why}{written}",
                offset=imp.offset,
                global_name=f"{imp.module}.{imp.name}",
                usage=_usage(imp),
            )


class UnresolvedGlobal(Rule):
    """STACK_GLOBAL with computed operands (getattr/join/decode results) or EXT1/2/4 codes.

    The name is only known when the file is loaded, so it can be anything: dangerous.
    """

    id = "unresolved-global"

    def check(self, s: Stream) -> Iterator[Finding]:
        for imp in s.imports:
            if _key(imp) is not None:
                continue
            yield Finding(
                "dangerous",
                self.id,
                f"{imp.opcode} imports a global that cannot be resolved statically: "
                f"{imp.unresolved}",
                offset=imp.offset,
                global_name="<unresolved>",
                usage=_usage(imp),
            )


class ComputedCall(Rule):
    """A call whose callee is not an import: the result of another call or an opaque object.

    E.g. ``getattr(os, 'system')(...)`` or calling what a persistent_load returned.
    """

    id = "computed-call"

    def check(self, s: Stream) -> Iterator[Finding]:
        for c in s.calls:
            if isinstance(c.callee, Ref):
                continue
            if isinstance(c.callee, (Inst, Opaque)):
                what = "the result of another call" if isinstance(c.callee, Inst) else c.callee.what
                yield Finding(
                    "dangerous",
                    self.id,
                    f"{c.opcode} at {c.offset} calls {what}: the callee is computed at load time",
                    offset=c.offset,
                    usage=f"called via {c.opcode}",
                )


class CallsFirstArgument(Rule):
    """torch._tensor._rebuild_from_type_v2(func, type, args, state) calls ``func(*args)``.

    Allowed only when ``func`` is itself an allowlisted tensor builder.
    """

    id = "calls-first-arg"

    def check(self, s: Stream) -> Iterator[Finding]:
        for c in s.calls:
            if not isinstance(c.callee, Ref) or _key(c.callee.imp) not in CALLS_FIRST_ARG:
                continue
            first = c.args[0] if isinstance(c.args, tuple) and c.args else None
            if isinstance(first, Ref) and _key(first.imp) in TENSOR_BUILDERS:
                continue
            target = first.imp.qualname if isinstance(first, Ref) else "a non-literal value"
            yield Finding(
                "dangerous",
                self.id,
                f"{c.callee.imp.qualname} at {c.offset} calls its first argument, {target}, "
                "which is not a tensor builder",
                offset=c.offset,
                global_name=c.callee.imp.qualname,
                usage=f"called via {c.opcode}",
            )


class MutatesNonData(Rule):
    """BUILD on an imported module/class/function (attribute overwrite, e.g. replacing
    torch._utils._rebuild_tensor), or SETITEM/APPEND/ADDITEMS on something that is not a plain
    container (``os.environ[...] = ...``): the loader calls that object's methods.
    """

    id = "mutates-non-data"

    def check(self, s: Stream) -> Iterator[Finding]:
        for mu in s.mutations:
            t = mu.target
            if isinstance(t, Ref):
                yield Finding(
                    "dangerous",
                    self.id,
                    f"{mu.opcode} at {mu.offset} changes the imported object {t.imp.qualname} "
                    "itself (sets attributes / calls its methods)",
                    offset=mu.offset,
                    global_name=t.imp.qualname,
                    usage=f"used by {mu.opcode}",
                )
            elif isinstance(t, Inst) and isinstance(t.callee, Ref):
                continue  # an instance: judged by its class (GlobalImports)
            elif isinstance(t, (Opaque, Inst, Blob)):
                yield Finding(
                    "suspicious",
                    self.id,
                    f"{mu.opcode} at {mu.offset} acts on an object the scanner cannot see into",
                    offset=mu.offset,
                    usage=f"used by {mu.opcode}",
                )


class PersistentIds(Rule):
    """PERSID/BINPERSID hand a value to the loader's persistent_load; torch expects only
    ('storage', <Storage class>, key, location, numel[, view]) tuples.
    """

    id = "persistent-id"

    def check(self, s: Stream) -> Iterator[Finding]:
        for off, pid in s.persids:
            if (
                isinstance(pid, tuple)
                and pid
                and isinstance(pid[0], str)
                and pid[0] in TORCH_PERSID_TAGS
            ):
                if pid[0] != "storage" or len(pid) < 2 or _is_safe_ref(pid[1]):
                    continue
                yield Finding(
                    "suspicious",
                    self.id,
                    f"persistent id at {off} names a storage type that is not a torch storage",
                    offset=off,
                )
                continue
            yield Finding(
                "suspicious",
                self.id,
                f"persistent id at {off} is not a torch storage reference; what it means is up "
                "to the loader's persistent_load",
                offset=off,
            )


class FrameStraddle(Rule):
    """Protocol 4/5 FRAME boundaries crossed by an opcode or argument (or overlapping frames):
    the C and Python unpicklers read such bytes differently from a linear parser.
    """

    id = "frame-straddle"

    def check(self, s: Stream) -> Iterator[Finding]:
        for a in s.anomalies:
            if a.kind == "frame-straddle":
                yield Finding("dangerous", self.id, a.message, offset=a.offset)


RULES: list[Rule] = [
    GlobalImports(),
    UnresolvedGlobal(),
    ComputedCall(),
    CallsFirstArgument(),
    MutatesNonData(),
    PersistentIds(),
    FrameStraddle(),
]


def analyse(s: Stream, *, member: str | None, index: int) -> tuple[list[Finding], list[str]]:
    """All rules over ``s`` (and its nested joblib pickles): (findings, errors)."""
    findings: list[Finding] = []
    errors: list[str] = []
    for rule in RULES:
        try:
            for f in rule.check(s):
                f.member, f.stream = member, index
                findings.append(f)
        except Exception as e:  # a crashing rule must never read as "clean"
            errors.append(f"rule {rule.id} failed on stream {index}: {type(e).__name__}: {e}")
            findings.append(
                Finding("suspicious", "rule-error", f"rule {rule.id} crashed", member, index)
            )
    for sub in s.nested:
        f2, e2 = analyse(sub, member=member, index=index)
        findings.extend(f2)
        errors.extend(e2)
    return findings, errors


__all__ = ["RULES", "DictV", "ListV", "Rule", "SetV", "analyse"]
