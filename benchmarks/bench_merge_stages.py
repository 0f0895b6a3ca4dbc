"""Where `sdtool merge` spends its CPU, stage by stage, in ns per element (CPU time of the
thread, not wall: a loaded machine inflates both, but less than it inflates walls).

The stages of one piece of an fp16 add-difference (``sdtool.ops.merge``): each input's fp16 ->
float32 conversion (plain, and scaled by 2**-112 as B and C are read), the in-place arithmetic,
the float32 -> fp16 cast into the output, and the whole piece; numpy's own casts for reference
(scalar loops). Then the whole piece on two threads at once (as the writer's cast threads run
it), with the share of each thread's life spent blocked (GIL waits); and the kernel's copies:
``pread`` of a cached file into a placed buffer, ``pwrite`` over cached pages and into a fresh
file (fresh page-cache pages: on this VM the first touch of a page costs far more than the
copy). Each figure is the best of ``--reps`` runs.

    python benchmarks/bench_merge_stages.py                 # pieces of 256K elements
    python benchmarks/bench_merge_stages.py --piece 65536 --file /path/to/cached.safetensors
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdtool import dtypes
from sdtool.aligned import PageBuffer
from sdtool.ops.arith import SCRATCH, _f16_to_f32, store
from sdtool.ops.merge import _DEAD_AFTER_COMPUTE, add_difference_, add_difference_scaled_
from sdtool.write.cast import _f32_to_f16

F16 = dtypes.from_code("F16")
T = 0.5


def best(fn: Callable[[], object], n: int, total: int, reps: int) -> float:
    """The best of ``reps`` runs of ``fn`` (``total`` elements each), in CPU ns per element."""
    fn()
    calls = max(1, total // n)
    out = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        out = min(out, (time.thread_time() - t0) / (calls * n) * 1e9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--piece", type=int, default=256 * 1024, help="elements per piece")
    ap.add_argument("--total", type=int, default=1 << 26, help="elements per run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--file", type=Path, help="a cached file to pread (default: one made here)")
    args = ap.parse_args()
    n, total, reps = args.piece, args.total, args.reps
    rng = np.random.default_rng(0)
    raws = [(rng.standard_normal(n, np.float32) * 0.02).astype(np.float16) for _ in range(3)]
    a, b, c = (SCRATCH.f32(i, n) for i in range(3))
    dst = np.empty(n, np.float16)
    t1, t2 = np.empty(n, np.uint32), np.empty(n, np.uint32)

    def piece() -> None:
        _f16_to_f32(raws[0], a)
        sb, sc = (_f16_to_f32(r, o, scaled=True) for r, o in ((raws[1], b), (raws[2], c)))
        store(add_difference_scaled_(a, b, sb, c, sc, T), dst, F16, _DEAD_AFTER_COMPUTE)

    def arith() -> None:
        add_difference_([a, b, c], T)

    rows: list[tuple[str, float]] = [
        ("fp16 -> fp32, bits (A)", best(lambda: _f16_to_f32(raws[0], a), n, total, reps)),
        ("fp16 -> fp32, bits scaled (B, C)",
         best(lambda: _f16_to_f32(raws[1], b, scaled=True), n, total, reps)),
        ("fp16 -> fp32, numpy's cast", best(lambda: np.copyto(a, raws[0]), n, total, reps)),
        ("arithmetic a + t (b - c), in place", best(arith, n, total, reps)),
        ("fp32 -> fp16, sdtool's exact kernel",
         best(lambda: _f32_to_f16(a, dst, t1, t2), n, total, reps)),
        ("fp32 -> fp16, numpy's cast",
         best(lambda: np.copyto(dst, a, casting="unsafe"), n, total, reps)),
        ("whole piece (3 conversions, arithmetic, cast)", best(piece, n, total, reps)),
    ]  # fmt: skip
    print(f"pieces of {n} elements, best of {reps} runs of {total} elements, CPU ns/element")
    print("| stage | ns/element |\n|---|---|")
    for name, ns in rows:
        print(f"| {name} | {ns:.2f} |")

    # the whole piece on two threads at once, each with its own scratch
    res: dict[int, tuple[float, float]] = {}

    def worker(k: int) -> None:
        tid = threading.get_native_id()
        own_raws = [r.copy() for r in raws]
        x = [SCRATCH.f32(i, n) for i in range(3)]
        out = np.empty(n, np.float16)

        def one() -> None:
            _f16_to_f32(own_raws[0], x[0])
            sb, sc = (_f16_to_f32(own_raws[i], x[i], scaled=True) for i in (1, 2))
            store(
                add_difference_scaled_(x[0], x[1], sb, x[2], sc, T), out, F16, _DEAD_AFTER_COMPUTE
            )

        def sched() -> int:  # ns on the CPU + ns runnable, from the kernel
            run, wait, _ = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()
            return int(run) + int(wait)

        calls = max(1, total // n)
        s0, w0, c0 = sched(), time.perf_counter(), time.thread_time()
        for _ in range(calls):
            one()
        s1, w1, c1 = sched(), time.perf_counter(), time.thread_time()
        res[k] = ((c1 - c0) / (calls * n) * 1e9, 1 - (s1 - s0) / 1e9 / (w1 - w0))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for k, (ns, blocked) in sorted(res.items()):
        print(f"| whole piece, thread {k} of 2 at once | {ns:.2f} (blocked {blocked:.0%}) |")

    # the kernel's copies, per fp16 element (2 bytes)
    nbytes = n * 2
    with tempfile.TemporaryDirectory(dir=args.file.parent if args.file else None) as d:
        src = args.file or Path(d) / "src.bin"
        if args.file is None:
            src.write_bytes(os.urandom(1 << 20) * 256)  # 256 MiB, in the page cache
        size = min(src.stat().st_size, 1 << 30) // nbytes * nbytes
        fd = os.open(src, os.O_RDONLY)
        pb = PageBuffer(nbytes)

        def reads() -> None:
            for off in range(0, size, nbytes):
                os.preadv(fd, [pb.array(off, nbytes).data], off)

        buf = pb.array(0, nbytes)
        out_path = Path(d) / "out.bin"

        def writes(fresh: bool) -> Callable[[], None]:
            def run() -> None:
                if fresh:
                    out_path.unlink(missing_ok=True)
                wfd = os.open(out_path, os.O_WRONLY | os.O_CREAT)
                for off in range(0, size, nbytes):
                    os.pwrite(wfd, buf, off)
                os.close(wfd)

            return run

        elems = size // 2
        for name, fn in (
            ("pread from the page cache", reads),
            ("pwrite over cached pages", writes(False)),
            ("pwrite into a fresh file", writes(True)),
        ):
            t = float("inf")
            for _ in range(3):
                r0 = os.times()
                fn()
                r1 = os.times()
                t = min(t, (r1.user + r1.system - r0.user - r0.system) / elems * 1e9)
            print(f"| {name} (per fp16 element) | {t:.2f} |")
        os.close(fd)


if __name__ == "__main__":
    main()
