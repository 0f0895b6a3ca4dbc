"""Shared output primitives: every byte printed by sdtool goes through here or a command module.

Text that comes from files (tensor names, metadata, globals) is attacker-controlled: ``escape``
makes control characters visible and neutralises rich markup before anything is printed.
"""

from __future__ import annotations

import os
import re
import sys
from functools import cache
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console

    from sdtool.cli.plain import Console as PlainConsole

# rich loads on first output, not on import: ``sdtool COMMAND --help`` never pays for it

#: the control and bidi characters ``escape`` writes as \xNN / \uNNNN: none is printable
#: for ``str.isprintable`` (categories Cc, Cf, Zl, Zp), so printable text needs no search
CONTROL = r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]"


@cache
def _control() -> re.Pattern[str]:
    """CONTROL compiled for the first text that is not printable (~3M instructions, its
    ranges; most runs print none)."""
    return re.compile(CONTROL)


def escape(text: object, limit: int | None = None) -> str:
    """Printable text: control/bidi characters as \\xNN / \\uNNNN, optionally cut to ``limit``."""
    s = str(text)
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    if s.isprintable():
        return s
    return _control().sub(lambda m: _esc_char(m.group()), s)


def _esc_char(c: str) -> str:
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def markup(text: object, limit: int | None = None) -> str:
    """``escape`` plus rich-markup escaping, for text placed inside rich renderables."""
    return markup_escape(escape(text, limit))


# what rich.markup.escape does, without importing rich: a backslash before every ``[`` that
# could open a tag (backslashes already there doubled), and a lone trailing backslash doubled
_TAG_LIKE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def markup_escape(text: str) -> str:
    """``text`` as rich markup that prints it literally (rich.markup.escape's rules; a test
    compares the two)."""
    text = _TAG_LIKE.sub(lambda m: f"{m.group(1)}{m.group(1)}\\{m.group(2)}", text)
    if text.endswith("\\") and not text.endswith("\\\\"):
        return text + "\\"
    return text


@cache
def _console_class() -> type[Console]:
    from rich.console import Console

    class _Console(Console):
        """rich's Console, except that a closed pipe (``| head``) reaches main() as
        BrokenPipeError (exit 141) instead of rich's own SystemExit(1), which would read as
        "findings"; and rows of tables lose their padding at line ends off a terminal."""

        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

        def _render_buffer(self, buffer: Any) -> str:
            text = super()._render_buffer(buffer)
            return text if self.is_terminal else trailing_spaces.sub("\n", text)

    trailing_spaces = re.compile(r" +\n")
    return _Console


#: the width of output that goes to a pipe or file without COLUMNS: lines are never cut or
#: wrapped there (grep and diff see whole findings and names)
UNLIMITED = 10_000


def columns(stream: Any = None) -> int | None:
    """The width to lay out for: ``COLUMNS`` if set, else the terminal's, else None (a pipe)."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    stream = sys.stdout if stream is None else stream
    try:
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        pass
    return None


def console(stderr: bool = False) -> Console:
    """A rich console; plain (no colour) when not on a terminal, and as wide as the output
    needs there: piped output is never cut or wrapped unless ``COLUMNS`` asks for a width."""
    return rich_console(sys.stderr if stderr else sys.stdout)


def rich_console(stream: Any) -> Console:
    """``console()`` writing to ``stream``."""
    return _console_class()(
        file=stream, highlight=False, soft_wrap=True, width=columns(stream) or UNLIMITED
    )


def report_console() -> PlainConsole:
    """A console for reports of markup lines and simple tables that prints them without
    importing rich where rich's output is plain text (sdtool.cli.plain), through rich elsewhere."""
    from sdtool.cli.plain import Console as PlainConsole

    return PlainConsole(sys.stdout)


def print_table(out: Console, table: Any) -> None:
    """Print a rich table whole: when it is wider than the output, its rows run past the width
    rather than have a name cut with "…" or folded inside an identifier."""
    from rich.measure import Measurement

    if out.width >= UNLIMITED:  # a pipe: nothing to fit
        out.print(table)
        return
    need = Measurement.get(out, out.options.update(max_width=UNLIMITED), table).maximum
    if need > out.width:
        wide = _console_class()(file=out.file, highlight=False, soft_wrap=True, width=need)
        wide.print(table)
    else:
        out.print(table)


def wrap_width(out: Console) -> int | None:
    """The width text should be wrapped to on ``out`` (None: do not wrap)."""
    return None if out.width >= UNLIMITED else out.width


def wrap(text: str, width: int | None, first: str = "", rest: str = "") -> list[str]:
    """``text`` as lines of at most ``width`` columns, broken only at spaces: a word longer
    than the line (a dotted global, a path) stays whole on a line of its own."""
    if width is None:
        return [first + text]
    import textwrap

    return textwrap.wrap(
        text,
        width=max(width, 20),
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [first]


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
    import json

    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


#: how library messages spell a choice (Python keyword arguments) -> how the CLI spells it.
#: The library names its parameters (``overwrite=True``); a user of the command line reads
#: the flag. Generic rules follow the table: ``name=True`` -> ``--name``, ``name=`` -> ``--name``.
FLAG_SPELLING: dict[str, str] = {
    'ema="only"': "--ema-only",
    'ema="drop"': "--no-ema",
    "ema=True": "--ema-only",
    "carry_metadata=False": "--no-metadata",
    "out_dir=": "--out-dir ",
    "bake_vae:": "--bake-vae:",
    "key=...": "--key",
}


@cache
def _flag_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """``name=True`` and ``name=`` of the parameters that are flags: compiled by the first
    error message, not by every command's start."""
    flag_true = re.compile(r"\b([a-z][a-z0-9_]*)=True\b")
    flag_value = re.compile(
        r"\b(key|drop|dtype|component|to|jobs|on_overflow|metadata|bake_vae"
        r"|method|density|block_weights|rank|conv_rank|sv_ratio|sv_fro|sv_cumulative"
        r"|clamp_quantile|quant|max_shard_size|fp8_format)= ?"
    )
    return flag_true, flag_value


def flags(message: str) -> str:
    """A library message with parameter spellings turned into the CLI's flags."""
    for python, flag in FLAG_SPELLING.items():
        message = re.sub(r"(?<![\w])" + re.escape(python), flag, message)
    flag_true, flag_value = _flag_patterns()
    message = flag_true.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)
    return flag_value.sub(lambda m: "--" + m.group(1).replace("_", "-") + " ", message)


def error(message: object) -> None:
    """One escaped error line on stderr: ``sdtool: <file>: <problem>`` (flags spelled as flags)."""
    click.echo(f"sdtool: {escape(flags(str(message)))}", err=True)


def warn(message: str) -> None:
    """One escaped warning line on stderr."""
    click.echo(f"sdtool: warning: {escape(message)}", err=True)
