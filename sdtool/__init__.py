"""sdtool: inspect, scan, convert and prune model files without running code from them.

The public API; everything else is internal. Names load on first use so that ``import sdtool``
stays cheap (torch is never imported here).
"""

from __future__ import annotations

import importlib
import sys
import types
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
    "extract": "sdtool.ops.prune",
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


class _Package(types.ModuleType):
    """``sdtool.scan`` stays the scan function after the ``sdtool.scan`` package is imported
    (the import system records a subpackage on its parent under the same name; for the names
    of the public API that record is ignored, the subpackage stays in sys.modules)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
