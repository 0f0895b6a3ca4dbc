"""Atomic output: success renames, every failure leaves neither target nor temp file."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from sdtool.errors import OutputError
from sdtool.write.atomic import TEMP_SUFFIX, atomic_output


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def test_success_renames(tmp_path: Path) -> None:
    out = tmp_path / "o.bin"
    with atomic_output(out) as f:
        f.write(b"hello")
        assert not out.exists()
    assert out.read_bytes() == b"hello"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    out = tmp_path / "o.bin"
    with pytest.raises(type(exc)), atomic_output(out) as f:
        f.write(b"partial")
        raise exc
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_failure_keeps_old_target(tmp_path: Path) -> None:
    out = tmp_path / "o.bin"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(out, overwrite=True) as f:
        f.write(b"new")
        raise RuntimeError
    assert out.read_bytes() == b"old"


def test_disk_full_is_explained(tmp_path: Path) -> None:
    out = tmp_path / "o.bin"
    with pytest.raises(OutputError, match="disk is full"), atomic_output(out):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert _leftovers(tmp_path) == [] and not out.exists()


def test_no_overwrite_without_flag(tmp_path: Path) -> None:
    out = tmp_path / "o.bin"
    out.write_bytes(b"old")
    with pytest.raises(OutputError, match="overwrite=True"), atomic_output(out):
        pass
    with atomic_output(out, overwrite=True) as f:
        f.write(b"new")
    assert out.read_bytes() == b"new"


def test_same_as_input_refused_even_with_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(b"data")
    link = tmp_path / "hard.bin"
    link.hardlink_to(src)
    for target in (src, link, tmp_path / "." / "in.bin"):
        with (
            pytest.raises(OutputError, match="input"),
            atomic_output(target, inputs=[src], overwrite=True),
        ):
            pass
    assert src.read_bytes() == b"data"


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"), atomic_output(tmp_path / "no" / "o"):
        pass


def test_mode_like_a_normal_file(tmp_path: Path) -> None:
    normal = tmp_path / "normal"
    normal.write_bytes(b"")
    out = tmp_path / "o.bin"
    with atomic_output(out) as f:
        f.write(b"x")
    assert out.stat().st_mode & 0o777 == normal.stat().st_mode & 0o777
