"""Regenerate sdtool/data/signatures.json.gz from ../shared/reference/layouts.

The package keeps only what identification needs: per component signature the relative key
list (in layout order), which keys are optional, and one shape list per architecture. The
yaml/txt sources stay outside the package.

    python tools/gen_signatures.py [LAYOUTS_DIR]
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LAYOUTS = ROOT.parent / "shared" / "reference" / "layouts"
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
        "shapes": {arch: [s for _, s, _ in entries] for arch, entries in shapes.items()},
    }


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
    }
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
