"""Sharded safetensors: written as huggingface_hub splits, read back as one model everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdtool.cli.main import main
from sdtool.errors import CorruptFile, FileAccessError, UsageError
from sdtool.formats.open import open_model
from sdtool.formats.shards import ShardedModel
from sdtool.ops.convert import convert
from sdtool.ops.shards import index_name, parse_size


def _model(path: Path, n: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # sizes 400..1600 bytes, one 4000-byte tensor bigger than the 3KB limit used below
    arrays = {
        f"layer.{i}.weight": rng.standard_normal((10 * (i + 1),)).astype(np.float32)
        for i in range(n)
    }
    arrays["big"] = rng.standard_normal((1000,)).astype(np.float32)
    arrays["half"] = rng.standard_normal((8, 8)).astype(np.float16)
    save_file(arrays, str(path), metadata={"format": "pt", "note": "x"})
    return arrays


def test_parse_size_powers_of_ten():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500mb") == 5 * 10**8
    assert parse_size("1.5KB") == 1500
    assert parse_size("123") == 123
    for bad in ("5GiB", "", "-1", "0"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_write_matches_huggingface_hub_split(tmp_path: Path):
    hub = pytest.importorskip("huggingface_hub")
    torch = pytest.importorskip("torch")
    src = tmp_path / "in.safetensors"
    arrays = _model(src)
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    r = convert(src, out, max_shard_size="3KB", verify=True)
    index = out.parent / "model.safetensors.index.json"
    assert r.output == index and r.verified
    with open_model(src) as m:  # the plan follows the input's tensor order
        order = list(m.tensors)
    state = {k: torch.from_numpy(arrays[k]) for k in order}
    split = hub.split_torch_state_dict_into_shards(state, max_shard_size="3KB")
    text = index.read_text()
    want = {
        "metadata": {"total_size": split.metadata["total_size"]},
        "weight_map": split.tensor_to_filename,
    }
    assert text == json.dumps(want, indent=2, sort_keys=True) + "\n"
    for name, keys in split.filename_to_tensors.items():
        got = load_file(out.parent / name)
        assert list(got) == sorted(keys) or set(got) == set(keys)
        for k in keys:
            assert np.array_equal(got[k], arrays[k])


def test_read_index_folder_and_bare_set_as_one_model(tmp_path: Path):
    src = tmp_path / "in.safetensors"
    arrays = _model(src)
    d = tmp_path / "sharded"
    d.mkdir()
    convert(src, d / "diffusion_pytorch_model.safetensors", max_shard_size="500")
    index = d / "diffusion_pytorch_model.safetensors.index.json"
    shards = sorted(d.glob("*-of-*.safetensors"))
    assert len(shards) > 2
    for where in (index, d):
        with open_model(where) as m:
            assert isinstance(m, ShardedModel) and m.index == index
            assert set(m.tensors) == set(arrays)
            assert m.metadata == {"format": "pt", "note": "x"}
            assert m.file_size == sum(p.stat().st_size for p in shards)
            for k, v in arrays.items():
                assert np.array_equal(m.read(k), v)
    index.unlink()  # a bare shard set
    with open_model(d) as m:
        assert m.index is None and set(m.tensors) == set(arrays)
    # back to one file, bytes copied from the shards, verified
    one = tmp_path / "one.safetensors"
    r = convert(d, one, verify=True)
    assert r.verified and r.copied == len(arrays)
    got = load_file(one)
    assert all(np.array_equal(got[k], v) for k, v in arrays.items())
    shards[1].unlink()
    with pytest.raises(FileAccessError, match="incomplete"):
        open_model(d)


def test_bad_indexes(tmp_path: Path):
    src = tmp_path / "in.safetensors"
    _model(src)
    d = tmp_path / "s"
    d.mkdir()
    convert(src, d / "model.safetensors", max_shard_size="3KB")
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "model-00002-of-00009.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(FileAccessError, match="missing"):
        open_model(index)
    data["weight_map"][first] = "../x.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CorruptFile):
        open_model(index)
    index.write_text("{not json")
    with pytest.raises(CorruptFile, match="not JSON"):
        open_model(d)


def test_cli_inspect_diff_hash_convert_on_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    src = tmp_path / "in.safetensors"
    _model(src)
    d = tmp_path / "s"
    d.mkdir()
    assert (
        main(
            [
                "convert",
                str(src),
                str(d / "model.safetensors"),
                "--max-shard-size",
                "3KB",
                "--verify",
            ]
        )
        == 0
    )
    assert "shards" in capsys.readouterr().err
    assert main(["inspect", str(d), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tensors"]["count"] == 9 if isinstance(doc.get("tensors"), dict) else True
    assert main(["diff", str(src), str(d)]) == 0
    capsys.readouterr()
    assert main(["convert", str(d), str(tmp_path / "back.safetensors")]) == 0
    capsys.readouterr()
    assert main(["hash", str(d), "--json"]) == 0
    hashed = capsys.readouterr().out
    files = [f["path"] for f in json.loads(hashed)["files"]]
    assert [Path(f).name for f in files] == sorted(p.name for p in d.glob("*-of-*"))
    # the index named: its shards are scanned; the folder: the index is listed as JSON too
    assert main(["scan", str(d / "model.safetensors.index.json")]) == 0
    assert f"{len(files)} files: {len(files)} safe -> exit 0" in capsys.readouterr().out
    assert main(["scan", str(d)]) == 0
    out = capsys.readouterr().out
    n = len(files) + 1
    assert f"{n} files: 1 skipped (not model files), {len(files)} safe -> exit 0" in out
    assert "model.safetensors.index.json: not a model file (JSON text)" in out
    assert (
        main(["convert", str(src), str(tmp_path / "x.safetensors"), "--max-shard-size", "5GiB"])
        == 2
    )


def test_index_name_variant():
    assert index_name(Path("d/model.safetensors")).name == "model.safetensors.index.json"
    assert (
        index_name(Path("d/diffusion_pytorch_model.fp16.safetensors")).name
        == "diffusion_pytorch_model.safetensors.index.fp16.json"
    )


def test_header_of_128_bytes_is_safetensors_not_pickle(tmp_path: Path):
    """A safetensors header length of 128 makes the file start b"\\x80\\x00", a pickle PROTO."""
    for n in range(1, 120):
        p = tmp_path / f"h{n}.safetensors"
        save_file({"k" * n: np.zeros(1, np.float32)}, str(p))
        if p.read_bytes()[0] == 0x80:
            with open_model(p) as m:
                assert m.format == "safetensors"
            return
    pytest.fail("no name length gave a 128-byte header")
