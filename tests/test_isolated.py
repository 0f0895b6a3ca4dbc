"""``scan.workers.Isolated``: one reusable isolated child for per-file tasks (cluster workers)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from sdtool.scan import scan
from sdtool.scan.vm import DEFAULT_LIMITS
from sdtool.scan.workers import Isolated, Task

EVIL = b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R."
PLAIN = b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s."


def test_reuses_one_child_and_agrees_with_scan(tmp_path: Path) -> None:
    kwargs = {"crc": "read", "limits": asdict(DEFAULT_LIMITS)}
    files = []
    for name, data in (("evil.pkl", EVIL), ("plain.pkl", PLAIN)):
        (tmp_path / name).write_bytes(data)
        files.append(tmp_path / name)
    iso = Isolated()
    try:
        first = iso.scan(Task(str(files[0]), kwargs))
        pid = iso._worker.proc.pid if iso._worker else None
        second = iso.scan(Task(str(files[1]), kwargs))
        assert iso._worker is not None and iso._worker.proc.pid == pid
    finally:
        iso.close()
    assert first.to_json() == scan(files[0]).to_json()
    assert second.to_json() == scan(files[1]).to_json()
    assert (first.verdict, second.verdict) == ("dangerous", "safe")


def test_a_task_past_its_time_gets_a_limit_report_and_a_fresh_child(tmp_path: Path) -> None:
    f = tmp_path / "plain.pkl"
    f.write_bytes(PLAIN)
    kwargs = {"crc": "read", "limits": asdict(DEFAULT_LIMITS)}
    iso = Isolated(timeout=0.0)
    try:
        rep = iso.scan(Task(str(f), kwargs))
        assert rep.errors and "longer than" in rep.errors[0]
        assert iso._worker is None
        iso.timeout = 60.0
        assert iso.scan(Task(str(f), kwargs)).verdict == "safe"
    finally:
        iso.close()
