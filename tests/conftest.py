"""Shared fixtures: every test builds its inputs in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


@pytest.fixture
def corpus() -> Path:
    """../shared/corpus, or skip with the reason."""
    if not (CORPUS / "manifest.json").is_file():
        pytest.skip(f"the shared corpus is absent ({CORPUS})")
    return CORPUS


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sub_env() -> dict[str, str]:
    """Environment for test subprocesses: they import this checkout's sdtool."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(autouse=True)
def _private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result cache (on by default) lives in a fresh folder per test, never in ~/.cache."""
    monkeypatch.setenv("SDTOOL_CACHE_DIR", str(tmp_path_factory.mktemp("sdtool-cache")))
