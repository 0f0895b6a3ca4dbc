"""Corpus tests print a tally of what they saw in pytest's closing summary."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

_TALLIES: dict[str, list[str]] = {}


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Lines a corpus test wants shown at the end of the run (under its own name)."""
    lines: list[str] = []
    yield lines
    if lines:
        _TALLIES[request.node.name] = lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, lines in _TALLIES.items():
        terminalreporter.write_sep("-", f"corpus tally: {name}")
        for line in lines:
            terminalreporter.write_line(line)
