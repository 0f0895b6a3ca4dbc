"""GGUF export of a Flux-width transformer, every --quant type: sdtool vs gguf-py's reference path.

The input is Flux's transformer at its real widths (hidden 3072, MLP 12288, the real double-
and single-block tensor shapes, embedders and final layer) with reduced depth (``--double``,
``--single`` blocks; Flux has 19 and 38), random bf16 values, written once as safetensors.

For each type (one row each; wall time, CPU time and peak RSS of a process of its own, on the
same warm input):

* ``sdtool convert IN OUT.gguf --quant TYPE`` (streamed in pieces on every core).
* gguf-py's reference path, as ComfyUI-GGUF's tools + gguf-py do it: load the state dict
  (safetensors), bf16 -> float32 numpy, ``gguf.quants.quantize`` per tensor to the type
  sdtool's file has for it, ``GGUFWriter`` to write. This is the "pure Python" route; the
  other route (``llama-quantize``) needs a patched C++ build. gguf-py has no quantizer for
  the K-quants (Q6_K, Q5_K_M, Q4_K_M): their rows show sdtool alone (no reference is
  available here; their bytes follow llama.cpp's C reference, docs/gguf.md).

The outputs are compared tensor by tensor: they must be byte-identical.

    python benchmarks/bench_gguf.py                       # 1 double + 2 single blocks, all types
    python benchmarks/bench_gguf.py --types Q8_0 --double 2 --single 4
    python benchmarks/bench_gguf.py --double 19 --single 38 --input /big/disk/flux.safetensors

Target (issue 16): Q8_0 at least 5x faster than the reference path (wall time). On a quiet
machine, from the repository root (about 4-5 minutes; the input is made once):

    PYTHONPATH=. .venv/bin/python benchmarks/bench_gguf.py
"""

# ruff: noqa: E501  (the child scripts below are kept as run, one statement per line)

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
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
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M %U %S", "-o", str(report), *cmd],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    wall = time.perf_counter() - t0
    rss_kib, user, system = report.read_text().split()[-3:]
    report.unlink()
    return wall, float(user) + float(system), int(rss_kib) * 1024, proc.returncode


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


#: --quant type -> gguf-py quantizes it (the reference path exists)
TYPES_ALL = {"Q8_0": True, "Q5_1": True, "Q5_0": True, "Q4_1": True, "Q4_0": True,
             "Q6_K": False, "Q5_K_M": False, "Q4_K_M": False}  # fmt: skip


def main() -> None:
    from sdtool.ops.gguf_export import QUANTS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=Path("/tmp/bench-flux-width.safetensors"))
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES_ALL), help="comma-separated --quant types")
    args = ap.parse_args()
    src: Path = args.input
    py = sys.executable
    if not src.exists():
        subprocess.run([py, "-c", MAKE, str(src), str(args.double), str(args.single)], check=True)
    ours, ref = src.with_suffix(".sdtool.gguf"), src.with_suffix(".ref.gguf")
    types_json = src.with_suffix(".types.json")
    rows = []
    for q in args.types.split(","):
        warm(src)
        cmd = [
            py,
            "-m",
            "sdtool",
            "convert",
            str(src),
            str(ours),
            "--quant",
            q,
            "--overwrite",
            "-q",
        ]
        mine = run(cmd)
        print(f"  {q} sdtool: {mine[0]:.1f} s, {mine[1]:.1f} s CPU", file=sys.stderr)
        theirs, same = None, "n/a (gguf-py has no quantizer)"
        if TYPES_ALL.get(q) and mine[3] == 0:
            subprocess.run([py, "-c", TYPES, str(ours), str(types_json)], check=True)
            warm(src)
            theirs = run([py, "-c", REFERENCE, str(src), str(ref), str(types_json),
                          str(QUANTS[q][1])])  # fmt: skip
            print(f"  {q} gguf-py: {theirs[0]:.1f} s, {theirs[1]:.1f} s CPU", file=sys.stderr)
            cmp = subprocess.run(
                [py, "-c", COMPARE, str(ours), str(ref)], capture_output=True, text=True
            )
            same = (
                f"identical ({cmp.stdout.strip()} quantized)"
                if cmp.returncode == 0
                else "DIFFER: " + (cmp.stderr.strip().splitlines() or ["?"])[-1]
            )
        size = ours.stat().st_size / 1e9 if ours.exists() else 0.0
        rows.append((q, mine, theirs, size, same))
        for out in (ours, ref, types_json):
            out.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    print(
        f"\ninput: {src} ({src.stat().st_size / 1e9:.2f} GB bf16), {os.cpu_count()} cores, "
        f"load average {load:.1f}\n"
    )
    print(
        "| type | sdtool s | sdtool CPU s | gguf-py s | gguf-py CPU s | ratio (wall) | "
        "ratio (CPU) | sdtool peak RSS MiB | gguf-py peak RSS MiB | output GB | bytes |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for q, (w, c, rss, rc), theirs, size, same in rows:
        ref = ["-"] * 5
        if theirs is not None:
            tw, tc, trss, _ = theirs
            ref = [
                f"{tw:.1f}",
                f"{tc:.1f}",
                f"{tw / w:.1f}x",
                f"{tc / c:.1f}x",
                f"{trss / 2**20:.0f}",
            ]
        cells = [q, f"{w:.1f}", f"{c:.1f}", *ref[:4], f"{rss / 2**20:.0f}", ref[4], f"{size:.2f}",
                 same if rc == 0 else f"sdtool exit {rc}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
