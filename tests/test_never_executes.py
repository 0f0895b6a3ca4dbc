"""Never executes: every malicious sample is opened, inspected, hashed, converted and scanned in
a subprocess, and afterwards no canary file exists and no unexpected module was imported.

The payloads are assembled opcode by opcode; each would create a file named CANARY-<attack> in
the canary folder if anything ran it. Every malicious file of ../shared/corpus joins them.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.canaries import EXPECTED_PREFIXES

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"


CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
canary_dir = sys.argv[2]
os.chdir(canary_dir)
files = sys.argv[3:]
# everything sdtool needs is imported first; what appears later came from handling the files
import numpy, safetensors, blake3, sdtool, sdtool.formats.open, sdtool.formats.torchfile
import sdtool.formats.safetensors, sdtool.formats.numpyfile, sdtool.ops.hash, sdtool.ops.diff
import sdtool.ops.inspect, sdtool.write, sdtool.write.stream, sdtool.write.safetensors, sdtool.model
from pathlib import Path
from sdtool.errors import SdtoolError
from sdtool.formats.open import open_model
from sdtool.write.plan import OutTensor
from sdtool.ops.diff import diff
from sdtool.ops.hash import hash_file
from sdtool.ops.inspect import inspect_model
from sdtool.write import write_model
try:
    from sdtool.scan import scan
except ImportError:
    scan = None
try:  # sdtool.scan.archives reads 7z with py7zr, imported when a 7z is met: sdtool's, not a file's
    import py7zr, py7zr.io, sdtool.scan.archives
    import glob, psutil  # py7zr imports these while it unpacks
except ImportError:
    pass
before = set(sys.modules)
outcomes = {}
out_dir = Path(sys.argv[1]).parent / "never-executes-out"
for i, path in enumerate(files):
    steps = []
    for step in ("open", "hash", "diff", "convert", "scan"):
        try:
            if step == "open":
                with open_model(path) as m:
                    for n, t in m.tensors.items():
                        if t.nbytes < 1 << 26:
                            m.read(n).tobytes()
                    inspect_model(m, tensors=True, identify=False)
            elif step == "hash":
                hash_file(path)
            elif step == "diff":
                diff(path, path)
            elif step == "convert":
                with open_model(path) as m:
                    plan = [OutTensor(n, m, t, t.dtype) for n, t in m.tensors.items()]
                    out_dir.mkdir(exist_ok=True)
                    write_model(plan, out_dir / f"{i}.safetensors", overwrite=True, verify=True)
            elif step == "scan" and scan is not None:
                scan(path)
            steps.append(step + ":ok")
        except SdtoolError as e:
            steps.append(step + ":" + type(e).__name__)
    outcomes[path] = steps
new = sorted(set(sys.modules) - before)
print(json.dumps({"outcomes": outcomes, "new_modules": new}))
"""


def _p0(module: str, name: str, *args: str) -> bytes:
    """Protocol 0: GLOBAL module.name, MARK, string args, TUPLE, REDUCE, STOP."""
    body = b"".join(b"S" + repr(a).encode() + b"\n" for a in args)
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n(" + body + b"tR."


def _unicode(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _p4_stack_global(module: str, name: str, *args: str) -> bytes:
    """Protocol 4: STACK_GLOBAL from two strings, then a call."""
    body = b"".join(_unicode(a) for a in args)
    return b"\x80\x04" + _unicode(module) + _unicode(name) + b"\x93(" + body + b"tR."


def _torch_zip_with(data_pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/version", b"3\n")
        z.writestr("archive/byteorder", b"little")
    return buf.getvalue()


def payloads(canary: Path) -> dict[str, bytes]:
    """name -> a file that creates ``canary/CANARY-<name>`` if any of its code runs."""
    c = lambda n: str(canary / f"CANARY-{n}")  # noqa: E731
    touch = lambda n: f"touch {c(n)}"  # noqa: E731
    system = _p0("os", "system", touch("os-system"))
    nested = _torch_zip_with(b"\x80\x02" + _p0("os", "system", touch("nested")))
    out = {
        # GLOBAL os.system + REDUCE: the classic
        "os-system.pkl": system,
        "posix-system.pkl": _p0("posix", "system", touch("posix-system")),
        # builtins.open(path, "w") creates the file just by being called
        "builtins-open.pkl": _p0("builtins", "open", c("builtins-open"), "w"),
        "py2-open.pkl": _p0("__builtin__", "open", c("py2-open"), "w"),
        # exec/eval of source text
        "exec.pkl": _p0("builtins", "exec", f"open({c('exec')!r}, 'w')"),
        "eval.pkl": _p4_stack_global("builtins", "eval", f"open({c('eval')!r}, 'w')"),
        # subprocess, by STACK_GLOBAL
        "popen.pkl": _p4_stack_global("subprocess", "getoutput", touch("popen")),
        # INST (protocol 0) and OBJ (protocol 1) call their class too
        "inst.pkl": b"(S'" + touch("inst").encode() + b"'\nios\nsystem\n.",
        "obj.pkl": b"(cos\nsystem\nS'" + touch("obj").encode() + b"'\no.",
        # BUILD on a stand-in: a __setstate__ path
        "build.pkl": b"cpathlib\nPath\n(S'" + c("build").encode() + b"'\ntR(dS'x'\nI1\nsb.",
        # getattr(Path(p), "touch")() : a two-step call chain
        "getattr-chain.pkl": b"cbuiltins\ngetattr\n(cpathlib\nPath\n(S'"
        + c("getattr").encode()
        + b"'\ntRS'touch'\ntR)R.",
        # the payload as a torch checkpoint's data.pkl, and inside _load_from_bytes
        "zip-data-pkl.ckpt": _torch_zip_with(
            b"\x80\x02" + _p0("os", "system", touch("zip-data-pkl"))
        ),
        "nested-load-from-bytes.pkl": b"ctorch.storage\n_load_from_bytes\n(B"
        + struct.pack("<I", len(nested))
        + nested
        + b"tR.",
        # a legacy torch file whose magic-number pickle is the payload (torch unpickles it first)
        "legacy-magic.pt": _p0("os", "system", touch("legacy-magic")) + pickle.dumps(1001, 2),
        # an object-dtype .npy: the data is a pickle
        "object.npy": _npy_object(_p0("os", "system", touch("npy"))),
    }
    return out


def _npy_object(pkl: bytes) -> bytes:
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + pkl


def _corpus_malicious() -> list[Path]:
    manifest = CORPUS / "manifest.json"
    if not manifest.is_file():
        return []
    entries = json.loads(manifest.read_text())
    return [CORPUS / "files" / e["file"] for e in entries if e["verdict"].upper().startswith("MAL")]


def test_no_payload_runs(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    files = []
    for name, data in payloads(canary).items():
        p = tmp_path / name
        p.write_bytes(data)
        files.append(str(p))
    corpus = _corpus_malicious()
    files += [str(p) for p in corpus]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "work"), str(canary), *files],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in canary.iterdir()) == [], "a payload ran"
    assert not list(tmp_path.glob("CANARY*")) and not list(ROOT.glob("CANARY*"))
    unexpected = [m for m in report["new_modules"] if not m.startswith(EXPECTED_PREFIXES)]
    assert unexpected == [], f"modules imported while handling hostile files: {unexpected}"
    assert "subprocess" not in report["new_modules"] and "posix" not in report["new_modules"]
    assert len(report["outcomes"]) == len(files)
    for path, steps in report["outcomes"].items():
        assert steps[0].startswith("open:"), (path, steps)


def test_canary_payloads_do_run_under_pickle(tmp_path: Path) -> None:
    """The payloads are real: plain pickle.loads (in a throwaway subprocess) creates the canary."""
    canary = tmp_path / "canary"
    canary.mkdir()
    for name in ("os-system.pkl", "builtins-open.pkl", "inst.pkl", "getattr-chain.pkl"):
        data = payloads(canary)[name]
        code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
        subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=60)
    made = sorted(p.name for p in canary.iterdir())
    assert made == ["CANARY-builtins-open", "CANARY-getattr", "CANARY-inst", "CANARY-os-system"]


@pytest.mark.corpus
def test_corpus_has_malicious_samples(corpus: Path) -> None:
    assert len(_corpus_malicious()) > 20
