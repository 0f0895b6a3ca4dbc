"""Benchmark ``sdtool scan`` against picklescan, ModelScan and fickling; print tables.

Measures, each tool in its own process (wall time and peak RSS from wait4):
  1. one multi-GB checkpoint (the SD-shaped file from benchmarks/make_checkpoint.py);
  2. the whole corpus directory;
and counts detections per file on the corpus (malicious caught / benign flagged / errors).

The other scanners live in a throwaway venv (never a project dependency):
    python3 -m venv /work/bench/scanners-venv
    /work/bench/scanners-venv/bin/pip install picklescan modelscan fickling typing_extensions

Usage:
    python benchmarks/bench_scan.py [--big /work/bench/sd15-ema.ckpt ...] [--corpus DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = Path("/work/bench/scanners-venv")
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus"

#: per-file verdict drivers: print one JSON line per file {"file", "flagged", "error"}
DRIVER = r"""
import json, sys, zipfile
tool, files = sys.argv[1], sys.argv[2:]

def picklescan(p):
    from picklescan.scanner import scan_file_path
    r = scan_file_path(p)
    return r.infected_files > 0, ("scan error" if r.scan_err else None)

def modelscan(p):
    from modelscan.modelscan import ModelScan
    r = ModelScan().scan(p)
    issues = r.get("issues") or []
    errs = r.get("errors") or []
    return len(issues) > 0, (str(errs[0])[:80] if errs else None)

def fickling(p):
    import fickling
    if zipfile.is_zipfile(p):
        r = fickling.scan_zip_archive(p, graceful=True)
    else:
        r = fickling.scan_file(p, graceful=True)
    sev = getattr(r, "severity", None)
    name = getattr(sev, "name", str(sev))
    return name not in ("LIKELY_SAFE",), ("; ".join(getattr(r, "errors", []) or [])[:80] or None)

def sdtool(p):
    from sdtool.scan import scan
    r = scan(p)
    failed = r.verdict in ("error", "not scanned")
    return r.verdict == "dangerous", ("; ".join(r.errors)[:80] if failed else None)

fn = globals()[tool]
for f in files:
    try:
        flagged, err = fn(f)
    except BaseException as e:  # a tool crash is an error, never a verdict
        flagged, err = False, f"{type(e).__name__}: {e}"[:80]
    print(json.dumps({"file": f, "flagged": bool(flagged), "error": err}), flush=True)
"""


def measure(
    cmd: list[str], cwd: Path | None = None, timeout: float = 900
) -> tuple[float, float, int, str]:
    """(seconds, peak RSS MiB, exit code, stdout) of one process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.DEVNULL)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        secs = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return secs, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), text


def commands(venv: Path, target: Path) -> dict[str, list[str]]:
    py = str(venv / "bin" / "python")
    return {
        "sdtool": [sys.executable, "-m", "sdtool", "scan", str(target), "--json"],
        "picklescan 1.0.5": [str(venv / "bin" / "picklescan"), "-p", str(target)],
        "ModelScan 0.8.8": [str(venv / "bin" / "modelscan"), "-p", str(target)],
        # fickling's CLI has no directory mode and cannot open torch zips: drive its API
        "fickling 0.1.12": [py, "-c", DRIVER, "fickling", *_files(target)],
    }


def _files(target: Path) -> list[str]:
    if target.is_dir():
        return [str(p) for p in sorted(target.rglob("*")) if p.is_file()]
    return [str(target)]


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def bench_speed(venv: Path, targets: list[Path], repeat: int) -> None:
    for target in targets:
        size = sum(p.stat().st_size for p in map(Path, _files(target)))
        rows = []
        for name, cmd in commands(venv, target).items():
            if "fickling" in name and size > (1 << 30):
                rows.append([name, "skipped", "-", "reads the whole file into memory"])
                continue
            best = None
            for _ in range(repeat):
                secs, rss, code, _out = measure(cmd, cwd=ROOT)
                if best is None or secs < best[0]:
                    best = (secs, rss, code)
            assert best is not None
            rows.append([name, f"{best[0]:.2f} s", f"{best[1]:.0f} MiB", f"exit {best[2]}"])
        table(
            f"{target} ({size / 1e9:.2f} GB, {len(_files(target))} files), best of {repeat}",
            ["tool", "wall time", "peak RSS", "result"],
            rows,
        )


def bench_detection(venv: Path, corpus: Path) -> None:
    manifest = json.loads((corpus / "manifest.json").read_text())
    files = [str(corpus / "files" / e["file"]) for e in manifest]
    malicious = {
        str(corpus / "files" / e["file"]) for e in manifest if e["verdict"].startswith("MAL")
    }
    rows = []
    for tool, py in (
        ("sdtool", sys.executable),
        ("picklescan", str(venv / "bin" / "python")),
        ("modelscan", str(venv / "bin" / "python")),
        ("fickling", str(venv / "bin" / "python")),
    ):
        _, _, _, out = measure([py, "-c", DRIVER, tool, *files], cwd=ROOT, timeout=1800)
        res = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        caught = sum(1 for r in res if r["file"] in malicious and r["flagged"])
        fa = sum(1 for r in res if r["file"] not in malicious and r["flagged"])
        err = sum(1 for r in res if r["error"] and not r["flagged"])
        rows.append([tool, f"{caught}/{len(malicious)}", f"{fa}/{len(files) - len(malicious)}",
                     str(err)])  # fmt: skip
    table(
        f"Detection on {corpus} ({len(files)} files)",
        ["tool", "malicious caught", "benign flagged (false alarms)", "errors (not flagged)"],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", type=Path, nargs="*", default=None, help="multi-GB checkpoints")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not (args.venv / "bin" / "picklescan").exists():
        sys.exit(f"install the other scanners first: see {__file__}")
    big = args.big
    if big is None:
        candidates = ("sd15-ema.ckpt", "sd15-ema-legacy.ckpt")
        big = [Path("/work/bench") / n for n in candidates if (Path("/work/bench") / n).exists()]
    bench_speed(args.venv, [*big, args.corpus / "files"], args.repeat)
    bench_detection(args.venv, args.corpus)


if __name__ == "__main__":
    main()
