"""``write/direct.py``: the O_DIRECT writer gives the bytes a plain write gives (any sizes, the
padded and truncated tail), falls back to plain writes where the filesystem refuses O_DIRECT,
and hands a failed write to the calling thread."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from sdtool.write import direct
from sdtool.write.direct import ALIGN, DirectWriter, can_direct

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")


def _pieces() -> list[bytes]:
    sizes = [5, ALIGN, 3 * ALIGN + 7, 0, 64 * 1024 + 1, 1, 2 * ALIGN]
    return [bytes((i * 31 + j) % 251 for j in range(n)) for i, n in enumerate(sizes)]


def _write(path: Path, pieces: list[bytes], *, prefix: bytes = b"") -> DirectWriter:
    with open(path, "wb", buffering=0) as f:
        f.write(prefix)
        w = DirectWriter(f.fileno(), chunk=4 * ALIGN, buffers=2)
        for p in pieces:
            w.write(p)
        w.close()
        assert f.tell() == len(prefix) + sum(map(len, pieces))
        f.write(b"after")  # the position is the data's end; the file's flags are restored
    return w


def test_bytes_and_size_equal_a_plain_write(tmp_path: Path) -> None:
    pieces = _pieces()
    out = tmp_path / "d.bin"
    w = _write(out, pieces)
    assert out.read_bytes() == b"".join(pieces) + b"after"
    assert w.end == sum(map(len, pieces))
    # an aligned prefix written before (a header) stays where it was
    pre = bytes(range(256)) * (ALIGN // 256)
    _write(out, pieces, prefix=pre)
    assert out.read_bytes() == pre + b"".join(pieces) + b"after"


def test_o_direct_is_used_where_the_filesystem_takes_it(tmp_path: Path) -> None:
    """On a filesystem that accepts O_DIRECT (the test's tmp folder, when it does), the writer
    keeps it to the end; the tail's padding is truncated away."""
    out = tmp_path / "probe"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    os.close(fd)
    import mmap

    buf = mmap.mmap(-1, ALIGN)
    fd = os.open(out, os.O_WRONLY | os.O_DIRECT)
    try:
        os.pwrite(fd, buf, 0)
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT writes")
    finally:
        os.close(fd)
    w = _write(tmp_path / "d.bin", [b"x" * (5 * ALIGN + 3)])
    assert w.direct
    assert (tmp_path / "d.bin").stat().st_size == 5 * ALIGN + 3 + len(b"after")


def test_falls_back_to_plain_writes_on_einval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that refuses O_DIRECT writes (EINVAL, as tmpfs or some FUSE do): the same
    bytes, written plainly from the refused write on."""
    real = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: memoryview, at: int) -> int:
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(at)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, at)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)
    pieces = _pieces()
    out = tmp_path / "d.bin"
    w = _write(out, pieces)
    assert not w.direct and refused == [0]
    assert out.read_bytes() == b"".join(pieces) + b"after"


def test_a_failed_write_reaches_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: memoryview, at: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct.os, "pwrite", full)
    with open(tmp_path / "d.bin", "wb", buffering=0) as f:
        w = DirectWriter(f.fileno(), chunk=ALIGN, buffers=2)
        with pytest.raises(OSError) as e:
            for _ in range(64):  # more than the buffers: the error stops the writer early
                w.write(b"y" * ALIGN)
            w.close()
        assert e.value.errno == errno.ENOSPC
        w.abort()  # after an error: returns, no thread left waiting
        assert not w._thread.is_alive()


def test_can_direct_wants_a_regular_file_at_an_aligned_position(tmp_path: Path) -> None:
    with open(tmp_path / "d.bin", "wb", buffering=0) as f:
        assert can_direct(f.fileno())
        f.write(b"abc")
        assert not can_direct(f.fileno())
    r, w = os.pipe()
    try:
        assert not can_direct(w)
    finally:
        os.close(r)
        os.close(w)
