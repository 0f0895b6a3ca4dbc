"""What identification answers: frozen result objects with a stable JSON form (docs/identify.md).

Rendering them for people lives in ``sdtool/cli``; these objects only hold facts.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, ClassVar

from sdtool.identify import tables as T
from sdtool.records import dataclass
from sdtool.results import JsonKey, Result, head, json_key

SCHEMA = "sdtool.identify/2"
LIST_LIMIT = 10  # missing keys / mismatches listed per component in JSON
UNKNOWN_LIMIT = 100  # unknown keys listed in JSON


@dataclass(frozen=True)
class ShapeMismatch(Result):
    key: str
    shape: tuple[int, ...]
    expected: tuple[int, ...]


@dataclass(frozen=True)
class ComponentMatch(Result):
    """One component found in the file: where, how complete, and what does not fit."""

    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = (
        "name", "signature", "label", "role", "layout", "prefix", "found", "expected",
        ("tensors", "keys", len), "complete", ("by_markers", "family"),
        ("missing_count", "missing", len), ("missing", "missing", head(LIST_LIMIT)),
        ("extra_count", "extra", len), ("extra", "extra", head(LIST_LIMIT)),
        ("shape_profile", "profile"), ("mismatch_count", "mismatches", len),
        ("shape_mismatches", "mismatches", head(LIST_LIMIT)),
    )  # fmt: skip

    name: str  # "unet", "vae", "clip-l", "wan", "ema" ...
    signature: str  # the key-set signature or family id ("unet-ldm", "openclip-g", "wan" ...)
    label: str  # "UNet", "CLIP-L" ...
    role: str  # "denoiser", "vae", "text-encoder", "controlnet", "t2i-adapter", "ip-adapter" ...
    layout: str  # "ldm" (original naming), "diffusers" (diffusers / transformers naming)
    prefix: str  # the key prefix in this file ("" for a bare component)
    found: int  # required keys found
    expected: int  # required keys
    keys: tuple[str, ...] = ()  # every file key this component owns (extras and scales too)
    missing: tuple[str, ...] = ()  # full key names
    extra: tuple[str, ...] = ()  # keys under its prefix that its signature does not list
    mismatches: tuple[ShapeMismatch, ...] = ()
    profile: str | None = None  # the shape set compared against (an architecture)
    alias: bool = False  # matched through an older key spelling
    family: bool = False  # told by marker keys (FAMILIES), not by a full key list

    @property
    def complete(self) -> bool:
        return self.found == self.expected

    @property
    def fraction(self) -> float:
        return self.found / self.expected if self.expected else 0.0


@dataclass(frozen=True)
class LoraInfo(Result):
    """What a LoRA adapts and how: flavour, ranks, alphas, modules per target, trainer."""

    flavour: str
    factors: dict[str, int]  # flavour -> tensors
    #: rank -> modules
    ranks: dict[int, int] = field(metadata=json_key(as_=lambda r: dict(sorted(r.items()))))
    alphas: tuple[str, ...]  # from metadata (ss_network_alpha); .alpha tensor values are not read
    alpha_tensors: int
    modules: dict[str, int]  # "unet" / "te1" / "te2" / "te3" / "other" -> modules
    tokens: tuple[str, ...]  # embedded textual-inversion tokens (cloneofsimo "<s1>" ...)
    network: dict[str, str]  # kohya ss_network_* metadata, when present
    trainer: str | None = None  # "kohya sd-scripts", "ai-toolkit", "XLabs" ... when it tells
    trainer_source: str | None = None


@dataclass(frozen=True)
class EmbeddingInfo(Result):
    """A textual-inversion embedding: vectors per token and their width."""

    layout: str  # "emb_params", "string_to_param", "sdxl", "tokens"
    vectors: int
    dims: tuple[int, ...]
    tokens: dict[str, list[int]]  # tensor name -> shape


@dataclass(frozen=True)
class Quantization(Result):
    """How the file's weights are quantized, told by side-tensor names or element types."""

    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = ("schemes", ("tensors", "keys", len))

    schemes: dict[str, int]  # scheme -> side tensors (or quantized tensors for a dtype scheme)
    keys: tuple[str, ...]  # the side tensors (scales, packing state): not weights, not unknown


@dataclass(frozen=True)
class Identity(Result):
    """The answer. ``to_json`` is the stable schema (docs/identify.md)."""

    JSON_SCHEMA: ClassVar[str | None] = SCHEMA
    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = (
        "kind", "architecture", "architecture_label", "architecture_source", "variant", "model",
        ("prediction", "prediction_record"), "ema", "precision", "quantization",
        ("pruning", "pruning_record"), "components", "markers", "training_state",
        ("unknown_count", "unknown_keys", len), ("unknown_keys", "unknown_keys",
        head(UNKNOWN_LIMIT)), "lora", "embedding", "hypernetwork", ("nearest", "nearest_record"),
        "notes",
    )  # fmt: skip

    kind: str
    architecture: str | None = None
    architecture_source: str | None = None
    variant: str | None = None
    model: str | None = None  # the component model of a one-component file ("T5-XXL" ...)
    prediction: str | None = None
    prediction_source: str | None = None
    prediction_heuristic: bool = False
    ema: bool = False
    precision: dict[str, dict[str, int]] = field(default_factory=dict)
    quantization: Quantization | None = None
    pruning: str | None = None
    pruning_note: str | None = None
    components: tuple[ComponentMatch, ...] = ()
    markers: dict[str, str] = field(default_factory=dict)  # key -> meaning
    training_state: tuple[str, ...] = ()  # extra entries that are not weights
    unknown_keys: tuple[str, ...] = ()
    lora: LoraInfo | None = None
    embedding: EmbeddingInfo | None = None
    hypernetwork: dict[str, Any] | None = None
    nearest: str | None = None
    nearest_reason: str | None = None
    notes: tuple[str, ...] = ()
    ownership: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    # -- lookups --------------------------------------------------------------------------------

    def component(self, name: str) -> ComponentMatch | None:
        """The first component called ``name`` ("unet", "vae", "clip-l", "ema" ...)."""
        return next((c for c in self.components if c.name == name), None)

    def by_role(self, role: str) -> list[ComponentMatch]:
        return [c for c in self.components if c.role == role]

    @property
    def architecture_label(self) -> str | None:
        return T.ARCH_LABELS.get(self.architecture or "")

    def owners(self) -> dict[str, str]:
        """Tensor name -> the name of the component that owns it ("unet", "clip-l", "ema", ...;
        ``vocab.owner_label`` gives the text label).

        Keys no component owns map to "markers", "quantization", "lora-<target>", "embedding",
        "hypernetwork" or "unknown": the one ownership that inspect's by-component table shows.
        """
        return dict(self.ownership)

    # -- output: records of the JSON document ---------------------------------------------------

    @property
    def prediction_record(self) -> dict[str, Any]:
        return {
            "type": self.prediction,
            "source": self.prediction_source,
            "heuristic": self.prediction_heuristic,
        }

    @property
    def pruning_record(self) -> dict[str, Any]:
        return {"state": self.pruning, "note": self.pruning_note}

    @property
    def nearest_record(self) -> dict[str, Any] | None:
        """The nearest known architecture, for an unknown file only."""
        if self.kind != "unknown":
            return None
        return {"match": self.nearest, "reason": self.nearest_reason}
