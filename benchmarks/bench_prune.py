"""Prune the SD 1.5-shaped 7.7 GB training checkpoint to fp16 EMA-only: sdtool vs the usual script.

The usual script (what most guides show): torch.load the checkpoint, rebuild the state dict with
the EMA weights under the model keys, ``.half()`` the floats, save with safetensors. Each run is a
fresh subprocess; wall time and its peak RSS (ru_maxrss of the child) are printed as a table.

    python benchmarks/bench_prune.py [/work/bench/sd15-ema.ckpt]

Outputs go beside the input and are deleted afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = Path("/work/bench/sd15-ema.ckpt")

USUAL = r"""
import sys, types, torch
from safetensors.torch import save_file
# the checkpoint pickles pytorch_lightning's ModelCheckpoint: a stand-in so torch.load works
# without Lightning installed (the usual script runs where Lightning is)
for name in ("pytorch_lightning", "pytorch_lightning.callbacks",
             "pytorch_lightning.callbacks.model_checkpoint"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = type(
    "ModelCheckpoint", (), {})
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
sd = ck.get("state_dict", ck)
out = {}
for k, v in sd.items():
    if k.startswith("model_ema."):
        continue
    if k.startswith("model."):
        ema = "model_ema." + k[len("model."):].replace(".", "")
        v = sd.get(ema, v)
    out[k] = v.half() if v.is_floating_point() else v
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[2])
"""


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one child process."""
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pid = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(pid.pid, 0)
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - t, usage.ru_maxrss / 1024**2


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    if not src.is_file():
        print(f"{src} is missing: python benchmarks/make_checkpoint.py {src}")
        return 1
    py = sys.executable
    out_a, out_b = (
        src.with_name("bench-prune-sdtool.safetensors"),
        src.with_name("bench-prune-usual.safetensors"),
    )
    rows = []
    try:
        rows.append(
            (
                "sdtool prune --ema-only --dtype fp16",
                *run(
                    [
                        py,
                        "-m",
                        "sdtool",
                        "prune",
                        str(src),
                        str(out_a),
                        "--ema-only",
                        "--dtype",
                        "fp16",
                        "--overwrite",
                    ]
                ),
                out_a.stat().st_size,
            )
        )
        rows.append(
            (
                "torch.load + rebuild + .half() + save_file",
                *run([py, "-c", USUAL, str(src), str(out_b)]),
                out_b.stat().st_size,
            )
        )
    finally:
        for p in (out_a, out_b):
            p.unlink(missing_ok=True)
    print(f"input: {src} ({src.stat().st_size / 1e9:.2f} GB)")
    print(f"{'method':45} {'wall s':>8} {'peak RSS GiB':>13} {'output GB':>10}")
    for name, wall, rss, size in rows:
        print(f"{name:45} {wall:8.1f} {rss:13.2f} {size / 1e9:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
