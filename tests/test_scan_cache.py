"""Cached scan verdicts: reused only for the same content and ruleset, never over a change."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sdtool.cache import Cache
from sdtool.scan import cached as cached_mod
from sdtool.scan import containers, oracle, scan
from sdtool.scan.cached import scan_cached
from sdtool.scan.report import FileReport, ProblemKind
from sdtool.scan.workers import crash_report, limit_report

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


def test_a_could_not_scan_that_the_bytes_decide_is_cached(tmp_path: Path) -> None:
    f = tmp_path / "cut.pkl"
    f.write_bytes(PLAIN[:-3])  # a pickle that ends early: the same bytes end early again
    one = Counting()
    with Cache(tmp_path / "c") as cache:
        first = scan_cached(f, one, cache)
        second = scan_cached(f, one, cache)
    assert first.report.verdict == "error" and first.report.errors
    assert one.calls == 1 and second.cached
    assert second.report.problems == first.report.problems
    assert second.report.to_json() == first.report.to_json()


# protocol 2: GLOBAL joblib.numpy_pickle.NDArrayWrapper, NEWOBJ, BUILD {"filename": "side.npy"}:
# joblib.load reads side.npy beside the pickle, so the verdict depends on that file too
SIDE = (
    b"\x80\x02cjoblib.numpy_pickle\nNDArrayWrapper\n)\x81}X\x08\x00\x00\x00filename"
    b"X\x08\x00\x00\x00side.npysb."
)


def _permission_denied(monkeypatch: pytest.MonkeyPatch, f: Path) -> Counting:
    # root may read a chmod-000 file: the open fails here as it would for another user
    real = containers.open_regular

    def deny(p: Path) -> object:
        if Path(p) == f:
            raise PermissionError(13, "Permission denied", str(p))
        return real(p)

    monkeypatch.setattr(containers, "open_regular", deny)
    return Counting()


def _io_error(monkeypatch: pytest.MonkeyPatch, f: Path) -> Counting:
    # a disk error in the middle of a zip's members (a zip is read with pread, not mmap)
    real = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        if offset > 0 and os.fstat(fd).st_ino == f.stat().st_ino:
            raise OSError(5, "Input/output error")
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    return Counting()


def _oracle_timeout(monkeypatch: pytest.MonkeyPatch) -> Counting:
    # the C-unpickler cross-check ran out of time (a loaded machine): the verdict lacks it
    failed = oracle.OracleResult(failed="the C unpickler did not finish within 5 s")
    monkeypatch.setattr(oracle, "run_c_unpickler", lambda *a, **k: failed)
    return Counting()


class Returning(Counting):
    """scan_one that returns a made report (a worker's time limit, a crash)."""

    def __init__(self, make: Callable[[str], FileReport]) -> None:
        super().__init__()
        self.make = make

    def __call__(self, path: Path) -> FileReport:
        self.calls += 1
        return self.make(str(path))


@pytest.mark.parametrize(
    ("case", "kind"),
    [
        ("permission", ProblemKind.UNREADABLE),
        ("io-error", ProblemKind.UNREADABLE),
        ("time", ProblemKind.RESOURCES),
        ("crash", ProblemKind.CRASH),
        ("cross-check", None),
    ],
)
def test_what_the_machine_or_other_files_decide_is_scanned_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, kind: ProblemKind | None
) -> None:
    f = tmp_path / "m.bin"
    if case == "io-error":
        with zipfile.ZipFile(f, "w") as z:
            z.writestr("archive/data.pkl", PLAIN)
            z.writestr("archive/version", b"3\n")
    else:
        f.write_bytes(PLAIN)
    one = {
        "permission": lambda: _permission_denied(monkeypatch, f),
        "io-error": lambda: _io_error(monkeypatch, f),
        "time": lambda: Returning(lambda p: limit_report(p, "scanning took longer than 1 s")),
        "crash": lambda: Returning(lambda p: crash_report(p, -9)),
        "cross-check": lambda: _oracle_timeout(monkeypatch),
    }[case]()
    with Cache(tmp_path / "c") as cache:
        first = scan_cached(f, one, cache)
        second = scan_cached(f, one, cache)
        assert cache.stats()["results"] == 0
    assert one.calls == 2 and not second.cached
    assert [p.kind for p in first.report.problems] == ([kind] if kind else [])
    if case == "cross-check":
        assert "not cross-checked" in " ".join(f.message for f in first.report.findings)
    if case == "permission":
        assert first.report.errors == ["not scanned: cannot read the file (Permission denied)"]


def test_a_joblib_pickle_is_cached_while_its_side_files_are_unchanged(tmp_path: Path) -> None:
    f = tmp_path / "m.pkl"
    f.write_bytes(SIDE)
    side = tmp_path / "side.npy"
    one = Counting()
    with Cache(tmp_path / "c") as cache:

        def again(calls: int, cached: bool) -> FileReport:
            got = scan_cached(f, one, cache)
            assert (one.calls, got.cached) == (calls, cached)
            return got.report

        assert "absent" in " ".join(again(1, False).notes)
        again(1, True)  # still absent
        np.save(side, np.arange(3))  # a side file appears: scanned again, then cached
        assert again(2, False).verdict == again(2, True).verdict
        np.save(side, np.array([{"a": 1}], dtype=object))  # an object array: its data a pickle
        changed = again(3, False)
        assert changed.verdict != "safe" and again(3, True).verdict == changed.verdict
        side.unlink()
        again(4, False)
    copy = tmp_path / "elsewhere" / "m.pkl"  # the same bytes beside other side files
    copy.parent.mkdir()
    shutil.copyfile(f, copy)
    np.save(copy.parent / "side.npy", np.arange(3))
    with Cache(tmp_path / "c") as cache:
        scan_cached(f, one, cache, sha256=True)
        assert not scan_cached(copy, one, cache, sha256=True).cached


def _run(tmp_path: Path, env: dict[str, str], args: list[str]) -> tuple[int, bytes, bytes]:
    """sdtool in a process (JSON Lines go to descriptor 1): exit code, stdout, stderr."""
    out = tmp_path / "out"
    with open(out, "wb") as fo:
        proc = subprocess.run(
            [sys.executable, "-m", "sdtool", *args], stdout=fo, stderr=subprocess.PIPE, env=env
        )
    return proc.returncode, out.read_bytes(), proc.stderr


def test_a_rerun_prints_the_cold_runs_lines_errors_and_exit_code(
    tmp_path: Path, sub_env: dict[str, str]
) -> None:
    d = tmp_path / "models"
    d.mkdir()
    (d / "cut.pkl").write_bytes(PLAIN[:-3])  # broken
    (d / "empty.bin").write_bytes(b"")  # not scanned: empty
    (d / "evil.pkl").write_bytes(EVIL)  # dangerous
    (d / "other.bin").write_bytes(b"\x06\x00\x00\x00\x17" + bytes(range(64)))  # unsupported
    (d / "zbroken.pkl").write_bytes(EVIL[:-1])  # dangerous, then broken
    (d / "ok.pkl").write_bytes(PLAIN)
    cache = ["--cache", str(tmp_path / "c")]
    for extra in (["--jsonl"], []):
        cold = _run(tmp_path, sub_env, ["scan", *extra, str(d), *cache])
        warm = _run(tmp_path, sub_env, ["scan", *extra, str(d), *cache])
        assert cold[0] == warm[0] == 1  # dangerous wins over could not scan
        assert warm[2] == cold[2] and cold[2].count(b"could not scan") == 4
        assert b"empty.bin: could not scan: the file is empty" in cold[2]
        if extra:
            one = [json.loads(x) for x in cold[1].splitlines()]
            two = [json.loads(x) for x in warm[1].splitlines()]
            # the empty file's verdict is its name's (beside the models it is skipped): not cached
            assert [r.pop("cached") for r in two] == [True, False, True, True, True, True]
            assert [r.pop("cached") for r in one] == [False] * 6
            assert one == two
        else:
            assert warm[1] == cold[1]
    (d / "evil.pkl").unlink()
    (d / "zbroken.pkl").unlink()
    for extra in (["--jsonl"], []):
        code, _, err = _run(tmp_path, sub_env, ["scan", *extra, str(d), *cache])
        assert code == 2 and err.count(b"could not scan") == 3 and b"cut.pkl" in err
    assert _run(tmp_path, sub_env, ["scan", "--jsonl", str(d / "ok.pkl"), *cache])[0] == 0


def test_sha256_is_computed_for_a_verdict_cached_by_identity(tmp_path: Path) -> None:
    """A tree scanned without --sha256, then with it: each line has its hash, the verdicts
    still come from the cache."""
    f = tmp_path / "m.pkl"
    f.write_bytes(EVIL)
    one = Counting()
    with Cache(tmp_path / "c") as cache:
        assert scan_cached(f, one, cache).sha256 is None
        again = scan_cached(f, one, cache, sha256=True)
    assert one.calls == 1 and again.cached
    assert again.sha256 == hashlib.sha256(EVIL).hexdigest()
