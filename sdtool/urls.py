"""Names of remote files (``https://``, ``http://``, ``hf://``), carried where a Path is expected.

A command argument or a report names a file by a ``Path``; a URL in a plain Path loses one of
its slashes (``https:/host/x``). ``UrlPath`` is a Path whose ``str()`` is the URL as given, so
messages, reports and the name patterns identify matches (``.name``) work unchanged. Its bytes
are only ever read through ``sdtool.remote`` (imported only when an argument is a URL); this
module stays tiny because the CLI's argument type uses it.
"""

from __future__ import annotations

import re
from pathlib import Path, PosixPath
from typing import Any

_URL = re.compile(r"^(?:https?|hf)://", re.IGNORECASE)


def is_url(name: object) -> bool:
    """Whether ``name`` is a remote file: a UrlPath, or a string starting https://, http://, hf://."""
    return isinstance(name, UrlPath) or (isinstance(name, str) and bool(_URL.match(name)))


class UrlPath(PosixPath):
    """A URL in a Path's clothes: ``str()`` and ``os.fspath()`` give the URL unchanged.

    It is never opened as a local file by sdtool's readers (they see ``is_url`` first); paths
    derived from it (``.parent``) are plain paths.
    """

    _url: str

    def __new__(cls, url: str, *rest: Any) -> UrlPath:
        self = super().__new__(cls, url)
        self._url = url
        return self

    def __init__(self, url: str, *rest: Any) -> None:  # Python >= 3.12 initialises here
        if hasattr(PosixPath, "with_segments"):
            super().__init__(url)  # type: ignore[call-arg]
        self._url = url

    def with_segments(self, *segments: Any) -> Path:  # Python >= 3.12: derived paths
        return PosixPath(*segments)

    @property
    def url(self) -> str:
        """The URL exactly as given."""
        return self._url

    @property
    def name(self) -> str:
        """The file name: the URL's last path segment, without a query or an ``@REV``."""
        url = getattr(self, "_url", None)
        if not url:
            return super().name
        last = url.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        return last.split("@", 1)[0] if url.lower().startswith("hf://") else last

    def __str__(self) -> str:
        return getattr(self, "_url", None) or super().__str__()

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"UrlPath({str(self)!r})"


def as_path(name: str | Path) -> Path:
    """``name`` as a Path, a URL as a UrlPath (the CLI's file arguments go through this)."""
    if isinstance(name, Path):
        return name
    return UrlPath(name) if is_url(name) else Path(name)
