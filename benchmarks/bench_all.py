"""Every throughput job of issue 18 beside its hardware yardstick, in one run: one table.

Inputs (built once under /work/bench by make_checkpoint.py and sdtool itself, reused after):
the 7.7 GB SD 1.5 training checkpoint with EMA (torch zip), the same in the legacy format, and
its safetensors conversion. Each job runs --runs times in its own process on a warm page cache
(the inputs are read once before each job), in rounds (every job once per round); the table
gives the median wall time and the peak RSS, user and system time of the median run, measured
by /usr/bin/time. Outputs go beside the inputs (the same disk as cp's) and are deleted after
each run.

    python benchmarks/bench_all.py                 # everything, 3 runs each (~15 minutes)
    python benchmarks/bench_all.py --runs 1 --only 'fp16|cp'

Goals (issue 18): a cast at most 0.8x cp of the same file, under 256 MiB; the six hashes
within 1.25x of one hashlib SHA-256 pass; diff within 1.2x of reading both files once and
system time no more than cat's, under 256 MiB.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# the yardstick bench_hash.py uses: one hashlib SHA-256 pass (this folder is on sys.path)
from bench_hash import HASHLIB_ALONE

#: both files read once on two threads at once (512 KiB preads, no comparing): what any
#: reader that overlaps its reads on two cores pays, the floor of diff's two workers
PREAD_TWO_THREADS = """
import os, sys, threading
fa, fb = (os.open(p, os.O_RDONLY) for p in sys.argv[1:3])
size = max(os.fstat(fa).st_size, os.fstat(fb).st_size)
todo, lock = iter(range(0, size, 512 << 10)), threading.Lock()
def work():
    a, b = bytearray(512 << 10), bytearray(512 << 10)
    while True:
        with lock:
            at = next(todo, None)
        if at is None:
            return
        os.preadv(fa, [a], at); os.preadv(fb, [b], at)
t = threading.Thread(target=work); t.start(); work(); t.join()
"""

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(os.environ.get("SDTOOL_BENCH_DIR", "/work/bench"))
CKPT = BENCH / "sd15-ema.ckpt"
LEGACY = BENCH / "sd15-ema-legacy.ckpt"
ST = BENCH / "sd15-ema.safetensors"
OUT = BENCH / "bench-all.out"


@dataclass(frozen=True)
class Job:
    """One command; ``yardstick`` names the job it is compared with, ``goal`` the ratio."""

    name: str
    cmd: list[str]
    reads: tuple[Path, ...]
    yardstick: str | None = None
    goal: float | None = None
    rss_goal_mib: int | None = None
    env: tuple[tuple[str, str], ...] = ()
    sys_goal: bool = False  # system time no more than the yardstick's


def sdtool(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdtool", *args]


def jobs() -> list[Job]:
    st, ck, lg = str(ST), str(CKPT), str(LEGACY)
    o_st, o_ck = str(OUT.with_suffix(".safetensors")), str(OUT.with_suffix(".ckpt"))
    cast = {"yardstick": "cp ckpt", "goal": 0.8, "rss_goal_mib": 256}
    return [
        # yardsticks
        Job("cp ckpt", ["cp", ck, o_st], (CKPT,)),
        Job("cp + sync ckpt (a durable copy)", ["sh", "-c", 'cp "$0" "$1" && sync "$1"', ck, o_st],
            (CKPT,)),
        Job("cp legacy", ["cp", lg, o_st], (LEGACY,)),
        Job("import torch", [sys.executable, "-c", "import torch"], ()),
        Job("hashlib SHA-256 pass", [sys.executable, "-c", HASHLIB_ALONE, st], (ST,)),
        Job("cat ckpt safetensors", ["sh", "-c", 'cat "$0" "$1" > /dev/null', ck, st],
            (CKPT, ST)),
        Job("cat legacy ckpt", ["sh", "-c", 'cat "$0" "$1" > /dev/null', lg, ck],
            (LEGACY, CKPT)),
        Job("pread ckpt safetensors on 2 threads",
            [sys.executable, "-c", PREAD_TWO_THREADS, ck, st], (CKPT, ST)),
        # convert: zip checkpoint
        Job("convert ckpt (keep dtype)", sdtool("convert", ck, o_st), (CKPT,), "cp ckpt", 1.0,
            256),
        Job("convert ckpt --dtype fp16", sdtool("convert", ck, o_st, "--dtype", "fp16"),
            (CKPT,), **cast),
        # the optional torch kernels (SDTOOL_CAST_KERNELS=torch): torch's import alone holds
        # more than 200 MiB (the row "import torch"), so only the time goal applies to them
        Job("convert ckpt --dtype fp16 (torch kernels)",
            sdtool("convert", ck, o_st, "--dtype", "fp16"), (CKPT,), "cp ckpt", 0.8,
            env=(("SDTOOL_CAST_KERNELS", "torch"),)),
        Job("convert ckpt --dtype bf16", sdtool("convert", ck, o_st, "--dtype", "bf16"),
            (CKPT,), **cast),
        Job("convert ckpt --dtype fp8_e4m3fn",
            sdtool("convert", ck, o_st, "--dtype", "fp8_e4m3fn"), (CKPT,), **cast),
        Job("prune ckpt --ema-only --dtype fp16",
            sdtool("prune", ck, o_st, "--ema-only", "--dtype", "fp16"), (CKPT,), **cast),
        # .ckpt output
        Job("convert ckpt -> .ckpt (keep dtype)", sdtool("convert", ck, o_ck), (CKPT,),
            "cp ckpt", 1.0, 256),
        Job("convert ckpt -> .ckpt --dtype fp16",
            sdtool("convert", ck, o_ck, "--dtype", "fp16"), (CKPT,), **cast),
        # the legacy format
        Job("convert legacy (keep dtype)", sdtool("convert", lg, o_st), (LEGACY,),
            "cp legacy", 1.0, 256),
        Job("convert legacy --dtype fp16", sdtool("convert", lg, o_st, "--dtype", "fp16"),
            (LEGACY,), "cp legacy", 0.8, 256),
        # hashes and diff
        Job("hash (6 algorithms) safetensors", sdtool("hash", "--no-cache", st), (ST,),
            "hashlib SHA-256 pass", 1.25, 256),
        Job("diff ckpt safetensors", sdtool("diff", "--summary", ck, st), (CKPT, ST),
            "cat ckpt safetensors", 1.2, 256, sys_goal=True),
        Job("diff --fast ckpt safetensors", sdtool("diff", "--fast", "--summary", ck, st),
            (CKPT, ST), "cat ckpt safetensors", 1.2, 256, sys_goal=True),
        Job("diff legacy ckpt", sdtool("diff", "--summary", lg, ck), (LEGACY, CKPT),
            "cat legacy ckpt", 1.2, 256, sys_goal=True),
    ]  # fmt: skip


@dataclass(frozen=True)
class Run:
    wall: float
    rss_mib: float
    user: float
    sys: float
    rc: int


def run_once(job: Job) -> Run:
    report = Path(f"/tmp/bench_all.{os.getpid()}.time")
    env = dict(os.environ, PYTHONPATH=str(ROOT), **dict(job.env))
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M %U %S", "-o", str(report), *job.cmd],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    wall = time.perf_counter() - t0
    rss, user, sys_t = report.read_text().split()[-3:]
    report.unlink()
    for p in (OUT.with_suffix(".safetensors"), OUT.with_suffix(".ckpt")):
        p.unlink(missing_ok=True)
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
    return Run(wall, int(rss) / 1024, float(user), float(sys_t), proc.returncode)


def warm(paths: tuple[Path, ...]) -> None:
    for p in paths:
        subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)


def ensure_inputs() -> None:
    make = [sys.executable, str(ROOT / "benchmarks" / "make_checkpoint.py")]
    if not CKPT.exists():
        subprocess.run([*make, str(CKPT)], check=True)
    if not LEGACY.exists():
        subprocess.run([*make, str(LEGACY), "--legacy"], check=True)
    if not ST.exists():
        subprocess.run(sdtool("convert", str(CKPT), str(ST)), check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="", help="run the jobs whose name matches this regex")
    args = ap.parse_args()
    ensure_inputs()
    pick = re.compile(args.only or ".")
    chosen = {j.name for j in jobs() if pick.search(j.name)}
    chosen |= {j.yardstick for j in jobs() if j.name in chosen and j.yardstick}
    if any(n.startswith("diff") for n in chosen):
        chosen.add("pread ckpt safetensors on 2 threads")
    if any("torch kernels" in n for n in chosen):
        chosen.add("import torch")
    results: dict[str, Run] = {}
    load0 = os.getloadavg()[0]
    # Rounds: every job once per round, so a drift of the machine (this VM's disk writes vary
    # by +-25% over minutes) moves a job and its yardstick alike instead of skewing a ratio.
    todo = [j for j in jobs() if j.name in chosen]
    runs: dict[str, list[Run]] = {j.name: [] for j in todo}
    for r in range(args.runs):
        for job in todo:
            warm(job.reads)
            os.sync()  # no writeback left over from the previous job
            runs[job.name].append(run_once(job))
            print(f"  round {r + 1}: {job.name}: {runs[job.name][-1].wall:.2f} s", file=sys.stderr)
    for name, done in runs.items():
        done.sort(key=lambda r: r.wall)
        results[name] = done[len(done) // 2]
    print(
        f"\n{args.runs} runs each, median; page cache warm; {os.cpu_count()} cores; "
        f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n"
    )
    print("| job | wall s | peak RSS MiB | user s | sys s | yardstick | ratio | goal |")
    print("|---|---:|---:|---:|---:|---|---:|---|")
    for job in jobs():
        r = results.get(job.name)
        if r is None:
            continue
        ref = results.get(job.yardstick or "")
        ratio = f"{r.wall / ref.wall:.2f}x" if ref else "-"
        goal = ""
        if job.goal is not None and ref:
            ok = (
                r.wall / ref.wall <= job.goal
                and (job.rss_goal_mib is None or r.rss_mib <= job.rss_goal_mib)
                and (not job.sys_goal or r.sys <= ref.sys)
            )
            rss_part = f", < {job.rss_goal_mib} MiB" if job.rss_goal_mib is not None else ""
            sys_part = ", sys <= its" if job.sys_goal else ""
            goal = f"<= {job.goal}x{rss_part}{sys_part}: {'met' if ok else 'NOT met'}"
        if r.rc not in (0, 1):
            goal = f"exit {r.rc}"
        yard = f"{job.yardstick} ({ref.wall:.2f} s)" if ref else "-"
        print(
            f"| {job.name} | {r.wall:.2f} | {r.rss_mib:.0f} | {r.user:.2f} | {r.sys:.2f} | "
            f"{yard} | {ratio} | {goal} |"
        )


if __name__ == "__main__":
    main()
