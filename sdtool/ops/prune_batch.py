"""``prune_batch``: prune many files into an output folder (``sdtool prune IN... --out-dir``).

Each input is found as convert's batch finds them (files as given, folders searched for model
files, sub-folders mirrored), pruned to ``<stem>-pruned[-emaonly|-noema][-<dtype>].safetensors``
in the output folder, one failure not stopping the rest. Resumable as convert batches are
(sdtool.ops.batch).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from sdtool.cache import default_dir
from sdtool.errors import UsageError
from sdtool.ops.batch import Resume, options_digest, run_batch, run_one
from sdtool.ops.convert import Ignored, batch_inputs
from sdtool.ops.outname import derived
from sdtool.ops.prune import PruneOptions, prune
from sdtool.results import JsonKey, Result, json_key, rounded
from sdtool.vocab import Progress, dtype_name

SCHEMA = "sdtool.prune-batch/1"


@dataclass(frozen=True)
class PruneItem(Result):
    """One file of a prune batch. ``report`` is the file's ``sdtool prune --json`` document
    (docs/prune.md) when it was pruned."""

    path: Path
    output: Path
    status: str = "pruned"  # pruned | skipped | resumed | failed
    error: str | None = None
    input_bytes: int = 0
    output_bytes: int = 0
    tensors: int = 0
    verified: bool = False
    seconds: float = field(default=0.0, metadata=json_key(as_=rounded))
    output_sha256: str | None = None  # when computed (resume records it)
    report: dict[str, Any] | None = None


@dataclass(frozen=True)
class PruneBatchResult(Result):
    """Every file's item, in input order, and the folder files left out (as convert's)."""

    JSON_SCHEMA: ClassVar[str | None] = SCHEMA
    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = ("results", "summary", "ignored")

    results: list[PruneItem]
    ignored: list[Ignored] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def summary(self) -> dict[str, int]:
        """Files per status and files left out."""
        return {
            **{s: self.count(s) for s in ("pruned", "skipped", "resumed", "failed")},
            "ignored": len(self.ignored),
        }


def prune_one(
    src: Path,
    dst: Path,
    opts: PruneOptions,
    owner: Path,
    resume: Resume | None,
    progress: Progress | None = None,
) -> PruneItem:
    """Prune one file of a batch; every failure becomes a ``failed`` item."""

    def work(size: int, overwrite: bool) -> tuple[PruneItem, Path | None]:
        t0 = time.perf_counter()
        res = prune(src, dst, replace(opts, progress=progress, overwrite=overwrite))
        w = res.write
        item = PruneItem(
            src,
            dst,
            status="pruned" if w is not None else "planned",
            input_bytes=size,
            output_bytes=w.nbytes if w is not None else 0,
            tensors=w.tensors if w is not None else len(res.plan.tensors),
            verified=bool(w and w.verified),
            seconds=time.perf_counter() - t0,
            report=res.to_json(),
        )
        return item, dst if w is not None else None

    return run_one(PruneItem, src, dst, owner, resume, opts.overwrite, work, "prune")


def prune_batch(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    options: PruneOptions,
    *,
    jobs: int = 1,
    file_progress: Callable[[Path], Progress | None] | None = None,
    on_result: Callable[[PruneItem], None] | None = None,
    resume: bool = False,
    cache_dir: str | Path | None = None,
) -> PruneBatchResult:
    """Prune files and folders into ``out_dir`` (``options``: prune's; ``bake_vae`` is refused:
    one file's VAE is for one model). ``on_result`` sees each item as it finishes; ``resume``
    skips outputs recorded as written and unchanged (sdtool.ops.batch)."""
    if options.bake_vae is not None:
        raise UsageError("bake_vae= prunes one model: not a batch into out_dir=DIR")
    if jobs < 1:
        raise UsageError(f"jobs={jobs} must be at least 1")
    ema_tag = {"only": "emaonly", "drop": "noema"}.get(options.ema, "")
    tags = ["pruned", ema_tag, dtype_name(options.dtype.code) if options.dtype else ""]
    found, ignored = batch_inputs([Path(p) for p in inputs], Path(out_dir))
    pairs = [(s, d.parent / derived(s, None, tags).name) for s, d in found]
    owner: dict[Path, Path] = {}
    for s, d in pairs:
        owner.setdefault(d, s)
    base = replace(options, progress=None)
    rs = Resume(Path(cache_dir) if cache_dir else default_dir(), options_digest(base, verb="prune"))
    cancel = threading.Event()

    def one(pair: tuple[Path, Path]) -> PruneItem:
        src, dst = pair
        shown = file_progress(src) if file_progress is not None else None

        def cb(done: int, total: int) -> None:
            if cancel.is_set():
                raise KeyboardInterrupt
            if shown is not None:
                shown(done, total)

        return prune_one(src, dst, base, owner[dst], rs if resume else None, cb)

    results = run_batch(pairs, one, jobs=jobs, on_result=on_result, cancel=cancel)
    return PruneBatchResult(results, ignored)
