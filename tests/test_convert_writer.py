"""The streaming writer: safetensors' own bytes, torch-exact casts, atomicity, verification."""

from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdtool import dtypes, open_model
from sdtool.errors import OutputError, TruncatedFile, VerificationError
from sdtool.model import ModelFile
from sdtool.write import CastOverflow, OutTensor, write_model
from sdtool.write import stream as plan_mod
from sdtool.write.atomic import TEMP_SUFFIX

F16 = dtypes.from_code("F16")


def _model(
    tmp_path: Path, tensors: dict[str, np.ndarray], name: str = "in.safetensors"
) -> ModelFile:
    p = tmp_path / name
    save_file(tensors, str(p))
    return open_model(p)


def _plan(m: ModelFile, dtype: dtypes.DType | None = None) -> list[OutTensor]:
    return [
        OutTensor(n, m, i, dtype if dtype is not None and i.dtype.is_float else i.dtype)
        for n, i in m.tensors.items()
    ]


def _no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX)]


SAMPLE = {
    "b.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 3,
    "a.bias": np.linspace(-1, 1, 5, dtype=np.float32),
    "pos_ids": np.arange(77, dtype=np.int64).reshape(1, 77),
    "h": np.ones((2, 2), np.float16),
    "bf": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16),
    "flag": np.array([True, False]),
    "e": np.zeros((0, 3), np.float32),
}


def test_bytes_equal_safetensors_save_file(tmp_path: Path) -> None:
    ref = tmp_path / "ref.safetensors"
    save_file(SAMPLE, str(ref), metadata={"format": "pt"})
    with _model(tmp_path, SAMPLE) as m:
        r = write_model(_plan(m), tmp_path / "o.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "o.safetensors").read_bytes() == ref.read_bytes()
    assert r.copied == len(SAMPLE) and r.cast == 0


def test_deterministic_and_order_independent(tmp_path: Path) -> None:
    with _model(tmp_path, SAMPLE) as m:
        p = _plan(m, F16)
        write_model(p, tmp_path / "1.safetensors")
        write_model(list(reversed(p)), tmp_path / "2.safetensors")
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_fp16_cast_equals_torch_ints_untouched(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    with _model(tmp_path, SAMPLE) as m:
        r = write_model(_plan(m, F16), tmp_path / "o.safetensors", verify=True)
    assert r.verified and r.cast == 4  # the two f32, the bf16 and the empty f32
    got = load_file(str(tmp_path / "o.safetensors"))
    assert got["pos_ids"].dtype == np.int64 and np.array_equal(got["pos_ids"], SAMPLE["pos_ids"])
    assert got["flag"].dtype == np.bool_
    want = torch.from_numpy(SAMPLE["b.weight"]).to(torch.float16).numpy()
    assert got["b.weight"].tobytes() == want.tobytes()


def test_chunked_cast_equals_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_mod, "CHUNK_BYTES", 64)  # many pieces per tensor
    rng = np.random.default_rng(0)
    data = {"w": rng.standard_normal((37, 11)).astype(np.float32)}
    with _model(tmp_path, data) as m:
        write_model(_plan(m, dtypes.from_code("BF16")), tmp_path / "o.safetensors", verify=True)
    got = load_file(str(tmp_path / "o.safetensors"))["w"]
    assert got.tobytes() == data["w"].astype(ml_dtypes.bfloat16).tobytes()


def test_overflow_fail_writes_nothing(tmp_path: Path) -> None:
    data = {"big": np.array([1.0, 1e6, -1e9], np.float32), "ok": np.ones(2, np.float32)}
    out = tmp_path / "o.safetensors"
    with _model(tmp_path, data) as m:
        with pytest.raises(CastOverflow, match=r"'big': 2 values") as ei:
            write_model(_plan(m, F16), out)
        assert ei.value.overflows == {"big": 2}
        assert not out.exists() and _no_leftovers(tmp_path)
        r = write_model(_plan(m, F16), out, on_overflow="warn")
    assert r.overflows == {"big": 2}
    assert np.isinf(load_file(str(out))["big"][1:]).all()


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    src_bytes = None
    with _model(tmp_path, SAMPLE) as m:
        src_bytes = m.path.read_bytes()
        calls = {"n": 0}
        real = plan_mod.copy_span

        def flaky(*a, **k):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 3:
                raise exc
            return real(*a, **k)

        monkeypatch.setattr("sdtool.write.safetensors.copy_span", flaky)
        out = tmp_path / "o.safetensors"
        with pytest.raises(type(exc)):
            write_model(_plan(m), out)
    assert not out.exists() and _no_leftovers(tmp_path)
    assert m.path.read_bytes() == src_bytes


def test_verify_catches_a_bad_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def zeros(src_fd, dst_fd, offset, length, t, progress=None, dst_offset=None):  # type: ignore[no-untyped-def]
        plan_mod.write_all(dst_fd, bytes(length), dst_offset)

    monkeypatch.setattr("sdtool.write.safetensors.copy_span", zeros)
    out = tmp_path / "o.safetensors"
    with _model(tmp_path, SAMPLE) as m, pytest.raises(VerificationError, match="differs"):
        write_model(_plan(m), out, verify=True)
    assert not out.exists() and _no_leftovers(tmp_path)


def test_output_is_input_refused(tmp_path: Path) -> None:
    with _model(tmp_path, SAMPLE) as m, pytest.raises(OutputError, match="input"):
        write_model(_plan(m), m.path, overwrite=True)


def test_unknown_extension(tmp_path: Path) -> None:
    with _model(tmp_path, SAMPLE) as m, pytest.raises(OutputError, match=r"\.gguf"):
        write_model(_plan(m), tmp_path / "o.gguf")


def test_truncated_source_leaves_nothing(tmp_path: Path) -> None:
    with _model(tmp_path, {"w": np.ones(1000, np.float32)}) as m:
        pass
    p = m.path
    info = m.tensors["w"]
    with open(p, "r+b") as f:  # cut the file after opening: the header promised more
        f.truncate(p.stat().st_size - 100)
    out = tmp_path / "o.safetensors"
    with pytest.raises(TruncatedFile):
        write_model([OutTensor("w", m, info, info.dtype)], out)
    assert not out.exists() and _no_leftovers(tmp_path)


def test_computed_and_strided_sources(tmp_path: Path) -> None:
    arr = np.asfortranarray(np.arange(12, dtype=">f4").reshape(3, 4))
    np.save(tmp_path / "f.npy", arr)
    with open_model(tmp_path / "f.npy") as m:
        info = m.tensors["array"]
        p = [
            OutTensor("fortran", m, info, info.dtype),
            OutTensor("half", m, info, F16),
            OutTensor("made", m, info, F16, make=lambda: np.full((3, 4), 2.5, np.float32)),
        ]
        write_model(p, tmp_path / "o.safetensors", verify=True)
    got = load_file(str(tmp_path / "o.safetensors"))
    assert np.array_equal(got["fortran"], arr) and got["fortran"].flags.c_contiguous
    assert np.array_equal(got["half"], arr.astype(np.float16))
    assert (got["made"] == 2.5).all() and got["made"].dtype == np.float16


def test_torch_output(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    with _model(tmp_path, SAMPLE) as m:
        r = write_model(_plan(m, dtypes.from_code("BF16")), tmp_path / "o.pt")
    assert r.format == "torch-zip"
    sd = torch.load(tmp_path / "o.pt", weights_only=True)
    assert set(sd) == set(SAMPLE)
    assert sd["pos_ids"].dtype == torch.int64
    assert sd["b.weight"].dtype == torch.bfloat16
    want = torch.from_numpy(SAMPLE["b.weight"]).to(torch.bfloat16)
    assert torch.equal(sd["b.weight"].view(torch.int16), want.view(torch.int16))


def test_ckpt_needs_no_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: writing .ckpt without torch raised MissingExtra naming sdtool[torch]. The .ckpt
    writer now emits torch's zip itself (issue 10 item 3), so it writes, and reads back."""
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    out = tmp_path / "o.ckpt"
    with _model(tmp_path, SAMPLE) as m:
        write_model(_plan(m), out, verify=True)
    assert out.exists() and _no_leftovers(tmp_path)


def test_prefetch_order_errors_and_early_stop() -> None:
    assert list(plan_mod.prefetch(iter(range(100)), depth=2)) == list(range(100))

    def boom():  # type: ignore[no-untyped-def]
        yield 1
        raise ValueError("bad piece")

    with pytest.raises(ValueError, match="bad piece"):
        list(plan_mod.prefetch(boom()))
    gen = plan_mod.prefetch(iter(range(10_000)), depth=2)
    assert next(gen) == 0
    gen.close()  # the thread is told to stop and joined, not left running
    import threading

    assert not [t for t in threading.enumerate() if t.name == "sdtool-prefetch"]
