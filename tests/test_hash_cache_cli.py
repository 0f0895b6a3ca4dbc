"""``sdtool hash --jsonl`` and the cache: whole lines, cached reruns, --no-cache, identity."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from sdtool.cli.main import cli


def _jsonl(
    tmp_path: Path, env: dict[str, str], args: list[str]
) -> tuple[int, list[dict[str, object]]]:
    """Run sdtool in a process (JsonLines writes to descriptor 1) and parse every line."""
    out = tmp_path / "out.jsonl"
    with open(out, "wb") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "sdtool", *args], stdout=f, stderr=subprocess.PIPE, env=env
        )
    text = out.read_text()
    assert text == "" or text.endswith("\n")
    return proc.returncode, [json.loads(line) for line in text.splitlines()]


def test_hash_jsonl_then_cached_rerun(tmp_path: Path, sub_env: dict[str, str]) -> None:
    d = tmp_path / "models"
    d.mkdir()
    for i in range(3):
        (d / f"m{i}.bin").write_bytes(bytes([i]) * (1000 + i))
    code, first = _jsonl(tmp_path, sub_env, ["hash", "--jsonl", "-a", "sha256,crc32", str(d)])
    assert code == 0 and len(first) == 3
    for rec in first:
        data = Path(str(rec["path"])).read_bytes()
        assert rec["schema"] == "sdtool.hash.jsonl/1"
        assert rec["sha256"] == hashlib.sha256(data).hexdigest()
        assert rec["cached"] is False
    code, second = _jsonl(tmp_path, sub_env, ["hash", "--jsonl", "-a", "sha256,crc32", str(d)])
    assert [r["cached"] for r in second] == [True] * 3
    assert [r["hashes"] for r in second] == [r["hashes"] for r in first]
    code, third = _jsonl(
        tmp_path, sub_env, ["hash", "--jsonl", "--no-cache", "-a", "sha256", str(d)]
    )
    assert [r["cached"] for r in third] == [False] * 3


def test_changed_file_is_rehashed(tmp_path: Path, sub_env: dict[str, str]) -> None:
    f = tmp_path / "m.bin"
    f.write_bytes(b"a" * 100)
    _jsonl(tmp_path, sub_env, ["hash", "--jsonl", str(f)])
    st = os.stat(f)
    f.write_bytes(b"b" * 100)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    _, recs = _jsonl(tmp_path, sub_env, ["hash", "--jsonl", str(f)])
    assert recs[0]["cached"] is False
    assert recs[0]["sha256"] == hashlib.sha256(b"b" * 100).hexdigest()


def test_contradictory_cache_options_exit_2(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["hash", "--cache", str(tmp_path), "--no-cache", "x"])
    assert res.exit_code == 2
    res = CliRunner().invoke(cli, ["hash", "--json", "--jsonl", "x"])
    assert res.exit_code == 2


EVIL = b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R."  # GLOBAL builtins.eval, REDUCE


def test_scan_jsonl_then_cached_rerun(tmp_path: Path, sub_env: dict[str, str]) -> None:
    d = tmp_path / "dl"
    d.mkdir()
    (d / "evil.pkl").write_bytes(EVIL)
    (d / "plain.pkl").write_bytes(b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s.")
    args = ["scan", "--jsonl", "--sha256", str(d)]
    code, first = _jsonl(tmp_path, sub_env, args)
    assert code == 1
    assert [(Path(str(r["path"])).name, r["verdict"]) for r in first] == [
        ("evil.pkl", "dangerous"),
        ("plain.pkl", "safe"),
    ]
    assert first[0]["sha256"] == hashlib.sha256(EVIL).hexdigest()
    assert all(r["schema"] == "sdtool.scan.jsonl/1" and not r["cached"] for r in first)
    code2, second = _jsonl(tmp_path, sub_env, args)
    assert code2 == 1 and [r["cached"] for r in second] == [True, True]
    strip = ("cached",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in second] == [
        {k: v for k, v in r.items() if k not in strip} for r in first
    ]
    _, third = _jsonl(tmp_path, sub_env, [*args, "--crc", "all"])  # other options: rescan
    assert [r["cached"] for r in third] == [False, False]
