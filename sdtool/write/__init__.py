"""Writing model files: one streaming, atomic, optionally verified write of a plan.

The package holds everything that writes: ``plan`` (OutTensor: what each output tensor is and
where its values come from), ``stream`` (the I/O engine: bounded pieces, casts, kernel copies),
``cast`` (torch-exact casts), ``safetensors`` and ``torchfile`` (the two output formats;
``gguf`` writes the GGUF plans of ``ops/gguf_export.py``),
``atomic`` (temp file, fsync, rename) and ``verify`` (read back, compare bit for bit).

Every verb that writes (convert, prune, extract, and what builds on them) takes one options
object deriving from ``WriteOptions`` and ends in ``write_model``::

    result = write_model(plan, Path("out.safetensors"), WriteOptions(verify=True),
                         metadata={"format": "pt"})

The format follows the extension (``OUT_FORMATS``). Output goes to a temp file beside the
target and is renamed only when everything, verification included, succeeded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from sdtool.dtypes import DType
from sdtool.errors import OutputError, SdtoolError, UsageError
from sdtool.results import Result
from sdtool.vocab import Format, Progress, parse_dtype
from sdtool.write.atomic import atomic_output
from sdtool.write.plan import OutTensor

__all__ = [
    "OUT_FORMATS",
    "CastOverflow",
    "OutTensor",
    "WriteOptions",
    "WriteResult",
    "options_from",
    "output_format",
    "write_model",
]

#: output extension -> the output format, as vocab.Format spells it (a torch file is written as
#: a torch zip, the layout torch.save writes)
OUT_FORMATS: dict[str, str] = {
    ".safetensors": Format.SAFETENSORS.value,
    ".sft": Format.SAFETENSORS.value,
    ".ckpt": Format.TORCH_ZIP.value,
    ".pt": Format.TORCH_ZIP.value,
    ".pth": Format.TORCH_ZIP.value,
    ".bin": Format.TORCH_ZIP.value,
}
ON_OVERFLOW = ("fail", "warn")


@dataclass(frozen=True, kw_only=True)
class WriteOptions:
    """What every verb that writes shares. Verbs add their own fields in a subclass.

    Attributes:
        dtype: the cast target of floating tensors (``vocab.cast_target``); None keeps every
            dtype. A user name (``fp16``, ``keep``), a dtype code or a DType.
        overwrite: replace an existing output.
        verify: reopen the written file and compare every tensor bit for bit.
        on_overflow: ``fail`` (nothing written) or ``warn`` when a cast makes finite values inf.
        dry_run: plan and check, write nothing.
        progress: called as ``progress(bytes done, bytes total)`` while tensors are written.
    """

    dtype: DType | None = None
    overwrite: bool = False
    verify: bool = False
    on_overflow: str = "fail"
    dry_run: bool = False
    progress: Progress | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.on_overflow not in ON_OVERFLOW:
            raise UsageError(f"on_overflow must be one of {', '.join(ON_OVERFLOW)}")


Opts = TypeVar("Opts", bound=WriteOptions)


def options_from(cls: type[Opts], options: Opts | None, changes: dict[str, Any]) -> Opts:
    """``options`` (or ``cls()``) with keyword ``changes``: verbs take either or both."""
    try:
        return cls(**changes) if options is None else replace(options, **changes)
    except TypeError as e:  # an unknown keyword: say which, not a traceback
        raise UsageError(f"unknown option: {e}") from None


class CastOverflow(UsageError):
    """A cast turned finite values into inf (float8_e4m3fn: saturated) and the caller said fail."""

    def __init__(self, message: str, overflows: dict[str, int], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.overflows = overflows


@dataclass(frozen=True)
class WriteResult(Result):
    """What ``write_model`` wrote."""

    path: Path
    format: str  # "safetensors" or "torch-zip" (vocab.Format)
    tensors: int
    nbytes: int  # the output file's size
    copied: int  # tensors whose bytes moved without passing through Python
    cast: int  # tensors whose dtype changed
    overflows: dict[str, int] = field(default_factory=dict)
    metadata_written: bool = False
    verified: bool = False


def output_format(path: Path) -> str:
    """The writer for ``path``'s extension; OutputError for an extension sdtool cannot write."""
    fmt = OUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise OutputError(
            f"cannot tell the output format from the extension {Path(path).suffix or '(none)'!r}; "
            f"use one of {', '.join(OUT_FORMATS)}",
            path=path,
        )
    return fmt


class _Counter:
    """Turns the writers' byte increments into ``progress(done, total)`` calls."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self.lock:
            self.done += n
            done = self.done
        if self.progress is not None:
            self.progress(done, self.total)


def write_model(
    plan: Sequence[OutTensor],
    out: str | Path,
    options: WriteOptions | None = None,
    *,
    metadata: dict[str, str] | None = None,
    fields: dict[str, Any] | None = None,
    **changes: Any,
) -> WriteResult:
    """Write ``plan`` to ``out`` (format by extension), atomically.

    Args:
        plan: the output tensors, in any order (safetensors output is ordered its own way);
            their dtypes are final (``options.dtype`` is the verbs' business, not applied here).
        out: the target; never one of the plan's sources, never overwritten unless
            ``overwrite``.
        options: overwrite, verify, on_overflow, progress (``changes`` may give them as
            keywords instead).
        metadata: the ``__metadata__`` map (str -> str): safetensors' own; a .ckpt holds it as
            its ``__metadata__`` entry (``{"format": "pt"}`` alone is not written there).
        fields: non-tensor entries (plain data) a .ckpt gets at its top level; safetensors has
            no place for them (convert encodes them into ``metadata`` instead).

    Raises:
        OutputError, CastOverflow, VerificationError, and the reader's errors (TruncatedFile
        ...). The target is untouched on any error.
    """
    opts = options_from(WriteOptions, options, changes)
    out = Path(out)
    fmt = output_format(out)
    names = [t.name for t in plan]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise OutputError(f"the output would have tensors named twice: {dup[:5]}", path=out)
    advance = _Counter(opts.progress, sum(t.nbytes for t in plan))
    _choose_cast_kernels(plan)
    sources = {t.source.path for t in plan}
    with atomic_output(out, inputs=sources, overwrite=opts.overwrite) as f:
        try:
            if fmt == "safetensors":
                from sdtool.write.safetensors import write_safetensors

                overflows = write_safetensors(plan, f, metadata=metadata, progress=advance)
            else:
                from sdtool.write.torchfile import write_torch

                ckpt_meta = _ckpt_metadata(metadata)
                overflows = write_torch(
                    plan, f, metadata=ckpt_meta, fields=fields, progress=advance
                )
        except SdtoolError as e:
            raise e.with_path(out) from None
        if overflows and opts.on_overflow == "fail":
            raise _overflow_error(overflows, plan, out)
        tmp = Path(str(f.name))
        if opts.verify:
            from sdtool.write.verify import verify_output

            verify_output(plan, tmp, metadata if fmt == "safetensors" else _ckpt_metadata(metadata))
        size = os.fstat(f.fileno()).st_size
    return WriteResult(
        path=out,
        format=fmt,
        tensors=len(plan),
        nbytes=size,
        copied=sum(1 for t in plan if t.copy_span is not None) if fmt == "safetensors" else 0,
        cast=sum(1 for t in plan if t.is_cast),
        overflows=overflows,
        metadata_written=bool(metadata if fmt == "safetensors" else _ckpt_metadata(metadata)),
        verified=opts.verify,
    )


def _choose_cast_kernels(plan: Sequence[OutTensor]) -> None:
    """Which kernels cast: ``SDTOOL_CAST_KERNELS`` = ``numpy`` (the default: sdtool's own
    vectorised casts, peak memory well under 256 MiB), ``torch`` (torch's kernels when torch is
    installed and the write casts at least ``cast.TORCH_CAST_MIN_BYTES``: faster, but importing
    torch costs about a second and 200 MB of resident libraries) or ``auto`` (the same as torch)."""
    from sdtool.write import cast

    kernels = os.environ.get("SDTOOL_CAST_KERNELS", cast.DEFAULT_KERNELS).strip().lower()
    if kernels not in ("torch", "auto"):
        cast.use_numpy()
        return
    if sum(t.info.nbytes for t in plan if t.is_cast) >= cast.TORCH_CAST_MIN_BYTES:
        cast.use_torch()


def _ckpt_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """What of ``metadata`` a .ckpt keeps: all of it, unless it only says ``format: pt``."""
    return {} if not metadata or metadata == {"format": "pt"} else dict(metadata)


def _overflow_error(
    overflows: dict[str, int], plan: Sequence[OutTensor], out: Path
) -> CastOverflow:
    dtype = {t.name: t.dtype for t in plan}
    worst = sorted(overflows.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{n!r}: {c} values" for n, c in worst[:3])
    more = f" and {len(worst) - 3} more" if len(worst) > 3 else ""
    target = dtype[worst[0][0]]
    return CastOverflow(
        f"the cast to {target} overflows to inf in {len(worst)} tensor(s) ({shown}{more}); "
        "nothing was written. Keep a wider dtype (bf16 has fp32's range), or pass "
        'on_overflow="warn" to write it anyway',
        overflows,
        path=out,
    )
