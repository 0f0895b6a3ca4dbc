"""The LoRA rows of identification's tables that hold regexes (module names that tell the
architecture, trainers told by tensor names): only a LoRA needs them, so they load on first use
(``tables.py`` names them too) and a checkpoint's ``inspect`` neither compiles their 23 regexes
nor creates their 2 dataclasses (~20M instructions)."""

from __future__ import annotations

import re

from sdtool.records import dataclass

LORA_CONTEXT_MODULE = re.compile(r"attn2[._](processor[._])?to_k")


@dataclass(frozen=True)
class LoraArch:
    """Module names only some architectures have; ``widths`` (the input width of a matching
    module's down factor -> architecture) tells apart families that share module names. A row
    with no ``arch`` answers only through ``widths``."""

    pattern: re.Pattern[str]
    arch: str
    what: str
    widths: dict[int, str] | None = None


#: Tried in order over all module names of a LoRA; the first row that fits names the target.
LORA_MODULE_ARCH: tuple[LoraArch, ...] = (
    LoraArch(re.compile(r"distilled_guidance_layer"), "chroma", "Chroma guidance layers"),
    # HunyuanVideo shares Flux's block names and width; it has 20 double / 40 single blocks
    LoraArch(re.compile(r"(double_blocks|transformer_blocks)[._]19[._]|single(_transformer)?"
                        r"_blocks[._](38|39)[._]|token_refiner"), "hunyuan-video",
             "HunyuanVideo block numbers"),
    LoraArch(re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), "flux",
             "Flux blocks"),
    LoraArch(re.compile(r"joint_blocks.*x_block[._]attn2"), "sd3.5-medium", "SD3.5 medium blocks"),
    LoraArch(re.compile(r"joint_blocks"), "sd3", "SD3 joint blocks",
             {1536: "sd3", 2432: "sd3.5-large"}),
    LoraArch(re.compile(r"double_stream_blocks|single_stream_blocks"), "hidream",
             "HiDream stream blocks"),
    LoraArch(re.compile(r"transformer_blocks[._]\d+[._](img_mod|txt_mod|img_mlp|txt_mlp)"),
             "qwen-image", "Qwen-Image blocks"),
    LoraArch(re.compile(r"blocks[._]\d+[._](self_attn|cross_attn)[._]"), "wan", "Wan blocks"),
    LoraArch(re.compile(r"blocks[._]\d+[._]ffn[._]net"), "wan", "Wan blocks (diffusers)"),
    LoraArch(re.compile(r"double_layers|single_layers|joint_transformer_blocks"), "auraflow",
             "AuraFlow layers"),
    LoraArch(re.compile(r"ref_image_refiner|ref_image_patch_embedder"), "omnigen2",
             "OmniGen2 reference-image layers"),
    # diffusers-named Lumina 2 and OmniGen2 share module names; their widths differ
    LoraArch(re.compile(r"(^|[._])(layers|noise_refiner|context_refiner)[._]\d+[._]attn[._]to_"),
             "", "Lumina-style layers", {2304: "lumina2", 2520: "omnigen2"}),
    LoraArch(re.compile(r"noise_refiner|context_refiner|layers[._]\d+[._]attention[._]"),
             "lumina2", "Lumina 2 layers"),
    LoraArch(re.compile(r"transformer_blocks[._]\d+[._]attn[._]add_k_proj"), "",
             "joint attention blocks", {1536: "sd3", 2432: "sd3.5-large", 3072: "flux"}),
    LoraArch(re.compile(r"transformer_blocks[._]\d+[._]attn1[._]to_k"), "",
             "DiT self-attention", {2048: "ltxv", 4096: "ltxv"}),
    LoraArch(re.compile(r"time_stack|temporal_transformer"), "svd", "temporal layers"),
)  # fmt: skip


@dataclass(frozen=True)
class Trainer:
    """A trainer told by a metadata value or by its module naming; first row that fits wins."""

    name: str
    meta_key: str | None = None  # a metadata key (prefix when it ends with "*")
    meta_value: str | None = None  # a substring its value must contain
    key_pattern: re.Pattern[str] | None = None  # or a tensor-name pattern


TRAINERS: tuple[Trainer, ...] = (
    Trainer("ai-toolkit", "software", "ai-toolkit"),
    Trainer("kohya sd-scripts", "ss_*"),
    Trainer("SimpleTuner", "*", "simpletuner"),
    Trainer("OneTrainer", "*", "onetrainer"),
    Trainer("XLabs", key_pattern=re.compile(r"\.processor\.(qkv|proj)_lora\d\.(down|up)\.weight$")),
    Trainer("OneTrainer or ai-toolkit (kohya-style names for a transformer)",
            key_pattern=re.compile(r"^lora_transformer_")),
    Trainer("kohya-style names (sd-scripts, OneTrainer, Kohya_ss GUI ...)",
            key_pattern=re.compile(r"^lora_(unet|te\d?)_")),
    Trainer("diffusers / PEFT naming (diffusers, ai-toolkit, SimpleTuner ...)",
            key_pattern=re.compile(r"\.lora_[AB]\.(default\.)?weight$")),
    Trainer("diffusers attention processors (diffusers < 0.21)",
            key_pattern=re.compile(r"\.processor\.\w+_lora\.(down|up)\.weight$")),
    Trainer("cloneofsimo lora", key_pattern=re.compile(r":(down|up)$")),
)  # fmt: skip
