"""``-`` as a file name: standard input, for ``cat m.ckpt | sdtool scan -`` (and inspect, hash).

Model formats need random access (a zip's directory sits at its end, safetensors and torch
files are read at offsets), so a pipe is spooled to a temp file first, up to a size cap
(``SDTOOL_STDIN_MAX`` bytes, default 64 GiB); the temp file is removed afterwards, also on
errors and Ctrl-C. Standard input redirected from a regular file is read in place.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO

from sdtool.errors import SdtoolError, UsageError

STDIN = "-"
DEFAULT_MAX = 64 << 30
CHUNK = 1 << 20


def is_stdin(path: str | Path) -> bool:
    """Whether ``path`` names standard input."""
    return str(path) == STDIN


def limit() -> int:
    """The most bytes read from a pipe: ``SDTOOL_STDIN_MAX`` or 64 GiB."""
    value = os.environ.get("SDTOOL_STDIN_MAX", "")
    return int(value) if value.isdigit() else DEFAULT_MAX


@contextmanager
def spooled(path: Path) -> Iterator[Path]:
    """``path`` itself, or for ``-`` a file holding standard input; errors name ``-``."""
    if not is_stdin(path):
        yield path
        return
    fd = sys.stdin.fileno()
    if stat.S_ISREG(os.fstat(fd).st_mode):  # `< file`: already random-access
        with _named_dash(Path(f"/dev/fd/{fd}")):
            yield Path(f"/dev/fd/{fd}")
        return
    import tempfile  # here: a file argument never pays for it

    cap = limit()
    # named as a model file: what is piped in is meant as one, so an empty pipe or an HTML
    # error page (a download that failed upstream) is "could not scan", never skipped as a file
    # beside the models would be
    with tempfile.NamedTemporaryFile(prefix="sdtool-stdin-", suffix=".bin") as tmp:
        try:
            _copy(sys.stdin.buffer, tmp, cap)
        except OSError as e:  # the temp folder is full (or gone): one line, exit 2
            full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            why = "the disk is full" if full else (e.strerror or str(e))
            raise SdtoolError(
                f"cannot keep standard input in a temp file under {tempfile.gettempdir()}: "
                f"{why} (set TMPDIR to a folder with room, or save it to a file first)",
                path=STDIN,
            ) from None
        with _named_dash(Path(tmp.name)):
            yield Path(tmp.name)


def _copy(source: BinaryIO, tmp: IO[bytes], cap: int) -> None:
    """Standard input into ``tmp``, refusing more than ``cap`` bytes."""
    copied = 0
    while chunk := source.read(CHUNK):
        copied += len(chunk)
        if copied > cap:
            raise UsageError(
                f"standard input is larger than {cap} bytes (SDTOOL_STDIN_MAX); "
                "save it to a file first",
                path=STDIN,
            )
        tmp.write(chunk)
    tmp.flush()


@contextmanager
def _named_dash(real: Path) -> Iterator[None]:
    """Errors about ``real`` are reported as being about ``-``."""
    try:
        yield
    except SdtoolError as e:
        if e.path is None or e.path == real:
            e.path = Path(STDIN)
        e.message = e.message.replace(str(real), STDIN)
        raise
