"""The shared corpus: every malicious file dangerous, no benign file dangerous, and benign files
that hold only tensors and plain data rated safe. The tally goes to pytest's closing summary
(the ``tally`` fixture of tests/corpus/conftest.py) and into the assertion message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtool.scan import classify_global, scan

pytestmark = pytest.mark.corpus


def _plain_data_only(entry: dict) -> bool:
    """Benign and every global the manifest lists is allowlisted (no TorchScript, no classes)."""
    if "TorchScript" in entry["format"] or entry["format"].startswith("zip (encrypted"):
        return False
    if entry["verdict"] != "benign":
        return False
    return all(classify_global(str(m), str(n))[0] == "safe" for m, n in entry["globals"] or [])


def test_corpus_verdicts(corpus: Path, tally: list[str]) -> None:
    manifest = json.loads((corpus / "manifest.json").read_text())
    caught, missed, false_alarms, safe_ok, safe_miss = 0, [], [], 0, []
    malicious = benign = 0
    for e in manifest:
        r = scan(corpus / "files" / e["file"])
        if e["verdict"].startswith("MALICIOUS"):
            malicious += 1
            if r.verdict == "dangerous":
                caught += 1
            else:
                missed.append(f"{e['file']}: {r.verdict}")
            continue
        benign += 1
        if r.verdict == "dangerous":
            false_alarms.append(f"{e['file']}: {[f.message for f in r.findings][:3]}")
        if _plain_data_only(e):
            if r.verdict == "safe":
                safe_ok += 1
            else:
                safe_miss.append(f"{e['file']}: {r.verdict} {r.errors[:1]}")
    line = (
        f"sdtool scan: {caught}/{malicious} malicious caught, {len(false_alarms)} false alarms on "
        f"{benign} benign, {safe_ok}/{safe_ok + len(safe_miss)} plain-data files rated safe"
    )
    tally.append(line)
    assert not missed and not false_alarms and not safe_miss, (
        f"{line}\nmissed: {missed}\nfalse alarms: {false_alarms}\nnot safe: {safe_miss}"
    )
