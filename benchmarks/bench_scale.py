"""Hub-scale throughput: files/s and bytes/s of ``sdtool scan`` / ``hash``, cold and cached,
local pool and Dask cluster; prints one table.

Workloads (trees built once under /tmp and reused, never in the repository):
  tiny    N tiny files (--files, default 10,000: torch zip .ckpt, safetensors, plain pickles
          and numpy files of a few KiB each): the worst case for a rerun's speed-up, since the
          cold scan of such a file costs only about a millisecond;
  models  N files (--model-files, default 10,000) with the kinds and sizes of a large A1111 /
          ComfyUI folder or hub mirror (MODEL_MIX: kohya LoRAs of 10-200 MB, embeddings of a
          few KB, .pth state dicts, safetensors checkpoints of ~2 GB, .ckpt checkpoints of
          ~1,100 tensors). The big files are sparse (their tensor bytes a hole: ~780 GB
          apparent, ~750 MB on disk), which scan never reads; so scan only (hash would read
          every apparent byte);
  corpus  the shared corpus (../shared/corpus/files): real, mixed, some large files.

Modes, each the real CLI in a fresh process writing --jsonl to a file (start-up included):
  local   cold: an empty cache folder (the files themselves are in the page cache: this
          measures sdtool, not the disk); cached: the same command again with that cache
          (nothing changed, nothing is read: issue 17 asks at least 50x for 10,000 files);
  cluster the same two runs with --cluster ADDRESS of a LocalCluster of --jobs worker
          processes started once beforehand (its start-up is reported on its own line), on
          the tree's first --cluster-files files (2,000: every file is a Dask task, ~1-3 ms of
          client CPU each, which would make 10,000 take minutes); a cached rerun answers from
          the client's cache and sends no task.

Cached rows are the fastest of --reruns runs (3). Modules are compiled first (compileall), as
an installed sdtool's are. A second table puts each local cold run beside its cached rerun.

Columns: files/s and MB/s by wall time; cold/x, the cold run's wall seconds over this row's
(the speed-up of a rerun); CPU s, user+sys of sdtool and its scan workers (not a cluster's
workers), steadier than wall time on a loaded machine; files/CPU-s, files per CPU second,
that is files/s per core for the docs' arithmetic.

Usage:
    python benchmarks/bench_scale.py [--files 10000] [--model-files 10000] [--jobs 2]
                                     [--no-cluster] [--corpus DIR] [--cluster-files 2000]
                                     [--commands scan,hash]
    (a quick check of the cached rerun: --model-files 0 --no-cluster --commands scan)
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
from typing import Any

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


#: the "models" tree: per 100 files, what a large A1111 / ComfyUI folder or a hub mirror holds
#: (kind, count): LoRAs (kohya safetensors, 100-264 modules of rank 4-128: 10-200 MB), textual
#: inversion embeddings (.pt torch zip and .safetensors, a few KB), upscaler / controlnet-style
#: .pth state dicts (torch zip, 100-500 tensors), safetensors checkpoints (~1,100 tensors,
#: ~2 GB) and .ckpt checkpoints (torch zip, ~1,100 tensors)
MODEL_MIX = (("lora", 45), ("embedding-pt", 27), ("embedding-st", 13), ("pth", 10),
             ("checkpoint-st", 3), ("checkpoint-ckpt", 2))  # fmt: skip


def _sparse_safetensors(path: Path, tensors: list[tuple[str, list[int]]], meta: dict) -> None:
    """A safetensors file of F16 ``tensors`` whose data is a hole: the header is written, the
    file is extended to its full size (a sparse file: the disk holds only the header; reads of
    the data give zeros, as scan never reads them and hash reads them from no disk)."""
    header: dict[str, object] = {"__metadata__": meta}
    pos = 0
    for name, shape in tensors:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + pos)


_BLOCKS = ("down_blocks_0", "down_blocks_1", "down_blocks_2", "mid_block", "up_blocks_1",
           "up_blocks_2", "up_blocks_3")  # fmt: skip
_LAYERS = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q",
           "attn2_to_k", "attn2_to_v", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2",
           "proj_in", "proj_out")  # fmt: skip


def _model_file(d: Path, i: int, kind: str, rng: Any) -> None:
    import numpy as np

    if kind == "lora":
        rank = int(rng.choice([4, 8, 16, 32, 64, 128]))
        mods = int(rng.integers(100, 265))
        tensors = []
        for m in range(mods):
            blk, lay = _BLOCKS[m % len(_BLOCKS)], _LAYERS[(m // len(_BLOCKS)) % len(_LAYERS)]
            stem = f"lora_unet_{blk}_attentions_{m % 3}_transformer_blocks_{m}_{lay}"
            width = int(rng.choice([320, 640, 1280]))
            tensors += [(f"{stem}.alpha", []), (f"{stem}.lora_down.weight", [rank, width]),
                        (f"{stem}.lora_up.weight", [width * 2, rank])]  # fmt: skip
        meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank // 2),
                "ss_output_name": f"lora{i}", "ss_tag_frequency": f'{{"tag": {i}}}'}  # fmt: skip
        _sparse_safetensors(d / f"lora{i}.safetensors", tensors, meta)
    elif kind == "checkpoint-st":
        tensors = [(f"model.diffusion_model.block{j}.weight", [1000, 900]) for j in range(1100)]
        _sparse_safetensors(d / f"ckpt{i}.safetensors", tensors, {"format": "pt"})
    elif kind == "embedding-st":
        from safetensors.numpy import save_file

        emb = rng.standard_normal((int(rng.integers(1, 16)), 768)).astype(np.float32)
        save_file({"emb_params": emb}, str(d / f"emb{i}.safetensors"))
    else:
        import torch

        if kind == "embedding-pt":
            vec = torch.randn(int(rng.integers(1, 16)), 768)
            obj: object = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec},
                           "name": f"emb{i}", "step": i, "sd_checkpoint": None}  # fmt: skip
            name = f"emb{i}.pt"
        else:  # the pickle of a real state dict; tiny tensors (scan never reads storages)
            n = 1100 if kind == "checkpoint-ckpt" else int(rng.integers(100, 500))
            sd = {f"model.diffusion_model.layer{j}.weight": torch.zeros(2) for j in range(n)}
            obj = {"state_dict": sd, "global_step": i} if n == 1100 else sd
            name = f"ckpt{i}.ckpt" if n == 1100 else f"net{i}.pth"
        torch.save(obj, d / name)


def make_models(n: int) -> Path:
    """N files in 100 folders with the MODEL_MIX of kinds and sizes (built once per N)."""
    import numpy as np

    root = TREE / f"models-{n}"
    marker = TREE / f"models-{n}.complete"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    kinds = [k for k, c in MODEL_MIX for _ in range(c)]
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"d{i % 100:02}"
        d.mkdir(parents=True, exist_ok=True)
        _model_file(d, i, kinds[(i * 37) % len(kinds)], rng)
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
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: compiled modules (see main)
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
    ap.add_argument("--model-files", type=int, default=10_000,
                    help="files of the models tree (0: leave it out)")  # fmt: skip
    ap.add_argument("--commands", default="scan,hash",
                    help="the commands measured (scan, hash or both), e.g. scan alone")  # fmt: skip
    ap.add_argument("--reruns", type=int, default=3,
                    help="cached runs per row; the fastest is reported")  # fmt: skip
    a = ap.parse_args()

    # start-up as an installed sdtool has it: its modules compiled (pip compiles on install)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "sdtool")],
                   stdout=subprocess.DEVNULL, check=False)  # fmt: skip
    t0 = time.perf_counter()
    tree = make_tree(a.files)
    print(f"tiny: {a.files} files under {tree} ({time.perf_counter() - t0:.1f} s to build/find)")
    workloads = [("tiny", tree)]
    if a.model_files:
        t0 = time.perf_counter()
        models = make_models(a.model_files)
        took = time.perf_counter() - t0
        print(f"models: {a.model_files} files under {models} ({took:.1f} s to build/find)")
        workloads.append(("models", models))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"cores: {os.cpu_count()}, load average at start: {load:.1f}")
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
            # the models tree's files are 10-200 MB and ~2 GB (sparse): hash would read every
            # byte (~80 GB per 1,000 files), scan reads headers and pickles only
            wanted = [c for c in ("scan", "hash") if c in a.commands.split(",")]
            for cmd in [c for c in wanted if c == "scan" or name != "models"]:
                for engine, extra in engines if name != "models" else engines[:1]:
                    roots = [root]
                    if name == "tiny" and engine == "cluster" and a.cluster_files < a.files:
                        # a task per file costs the Dask client ~1-3 ms: a sample of folders
                        roots = sorted(root.iterdir())[: max(1, a.cluster_files * 100 // a.files)]
                    n, nbytes = tree_bytes(*roots)
                    base = [cmd, "--jsonl", *map(str, roots)]
                    if cmd == "scan":
                        base += ["--jobs", str(a.jobs)]
                    with tempfile.TemporaryDirectory() as tmp:
                        cache = Path(tmp) / "cache"
                        cold = run([*base, *extra], cache)
                        reruns = [run([*base, *extra], cache) for _ in range(max(1, a.reruns))]
                        cached = min(reruns)
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
    print("\nCold against cached, local (the issue's goal: cached at least 50x faster):\n")
    head = ("tree", "cmd", "files", "MB", "cold s", "cached s", "cold/cached", "cold files/s",
            "cached files/s", "50x")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    by = {(r[0], r[1], r[2], r[3]): r for r in rows}
    for (name, cmd, engine, mode), r in by.items():
        if engine != "local" or mode != "cold":
            continue
        n, nbytes, cold_s = r[4], r[5], r[7]
        warm_s = by[(name, cmd, engine, "cached")][7]
        ratio = cold_s / warm_s
        cells = [name, cmd, f"{n:,}", f"{nbytes / 1e6:,.0f}", f"{cold_s:.2f}", f"{warm_s:.2f}",
                 f"{ratio:.1f}", f"{n / cold_s:,.0f}", f"{n / warm_s:,.0f}",
                 "yes" if ratio >= 50 else "no"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    keys = ("workload", "cmd", "engine", "mode", "files", "bytes", "cold_seconds", "seconds",
            "lines", "exit", "cpu_seconds")  # fmt: skip
    print(json.dumps({"rows": [dict(zip(keys, r, strict=True)) for r in rows]}))


if __name__ == "__main__":
    main()
