"""sdtool: inspect, scan, convert and prune model files without running code from them.

The public API; everything else is internal. Names load on first use so that ``import sdtool``
stays cheap (torch is never imported here).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_API = {
    "open_model": "sdtool.formats.open",
    "ModelFile": "sdtool.model",
    "TensorInfo": "sdtool.model",
    "SdtoolError": "sdtool.errors",
    "scan": "sdtool.scan",
    "convert": "sdtool.ops.convert",
    "prune": "sdtool.ops.prune",
    "identify": "sdtool.identify",
    "hash_file": "sdtool.ops.hash",
    "diff": "sdtool.ops.diff",
    "inspect": "sdtool.ops.inspect",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sdtool' has no attribute {name!r}")
