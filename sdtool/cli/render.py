"""Shared output primitives: every byte printed by sdtool goes through here or a command module.

Text that comes from files (tensor names, metadata, globals) is attacker-controlled: ``escape``
makes control characters visible and neutralises rich markup before anything is printed.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape as rich_escape

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


def escape(text: object, limit: int | None = None) -> str:
    """Printable text: control/bidi characters as \\xNN / \\uNNNN, optionally cut to ``limit``."""
    s = str(text)
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    return _CONTROL.sub(lambda m: _esc_char(m.group()), s)


def _esc_char(c: str) -> str:
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def markup(text: object, limit: int | None = None) -> str:
    """``escape`` plus rich-markup escaping, for text placed inside rich renderables."""
    return rich_escape(escape(text, limit))


class _Console(Console):
    """rich's Console, except that a closed pipe (``| head``) reaches main() as BrokenPipeError
    (exit 141) instead of rich's own SystemExit(1), which would read as "findings"."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def console(stderr: bool = False) -> Console:
    """A rich console; plain (no colour, no wrapping surprises) when not on a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    return _Console(
        file=stream, highlight=False, soft_wrap=True, width=None if stream.isatty() else 120
    )


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: int) -> str:
    """859520964 -> '859.52M'."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def print_json(data: Any) -> None:
    """Write ``data`` as indented JSON to stdout (non-ASCII kept, control chars JSON-escaped)."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def error(message: object) -> None:
    """One escaped error line on stderr: ``sdtool: <file>: <problem>``."""
    click.echo(f"sdtool: {escape(message)}", err=True)


def warn(message: str) -> None:
    """One escaped warning line on stderr."""
    click.echo(f"sdtool: warning: {escape(message)}", err=True)
