"""Classify one imported global: safe, suspicious or dangerous, with the reason.

Cheap and torch-free, so ``sdtool inspect`` can mark unusual globals the loader met. The order is
the policy: the allowlist decides "safe"; everything else is judged by its capability
(``sdtool.scan.capabilities``): any system capability is dangerous, a class that builds data only
(or from a package sdtool has no data on) is suspicious, any other function is dangerous.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from sdtool.scan.allowlist import (
    MODULE_ALIASES,
    PY2_IMPORTS,
    PY2_NAMES,
    SAFE,
    SAFE_PATTERNS,
)

if TYPE_CHECKING:  # the capability table loads for the first global the allowlist does not
    # answer (~10M instructions of rows: ``inspect`` of a checkpoint of safe globals skips it)
    from sdtool.scan.capabilities import Judgement

#: the values of ``vocab.Severity`` a global can get (as plain strings)
Severity = Literal["safe", "suspicious", "dangerous"]


def canonical_module(module: str) -> str:
    """``posix`` -> ``os``, ``numpy.core.multiarray`` -> ``numpy._core.multiarray`` ..."""
    if module in MODULE_ALIASES:
        return MODULE_ALIASES[module]
    head, _, rest = module.partition(".")
    if rest and head in MODULE_ALIASES:
        return f"{MODULE_ALIASES[head]}.{rest}"
    if module.startswith("numpy.core."):
        return "numpy._core." + module[len("numpy.core.") :]
    return module


def remap_py2(module: str, name: str) -> tuple[str, str]:
    """What the unpickler imports for a protocol < 3 GLOBAL (``_compat_pickle`` rules)."""
    if (module, name) in PY2_NAMES:
        return PY2_NAMES[(module, name)]
    if module in PY2_IMPORTS:
        return PY2_IMPORTS[module], name
    return module, name


def _is_safe(module: str, qual: str) -> str | None:
    reason = SAFE.get((module, qual))
    if reason is not None:
        return reason
    for mod, pattern, why in SAFE_PATTERNS:
        if module == mod and pattern.match(qual):
            return why
    return None


def _class_like(segment: str) -> bool:
    s = segment.lstrip("_")
    return bool(s) and s[0].isupper()


@lru_cache(maxsize=4096)
def classify_global(module: str, name: str) -> tuple[Severity, str]:
    """(severity, reason) for the global ``module.name`` as a pickle would import it.

    ``name`` may be a dotted qualname (``eval.__call__``); Python-2 names and module aliases
    are folded first. Example: ``classify_global("posix", "system")`` ->
    ``("dangerous", "os.system: runs a shell command")``.
    """
    module, name = remap_py2(module, name)
    mod = canonical_module(module)
    full = f"{mod}.{name}"
    reason = _is_safe(mod, name)
    if reason is not None:
        return "safe", reason
    segments = name.split(".")
    if len(segments) > 1:
        return _classify_dotted(mod, segments)
    if not name.isidentifier():
        return "dangerous", f"{full}: not a plain name"
    from sdtool.scan.capabilities import Cap, lookup

    j = lookup(mod, name)
    if j.cap is not None and j.cap is not Cap.DATA:
        if j.init_only and _class_like(name):
            return "suspicious", f"{full}: {j.reason} (dangerous if called with arguments)"
        if j.row is not None and j.row.name is not None:
            return "dangerous", f"{full}: {j.reason}"
        return "dangerous", f"{full}: {_module_phrase(mod, j)}"
    if _class_like(name):
        why = j.reason if j.cap is Cap.DATA else "an unknown class: instantiated by the loader"
        return "suspicious", f"{full}: {why}"
    return "dangerous", f"{full}: an unknown function or attribute (calling it can run code)"


def _module_phrase(mod: str, j: Judgement) -> str:
    where = j.row.module if j.row is not None else mod.split(".")[0]
    cap = j.cap.value if j.cap is not None else "unknown"
    return f"module {where}: {j.reason} (capability: {cap})"


def is_init_only(module: str, name: str) -> bool:
    """A class whose system access is in ``__init__`` only (dangerous when called with args)."""
    module, name = remap_py2(module, name)
    mod = canonical_module(module)
    if _is_safe(mod, name) is not None:
        return False
    from sdtool.scan.capabilities import lookup

    return lookup(mod, name).init_only


def capability(module: str, name: str) -> Judgement:
    """The capability-table row for a global (after Python-2 and alias folding)."""
    from sdtool.scan.capabilities import lookup

    module, name = remap_py2(module, name)
    return lookup(canonical_module(module), name.split(".")[0])


def _classify_dotted(mod: str, segments: list[str]) -> tuple[Severity, str]:
    """A dotted qualname walks attributes: ``pathlib`` + ``os.system`` reaches os.system."""
    from sdtool.scan.capabilities import Cap, lookup

    full = f"{mod}.{'.'.join(segments)}"
    first = segments[0]
    # the first segment may be a module re-exported as an attribute: pathlib + os.system
    as_module = canonical_module(first)
    j = lookup(as_module, segments[1])
    if j.cap is not None and j.cap is not Cap.DATA and (j.row is not None or as_module == first):
        _, why = classify_global(as_module, ".".join(segments[1:]))
        return "dangerous", f"{full}: reaches module {as_module} through an attribute ({why})"
    # or itself a known gadget: builtins + eval.__call__
    sev, why = classify_global(mod, first)
    if sev == "dangerous":
        return "dangerous", f"{full}: reaches {why}"
    if all(_class_like(s) for s in segments):
        return "suspicious", f"{full}: a nested class (data-like, not provably inert)"
    return "dangerous", f"{full}: a dotted name that reaches a method or function"
