"""Analysis passes over one modelled pickle stream. One rule = one small class naming its attack.

Each rule reads the ``Stream`` the VM produced and yields findings; ``analyse`` runs them all and
turns a rule that crashes into an error finding (never into "clean").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any, ClassVar

from sdtool.scan.allowlist import ARG_CHECKS, BUILTIN_CODECS, TENSOR_BUILDERS, TORCH_PERSID_TAGS
from sdtool.scan.classify import canonical_module, classify_global, is_init_only
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
#: call opcodes that run a class's __init__ (NEWOBJ/NEWOBJ_EX only run __new__)
INIT_CALLS = frozenset({"REDUCE", "INST", "OBJ"})


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
            if is_init_only(imp.module, imp.name) and any(h in INIT_CALLS for h, _ in imp.uses):
                sev, why = "dangerous", why.replace("(dangerous if called with arguments)", "")
                why += "(called: its __init__ runs)"
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


class CallsArgument(Rule):
    """An allowlisted callable that calls (or looks up) what one of its arguments names.

    ``torch._tensor._rebuild_from_type_v2(func, type, args, state)`` calls ``func(*args)``,
    numpy's ``__generator_ctor(name, ctor)`` calls ``ctor(name)``, ``defaultdict(factory)`` calls
    its factory, ``copyreg._reconstructor`` calls its base's ``__init__``, ``_codecs.encode``
    imports a codec module by name. Each is inert only when that argument is itself allowlisted
    (``allowlist.ARG_CHECKS``); anything else there, or a computed value, is dangerous.
    """

    id = "calls-arg"

    def check(self, s: Stream) -> Iterator[Finding]:
        for c in s.calls:
            if not isinstance(c.callee, Ref):
                continue
            key = _key(c.callee.imp)
            checks = ARG_CHECKS.get(key) if key is not None else None
            if not checks:
                continue
            args = _positional(c)
            for index, need, does in checks:
                problem = _arg_problem(args, index, need)
                if problem is None:
                    continue
                what = "its arguments" if index < 0 else f"argument {index + 1}"
                yield Finding(
                    "dangerous",
                    self.id,
                    f"{c.callee.imp.qualname} at {c.offset} {does}; {what} is {problem}",
                    offset=c.offset,
                    global_name=c.callee.imp.qualname,
                    usage=f"called via {c.opcode}",
                )


def _positional(c: Any) -> Any:
    """The positional arguments of a call as a tuple (None: not known statically)."""
    args = c.args
    if c.opcode == "NEWOBJ_EX":
        args = args[0] if isinstance(args, tuple) and len(args) == 2 else None
    return args if isinstance(args, tuple) else None


def _arg_problem(args: Any, index: int, need: str) -> str | None:
    """Why ``args[index]`` fails ``need`` (None: it passes)."""
    if args is None:
        return "not known statically"
    if need == "no-args":
        return None if args == () else f"{len(args)} values (its __init__ runs)"
    if index >= len(args):
        return None if need in ("safe-global-or-absent",) else "missing"
    v = args[index]
    if need == "safe-global-or-none" and v is None:
        return None
    if need == "name-or-safe-global" and isinstance(v, str):
        return None
    if need == "codec":
        if isinstance(v, str) and v.lower().replace("_", "-") in BUILTIN_CODECS:
            return None
        return f"the codec {v!r}" if isinstance(v, str) else _what(v)
    if not isinstance(v, Ref) or _key(v.imp) is None:
        return _what(v)
    if need == "global":
        return None
    if need == "tensor-builder":
        return None if _key(v.imp) in TENSOR_BUILDERS else f"{v.imp.qualname}, not a tensor builder"
    return None if _sev(v.imp) == "safe" else f"{v.imp.qualname}, which is not allowlisted"


def _what(v: Any) -> str:
    if isinstance(v, Ref):
        return f"{v.imp.qualname} (not resolvable statically)"
    if isinstance(v, Inst):
        return "a value computed at load time"
    if isinstance(v, Opaque):
        return v.what
    return f"a {type(v).__name__} literal"


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
            if s.persid_keys and _tar_key(pid):
                continue
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


def _tar_key(pid: Any) -> bool:
    """A key torch's TAR loader looks up as ``deserialized_objects[int(pid)]``: int() of a
    number or of its digits, which runs nothing."""
    if isinstance(pid, bytes):
        pid = pid.decode("ascii", "replace")
    if isinstance(pid, str):
        return pid.strip().lstrip("+-").isdigit()
    return type(pid) is int


class FrameStraddle(Rule):
    """Protocol 4/5 FRAME boundaries crossed by an opcode or argument (or overlapping frames):
    the C and Python unpicklers read such bytes differently from a linear parser.
    """

    id = "frame-straddle"

    def check(self, s: Stream) -> Iterator[Finding]:
        for a in s.anomalies:
            if a.kind == "frame-straddle":
                yield Finding("dangerous", self.id, a.message, offset=a.offset)


class LoaderAgreement(Rule):
    """The loader's parser (CPython's C unpickler, run inert in a bounded child) and the opcode
    model disagree: an import only the loader makes, a stream only the loader can follow, or a
    different end. Either is an evasion of one of the two parsers, so it is reported as such.
    """

    id = "parser-disagreement"

    def check(self, s: Stream) -> Iterator[Finding]:
        if s.oracle is None:
            return
        from sdtool.scan.oracle import compare

        for sev, message, offset, name in compare(s, s.oracle):
            yield Finding(sev, self.id, message, offset=offset, global_name=name)


RULES: list[Rule] = [
    GlobalImports(),
    UnresolvedGlobal(),
    ComputedCall(),
    CallsArgument(),
    MutatesNonData(),
    PersistentIds(),
    FrameStraddle(),
    LoaderAgreement(),
]


def analyse(s: Stream, *, member: str | None, index: int) -> tuple[list[Finding], list[str]]:
    """All rules over ``s`` (and its nested joblib pickles): (findings, errors)."""
    findings: list[Finding] = []
    errors: list[str] = []
    for rule in RULES:
        try:
            findings.extend(replace(f, member=member, stream=index) for f in rule.check(s))
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
