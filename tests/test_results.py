"""The one ``to_json`` (sdtool/results.py): declared spellings, and no hand-written copies."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from sdtool.results import JsonKey, Result, head, json_key, named, rounded, rows
from sdtool.vocab import Format

SDTOOL = Path(__file__).resolve().parents[1] / "sdtool"


@dataclass(frozen=True)
class _Inner(Result):
    tensors: int
    bytes: int


@dataclass(frozen=True)
class _Doc(Result):
    JSON_SCHEMA: ClassVar[str | None] = "sdtool.test/1"
    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = (
        ("path", "src"), "format", "total", ("count", "names", len),
        ("names", "names", head(2)), "pairs", "parts", "seconds", "inner", "listing",
    )  # fmt: skip

    src: Path
    format: Format
    names: tuple[str, ...]
    pairs: list[tuple[str, str]] = field(metadata=json_key(as_=rows("source", "target")))
    parts: dict[str, _Inner] = field(metadata=json_key(as_=named("name")))
    seconds: float = field(metadata=json_key(as_=rounded))
    inner: _Inner = field(metadata=json_key(inline=True))
    listing: tuple[str, ...] = field(default=(), metadata=json_key(when="listed"))
    listed: bool = False

    @property
    def total(self) -> int:
        return sum(p.tensors for p in self.parts.values())


def test_declared_spellings() -> None:
    doc = _Doc(
        Path("/m/a.safetensors"), Format.TORCH_ZIP, ("a", "b", "c"), [("x", "y")],
        {"vae": _Inner(2, 8)}, 1.23456, _Inner(1, 4),
    )  # fmt: skip
    want = {
        "schema": "sdtool.test/1",
        "path": "/m/a.safetensors",
        "format": "torch-zip",
        "total": 2,
        "count": 3,
        "names": ["a", "b"],
        "pairs": [{"source": "x", "target": "y"}],
        "parts": [{"name": "vae", "tensors": 2, "bytes": 8}],
        "seconds": 1.235,
        "tensors": 1,
        "bytes": 4,
    }
    assert doc.to_json() == want
    assert list(doc.to_json()) == list(want)  # the table's order
    listed = _Doc(**{**doc.__dict__, "listing": ("t",), "listed": True})
    assert listed.to_json()["listing"] == ["t"]


def test_no_hand_written_to_json() -> None:
    """Every result serialises through results.Result.to_json; the one wrapper left is
    ScanReport's, which makes names from files valid UTF-8 after it (issue 11.5)."""
    allowed = {("results.py", "Result"), ("scan/report.py", "ScanReport")}
    found = set()
    for path in SDTOOL.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"^class (\w+)|^    def to_json\(", text, re.M):
            if m.group(1):
                cls = m.group(1)
            else:
                found.add((path.relative_to(SDTOOL).as_posix(), cls))
    assert found == allowed
