"""Small valid files of every format sdtool reads: the fuzzers' starting points.

Built here (torch.save, safetensors, numpy, and the oldest TAR format assembled by hand), so the
fuzzers need nothing from outside the repo; ``corpus_seeds`` adds the small files of
../shared/corpus when it is present.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"


def _safetensors() -> bytes:
    from safetensors.numpy import save

    return save(
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.arange(3, dtype=np.int64)},
        metadata={"format": "pt"},
    )


def _torch(legacy: bool) -> bytes:
    import torch

    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    obj = {
        "state_dict": {"w": w, "wt": w.t(), "h": torch.ones(2, dtype=torch.float16)},
        "global_step": 7,
    }
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _pickle(protocol: int) -> bytes:
    return pickle.dumps({"a": [1, 2.5, "x"], "b": (None, True), "c": {"d": b"\x00\x01"}}, protocol)


def _npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(12, dtype=np.float32).reshape(3, 4))
    return buf.getvalue()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(4, dtype=np.int16), b=np.ones((2, 2)))
    return buf.getvalue()


def _tar() -> bytes:
    """torch < 0.4's TAR layout: storages (count, records + raw data, views), tensors, pickle."""
    storage_rec = (  # (key 0, location 'cpu', torch.FloatStorage) as a protocol-2 tuple
        b"\x80\x02K\x00X\x03\x00\x00\x00cpuctorch\nFloatStorage\n\x87."
    )
    storages = (
        pickle.dumps(1, 2)
        + storage_rec
        + struct.pack("<q", 6)
        + np.arange(6, dtype=np.float32).tobytes()
        + pickle.dumps([], 2)
    )
    tensors = (
        pickle.dumps(1, 2)
        + pickle.dumps((1, 0, None), 2)
        + struct.pack("<ii", 2, 0)
        + struct.pack("<qq", 2, 3)
        + struct.pack("<qq", 3, 1)
        + struct.pack("<q", 0)
    )
    root = b"\x80\x02}X\x01\x00\x00\x00wX\x01\x00\x00\x001Qs."  # {'w': persistent id '1'}
    sys_info = pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (
            ("sys_info", sys_info),
            ("pickle", root),
            ("tensors", tensors),
            ("storages", storages),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def builtin_seeds() -> dict[str, bytes]:
    """name -> bytes of one small valid file per format."""
    return {
        "st.safetensors": _safetensors(),
        "zip.ckpt": _torch(legacy=False),
        "legacy.pt": _torch(legacy=True),
        "tar.pt": _tar(),
        "p2.pkl": _pickle(2),
        "p4.pkl": _pickle(4),
        "p0.pkl": _pickle(0),
        "a.npy": _npy(),
        "a.npz": _npz(),
    }


def corpus_seeds(max_size: int = 256 * 1024) -> dict[str, bytes]:
    """name -> bytes of the corpus files no larger than ``max_size`` (empty without corpus)."""
    manifest = CORPUS / "manifest.json"
    if not manifest.is_file():
        return {}
    out = {}
    for e in json.loads(manifest.read_text()):
        p = CORPUS / "files" / e["file"]
        if p.is_file() and p.stat().st_size <= max_size:
            out["corpus:" + e["file"]] = p.read_bytes()  # bytes only: never unpickled here
    return out


def write_seeds(folder: Path, *, corpus: bool = True) -> list[Path]:
    """Write every seed into ``folder`` (the long run reads them without importing torch)."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds = builtin_seeds() | (corpus_seeds() if corpus else {})
    paths = []
    for i, (name, data) in enumerate(sorted(seeds.items())):
        p = folder / f"{i:03d}-{name.replace('/', '_').replace(':', '_')}"
        p.write_bytes(data)
        paths.append(p)
    return paths
