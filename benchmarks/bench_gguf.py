"""GGUF export of a Flux-width transformer, every --quant type: sdtool vs gguf-py's reference path.

The input is Flux's transformer at its real widths (hidden 3072, MLP 12288, the real double-
and single-block tensor shapes, embedders and final layer) with reduced depth (Flux has 19
double and 38 single blocks, 12 B parameters: too big for this machine's disk and for gguf-py's
in-memory path), random bf16 values, written once as safetensors per depth. ``--depth 1,2``
runs depth 1 (1 double + 2 single blocks, 0.68 G parameters, 1.37 GB) and depth 2 (2 + 4,
1.36 G, 2.7 GB) in one table; ``--double``/``--single`` give any other depth.

For each type (one row each; wall time, CPU time and peak RSS of a process of its own, on the
same warm input, after ``sync``, so no earlier writes are flushed during a timed run):

* ``sdtool convert IN OUT.gguf --quant TYPE`` (streamed in pieces on every core). Its wall time
  includes its closing fsync: the file is on disk when it returns.
* gguf-py's reference path, as ComfyUI-GGUF's tools + gguf-py do it: load the state dict
  (safetensors), bf16 -> float32 numpy, ``gguf.quants.quantize`` per tensor to the type
  sdtool's file has for it, ``GGUFWriter`` to write. This is the "pure Python" route; the
  other route (``llama-quantize``) needs a patched C++ build. gguf-py has no quantizer for
  the K-quants (Q6_K, Q5_K_M, Q4_K_M): their rows show sdtool alone (no reference is
  available here; their bytes follow llama.cpp's C reference, docs/gguf.md). gguf-py's writer
  does not fsync: its file is still in the page cache when it returns. The column
  "gguf-py + fsync" adds the fsync of its output (timed right after it exits), which is what a
  durable write costs it; "ratio (both durable)" compares that with sdtool.

The outputs are compared tensor by tensor: they must be byte-identical. Above the table: the
machine's durable write speed (a 512 MiB file written with O_DIRECT, as sdtool writes large
outputs, and fsync'd: the floor of any durable write of the output; and the same through the
page cache) and sdtool's start-up (the same command on a one-tensor file).

    python benchmarks/bench_gguf.py                       # depth 1, all types
    python benchmarks/bench_gguf.py --types Q8_0 --depth 1,2
    python benchmarks/bench_gguf.py --double 19 --single 38 --input /big/disk/flux.safetensors

Target (issue 16): Q8_0 at least 5x faster than the reference path (wall time). On a quiet
machine, from the repository root (the inputs are made once, in /tmp):

    PYTHONPATH=. .venv/bin/python benchmarks/bench_gguf.py --types Q8_0 --depth 1,2
    PYTHONPATH=. .venv/bin/python benchmarks/bench_gguf.py           # all types, depth 1
"""

# ruff: noqa: E501  (the child scripts below are kept as run, one statement per line)

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAKE = """
import sys, numpy as np, torch
from safetensors.torch import save_file
H, M, nd, ns = 3072, 12288, int(sys.argv[2]), int(sys.argv[3])
shapes = {"img_in.weight": (H, 64), "img_in.bias": (H,), "txt_in.weight": (H, 4096),
          "txt_in.bias": (H,), "time_in.in_layer.weight": (H, 256), "time_in.out_layer.weight": (H, H),
          "vector_in.in_layer.weight": (H, 768), "vector_in.out_layer.weight": (H, H),
          "guidance_in.in_layer.weight": (H, 256), "guidance_in.out_layer.weight": (H, H),
          "final_layer.linear.weight": (64, H), "final_layer.adaLN_modulation.1.weight": (2 * H, H)}
for i in range(nd):
    for s in ("img", "txt"):
        p = f"double_blocks.{i}.{s}_"
        shapes.update({p + "attn.qkv.weight": (3 * H, H), p + "attn.qkv.bias": (3 * H,),
                       p + "attn.proj.weight": (H, H), p + "attn.proj.bias": (H,),
                       p + "attn.norm.query_norm.scale": (128,), p + "attn.norm.key_norm.scale": (128,),
                       p + "mlp.0.weight": (M, H), p + "mlp.0.bias": (M,),
                       p + "mlp.2.weight": (H, M), p + "mlp.2.bias": (H,),
                       p + "mod.lin.weight": (6 * H, H), p + "mod.lin.bias": (6 * H,)})
for i in range(ns):
    p = f"single_blocks.{i}."
    shapes.update({p + "linear1.weight": (3 * H + M, H), p + "linear1.bias": (3 * H + M,),
                   p + "linear2.weight": (H, H + M), p + "linear2.bias": (H,),
                   p + "norm.query_norm.scale": (128,), p + "norm.key_norm.scale": (128,),
                   p + "modulation.lin.weight": (3 * H, H), p + "modulation.lin.bias": (3 * H,)})
g = torch.Generator().manual_seed(0)
sd = {k: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
save_file(sd, sys.argv[1])
print(sum(v.numel() for v in sd.values()))
"""

REFERENCE = """
import json, sys, numpy as np, gguf
from safetensors.torch import load_file
import torch
types = json.load(open(sys.argv[3]))
sd = load_file(sys.argv[1])
w = gguf.GGUFWriter(sys.argv[2], arch="flux")
w.add_quantization_version(2)
w.add_file_type(int(sys.argv[4]))
for k, v in sd.items():
    data = v.to(torch.float32).numpy()
    t = getattr(gguf.GGMLQuantizationType, types[k])
    q = data if t.name == "F32" else data.astype(np.float16) if t.name == "F16" else gguf.quants.quantize(data, t)
    w.add_tensor(k, q, raw_dtype=t)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
"""

TYPES = """
import json, sys, gguf
r = gguf.GGUFReader(sys.argv[1])
json.dump({t.name: t.tensor_type.name for t in r.tensors}, open(sys.argv[2], "w"))
"""

COMPARE = """
import sys, numpy as np, gguf
a = {t.name: t for t in gguf.GGUFReader(sys.argv[1]).tensors}
b = {t.name: t for t in gguf.GGUFReader(sys.argv[2]).tensors}
assert set(a) == set(b), set(a) ^ set(b)
n = 0
for k, t in a.items():
    assert t.tensor_type == b[k].tensor_type, (k, t.tensor_type, b[k].tensor_type)
    assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(b[k].data).view(np.uint8)), k
    n += t.tensor_type.name not in ("F32", "F16", "BF16")
print(n)
"""


def run(cmd: list[str]) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds (user + sys), peak RSS bytes, exit code) of ``cmd`` in its
    own process. CPU time says what the work costs when other processes share the cores."""
    report = Path(f"/tmp/bench_gguf.{os.getpid()}.time")
    os.sync()  # earlier writes (the input, the last row's files) are not flushed while timed
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M %U %S", "-o", str(report), *cmd],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.buffer.write(proc.stderr)
    rss_kib, user, system = report.read_text().split()[-3:]
    report.unlink()
    return wall, float(user) + float(system), int(rss_kib) * 1024, proc.returncode


def fsync_seconds(path: Path) -> float:
    """The time to make ``path`` durable (fsync it and its folder), as sdtool's writer does."""
    t0 = time.perf_counter()
    for p, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY)):
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def disk_speed(folder: Path, nbytes: int = 512 << 20, *, direct: bool = False) -> float:
    """Bytes per second of a durable write (written, then fsync'd) in ``folder``: through the
    page cache, or with O_DIRECT from one reused aligned buffer (as sdtool writes large GGUFs)."""
    import mmap

    probe = folder / f".bench_gguf.{os.getpid()}.probe"
    block = mmap.mmap(-1, 8 << 20)
    block.write(os.urandom(8 << 20))
    os.sync()
    t0 = time.perf_counter()
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
        fd = os.open(probe, flags, 0o600)
        try:
            for _ in range(nbytes // len(block)):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        return nbytes / (time.perf_counter() - t0)
    finally:
        probe.unlink(missing_ok=True)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def depth_of(path: Path) -> tuple[int, int]:
    """(double, single) blocks of an input MAKE wrote, from its header's names."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        names = json.loads(f.read(n))
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in names if "_blocks." in k}
    return (
        sum(b.startswith("double_blocks.") for b in blocks),
        sum(b.startswith("single_blocks.") for b in blocks),
    )


def make_input(path: Path, double: int, single: int) -> None:
    """Write the Flux-width input (once: a file holding exactly these tensors is reused)."""
    if path.exists() and depth_of(path) == (double, single):
        return
    print(f"  making {path} ({double} double + {single} single blocks)", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-c", MAKE, str(path), str(double), str(single)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def make_tiny(path: Path) -> None:
    """A one-tensor Flux file (bf16 [64, 64]): sdtool's start-up with next to no work."""
    head = json.dumps(
        {
            "double_blocks.0.img_attn.proj.weight": {
                "dtype": "BF16",
                "shape": [64, 64],
                "data_offsets": [0, 8192],
            }
        }
    ).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + bytes(8192))


#: --quant type -> gguf-py quantizes it (the reference path exists)
TYPES_ALL = {"Q8_0": True, "Q5_1": True, "Q5_0": True, "Q4_1": True, "Q4_0": True,
             "Q6_K": False, "Q5_K_M": False, "Q4_K_M": False}  # fmt: skip


@dataclass
class Row:
    depth: str
    quant: str
    mine: tuple[float, float, int, int]
    theirs: tuple[float, float, int, int] | None
    sync: float | None
    size: float
    same: str


def best_of(runs: list[tuple[float, float, int, int]]) -> tuple[float, float, int, int]:
    """The least wall time and the least CPU time of repeated runs (each the measure least
    disturbed by other processes), the largest peak RSS, the worst exit code."""
    return (
        min(r[0] for r in runs),
        min(r[1] for r in runs),
        max(r[2] for r in runs),
        max(r[3] for r in runs),
    )


def bench_depth(src: Path, depth: str, types: list[str], repeat: int = 1) -> list[Row]:
    from sdtool.ops.gguf_export import QUANTS

    py = sys.executable
    ours, ref = src.with_suffix(".sdtool.gguf"), src.with_suffix(".ref.gguf")
    types_json = src.with_suffix(".types.json")
    rows = []
    for q in types:
        cmd = [py, "-m", "sdtool", "convert", str(src), str(ours), "--quant", q,
               "--overwrite", "-q"]  # fmt: skip
        mine_runs = []
        for _ in range(repeat):
            ours.unlink(missing_ok=True)  # no earlier output freed inside a timed run
            warm(src)
            mine_runs.append(run(cmd))
        mine = best_of(mine_runs)
        print(f"  {depth} {q} sdtool: {mine[0]:.1f} s, {mine[1]:.1f} s CPU", file=sys.stderr)
        theirs, sync, same = None, None, "n/a (gguf-py has no quantizer)"
        if TYPES_ALL.get(q) and mine[3] == 0:
            subprocess.run([py, "-c", TYPES, str(ours), str(types_json)], check=True)
            theirs_runs, syncs = [], []
            for _ in range(repeat):
                ref.unlink(missing_ok=True)
                warm(src)
                theirs_runs.append(run([py, "-c", REFERENCE, str(src), str(ref), str(types_json),
                                        str(QUANTS[q][1])]))  # fmt: skip
                if theirs_runs[-1][3] == 0:
                    syncs.append(fsync_seconds(ref))
            theirs = best_of(theirs_runs)
            sync = min(syncs) if syncs else None
            print(
                f"  {depth} {q} gguf-py: {theirs[0]:.1f} s (+ fsync {sync or 0:.1f} s), "
                f"{theirs[1]:.1f} s CPU",
                file=sys.stderr,
            )
            cmp = subprocess.run(
                [py, "-c", COMPARE, str(ours), str(ref)], capture_output=True, text=True
            )
            same = (
                f"identical ({cmp.stdout.strip()} quantized)"
                if cmp.returncode == 0
                else "DIFFER: " + (cmp.stderr.strip().splitlines() or ["?"])[-1]
            )
        size = ours.stat().st_size / 1e9 if ours.exists() else 0.0
        rows.append(Row(depth, q, mine, theirs, sync, size, same))
        for out in (ours, ref, types_json):
            out.unlink(missing_ok=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, help="the input file (default: /tmp, one per depth)")
    ap.add_argument("--depth", default="1",
                    help="comma-separated depths: N = N double + 2N single blocks")  # fmt: skip
    ap.add_argument("--double", type=int, help="double blocks (with --single: one custom depth)")
    ap.add_argument("--single", type=int)
    ap.add_argument("--types", default=",".join(TYPES_ALL), help="comma-separated --quant types")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each side; the table shows the least wall and CPU time "
                         "(for a shared machine)")  # fmt: skip
    args = ap.parse_args()
    if args.double is not None or args.single is not None:
        depths = [(args.double or 0, args.single or 0)]
    else:
        depths = [(int(d), 2 * int(d)) for d in args.depth.split(",")]
    if args.input is not None and len(depths) > 1:
        ap.error("--input names one file: give one depth")
    types = args.types.split(",")
    tiny = Path(f"/tmp/bench-gguf-tiny.{os.getpid()}.safetensors")
    make_tiny(tiny)
    start = min(
        run(
            [
                sys.executable,
                "-m",
                "sdtool",
                "convert",
                str(tiny),
                str(tiny.with_suffix(".gguf")),
                "--quant",
                "Q8_0",
                "--overwrite",
                "-q",
            ]
        )[0]
        for _ in range(5)
    )
    tiny.unlink()
    tiny.with_suffix(".gguf").unlink(missing_ok=True)
    rows: list[Row] = []
    inputs = []
    for double, single in depths:
        default = "bench-flux-width" + ("" if (double, single) == (1, 2) else f"-{double}x{single}")
        src: Path = args.input or Path(f"/tmp/{default}.safetensors")
        make_input(src, double, single)
        inputs.append(
            f"{src} ({double} double + {single} single, {src.stat().st_size / 1e9:.2f} GB)"
        )
        rows += bench_depth(src, f"{double}+{single}", types, max(1, args.repeat))
    folder = args.input.parent if args.input else Path("/tmp")
    cached = disk_speed(folder)
    try:
        speed = disk_speed(folder, direct=True)
    except OSError:  # no O_DIRECT on this filesystem: sdtool writes through the cache too
        speed = cached
    load = os.getloadavg()[0]
    print(
        f"\ninput: {'; '.join(inputs)} bf16; {os.cpu_count()} cores, load average {load:.1f}"
        + (f"; best of {args.repeat} runs per side" if args.repeat > 1 else "")
    )
    print(
        f"durable write speed here: {speed / 1e9:.2f} GB/s with O_DIRECT (as sdtool writes), "
        f"{cached / 1e9:.2f} GB/s through the page cache + fsync; sdtool start-up (a one-tensor "
        f"file, best of 5): {start:.2f} s\n"
    )
    print(
        "| blocks | type | sdtool s | sdtool CPU s | gguf-py s | gguf-py + fsync s | "
        "gguf-py CPU s | ratio (wall) | ratio (both durable) | ratio (CPU) | "
        "sdtool peak RSS MiB | gguf-py peak RSS MiB | output GB | write floor s | bytes |"
    )
    print("|---|---|" + "---:|" * 12 + "---|")
    for r in rows:
        w, c, rss, rc = r.mine
        ref = ["-"] * 7
        if r.theirs is not None:
            tw, tc, trss, _ = r.theirs
            sync = r.sync or 0.0
            ref = [f"{tw:.1f}", f"{tw + sync:.1f}", f"{tc:.1f}", f"{tw / w:.1f}x",
                   f"{(tw + sync) / w:.1f}x", f"{tc / c:.1f}x", f"{trss / 2**20:.0f}"]  # fmt: skip
        cells = [r.depth, r.quant, f"{w:.1f}", f"{c:.1f}", *ref[:6], f"{rss / 2**20:.0f}", ref[6],
                 f"{r.size:.2f}", f"{r.size * 1e9 / speed:.1f}",
                 r.same if rc == 0 else f"sdtool exit {rc}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print(
        "\nwrite floor: the output's size at the O_DIRECT durable write speed (no durable "
        "writer can be faster on this disk); sdtool's time includes it, 'gguf-py s' does not."
    )


if __name__ == "__main__":
    main()
