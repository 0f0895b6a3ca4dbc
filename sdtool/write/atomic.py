"""Atomic output: a temp file beside the target, fsync, ``os.replace``; nothing half-written.

Every writer (convert, prune, extract) writes through ``atomic_output`` so that Ctrl-C, a full
disk, a bug or a failed verification leaves the target as it was (absent, or the old file)
and no temp file behind. The temp file lives in the target's folder so the final rename is a
same-filesystem atomic replace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from sdtool.errors import OutputError

TEMP_SUFFIX = ".sdtool-tmp"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def check_output(target: Path, *, inputs: Iterable[Path] = (), overwrite: bool = False) -> None:
    """Raise OutputError unless ``target`` may be written: not an input, not existing (unless
    ``overwrite``), not a directory, in an existing folder."""
    for src in inputs:
        with contextlib.suppress(OSError):
            if target.exists() and os.path.samefile(target, src):
                raise OutputError(
                    f"is also the input {str(src)!r}; write to another file "
                    "(sdtool never modifies an input)",
                    path=target,
                )
    if target.is_dir():
        raise OutputError("is a directory; give a file name", path=target)
    if target.exists() and not overwrite:
        raise OutputError("already exists; pass overwrite=True to replace it", path=target)
    if not target.parent.is_dir():
        raise OutputError(f"its folder {str(target.parent)!r} does not exist", path=target)


@contextlib.contextmanager
def atomic_output(
    target: Path, *, inputs: Iterable[Path] = (), overwrite: bool = False
) -> Iterator[BinaryIO]:
    """Yield an unbuffered binary file that becomes ``target`` only if the block succeeds.

    The file is a temp file beside ``target``; on success it is fsync'd and renamed over
    ``target`` (and the folder fsync'd); on any exception, KeyboardInterrupt included, it is
    removed and the exception propagates (a full disk becomes an OutputError that says so).

    Example:
        >>> with atomic_output(Path("out.safetensors"), inputs=[src]) as f:
        ...     f.write(b"...")
    """
    target = Path(target)
    inputs = list(inputs)
    check_output(target, inputs=inputs, overwrite=overwrite)
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent
        )
    except OSError as e:
        raise OutputError(f"cannot create a file beside it: {e.strerror or e}", path=target) from e
    tmp = Path(tmp_name)
    done = False
    try:
        _set_default_mode(fd)
        os.close(fd)
        with open(tmp, "wb", buffering=0) as f:  # by name, so f.name is the temp path
            try:
                yield f
            except OSError as e:
                if e.errno in _DISK_FULL:
                    raise OutputError("the disk is full; nothing was written", path=target) from e
                raise
            try:
                os.fsync(f.fileno())
            except OSError as e:
                raise OutputError(f"cannot write: {e.strerror or e}", path=target) from e
        # re-check just before the rename: the target may have appeared meanwhile
        check_output(target, inputs=inputs, overwrite=overwrite)
        os.replace(tmp, target)
        done = True
        _fsync_dir(target.parent)
    finally:
        if not done:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _read_umask() -> int:
    # read once at import: os.umask can only be read by setting it, which races with threads
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _set_default_mode(fd: int) -> None:
    """mkstemp makes 0600 files; give the output the mode a normal new file would get."""
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~_UMASK)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
