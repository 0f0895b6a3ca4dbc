"""Merge three SD 1.5-shaped fp16 checkpoints several ways; print one table: wall time, ratio
to the I/O floor, CPU time and peak RSS.

The inputs are generated (``--make``): the real SD 1.5 key set and shapes (UNet, VAE, CLIP-L,
from ../shared/reference/layouts/sd1-ldm.yaml, no EMA: 1,131 tensors, 2.13 GB each in fp16)
filled with seeded random values. The inputs are read once first (untimed), so every case reads
them from the page cache; then each case runs in its own process, one after another; peak RSS
comes from /usr/bin/time around that process alone. Outputs are deleted after each case.

    python benchmarks/bench_merge.py --make                 # inputs under /work/bench/merge
    python benchmarks/bench_merge.py                        # every case (~3-4 min idle)
    python benchmarks/bench_merge.py --skip torch --skip mecha   # sdtool and the floors only

Cases: the floors (``cat`` the inputs once, then ``cp`` A to the output and ``sync`` it: reading
the inputs once plus writing the output durably), for three inputs and for two; ``sdtool
merge`` add-difference (A B C), weighted-sum (A B) and, with ``--ties``, ties (A B C:
whole-tensor thresholds, then pieces); sd-mecha's add_difference (streaming,
its default threads); the whole-model torch way (three ``load_file``, a dict comprehension,
``save_file``), which needs about 4 x 2.1 GB of RAM. Each row's ratio is to the floor with the
same number of inputs. Targets (issue 15): sdtool under 300 MiB RSS and within 1.3x of the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import time
from math import prod
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = Path(
    os.environ.get("SDTOOL_LAYOUTS")  # a worktree outside /work: point this at shared's copy
    or Path(__file__).resolve().parents[2] / "shared" / "reference" / "layouts"
)
DEFAULT_DIR = Path("/work/bench/merge")
_LINE = re.compile(r"^    (\S+): \{shape: \[([0-9, ]*)\], dtype: (\w+)")
_COMP = re.compile(r"^  (\w+):\s*$")
COMPONENTS = ("diffuser", "vae", "clip_l")

TORCH_WAY = """
import sys, torch
from safetensors.torch import load_file, save_file
a, b, c = (load_file(p) for p in sys.argv[1:4])
out = {}
for k, v in a.items():
    if v.is_floating_point() and k in b and k in c and b[k].shape == v.shape == c[k].shape:
        out[k] = (v.float() + 0.5 * (b[k].float() - c[k].float())).to(v.dtype)
    else:
        out[k] = v
save_file(out, sys.argv[4], metadata={"format": "pt"})
"""

MECHA_WAY = """
import functools, sys, torch, sd_mecha, tqdm
a, b, c = (sd_mecha.model(p) for p in sys.argv[1:4])
recipe = sd_mecha.add_difference(a, b, c, alpha=0.5)
sd_mecha.merge(recipe, output=sys.argv[4], merge_dtype=torch.float32, output_dtype=torch.float16,
               tqdm=functools.partial(tqdm.tqdm, disable=True))
"""


def layout() -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of SD 1.5 without EMA, from the sd-mecha layout yaml."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    comp = None
    for line in (LAYOUTS / "sd1-ldm.yaml").read_text().splitlines():
        if m := _COMP.match(line):
            comp = m.group(1)
        elif (m := _LINE.match(line)) and comp in COMPONENTS:
            shape = tuple(int(x) for x in m.group(2).split(",") if x.strip())
            out[m.group(1)] = (shape, m.group(3))
    return out


def make(path: Path, seed: int) -> None:
    """A 2.13 GB fp16 safetensors file, written tensor by tensor (int64 position_ids kept)."""
    entries = layout()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, (shape, dt) in entries.items():
        code = "I64" if dt == "int64" else "F16"
        n = prod(shape) * (8 if code == "I64" else 2)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape, dt in entries.values():
            if dt == "int64":
                f.write(np.arange(prod(shape), dtype=np.int64).tobytes())
                continue
            n = prod(shape)
            for s in range(0, n, 1 << 24):
                c = min(1 << 24, n - s)
                f.write((rng.standard_normal(c, np.float32) * 0.02).astype(np.float16).tobytes())
    os.replace(tmp, path)


def run(cmd: list[str]) -> tuple[float, float, int, int]:
    """(wall s, CPU s (user + system), peak RSS bytes, exit code) of ``cmd``, own process."""
    report = Path(f"/tmp/bench_merge.{os.getpid()}.time")
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
    ap.add_argument("--make", action="store_true", help="generate the three inputs first")
    ap.add_argument("--skip", action="append", default=[], help="skip cases containing this")
    ap.add_argument("--ties", action="store_true", help="also ties (about a minute)")
    args = ap.parse_args()
    d: Path = args.dir
    d.mkdir(parents=True, exist_ok=True)
    a, b, c = (d / f"{x}.safetensors" for x in "abc")
    if args.make or not all(p.exists() for p in (a, b, c)):
        for i, p in enumerate((a, b, c)):
            t0 = time.perf_counter()
            make(p, i)
            print(
                f"made {p} ({p.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s"
            )
    out = d / "out.safetensors"
    py = sys.executable
    sd = [py, "-m", "sdtool", "merge"]
    floor = 'cat "$@" > /dev/null && cp "$1" "$0" && sync "$0"'
    abc, o = [str(a), str(b), str(c)], str(out)
    # name -> (inputs, command)
    cases: dict[str, tuple[int, list[str]]] = {
        "floor: cat A B C, cp A OUT, sync": (3, ["sh", "-c", floor, o, *abc]),
        "floor: cat A B, cp A OUT, sync": (2, ["sh", "-c", floor, o, *abc[:2]]),
        "sdtool merge add-difference A B C": (3, [*sd, *abc, o, "--method", "add-difference"]),
        "sdtool merge weighted-sum A B": (2, [*sd, *abc[:2], o]),
        "sdtool merge ties A B C": (3, [*sd, *abc, o, "--method", "ties"]),
        "sd-mecha add_difference A B C": (3, [py, "-c", MECHA_WAY, *abc, o]),
        "torch whole-model add-difference A B C": (3, [py, "-c", TORCH_WAY, *abc, o]),
    }  # fmt: skip
    load0 = os.getloadavg()[0]
    subprocess.run(["cat", str(a), str(b), str(c)], stdout=subprocess.DEVNULL, check=True)
    rows = []
    floors: dict[int, float] = {}
    for name, (n_in, cmd) in cases.items():
        if any(s in name for s in args.skip) or ("ties" in name and not args.ties):
            continue
        out.unlink(missing_ok=True)
        wall, cpu, rss, rc = run(cmd)
        if name.startswith("floor"):
            floors[n_in] = wall
        rows.append((name, n_in, wall, cpu, rss, rc))
        print(f"{name:45s} {wall:8.1f} s {cpu:8.1f} cpu-s {rss / 2**20:7.0f} MiB  exit {rc}",
              flush=True)  # fmt: skip
        out.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    print(f"\nload average: {load0:.1f} at the start, {load:.1f} at the end "
          f"(the machine has {os.cpu_count()} cores)")  # fmt: skip
    print("| case | wall | vs floor | CPU (user+sys) | peak RSS | exit |")
    print("|---|---|---|---|---|---|")
    for name, n_in, wall, cpu, rss, rc in rows:
        fl = floors.get(n_in)
        ratio = f"{wall / fl:.2f}x" if fl else "-"
        print(f"| {name} | {wall:.1f} s | {ratio} | {cpu:.1f} s | {rss / 2**20:.0f} MiB | {rc} |")


if __name__ == "__main__":
    main()
