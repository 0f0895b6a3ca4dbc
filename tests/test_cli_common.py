"""What every command shares: help, one-line errors and exit codes, --json on stdout only,
progress only on a terminal, the same option spellings, escaping, pipes and entry points."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdtool.cli.main import COMMANDS, LazyGroup, main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-sd15-ema.ckpt"


@pytest.fixture
def st(tmp_path: Path) -> Path:
    """A small SD-shaped safetensors file: one UNet, one VAE tensor, int64 position ids."""
    path = tmp_path / "m.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": np.full((2, 2), 1e6, np.float32),
            "first_stage_model.decoder.conv_out.bias": np.ones(3, np.float32),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(
                77, dtype=np.int64
            ).reshape(1, 77),
        },
        str(path),
        metadata={"title": "t"},
    )
    return path


def _argv(cmd: str, src: Path, tmp_path: Path) -> list[str]:
    """The smallest working invocation of each command on ``src``."""
    out = str(tmp_path / f"{cmd}-out.safetensors")
    return {
        "inspect": ["inspect", str(src)],
        "scan": ["scan", str(src)],
        "convert": ["convert", str(src), out],
        "prune": ["prune", str(src), out],
        "extract": ["extract", str(src), out, "-c", "vae"],
        "hash": ["hash", str(src)],
        "diff": ["diff", str(src), str(src)],
        "merge": ["merge", str(src), str(src), out],
        "lora": ["lora", "bake", str(src), str(src), out],
    }[cmd]


def test_every_command_is_covered_here() -> None:
    assert set(COMMANDS) == {
        "inspect", "scan", "convert", "prune", "extract", "hash", "diff", "merge", "lora"
    }  # fmt: skip


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_summary_options_and_example(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([name, "--help"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"\n  Examples?:\n    sdtool " + name + " ", text), text
    cmd = LazyGroup._load(name)
    assert cmd is not None and cmd.help
    summary = cmd.help.strip().splitlines()[0]
    assert summary.endswith(".") and len(summary) <= 100, summary
    for p in cmd.params:
        if isinstance(p, click.Option):
            assert p.help, f"{name} {p.opts} has no help"
        if isinstance(p, click.Option) and p.name == "as_json":
            assert p.opts == ["--json"] and f"docs/{'prune' if name == 'extract' else name}.md" in (
                p.help or ""
            )
    assert (REPO / "docs" / f"{'prune' if name == 'extract' else name}.md").is_file()


def test_shared_options_are_spelled_the_same() -> None:
    """One definition (sdtool/cli/options.py) behind each shared option: same flags, same help."""
    seen: dict[str, tuple[tuple[str, ...], str | None]] = {}
    for name in COMMANDS:
        cmd = LazyGroup._load(name)
        assert cmd is not None
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name in {
                "overwrite", "verify", "on_overflow", "dry_run", "jobs"
            }:  # fmt: skip
                sig = (tuple(sorted(p.opts)), p.help if p.name != "jobs" else "")
                assert seen.setdefault(p.name, sig) == sig, (name, p.name)
    assert set(seen) == {"overwrite", "verify", "on_overflow", "dry_run", "jobs"}


@pytest.mark.parametrize(
    "argv",
    [
        ["prune", "a.ckpt", "b.safetensors", "--ema-only", "--no-ema"],
        ["extract", "a.ckpt", "b.safetensors", "-c", "nothing"],
        ["scan"],
        ["diff", "a.ckpt"],
        ["inspect", "a.ckpt", "--bogus"],
        ["convert", "a.ckpt", "b.safetensors", "--dtype", "int8"],
        ["prune", "a.ckpt", "b.safetensors", "--dtype", "fp7"],
        ["scan", "a.ckpt", "--json", "--sarif"],
        ["no-such-command"],
        ["extract", "a.ckpt"],  # click lists the choices of a missing option one per line
        [],  # click prints the whole help for a group without its command
        ["lora"],
    ],
)
def test_usage_errors_are_one_line_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtool: "), cap.err
    assert "--help'" in lines[0]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_missing_input_is_one_line_exit_2(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.ckpt"
    assert main(_argv(name, missing, tmp_path)) == 2
    cap = capsys.readouterr()
    assert cap.err.splitlines()[0] == f"sdtool: {missing}: no such file" + (
        " or directory" if name == "scan" else ""
    )
    assert "Traceback" not in cap.err
    assert not list(tmp_path.iterdir()), "an output was left behind"


def test_scan_missing_path_still_scans_the_rest(
    st: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["scan", str(tmp_path / "nope.ckpt"), str(st), "--json"]) == 2
    cap = capsys.readouterr()
    assert cap.err == f"sdtool: {tmp_path / 'nope.ckpt'}: no such file or directory\n"
    summary = json.loads(cap.out)["summary"]
    assert summary["safe"] == 1 and summary["not_scanned"] == 1


@pytest.mark.parametrize("name", list(COMMANDS))
def test_json_is_one_document_on_stdout(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main([*_argv(name, EXAMPLE, tmp_path), "--json"])
    assert rc == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)  # fails on anything else printed to stdout
    assert isinstance(doc, dict) and doc["schema"].startswith("sdtool."), "every document is named"
    assert cap.err == ""


@pytest.mark.parametrize("name", ["convert", "prune"])
def test_json_warnings_go_to_stderr(
    name: str, st: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*_argv(name, st, tmp_path), "--dtype", "fp16", "--on-overflow", "warn", "--json"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    json.loads(cap.out)
    assert re.fullmatch(
        rf"sdtool: warning: {re.escape(str(st))}: 4 value\(s\) of "
        r"'model\.diffusion_model\.input_blocks\.0\.0\.weight' overflowed to inf in the cast.*\n",
        cap.err,
    ), cap.err


def test_overflow_refused_leaves_nothing(
    st: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("convert", "prune"):
        argv = [*_argv(name, st, tmp_path), "--dtype", "fp16"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "overflows to inf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_no_progress_bar_when_not_a_terminal(
    st: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("hash", "diff", "convert", "prune", "scan"):
        assert main(_argv(name, st, tmp_path)) == 0
        assert capsys.readouterr().err == "", name


def test_progress_bar_on_a_terminal_goes_to_stderr(
    st: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdtool.cli import progress

    monkeypatch.setattr(progress, "enabled", lambda: True)
    assert main(["hash", str(st), "--json", "-a", "sha256"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["files"][0]["size"] == st.stat().st_size
    assert "B/s" in cap.err or "B [" in cap.err, cap.err
    assert main(["prune", str(st), str(tmp_path / "p.safetensors")]) == 0
    cap = capsys.readouterr()
    assert "wrote" in cap.out and "writing p.safetensors" in cap.err


def test_prune_table_has_columns_and_units(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.safetensors"
    assert main(["prune", str(EXAMPLE), str(out), "--ema-only"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["component"])
    assert lines[header].split() == ["component", *("tensors", "params", "bytes") * 2]
    assert lines[header - 1].split() == ["before", "after"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1 : header + 7]}
    # a number and its unit are separate from the next column: 7 cells of "n", "n", "x KiB" ...
    assert rows["total"] == ["1,831", "35.37K", "138.48", "KiB", "1,143", "19.93K", "78.16", "KiB"]
    assert rows["ema"] == ["688", "15.44K", "60.32", "KiB", "-", "-", "-"]
    assert " t," not in text and " p," not in text
    words = " ".join(text.split())  # under COLUMNS the long "wrote" line wraps at spaces
    assert "wrote " in words and "1,143 tensors" in words


def test_dtype_spellings_are_shared(
    st: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """prune takes convert's names and the aliases sdtool knows; both cast the same way."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    argv = ["--dtype", "bfloat16", "--on-overflow", "warn"]
    assert main(["convert", str(st), str(a), *argv]) == 0
    assert main(["prune", str(st), str(b), "--dtype", "BF16"]) == 0
    capsys.readouterr()
    assert main(["diff", str(a), str(b)]) == 0
    ta = load_file(str(a))
    assert ta["model.diffusion_model.input_blocks.0.0.weight"].dtype.name == "bfloat16"
    assert ta["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == np.int64


def test_text_from_files_is_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A torch zip's folder name comes from the file: rich markup and escapes stay inert."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "[red]y\x1bz.ckpt"
    torch.save({"a": torch.ones(2)}, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "folder '[red]y\\x1bz'" in out and "\x1b" not in out


def test_closed_pipe_exits_141_quietly(sub_env: dict[str, str]) -> None:
    """`sdtool inspect --tensors | head -1`: no traceback, and not exit 1 ("findings")."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdtool", "inspect", "--tensors", str(EXAMPLE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=sub_env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert err == b""


def test_module_and_console_script_agree(tmp_path: Path, sub_env: dict[str, str]) -> None:
    """``python -m sdtool`` and the ``sdtool`` script (sdtool.cli.main:run) give the same."""
    script = "import sys; from sdtool.cli.main import run; sys.argv[0] = 'sdtool'; run()"
    for args in (["--version"], ["inspect", str(tmp_path / "nope")], ["prune", "x", "y", "-c"]):
        a = subprocess.run(
            [sys.executable, "-m", "sdtool", *args], capture_output=True, text=True, env=sub_env
        )
        b = subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, env=sub_env
        )
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args


def test_batch_failure_is_an_error_line_and_exit_1(
    st: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "in" / "broken.safetensors"
    broken.parent.mkdir()
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    out = tmp_path / "out"
    for extra in ([], ["--json"]):
        rc = main(["convert", str(st), str(broken), "--out-dir", str(out), "--overwrite", *extra])
        assert rc == 1
        cap = capsys.readouterr()
        assert cap.err.startswith(f"sdtool: {broken}: ") and cap.err.count("\n") == 1, cap.err
        if extra:
            assert json.loads(cap.out)["summary"]["failed"] == 1
        else:
            assert "1 converted, 0 skipped, 1 failed" in cap.out
    assert sorted(p.name for p in out.iterdir()) == ["m.safetensors"]


def test_inspect_scan_hash_never_import_torch(sub_env: dict[str, str]) -> None:
    """Through the CLI (shared options, progress, render) on a torch checkpoint."""
    code = (
        "import sys; from sdtool.cli.main import main\n"
        "for argv in (['inspect', sys.argv[1], '--json'], ['scan', sys.argv[1]],"
        " ['hash', '-a', 'crc32', sys.argv[1]], ['inspect', '--help']):\n"
        "    assert main(argv) == 0, argv\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(EXAMPLE)], capture_output=True, text=True, env=sub_env
    )
    assert r.returncode == 0, r.stderr
