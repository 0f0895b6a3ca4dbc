"""Issue 10, item 7: the Python API has one shape: functions over paths with keyword options,
errors that name parameters (not CLI flags), and ``ModelFile.read(name, framework="pt")``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sdtool
from sdtool.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-sd15-ema.ckpt"

FUNCTIONS = ("open_model", "scan", "inspect", "convert", "prune", "extract", "diff", "hash_file")


def test_every_verb_is_a_function_even_after_its_package_is_imported() -> None:
    importlib.import_module("sdtool.scan.containers")  # binds sdtool.scan on the package
    for name in FUNCTIONS:
        assert callable(getattr(sdtool, name)) and not isinstance(
            getattr(sdtool, name), type(sdtool)
        ), name
    from sdtool import scan

    assert scan is sdtool.scan and scan(EXAMPLE).verdict == "safe"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    p = tmp_path / "model.ckpt"
    p.write_bytes(EXAMPLE.read_bytes())
    return p


def test_prune_and_extract_take_paths_and_derive_out(ckpt: Path) -> None:
    r = sdtool.prune(ckpt, ema="only", dtype="fp16")
    assert r.write is not None
    assert r.write.path == ckpt.with_name("model-pruned-emaonly-fp16.safetensors")
    r = sdtool.extract(str(ckpt), component="vae")
    assert r.write is not None and r.write.path == ckpt.with_name("model-vae.safetensors")
    with sdtool.open_model(ckpt) as m:  # an open model works too
        r = sdtool.extract(m, ckpt.parent / "unet.safetensors", component="unet", ema=True)
    assert r.write is not None and r.write.tensors == 686
    assert sdtool.convert(ckpt, dtype="bf16").output == ckpt.with_name("model-bf16.safetensors")
    assert sdtool.inspect(ckpt).totals.tensors == 1831
    assert sdtool.diff(ckpt, ckpt).identical
    assert sdtool.hash_file(ckpt, algorithms=["crc32"]).hashes["crc32"]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"allow_partial_ema": True}, 'allow_partial_ema=True applies only with ema="only"'),
        ({"ema": "only", "drop": ["unet"]}, 'ema="only" puts the EMA weights'),
    ],
)
def test_library_errors_name_parameters(ckpt: Path, kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(UsageError) as e:
        sdtool.prune(ckpt, **kwargs)  # type: ignore[arg-type]
    assert words in str(e.value) and "--" not in str(e.value)


@pytest.mark.parametrize(
    ("out", "kwargs", "words"),
    [
        ("o.gguf", {"quant": "Q9"}, "quant= must be one of"),
        ("o.gguf", {"dtype": "fp16"}, "dtype= does not apply to GGUF output (quant= chooses"),
        ("o.safetensors", {"quant": "Q8_0"}, "quant= writes GGUF"),
        ("o.safetensors", {"max_shard_size": "5XB"}, "max_shard_size= wants a size"),
        ("o.ckpt", {"max_shard_size": "1MB"}, "max_shard_size= needs a .safetensors output"),
        ("o.safetensors", {"fp8_scaled": True, "dtype": "fp16"}, 'fp8_scaled=True needs dtype="'),
    ],
)
def test_convert_errors_name_parameters(
    ckpt: Path, out: str, kwargs: dict[str, object], words: str
) -> None:
    with pytest.raises(UsageError) as e:
        sdtool.convert(ckpt, ckpt.parent / out, **kwargs)
    assert words in str(e.value) and "--" not in str(e.value), str(e.value)
    assert not (ckpt.parent / out).exists()


def test_existing_output_error_names_the_parameter(ckpt: Path) -> None:
    out = ckpt.with_suffix(".safetensors")
    out.write_bytes(b"keep")
    with pytest.raises(sdtool.SdtoolError) as e:
        sdtool.convert(ckpt, out)
    assert "overwrite=True" in str(e.value) and "--overwrite" not in str(e.value)


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
     torch.int64, torch.bool],
)  # fmt: skip
def test_read_framework_pt_is_bit_for_bit(tmp_path: Path, dtype: torch.dtype) -> None:
    src = (torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7 - 1).to(dtype)
    path = tmp_path / "t.safetensors"
    save_file({"w": src, "t": src.t().contiguous()}, str(path))
    with sdtool.open_model(path) as m:
        got = m.read("w", framework="pt")
        assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.shape == src.shape
        assert got.view(torch.uint8).equal(src.view(torch.uint8))
        with pytest.raises(ValueError, match="framework"):
            m.read("w", framework="tf")


def test_safetensors_whose_header_length_starts_like_a_pickle(tmp_path: Path) -> None:
    """A header of 384 bytes begins b"\\x80\\x01\\x00": the next byte is no pickle opcode, so
    pickle.load fails there; the file is read (and scanned) as the safetensors it is."""
    from sdtool.formats.sniff import sniff
    from sdtool.vocab import Format

    for pad in range(200):
        path = tmp_path / "t.safetensors"
        save_file({"w" * (1 + pad): torch.ones(2)}, str(path))
        if path.read_bytes()[:3] in (b"\x80\x00\x00", b"\x80\x01\x00"):
            break
    assert sniff(path)[0] is Format.SAFETENSORS
    assert sdtool.scan(path).verdict == "safe"
    with sdtool.open_model(path) as m:
        assert m.read("w" * (1 + pad)).tolist() == [1.0, 1.0]


def test_a_missing_path_raises_alike(tmp_path: Path) -> None:
    """scan, inspect and hash_file answer a path that is not there, or a folder, with the same
    FileAccessError; scan_paths (the CLI's) reports it among the files instead."""
    from sdtool.errors import FileAccessError
    from sdtool.scan import scan_paths

    for target, why in ((tmp_path / "nope.ckpt", "no such file"), (tmp_path, "is a directory")):
        for fn in (sdtool.scan, sdtool.inspect, sdtool.hash_file):
            with pytest.raises(FileAccessError, match=why):
                fn(target)
    report = scan_paths([tmp_path / "nope.ckpt"])
    assert report.exit_code == 2 and report.files[0].verdict == "not_scanned"
