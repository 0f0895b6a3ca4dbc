"""Output without importing rich, where it is byte for byte what rich prints.

rich costs ~70 ms to import, as much as the rest of ``sdtool inspect``. Off a terminal (a pipe,
a file, CI logs: no colours, and sdtool's consoles never wrap or cut lines there) what rich prints
for sdtool's markup lines and simple tables is plain text laid out by a few rules: tags dropped,
columns as wide as their widest cell, trailing spaces removed. ``Console`` and ``Table`` here
follow those rules; anything they cannot reproduce exactly (a terminal, colours forced through
the environment, a possible emoji code, a tab, an unprintable character, a title wider than its
table) is handed to rich, one print at a time, so the output never differs.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

# rich's console markup: a tag is ``[`` + a lowercase letter, #, / or @ + anything up to ``]``
# without another ``[``; backslashes before it escape it in pairs (rich.markup's grammar)
_TAGS = re.compile(r"((\\*)\[([a-z#/@][^[]*?)])")
_EMOJI_CODE = re.compile(r":\S*?:")  # rich may replace it with an emoji: leave it to rich
_TRAILING_SPACES = re.compile(r" +\n")
#: environment variables that make rich colour or lay out output that is not a terminal
_RICH_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "JUPYTER_COLUMNS", "JUPYTER_LINES")


def text_of(markup: str) -> str | None:
    """The characters rich prints for ``markup`` without colours; None when only rich can say
    (an emoji code, a tab, a character that is not printable)."""
    if "[" in markup:
        parts: list[str] = []
        pos = 0
        for m in _TAGS.finditer(markup):
            full, escapes, _ = m.groups()
            start, end = m.span()
            if start > pos:
                parts.append(markup[pos:start].replace("\\[", "["))
            pos = end
            if escapes:
                pairs, escaped = divmod(len(escapes), 2)
                parts.append("\\" * pairs)
                if escaped:  # an escaped tag is text
                    parts.append(full[len(escapes) :])
            # else a tag: styles print nothing off a terminal
        if pos < len(markup):
            parts.append(markup[pos:].replace("\\[", "["))
        text = "".join(parts)
    else:
        text = markup
    if _EMOJI_CODE.search(text) or not text.replace("\n", "").isprintable():
        return None
    return text


def cell_len(text: str) -> int:
    """Terminal columns of ``text`` as rich counts them (wide characters count 2)."""
    if text.isascii():
        return len(text)
    from rich.cells import cell_len as rich_cell_len

    return rich_cell_len(text)


def plain_possible(stream: Any) -> bool:
    """Whether rich would print to ``stream`` without colours or terminal features."""
    if sys.platform == "win32" or any(v in os.environ for v in _RICH_ENV):
        return False
    if "IPython" in sys.modules or "idlelib" in sys.modules:
        return False
    encoding = (getattr(stream, "encoding", None) or "utf-8").lower()
    if not encoding.startswith("utf"):
        return False
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return False


class Column:
    """A table column: its header and how its cells are justified ("left" or "right")."""

    def __init__(self, header: str, justify: str = "left") -> None:
        self.header = header
        self.justify = justify


class Table:
    """The part of rich.table.Table sdtool's reports use: a title above, a heavy rule under the
    header, ``│`` between columns, no outer edge (rich's HEAVY_HEAD box, show_edge=False,
    pad_edge=False); printed by ``Console.print_table``, or as a rich Table by rich."""

    def __init__(self, title: str = "") -> None:
        self.title = title
        self.columns: list[Column] = []
        self.rows: list[tuple[str, ...]] = []

    def add_column(self, header: str, justify: str = "left") -> None:
        self.columns.append(Column(header, justify))

    def add_row(self, *cells: str) -> None:
        self.rows.append(cells)

    def lines(self) -> list[str] | None:
        """The table as rich lays it out off a terminal; None when only rich can say."""
        cols = self.columns
        if not cols or any(c.justify not in ("left", "right") for c in cols):
            return None
        grid: list[list[str]] = []
        for row in [tuple(c.header for c in cols), *self.rows]:
            if len(row) != len(cols):
                return None
            texts = [text_of(cell) for cell in row]
            if any(t is None or "\n" in t for t in texts):
                return None
            grid.append(texts)  # type: ignore[arg-type]
        lens = [[cell_len(t) for t in row] for row in grid]
        widths = [max(row[i] for row in lens) for i in range(len(cols))]
        if min(widths) == 0:
            return None
        last = len(cols) - 1
        table_width = sum(widths) + 2 * last + last
        out: list[str] = []
        title = text_of(self.title)
        if title is None or any(cell_len(t) > table_width for t in title.split("\n")):
            return None
        if self.title:
            out.extend(title.split("\n"))

        def line(texts: list[str], sep: str) -> str:
            cells = []
            for i, (t, c) in enumerate(zip(texts, cols, strict=True)):
                if c.justify == "right":
                    t = t.rstrip()
                    t = " " * (widths[i] - cell_len(t)) + t
                else:
                    t = t + " " * (widths[i] - cell_len(t))
                cells.append((" " if i else "") + t + (" " if i < last else ""))
            return sep.join(cells)

        out.append(line(grid[0], "┃"))
        out.append("╇".join("━" * (w + (i > 0) + (i < last)) for i, w in enumerate(widths)))
        out.extend(line(row, "│") for row in grid[1:])
        return out

    def to_rich(self) -> Any:
        """The same table as a rich Table."""
        from rich.table import Table as RichTable

        t = RichTable(
            title=self.title or None,
            title_justify="left",
            title_style="bold",
            show_edge=False,
            pad_edge=False,
        )
        for c in self.columns:
            t.add_column(c.header, justify=c.justify)  # type: ignore[arg-type]
        for row in self.rows:
            t.add_row(*row)
        return t


class Console:
    """Prints sdtool's markup lines and ``Table``s as rich would off a terminal, without rich;
    hands every print it cannot reproduce exactly to a rich console on the same stream."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self._rich: Any = None
        self.plain = plain_possible(file)

    def rich(self) -> Any:
        """The rich console this one stands for (imported on first need)."""
        if self._rich is None:
            from sdtool.cli.render import rich_console

            self._rich = rich_console(self.file)
        return self._rich

    def print(self, markup: str = "") -> None:
        text = text_of(markup) if self.plain else None
        if text is None or any(ln.rstrip(" ") != ln.rstrip() for ln in text.split("\n")):
            self.rich().print(markup)
            return
        self._write(text + "\n")

    def print_table(self, table: Table) -> None:
        lines = table.lines() if self.plain else None
        if lines is None:
            from sdtool.cli.render import print_table

            print_table(self.rich(), table.to_rich())
            return
        self._write("".join(ln + "\n" for ln in lines))

    def _write(self, text: str) -> None:
        try:
            self.file.write(_TRAILING_SPACES.sub("\n", text))
            self.file.flush()
        except BrokenPipeError:
            # as render's rich console: reach main() (exit 141), not click's EPIPE handling
            # (which matches the errno and exits 1, read as "findings")
            raise BrokenPipeError from None
