"""What the batch commands share: option checks and the cluster runner (lazily imported)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from sdtool.cluster import Cluster


def check_batch_options(
    *,
    as_json: bool = False,
    as_jsonl: bool = False,
    cache_dir: Path | None = None,
    no_cache: bool = False,
    resume: bool = False,
) -> None:
    """Usage errors for contradicting batch options (exit 2)."""
    if as_json and as_jsonl:
        raise click.UsageError("choose one of --json and --jsonl")
    if cache_dir is not None and no_cache:
        raise click.UsageError("--cache DIR and --no-cache contradict each other")
    if resume and no_cache:
        raise click.UsageError("--resume keeps its records in the cache: drop --no-cache")


@contextmanager
def cluster_runner(address: str | None, jobs: int = 1) -> Iterator[Cluster | None]:
    """The cluster at ``address`` (``local``: a new local one with ``jobs`` workers, or one
    per core), closed on the way out; None without ``address``. distributed is imported only
    here."""
    if address is None:
        yield None
        return
    import os

    from sdtool.cluster import Cluster

    with Cluster(address, workers=jobs if jobs > 1 else os.cpu_count() or 2) as cluster:
        yield cluster
