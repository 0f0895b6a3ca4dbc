"""What torch.save's other containers say about themselves (legacy, TAR, plain pickle) and the
raw spans of their storages: a torch zip, the common case, needs none of these, so
``formats/torchfile.py`` loads them on its other paths and ``inspect`` of a zip neither creates
nor pays for their 4 dataclasses (~16M instructions); torchfile.py still names them."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from sdtool.model import ContainerFacts
from sdtool.records import dataclass


@dataclass(frozen=True)
class LegacyFacts(ContainerFacts):
    """A legacy torch file (five pickles, then the raw storages)."""

    protocol_version: Any = None
    sys_info: Any = None
    byteorder: str = "little"
    storages: int = 0
    pickle_protocol: int = 0
    trailing_bytes: int = 0


@dataclass(frozen=True)
class TarFacts(ContainerFacts):
    """torch's oldest TAR format."""

    storages: int = 0
    members: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PickleFacts(ContainerFacts):
    """A plain pickle."""

    pickle_protocol: int = 0


@dataclass(frozen=True)
class RawSpan:
    """Bytes no unpickler reads: a storage (an int64 element count, then the elements) or the
    fixed fields of a TAR tensor record. ``offset`` is where the span starts."""

    key: Any  # the storage key (or the record's index for TAR tensor records)
    offset: int
    length: int  # bytes, count field included

    @property
    def end(self) -> int:
        return self.offset + self.length
