"""Benchmark ``sdtool hash`` (all six hashes, one pass) against sha256sum and single hashes.

Generates a safetensors file of --size GB of random bytes under /work/bench (so AutoV3 is real
work: a second SHA-256 over almost the whole file), reads it once to warm the page cache, then
times each command in a separate process, --runs times, and prints the median wall time and
throughput. The file is deleted afterwards unless --keep.

    python benchmarks/bench_hash.py --size 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HASHLIB_ALONE = """
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], 'rb', buffering=0) as f:
    buf = bytearray(16 << 20); view = memoryview(buf)
    while n := f.readinto(buf):
        h.update(view[:n])
print(h.hexdigest())
"""

SDTOOL = "import sys; from sdtool.cli.main import main; sys.exit(main(sys.argv[1:]))"


def make_file(path: Path, size_gb: float) -> None:
    """A valid safetensors file: one U8 tensor of random bytes."""
    n = int(size_gb * 1e9)
    header = json.dumps({"blob": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    header += b" " * (-len(header) % 8)
    block = os.urandom(64 << 20)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        left = n
        while left:
            k = min(left, len(block))
            f.write(block[:k])
            left -= k


def timed(cmd: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=3.0, help="file size in GB (default 3)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/work/bench"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "bench-hash.safetensors"
    py = sys.executable
    if not path.exists():
        make_file(path, args.size)
    size = path.stat().st_size
    cases: list[tuple[str, list[str]]] = [
        ("cat > /dev/null", ["sh", "-c", f"cat '{path}' > /dev/null"]),
        ("sha256sum", ["sha256sum", str(path)]),
        ("hashlib.sha256 alone", [py, "-c", HASHLIB_ALONE, str(path)]),
    ]
    for algo in ("sha256", "autov3", "crc32", "blake3"):
        cases.append((f"sdtool hash -a {algo}", [py, "-c", SDTOOL, "hash", "-a", algo, str(path)]))
    three = "sha256,crc32,blake3"
    cases.append((f"sdtool hash -a {three}", [py, "-c", SDTOOL, "hash", "-a", three, str(path)]))
    cases.append(("sdtool hash (all 6)", [py, "-c", SDTOOL, "hash", str(path)]))
    try:
        timed(cases[0][1])  # warm the page cache: we measure hashing, not the disk
        rows = []
        for label, cmd in cases:
            wall = statistics.median(timed(cmd) for _ in range(args.runs))
            rows.append((label, wall, size / wall / 1e6))
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    print(f"file: {size / 1e9:.2f} GB safetensors, warm page cache, median of {args.runs} runs")
    print(f"cores: {len(os.sched_getaffinity(0))}")
    print(f"| {'command':<34} | {'wall s':>7} | {'MB/s':>7} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 9}|")
    for label, wall, rate in rows:
        print(f"| {label:<34} | {wall:7.2f} | {rate:7.0f} |")


if __name__ == "__main__":
    main()
