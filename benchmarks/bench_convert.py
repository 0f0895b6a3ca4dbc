"""Convert the SD-shaped 7.7 GB fp32 checkpoint (with EMA) several ways; print wall time and RSS.

Each case runs in its own process, one after another, on the same warm input, and its peak RSS
comes from that process alone (/usr/bin/time). Outputs go beside the input (same disk, as cp's) and
are deleted after each case.

    python benchmarks/bench_convert.py                         # /work/bench/sd15-ema.ckpt
    python benchmarks/bench_convert.py --input other.ckpt --skip torch-load

Targets (issue 4): sdtool's peak RSS under 1 GB; its wall time within 1.5x of cp.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = Path("/work/bench/sd15-ema.ckpt")

TORCH_SAVE = """
import sys, types, torch
from safetensors.torch import save_file
# the checkpoint pickles pytorch_lightning's ModelCheckpoint class; allow a stand-in for it so
# weights_only=True (torch's safe default) can load the file without pytorch_lightning
mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
class ModelCheckpoint: pass
ModelCheckpoint.__module__ = mod.__name__
mod.ModelCheckpoint = ModelCheckpoint
sys.modules[mod.__name__] = mod
torch.serialization.add_safe_globals([ModelCheckpoint])
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True, mmap={mmap})
sd = sd.get("state_dict", sd)
save_file({{k: v.contiguous() for k, v in sd.items()}}, sys.argv[2], metadata={{"format": "pt"}})
"""


def cases(src: Path, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "cp": ["cp", str(src), str(out)],
        "cp + sync (what an fsync'd write costs)": [
            "sh", "-c", 'cp "$0" "$1" && sync "$1"', str(src), str(out)
        ],
        "sdtool convert (keep)": [py, "-m", "sdtool", "convert", str(src), str(out)],
        "sdtool convert --dtype fp16": [
            py, "-m", "sdtool", "convert", str(src), str(out), "--dtype", "fp16"
        ],
        "sdtool convert -> .ckpt (keep)": [
            py, "-m", "sdtool", "convert", str(src), str(out.with_suffix(".ckpt"))
        ],
        "sdtool convert -> .ckpt --dtype fp16": [
            py, "-m", "sdtool", "convert", str(src), str(out.with_suffix(".ckpt")), "--dtype",
            "fp16",
        ],
        "torch.load + save_file": [py, "-c", TORCH_SAVE.format(mmap=False), str(src), str(out)],
        "torch.load(mmap=True) + save_file": [
            py, "-c", TORCH_SAVE.format(mmap=True), str(src), str(out)
        ],
    }  # fmt: skip


def run(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of ``cmd`` in its own process.

    RSS is measured by /usr/bin/time around the command (a child forked from this Python
    process would start with this process's RSS already counted).
    """
    report = Path(f"/tmp/bench_convert.{os.getpid()}.time")
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(report), *cmd],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        check=False,
    )
    wall = time.perf_counter() - t0
    rss_kib = int(report.read_text().split()[-1])
    report.unlink()
    return wall, rss_kib * 1024, proc.returncode


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    ap.add_argument("--skip", action="append", default=[], help="skip cases whose name has this")
    args = ap.parse_args()
    src: Path = args.input
    if not src.exists():
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "make_checkpoint.py"), str(src)], check=True
        )
    out = src.with_name(src.stem + ".bench-out.safetensors")
    rows = []
    for name, cmd in cases(src, out).items():
        if any(s in name for s in args.skip):
            continue
        warm(src)
        wall, rss, rc = run(cmd)
        written = [p for p in (out, out.with_suffix(".ckpt")) if p.exists()]
        size = written[0].stat().st_size if written else 0
        for p in written:
            p.unlink()
        rows.append((name, wall, rss, size, rc))
        print(f"  {name}: {wall:.1f} s, {rss / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    cp_wall = next((w for n, w, *_ in rows if n == "cp"), None)
    print(f"\ninput: {src} ({src.stat().st_size / 1e9:.2f} GB)\n")
    print(f"| {'case':<36} | wall s | x cp | peak RSS MiB | output GB | rc |")
    print(f"|{'-' * 38}|-------:|-----:|-------------:|----------:|---:|")
    for name, wall, rss, size, rc in rows:
        ratio = f"{wall / cp_wall:.2f}" if cp_wall else "-"
        print(
            f"| {name:<36} | {wall:6.1f} | {ratio:>4} | {rss / 2**20:12.0f} | "
            f"{size / 1e9:9.2f} | {rc:2d} |"
        )


if __name__ == "__main__":
    main()
