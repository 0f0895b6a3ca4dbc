"""Container differentials: whatever bytes a real loader would unpickle, the scanner reads too.

Each case is built from the loaders' own rules (numpy.lib.format and numpy.load, joblib's
compressor detection, read_zfile and NumpyArrayWrapper.read_array, tarfile, zipfile, gzip) with
a harmless payload: ``builtins.open(<canary>, "w")`` creates a file when the pickle runs. Every
case must scan as dangerous; the positive control loads each one with its real loader in a
subprocess and checks that the canary appeared (so the case is a real attack, not a broken file).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sdtool.scan import scan


class Canary:
    """An object whose pickle calls builtins.open(path, "w") when loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import builtins

        return (builtins.open, (self.path, "w"))


def payload(path: str, proto: int = 2) -> bytes:
    return pickle.dumps(Canary(path), protocol=proto)


def npy_header(descr: str, shape: str = "(1,)", version: int = 1) -> bytes:
    text = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}".encode()
    pre = 10 if version == 1 else 12
    text += b" " * (-(len(text) + 1 + pre) % 64) + b"\n"
    size = struct.pack("<H", len(text)) if version == 1 else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + size + text


def object_npy(c: str, descr: str = "'|O'", version: int = 1) -> bytes:
    return npy_header(descr, version=version) + payload(c)


def npz(c: str, method: int, prefix: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        z.writestr("a.npy", object_npy(c))
    return prefix + buf.getvalue()


def joblib_object_array(c: str, dtype: object, patch: tuple[bytes, bytes] | None = None) -> bytes:
    import joblib

    arr = np.empty(1, dtype=dtype)
    if arr.dtype.names:
        arr[0] = (1.0, Canary(c))
    else:
        arr[0] = Canary(c)
    buf = io.BytesIO()
    joblib.dump(arr, buf)
    data = buf.getvalue()
    if patch is not None:
        assert patch[0] in data
        data = data.replace(*patch)
    return data


def zfile(c: str, lead_space: bool) -> bytes:
    """joblib's old ZF container: b"ZF", a 19-byte hex length, zlib data (read_zfile)."""
    data = payload(c)
    hexlen = (" " if lead_space else "") + hex(len(data))
    return b"ZF" + hexlen.ljust(19).encode() + zlib.compress(data)


def tar_with(members: list[tarfile.TarInfo], datas: list[bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in zip(members, datas, strict=True):
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def tar_name_pickle(c: str) -> bytes:
    """The first member's *name* is a protocol-0 pickle: pickle.load reads a tar from byte 0."""
    name = f"cbuiltins\nopen\n(S'{c}'\nS'w'\ntR."
    info = tarfile.TarInfo(name)
    info.size = 4
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(b"data"))
    return buf.getvalue()


def tar_long_name(c: str) -> bytes:
    info = tarfile.TarInfo("d/" + "x" * 300 + ".pkl")  # a GNU long-name record
    data = payload(c)
    info.size = len(data)
    return tar_with([info], [data])


def torch_tar_link(c: str, kind: bytes, target: str = "payload") -> bytes:
    """torch's oldest format with 'pickle' a link to another member holding the payload."""
    count0 = b"\x80\x02K\x00."
    infos, datas = [], []
    sys_info = pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2)
    parts = [
        ("sys_info", sys_info),
        ("storages", count0 + pickle.dumps([], 2)),
        ("tensors", count0),
    ]
    for name, data in [*parts, ("payload", payload(c))]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        infos.append(info)
        datas.append(data)
    link = tarfile.TarInfo("pickle")
    link.type, link.linkname = kind, target
    infos.append(link)
    datas.append(b"")
    return tar_with(infos, datas)


def gzip_two_members(c: str) -> bytes:
    """The payload split across two gzip members (gzip.open reads them as one stream)."""
    pl = payload(c)
    return gzip.compress(pl[:5]) + gzip.compress(pl[5:])


# name -> (builder(canary path) -> bytes, the loader that runs it: an expression of p)
NUMPY = "numpy.load(p, allow_pickle=True)"
NPZ = "numpy.load(p, allow_pickle=True)['a']"
JOBLIB = "joblib.load(p)"
PICKLE = "pickle.load(open(p, 'rb'))"
TORCH = "torch.load(p, weights_only=False)"
CASES: dict[str, tuple[Callable[[str], bytes], str]] = {
    # every spelling of an object dtype numpy accepts
    "npy-O.npy": (lambda c: object_npy(c, "'O'"), NUMPY),
    "npy-lt-O.npy": (lambda c: object_npy(c, "'<O'"), NUMPY),
    "npy-object.npy": (lambda c: object_npy(c, "'object'"), NUMPY),
    "npy-O8.npy": (lambda c: object_npy(c, "'O8'"), NUMPY),
    "npy-structured.npy": (lambda c: object_npy(c, "[('a', '<f8'), ('b', '|O')]"), NUMPY),
    "npy-subarray.npy": (lambda c: object_npy(c, "[('a', '|O', (2,))]"), NUMPY),
    "npy-v2-object.npy": (lambda c: object_npy(c, "'object'", version=2), NUMPY),
    "npy-v3-object.npy": (lambda c: object_npy(c, "'object'", version=3), NUMPY),
    # npz members under every method zipfile reads, and a file numpy opens as npz
    "npz-deflate.npz": (lambda c: npz(c, zipfile.ZIP_DEFLATED), NPZ),
    "npz-bzip2.npz": (lambda c: npz(c, zipfile.ZIP_BZIP2), NPZ),
    "npz-lzma.npz": (lambda c: npz(c, zipfile.ZIP_LZMA), NPZ),
    "npz-eocd-first.npz": (
        lambda c: npz(c, zipfile.ZIP_STORED, prefix=b"PK\x05\x06" + b"\0" * 18),
        NPZ,
    ),
    # joblib: object and structured dtypes in every spelling, compressor headers, ZF layout
    "joblib-object.joblib": (lambda c: joblib_object_array(c, object), JOBLIB),
    "joblib-structured.joblib": (
        lambda c: joblib_object_array(c, [("a", "<f8"), ("b", "O")]),
        JOBLIB,
    ),
    "joblib-O-spelled.joblib": (
        lambda c: joblib_object_array(c, object, (b"\x8c\x02O8", b"\x8c\x02|O")),
        JOBLIB,
    ),
    "joblib-zf-lead-space.pkl": (lambda c: zfile(c, lead_space=True), JOBLIB),
    "joblib-lzma-small-dict.pkl": (
        lambda c: lzma.compress(
            payload(c),
            format=lzma.FORMAT_ALONE,
            filters=[{"id": lzma.FILTER_LZMA1, "dict_size": 1 << 16}],
        ),
        JOBLIB,
    ),
    "gzip-2-members.pkl.gz": (gzip_two_members, "pickle.load(gzip.open(p))"),
    "joblib-bz2-2-streams.bz2": (
        lambda c: bz2.compress(payload(c)[:5]) + bz2.compress(payload(c)[5:]),
        JOBLIB,
    ),
    # tar: the same bytes a pickle (byte 0), GNU long names, links torch follows
    "tar-name-is-pickle.tar": (tar_name_pickle, PICKLE),
    "tar-long-name.tar": (tar_long_name, None),  # type: ignore[dict-item]
    "torch-tar-symlink.pt": (lambda c: torch_tar_link(c, tarfile.SYMTYPE), TORCH),
    "torch-tar-hardlink.pt": (lambda c: torch_tar_link(c, tarfile.LNKTYPE), TORCH),
}


def test_torch_tar_link_out_of_the_archive_is_dangerous(tmp_path: Path) -> None:
    """torch extracts 'storages' and opens it: a symlink out of the archive makes torch.load
    unpickle whatever file it names on the loading machine, which no scan of this file sees."""
    data = torch_tar_link("unused", tarfile.SYMTYPE, target="/tmp/elsewhere.pkl")
    p = tmp_path / "old.pt"
    p.write_bytes(data)
    r = scan(p)
    assert r.verdict == "dangerous"
    assert any(f.rule == "tar-link" and f.severity == "dangerous" for f in r.findings)


# -- zip: every reading of the end records ---------------------------------------------------------


def _local(name: str, data: bytes) -> bytes:
    crc = zlib.crc32(data)
    n = name.encode()
    head = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(data), len(data),
                       len(n), 0)  # fmt: skip
    return head + n + data


def _central(name: str, data: bytes, offset: int) -> bytes:
    n = name.encode()
    return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, zlib.crc32(data),
                       len(data), len(data), len(n), 0, 0, 0, 0, 0, offset) + n  # fmt: skip


def _eocd(count: int, cd_size: int, cd_off: int, comment: bytes = b"") -> bytes:
    return struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, cd_size, cd_off,
                       len(comment)) + comment  # fmt: skip


def _zip64_record(count: int, cd_size: int, cd_off: int) -> bytes:
    return struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size,
                       cd_off)  # fmt: skip


def _locator(offset: int) -> bytes:
    return struct.pack("<4sIQI", b"PK\x06\x07", 0, offset, 1)


def zip64_two_records(c: str) -> bytes:
    """Two zip64 end records: the one right before the locator (zipfile's, newer miniz's) lists
    the payload; the one the locator points to (older miniz's, and sdtool's loader) a benign
    member. Each reader sees a different archive."""
    evil, good = object_npy(c), npy_header("'<f4'") + b"\0" * 4
    body = _local("a.npy", evil)
    good_off = len(body)
    body += _local("a.npy", good)
    cd_good = _central("a.npy", good, good_off)
    out = body + cd_good
    rec_good_at = len(out)
    out += _zip64_record(1, len(cd_good), len(body))
    cd_evil = _central("a.npy", evil, 0)
    evil_at = len(out)
    out += cd_evil + _zip64_record(1, len(cd_evil), evil_at)  # right before the locator
    out += _locator(rec_good_at)
    return out + _eocd(0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)


def torch_zip_end_record_cut_in_comment(c: str) -> bytes:
    """An end record whose comment ends with a cut-short end record signature: zipfile takes the
    last signature and fails; miniz skips it and reads the real one (torch.load runs it)."""
    pkl = payload(c)
    body = _local("archive/data.pkl", pkl) + _local("archive/version", b"3\n")
    cd = _central("archive/data.pkl", pkl, 0) + _central(
        "archive/version", b"3\n", len(_local("archive/data.pkl", pkl))
    )
    return body + cd + _eocd(2, len(cd), len(body), comment=b"PK\x05\x06" + b"\0" * 10)


# -- archives: a model inside a 7z (the nullifAI files) ----------------------------------------


def seven_zip(files: dict[str, bytes]) -> bytes:
    import py7zr

    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(data, name)
    return buf.getvalue()


def broken_after_payload(c: str) -> bytes:
    """A protocol-2 pickle that calls the payload, then breaks (no STOP): torch.load raises
    after the payload ran, and scanners that give up on a broken pickle miss it."""
    return (
        b"\x80\x02cbuiltins\nopen\n(X"
        + struct.pack("<I", len(c))
        + c.encode()
        + b"X\x01\x00\x00\x00wtR\xff"
    )


def torch_zip(data_pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("model/data.pkl", data_pkl)
        z.writestr("model/version", b"3\n")
        z.writestr("model/byteorder", b"little")
    return buf.getvalue()


CASES["7z-nullifai-torch.7z"] = (
    lambda c: seven_zip({"model.pt": torch_zip(broken_after_payload(c))}),
    "torch.load(un7z(p), weights_only=False)",
)
CASES["7z-pickle.7z"] = (
    lambda c: seven_zip({"m.pkl": payload(c)}),
    "pickle.load(open(un7z(p), 'rb'))",
)
CASES["npz-zip64-two-records.npz"] = (zip64_two_records, NPZ)
CASES["torch-zip-eocd-in-comment.pt"] = (torch_zip_end_record_cut_in_comment, TORCH)


def torch_zip64_two_records(c: str, evil_at_locator: bool) -> bytes:
    """A torch zip with two zip64 end records, each with its own central directory listing a
    different ``archive/data.pkl``: torch's miniz reads the record the locator points to,
    zipfile the one right before the locator. ``evil_at_locator`` puts the payload in miniz's."""
    evil, good = payload(c), pickle.dumps({}, protocol=2)
    name = "archive/data.pkl"
    body = _local(name, evil)
    good_off = len(body)
    body += _local(name, good)
    version_off = len(body)
    body += _local("archive/version", b"3\n")
    bad, fine = (evil, 0), (good, good_off)
    miniz, zipf = (bad, fine) if evil_at_locator else (fine, bad)

    def directory(entry: tuple[bytes, int]) -> bytes:
        return _central(name, *entry) + _central("archive/version", b"3\n", version_off)

    cd_miniz = directory(miniz)
    out = body + cd_miniz
    miniz_at = len(out)
    out += _zip64_record(2, len(cd_miniz), len(body))
    cd_zipf = directory(zipf)
    out += cd_zipf + _zip64_record(2, len(cd_zipf), len(out))  # right before the locator
    out += _locator(miniz_at)
    return out + _eocd(0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)


def safetensors_pickle(c: str) -> bytes:
    """Valid safetensors and, from byte 0, a pickle that runs ``c``'s payload.

    The 8-byte header length starts with SHORT_BINBYTES (``C``, one length byte, zeros): the
    pickle swallows the rest of the length and the start of the JSON header, resumes inside a
    metadata string, hops over the header with more printable SHORT_BINBYTES (``C`` + a length
    byte + that many bytes), and lands exactly where the tensor bytes start: the tensor is the
    payload pickle.
    """
    pl = payload(c)
    tensors = {"t": {"dtype": "U8", "shape": [len(pl)], "data_offsets": [0, len(pl)]}}
    head = json.dumps(tensors, separators=(",", ":"))[:-1] + ',"__metadata__":{"p":"'
    swallow = len(head) + 6  # the 6 zero bytes of the length, then the JSON up to the string
    size = 0x43 + 256 * swallow  # the header length those 8 bytes spell
    left, hops = size - len(head), []
    while left > 2 + 126:
        k = 100 if left - 102 >= 2 + 40 else left - 2 - 60
        hops.append("C" + chr(k) + "a" * k)
        left -= 2 + k
    k = left - 2  # the last hop swallows the end of the string and the closing braces
    assert 35 <= k <= 126 and chr(k) not in '"\\', k
    text = head + "".join(hops) + "C" + chr(k) + "a" * (k - 3) + '"}}'
    assert len(text) == size
    return b"C" + bytes([swallow]) + bytes(6) + text.encode() + pl


def benign_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(4, dtype=np.float32))
    return buf.getvalue()


def pickle_then_torch_zip(c: str) -> bytes:
    """A pickle from byte 0 with a valid torch zip after it (zipfile opens it, torch.load and
    pickle.load run the pickle)."""
    return payload(c) + torch_zip(pickle.dumps({}, protocol=2))


CASES["torch-zip64-two-records-miniz.pt"] = (lambda c: torch_zip64_two_records(c, True), TORCH)
CASES["torch-zip64-two-records-zipfile.pt"] = (
    lambda c: torch_zip64_two_records(c, False),
    "pickle.loads(zipfile.ZipFile(p).read('archive/data.pkl'))",
)
# polyglots: pickle.load reads any file from byte 0
CASES["polyglot-safetensors.safetensors"] = (safetensors_pickle, PICKLE)
CASES["polyglot-pickle-torch-zip.pt"] = (pickle_then_torch_zip, TORCH)
CASES["polyglot-pickle-npz.npz"] = (lambda c: payload(c) + benign_npz(), NUMPY)


# -- the tests ------------------------------------------------------------------------------------


def build(tmp_path: Path, name: str) -> Path:
    maker, _ = CASES[name]
    p = tmp_path / name
    p.write_bytes(maker(f"CANARY-{name}"))  # relative: the loaders run with cwd=tmp_path
    return p


@pytest.mark.parametrize("name", sorted(CASES))
def test_scanned_as_the_loader_reads_it(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    r = scan(build(tmp_path, name))
    assert r.verdict == "dangerous", (r.format, [f.message for f in r.findings], r.errors)
    assert not list(tmp_path.glob("CANARY-*"))  # scanning ran nothing


CHILD = r"""
import gzip, json, pickle, sys, warnings, zipfile
warnings.simplefilter("ignore")
import numpy, joblib
cases = json.loads(sys.argv[1])


def un7z(p):
    import os, tempfile, py7zr
    d = tempfile.mkdtemp()
    with py7zr.SevenZipFile(p) as z:
        z.extractall(d)
    return os.path.join(d, sorted(os.listdir(d))[0])


out = {}
for p, expr in cases:
    if expr.startswith("torch"):
        import torch
    try:
        eval(expr, {"p": p, "numpy": numpy, "joblib": joblib, "pickle": pickle, "gzip": gzip,
                    "torch": sys.modules.get("torch"), "un7z": un7z, "zipfile": zipfile})
        out[p] = "loaded"
    except Exception as e:  # the payload ran before the loader gave up, or it did not run
        out[p] = f"{type(e).__name__}: {e}"[:200]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_positive_control_every_case_runs_under_its_real_loader(tmp_path: Path) -> None:
    """Each payload really runs under its loader (so each case above is a real bypass test)."""
    todo = []
    for name, (_, loader) in CASES.items():
        if loader is None:
            continue
        todo.append((str(build(tmp_path, name)), loader))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(todo)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    missing = [
        f"{Path(p).name}: {outcomes[p]}"
        for p, _ in todo
        if not (tmp_path / f"CANARY-{Path(p).name}").exists()
    ]
    assert not missing, missing


def test_polyglots_are_valid_in_both_readings(tmp_path: Path) -> None:
    """The polyglot cases really are both: safetensors loads the tensor, zipfile the members,
    and the scan names the outer format and the second reading."""
    from safetensors.numpy import load_file

    st = build(tmp_path, "polyglot-safetensors.safetensors")
    assert load_file(str(st))["t"].tobytes() == payload("CANARY-polyglot-safetensors.safetensors")
    r = scan(st)
    assert r.format == "safetensors" and "polyglot" in {f.rule for f in r.findings}
    for name in ("polyglot-pickle-torch-zip.pt", "polyglot-pickle-npz.npz"):
        p = build(tmp_path, name)
        assert zipfile.is_zipfile(p) and zipfile.ZipFile(p).testzip() is None
        r = scan(p)
        assert r.verdict == "dangerous" and "polyglot" in {f.rule for f in r.findings}
    # benign halves alone are safe: the verdict comes from the pickle reading
    assert scan_bytes(tmp_path, benign_npz()).verdict == "safe"


def test_torch_zip64_two_records_every_reading_is_scanned(tmp_path: Path) -> None:
    """Each reader sees one archive; the payload is found whichever reader holds it, and the
    ambiguity itself is reported."""
    for name in ("torch-zip64-two-records-miniz.pt", "torch-zip64-two-records-zipfile.pt"):
        r = scan(build(tmp_path, name))
        assert r.verdict == "dangerous", name
        assert "zip-ambiguous" in {f.rule for f in r.findings}, name
        assert any(f.rule == "global" and "data.pkl" in (f.member or "") for f in r.findings)


def scan_bytes(tmp_path: Path, data: bytes, name: str = "blob.bin"):  # type: ignore[no-untyped-def]
    p = tmp_path / name
    p.write_bytes(data)
    return scan(p)
