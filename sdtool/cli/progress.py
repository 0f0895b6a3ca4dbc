"""Progress bars: on stderr, and only when stderr is a terminal (never in pipes, logs or CI).

``--json`` does not change this: the JSON goes to stdout, the bar to the terminal's stderr.
tqdm is imported only when a bar is actually shown.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sdtool.cli.render import escape


def enabled() -> bool:
    """Whether bars may be drawn: stderr is an interactive terminal."""
    return sys.stderr.isatty()


class ByteBar:
    """A byte counter fed by ``progress(done, total)`` callbacks (the one progress shape)."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def absolute(self, done: int, total: int) -> None:
        """The ``progress(done, total)`` callback."""
        if total and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()
        self.bar.update(done - self.bar.n)


@contextmanager
def byte_bar(desc: str | None = None, total: int | None = None) -> Iterator[ByteBar | None]:
    """A bar counting bytes, or None when bars are off (pass None as the progress callback)."""
    if not enabled():
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=total or None,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=None if desc is None else escape(desc, 40),
        leave=False,
        file=sys.stderr,
    ) as bar:
        yield ByteBar(bar)
