"""Prune and extract: a plan of what to keep, from what the file IS, then one streaming write.

``plan_prune``/``plan_extract`` are pure: from an opened model, its identity and the options they
return a PrunePlan (output tensors with their sources and dtypes, and every dropped tensor or
entry with the reason). ``prune``/``extract`` add the write through ``write_model`` (streaming,
atomic, optionally verified). What is kept follows ``identify``'s components, never a prefix
allowlist, so SDXL's ``conditioner.*`` text encoders survive.

Example:
    >>> result = prune("sd15.ckpt", "sd15-ema.safetensors", ema="only", dtype="fp16")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from operator import attrgetter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sdtool import dtypes
from sdtool.dtypes import DType
from sdtool.errors import UsageError
from sdtool.formats.open import opened
from sdtool.identify import ComponentMatch, Identity, identify
from sdtool.identify import tables as S
from sdtool.identify.engine import ema_key
from sdtool.model import ModelFile, TensorInfo
from sdtool.ops.outname import derived
from sdtool.results import JsonKey, Result, head, json_key, rows
from sdtool.vocab import CASTABLE, DROP_TARGETS, EXTRACT_TARGETS, cast_target, dtype_name
from sdtool.write import OutTensor, WriteOptions, WriteResult, options_from, write_model

SCHEMA = "sdtool.prune/2"
EMA_MODES = ("keep", "only", "drop")
#: DROP_TARGETS and EXTRACT_TARGETS (the --drop / --component names) live in sdtool.vocab
CLIP_POSITIONS = 77


@dataclass(frozen=True, kw_only=True)
class PruneOptions(WriteOptions):
    """What to keep, and the shared write options (dtype, overwrite, verify ...).

    ``ema``: ``keep`` the EMA copy, ``only`` put it under the model keys, ``drop`` it. The
    defaults keep everything: that is convert.
    """

    ema: str = "keep"
    allow_partial_ema: bool = False
    drop: frozenset[str] = frozenset()
    bake_vae: ModelFile | None = None
    fix_clip: bool = False


@dataclass(frozen=True, kw_only=True)
class ExtractOptions(WriteOptions):
    """Which component to extract (EXTRACT_TARGETS); ``ema``: the UNet from the EMA copy."""

    component: str = ""
    ema: bool = False


@dataclass(frozen=True)
class Totals(Result):
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0

    @classmethod
    def of(cls, sizes: Iterable[tuple[int, int]]) -> Totals:
        """The totals of tensors of these (elements, bytes)."""
        n = params = size = 0
        for numel, nbytes in sizes:
            n, params, size = n + 1, params + numel, size + nbytes
        return cls(n, params, size)


def _sum(per: dict[str, Totals]) -> Totals:
    return Totals(
        sum(v.tensors for v in per.values()),
        sum(v.parameters for v in per.values()),
        sum(v.bytes for v in per.values()),
    )


def _side(per: dict[str, Totals]) -> dict[str, Any]:
    """``before`` / ``after`` in JSON: the total, and the totals per component."""
    return {"total": _sum(per), "components": per}


@dataclass(frozen=True)
class Dropped(Result):
    """A group of dropped tensors (or non-tensor entries) sharing one reason."""

    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = (
        "reason", ("count", "names", len), ("names", "names", head(20)), "totals"
    )  # fmt: skip

    reason: str
    names: list[str] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals, metadata=json_key(inline=True))


@dataclass(frozen=True)
class PrunePlan(Result):
    """The output tensors and the account of everything else."""

    JSON_SCHEMA: ClassVar[str | None] = SCHEMA
    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = (
        "path", ("kind", "identity", attrgetter("kind")),
        ("architecture", "identity", attrgetter("architecture")), "before", "after", "dropped",
        "dropped_entries", "changes", "notes",
    )  # fmt: skip

    path: Path  # the input
    tensors: list[OutTensor]
    identity: Identity
    #: component -> totals in the input
    before: dict[str, Totals] = field(metadata=json_key(as_=_side))
    #: component -> totals in the output
    after: dict[str, Totals] = field(metadata=json_key(as_=_side))
    dropped: list[Dropped]  # tensors, grouped by reason
    #: non-tensor entries (training state): key, reason
    dropped_entries: list[tuple[str, str]] = field(metadata=json_key(as_=rows("key", "reason")))
    changes: list[str]  # what was replaced or recomputed (EMA swap, baked VAE, fixed CLIP)
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def total(self, which: str) -> Totals:
        return _sum(self.before if which == "before" else self.after)


def _output(w: WriteResult | None) -> dict[str, Any] | None:
    """What was written, as prune's JSON says it (None for a dry run)."""
    if w is None:
        return None
    return {
        "path": w.path,
        "format": w.format,
        "bytes": w.nbytes,
        "tensors": w.tensors,
        "verified": w.verified,
        "overflows": w.overflows,
    }


@dataclass(frozen=True)
class PruneResult(Result):
    """A prune or extract: the plan's document, and what was written under ``output``."""

    plan: PrunePlan = field(metadata=json_key(inline=True))
    #: None for a dry run
    write: WriteResult | None = field(metadata=json_key("output", as_=_output))


# -- ownership ------------------------------------------------------------------------------------


def owners(ident: Identity) -> dict[str, ComponentMatch]:
    """file key -> the component that claims it."""
    return {k: c for c in ident.components for k in c.keys}


def _group(key: str, own: dict[str, ComponentMatch], ident: Identity) -> str:
    c = own.get(key)
    if c is not None:
        return c.name
    if key in ident.markers:
        return "ema" if key.startswith(S.EMA_PREFIX) else "markers"
    return "unknown"


def _role(key: str, own: dict[str, ComponentMatch], ident: Identity) -> str:
    c = own.get(key)
    if c is not None:
        return c.role
    if key.startswith(S.EMA_PREFIX) and key in ident.markers:
        return "ema"
    return "marker" if key in ident.markers else "unknown"


# -- the prune plan -------------------------------------------------------------------------------


def out_dtype(info: TensorInfo, dtype: DType | None) -> DType:
    """The dtype ``info`` is written as when ``dtype`` is asked for: the one cast rule."""
    return cast_target(info.dtype, dtype)


def _uncast_notes(tensors: list[OutTensor], dtype: DType | None) -> list[str]:
    """Floating tensors of a dtype sdtool does not cast, which keep theirs (said, not silent)."""
    kept: dict[str, int] = {}
    for t in tensors:
        code = t.info.dtype.code
        if dtype is not None and t.make is None and t.info.dtype.is_float and code not in CASTABLE:
            kept[code] = kept.get(code, 0) + 1
    return [
        f"{n} {code} tensor(s) kept as {code}: sdtool does not cast that dtype"
        for code, n in kept.items()
    ]


#: (options that contradict each other, why); checked before anything is read
_CONTRADICTIONS: tuple[tuple[Callable[[PruneOptions], bool], str], ...] = (
    (
        lambda o: o.allow_partial_ema and o.ema != "only",
        'allow_partial_ema=True applies only with ema="only"',
    ),
    (
        lambda o: o.ema == "only" and "unet" in o.drop,
        'ema="only" puts the EMA weights under the UNet keys, and drop="unet" removes them',
    ),
    (
        lambda o: o.ema == "only" and "ema" in o.drop,
        'ema="only" takes its weights from the EMA copy, and drop="ema" removes it',
    ),
)


def _refuse_contradictions(options: PruneOptions) -> None:
    for broken, why in _CONTRADICTIONS:
        if broken(options):
            raise UsageError(f"options contradict each other: {why}")


def plan_prune(
    model: ModelFile, options: PruneOptions, identity: Identity | None = None
) -> PrunePlan:
    """What ``prune`` would write, and why everything else goes. Reads no tensor bytes except
    the CLIP ``position_ids`` when ``fix_clip`` asks to check them.

    Raises UsageError when the options do not fit the file (no EMA for ``ema="only"``, an
    incomplete EMA copy without ``allow_partial_ema``, a VAE file that does not fit).
    """
    if options.ema not in EMA_MODES:
        raise UsageError(f"ema must be one of {', '.join(EMA_MODES)}")
    unknown_drop = set(options.drop) - set(DROP_TARGETS)
    if unknown_drop:
        raise UsageError(
            f"drop={sorted(unknown_drop)[0]!r} is not a part; use {', '.join(DROP_TARGETS)}"
        )
    _refuse_contradictions(options)
    ident = identity or identify(model)
    own = owners(ident)
    drop_roles = {r for d in options.drop for r in DROP_TARGETS[d]}
    ema_mode = "drop" if "ema" in drop_roles and options.ema == "keep" else options.ema
    unet = _denoiser(ident)
    ema_sources = _ema_sources(model, ident, unet, options) if ema_mode == "only" else {}
    vae_sources = _bake_sources(model, ident, options.bake_vae) if options.bake_vae else {}

    b = _Builder(model, ident, own)
    changes: list[str] = []
    for name, info in model.tensors.items():
        role = _role(name, own, ident)
        if role == "ema":
            why = {
                "only": "EMA copy: its weights now sit under the model keys",
                "drop": "EMA copy dropped (--no-ema)"
                if options.ema == "drop"
                else "EMA copy dropped (--drop ema)",
            }.get(ema_mode)
            if why is not None:
                if name in ident.markers:
                    why = "EMA bookkeeping (decay / num_updates): not a weight"
                b.drop(name, why)
                continue
        if role in drop_roles or (role == "unknown" and "unknown" in drop_roles):
            b.drop(name, f"--drop {_drop_name(role)}")
            continue
        if role == "vae" and vae_sources:
            continue  # the baked VAE's tensors are added below
        source, src_info = model, info
        if ema_mode == "only" and name in ema_sources:
            src_info = ema_sources[name]
        make = None
        if options.fix_clip and name.endswith("embeddings.position_ids"):
            make, why = _clip_fix(model, name, info)
            if make is not None:
                changes.append(f"{name}: {why}; rewritten as int64 arange({CLIP_POSITIONS})")
                src_info = replace(info, dtype=dtypes.from_code("I64"))
        dtype = out_dtype(src_info, options.dtype)
        if make is None and src_info is info:  # a shard set: copy from the shard's own file
            source, src_info = model.locate(name)
        b.keep(OutTensor(name, source, src_info, dtype, make))
    if ema_sources:
        partial = len(unet.keys) - len(ema_sources) if unet else 0
        changes.append(
            f"{len(ema_sources)} UNet tensors take their values from the EMA copy"
            + (f"; {partial} keep the raw weights (--allow-partial-ema)" if partial else "")
        )
    if vae_sources:
        vae_file = options.bake_vae
        assert vae_file is not None
        for name, src in vae_sources.items():
            old = model.tensors.get(name)
            dtype = options.dtype or (old.dtype if old is not None else src.dtype)
            b.keep(OutTensor(name, vae_file, src, out_dtype(src, dtype)), group="vae")
            if old is not None:
                b.replaced(name)
        changes.append(f"VAE replaced by {vae_file.path.name} ({len(vae_sources)} tensors)")
    entries = [
        (k, S.TRAINING_STATE.get(k, "non-weight data outside the state dict")) for k in model.extra
    ]
    meta = dict(model.metadata) or {"format": "pt"}
    return PrunePlan(
        model.path,
        b.out,
        ident,
        *b.accounts(),
        entries,
        changes,
        meta,
        _uncast_notes(b.out, options.dtype),
    )


def _drop_name(role: str) -> str:
    return next((d for d, roles in DROP_TARGETS.items() if role in roles), role)


def _denoiser(ident: Identity) -> ComponentMatch | None:
    return next(iter(ident.by_role("denoiser")), None)


def _ema_sources(
    model: ModelFile, ident: Identity, unet: ComponentMatch | None, options: PruneOptions
) -> dict[str, TensorInfo]:
    """UNet key -> the EMA twin's TensorInfo (FORMATS.md 4 naming rule), checked."""
    ema = ident.component("ema")
    if ema is None or unet is None:
        raise UsageError(
            'ema="only": the file has no EMA weights (no model_ema.* copy of the UNet); '
            'prune without ema="only" to keep the weights as they are',
            path=model.path,
        )
    out: dict[str, TensorInfo] = {}
    missing: list[str] = []
    for key in unet.keys:
        twin = model.tensors.get(ema_key(key)) if key.startswith("model.") else None
        if twin is None:
            missing.append(key)
            continue
        if twin.shape != model.tensors[key].shape:
            raise UsageError(
                f'ema="only": EMA tensor {ema_key(key)!r} has shape {list(twin.shape)} but '
                f"{key!r} has {list(model.tensors[key].shape)}; the EMA copy does not belong "
                "to this UNet",
                path=model.path,
            )
        out[key] = twin
    if missing and not options.allow_partial_ema:
        raise UsageError(
            f'ema="only": the EMA copy is incomplete: {len(missing)} of {len(unet.keys)} UNet '
            f"keys have no model_ema twin (e.g. {missing[0]!r}); pass allow_partial_ema=True to "
            "keep the raw weights for those",
            path=model.path,
        )
    return out


def _bake_sources(model: ModelFile, ident: Identity, vae_file: ModelFile) -> dict[str, TensorInfo]:
    """Checkpoint VAE key -> the VAE file's tensor, for a bare or prefixed VAE file."""
    vae_ident = identify(vae_file)
    src = next(iter(vae_ident.by_role("vae")), None)
    if src is None:
        raise UsageError(
            f"bake_vae={vae_file.path.name!r} holds no VAE ({vae_ident.kind}; "
            f"{len(vae_file.tensors)} tensors)",
            path=vae_file.path,
        )
    if src.missing:
        raise UsageError(
            f"bake_vae={vae_file.path.name!r}: the VAE is incomplete "
            f"({len(src.missing)} keys missing, e.g. {src.missing[0]!r})",
            path=vae_file.path,
        )
    target = next(iter(ident.by_role("vae")), None)
    if target is None:
        parts = S.CHECKPOINTS.get(ident.architecture or "", ())
        prefix = next((p for sid, p in parts if S.COMPONENTS[sid].role == "vae"), None)
        if prefix is None:
            raise UsageError(
                "bake_vae: the checkpoint has no VAE and its architecture is not "
                "known, so there is no place to put one"
            )
    else:
        prefix = target.prefix
        if target.signature != src.signature:
            raise UsageError(
                f"bake_vae={vae_file.path.name!r} is a {src.label}, the checkpoint has a "
                f"{target.label}",
                path=vae_file.path,
            )
    out: dict[str, TensorInfo] = {}
    for key in src.keys:
        rel = key[len(src.prefix) :]
        name = prefix + rel
        info = vae_file.tensors[key]
        old = model.tensors.get(name)
        if old is not None and old.shape != info.shape:
            raise UsageError(
                f"bake_vae: {key!r} has shape {list(info.shape)} but the checkpoint's "
                f"{name!r} has {list(old.shape)}; this VAE does not fit",
                path=vae_file.path,
            )
        out[name] = info
    return out


def _clip_fix(
    model: ModelFile, name: str, info: TensorInfo
) -> tuple[Callable[[], np.ndarray] | None, str]:
    """A maker for int64 arange(77) when position_ids are broken (float, or wrong values)."""
    want = np.arange(CLIP_POSITIONS, dtype=np.int64).reshape(1, CLIP_POSITIONS)
    if info.shape != want.shape:
        return _const(want), f"shape {list(info.shape)} instead of [1, 77]"
    if info.dtype.code != "I64":
        return _const(want), f"stored as {info.dtype}"
    values = model.read(name)
    if not np.array_equal(values, want):
        bad = int(np.flatnonzero(values.reshape(-1) != want.reshape(-1))[0])
        return _const(want), f"wrong values (position {bad} holds {values.reshape(-1)[bad]})"
    return None, "already right"


def _const(arr: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: arr


class _Builder:
    """Collects output tensors and the before/after/dropped accounts."""

    def __init__(self, model: ModelFile, ident: Identity, own: dict[str, ComponentMatch]):
        self.model, self.ident, self.own = model, ident, own
        self.out: list[OutTensor] = []
        # group -> the (elements, bytes) of its tensors; reason -> the dropped tensors' names
        self.before: dict[str, list[tuple[int, int]]] = {}
        self.after: dict[str, list[tuple[int, int]]] = {}
        self.dropped: dict[str, list[str]] = {}
        for name, info in model.tensors.items():
            g = _group(name, own, ident)
            self.before.setdefault(g, []).append((info.numel, info.nbytes))

    def keep(self, t: OutTensor, group: str | None = None) -> None:
        self.out.append(t)
        g = group or _group(t.name, self.own, self.ident)
        self.after.setdefault(g, []).append((t.info.numel, t.nbytes))

    def drop(self, name: str, reason: str) -> None:
        self.dropped.setdefault(reason, []).append(name)

    def accounts(self) -> tuple[dict[str, Totals], dict[str, Totals], list[Dropped]]:
        """The frozen before, after and dropped accounts."""
        info = self.model.tensors
        dropped = [
            Dropped(reason, names, Totals.of((info[n].numel, info[n].nbytes) for n in names))
            for reason, names in self.dropped.items()
        ]
        before = {g: Totals.of(v) for g, v in self.before.items()}
        return before, {g: Totals.of(v) for g, v in self.after.items()}, dropped

    def replaced(self, name: str) -> None:
        self.drop(name, "replaced by the baked VAE")


# -- extract --------------------------------------------------------------------------------------


def plan_extract(
    model: ModelFile,
    component: str,
    *,
    dtype: DType | None = None,
    ema: bool = False,
    identity: Identity | None = None,
) -> PrunePlan:
    """One component, its prefix stripped to the standalone layout loaders expect.

    ``component``: unet, vae, text-encoder (the only one), or one encoder by name (clip-l,
    clip-g, openclip-h, t5xxl). ``ema``: the UNet from the EMA copy.
    """
    target = EXTRACT_TARGETS.get(component)
    if target is None:
        raise UsageError(f"component={component!r} is not one of {', '.join(EXTRACT_TARGETS)}")
    ident = identity or identify(model)
    found = [c for c in ident.components if target in (c.role, c.name) and c.role != "ema"]
    if not found:
        have = ", ".join(c.name for c in ident.components if c.role != "ema") or "none"
        raise UsageError(f"the file has no {component} (components found: {have})", path=model.path)
    if len(found) > 1:
        names = ", ".join(c.name for c in found)
        raise UsageError(
            f"the file has {len(found)} text encoders ({names}); extract one with "
            f"component={found[0].name!r}",
            path=model.path,
        )
    comp = found[0]
    ema_sources: dict[str, TensorInfo] = {}
    if ema:
        if comp.role != "denoiser":
            raise UsageError('ema=True applies only to component="unet"')
        ema_sources = _ema_sources(model, ident, comp, PruneOptions(ema="only"))
    own = owners(ident)
    b = _Builder(model, ident, own)
    keys = set(comp.keys)
    for name, info in model.tensors.items():
        if name not in keys:
            b.drop(name, f"not part of the {comp.label}")
            continue
        src = ema_sources.get(name, info)
        b.keep(
            OutTensor(name[len(comp.prefix) :], model, src, out_dtype(src, dtype)), group=comp.name
        )
    changes = [f"prefix {comp.prefix!r} removed"] if comp.prefix else []
    if ema_sources:
        changes.append(f"{len(ema_sources)} UNet tensors take their values from the EMA copy")
    entries = [(k, S.TRAINING_STATE.get(k, "non-weight data")) for k in model.extra]
    meta = {k: v for k, v in model.metadata.items() if not k.startswith("modelspec.")}
    return PrunePlan(
        model.path,
        b.out,
        ident,
        *b.accounts(),
        entries,
        changes,
        meta or {"format": "pt"},
        _uncast_notes(b.out, dtype),
    )


# -- with the write -------------------------------------------------------------------------------


def _write(plan: PrunePlan, out: str | Path, options: WriteOptions) -> PruneResult:
    if not plan.tensors:
        raise UsageError("nothing would be left to write", path=out)
    if options.dry_run:
        return PruneResult(plan, None)
    return PruneResult(plan, write_model(plan.tensors, out, options, metadata=plan.metadata))


def prune(
    src: str | Path | ModelFile,
    out: str | Path | None = None,
    options: PruneOptions | None = None,
    **changes: Any,
) -> PruneResult:
    """Prune ``src`` (a path or an opened ModelFile) into ``out`` (format by extension).

    ``options`` (or keywords): what to keep (see ``PruneOptions``) and the write options
    (dtype, overwrite, verify, on_overflow, dry_run, progress). See ``plan_prune``. Without
    ``out``: ``<stem>-pruned[-emaonly|-noema][-<dtype>].safetensors`` beside ``src`` (inside
    ``out`` when it is an existing folder).

    Example:
        >>> prune("sd15.ckpt", ema="only", dtype="fp16").write.path
        PosixPath('sd15-pruned-emaonly-fp16.safetensors')
    """
    opts = options_from(PruneOptions, options, changes)
    with opened(src) as model:
        ema_tag = {"only": "emaonly", "drop": "noema"}.get(opts.ema, "")
        dtype_tag = dtype_name(opts.dtype.code) if opts.dtype else ""
        target = derived(model.path, out, ["pruned", ema_tag, dtype_tag])
        return _write(plan_prune(model, opts), target, opts)


def extract(
    src: str | Path | ModelFile,
    out: str | Path | None = None,
    options: ExtractOptions | None = None,
    **changes: Any,
) -> PruneResult:
    """Write one component of ``src`` to ``out`` in its standalone layout (``ExtractOptions``:
    component, ema, and the write options). Without ``out``:
    ``<stem>-<component>[-ema][-<dtype>].safetensors`` beside ``src``.

    Example:
        >>> extract("sd15.ckpt", component="vae").write.path
        PosixPath('sd15-vae.safetensors')
    """
    opts = options_from(ExtractOptions, options, changes)
    with opened(src) as model:
        plan = plan_extract(model, opts.component, dtype=opts.dtype, ema=opts.ema)
        dtype_tag = dtype_name(opts.dtype.code) if opts.dtype else ""
        target = derived(model.path, out, [opts.component, "ema" if opts.ema else "", dtype_tag])
        return _write(plan, target, opts)


def parse_drop(values: Iterable[str]) -> frozenset[str]:
    """``--drop`` values (repeatable or comma-separated) checked against DROP_TARGETS."""
    out = {v.strip() for item in values for v in item.split(",") if v.strip()}
    bad = sorted(out - set(DROP_TARGETS))
    if bad:
        raise UsageError(f"drop={bad[0]!r} is not a part; use {', '.join(DROP_TARGETS)}")
    return frozenset(out)
