"""SDXL single file -> diffusers folder: sdtool against diffusers' own conversion; time, peak RSS.

The input is a full-size SDXL base checkpoint in fp16 (6.9 GB) with the real key set and shapes
(shared/reference/layouts/sdxl-sgm.yaml, every key a released SDXL base file has: both text
encoders whole, text_projection, logit_scale, position_ids as int64; not the optional
v-prediction / ZTSNR markers or noise-schedule buffers) and random values, made once. Each
case runs in its own process (/usr/bin/time gives its peak RSS) on a warm input; outputs are
deleted after each case.

- sdtool: ``sdtool convert sdxl.safetensors out/ --to diffusers`` (and with ``--verify``);
- diffusers: ``StableDiffusionXLPipeline.from_single_file(sdxl, config=DIR,
  local_files_only=True, torch_dtype=float16)`` + ``save_pretrained(out)``, offline, the configs
  read from a local diffusers folder (the one sdtool writes: model_index.json and every
  component's config, no weights needed); and, as the lower bound of that work,
  ``safetensors.torch.load_file`` + ``single_file_utils``' convert_* functions + ``save_file``
  per component (no torch modules built).

The layout tables are found beside the repository (``../shared/reference/layouts``), or where
``SDTOOL_LAYOUTS`` points.

    python benchmarks/bench_layout.py        # /work/bench/sdxl-full-fp16.safetensors
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = Path("/work/bench/sdxl-full-fp16.safetensors")
LAYOUTS = Path(os.environ.get("SDTOOL_LAYOUTS") or ROOT.parent / "shared" / "reference" / "layouts")
LAYOUT = LAYOUTS / "sdxl-sgm.yaml"
#: optional keys a released SDXL base file does not have (other model types' markers, buffers)
LEFT_OUT = ("edm_vpred.", "v_pred", "ztsnr", "alphas_cumprod", "alphas_cumprod_prev", "betas",
            "log_one_minus_alphas_cumprod", "posterior_", "sqrt_")  # fmt: skip

MAKE = r"""
import re, sys, json, struct, numpy as np
line = re.compile(r"^    (\S+): \{shape: \[([^\]]*)\], dtype: (\w+)(.*)\}\s*$")
left_out = tuple(json.loads(sys.argv[3]))
keys = {}
for text in open(sys.argv[1]):
    m = line.match(text)
    if m and not m.group(1).startswith(left_out):
        shape = tuple(int(s) for s in m.group(2).split(",") if s.strip())
        keys[m.group(1)] = (shape, "I64" if m.group(3) == "int64" else "F16")
rng = np.random.default_rng(0)
header, off = {}, 0
for k, (s, dt) in keys.items():
    n = int(np.prod(s, dtype=np.int64)) * (8 if dt == "I64" else 2)
    header[k] = {"dtype": dt, "shape": list(s), "data_offsets": [off, off + n]}
    off += n
header["__metadata__"] = {"format": "pt"}
raw = json.dumps(header).encode(); raw += b" " * (-len(raw) % 8)
block = rng.standard_normal(1 << 22).astype(np.float16).tobytes()
with open(sys.argv[2], "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for k, (s, dt) in keys.items():
        n = header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
        if dt == "I64":  # position_ids: 0..76
            f.write(np.arange(int(np.prod(s)), dtype="<i8").reshape(s).tobytes())
            continue
        while n:
            step = min(n, len(block)); f.write(block[:step]); n -= step
"""

FROM_SINGLE_FILE = r"""
import sys, torch, diffusers
src, out, cfg = sys.argv[1], sys.argv[2], sys.argv[3]
pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
    src, config=cfg, local_files_only=True, torch_dtype=torch.float16)
meta = [f"{n}.{k}" for n in ("unet", "vae", "text_encoder", "text_encoder_2")
        for k, v in getattr(pipe, n).state_dict().items() if v.device.type == "meta"]
if meta:
    sys.exit(f"from_single_file left {len(meta)} tensor(s) unloaded: {meta[:3]}")
pipe.save_pretrained(out)
"""

DIFFUSERS = r"""
import sys, os, json
from safetensors.torch import load_file, save_file
import diffusers.loaders.single_file_utils as sfu
src, out = sys.argv[1], sys.argv[2]
sd = load_file(src)
unet_cfg = json.load(open(os.path.join(sys.argv[3], "unet", "config.json")))
vae_cfg = json.load(open(os.path.join(sys.argv[3], "vae", "config.json")))
parts = {
    "unet/diffusion_pytorch_model.safetensors": sfu.convert_ldm_unet_checkpoint(sd, unet_cfg),
    "vae/diffusion_pytorch_model.safetensors": sfu.convert_ldm_vae_checkpoint(sd, vae_cfg),
    "text_encoder/model.safetensors": sfu.convert_ldm_clip_checkpoint(sd),
    "text_encoder_2/model.safetensors": sfu.convert_open_clip_checkpoint(
        None, sd, prefix="conditioner.embedders.1.model."),
}
for rel, state in parts.items():
    os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, rel),
              metadata={"format": "pt"})
"""


def run(cmd: list[str]) -> tuple[float, int, int]:
    report = Path(f"/tmp/bench_layout.{os.getpid()}.time")
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(report), *cmd],
        cwd=ROOT, stdout=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    rss = int(report.read_text().split()[-1]) * 1024
    report.unlink()
    return wall, rss, proc.returncode


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    args = ap.parse_args()
    src: Path = args.input
    py = sys.executable
    if not src.exists():
        src.parent.mkdir(parents=True, exist_ok=True)
        if not LAYOUT.is_file():
            sys.exit(f"{LAYOUT} not found: set SDTOOL_LAYOUTS to shared/reference/layouts")
        import json

        subprocess.run([py, "-c", MAKE, str(LAYOUT), str(src), json.dumps(LEFT_OUT)], check=True)
    out = src.with_name(src.stem + ".bench-out")
    cfg = out.with_name(out.name + "-cfg")  # configs for the diffusers cases come from sdtool
    cases = {
        "sdtool convert --to diffusers": [py, "-m", "sdtool", "convert", str(src), str(out),
                                          "--to", "diffusers"],
        "sdtool convert --to diffusers --verify": [py, "-m", "sdtool", "convert", str(src),
                                                   str(out), "--to", "diffusers", "--verify"],
        "diffusers from_single_file + save_pretrained": [py, "-c", FROM_SINGLE_FILE, str(src),
                                                         str(out), str(cfg)],
        "diffusers load_file + convert_* + save_file": [py, "-c", DIFFUSERS, str(src), str(out),
                                                        str(cfg)],
    }  # fmt: skip
    shutil.rmtree(cfg, ignore_errors=True)
    subprocess.run([py, "-m", "sdtool", "convert", str(src), str(cfg), "--to", "diffusers"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    rows = []
    for name, cmd in cases.items():
        shutil.rmtree(out, ignore_errors=True)
        warm(src)
        wall, rss, rc = run(cmd)
        rows.append((name, wall, rss, size_of(out), rc))
        print(f"  {name}: {wall:.1f} s, {rss / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cfg, ignore_errors=True)
    print(f"\ninput: {src} ({src.stat().st_size / 1e9:.2f} GB)\n")
    print(f"| {'case':<44} | wall s | peak RSS MiB | output GB | rc |")
    print(f"|{'-' * 46}|-------:|-------------:|----------:|---:|")
    for name, wall, rss, size, rc in rows:
        print(f"| {name:<44} | {wall:6.1f} | {rss / 2**20:12.0f} | {size / 1e9:9.2f} | {rc:2d} |")


if __name__ == "__main__":
    main()
