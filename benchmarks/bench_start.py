"""Benchmark: how fast sdtool starts, as a whole process (issue 10: at most 0.15 s).

Runs each command line in a fresh process N times and prints the minimum and median wall time
and the minimum CPU time (user + system of the child), next to ``python -c pass`` (the floor
any Python program pays; in an editable install it includes the import hook pip's ``site``
loads, pathlib and urllib among it) and ``python -c 'import click'`` (the floor of any click
CLI). The minimum is the figure to compare with the goal: on a shared machine the median mostly
measures the other jobs (the load average is printed). The 7.7 GB checkpoint is made by
make_checkpoint.py (default /work/bench). ``sdtool`` is the console script beside the Python
running this (pip's generated one), when there is one.

The children run without PYTHONDONTWRITEBYTECODE, so the warm-up run writes the .pyc files an
installed package has (with it set, every run would compile sdtool's sources again), and the first
inspect keeps the key-set tables' compact copy in the cache folder (identify.keysets). The
warm-up run also stores the file's record in the result cache (the user's: $SDTOOL_CACHE_DIR),
so the rows marked "cached" time the rerun of an unchanged file; "--no-cache" rows the cold path
(the file's header and pickle read and identified).

    python benchmarks/bench_start.py [--ckpt /work/bench/sd15-ema.ckpt] [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXAMPLE = REPO / "examples" / "tiny-sd15-ema.ckpt"
COMMANDS = ("inspect", "scan", "convert", "prune", "extract", "hash", "diff", "merge", "lora")
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def cases(ckpt: Path) -> list[tuple[str, list[str]]]:
    py = [sys.executable]
    sd = [*py, "-m", "sdtool"]
    out = [
        ("python -c pass", [*py, "-c", "pass"]),
        ("python -c 'import click'", [*py, "-c", "import click"]),
        ("python -c 'import numpy'", [*py, "-c", "import numpy"]),
        ("sdtool --help", [*sd, "--help"]),
        ("sdtool --version", [*sd, "--version"]),
    ]
    script = Path(sys.executable).with_name("sdtool")
    if script.is_file():
        out.append(("sdtool --help (console script)", [str(script), "--help"]))
    out += [(f"sdtool {c} --help", [*sd, c, "--help"]) for c in COMMANDS]
    out.append(("sdtool scan tiny example", [*sd, "scan", str(EXAMPLE)]))
    out.append(("sdtool inspect tiny example, cached", [*sd, "inspect", str(EXAMPLE)]))
    out.append(("sdtool inspect tiny example --no-cache", [*sd, "inspect", "--no-cache",
                                                          str(EXAMPLE)]))  # fmt: skip
    if ckpt.is_file():
        name = f"sdtool inspect {ckpt.name} (7.7 GB)"
        out.append((f"{name}, cached", [*sd, "inspect", str(ckpt)]))
        out.append((f"{name} --json, cached", [*sd, "inspect", "--json", str(ckpt)]))
        out.append((f"{name} --no-cache", [*sd, "inspect", "--no-cache", str(ckpt)]))
        out.append((f"sdtool scan {ckpt.name} (7.7 GB), cached", [*sd, "scan", str(ckpt)]))
    # without ``site`` (python -S, the paths set by hand): no editable-install hook, which a
    # regular (wheel) install does not load either
    out.append(("python -S -c pass", [*py, "-S", "-c", "pass"]))
    out.append(("sdtool --help, no site", [*py, "-S", "-c", _NO_SITE, "--help"]))
    if ckpt.is_file():
        for extra in ([], ["--no-cache"]):
            label = f"sdtool inspect {ckpt.name} {' '.join(extra) or 'cached'}, no site"
            out.append((label, [*py, "-S", "-c", _NO_SITE, "inspect", *extra, str(ckpt)]))
    return out


_NO_SITE = (
    f"import sys; sys.path[:0] = [{str(REPO)!r}, {sysconfig.get_paths()['purelib']!r}]; "
    "sys.argv[0] = 'sdtool'; from sdtool.cli.main import run; run()"
)


def run(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env=ENV)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=Path("/work/bench/sd15-ema.ckpt"))
    ap.add_argument("--runs", type=int, default=15)
    a = ap.parse_args()
    env_note = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    rows = []
    for name, argv in cases(a.ckpt):
        run(argv)  # warm the page cache and .pyc files
        walls, cpus = zip(*(run(argv) for _ in range(a.runs)), strict=True)
        rows.append((name, min(walls), statistics.median(walls), min(cpus)))
    print(f"{a.runs} runs each; {env_note} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(f"{'command':<52} {'min s':>7} {'median s':>9} {'min cpu s':>10}  goal 0.15 s")
    print("-" * 90)
    for name, lo, med, cpu in rows:
        verdict = "" if name.startswith("python") else ("ok" if lo <= 0.15 else "over")
        print(f"{name:<52} {lo:7.3f} {med:9.3f} {cpu:10.3f}  {verdict}")


if __name__ == "__main__":
    main()
