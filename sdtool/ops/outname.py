"""Output names derived from the input, for commands whose OUT is optional.

``model.ckpt`` converted -> ``model.safetensors``; with ``--dtype fp16`` ->
``model-fp16.safetensors``; pruned EMA-only to fp16 -> ``model-pruned-emaonly-fp16.safetensors``;
the VAE extracted -> ``model-vae.safetensors``. The output lands beside the input, or inside OUT
when OUT is an existing folder. An output that would be the input itself is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from sdtool.errors import OutputError
from sdtool.vocab import MODEL_SUFFIXES  # extensions dropped before the tags are added

_SEPARATORS = tuple(sep for sep in (os.sep, os.altsep) if sep)


def stem(path: Path) -> str:
    """``model`` for ``model.ckpt``; names without a known model extension stay whole."""
    name = path.name
    for suffix in MODEL_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def derived(
    src: str | Path, out: str | Path | None, tags: Iterable[str], *, ext: str = ".safetensors"
) -> Path:
    """Where to write: ``out`` if it names a file; else ``<stem>[-tag...]<ext>`` beside ``src``
    (or inside ``out`` when it is an existing folder).

    Raises OutputError when the derived name is the input itself (give OUT explicitly).
    """
    src = Path(src)
    if out is not None and not Path(out).is_dir():
        if str(out).endswith(_SEPARATORS):  # meant as a folder (Path drops the slash)
            raise OutputError("no such output folder (create it first)", path=Path(out))
        return Path(out)
    name = "-".join([stem(src), *[t for t in tags if t]]) + ext
    folder = Path(out) if out is not None else src.parent
    target = folder / name
    if target.resolve() == src.resolve():
        raise OutputError(
            f"the output would be named {target.name}, which is the input itself; give OUT",
            path=src,
        )
    return target
