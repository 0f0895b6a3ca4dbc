"""The identification engine: applies ``tables`` to a file's header, returns a frozen ``Identity``.

Works from the header only (names, shapes and dtypes of ``model.tensors``, plus
``model.metadata`` and ``model.extra``); tensor bytes are never read, and nothing here imports
torch, diffusers or transformers (the harvested key lists are package data).

Steps: special kinds (LoRA, embedding, hypernetwork); quantization side tensors set aside;
components by key set (``keysets``) under any prefix; families by marker keys (``FAMILIES``);
EMA; markers; architecture, variant, prediction, pruning; shapes against the reference.

Example:
    >>> with open_model("v1-5-pruned.safetensors") as m:
    ...     identify(m).architecture
    'sd1'
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import field, replace
from functools import cache
from itertools import compress, filterfalse, repeat
from operator import and_, itemgetter, methodcaller, ne, not_
from typing import Any

from sdtool.identify import keysets as K
from sdtool.identify import tables as T
from sdtool.identify.result import (
    ComponentMatch,
    EmbeddingInfo,
    Identity,
    LoraInfo,
    Quantization,
    ShapeMismatch,
)
from sdtool.model import ModelFile, TensorInfo
from sdtool.records import dataclass

ROLE_ORDER = {
    "denoiser": 0, "controlnet": 1, "t2i-adapter": 1, "ip-adapter": 1, "vae": 2,
    "text-encoder": 3, "aux": 4, "ema": 5,
}  # fmt: skip

#: roles present -> kind, first match wins (a denoiser with anything else is a checkpoint)
KIND_RULES: tuple[tuple[frozenset[str], frozenset[str], str], ...] = (
    # (must have all of, must have none of, kind)
    (frozenset({"denoiser", "vae"}), frozenset(), "checkpoint"),
    (frozenset({"denoiser", "text-encoder"}), frozenset(), "checkpoint"),
    (frozenset({"controlnet"}), frozenset({"denoiser"}), "controlnet"),
    (frozenset({"t2i-adapter"}), frozenset({"denoiser"}), "t2i-adapter"),
    (frozenset({"ip-adapter"}), frozenset({"denoiser"}), "ip-adapter"),
    (frozenset({"denoiser"}), frozenset(), "unet"),
    (frozenset({"vae", "text-encoder"}), frozenset(), "checkpoint"),
    (frozenset({"vae"}), frozenset(), "vae"),
    (frozenset({"text-encoder"}), frozenset(), "text-encoder"),
)
#: One-component kinds whose component label is the file's ``model``.
MODEL_KINDS = frozenset({"text-encoder", "vae", "controlnet", "t2i-adapter", "ip-adapter"})


@dataclass
class _Work:
    """The answer while it is being put together (frozen into an ``Identity`` at the end)."""

    kind: str = "unknown"
    architecture: str | None = None
    architecture_source: str | None = None
    variant: str | None = None
    prediction: str | None = None
    prediction_source: str | None = None
    prediction_heuristic: bool = False
    components: list[ComponentMatch] = field(default_factory=list)
    markers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    ownership: dict[str, str] = field(default_factory=dict)


def identify(model: ModelFile) -> Identity:
    """Identify a model file from its header: kind, architecture, components, EMA, junk.

    Never reads tensor bytes. Returns an Identity whose ``kind`` is ``"unknown"`` (with
    ``nearest``/``nearest_reason`` when something is close) when nothing fits.

    Example:
        >>> ident = identify(open_model("model.safetensors"))
        >>> ident.kind, ident.architecture
        ('checkpoint', 'sd1')
    """
    tensors = model.tensors
    w = _Work()
    precision = _precision(tensors)
    training_state = tuple(k for k in model.extra if k in T.TRAINING_STATE)
    meta_arch, meta_kind, meta_src = _metadata_arch(model.metadata)

    special = (
        _lora(tensors, model.metadata) or _embedding(tensors) or _hypernetwork(tensors, model.extra)
    )
    if special is not None:
        return _special(special, tensors, precision, training_state, meta_arch, meta_src)

    quant = _quantization(tensors)
    weights, renamed = _as_weights(tensors, quant)
    counts = _candidates(weights)
    comps = _claim(counts, weights)
    comps = _families(comps, weights)
    comps = _with_extras(comps, weights, quant)
    if renamed:  # back to the file's own names
        comps = [replace(c, keys=tuple(renamed.get(k, k) for k in c.keys)) for c in comps]
    claimed = {k for c in comps for k in c.keys}
    ema = _ema(tensors, comps)
    if ema is not None:
        comps.append(ema)
        claimed.update(ema.keys)
    for key in tensors:
        if key in claimed or (quant is not None and key in quant.keys):
            continue
        marker = next((m for m in T.MARKERS if m.pattern.fullmatch(key)), None)
        if marker is not None:
            w.markers[key] = marker.meaning
            claimed.add(key)
    w.unknown = [k for k in tensors if k not in claimed and (quant is None or k not in quant.keys)]
    w.components = sorted(comps, key=lambda m: (ROLE_ORDER.get(m.role, 9), m.prefix))

    # markers and shapes are read under the weights' names too (torchao's qdata)
    view = tensors if not renamed else {**tensors, **{n: tensors[o] for n, o in renamed.items()}}
    _architecture(w, view, meta_arch, meta_src)
    w.kind = _kind(w.components, meta_kind)
    nearest: tuple[str | None, str | None] = (None, None)
    if w.kind == "unknown":
        nearest = _nearest(weights, counts)
    _variant(w, view)
    _prediction(w, model)
    pruning = _pruning(w, model, training_state)
    w.components = [_shapes(c, tensors, w.architecture) for c in w.components]
    for c in w.components:
        for k in c.keys:
            w.ownership[k] = c.name
    for k in w.markers:
        w.ownership[k] = "markers"
    if quant is not None:
        for k in quant.keys:
            w.ownership.setdefault(k, "quantization")
    for k in w.unknown:
        w.ownership[k] = "unknown"
    main = [c for c in w.components if c.role not in ("ema", "aux")]
    return Identity(
        kind=w.kind,
        architecture=w.architecture,
        architecture_source=w.architecture_source,
        variant=w.variant,
        model=" + ".join(c.label for c in main) if w.kind in MODEL_KINDS and main else None,
        prediction=w.prediction,
        prediction_source=w.prediction_source,
        prediction_heuristic=w.prediction_heuristic,
        ema=ema is not None,
        precision=precision,
        quantization=quant,
        pruning=pruning[0],
        pruning_note=pruning[1],
        components=tuple(w.components),
        markers=w.markers,
        training_state=training_state,
        unknown_keys=tuple(w.unknown),
        nearest=nearest[0],
        nearest_reason=nearest[1],
        notes=tuple(w.notes),
        ownership=w.ownership,
    )


# -- special kinds -----------------------------------------------------------------------------

Special = tuple[str, Any, str | None, str | None, dict[str, str]]  # kind, info, arch, why, owners


def _special(
    special: Special,
    tensors: dict[str, TensorInfo],
    precision: dict[str, dict[str, int]],
    training_state: tuple[str, ...],
    meta_arch: str | None,
    meta_src: str | None,
) -> Identity:
    kind, info, arch, src, owned = special
    notes: list[str] = []
    if arch is None and meta_arch is not None:
        arch, src = meta_arch, meta_src
    elif meta_arch is not None and meta_arch != arch:
        if arch == "flux" and meta_arch in ("flux-dev", "flux-schnell"):
            arch, src = meta_arch, f"{src}; {meta_src}"
        else:
            notes.append(f"metadata says {T.ARCH_LABELS.get(meta_arch, meta_arch)} ({meta_src})")
    unknown = tuple(k for k in tensors if k not in owned)
    ownership = dict(owned)
    for k in unknown:
        ownership[k] = "unknown"
    return Identity(
        kind=kind,
        architecture=arch,
        architecture_source=src,
        precision=precision,
        training_state=training_state,
        unknown_keys=unknown,
        lora=info if isinstance(info, LoraInfo) else None,
        embedding=info if isinstance(info, EmbeddingInfo) else None,
        hypernetwork=info if isinstance(info, dict) else None,
        notes=tuple(notes),
        ownership=ownership,
    )


# -- quantization ------------------------------------------------------------------------------


def _quantization(tensors: dict[str, TensorInfo]) -> Quantization | None:
    schemes: Counter[str] = Counter()
    keys: list[str] = []
    for key in _maybe_quantized(list(tensors)):
        rule = next((q for q in T.QUANT_RULES if q.pattern.search(key)), None)
        if rule is not None:
            schemes[rule.scheme] += 1
            # llama.cpp names and torchao's qdata are the weights themselves
            if "GGUF" not in rule.scheme and not _QUANT_DATA.search(key):
                keys.append(key)
    for t in tensors.values():
        code = t.type_code  # a GGUF block format ("Q4_K") or the dtype's code
        if code != t.dtype.code:
            schemes[f"GGUF {code} blocks"] += 1
        elif code in T.QUANT_DTYPES:
            schemes[T.QUANT_DTYPES[code]] += 1
    if not schemes:
        return None
    return Quantization(dict(schemes.most_common()), tuple(keys))


def _maybe_quantized(keys: list[str]) -> list[str]:
    """The keys ``_any_quant()`` finds something in, in order; for a whole file at once when
    it can (the rules' regexes over 2,000 names cost more than the rest of identify).

    Joined by newlines, each name is a line of the text, and under MULTILINE ``^`` and ``$``
    match at line ends as they do at a name's ends; a rule that cannot match a newline
    (``_line_rules`` checks each) then finds something in the text iff it does in some name.
    A literal that every match of a rule contains, absent from the text, answers for that
    rule without running it. A name with a newline in it, or a text some rule matches, is
    searched name by name."""
    rules = _line_rules()
    text = "\n".join(keys)
    if (
        rules is None
        or text.count("\n") + 1 != len(keys)
        or any((not lit or lit in text) and rule.search(text) for lit, rule in rules)
    ):
        any_quant = _any_quant().search
        return [k for k in keys if any_quant(k)]
    return []


@cache
def _any_quant() -> re.Pattern[str]:
    """Every quantization rule in one regex, for the names one by one: compiled when a file
    needs it (a file some rule matches), not with the module (~5M instructions, the largest
    regex identify compiles)."""
    return re.compile("|".join(f"(?:{q.pattern.pattern})" for q in T.QUANT_RULES))


@cache
def _line_rules() -> list[tuple[str, re.Pattern[str]]] | None:
    """Each QUANT_RULES regex for the joined text (MULTILINE), with a literal all its matches
    contain ("" if none is known); None if some rule could match a newline or the text's
    start or end (``\\A``, ``\\Z``), or cannot be read (then names are searched one by one)."""
    try:
        from re import _parser as parser  # type: ignore[attr-defined]
    except ImportError:  # Python 3.10
        import sre_parse as parser
    out = []
    for q in T.QUANT_RULES:
        p = q.pattern
        try:
            tokens = parser.parse(p.pattern, p.flags)
        except Exception:  # an unreadable rule: names are searched one by one
            return None
        if p.flags & (re.DOTALL | re.MULTILINE) or not _line_safe(tokens):
            return None
        literal = "" if p.flags & re.IGNORECASE else _top_literal(tokens)
        out.append((literal, re.compile(p.pattern, p.flags | re.MULTILINE)))
    return out


def _line_safe(tokens: Any) -> bool:
    """No token of the parsed regex can match a newline or anchor at the string's ends."""
    for op, av in tokens:
        kind = str(op)
        if kind == "LITERAL":
            if av == 10:
                return False
        elif kind == "IN":
            for item, value in av:
                what = str(item)
                if what == "LITERAL" and value == 10:
                    return False
                if what == "RANGE" and value[0] <= 10 <= value[1]:
                    return False
                if what == "CATEGORY" and str(value) not in ("CATEGORY_DIGIT", "CATEGORY_WORD"):
                    return False
                if what not in ("LITERAL", "RANGE", "CATEGORY"):
                    return False  # NEGATE and anything unforeseen
        elif kind == "AT":
            if str(av) not in ("AT_BEGINNING", "AT_END", "AT_BOUNDARY"):  # \B: "" differs
                return False
        elif kind == "SUBPATTERN":
            if not _line_safe(av[-1]):
                return False
        elif kind == "BRANCH":
            if not all(_line_safe(b) for b in av[1]):
                return False
        elif kind in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            if not _line_safe(av[2]):
                return False
        else:
            return False  # ANY, NOT_LITERAL, lookarounds, group references...
    return True


def _top_literal(tokens: Any) -> str:
    """The longest run of literal characters at the regex's top level: in every match."""
    best = run = ""
    for op, av in tokens:
        if str(op) == "LITERAL":
            run += chr(av)
        else:
            best, run = max(best, run, key=len), ""
    return max(best, run, key=len)


def _as_weights(
    tensors: dict[str, TensorInfo], quant: Quantization | None
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors key sets are matched against: side tensors set aside, quantized data under
    another name (``QUANT_DATA``: torchao's ``x._weight_qdata``) read as the weight it holds.
    Returns (weights, weight name -> file name) for the renamed ones."""
    if quant is None:
        return tensors, {}
    side = set(quant.keys)
    weights: dict[str, TensorInfo] = {}
    renamed: dict[str, str] = {}
    for k, t in tensors.items():
        if k in side:
            continue
        for pattern, repl in T.QUANT_DATA:
            new = pattern.sub(repl, k)
            if new != k:
                renamed[new] = k
                k = new
                break
        weights[k] = t
    return weights, renamed


# -- components --------------------------------------------------------------------------------

Candidate = tuple[str, str, bool]  # signature id, prefix, via alias


def _candidates(tensors: dict[str, TensorInfo]) -> Counter[Candidate]:
    """How many keys each (signature, prefix) explains: every key is split at each dot.

    The tails are taken a dot at a time for all keys at once (``str.partition`` over the
    list, in C), and only the tails some signature knows are counted, in the order key by
    key, shortest prefix first, as splitting each key in turn would."""
    keys = list(tensors)
    numbers, tails = list(range(len(keys))), keys
    levels: list[tuple[list[int], list[str]]] = []  # per dots dropped: (key numbers, tails)
    while tails:
        levels.append((numbers, tails))
        parts = list(map(str.partition, tails, repeat(".")))
        split = list(map(bool, map(_SEP, parts)))
        numbers, tails = list(compress(numbers, split)), list(compress(map(_REST, parts), split))
    index = K.index_for(set().union(*(t for _, t in levels)))
    known = sorted(
        (n, level, tail)
        for level, (numbers, tails) in enumerate(levels)
        for n, tail in compress(zip(numbers, tails, strict=True), map(index.__contains__, tails))
    )
    return Counter(  # counted in C, in first-seen order
        (sid, prefix, alias)
        for n, _, tail in known
        for prefix in (keys[n][: len(keys[n]) - len(tail)],)
        for sid, alias in index[tail]
    )


_SEP, _REST = itemgetter(1), itemgetter(2)


def _full_key(sig: K.Signature, prefix: str, rel: str, alias: bool) -> str:
    if alias:
        for old, new in sig.meta.aliases:
            if rel.startswith(old):
                return prefix + new + rel[len(old) :]
    return prefix + rel


def _full_keys(sig: K.Signature, prefix: str, alias: bool) -> list[str]:
    """``_full_key`` of every key of ``sig``, in its order (without aliases: in C)."""
    if alias:
        return [_full_key(sig, prefix, rel, True) for rel in sig.keys]
    return list(map(prefix.__add__, sig.keys))


def _evaluate(cand: Candidate, tensors: dict[str, TensorInfo]) -> ComponentMatch:
    sid, prefix, alias = cand
    sig = K.signatures()[sid]
    optional = sig.optional | K.optional_at(sid, prefix)
    fulls = _full_keys(sig, prefix, alias)
    present = list(map(tensors.__contains__, fulls))
    keys = list(compress(fulls, present))
    if optional:  # the keys that are neither there nor optional are missing
        needed = list(map(not_, map(optional.__contains__, sig.keys)))
        missing = list(compress(fulls, map(and_, map(not_, present), needed)))
        required = sum(needed)
    else:
        missing = list(filterfalse(tensors.__contains__, fulls))
        required = len(fulls)
    m = sig.meta
    # optional keys that are there count on both sides: "CLIP-L 197/197" with position_ids
    extra_optional = len(keys) - (required - len(missing))
    return ComponentMatch(
        m.name, sid, m.label, m.role, m.layout, prefix, len(keys), required + extra_optional,
        keys=tuple(keys), missing=tuple(missing), alias=alias,
    )  # fmt: skip


def _claim(counts: Counter[Candidate], tensors: dict[str, TensorInfo]) -> list[ComponentMatch]:
    """Best-fitting components first; each key belongs to one component."""
    sigs = K.signatures()
    cands = [
        _evaluate(c, tensors)
        for c, n in counts.items()
        if n >= T.PRESENT_FRACTION * len(sigs[c[0]].required)
    ]
    cands.sort(key=lambda m: (-m.fraction, -len(m.keys), m.alias, len(m.prefix)))
    taken: set[str] = set()
    out: list[ComponentMatch] = []
    for m in cands:
        free = [k for k in m.keys if k not in taken]
        if len(free) < len(m.keys) or m.fraction < T.PRESENT_FRACTION:
            continue  # another reading of these keys already fits better
        taken.update(free)
        out.append(m)
    return out


def _family_fits(f: T.Family, prefix: str, tensors: dict[str, TensorInfo]) -> bool:
    if not all(prefix + k in tensors for k in f.all_of):
        return False
    if any(prefix + k in tensors for k in f.none_of):
        return False
    for key, axis, value in f.shapes:
        shape = tensors[prefix + key].shape if prefix + key in tensors else ()
        if not shape or len(shape) <= axis or shape[axis] != value:
            return False
    return True


def _families(comps: list[ComponentMatch], tensors: dict[str, TensorInfo]) -> list[ComponentMatch]:
    """Families told by marker keys: each prefix is named by the first row that fits it."""
    named: dict[str, T.Family] = {}
    ends = [k for k in tensors if k.endswith(_FAMILY_HEADS)]
    for f in T.FAMILIES:
        head = f.all_of[0]
        for key in ends:
            if not key.endswith(head):
                continue
            prefix = key[: len(key) - len(head)]
            if prefix and not prefix.endswith("."):
                continue
            if prefix not in named and _family_fits(f, prefix, tensors):
                named[prefix] = f
    out = list(comps)
    for prefix, f in named.items():
        # a partial key-set reading at the same prefix is this family read wrongly, whatever
        # its role (a distilled SDXL UNet read as part of a ControlNet)
        same = [c for c in out if c.prefix == prefix and (c.role == f.role or not c.complete)]
        if f.signature is not None and any(c.signature == f.signature for c in same):
            continue  # the key list already explains it; the family row names the architecture
        if any(c.complete and c.layout == "diffusers" for c in same):
            continue  # a complete diffusers key list is the better reading
        out = [c for c in out if c not in same]
        taken = {k for c in out for k in c.keys}
        keys = tuple(k for k in tensors if k.startswith(prefix) and k not in taken)
        n = len(f.all_of)
        out.append(
            ComponentMatch(
                f.component, f.id, f.label, f.role, "ldm", prefix, n, n, keys=keys, family=True
            )
        )
    return out


def _with_extras(
    comps: list[ComponentMatch], tensors: dict[str, TensorInfo], quant: Quantization | None
) -> list[ComponentMatch]:
    """Keys under a component's (non-empty) prefix that nobody claimed are its extras; the
    quantization side tensors under it are its own too (owned, not extra)."""
    taken = {k for c in comps for k in c.keys}
    scales = set(quant.keys) if quant is not None else set()
    out = []
    for c in sorted(comps, key=lambda m: -len(m.prefix)):  # the deepest prefix first
        if not c.prefix:
            out.append(c)
            continue
        extra = tuple(k for k in tensors if k.startswith(c.prefix) and k not in taken)
        own = tuple(k for k in scales if k.startswith(c.prefix) and k not in taken)
        taken.update(extra)
        taken.update(own)
        out.append(
            replace(c, keys=c.keys + extra + own, extra=() if c.family else extra)
            if extra or own
            else c
        )
    bare = [c for c in out if not c.prefix]
    for i, c in enumerate(out):
        if c in bare:
            own = tuple(k for k in scales if k not in taken)
            if own:
                out[i] = replace(c, keys=c.keys + own)
                taken.update(own)
    return out


def ema_key(key: str) -> str:
    """The EMA twin of a ``model.``-prefixed key: dots after the prefix removed (FORMATS.md 4)."""
    return T.EMA_PREFIX + key[len("model.") :].replace(".", "")


_EMA_UNET = ema_key("model.diffusion_model.")  # "model_ema.diffusion_model"
_NO_DOTS = methodcaller("replace", ".", "")


def _ema(tensors: dict[str, TensorInfo], comps: list[ComponentMatch]) -> ComponentMatch | None:
    """The ``model_ema.*`` copy of the denoiser, counted against the denoiser's key set."""
    ema_keys = [k for k in tensors if k.startswith(T.EMA_PREFIX)]
    if not ema_keys:
        return None
    have = set(ema_keys)
    best: tuple[int, list[str], list[str]] | None = None
    for sid in ("unet-ldm", "unet-sdxl", "unet-sdxl-refiner"):
        sig = K.signatures()[sid]
        # ema_key("model.diffusion_model." + rel) for each, in C
        expected = list(map(_EMA_UNET.__add__, map(_NO_DOTS, sig.required)))
        hits = list(filter(have.__contains__, expected))
        if best is None or len(hits) > best[0]:
            best = (len(hits), hits, list(filterfalse(have.__contains__, expected)))
    assert best is not None
    found, hits, missing = best
    if found == 0:
        return None  # model_ema.* keys, but not the dotless UNet copy: left to the markers
    return ComponentMatch(
        "ema", "ema", "EMA", "ema", "ldm", T.EMA_PREFIX, found, found + len(missing),
        keys=tuple(hits), missing=tuple(missing),
    )  # fmt: skip


def _variant_axes(sig: str) -> dict[str, int]:
    return {r.key: r.axis for r in T.VARIANT_RULES if r.sig == sig}


def _shapes(c: ComponentMatch, tensors: dict[str, TensorInfo], arch: str | None) -> ComponentMatch:
    """Compare shapes with the architecture's set (or the closest one); variant axes are free.

    Quantized tensors (integer or packed element types) are not compared: their shapes are
    the packing's, not the model's.
    """
    if c.role == "ema" or c.family:
        return c
    sig = K.signatures()[c.signature]
    free = _variant_axes(c.signature)
    fulls = _full_keys(sig, c.prefix, c.alias)
    # the keys compared (there, with a float type), in key order, looked up once for all profiles
    there = [
        (i, info)
        for i, info in enumerate(map(tensors.get, fulls))
        if info is not None and info.dtype.is_float
    ]
    compared = [i for i, _ in there]
    got_shapes = [info.shape for _, info in there]
    best: tuple[int, str, list[ShapeMismatch]] | None = None
    for profile, shapes in sig.shape_lists.items():
        wants = list(map(shapes.__getitem__, compared))
        mism = []
        for (i, info), want in compress(zip(there, wants, strict=True), map(ne, got_shapes, wants)):
            got = info.shape
            axis = free.get(sig.keys[i])
            if axis is not None and len(got) == len(want) and -len(got) <= axis < len(got):
                a = axis % len(got)
                got = (*got[:a], want[a], *got[a + 1 :])
            if got != want:
                mism.append(ShapeMismatch(fulls[i], info.shape, want))
        rank = 0 if profile == arch else 1
        if best is None or (len(mism), rank) < (len(best[2]), 0 if best[1] == arch else 1):
            best = (len(mism), profile, mism)
    if best is None:
        return c
    return replace(c, profile=best[1], mismatches=tuple(best[2]))


# -- kind, architecture, variant ---------------------------------------------------------------


def _kind(comps: list[ComponentMatch], meta_kind: str | None) -> str:
    roles = {c.role for c in comps}
    kind = next((k for need, no, k in KIND_RULES if need <= roles and not no & roles), None)
    return kind or "unknown"


def _metadata_arch(meta: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    """(architecture, kind, source) from ModelSpec or kohya metadata."""
    spec = meta.get("modelspec.architecture", "")
    if spec:
        base, _, suffix = spec.partition("/")
        arch = next((a for p, a in T.MODELSPEC_ARCH if base.lower().startswith(p)), None)
        return arch, T.MODELSPEC_KIND.get(suffix), f"metadata modelspec.architecture={spec!r}"
    ss = meta.get("ss_base_model_version", "")
    if ss:
        arch = next((a for p, a in T.SS_BASE if ss.startswith(p)), None)
        return arch, None, f"metadata ss_base_model_version={ss!r}"
    if meta.get("ss_v2") == "True":
        return "sd2", None, "metadata ss_v2=True"
    return None, None, None


def _architecture(
    w: _Work, tensors: dict[str, TensorInfo], meta_arch: str | None, meta_src: str | None
) -> None:
    hints: list[tuple[int, str, str]] = []  # (priority, arch, why)
    for c in w.components:
        prio = ROLE_ORDER.get(c.role, 9)
        if c.family:
            f = _family_row(c, tensors)
            if f is not None and f.arch:
                hints.append((prio, f.arch, f"{c.label}: {', '.join(f.all_of)} ({f.source})"))
        for f in T.FAMILIES:  # rows that name the architecture of a key-set match
            if f.signature == c.signature and _family_fits(f, c.prefix, tensors):
                hints.append((prio, f.arch, f"{c.label}: {f.all_of[0]}"))
                break
        for rule in T.SHAPE_RULES:
            if rule.sig != c.signature:
                continue
            info = tensors.get(c.prefix + rule.key)
            if info is None or len(info.shape) <= rule.axis:
                continue
            v = info.shape[rule.axis]
            if v in rule.values:
                hints.append((prio, rule.values[v], f"{c.label} {rule.what} {v}"))
            else:
                w.notes.append(f"{c.label} {rule.what} {v} matches no known architecture")
        for p in T.PRESENCE_RULES:
            if p.sig == c.signature:
                there = c.prefix + p.key in tensors
                hints.append(
                    (prio, p.present if there else p.absent,
                     f"{c.label} {p.what} {'present' if there else 'absent'}")
                )  # fmt: skip
        if c.signature in T.SIG_ARCH:
            hints.append((prio, T.SIG_ARCH[c.signature], f"{c.label} key set"))
        for pl in T.PLACEMENTS:
            if pl.sig == c.signature and pl.prefix == c.prefix:
                hints.append((prio, pl.arch, f"{c.label} under {c.prefix!r}"))
    if meta_arch is not None and meta_src is not None:
        hints.append((8, meta_arch, meta_src))
    if not hints:
        return
    hints.sort(key=lambda h: h[0])
    w.architecture = hints[0][1]
    agree = [why for _, a, why in hints if a == w.architecture]
    w.architecture_source = "; ".join(dict.fromkeys(agree))
    for _, a, why in hints:
        if a != w.architecture and not _compatible(a, w.architecture):
            w.notes.append(f"conflicting hint: {why} suggests {T.ARCH_LABELS.get(a, a)}")


def _compatible(hint: str, arch: str) -> bool:
    """A hint that is a coarser reading of the answer ("flux" for "flux-dev", "sdxl-base"
    placements for SSD-1B) is no conflict."""
    return hint in T.ARCH_PARENTS.get(arch, ()) or hint == "sd"


def _family_row(c: ComponentMatch, tensors: dict[str, TensorInfo]) -> T.Family | None:
    return next(
        (f for f in T.FAMILIES if f.id == c.signature and _family_fits(f, c.prefix, tensors)),
        None,
    )


def _variant(w: _Work, tensors: dict[str, TensorInfo]) -> None:
    words: list[str] = []
    for c in w.components:
        if c.role in ("ema", "aux", "text-encoder") or (c.role == "vae" and w.kind != "vae"):
            continue
        if c.family:
            f = _family_row(c, tensors)
            if f is not None and f.variant:
                words.append(f.variant)
        for r in T.VARIANT_RULES:
            if r.sig != c.signature:
                continue
            info = tensors.get(c.prefix + r.key)
            if info is None or not info.shape or not -len(info.shape) <= r.axis < len(info.shape):
                continue
            v = info.shape[r.axis]
            if v in r.values:
                word = r.values[v]
                if word:
                    words.append(word)
            else:
                w.notes.append(f"{c.label} {r.what} {v} (no known variant)")
    for key in w.markers:
        m = next((m for m in T.MARKERS if m.variant and m.pattern.fullmatch(key)), None)
        if m is not None and m.variant:
            words.append(m.variant)
    if words:
        w.variant = ", ".join(dict.fromkeys(words))


def _prediction(w: _Work, model: ModelFile) -> None:
    for key in w.markers:
        for marker in T.MARKERS:
            if marker.prediction and marker.pattern.fullmatch(key):
                w.prediction, w.prediction_source = marker.prediction, f"marker key {key!r}"
                return
    meta = model.metadata
    pt = meta.get("modelspec.prediction_type", "").lower()
    if pt in T.MODELSPEC_PREDICTION:
        w.prediction = T.MODELSPEC_PREDICTION[pt]
        w.prediction_source = f"metadata modelspec.prediction_type={pt!r}"
        return
    if meta.get("ss_v_parameterization") == "True":
        w.prediction, w.prediction_source = "v", "metadata ss_v_parameterization=True"
        return
    if w.architecture in T.FLOW_ARCHS:
        w.prediction, w.prediction_source = "flow", "flow-matching architecture"
        return
    for pattern, pred in T.NAME_PREDICTION:
        if pattern.search(model.path.name):
            w.prediction = pred
            w.prediction_source = f"the file name matches {pattern.pattern!r}"
            w.prediction_heuristic = True
            return
    if w.architecture == "sd2" and w.kind in ("checkpoint", "unet"):
        w.notes.append(
            "SD 2.x has no v-prediction marker: v (768-v) or epsilon (512-base) cannot be told "
            "from the weights"
        )


def _pruning(
    w: _Work, model: ModelFile, training_state: tuple[str, ...]
) -> tuple[str | None, str | None]:
    if w.kind not in ("checkpoint", "unet"):
        return None, None
    ema = next((c for c in w.components if c.name == "ema"), None)
    if training_state or ema is not None:
        why = []
        if training_state:
            why.append("training state present (" + ", ".join(training_state) + ")")
        if ema is not None:
            why.append(f"EMA copy present ({len(ema.keys)} keys under {T.EMA_PREFIX})")
        return "full", "; ".join(why)
    if T.NAME_EMA_ONLY.search(model.path.name):
        return (
            "ema-only",
            "heuristic: the file name says ema-only; the keys cannot tell EMA weights from raw "
            "ones",
        )
    return "pruned", "no EMA copy and no training state"


def _nearest(
    tensors: dict[str, TensorInfo], counts: Counter[Candidate]
) -> tuple[str | None, str | None]:
    """The closest known layout to a file that fits none, named only when it is close, with
    what it would take (missing / extra keys) in one line."""
    if not tensors:
        return None, "the file holds no tensors"
    sigs = K.signatures()
    # score: (keys explained, share of the layout found); a checkpoint wins ties
    best: tuple[tuple[int, float], str, str] | None = None
    for arch, parts in T.CHECKPOINTS.items():
        matches = [_evaluate((sid, prefix, False), tensors) for sid, prefix in parts]
        found = sum(m.found for m in matches)
        expected = sum(m.expected for m in matches)
        score = (found, found / expected)
        if found and (best is None or score > best[0]):
            need = [
                (f"{m.label} absent ({m.expected} keys)" if m.found == 0 else
                 f"{len(m.missing)} {m.label} keys missing (e.g. {m.missing[0]})")
                for m in matches if m.missing
            ]  # fmt: skip
            owned = {k for m in matches for k in m.keys}
            extra = sum(1 for k in tensors if k not in owned and not _incidental(k))
            best = (score, f"{T.ARCH_LABELS[arch]} checkpoint", _need(need, extra))
    for (sid, prefix, alias), n in counts.items():
        sig = sigs[sid]
        if sig.meta.role == "aux":
            continue  # a noise schedule alone is nobody's nearest model
        score = (n, n / max(1, len(sig.required)))
        if best is None or score > best[0]:
            m = _evaluate((sid, prefix, alias), tensors)
            where = f"under {prefix!r}" if prefix else "bare"
            need = [f"{len(m.missing)} {m.label} keys missing (e.g. {m.missing[0]})"] * bool(
                m.missing
            )
            extra = sum(1 for k in tensors if k not in set(m.keys) and not _incidental(k))
            best = (score, f"{sig.meta.label} {where}", _need(need, extra))
    if best is None:
        return None, "no key matches any known layout"
    if best[0][1] < T.NEAREST_FRACTION:
        return None, (
            f"nothing close: the best fit, {best[1]}, has {best[0][1]:.0%} of its keys "
            f"(a match needs {T.PRESENT_FRACTION:.0%})"
        )
    return best[1], best[2]


def _incidental(key: str) -> bool:
    """Keys that fit beside any layout (markers, the noise schedule): never "extra"."""
    return any(m.pattern.fullmatch(key) for m in T.MARKERS) or key in K.signatures()[
        "scheduler"
    ].shapes.get("sd", {})


def _need(parts: list[str], extra: int) -> str:
    more = [f"{extra} extra key{'' if extra == 1 else 's'}"] if extra else []
    return "would need " + ", ".join(parts + more) if parts else ", ".join(more) or "fits"


# -- LoRA, embedding, hypernetwork ---------------------------------------------------------------


_ANY_LORA_SUFFIX = tuple(s.suffix for s in T.LORA_SUFFIXES)
_QUANT_DATA = re.compile("|".join(f"(?:{p.pattern})" for p, _ in T.QUANT_DATA))
_FAMILY_HEADS = tuple({f.all_of[0] for f in T.FAMILIES})


def _lora_suffix(key: str) -> T.LoraSuffix | None:
    if not key.endswith(_ANY_LORA_SUFFIX):
        return None
    for s in T.LORA_SUFFIXES:
        if key.endswith(s.suffix):
            return s
    return None


def _lora_target(module: str) -> str:
    rest = module
    for _ in range(3):
        for prefix, target in T.LORA_TARGETS:
            if rest.startswith(prefix):
                if target:
                    return target
                rest = rest[len(prefix) :]
                break
        else:
            return "other"
    return "other"


def _lora(tensors: dict[str, TensorInfo], meta: dict[str, str]) -> Special | None:
    factors: Counter[str] = Counter()
    modules: dict[str, str] = {}
    ranks: dict[str, int] = {}
    owned: dict[str, str] = {}
    widths: dict[str, int] = {}
    alpha_tensors = 0
    modifiers: set[str] = set()
    for key, info in tensors.items():
        s = _lora_suffix(key)
        if s is None:
            continue
        module = key[: -len(s.suffix)]
        if s.flavour.startswith("+"):
            modifiers.add(s.flavour)
            alpha_tensors += s.flavour == "+alpha"
            owned[key] = module
            continue
        factors[s.flavour] += 1
        modules[module] = _lora_target(module)
        owned[key] = module
        if s.rank_axis is not None and len(info.shape) > s.rank_axis:
            ranks[module] = info.shape[s.rank_axis]
            if len(info.shape) > 1:
                widths[module] = info.shape[1]
    if not factors or len(owned) < 0.5 * len(tensors):
        return None
    tokens = [k for k in tensors if k not in owned and k.startswith("<") and k.endswith(">")]
    flavour = "+".join(sorted(factors))
    algo = _lycoris_algo(meta)
    if algo and flavour == "kohya":
        flavour = f"lycoris-{algo}"
    if "+dora" in modifiers:
        flavour += " (DoRA)"
    per_target = Counter(modules.values())
    order = ("unet", "te1", "te2", "te3", "other")
    trainer, trainer_src = _trainer(tensors, meta)
    lora = LoraInfo(
        flavour=flavour,
        factors=dict(factors),
        ranks=dict(Counter(ranks.values())),
        alphas=(meta["ss_network_alpha"],) if "ss_network_alpha" in meta else (),
        alpha_tensors=alpha_tensors,
        modules={t: per_target[t] for t in order if per_target[t]},
        tokens=tuple(tokens),
        network={k: v for k, v in meta.items() if k.startswith("ss_network_")},
        trainer=trainer,
        trainer_source=trainer_src,
    )
    arch, src = _lora_arch(tensors, modules, widths)
    ownership = {k: f"lora-{modules.get(m, _lora_target(m))}" for k, m in owned.items()}
    ownership.update({t: "embedding" for t in tokens})
    return "lora", lora, arch, src, ownership


def _trainer(tensors: dict[str, TensorInfo], meta: dict[str, str]) -> tuple[str | None, str | None]:
    from sdtool.identify.lora_rows import TRAINERS

    for t in TRAINERS:
        if t.meta_key is not None:
            if t.meta_key.endswith("*"):
                hits = [k for k in meta if k.startswith(t.meta_key[:-1])]
            else:
                hits = [t.meta_key] if t.meta_key in meta else []
            for k in hits:
                if t.meta_value is None or t.meta_value in meta[k].lower():
                    return t.name, f"metadata {k}"
        elif t.key_pattern is not None:
            hit = next((k for k in tensors if t.key_pattern.search(k)), None)
            if hit is not None:
                return t.name, f"tensor names like {hit!r}"
    return None, None


def _lycoris_algo(meta: dict[str, str]) -> str | None:
    if "lycoris" not in meta.get("ss_network_module", ""):
        return None
    try:
        args = json.loads(meta.get("ss_network_args", "{}"))
    except ValueError:
        return None
    algo = args.get("algo") if isinstance(args, dict) else None
    return str(algo) if algo else "locon"


def _lora_arch(
    tensors: dict[str, TensorInfo], modules: dict[str, str], widths: dict[str, int]
) -> tuple[str | None, str | None]:
    if any(t == "te2" for t in modules.values()):
        return "sdxl-base", "a second text encoder is adapted"
    from sdtool.identify.lora_rows import LORA_CONTEXT_MODULE, LORA_MODULE_ARCH

    for row in LORA_MODULE_ARCH:
        hits = [m for m in modules if row.pattern.search(m)]
        if not hits:
            continue
        if row.widths is not None:
            seen = [widths[m] for m in hits if m in widths]
            w = next((x for x in seen if x in row.widths), None)
            if w is not None:
                return row.widths[w], f"{row.what} in module names, width {w}"
        if row.arch:
            return row.arch, f"{row.what} in module names"
    for key, info in tensors.items():
        s = _lora_suffix(key)
        if s is None or s.rank_axis is None or not LORA_CONTEXT_MODULE.search(key):
            continue
        # the factor that reads the cross-attention context: its input width is the context width
        width = info.shape[1] if len(info.shape) > 1 else None
        if width in T.LORA_CONTEXT_WIDTH:
            return T.LORA_CONTEXT_WIDTH[width], f"cross-attention context width {width}"
    return None, None


def _embedding(tensors: dict[str, TensorInfo]) -> Special | None:
    if not tensors or len(tensors) > 64:
        return None
    if not all(T.EMBEDDING_KEYS.fullmatch(k) for k in tensors):
        return None
    if not all(1 <= len(t.shape) <= 2 and t.dtype.is_float for t in tensors.values()):
        return None
    names = set(tensors)
    dims = tuple(sorted({t.shape[-1] for t in tensors.values()}))
    vectors = {k: (t.shape[0] if len(t.shape) == 2 else 1) for k, t in tensors.items()}
    shapes = {k: list(t.shape) for k, t in tensors.items()}
    owned = dict.fromkeys(names, "embedding")
    if set(T.EMBEDDING_SDXL) <= names:
        info = EmbeddingInfo("sdxl", vectors["clip_l"], dims, shapes)
        return "embedding", info, "sdxl-base", "clip_l and clip_g vectors", owned
    layout = (
        "emb_params" if "emb_params" in names
        else "string_to_param" if any(k.startswith("string_to_param") for k in names)
        else "tokens"
    )  # fmt: skip
    if layout == "tokens" and not all(k.startswith("<") or k == "*" for k in names):
        return None
    info = EmbeddingInfo(layout, sum(vectors.values()), dims, shapes)
    arch = T.EMBEDDING_DIMS.get(dims[0]) if len(dims) == 1 else None
    src = f"vector width {dims[0]}" if arch else None
    return "embedding", info, arch, src, owned


#: Context widths of hypernetwork layers -> architectures they serve.
_HN_CONTEXT = {768: "sd1", 1024: "sd2"}


def _hypernetwork(tensors: dict[str, TensorInfo], extra: dict[str, Any]) -> Special | None:
    hits = [k for k in tensors if T.HYPERNETWORK_KEY.fullmatch(k)]
    has_extra = all(k in extra for k in T.HYPERNETWORK_EXTRA)
    if not (has_extra or (tensors and len(hits) >= 0.5 * len(tensors))):
        return None
    widths = sorted({int(k.split(".", 1)[0]) for k in hits})
    info = {
        "widths": widths,
        "tensors": len(hits),
        "layer_structure": extra.get("layer_structure"),
        "activation_func": extra.get("activation_func"),
    }
    info = json.loads(json.dumps(info, default=str))
    serves = [a for wd, a in sorted(_HN_CONTEXT.items()) if wd in widths]
    arch = "sd1-sd2" if len(serves) == 2 else serves[0] if serves else None
    src = (
        " and ".join(f"a {wd}-wide context layer" for wd in sorted(_HN_CONTEXT) if wd in widths)
        if serves
        else None
    )
    return "hypernetwork", info, arch, src, dict.fromkeys(hits, "hypernetwork")


def _precision(tensors: dict[str, TensorInfo]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t in tensors.values():
        d = out.setdefault(t.type_code, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += t.nbytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))
