"""Make tests/fuzz importable as plain modules (seeds, harness) for its tests and run_long.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
