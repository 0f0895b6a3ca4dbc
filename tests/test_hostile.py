"""Hostile sizes: declared lengths, shapes and fan-outs that would exhaust memory or time.

Each file is opened in a subprocess under ``RLIMIT_AS`` (1 GiB of address space: ~150 MiB is
Python + numpy) and a wall-clock timeout, through the fuzz harness's ``exercise`` (open_model,
read every tensor, inspect, AutoV3 hash walk, scan when present). It must be refused with an
SdtoolError (or opened harmlessly) without a MemoryError, a crash or a hang.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_AS = 1 << 30
TIMEOUT = 60

CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from harness import exercise
try:
    out = exercise(Path(sys.argv[3]))
except BaseException as e:  # what escaped the reader: the test reports it
    out = f"BUG:{type(e).__name__}:{str(e)[:300]}"
print(json.dumps(out))
"""


def run_limited(path: Path) -> str:
    """The harness outcome for ``path`` opened in a memory- and time-limited subprocess."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(LIMIT_AS), str(ROOT / "tests" / "fuzz"), str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-2000:]}"
    return str(json.loads(proc.stdout.strip().splitlines()[-1]))


def _st(header: dict[str, object] | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def _zip_with(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _patch_sizes(data: bytes, member: str, size: int, method: int | None = None) -> bytes:
    """Rewrite ``member``'s sizes (local and central headers) to ``size``; optionally its method."""
    b = bytearray(data)
    name = member.encode()
    for sig, size_at, method_at, name_at in (
        (b"PK\x03\x04", 18, 8, 30),
        (b"PK\x01\x02", 20, 10, 46),
    ):
        pos = b.find(sig)
        while pos >= 0:
            nlen = struct.unpack_from("<H", b, pos + (26 if sig == b"PK\x03\x04" else 28))[0]
            if bytes(b[pos + name_at : pos + name_at + nlen]) == name:
                struct.pack_into("<II", b, pos + size_at, size, size)
                if method is not None:
                    struct.pack_into("<H", b, pos + method_at, method)
            pos = b.find(sig, pos + 4)
    return bytes(b)


def _torch_zip(obj: object) -> bytes:
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _deep_list(depth: int) -> bytes:
    # push `depth` empty lists, then APPEND each onto the one below: a list nested depth deep
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def _billion_laughs(levels: int) -> bytes:
    # L0 = []; L(i) = [L(i-1), L(i-1)] via the memo: 2**levels paths through 2*levels objects
    out = bytearray(b"\x80\x02]q\x00")
    for i in range(1, levels + 1):
        out += b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i])
    return bytes(out + b".")


def _wide_dict_of_laughs(levels: int) -> bytes:
    # {"state_dict": L(levels)}: the graph walker looks for tensors in it
    inner = _billion_laughs(levels)[2:-1]
    return b"\x80\x02}X\x0a\x00\x00\x00state_dict" + inner + b"s."


HOSTILE: dict[str, bytes | None] = {
    # safetensors: header length near 2**63 (and one that wraps 8 + N past 2**64)
    "st-header-2p63.safetensors": _st(b'{"a":1}', n=2**63 - 1),
    "st-header-wrap.safetensors": _st(b'{"a":1}', n=2**64 - 8),
    # shapes whose product overflows 64 bits but whose offsets claim 4 bytes
    "st-shape-overflow.safetensors": _st(
        {"t": {"dtype": "F32", "shape": [2**62, 2**62, 4], "data_offsets": [0, 4]}}, b"\0" * 4
    ),
    # a consistent 4 TiB tensor in a 100-byte file
    "st-terabyte-tensor.safetensors": _st(
        {"t": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, b"\0" * 4
    ),
    # pickles: a forged memo index (the C unpickler would zero-fill ~32 GB)
    "memo-long-binput.pkl": b"\x80\x02N" + b"r\xf0\xff\xff\xff" + b".",
    "memo-text-put.pkl": b"(lp4000000000\n.",
    # frames and byte strings declaring exabytes
    "frame-2p62.pkl": b"\x80\x04\x95" + struct.pack("<Q", 2**62) + b"N.",
    "binbytes8-1TiB.pkl": b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"xyz.",
    "binunicode8-1TiB.pkl": b"\x80\x04\x8d" + struct.pack("<Q", 2**40) + b"xyz.",
    "long4-2GiB.pkl": b"\x80\x02\x8b" + struct.pack("<i", 2**31 - 1) + b"\0" * 16 + b".",
    "bytearray8-1TiB.pkl": b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b"xyz.",
    # nesting and fan-out
    "deep-list-200k.pkl": _deep_list(200_000),
    "deep-marks-200k.pkl": b"\x80\x02" + b"(" * 200_000 + b"N.",
    "billion-laughs-60.pkl": _billion_laughs(60),
    "laughs-in-state-dict.pkl": _wide_dict_of_laughs(60),
    # 300,000-deep tuples where they get hashed (a C-stack overflow: a segfault before the fix)
    "deep-tuple-dict-key.pkl": b"\x80\x02}" + b"N" + b"\x85" * 300_000 + b"K\x01s.",
    "deep-tuple-persid.pkl": b"\x80\x02N" + b"\x85" * 300_000 + b"Q.",
    "deep-tuple-in-set.pkl": b"\x80\x04\x8f(N" + b"\x85" * 300_000 + b"\x90.",
    "deep-mark-tuples.pkl": b"\x80\x02" + b"(" * 300_000 + b"N" + b"t" * 300_000 + b".",
    "deep-dicts.pkl": b"\x80\x02}" + b"K\x01}" * 100_000 + b"s" * 100_000 + b".",
    # retained-object bomb: torch.Size copies one 20,000-item list 3,000 times (38 KB -> 60M items)
    "retained-size-copies.pkl": b"\x80\x02]]q\x00(K\x00"
    + b"2" * 19_999
    + b"e0ctorch\nSize\nq\x010("
    + b"h\x01h\x00\x85R" * 3000
    + b"e.",
    # t = (t, t) sixty times, used as a dict key: hashing it walks 2**60 items
    "tuple-laughs-key.pkl": b"\x80\x02}Nq\x00" + b"h\x00h\x00\x86q\x00" * 60 + b"K\x01s.",
    # npy: a shape whose product overflows, and one of exabytes
    "npy-shape-overflow.npy": None,
    "npy-exabyte.npy": None,
}


def _npy(shape: str) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 64


HOSTILE["npy-shape-overflow.npy"] = _npy(f"({2**62}, {2**62}, 16)")
HOSTILE["npy-exabyte.npy"] = _npy(f"({2**60},)")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_refused_within_limits(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    data = HOSTILE[name]
    assert data is not None
    p.write_bytes(data)
    outcome = run_limited(p)
    assert not outcome.startswith("BUG:"), outcome
    assert outcome.startswith(("refused:", "ok:")), outcome


@pytest.mark.parametrize(
    "member, method",
    [("archive/data.pkl", None), ("archive/data.pkl", 8), ("archive/data/0", None)],
)
def test_zip_member_declaring_gigabytes(tmp_path: Path, member: str, method: int | None) -> None:
    torch = pytest.importorskip("torch")
    data = _torch_zip({"w": torch.ones(4)})
    p = tmp_path / "m.ckpt"
    p.write_bytes(_patch_sizes(data, member, 0xFFFFFFF0, method))
    outcome = run_limited(p)
    assert outcome.startswith("refused:"), outcome


def test_zip_many_members_declaring_terabytes(tmp_path: Path) -> None:
    """A zip whose data.pkl is fine but whose 2,000 storages each claim 4 GiB."""
    members = {"archive/data.pkl": pickle.dumps({}, 2), "archive/version": b"3\n"}
    members |= {f"archive/data/{i}": b"\0" * 4 for i in range(2000)}
    data = _zip_with(members)
    for i in range(0, 2000, 97):
        data = _patch_sizes(data, f"archive/data/{i}", 0xFFFFFFF0)
    p = tmp_path / "m.ckpt"
    p.write_bytes(data)
    outcome = run_limited(p)
    assert not outcome.startswith("BUG:"), outcome


def test_memo_forgery_regression(tmp_path: Path) -> None:
    """Found by the fuzzer: one flipped bit turned TUPLE+BINPUT into LONG_BINPUT 0x56730a35."""
    from sdtool import open_model
    from sdtool.errors import CorruptFile

    p = tmp_path / "flip.pkl"
    good = pickle.dumps({"b": (None, True), "c": 1}, 0)
    assert b"tp" in good
    p.write_bytes(good.replace(b"tp", b"tr", 1))
    with pytest.raises(CorruptFile, match="forged index"):
        open_model(p)
    assert np.frombuffer(b"\0\0\0\0", np.float32).size == 1  # numpy still usable: no OOM


def test_persistent_id_text_reads_every_kind_as_before() -> None:
    """``torchfile._text`` (the storage key and tag of a persistent id) takes an exact ``str``
    as it is before its other checks; every other value a pickle can put there reads as the
    one generic expression reads it, a str subclass through its own ``str()``."""
    from sdtool.formats.torchfile import _text
    from sdtool.formats.unpickler import brief

    class Odd(str):
        def __str__(self) -> str:
            return "odd"

    def generic(v: object) -> str:
        if isinstance(v, bytes):
            return v.decode("ascii", "replace")
        return str(v) if isinstance(v, str | int) else brief(v)

    for v in ("0", "storage", "", "é", Odd("0"), b"0", b"\xff", 7, True, 1.5, None, ("a",), [1]):
        assert _text(v) == generic(v), v
