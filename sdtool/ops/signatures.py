"""The tables identification reads: component key sets, placements, discriminating shapes, markers.

Identification is a small engine over these tables; adding an architecture or a LoRA flavour is a
row here, not a branch in identify.py. The big key lists (one per component, with shapes per
architecture) live in ``sdtool/data/signatures.json.gz``, generated from
``../shared/reference/layouts`` by ``tools/gen_signatures.py``.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

Shape = tuple[int, ...]

# ---------------------------------------------------------------------------------------------
# Components: one key-set signature each (keys relative to the component's root)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentMeta:
    """What a key-set signature is, for people and for the kind rules."""

    name: str  # shown to users: "unet", "vae", "clip-l" ...
    label: str  # "UNet", "VAE", "CLIP-L" (summary lines)
    role: str  # "denoiser", "vae", "text-encoder", "controlnet", "aux"
    layout: str  # "ldm" (original / ComfyUI naming), "diffusers" (diffusers / transformers naming)
    aliases: tuple[tuple[str, str], ...] = ()  # relative-key rewrites (old spellings)


COMPONENTS: dict[str, ComponentMeta] = {
    "unet-ldm": ComponentMeta("unet", "UNet", "denoiser", "ldm"),
    "unet-sdxl": ComponentMeta("unet", "UNet", "denoiser", "ldm"),
    "unet-sdxl-refiner": ComponentMeta("unet", "UNet", "denoiser", "ldm"),
    "mmdit": ComponentMeta("mmdit", "MMDiT", "denoiser", "ldm"),
    "flux": ComponentMeta("flux", "Flux transformer", "denoiser", "ldm"),
    "vae": ComponentMeta("vae", "VAE", "vae", "ldm"),
    "vae16": ComponentMeta("vae", "VAE (16-channel)", "vae", "ldm"),
    # SD1 checkpoints from before transformers 4.x lack the ``text_model.`` level
    "clip-l": ComponentMeta("clip-l", "CLIP-L", "text-encoder", "ldm", (("text_model.", ""),)),
    "openclip-h": ComponentMeta("openclip-h", "OpenCLIP-H", "text-encoder", "ldm"),
    "openclip-g": ComponentMeta("clip-g", "OpenCLIP-G", "text-encoder", "ldm"),
    "clip-g": ComponentMeta("clip-g", "CLIP-G", "text-encoder", "ldm"),
    "t5xxl": ComponentMeta("t5xxl", "T5-XXL", "text-encoder", "ldm"),
    "controlnet": ComponentMeta("controlnet", "ControlNet", "controlnet", "ldm"),
    "midas": ComponentMeta("depth", "MiDaS depth", "aux", "ldm"),
    "unet-diffusers": ComponentMeta("unet", "UNet (diffusers)", "denoiser", "diffusers"),
    "vae-diffusers": ComponentMeta("vae", "VAE (diffusers)", "vae", "diffusers"),
    "scheduler": ComponentMeta("scheduler", "noise schedule", "aux", "ldm"),
}

#: A component counts as present when at least this share of its required keys is found.
PRESENT_FRACTION = 0.5


@dataclass(frozen=True)
class Signature:
    """A component's expected keys (relative to its prefix) and shapes per architecture."""

    id: str
    keys: tuple[str, ...]
    optional: frozenset[str]
    shapes: dict[str, dict[str, Shape]]  # profile (architecture) -> key -> shape
    meta: ComponentMeta

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(k for k in self.keys if k not in self.optional)


@cache
def signatures() -> dict[str, Signature]:
    """The key-set signatures, loaded once from the package data."""
    raw = resources.files("sdtool.data").joinpath("signatures.json.gz").read_bytes()
    data = json.loads(gzip.decompress(raw))["signatures"]
    out: dict[str, Signature] = {}
    for sid, d in data.items():
        keys = tuple(d["keys"])
        out[sid] = Signature(
            sid,
            keys,
            frozenset(keys[i] for i in d["optional"]),
            {p: dict(zip(keys, map(tuple, s), strict=True)) for p, s in d["shapes"].items()},
            COMPONENTS[sid],
        )
    return out


# ---------------------------------------------------------------------------------------------
# Architecture hints
# ---------------------------------------------------------------------------------------------

ARCH_LABELS: dict[str, str] = {
    "sd1": "SD 1.x",
    "sd2": "SD 2.x",
    "sdxl-base": "SDXL base",
    "sdxl-refiner": "SDXL refiner",
    "sd3": "SD3",
    "flux-dev": "Flux dev",
    "flux-schnell": "Flux schnell",
    "sd": "the SD 1.x/2.x/SDXL reference",  # components they share (the VAE, noise schedule)
}


@dataclass(frozen=True)
class ShapeRule:
    """A shape that tells architectures apart: ``shape[axis]`` of one key of a component."""

    sig: str
    key: str  # relative to the component prefix
    axis: int
    values: dict[int, str]  # value -> architecture
    what: str  # "cross-attention width" (said in notes)


SHAPE_RULES: tuple[ShapeRule, ...] = (
    ShapeRule(
        "unet-ldm",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        1,
        {768: "sd1", 1024: "sd2"},
        "cross-attention width",
    ),
    ShapeRule(
        "controlnet",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        1,
        {768: "sd1", 1024: "sd2"},
        "cross-attention width",
    ),
    ShapeRule(
        "unet-diffusers",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        1,
        {768: "sd1", 1024: "sd2"},
        "cross-attention width",
    ),
    ShapeRule("unet-sdxl", "label_emb.0.0.weight", 1, {2816: "sdxl-base"}, "label_emb width"),
    ShapeRule(
        "unet-sdxl-refiner", "label_emb.0.0.weight", 1, {2560: "sdxl-refiner"}, "label_emb width"
    ),
)


@dataclass(frozen=True)
class PresenceRule:
    """An architecture told by whether one key of a component is there."""

    sig: str
    key: str
    present: str
    absent: str
    what: str


PRESENCE_RULES: tuple[PresenceRule, ...] = (
    PresenceRule("flux", "guidance_in.in_layer.weight", "flux-dev", "flux-schnell", "guidance_in"),
)

#: Components that name their architecture wherever they sit.
SIG_ARCH: dict[str, str] = {"mmdit": "sd3", "openclip-h": "sd2", "midas": "sd2"}


@dataclass(frozen=True)
class Placement:
    """A component at a checkpoint prefix that names the architecture (text encoders mostly)."""

    sig: str
    prefix: str
    arch: str


PLACEMENTS: tuple[Placement, ...] = (
    Placement("clip-l", "cond_stage_model.transformer.", "sd1"),
    Placement("clip-l", "conditioner.embedders.0.transformer.", "sdxl-base"),
    Placement("openclip-g", "conditioner.embedders.1.model.", "sdxl-base"),
    Placement("openclip-g", "conditioner.embedders.0.model.", "sdxl-refiner"),
    Placement("clip-g", "text_encoders.clip_g.transformer.", "sd3"),
)

#: Keys a component may lack at one placement: SDXL conditions on CLIP-L's penultimate layer,
#: so many SDXL files drop its last layer and final norm.
OPTIONAL_AT: dict[tuple[str, str], tuple[str, ...]] = {
    ("clip-l", "conditioner.embedders.0.transformer."): (
        "text_model.encoder.layers.11.",
        "text_model.final_layer_norm.",
    ),
}


@cache
def optional_at(sid: str, prefix: str) -> frozenset[str]:
    starts = OPTIONAL_AT.get((sid, prefix), ())
    if not starts:
        return frozenset()
    return frozenset(k for k in signatures()[sid].keys if k.startswith(starts))


#: Where each component sits in each architecture's all-in-one checkpoint (the nearest-match
#: reference, and what prune keeps). Order: denoiser, VAE, text encoders.
CHECKPOINTS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": (
        ("unet-ldm", "model.diffusion_model."),
        ("vae", "first_stage_model."),
        ("clip-l", "cond_stage_model.transformer."),
    ),
    "sd2": (
        ("unet-ldm", "model.diffusion_model."),
        ("vae", "first_stage_model."),
        ("openclip-h", "cond_stage_model.model."),
    ),
    "sdxl-base": (
        ("unet-sdxl", "model.diffusion_model."),
        ("vae", "first_stage_model."),
        ("clip-l", "conditioner.embedders.0.transformer."),
        ("openclip-g", "conditioner.embedders.1.model."),
    ),
    "sdxl-refiner": (
        ("unet-sdxl-refiner", "model.diffusion_model."),
        ("vae", "first_stage_model."),
        ("openclip-g", "conditioner.embedders.0.model."),
    ),
    "sd3": (
        ("mmdit", "model.diffusion_model."),
        ("vae16", "first_stage_model."),
        ("clip-l", "text_encoders.clip_l.transformer."),
        ("clip-g", "text_encoders.clip_g.transformer."),
        ("t5xxl", "text_encoders.t5xxl.transformer."),
    ),
    "flux-dev": (
        ("flux", "model.diffusion_model."),
        ("vae16", "vae."),
        ("clip-l", "text_encoders.clip_l.transformer."),
        ("t5xxl", "text_encoders.t5xxl.transformer."),
    ),
}
CHECKPOINTS["flux-schnell"] = CHECKPOINTS["flux-dev"]

#: UNet input-conv in-channels -> variant (FORMATS.md 4); the shape check ignores this axis.
VARIANT_KEYS: dict[str, tuple[str, int]] = {
    "unet-ldm": ("input_blocks.0.0.weight", 1),
    "unet-sdxl": ("input_blocks.0.0.weight", 1),
    "unet-diffusers": ("conv_in.weight", 1),
}
VARIANTS: dict[int, str | None] = {4: None, 9: "inpainting", 8: "instruct-pix2pix", 5: "depth"}

# ---------------------------------------------------------------------------------------------
# Keys outside components that are still model data, and training state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """A known non-component key: what it means, and a prediction it states, if any."""

    pattern: re.Pattern[str]
    meaning: str
    prediction: str | None = None


MARKERS: tuple[Marker, ...] = (
    Marker(re.compile(r"v_pred"), "v-prediction marker", "v"),
    Marker(re.compile(r"ztsnr"), "zero-terminal-SNR marker"),
    Marker(re.compile(r"edm_vpred\.sigma_(max|min)"), "EDM v-prediction sigma range", "v"),
    Marker(re.compile(r"edm_(mean|std)"), "EDM latent statistics"),
    Marker(re.compile(r"model\.model_sampling\.sigmas"), "SD3 sampling sigmas"),
    Marker(re.compile(r"text_encoders\.\w+\.logit_scale"), "text-encoder wrapper scalar"),
    Marker(re.compile(r"model_ema\.(decay|num_updates)"), "EMA bookkeeping"),
)

EMA_PREFIX = "model_ema."

#: Entries of a training checkpoint (outside the state dict) that are not weights.
TRAINING_STATE: dict[str, str] = {
    "optimizer_states": "optimizer state",
    "lr_schedulers": "learning-rate scheduler state",
    "callbacks": "Lightning callbacks",
    "loops": "Lightning loop state",
    "hyper_parameters": "training hyper-parameters",
    "hparams_name": "training hyper-parameters",
    "optimizer": "optimizer state",
    "scheduler": "scheduler state",
    "global_step": "training step counter",
    "epoch": "training epoch counter",
    "pytorch-lightning_version": "Lightning version record",
    "ema": "EMA state outside the state dict",
    "state_dict_ema": "EMA state outside the state dict",
}

# ---------------------------------------------------------------------------------------------
# Metadata (safetensors __metadata__): ModelSpec and kohya ss_*
# ---------------------------------------------------------------------------------------------

#: ``modelspec.architecture`` prefix -> architecture (longest prefix first)
MODELSPEC_ARCH: tuple[tuple[str, str | None], ...] = (
    ("stable-diffusion-xl-v1-refiner", "sdxl-refiner"),
    ("stable-diffusion-xl-v1-base", "sdxl-base"),
    ("stable-diffusion-xl", "sdxl-base"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-3", "sd3"),
    ("stable-diffusion-v3", "sd3"),
    ("flux-1-dev", "flux-dev"),
    ("flux-1-schnell", "flux-schnell"),
    ("flux.1-dev", "flux-dev"),
    ("flux.1-schnell", "flux-schnell"),
)
#: ``modelspec.architecture`` suffix -> kind
MODELSPEC_KIND: dict[str, str] = {
    "lora": "lora",
    "textual-inversion": "embedding",
    "controlnet": "controlnet",
    "vae": "vae",
}
#: kohya ``ss_base_model_version`` prefix -> architecture
SS_BASE: tuple[tuple[str, str | None], ...] = (
    ("sdxl_base", "sdxl-base"),
    ("sdxl_refiner", "sdxl-refiner"),
    ("sd_v1", "sd1"),
    ("sd_v2", "sd2"),
    ("sd3", "sd3"),
    ("flux1", None),  # kohya does not say dev or schnell
)
MODELSPEC_PREDICTION: dict[str, str] = {"v": "v", "epsilon": "epsilon", "eps": "epsilon"}

#: File-name fragments that hint at a prediction type (a heuristic, labelled as one).
NAME_PREDICTION: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"v[-_]?pred|768-v\b|[-_]v[-_]?param", re.I), "v"),
)
#: File-name fragments that hint at an EMA-only release.
NAME_EMA_ONLY = re.compile(r"ema[-_]?only", re.I)

# ---------------------------------------------------------------------------------------------
# LoRA, embeddings, hypernetworks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSuffix:
    """A LoRA tensor-name suffix: its flavour and, on the factor that carries it, the rank axis."""

    suffix: str
    flavour: str
    rank_axis: int | None = None


#: Longest suffixes first, so ``.lora.down.weight`` is not read as something shorter.
LORA_SUFFIXES: tuple[LoraSuffix, ...] = (
    LoraSuffix(".lora_down.weight", "kohya", 0),
    LoraSuffix(".lora_up.weight", "kohya"),
    LoraSuffix(".lora_mid.weight", "kohya"),
    LoraSuffix(".lora_A.weight", "diffusers-peft", 0),
    LoraSuffix(".lora_B.weight", "diffusers-peft"),
    LoraSuffix(".lora_A.default.weight", "diffusers-peft", 0),
    LoraSuffix(".lora_B.default.weight", "diffusers-peft"),
    LoraSuffix(".lora.down.weight", "diffusers", 0),
    LoraSuffix(".lora.up.weight", "diffusers"),
    LoraSuffix("_lora.down.weight", "diffusers", 0),
    LoraSuffix("_lora.up.weight", "diffusers"),
    LoraSuffix(".hada_w1_a", "lycoris-loha"),
    LoraSuffix(".hada_w1_b", "lycoris-loha", 0),
    LoraSuffix(".hada_w2_a", "lycoris-loha"),
    LoraSuffix(".hada_w2_b", "lycoris-loha"),
    LoraSuffix(".hada_t1", "lycoris-loha"),
    LoraSuffix(".hada_t2", "lycoris-loha"),
    LoraSuffix(".lokr_w1", "lycoris-lokr"),
    LoraSuffix(".lokr_w1_a", "lycoris-lokr"),
    LoraSuffix(".lokr_w1_b", "lycoris-lokr"),
    LoraSuffix(".lokr_w2", "lycoris-lokr"),
    LoraSuffix(".lokr_w2_a", "lycoris-lokr"),
    LoraSuffix(".lokr_w2_b", "lycoris-lokr", 0),
    LoraSuffix(".lokr_t2", "lycoris-lokr"),
    LoraSuffix(".oft_blocks", "lycoris-oft"),
    LoraSuffix(".oft_diag", "lycoris-oft"),
    LoraSuffix(".diff_b", "lycoris-full"),
    LoraSuffix(".diff", "lycoris-full"),
    LoraSuffix(".w_norm", "lycoris-norm"),
    LoraSuffix(".b_norm", "lycoris-norm"),
    LoraSuffix(":down", "cloneofsimo", 0),
    LoraSuffix(":up", "cloneofsimo"),
    # modifiers: they add to another flavour's factors
    LoraSuffix(".dora_scale", "+dora"),
    LoraSuffix(".alpha", "+alpha"),
    LoraSuffix(".scale", "+scale"),
)
LORA_SUFFIXES = tuple(sorted(LORA_SUFFIXES, key=lambda s: -len(s.suffix)))

#: Module-name prefix -> what it adapts (te1 = the first / only text encoder).
LORA_TARGETS: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("lora_transformer_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te1"),
    ("base_model.model.", ""),  # PEFT wrapper: look again after it
    ("unet.", "unet"),
    ("transformer.", "unet"),
    ("diffusion_model.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te1"),
    ("unet:", "unet"),
    ("text_encoder:", "te1"),
)

#: A LoRA's cross-attention key factor input width -> architecture.
LORA_CONTEXT_WIDTH: dict[int, str] = {
    768: "sd1",
    1024: "sd2",
    2048: "sdxl-base",
    1280: "sdxl-refiner",
}
LORA_CONTEXT_MODULE = re.compile(r"attn2[._]to_k")
#: Module names only some architectures have.
LORA_MODULE_ARCH: tuple[tuple[re.Pattern[str], str | None, str], ...] = (
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), None, "Flux blocks"),
    (re.compile(r"joint_blocks"), "sd3", "SD3 joint blocks"),
)

#: Text-encoder width of an embedding vector -> architecture.
EMBEDDING_DIMS: dict[int, str] = {768: "sd1", 1024: "sd2"}
EMBEDDING_SDXL = ("clip_l", "clip_g")
EMBEDDING_KEYS = re.compile(r"emb_params|clip_[lg]|string_to_param(\..*)?|<[^>]*>|\*")

HYPERNETWORK_KEY = re.compile(r"(\d+)\.\d+\.linear\.\d+\.(weight|bias)")
HYPERNETWORK_EXTRA = ("layer_structure", "activation_func")


@cache
def component_index() -> dict[str, list[tuple[str, bool]]]:
    """relative key -> [(signature id, via alias)]: how any file key is traced to components."""
    index: dict[str, list[tuple[str, bool]]] = {}
    for sid, sig in signatures().items():
        for key in sig.keys:
            index.setdefault(key, []).append((sid, False))
            for old, new in sig.meta.aliases:
                if key.startswith(old):
                    index.setdefault(new + key[len(old) :], []).append((sid, True))
    return index
