"""SDXL single file -> diffusers folder: sdtool against diffusers' own conversion; time, peak RSS.

The input is a full-size SDXL base checkpoint in fp16 (6.9 GB) with the real key set and shapes
(shared/reference/layouts/sdxl-sgm.yaml) and random values, made once. Each case runs in its own
process (/usr/bin/time gives its peak RSS) on a warm input; outputs are deleted after each case.

- sdtool: ``sdtool convert sdxl.safetensors out/ --to diffusers``;
- diffusers: ``safetensors.torch.load_file`` + ``diffusers.loaders.single_file_utils``'s
  convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint / convert_ldm_clip_checkpoint /
  convert_open_clip_checkpoint + ``save_file`` per component: the conversion work
  ``from_single_file`` does, without building the torch modules or fetching configs (it cannot
  run offline otherwise).

    python benchmarks/bench_layout.py                  # /work/bench/sdxl-fp16.safetensors
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
DEFAULT_INPUT = Path("/work/bench/sdxl-fp16.safetensors")
LAYOUT = ROOT.parent / "shared" / "reference" / "layouts" / "sdxl-sgm.yaml"

MAKE = r"""
import re, sys, numpy as np
from safetensors.numpy import save_file
line = re.compile(r"^    (\S+): \{shape: \[([^\]]*)\], dtype: (\w+)(.*)\}\s*$")
keys = {}
for text in open(sys.argv[1]):
    m = line.match(text)
    if m and "optional: true" not in m.group(4) or (m and ".layers.11." in m.group(1)):
        keys[m.group(1)] = tuple(int(s) for s in m.group(2).split(",") if s.strip())
rng = np.random.default_rng(0)
# written in groups so the maker itself stays small
import json, struct, os
header, off = {}, 0
for k, s in keys.items():
    n = int(np.prod(s, dtype=np.int64)) * 2
    header[k] = {"dtype": "F16", "shape": list(s), "data_offsets": [off, off + n]}
    off += n
header["__metadata__"] = {"format": "pt"}
raw = json.dumps(header).encode(); raw += b" " * (-len(raw) % 8)
with open(sys.argv[2], "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    block = rng.standard_normal(1 << 22).astype(np.float16).tobytes()
    left = off
    while left:
        n = min(left, len(block)); f.write(block[:n]); left -= n
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
        subprocess.run([py, "-c", MAKE, str(LAYOUT), str(src)], check=True)
    out = src.with_name(src.stem + ".bench-out")
    cases = {
        "sdtool convert --to diffusers": [py, "-m", "sdtool", "convert", str(src), str(out),
                                          "--to", "diffusers"],
        "sdtool convert --to diffusers --verify": [py, "-m", "sdtool", "convert", str(src),
                                                   str(out), "--to", "diffusers", "--verify"],
        "diffusers load_file + convert_* + save_file": [py, "-c", DIFFUSERS, str(src), str(out),
                                                        str(out.with_name(out.name + "-cfg"))],
    }  # fmt: skip
    cfg = out.with_name(out.name + "-cfg")  # configs for the diffusers case come from sdtool
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
