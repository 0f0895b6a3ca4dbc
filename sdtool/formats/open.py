"""``open_model``: sniff the content, hand the file to the reader for its format."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sdtool.errors import CorruptFile, SdtoolError, UnknownFormat, UsageError
from sdtool.formats.sniff import not_a_model, sniff
from sdtool.formats.source import Input, RangeReader, input_path
from sdtool.model import ModelFile
from sdtool.urls import is_url
from sdtool.vocab import COMPRESSED, Format


def open_model(path: str | Path | RangeReader, *, key: str | None = None) -> ModelFile:
    """Open a model file lazily: headers and pickles are read, tensor bytes are not.

    Args:
        path: any file; the format is decided by content, never by extension. Also a shard
            index (``*.safetensors.index.json``), or a folder holding one shard set (indexed or
            not) or exactly one ``.safetensors`` file (a diffusers component folder). Or a URL
            (``https://``, ``http://``, ``hf://ORG/REPO/PATH[@REV]``: safetensors and torch
            files, read by HTTP range requests, see sdtool.remote), or a RangeReader.
        key: a dotted path to the sub-dict whose tensors to use instead of the state dict.

    Raises:
        SdtoolError (FileAccessError, UnknownFormat, CorruptFile, TruncatedFile,
        TorchScriptFile ...) with a one-line explanation naming the file.

    Example:
        >>> with open_model("model.ckpt") as m:
        ...     print(len(m.tensors), m.format)
    """
    if is_url(path):
        from sdtool.remote import open_url  # HTTP only when a URL is given

        reader = open_url(str(path))
        try:
            return _open_input(reader, key)
        except BaseException:
            reader.close()
            raise
    if isinstance(path, RangeReader):
        return _open_input(path, key)
    p = Path(path)
    if p.is_dir() or p.name.endswith(".json"):
        from sdtool.formats.shards import open_folder

        opened = open_folder(p)
        if opened is not None:
            return opened
    return _open_input(p, key)


def _open_input(p: Input, key: str | None) -> ModelFile:
    kind, head, size = sniff(p)
    remote = isinstance(p, RangeReader)
    if remote and kind not in (
        Format.SAFETENSORS, Format.ZIP, Format.PICKLE, Format.TAR, Format.GGUF
    ):  # fmt: skip
        if kind is Format.NPY:
            raise UnknownFormat(
                f"a {kind.value} file: reading one over HTTP is not supported; download it first",
                path=input_path(p),
            )
        raise not_a_model(input_path(p), head, size)
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
        if kind is Format.NPY and isinstance(p, Path):
            from sdtool.formats.numpyfile import read_npy

            return read_npy(p)
    except SdtoolError as e:
        raise e.with_path(input_path(p)) from None
    except (OSError, ValueError, EOFError, MemoryError, RecursionError) as e:
        raise CorruptFile(f"cannot be read ({type(e).__name__}: {e})", path=input_path(p)) from None
    if kind in COMPRESSED or kind is Format.SEVENZIP:
        raise UnknownFormat(
            f"a {kind.value}-compressed file, not a model file I know (decompress it first, "
            "or use `sdtool scan` to check what is inside)",
            path=input_path(p),
        )
    raise not_a_model(input_path(p), head, size)


def path_of(src: str | Path | ModelFile) -> Path:
    """The path of what a verb was given (a path, or an opened ModelFile)."""
    return src.path if isinstance(src, ModelFile) else Path(src)


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
