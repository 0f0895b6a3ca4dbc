"""Benchmark: what ``inspect``, ``scan`` and ``hash`` of a URL cost (issue 17, point 3).

Serves model files from a local HTTP server with range support (tests/httpserver.py, which
counts requests and bytes) and prints, per file and command, the requests made, the bytes
served, their share of the file, and the wall time; inspect and scan results are compared with
the same command on the local file.

    python benchmarks/bench_remote.py [--dir /work/bench] [--hash]

Files: the SD 1.5-shaped 7.7 GB checkpoint and its safetensors twin under --dir when present
(benchmarks/make_checkpoint.py), else a small generated checkpoint (``--scale 0.02``) and its
safetensors twin. ``--hash`` also hashes each file over HTTP (every byte once: slow for 7 GB).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _files(folder: Path) -> list[Path]:
    big = [folder / "sd15-ema.ckpt", folder / "sd15-ema.safetensors"]
    if all(p.exists() for p in big):
        return big
    small = folder / "sd15-small.ckpt"
    if not small.exists():
        subprocess.run(
            [sys.executable, str(HERE / "make_checkpoint.py"), str(small), "--scale", "0.02"],
            check=True,
        )
    twin = small.with_suffix(".safetensors")
    if not twin.exists():
        from sdtool import convert

        convert(small, twin)
    return [small, twin]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/work/bench"))
    ap.add_argument("--hash", action="store_true", help="also hash each file over HTTP")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)

    from sdtool.ops.hash import hash_file
    from sdtool.ops.inspect import inspect
    from sdtool.scan import scan
    from tests.httpserver import serve

    def same_inspect(url: str, p: Path) -> bool:
        a, b = inspect(url).to_json(), inspect(p).to_json()
        a.pop("path"), b.pop("path")
        return a == b

    def same_scan(url: str, p: Path) -> bool:
        a, b = scan(url), scan(p)
        return a.verdict == b.verdict and [f.message for f in a.findings] == [
            f.message for f in b.findings
        ]

    ops = {"inspect": same_inspect, "scan": same_scan}
    if args.hash:
        ops["hash"] = lambda url, p: hash_file(url).hashes == hash_file(p).hashes
    rows = []
    with serve() as server:
        for p in _files(args.dir):
            server.files["/" + p.name] = p
            size = p.stat().st_size
            for op, run in ops.items():
                server.reset()
                t = time.perf_counter()
                same = run(server.url("/" + p.name), p)
                elapsed = time.perf_counter() - t  # includes the local run it is compared with
                share = f"{100 * server.bytes_sent / size:.3f} %"
                served = f"{server.bytes_sent:,}"
                verdict = "yes" if same else "NO"
                row = (p.name, f"{size:,}", op, server.requests, served, share, f"{elapsed:.2f}")
                rows.append((*row, verdict))
    head = ("file", "bytes", "command", "requests", "served", "of file", "s (+local)", "same")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
