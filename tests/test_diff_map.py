"""sdtool diff through mapped windows: the same results as reading, bounded and closed maps,
and a file that shrinks after opening is one error line, exit 2."""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdtool import diff, open_model
from sdtool.cli.main import main
from sdtool.errors import TruncatedFile
from sdtool.ops import diff as diff_mod

NAN_A = np.array([0x7FC00000, 0x7FC00001, 0xFFC12345, 0x3F800000], np.uint32).view(np.float32)
NAN_B = np.array([0x7FC00000, 0x7FC00002, 0xFFC12345, 0x7FC00000], np.uint32).view(np.float32)


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two files with every kind of pair: equal, changed, a dtype change, NaN payloads, all
    at offsets within a page, one at an odd offset (after a 3-byte tensor), one larger than
    many windows (with the small pieces the tests set) and than a page."""
    rng = np.random.default_rng(7)
    big = rng.standard_normal(3000).astype(np.float32)
    tuned = big.copy()
    tuned[[0, 1999, 2000, 2999]] += np.float32(0.5)
    wide = rng.standard_normal(1500).astype(np.float64)
    a: dict[str, np.ndarray] = {
        "a.odd": np.arange(3, dtype=np.uint8),  # puts the tensors after it at odd offsets
        "b.big": big,
        "c.equal": wide,
        "d.nan": NAN_A,
        "e.half": big[:1100],
        "f.ids": np.arange(77, dtype=np.int64),
    }
    a["g.bytes"] = rng.integers(0, 256, 5000, dtype=np.uint8)  # after a.odd: an odd offset
    changed = a["g.bytes"].copy()
    changed[4321] ^= 1
    b = dict(a, **{"b.big": tuned, "d.nan": NAN_B, "e.half": big[:1100].astype(np.float16)})
    b["g.bytes"] = changed
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return pa, pb


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 100 elements, tasks (and so windows) of 300: b.big spans 10 windows."""
    monkeypatch.setattr(diff_mod, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(diff_mod, "TASK_PIECES", 3)


class Maps:
    """Records every window ``_map`` makes (length, the map) and how many were open at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
        self.made: list[tuple[int, mmap.mmap]] = []
        self.calls = 0
        self.most_open = 0
        self.fail = fail  # every map fails as on a file system that cannot map
        self._lock = threading.Lock()
        real = diff_mod._map

        def record(fd: int, offset: int, length: int) -> mmap.mmap:
            with self._lock:
                self.calls += 1
                if self.fail:
                    raise OSError(19, "No such device")  # ENODEV: this file system cannot map
                mm = real(fd, offset, length)
                self.made.append((length, mm))
                self.most_open = max(self.most_open, sum(not m.closed for _, m in self.made))
                return mm

        monkeypatch.setattr(diff_mod, "_map", record)

    def all_closed(self) -> bool:
        return all(m.closed for _, m in self.made)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("tolerant", [False, True])
def test_mapped_and_read_agree(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    small_pieces: None,
    workers: int,
    fast: bool,
    tolerant: bool,
) -> None:
    monkeypatch.setattr(diff_mod, "_workers", lambda: workers)
    a, b = _pair(tmp_path)
    with open_model(a) as m:  # the layout the test means to exercise
        spans = {n: t.file_span for n, t in m.tensors.items()}
    assert all(s is not None and s[0] % mmap.PAGESIZE for s in spans.values())
    assert spans["g.bytes"] is not None and spans["g.bytes"][0] % 2
    maps = Maps(monkeypatch)
    mapped = diff(a, b, fast=fast, dtype_tolerant=tolerant)
    assert len(maps.made) >= 2 * 10 and maps.all_closed()  # b.big alone is 10 windows a side
    assert maps.most_open <= 2 * workers  # each worker holds one window a side
    maps.fail, maps.calls = True, 0
    read = diff(a, b, fast=fast, dtype_tolerant=tolerant)
    assert 2 <= maps.calls <= 2 * workers  # a file that cannot be mapped is read from then on
    assert mapped == read
    assert mapped.to_json() == read.to_json()
    by = {t.name: t for t in mapped.tensors}
    assert by["c.equal"].status == by["f.ids"].status == by["a.odd"].status == "equal"
    assert by["b.big"].status == "changed" and by["d.nan"].status == "changed"
    assert by["e.half"].status == "dtype" and by["e.half"].counted_as == "dtype"
    assert by["g.bytes"].status == "changed"
    if not fast:
        assert by["b.big"].changed == 4 and by["b.big"].max_abs_diff == pytest.approx(0.5)
        assert (by["d.nan"].changed, by["d.nan"].nan_mismatch) == (2, 1)
        assert (by["g.bytes"].changed, by["g.bytes"].max_abs_diff) == (1, 1)
        assert by["e.half"].changed == 0
    assert mapped.identical is False


def test_windows_are_bounded_by_a_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the real piece size, a tensor of 3 tasks is mapped in 3 windows a side, none
    longer than a task's bytes and the page before them."""
    n = diff_mod.CHUNK_ELEMENTS * diff_mod.TASK_PIECES * 3 - 5
    x = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": x}, str(a))
    save_file({"x": x}, str(b))
    maps = Maps(monkeypatch)
    assert diff(a, b).identical
    bound = diff_mod.CHUNK_ELEMENTS * diff_mod.TASK_PIECES * 4 + 2 * diff_mod.WINDOW_ALIGN
    assert len(maps.made) == 6
    assert all(length <= bound for length, _ in maps.made)
    assert maps.all_closed()


def test_maps_closed_after_an_error_in_a_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_pieces: None
) -> None:
    a, b = _pair(tmp_path)
    monkeypatch.setattr(diff_mod, "_workers", lambda: 2)
    maps = Maps(monkeypatch)
    real = diff_mod._compare_piece
    calls: list[int] = []

    def boom(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 9:
            raise RuntimeError("boom")
        real(*args)

    monkeypatch.setattr(diff_mod, "_compare_piece", boom)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="boom"):
        diff(a, b)
    assert threading.active_count() == before
    assert maps.made and maps.all_closed()


@pytest.mark.parametrize("can_map", [True, False], ids=["mapped", "read"])
def test_a_file_that_shrinks_after_opening(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    small_pieces: None,
    can_map: bool,
) -> None:
    """B loses its last bytes between its opening and the comparison: TruncatedFile naming
    the tensor, and from the CLI one line on stderr, exit 2; no map left open."""
    a, b = _pair(tmp_path)
    size = b.stat().st_size
    real_open = diff_mod.open_model

    def open_then_shrink(path: Any) -> Any:
        m = real_open(path)
        if Path(path) == b:
            os.truncate(b, size - 10)
        return m

    monkeypatch.setattr(diff_mod, "open_model", open_then_shrink)
    maps = Maps(monkeypatch, fail=not can_map)
    with pytest.raises(TruncatedFile, match=r"'g\.bytes' ends early; the file shrank"):
        diff(a, b)
    assert maps.all_closed()
    _pair(tmp_path)  # rebuilt, then shrunk again by the next opening
    assert main(["diff", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "the file shrank" in err
    assert maps.all_closed()
