"""identify(): one file per kind and architecture, built from ../shared/reference/layouts.

Architecture tests use header-only files with the real shapes (sparse data, nothing read);
kind tests that do not depend on shapes use small ones.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import sdlayouts as L
from safetensors.numpy import save_file

from sdtool import open_model
from sdtool.cli.identity import identity_lines
from sdtool.identify import Identity, identify
from sdtool.identify.keysets import signatures
from sdtool.model import ModelFile


def ident_of(
    tmp_path: Path,
    entries: L.Entries,
    *,
    name: str = "m.safetensors",
    metadata: dict[str, str] | None = None,
    dtype: str | None = "F16",
) -> Identity:
    e = L.as_dtype(entries, dtype) if dtype else entries
    path = L.write_header_only(tmp_path / name, e, metadata)
    with open_model(path) as m:
        return identify(m)


def counts(ident: Identity) -> dict[str, tuple[int, int]]:
    return {c.name: (c.found, c.expected) for c in ident.components}


# -- checkpoints per architecture ----------------------------------------------------------------

ARCH_CASES = {
    # name: (entries, architecture, variant, components {name: found==expected})
    "sd1": (lambda: L.sd1(), "sd1", None, {"unet": 686, "vae": 248, "clip-l": 197}),
    "sd1-inpainting": (
        lambda: L.sd1(unet="UNET-v1-Inpainting"), "sd1", "inpainting", {"unet": 686}
    ),
    "sd1-pix2pix": (
        lambda: L.sd1(unet="UNET-v1-Pix2Pix"), "sd1", "instruct-pix2pix", {"unet": 686}
    ),
    "sd2": (lambda: L.sd2(), "sd2", None, {"unet": 686, "vae": 248, "openclip-h": 294}),
    "sd2-inpainting": (lambda: L.sd2("UNET-v2-Inpainting"), "sd2", "inpainting", {"unet": 686}),
    "sd2-depth": (lambda: L.sd2("UNET-v2-Depth"), "sd2", "depth", {"unet": 686, "depth": 368}),
    "sdxl-base": (
        lambda: L.sdxl(), "sdxl-base", None,
        {"unet": 1680, "vae": 248, "clip-l": 178, "clip-g": 374},
    ),
    "sdxl-refiner": (
        lambda: L.sdxl_refiner(), "sdxl-refiner", None, {"unet": 1220, "vae": 248, "clip-g": 390}
    ),
    "sd3": (
        lambda: L.sd3(), "sd3", None,
        {"mmdit": 491, "vae": 244, "clip-l": 197, "clip-g": 517, "t5xxl": 219},
    ),
    "flux-dev": (
        lambda: L.flux(), "flux-dev", None,
        {"flux": 780, "vae": 244, "clip-l": 196, "t5xxl": 219},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_checkpoint_architectures(tmp_path: Path, case: str) -> None:
    make, arch, variant, comps = ARCH_CASES[case]
    ident = ident_of(tmp_path, make())
    assert ident.kind == "checkpoint"
    assert ident.architecture == arch
    assert ident.variant == variant
    got = counts(ident)
    for name, n in comps.items():
        assert got[name] == (n, n), (name, got)
    assert ident.unknown_keys == ()
    assert all(not c.mismatches for c in ident.components), [
        (c.name, c.mismatches[:1]) for c in ident.components
    ]


def test_sd1_summary_reads_like_the_issue(tmp_path: Path) -> None:
    ident = ident_of(tmp_path, L.sd1(ema=True))
    lines = identity_lines(ident)
    assert "components: UNet 686/686, VAE 248/248, CLIP-L 197/197, noise schedule 12/12" in lines
    assert "kind: checkpoint (SD 1.x)" in lines
    assert ident.ema and ident.pruning == "full"
    assert "EMA: yes (686/686 keys under model_ema.)" in lines
    assert set(ident.markers) == {"model_ema.decay", "model_ema.num_updates"}
    assert ident.precision["I64"] == {"tensors": 1, "bytes": 8 * 77}
    assert ident.precision["I32"] == {"tensors": 1, "bytes": 4}
    assert ident.precision["F16"]["tensors"] == 686 * 2 + 248 + 196 + 12 + 1


def test_flux_schnell_bare_and_dev_prefixed(tmp_path: Path) -> None:
    bare = ident_of(tmp_path, L.flux(dev=False, bare=True), name="s.safetensors")
    assert (bare.kind, bare.architecture) == ("unet", "flux-schnell")
    assert bare.components[0].prefix == ""
    assert bare.prediction == "flow"
    dev = ident_of(
        tmp_path,
        L.strip_prefix(L.flux(), "model.diffusion_model.", "model.diffusion_model."),
        name="d.safetensors",
    )
    assert (dev.kind, dev.architecture) == ("unet", "flux-dev")
    assert dev.components[0].prefix == "model.diffusion_model."


def test_sdxl_v_pred_marker_is_not_a_heuristic(tmp_path: Path) -> None:
    e = L.sdxl()
    e["v_pred"] = ("F32", ())
    ident = ident_of(tmp_path, e, dtype=None)
    assert ident.prediction == "v"
    assert ident.prediction_source == "marker key 'v_pred'"
    assert ident.prediction_heuristic is False
    assert ident.unknown_keys == ()


def test_prediction_from_modelspec_and_from_name(tmp_path: Path) -> None:
    meta = {"modelspec.architecture": "stable-diffusion-v2-768-v", "modelspec.prediction_type": "v"}
    ident = ident_of(tmp_path, L.sd2(), metadata=meta)
    assert (ident.prediction, ident.prediction_heuristic) == ("v", False)
    assert "modelspec.prediction_type" in (ident.prediction_source or "")
    named = ident_of(tmp_path, L.sd2(), name="sd2-768-vpred.safetensors")
    assert (named.prediction, named.prediction_heuristic) == ("v", True)
    plain = ident_of(tmp_path, L.sd2(), name="plain.safetensors")
    assert plain.prediction is None
    assert any("cannot be told" in n for n in plain.notes)


def test_incomplete_ema_and_training_state(tmp_path: Path) -> None:
    e = L.sd1(ema=True)
    gone = [k for k in e if k.startswith("model_ema.diffusion_modelout")][:3]
    for k in gone:
        del e[k]
    path = L.write_header_only(tmp_path / "m.safetensors", L.as_dtype(e, "F16"))
    with open_model(path) as m:
        m.extra = {"optimizer_states": [], "global_step": 10, "lr_schedulers": []}
        ident = identify(m)
    ema = ident.component("ema")
    assert ema is not None and (ema.found, ema.expected) == (683, 686)
    assert sorted(ema.missing) == sorted(gone)
    assert ident.pruning == "full"
    assert ident.training_state == ("optimizer_states", "global_step", "lr_schedulers")
    assert "training state present" in (ident.pruning_note or "")


def test_ema_only_by_name_is_labelled_heuristic(tmp_path: Path) -> None:
    ident = ident_of(tmp_path, L.sd1(), name="v1-5-pruned-emaonly.safetensors")
    assert ident.pruning == "ema-only"
    assert "heuristic" in (ident.pruning_note or "")
    assert ident_of(tmp_path, L.sd1(), name="x.safetensors").pruning == "pruned"


def test_old_sd1_clip_spelling(tmp_path: Path) -> None:
    e = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in L.sd1().items()
    }
    ident = ident_of(tmp_path, e)
    clip = ident.component("clip-l")
    assert clip is not None and clip.alias and (clip.found, clip.expected) == (197, 197)
    assert ident.architecture == "sd1" and ident.unknown_keys == ()


def test_shape_mismatch_and_missing_keys_listed(tmp_path: Path) -> None:
    e = L.sd1()
    e["first_stage_model.decoder.conv_in.weight"] = ("F32", (512, 8, 3, 3))
    del e["model.diffusion_model.out.2.bias"]
    e["junk.thing"] = ("F32", (2,))
    ident = ident_of(tmp_path, e)
    vae, unet = ident.component("vae"), ident.component("unet")
    assert vae is not None and unet is not None
    assert [(m.key, m.shape, m.expected) for m in vae.mismatches] == [
        ("first_stage_model.decoder.conv_in.weight", (512, 8, 3, 3), (512, 4, 3, 3))
    ]
    assert unet.missing == ("model.diffusion_model.out.2.bias",)
    assert (unet.found, unet.expected) == (685, 686)
    assert ident.unknown_keys == ("junk.thing",)
    text = "\n".join(identity_lines(ident))
    assert "1 keys missing: model.diffusion_model.out.2.bias" in text
    assert "unknown keys (1): junk.thing" in text


def test_tiny_shapes_fall_back_to_text_encoder_hint(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    L.write_tiny(path, L.sd1())
    with open_model(path) as m:
        ident = identify(m)
    assert ident.kind == "checkpoint" and ident.architecture == "sd1"
    assert "CLIP-L under 'cond_stage_model.transformer.'" in (ident.architecture_source or "")
    assert any("cross-attention width 3 matches no known architecture" in n for n in ident.notes)


# -- standalone components -------------------------------------------------------------------------


def test_vae_with_loss_junk(tmp_path: Path) -> None:
    e = L.from_txt("VAE-v1-SD", "")
    e["loss.logvar"] = ("F32", ())
    e["loss.discriminator.main.0.weight"] = ("F32", (64, 3, 4, 4))
    ident = ident_of(tmp_path, e)
    assert ident.kind == "vae"
    assert counts(ident) == {"vae": (248, 248)}
    assert ident.unknown_keys == (
        "loss.logvar",
        "loss.discriminator.main.0.weight",
    )
    assert ident.architecture is None


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_unet_only(tmp_path: Path, prefix: str) -> None:
    ident = ident_of(tmp_path, L.from_txt("UNET-v2-SD", prefix))
    assert (ident.kind, ident.architecture) == ("unet", "sd2")
    assert ident.components[0].prefix == prefix


@pytest.mark.parametrize(
    ("entries", "arch"),
    [
        (lambda: L.from_txt("CLIP-v1-SD", "cond_stage_model.transformer.text_model."), "sd1"),
        (lambda: L.from_txt("CLIP-v2-SD", "cond_stage_model.model."), "sd2"),
        (lambda: L.from_txt("CLIP-XL-SD", "conditioner.embedders.1.model."), "sdxl-base"),
    ],
)
def test_text_encoder_only(tmp_path: Path, entries: object, arch: str) -> None:
    ident = ident_of(tmp_path, entries())  # type: ignore[operator]
    assert (ident.kind, ident.architecture) == ("text-encoder", arch)


@pytest.mark.parametrize("prefix", ["", "control_model."])
def test_controlnet(tmp_path: Path, prefix: str) -> None:
    ident = ident_of(tmp_path, L.from_txt("ControlNet-v1-SD", prefix))
    assert (ident.kind, ident.architecture) == ("controlnet", "sd1")
    assert counts(ident) == {"controlnet": (340, 340)}


@pytest.mark.parametrize(
    ("component", "name"),
    [("diffuser", "unet"), ("vae", "vae"), ("clip_l", "clip-l")],
)
def test_diffusers_components(tmp_path: Path, component: str, name: str) -> None:
    prefix = {"diffuser": "unet.", "vae": "vae.", "clip_l": "te."}[component]
    e = L.strip_prefix(L.from_yaml("sd1-kohya", [component]), prefix)
    ident = ident_of(tmp_path, e)
    # one kind per role whatever the naming (was "diffusers-component"; issue 13: a standalone
    # text encoder is a text encoder); the naming is the component's layout
    assert ident.kind == {"unet": "unet", "vae": "vae", "clip-l": "text-encoder"}[name]
    assert ident.components[0].layout == ("ldm" if name == "clip-l" else "diffusers")
    assert [c.name for c in ident.components] == [name]
    assert ident.components[0].complete


# -- unrecognised ----------------------------------------------------------------------------------


def test_unknown_names_nearest_checkpoint(tmp_path: Path) -> None:
    e = L.sd1()
    unet = [k for k in e if k.startswith("model.diffusion_model.")]
    e = {k: v for k, v in e.items() if k not in unet[:400] and not k.startswith("cond_stage")}
    e = {k: v for k, v in e.items() if not k.startswith("first_stage_model.decoder")}
    ident = ident_of(tmp_path, e)
    assert ident.kind == "unknown"
    assert ident.nearest == "SD 1.x checkpoint"
    assert "400 UNet keys missing" in (ident.nearest_reason or "")
    assert "CLIP-L absent" in (ident.nearest_reason or "")
    assert any(
        line.startswith("not recognised; nearest: SD 1.x checkpoint")
        for line in identity_lines(ident)
    )


def test_unknown_with_nothing_near(tmp_path: Path) -> None:
    ident = ident_of(tmp_path, {"foo.bar": ("F32", (3,)), "baz": ("F32", (2, 2))})
    assert ident.kind == "unknown" and ident.nearest is None
    assert ident.nearest_reason == "no key matches any known layout"
    assert ident.unknown_keys == (
        "foo.bar",
        "baz",
    )
    assert ident.to_json()["nearest"] == {
        "match": None,
        "reason": "no key matches any known layout",
    }


# -- LoRA, embeddings, hypernetworks ---------------------------------------------------------------


def lora_file(
    tmp_path: Path, tensors: dict[str, tuple[int, ...]], meta: dict[str, str] | None = None
) -> Identity:
    path = tmp_path / "lora.safetensors"
    save_file({k: np.zeros(s, np.float16) for k, s in tensors.items()}, str(path), metadata=meta)
    with open_model(path) as m:
        return identify(m)


def toolkit_lora(rank: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for name in ("LoRA-v1A-UNET", "LoRA-v1A-CLIP"):
        for k, s in L.txt_layout(name).items():
            out[k] = tuple(rank if d == -1 else d for d in s)
    return out


def test_kohya_sd1_lora(tmp_path: Path) -> None:
    ident = lora_file(tmp_path, toolkit_lora(8), {"ss_network_alpha": "4", "ss_network_dim": "8"})
    assert ident.kind == "lora" and ident.architecture == "sd1"
    lo = ident.lora
    assert lo is not None
    assert lo.flavour == "kohya" and lo.ranks == {8: 264} and lo.alphas == ("4",)
    assert lo.modules == {"unet": 192, "te1": 72} and lo.alpha_tensors == 264
    assert lo.network == {"ss_network_alpha": "4", "ss_network_dim": "8"}
    assert ident.unknown_keys == ()


def test_kohya_sdxl_lora_by_second_text_encoder(tmp_path: Path) -> None:
    t = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": (640, 4),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (3072, 4),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1280),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (5120, 4),
    }
    ident = lora_file(tmp_path, t)
    assert ident.architecture == "sdxl-base"
    assert ident.lora is not None and ident.lora.modules == {"unet": 1, "te1": 1, "te2": 1}


def test_sdxl_unet_only_lora_by_context_width(tmp_path: Path) -> None:
    t = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (16, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": (640, 16),
    }
    ident = lora_file(tmp_path, t)
    assert ident.architecture == "sdxl-base"
    assert ident.architecture_source == "cross-attention context width 2048"


@pytest.mark.parametrize(
    ("suffixes", "flavour", "rank"),
    [
        ({".hada_w1_a": (320, 4), ".hada_w1_b": (4, 320), ".hada_w2_a": (320, 4),
          ".hada_w2_b": (4, 320), ".alpha": ()}, "lycoris-loha", 4),
        ({".lokr_w1": (8, 8), ".lokr_w2_a": (40, 2), ".lokr_w2_b": (2, 40)}, "lycoris-lokr", 2),
        ({".lora_down.weight": (6, 320), ".lora_up.weight": (320, 6), ".dora_scale": (1, 320)},
         "kohya (DoRA)", 6),
    ],
)  # fmt: skip
def test_lycoris_flavours(
    tmp_path: Path, suffixes: dict[str, tuple[int, ...]], flavour: str, rank: int
) -> None:
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    ident = lora_file(tmp_path, {module + s: shape for s, shape in suffixes.items()})
    assert ident.kind == "lora"
    assert ident.lora is not None and ident.lora.flavour == flavour
    assert ident.lora.ranks == {rank: 1}


def test_lycoris_locon_from_metadata(tmp_path: Path) -> None:
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "locon"}'}
    ident = lora_file(tmp_path, toolkit_lora(4), meta)
    assert ident.lora is not None and ident.lora.flavour == "lycoris-locon"


def test_peft_lora_under_base_model(tmp_path: Path) -> None:
    base = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    t = {
        base + ".lora_A.weight": (4, 1024),
        base + ".lora_B.weight": (320, 4),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 1024),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": (1024, 4),
    }
    ident = lora_file(tmp_path, t, {"modelspec.architecture": "stable-diffusion-v2-512/lora"})
    lo = ident.lora
    assert lo is not None and lo.flavour == "diffusers-peft"
    # bare diffusers UNet module names (down_blocks...) are the UNet's (were "other")
    assert lo.modules == {"unet": 1, "te1": 1}
    assert ident.architecture == "sd2"


@pytest.mark.parametrize(
    ("tensors", "arch", "vectors", "layout"),
    [
        ({"emb_params": (8, 768)}, "sd1", 8, "emb_params"),
        ({"emb_params": (4, 1024)}, "sd2", 4, "emb_params"),
        ({"clip_l": (2, 768), "clip_g": (2, 1280)}, "sdxl-base", 2, "sdxl"),
        ({"<cat-toy>": (768,)}, "sd1", 1, "tokens"),
        ({"string_to_param.*": (3, 768)}, "sd1", 3, "string_to_param"),
    ],
)
def test_embeddings(
    tmp_path: Path, tensors: dict[str, tuple[int, ...]], arch: str, vectors: int, layout: str
) -> None:
    path = tmp_path / "e.safetensors"
    save_file({k: np.zeros(s, np.float32) for k, s in tensors.items()}, str(path))
    with open_model(path) as m:
        ident = identify(m)
    assert ident.kind == "embedding" and ident.architecture == arch
    assert ident.embedding is not None
    assert (ident.embedding.vectors, ident.embedding.layout) == (vectors, layout)


def test_hypernetwork(tmp_path: Path) -> None:
    t = {}
    for width in (320, 640, 768, 1280):
        for i in (0, 1):
            t[f"{width}.{i}.linear.0.weight"] = np.zeros((width * 2, width), np.float32)
            t[f"{width}.{i}.linear.0.bias"] = np.zeros((width * 2,), np.float32)
    path = tmp_path / "h.safetensors"
    save_file(t, str(path))
    with open_model(path) as m:
        ident = identify(m)
    assert ident.kind == "hypernetwork" and ident.architecture == "sd1"
    assert ident.hypernetwork is not None and ident.hypernetwork["widths"] == [320, 640, 768, 1280]


# -- contract ----------------------------------------------------------------------------------


def test_header_only_never_reads_tensor_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("identify read tensor bytes")

    monkeypatch.setattr(ModelFile, "read", boom)
    monkeypatch.setattr(ModelFile, "read_info", boom)
    ident = ident_of(tmp_path, L.sdxl())
    assert ident.kind == "checkpoint"


def test_json_schema_is_plain_and_stable(tmp_path: Path) -> None:
    e = L.sd1(ema=True)
    e["junk"] = ("F32", (1,))
    data = ident_of(tmp_path, e).to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["schema"] == "sdtool.identify/2"
    assert set(data) == {
        "schema", "kind", "architecture", "architecture_label", "architecture_source",
        "variant", "prediction", "ema", "precision", "pruning", "components", "markers",
        "training_state", "unknown_count", "unknown_keys", "lora", "embedding",
        "hypernetwork", "nearest", "notes", "model", "quantization",
    }  # fmt: skip
    unet = data["components"][0]
    assert unet["name"] == "unet" and unet["prefix"] == "model.diffusion_model."
    assert (unet["found"], unet["expected"], unet["complete"]) == (686, 686, True)
    assert data["unknown_keys"] == ["junk"] and data["unknown_count"] == 1
    assert data["pruning"]["state"] == "full"


def test_package_tables_match_the_layouts() -> None:
    """The shipped signatures.json.gz is what tools/gen_signatures.py makes from the layouts."""
    L.need_layouts()
    tool = Path(__file__).resolve().parents[1] / "tools" / "gen_signatures.py"
    spec = importlib.util.spec_from_file_location("gen_signatures", tool)
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    built = gen.build(L.LAYOUTS)["signatures"]
    shipped = signatures()
    assert set(built) == set(shipped)
    for sid, sig in shipped.items():
        assert list(sig.keys) == built[sid]["keys"], sid
    assert (
        gen.encode(gen.build(L.LAYOUTS))
        == tool.parents[1].joinpath("sdtool", "data", "signatures.json.gz").read_bytes()
    )


def test_index_for_a_files_tails_is_the_whole_index_cut_down() -> None:
    """identify looks keys up in ``index_for`` the file's key tails, not in the whole
    ``component_index``: the same (signature, alias) lists in the same order for every tail,
    aliased (CLIP-L's ``text_model.``) and not; a signature's keys are distinct (each key
    counts once)."""
    import random

    from sdtool.identify.keysets import component_index, index_for

    for sig in signatures().values():
        assert len(set(sig.keys)) == len(sig.keys), sig.id
    whole = component_index()
    rng = random.Random(3)
    names = sorted(whole)
    for tails in (
        set(names),
        set(rng.sample(names, 3000)) | {"nothing.here", "weight", ""},
        {k for k in names if k.startswith(("text_model.", "embeddings.", "encoder."))},
        set(),
    ):
        assert index_for(tails) == {k: v for k, v in whole.items() if k in tails}


def test_candidates_split_every_key_at_every_dot_in_order() -> None:
    """identify's candidates (signature, prefix, alias) and their counts, in first-seen order,
    as splitting each key in turn at every dot and looking each tail up in the whole index."""
    from collections import Counter

    from sdtool.identify.engine import _candidates
    from sdtool.identify.keysets import component_index

    def reference(keys: list[str]) -> list[tuple[tuple[str, str, bool], int]]:
        index, counts = component_index(), Counter[tuple[str, str, bool]]()
        for key in keys:
            pos = -1
            while True:
                for sid, alias in index.get(key[pos + 1 :], ()):
                    counts[(sid, key[: pos + 1], alias)] += 1
                pos = key.find(".", pos + 1)
                if pos < 0:
                    break
        return list(counts.items())

    clip = [f"x.text_model.{k}" for k in signatures()["clip-l"].keys[:40]]
    unet = [f"model.diffusion_model.{k}" for k in signatures()["unet-ldm"].keys[::5]]
    odd = ["a..b", "a.", ".", "", "..weight", "text_model.embeddings.position_ids", "weight"]
    for keys in (clip + unet + odd, odd, unet[::-1] + [k[2:] for k in clip], []):
        t = dict.fromkeys(keys)
        assert list(_candidates(t).items()) == reference(keys)  # type: ignore[arg-type]


def test_quantized_names_found_for_the_whole_file_as_name_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """identify looks for quantization side tensors in all names at once (joined by newlines,
    each rule under MULTILINE, a literal each rule needs checked first): it finds exactly the
    names the rules find one by one, and names with a newline in them take the slow path."""
    import re

    from sdtool.identify import engine as E
    from sdtool.identify import tables as T

    assert E._line_rules() is not None  # the shipped rules take the whole-file path
    unet = [f"model.diffusion_model.{k}" for k in signatures()["unet-ldm"].keys]
    quant = ["x.scaled_fp8", "scaled_fp8", "a.scale_weight", "b.comfy_quant", "c.weight_scale",
             "c.weight_scale_2", "d.weight.absmax", "d.weight.quant_state.bitsandbytes__nf4",
             "e.SCB", "f.weight._data", "g.output_scale", "h._weight_qdata", "blk.0.attn.weight",
             "enc.blk.1.x", "token_embd.weight", "output.weight", "output_norm.weight"]  # fmt: skip
    near = ["x.scaled_fp8.y", "xscaled_fp8", "a.scale_weightx", "blk.x.", "model.blk.0.a", "",
            "weight", "output.weight.bias", "c.weight_scale_3", "a\nblk.0.x",
            "blk.0.\n"]  # fmt: skip
    cases = [unet, unet + near[:9], [], [""], near, quant]
    cases += [[*unet[:50], q, *unet[50:60]] for q in quant + near]
    E._any_quant.cache_clear()
    assert E._maybe_quantized(unet) == []
    assert E._any_quant.cache_info().currsize == 0  # compiled only for a file a rule matches
    for keys in cases:
        assert E._maybe_quantized(keys) == [k for k in keys if E._any_quant().search(k)], keys[-3:]

    # a rule that could match a newline or anchor at the text's ends turns the fast path off
    for unsafe in (r"a\sb", r"[^x]y", r"\Ax", r"x.y", r"(?s)x", "a\nb", r"[\n]", r"(?=a)b", r"\Bx"):
        monkeypatch.setattr(T, "QUANT_RULES", (*T.QUANT_RULES, T.Quant(re.compile(unsafe), "?")))
        E._line_rules.cache_clear()
        assert E._line_rules() is None, unsafe
    monkeypatch.undo()
    E._line_rules.cache_clear()
    assert E._line_rules() is not None
