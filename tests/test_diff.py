"""sdtool diff: exact counts on pairs built in tmp_path; exit 0 identical, 1 differ, 2 error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from sdtool import diff
from sdtool.cli.main import main
from sdtool.ops import diff as diff_mod


def _save(
    path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture
def base() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "unet.w": rng.standard_normal((64, 48)).astype(np.float32),
        "ids": np.arange(77, dtype=np.int64)[None],
        "bias": np.linspace(-1, 1, 10, dtype=np.float32),
    }


def test_identical_copy(tmp_path: Path, base: dict[str, np.ndarray]) -> None:
    a = _save(tmp_path / "a.safetensors", base)
    b = _save(tmp_path / "b.safetensors", {k: base[k] for k in reversed(base)})
    r = diff(a, b)
    assert r.identical
    assert r.counts == {"missing": 0, "extra": 0, "shape": 0, "dtype": 0, "changed": 0, "equal": 3}
    assert r.max_abs_diff == 0
    assert main(["diff", str(a), str(b)]) == 0


def test_result_is_frozen(tmp_path: Path, base: dict[str, np.ndarray]) -> None:
    import dataclasses

    from sdtool.results import Result

    a = _save(tmp_path / "a.safetensors", base)
    r = diff(a, a)
    assert isinstance(r, Result)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.a = tmp_path  # type: ignore[misc]
    assert r.to_json()["a"] == {"path": str(a), "format": "safetensors"}


@pytest.mark.parametrize(("workers", "task_pieces"), [(1, 16), (3, 2), (4, 1)])
def test_changed_counts_across_chunks(
    tmp_path: Path,
    base: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
    task_pieces: int,
) -> None:
    monkeypatch.setattr(diff_mod, "CHUNK_ELEMENTS", 100)  # 3072 elements -> 31 chunks
    # one worker comparing the tasks in turn, or tasks of unet.w tallied by several at once
    monkeypatch.setattr(diff_mod, "_workers", lambda: workers)
    monkeypatch.setattr(diff_mod, "TASK_PIECES", task_pieces)
    tuned = dict(base)
    w = base["unet.w"].copy()
    flat = w.reshape(-1)
    flat[[0, 99, 100, 2500, 3071]] += np.float32(0.25)
    flat[1000] -= np.float32(3.0)
    tuned["unet.w"] = w
    a = _save(tmp_path / "a.safetensors", base)
    b = _save(tmp_path / "b.safetensors", tuned)
    r = diff(a, b)
    t = {x.name: x for x in r.tensors}["unet.w"]
    assert (t.status, t.changed, t.numel) == ("changed", 6, 64 * 48)
    expect = np.abs(base["unet.w"].astype(np.float64) - w.astype(np.float64)).max()
    assert t.max_abs_diff == pytest.approx(expect, rel=0, abs=0)
    assert r.counts["equal"] == 2 and r.counts["changed"] == 1
    assert not r.identical
    assert main(["diff", str(a), str(b)]) == 1


def test_missing_extra_shape_and_metadata(tmp_path: Path, base: dict[str, np.ndarray]) -> None:
    other = {"unet.w": base["unet.w"], "bias": base["bias"].reshape(2, 5), "new": np.zeros(2)}
    a = _save(tmp_path / "a.safetensors", base, {"format": "pt", "title": "x"})
    b = _save(tmp_path / "b.safetensors", other, {"title": "y", "extra": "1"})
    r = diff(a, b)
    by = {t.name: t for t in r.tensors}
    assert by["ids"].status == "missing" and by["new"].status == "extra"
    assert by["bias"].status == "shape" and by["bias"].shape_b == (2, 5)
    assert by["bias"].max_abs_diff is None and by["bias"].numel == 0
    assert r.counts == {"missing": 1, "extra": 1, "shape": 1, "dtype": 0, "changed": 0, "equal": 1}
    assert (r.metadata_a_only, r.metadata_b_only, r.metadata_changed) == (
        ["format"],
        ["extra"],
        ["title"],
    )


def test_nan_zero_and_inf(tmp_path: Path) -> None:
    nan2 = np.array([0x7FC00001], np.uint32).view(np.float32)[0]  # a NaN with another payload
    a = np.array([np.nan, np.nan, 0.0, 1.0, np.inf, 5.0, np.nan], np.float32)
    b = np.array([np.nan, 1.0, -0.0, 1.0, np.inf, np.inf, nan2], np.float32)
    pa = _save(tmp_path / "a.safetensors", {"x": a})
    pb = _save(tmp_path / "b.safetensors", {"x": b})
    (t,) = diff(pa, pb).tensors
    # bits differ at: NaN vs 1.0, +0 vs -0, 5 vs inf, NaN payloads -> 4
    assert t.changed == 4
    assert t.nan_mismatch == 1
    assert t.max_abs_diff == float("inf")  # 5 vs inf; +0/-0 count 0, NaNs are left out
    assert t.to_json()["max_abs_diff"] == "inf"


def test_integers_exact(tmp_path: Path) -> None:
    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    pa = _save(
        tmp_path / "a.safetensors",
        {"i": np.array([lo, 7, 3], np.int64), "u": np.array([0, 255], np.uint8)},
    )
    pb = _save(
        tmp_path / "b.safetensors",
        {"i": np.array([hi, 7, 2], np.int64), "u": np.array([255, 255], np.uint8)},
    )
    by = {t.name: t for t in diff(pa, pb).tensors}
    assert by["i"].changed == 2 and by["i"].max_abs_diff == 2**64 - 1
    assert isinstance(by["i"].max_abs_diff, int)
    assert by["u"].changed == 1 and by["u"].max_abs_diff == 255


@pytest.mark.parametrize("target", [np.float16, ml_dtypes.bfloat16], ids=["fp16", "bf16"])
def test_dtype_change_cast_aware(tmp_path: Path, base: dict[str, np.ndarray], target: type) -> None:
    half = {k: (v.astype(target) if v.dtype == np.float32 else v) for k, v in base.items()}
    a = _save(tmp_path / "a.safetensors", base)
    b = _save(tmp_path / "b.safetensors", half)
    r = diff(a, b)
    by = {t.name: t for t in r.tensors}
    assert by["unet.w"].status == "dtype" and by["unet.w"].changed == 0
    assert by["ids"].status == "equal"  # int64 kept as it must be
    expect = np.abs(base["unet.w"].astype(np.float64) - half["unet.w"].astype(np.float64)).max()
    assert by["unet.w"].max_abs_diff == expect > 0
    assert not r.identical
    assert diff(a, b, dtype_tolerant=True).identical
    assert main(["diff", str(a), str(b)]) == 1
    assert main(["diff", "--dtype-tolerant", str(a), str(b)]) == 0
    # one element that is not A's rounding: tolerant mode must still say "different"
    bad = dict(half)
    w = half["unet.w"].copy()
    w[3, 3] = target(7.0)
    bad["unet.w"] = w
    c = _save(tmp_path / "c.safetensors", bad)
    rc = diff(a, c, dtype_tolerant=True)
    assert {t.name: t for t in rc.tensors}["unet.w"].changed == 1
    assert not rc.identical


def test_bool_and_complex(tmp_path: Path) -> None:
    pa = _save(
        tmp_path / "a.safetensors",
        {"m": np.array([True, False, True]), "c": np.array([1 + 1j, 2], np.complex64)},
    )
    pb = _save(
        tmp_path / "b.safetensors",
        {"m": np.array([True, True, True]), "c": np.array([1 + 1j, 2 + 3j], np.complex64)},
    )
    by = {t.name: t for t in diff(pa, pb).tensors}
    assert (by["m"].changed, by["m"].max_abs_diff) == (1, 1.0)
    assert (by["c"].changed, by["c"].max_abs_diff) == (1, 3.0)


def test_cli_json_schema(
    tmp_path: Path, base: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    tuned = dict(base, bias=base["bias"] + np.float32(1))
    a = _save(tmp_path / "a.safetensors", base)
    b = _save(tmp_path / "b.safetensors", tuned)
    assert main(["diff", "--json", str(a), str(b)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {
        "schema",
        "a",
        "b",
        "identical",
        "dtype_tolerant",
        "fast",
        "counts",
        "changed_elements",
        "max_abs_diff",
        "metadata",
        "tensors",
    }
    assert out["schema"] == "sdtool.diff/2"
    assert out["a"] == {"path": str(a), "format": "safetensors"}
    assert out["identical"] is False and out["changed_elements"] == 10
    assert out["counts"]["changed"] == 1 and out["counts"]["equal"] == 2
    bias = next(t for t in out["tensors"] if t["name"] == "bias")
    assert bias == {
        "name": "bias",
        "status": "changed",
        "dtype_a": "F32",
        "dtype_b": "F32",
        "shape_a": [10],
        "shape_b": [10],
        "numel": 10,
        "changed": 10,
        "nan_mismatch": 0,
        "max_abs_diff": bias["max_abs_diff"],
    }
    assert bias["max_abs_diff"] == pytest.approx(1.0, abs=1e-6)


def test_cli_text_and_errors(
    tmp_path: Path, base: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    a = _save(tmp_path / "a.safetensors", base)
    b = _save(tmp_path / "b.safetensors", {"unet.w": base["unet.w"], "bias\x1b[31m": base["bias"]})
    assert main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "- ids" in out and "+ bias\\x1b[31m" in out  # control characters shown escaped
    assert "1 equal, 0 changed, 0 dtype, 0 shape, 2 missing, 1 extra" in out
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(a.read_bytes()[:-7])
    assert main(["diff", str(a), str(broken)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert main(["diff", str(a), str(tmp_path / "none.safetensors")]) == 2


def test_torch_checkpoint_vs_safetensors(tmp_path: Path) -> None:
    """A Lightning-style .ckpt (shared storage, a transposed view) against its safetensors twin."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 6, generator=g)
    sd = {
        "model.w": w,
        "model.wt": w.t(),  # a non-contiguous view of the same storage
        "model.half": torch.randn(5, generator=g).half(),
        "model.ids": torch.arange(77).unsqueeze(0),
    }
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd, "global_step": 3}, ckpt)
    twin = {k: v.contiguous().numpy() for k, v in sd.items()}
    st = _save(tmp_path / "m.safetensors", twin)
    r = diff(ckpt, st)
    assert r.format_a == "torch-zip"
    assert r.identical, [t for t in r.tensors if t.status != "equal"]
    assert r.counts["equal"] == 4
    twin["model.wt"] = twin["model.wt"].copy()
    twin["model.wt"][0, 1] = 42.0
    st2 = _save(tmp_path / "m2.safetensors", twin)
    t = {x.name: x for x in diff(ckpt, st2).tensors}["model.wt"]
    assert (t.status, t.changed) == ("changed", 1)
    assert t.max_abs_diff == abs(42.0 - float(w.t()[0, 1]))


def test_equal_bytes_are_never_decoded(
    tmp_path: Path, base: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal pieces are settled by one memcmp: a file compared with its own copy in another
    container (a .ckpt and its safetensors) decodes nothing."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(diff_mod, "CHUNK_ELEMENTS", 100)
    a = tmp_path / "a.ckpt"
    torch.save({k: torch.from_numpy(v) for k, v in base.items()}, a)
    b = _save(tmp_path / "b.safetensors", base)
    decoded: list[int] = []
    real = diff_mod._values
    monkeypatch.setattr(diff_mod, "_values", lambda p, i: decoded.append(1) or real(p, i))
    r = diff(a, b)
    assert r.identical and r.counts["equal"] == 3
    assert decoded == []
    # one changed element: only its piece (of 31 in unet.w) is decoded, on both sides
    tuned = dict(base)
    w = base["unet.w"].copy()
    w.reshape(-1)[1234] += np.float32(1)
    tuned["unet.w"] = w
    r = diff(a, _save(tmp_path / "c.safetensors", tuned))
    assert len(decoded) == 2
    t = {x.name: x for x in r.tensors}["unet.w"]
    assert (t.status, t.changed, t.max_abs_diff) == ("changed", 1, 1.0)


def test_fast_stops_at_the_first_difference(
    tmp_path: Path, base: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diff_mod, "CHUNK_ELEMENTS", 100)  # unet.w: 31 pieces
    tuned = dict(base, **{"unet.w": base["unet.w"] + np.float32(0.5)})
    a = _save(tmp_path / "a.safetensors", base)
    b = _save(tmp_path / "b.safetensors", tuned)
    decoded: list[int] = []
    real = diff_mod._values
    monkeypatch.setattr(diff_mod, "_values", lambda p, i: decoded.append(1) or real(p, i))
    compared: list[int] = []
    same = diff_mod._same_bytes
    monkeypatch.setattr(diff_mod, "_same_bytes", lambda x, y: compared.append(x.size) or same(x, y))
    monkeypatch.setattr(diff_mod, "_workers", lambda: 1)
    fast = diff(a, b, fast=True)
    # one dtype: differing bytes are differing bits, nothing is decoded; the first piece of
    # unet.w (100 elements) differs and reading unet.w stops there
    assert decoded == []
    assert compared.count(100 * 4) == 1
    assert sum(compared) < base["unet.w"].nbytes
    slow = diff(a, b)
    assert fast.identical is slow.identical is False
    assert fast.counts == slow.counts
    by = {t.name: t for t in fast.tensors}
    assert (by["unet.w"].status, by["unet.w"].changed, by["unet.w"].max_abs_diff) == (
        "changed",
        None,
        None,
    )
    assert (by["bias"].status, by["bias"].changed, by["bias"].max_abs_diff) == ("equal", 0, 0)
    assert {t.name: t.changed for t in slow.tensors}["unet.w"] == 64 * 48
    doc = fast.to_json()
    assert doc["fast"] is True and doc["changed_elements"] is None


def test_fast_cli_summary(
    tmp_path: Path, base: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    tuned = dict(base, bias=base["bias"] + np.float32(1))
    a = _save(tmp_path / "a.safetensors", base)
    b = _save(tmp_path / "b.safetensors", tuned)
    assert main(["diff", "--fast", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "bias" in out and "not counted (--fast)" in out
    assert out.strip().splitlines()[-1] == (
        "2 equal, 1 changed, 0 dtype, 0 shape, 0 missing, 0 extra; different"
    )
    assert main(["diff", "--fast", str(a), str(a)]) == 0


def test_dtype_tolerant_matches_torch_casts_nan_payloads(tmp_path: Path) -> None:
    """B made by torch's .half() (NaN payloads, overflow, subnormals) is exactly A cast."""
    torch = pytest.importorskip("torch")
    bits = np.array(
        [0x7F800001, 0xFFC12345, 0x7FA00000, 0x477FF000, 0x33000001, 0x00000001, 0x3F800000],
        np.uint32,
    )
    a_vals = bits.view(np.float32)
    half = torch.from_numpy(a_vals.copy()).half().numpy()
    a = _save(tmp_path / "a.safetensors", {"x": a_vals})
    b = _save(tmp_path / "b.safetensors", {"x": half})
    r = diff(a, b, dtype_tolerant=True)
    t = r.tensors[0]
    assert (t.status, t.changed) == ("dtype", 0)
    assert r.identical


def test_a_read_error_in_a_worker_reaches_the_caller(
    tmp_path: Path, base: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that shrinks under the workers: the error is raised in the caller, every
    worker stops, and the CLI says so in one line with exit 2."""
    import threading

    from sdtool.errors import TruncatedFile

    monkeypatch.setattr(diff_mod, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(diff_mod, "TASK_PIECES", 1)
    a = _save(tmp_path / "a.safetensors", base)
    b = _save(tmp_path / "b.safetensors", base)
    calls: list[int] = []
    real = diff_mod._Side.window

    def flaky(self: diff_mod._Side, start: int, stop: int, bufs: list[Any], which: int) -> Any:
        calls.append(1)
        if len(calls) == 7:
            raise TruncatedFile("tensor 'unet.w' ends early; the file shrank", path=a)
        return real(self, start, stop, bufs, which)

    monkeypatch.setattr(diff_mod._Side, "window", flaky)
    before = threading.active_count()
    with pytest.raises(TruncatedFile, match="shrank"):
        diff(a, b)
    assert threading.active_count() == before
    calls.clear()
    assert main(["diff", str(a), str(b)]) == 2


def test_equal_bytes_need_no_numpy(
    tmp_path: Path, base: dict[str, np.ndarray], sub_env: dict[str, str]
) -> None:
    """Equal pieces are settled by memcmp alone: ``sdtool diff`` of a file and its copy never
    imports numpy (0.2 CPU-s at start-up, with its BLAS thread); a differing piece does."""
    import shutil
    import subprocess
    import sys

    probe = (
        "import sys\nfrom sdtool.cli.main import main\n"
        "code = main(['diff', '--quiet', *sys.argv[1:]])\n"
        "print(code, 'numpy' in sys.modules)"
    )
    a = _save(tmp_path / "a.safetensors", base)
    b = shutil.copy(a, tmp_path / "b.safetensors")
    c = _save(tmp_path / "c.safetensors", dict(base, bias=base["bias"] + np.float32(1)))

    def run(x: Path, y: Path) -> str:
        r = subprocess.run(
            [sys.executable, "-c", probe, str(x), str(y)],
            capture_output=True, text=True, env=sub_env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout.split()[-2:]

    assert run(a, b) == ["0", "False"]
    assert run(a, c) == ["1", "True"]
