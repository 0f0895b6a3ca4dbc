"""Container tricks of SCANNING.md, and benign real-world shapes built with torch.save."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdtool.scan import FileReport, classify_global, scan
from tests.scan_payloads import call_global

PAYLOAD = call_global("os", "system", proto=2)


def rules(r: FileReport) -> set[str]:
    return {f.rule for f in r.findings}


def make_zip(path: Path, members: list[tuple[str, bytes]], deflate: bool = False) -> Path:
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as z:
        for name, data in members:
            z.writestr(name, data)
    return path


def make_tar(path: Path, members: list[tuple[str, bytes]], **kw: Any) -> Path:
    with tarfile.open(path, "w", **kw) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


#: torch's TAR members around a 'pickle' one: nothing stored
TAR_EMPTY = [
    ("sys_info", b"\x80\x02}."),
    ("storages", b"\x80\x02K\x00."),
    ("tensors", b"\x80\x02K\x00."),
]


# --- content routing ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["notes.txt", "model.bin", "noext", "weights.safetensors"])
def test_pickle_under_any_name(tmp_path: Path, name: str) -> None:
    # attack: a pickle named like something harmless (sniffed by content, never by name)
    p = tmp_path / name
    p.write_bytes(PAYLOAD)
    r = scan(p)
    assert r.verdict == "dangerous"
    if name.endswith(".safetensors"):
        assert "misnamed" in rules(r)


# --- zips ---------------------------------------------------------------------------------------


def test_pickle_member_under_any_name_and_folder(tmp_path: Path) -> None:
    # attack: the payload is not archive/data.pkl but some other member, deflated
    p = make_zip(tmp_path / "m.pt", [("archive/data.pkl", b"\x80\x02}q\x00."),
                                     ("deep/dir/config.json", PAYLOAD)], deflate=True)  # fmt: skip
    r = scan(p)
    assert r.verdict == "dangerous"
    assert next(f for f in r.findings if f.rule == "global").member == "deep/dir/config.json"


def _patch_zip(p: Path, old: bytes, new: bytes, count: int = 1) -> None:
    data = p.read_bytes()
    assert data.count(old) >= count
    p.write_bytes(data.replace(old, new, count))


def test_zip_crc_mismatch(tmp_path: Path) -> None:
    # attack: a wrong CRC makes zipfile-based scanners refuse the member; torch ignores CRCs
    p = make_zip(tmp_path / "m.pt", [("archive/data.pkl", PAYLOAD)])
    crc = struct.pack("<I", zlib.crc32(PAYLOAD))
    _patch_zip(p, crc, b"\x00\x00\x00\x00", count=2)
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(p).read("archive/data.pkl")
    r = scan(p)
    assert r.verdict == "dangerous" and "zip-crc" in rules(r)


def test_zip_local_name_differs_from_central(tmp_path: Path) -> None:
    # attack: the local header names another file than the central directory
    p = make_zip(tmp_path / "m.pt", [("archive/data.pkl", PAYLOAD)])
    _patch_zip(p, b"archive/data.pkl", b"archive/datb.pkl", count=1)  # the local header only
    r = scan(p)
    assert r.verdict == "dangerous" and "zip-name-mismatch" in rules(r)


@pytest.mark.parametrize("flag", [0x1, 0x20, 0x40])
def test_zip_odd_flag_bits(tmp_path: Path, flag: int) -> None:
    # attack: flag bits that make zipfile refuse a member whose bytes are plain
    p = make_zip(tmp_path / "m.pt", [("archive/data.pkl", PAYLOAD)])
    data = bytearray(p.read_bytes())
    cd = data.find(b"PK\x01\x02")
    data[6:8] = struct.pack("<H", flag)  # local header flags
    data[cd + 8 : cd + 10] = struct.pack("<H", flag)  # central directory flags
    p.write_bytes(bytes(data))
    r = scan(p)
    assert r.verdict == "dangerous" and "zip-flags" in rules(r)


def test_zip_duplicate_names(tmp_path: Path) -> None:
    # attack: two members with one name: torch uses the last, some scanners check the first
    with pytest.warns(UserWarning):
        p = make_zip(tmp_path / "m.pt", [("archive/data.pkl", b"\x80\x02}."),
                                         ("archive/data.pkl", PAYLOAD)])  # fmt: skip
    r = scan(p)
    assert r.verdict == "dangerous" and "zip-duplicate" in rules(r)
    # the shadowed copy is scanned too
    with pytest.warns(UserWarning):
        p2 = make_zip(tmp_path / "n.pt", [("archive/data.pkl", PAYLOAD),
                                          ("archive/data.pkl", b"\x80\x02}.")])  # fmt: skip
    assert scan(p2).verdict == "dangerous"


def test_pickle_zip_polyglot(tmp_path: Path) -> None:
    # attack: a pickle with a zip appended: torch reads the pickle, zipfile sees the zip
    inner = make_zip(tmp_path / "z.zip", [("archive/data.pkl", b"\x80\x02}.")]).read_bytes()
    p = tmp_path / "poly.pt"
    p.write_bytes(PAYLOAD + inner)
    assert zipfile.is_zipfile(p)
    r = scan(p)
    assert r.verdict == "dangerous" and "polyglot" in rules(r)
    # and the payload in the zip half is found as well
    evil_zip = make_zip(tmp_path / "e.zip", [("archive/data.pkl", PAYLOAD)]).read_bytes()
    p.write_bytes(b"\x80\x02}." + evil_zip)
    r = scan(p)
    assert r.verdict == "dangerous" and "polyglot" in rules(r)


def test_polyglot_end_record_at_the_edge_of_zipfiles_search(tmp_path: Path) -> None:
    """attack: the zip's end record exactly as far from the end as zipfile still looks (64 KiB
    + 22 bytes: a record followed by 64 KiB of padding its comment length does not cover).
    zipfile opens it, so the scan must see the zip half, and the payload in it."""
    evil_zip = make_zip(tmp_path / "e.zip", [("archive/data.pkl", PAYLOAD)]).read_bytes()
    p = tmp_path / "edge.pt"
    p.write_bytes(b"\x80\x02}." + evil_zip + bytes(1 << 16))
    with zipfile.ZipFile(p) as z:  # the oracle: zipfile finds the record
        assert z.read("archive/data.pkl") == PAYLOAD
    r = scan(p)
    assert r.verdict == "dangerous" and "polyglot" in rules(r)
    # one byte more and zipfile stops looking: no zip half to see
    p.write_bytes(b"\x80\x02}." + evil_zip + bytes((1 << 16) + 1))
    assert not zipfile.is_zipfile(p)


def test_zip_inside_zip_and_7z_inside_zip(tmp_path: Path) -> None:
    # attack: the payload one archive deeper; and a broken 7z (py7zr cannot open it) in a zip
    inner = make_zip(tmp_path / "inner.zip", [("archive/data.pkl", PAYLOAD)]).read_bytes()
    p = make_zip(tmp_path / "outer.zip", [("inner.zip", inner)])
    r = scan(p)
    assert r.verdict == "dangerous"
    assert any(f.member == "inner.zip/archive/data.pkl" for f in r.findings)
    seven = b"7z\xbc\xaf\x27\x1c\x00\x04" + b"\x00" * 40
    r = scan(make_zip(tmp_path / "o2.zip", [("model.7z", seven)]))
    # issue 12: an archive sdtool cannot open is "could not scan" (exit 2), not dangerous
    assert r.verdict == "error" and not r.findings
    assert any("unsupported archive (7z)" in e for e in r.errors)


@pytest.mark.parametrize(
    "wrap",
    [gzip.compress, bz2.compress, lzma.compress, zlib.compress,
     lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE)],
    ids=["gzip", "bz2", "xz", "zlib", "lzma"],
)  # fmt: skip
def test_compressed_wrappers(tmp_path: Path, wrap) -> None:  # type: ignore[no-untyped-def]
    # attack: a payload inside joblib-style whole-stream compression
    p = tmp_path / "model.joblib"
    p.write_bytes(wrap(PAYLOAD))
    assert scan(p).verdict == "dangerous"


def test_decompression_bomb_is_capped(tmp_path: Path) -> None:
    # attack: a tiny gzip that inflates to gigabytes
    p = tmp_path / "bomb.bz2"
    p.write_bytes(bz2.compress(b"\x00" * (64 << 20)))
    r = scan(p)
    assert r.verdict != "dangerous" and any("exceeds" in e for e in r.errors)


def test_joblib_inline_array_then_payload(tmp_path: Path) -> None:
    # attack: the payload hides after joblib's raw array bytes, where a plain opcode walk derails
    from tests.scan_payloads import (
        BININT1,
        BUILD,
        EMPTY_DICT,
        EMPTY_TUPLE,
        GLOBAL,
        MARK,
        NEWFALSE,
        NEWOBJ,
        NEWTRUE,
        NONE,
        PROTO,
        REDUCE,
        SETITEMS,
        STOP,
        TUPLE,
        TUPLE1,
        U,
        asm,
    )  # fmt: skip

    dtype = asm(GLOBAL("numpy", "dtype"), U("f8"), NEWFALSE, NEWTRUE, b"\x87", REDUCE,
                MARK, BININT1(3), U("<"), NONE, NONE, NONE, b"J\xff\xff\xff\xff",
                b"J\xff\xff\xff\xff", BININT1(0), TUPLE, BUILD)  # fmt: skip
    state = asm(EMPTY_DICT, MARK, U("shape"), BININT1(2), TUPLE1, U("order"), U("C"),
                U("dtype"), dtype, U("allow_mmap"), NEWFALSE, SETITEMS)  # fmt: skip
    wrapper = asm(
        GLOBAL("joblib.numpy_pickle", "NumpyArrayWrapper"), EMPTY_TUPLE, NEWOBJ, state, BUILD
    )
    raw = b"\x80\x02cos\nsystem\n" + b"\x00" * 2  # 16 bytes of "array data" that look like code
    data = asm(PROTO(4), wrapper, raw, b"0", GLOBAL("os", "system"), U("id"), TUPLE1, REDUCE, STOP)
    r = scan(tmp_path / "m.joblib" if (tmp_path / "m.joblib").write_bytes(data) else tmp_path)
    assert r.verdict == "dangerous" and not r.errors
    glob = next(f for f in r.findings if f.rule == "global")
    assert glob.offset == data.rindex(b"cos\nsystem")  # the real payload, not the array bytes


def test_npy_object_array_and_npz_member(tmp_path: Path) -> None:
    # attack: .npy whose object array data is a malicious pickle; the same inside an .npz
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (64 - 10 - len(header) - 1) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + PAYLOAD
    p = tmp_path / "x.npy"
    p.write_bytes(npy)
    assert scan(p).verdict == "dangerous"
    z = make_zip(tmp_path / "x.npz", [("arr_0.npy", npy)])
    r = scan(z)
    assert r.verdict == "dangerous" and r.findings[0].member.startswith("arr_0.npy")  # type: ignore[union-attr]
    # a benign object array written by numpy is safe; a plain array needs no pickle at all
    np.save(tmp_path / "ok.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "ok.npz", a=np.arange(5), b=np.array([{"x": 1}], dtype=object))
    assert scan(tmp_path / "ok.npy").verdict == "safe"
    assert scan(tmp_path / "ok.npz").verdict == "safe"


def test_torch_tar_format(tmp_path: Path) -> None:
    # attack: the oldest torch format (a tar) with the payload in its 'pickle' member
    p = make_tar(tmp_path / "old.pt", [*TAR_EMPTY, ("pickle", PAYLOAD)])
    r = scan(p)
    assert r.format == "torch-tar" and r.verdict == "dangerous"
    assert next(f for f in r.findings if f.rule == "global").member == "pickle"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _intact_torch_tar(path: Path, main: bytes) -> Path:
    """torch's TAR format as legacy_load reads it: 'storages' (a count, then per storage a
    pickled (key, location, storage type), its element count and bytes, then the views),
    'tensors' (a count, then per tensor a pickled (key, storage key, original tensor type),
    ndim, 4 skipped bytes, sizes, strides, offset) and 'pickle' (persistent ids are keys)."""
    one = b"\x80\x02K\x01."
    storages = (
        one
        + b"\x80\x02K\x01X\x03\x00\x00\x00cpu" + _global("torch", "FloatStorage") + b"\x87."
        + struct.pack("<q4f", 4, 1, 2, 3, 4)
        + b"\x80\x02]."
    )  # fmt: skip
    tensors = (
        one
        + b"\x80\x02K\x02K\x01" + _global("torch", "FloatTensor") + b"\x87."
        + struct.pack("<i4xqqq", 1, 4, 1, 0)
    )  # fmt: skip
    members = [("sys_info", b"\x80\x02}."), ("pickle", main), ("storages", storages),
               ("tensors", tensors)]  # fmt: skip
    return make_tar(path, members)


def test_intact_torch_tar_is_safe(tmp_path: Path) -> None:
    """An intact TAR checkpoint (torch < 0.4) names torch.FloatTensor in its tensor records
    and refers to tensors by key: nothing there runs code. torch itself is the oracle that the
    file is one. The same keys in a pickle of any other format are still suspicious."""
    torch = pytest.importorskip("torch")
    main = b"\x80\x02}X\x01\x00\x00\x00wX\x01\x00\x00\x002Qs."  # {"w": persistent id "2"}
    p = _intact_torch_tar(tmp_path / "old.pt", main)
    loaded = torch.load(p, weights_only=False)  # our own bytes: the reference loader
    assert torch.equal(loaded["w"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    r = scan(p)
    assert r.format == "torch-tar" and r.verdict == "safe", r.findings
    assert all(f.severity == "info" for f in r.findings)
    plain = tmp_path / "keys.pkl"
    plain.write_bytes(main)
    assert "persistent-id" in rules(scan(plain))
    # the payload in the same intact layout is still found
    r = scan(_intact_torch_tar(tmp_path / "bad.pt", PAYLOAD))
    assert r.verdict == "dangerous"


def test_tar_persistent_ids_that_are_no_keys_stay_suspicious(tmp_path: Path) -> None:
    """Only numbers are the keys legacy_load looks up (int(id)); any other persistent id in the
    TAR's pickle, and numbers in a tar that is not torch's (no storages/tensors), are what
    they are elsewhere: up to a loader's persistent_load."""
    named = b"\x80\x02}X\x01\x00\x00\x00wX\x02\x00\x00\x00osQs."  # {"w": persid "os"}
    assert "persistent-id" in rules(
        scan(make_tar(tmp_path / "a.pt", [*TAR_EMPTY, ("pickle", named)]))
    )
    keyed = b"\x80\x02}X\x01\x00\x00\x00wX\x01\x00\x00\x002Qs."
    r = scan(make_tar(tmp_path / "b.tar", [("sys_info", b"\x80\x02}."), ("pickle", keyed)]))
    assert r.format == "tar" and "persistent-id" in rules(r)


def test_a_sentencepiece_shaped_tar_is_scanned_as_a_tar(tmp_path: Path) -> None:
    """A tar whose bytes are also a whole SentencePiece protobuf (the first member's name holds
    the tag 0x0A, the length of the rest, and a piece's 0x0A) is read by tarfile, so torch's
    loader would open it: it is scanned as the tar it is, never skipped as a tokenizer."""
    from sdtool.formats.sniff import _sentencepiece

    def polyglot(length: int) -> bytes:
        varint = bytes([length & 0x7F | 0x80, length >> 7])
        name = ("\n" + varint.decode("latin-1") + "\nx").ljust(20, "x")
        return make_tar(
            tmp_path / "m.model", [(name, PAYLOAD)], format=tarfile.USTAR_FORMAT, encoding="latin-1"
        ).read_bytes()

    data = polyglot(0)
    data = polyglot(len(data) - 3)  # the first field runs to the end of the file
    assert _sentencepiece(data) and data[3:4] == b"\n"
    r = scan(tmp_path / "m.model")
    assert r.format == "tar" and r.verdict == "dangerous" and not r.skipped


def test_text_whose_walk_hits_a_limit_is_never_skipped(tmp_path: Path) -> None:
    """pickle.load of these 'notes' pushes 300 Nones, then imports and calls os.system; the
    opcode walk stops at its stack limit before the import. Without the C unpickler's cross-check
    it must still not pass as text (it did: skipped, exit 0): a walk that stopped early proves
    nothing harmless."""
    from sdtool.scan.vm import Limits

    p = tmp_path / "notes.txt"
    p.write_bytes(b"N" * 300 + b"cos\nsystem\n(S'echo pwned'\ntR.\nnotes about this style")
    for oracle in (True, False):
        r = scan(p, limits=Limits(max_stack=100, oracle=oracle))
        assert not r.skipped and r.verdict in ("dangerous", "error"), (oracle, r.verdict)


def test_legacy_tensor_types_are_torchs() -> None:
    """The allowlisted tensor types are torch's own list, every module they live in."""
    torch = pytest.importorskip("torch")
    from sdtool.scan.allowlist import SAFE, TENSOR_TYPES

    names = {(c.__module__, c.__name__) for c in torch._tensor_classes}
    ours = {k for k, why in SAFE.items() if why.startswith("torch legacy tensor type")}
    assert names == ours
    assert {n for _, n in ours} == {f"{t}Tensor" for t in TENSOR_TYPES}
    assert classify_global("torch", "FloatTensor")[0] == "safe"
    assert classify_global("torch", "Generator")[0] != "safe"


def test_legacy_magic_slot_payload(tmp_path: Path) -> None:
    # attack: legacy torch unpickles the magic-number pickle before checking it
    import pickle

    rest = b"".join(pickle.dumps(x, protocol=2) for x in (1001, {"protocol_version": 1001}, {}, []))
    p = tmp_path / "legacy.pt"
    p.write_bytes(PAYLOAD + rest)
    r = scan(p)
    assert (
        r.verdict == "dangerous" and next(f for f in r.findings if f.rule == "global").stream == 0
    )


# --- safetensors --------------------------------------------------------------------------------


def _st(tmp_path: Path, header: bytes, data: bytes = b"\x00" * 4, tail: bytes = b"") -> Path:
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + data + tail)
    return p


def test_safetensors_lint(tmp_path: Path) -> None:
    ok = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    assert scan(_st(tmp_path, ok)).verdict == "safe"
    # attack: a pickle hidden after the tensors (a different reader may find it)
    r = scan(_st(tmp_path, ok, tail=PAYLOAD))
    assert r.verdict == "dangerous" and "safetensors-hidden" in rules(r)
    # header tricks: leading whitespace, duplicate keys, unknown fields, code in metadata
    tricky = (
        b' {"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1},'
        b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"__metadata__":{"note":"__import__(\'os\').system(\'id\')","url":"https://x.y"}}'
    )
    r = scan(_st(tmp_path, tricky))
    msgs = " ".join(f.message for f in r.findings)
    assert "whitespace" in msgs and "duplicate" in msgs and "looks like code" in msgs
    assert "holds a URL" in msgs and r.verdict == "suspicious"
    # broken reference rules (a hole in the offsets)
    bad = (
        b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"v":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}'
    )
    r = scan(_st(tmp_path, bad, data=b"\x00" * 12))  # no loader reads it: could not scan
    assert r.verdict == "error" and "breaks the safetensors rules" in r.errors[0]


# --- benign real-world shapes ------------------------------------------------------------------


FAKE_MODULES = {
    "pytorch_lightning/__init__.py": "",
    "pytorch_lightning/callbacks/__init__.py": "",
    "pytorch_lightning/callbacks/model_checkpoint.py": (
        "class ModelCheckpoint:\n    def __init__(self):\n        self.best_model_path = 'x'\n"
    ),
    "omegaconf/__init__.py": "class DictConfig:\n    def __init__(self, d):\n        self.d = d\n",
}


def _torch_save(tmp_path: Path, legacy: bool) -> Path:
    """A Lightning-like SD training checkpoint written by real torch.save in a subprocess."""
    for rel, text in FAKE_MODULES.items():
        f = tmp_path / "fake" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    out = tmp_path / ("legacy.ckpt" if legacy else "zip.ckpt")
    code = f"""
import sys, collections, numpy as np, torch
sys.path.insert(0, {str(tmp_path / "fake")!r})
from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
from omegaconf import DictConfig
sd = collections.OrderedDict((f"model.diffusion_model.w{{i}}", torch.randn(4, 4)) for i in range(5))
sd["p"] = torch.nn.Parameter(torch.ones(2))
sd["h"] = torch.zeros(3, dtype=torch.float16)
ckpt = {{"state_dict": sd, "global_step": 10, "epoch": np.int64(3), "lr": np.float32(0.1),
        "rng": np.random.get_state(), "callbacks": {{"ModelCheckpoint": ModelCheckpoint()}},
        "hyper_parameters": DictConfig({{"a": 1}}), "tags": {{"x", "y"}},
        "shape": torch.Size([1, 2])}}
torch.save(ckpt, {str(out)!r}, _use_new_zipfile_serialization={not legacy})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_benign_training_checkpoint_is_not_dangerous(tmp_path: Path, legacy: bool) -> None:
    r = scan(_torch_save(tmp_path, legacy))
    assert r.verdict == "suspicious", [(f.rule, f.message) for f in r.findings]
    assert r.format == ("torch-legacy" if legacy else "torch-zip") and not r.errors
    sus = {f.global_name for f in r.findings}
    assert sus == {"omegaconf.DictConfig"}  # ModelCheckpoint, numpy scalars, sets: allowlisted


def test_plain_state_dict_is_safe(tmp_path: Path) -> None:
    code = f"""
import torch
sd = {{"a": torch.randn(3, 3), "b": torch.arange(4), "c": torch.randn(2).to(torch.bfloat16)}}
torch.save(sd, {str(tmp_path / "sd.pt")!r})
torch.save(sd, {str(tmp_path / "sd_legacy.pt")!r}, _use_new_zipfile_serialization=False)
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in ("sd.pt", "sd_legacy.pt"):
        r = scan(tmp_path / name)
        assert r.verdict == "safe", (name, r.findings, r.errors)


def test_torchscript_is_reported_as_code(tmp_path: Path) -> None:
    code = f"""
import torch
class M(torch.nn.Module):
    def forward(self, x):
        return x * 2
torch.jit.save(torch.jit.script(M()), {str(tmp_path / "m.pt")!r})
"""
    script = tmp_path / "make_ts.py"  # TorchScript needs the source in a file
    script.write_text(code)
    subprocess.run([sys.executable, str(script)], check=True)
    r = scan(tmp_path / "m.pt")
    assert r.format == "torchscript" and r.verdict == "suspicious"
    ts = next(f for f in r.findings if f.rule == "torchscript")
    assert "code/" in ts.message


def test_scanner_never_imports_torch(tmp_path: Path) -> None:
    p = tmp_path / "x.pkl"
    p.write_bytes(PAYLOAD)
    code = (
        "import sys; from sdtool.scan import scan; r = scan(sys.argv[1]);"
        "assert r.verdict == 'dangerous'; assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'pickle' not in sys.modules or True"
    )
    subprocess.run([sys.executable, "-c", code, str(p)], check=True, cwd=Path(__file__).parents[1])


def test_classify_global_api() -> None:
    assert classify_global("torch._utils", "_rebuild_tensor_v2")[0] == "safe"
    assert classify_global("argparse", "Namespace")[0] == "suspicious"
    assert classify_global("posix", "system") == ("dangerous", "os.system: runs a shell command")
    assert classify_global("some.unknown", "function")[0] == "dangerous"


def test_safetensors_tail_after_a_rejected_header(tmp_path: Path) -> None:
    """A header the reference rules reject is still read leniently for where the data ends
    (formats.safetensors.lenient_data_end): a pickle after it is found."""
    from sdtool.formats.safetensors import lenient_data_end

    bad = (
        b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"v":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}'
    )
    p = _st(tmp_path, bad, data=b"\x00" * 12, tail=PAYLOAD)
    assert lenient_data_end(p.read_bytes()) == 8 + len(bad) + 12
    r = scan(p)
    assert r.verdict == "dangerous" and "safetensors-hidden" in rules(r)
    assert "breaks the safetensors rules" in r.errors[0]


def test_npy_header_past_sdtools_limit_is_never_safe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """numpy.load(allow_pickle=True) ignores its header-size limit, so an object .npy with a
    header longer than sdtool reads (MAX_LAYOUT_HEADER, patched small here) still unpickles its
    body in numpy: the scanner must say it could not scan it, never SAFE."""
    from sdtool.formats import numpyfile

    text = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    text += b" " * (600 - len(text)) + b"\n"
    body = call_global("os", "system", "echo pwned")
    p = tmp_path / "big-header.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + body)
    # numpy itself reads this header (it is well formed; only its length is unusual)
    with open(p, "rb") as f:
        version = np.lib.format.read_magic(f)
        assert np.lib.format.read_array_header_1_0(f) == ((1,), False, np.dtype("O"))
    assert version == (1, 0)
    assert scan(p).verdict == "dangerous"  # within the limit: the body is scanned
    monkeypatch.setattr(numpyfile, "MAX_LAYOUT_HEADER", 256)
    r = scan(p)
    assert r.verdict != "safe" and r.errors, r.to_json()
