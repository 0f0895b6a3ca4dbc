"""Identification: what a model file is, from its header alone.

- ``tables``: the data (component signatures' meaning, families by marker keys, shapes that tell
  architectures apart, markers, quantization and LoRA rows). Rows, never code.
- ``keysets``: the key lists (package data ``signatures.json.gz``), read once.
- ``engine``: ``identify(model) -> Identity``.
- ``result``: the frozen result objects and their JSON form.

Rendering for people is in ``sdtool/cli/identity.py``.
"""

from sdtool.identify.engine import identify
from sdtool.identify.result import (
    SCHEMA,
    ComponentMatch,
    EmbeddingInfo,
    Identity,
    LoraInfo,
    Quantization,
    ShapeMismatch,
)

__all__ = [
    "SCHEMA",
    "ComponentMatch",
    "EmbeddingInfo",
    "Identity",
    "LoraInfo",
    "Quantization",
    "ShapeMismatch",
    "identify",
]
