"""``sdtool scan`` through main(argv): exit codes, directories, --exclude, --jobs, JSON, SARIF."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from sdtool.cli.main import main
from tests.scan_payloads import asm, call_global

PAYLOAD = call_global("os", "system", proto=2)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A download folder: benign files, a misnamed payload with no extension, junk."""
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    np.save(tmp_path / "sub" / "arr.npy", np.arange(4))
    (tmp_path / "sub" / "deeper" / "weights").write_bytes(PAYLOAD)  # extension-less payload
    (tmp_path / "readme.txt").write_text("hello")  # not a model file: skipped, counted
    (tmp_path / "junk.bin").write_bytes(bytes(range(256)))  # no format sdtool reads
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["scan", *args])
    return code, capsys.readouterr().out


def test_directory_is_recursive_and_routes_by_content(tree: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out = run(capsys, str(tree))
    assert code == 1  # dangerous wins over the "not scanned" junk file
    assert "DANGEROUS" in out and "deeper/weights" in out
    assert "NOT SCANNED" in out and "junk.bin" in out  # nothing skipped silently
    assert "SKIPPED     " + str(tree / "readme.txt") + ": not a model file (text)" in out
    assert "5 files" in out and "exit 1" in out


def test_exclude_and_exit_codes(tree: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out = run(capsys, str(tree), "--exclude", "weights", "--exclude", "*.bin")
    assert code == 0 and "3 files" in out and "2 safe" in out and "1 skipped" in out
    code, _ = run(capsys, str(tree), "--exclude", "weights")
    assert code == 2  # junk.bin could not be scanned
    assert run(capsys, str(tree / "nope"))[0] == 2


def test_strict_fails_on_suspicious(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from tests.scan_payloads import EMPTY_TUPLE, GLOBAL, NEWOBJ, PROTO, STOP

    p = tmp_path / "ns.pkl"
    p.write_bytes(asm(PROTO(2), GLOBAL("argparse", "Namespace"), EMPTY_TUPLE, NEWOBJ, STOP))
    assert run(capsys, str(p))[0] == 0
    code, out = run(capsys, str(p), "--strict")
    assert code == 1 and "SUSPICIOUS" in out and "argparse.Namespace" in out


def test_json_schema(tree: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out = run(capsys, str(tree), "--json", "--jobs", "2")
    doc = json.loads(out)
    assert code == 1 and doc["exit_code"] == 1 and doc["schema"] == "sdtool.scan/2"
    assert doc["summary"]["files"] == 5 and doc["summary"]["dangerous"] == 1
    bad = next(f for f in doc["files"] if f["verdict"] == "dangerous")
    finding = bad["findings"][0]
    assert set(finding) == {
        "severity", "rule", "message", "member", "stream", "offset", "global", "usage"
    }  # fmt: skip
    assert finding["global"] == "os.system" and "REDUCE" in finding["usage"]
    assert [f["path"] for f in doc["files"]] == sorted(f["path"] for f in doc["files"])


def test_sarif(tree: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out = run(capsys, str(tree), "--sarif")
    log = json.loads(out)
    assert code == 1 and log["version"] == "2.1.0"
    run0 = log["runs"][0]
    assert run0["tool"]["driver"]["name"] == "sdtool scan"
    res = next(r for r in run0["results"] if r["level"] == "error")
    assert res["ruleId"] == "global"
    assert res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith("weights")
    assert run0["invocations"][0]["toolExecutionNotifications"]  # junk.bin not scanned


def test_json_and_sarif_together_is_a_usage_error(tree: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["scan", str(tree), "--json", "--sarif"]) == 2


def test_help_has_examples(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out = run(capsys, "--help")
    assert code == 0 and "Examples:" in out and "sdtool scan model.ckpt" in out
