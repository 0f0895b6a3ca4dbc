"""identify() on the real LoRA and embedding files of ../shared/corpus (header only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sdtool import open_model
from sdtool.cli.identity import identity_lines
from sdtool.identify import identify

pytestmark = pytest.mark.corpus


@pytest.mark.parametrize(
    ("name", "rank", "tokens"),
    [
        ("lora-cloneofsimo/analog_svd_rank4.safetensors", 4, []),
        ("lora-cloneofsimo/lora_disney.safetensors", 1, ["<s1>", "<s2>"]),
        ("lora-cloneofsimo/lora_disney_inpainting.safetensors", 1, ["<s1>", "<s2>"]),
    ],
)
def test_cloneofsimo_loras(corpus: Path, name: str, rank: int, tokens: list[str]) -> None:
    with open_model(corpus / "files" / name) as m:
        ident = identify(m)
    assert ident.kind == "lora"
    lo = ident.lora
    assert lo is not None
    assert lo.flavour == "cloneofsimo"
    assert lo.ranks == {rank: 192}  # 144 UNet + 48 text-encoder down factors
    assert lo.modules == {"unet": 144, "te1": 48}
    assert lo.tokens == tuple(tokens)
    assert ident.unknown_keys == ()


def test_easynegative_embedding(corpus: Path) -> None:
    with open_model(corpus / "files" / "a1111-embeddings" / "EasyNegative.safetensors") as m:
        ident = identify(m)
    assert (ident.kind, ident.architecture) == ("embedding", "sd1")
    assert ident.embedding is not None
    assert (ident.embedding.vectors, ident.embedding.dims) == (8, (768,))


def test_safetensors_samples_are_not_models(corpus: Path) -> None:
    with open_model(corpus / "files" / "safetensors-samples" / "overall.safetensors") as m:
        ident = identify(m)
    assert ident.kind == "unknown" and ident.nearest is None
    assert len(ident.unknown_keys) == 9


TORCH_EMBEDDINGS = [
    "a1111-embeddings/bad-hands-5.pt",
    "a1111-embeddings/bad_prompt_version2.pt",
    "a1111-embeddings/eyeliner2.pt",
    "lora-cloneofsimo/lora_kiriko2.ti.pt",
]


@pytest.mark.parametrize("name", TORCH_EMBEDDINGS)
def test_torch_embeddings(corpus: Path, name: str) -> None:
    if importlib.util.find_spec("sdtool.formats.torchfile") is None:
        pytest.skip("the torch loader is not on this branch yet")
    with open_model(corpus / "files" / name) as m:
        ident = identify(m)
    assert ident.kind == "embedding", identity_lines(ident)
    assert ident.embedding is not None and ident.embedding.dims == (768,)
    assert ident.architecture == "sd1"
