"""JSON Lines output for batch commands: one object per file, written whole as it finishes.

Hubs run sdtool in job queues and read its output as it comes; a crash or Ctrl-C must leave only
whole lines. Each record is encoded first and written with one ``os.write`` of the complete line
(retried on a short write, which only a full pipe or disk causes), then nothing is buffered: a
reader sees every finished file at once, and never half a record.

Every record carries the same envelope (schema ``sdtool.<command>.jsonl/1``, docs/scale.md):
``schema``, ``sdtool`` (version), ``path`` and whatever the command adds (``size``, ``sha256``
when computed, ``ruleset`` for scan, the verdict or result, the findings).
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any, BinaryIO

from sdtool import __version__


class JsonLines:
    """Writes records to ``stream`` (stdout by default) one whole line at a time."""

    def __init__(self, command: str, stream: BinaryIO | None = None) -> None:
        self.schema = f"sdtool.{command}.jsonl/1"
        self._stream = stream if stream is not None else sys.stdout.buffer
        try:
            self._fd: int | None = self._stream.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            self._fd = None  # an in-memory stream (tests): write and flush it
        sys.stdout.flush()
        self.count = 0

    @property
    def head(self) -> str:
        """How every line begins: the envelope, up to where the command's fields go (for
        lines spliced from stored JSON, ``write_lines``)."""
        return json.dumps({"schema": self.schema, "sdtool": __version__})[:-1] + ", "

    def write(self, record: dict[str, Any]) -> None:
        """Write one record: the envelope first, then the command's fields."""
        self._put(self.line(record).encode("ascii"), 1)

    def line(self, record: dict[str, Any]) -> str:
        """One record's line (for ``write_lines``): the envelope, the fields, a newline."""
        full = {"schema": self.schema, "sdtool": __version__, **record}
        # ASCII: valid UTF-8 whatever bytes a file or member name holds (lone surrogates escaped)
        return json.dumps(full, ensure_ascii=True, default=str) + "\n"

    def write_lines(self, lines: list[str]) -> None:
        """Write whole lines, each already JSON beginning with ``head`` and ending in a
        newline, ASCII only: the results that are ready together go out in one write."""
        if lines:
            self._put("".join(lines).encode("ascii"), len(lines))

    def _put(self, data: bytes, count: int) -> None:
        if self._fd is None:
            self._stream.write(data)
            self._stream.flush()
            self.count += count
            return
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.count += count
