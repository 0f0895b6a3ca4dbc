"""The long fuzzing run, on demand: ``python tests/fuzz/run_long.py --seconds 600``.

Phases: (1) every seed truncated at every offset (corpus files: the first 2 KiB and 64 more
cuts), (2) every bit of the first 1 KiB of every built seed (128 bytes of corpus files) flipped,
and every 4/8-byte window there set to interesting integers,
(3) random multi-step mutations until the time is up. Runs under RLIMIT_AS (--memory MiB) with a
per-input watchdog (faulthandler, --hang seconds) so a hang or memory blow-up is caught too.
Failing inputs are saved to --out; the figures are printed as a table for RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harness import INTERESTING, exercise, flip, mutate, put_int, truncate
from seeds import builtin_seeds, corpus_seeds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300, help="time for the random phase")
    ap.add_argument("--memory", type=int, default=2048, help="RLIMIT_AS in MiB")
    ap.add_argument("--hang", type=float, default=20, help="seconds one input may take")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sdtool-fuzz-failures"))
    ap.add_argument("--no-corpus", action="store_true")
    args = ap.parse_args()
    seeds = builtin_seeds() | ({} if args.no_corpus else corpus_seeds(256 * 1024))
    limit = args.memory << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    work = Path(tempfile.mkdtemp(prefix="sdtool-fuzz-"))
    args.out.mkdir(parents=True, exist_ok=True)
    counts: collections.Counter[str] = collections.Counter()
    phase_counts: dict[str, int] = {}
    failures: list[str] = []

    def run(name: str, data: bytes) -> None:
        p = work / "input"
        p.write_bytes(data)
        faulthandler.dump_traceback_later(args.hang, exit=True)
        try:
            counts[exercise(p).split(":")[0]] += 1
        except Exception as e:  # a bug: keep the input
            counts["BUG"] += 1
            keep = args.out / f"{len(failures):04d}-{name.replace('/', '_')}"
            keep.write_bytes(data)
            failures.append(f"{keep}: {type(e).__name__}: {str(e)[:200]}")
        finally:
            faulthandler.cancel_dump_traceback_later()

    t0 = time.monotonic()
    n0 = sum(counts.values())
    for name, data in seeds.items():
        # built seeds: every offset; corpus files: every offset of the first 2 KiB + 64 more
        corpus = name.startswith("corpus:")
        cuts = (
            sorted(set(range(min(len(data), 2048))) | set(range(0, len(data), len(data) // 64 + 1)))
            if corpus
            else range(len(data))
        )
        for n in cuts:
            run(name, truncate(data, n))
    phase_counts["truncation"] = sum(counts.values()) - n0
    n0 = sum(counts.values())
    for name, data in seeds.items():
        span = 128 if name.startswith("corpus:") else 1024
        for pos in range(min(len(data), span)):
            for bit in range(8):
                run(name, flip(data, pos, bit))
            for width in (4, 8):
                for value in INTERESTING:
                    run(name, put_int(data, pos, value, width))
    phase_counts["bit flips + integers (first 1 KiB)"] = sum(counts.values()) - n0
    n0 = sum(counts.values())
    rng = random.Random(0)
    names = sorted(seeds)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        name = rng.choice(names)
        run(name, mutate(seeds[name], rng, rng.randrange(1, 8)))
    phase_counts["random mutations"] = sum(counts.values()) - n0
    elapsed = time.monotonic() - t0
    built = len(builtin_seeds())
    print(f"seeds: {len(seeds)} ({built} built, {len(seeds) - built} corpus)")
    print(f"RLIMIT_AS {args.memory} MiB, watchdog {args.hang:g} s per input, {elapsed:.0f} s total")
    print("| phase | inputs |")
    print("|---|---|")
    for k, v in phase_counts.items():
        print(f"| {k} | {v:,} |")
    print(f"| **total** | **{sum(phase_counts.values()):,}** |")
    print("outcomes:", dict(counts))
    for f in failures[:50]:
        print("FAILURE", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
