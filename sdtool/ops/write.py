"""``write_model``: one streaming write of a plan to a file, atomically, optionally verified.

The one entry point every command that writes a model uses (convert, prune, extract). Callers
build a plan (a sequence of ``OutTensor``: name, source file, tensor info, output dtype,
optionally computed values) and call::

    result = write_model(plan, Path("out.safetensors"), metadata={"format": "pt"}, verify=True)

The format follows the extension (``OUT_FORMATS``). Output goes to a temp file beside the
target and is renamed only when everything, verification included, succeeded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdtool.errors import OutputError, SdtoolError, UsageError, VerificationError
from sdtool.formats.plan import Chunks, OutTensor, SourceFds, read_exact
from sdtool.model import ModelFile
from sdtool.ops.atomic import atomic_output

__all__ = [
    "OUT_FORMATS",
    "CastOverflow",
    "OutTensor",
    "WriteResult",
    "output_format",
    "write_model",
]

#: output extension -> writer. .safetensors streams; the torch formats go through torch.save.
OUT_FORMATS: dict[str, str] = {
    ".safetensors": "safetensors",
    ".sft": "safetensors",
    ".ckpt": "torch",
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
}
ON_OVERFLOW = ("fail", "warn")


class CastOverflow(UsageError):
    """A cast turned finite values into inf (float8_e4m3fn: saturated) and the caller said fail."""

    def __init__(self, message: str, overflows: dict[str, int], **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.overflows = overflows


@dataclass
class WriteResult:
    """What ``write_model`` wrote."""

    path: Path
    format: str  # "safetensors" or "torch"
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


def write_model(
    plan: Sequence[OutTensor],
    out: Path,
    *,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    verify: bool = False,
    on_overflow: str = "fail",
    progress: Callable[[int], None] | None = None,
) -> WriteResult:
    """Write ``plan`` to ``out`` (format by extension), atomically.

    Args:
        plan: the output tensors, in any order (safetensors output is ordered its own way).
        out: the target; never one of the plan's sources, never overwritten unless ``overwrite``.
        metadata: the safetensors ``__metadata__`` (str -> str); torch output has no place for it.
        verify: reopen the written file and compare every tensor bitwise with what was meant
            (the source's bytes, or its torch-exact cast) and the metadata.
        on_overflow: ``fail`` (raise CastOverflow, nothing written) or ``warn`` (write, and
            report the counts in ``WriteResult.overflows``).
        progress: called with the number of bytes just written.

    Raises:
        OutputError, CastOverflow, VerificationError, MissingExtra (torch output without torch),
        and the reader's errors (TruncatedFile ...). The target is untouched on any error.
    """
    out = Path(out)
    fmt = output_format(out)
    if on_overflow not in ON_OVERFLOW:
        raise UsageError(f"--on-overflow must be one of {', '.join(ON_OVERFLOW)}")
    names = [t.name for t in plan]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise OutputError(f"the output would have tensors named twice: {dup[:5]}", path=out)
    sources = {t.source.path for t in plan}
    with atomic_output(out, inputs=sources, overwrite=overwrite) as f:
        try:
            if fmt == "safetensors":
                from sdtool.formats.safetensors import write_safetensors

                overflows = write_safetensors(plan, f, metadata=metadata, progress=progress)
            else:
                from sdtool.formats.torchwrite import write_torch

                overflows = write_torch(plan, f, progress=progress)
        except SdtoolError as e:
            raise e.with_path(out) from None
        if overflows and on_overflow == "fail":
            raise _overflow_error(overflows, plan, out)
        tmp = Path(str(f.name))
        if verify:
            verify_output(plan, tmp, metadata if fmt == "safetensors" else None)
        size = os.fstat(f.fileno()).st_size
    return WriteResult(
        path=out,
        format=fmt,
        tensors=len(plan),
        nbytes=size,
        copied=sum(1 for t in plan if t.copy_span is not None) if fmt == "safetensors" else 0,
        cast=sum(1 for t in plan if t.is_cast),
        overflows=overflows,
        metadata_written=bool(metadata) and fmt == "safetensors",
        verified=verify,
    )


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
        "--on-overflow warn to write it anyway",
        overflows,
        path=out,
    )


def verify_output(
    plan: Sequence[OutTensor], written: Path, metadata: dict[str, str] | None
) -> None:
    """Reopen ``written`` and compare every tensor's bytes (and the metadata) with the plan.

    The expected bytes are recomputed from the sources (their bytes, or the torch-exact cast),
    piece by piece, so memory stays bounded. Raises VerificationError on the first difference.
    """
    from sdtool.formats.open import open_model

    with open_model(written) as m, SourceFds() as fds:
        want = {t.name for t in plan}
        if set(m.tensors) != want:
            missing, extra = sorted(want - set(m.tensors)), sorted(set(m.tensors) - want)
            raise VerificationError(
                f"the output's tensors differ from the plan (missing {missing[:3]}, "
                f"unexpected {extra[:3]})"
            )
        out_fd = os.open(written, os.O_RDONLY)
        try:
            for t in plan:
                _verify_tensor(t, m, out_fd, fds.get(t))
        finally:
            os.close(out_fd)
        if metadata is not None and m.metadata != metadata:
            raise VerificationError("the output's metadata differs from what was written")


def _verify_tensor(t: OutTensor, m: ModelFile, out_fd: int, src_fd: int) -> None:
    info = m.tensors[t.name]
    if info.dtype != t.dtype or info.shape != t.shape:
        raise VerificationError(
            f"tensor {t.name!r} reads back as {info.describe()}, expected {t.dtype} {list(t.shape)}"
        )
    span = info.file_span
    flat = None if span is not None else m.read_info(info, t.name).reshape(-1)
    pos = 0
    for piece in Chunks(t, src_fd):
        expect = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
        if span is not None:
            buf = bytearray(expect.size)
            read_exact(out_fd, memoryview(buf), span[0] + pos, t)
            got = np.frombuffer(buf, np.uint8)
        else:
            assert flat is not None
            n = piece.size
            start = pos // t.dtype.itemsize
            got = np.ascontiguousarray(flat[start : start + n]).view(np.uint8)
        if not np.array_equal(got, expect):
            first = int(np.flatnonzero(got != expect)[0]) + pos
            raise VerificationError(
                f"tensor {t.name!r} differs from its source at element {first // t.dtype.itemsize}"
            )
        pos += expect.size
