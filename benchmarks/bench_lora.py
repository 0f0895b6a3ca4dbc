"""LoRA extract / bake / resize on SD 1.5-shaped fp16 checkpoints; print wall time and peak RSS.

Uses the inputs of bench_merge.py (``--make`` there first): A as the fine-tune, B as the base,
so every UNet and text-encoder layer differs (a harder case than a real fine-tune for the
randomized SVD: no dominant singular values). Each case runs in its own process; peak RSS comes
from /usr/bin/time.

    python benchmarks/bench_lora.py                       # /work/bench/merge/{a,b}.safetensors

Target (issue 15): extract of SD 1.5 (UNet and text encoder, rank 32) under 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = Path("/work/bench/merge")


def run(cmd: list[str]) -> tuple[float, float, int, int]:
    report = Path(f"/tmp/bench_lora.{os.getpid()}.time")
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%U %S %M", "-o", str(report), *cmd],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        check=False,
    )
    wall = time.perf_counter() - t0
    user, sys_, rss_kib = report.read_text().split()[-3:]
    report.unlink()
    return wall, float(user) + float(sys_), int(rss_kib) * 1024, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--skip", action="append", default=[], help="skip cases containing this")
    args = ap.parse_args()
    d: Path = args.dir
    a, b = d / "a.safetensors", d / "b.safetensors"
    if not (a.exists() and b.exists()):
        sys.exit(f"{a} / {b} missing: run benchmarks/bench_merge.py --make first")
    lora, small, baked = d / "lora32.safetensors", d / "lora8.safetensors", d / "baked.safetensors"
    sd = [sys.executable, "-m", "sdtool"]
    cases = {
        "extract rank 32 (UNet + TE, fp16)": [
            *sd, "lora", "extract", str(a), str(b), str(lora), "--rank", "32", "--overwrite"
        ],
        "extract --sv-fro 0.5, cap 32 (exact SVDs)": [
            *sd, "lora", "extract", str(a), str(b), str(d / "dyn.safetensors"), "--rank", "32",
            "--sv-fro", "0.5", "--overwrite",
        ],
        "resize 32 -> 8": [*sd, "lora", "resize", str(lora), str(small), "--rank", "8",
                           "--overwrite"],
        "bake rank-32 LoRA into B": [*sd, "lora", "bake", str(b), str(lora), str(baked),
                                     "--overwrite"],
    }  # fmt: skip
    rows = []
    for name, cmd in cases.items():
        if any(s in name for s in args.skip):
            continue
        wall, cpu, rss, rc = run(cmd)
        rows.append((name, wall, cpu, rss, rc))
        print(f"{name:45s} {wall:8.1f} s {cpu:8.1f} cpu-s {rss / 2**20:7.0f} MiB  exit {rc}",
              flush=True)  # fmt: skip
    for p in (small, baked, d / "dyn.safetensors"):
        p.unlink(missing_ok=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    print("| case | wall | CPU (user+sys) | peak RSS | exit |\n|---|---|---|---|---|")
    for name, wall, cpu, rss, rc in rows:
        print(f"| {name} | {wall:.1f} s | {cpu:.1f} s | {rss / 2**20:.0f} MiB | {rc} |")


if __name__ == "__main__":
    main()
