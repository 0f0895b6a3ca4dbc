"""Issue 10, items 2, 5 and 6: honest reports, output that fits the terminal, the conveniences
people expect (OUT optional, several files, --quiet, sha256sum, --version, --debug anywhere)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdtool.cli.main import COMMANDS, main
from tests.scan_payloads import call_global

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-sd15-ema.ckpt"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """The bundled tiny SD 1.5 training checkpoint (with EMA), copied into tmp_path."""
    p = tmp_path / "model.ckpt"
    p.write_bytes(EXAMPLE.read_bytes())
    return p


# --- 2. honest reports -------------------------------------------------------------------------


def test_dtype_tolerant_counts_value_changes_apart(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An fp16 EMA-only prune against its source: the 686 UNet tensors took the EMA values,
    so they are "changed", not "0 changed" hidden among dtype-only changes."""
    assert main(["prune", str(ckpt), "--ema-only", "--dtype", "fp16", "-q"]) == 0
    pruned = tmp_path / "model-pruned-emaonly-fp16.safetensors"
    capsys.readouterr()
    assert main(["diff", "--dtype-tolerant", "--summary", str(ckpt), str(pruned)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("1 equal, 686 changed, 456 dtype, 0 shape, 688 missing, 0 extra;"), out
    assert out.count("\n") == 1 and out.rstrip().endswith("different")
    main(["diff", "--dtype-tolerant", "--json", str(ckpt), str(pruned)])
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert counts["changed"] == 686 and counts["dtype"] == 456
    # converting to fp16 alone changes nothing but the dtype: identical under --dtype-tolerant
    assert main(["convert", str(ckpt), "--dtype", "fp16", "-q"]) == 0
    half = tmp_path / "model-fp16.safetensors"
    assert main(["diff", "--dtype-tolerant", "--summary", str(ckpt), str(half)]) == 0
    assert capsys.readouterr().out.startswith("2 equal, 0 changed, 1,829 dtype,")
    assert main(["diff", "--quiet", str(ckpt), str(half)]) == 1
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["prune", "{ckpt}", "--drop", "unet", "--ema-only"],
            "options contradict each other: --ema-only puts the EMA weights under the UNet keys, "
            'and --drop "unet" removes them',
        ),
        (
            ["prune", "{ckpt}", "--drop", "ema", "--ema-only"],
            "options contradict each other: --ema-only takes its weights from the EMA copy, and "
            '--drop "ema" removes it',
        ),
        (
            ["prune", "{ckpt}", "--allow-partial-ema"],
            "options contradict each other: --allow-partial-ema applies only with --ema-only",
        ),
        (["convert", "{ckpt}", "--to", "ckpt"], "--to applies to batch mode: add --out-dir DIR"),
        (
            ["convert", "{ckpt}", "x.safetensors", "--to", "ckpt", "--jobs", "2"],
            "--to/--jobs apply to batch mode: add --out-dir DIR",
        ),
        (
            ["inspect", "{ckpt}", "--key", "global_step"],
            "{ckpt}: --key 'global_step' names an int, not a dict of tensors (it is 470000)",
        ),
        (["diff", "{ckpt}", "{ckpt}", "--json", "--summary"], "--summary is for the text"),
    ],
)
def test_contradictory_options_are_refused(
    argv: list[str], message: str, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in ckpt.parent.iterdir())
    assert main([a.format(ckpt=ckpt) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(ckpt=ckpt) in err, err
    assert sorted(p.name for p in ckpt.parent.iterdir()) == before  # nothing written


@pytest.mark.parametrize("pattern", ["first_stage_model.decoder.conv_out.*", "nothing.*"])
def test_inspect_filter_is_the_same_in_text_and_json(
    pattern: str, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(ckpt), "--filter", pattern, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["filter"] == pattern
    assert main(["inspect", str(ckpt), "--filter", pattern]) == 0
    text = capsys.readouterr().out
    names = [t["name"] for t in doc["tensors"]]
    if names:
        assert sorted(names) == [
            "first_stage_model.decoder.conv_out.bias",
            "first_stage_model.decoder.conv_out.weight",
        ]
        assert f"Tensors matching '{pattern}' (2 of 1,831)" in text
        assert all(n in text for n in names)
    else:
        assert f"no tensor name matches '{pattern}' (of 1,831)" in text


# --- 5. output that fits the terminal ----------------------------------------------------------


LONG_GLOBAL = ("averyveryverylongpackagename.submodule_with_a_long_name", "DangerousCallable" * 3)


@pytest.fixture
def long_finding(tmp_path: Path) -> Path:
    p = tmp_path / "payload.pkl"
    p.write_bytes(call_global(*LONG_GLOBAL, proto=2))
    return p


def _run(argv: list[str], env: dict[str, str]) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "sdtool", *argv], capture_output=True, text=True, env=env
    )
    return r.stdout


def test_piped_output_is_never_cut(long_finding: Path, sub_env: dict[str, str]) -> None:
    env = {k: v for k, v in sub_env.items() if k != "COLUMNS"}
    out = _run(["scan", str(long_finding)], env)
    name = ".".join(LONG_GLOBAL)
    assert "…" not in out
    line = next(ln for ln in out.splitlines() if "called via" in ln)
    assert len(line) > 120 and name in out  # one unwrapped line: grep finds the whole finding
    assert not any(ln.endswith(" ") for ln in out.splitlines())


@pytest.mark.parametrize("columns", [80, 100])
def test_columns_is_respected_and_identifiers_stay_whole(
    columns: int, long_finding: Path, sub_env: dict[str, str]
) -> None:
    env = dict(sub_env, COLUMNS=str(columns))
    out = _run(["scan", str(long_finding)], env)
    name = ".".join(LONG_GLOBAL)
    assert "…" not in out and out.count(name) >= 1
    for line in out.splitlines():
        assert len(line) <= columns or name in line or str(long_finding) in line, line
    words = re.findall(r"\S+", out)
    assert any(name in w for w in words)  # never broken across lines
    out = _run(["inspect", str(EXAMPLE)], env)
    assert "…" not in out
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in out
    # the summary and "What it is" lines wrap at spaces (tables keep their rows whole)
    for line in out.split("\n\nBy dtype")[0].splitlines():
        assert len(line) <= columns or len(line.split()) == 1, line
    assert "e.g. model.diffusion_model.input_blocks.0.0.bias [1]" in " ".join(out.split())
    out = _run(["prune", str(EXAMPLE), "--ema-only", "--dtype", "fp16", "--dry-run"], env)
    words = " ".join(out.split())  # the dry-run line wraps at spaces where its path ends
    assert "dropped 686 tensors" in words and "nothing written" in words
    for line in out.splitlines():  # what was dropped and why wraps too
        assert len(line) <= columns or len(line.split()) == 1, line


# --- 6. conveniences ---------------------------------------------------------------------------


def test_out_is_optional_and_derived(ckpt: Path, tmp_path: Path) -> None:
    assert main(["convert", str(ckpt), "-q"]) == 0
    assert main(["convert", str(ckpt), "--dtype", "fp16", "-q"]) == 0
    assert main(["prune", str(ckpt), "--ema-only", "--dtype", "fp16", "-q"]) == 0
    assert main(["extract", str(ckpt), "-c", "vae", "-q"]) == 0
    folder = tmp_path / "out"
    folder.mkdir()
    assert main(["convert", str(ckpt), str(folder), "-q"]) == 0
    assert main(["prune", str(ckpt), str(folder), "--no-ema", "-q"]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*.safetensors")) == [
        "model-fp16.safetensors",
        "model-pruned-emaonly-fp16.safetensors",
        "model-pruned-noema.safetensors",
        "model-vae.safetensors",
        "model.safetensors",
        "model.safetensors",
    ]
    assert (folder / "model.safetensors").is_file()


def test_derived_name_that_is_the_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    st = tmp_path / "m.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(st))
    assert main(["convert", str(st)]) == 2
    assert "which is the input itself; give OUT" in capsys.readouterr().err


def test_out_naming_a_missing_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``convert m.safetensors nodir/``: the slash says a folder was meant; no file "nodir"."""
    st = tmp_path / "m.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(st))
    for cmd in (["convert"], ["prune", "--no-ema"]):
        assert main([*cmd, str(st), f"{tmp_path / 'nodir'}/"]) == 2
        err = capsys.readouterr().err
        assert err == f"sdtool: {tmp_path / 'nodir'}: no such output folder (create it first)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_inspect_takes_several_files(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(ckpt), str(EXAMPLE), "--json"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert [d["totals"]["tensors"] for d in docs] == [1831, 1831]
    assert main(["inspect", str(ckpt), str(ckpt.parent / "nope"), str(ckpt)]) == 2
    cap = capsys.readouterr()
    assert cap.out.count("tensors       1,831") == 2
    assert cap.err == f"sdtool: {ckpt.parent / 'nope'}: no such file\n"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_quiet_everywhere(name: str, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = {
        "inspect": ["inspect", str(ckpt)],
        "scan": ["scan", str(ckpt)],
        "convert": ["convert", str(ckpt)],
        "prune": ["prune", str(ckpt)],
        "extract": ["extract", str(ckpt), "-c", "vae"],
        "hash": ["hash", str(ckpt)],
        "diff": ["diff", str(ckpt), str(ckpt)],
        "merge": ["merge", str(ckpt), str(ckpt), str(ckpt.parent / "merged.safetensors")],
    }.get(name)
    if name == "lora":  # a LoRA of the fp16 rounding: extract needs a non-zero difference
        half = ckpt.parent / "half.safetensors"
        assert main(["convert", str(ckpt), str(half), "--dtype", "fp16", "--quiet"]) == 0
        out = str(ckpt.parent / "lora.safetensors")
        argv = ["lora", "extract", str(half), str(ckpt), out, "--rank", "4"]
    assert argv is not None, f"{name}: a new command needs its --quiet case here"
    assert main([*argv, "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    assert cap.out == ("" if name != "scan" else "\n1 file: 1 safe -> exit 0\n")


def test_hash_sha256sum_and_check(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("hello\n")
    assert main(["hash", "--format", "sha256sum", "."]) == 0
    sums = capsys.readouterr().out
    assert sums.splitlines()[-1] == (
        "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03  sub/notes.txt"
    )
    (tmp_path / "SUMS").write_text(sums)
    r = subprocess.run(["sha256sum", "-c", "SUMS"], capture_output=True, text=True)
    assert r.returncode == 0 and "sub/notes.txt: OK" in r.stdout  # coreutils accepts it
    assert main(["hash", "--check", "SUMS"]) == 0
    assert capsys.readouterr().out == "model.ckpt: OK\nsub/notes.txt: OK\n"
    (tmp_path / "sub" / "notes.txt").write_text("changed\n")
    assert main(["hash", "--check", "SUMS", "--quiet"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "sub/notes.txt: FAILED\n"
    assert cap.err == "sdtool: warning: 1 computed checksum(s) did NOT match\n"


def test_hash_check_reads_bsd_tag_lines(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sha256sum --tag`` (and ``shasum -a 256 --tag``) lines, names escaped or not."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "back\\slash.bin").write_bytes(b"x")
    r = subprocess.run(
        ["sha256sum", "--tag", "model.ckpt", "back\\slash.bin"], capture_output=True, text=True
    )
    assert r.stdout.startswith("SHA256 (model.ckpt) = ") and r.stdout.count("\n") == 2
    (tmp_path / "SUMS").write_text(r.stdout)
    assert main(["hash", "--check", "SUMS"]) == 0
    assert capsys.readouterr().out == "model.ckpt: OK\nback\\slash.bin: OK\n"


def test_hash_folders_recursively(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.bin").write_bytes(b"x")
    (tmp_path / "a" / "y.bin").write_bytes(b"y")
    assert main(["hash", "--json", "-a", "crc32", str(tmp_path / "a")]) == 0
    files = [Path(f["path"]).name for f in json.loads(capsys.readouterr().out)["files"]]
    assert files == ["x.bin", "y.bin"]


def test_version_names_the_stack_without_importing_torch(sub_env: dict[str, str]) -> None:
    from importlib import metadata

    code = (
        "import sys; from sdtool.cli.main import main; rc = main(['--version']);"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules; sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=sub_env)
    assert r.returncode == 0, r.stderr
    for dist in ("numpy", "safetensors", "torch"):
        assert f"{dist} {metadata.version(dist)}" in r.stdout
    assert r.stdout.startswith("sdtool ")


def test_debug_after_the_subcommand(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    from sdtool.errors import SdtoolError

    assert main(["inspect", str(bad)]) == 2
    with pytest.raises(SdtoolError):
        main(["inspect", str(bad), "--debug"])
    with pytest.raises(SdtoolError):
        main(["--debug", "inspect", str(bad)])
