"""What a model file is: kind, architecture, variant, components, EMA, precision, junk.

Works from the header only (names, shapes and dtypes of ``model.tensors``, plus
``model.metadata`` and ``model.extra``); tensor bytes are never read. Every fact comes from the
tables in ``sdtool.ops.signatures``: key sets per component (found under any prefix), shapes that
tell architectures apart, marker keys, LoRA suffixes, metadata maps. A file that fits nothing
says so and names the nearest match with what kept it from matching.

Example:
    >>> with open_model("v1-5-pruned.safetensors") as m:
    ...     print("\\n".join(identify(m).summary_lines()))
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sdtool.model import ModelFile, TensorInfo
from sdtool.ops import signatures as S

SCHEMA = "sdtool.identify/1"
LIST_LIMIT = 10  # missing keys / mismatches listed per component
UNKNOWN_LIMIT = 100  # unknown keys listed in JSON

ROLE_ORDER = {"denoiser": 0, "controlnet": 1, "vae": 2, "text-encoder": 3, "aux": 4, "ema": 5}


@dataclass
class ShapeMismatch:
    key: str
    shape: tuple[int, ...]
    expected: tuple[int, ...]


@dataclass
class ComponentMatch:
    """One component found in the file: where, how complete, and what does not fit."""

    name: str  # "unet", "vae", "clip-l", "ema" ...
    signature: str  # the key-set signature id ("unet-ldm", "openclip-g" ...)
    label: str  # "UNet", "CLIP-L" ...
    role: str  # "denoiser", "vae", "text-encoder", "controlnet", "aux", "ema"
    layout: str  # "ldm" or "diffusers"
    prefix: str  # the key prefix in this file ("" for a bare component)
    found: int  # required keys found
    expected: int  # required keys
    keys: list[str] = field(default_factory=list)  # every file key this component claims
    missing: list[str] = field(default_factory=list)  # full key names
    mismatches: list[ShapeMismatch] = field(default_factory=list)
    profile: str | None = None  # the shape set compared against (an architecture)
    alias: bool = False  # matched through an older key spelling

    @property
    def complete(self) -> bool:
        return self.found == self.expected

    @property
    def fraction(self) -> float:
        return self.found / self.expected if self.expected else 0.0

    def count_text(self) -> str:
        return f"{self.label} {self.found}/{self.expected}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "signature": self.signature,
            "label": self.label,
            "role": self.role,
            "layout": self.layout,
            "prefix": self.prefix,
            "found": self.found,
            "expected": self.expected,
            "tensors": len(self.keys),
            "complete": self.complete,
            "missing_count": len(self.missing),
            "missing": self.missing[:LIST_LIMIT],
            "shape_profile": self.profile,
            "mismatch_count": len(self.mismatches),
            "shape_mismatches": [
                {"key": m.key, "shape": list(m.shape), "expected": list(m.expected)}
                for m in self.mismatches[:LIST_LIMIT]
            ],
        }


@dataclass
class LoraInfo:
    """What a LoRA adapts and how: flavour, ranks, alphas, modules per target."""

    flavour: str
    factors: dict[str, int]  # flavour -> tensors
    ranks: dict[int, int]  # rank -> modules
    alphas: list[str]  # from metadata (ss_network_alpha); values of .alpha tensors are not read
    alpha_tensors: int
    modules: dict[str, int]  # "unet" / "te1" / "te2" / "te3" / "other" -> modules
    tokens: list[str]  # embedded textual-inversion tokens (cloneofsimo "<s1>" ...)
    network: dict[str, str]  # kohya ss_network_* metadata, when present

    def to_json(self) -> dict[str, Any]:
        return {
            "flavour": self.flavour,
            "factors": self.factors,
            "ranks": {str(k): v for k, v in sorted(self.ranks.items())},
            "alphas": self.alphas,
            "alpha_tensors": self.alpha_tensors,
            "modules": self.modules,
            "tokens": self.tokens,
            "network": self.network,
        }


@dataclass
class EmbeddingInfo:
    """A textual-inversion embedding: vectors per token and their width."""

    layout: str  # "emb_params", "string_to_param", "sdxl", "tokens"
    vectors: int
    dims: list[int]
    tokens: dict[str, list[int]]  # tensor name -> shape

    def to_json(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "vectors": self.vectors,
            "dims": self.dims,
            "tokens": self.tokens,
        }


@dataclass
class Identity:
    """The answer. ``to_json`` is the stable schema (docs/identify.md)."""

    kind: str
    architecture: str | None = None
    architecture_source: str | None = None
    variant: str | None = None
    prediction: str | None = None
    prediction_source: str | None = None
    prediction_heuristic: bool = False
    ema: bool = False
    precision: dict[str, dict[str, int]] = field(default_factory=dict)
    pruning: str | None = None
    pruning_note: str | None = None
    components: list[ComponentMatch] = field(default_factory=list)
    markers: dict[str, str] = field(default_factory=dict)  # key -> meaning
    training_state: list[str] = field(default_factory=list)  # extra entries that are not weights
    unknown_keys: list[str] = field(default_factory=list)
    lora: LoraInfo | None = None
    embedding: EmbeddingInfo | None = None
    hypernetwork: dict[str, Any] | None = None
    nearest: str | None = None
    nearest_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    # -- lookups --------------------------------------------------------------------------------

    def component(self, name: str) -> ComponentMatch | None:
        """The first component called ``name`` ("unet", "vae", "clip-l", "ema" ...)."""
        return next((c for c in self.components if c.name == name), None)

    def by_role(self, role: str) -> list[ComponentMatch]:
        return [c for c in self.components if c.role == role]

    @property
    def architecture_label(self) -> str | None:
        return S.ARCH_LABELS.get(self.architecture or "")

    @property
    def precision_text(self) -> str:
        parts = sorted(self.precision.items(), key=lambda kv: -kv[1]["bytes"])
        return (
            ", ".join(
                f"{code} ({d['tensors']} tensor{'' if d['tensors'] == 1 else 's'})"
                for code, d in parts
            )
            or "none"
        )

    # -- output ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "kind": self.kind,
            "architecture": self.architecture,
            "architecture_label": self.architecture_label,
            "architecture_source": self.architecture_source,
            "variant": self.variant,
            "prediction": {
                "type": self.prediction,
                "source": self.prediction_source,
                "heuristic": self.prediction_heuristic,
            },
            "ema": self.ema,
            "precision": self.precision,
            "pruning": {"state": self.pruning, "note": self.pruning_note},
            "components": [c.to_json() for c in self.components],
            "markers": self.markers,
            "training_state": self.training_state,
            "unknown_count": len(self.unknown_keys),
            "unknown_keys": self.unknown_keys[:UNKNOWN_LIMIT],
            "lora": self.lora.to_json() if self.lora else None,
            "embedding": self.embedding.to_json() if self.embedding else None,
            "hypernetwork": self.hypernetwork,
            "nearest": (
                {"match": self.nearest, "reason": self.nearest_reason}
                if self.kind == "unknown"
                else None
            ),
            "notes": self.notes,
        }

    def summary_lines(self) -> list[str]:
        """Plain lines for ``sdtool inspect`` (file text inside them is not escaped here)."""
        head = self.kind
        extras = [x for x in (self.architecture_label, self.variant) if x]
        if extras:
            head += f" ({', '.join(extras)})"
        lines = [f"kind: {head}"]
        if self.architecture:
            lines.append(f"architecture: {self.architecture_label} — {self.architecture_source}")
        if self.kind == "unknown":
            lines.append(
                f"not recognised; nearest: {self.nearest or 'none'} — {self.nearest_reason}"
            )
        if self.kind in ("checkpoint", "unet"):
            pred = self.prediction or "not stated"
            if self.prediction_source:
                tag = "heuristic: " if self.prediction_heuristic else ""
                pred += f" ({tag}{self.prediction_source})"
            lines.append(f"prediction: {pred}")
            ema = self.component("ema")
            lines.append(
                f"EMA: yes ({ema.found}/{ema.expected} keys under {ema.prefix})"
                if ema
                else "EMA: no"
            )
        if self.pruning:
            lines.append(f"pruning: {self.pruning} — {self.pruning_note}")
        lines.append(f"precision: {self.precision_text}")
        if self.components:
            shown = [c for c in self.components if c.role != "ema"]
            lines.append("components: " + ", ".join(c.count_text() for c in shown))
            for c in self.components:
                where = f" under {c.prefix!r}" if c.prefix else " (bare)"
                if c.missing:
                    lines.append(
                        f"  {c.label}{where}: {len(c.missing)} keys missing: " + _few(c.missing)
                    )
                if c.mismatches:
                    m = c.mismatches[0]
                    lines.append(
                        f"  {c.label}{where}: {len(c.mismatches)} shape mismatches vs "
                        f"{S.ARCH_LABELS.get(c.profile or '', c.profile)}, e.g. {m.key} "
                        f"{list(m.shape)} (expected {list(m.expected)})"
                    )
        if self.lora:
            lo = self.lora
            ranks = ", ".join(f"{r} ({n})" for r, n in sorted(lo.ranks.items())) or "?"
            mods = ", ".join(f"{k} {v}" for k, v in lo.modules.items())
            alpha = ", ".join(lo.alphas) if lo.alphas else "not in metadata"
            lines.append(f"LoRA: {lo.flavour}; rank {ranks}; alpha {alpha}; modules: {mods}")
            if lo.alpha_tensors:
                lines.append(f"  {lo.alpha_tensors} .alpha tensors (values are tensor data)")
            if lo.tokens:
                lines.append(f"  embedded tokens: {', '.join(lo.tokens)}")
        if self.embedding:
            e = self.embedding
            lines.append(
                f"embedding: {e.vectors} vectors, width {'+'.join(map(str, e.dims))} ({e.layout})"
            )
        if self.hypernetwork:
            h = self.hypernetwork
            lines.append(f"hypernetwork: widths {h['widths']}, {h['tensors']} tensors")
        if self.markers:
            lines.append("markers: " + ", ".join(f"{k} ({v})" for k, v in self.markers.items()))
        if self.training_state:
            lines.append("training state: " + ", ".join(self.training_state))
        if self.unknown_keys:
            lines.append(f"unknown keys ({len(self.unknown_keys)}): {_few(self.unknown_keys, 5)}")
        lines.extend(f"note: {n}" for n in self.notes)
        return lines


def _few(items: list[str], n: int = 3) -> str:
    more = f" … (+{len(items) - n})" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# =============================================================================================
# The engine
# =============================================================================================


def identify(model: ModelFile) -> Identity:
    """Identify a model file from its header: kind, architecture, components, EMA, junk.

    Never reads tensor bytes. Returns an Identity whose ``kind`` is ``"unknown"`` (with
    ``nearest``/``nearest_reason``) when nothing fits.

    Example:
        >>> ident = identify(open_model("model.safetensors"))
        >>> ident.kind, ident.architecture
        ('checkpoint', 'sd1')
    """
    tensors = model.tensors
    ident = Identity(kind="unknown")
    ident.precision = _precision(tensors)
    ident.training_state = [k for k in model.extra if k in S.TRAINING_STATE]
    meta_arch, meta_kind, meta_src = _metadata_arch(model.metadata)

    special = _lora(tensors, model.metadata) or _embedding(tensors, model.extra)
    if special is None:
        special = _hypernetwork(tensors, model.extra)
    if special is not None:
        ident.kind, info, arch, src, claimed = special
        if isinstance(info, LoraInfo):
            ident.lora = info
        elif isinstance(info, EmbeddingInfo):
            ident.embedding = info
        else:
            ident.hypernetwork = info
        ident.architecture, ident.architecture_source = arch, src
        if arch is None and meta_arch is not None:
            ident.architecture, ident.architecture_source = meta_arch, meta_src
        elif meta_arch is not None and meta_arch != arch:
            ident.notes.append(f"metadata says {S.ARCH_LABELS[meta_arch]} ({meta_src})")
        ident.unknown_keys = [k for k in tensors if k not in claimed]
        return ident

    counts = _candidates(tensors)
    ident.components = _claim(counts, tensors)
    claimed = {k for c in ident.components for k in c.keys}
    ema = _ema(tensors, ident.components)
    if ema is not None:
        ident.components.append(ema)
        claimed.update(ema.keys)
        ident.ema = True
    for key in tensors:
        if key in claimed:
            continue
        for marker in S.MARKERS:
            if marker.pattern.fullmatch(key):
                ident.markers[key] = marker.meaning
                claimed.add(key)
                break
    ident.unknown_keys = [k for k in tensors if k not in claimed]

    _architecture(ident, tensors, meta_arch, meta_src)
    ident.kind = _kind(ident.components, meta_kind)
    if ident.kind == "unknown":
        ident.nearest, ident.nearest_reason = _nearest(tensors, counts)
    _variant(ident, tensors)
    _prediction(ident, model)
    _pruning(ident, model)
    for c in ident.components:
        _shapes(c, tensors, ident.architecture)
    return ident


# -- components --------------------------------------------------------------------------------

Candidate = tuple[str, str, bool]  # signature id, prefix, via alias


def _candidates(tensors: dict[str, TensorInfo]) -> Counter[Candidate]:
    """How many keys each (signature, prefix) explains: every key is split at each dot."""
    index = S.component_index()
    counts: Counter[Candidate] = Counter()
    for key in tensors:
        pos = -1
        while True:
            for sid, alias in index.get(key[pos + 1 :], ()):
                counts[(sid, key[: pos + 1], alias)] += 1
            pos = key.find(".", pos + 1)
            if pos < 0:
                break
    return counts


def _full_key(sig: S.Signature, prefix: str, rel: str, alias: bool) -> str:
    if alias:
        for old, new in sig.meta.aliases:
            if rel.startswith(old):
                return prefix + new + rel[len(old) :]
    return prefix + rel


def _evaluate(cand: Candidate, tensors: dict[str, TensorInfo]) -> ComponentMatch:
    sid, prefix, alias = cand
    sig = S.signatures()[sid]
    optional = sig.optional | S.optional_at(sid, prefix)
    keys, missing, required = [], [], 0
    for rel in sig.keys:
        full = _full_key(sig, prefix, rel, alias)
        if full in tensors:
            keys.append(full)
        elif rel not in optional:
            missing.append(full)
        required += rel not in optional
    m = sig.meta
    # optional keys that are there count on both sides: "CLIP-L 197/197" with position_ids
    extra_optional = len(keys) - (required - len(missing))
    return ComponentMatch(
        m.name, sid, m.label, m.role, m.layout, prefix, len(keys), required + extra_optional,
        keys=keys, missing=missing, alias=alias,
    )  # fmt: skip


def _claim(counts: Counter[Candidate], tensors: dict[str, TensorInfo]) -> list[ComponentMatch]:
    """Best-fitting components first; each key belongs to one component."""
    sigs = S.signatures()
    cands = [
        _evaluate(c, tensors)
        for c, n in counts.items()
        if n >= S.PRESENT_FRACTION * len(sigs[c[0]].required)
    ]
    cands.sort(key=lambda m: (-m.fraction, -len(m.keys), m.alias, len(m.prefix)))
    taken: set[str] = set()
    out: list[ComponentMatch] = []
    for m in cands:
        free = [k for k in m.keys if k not in taken]
        if len(free) < len(m.keys) or m.fraction < S.PRESENT_FRACTION:
            continue  # another reading of these keys already fits better
        taken.update(free)
        out.append(m)
    out.sort(key=lambda m: (ROLE_ORDER.get(m.role, 9), m.prefix))
    return out


def ema_key(key: str) -> str:
    """The EMA twin of a ``model.``-prefixed key: dots after the prefix removed (FORMATS.md 4)."""
    return S.EMA_PREFIX + key[len("model.") :].replace(".", "")


def _ema(tensors: dict[str, TensorInfo], comps: list[ComponentMatch]) -> ComponentMatch | None:
    """The ``model_ema.*`` copy of the denoiser, counted against the denoiser's key set."""
    ema_keys = [k for k in tensors if k.startswith(S.EMA_PREFIX)]
    if not ema_keys:
        return None
    have = set(ema_keys)
    best: tuple[int, list[str], list[str]] | None = None
    for sid in ("unet-ldm", "unet-sdxl", "unet-sdxl-refiner"):
        sig = S.signatures()[sid]
        expected = [ema_key("model.diffusion_model." + rel) for rel in sig.required]
        hits = [k for k in expected if k in have]
        if best is None or len(hits) > best[0]:
            best = (len(hits), hits, [k for k in expected if k not in have])
    assert best is not None
    found, hits, missing = best
    if found == 0:
        return None  # model_ema.* keys, but not the dotless UNet copy: left to the markers
    return ComponentMatch(
        "ema", "ema", "EMA", "ema", "ldm", S.EMA_PREFIX, found, found + len(missing),
        keys=hits, missing=missing,
    )  # fmt: skip


def _shapes(c: ComponentMatch, tensors: dict[str, TensorInfo], arch: str | None) -> None:
    """Compare shapes with the architecture's set (or the closest one); the variant axis is free."""
    if c.role == "ema":
        return
    sig = S.signatures()[c.signature]
    vkey, vaxis = S.VARIANT_KEYS.get(c.signature, ("", -1))
    best: tuple[int, str, list[ShapeMismatch]] | None = None
    for profile, shapes in sig.shapes.items():
        mism = []
        for rel, want in shapes.items():
            info = tensors.get(_full_key(sig, c.prefix, rel, c.alias))
            if info is None:
                continue
            got = info.shape
            if rel == vkey and len(got) == len(want) > vaxis:
                got = (*got[:vaxis], want[vaxis], *got[vaxis + 1 :])
            if got != want:
                mism.append(ShapeMismatch(_full_key(sig, c.prefix, rel, c.alias), info.shape, want))
        rank = 0 if profile == arch else 1
        if best is None or (len(mism), rank) < (len(best[2]), 0 if best[1] == arch else 1):
            best = (len(mism), profile, mism)
    if best is not None:
        c.profile, c.mismatches = best[1], best[2]


# -- kind, architecture, variant ---------------------------------------------------------------

#: roles present -> kind, first match wins (a denoiser with anything else is a checkpoint)
KIND_RULES: tuple[tuple[frozenset[str], frozenset[str], str], ...] = (
    # (must have all of, must have none of, kind)
    (frozenset({"denoiser", "vae"}), frozenset(), "checkpoint"),
    (frozenset({"denoiser", "text-encoder"}), frozenset(), "checkpoint"),
    (frozenset({"controlnet"}), frozenset({"denoiser"}), "controlnet"),
    (frozenset({"denoiser"}), frozenset(), "unet"),
    (frozenset({"vae", "text-encoder"}), frozenset(), "checkpoint"),
    (frozenset({"vae"}), frozenset(), "vae"),
    (frozenset({"text-encoder"}), frozenset(), "text-encoder"),
)


def _kind(comps: list[ComponentMatch], meta_kind: str | None) -> str:
    roles = {c.role for c in comps}
    kind = next((k for need, no, k in KIND_RULES if need <= roles and not no & roles), None)
    if kind is None:
        return "unknown"
    main = [c for c in comps if c.role in ("denoiser", "vae", "text-encoder", "controlnet")]
    if kind in ("unet", "vae", "text-encoder") and all(
        # a lone text encoder at the root is in transformers' own layout (a diffusers folder file)
        c.layout == "diffusers" or (c.role == "text-encoder" and c.prefix == "")
        for c in main
    ):
        return "diffusers-component"
    return kind


def _metadata_arch(meta: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    """(architecture, kind, source) from ModelSpec or kohya metadata."""
    spec = meta.get("modelspec.architecture", "")
    if spec:
        base, _, suffix = spec.partition("/")
        arch = next((a for p, a in S.MODELSPEC_ARCH if base.lower().startswith(p)), None)
        return arch, S.MODELSPEC_KIND.get(suffix), f"metadata modelspec.architecture={spec!r}"
    ss = meta.get("ss_base_model_version", "")
    if ss:
        arch = next((a for p, a in S.SS_BASE if ss.startswith(p)), None)
        return arch, None, f"metadata ss_base_model_version={ss!r}"
    if meta.get("ss_v2") == "True":
        return "sd2", None, "metadata ss_v2=True"
    return None, None, None


def _architecture(
    ident: Identity, tensors: dict[str, TensorInfo], meta_arch: str | None, meta_src: str | None
) -> None:
    hints: list[tuple[int, str, str]] = []  # (priority, arch, why)
    for c in ident.components:
        prio = ROLE_ORDER.get(c.role, 9)
        for rule in S.SHAPE_RULES:
            if rule.sig != c.signature:
                continue
            info = tensors.get(c.prefix + rule.key)
            if info is None or len(info.shape) <= rule.axis:
                continue
            v = info.shape[rule.axis]
            if v in rule.values:
                hints.append((prio, rule.values[v], f"{c.label} {rule.what} {v}"))
            else:
                ident.notes.append(f"{c.label} {rule.what} {v} matches no known architecture")
        for p in S.PRESENCE_RULES:
            if p.sig == c.signature:
                there = c.prefix + p.key in tensors
                hints.append(
                    (prio, p.present if there else p.absent,
                     f"{c.label} {p.what} {'present' if there else 'absent'}")
                )  # fmt: skip
        if c.signature in S.SIG_ARCH:
            hints.append((prio, S.SIG_ARCH[c.signature], f"{c.label} present"))
        for pl in S.PLACEMENTS:
            if pl.sig == c.signature and pl.prefix == c.prefix:
                hints.append((prio, pl.arch, f"{c.label} under {c.prefix!r}"))
    if meta_arch is not None and meta_src is not None:
        hints.append((8, meta_arch, meta_src))
    if not hints:
        return
    hints.sort(key=lambda h: h[0])
    ident.architecture = hints[0][1]
    agree = [why for _, a, why in hints if a == ident.architecture]
    ident.architecture_source = "; ".join(agree)
    for _, a, why in hints:
        if a != ident.architecture:
            ident.notes.append(f"conflicting hint: {why} suggests {S.ARCH_LABELS[a]}")


def _variant(ident: Identity, tensors: dict[str, TensorInfo]) -> None:
    for c in ident.by_role("denoiser"):
        vk = S.VARIANT_KEYS.get(c.signature)
        if vk is None:
            continue
        info = tensors.get(c.prefix + vk[0])
        if info is None or len(info.shape) <= vk[1]:
            continue
        ch = info.shape[vk[1]]
        if ch in S.VARIANTS:
            ident.variant = S.VARIANTS[ch]
        else:
            ident.notes.append(f"UNet input conv has {ch} in-channels (no known variant)")


def _prediction(ident: Identity, model: ModelFile) -> None:
    for key in ident.markers:
        for marker in S.MARKERS:
            if marker.prediction and marker.pattern.fullmatch(key):
                ident.prediction, ident.prediction_source = marker.prediction, f"marker key {key!r}"
                return
    meta = model.metadata
    pt = meta.get("modelspec.prediction_type", "").lower()
    if pt in S.MODELSPEC_PREDICTION:
        ident.prediction = S.MODELSPEC_PREDICTION[pt]
        ident.prediction_source = f"metadata modelspec.prediction_type={pt!r}"
        return
    if meta.get("ss_v_parameterization") == "True":
        ident.prediction, ident.prediction_source = "v", "metadata ss_v_parameterization=True"
        return
    if ident.architecture in ("sd3", "flux-dev", "flux-schnell"):
        ident.prediction, ident.prediction_source = "flow", "rectified-flow architecture"
        return
    for pattern, pred in S.NAME_PREDICTION:
        if pattern.search(model.path.name):
            ident.prediction = pred
            ident.prediction_source = f"the file name matches {pattern.pattern!r}"
            ident.prediction_heuristic = True
            return
    if ident.architecture == "sd2" and ident.kind in ("checkpoint", "unet"):
        ident.notes.append(
            "SD 2.x has no v-prediction marker: v (768-v) or epsilon (512-base) cannot be told "
            "from the weights"
        )


def _pruning(ident: Identity, model: ModelFile) -> None:
    if ident.kind not in ("checkpoint", "unet"):
        return
    ema = ident.component("ema")
    if ident.training_state or ema is not None:
        why = []
        if ident.training_state:
            why.append("training state present (" + ", ".join(ident.training_state) + ")")
        if ema is not None:
            why.append(f"EMA copy present ({len(ema.keys)} keys under {S.EMA_PREFIX})")
        ident.pruning, ident.pruning_note = "full", "; ".join(why)
    elif S.NAME_EMA_ONLY.search(model.path.name):
        ident.pruning = "ema-only"
        ident.pruning_note = (
            "heuristic: the file name says ema-only; the keys cannot tell EMA weights from raw ones"
        )
    else:
        ident.pruning = "pruned"
        ident.pruning_note = "no EMA copy and no training state"


def _nearest(
    tensors: dict[str, TensorInfo], counts: Counter[Candidate]
) -> tuple[str | None, str | None]:
    """The closest known layout to a file that fits none, and what kept it from fitting."""
    sigs = S.signatures()
    # score: (keys explained, share of the layout found); a checkpoint wins ties
    best: tuple[tuple[int, float], str, str] | None = None
    for arch, parts in S.CHECKPOINTS.items():
        matches = [_evaluate((sid, prefix, False), tensors) for sid, prefix in parts]
        found = sum(m.found for m in matches)
        score = (found, found / sum(m.expected for m in matches))
        if best is None or score > best[0]:
            why = [
                (f"{m.label} absent" if m.found == 0 else
                 f"{len(m.missing)} {m.label} keys missing" if m.missing else
                 f"{m.label} {m.found}/{m.expected}")
                for m in matches
            ]  # fmt: skip
            best = (score, f"{S.ARCH_LABELS[arch]} checkpoint", ", ".join(why))
    for (sid, prefix, _alias), n in counts.items():
        sig = sigs[sid]
        if sig.meta.role == "aux":
            continue  # a noise schedule alone is nobody's nearest model
        score = (n, n / max(1, len(sig.required)))
        if best is None or score > best[0]:
            where = f"under {prefix!r}" if prefix else "bare"
            best = (
                score,
                f"{sig.meta.label} {where}",
                f"{n} of its {len(sig.required)} keys found (needs "
                f"{S.PRESENT_FRACTION:.0%} to count)",
            )
    if best is None or best[0][0] == 0:
        return None, "no key matches any known layout" if tensors else "the file holds no tensors"
    return best[1], best[2]


# -- LoRA, embedding, hypernetwork ---------------------------------------------------------------

Special = tuple[str, Any, str | None, str | None, set[str]]  # kind, info, arch, source, claimed


def _lora_suffix(key: str) -> S.LoraSuffix | None:
    for s in S.LORA_SUFFIXES:
        if key.endswith(s.suffix):
            return s
    return None


def _lora_target(module: str) -> str:
    rest = module
    for _ in range(3):
        for prefix, target in S.LORA_TARGETS:
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
    claimed: set[str] = set()
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
            claimed.add(key)
            continue
        factors[s.flavour] += 1
        modules[module] = _lora_target(module)
        claimed.add(key)
        if s.rank_axis is not None and len(info.shape) > s.rank_axis:
            ranks[module] = info.shape[s.rank_axis]
    if not factors or len(claimed) < 0.5 * len(tensors):
        return None
    tokens = [k for k in tensors if k not in claimed and k.startswith("<") and k.endswith(">")]
    claimed.update(tokens)
    flavour = "+".join(sorted(factors))
    algo = _lycoris_algo(meta)
    if algo and flavour == "kohya":
        flavour = f"lycoris-{algo}"
    if "+dora" in modifiers:
        flavour += " (DoRA)"
    per_target = Counter(modules.values())
    order = ("unet", "te1", "te2", "te3", "other")
    lora = LoraInfo(
        flavour=flavour,
        factors=dict(factors),
        ranks=dict(Counter(ranks.values())),
        alphas=[meta["ss_network_alpha"]] if "ss_network_alpha" in meta else [],
        alpha_tensors=alpha_tensors,
        modules={t: per_target[t] for t in order if per_target[t]},
        tokens=tokens,
        network={k: v for k, v in meta.items() if k.startswith("ss_network_")},
    )
    arch, src = _lora_arch(tensors, modules)
    return "lora", lora, arch, src, claimed


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
    tensors: dict[str, TensorInfo], modules: dict[str, str]
) -> tuple[str | None, str | None]:
    if any(t == "te2" for t in modules.values()):
        return "sdxl-base", "a second text encoder is adapted"
    for module in modules:
        for pattern, arch, what in S.LORA_MODULE_ARCH:
            if pattern.search(module):
                return arch, f"{what} in module names"
    for key, info in tensors.items():
        s = _lora_suffix(key)
        if s is None or s.rank_axis is None or not S.LORA_CONTEXT_MODULE.search(key):
            continue
        # the factor that reads the cross-attention context: its input width is the context width
        width = info.shape[1] if len(info.shape) > 1 else None
        if width in S.LORA_CONTEXT_WIDTH:
            return S.LORA_CONTEXT_WIDTH[width], f"cross-attention context width {width}"
    return None, None


def _embedding(tensors: dict[str, TensorInfo], extra: dict[str, Any]) -> Special | None:
    if not tensors or len(tensors) > 64:
        return None
    if not all(S.EMBEDDING_KEYS.fullmatch(k) for k in tensors):
        return None
    if not all(1 <= len(t.shape) <= 2 and t.dtype.is_float for t in tensors.values()):
        return None
    names = set(tensors)
    dims = sorted({t.shape[-1] for t in tensors.values()})
    vectors = {k: (t.shape[0] if len(t.shape) == 2 else 1) for k, t in tensors.items()}
    shapes = {k: list(t.shape) for k, t in tensors.items()}
    if set(S.EMBEDDING_SDXL) <= names:
        info = EmbeddingInfo("sdxl", vectors["clip_l"], dims, shapes)
        return "embedding", info, "sdxl-base", "clip_l and clip_g vectors", names
    layout = (
        "emb_params" if "emb_params" in names
        else "string_to_param" if any(k.startswith("string_to_param") for k in names)
        else "tokens"
    )  # fmt: skip
    if layout == "tokens" and not all(k.startswith("<") or k == "*" for k in names):
        return None
    info = EmbeddingInfo(layout, sum(vectors.values()), dims, shapes)
    arch = S.EMBEDDING_DIMS.get(dims[0]) if len(dims) == 1 else None
    src = f"vector width {dims[0]}" if arch else None
    return "embedding", info, arch, src, names


def _hypernetwork(tensors: dict[str, TensorInfo], extra: dict[str, Any]) -> Special | None:
    hits = [k for k in tensors if S.HYPERNETWORK_KEY.fullmatch(k)]
    has_extra = all(k in extra for k in S.HYPERNETWORK_EXTRA)
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
    arch = "sd2" if 1024 in widths else "sd1" if 768 in widths else None
    src = (
        "a 1024-wide context layer"
        if arch == "sd2"
        else "a 768-wide context layer"
        if arch
        else None
    )
    return "hypernetwork", info, arch, src, set(hits)


def _precision(tensors: dict[str, TensorInfo]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t in tensors.values():
        d = out.setdefault(t.type_code, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += t.nbytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))
