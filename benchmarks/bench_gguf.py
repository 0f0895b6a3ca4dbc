"""Q8_0 GGUF of a Flux-width transformer: sdtool vs gguf-py's reference path; wall time, peak RSS.

The input is Flux's transformer at its real widths (hidden 3072, MLP 12288, the real double-
and single-block tensor shapes, embedders and final layer) with reduced depth (``--double``,
``--single`` blocks; Flux has 19 and 38), random bf16 values, written once as safetensors.

Cases, each in its own process on the same warm input (peak RSS from /usr/bin/time):

* ``sdtool convert IN OUT.gguf --quant Q8_0`` (streamed; quantizer on every core).
* gguf-py's reference path, as ComfyUI-GGUF's tools + gguf-py do it: load the state dict
  (safetensors), bf16 -> float32 numpy, ``gguf.quants.quantize(.., Q8_0)`` per tensor (same
  keep-unquantized rules), ``GGUFWriter`` to write. This is the "pure Python" route; the
  other route (``llama-quantize``) needs a patched C++ build.

Both outputs are compared: the Q8_0 tensors must be byte-identical.

    python benchmarks/bench_gguf.py                  # 2 double + 4 single blocks (~1.3B params)
    python benchmarks/bench_gguf.py --double 19 --single 38 --input /big/disk/flux.safetensors

Target (issue 16): sdtool at least 5x faster than the reference path.
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
import sys, numpy as np, gguf
from safetensors.torch import load_file
import torch
sd = load_file(sys.argv[1])
keep = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
w = gguf.GGUFWriter(sys.argv[2], arch="flux")
w.add_quantization_version(2)
w.add_file_type(7)
for k, v in sd.items():
    data = v.to(torch.float32).numpy()
    if data.ndim == 2 and k.endswith("weight") and not any(s in k for s in keep):
        q, t = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    elif data.ndim == 1 or data.size <= 1024:
        q, t = data, gguf.GGMLQuantizationType.F32
    else:
        q, t = gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    w.add_tensor(k, q, raw_dtype=t)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
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
    n += t.tensor_type.name == "Q8_0"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=Path("/tmp/bench-flux-width.safetensors"))
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    args = ap.parse_args()
    src: Path = args.input
    py = sys.executable
    if not src.exists():
        subprocess.run([py, "-c", MAKE, str(src), str(args.double), str(args.single)], check=True)
    ours, ref = src.with_suffix(".sdtool.gguf"), src.with_suffix(".ref.gguf")
    cases = {
        "sdtool convert --quant Q8_0": [py, "-m", "sdtool", "convert", str(src), str(ours),
                                        "--quant", "Q8_0", "--overwrite"],
        "gguf-py reference path": [py, "-c", REFERENCE, str(src), str(ref)],
    }  # fmt: skip
    rows = []
    for name, cmd in cases.items():
        warm(src)
        wall, cpu, rss, rc = run(cmd)
        rows.append((name, wall, cpu, rss, rc))
        print(f"  {name}: {wall:.1f} s, {cpu:.1f} s CPU, {rss / 2**20:.0f} MiB", file=sys.stderr)
    same = subprocess.run(
        [py, "-c", COMPARE, str(ours), str(ref)], capture_output=True, text=True, check=False
    )
    ratio, cpu_ratio = rows[1][1] / rows[0][1], rows[1][2] / rows[0][2]
    load = os.getloadavg()[0]
    print(
        f"\ninput: {src} ({src.stat().st_size / 1e9:.2f} GB bf16), {os.cpu_count()} cores, "
        f"load average {load:.1f}\n"
    )
    print(f"| {'case':<30} | wall s | CPU s | peak RSS MiB | output GB | rc |")
    print(f"|{'-' * 32}|-------:|------:|-------------:|----------:|---:|")
    for (name, wall, cpu, rss, rc), out in zip(rows, (ours, ref), strict=True):
        size = out.stat().st_size / 1e9 if out.exists() else 0.0
        print(
            f"| {name:<30} | {wall:6.1f} | {cpu:5.1f} | {rss / 2**20:12.0f} | {size:9.2f} | "
            f"{rc:2d} |"
        )
    verdict = (
        f"identical ({same.stdout.strip()} Q8_0 tensors)"
        if same.returncode == 0
        else "DIFFER: " + same.stderr.strip().splitlines()[-1]
    )
    print(f"\nspeed-up: {ratio:.1f}x wall, {cpu_ratio:.1f}x CPU; outputs {verdict}")
    for out in (ours, ref):
        out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
