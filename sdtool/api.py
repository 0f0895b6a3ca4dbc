"""The public functions whose library form needs more than the ops module offers.

``prune`` and ``extract`` take a path (or an open ModelFile) and keyword options spelled as
everywhere in the API (``dtype=``, ``overwrite=``, ``progress=``), like ``convert``; OUT is
optional (a name derived beside the input). The commands call these same functions.

Example:
    >>> from sdtool import prune
    >>> prune("sd15.ckpt", ema="only", dtype="fp16").write.path
    PosixPath('sd15-pruned-emaonly-fp16.safetensors')
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sdtool.ops.outname import derived

if TYPE_CHECKING:
    from sdtool.model import ModelFile
    from sdtool.ops.prune import PruneResult

#: the output-name tag of each ``ema`` mode of prune
_EMA_TAG = {"keep": "", "only": "emaonly", "drop": "noema"}


@contextmanager
def _opened(src: str | Path | ModelFile) -> Iterator[ModelFile]:
    """``src`` itself when already open (left open), else opened here and closed after."""
    from sdtool.formats.open import open_model
    from sdtool.model import ModelFile

    if isinstance(src, ModelFile):
        yield src
        return
    with open_model(src) as model:
        yield model


def _dtype(name: str | None) -> object:
    from sdtool import dtypes

    return dtypes.parse(name) if name else None


def prune(
    src: str | Path | ModelFile,
    out: str | Path | None = None,
    *,
    ema: str = "keep",
    allow_partial_ema: bool = False,
    drop: Iterable[str] = (),
    bake_vae: str | Path | ModelFile | None = None,
    fix_clip: bool = False,
    dtype: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    verify: bool = False,
    on_overflow: str = "fail",
    progress: Callable[[int], None] | None = None,
) -> PruneResult:
    """Keep the model weights of ``src``, drop training state, write ``out`` (any format).

    Args:
        src: a model file (any format sdtool reads) or an open ModelFile.
        out: the output (format by extension); None: ``<stem>-pruned[-emaonly|-noema]
            [-<dtype>].safetensors`` beside ``src``; an existing folder: that name inside it.
        ema: "keep" the EMA copy, "only" put its weights under the model keys, or "drop" it.
        allow_partial_ema: with ema="only", UNet keys without an EMA twin keep their weights.
        drop: parts to drop: vae, text-encoder, unet, ema.
        bake_vae: a VAE file whose weights replace the checkpoint's.
        fix_clip: rewrite broken CLIP position_ids as int64 arange(77).
        dtype: cast floating tensors (fp32, fp16, bf16, fp8_e4m3fn, fp8_e5m2).
        dry_run, overwrite, verify, on_overflow, progress: as in ``convert``.

    Returns:
        PruneResult: the plan (before/after, what was dropped and why) and what was written.

    Raises:
        UsageError: options that contradict each other or do not fit the file.
    """
    from sdtool.ops.prune import PruneOptions, parse_drop
    from sdtool.ops.prune import prune as prune_model

    with ExitStack() as stack:
        model = stack.enter_context(_opened(src))
        vae = stack.enter_context(_opened(bake_vae)) if bake_vae is not None else None
        options = PruneOptions(
            ema=ema,
            allow_partial_ema=allow_partial_ema,
            dtype=_dtype(dtype),  # type: ignore[arg-type]
            drop=parse_drop(drop),
            bake_vae=vae,
            fix_clip=fix_clip,
        )
        target = derived(model.path, out, ["pruned", _EMA_TAG.get(ema, ""), dtype or ""])
        return prune_model(
            model,
            target,
            options,
            dry_run=dry_run,
            overwrite=overwrite,
            verify=verify,
            on_overflow=on_overflow,
            progress=progress,
        )


def extract(
    src: str | Path | ModelFile,
    out: str | Path | None = None,
    *,
    component: str,
    ema: bool = False,
    dtype: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    verify: bool = False,
    on_overflow: str = "fail",
    progress: Callable[[int], None] | None = None,
) -> PruneResult:
    """Write one component of ``src`` to ``out`` with its prefix stripped (standalone layout).

    Args:
        src: a model file or an open ModelFile.
        out: the output; None: ``<stem>-<component>[-ema][-<dtype>].safetensors`` beside
            ``src``; an existing folder: that name inside it.
        component: unet, vae, text-encoder, or one encoder by name (clip-l, clip-g, ...).
        ema: with component="unet", take the EMA weights.
        dtype, dry_run, overwrite, verify, on_overflow, progress: as in ``prune``.

    Example:
        >>> extract("sd15.ckpt", component="vae").write.path
        PosixPath('sd15-vae.safetensors')
    """
    from sdtool.ops.prune import extract as extract_model

    with _opened(src) as model:
        target = derived(model.path, out, [component, "ema" if ema else "", dtype or ""])
        return extract_model(
            model,
            target,
            component,
            dtype=_dtype(dtype),  # type: ignore[arg-type]
            ema=ema,
            dry_run=dry_run,
            overwrite=overwrite,
            verify=verify,
            on_overflow=on_overflow,
            progress=progress,
        )
