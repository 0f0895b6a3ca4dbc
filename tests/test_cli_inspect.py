"""`sdtool inspect` and the CLI frame: output, JSON schema, errors as one line with exit 2."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdtool.cli.main import COMMANDS, main


def _st(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture
def sd_like(tmp_path: Path) -> Path:
    return _st(
        tmp_path / "m.safetensors",
        {
            "model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4, 3, 3), np.float16),
            "first_stage_model.decoder.conv_out.bias": np.zeros(3, np.float32),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(
                77, dtype=np.int64
            ).reshape(1, 77),
        },
        {"modelspec.title": "demo"},
    )


def test_summary(sd_like: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(sd_like)]) == 0
    out = capsys.readouterr().out
    assert "safetensors" in out
    # by component: identify's ownership of keys (issue 11.3; was a prefix table that named
    # components identify did not find). Three stray keys are three unknown ones.
    assert "3" in out and "By component" in out and "unknown" in out
    assert "modelspec.title" in out and "demo" in out


def test_json_schema(sd_like: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(sd_like), "--json", "--tensors"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "sdtool.inspect/3"  # /3: typed zip irregularities (issue 11)
    assert data["format"] == "safetensors"
    assert data["totals"] == {"tensors": 3, "parameters": 144 + 3 + 77, "bytes": 288 + 12 + 616}
    assert data["dtypes"]["I64"] == {"tensors": 1, "parameters": 77, "bytes": 616}
    comps = {c["name"]: c["tensors"] for c in data["components"]}
    assert comps == {"unknown": 3}  # too few keys for identify to name any component
    assert data["metadata"] == {"modelspec.title": "demo"}
    # file order: safetensors stores I64 before F32 before F16 (alignment, then name)
    assert [t["name"] for t in data["tensors"]] == [
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "first_stage_model.decoder.conv_out.bias",
        "model.diffusion_model.input_blocks.0.0.weight",
    ]


def test_filter(sd_like: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(sd_like), "--json", "--filter", "first_stage_model.*"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in data["tensors"]] == ["first_stage_model.decoder.conv_out.bias"]


def test_text_from_the_file_is_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _st(
        tmp_path / "evil.safetensors",
        {"a\x1b[2Jb[red]x[/red]": np.zeros(1, np.float32)},
        {"note": "line1\x1b]0;pwned\x07\u202e"},
    )
    assert main(["inspect", str(p), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[2Jb[red]x[/red]" in out  # shown, not interpreted
    assert "\\u202e" in out


def test_reads_no_tensor_bytes(sd_like: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdtool.model import ModelFile

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("inspect read tensor bytes")

    monkeypatch.setattr(ModelFile, "read_info", boom)
    monkeypatch.setattr(ModelFile, "_map", boom)
    assert main(["inspect", str(sd_like), "--json", "--tensors"]) == 0


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = _st(tmp / "good.safetensors", {"w": np.ones((32, 32), np.float32)})
    raw = good.read_bytes()
    (tmp / "dir").mkdir()
    cases = {
        "missing": (tmp / "nope.ckpt", "no such file"),
        "directory": (tmp / "dir", "directory"),
        "empty": (tmp / "empty.ckpt", "empty"),
        "truncated": (tmp / "trunc.safetensors", "truncated"),
        "corrupt header": (tmp / "corrupt.safetensors", "not valid UTF-8 JSON"),
        "git-lfs pointer": (tmp / "lfs.safetensors", "Git-LFS pointer"),
        "html": (tmp / "page.safetensors", "HTML page"),
        "unknown": (tmp / "blob.bin", "not a model file I know"),
        "truncated zip": (tmp / "trunc.ckpt", "truncated"),
    }
    (tmp / "empty.ckpt").write_bytes(b"")
    (tmp / "trunc.safetensors").write_bytes(raw[:-1000])
    hdr = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'
    (tmp / "corrupt.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 4)
    (tmp / "lfs.safetensors").write_bytes(
        b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
    )
    (tmp / "page.safetensors").write_bytes(b"<!DOCTYPE html><html><body>Login</body></html>")
    (tmp / "blob.bin").write_bytes(bytes(range(256)) * 4)
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(100)}, tmp / "full.ckpt")
    (tmp / "trunc.ckpt").write_bytes((tmp / "full.ckpt").read_bytes()[:300])
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "directory",
        "empty",
        "truncated",
        "corrupt header",
        "git-lfs pointer",
        "html",
        "unknown",
        "truncated zip",
    ],
)
def test_user_errors_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path, words = _bad_files(tmp_path)[case]
    before = path.read_bytes() if path.is_file() else None
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert str(path) in err and words in err, err
    assert "Traceback" not in err
    if before is not None:
        assert path.read_bytes() == before  # inputs are never modified


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from sdtool.errors import SdtoolError

    with pytest.raises(SdtoolError):
        main(["--debug", "inspect", str(tmp_path / "nope.ckpt")])


def test_every_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    from sdtool.cli.main import LazyGroup

    built = [n for n in COMMANDS if LazyGroup._load(n) is not None]
    assert "inspect" in built
    for name in built:
        assert name in top
        assert main([name, "--help"]) == 0
        assert "Example" in capsys.readouterr().out, name


def test_version_and_module_entry_point(sub_env: dict[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sdtool", "--version"],
        capture_output=True,
        text=True,
        check=True,
        env=sub_env,
    ).stdout
    from sdtool import __version__

    assert __version__ in out


def test_inspect_does_not_import_torch(sd_like: Path, sub_env: dict[str, str]) -> None:
    code = (
        "import sys; from sdtool.cli.main import main; rc = main(['inspect', sys.argv[1]]);"
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(sd_like)], check=True, capture_output=True, env=sub_env
    )


def test_by_component_table_is_identify_ownership(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The by-component table and identify's "components:" line agree, key for key."""
    import sdlayouts as L

    path = L.write_header_only(tmp_path / "sd1.safetensors", L.as_dtype(L.sd1(ema=True), "F16"))
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    comps = {c["name"]: c["tensors"] for c in data["components"]}
    ident = {c["name"]: c["tensors"] for c in data["identity"]["components"]}
    assert comps == {**ident, "markers": 2}  # model_ema.decay / num_updates
    # one spelling of a component in every JSON document: vocab's name (issue 11.2); the text
    # table shows the label
    assert comps["clip-l"] == 197 and comps["unet"] == 686 and comps["ema"] == 686
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "CLIP-L" in text and "UNet" in text and "clip-l" not in text


def test_json_zip_irregularities_are_typed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """inspect/3: the zip reader's irregularities are typed objects (kind, message, member),
    the same values scan consumes, not sentences (issue 11.5)."""
    import warnings
    import zipfile

    import torch

    from sdtool.formats import zip as zipfmt
    from sdtool.formats.open import open_model

    p = tmp_path / "dup.pt"
    torch.save({"w": torch.zeros(2)}, p)
    with warnings.catch_warnings(), zipfile.ZipFile(p, "a") as z:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
        z.writestr("dup/extra", b"1")
        z.writestr("dup/extra", b"2")
    with open_model(p) as m:
        irr = m.container.irregularities  # type: ignore[attr-defined]
    assert [(i.kind, i.member) for i in irr] == [(zipfmt.Irregular.DUPLICATE_NAME, "dup/extra")]
    assert main(["inspect", str(p), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["container"]["irregularities"] == [
        {"kind": "duplicate-name", "message": irr[0].message, "member": "dup/extra"}
    ]
