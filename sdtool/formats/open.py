"""``open_model``: sniff the content, hand the file to the reader for its format."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sdtool.errors import CorruptFile, SdtoolError, UnknownFormat, UsageError
from sdtool.formats.sniff import not_a_model, sniff
from sdtool.model import ModelFile
from sdtool.vocab import COMPRESSED, Format


def open_model(path: str | Path, *, key: str | None = None) -> ModelFile:
    """Open a model file lazily: headers and pickles are read, tensor bytes are not.

    Args:
        path: any file; the format is decided by content, never by extension. Also a shard
            index (``*.safetensors.index.json``), or a folder holding one shard set (indexed or
            not) or exactly one ``.safetensors`` file (a diffusers component folder).
        key: a dotted path to the sub-dict whose tensors to use instead of the state dict.

    Raises:
        SdtoolError (FileAccessError, UnknownFormat, CorruptFile, TruncatedFile,
        TorchScriptFile ...) with a one-line explanation naming the file.

    Example:
        >>> with open_model("model.ckpt") as m:
        ...     print(len(m.tensors), m.format)
    """
    p = Path(path)
    if p.is_dir() or p.name.endswith(".json"):
        from sdtool.formats.shards import open_folder

        opened = open_folder(p)
        if opened is not None:
            return opened
    kind, head, size = sniff(p)
    try:
        if kind is Format.SAFETENSORS:
            from sdtool.formats.safetensors import read_safetensors

            return read_safetensors(p)
        if kind in (Format.ZIP, Format.PICKLE, Format.TAR):
            from sdtool.formats.torchfile import read_torch

            return read_torch(p, kind, key=key)
        if kind is Format.GGUF:
            from sdtool.formats.gguf import read_gguf

            return read_gguf(p)
        if kind is Format.NPY:
            from sdtool.formats.numpyfile import read_npy

            return read_npy(p)
    except SdtoolError as e:
        raise e.with_path(p) from None
    except (OSError, ValueError, EOFError, MemoryError, RecursionError) as e:
        raise CorruptFile(f"cannot be read ({type(e).__name__}: {e})", path=p) from None
    if kind in COMPRESSED or kind is Format.SEVENZIP:
        raise UnknownFormat(
            f"a {kind.value}-compressed file, not a model file I know (decompress it first, "
            "or use `sdtool scan` to check what is inside)",
            path=p,
        )
    raise not_a_model(p, head, size)


@contextlib.contextmanager
def opened(src: str | Path | ModelFile, *, key: str | None = None) -> Iterator[ModelFile]:
    """``src`` as an open ModelFile for the block: a path is opened (and closed afterwards), a
    ModelFile is used as it is (and left open). Every verb takes ``path | ModelFile`` this way.
    """
    if isinstance(src, ModelFile):
        if key is not None:
            raise UsageError("key= applies when opening a path; open the ModelFile with key=")
        yield src
        return
    with open_model(src, key=key) as m:
        yield m
