"""``python -m sdtool``."""

from sdtool.cli.main import run

run()
