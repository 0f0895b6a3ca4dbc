"""JSON Lines on inspect / convert / prune batches, --resume, and whole lines after a kill."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from sdtool.cli.main import cli, main


def _model(p: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": rng.standard_normal((4, 4)).astype(np.float32)}, str(p))
    return p


def _tree(root: Path, n: int) -> Path:
    for i in range(n):
        _model(root / f"sub{i % 2}" / f"m{i}.safetensors", i)
    return root


Cap = pytest.CaptureFixture[str]


def _run(cap: Cap, args: list[str]) -> tuple[int, list[dict[str, object]], str]:
    """sdtool in this process (JsonLines writes to the captured stream); every line parsed."""
    code = main(args)
    res = cap.readouterr()
    assert res.out == "" or res.out.endswith("\n")
    return code, [json.loads(line) for line in res.out.splitlines()], res.err


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_convert_jsonl_and_resume(tmp_path: Path, capsys: Cap) -> None:
    src = _tree(tmp_path / "in", 4)
    out = tmp_path / "out"
    args = ["convert", str(src), "--out-dir", str(out), "--dtype", "fp16", "--resume", "--jsonl"]
    code, first, _ = _run(capsys, args)
    assert code == 0 and len(first) == 4
    for r in first:
        assert r["schema"] == "sdtool.convert.jsonl/1" and r["sdtool"]
        assert r["status"] == "converted"
        o = Path(str(r["output"]))
        assert r["output_sha256"] == _sha(o)
        assert r["size"] == Path(str(r["path"])).stat().st_size
        assert load_file(str(o))["w"].dtype == np.float16
    code, second, _ = _run(capsys, args)
    assert code == 0 and [r["status"] for r in second] == ["resumed"] * 4
    by_path = {r["path"]: r for r in first}
    for r in second:  # the record of the run that wrote it
        assert r["output_sha256"] == by_path[r["path"]]["output_sha256"]
        assert r["output_bytes"] == by_path[r["path"]]["output_bytes"]
    # an output changed since (same bytes rewritten: a new identity) is redone; so is a
    # changed input; the others are still resumed
    victim = Path(str(first[0]["output"]))
    victim.write_bytes(victim.read_bytes())
    changed_in = Path(str(first[1]["path"]))
    _model(changed_in, 99)
    code, third, _ = _run(capsys, args)
    status = {r["path"]: r["status"] for r in third}
    assert status[first[0]["path"]] == "converted"
    assert status[first[1]["path"]] == "converted"
    assert sorted(status.values()) == ["converted", "converted", "resumed", "resumed"]
    # other options: another output, so nothing is resumed
    code, fourth, _ = _run(capsys, [a for a in args if a not in ("--dtype", "fp16")])
    assert [r["status"] for r in fourth] == ["converted"] * 4


def test_existing_output_without_resume_is_skipped(tmp_path: Path, capsys: Cap) -> None:
    src = _tree(tmp_path / "in", 2)
    out = tmp_path / "out"
    _run(capsys, ["convert", str(src), "--out-dir", str(out), "--jsonl"])
    code, recs, _ = _run(capsys, ["convert", str(src), "--out-dir", str(out), "--jsonl"])
    assert code == 0 and [r["status"] for r in recs] == ["skipped"] * 2
    # not recorded by a --resume run: --resume cannot verify them, so it redoes them
    code, recs, _ = _run(
        capsys, ["convert", str(src), "--out-dir", str(out), "--jsonl", "--resume"]
    )
    assert [r["status"] for r in recs] == ["converted"] * 2


def test_convert_jsonl_failure_line_and_exit_1(tmp_path: Path, capsys: Cap) -> None:
    d = tmp_path / "in"
    _model(d / "good.safetensors")
    (d / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, recs, err = _run(capsys, ["convert", str(d), "--out-dir", str(tmp_path / "o"), "--jsonl"])
    assert code == 1
    status = {Path(str(r["path"])).name: r for r in recs}
    assert status["good.safetensors"]["status"] == "converted"
    assert status["bad.safetensors"]["status"] == "failed"
    assert status["bad.safetensors"]["error"]
    assert err.count("bad.safetensors") == 1


def test_prune_batch_jsonl_and_resume(tmp_path: Path, capsys: Cap) -> None:
    src = _tree(tmp_path / "in", 3)
    out = tmp_path / "pruned"
    args = ["prune", str(src), "--out-dir", str(out), "--dtype", "fp16", "--resume", "--jsonl"]
    code, first, _ = _run(capsys, args)
    assert code == 0 and [r["status"] for r in first] == ["pruned"] * 3
    for r in first:
        o = Path(str(r["output"]))
        assert r["schema"] == "sdtool.prune.jsonl/1"
        assert o.name.endswith("-pruned-fp16.safetensors") and o.parent.parent == out
        assert r["output_sha256"] == _sha(o)
        assert isinstance(r["report"], dict) and r["report"]["output"]["path"] == str(o)
    code, second, _ = _run(capsys, args)
    assert [r["status"] for r in second] == ["resumed"] * 3
    assert [r["output_sha256"] for r in second] == [r["output_sha256"] for r in first]


def test_batch_folders_leave_out_what_holds_nothing(tmp_path: Path, capsys: Cap) -> None:
    """prune's batch finds inputs as convert's does: a pickle of plain data is 'ignored: no
    tensors' (listed, exit 0); --jsonl keeps a record per input and says so once on stderr."""
    import pickle

    src = _tree(tmp_path / "in", 2)
    (src / "opt.pkl").write_bytes(pickle.dumps({"lr": 0.1}, protocol=2))
    (src / "notes.txt").write_text("trained for 10 epochs\n")
    out = tmp_path / "o"
    code, recs, err = _run(capsys, ["prune", str(src), "--out-dir", str(out), "--jsonl"])
    assert code == 0 and [r["status"] for r in recs] == ["pruned"] * 2
    assert "2 file(s) in the folders hold nothing to prune" in err
    assert main(["prune", str(src), "--out-dir", str(out), "--json", "--overwrite"]) == 0
    doc = json.loads(capsys.readouterr().out)
    why = {Path(i["path"]).name: i["reason"] for i in doc["ignored"]}
    assert why == {"opt.pkl": "no tensors", "notes.txt": "text"}
    assert doc["summary"]["ignored"] == 2 and doc["summary"]["pruned"] == 2
    assert main(["prune", str(src), "--out-dir", str(out), "--overwrite"]) == 0
    assert f"ignored   {src / 'opt.pkl'}: no tensors\n" in capsys.readouterr().out


def test_prune_batch_plain_and_usage(tmp_path: Path, capsys: Cap) -> None:
    src = _tree(tmp_path / "in", 2)
    res = CliRunner().invoke(cli, ["prune", str(src), "--out-dir", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert res.output.count("pruned ") == 2
    one = next(src.rglob("*.safetensors"))
    res = CliRunner().invoke(cli, ["prune", str(one), "--resume"])
    assert res.exit_code == 2 and "--out-dir" in res.output
    res = CliRunner().invoke(
        cli, ["prune", str(src), "--out-dir", str(tmp_path / "o"), "--resume", "--no-cache"]
    )
    assert res.exit_code == 2


def test_inspect_jsonl_many_files(tmp_path: Path, capsys: Cap) -> None:
    a = _model(tmp_path / "a.safetensors")
    b = _model(tmp_path / "b.safetensors", 1)
    code, recs, err = _run(
        capsys, ["inspect", "--jsonl", str(a), str(tmp_path / "missing"), str(b)]
    )
    assert code == 2
    assert [Path(str(r["path"])).name for r in recs] == [
        "a.safetensors",
        "missing",
        "b.safetensors",
    ]
    assert all(r["schema"] == "sdtool.inspect.jsonl/1" for r in recs)
    assert recs[0]["format"] == "safetensors" and recs[0]["size"] == a.stat().st_size
    assert str(recs[0]["ruleset"]).startswith(str(recs[0]["sdtool"]) + "+")
    assert recs[1]["error"] and "missing" in err
    assert recs[2]["totals"] == {"tensors": 1, "parameters": 16, "bytes": 64}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_batch_leaves_whole_lines(
    tmp_path: Path, sub_env: dict[str, str], sig: signal.Signals
) -> None:
    src = tmp_path / "in"
    for i in range(300):
        _model(src / f"m{i:03}.safetensors", i)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "sdtool", "convert", str(src), "--out-dir", str(tmp_path / "o")]
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [*cmd, "--jsonl", "--dtype", "fp16"], stdout=f, stderr=subprocess.DEVNULL, env=sub_env
        )
        deadline = time.monotonic() + 60
        while out.stat().st_size == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, sig)
        proc.wait(30)
    text = out.read_text()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    assert 1 <= len(lines) <= 300
    assert all(r["status"] == "converted" for r in lines)


def test_sharded_output_is_resumed_by_its_index(tmp_path: Path, capsys: Cap) -> None:
    d = tmp_path / "in"
    d.mkdir()
    big = {n: np.full((300, 300), i, np.float32) for i, n in enumerate("ab")}
    save_file(big, str(d / "m.safetensors"))
    args = ["convert", str(d), "--out-dir", str(tmp_path / "o"), "--resume", "--jsonl"]
    args += ["--max-shard-size", "0.4MB"]
    _, first, _ = _run(capsys, args)
    assert first[0]["status"] == "converted"
    index = Path(str(first[0]["output"]))
    assert index.name == "m.safetensors.index.json" and first[0]["output_sha256"] == _sha(index)
    _, second, _ = _run(capsys, args)
    assert second[0]["status"] == "resumed" and second[0]["output"] == str(index)
    index.write_bytes(index.read_bytes())  # the index rewritten: not verifiably ours
    _, third, _ = _run(capsys, args)
    assert third[0]["status"] == "converted"


@pytest.mark.parametrize(
    ("verb", "name"), [("convert", "m.safetensors"), ("prune", "m-pruned.safetensors")]
)
def test_two_inputs_for_one_output_the_second_fails(
    tmp_path: Path, capsys: Cap, verb: str, name: str
) -> None:
    """Two inputs whose outputs would share a name: the first in input order writes it, the
    second is a failure naming the first (never a silent overwrite); the rest of the batch goes
    on, and a --resume rerun answers the first from its record."""
    torch = pytest.importorskip("torch")
    first = _model(tmp_path / "in" / "m.safetensors")
    second = tmp_path / "in" / "m.ckpt"
    torch.save({"w": torch.ones(4, 4)}, second)
    out = tmp_path / "out"
    args = [verb, str(first), str(second), "--out-dir", str(out), "--resume", "--jsonl"]
    args += ["--cache", str(tmp_path / "cache")]
    code, lines, _ = _run(capsys, args)
    assert code == 1
    by = {Path(str(r["path"])).name: r for r in lines}
    assert by["m.safetensors"]["status"] in ("converted", "pruned")
    assert by["m.ckpt"]["status"] == "failed"
    assert f"{first} already {verb}s to {out / name}" in str(by["m.ckpt"]["error"])
    np.testing.assert_array_equal(load_file(str(out / name))["w"], load_file(str(first))["w"])
    code, lines, _ = _run(capsys, args)
    by = {Path(str(r["path"])).name: r for r in lines}
    assert (by["m.safetensors"]["status"], by["m.ckpt"]["status"]) == ("resumed", "failed")
