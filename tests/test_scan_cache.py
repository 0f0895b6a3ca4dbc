"""Cached scan verdicts: reused only for the same content and ruleset, never over a change."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sdtool.cache import Cache
from sdtool.scan import cached as cached_mod
from sdtool.scan import scan
from sdtool.scan.cached import scan_cached
from sdtool.scan.report import FileReport

# protocol 2: GLOBAL 'builtins eval', the source string, TUPLE1, REDUCE, STOP (a harmless call)
EVIL = b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R."
PLAIN = b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s."


class Counting:
    """scan() that counts its calls, so a test can tell a cache hit from a scan."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: Path) -> FileReport:
        self.calls += 1
        return scan(path)


def test_second_scan_is_a_cache_hit_with_the_same_report(tmp_path: Path) -> None:
    f = tmp_path / "evil.pkl"
    f.write_bytes(EVIL)
    one = Counting()
    with Cache(tmp_path / "c") as cache:
        first = scan_cached(f, one, cache)
        second = scan_cached(f, one, cache)
    assert one.calls == 1
    assert not first.cached and second.cached
    assert second.report.to_json() == first.report.to_json()
    assert second.report.verdict == "dangerous"


def test_changed_content_is_scanned_again(tmp_path: Path) -> None:
    f = tmp_path / "m.pkl"
    f.write_bytes(PLAIN)
    one = Counting()
    with Cache(tmp_path / "c") as cache:
        assert scan_cached(f, one, cache).report.verdict == "safe"
        f.write_bytes(EVIL)
        again = scan_cached(f, one, cache)
    assert one.calls == 2 and not again.cached
    assert again.report.verdict == "dangerous"


def test_new_ruleset_invalidates_verdicts_but_not_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "m.pkl"
    f.write_bytes(PLAIN)
    one = Counting()
    with Cache(tmp_path / "c") as cache:
        scan_cached(f, one, cache, sha256=True)
        monkeypatch.setattr(cached_mod, "ruleset_version", lambda: "0.0.0+other")
        hashed: list[Path] = []
        monkeypatch.setattr(cached_mod, "file_sha256", lambda p: hashed.append(p) or "x")
        again = scan_cached(f, one, cache, sha256=True)
    assert one.calls == 2 and not again.cached
    assert hashed == []  # the file's hash came from the cache
    assert again.sha256 is not None and len(again.sha256) == 64


def test_identical_content_elsewhere_shares_the_verdict_by_sha256(tmp_path: Path) -> None:
    a = tmp_path / "a.pkl"
    a.write_bytes(EVIL)
    b = tmp_path / "mirror" / "b.bin"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    one = Counting()
    with Cache(tmp_path / "c") as cache:
        scan_cached(a, one, cache, sha256=True)
        hit = scan_cached(b, one, cache, sha256=True)
    assert one.calls == 1 and hit.cached
    assert hit.report.path == str(b)


def test_reports_with_errors_are_not_cached(tmp_path: Path) -> None:
    f = tmp_path / "cut.pkl"
    f.write_bytes(PLAIN[:-3])  # a pickle that ends early: could not scan completely
    one = Counting()
    with Cache(tmp_path / "c") as cache:
        first = scan_cached(f, one, cache)
        scan_cached(f, one, cache)
    assert first.report.verdict != "safe"
    assert one.calls == 2
