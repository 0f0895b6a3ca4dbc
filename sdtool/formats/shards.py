"""Sharded safetensors: an index (``*.safetensors.index.json``) or a shard set read as one model.

Layout (huggingface_hub ``serialization/_base.py``, diffusers ``models/modeling_utils.py``):
shards ``{stem}-{i:05d}-of-{n:05d}.safetensors`` (1-based), an index
``{stem}.safetensors.index.json`` = ``{"metadata": {"total_size": N}, "weight_map":
{tensor: shard file}}``; a variant goes before the extension
(``diffusion_pytorch_model.fp16-00001-of-00002.safetensors``, index
``diffusion_pytorch_model.safetensors.index.fp16.json``).

``ShardedModel`` is a ``ModelFile`` whose tensors live in several files. Its ``tensors`` describe
them without file offsets (so no code can mistake an offset for one in the index file);
``read``/``read_info`` answer from the shard's own map, and ``locate(name)`` gives the shard's
``ModelFile`` and ``TensorInfo`` so writers copy bytes straight from the shard.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtool.errors import CorruptFile, FileAccessError
from sdtool.model import ContainerFacts, ModelFile, Storage, TensorInfo
from sdtool.vocab import Format

if TYPE_CHECKING:
    import numpy as np

INDEX_RE = re.compile(r"^(?P<stem>.+)\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json$")
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")
#: an index larger than this is not an index (the biggest real ones are a few hundred KB)
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ShardFacts(ContainerFacts):
    """A shard set's container facts: its index (None for a bare set), shard files, and the
    index's ``metadata.total_size``."""

    index: str | None = None
    shards: list[str] = field(default_factory=list)
    total_size: int | None = None


class ShardedModel(ModelFile):
    """Several safetensors shards read as one model (see the module docstring).

    Attributes beyond ModelFile's: ``shards`` (the opened shard files, in shard order),
    ``index`` (the index file, or None for a bare shard set), ``index_metadata`` (its
    ``metadata`` object).
    """

    def __init__(
        self,
        path: Path,
        shards: list[ModelFile],
        index: Path | None,
        index_metadata: dict[str, Any],
    ) -> None:
        tensors: dict[str, TensorInfo] = {}
        self._where: dict[TensorInfo, tuple[ModelFile, TensorInfo]] = {}
        self._by_name: dict[str, tuple[ModelFile, TensorInfo]] = {}
        for shard in shards:
            for name, info in shard.tensors.items():
                if name in tensors:
                    raise CorruptFile(
                        f"tensor {name!r} is in two shards ({self._by_name[name][0].path.name} "
                        f"and {shard.path.name})",
                        path=path,
                    )
                st = Storage(name, info.dtype, info.storage.nbytes, load=_no_load)
                wrapped = TensorInfo(info.dtype, info.shape, info.strides, info.offset, st)
                tensors[name] = wrapped
                self._where[wrapped] = (shard, info)
                self._by_name[name] = (shard, info)
        meta = dict(shards[0].metadata) if shards else {}
        for shard in shards[1:]:  # keep what every shard says alike
            meta = {k: v for k, v in meta.items() if shard.metadata.get(k) == v}
        total = index_metadata.get("total_size")
        container = ShardFacts(
            index=index.name if index else None,
            shards=[s.path.name for s in shards],
            total_size=total if isinstance(total, int) else None,
        )
        super().__init__(path, Format.SAFETENSORS, tensors, metadata=meta, container=container)
        self.shards = shards
        self.index = index
        self.index_metadata = index_metadata
        self.file_size = sum(s.file_size for s in shards)

    def locate(self, name: str) -> tuple[ModelFile, TensorInfo]:
        return self._by_name[name]

    def read_info(self, info: TensorInfo, name: str = "?") -> np.ndarray:
        hit = self._where.get(info)
        if hit is None:
            return super().read_info(info, name)
        shard, real = hit
        return shard.read_info(real, name)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        super().close()


def _no_load() -> bytes:
    raise AssertionError("a sharded model's tensors are read through ShardedModel.read_info")


def shard_files(path: Path) -> tuple[Path | None, list[Path]] | None:
    """(index or None, shard files) when ``path`` is an index file or a folder holding one shard
    set; None when it is neither (a plain file, or a folder without shards)."""
    if path.is_file():
        if INDEX_RE.match(path.name):
            return path, _from_index(path)
        return None
    if not path.is_dir():
        return None
    indexes = sorted(p for p in path.iterdir() if INDEX_RE.match(p.name) and p.is_file())
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise FileAccessError(
            f"a folder with {len(indexes)} shard indexes ({names}); name the index to open",
            path=path,
        )
    if indexes:
        return indexes[0], _from_index(indexes[0])
    sets: dict[tuple[str, str], list[Path]] = {}
    for p in sorted(path.iterdir()):
        if m := SHARD_RE.match(p.name):
            sets.setdefault((m["stem"], m["n"]), []).append(p)
    if not sets:
        return None
    if len(sets) > 1:
        raise FileAccessError(
            f"a folder with {len(sets)} shard sets and no index; name one shard's index", path=path
        )
    ((stem, n), files), *_ = sets.items()
    want = [path / f"{stem}-{i:05d}-of-{n}.safetensors" for i in range(1, int(n) + 1)]
    missing = [p.name for p in want if p not in files]
    if missing:
        raise FileAccessError(
            f"the shard set {stem} is incomplete: {', '.join(missing[:3])} missing", path=path
        )
    return None, want


def _from_index(index: Path) -> list[Path]:
    data = read_index(index)
    files = list(dict.fromkeys(data["weight_map"].values()))
    out = []
    for name in sorted(files):
        p = index.parent / name
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CorruptFile(f"the index names a shard outside its folder: {name!r}", path=index)
        if not p.is_file():
            raise FileAccessError(f"shard {name} named in the index is missing", path=index)
        out.append(p)
    return out


def read_index(index: Path) -> dict[str, Any]:
    """The parsed index, checked: ``weight_map`` a dict of str -> str, ``metadata`` a dict."""
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise CorruptFile(
            f"an index of {index.stat().st_size} bytes is not a shard index", path=index
        )
    try:
        data = json.loads(index.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFile(f"the shard index is not JSON ({e})", path=index) from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
    ):
        raise CorruptFile("the shard index has no weight_map of tensor -> file", path=index)
    meta = data.get("metadata", {})
    if not isinstance(meta, dict):
        raise CorruptFile("the shard index's metadata is not an object", path=index)
    return {"weight_map": wm, "metadata": meta}


def open_sharded(path: Path, index: Path | None, files: list[Path]) -> ShardedModel:
    """Open every shard (headers only) and check them against the index."""
    from sdtool.formats.safetensors import read_safetensors

    shards = [read_safetensors(p) for p in files]
    meta: dict[str, Any] = {}
    if index is not None:
        data = read_index(index)
        meta = data["metadata"]
        have = {n: s.path.name for s in shards for n in s.tensors}
        for name, file in data["weight_map"].items():
            if have.get(name) != file:
                where = f"in {have[name]}" if name in have else "in no shard"
                raise CorruptFile(
                    f"the index puts tensor {name!r} in {file} but it is {where}", path=index
                )
    return ShardedModel(path, shards, index, meta)


def open_folder(path: Path) -> ModelFile | None:
    """open_model's answer for a folder or an index file; None to let sniffing decide."""
    found = shard_files(path)
    if found is not None:
        index, files = found
        try:
            return open_sharded(path, index, files)
        except CorruptFile as e:
            raise e.with_path(path) from None
    if not path.is_dir():
        return None
    singles = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())
    if len(singles) == 1:
        from sdtool.formats.safetensors import read_safetensors

        return read_safetensors(singles[0])
    if not singles:
        return None  # sniffing says "is a directory"
    names = ", ".join(p.name for p in singles[:3])
    raise FileAccessError(
        f"a folder with {len(singles)} .safetensors files ({names}...); name the file to open",
        path=path,
    )


def expand_shards(paths: list[Path] | tuple[Path, ...]) -> list[Path]:
    """Each path, or the shard files of a shard index / shard folder in its place (hash per
    shard); paths that are neither stay as they are (their own errors come later)."""
    out: list[Path] = []
    for p in paths:
        try:
            found = shard_files(Path(p))
        except (FileAccessError, CorruptFile):
            found = None
        out.extend(found[1] if found else [p])
    return out
