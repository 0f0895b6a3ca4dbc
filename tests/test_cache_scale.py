"""The cache at hub scale: a new ruleset invalidates verdicts and nothing else; two sdtool
processes writing one cache at once."""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdtool.cache import Cache, Identity, cached_sha256
from sdtool.ops.hash import hash_cached
from sdtool.scan import scan_paths

EVIL = b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R."  # GLOBAL builtins.eval, REDUCE
PLAIN = b"\x80\x02}q\x00X\x01\x00\x00\x00aK%cs."  # {"a": i}


def _tree(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = root / f"f{i:03}.pkl"
        p.write_bytes(EVIL if i % 5 == 0 else PLAIN % (i % 250))
        out.append(p)
    return out


def test_new_ruleset_invalidates_verdicts_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _tree(tmp_path / "t", 6)
    cache = Cache(tmp_path / "c")
    first = scan_paths([tmp_path / "t"], cache=cache, sha256=True, isolate=False)
    hash_cached(files[0], cache, algorithms=("sha256", "crc32"))
    again = scan_paths([tmp_path / "t"], cache=cache, sha256=True, isolate=False)
    assert [r.cached for r in again.files] == [True] * 6

    cached_mod = importlib.import_module("sdtool.scan.cached")
    monkeypatch.setattr(cached_mod, "ruleset_version", lambda: "0.1.0+another-ruleset")
    reads: list[Path] = []
    real = cached_mod.file_sha256
    monkeypatch.setattr(cached_mod, "file_sha256", lambda p: reads.append(p) or real(p))
    new = scan_paths([tmp_path / "t"], cache=cache, sha256=True, isolate=False)
    assert [r.cached for r in new.files] == [False] * 6  # verdicts: scanned again
    assert [r.verdict for r in new.files] == [r.verdict for r in first.files]
    assert reads == []  # the SHA-256 of every file: still from the cache
    for f in files:
        assert cached_sha256(cache, f, lambda: pytest.fail("re-hashed"))[1] is True
        assert cache.sha256(Identity.of_path(f)) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert hash_cached(files[0], cache, algorithms=("sha256", "crc32"))[1] is True  # hashes too
    third = scan_paths([tmp_path / "t"], cache=cache, sha256=True, isolate=False)
    assert [r.cached for r in third.files] == [True] * 6  # the new ruleset's verdicts


def test_two_processes_write_one_cache_at_once(tmp_path: Path, sub_env: dict[str, str]) -> None:
    _tree(tmp_path / "t", 80)
    cache = tmp_path / "c"
    args = [sys.executable, "-m", "sdtool", "scan", "--jsonl", "--sha256", "--cache", str(cache)]
    outs = [tmp_path / f"out{k}.jsonl" for k in range(2)]
    procs = []
    for out in outs:  # both scan the whole tree: every row is written by both, at once
        with open(out, "wb") as f:
            procs.append(
                subprocess.Popen(
                    [*args, str(tmp_path / "t")], stdout=f, stderr=subprocess.PIPE, env=sub_env
                )
            )
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1, err  # dangerous files found, nothing else went wrong
        assert b"cache unusable" not in err
    docs = [[json.loads(x) for x in o.read_text().splitlines()] for o in outs]
    assert len(docs[0]) == len(docs[1]) == 80
    strip = {"cached"}
    assert [{k: v for k, v in r.items() if k not in strip} for r in docs[0]] == [
        {k: v for k, v in r.items() if k not in strip} for r in docs[1]
    ]
    with Cache(cache) as c:
        assert c.stats()["files"] == 80
    third = subprocess.run(
        [*args, str(tmp_path / "t")], capture_output=True, env=sub_env, timeout=120
    )
    recs = [json.loads(x) for x in third.stdout.decode().splitlines()]
    assert len(recs) == 80 and all(r["cached"] for r in recs)
