"""How long identification takes, per family, from the header alone (prints a table).

Header-only safetensors files are written from the harvested key lists
(``sdtool/data/harvested.json.gz``) into a temporary directory; each is opened and identified
``--repeat`` times; the table shows the best time, the keys and the answer. The first line is the
one-off cost of loading the key-set tables (``signatures.json.gz``) in a fresh process.

    python benchmarks/bench_identify.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import subprocess
import sys
import tempfile
import time
from math import prod
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdtool import open_model  # noqa: E402
from sdtool.identify import identify  # noqa: E402

_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}


def write_header(path: Path, keys: list[str], shapes: list[list[int]], dtypes: list[str]) -> None:
    header, off = {}, 0
    for k, s, dt in zip(keys, shapes, dtypes, strict=True):
        n = prod(s) * _SIZE[dt]
        header[k] = {"dtype": dt, "shape": s, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    load = subprocess.run(
        [sys.executable, "-c",
         "import time; t = time.perf_counter(); from sdtool.identify import keysets as K; "
         "K.signatures(); K.component_index(); print(time.perf_counter() - t)"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    print(f"key-set tables loaded in a fresh process: {float(load.stdout) * 1000:.0f} ms\n")
    models = json.loads(gzip.decompress((ROOT / "sdtool/data/harvested.json.gz").read_bytes()))
    print(f"{'model':28} {'keys':>5} {'best ms':>8}  answer")
    with tempfile.TemporaryDirectory() as tmp:
        for name, d in models["models"].items():
            path = Path(tmp) / f"{name}.safetensors"
            write_header(path, d["keys"], d["shapes"], d["dtypes"])
            with open_model(path) as m:
                best = float("inf")
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    ident = identify(m)
                    best = min(best, time.perf_counter() - t)
            answer = " ".join(x for x in (ident.kind, ident.architecture, ident.model) if x)
            print(f"{name:28} {len(d['keys']):5} {best * 1000:8.1f}  {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
