"""What every fuzzed input goes through, and the mutations that make the inputs.

``exercise`` opens a file the way users do (open_model, read every tensor, inspect, the AutoV3
header walk, the scanner when it exists) and returns the outcome; any exception that is not an
SdtoolError escapes, which is the bug the fuzzers look for.
"""

from __future__ import annotations

import contextlib
import importlib
import random
import struct
from collections.abc import Callable
from pathlib import Path

from sdtool.errors import SdtoolError
from sdtool.formats.open import open_model
from sdtool.ops.hash import hash_file
from sdtool.ops.inspect import inspect_model

MAX_READ = 64 << 20  # tensors larger than this are not read back (the view check still runs)


def _scanner() -> Callable[[Path], object] | None:
    try:
        mod = importlib.import_module("sdtool.scan")
    except ImportError:
        return None
    fn = getattr(mod, "scan", None)
    return fn if callable(fn) else None


SCAN = _scanner()


def exercise(path: Path) -> str:
    """Open, read, inspect, hash and scan ``path``; the outcome as a short string.

    Returns ``"ok:<format>"`` or ``"refused:<ErrorClass>"``; raises anything else.
    """
    outcome: str
    try:
        with open_model(path) as m:
            for name, info in m.tensors.items():
                if info.nbytes <= MAX_READ:
                    m.read(name).tobytes()
            inspect_model(m, tensors=True, identify=False)
            outcome = f"ok:{m.format}"
    except SdtoolError as e:
        if not str(e).strip():
            raise AssertionError(f"{type(e).__name__} with an empty message") from e
        outcome = f"refused:{type(e).__name__}"
    with contextlib.suppress(SdtoolError):
        hash_file(path, algorithms=["autov3"])
    if SCAN is not None:
        SCAN(path)  # a scanner reports problems as findings; it should not raise at all
    return outcome


# -- mutations ------------------------------------------------------------------------------------

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1]


def truncate(data: bytes, n: int) -> bytes:
    return data[:n]


def flip(data: bytes, pos: int, bit: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def put_int(data: bytes, pos: int, value: int, width: int) -> bytes:
    b = bytearray(data)
    raw = (value % (1 << (8 * width))).to_bytes(width, "little")
    b[pos : pos + width] = raw[: max(0, len(b) - pos)]
    return bytes(b)


def mutate(data: bytes, rng: random.Random, steps: int = 3) -> bytes:
    """A few random edits: bit flips, interesting integers, deletions, duplications, truncation."""
    for _ in range(steps):
        if not data:
            return data
        pos = rng.randrange(len(data))
        op = rng.randrange(6)
        if op == 0:
            data = flip(data, pos, rng.randrange(8))
        elif op == 1:
            data = put_int(data, pos, rng.choice(INTERESTING), rng.choice((1, 2, 4, 8)))
        elif op == 2:
            data = data[:pos] + data[pos + rng.randrange(1, 64) :]
        elif op == 3:
            n = rng.randrange(1, 64)
            data = data[:pos] + data[pos : pos + n] * rng.randrange(2, 8) + data[pos + n :]
        elif op == 4:
            data = truncate(data, pos)
        else:
            data = data[:pos] + struct.pack("<B", rng.randrange(256)) + data[pos:]
    return data
