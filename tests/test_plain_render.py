"""sdtool.cli.plain prints report lines and tables without rich: byte for byte what rich prints
(issue 10, item 4: rich's import is as costly as the rest of ``sdtool inspect``). rich is the
oracle here, on random markup, file-like text and tables."""

from __future__ import annotations

import io
import random

import pytest
from rich.markup import escape as rich_escape

from sdtool.cli import plain
from sdtool.cli.render import markup, markup_escape, print_table, rich_console

PIECES = [
    "a", "Z", "0", " ", "  ", ".", "_", ":", "::", ":smile:", ":x:", "[", "]", "\\", "\\\\",
    "[bold]", "[/bold]", "[/]", "[red]", "[link=x]", "[@click]", "[#fff]", "[1]", "[a b]",
    "é", "—", "…", "漢字", "😀", "\t", "\n", "\x00", "\x1b", "\u200b", "model.diffusion_model",
]  # fmt: skip
TAGGED = ["[bold]{}[/bold]", "[yellow]{}[/yellow]", "[dim]{}[/]", "[red]{}[/red]", "{}"]


def _text(rng: random.Random, n: int = 6) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, n)))


def _markup(rng: random.Random) -> str:
    """What sdtool prints: its own tags around escaped text from files, or raw markup."""
    if rng.random() < 0.2:
        return _text(rng)  # raw (may be invalid markup for rich: skipped below)
    return rng.choice(TAGGED).format(markup(_text(rng)))


def _rich_prints(fn: object) -> str | None:
    out = io.StringIO()
    try:
        fn(out)  # type: ignore[operator]
    except Exception as e:  # invalid raw markup: rich refuses, nothing to compare
        if type(e).__name__ == "MarkupError":
            return None
        raise
    return out.getvalue()


def test_markup_escape_is_richs() -> None:
    rng = random.Random(3)
    for _ in range(3000):
        s = _text(rng, 10)
        assert markup_escape(s) == rich_escape(s), repr(s)


@pytest.mark.parametrize("columns", [None, "30"])
def test_print_is_richs(columns: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if columns:
        monkeypatch.setenv("COLUMNS", columns)
    rng = random.Random(5)
    plain_paths = 0
    for _ in range(1500):
        m = rng.choice(["\n", ""]) + _markup(rng) + rng.choice(["", "  ", " x"])
        expected = _rich_prints(lambda f, m=m: rich_console(f).print(m))
        if expected is None:
            continue
        out = io.StringIO()
        con = plain.Console(out)
        con.print(m)
        assert out.getvalue() == expected, repr(m)
        plain_paths += con._rich is None
    assert plain_paths > 500, plain_paths  # most lines never needed rich


@pytest.mark.parametrize("columns", [None, "40"])
def test_tables_are_richs(columns: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if columns:
        monkeypatch.setenv("COLUMNS", columns)
    rng = random.Random(9)
    plain_paths = 0
    for _ in range(400):
        ncols = rng.randint(1, 5)
        title = rng.choice(["", "\nBy dtype", "\nMetadata (3 keys)", "T", "\n" + _markup(rng)])
        t = plain.Table(title)
        for _ in range(ncols):
            t.add_column(rng.choice(["name", "dtype", "tensors", "x", "a longer header"]),
                         justify=rng.choice(["left", "right"]))  # fmt: skip
        for _ in range(rng.randint(0, 6)):
            t.add_row(*(_markup(rng) if rng.random() < 0.7 else f"{rng.randint(0, 10**9):,}"
                        for _ in range(ncols)))  # fmt: skip
        expected = _rich_prints(lambda f, t=t: print_table(rich_console(f), t.to_rich()))
        if expected is None:
            continue
        out = io.StringIO()
        con = plain.Console(out)
        con.print_table(t)
        assert out.getvalue() == expected, (title, [c.header for c in t.columns], t.rows)
        plain_paths += con._rich is None
    assert plain_paths > 100, plain_paths


def test_a_terminal_or_forced_colour_goes_to_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not plain.Console(Tty()).plain
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert not plain.Console(io.StringIO()).plain


def test_escape_skips_the_search_for_printable_text_only() -> None:
    """``escape`` returns printable text as it is: every character its class escapes is
    non-printable, so the answer is the class's substitution for every code point, alone
    and inside text, and the regex is compiled only for text that is not printable."""
    import re

    from sdtool.cli import render

    pattern = re.compile(render.CONTROL)
    slow = lambda s: pattern.sub(lambda m: render._esc_char(m.group()), s)  # noqa: E731
    render._control.cache_clear()
    assert render.escape("printable: é, 字, a b") == "printable: é, 字, a b"
    assert render._control.cache_info().currsize == 0
    for o in range(0x110000):
        c = chr(o)
        if pattern.match(c):
            assert not c.isprintable(), hex(o)
        if o < 0x3000 or o % 97 == 0:
            for s in (c, f"a{c}b"):
                assert render.escape(s) == slow(s), hex(o)
