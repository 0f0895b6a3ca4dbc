"""How an ``Identity`` reads for people: the "What it is" lines of ``sdtool inspect``.

Plain lines; text that came from the file is escaped by the caller (``render.markup``).
"""

from __future__ import annotations

from sdtool.identify import tables as T
from sdtool.identify.result import Identity


def _few(items: tuple[str, ...] | list[str], n: int = 3) -> str:
    more = f" … (+{len(items) - n})" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def precision_text(ident: Identity) -> str:
    parts = sorted(ident.precision.items(), key=lambda kv: -kv[1]["bytes"])
    return (
        ", ".join(
            f"{code} ({d['tensors']} tensor{'' if d['tensors'] == 1 else 's'})" for code, d in parts
        )
        or "none"
    )


def identity_lines(ident: Identity) -> list[str]:
    """The summary lines: kind, architecture, variant, components, LoRA / embedding facts ..."""
    head = ident.kind
    extras = [x for x in (ident.architecture_label, ident.variant, ident.model) if x]
    if extras:
        head += f" ({', '.join(extras)})"
    lines = [f"kind: {head}"]
    if ident.architecture:
        lines.append(f"architecture: {ident.architecture_label} — {ident.architecture_source}")
    if ident.kind == "unknown":
        lines.append(f"not recognised; nearest: {ident.nearest or 'none'} — {ident.nearest_reason}")
    if ident.kind in ("checkpoint", "unet"):
        pred = ident.prediction or "not stated"
        if ident.prediction_source:
            tag = "heuristic: " if ident.prediction_heuristic else ""
            pred += f" ({tag}{ident.prediction_source})"
        lines.append(f"prediction: {pred}")
        ema = ident.component("ema")
        lines.append(
            f"EMA: yes ({ema.found}/{ema.expected} keys under {ema.prefix})" if ema else "EMA: no"
        )
    if ident.pruning:
        lines.append(f"pruning: {ident.pruning} — {ident.pruning_note}")
    lines.append(f"precision: {precision_text(ident)}")
    if ident.quantization:
        q = ident.quantization
        lines.append("quantization: " + ", ".join(f"{s} ({n})" for s, n in q.schemes.items()))
    if ident.components:
        shown = [c for c in ident.components if c.role != "ema"]
        lines.append(
            "components: "
            + ", ".join(
                f"{c.label} ({len(c.keys)} keys, by marker keys)"
                if c.family
                else f"{c.label} {c.found}/{c.expected}"
                for c in shown
            )
        )
        for c in ident.components:
            where = f" under {c.prefix!r}" if c.prefix else " (bare)"
            if c.missing:
                lines.append(
                    f"  {c.label}{where}: {len(c.missing)} keys missing: " + _few(c.missing)
                )
            if c.extra:
                lines.append(f"  {c.label}{where}: {len(c.extra)} extra keys: " + _few(c.extra))
            if c.mismatches:
                m = c.mismatches[0]
                lines.append(
                    f"  {c.label}{where}: {len(c.mismatches)} shape mismatches vs "
                    f"{T.ARCH_LABELS.get(c.profile or '', c.profile)}, e.g. {m.key} "
                    f"{list(m.shape)} (expected {list(m.expected)})"
                )
    if ident.lora:
        lo = ident.lora
        ranks = ", ".join(f"{r} ({n})" for r, n in sorted(lo.ranks.items())) or "?"
        mods = ", ".join(f"{k} {v}" for k, v in lo.modules.items())
        alpha = ", ".join(lo.alphas) if lo.alphas else "not in metadata"
        lines.append(f"LoRA: {lo.flavour}; rank {ranks}; alpha {alpha}; modules: {mods}")
        if lo.trainer:
            lines.append(f"  trainer: {lo.trainer} ({lo.trainer_source})")
        if lo.alpha_tensors:
            lines.append(f"  {lo.alpha_tensors} .alpha tensors (values are tensor data)")
        if lo.tokens:
            lines.append(f"  embedded tokens: {', '.join(lo.tokens)}")
    if ident.embedding:
        e = ident.embedding
        lines.append(
            f"embedding: {e.vectors} vectors, width {'+'.join(map(str, e.dims))} ({e.layout})"
        )
    if ident.hypernetwork:
        h = ident.hypernetwork
        lines.append(f"hypernetwork: widths {h['widths']}, {h['tensors']} tensors")
    if ident.markers:
        lines.append("markers: " + ", ".join(f"{k} ({v})" for k, v in ident.markers.items()))
    if ident.training_state:
        lines.append("training state: " + ", ".join(ident.training_state))
    if ident.unknown_keys:
        lines.append(f"unknown keys ({len(ident.unknown_keys)}): {_few(ident.unknown_keys, 5)}")
    lines.extend(f"note: {n}" for n in ident.notes)
    return lines
