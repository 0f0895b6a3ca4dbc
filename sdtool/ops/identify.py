"""Moved to the ``sdtool.identify`` package; this name stays for existing imports."""

from sdtool.identify import *  # noqa: F403
from sdtool.identify import __all__  # noqa: F401
from sdtool.identify.engine import ema_key  # noqa: F401
