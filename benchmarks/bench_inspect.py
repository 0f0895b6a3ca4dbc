"""Benchmark: list a multi-GB SD checkpoint's tensors (zip, legacy, safetensors twin).

sdtool's ``inspect`` against ``torch.load(mmap=True)`` and ``safetensors.safe_open``. Each case runs
in a fresh process and reports: the operation's wall time (without and with its imports), the
bytes it read through read() (``rchar``), how much of the model file it pulled from disk (after a
run with the page cache dropped, the file's pages resident in the cache, counted with mincore:
read-ahead included, Python's own libraries excluded), and peak RSS.

    python benchmarks/bench_inspect.py [--dir /work/bench] [--runs 3]

Inputs are made once under --dir: the SD 1.5-shaped 7.7 GB checkpoint (make_checkpoint.py), its
legacy-format twin, and its safetensors twin (written by sdtool's streaming writer).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> (setup: imports, timed separately; op: the operation that is timed)
CASES = {
    "sdtool inspect": (
        "import sdtool.ops.inspect as i",
        "n = i.inspect(PATH).totals.tensors",
    ),
    "torch.load(mmap=True)": (
        # the checkpoint pickles a Lightning callback class, which torch must import: it gets
        # the stand-in module the generator used (sdtool needs no such help)
        f"import sys, torch; sys.path.insert(0, {str(HERE)!r}); "
        "from make_checkpoint import _fake_lightning; _fake_lightning()",
        "obj = torch.load(PATH, mmap=True, weights_only=False, map_location='cpu'); "
        "sd = obj.get('state_dict', obj); "
        "n = len([(k, tuple(v.shape), v.dtype) for k, v in sd.items()])",
    ),
    "torch.load(meta)": (
        f"import sys, torch; sys.path.insert(0, {str(HERE)!r}); "
        "from make_checkpoint import _fake_lightning; _fake_lightning()",
        "obj = torch.load(PATH, weights_only=False, map_location='meta'); "
        "sd = obj.get('state_dict', obj); "
        "n = len([(k, tuple(v.shape), v.dtype) for k, v in sd.items()])",
    ),
    "safe_open(pt)": (
        "import torch; from safetensors import safe_open",
        "f = safe_open(PATH, 'pt'); n = len([(k, f.get_slice(k).get_shape()) for k in f.keys()])",
    ),
    "safe_open(np)": (
        "from safetensors import safe_open",
        "f = safe_open(PATH, 'np'); n = len([(k, f.get_slice(k).get_shape()) for k in f.keys()])",
    ),
}

RUNNER = """
import json, resource, sys, time
t_start = time.perf_counter()
PATH = sys.argv[1]
{setup}
def rchar():
    return int(dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())["rchar"])
t0 = time.perf_counter(); r0 = rchar()
{op}
t1 = time.perf_counter(); r1 = rchar()
print(json.dumps({{"wall": t1 - t0, "with_imports": t1 - t_start, "rchar": r1 - r0,
                  "tensors": n, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""

PLAN = [
    ("sdtool inspect", "zip"),
    ("torch.load(mmap=True)", "zip"),
    ("sdtool inspect", "legacy"),
    ("torch.load(mmap=True)", "legacy"),
    ("torch.load(meta)", "legacy"),
    ("sdtool inspect", "safetensors"),
    ("safe_open(pt)", "safetensors"),
    ("safe_open(np)", "safetensors"),
]


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` now in the page cache (mincore over a private mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size, page = path.stat().st_size, mmap.PAGESIZE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        anchor = ctypes.c_char.from_buffer(mm)
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
        resident = sum(v & 1 for v in vec) if rc == 0 else -1
        del anchor, vec
        gc.collect()
        with contextlib.suppress(BufferError):
            mm.close()
    return resident * page


def run(case: str, path: Path, cold: bool) -> dict[str, float]:
    setup, op = CASES[case]
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", RUNNER.format(setup=setup, op=op), str(path)],
        capture_output=True,
        text=True,
    )
    total = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{case} on {path.name} failed: {out.stderr[-800:]}")
    res: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    res["process"] = total
    res["file_read"] = resident_bytes(path) if cold else -1
    return res


def ensure_inputs(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    zip_ckpt, legacy = d / "sd15-ema.ckpt", d / "sd15-ema-legacy.ckpt"
    st = d / "sd15-ema.safetensors"
    make = [sys.executable, str(HERE / "make_checkpoint.py")]
    subprocess.run([*make, str(zip_ckpt)], check=True)
    subprocess.run([*make, str(legacy), "--legacy"], check=True)
    if not st.exists():
        code = (
            "import sys, pathlib\n"
            "from sdtool import open_model\n"
            "from sdtool.write.plan import OutTensor\n"
            "from sdtool.write import write_model\n"
            "m = open_model(sys.argv[1])\n"
            "plan = [OutTensor(n, m, t, t.dtype) for n, t in m.tensors.items()]\n"
            "write_model(plan, pathlib.Path(sys.argv[2]))\n"
        )
        subprocess.run([sys.executable, "-c", code, str(zip_ckpt), str(st)], check=True)
    return {"zip": zip_ckpt, "legacy": legacy, "safetensors": st}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/work/bench"))
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    files = ensure_inputs(a.dir)
    cold_ok = drop_caches()
    sizes = ", ".join(f"{k} {p.stat().st_size / 1e9:.2f} GB" for k, p in files.items())
    print(f"files: {sizes}")
    print(
        f"median of {a.runs} warm runs; 'file read cold': the model file's bytes in the page cache "
        f"after a run with it dropped ({'done' if cold_ok else 'not permitted here: n/a'})\n"
    )
    hdr = (
        f"{'tool':<22} {'file':<12} {'op s':>7} {'+imports s':>10} {'process s':>10} "
        f"{'read() MB':>10} {'file read cold':>15} {'% of file':>9} {'peak RSS MB':>12}"
    )
    print(hdr)
    print("-" * len(hdr))
    for case, kind in PLAN:
        path = files[kind]
        size = path.stat().st_size
        try:
            cold = run(case, path, cold=True) if cold_ok else None
            warm = [run(case, path, cold=False) for _ in range(a.runs)]
        except RuntimeError as e:
            print(f"{case:<22} {kind:<12} fails: {str(e).strip().splitlines()[-1][:90]}")
            continue
        med = {
            k: statistics.median(r[k] for r in warm)
            for k in ("wall", "with_imports", "process", "rchar", "rss")
        }
        fr = f"{cold['file_read'] / 1e6:12.2f} MB" if cold else f"{'n/a':>15}"
        pct = f"{100 * cold['file_read'] / size:8.3f}%" if cold else f"{'n/a':>9}"
        print(
            f"{case:<22} {kind:<12} {med['wall']:7.3f} {med['with_imports']:10.3f} "
            f"{med['process']:10.3f} {med['rchar'] / 1e6:10.2f} {fr} {pct} "
            f"{med['rss'] / 2**20:12.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
