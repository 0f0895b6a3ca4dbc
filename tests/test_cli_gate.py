"""``sdtool scan`` as a CI gate (issue 10, item 1): model folders as people keep them scan with
exit 0, files that are by content no model are skipped and counted, truncated or corrupt files
of every format are "could not scan" (exit 2, dangerous wins), error lines go to stderr, and
``-`` reads standard input."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from sdtool.cli.main import main
from tests.scan_payloads import MARK, REDUCE, STOP, STRING, asm, call_global
from tests.test_formats_more import _tar_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-sd15-ema.ckpt"


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An A1111 / ComfyUI model folder: models with their previews, infos, configs, notes."""
    d = tmp_path / "models"
    d.mkdir()
    save_file({"lora_up.weight": np.ones((4, 4), np.float32)}, str(d / "style.safetensors"))
    (d / "sd15.ckpt").write_bytes(EXAMPLE.read_bytes())
    (d / "style.preview.png").write_bytes(_png())
    (d / "sd15.preview.jpeg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(64))
    (d / "style.civitai.info").write_text(json.dumps({"id": 1, "trainedWords": ["foo"]}))
    (d / "style.json").write_text('{"activation text": "foo"}')
    (d / "sd15.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n")
    (d / "notes.txt").write_text("hello, the trigger words are foo and bar\n")
    (d / "README.md").write_text("# Style LoRA\n\nUse at weight 0.8.\n")
    return d


LABELS = {
    "style.preview.png": "PNG image",
    "sd15.preview.jpeg": "JPEG image",
    "style.civitai.info": "JSON text",
    "style.json": "JSON text",
    "sd15.yaml": "YAML text",
    "notes.txt": "text",
    "README.md": "text",
}


def test_model_folder_passes_the_gate(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", str(folder)]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    for name, what in LABELS.items():
        assert f"SKIPPED     {folder / name}: not a model file ({what})\n" in cap.out
    assert cap.out.endswith("9 files: 7 skipped (not model files), 2 safe -> exit 0\n"), cap.out
    doc = json.loads(_run_json(folder, capsys))
    assert doc["exit_code"] == 0 and doc["summary"]["skipped"] == 7
    skipped = {Path(f["path"]).name: f["skipped"] for f in doc["files"] if f["skipped"]}
    assert skipped == LABELS


def test_placeholders_and_windows_notes_pass_the_gate(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The empty placeholders A1111 and ComfyUI ship in their model folders, a note saved as
    UTF-16 (Notepad's "Unicode") and animated previews are skipped; an empty file under a
    model's name is a download that never arrived: could not scan."""
    (folder / "Put Stable Diffusion checkpoints here.txt").write_bytes(b"")
    (folder / "put_checkpoints_here").write_bytes(b"")
    (folder / "notes-utf16.txt").write_bytes("trigger words: foo\r\n".encode("utf-16"))
    (folder / "style.preview.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    (folder / "style.preview.webm").write_bytes(b"\x1aE\xdf\xa3" + bytes(64))
    assert main(["scan", str(folder)]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    for name, what in [
        ("Put Stable Diffusion checkpoints here.txt", "empty file"),
        ("put_checkpoints_here", "empty file"),
        ("notes-utf16.txt", "text"),
        ("style.preview.mp4", "MP4 video"),
        ("style.preview.webm", "WebM video"),
    ]:
        assert f"SKIPPED     {folder / name}: not a model file ({what})\n" in cap.out
    assert cap.out.endswith("14 files: 12 skipped (not model files), 2 safe -> exit 0\n")
    (folder / "sd15-v2.safetensors").write_bytes(b"")
    assert main(["scan", str(folder)]) == 2
    cap = capsys.readouterr()
    assert (
        cap.err == f"sdtool: {folder / 'sd15-v2.safetensors'}: could not scan: the file is empty\n"
    )


def _spiece(pieces: list[bytes], tail: bytes = b"") -> bytes:
    """A SentencePiece ModelProto as protobuf bytes: each piece a field 1 holding the piece's
    string (1), score (2, float) and type (3), then a trainer_spec (2) with its model type."""

    def field(tag: int, body: bytes) -> bytes:
        n, varint = len(body), b""
        while n >= 0x80:
            varint, n = varint + bytes([n & 0x7F | 0x80]), n >> 7
        return bytes([tag]) + varint + bytes([n]) + body

    out = b"".join(field(0x0A, field(0x0A, p) + b"\x15\x00\x00\x80\xbf\x18\x01") for p in pieces)
    return out + field(0x12, b"\x18\x01") + tail


def test_sentencepiece_tokenizers_are_not_model_files(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """T5's spiece.model in SD3 and Flux diffusers folders is protobuf, which no loader runs
    (0x0A is no pickle opcode, zip, tar or numpy magic): skipped, by its whole structure.
    Bytes after the last field, or a first field that is no piece, are not it."""
    pieces = [b"<pad>", b"</s>", b"<unk>"] + [b"\xe2\x96\x81w%d" % i for i in range(200)]
    (folder / "spiece.model").write_bytes(_spiece(pieces))
    assert main(["scan", str(folder)]) == 0
    cap = capsys.readouterr()
    spiece = folder / "spiece.model"
    assert f"SKIPPED     {spiece}: not a model file (SentencePiece tokenizer)\n" in cap.out
    for bad in (_spiece(pieces, b"\x00"), b"\x0a\x02\x12\x00" + _spiece(pieces)):
        spiece.write_bytes(bad)
        assert main(["scan", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sdtool: {spiece}: could not scan: "), err
        assert "plain text" not in err
    spiece.unlink()
    (folder / "tokenizer.bin").write_bytes(_spiece(pieces))  # a model's name decides: scanned
    assert main(["scan", str(folder)]) == 2


def test_diffusers_tokenizer_files_pass_the_gate(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CLIP's vocab.json (1.06 MB) and T5's tokenizer.json (2.4 MB) are text above 1 MiB."""
    tok = folder / "tokenizer"
    tok.mkdir()
    vocab = {f"tok{i}</w>": i for i in range(49408)}
    (tok / "vocab.json").write_text(json.dumps(vocab) + " " * (1_100_000 - len(json.dumps(vocab))))
    (tok / "merges.txt").write_text("#version: 0.2\n" + "t o\n" * 300_000)
    assert (tok / "vocab.json").stat().st_size > 1 << 20 < (tok / "merges.txt").stat().st_size
    assert main(["scan", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"SKIPPED     {tok / 'vocab.json'}: not a model file (JSON text)\n" in out
    assert f"SKIPPED     {tok / 'merges.txt'}: not a model file (text)\n" in out


def test_notes_that_start_like_a_text_pickle_are_text(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sentences that start with a protocol 0 opcode ( ``(``, ``S``, ``V``, ``c`` ...) and
    hold a full stop sniff as pickles; pickle.load refuses them before importing anything or
    reaching STOP, so they are text beside the models, not broken pickles."""
    notes = {
        "prompt.txt": "(masterpiece:1.2), best quality, 1girl.\n",
        "params.txt": "Steps: 20, Sampler: Euler a, CFG scale: 7.\n",
        "version.txt": "Version 2.\n",
        "style.md": "cute style. use at weight 0.8.\n",
    }
    for name, text in notes.items():
        (folder / name).write_text(text)
    assert main(["scan", "--quiet", str(folder)]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out.endswith(
        "13 files: 11 skipped (not model files), 2 safe -> exit 0\n"
    )


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("model.ckpt", b"<!DOCTYPE html>\n<html><body>Sign in</body></html>\n", "an HTML page"),
        ("model.safetensors", b'{"error": "Unauthorized"}', "JSON text"),
        (
            "model.safetensors",
            b"version https://git-lfs.github.com/spec/v1\noid sha256:4c\n",
            "Git-LFS",
        ),
        ("model.pt", _png(), "a PNG image"),
        ("model.pkl", b"Version 2.\n", "before STOP (truncated)"),  # a text pickle, cut
    ],
)
def test_a_failed_download_under_a_model_name_fails_the_gate(
    name: str, content: bytes, what: str, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Images, JSON and text are skipped beside the models, never in their place: under a
    model file's name they are a download that failed (the name only makes the gate stricter)."""
    (folder / name).write_bytes(content)
    assert main(["scan", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sdtool: {folder / name}: could not scan: ") and what in err, err
    assert err.count("\n") == 1


def test_a_skipped_verdict_is_never_reused_under_a_model_name(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cache keys verdicts by content (with --sha256): the preview's "skipped" must not
    answer for the same bytes saved as model.ckpt."""
    assert main(["scan", "--sha256", "--quiet", str(folder)]) == 0
    (folder / "model.ckpt").write_bytes((folder / "style.preview.png").read_bytes())
    assert main(["scan", "--sha256", "--quiet", str(folder)]) == 2
    cap = capsys.readouterr()
    assert cap.err == (
        f"sdtool: {folder / 'model.ckpt'}: could not scan: not a format sdtool can analyse "
        "(it is a PNG image)\n"
    )


def _run_json(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    main(["scan", str(path), "--json"])
    return capsys.readouterr().out


def test_quiet_lists_only_what_needs_attention(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["scan", "--quiet", str(folder)]) == 0
    assert capsys.readouterr().out == "\n9 files: 7 skipped (not model files), 2 safe -> exit 0\n"


@pytest.mark.parametrize(
    "content",
    [
        call_global("os", "system", proto=2),  # a binary pickle named .png
        # a protocol 0 pickle is text: it imports and calls before anything else in the file
        asm(b"cos\nsystem\n", MARK, STRING("echo hi"), b"t", REDUCE, STOP) + b"\n# notes\n",
        b"!!python/object/apply:os.system ['echo hi']\n",  # YAML an unsafe loader runs
    ],
    ids=["pickle-as-png", "proto0-pickle-as-text", "yaml-python-tag"],
)
def test_content_decides_not_the_name(
    content: bytes, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "evil.preview.png").write_bytes(content)
    assert main(["scan", str(folder)]) != 0
    out = capsys.readouterr().out
    assert "evil.preview.png: not a model file" not in out


def _formats(d: Path) -> dict[str, bytes]:
    sd = {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64), "b": torch.ones(64)}
    torch.save(sd, d / "zip.ckpt")
    torch.save(sd, d / "legacy.ckpt", _use_new_zipfile_serialization=False)
    save_file({k: v.numpy() for k, v in sd.items()}, str(d / "m.safetensors"))
    np.save(d / "a.npy", np.ones((64, 64), np.float32))
    np.savez(d / "z.npz", a=np.ones(1000))
    (d / "p.pkl").write_bytes(pickle.dumps({"a": list(range(300))}, protocol=2))
    joblib = pytest.importorskip("joblib")
    joblib.dump({"w": np.ones((30, 30)), "n": 3}, d / "j.joblib")
    joblib.dump({"w": np.ones((30, 30)), "n": 3}, d / "jz.joblib", compress=3)
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(d / "m.gguf"), "sd")
    w.add_tensor("w", np.ones((32, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _tar_checkpoint(d / "tar.ckpt", np.arange(600, dtype=np.float32))  # torch < 0.4's layout
    names = ["zip.ckpt", "legacy.ckpt", "m.safetensors", "a.npy", "z.npz", "p.pkl", "j.joblib"]
    names += ["jz.joblib", "m.gguf", "tar.ckpt"]
    return {n: (d / n).read_bytes() for n in names}


def test_truncated_files_of_every_format_are_could_not_scan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cut anywhere (safetensors inside its header and inside its data included, a tar at a
    member's boundary, where tarfile sees a smaller complete archive): never SAFE/SUSPICIOUS
    with exit 0; the reason is one line on stderr per file."""
    for name, data in _formats(tmp_path).items():
        cuts = {1, 9, 40, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1}
        if name == "tar.ckpt":  # every member boundary, up to the end-of-archive blocks
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                tf.getmembers()
                end = tf.offset + 1024  # what follows is the record's padding
            cuts = {n for n in cuts | set(range(512, end, 512)) if n < end}
        for n in sorted(cuts):
            p = tmp_path / f"cut-{n}-{name}"
            p.write_bytes(data[:n])
            code = main(["scan", str(p)])
            cap = capsys.readouterr()
            # the TAR fixture's torch.FloatTensor records are flagged on the whole file too
            assert code == 2 or (code == 1 and name == "tar.ckpt"), (name, n, cap.out)
            assert "could not scan" in cap.err, (name, n, cap.err)
            shown = ("ERROR", "NOT") + (("SUSPICIOUS",) if name == "tar.ckpt" else ())
            assert code == 1 or cap.out.split()[0] in shown, (name, n, cap.out)


def test_error_lines_go_to_stderr_in_table_mode(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    st = (folder / "style.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(st[:-10])  # cut inside its data section
    (folder / "dangerous.pkl").write_bytes(call_global("os", "system", proto=2))
    assert main(["scan", str(folder)]) == 1  # dangerous wins over could not scan
    cap = capsys.readouterr()
    assert f"ERROR       {folder / 'cut.safetensors'} (safetensors" in cap.out
    assert cap.err == (
        f"sdtool: {folder / 'cut.safetensors'}: could not scan: breaks the safetensors rules: "
        "the tensors need 64 bytes of data but the file holds 54; the download is truncated\n"
    )
    assert "the download is truncated" not in cap.out
    (folder / "dangerous.pkl").unlink()
    assert main(["scan", str(folder), "--json"]) == 2
    cap = capsys.readouterr()
    assert json.loads(cap.out)["exit_code"] == 2 and cap.err.count("\n") == 1


@pytest.mark.parametrize("command", ["scan", "inspect", "hash"])
def test_dash_reads_standard_input(command: str, sub_env: dict[str, str]) -> None:
    """``cat m.ckpt | sdtool scan -``: a pipe (not seekable) is spooled to a temp file."""
    data = EXAMPLE.read_bytes()
    r = subprocess.run(
        [sys.executable, "-m", "sdtool", command, "-", "--json"],
        input=data,
        capture_output=True,
        env=sub_env,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    from_file = subprocess.run(
        [sys.executable, "-m", "sdtool", command, str(EXAMPLE), "--json"],
        capture_output=True,
        env=sub_env,
    )
    expected = json.loads(from_file.stdout.replace(str(EXAMPLE).encode(), b"-"))
    assert doc == expected


def test_dash_over_the_size_cap_is_one_line(sub_env: dict[str, str]) -> None:
    env = dict(sub_env, SDTOOL_STDIN_MAX="1000")
    r = subprocess.run(
        [sys.executable, "-m", "sdtool", "scan", "-"],
        input=bytes(5000),
        capture_output=True,
        env=env,
    )
    assert r.returncode == 2
    assert r.stderr == (
        b"sdtool: -: standard input is larger than 1000 bytes (SDTOOL_STDIN_MAX); "
        b"save it to a file first\n"
    )


def test_empty_standard_input_is_could_not_scan(sub_env: dict[str, str]) -> None:
    """``curl -s URL | sdtool scan -`` where the download failed: nothing arrived, so the gate
    fails (an empty file beside the models is skipped; piped input is meant as a model)."""
    r = subprocess.run(
        [sys.executable, "-m", "sdtool", "scan", "-"], input=b"", capture_output=True, env=sub_env
    )
    assert r.returncode == 2
    assert r.stderr == b"sdtool: -: could not scan: the file is empty\n"


def _limit_fsize() -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


@pytest.mark.parametrize("command", ["scan", "inspect", "hash"])
def test_dash_into_a_full_temp_folder_is_one_line(
    command: str, tmp_path: Path, sub_env: dict[str, str]
) -> None:
    env = dict(sub_env, TMPDIR=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-m", "sdtool", command, "-"],
        input=EXAMPLE.read_bytes(),  # 734 KiB: more than the 64 KiB a file may hold here
        capture_output=True,
        env=env,
        preexec_fn=_limit_fsize,
    )
    assert r.returncode == 2 and r.stdout == b""
    assert (
        r.stderr
        == (
            f"sdtool: -: cannot keep standard input in a temp file under {tmp_path}: the disk is "
            "full (set TMPDIR to a folder with room, or save it to a file first)\n"
        ).encode()
    )
    assert list(tmp_path.iterdir()) == []  # the temp file is gone


def test_the_control_character_test_is_the_rule() -> None:
    """Text holds no character below 32 but tab, newlines and form feed: the regex that says
    so (one C loop over a 16 MiB file) agrees with that rule on every code point."""
    from sdtool.formats.sniff import _control, not_a_model_file

    flagged = [c for c in map(chr, range(0x110000)) if _control().search(c)]
    assert flagged == [c for c in map(chr, range(32)) if c not in "\t\n\r\f"]
    for data, what in ((b"ok\tline\r\n\f", "text"), (b"vertical\x0btab", None)):
        assert not_a_model_file(data, len(data)) == what
