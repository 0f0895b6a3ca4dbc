"""``sdtool convert`` through main(): exit codes, one-line errors, batch summary, --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtool.cli.main import main

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402


def _ckpt(p: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.randn(4, 4, generator=g)}, "global_step": seed}, p)
    return p


def test_single_ok_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _ckpt(tmp_path / "m.ckpt")
    assert main(["convert", str(src), str(tmp_path / "m.safetensors"), "--dtype", "fp16"]) == 0
    assert "1 tensors" in capsys.readouterr().out
    out = tmp_path / "j.safetensors"
    assert main(["convert", str(src), str(out), "--json", "--verify", "--metadata", "a=b"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["schema"] == "sdtool.convert/3" and full["summary"]["converted"] == 1
    doc = full["results"][0]  # a single conversion is a batch of one
    assert doc["status"] == "converted" and doc["verified"] is True
    assert doc["metadata_keys"] == ["a", "format", "global_step"]
    assert load_file(out)["w"].dtype == torch.float32


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{src}", "{src}", "--overwrite"], "is also the input"),
        (["{src}", "{dir}/o.onnx"], "extension"),
        (["{dir}/missing.ckpt", "{dir}/o.safetensors"], "no such file"),
        (["{src}", "{dir}/a.safetensors", "{dir}/b.safetensors"], "give IN [OUT]"),
        (["{src}", "{dir}/o.safetensors", "--to", "ckpt"], "--to applies to batch mode"),
        (["{src}", "--jobs", "2"], "--jobs applies to batch mode: add --out-dir DIR"),
        (["{src}", "{dir}/o.safetensors", "--metadata", "nokey"], "KEY=VALUE"),
    ],
)
def test_single_errors_exit_2_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    src = _ckpt(tmp_path / "m.ckpt")
    argv = [a.format(src=src, dir=tmp_path) for a in args]
    assert main(["convert", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdtool: ") and message in err[0]


def test_existing_output_needs_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _ckpt(tmp_path / "m.ckpt")
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert main(["convert", str(src), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["convert", str(src), str(out), "--overwrite"]) == 0
    assert "w" in load_file(out)


def test_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dl = tmp_path / "downloads"
    _ckpt(dl / "a.ckpt", 1)
    _ckpt(dl / "sub" / "b.pt", 2)
    (dl / "sub" / "broken.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    (dl / "readme.txt").write_text("ignored")
    out = tmp_path / "out"
    rc = main(["convert", str(dl), "--out-dir", str(out), "--jobs", "2", "--dtype", "bf16"])
    text = capsys.readouterr().out
    assert rc == 1  # the broken file failed, the rest converted
    assert (out / "a.safetensors").is_file() and (out / "sub" / "b.safetensors").is_file()
    assert not (out / "sub" / "broken.safetensors").exists()
    assert "2 converted, 0 skipped, 1 failed" in text
    assert load_file(out / "sub" / "b.safetensors")["w"].dtype == torch.bfloat16
    (dl / "sub" / "broken.ckpt").unlink()
    assert main(["convert", str(dl), "--out-dir", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["skipped"] == 2 and doc["summary"]["converted"] == 0
    assert {r["status"] for r in doc["results"]} == {"skipped"}


def test_batch_picks_inputs_by_content(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder's files are inputs by content, as scan decides: a model under any name is
    converted; a pickle only if it holds tensors; images / JSON / text under model names are
    left out with the reason; unreadable bytes under a model name fail."""
    import pickle

    dl = tmp_path / "downloads"
    _ckpt(dl / "model.weights", 1)  # a torch zip whatever its name
    _ckpt(dl / "noext", 2)
    old = {"w": torch.ones(2, 2)}
    torch.save(old, dl / "legacy.pkl", _use_new_zipfile_serialization=False)  # tensors: input
    dl.joinpath("data.pkl").write_bytes(pickle.dumps({"lr": 0.1, "steps": [1, 2]}, protocol=2))
    dl.joinpath("cut.pkl").write_bytes(b"\x80\x02cbuiltins")  # a pickle cut short: left out
    dl.joinpath("cut.ckpt").write_bytes(b"\x80\x02cbuiltins")  # ... but under a model name
    dl.joinpath("preview.ckpt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    dl.joinpath("config.safetensors").write_text('{"a": 1}')
    dl.joinpath("notes.pt").write_text("trained for 10 epochs\n")
    dl.joinpath("blob.msgpack").write_bytes(bytes(range(200)))  # unknown bytes, no model name
    out = tmp_path / "out"
    assert main(["convert", str(dl), "--out-dir", str(out), "--json"]) == 1  # cut.ckpt failed
    doc = json.loads(capsys.readouterr().out)
    status = {Path(r["path"]).name: r["status"] for r in doc["results"]}
    assert status == {
        "cut.ckpt": "failed",
        "legacy.pkl": "converted",
        "model.weights": "converted",
        "noext": "converted",
    }
    why = {Path(i["path"]).name: i["reason"] for i in doc["ignored"]}
    assert why.pop("blob.msgpack").startswith("its first bytes are")
    assert why.pop("cut.pkl").startswith("a pickle sdtool cannot read (")
    assert why == {
        "config.safetensors": "JSON text",
        "data.pkl": "no tensors",
        "notes.pt": "text",
        "preview.ckpt": "PNG image",
    }
    assert doc["summary"]["ignored"] == 6 and doc["summary"]["failed"] == 1
    assert (out / "model.safetensors").is_file() and (out / "legacy.safetensors").is_file()
    (dl / "cut.ckpt").unlink()
    assert main(["convert", str(dl), "--out-dir", str(out), "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert f"ignored   {dl / 'data.pkl'}: no tensors\n" in text
    assert "3 converted, 0 skipped, 0 failed, 6 ignored" in text
    assert main(["convert", str(dl), "--out-dir", str(out), "--jsonl", "--overwrite"]) == 0
    res = capsys.readouterr()
    recs = [json.loads(line) for line in res.out.splitlines()]
    assert sorted(r["status"] for r in recs) == ["converted"] * 3  # a record per input
    assert "6 file(s) in the folders hold nothing to convert" in res.err


def test_batch_named_plain_pickle_is_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pickle of plain data given by name in batch mode: 'ignored: no tensors', exit 0."""
    import pickle

    opt = tmp_path / "opt.pkl"
    opt.write_bytes(pickle.dumps({"lr": 0.1}, protocol=2))
    src = _ckpt(tmp_path / "m.ckpt")
    assert main(["convert", str(opt), str(src), "--out-dir", str(tmp_path / "o"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ignored"] == [{"path": str(opt), "reason": "no tensors"}]
    assert [Path(r["path"]).name for r in doc["results"]] == ["m.ckpt"]


def test_batch_to_ckpt_and_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _ckpt(tmp_path / "in" / "m.safetensors.src.ckpt")
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out-dir", str(out), "--to", "ckpt"]) == 0
    target = out / "m.safetensors.src.ckpt"
    # global_step goes back as a top-level entry (was dropped: issue 10 item 3)
    assert set(torch.load(target, weights_only=True)) == {"w", "global_step"}
    assert main(["convert", str(src), "--out-dir", str(out), "--to", "ckpt", "--overwrite"]) == 0
    assert "1 converted" in capsys.readouterr().out


def test_help_has_example() -> None:
    from click.testing import CliRunner

    from sdtool.cli.main import cli

    res = CliRunner().invoke(cli, ["convert", "--help"])
    assert res.exit_code == 0 and "Examples:" in res.output and "--out-dir" in res.output
