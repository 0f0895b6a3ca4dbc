"""Faults while writing: a full disk, Ctrl-C, SIGKILL, a source that shrinks mid-read.

Afterwards the output path holds nothing (or, for success, a complete file that reads back
equal), no temp file is left except after SIGKILL (which no process can clean up after; the
leftover is a dot-file named ``*.sdtool-tmp``), and the input's SHA-256 is unchanged.
The writer under test is ``sdtool.write.write_model`` over ``sdtool.write.atomic``.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdtool.errors import SdtoolError
from sdtool.formats.open import open_model
from sdtool.ops.diff import diff
from sdtool.write import write_model
from sdtool.write.plan import OutTensor

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, resource, signal, sys
sys.path.insert(0, sys.argv[1])
src, out, fault = sys.argv[2], sys.argv[3], sys.argv[4]
from sdtool.errors import SdtoolError
from sdtool.formats.open import open_model
from sdtool.write.plan import OutTensor
from sdtool.write import write_model
written = [0]
def progress(done, total):
    written[0] = done
    if written[0] > 0 and fault in ("sigint", "sigkill"):
        os.kill(os.getpid(), signal.SIGINT if fault == "sigint" else signal.SIGKILL)
if fault == "disk-full":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
try:
    with open_model(src) as m:
        plan = [OutTensor(n, m, t, t.dtype) for n, t in m.tensors.items()]
        write_model(plan, out, progress=progress, verify=True)
    print("written")
except SdtoolError as e:
    print("error:" + type(e).__name__ + ":" + str(e))
except KeyboardInterrupt:
    print("interrupted")
"""


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    p = tmp_path / "src.safetensors"
    save_file(
        {f"t{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(8)}, str(p)
    )
    return p


def _run(source: Path, out: Path, fault: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), str(source), str(out), fault],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".sdtool-tmp"))


def test_success_is_complete_and_verified(tmp_path: Path, source: Path) -> None:
    before = _sha(source)
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    proc = _run(source, out, "none")
    assert proc.stdout.strip() == "written", proc.stderr
    assert diff(source, out).identical
    ref = load_file(str(source))
    assert all(np.array_equal(v, load_file(str(out))[k]) for k, v in ref.items())
    assert _leftovers(out.parent) == [] and _sha(source) == before


def test_disk_full(tmp_path: Path, source: Path) -> None:
    """RLIMIT_FSIZE (256 KiB) with SIGXFSZ ignored: write() fails with EFBIG mid-file."""
    before = _sha(source)
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    proc = _run(source, out, "disk-full")
    assert proc.stdout.startswith("error:OutputError:"), proc.stdout + proc.stderr
    assert "disk is full" in proc.stdout
    assert not out.exists() and _leftovers(out.parent) == []
    assert _sha(source) == before


def test_sigint_mid_write(tmp_path: Path, source: Path) -> None:
    before = _sha(source)
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    proc = _run(source, out, "sigint")
    assert proc.stdout.strip() == "interrupted", proc.stdout + proc.stderr
    assert not out.exists() and _leftovers(out.parent) == []
    assert _sha(source) == before


def test_sigkill_mid_write(tmp_path: Path, source: Path) -> None:
    """Nothing can clean up after SIGKILL: the target is absent, a hidden temp file remains."""
    before = _sha(source)
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    proc = _run(source, out, "sigkill")
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    left = _leftovers(out.parent)
    assert len(left) == 1 and left[0].startswith(".m.safetensors.")
    assert _sha(source) == before


def test_sigkill_leaves_old_target_intact(tmp_path: Path, source: Path) -> None:
    """With --overwrite semantics the old file stays whole until the final rename."""
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old contents")
    code = CHILD.replace("write_model(plan, out,", "write_model(plan, out, overwrite=True,")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(source), str(out), "sigkill"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL
    assert out.read_bytes() == b"old contents"


def test_source_shrinks_while_read(tmp_path: Path, source: Path) -> None:
    """A read error (the source truncated after opening): an error, and no output."""
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(source.read_bytes())
    out = tmp_path / "m.safetensors"
    with open_model(copy) as m:
        plan = [OutTensor(n, m, t, t.dtype) for n, t in m.tensors.items()]
        with open(copy, "r+b") as f:
            f.truncate(copy.stat().st_size // 2)
        with pytest.raises(SdtoolError):
            write_model(plan, out, verify=True)
    assert not out.exists() and _leftovers(tmp_path) == []
