"""One root error; one subclass per failure a user can see.

The CLI turns any SdtoolError into one line on stderr and exit code 2. Everything else is a bug
and keeps its traceback. Messages say what is wrong, where, and what to do.
"""

from __future__ import annotations

from pathlib import Path


class SdtoolError(Exception):
    """A problem with the user's input or options, explained in one sentence."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else _as_path(path)

    def with_path(self, path: str | Path) -> SdtoolError:
        """Attach the file the error is about, unless one is already attached."""
        if self.path is None:
            self.path = _as_path(path)
        return self

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message


def _as_path(path: str | Path) -> Path:
    """``path`` as a Path; a URL stays whole (sdtool.urls.UrlPath), a Path stays itself."""
    if isinstance(path, Path):
        return path
    if "://" in path:
        from sdtool.urls import as_path

        return as_path(path)
    return Path(path)


class FileAccessError(SdtoolError):
    """The file is missing, a directory, or unreadable."""


class UnknownFormat(SdtoolError):
    """Not a model file sdtool knows (says what the first bytes look like)."""


class CorruptFile(SdtoolError):
    """A known format whose content breaks its rules (bad header, bad offsets, broken pickle)."""


class TruncatedFile(CorruptFile):
    """A known format that ends before its declared content (an interrupted download)."""


class UnsupportedDtype(SdtoolError):
    """A dtype sdtool cannot represent or was asked for by an unknown name."""


class TorchScriptFile(SdtoolError):
    """A TorchScript archive: executable code, not a state dict."""


class OutputError(SdtoolError):
    """The output cannot be written as asked (exists, same as input, unsupported extension)."""


class MissingExtra(SdtoolError):
    """An optional dependency (torch) is needed for this path and is not installed."""


class VerificationError(SdtoolError):
    """A written file does not read back equal to what was meant to be written."""


class UsageError(SdtoolError):
    """Options that do not fit together or do not fit the file."""


# -- scanning: why (part of) a file could not be scanned; reported as "could not scan", exit 2 --


class ScanError(SdtoolError):
    """Part of a file could not be scanned. ``sdtool scan`` reports it (``could not scan: ...``,
    exit 2) and keeps every finding made before it; it is never a verdict by itself."""


class ScanLimit(ScanError):
    """The file's work or byte budget ran out: the rest of the file is not analysed."""

    def __init__(self, message: str) -> None:
        super().__init__(f"could not scan: limit: {message}")


class ScanOutOfResources(ScanLimit):
    """This machine's time or memory for one file ran out: a fact about the run, not about the
    bytes (another run, on an idle or bigger machine, may finish), so never cached."""


class NotRegularFile(ScanError):
    """A named pipe, socket, device or directory: skipped by type, never opened."""


class UnsupportedArchive(ScanError):
    """An archive sdtool cannot look inside (RAR; a 7z py7zr refuses; lz4 without its package)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"unsupported archive ({kind}): {reason}; unpack it and scan the contents")
        self.kind = kind


class ScanWorkerDied(ScanError):
    """The process scanning a file died (a fault, the OOM killer) or ran past its time."""
