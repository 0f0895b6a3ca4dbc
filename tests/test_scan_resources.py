"""Resource safety of ``scan`` over many files: one bad file never takes the others down.

A worker that segfaults or runs past its time limit costs only its own file; named pipes,
sockets and devices are skipped by type without being opened; ``--json`` and ``--sarif`` stay
valid UTF-8 whatever bytes a name holds. (Hostile nesting and sizes are in test_hostile.py.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import socket
import tarfile
import time
from pathlib import Path

import pytest

from sdtool.cli.main import main
from sdtool.scan import containers, scan, scan_paths
from sdtool.scan.report import ProblemKind
from sdtool.scan.workers import Task, run_isolated
from tests.scan_payloads import call_global

PAYLOAD = call_global("os", "system", proto=2)
real_scan_file = containers.scan_file


def _files(tmp_path: Path) -> list[Path]:
    paths = []
    for name in ("a.pkl", "crash.pkl", "b.pkl", "c.pkl"):
        p = tmp_path / name
        p.write_bytes(PAYLOAD if name == "b.pkl" else pickle.dumps({"x": 1}, protocol=2))
        paths.append(p)
    return paths


def _crash_on(name: str, how: str):  # type: ignore[no-untyped-def]
    """A scan_file that dies on ``name`` the way a scanner bug would (inherited by the fork)."""

    def fake(path: Path, **kw):  # type: ignore[no-untyped-def]
        if path.name == name:
            if how == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif how == "exit":
                os._exit(3)
            elif how == "hang":
                time.sleep(60)
        return real_scan_file(path, **kw)

    return fake


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("how", ["segv", "exit"])
def test_a_crashing_worker_costs_only_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int, how: str
) -> None:
    paths = _files(tmp_path)
    monkeypatch.setattr(containers, "scan_file", _crash_on("crash.pkl", how))
    report = scan_paths([tmp_path], jobs=jobs)
    by_name = {Path(f.path).name: f for f in report.files}
    assert [Path(f.path).name for f in report.files] == sorted(p.name for p in paths)
    assert by_name["crash.pkl"].verdict == "not_scanned"
    assert "scanner process died" in by_name["crash.pkl"].errors[0]
    assert [p.kind for p in by_name["crash.pkl"].problems] == [ProblemKind.CRASH]
    if how == "segv":
        assert "SIGSEGV" in by_name["crash.pkl"].errors[0]
    assert by_name["a.pkl"].verdict == by_name["c.pkl"].verdict == "safe"
    assert by_name["b.pkl"].verdict == "dangerous"
    assert report.exit_code == 1


def test_a_hanging_file_ends_in_a_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _files(tmp_path)
    monkeypatch.setattr(containers, "scan_file", _crash_on("crash.pkl", "hang"))
    t0 = time.monotonic()
    reports = list(run_isolated([Task(str(p), {}) for p in paths], jobs=2, timeout=2))
    assert time.monotonic() - t0 < 30
    assert [r.verdict for r in reports] == ["safe", "error", "dangerous", "safe"]
    assert reports[1].errors == ["could not scan: limit: scanning took longer than 2 s"]
    assert [p.kind for p in reports[1].problems] == [
        ProblemKind.RESOURCES
    ]  # the machine's: never cached


def test_results_come_back_as_json_not_pickles(tmp_path: Path) -> None:
    """The parent never unpickles what a child sends (a compromised child gains nothing)."""
    (p,) = _files(tmp_path)[2:3]
    (rep,) = run_isolated([Task(str(p), {})])
    assert rep.to_json() == scan(p).to_json()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_socket_and_device_are_skipped_by_type(tmp_path: Path) -> None:
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps([1], protocol=2))
    os.mkfifo(tmp_path / "pipe")  # opening it for reading would block forever
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "sock"))
        os.symlink("/dev/zero", tmp_path / "zero")  # endless: never read
        t0 = time.monotonic()
        report = scan_paths([tmp_path])
        assert time.monotonic() - t0 < 30
    finally:
        sock.close()
    by_name = {Path(f.path).name: f for f in report.files}
    assert by_name["ok.pkl"].verdict == "safe"
    for name, what in (("pipe", "a named pipe"), ("sock", "a socket"), ("zero", "a character")):
        assert by_name[name].verdict == "not_scanned"
        assert by_name[name].errors[0].startswith(f"not scanned: {what}")
    assert scan(tmp_path / "pipe").errors == [
        "not scanned: a named pipe (skipped by type, never opened)"
    ]


def test_problems_are_typed(tmp_path: Path) -> None:
    """Each reason (part of) a file went unanalysed has a kind; --json keeps the sentences;
    a worker process sends the kinds back."""
    (tmp_path / "empty.pkl").write_bytes(b"")
    (tmp_path / "cut.pkl").write_bytes(b"\x80\x02cbuiltins")  # a pickle cut inside GLOBAL
    report = scan_paths([tmp_path, tmp_path / "nope"], isolate=False)
    kinds = {Path(f.path).name: [p.kind for p in f.problems] for f in report.files}
    assert kinds == {
        "cut.pkl": [ProblemKind.BROKEN],
        "empty.pkl": [ProblemKind.NOT_SCANNED],
        "nope": [ProblemKind.MISSING],
    }
    for f, doc in zip(report.files, report.to_json()["files"], strict=True):
        assert doc["errors"] == [p.message for p in f.problems] == f.errors
    (rep,) = run_isolated([Task(str(tmp_path / "cut.pkl"), {})])
    assert rep.problems == scan(tmp_path / "cut.pkl").problems


def test_json_and_sarif_are_utf8_whatever_the_names(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """A tar member name and a file name with bytes that are not UTF-8."""
    info = tarfile.TarInfo("x\udcff\udcfe.pkl")
    info.size = len(PAYLOAD)
    with tarfile.open(
        tmp_path / "t.tar", "w", format=tarfile.GNU_FORMAT, errors="surrogateescape"
    ) as tf:
        tf.addfile(info, io.BytesIO(PAYLOAD))
    with contextlib.suppress(OSError, UnicodeError):  # a file system refusing such names
        (tmp_path / os.fsdecode(b"bad\xff.pkl")).write_bytes(PAYLOAD)
    for flag in ("--json", "--sarif"):
        assert main(["scan", str(tmp_path), flag]) == 1
        raw = capsysbinary.readouterr().out
        doc = json.loads(raw.decode("utf-8"))  # strict: raises on invalid UTF-8
        text = json.dumps(doc)
        assert "x\\\\xff\\\\xfe.pkl" in text


# -- decompression budget ------------------------------------------------------------------------


def _overlapping_zip(n: int, inflated: int) -> bytes:
    """One deflated member of ``inflated`` zero bytes, listed ``n`` times in the central
    directory (Fifield's overlapping zip bomb: n * inflated bytes from one small file)."""
    import struct
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    raw = comp.compress(b"\0" * inflated) + comp.flush()
    crc = zlib.crc32(b"\0" * inflated)
    local = struct.pack(
        "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(raw), inflated, 1, 0
    )
    body = local + b"m" + raw
    cd = b""
    for i in range(n):
        name = f"m{i}".encode()
        cd += struct.pack(
            "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(raw), inflated,
            len(name), 0, 0, 0, 0, 0, 0,
        ) + name  # fmt: skip
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(cd), len(body), 0)
    return body + cd + end


def test_overlapping_zip_bomb_ends_in_a_limit_within_seconds(tmp_path: Path) -> None:
    p = tmp_path / "bomb.zip"
    p.write_bytes(_overlapping_zip(200, 16 << 20))  # ~3 MB of members -> 3.2 GB inflated
    t0 = time.monotonic()
    r = scan(p)
    assert time.monotonic() - t0 < 30
    assert r.verdict in ("error", "suspicious")  # never safe
    assert any(e.startswith("could not scan: limit:") for e in r.errors), r.errors


def test_a_payload_before_the_limit_is_still_found(tmp_path: Path) -> None:
    import gzip

    p = tmp_path / "m.pkl.gz"
    p.write_bytes(gzip.compress(PAYLOAD + b"\0" * (8 << 20)))  # ratio far over 1000
    r = scan(p)
    assert r.verdict == "dangerous"
    assert any("limit" in e for e in r.errors)


def test_gzip_members_after_the_first_are_scanned(tmp_path: Path) -> None:
    """gzip.open (joblib, users) reads every member of a multi-member gzip file."""
    import gzip

    data = gzip.compress(b"\x80\x02N.") + gzip.compress(PAYLOAD)
    assert gzip.decompress(data).endswith(PAYLOAD)
    p = tmp_path / "two.gz"
    p.write_bytes(data)
    assert scan(p).verdict == "dangerous"


def test_7z_bomb_ends_in_a_limit(tmp_path: Path) -> None:
    import py7zr

    p = tmp_path / "bomb.7z"
    with py7zr.SevenZipFile(p, "w") as z:
        z.writestr(PAYLOAD + b"\0" * (64 << 20), "m.pkl")  # LZMA2 far past 1000:1
    r = scan(p)
    assert r.verdict == "dangerous"  # the payload at the start is still found
    assert any(e.startswith("could not scan: limit:") for e in r.errors), r.errors


def test_7z_without_py7zr_is_could_not_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    import py7zr

    p = tmp_path / "m.7z"
    with py7zr.SevenZipFile(p, "w") as z:
        z.writestr(pickle.dumps({"a": 1}), "m.pkl")
    assert scan(p).verdict == "safe"
    real_import = builtins.__import__

    def no_py7zr(name, *a, **kw):  # type: ignore[no-untyped-def]
        if name.startswith("py7zr"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_py7zr)
    r = scan(p)
    # issue 12: could not scan (exit 2) with the reason, never "dangerous" for being unopenable
    assert r.verdict == "not_scanned" and not r.findings
    assert any("unsupported archive (7z): py7zr" in e for e in r.errors)


def test_7z_py7zr_refuses_is_not_cached(tmp_path: Path) -> None:
    """What py7zr (and the codecs beside it) cannot open today a later install may: that
    "could not scan" is this machine's, never stored as the bytes' verdict."""
    import py7zr

    p = tmp_path / "m.7z"
    with py7zr.SevenZipFile(p, "w") as z:
        z.writestr(pickle.dumps({"a": 1}), "m.pkl")
    assert scan(p).self_contained
    data = bytearray(p.read_bytes())
    data[32:48] = b"\xff" * 16  # the packed stream: py7zr's decoder fails on it
    p.write_bytes(bytes(data))
    r = scan(p)
    assert r.verdict == "not_scanned" or r.errors, r
    assert not r.self_contained
