"""Batched cache lookups (issue 17's 50x rerun): one query per few hundred files, the same
answers as one lookup per file, and the same output as a cold run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdtool import cache as cache_mod
from sdtool.cache import Cache, Identity
from sdtool.cli.main import main
from sdtool.ops.hash import walk_files
from sdtool.scan import cached as cached_mod
from sdtool.scan import iter_files, scan_paths

Cap = pytest.CaptureFixture[str]
EVIL = b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R."  # GLOBAL builtins.eval, REDUCE
PLAIN = b"\x80\x02}q\x00X\x01\x00\x00\x00aK%cs."  # {"a": i}


def _tree(root: Path, n: int = 12) -> list[Path]:
    """Pickles (some evil), safetensors and .npy files in nested folders."""
    out = []
    for i in range(n):
        d = root / f"d{i % 3}" / ("deep" if i % 4 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        if i % 3 == 0:
            p = d / f"m{i}.safetensors"
            save_file({"w": np.full((2, 2), i, np.float32)}, str(p))
        elif i % 3 == 1:
            p = d / f"m{i}.pkl"
            p.write_bytes(EVIL if i % 5 == 1 else PLAIN % (i % 250))
        else:
            p = d / f"m{i}.npy"
            np.save(p, np.arange(i))
        out.append(p)
    return out


def _rewrite_same_size(p: Path, data: bytes) -> None:
    """New content of the same size with the old mtime: only ctime (and content) differ."""
    st = os.stat(p)
    assert len(data) == st.st_size
    p.write_bytes(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _run(cap: Cap, args: list[str]) -> tuple[int, list[str], str]:
    code = main(args)
    res = cap.readouterr()
    return code, res.out.splitlines(), res.err


def _uncached(lines: list[str]) -> list[str]:
    return [re.sub(r', "cached": (true|false)\}$', "}", line) for line in lines]


def test_lookup_many_matches_one_by_one_across_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_mod, "LOOKUP_CHUNK", 3)  # several queries, a partial last one
    files = _tree(tmp_path / "t", 10)
    ids = [Identity.of_path(p) for p in files]
    with Cache(tmp_path / "c") as c:
        for i, (p, ident) in enumerate(zip(files, ids, strict=True)):
            sha = hashlib.sha256(p.read_bytes()).hexdigest()
            if i % 2 == 0:
                c.put_sha256(ident, sha)
            if i % 3 == 0:
                c.put_text("scan", ident.key, "v1", f'{{"by": "identity {i}"}}')
            if i % 4 == 0:
                c.put_text("scan", sha, "v1", f'{{"by": "content {i}"}}')
            c.put_text("scan", ident.key, "v2", "{}")  # another version: never answers v1
        got = c.lookup_many("scan", "v1", ids)
        assert len(got) == len(ids)
        for i, ident in enumerate(ids):
            sha = c.sha256(ident)
            one = c.get_text("scan", ident.key, "v1") or (sha and c.get_text("scan", sha, "v1"))
            assert got[i] == (sha, one or None), i
        # identity first: a file with both answers gets its own (identity) verdict
        assert got[0][1] == '{"by": "identity 0"}'
        assert got[4][1] == '{"by": "content 4"}'
        assert c.lookup_many("scan", "v3", ids) == [(c.sha256(d), None) for d in ids]


def test_changed_identity_is_never_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "LOOKUP_CHUNK", 4)
    files = _tree(tmp_path / "t")
    cache = Cache(tmp_path / "c")
    first = scan_paths([tmp_path / "t"], cache=cache, isolate=False)
    assert not any(r.cached for r in first.files)
    plain = next(p for p in files if p.suffix == ".pkl" and p.read_bytes() != EVIL)
    _rewrite_same_size(plain, _evil_like(plain))
    again = scan_paths([tmp_path / "t"], cache=cache, isolate=False)
    by_path = {r.path: r for r in again.files}
    assert by_path[str(plain)].cached is False
    assert by_path[str(plain)].verdict == "dangerous"  # the new content, scanned
    assert all(r.cached for p, r in by_path.items() if p != str(plain))
    assert [r.path for r in again.files] == [r.path for r in first.files]


def _evil_like(p: Path) -> bytes:
    """A dangerous pickle of PLAIN's size: GLOBAL os.system, MARK, TUPLE, REDUCE."""
    evil = b"cos\nsystem\n(tR."
    assert p.stat().st_size == len(evil)
    return evil


def test_new_ruleset_invalidates_verdicts_in_a_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(tmp_path / "t")
    cache = Cache(tmp_path / "c")
    first = scan_paths([tmp_path / "t"], cache=cache, sha256=True, isolate=False)
    monkeypatch.setattr(cached_mod, "ruleset_version", lambda: "0.1.0+another-ruleset")
    monkeypatch.setattr(cached_mod, "file_sha256", lambda p: pytest.fail("re-hashed"))
    new = scan_paths([tmp_path / "t"], cache=cache, sha256=True, isolate=False)
    assert not any(r.cached for r in new.files)
    assert [(r.sha256, r.verdict) for r in new.files] == [
        (r.sha256, r.verdict) for r in first.files
    ]


def test_mixed_cached_and_fresh_run_prints_what_a_cold_run_prints(
    tmp_path: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_mod, "LOOKUP_CHUNK", 5)
    files = _tree(tmp_path / "t", 16)
    warm, cold = str(tmp_path / "warm"), str(tmp_path / "cold")
    missing = str(tmp_path / "nope.ckpt")
    base = ["scan", "--jsonl", "--sha256", str(tmp_path / "t"), missing]
    _run(capsys, [*base, "--cache", warm])
    # change some files, add some: the rerun mixes cached and fresh verdicts
    target = next(p for p in files if p.suffix == ".pkl" and p.read_bytes() != EVIL)
    _rewrite_same_size(target, _evil_like(target))
    (tmp_path / "t" / "d1" / "new.pkl").write_bytes(PLAIN % 201)
    (tmp_path / "t" / "d0" / "a-new.bin").write_bytes(PLAIN % 202)
    (tmp_path / "t" / "d0" / "copy.pkl").write_bytes(EVIL)  # known content: shares a verdict
    code, mixed, err = _run(capsys, [*base, "--cache", warm])
    code_cold, fresh, err_cold = _run(capsys, [*base, "--cache", cold])
    assert code == code_cold == 1
    assert err == err_cold and "nope.ckpt" in err
    flags = {json.loads(line)["path"]: json.loads(line)["cached"] for line in mixed}
    assert flags.pop(str(tmp_path / "t" / "d0" / "copy.pkl")) is True
    assert sorted(p for p, hit in flags.items() if not hit) == sorted(
        [str(target), str(tmp_path / "t" / "d1" / "new.pkl"), missing,
         str(tmp_path / "t" / "d0" / "a-new.bin")]
    )  # fmt: skip
    assert _uncached(mixed) == _uncached(fresh)  # byte for byte, but the flag
    assert not any(json.loads(line)["cached"] for line in fresh)

    # the table: the same text whether the verdicts came from the cache or not
    _, table_warm, _ = _run(capsys, ["scan", str(tmp_path / "t"), "--cache", warm])
    _, table_cold, _ = _run(capsys, ["scan", str(tmp_path / "t"), "--no-cache"])
    assert table_warm == table_cold and "dangerous" in "\n".join(table_cold).lower()

    # hash: mixed cached and fresh lines equal a cold run's, and the table too
    for args in (["--jsonl"], ["--jsonl", "-a", "sha256,crc32"], [], ["--format", "sha256sum"]):
        h = ["hash", *args, str(tmp_path / "t")]
        _run(capsys, [*h, "--cache", warm])
        (tmp_path / "t" / "d2" / f"h{len(args)}.bin").write_bytes(b"x" * len(args))
        _, hm, _ = _run(capsys, [*h, "--cache", warm])
        _, hc, _ = _run(capsys, [*h, "--no-cache"])
        assert _uncached(hm) == _uncached(hc), args
        if args and args[0] == "--jsonl":
            assert {json.loads(line)["cached"] for line in hm} == {True, False}


def test_walks_keep_their_order(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _tree(root, 12)
    (root / "d0" / "x.safetensors.index.json").write_text("{}")  # an index: listed too
    (root / "d0" / "z").mkdir()
    (root / "d0" / "z" / "a").write_bytes(b"1")
    os.symlink(root / "d1", root / "link")  # a symlinked folder: not followed
    os.symlink(root / "d1" / "m1.pkl", root / "d0" / "ln.pkl")  # a symlinked file: kept

    def reference(top: Path) -> list[str]:  # what scan walked before: os.walk, sorted
        out = []
        for r, dirs, names in os.walk(top):
            dirs.sort()
            out += [str(Path(r) / n) for n in sorted(names)]
        return out

    assert [str(p) for p in iter_files([root])] == reference(root)
    assert [str(p) for p in iter_files([root], exclude=["*.npy", "*/deep"])] == [
        p for p in reference(root) if not p.endswith(".npy") and "/deep/" not in p
    ]
    hashed = [str(p) for p, st in walk_files([root]) if st is not None]
    assert hashed == [str(p) for p in sorted(q for q in root.rglob("*") if q.is_file())]


PROBE = """
import os, sys
from sdtool.cli.main import main
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the JSON lines go to descriptor 1
code = main(sys.argv[1:])
sys.stderr.write(str(code) + " " + " ".join(sorted(sys.modules)) + "\\n")
"""


def test_cached_rerun_loads_no_scanner_and_starts_no_worker(
    tmp_path: Path, sub_env: dict[str, str]
) -> None:
    _tree(tmp_path / "t", 6)
    args = ["scan", "--jsonl", "--cache", str(tmp_path / "c"), str(tmp_path / "t")]
    for hit in (False, True):
        run = subprocess.run(
            [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=sub_env
        )
        code, *loaded = run.stderr.splitlines()[-1].split()
        assert run.returncode == 0 and code == "1", run.stderr  # the evil pickle
        mods = set(loaded)
        heavy = {"sdtool.scan.containers", "sdtool.scan.vm", "sdtool.scan.workers", "numpy"}
        heavy |= {"multiprocessing", "sdtool.scan.allowlist"}
        assert bool(mods & heavy) is not hit, sorted(mods & heavy)
