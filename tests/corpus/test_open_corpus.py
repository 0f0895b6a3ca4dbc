"""Every file in ../shared/corpus, opened by sdtool: benign ones read like torch/numpy/safetensors
read them; no file, malicious ones included, ever runs code or imports anything unexpected.

The corpus files are opened only by sdtool (in a subprocess with canaries) and, as oracles for
benign files, by torch's own restricted loader (weights_only=True), safetensors and numpy without
pickle support: never by an unrestricted unpickler.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.canaries import EXPECTED_PREFIXES

pytestmark = pytest.mark.corpus

# Run inside the subprocess: install canaries, open every file, report outcomes as JSON.
PROBE = r"""
import builtins, json, os, subprocess, sys
REAL_COMPILE = builtins.compile
import sdtool, sdtool.formats.torchfile, sdtool.formats.safetensors, sdtool.formats.numpyfile
# the facts of torch's legacy, TAR and plain-pickle containers load on first use (dataclasses,
# whose methods are compiled): sdtool's own start, loaded before the canaries like numpy
import sdtool.formats.torchfacts
from sdtool import open_model
from sdtool.errors import SdtoolError
# sdtool imports numpy (and ml_dtypes) lazily, where tensor values are first read; load them
# before the canaries: what is watched is what the files make sdtool do, not its own start
import numpy, ml_dtypes
calls = []
def canary(name):
    def f(*a, **k):
        calls.append(name)
        raise RuntimeError("canary: " + name)
    return f
for mod, attr in [(os, "system"), (os, "popen"), (os, "execv"), (os, "execve"), (os, "spawnv"),
                  (os, "fork"), (os, "remove"), (os, "unlink"), (builtins, "eval"),
                  (builtins, "exec"), (builtins, "compile"), (builtins, "breakpoint")]:
    setattr(mod, attr, canary(attr))
subprocess.Popen.__init__ = canary("Popen")
import ast
def compile_ast_only(source, filename, mode, flags=0, *a, **k):
    # ast.literal_eval parses with PyCF_ONLY_AST: a syntax tree, nothing runs; importlib compiles
    # .py files it imports (without a bytecode cache): the import recorder judges those imports
    caller = sys._getframe(1).f_globals.get("__name__", "")
    if flags & ast.PyCF_ONLY_AST or caller.startswith("importlib"):
        return REAL_COMPILE(source, filename, mode, flags, *a, **k)
    calls.append("compile")
    raise RuntimeError("canary: compile")
builtins.compile = compile_ast_only
before = set(sys.modules)
real_import = builtins.__import__
imported = []
def watch(name, *a, **k):
    imported.append(name)
    return real_import(name, *a, **k)
builtins.__import__ = watch
out = {}
for path in sys.argv[2:]:
    try:
        with open_model(path) as m:
            listing = [[n, t.dtype.code, list(t.shape)] for n, t in m.tensors.items()]
            out[path] = {"ok": True, "format": m.format, "tensors": listing}
            for n in list(m.tensors)[:3]:
                m.read(n)
    except SdtoolError as e:
        out[path] = {"ok": False, "error": type(e).__name__, "message": str(e)}
builtins.__import__ = real_import
new = sorted(set(sys.modules) - before)
json.dump({"results": out, "calls": calls, "new_modules": new,
           "imported": sorted(set(imported))}, open(sys.argv[1], "w"))
"""


def _manifest(corpus: Path) -> list[dict[str, Any]]:
    return json.loads((corpus / "manifest.json").read_text())


def _run_probe(corpus: Path, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    files = [str(corpus / "files" / e["file"]) for e in _manifest(corpus)]
    result = tmp / "probe.json"
    canary_dir = tmp / "cwd"
    canary_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(result), *files],
        cwd=canary_dir,
        timeout=600,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, f"the probe failed: {proc.stderr[-2000:]}"
    data = json.loads(result.read_text())
    data["cwd_files"] = sorted(p.name for p in canary_dir.iterdir())
    return data


def test_no_file_runs_code_or_imports(
    corpus: Path, tmp_path: Path, tally: list[str], sub_env: dict[str, str]
) -> None:
    data = _run_probe(corpus, tmp_path, sub_env)
    assert data["calls"] == [], f"canaries fired: {data['calls']}"
    assert data["cwd_files"] == [], f"files appeared: {data['cwd_files']}"
    unexpected = [
        m for m in data["imported"] + data["new_modules"] if not m.startswith(EXPECTED_PREFIXES)
    ]
    assert unexpected == [], f"unexpected imports while opening: {unexpected}"
    results = data["results"]
    by_verdict: dict[str, list[str]] = {}
    for e in _manifest(corpus):
        r = results[str(corpus / "files" / e["file"])]
        key = f"{'malicious' if e['verdict'].startswith('MAL') else 'benign'} " + (
            f"opened ({r['format']})" if r["ok"] else f"refused ({r['error']})"
        )
        by_verdict.setdefault(key, []).append(e["file"])
    for k, v in sorted(by_verdict.items()):
        tally.append(f"{len(v):4d}  {k}")
    tally.append(f"{len(results)} files opened in a subprocess: 0 canaries, 0 unexpected imports")


TORCH_ORACLE = r"""
import json, sys, torch
def walk(o, name, out, depth=0):
    if isinstance(o, torch.Tensor):
        out.append([name or "tensor", str(o.dtype).removeprefix("torch."), list(o.shape)])
    elif isinstance(o, dict):
        for k, v in o.items():
            walk(v, f"{name}.{k}" if name else str(k), out, depth + 1)
    elif isinstance(o, (list, tuple)):
        for i, v in enumerate(o):
            walk(v, f"{name}.{i}" if name else str(i), out, depth + 1)
res = {}
for p in sys.argv[2:]:
    try:
        obj = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as e:
        res[p] = {"refused": type(e).__name__}
        continue
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    out = []
    walk(obj, "", out)
    res[p] = {"tensors": out}
json.dump(res, open(sys.argv[1], "w"))
"""


def test_benign_torch_files_match_torch(corpus: Path, tmp_path: Path, tally: list[str]) -> None:
    pytest.importorskip("torch")
    from sdtool import dtypes, open_model
    from sdtool.errors import TorchScriptFile

    benign = [
        e
        for e in _manifest(corpus)
        if e["verdict"] == "benign"
        and e["format"] in ("zip torch", "legacy torch", "TorchScript", "TorchScript lite (.ptl)")
    ]
    paths = [str(corpus / "files" / e["file"]) for e in benign]
    out = tmp_path / "torch.json"
    subprocess.run(
        [sys.executable, "-c", TORCH_ORACLE, str(out), *paths],
        check=True,
        capture_output=True,
        timeout=600,
    )
    oracle = json.loads(out.read_text())
    compared = refused_by_torch = torchscript = 0
    for e, p in zip(benign, paths, strict=True):
        if e["format"].startswith("TorchScript"):
            with pytest.raises(TorchScriptFile):
                open_model(p)
            torchscript += 1
            continue
        with open_model(p) as m:
            ours = [[n, t.dtype.torch, list(t.shape)] for n, t in m.tensors.items()]
        ref = oracle[p]
        if "refused" in ref:
            refused_by_torch += 1
            assert ours or m.extra, f"{e['file']}: torch refuses it and sdtool finds nothing"
            continue
        assert ours == [[n, dtypes.from_torch(d).torch, s] for n, d, s in ref["tensors"]], e["file"]
        compared += 1
    tally.append(f"{compared} benign torch files: names, dtypes and shapes equal torch.load's")
    tally.append(
        f"{refused_by_torch} benign torch files torch's weights_only loader refuses; "
        "sdtool opens them"
    )
    tally.append(f"{torchscript} TorchScript archives reported as TorchScript")


def test_benign_safetensors_and_numpy_match(corpus: Path, tally: list[str]) -> None:
    import numpy as np
    from safetensors import safe_open

    from sdtool import open_model
    from sdtool.errors import UnsupportedDtype
    from sdtool.formats.numpyfile import PickledArray

    n_st = n_np = n_refused = 0
    for e in _manifest(corpus):
        if e["verdict"] != "benign":
            continue
        p = corpus / "files" / e["file"]
        if e["format"] == "safetensors":
            with safe_open(str(p), "np") as ref, open_model(p) as m:
                assert sorted(m.tensors) == sorted(ref.keys()), e["file"]
                keys = ref.keys()  # safe_open is not iterable
                for k in keys:
                    arr = ref.get_tensor(k)
                    assert m.read(k).tobytes() == arr.tobytes(), (e["file"], k)
                assert m.metadata == (ref.metadata() or {}), e["file"]
            n_st += 1
        elif e["format"] in ("npy", "npz"):
            try:
                loaded = np.load(p, allow_pickle=False)  # numbers only: no unpickling
                refs = dict(loaded.items()) if e["format"] == "npz" else {"array": loaded}
            except ValueError:  # object arrays: numpy would have to unpickle
                with pytest.raises(PickledArray):
                    open_model(p)
                n_refused += 1
                continue
            if any(a.dtype.kind in "SUO" for a in refs.values()):  # strings are not tensors
                with pytest.raises(UnsupportedDtype):
                    open_model(p)
                n_refused += 1
                continue
            with open_model(p) as m:
                assert sorted(m.tensors) == sorted(refs), e["file"]
                for k, arr in refs.items():
                    assert m.read(k).tobytes() == np.ascontiguousarray(arr).tobytes(), e["file"]
            n_np += 1
    tally.append(f"{n_st} safetensors and {n_np} numpy files: every tensor equal to the reference")
    tally.append(f"{n_refused} numpy files holding objects or strings refused, as numpy does")
