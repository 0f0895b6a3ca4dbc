"""The words sdtool uses, defined once: formats, verdicts, severities, exit codes, dtype names,
the cast rule and component names.

Every command, result object and JSON document spells these the way they are spelled here; a
new format or component is one row. The enums are ``str`` enums, so a member compares equal to,
and serialises (``json.dumps``) as, its spelling. This module imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum, IntEnum
from typing import TYPE_CHECKING

from sdtool.records import dataclass

if TYPE_CHECKING:
    from sdtool.dtypes import DType


class Format(str, Enum):
    """A file or container format, as sniffing, ModelFile.format, scan and every JSON say it.

    ``ZIP``, ``PICKLE`` and ``TAR`` are also what sniffing says before a reader looks inside
    (a zip may turn out to be a torch zip, an npz or TorchScript; a pickle a legacy torch file).
    """

    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    TORCH_TAR = "torch-tar"
    TORCHSCRIPT = "torchscript"
    PICKLE = "pickle"
    NPY = "npy"
    NPZ = "npz"
    GGUF = "gguf"  # llama.cpp / ComfyUI-GGUF (sdtool.formats.gguf)
    ZIP = "zip"
    TAR = "tar"
    GZIP = "gzip"
    BZIP2 = "bzip2"
    XZ = "xz"
    ZLIB = "zlib"
    LZMA = "lzma"
    SEVENZIP = "7z"
    RAR = "rar"
    LZ4 = "lz4"
    JOBLIB_ZFILE = "joblib-zfile"  # joblib's own zlib container (b"ZF" + length)
    EMPTY = "empty"
    UNREADABLE = "unreadable"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__  # equal to its spelling, so hashed as it: {"safe": 1}[Verdict.SAFE]


#: the compressions sniffing recognises (scan looks inside them; open_model asks to decompress)
COMPRESSED = frozenset({Format.GZIP, Format.BZIP2, Format.XZ, Format.ZLIB, Format.LZMA})

#: the names of model files: dropped from an input's name to derive an output's
#: (sdtool.ops.outname); an empty file under one is a download that never arrived (scan)
MODEL_SUFFIXES = (
    ".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".npz", ".npy", ".gguf",
    ".pickle", ".joblib",
)  # fmt: skip


def model_named(path: object) -> bool:
    """Whether a file's name says it is a model (ends with one of ``MODEL_SUFFIXES``)."""
    return str(path).lower().endswith(MODEL_SUFFIXES)


class Severity(str, Enum):
    """How bad one finding (or one global) is; ``rank`` orders them."""

    SAFE = "safe"
    INFO = "info"
    SUSPICIOUS = "suspicious"
    DANGEROUS = "dangerous"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__  # equal to its spelling, so hashed as it: {"safe": 1}[Verdict.SAFE]


_SEVERITY_RANK = {
    Severity.SAFE: 0,
    Severity.INFO: 0,
    Severity.SUSPICIOUS: 1,
    Severity.DANGEROUS: 2,
}


class Verdict(str, Enum):
    """A scanned file's verdict, worst first (dangerous wins over errors)."""

    DANGEROUS = "dangerous"
    SUSPICIOUS = "suspicious"
    ERROR = "error"
    NOT_SCANNED = "not_scanned"
    SKIPPED = "skipped"  # by content not a model file (an image, JSON, YAML, text): counted
    SAFE = "safe"

    @property
    def label(self) -> str:
        """How text output says it: ``not scanned``."""
        return self.value.replace("_", " ")

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__  # equal to its spelling, so hashed as it: {"safe": 1}[Verdict.SAFE]


class ExitCode(IntEnum):
    """The process exit codes, the same for every command."""

    OK = 0
    FINDINGS = 1  # dangerous files, differences, failed batch items
    ERROR = 2  # a usage error, or an input that cannot be read
    INTERRUPTED = 130  # 128 + SIGINT, as shells report it
    BROKEN_PIPE = 141  # 128 + SIGPIPE


# -- dtypes a user names, and which tensors a cast touches ---------------------------------------

#: what ``--dtype`` / ``dtype=`` accept (the user's name -> the dtype code); ``keep`` means no cast.
#: Other spellings ``dtypes.parse`` knows (float16, half, F16, bfloat16 ...) are accepted too.
DTYPE_NAMES: dict[str, str] = {
    "fp32": "F32",
    "fp16": "F16",
    "bf16": "BF16",
    "fp8_e4m3fn": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2",
}
KEEP = "keep"
#: dtype codes a cast may start from or go to (write/cast.py casts exactly these, torch-exact).
CASTABLE = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def dtype_name(code: str | None) -> str:
    """The user's name of a cast target code (``F16`` -> ``fp16``; None -> ``keep``)."""
    if code is None:
        return KEEP
    return next((n for n, c in DTYPE_NAMES.items() if c == code), code)


def parse_dtype(value: str | DType | None) -> DType | None:
    """A cast target from what a user or caller gives: None/``keep`` -> None (no cast), a DType,
    ``fp16``, ``F16``, ``float16``, ``half``... UnsupportedDtype for anything that is not one of
    the cast targets in DTYPE_NAMES."""
    from sdtool import dtypes
    from sdtool.errors import UnsupportedDtype

    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == KEEP:
            return None
        code = DTYPE_NAMES.get(text.lower())
        dt = dtypes.from_code(code) if code else dtypes.parse(text)
    else:
        dt = value
    if dt.code not in DTYPE_NAMES.values():
        raise UnsupportedDtype(
            f"{value!s} is not a dtype sdtool casts to; use one of "
            f"{', '.join([KEEP, *DTYPE_NAMES])}"
        )
    return dt


def cast_target(src: DType, target: DType | None) -> DType:
    """The cast rule, one place: the dtype a tensor of ``src`` is written as when the user asks
    for ``target``. Floating tensors of a castable dtype take ``target``; everything else
    (int64 ``position_ids``, bools, complex, dtypes sdtool does not cast) keeps its dtype."""
    if target is None or not src.is_float or src.code not in CASTABLE:
        return src
    return target


# -- components -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """A model component: its one name (JSON, options), its label (text output), its role."""

    name: str
    label: str
    role: str


#: name -> Component. Names are what ``--component``, ``--drop``, identify and JSON say.
COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("unet", "UNet", "denoiser"),
        Component("mmdit", "MMDiT", "denoiser"),
        Component("flux", "Flux transformer", "denoiser"),
        Component("vae", "VAE", "vae"),
        Component("clip-l", "CLIP-L", "text-encoder"),
        Component("clip-g", "CLIP-G", "text-encoder"),
        Component("openclip-h", "OpenCLIP-H", "text-encoder"),
        Component("t5xxl", "T5-XXL", "text-encoder"),
        Component("controlnet", "ControlNet", "controlnet"),
        Component("depth", "MiDaS depth", "aux"),
        Component("scheduler", "noise schedule", "aux"),
        Component("ema", "EMA", "ema"),
        # identify's further families (sdtool/identify/tables.py)
        Component("chroma", "Chroma transformer", "denoiser"),
        Component("flux2", "Flux 2 transformer", "denoiser"),
        Component("auraflow", "AuraFlow transformer", "denoiser"),
        Component("pixart", "PixArt transformer", "denoiser"),
        Component("hunyuan-dit", "Hunyuan-DiT transformer", "denoiser"),
        Component("hunyuan-video", "HunyuanVideo transformer", "denoiser"),
        Component("mochi", "Mochi transformer", "denoiser"),
        Component("cosmos", "Cosmos transformer", "denoiser"),
        Component("stable-audio", "Stable Audio DiT", "denoiser"),
        Component("hunyuan3d", "Hunyuan3D transformer", "denoiser"),
        Component("kandinsky5", "Kandinsky 5 transformer", "denoiser"),
        Component("stable-cascade", "Stable Cascade UNet", "denoiser"),
        Component("wan", "Wan transformer", "denoiser"),
        Component("ltxv", "LTX-Video transformer", "denoiser"),
        Component("lumina2", "Lumina 2 transformer", "denoiser"),
        Component("z-image", "Z-Image transformer", "denoiser"),
        Component("qwen-image", "Qwen-Image transformer", "denoiser"),
        Component("hidream", "HiDream transformer", "denoiser"),
        Component("umt5xxl", "UMT5-XXL", "text-encoder"),
        Component("llama-3.1-8b", "Llama 3.1 8B", "text-encoder"),
        Component("gemma-2-2b", "Gemma 2 2B", "text-encoder"),
        Component("qwen2.5-7b", "Qwen2.5 7B", "text-encoder"),
        Component("qwen2.5-vl-vision", "Qwen2.5-VL vision tower", "text-encoder"),
        Component("t2i-adapter", "T2I-Adapter", "t2i-adapter"),
        Component("ip-adapter", "IP-Adapter", "ip-adapter"),
        Component("omnigen2", "OmniGen2 transformer", "denoiser"),
        Component("ace-step", "ACE-Step transformer", "denoiser"),
        Component("cogvideox", "CogVideoX transformer", "denoiser"),
        Component("seedvr2", "SeedVR2 transformer", "denoiser"),
        Component("clip-vision-h", "OpenCLIP-H image encoder", "text-encoder"),
        Component("dit", "DiT", "denoiser"),  # a transformer denoiser with no name of its own
    )
}


def owner_label(owner: str) -> str:
    """The text label of an owner of keys (``Identity.owners()``): a component's label, "LoRA
    te1" for "lora-te1", other owners ("markers", "unknown", ...) as they are."""
    if (c := COMPONENTS.get(owner)) is not None:
        return c.label
    if owner.startswith("lora-"):
        return "LoRA " + owner[len("lora-") :]
    return owner


#: the roles components play (``--drop`` and ``extract --component`` name roles too)
ROLES = ("denoiser", "vae", "text-encoder", "controlnet", "t2i-adapter", "ip-adapter", "aux", "ema")


#: ``prune --drop`` part -> the roles it removes
DROP_TARGETS: dict[str, tuple[str, ...]] = {
    "vae": ("vae",),
    "text-encoder": ("text-encoder",),
    "unet": ("denoiser",),
    "ema": ("ema",),
    "unknown": ("unknown",),
}
#: ``extract --component`` names -> roles (a role) or component names (one encoder)
EXTRACT_TARGETS: dict[str, str] = {
    "unet": "denoiser",
    "vae": "vae",
    "text-encoder": "text-encoder",
    "clip-l": "clip-l",
    "clip-g": "clip-g",
    "openclip-h": "openclip-h",
    "t5xxl": "t5xxl",
}
#: ``merge --method`` names (sdtool.ops.merge.METHODS defines each; here for a numpy-free --help)
MERGE_METHODS = ("weighted-sum", "add-difference", "ties", "dare", "slerp")
#: ``hash --algorithm`` names in display order (sdtool.ops.hash.ALGORITHMS defines each; here
#: so that ``hash --help`` loads no hashing machinery)
HASH_NAMES = ("sha256", "autov1", "autov2", "autov3", "crc32", "blake3")
#: ``convert --to`` (batch mode) -> the output suffix
TO_SUFFIX = {"safetensors": ".safetensors", "ckpt": ".ckpt"}

#: the one progress shape: ``progress(done, total)`` in bytes (or items), called as work advances
Progress = Callable[[int, int], None]
