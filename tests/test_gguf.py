"""GGUF: reading every type exactly as gguf-py dequantizes it, quantizing exactly as gguf-py
quantizes, K-quants within their format's error bound, round trips, and hostile headers.

The oracle is the installed ``gguf`` package (llama.cpp's gguf-py): files are written with its
GGUFWriter, blocks made by its ``quants.quantize``, values compared with ``quants.dequantize``.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from sdtool.cli.main import main
from sdtool.errors import CorruptFile, SdtoolError
from sdtool.formats import ggml
from sdtool.formats.gguf import read_gguf
from sdtool.formats.open import open_model
from sdtool.scan import scan

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
quants = gguf.quants

GGUF_PY_QUANTIZES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def _special_values() -> np.ndarray:
    """Zeros, signed zeros, denormals, infinities, NaNs, huge and exact-tie values, in blocks
    of their own and mixed with ordinary numbers."""
    sp = np.array(
        [0.0, -0.0, 1e-45, -1e-40, 1.2e-38, np.inf, -np.inf, np.nan, 3e38, -3e38, 65504.0,
         65520.0, 1e5, 0.5, -0.5, 1.5, 2.5, 127.5, 1.0, -1.0, 1e-3, -7.0, 8.0, 0.1],
        np.float32,
    )  # fmt: skip
    rng = np.random.default_rng(7)
    blocks = [
        np.zeros(256, np.float32),
        np.full(256, 1e-42, np.float32),
        np.full(256, -3.0, np.float32),
        np.resize(np.array([0.0, -0.0], np.float32), 256),  # max = min = a zero: which one
        np.resize(np.array([-0.0, 0.0, -1.0, 0.0], np.float32), 256),  # max a zero
        np.resize(np.array([0.0, 2.0, -0.0], np.float32), 256),  # min a zero
        np.resize(sp, 256),
        rng.permutation(np.resize(sp, 256)),
        np.where(rng.random(256) < 0.1, np.float32(np.nan), rng.standard_normal(256)).astype(
            np.float32
        ),
        np.where(rng.random(256) < 0.05, np.float32(np.inf), rng.standard_normal(256)).astype(
            np.float32
        ),
    ]
    return np.concatenate(blocks).reshape(-1, 256)


# -- quantize: equal to gguf-py's bytes -------------------------------------------------------


def _scale_edges() -> np.ndarray:
    """Blocks whose max |x| puts the scale at float16's edges: subnormal, the smallest
    normal, rounding ties, overflow to inf, a float32-denormal max (1/d overflows)."""
    rng = np.random.default_rng(3)
    tops = np.array(
        [1e-45, 1e-40, 1e-38, 5.96e-8 * 127, 6.1e-5 * 127, 6.1e-5 * 127 * (1 + 2**-11),
         1.0, 127.0, 65504.0 * 127, 65520.0 * 127, 3e38],
        np.float32,
    )  # fmt: skip
    x = rng.uniform(-1, 1, (tops.size * 8, 32)).astype(np.float32)
    x *= np.repeat(tops, 8)[:, None]
    x[::8, 5] = np.repeat(tops, 1)  # the max itself, exactly
    return x.reshape(-1, 256)


@pytest.mark.parametrize("kernel", ["torch", "numpy"])
@pytest.mark.parametrize("qtype", GGUF_PY_QUANTIZES)
@pytest.mark.parametrize("data", ["random", "special", "bf16", "f16", "scales"])
def test_quantize_matches_gguf_py(
    qtype: str, data: str, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit for bit, special values included, with torch's kernel and with numpy's. The rule
    for each special value is gguf-py's (and ggml's): an all-zero block stores d = 0 and the
    zero level; denormals quantize like any small number; a block holding inf gets d = inf
    (Q8_0: q = 0 or NaN-derived levels); NaN propagates into d or becomes the level numpy's
    float->int conversion gives."""
    if kernel == "numpy":
        monkeypatch.setattr(ggml, "_TORCH", [None])
    else:
        pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    if data == "random":
        x = (rng.standard_normal((32, 512)) * 0.05).astype(np.float32)
    elif data == "bf16":
        import ml_dtypes

        x = (rng.standard_normal((16, 256)) * 3).astype(ml_dtypes.bfloat16)
    elif data == "f16":
        x = (rng.standard_normal((16, 256)) * 3).astype(np.float16)
    elif data == "scales":
        x = _scale_edges()
    else:
        x = _special_values()
    with np.errstate(all="ignore"):
        want = quants.quantize(x.astype(np.float32), getattr(T, qtype))
        got = ggml.quantize(x, qtype, threads=2)
    assert np.array_equal(_bits(want).reshape(-1), got)


@pytest.mark.parametrize("qtype", GGUF_PY_QUANTIZES + K_TYPES)
def test_dequantize_matches_gguf_py(qtype: str) -> None:
    """Random block bytes (every field pattern, NaN/inf scales included) decode identically."""
    t = ggml.GGML_TYPES[qtype]
    raw = np.random.default_rng(3).integers(0, 256, (300, t.size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        want = quants.dequantize(raw, getattr(T, qtype)).reshape(-1)
        got = ggml.dequantize(raw.reshape(-1), qtype, threads=2)
    assert np.array_equal(_bits(want), _bits(got))


@pytest.mark.parametrize(
    ("qtype", "levels"), [("Q4_K", 15), ("Q5_K", 31), ("Q6_K", 63)]
)  # fmt: skip
def test_k_quants_within_their_error_bound(qtype: str, levels: int) -> None:
    """sdtool's port of llama.cpp's reference K-quantizers: gguf-py decodes the blocks to
    values within one quantization step of the superblock's range, and sdtool's own
    dequantizer agrees with gguf-py's bit for bit."""
    rng = np.random.default_rng(5)
    x = np.concatenate(
        [
            rng.standard_normal((8, 1024)) * 0.02,
            rng.standard_t(3, (8, 1024)),  # heavy tails
            np.abs(rng.standard_normal((2, 1024))),  # one-signed (min 0 / Q6_K sign)
            np.zeros((1, 1024)),
            np.full((1, 1024), 0.25),
        ]
    ).astype(np.float32)
    q = ggml.quantize(x, qtype, threads=2)
    back = quants.dequantize(q.reshape(x.shape[0], -1), getattr(T, qtype))
    assert np.array_equal(_bits(back).reshape(-1), _bits(ggml.dequantize(q, qtype)))
    sb = x.reshape(-1, 256)
    err = np.abs(back.reshape(-1, 256) - sb).max(axis=1)
    if qtype == "Q6_K":
        step = np.abs(sb).max(axis=1) / 31
    else:
        step = (sb.max(axis=1) - np.minimum(sb.min(axis=1), 0)) / levels
    assert np.all(err <= step * 1.01 + 1e-7), (err / np.maximum(step, 1e-30)).max()
    rmse = np.sqrt(((back - x) ** 2).mean()) / x.std()
    assert rmse < {"Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.03}[qtype]
    assert np.array_equal(back[-2], np.zeros(1024, np.float32))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_special_values(qtype: str) -> None:
    """The K-quant rule: zeros (either sign) and blocks too small for a float16 scale
    (denormals, tiny normals) decode as zeros; denormals among ordinary values are ordinary
    small numbers (within the bound above); inf and NaN are refused (NonFinite)."""
    tiny = [
        np.zeros(256),
        -np.zeros(256),
        np.full(256, 1e-42),
        np.resize([1e-42, -3e-41, 0.0, 1e-45], 256),
        np.linspace(-1e-36, 1e-36, 256),
    ]
    x = np.concatenate(tiny).astype(np.float32)
    q = ggml.quantize(x, qtype)
    back = quants.dequantize(q.reshape(len(tiny), -1), getattr(T, qtype)).reshape(-1)
    assert np.array_equal(np.abs(back), np.zeros_like(x))
    rng = np.random.default_rng(8)
    mixed = rng.standard_normal(1024).astype(np.float32)
    mixed[::7] = np.float32(1e-40)
    back = quants.dequantize(ggml.quantize(mixed, qtype).reshape(4, -1), getattr(T, qtype))
    assert np.abs(back.reshape(-1) - mixed).max() < np.abs(mixed).max() / 7
    for bad in (np.inf, -np.inf, np.nan):
        y = mixed.copy()
        y[300] = bad
        with pytest.raises(ggml.NonFinite):
            ggml.quantize(y, qtype)


def test_float16_scales_by_integer_rounding_equal_numpy() -> None:
    """The Q8_0 scales' float32 -> float16 (integer round-to-nearest-even) is numpy's
    ``astype(float16)`` bit for bit: around every float16 boundary and at random
    (benchmarks/check_q8_rounding.py tries all 2**32 float32 values)."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    bits = h.view(np.uint32).astype(np.int64)
    steps = (-0x1000, -2, -1, 0, 1, 2, 0x1000)
    near = np.concatenate([(bits + d) % (1 << 32) for d in steps]).astype(np.uint32)
    rng = np.random.default_rng(11)
    v = np.concatenate([near.view(np.float32), rng.integers(0, 1 << 32, 1 << 18, np.uint32)
                        .view(np.float32)])  # fmt: skip
    with np.errstate(all="ignore"):
        want = v.astype(np.float16).view(np.uint16)
    assert np.array_equal(ggml._f16_bits(v), want)


def test_float16_widening_by_bits_equals_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 sources are widened by bits (``ggml._f16_into``), not numpy's element-by-element
    conversion: every finite float16 (zeros of both signs, subnormals, the largest) gives
    numpy's float32 bit for bit; a piece holding inf or NaN, or a thread whose FPU reads
    subnormals as zero, is left to numpy's conversion (which keeps NaN payloads)."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = every[(every & 0x7FFF) < 0x7C00].view(np.float16)
    x = np.empty(finite.size, np.float32)
    assert ggml._f16_into(finite, x, "test")
    assert np.array_equal(x.view(np.uint32), finite.astype(np.float32).view(np.uint32))
    all16 = every.view(np.float16)
    assert not ggml._f16_into(all16, np.empty(all16.size, np.float32), "test")
    with np.errstate(all="ignore"):
        want = all16.astype(np.float32).view(np.uint32)
        assert np.array_equal(ggml._widen_into(all16, "test").view(np.uint32), want)
        monkeypatch.setattr(ggml, "_SUBNORMAL", np.zeros(1, np.float32))  # as under DAZ
        assert not ggml._f16_into(finite, x, "test")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_quantize_every_float16_matches_gguf_py(
    qtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every float16 bit pattern, shuffled into blocks, quantizes as gguf-py quantizes its
    float32 widening: a part without inf/NaN (widened by bits) and a part with them (numpy)."""
    every = np.random.default_rng(12).permutation(np.arange(1 << 16, dtype=np.uint32))
    h = every.astype(np.uint16)
    fast = h[: 1 << 15]
    fast[(fast & 0x7C00) == 0x7C00] &= 0x83FF  # inf/NaN made subnormal in the first part
    paths: list[bool] = []
    real = ggml._f16_into

    def spy(src: np.ndarray, x: np.ndarray, name: str) -> bool:
        paths.append(real(src, x, name))
        return paths[-1]

    monkeypatch.setattr(ggml, "_f16_into", spy)
    monkeypatch.setattr(ggml, "_TORCH", [None])  # the numpy kernel (the writer's below 2 Gi)
    for part in (fast, h[1 << 15 :]):
        x = part.view(np.float16)
        with np.errstate(all="ignore"):
            want = quants.quantize(x.astype(np.float32).reshape(-1, 256), getattr(T, qtype))
            got = ggml.quantize(x, qtype)
        assert np.array_equal(_bits(want).reshape(-1), got)
    assert paths == [True, False]


def test_outer_axis_sums_add_in_index_order() -> None:
    """The K-quant search sums 16/32 terms as llama.cpp's C loops do, one after the other."""
    t = (np.random.default_rng(4).standard_normal((32, 5000)) * 1e3).astype(np.float32)
    acc = t[0].copy()
    for row in t[1:]:
        acc += row
    assert np.array_equal(ggml._seq_sum(t).view(np.uint32), acc.view(np.uint32))


@pytest.mark.parametrize("source", ["float32", "bfloat16", "float16"])
def test_f16_and_f32_match_gguf_py(source: str) -> None:
    """F16 and F32 (gguf-py: ``astype``) bit for bit, special values included; F16 refuses a
    finite value that float16 cannot hold (F16Overflow) instead of writing inf."""
    import ml_dtypes

    sp = _special_values().reshape(-1)
    x = sp[np.isnan(sp) | np.isinf(sp) | (np.abs(sp) < 65504)]
    x = x[: x.size // 256 * 256]
    x = x.astype(
        {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[source]
    )
    wide = x.astype(np.float32)
    for qtype, kind in (("F16", T.F16), ("F32", T.F32)):
        with np.errstate(all="ignore"):
            want = quants.quantize(wide, kind)
        assert np.array_equal(_bits(want).reshape(-1), ggml.quantize(x, qtype))
    with pytest.raises(ggml.F16Overflow):
        ggml.quantize(np.full(32, 1e5, np.float32), "F16")


@pytest.mark.parametrize("qtype", sorted(ggml.QUANTIZE))
def test_bf16_bits_encode_like_bfloat16(qtype: str) -> None:
    """``BF16_BITS`` (bfloat16 as raw uint16, no ml_dtypes) encodes to the same bytes as
    ml_dtypes' bfloat16, for every type sdtool writes, with and without torch's Q8_0 kernel."""
    import ml_dtypes

    x = (np.random.default_rng(6).standard_normal(4096) * 2).astype(ml_dtypes.bfloat16)
    x[::97] = np.array([0.0, -0.0, 1e-40, np.nan], ml_dtypes.bfloat16)[np.arange(43) % 4]
    if qtype in ggml.K_QUANTS:
        x[::97] = 0  # K-quants refuse NaN
    bits = x.view(np.uint16).view(ggml.BF16_BITS)
    t = ggml.get(qtype)
    for use_torch in (False, True):
        want = np.empty(t.nbytes(x.size), np.uint8)
        got = np.empty_like(want)
        with np.errstate(all="ignore"):
            ggml.encode_into(qtype, x, want, use_torch=use_torch)
            ggml.encode_into(qtype, bits, got, use_torch=use_torch)
        assert np.array_equal(want, got)


@pytest.mark.parametrize("kernel", ["torch", "numpy"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"])
def test_streamed_bf16_special_values_match_gguf_py(qtype: str, kernel: str) -> None:
    """The path a bf16 safetensors takes when streamed (raw ``BF16_BITS`` pieces into
    ``encode_into``), against gguf-py on the same values widened to float32: zeros of both
    signs, bf16 denormals, inf, NaN (quiet and signalling), the largest bf16, ties."""
    if kernel == "torch":
        pytest.importorskip("torch")
    sp = _special_values().reshape(-1)
    bits = (sp.view(np.uint32) >> 16).astype(np.uint16)  # bf16 by truncation: any bit pattern
    extra = np.array([0x0001, 0x8001, 0x007F, 0x7F7F, 0xFF7F, 0x7F81, 0xFFC1, 0x7F80, 0xFF80],
                     np.uint16)  # fmt: skip
    bits = np.concatenate([bits, np.resize(extra, 256), np.resize(extra[:5], 256)])
    wide = (bits.astype(np.uint32) << 16).view(np.float32)
    if qtype == "F16":  # F16 refuses finite values above its range (tested above)
        bits = bits[~np.isfinite(wide) | (np.abs(wide) < 65504)]
    bits = bits[: bits.size // 256 * 256]
    wide = (bits.astype(np.uint32) << 16).view(np.float32)
    t = ggml.get(qtype)
    got = np.empty(t.nbytes(bits.size), np.uint8)
    with np.errstate(all="ignore"):
        want = quants.quantize(wide.reshape(-1, 256), getattr(T, qtype))
        ggml.encode_into(qtype, bits.view(ggml.BF16_BITS), got, use_torch=kernel == "torch")
    assert np.array_equal(_bits(want).reshape(-1), got)


def test_gguf_export_of_bf16_never_imports_ml_dtypes(
    tmp_path: Path, sub_env: dict[str, str]
) -> None:
    """Streaming bf16 tensors into GGUF reads their bits (ml_dtypes' import alone costs over a
    second of CPU)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {
        "double_blocks.0.img_attn.proj.weight": torch.randn(256, 256, generator=g),
        "double_blocks.0.img_attn.proj.bias": torch.randn(256, generator=g),
        "img_in.weight": torch.randn(256, 64, generator=g),
        "final_layer.linear.weight": torch.randn(64, 256, generator=g),
    }
    src = tmp_path / "f.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, src)
    code = (
        "import sys; from sdtool.cli.main import main\n"
        "for q in ('Q8_0', 'Q4_0', 'F16', 'BF16'):\n"
        "    assert main(['convert', sys.argv[1], sys.argv[2] + q + '.gguf', '--quant', q,"
        " '-q']) == 0\n"
        "assert 'ml_dtypes' not in sys.modules, 'ml_dtypes imported'\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(src), str(tmp_path / "o-")],
        capture_output=True, text=True, env={**sub_env, "SDTOOL_NO_TORCH": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r8 = gguf.GGUFReader(str(tmp_path / "o-Q8_0.gguf"))
    types = {t.name: t.tensor_type.name for t in r8.tensors}
    assert types["double_blocks.0.img_attn.proj.weight"] == "Q8_0"


def test_k_quants_are_deterministic_across_threads() -> None:
    x = (np.random.default_rng(2).standard_normal((64, 2048)) * 0.1).astype(np.float32)
    assert np.array_equal(ggml.quantize(x, "Q4_K", threads=1), ggml.quantize(x, "Q4_K", threads=2))


# -- reading ----------------------------------------------------------------------------------


def _k_blocks(qtype: str, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with finite scales (gguf-py cannot quantize K types)."""
    t = ggml.GGML_TYPES[qtype]
    raw = rng.integers(0, 256, (rows, 2, t.size), dtype=np.uint8)
    d = (rng.standard_normal((rows, 2, 2)) * 0.01).astype(np.float16).view(np.uint8)
    where = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
    for i, at in enumerate(where[qtype]):
        raw[:, :, at : at + 2] = d[:, :, 2 * i : 2 * i + 2] if i < 2 else d[:, :, :2]
    return raw.reshape(rows, -1)


def write_all_types(path: Path) -> dict[str, np.ndarray]:
    """A GGUF written by gguf-py holding every type sdtool reads; returns what gguf-py's
    dequantize makes of each tensor."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="flux")
    w.add_quantization_version(2)
    w.add_file_type(7)
    w.add_string("general.name", "all types")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(100)])
    x = (rng.standard_normal((8, 512)) * 0.1).astype(np.float32)
    raw: dict[str, tuple[np.ndarray, object]] = {
        "f32": (x, T.F32),
        "f16": (x.astype(np.float16), T.F16),
        "bf16": (quants.quantize(x, T.BF16), T.BF16),
    }
    for q in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]:
        raw[q.lower()] = (quants.quantize(x, getattr(T, q)), getattr(T, q))
    for q in K_TYPES:
        raw[q.lower()] = (_k_blocks(q, 8, rng), getattr(T, q))
    want = {}
    for name, (data, t) in raw.items():
        w.add_tensor(name, data, raw_dtype=t)
        want[name] = quants.dequantize(data, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return want


def test_read_every_type_like_gguf_py(tmp_path: Path) -> None:
    path = tmp_path / "all.gguf"
    want = write_all_types(path)
    with open_model(path) as m:
        assert m.format == "gguf"
        assert m.metadata["general.architecture"] == "flux"
        assert m.metadata["general.name"] == "all types"
        assert "tokenizer.ggml.tokens" in m.container.kv_not_in_metadata  # type: ignore[attr-defined]
        types = {n: t.type_code for n, t in m.tensors.items()}
        assert types["q4_k"] == "Q4_K" and types["f16"] == "F16" and types["bf16"] == "BF16"
        for name, values in want.items():
            got = m.read(name)
            assert got.shape == values.shape, name
            assert np.array_equal(_bits(got.astype(np.float32)), _bits(values)), name


def test_convert_gguf_to_safetensors_dequantizes_like_gguf_py(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    path = tmp_path / "all.gguf"
    want = write_all_types(path)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(path), str(out), "--dtype", "fp32"]) == 0
    got = load_file(out)
    for name, values in want.items():
        assert np.array_equal(_bits(got[name]), _bits(values)), name
    # --dtype bf16: the torch-exact cast of those float32 values
    torch = pytest.importorskip("torch")
    out2 = tmp_path / "bf16.safetensors"
    assert main(["convert", str(path), str(out2), "--dtype", "bf16"]) == 0
    from safetensors.torch import load_file as load_torch

    got2 = load_torch(out2)
    for name, values in want.items():
        expect = torch.from_numpy(values).to(torch.bfloat16)
        assert torch.equal(got2[name].view(torch.int16), expect.view(torch.int16)), name


def test_orig_shape_is_restored(tmp_path: Path) -> None:
    path = tmp_path / "sdxl.gguf"
    w = gguf.GGUFWriter(str(path), arch="sdxl")
    x = np.arange(320 * 320 * 9, dtype=np.float32).reshape(-1, 256) / 1e4
    w.add_array("comfy.gguf.orig_shape.input_blocks.1.0.in_layers.2.weight", [320, 320, 3, 3])
    w.add_tensor(
        "input_blocks.1.0.in_layers.2.weight", quants.quantize(x, T.Q8_0), raw_dtype=T.Q8_0
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_model(path) as m:
        t = m.tensors["input_blocks.1.0.in_layers.2.weight"]
        assert t.shape == (320, 320, 3, 3) and t.type_code == "Q8_0"
        want = quants.dequantize(quants.quantize(x, T.Q8_0), T.Q8_0).reshape(320, 320, 3, 3)
        assert np.array_equal(m.read("input_blocks.1.0.in_layers.2.weight"), want)


def test_inspect_json_lists_quant_types(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "all.gguf"
    write_all_types(path)
    assert main(["inspect", str(path), "--json", "--tensors"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "gguf"
    assert {t["name"]: t["dtype"] for t in doc["tensors"]}["q6_k"] == "Q6_K"
    q6 = next(t for t in doc["tensors"] if t["name"] == "q6_k")
    assert q6["bytes"] == 8 * 2 * 210 and q6["shape"] == [8, 512]
    assert doc["dtypes"]["Q8_0"]["tensors"] == 1


def test_scan_hash_diff_on_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "all.gguf"
    write_all_types(path)
    rep = scan(path)
    assert rep.scanned and rep.verdict == "safe" and rep.format == "gguf"
    assert main(["hash", "-a", "sha256", str(path)]) == 0
    assert main(["diff", str(path), str(path)]) == 0
    capsys.readouterr()


def test_scan_finds_a_pickle_hidden_after_the_tensors(tmp_path: Path) -> None:
    path = tmp_path / "all.gguf"
    write_all_types(path)
    evil = tmp_path / "evil.gguf"
    # a protocol-2 pickle calling os.system, appended after the last tensor
    payload = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03."
    evil.write_bytes(path.read_bytes() + payload)
    rep = scan(evil)
    assert rep.verdict == "dangerous", rep.findings


def test_inspect_scan_hash_of_gguf_never_import_torch(
    tmp_path: Path, sub_env: dict[str, str]
) -> None:
    path = tmp_path / "all.gguf"
    write_all_types(path)
    code = (
        "import sys; from sdtool.cli.main import main\n"
        "for argv in (['inspect', sys.argv[1], '--json'], ['scan', sys.argv[1]],"
        " ['hash', '-a', 'crc32', sys.argv[1]]):\n"
        "    assert main(argv) == 0, argv\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'gguf' not in sys.modules, 'gguf imported'\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=sub_env
    )
    assert r.returncode == 0, r.stderr


# -- hostile headers --------------------------------------------------------------------------


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _head(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _tensor(name: str, dims: list[int], type_id: int, offset: int) -> bytes:
    return (
        _s(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", type_id, offset)
    )


ARCH_KV = _s("general.architecture") + struct.pack("<I", 8) + _s("flux")
HOSTILE: dict[str, bytes] = {
    "2**64-1 tensors": _head(2**64 - 1, 0),
    "2**60 metadata entries": _head(0, 2**60),
    "a key of 2**63 bytes": _head(0, 1) + struct.pack("<Q", 2**63),
    "a string value of 2**62 bytes": _head(0, 1) + _s("k") + struct.pack("<IQ", 8, 2**62),
    "an array of 2**61 u64": _head(0, 1) + _s("k") + struct.pack("<IIQ", 9, 10, 2**61),
    "an array of 2**40 strings": _head(0, 1) + _s("k") + struct.pack("<IIQ", 9, 8, 2**40),
    "arrays nested 1000 deep": _head(0, 1) + _s("k") + struct.pack("<I", 9)
    + struct.pack("<IQ", 9, 1) * 1000,
    "unknown value type": _head(0, 1) + _s("k") + struct.pack("<I", 99) + b"\0" * 16,
    "4 billion dimensions": _head(1, 0) + _s("w") + struct.pack("<I", 2**32 - 1) + b"\0" * 64,
    "dims whose product overflows": _head(1, 0) + _tensor("w", [2**40, 2**40, 2**40], 0, 0),
    "a tensor past the end": _head(1, 1) + ARCH_KV + _tensor("w", [1024, 1024], 0, 0),
    "an offset of 2**63": _head(1, 0) + _tensor("w", [4], 0, 2**63) + b"\0" * 64,
    "an unknown ggml type": _head(1, 0) + _tensor("w", [32], 77, 0) + b"\0" * 64,
    "a row that is not whole blocks": _head(1, 0) + _tensor("w", [33], 8, 0) + b"\0" * 64,
    "a duplicated tensor name": _head(2, 0) + _tensor("w", [4], 0, 0) + _tensor("w", [4], 0, 32)
    + b"\0" * 96,
    "a bad alignment": _head(0, 1) + _s("general.alignment") + struct.pack("<II", 4, 3),
    "a name that is not UTF-8": _head(0, 1) + _s(b"\xff\xfe") + struct.pack("<IB", 0, 1),
    "version 1": _head(0, 0, version=1),
    "big-endian": b"GGUF" + struct.pack(">IQQ", 3, 0, 0),
    "a header cut short": _head(1, 1) + _s("general.arch"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_headers_are_refused_without_big_allocations(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(HOSTILE[name])
    tracemalloc.start()
    try:
        with pytest.raises(SdtoolError):
            read_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    for argv in (["inspect", str(path)], ["convert", str(path), str(tmp_path / "o.safetensors")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"sdtool: {path}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o.safetensors").exists()
    rep = scan(path)
    assert not rep.scanned and rep.format == "gguf" and rep.errors, rep


def test_orig_shape_that_does_not_fit_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), arch="sdxl")
    w.add_array("comfy.gguf.orig_shape.w", [3, 3])
    w.add_tensor("w", np.zeros((4, 256), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CorruptFile, match="orig_shape"):
        read_gguf(path)
