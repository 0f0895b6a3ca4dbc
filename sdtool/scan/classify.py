"""Classify one imported global: safe, suspicious or dangerous, with the reason.

Cheap and torch-free, so ``sdtool inspect`` can mark unusual globals the loader met. The order is
the policy: the allowlist decides "safe"; known gadgets get their precise reason; everything else
is judged by shape (a data-looking class is suspicious, any other callable is dangerous).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from sdtool.scan.allowlist import (
    CODE_WORDS,
    DANGEROUS_MODULES,
    DANGEROUS_NAMES,
    MODULE_ALIASES,
    PY2_IMPORTS,
    PY2_NAMES,
    SAFE,
    SAFE_PATTERNS,
    SUSPICIOUS,
)

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


def _prefix_lookup(table: dict[str, str], module: str) -> tuple[str, str] | None:
    """The longest package prefix of ``module`` in ``table``: (prefix, reason)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in table:
            return key, table[key]
    return None


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
    if (mod, name) in DANGEROUS_NAMES:
        return "dangerous", f"{full}: {DANGEROUS_NAMES[(mod, name)]}"
    segments = name.split(".")
    if len(segments) > 1:
        return _classify_dotted(mod, segments)
    dangerous = _prefix_lookup(DANGEROUS_MODULES, mod)
    suspicious = _prefix_lookup(SUSPICIOUS, mod)
    if dangerous and (not suspicious or len(dangerous[0]) >= len(suspicious[0])):
        return "dangerous", f"{full}: module {dangerous[0]} {dangerous[1]}"
    if not name.isidentifier():
        return "dangerous", f"{full}: not a plain name"
    if _class_like(name):
        if not suspicious and CODE_WORDS.search(name):
            return "dangerous", f"{full}: a class whose name says it runs code or does I/O"
        why = suspicious[1] if suspicious else "an unknown class: instantiated by the loader"
        return "suspicious", f"{full}: {why}"
    if mod.startswith("__torch__."):
        return "suspicious", f"{full}: {SUSPICIOUS['__torch__']}"
    return "dangerous", f"{full}: an unknown function or attribute (calling it can run code)"


def _classify_dotted(mod: str, segments: list[str]) -> tuple[Severity, str]:
    """A dotted qualname walks attributes: ``pathlib`` + ``os.system`` reaches os.system."""
    full = f"{mod}.{'.'.join(segments)}"
    first = segments[0]
    # the first segment may be a module re-exported as an attribute: pathlib + os.system
    as_module = canonical_module(first)
    if _prefix_lookup(DANGEROUS_MODULES, as_module) is not None:
        _, why = classify_global(as_module, ".".join(segments[1:]))
        return "dangerous", f"{full}: reaches module {as_module} through an attribute ({why})"
    # or itself a known gadget: builtins + eval.__call__
    sev, why = classify_global(mod, first)
    if sev == "dangerous":
        return "dangerous", f"{full}: reaches {why}"
    if all(_class_like(s) for s in segments):
        if any(CODE_WORDS.search(s) for s in segments):
            return "dangerous", f"{full}: a nested class whose name says it runs code"
        return "suspicious", f"{full}: a nested class (data-like, not provably inert)"
    return "dangerous", f"{full}: a dotted name that reaches a method or function"
