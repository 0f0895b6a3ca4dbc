"""convert --to diffusers --tokenizers-from DIR: tokenizer folders copied from an existing
diffusers folder (sdtool ships no vocabularies), listed in model_index.json, loaded by
DiffusionPipeline.from_pretrained offline; without it, the output says how to add them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtool.cli.main import main
from sdtool.errors import UsageError
from sdtool.ops.layout import to_diffusers

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from tests.test_layout_convert import tiny_checkpoint  # noqa: E402


def clip_tokenizer_dir(d: Path) -> Path:
    """A tiny CLIP BPE tokenizer (vocab.json + merges.txt), written offline."""
    d.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "c": 3, "t</w>": 4,
             "ca": 5, "cat</w>": 6, "a": 7, "t": 8}  # fmt: skip
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    return d


@pytest.mark.slow
def test_tokenizers_copied_and_loaded(tmp_path: Path):
    src = tmp_path / "xl.safetensors"
    tiny_checkpoint(src, "sdxl-base")
    donor = tmp_path / "donor"
    clip_tokenizer_dir(donor / "tokenizer")
    clip_tokenizer_dir(donor / "tokenizer_2")
    slots = {"tokenizer": ["transformers", "CLIPTokenizer"]}
    slots["tokenizer_2"] = slots["tokenizer"]
    (donor / "model_index.json").write_text(json.dumps(slots))
    out = tmp_path / "pipe"
    assert main(["convert", str(src), str(out), "--to", "diffusers",
                 "--tokenizers-from", str(donor)]) == 0  # fmt: skip
    index = json.loads((out / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert (out / "tokenizer_2" / "merges.txt").read_text().startswith("#version")
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.tokenizer("cat").input_ids[:3] == [0, 6, 1]
    assert pipe.tokenizer_2 is not None


def test_tokenizers_absent_or_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    src = tmp_path / "sd1.safetensors"
    tiny_checkpoint(src, "sd1")
    r = to_diffusers(src, tmp_path / "plan", dry_run=True)
    assert any("--tokenizers-from DIR" in n for n in r.notes)
    donor = tmp_path / "donor"
    (donor / "tokenizer").mkdir(parents=True)
    (donor / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(UsageError, match="lacks the CLIPTokenizer files"):
        to_diffusers(src, tmp_path / "x", tokenizers_from=donor)
    assert not (tmp_path / "x").exists()
    assert main(["convert", str(src), str(tmp_path / "y"), "--to", "diffusers",
                 "--tokenizers-from", str(tmp_path / "nowhere")]) == 2  # fmt: skip
    assert "is not a folder" in capsys.readouterr().err
    out = tmp_path / "ok"
    clip_tokenizer_dir(donor / "tokenizer_ok")
    (donor / "tokenizer").rename(donor / "broken")
    (donor / "tokenizer_ok").rename(donor / "tokenizer")
    r = to_diffusers(src, out, tokenizers_from=donor)
    assert r.files["tokenizer/"] == 2 and not any("tokenizer" in n for n in r.notes)
