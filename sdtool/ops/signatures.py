"""Moved to ``sdtool.identify.tables`` (data) and ``sdtool.identify.keysets`` (key lists)."""

from sdtool.identify.keysets import (  # noqa: F401
    Signature,
    component_index,
    optional_at,
    signatures,
)
from sdtool.identify.tables import *  # noqa: F403
