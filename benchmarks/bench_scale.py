"""Hub-scale throughput: files/s and bytes/s of ``sdtool scan`` / ``hash``, cold and cached,
local pool and Dask cluster; prints one table.

Workloads:
  corpus  the shared corpus (../shared/corpus/files): real, mixed, some large files;
  tree    a generated tree of N small checkpoints (default 10,000) under /tmp (torch zip
          .ckpt, safetensors, plain pickles and numpy files, a few KiB each), built once and
          reused (never in the repository).

Modes, each the real CLI in a fresh process writing --jsonl to a file (start-up included):
  local   cold: an empty cache folder (the files themselves are in the page cache: this
          measures sdtool, not the disk); cached: the same command again with that cache
          (nothing changed, nothing is read: issue 17 asks at least 50x for 10,000 files);
  cluster the same two runs with --cluster ADDRESS of a LocalCluster of --jobs worker
          processes started once beforehand (its start-up is reported on its own line), on
          the tree's first --cluster-files files (2,000: every file is a Dask task, ~1-3 ms of
          client CPU each, which would make 10,000 take minutes); a cached rerun answers from
          the client's cache and sends no task.

Columns: files/s and MB/s by wall time; cold/x, the cold run's wall seconds over this row's
(the speed-up of a rerun); CPU s, user+sys of sdtool and its scan workers (not a cluster's
workers), steadier than wall time on a loaded machine; files/CPU-s, files per CPU second,
that is files/s per core for the docs' arithmetic.

Usage:
    python benchmarks/bench_scale.py [--files 10000] [--jobs 2] [--no-cluster] [--corpus DIR]
                                     [--cluster-files 2000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus" / "files"
TREE = Path(tempfile.gettempdir()) / "sdtool-bench-scale"


def make_tree(n: int) -> Path:
    """N small checkpoints in 100 folders (built once per N; a marker file says it is whole)."""
    root = TREE / str(n)
    marker = TREE / f"{n}.complete"
    if marker.exists():
        return root
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"d{i % 100:02}"
        d.mkdir(parents=True, exist_ok=True)
        w = rng.standard_normal((8, 8)).astype(np.float32)
        kind = i % 4
        if kind == 0:
            torch.save({"state_dict": {"w": torch.from_numpy(w)}, "step": i}, d / f"m{i}.ckpt")
        elif kind == 1:
            save_file({"w": w, "b": np.arange(i % 7 + 1)}, str(d / f"m{i}.safetensors"))
        elif kind == 2:
            import pickle

            (d / f"m{i}.pkl").write_bytes(pickle.dumps({"step": i, "lr": 1e-4}, protocol=2))
        else:
            np.save(d / f"m{i}.npy", w)
    marker.write_text("ok\n")
    return root


def tree_bytes(*roots: Path) -> tuple[int, int]:
    files = [p for root in roots for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def run(args: list[str], cache: Path | None) -> tuple[float, int, int, float]:
    """Wall seconds, JSON lines written, exit code and CPU seconds (the process and the
    children it waited for: scan's workers; not a cluster's) of ``sdtool ARGS``."""
    import resource

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "sdtool", *args]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    else:
        cmd += ["--no-cache"]
    with tempfile.TemporaryFile() as out:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env)
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out.seek(0)
        lines = sum(1 for _ in out)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return dt, lines, proc.returncode, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--no-cluster", action="store_true")
    ap.add_argument("--cluster-files", type=int, default=2_000,
                    help="files of the tree the cluster rows scan (its first folders)")  # fmt: skip
    a = ap.parse_args()

    t0 = time.perf_counter()
    tree = make_tree(a.files)
    print(f"tree: {a.files} files under {tree} ({time.perf_counter() - t0:.1f} s to build/find)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"cores: {os.cpu_count()}, load average at start: {load:.1f}")
    workloads = [("tree", tree)]
    if a.corpus.is_dir():
        workloads.append(("corpus", a.corpus))

    address = None
    cluster = None
    if not a.no_cluster:
        import distributed

        # the scheduler (in this process) and the workers import this checkout's sdtool, as
        # the CLI runs below do
        sys.path.insert(0, str(ROOT))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
        )
        t0 = time.perf_counter()
        cluster = distributed.LocalCluster(
            n_workers=a.jobs, threads_per_worker=1, processes=True,
            dashboard_address=":0", silence_logs=logging.ERROR,
        )  # fmt: skip
        address = cluster.scheduler_address
        took = time.perf_counter() - t0
        print(f"LocalCluster of {a.jobs} worker processes: {took:.1f} s to start")

    rows = []
    engines = [("local", [])] + ([("cluster", ["--cluster", address])] if address else [])
    try:
        for name, root in workloads:
            for cmd in ("scan", "hash"):
                for engine, extra in engines:
                    roots = [root]
                    if name == "tree" and engine == "cluster" and a.cluster_files < a.files:
                        # a task per file costs the Dask client ~1-3 ms: a sample of folders
                        roots = sorted(root.iterdir())[: max(1, a.cluster_files * 100 // a.files)]
                    n, nbytes = tree_bytes(*roots)
                    base = [cmd, "--jsonl", *map(str, roots)]
                    if cmd == "scan":
                        base += ["--jobs", str(a.jobs)]
                    with tempfile.TemporaryDirectory() as tmp:
                        cache = Path(tmp) / "cache"
                        cold = run([*base, *extra], cache)
                        cached = run([*base, *extra], cache)
                    for mode, m in (("cold", cold), ("cached", cached)):
                        rows.append((name, cmd, engine, mode, n, nbytes, cold[0], *m))
                        dt, lines, code, cpu = m
                        print(f"  {name} {cmd} {engine} {mode}: {dt:.2f} s, CPU {cpu:.2f} s,"
                              f" {lines} lines, exit {code}", flush=True)  # fmt: skip
    finally:
        if cluster is not None:
            cluster.close()

    head = ("workload", "cmd", "engine", "mode", "files", "MB", "seconds", "files/s", "MB/s",
            "cold/x", "CPU s", "files/CPU-s", "lines", "exit")  # fmt: skip
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, cmd, engine, mode, n, nbytes, cold_s, dt, lines, code, cpu in rows:
        local = engine == "local"  # a cluster's CPU is in its worker processes: not counted
        cells = [name, cmd, engine, mode, f"{n:,}", f"{nbytes / 1e6:.1f}", f"{dt:.2f}",
                 f"{n / dt:,.0f}", f"{nbytes / 1e6 / dt:.1f}", f"{cold_s / dt:.1f}",
                 f"{cpu:.2f}" if local else "-",
                 f"{n / cpu:,.0f}" if local and cpu else "-", f"{lines:,}",
                 str(code)]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nload average at the end: {load:.1f}. cold: empty cache (files in the page cache);"
        " cached: the same command again; cluster: the same on the LocalCluster"
        f" ({a.jobs} processes, start-up not included; on the tree's first"
        f" {min(a.cluster_files, a.files):,} files, --cluster-files); scan --jobs {a.jobs};"
        " hash one file at a time locally. cold/x: cold seconds / this row's."
    )
    keys = ("workload", "cmd", "engine", "mode", "files", "bytes", "cold_seconds", "seconds",
            "lines", "exit", "cpu_seconds")  # fmt: skip
    print(json.dumps({"rows": [dict(zip(keys, r, strict=True)) for r in rows]}))


if __name__ == "__main__":
    main()
