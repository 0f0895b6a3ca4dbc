"""inspect --jsonl through the result cache (issue 17.2): an unchanged file's line comes from
the cache, the same bytes but ``"cached": true``; a changed file, another name or a changed
identification table is read again; hashes and verdicts stay cached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

import sdtool.ops.inspect_cache as ic
from sdtool import open_model
from sdtool.cache import Cache, Identity
from sdtool.cli.main import cli, main
from sdtool.identify import identify
from sdtool.scan import ruleset as ruleset_mod

Cap = pytest.CaptureFixture[str]


def _files(root: Path) -> list[Path]:
    """A few kinds: a LoRA-like and a plain safetensors, a torch zip, a hypernetwork."""
    root.mkdir(parents=True, exist_ok=True)
    a = root / "a.safetensors"
    save_file({"w": np.zeros((4, 4), np.float32)}, str(a), metadata={"k": "v"})
    b = root / "b.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x.weight": torch.zeros(2, 2)},
                "global_step": 7}, b)  # fmt: skip
    h = root / "hn.safetensors"
    save_file({f"{w}.0.linear.0.weight": np.zeros((w * 2, w), np.float32)
               for w in (320, 768)}, str(h))  # fmt: skip
    return [a, b, h]


def _run(cap: Cap, args: list[str]) -> tuple[int, list[str], str]:
    code = main(args)
    res = cap.readouterr()
    return code, res.out.splitlines(), res.err


def _recs(lines: list[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines]


def test_second_run_is_cached_with_the_same_lines(tmp_path: Path, capsys: Cap) -> None:
    files = _files(tmp_path / "m")
    args = ["inspect", "--jsonl", *map(str, files), str(tmp_path / "gone.ckpt")]
    code1, first, err1 = _run(capsys, args)
    code2, second, err2 = _run(capsys, args)
    assert code1 == code2 == 2 and err1 == err2  # the missing file: an error each time
    recs1, recs2 = _recs(first), _recs(second)
    assert [r.get("cached") for r in recs1] == [False, False, False, None]
    assert [r.get("cached") for r in recs2] == [True, True, True, None]
    for one, two in zip(first[:3], second[:3], strict=True):
        assert two == one.replace('"cached": false}', '"cached": true}')
    assert second[3] == first[3] and recs2[3]["error"]
    assert recs1[2]["identity"]["kind"] == "hypernetwork"  # type: ignore[index]
    assert recs1[0]["identify"] == ruleset_mod.identify_version()
    assert recs1[0]["ruleset"] == ruleset_mod.ruleset_version()


def test_a_changed_file_is_read_again(tmp_path: Path, capsys: Cap) -> None:
    a, b, _ = _files(tmp_path / "m")
    args = ["inspect", "--jsonl", str(a), str(b)]
    _run(capsys, args)
    save_file({"w": np.zeros((8, 8), np.float32)}, str(a))  # new size and mtime
    st = b.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    _, lines, _ = _run(capsys, args)
    recs = _recs(lines)
    assert [r["cached"] for r in recs] == [False, False]
    assert recs[0]["totals"] == {"tensors": 1, "parameters": 64, "bytes": 256}
    _, lines, _ = _run(capsys, args)
    assert [r["cached"] for r in _recs(lines)] == [True, True]


def test_another_name_for_the_same_inode_is_identified_again(tmp_path: Path, capsys: Cap) -> None:
    """Identification reads hints from the name, so a record is trusted under its name only."""
    a, *_ = _files(tmp_path / "m")
    link = tmp_path / "m" / "other-ema-only.safetensors"
    os.link(a, link)
    _run(capsys, ["inspect", "--jsonl", str(a)])
    _, lines, _ = _run(capsys, ["inspect", "--jsonl", str(link)])
    assert _recs(lines)[0]["cached"] is False


def test_a_changed_table_invalidates_identities_only(
    tmp_path: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [str(f) for f in _files(tmp_path / "m")]
    for cmd in (["inspect", "--jsonl"], ["hash", "--jsonl"], ["scan", "--jsonl"]):
        _run(capsys, [*cmd, *files])
    new = "0.1.0+another-table"
    monkeypatch.setattr(ruleset_mod, "identify_version", lambda: new)
    monkeypatch.setattr(ic, "identify_version", lambda: new)
    _, lines, _ = _run(capsys, ["inspect", "--jsonl", *files])
    assert [r["cached"] for r in _recs(lines)] == [False] * 3
    assert {r["identify"] for r in _recs(lines)} == {new}
    for cmd in (["hash", "--jsonl"], ["scan", "--jsonl"]):
        _, lines, _ = _run(capsys, [*cmd, *files])
        assert [r["cached"] for r in _recs(lines)] == [True] * 3, cmd


def test_the_stored_identity_is_lossless(tmp_path: Path, capsys: Cap) -> None:
    files = _files(tmp_path / "m")
    _run(capsys, ["inspect", "--jsonl", *map(str, files)])
    settings = ic.settings_of(None, False, None)
    with Cache(os.environ["SDTOOL_CACHE_DIR"]) as cache:
        for f in files:
            text = cache.get_text(
                ic.KIND, Identity.of_path(f).key, ruleset_mod.identify_version() + settings
            )
            assert text is not None
            with open_model(f) as m:
                fresh = identify(m)
            back = ic.identity_of(text)
            assert back == fresh and back is not None and back.owners() == fresh.owners()


def test_no_cache_and_contradicting_options(tmp_path: Path, capsys: Cap) -> None:
    a, *_ = _files(tmp_path / "m")
    for _ in range(2):
        _, lines, _ = _run(capsys, ["inspect", "--jsonl", "--no-cache", str(a)])
        assert _recs(lines)[0]["cached"] is False
    own = tmp_path / "own-cache"
    for cached in (False, True):
        _, lines, _ = _run(capsys, ["inspect", "--jsonl", "--cache", str(own), str(a)])
        assert _recs(lines)[0]["cached"] is cached
    res = CliRunner().invoke(cli, ["inspect", "--jsonl", "--cache", str(own), "--no-cache", "x"])
    assert res.exit_code == 2 and "contradict" in res.output


def test_several_processes_share_the_cache(tmp_path: Path, sub_env: dict[str, str]) -> None:
    src = tmp_path / "m"
    files = []
    for i in range(40):
        f = src / f"m{i:02}.safetensors"
        src.mkdir(exist_ok=True)
        save_file({"w": np.full((2, i + 1), i, np.float32)}, str(f))
        files.append(str(f))
    env = {**sub_env, "SDTOOL_CACHE_DIR": str(tmp_path / "shared-cache")}
    cmd = [sys.executable, "-m", "sdtool", "inspect", "--jsonl", *files]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    texts = {o.decode().replace('"cached": true}', '"cached": false}') for o, _ in outs}
    assert len(texts) == 1  # every process: the same lines, whoever read which file
    again = subprocess.run(cmd, capture_output=True, env=env, timeout=120, check=True)
    assert [json.loads(x)["cached"] for x in again.stdout.splitlines()] == [True] * 40
    assert again.stdout.decode().replace('"cached": true}', '"cached": false}') in texts
    shutil.rmtree(tmp_path / "shared-cache")


def test_identify_version_follows_the_tables_and_the_ruleset_does_not(tmp_path: Path) -> None:
    """A copy of the package with one signature table changed: another identify version, the
    same scan ruleset (so verdicts stay cached); a changed scan rule changes both."""
    import sdtool

    dst = tmp_path / "pkg" / "sdtool"
    shutil.copytree(Path(sdtool.__file__).parent, dst,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    code = "from sdtool.scan.ruleset import identify_version as i, ruleset_version as r\n"
    code += "print(i(), r())"

    def versions() -> list[str]:
        env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg")}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    ident1, rules1 = versions()
    table = dst / "data" / "signatures.json.gz"
    table.write_bytes(table.read_bytes() + b"\0")
    ident2, rules2 = versions()
    assert ident2 != ident1 and rules2 == rules1
    rule = dst / "identify" / "tables.py"
    rule.write_text(rule.read_text() + "\n# changed\n")
    ident3, rules3 = versions()
    assert ident3 != ident2 and rules3 == rules1
    allow = dst / "scan" / "allowlist.py"
    allow.write_text(allow.read_text() + "\n# changed\n")
    ident4, rules4 = versions()
    assert ident4 != ident3 and rules4 != rules1
