"""CI-bounded fuzzing: every reader must answer a damaged file with an SdtoolError, nothing else.

The long, exhaustive run is ``python tests/fuzz/run_long.py`` (see RELIABILITY.md).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from harness import exercise, flip, mutate, truncate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from seeds import builtin_seeds, corpus_seeds

SEEDS = builtin_seeds()


def _try(tmp: Path, name: str, data: bytes) -> str:
    p = tmp / name
    p.write_bytes(data)
    try:
        return exercise(p)
    except Exception as e:  # report the input that broke a reader, then fail
        keep = Path("/tmp") / f"sdtool-fuzz-repro-{name}"
        keep.write_bytes(data)
        raise AssertionError(f"{name}: {type(e).__name__}: {e} (input kept at {keep})") from e


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_opens(tmp_path: Path, name: str) -> None:
    assert _try(tmp_path, name, SEEDS[name]).startswith("ok:")


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_truncation_at_every_offset(tmp_path: Path, name: str) -> None:
    data = SEEDS[name]
    step = max(1, len(data) // 1500)  # every offset for the small seeds, ~1500 for the TAR
    outcomes = {_try(tmp_path, name, truncate(data, n)) for n in range(0, len(data), step)}
    assert "refused:FileAccessError" not in outcomes  # every cut was read, none crashed
    assert any(o.startswith("refused:") for o in outcomes)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_bit_flips_in_headers(tmp_path: Path, name: str) -> None:
    """One flipped bit per byte across the first 384 bytes: headers, zip records, pickle heads."""
    data = SEEDS[name]
    rng = random.Random(name)
    for pos in range(min(len(data), 384)):
        _try(tmp_path, name, flip(data, pos, rng.randrange(8)))


@settings(
    max_examples=300,
    deadline=2000,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(name=st.sampled_from(sorted(SEEDS)), seed=st.integers(0, 2**32), steps=st.integers(1, 6))
def test_random_mutations(tmp_path: Path, name: str, seed: int, steps: int) -> None:
    _try(tmp_path, name, mutate(SEEDS[name], random.Random(seed), steps))


@pytest.mark.corpus
def test_corpus_truncations(tmp_path: Path, corpus: Path) -> None:
    """Each small corpus file cut at 12 places (the header region and spread over the file)."""
    for name, data in sorted(corpus_seeds(64 * 1024).items()):
        safe = name.replace("/", "_").replace(":", "_")
        cuts = sorted({1, 8, 9, 16, 64, 100, 300} | {len(data) * k // 6 for k in range(1, 6)})
        for n in cuts:
            if n < len(data):
                _try(tmp_path, safe, truncate(data, n))
