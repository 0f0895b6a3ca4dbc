"""Fidelity: every tensor sdtool hands out equals torch.load's, bit for bit.

Inputs are written by torch.save in both its zip and legacy formats (and pickle.dumps for
``torch.storage._load_from_bytes``); torch.load is the oracle.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdtool import open_model  # noqa: E402

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]
FORMATS = {"zip": True, "legacy": False}


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 10).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


def _assert_same(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """Names, dtypes, shapes and bytes of open_model(path) equal torch's tensors."""
    with open_model(path) as m:
        assert list(m.tensors) == list(expected)
        for name, t in expected.items():
            info = m.tensors[name]
            assert info.dtype.torch == str(t.dtype).removeprefix("torch."), name
            assert info.shape == tuple(t.shape), name
            got = m.read(name)
            want = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            assert np.ascontiguousarray(got).tobytes() == want, name


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype(tmp_path: Path, fmt: str, dtype: torch.dtype) -> None:
    sd = {
        "w": _sample(dtype, (3, 5)),
        "scalar": _sample(dtype, ()),
        "empty": _sample(dtype, (0, 4)),
    }
    p = tmp_path / "m.pt"
    torch.save(sd, p, _use_new_zipfile_serialization=FORMATS[fmt])
    if fmt == "legacy" and dtype.itemsize == 1 and dtype.is_floating_point:
        # torch 2.13 writes fp8 legacy files it cannot load itself (UntypedStorage has no
        # dtype); the tensors it saved are the oracle there.
        with pytest.raises(AttributeError):
            torch.load(p, weights_only=False)
        _assert_same(p, sd)
        return
    _assert_same(p, torch.load(p, weights_only=False))


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_offsets_shared_storage_and_parameters(tmp_path: Path, fmt: str) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    lin = torch.nn.Linear(4, 3)
    sd = collections.OrderedDict(
        base=base,
        transposed=base.t(),  # non-contiguous
        row=base[2],  # offset view
        cols=base[:, 3:7],  # offset + non-contiguous
        strided=base[::2, ::3],
        tied=base,  # the same tensor twice
        param=lin.weight,  # nn.Parameter
        bias=lin.bias,
    )
    p = tmp_path / "m.pt"
    torch.save(sd, p, _use_new_zipfile_serialization=FORMATS[fmt])
    ref = torch.load(p, weights_only=False)
    _assert_same(p, ref)
    with open_model(p) as m:
        assert m.tensors["param"].parameter
        assert m.tensors["base"].storage is m.tensors["row"].storage  # one storage, many views
        assert m.tensors["row"].file_span is not None
        assert m.tensors["transposed"].file_span is None


def test_big_endian_zip(tmp_path: Path) -> None:
    """A zip whose ``byteorder`` record says big: values come back in native order."""
    import zipfile

    sd = {"a": torch.arange(5, dtype=torch.float32), "b": torch.arange(3, dtype=torch.int64)}
    src = tmp_path / "le.pt"
    torch.save(sd, src)
    dst = tmp_path / "be.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                key = info.filename.rsplit("/", 1)[1]
                dt = {"0": ">f4", "1": ">i8"}[key]
                arr = np.frombuffer(data, dt.replace(">", "<")).astype(dt)
                data = arr.tobytes()
            zout.writestr(info, data)
    _assert_same(dst, torch.load(dst, weights_only=False))


def test_deflated_members_and_other_top_folder(tmp_path: Path) -> None:
    import zipfile

    sd = {"w": torch.randn(4, 4), "i": torch.arange(7)}
    src = tmp_path / "a.pt"
    torch.save(sd, src)
    dst = tmp_path / "b.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            name = info.filename.replace("a/", "my_model/", 1)
            zout.writestr(name, zin.read(info))
    with open_model(dst) as m:
        assert m.container.prefix == "my_model"  # type: ignore[attr-defined]
        assert m.tensors["w"].file_span is None  # deflated: read, not mapped
    _assert_same(dst, sd)


def test_plain_pickle_with_load_from_bytes(tmp_path: Path) -> None:
    """pickle.dumps(tensor) nests a whole torch file in the pickle (_load_from_bytes)."""
    sd = {"w": torch.randn(3, 2), "h": torch.arange(4, dtype=torch.float16)}
    p = tmp_path / "m.pkl"
    p.write_bytes(pickle.dumps(sd, protocol=2))
    with open_model(p) as m:
        assert m.format == "pickle"
    _assert_same(p, sd)


def test_nested_dicts_get_dotted_names_and_state_dict_is_unwrapped(tmp_path: Path) -> None:
    sd = {"model": {"enc": {"w": torch.ones(2)}, "dec": [torch.zeros(1), torch.ones(1)]}}
    ckpt = {"state_dict": {"state_dict": sd}, "global_step": 7, "epoch": 1, "name": "x"}
    p = tmp_path / "m.ckpt"
    torch.save(ckpt, p)
    with open_model(p) as m:
        assert list(m.tensors) == ["model.enc.w", "model.dec.0", "model.dec.1"]
        assert m.extra == {"global_step": 7, "epoch": 1, "name": "x"}
        assert m.container.state_dict_path == "state_dict.state_dict"


def test_key_selects_a_sub_dict(tmp_path: Path) -> None:
    p = tmp_path / "m.pt"
    torch.save({"params_ema": {"a": torch.ones(1)}, "params": {"b": torch.ones(1)}}, p)
    with open_model(p, key="params_ema") as m:
        assert list(m.tensors) == ["a"]


def test_whole_pickled_module_names_like_state_dict(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    p = tmp_path / "net.pt"
    torch.save(net, p)
    expected = net.state_dict()
    with open_model(p) as m:
        assert list(m.tensors) == list(expected)
        assert any(g.module.startswith("torch.nn.modules") and not g.builder for g in m.globals)
    _assert_same(p, dict(expected))


def test_numpy_scalars_sets_size_and_optimizer_state(tmp_path: Path) -> None:
    w = torch.nn.Parameter(torch.randn(2, 2))
    opt = torch.optim.Adam([w])
    w.grad = torch.ones(2, 2)
    opt.step()
    ckpt = {
        "state_dict": {"w": w},
        "np_scalar": np.float64(0.5),
        "np_int": np.int64(3),
        "tags": {"a", "b"},
        "size": torch.Size([1, 2]),
        "optimizer_states": [opt.state_dict()],
    }
    p = tmp_path / "m.ckpt"
    torch.save(ckpt, p)
    with open_model(p) as m:
        assert list(m.tensors) == ["w"]
        assert m.extra["np_scalar"] == 0.5 and m.extra["np_int"] == 3
        assert m.extra["tags"] == {"a", "b"}
        assert m.extra["size"] == (1, 2)
        # optimizer tensors are found but stay outside the state dict
        exp_avg = m.extra["optimizer_states"][0]["state"][0]["exp_avg"]
        ref = opt.state_dict()["state"][0]["exp_avg"]
        assert m.read_info(exp_avg).tobytes() == ref.numpy().tobytes()
