"""Regenerate sdtool/data/signatures.json.gz from ../shared/reference/layouts and the harvest.

The package keeps only what identification needs: per component signature the relative key
list (in layout order), which keys are optional, and one shape list per architecture. The
yaml/txt sources stay outside the package; the key lists harvested from the diffusers /
transformers classes (``tools/harvest_layouts.py``) are package data
(``sdtool/data/harvested.json.gz``) and become signatures as ``HARVESTED_SIGNATURES`` says.
SSD-1B's original-naming UNet is derived from the SDXL layout with ComfyUI's SSD-1B block depths
(``SSD1B_DEPTHS``).

    python tools/gen_signatures.py [LAYOUTS_DIR]
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sdtool.identify.tables import HARVESTED_OPTIONAL, HARVESTED_SIGNATURES  # noqa: E402

HARVESTED = ROOT / "sdtool" / "data" / "harvested.json.gz"
DEFAULT_LAYOUTS = next(
    (
        p / "shared" / "reference" / "layouts"
        for p in ROOT.parents
        if (p / "shared" / "reference" / "layouts" / "README.md").is_file()
    ),
    ROOT.parent / "shared" / "reference" / "layouts",
)
OUT = ROOT / "sdtool" / "data" / "signatures.json.gz"

_LINE = re.compile(r"^    (\S+): \{shape: \[([^\]]*)\], dtype: (\w+)(.*)\}\s*$")
_COMPONENT = re.compile(r"^  (\w+):\s*$")

Entry = tuple[str, list[int], bool]  # key, shape, optional


def read_yaml(path: Path) -> dict[str, list[Entry]]:
    """The sd-mecha layout yaml, parsed for its one fixed shape (no yaml dependency)."""
    comps: dict[str, list[Entry]] = {}
    current = None
    for line in path.read_text().splitlines():
        if m := _COMPONENT.match(line):
            current = comps.setdefault(m.group(1), [])
        elif (m := _LINE.match(line)) and current is not None:
            shape = [int(s) for s in m.group(2).split(",") if s.strip()]
            current.append((m.group(1), shape, "optional: true" in m.group(4)))
    return comps


def read_txt(path: Path) -> list[Entry]:
    out: list[Entry] = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split(" ", 1)
            out.append((key, json.loads(shape), False))
    return out


def strip(entries: list[Entry], prefix: str, optional: tuple[str, ...] = ()) -> list[Entry]:
    """Entries under ``prefix`` with it removed; keys starting with ``optional`` made optional."""
    return [
        (k[len(prefix) :], s, o or k[len(prefix) :].startswith(optional))
        for k, s, o in entries
        if k.startswith(prefix)
    ]


def signature(shapes: dict[str, list[Entry]]) -> dict[str, object]:
    """One signature: the first shape set gives the keys; every set must list the same keys."""
    first = next(iter(shapes.values()))
    keys = [k for k, _, _ in first]
    for arch, entries in shapes.items():
        if [k for k, _, _ in entries] != keys:
            got = {k for k, _, _ in entries}
            raise SystemExit(f"{arch}: key set differs ({len(set(keys) ^ got)} keys)")
    return {
        "keys": keys,
        "optional": [i for i, (_, _, o) in enumerate(first) if o],
        # kept as JSON text: parsed only for the signatures a file matches (start-up time)
        "shapes": json.dumps(
            {arch: [s for _, s, _ in entries] for arch, entries in shapes.items()},
            separators=(",", ":"),
        ),
    }


#: ComfyUI model_detection.py SSD_1B: transformer depths per SDXL block (SDXL: 2, 2, 10, 10 in;
#: output blocks 0-2: 10, 3-5: 2) and no middle transformer (transformer_depth_middle -1).
SSD1B_DEPTHS = {
    "input_blocks.4.1.": 2, "input_blocks.5.1.": 2, "input_blocks.7.1.": 4, "input_blocks.8.1.": 4,
    "output_blocks.0.1.": 4, "output_blocks.1.1.": 4, "output_blocks.2.1.": 10,
    "output_blocks.3.1.": 2, "output_blocks.4.1.": 1, "output_blocks.5.1.": 1,
}  # fmt: skip
SSD1B_DROPPED = ("middle_block.1.", "middle_block.2.")
_BLOCK = re.compile(r"^((?:input|output)_blocks\.\d+\.1\.)transformer_blocks\.(\d+)\.")


def ssd1b(sdxl: list[Entry]) -> list[Entry]:
    """The SDXL UNet entries SSD-1B keeps."""
    out = []
    for k, s, o in sdxl:
        m = _BLOCK.match(k)
        if m and int(m.group(2)) >= SSD1B_DEPTHS.get(m.group(1), 99):
            continue
        if k.startswith(SSD1B_DROPPED):
            continue
        out.append((k, s, o))
    return out


def harvested(path: Path = HARVESTED) -> dict[str, dict[str, object]]:
    """Signatures from the harvested key lists (HARVESTED_SIGNATURES: model -> signature)."""
    models = json.loads(gzip.decompress(path.read_bytes()))["models"]
    grouped: dict[str, dict[str, list[Entry]]] = {}
    for model, sid, profile in HARVESTED_SIGNATURES:
        d = models[model]
        opt = HARVESTED_OPTIONAL.get(model, ())
        entries = [
            (k, s, k.startswith(opt) if opt else False)
            for k, s in zip(d["keys"], d["shapes"], strict=True)
        ]
        grouped.setdefault(sid, {})[profile] = entries
    return {sid: signature(shapes) for sid, shapes in grouped.items()}


def build(layouts: Path) -> dict[str, object]:
    y = {p.stem: read_yaml(p) for p in sorted(layouts.glob("*.yaml"))}
    t = {p.stem: read_txt(p) for p in sorted((layouts / "toolkit").glob("*.txt"))}
    sd1, sdxl, sd3, flux = y["sd1-ldm"], y["sdxl-sgm"], y["sd3-comfyui"], y["flux-flux"]
    unet_sd1 = strip(sd1["diffuser"], "model.diffusion_model.")
    by_key = {k: (s, o) for k, s, o in t["UNET-v2-SD"]}
    unet_sd2 = [(k, by_key[k][0], o) for k, _, o in unet_sd1]
    clip_l = strip(sd1["clip_l"], "cond_stage_model.transformer.")
    clip_l.append(("text_projection.weight", [768, 768], True))  # CLIPTextModelWithProjection
    sigs = {
        "unet-ldm": signature({"sd1": unet_sd1, "sd2": unet_sd2}),
        "unet-sdxl": signature({"sdxl-base": strip(sdxl["diffuser"], "model.diffusion_model.")}),
        "unet-sdxl-refiner": signature({"sdxl-refiner": t["UNET-XL-Refiner"]}),
        "mmdit": signature({"sd3": strip(sd3["diffuser"], "model.diffusion_model.")}),
        "flux": signature(
            {"flux-dev": strip(flux["diffuser"], "model.diffusion_model.", ("guidance_in.",))}
        ),
        "vae": signature({"sd": strip(sd1["vae"], "first_stage_model.")}),
        "vae16": signature({"sd3": strip(sd3["vae"], "first_stage_model.")}),
        "clip-l": signature({"sd1": clip_l}),
        "openclip-h": signature({"sd2": t["CLIP-v2-SD"]}),
        "openclip-g": signature(
            {"sdxl-base": strip(sdxl["clip_g"], "conditioner.embedders.1.model.")}
        ),
        "clip-g": signature({"sdxl-base": strip(y["sdxl-kohya"]["clip_g"], "te2.")}),
        "t5xxl": signature({"sd3": strip(sd3["t5xxl"], "text_encoders.t5xxl.transformer.")}),
        "controlnet": signature({"sd1": t["ControlNet-v1-SD"]}),
        "midas": signature({"sd2": t["Depth-v2-SD"]}),
        "unet-diffusers": signature({"sd1": strip(y["sd1-kohya"]["diffuser"], "unet.")}),
        "vae-diffusers": signature({"sd": strip(y["sd1-kohya"]["vae"], "vae.")}),
        "scheduler": signature({"sd": [(k, s, False) for k, s, _ in sd1["scheduler"]]}),
        "unet-ssd1b": signature(
            {"ssd-1b": ssd1b(strip(sdxl["diffuser"], "model.diffusion_model."))}
        ),
    }
    sigs.update(harvested())
    return {"generated_by": "tools/gen_signatures.py", "signatures": sigs}


def encode(data: dict[str, object]) -> bytes:
    """The package file's exact bytes (deterministic: sorted keys, gzip mtime 0)."""
    raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    return gzip.compress(raw, compresslevel=9, mtime=0)


def main(argv: list[str]) -> int:
    layouts = Path(argv[0]) if argv else DEFAULT_LAYOUTS
    data = build(layouts)
    raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(encode(data))
    for name, sig in data["signatures"].items():  # type: ignore[attr-defined]
        print(f"{name:20} {len(sig['keys']):5} keys  {len(sig['optional']):4} optional")
    print(f"{OUT.relative_to(ROOT)}: {OUT.stat().st_size} bytes ({len(raw)} uncompressed)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
