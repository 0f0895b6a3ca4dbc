"""Cache hygiene: verdicts of old rulesets and rows of gone or changed files are dropped, at a
bounded cost, and what is still valid stays cached."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

import sdtool.cache as cache_mod
from sdtool.cache import Cache, Identity
from sdtool.scan import scan_paths

EVIL = b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R."  # GLOBAL builtins.eval, REDUCE
PLAIN = b"\x80\x02}q\x00X\x01\x00\x00\x00aK%cs."  # {"a": i}


def _tree(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = root / f"f{i:02}.pkl"
        p.write_bytes(EVIL if i % 3 == 0 else PLAIN % i)
        out.append(p)
    return out


def _rows(cache: Cache, table: str) -> int:
    return int(cache.info()["rows"][table])


def test_only_the_newest_versions_of_scan_and_hash_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = itertools.count(1000.0)
    monkeypatch.setattr(cache_mod.time, "time", lambda: next(clock))
    with Cache(tmp_path / "c") as cache:
        for v in range(5):
            for settings in ("|crc=read|limits=default", "|crc=all|limits=default"):
                cache.put_text("scan", f"{v:064x}", f"0.1.0+r{v}{settings}", "{}")
            cache.put_text("hash", f"{v:064x}", f"0.{v}.0", "{}")
            cache.put_text("output", f"id:1:{v}:1:1:1", f"digest{v}|/out/{v}", "{}")
        for v in range(5):  # a content-keyed result counts only while a file has that content
            cache.put_sha256(Identity(1, 100 + v, 1, 1, 1), f"{v:064x}")
        cache.prune(keep=3)
        info = cache.info()
    assert [(d["kind"], d["version"]) for d in info["versions"]] == [
        ("hash", "0.4.0"), ("hash", "0.3.0"), ("hash", "0.2.0"),
        ("output", "digest4"), ("output", "digest3"), ("output", "digest2"),
        ("output", "digest1"), ("output", "digest0"),
        ("scan", "0.1.0+r4"), ("scan", "0.1.0+r3"), ("scan", "0.1.0+r2"),
    ]  # fmt: skip
    assert info["results"] == {"scan": 6, "hash": 3, "output": 5}  # resume records: by file


def test_rows_of_gone_and_changed_files_are_dropped_and_the_rest_stays_cached(
    tmp_path: Path,
) -> None:
    files = _tree(tmp_path / "t", 6)
    cache = Cache(tmp_path / "c")
    scan_paths([tmp_path / "t"], cache=cache, isolate=False, sha256=True)
    assert _rows(cache, "files") == _rows(cache, "seen") == 6
    files[0].unlink()
    files[1].write_bytes(EVIL + b"  ")  # changed: a new identity, not yet scanned
    st = os.stat(files[2])
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    dropped = cache.prune()
    assert dropped["seen"] == 1 and dropped["files"] == 3
    assert _rows(cache, "files") == 3 and _rows(cache, "seen") == 5
    # a verdict per identity left, and per content a file still has (f03's EVIL, f04, f05)
    assert cache.info()["results"] == {"scan": 3 + 3}
    again = scan_paths([tmp_path / "t"], cache=cache, isolate=False, sha256=True)
    assert [r.cached for r in again.files] == [False, False, True, True, True]
    assert [r.verdict for r in again.files][:1] == ["dangerous"]
    cache.close()


def test_a_rewritten_file_drops_its_old_rows_when_scanned_again(tmp_path: Path) -> None:
    (f,) = _tree(tmp_path / "t", 1)
    with Cache(tmp_path / "c") as cache:
        scan_paths([f], cache=cache, isolate=False, sha256=True)
        f.write_bytes(PLAIN % 7)
        scan_paths([f], cache=cache, isolate=False, sha256=True)
        assert _rows(cache, "files") == 1
        # the new identity's verdict and the new content's; the old content's went with it
        assert cache.info()["results"] == {"scan": 2}


def test_the_first_write_prunes_when_the_last_prune_is_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = Cache.prune
    monkeypatch.setattr(
        Cache, "prune", lambda self, **kw: calls.append(kw["stats"]) or real(self, **kw)
    )
    files = _tree(tmp_path / "t", 3)
    with Cache(tmp_path / "c") as cache:
        scan_paths([tmp_path / "t"], cache=cache, isolate=False)
        assert calls == [cache_mod.PRUNE_STATS]  # once per process, bounded
        assert cache.info()["pruned_at"] is not None
    files[0].unlink()
    with Cache(tmp_path / "c") as cache:
        scan_paths([tmp_path / "t"], cache=cache, isolate=False)
        files[1].write_bytes(PLAIN % 7)  # new content: a new verdict stored
        scan_paths([tmp_path / "t"], cache=cache, isolate=False)
    assert calls == [cache_mod.PRUNE_STATS]  # pruned a moment ago: not again
    monkeypatch.setattr(cache_mod, "PRUNE_EVERY", 0.0)
    with Cache(tmp_path / "c") as cache:
        files[2].write_bytes(PLAIN % 8)
        scan_paths([tmp_path / "t"], cache=cache, isolate=False)
        assert len(calls) == 2 and _rows(cache, "seen") == 2


def test_a_name_that_is_not_utf8_is_remembered_and_pruned(tmp_path: Path) -> None:
    f = Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff.pkl"))
    f.write_bytes(EVIL)
    with Cache(tmp_path / "c") as cache:
        assert (
            scan_paths([f], cache=cache, isolate=False, sha256=True).files[0].verdict == "dangerous"
        )
        assert _rows(cache, "seen") == 1 and cache.prune()["seen"] == 0
        f.unlink()
        assert cache.prune() == {"results": 2, "files": 1, "seen": 1}
