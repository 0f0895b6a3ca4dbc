"""The convert examples run: the public-API script, and the CI scan-then-convert script."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-sd15-ema.ckpt"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.skipif(not TINY.exists(), reason="examples/tiny-sd15-ema.ckpt is not here")
def test_convert_api_example(tmp_path: Path) -> None:
    out = tmp_path / "tiny-fp16.safetensors"
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "convert_api.py"), str(TINY), str(out)],
        capture_output=True, text=True, env=_env(), check=True,
    )  # fmt: skip
    assert "cast to fp16, verified=True" in res.stdout
    assert "position_ids" in res.stdout  # the int64 tensor is listed as kept
    assert out.is_file()


@pytest.mark.skipif(
    importlib.util.find_spec("sdtool.cli.scan") is None,
    reason="`sdtool scan` is not on this branch yet (the scanner lands from its own track)",
)
def test_ci_script_converts_clean_and_fails_on_dangerous(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    dl = tmp_path / "downloads"
    (dl / "sub").mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, dl / "sub" / "good.pt")
    # a pickle that would call os.system: the scanner must flag it, the script must not convert it
    (dl / "evil.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    out = tmp_path / "out"
    script = ROOT / "examples" / "ci_scan_convert.sh"
    env = {**_env(), "SDTOOL": f"{sys.executable} -m sdtool"}
    res = subprocess.run(
        ["bash", str(script), str(dl), str(out)], capture_output=True, text=True, env=env,
        cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert (out / "sub" / "good.safetensors").is_file()
    assert not (out / "evil.safetensors").exists()
    assert "held back" in res.stderr
    (dl / "evil.pkl").unlink()
    res = subprocess.run(
        ["bash", str(script), str(dl), str(tmp_path / "out2")], capture_output=True, text=True,
        env=env, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out2" / "sub" / "good.safetensors").is_file()
