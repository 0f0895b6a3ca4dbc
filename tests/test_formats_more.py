"""Formats and object graphs beyond torch.save's defaults: the TAR format, numpy 1 spellings,
omegaconf-style hyper-parameters, TorchScript archives."""

from __future__ import annotations

import io
import pickle
import struct
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest

from sdtool import open_model
from sdtool.errors import TorchScriptFile

torch = pytest.importorskip("torch")


def _pk(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=2)


class _StorageType:
    """Pickles as ``torch.FloatStorage`` (the TAR format names the storage class)."""


def _tar_checkpoint(path: Path, values: np.ndarray) -> None:
    """torch < 0.4's TAR layout, as torch.serialization.legacy_load reads it.

    storages: count, then per storage (key, location, type) + int64 element count + raw bytes,
    then the storage views list; tensors: count, then per tensor (key, storage key, type) + ndim,
    sizes, strides, offset; pickle: the object, referring to tensors by persistent id.
    """
    st = io.BytesIO()
    st.write(_pk(1))
    st.write(b"\x80\x02(K\x00X\x03\x00\x00\x00cpuctorch\nFloatStorage\ntq\x00.")  # (0, cpu, type)
    st.write(struct.pack("<q", values.size) + values.astype("<f4").tobytes())
    st.write(_pk([]))
    tn = io.BytesIO()
    tn.write(_pk(1))
    tn.write(b"\x80\x02(K\x01K\x00ctorch\nFloatTensor\ntq\x00.")  # (tensor 1, storage 0, type)
    shape, strides = (2, 3), (1, 2)  # a transposed view
    tn.write(struct.pack("<i", 2) + b"\0" * 4)
    tn.write(struct.pack("<2q", *shape) + struct.pack("<2q", *strides) + struct.pack("<q", 0))
    # the object: {"w": <tensor 1>} where the tensor is persistent id "1"
    obj = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01X\x01\x00\x00\x001q\x02Qs."
    members = {
        "sys_info": _pk({"little_endian": True}),
        "pickle": obj,
        "storages": st.getvalue(),
        "tensors": tn.getvalue(),
    }
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_format_equals_torch(tmp_path: Path) -> None:
    p = tmp_path / "old.pt"
    _tar_checkpoint(p, np.arange(6, dtype=np.float32))
    ref = torch.load(p, weights_only=False)
    with open_model(p) as m:
        assert m.format == "torch-tar"
        assert list(m.tensors) == ["w"]
        assert m.tensors["w"].shape == tuple(ref["w"].shape)
        assert m.read("w").tobytes() == ref["w"].contiguous().numpy().tobytes()


def test_tar_record_cut_inside_its_member_is_refused(tmp_path: Path) -> None:
    """A tensors member cut short must not read on into the tar padding (found by fuzzing)."""
    from sdtool.errors import CorruptFile

    good = tmp_path / "good.pt"
    _tar_checkpoint(good, np.arange(6, dtype=np.float32))
    bad = tmp_path / "bad.pt"
    with tarfile.open(good) as src, tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()  # type: ignore[union-attr]
            if info.name == "tensors":
                data = data[:-12]  # the last stride and the offset are gone
                info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    with pytest.raises(CorruptFile):
        open_model(bad)


def test_numpy1_scalar_spelling(tmp_path: Path) -> None:
    """numpy 1 pickles say numpy.core.multiarray.scalar; numpy 2 says numpy._core."""
    numpy2 = pickle.dumps({"loss": np.float64(1.5)}, protocol=2)
    assert b"numpy._core.multiarray\nscalar" in numpy2
    payload = numpy2.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    p = tmp_path / "stats.pkl"
    p.write_bytes(payload)
    with open_model(p) as m:
        assert m.extra == {"loss": 1.5}
        assert isinstance(m.extra["loss"], np.float64)


def test_omegaconf_hyper_parameters_are_kept_as_data(tmp_path: Path) -> None:
    """A Lightning checkpoint's hyper_parameters pickled as omegaconf objects (stand-ins here)."""
    mod = types.ModuleType("omegaconf.dictconfig")
    sys.modules["omegaconf"] = types.ModuleType("omegaconf")
    sys.modules["omegaconf.dictconfig"] = mod

    class DictConfig:
        def __init__(self, content: dict[str, object]) -> None:
            self._content = content

    DictConfig.__module__ = "omegaconf.dictconfig"
    DictConfig.__qualname__ = "DictConfig"
    mod.DictConfig = DictConfig  # type: ignore[attr-defined]
    try:
        ckpt = {
            "state_dict": {"w": torch.ones(2)},
            "hyper_parameters": DictConfig({"lr": 1e-4, "unet": {"channels": 320}}),
        }
        p = tmp_path / "last.ckpt"
        torch.save(ckpt, p)
    finally:
        del sys.modules["omegaconf"], sys.modules["omegaconf.dictconfig"]
    with open_model(p) as m:
        assert list(m.tensors) == ["w"]
        hp = m.extra["hyper_parameters"]
        assert hp.qualname == "omegaconf.dictconfig.DictConfig"
        assert hp.state == {"_content": {"lr": 1e-4, "unet": {"channels": 320}}}
        assert ("omegaconf.dictconfig", "DictConfig") in {(g.module, g.name) for g in m.globals}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script itself
def test_torchscript_is_reported_not_loaded(tmp_path: Path) -> None:
    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), p)
    with pytest.raises(TorchScriptFile, match="TorchScript archive"):
        open_model(p)


def test_zip_local_headers_walk_from_the_start() -> None:
    """formats.zip_readings.local_headers: what a lenient reader walks when the central directory is
    gone (the scanner's fallback), stopping where sizes follow the data (flag 0x8)."""
    import zipfile

    from sdtool.formats.zip import DEFLATED, STORED
    from sdtool.formats.zip_readings import local_headers

    b = io.BytesIO()
    with zipfile.ZipFile(b, "w") as z:
        z.writestr("a/x.pkl", b"x" * 10)
        z.writestr("a/y.pkl", b"y" * 100, compress_type=zipfile.ZIP_DEFLATED)
    raw = b.getvalue()
    cut = raw[: raw.index(b"PK\x01\x02")]

    def pread(off: int, n: int) -> bytes:
        return cut[off : off + n]

    got = list(local_headers(pread, len(cut)))
    assert [(h.name, h.method) for h in got] == [("a/x.pkl", STORED), ("a/y.pkl", DEFLATED)]
    assert cut[got[0].data_start : got[0].data_start + got[0].csize] == b"x" * 10
    assert got[1].data_start + got[1].csize == len(cut)
    streamed = bytearray(cut)
    streamed[6:8] = struct.pack("<H", 0x8)  # sizes after the data: nothing to walk by
    assert list(local_headers(lambda o, n: bytes(streamed[o : o + n]), len(cut))) == []
