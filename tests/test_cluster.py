"""``--cluster``: scan / hash / convert as per-file tasks on a Dask LocalCluster of 2 worker
processes give the same JSON lines and exit codes as a local run."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdtool.cli.main import main

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow  # a LocalCluster of worker processes takes seconds to start

EVIL = b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R."  # GLOBAL builtins.eval, REDUCE
PLAIN = b"\x80\x02}q\x00X\x01\x00\x00\x00aK%cs."  # {"a": i}
Cap = pytest.CaptureFixture[str]


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """A LocalCluster of 2 single-threaded worker processes, shared by this module's tests."""
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    try:
        yield str(cluster.scheduler_address)
    finally:
        cluster.close()


def _tree(root: Path) -> Path:
    root.mkdir()
    (root / "evil.pkl").write_bytes(EVIL)
    for i in range(4):
        (root / f"plain{i}.pkl").write_bytes(PLAIN % i)
    (root / "broken.pkl").write_bytes(EVIL[:9])
    (root / "notes.txt").write_text("just text\n")
    rng = np.random.default_rng(0)
    for i in range(3):
        w = rng.standard_normal((8, 8)).astype(np.float32)
        save_file({"w": w, "b": np.arange(i + 1, dtype=np.int64)}, str(root / f"m{i}.safetensors"))
    return root


def _run(cap: Cap, args: list[str]) -> tuple[int, list[dict[str, Any]]]:
    code = main(args)
    out = cap.readouterr().out
    assert out == "" or out.endswith("\n")
    return code, [json.loads(line) for line in out.splitlines()]


def _strip(recs: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in keys} for r in recs]


def test_scan_on_cluster_matches_local(tmp_path: Path, capsys: Cap, scheduler: str) -> None:
    d = _tree(tmp_path / "t")
    local_code, local = _run(capsys, ["scan", "--jsonl", "--no-cache", str(d)])
    code, remote = _run(capsys, ["scan", "--jsonl", "--no-cache", "--cluster", scheduler, str(d)])
    assert code == local_code == 1  # dangerous wins over could-not-scan (broken.pkl)
    assert remote == local
    verdicts = {Path(r["path"]).name: r["verdict"] for r in remote}
    assert verdicts["evil.pkl"] == "dangerous" and verdicts["plain0.pkl"] == "safe"
    # with the cache: the client looks up, the cluster scans only what is new
    _run(capsys, ["scan", "--jsonl", "--cache", str(tmp_path / "c"), str(d)])
    _, second = _run(
        capsys, ["scan", "--jsonl", "--cache", str(tmp_path / "c"), "--cluster", scheduler, str(d)]
    )
    assert _strip(second, "cached") == _strip(local, "cached")
    complete = [r["cached"] for r in second if not r["errors"]]
    assert complete and all(complete)


def test_hash_on_cluster_matches_local(tmp_path: Path, capsys: Cap, scheduler: str) -> None:
    d = _tree(tmp_path / "t")
    args = ["hash", "--jsonl", "-a", "sha256,autov2,autov3,crc32", str(d), str(tmp_path / "nope")]
    local_code, local = _run(capsys, [*args, "--no-cache"])
    code, remote = _run(capsys, [*args, "--no-cache", "--cluster", scheduler])
    assert code == local_code == 2  # the missing file
    assert remote == local
    cache = ["--cache", str(tmp_path / "c"), "--cluster", scheduler]
    _run(capsys, [*args, *cache])
    _, again = _run(capsys, [*args, *cache])
    hashed = [r.get("cached") for r in again if "hashes" in r]
    assert len(hashed) == 10 and all(hashed)
    assert _strip(again, "cached") == _strip(local, "cached")


def test_urls_on_cluster_match_local(tmp_path: Path, capsys: Cap, scheduler: str) -> None:
    """URLs are tasks too: each worker reads its file by HTTP ranges (a local server here)."""
    from tests.httpserver import serve

    d = _tree(tmp_path / "t")
    with serve() as server:
        for name in ("evil.pkl", "plain0.pkl", "m0.safetensors"):
            server.files["/" + name] = (d / name).read_bytes()
        urls = [server.url("/" + n) for n in ("evil.pkl", "plain0.pkl", "m0.safetensors")]
        urls.append(server.url("/missing.pkl"))  # 404: one error line, exit 2 for hash
        for cmd in (["scan", "--jsonl"], ["hash", "--jsonl", "-a", "sha256,crc32"]):
            args = [*cmd, "--no-cache", str(d / "plain1.pkl"), *urls]
            local_code, local = _run(capsys, args)
            code, there = _run(capsys, [*args, "--cluster", scheduler])
            assert code == local_code
            assert there == local
            assert [r["path"] for r in there][1:] == urls
            if cmd[0] == "scan":
                assert [r["verdict"] for r in there] == [
                    "safe", "dangerous", "safe", "safe", "not_scanned"
                ]  # fmt: skip
    assert main(["scan", "--cluster", scheduler, "-"]) == 2  # standard input: refused
    assert "not - (stdin)" in capsys.readouterr().err


def test_convert_on_cluster_matches_local(tmp_path: Path, capsys: Cap, scheduler: str) -> None:
    d = _tree(tmp_path / "t")
    (d / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    base = ["convert", str(d), "--dtype", "fp16", "--jsonl"]
    local_code, local = _run(capsys, [*base, "--out-dir", str(tmp_path / "a")])
    cl = ["--cluster", scheduler, "--resume", "--cache", str(tmp_path / "c")]
    code, remote = _run(capsys, [*base, "--out-dir", str(tmp_path / "b"), *cl])
    assert code == local_code == 1  # bad.safetensors failed, the rest converted
    key = "path"
    a = {r[key]: r for r in _strip(local, "output", "seconds", "output_sha256", "error")}
    b = {r[key]: r for r in _strip(remote, "output", "seconds", "output_sha256", "error")}
    assert a == b
    for i in range(3):
        out_a = (tmp_path / "a" / f"m{i}.safetensors").read_bytes()
        assert out_a == (tmp_path / "b" / f"m{i}.safetensors").read_bytes()
    _, again = _run(capsys, [*base, "--out-dir", str(tmp_path / "b"), *cl])
    status = sorted(r["status"] for r in again)
    assert status == ["failed"] + ["resumed"] * 3


def _boom(x: int) -> int:
    if x == 2:
        raise ValueError("two")
    return x * 10


def test_map_unordered_streams_and_reports_failures(scheduler: str) -> None:
    from sdtool.cluster import Cluster

    with Cluster(scheduler, window=2) as c:
        got = dict(c.map_unordered(_boom, [0, 1, 2, 3, 4], lambda x, e: -x))
        assert got == {0: 0, 1: 10, 2: -2, 3: 30, 4: 40}
        assert list(c.map_ordered(_boom, [4, 3, 1], None)) == [40, 30, 10]


def test_unreachable_scheduler_is_one_line_exit_2(
    tmp_path: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sdtool.cluster

    monkeypatch.setattr(sdtool.cluster, "CONNECT_TIMEOUT", "1s")
    f = tmp_path / "x.pkl"
    f.write_bytes(PLAIN % 1)
    code = main(["hash", "--cluster", "tcp://127.0.0.1:9", str(f)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Dask scheduler" in err


def test_workers_of_other_code_are_refused_one_line_exit_2(
    tmp_path: Path, capsys: Cap, scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose sdtool differs from the client's (here: the client's digest is made to
    differ) stops the run before any task: one line, exit 2, nothing on stdout."""
    import sdtool.cluster
    from sdtool.scan import ruleset

    real = sdtool.cluster.code_version()
    assert real.startswith(sdtool.__version__ + "+")
    monkeypatch.setattr(ruleset, "code_version", lambda: "0.1.0+patched")
    d = _tree(tmp_path / "t")
    code = main(["scan", "--jsonl", "--no-cache", "--cluster", scheduler, str(d)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"runs sdtool {real}, this is 0.1.0+patched" in err


def test_a_task_on_a_worker_of_other_code_stops_the_run(
    scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers that join after the first check are checked by every task: a mismatch is not
    a per-file failure handed to ``on_error`` but the end of the run."""
    import sdtool.cluster
    from sdtool.errors import SdtoolError
    from sdtool.scan import ruleset

    monkeypatch.setattr(sdtool.cluster.Cluster, "_check_workers", lambda self, address: None)
    monkeypatch.setattr(ruleset, "code_version", lambda: "0.1.0+patched")
    with (
        sdtool.cluster.Cluster(scheduler, window=2) as c,
        pytest.raises(SdtoolError, match=r"runs sdtool 0\.1\.0\+\w+, this is 0\.1\.0\+patched"),
    ):
        list(c.map_unordered(_boom, [0, 1, 3], lambda x, e: -x))
