"""The result cache: identity-keyed hashes, versioned results, several processes, bad databases."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from pathlib import Path

from sdtool.cache import Cache, Identity, cached_sha256


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hash_is_reused_for_the_same_identity(tmp_path: Path) -> None:
    f = tmp_path / "m.bin"
    f.write_bytes(b"abc" * 100)
    calls: list[int] = []

    def compute() -> str:
        calls.append(1)
        return _sha(f)

    with Cache(tmp_path / "c") as cache:
        first = cached_sha256(cache, f, compute)
        second = cached_sha256(cache, f, compute)
    assert first == (_sha(f), False)
    assert second == (_sha(f), True)
    assert len(calls) == 1


def test_same_size_rewrite_with_restored_mtime_is_a_new_file(tmp_path: Path) -> None:
    """An attacker who swaps content and resets mtime still changes ctime: never trusted."""
    f = tmp_path / "m.bin"
    f.write_bytes(b"a" * 64)
    with Cache(tmp_path / "c") as cache:
        cached_sha256(cache, f, lambda: _sha(f))
        st = os.stat(f)
        f.write_bytes(b"b" * 64)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(f).st_mtime_ns == st.st_mtime_ns
        digest, hit = cached_sha256(cache, f, lambda: _sha(f))
    assert not hit
    assert digest == hashlib.sha256(b"b" * 64).hexdigest()


def test_file_changing_while_hashed_is_not_recorded(tmp_path: Path) -> None:
    f = tmp_path / "m.bin"
    f.write_bytes(b"a" * 64)

    def compute() -> str:
        digest = _sha(f)
        f.write_bytes(b"c" * 65)  # changed under the hasher
        return digest

    with Cache(tmp_path / "c") as cache:
        cached_sha256(cache, f, compute)
        assert cache.stats()["files"] == 0


def test_results_are_keyed_by_version(tmp_path: Path) -> None:
    with Cache(tmp_path / "c") as cache:
        cache.put("scan", "ab" * 32, "rules-1", {"verdict": "safe"})
        assert cache.get("scan", "ab" * 32, "rules-1") == {"verdict": "safe"}
        assert cache.get("scan", "ab" * 32, "rules-2") is None
        assert cache.get("hash", "ab" * 32, "rules-1") is None


def _writer(directory: str, start: int) -> None:
    with Cache(directory) as cache:
        for i in range(start, start + 150):
            cache.put("scan", f"{i:064x}", "v", {"i": i})
            cache.put_sha256(Identity(1, i, i, i, i), f"{i:064x}")


def test_several_processes_share_one_cache(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "c"), k * 150)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Cache(tmp_path / "c") as cache:
        assert cache.stats() == {"files": 450, "results": 450}
        assert cache.get("scan", f"{449:064x}", "v") == {"i": 449}


def test_corrupt_database_degrades_to_no_cache(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    (d / "cache.sqlite3").write_bytes(b"not a database" * 100)
    f = tmp_path / "m.bin"
    f.write_bytes(b"x")
    with Cache(d) as cache:
        assert cached_sha256(cache, f, lambda: _sha(f)) == (_sha(f), False)
        assert cache.get("scan", "0" * 64, "v") is None
        assert cache.disabled_reason is not None


def test_uncreatable_directory_degrades_to_no_cache(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with Cache(blocker / "sub") as cache:  # a directory under a regular file cannot exist
        cache.put("scan", "0" * 64, "v", {})
        assert cache.get("scan", "0" * 64, "v") is None
        assert cache.disabled_reason is not None


def test_ruleset_version_changes_with_any_scan_source(tmp_path: Path) -> None:
    """A copy of the package with one allowlist byte changed has another ruleset version."""
    import shutil
    import subprocess
    import sys

    import sdtool

    src = Path(sdtool.__file__).parent
    dst = tmp_path / "pkg" / "sdtool"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    code = "from sdtool.scan.ruleset import ruleset_version as v; print(v())"

    def version() -> str:
        env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg")}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    v1 = version()
    assert v1 == version()  # stable
    allow = dst / "scan" / "allowlist.py"
    allow.write_text(allow.read_text() + "\n# changed\n")
    v2 = version()
    assert v2 != v1 and v2.split("+")[0] == v1.split("+")[0]


def test_ruleset_version_memo_is_used_until_a_source_changes(tmp_path: Path) -> None:
    """A rerun reads the version from the memo (it does not even import hashlib); a changed
    rule is hashed again, memo or not."""
    import shutil
    import subprocess
    import sys

    import sdtool

    dst = tmp_path / "pkg" / "sdtool"
    shutil.copytree(Path(sdtool.__file__).parent, dst,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg"),
           "SDTOOL_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    code = "from sdtool.scan.ruleset import ruleset_version as v; print(v())"
    no_hashlib = "import sys; sys.modules['hashlib'] = None\n" + code

    def version(src: str) -> str | None:
        out = subprocess.run([sys.executable, "-c", src], env=env, cwd=tmp_path,
                             capture_output=True, text=True)  # fmt: skip
        return out.stdout.strip() if out.returncode == 0 else None

    assert version(no_hashlib) is None  # no memo yet: it must hash
    v1 = version(code)
    assert v1 is not None and (tmp_path / "cache" / "ruleset-memo.json").is_file()
    assert version(no_hashlib) == v1  # from the memo
    rules = dst / "scan" / "rules.py"
    rules.write_text(rules.read_text() + "\n# changed\n")
    assert version(no_hashlib) is None  # the memo no longer holds: hashed again
    v2 = version(code)
    assert v2 is not None and v2 != v1
    assert version(no_hashlib) == v2
