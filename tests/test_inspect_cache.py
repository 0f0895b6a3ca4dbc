"""inspect --jsonl through the result cache (issue 17.2): an unchanged file's line comes from
the cache, the same bytes but ``"cached": true``; a changed file, another name or a changed
identification table is read again; hashes and verdicts stay cached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

import sdtool.ops.inspect_cache as ic
from sdtool import open_model
from sdtool.cache import Cache, Identity
from sdtool.cli.main import cli, main
from sdtool.identify import identify
from sdtool.scan import ruleset as ruleset_mod

Cap = pytest.CaptureFixture[str]


def _files(root: Path) -> list[Path]:
    """A few kinds: a LoRA-like and a plain safetensors, a torch zip, a hypernetwork."""
    root.mkdir(parents=True, exist_ok=True)
    a = root / "a.safetensors"
    save_file({"w": np.zeros((4, 4), np.float32)}, str(a), metadata={"k": "v"})
    b = root / "b.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x.weight": torch.zeros(2, 2)},
                "global_step": 7}, b)  # fmt: skip
    h = root / "hn.safetensors"
    save_file({f"{w}.0.linear.0.weight": np.zeros((w * 2, w), np.float32)
               for w in (320, 768)}, str(h))  # fmt: skip
    return [a, b, h]


def _run(cap: Cap, args: list[str]) -> tuple[int, list[str], str]:
    code = main(args)
    res = cap.readouterr()
    return code, res.out.splitlines(), res.err


def _recs(lines: list[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines]


def test_second_run_is_cached_with_the_same_lines(tmp_path: Path, capsys: Cap) -> None:
    files = _files(tmp_path / "m")
    args = ["inspect", "--jsonl", *map(str, files), str(tmp_path / "gone.ckpt")]
    code1, first, err1 = _run(capsys, args)
    code2, second, err2 = _run(capsys, args)
    assert code1 == code2 == 2 and err1 == err2  # the missing file: an error each time
    recs1, recs2 = _recs(first), _recs(second)
    assert [r.get("cached") for r in recs1] == [False, False, False, None]
    assert [r.get("cached") for r in recs2] == [True, True, True, None]
    for one, two in zip(first[:3], second[:3], strict=True):
        assert two == one.replace('"cached": false}', '"cached": true}')
    assert second[3] == first[3] and recs2[3]["error"]
    assert recs1[2]["identity"]["kind"] == "hypernetwork"  # type: ignore[index]
    assert recs1[0]["identify"] == ruleset_mod.identify_version()
    assert recs1[0]["ruleset"] == ruleset_mod.ruleset_version()


def test_a_changed_file_is_read_again(tmp_path: Path, capsys: Cap) -> None:
    a, b, _ = _files(tmp_path / "m")
    args = ["inspect", "--jsonl", str(a), str(b)]
    _run(capsys, args)
    save_file({"w": np.zeros((8, 8), np.float32)}, str(a))  # new size and mtime
    st = b.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    _, lines, _ = _run(capsys, args)
    recs = _recs(lines)
    assert [r["cached"] for r in recs] == [False, False]
    assert recs[0]["totals"] == {"tensors": 1, "parameters": 64, "bytes": 256}
    _, lines, _ = _run(capsys, args)
    assert [r["cached"] for r in _recs(lines)] == [True, True]


def test_another_name_for_the_same_inode_is_identified_again(tmp_path: Path, capsys: Cap) -> None:
    """Identification reads hints from the name, so a record is trusted under its name only."""
    a, *_ = _files(tmp_path / "m")
    link = tmp_path / "m" / "other-ema-only.safetensors"
    os.link(a, link)
    _run(capsys, ["inspect", "--jsonl", str(a)])
    _, lines, _ = _run(capsys, ["inspect", "--jsonl", str(link)])
    assert _recs(lines)[0]["cached"] is False


def test_a_changed_table_invalidates_identities_only(
    tmp_path: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [str(f) for f in _files(tmp_path / "m")]
    for cmd in (["inspect", "--jsonl"], ["hash", "--jsonl"], ["scan", "--jsonl"]):
        _run(capsys, [*cmd, *files])
    new = "0.1.0+another-table"
    monkeypatch.setattr(ruleset_mod, "identify_version", lambda: new)
    monkeypatch.setattr(ic, "identify_version", lambda: new)
    _, lines, _ = _run(capsys, ["inspect", "--jsonl", *files])
    assert [r["cached"] for r in _recs(lines)] == [False] * 3
    assert {r["identify"] for r in _recs(lines)} == {new}
    for cmd in (["hash", "--jsonl"], ["scan", "--jsonl"]):
        _, lines, _ = _run(capsys, [*cmd, *files])
        assert [r["cached"] for r in _recs(lines)] == [True] * 3, cmd


def test_the_stored_identity_is_lossless(tmp_path: Path, capsys: Cap) -> None:
    files = _files(tmp_path / "m")
    _run(capsys, ["inspect", "--jsonl", *map(str, files)])
    settings = ic.settings_of(None, False, None)
    with Cache(os.environ["SDTOOL_CACHE_DIR"]) as cache:
        for f in files:
            text = cache.get_text(
                ic.KIND, Identity.of_path(f).key, ruleset_mod.identify_version() + settings
            )
            assert text is not None
            with open_model(f) as m:
                fresh = identify(m)
            back = ic.identity_of(text)
            assert back == fresh and back is not None and back.owners() == fresh.owners()
            assert text.split("\n", 3)[2].startswith(f'"{ic.RECORD}')


def test_the_stored_identity_is_deflated(tmp_path: Path, capsys: Cap) -> None:
    """A checkpoint's record (1,831 keys, each listed and owned) is stored at a tenth of its
    JSON: every cached file's row, and every cached answer reads it."""
    example = Path(__file__).resolve().parents[1] / "examples" / "tiny-sd15-ema.ckpt"
    f = tmp_path / example.name
    shutil.copyfile(example, f)
    _run(capsys, ["inspect", "--jsonl", str(f)])
    settings = ic.settings_of(None, False, None)
    with Cache(os.environ["SDTOOL_CACHE_DIR"]) as cache:
        text = cache.get_text(
            ic.KIND, Identity.of_path(f).key, ruleset_mod.identify_version() + settings
        )
    assert text is not None
    with open_model(f) as m:
        fresh = identify(m)
    raw = json.dumps(fresh.to_record())
    assert len(raw) > 200_000 and len(text.split("\n", 3)[2]) * 10 < len(raw)
    assert ic.identity_of(text) == fresh


def test_no_cache_and_contradicting_options(tmp_path: Path, capsys: Cap) -> None:
    a, *_ = _files(tmp_path / "m")
    for _ in range(2):
        _, lines, _ = _run(capsys, ["inspect", "--jsonl", "--no-cache", str(a)])
        assert _recs(lines)[0]["cached"] is False
    own = tmp_path / "own-cache"
    for cached in (False, True):
        _, lines, _ = _run(capsys, ["inspect", "--jsonl", "--cache", str(own), str(a)])
        assert _recs(lines)[0]["cached"] is cached
    res = CliRunner().invoke(cli, ["inspect", "--jsonl", "--cache", str(own), "--no-cache", "x"])
    assert res.exit_code == 2 and "contradict" in res.output


def test_several_processes_share_the_cache(tmp_path: Path, sub_env: dict[str, str]) -> None:
    src = tmp_path / "m"
    files = []
    for i in range(40):
        f = src / f"m{i:02}.safetensors"
        src.mkdir(exist_ok=True)
        save_file({"w": np.full((2, i + 1), i, np.float32)}, str(f))
        files.append(str(f))
    env = {**sub_env, "SDTOOL_CACHE_DIR": str(tmp_path / "shared-cache")}
    cmd = [sys.executable, "-m", "sdtool", "inspect", "--jsonl", *files]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    texts = {o.decode().replace('"cached": true}', '"cached": false}') for o, _ in outs}
    assert len(texts) == 1  # every process: the same lines, whoever read which file
    again = subprocess.run(cmd, capture_output=True, env=env, timeout=120, check=True)
    assert [json.loads(x)["cached"] for x in again.stdout.splitlines()] == [True] * 40
    assert again.stdout.decode().replace('"cached": true}', '"cached": false}') in texts
    shutil.rmtree(tmp_path / "shared-cache")


def test_identify_version_follows_the_tables_and_the_ruleset_does_not(tmp_path: Path) -> None:
    """A copy of the package with one signature table changed: another identify version, the
    same scan ruleset (so verdicts stay cached); a changed scan rule changes both."""
    import sdtool

    dst = tmp_path / "pkg" / "sdtool"
    shutil.copytree(Path(sdtool.__file__).parent, dst,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    code = "from sdtool.scan.ruleset import identify_version as i, ruleset_version as r\n"
    code += "print(i(), r())"

    def versions() -> list[str]:
        env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg")}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    ident1, rules1 = versions()
    table = dst / "data" / "signatures.json.gz"
    table.write_bytes(table.read_bytes() + b"\0")
    ident2, rules2 = versions()
    assert ident2 != ident1 and rules2 == rules1
    rule = dst / "identify" / "tables.py"
    rule.write_text(rule.read_text() + "\n# changed\n")
    ident3, rules3 = versions()
    assert ident3 != ident2 and rules3 == rules1
    allow = dst / "scan" / "allowlist.py"
    allow.write_text(allow.read_text() + "\n# changed\n")
    ident4, rules4 = versions()
    assert ident4 != ident3 and rules4 != rules1


# -- the table view and --json through the cache (issue 10.4) ---------------------------------


class Trainer:
    """A class a training script pickled: an unknown class to sdtool (a stand-in)."""

    def __init__(self) -> None:
        self.lr = 1e-4


def _spread(root: Path) -> list[Path]:
    """One of each: a torch zip with non-tensor fields and safe, suspicious and dangerous
    globals (an example checkpoint's shape), a legacy checkpoint, a safetensors with
    __metadata__ (markup and wide characters in it), a LoRA, an embedding, a file nothing
    identifies, and one with no tensors."""
    root.mkdir(parents=True, exist_ok=True)
    z = root / "trained.ckpt"
    sd = {
        f"model.diffusion_model.input_blocks.0.0.{p}": torch.ones(4, 2) for p in ("weight", "bias")
    }
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(3)
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1200, "trainer": Trainer(),
                "hook": os.system, "optimizer_states": [{"m": torch.zeros(2)}]}, z)  # fmt: skip
    legacy = root / "legacy.ckpt"
    torch.save({"state_dict": {"first_stage_model.decoder.conv_in.bias": torch.ones(2)}}, legacy,
               _use_new_zipfile_serialization=False)  # fmt: skip
    meta = root / "meta.safetensors"
    save_file({"w": np.ones((2, 3), np.float16), "b": np.ones(3, np.float32)}, str(meta),
              metadata={"ss_tag": "[bold]not markup[/bold]", "名前": "幅の広い文字 ü"})  # fmt: skip
    lora = root / "style-lora.safetensors"
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": np.ones((4, 768), np.float16),
               f"{key}.lora_up.weight": np.ones((320, 4), np.float16),
               f"{key}.alpha": np.array(4.0, np.float16)}, str(lora))  # fmt: skip
    emb = root / "neg-embedding.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(2, 768)},
                "name": "neg", "step": 5}, emb)  # fmt: skip
    odd = root / "odd.safetensors"
    save_file({"something.else": np.ones(5, np.int8)}, str(odd))
    empty = root / "empty.safetensors"
    save_file({}, str(empty), metadata={"note": "no tensors"})
    return [z, legacy, meta, lora, emb, odd, empty]


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files ``inspect`` opens from now on (the cached path never calls it)."""
    import sdtool.ops.inspect as ops_inspect

    seen: list[str] = []
    real = ops_inspect.inspect

    def counting(path: str | Path, **kw: Any) -> Any:
        seen.append(os.path.basename(path))
        return real(path, **kw)

    monkeypatch.setattr(ops_inspect, "inspect", counting)
    return seen


def _raw(cap: Cap, args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    res = cap.readouterr()
    return code, res.out, res.err


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--json"],
        ["--tensors"],
        ["--json", "--tensors", "--filter", "*.weight"],
        ["--filter", "no-such-*"],
        ["--quiet"],
    ],
)
def test_a_cached_answer_prints_the_fresh_bytes(
    tmp_path: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch, options: list[str]
) -> None:
    """Each file alone and all together: the first run (read, stored), the second (from the
    cache: no file opened) and a --no-cache run print the same bytes and exit the same."""
    files = [str(f) for f in _spread(tmp_path / "m")]
    reads = _reads(monkeypatch)
    for group in [[f] for f in files] + [files]:
        fresh = _raw(capsys, ["inspect", *options, "--no-cache", *group])
        first = _raw(capsys, ["inspect", *options, *group])
        del reads[:]
        second = _raw(capsys, ["inspect", *options, *group])
        assert reads == [], group  # every answer came from the cache
        assert fresh == first == second, group
        assert fresh[0] == 0 and (fresh[1] or "--quiet" in options)
    doc = json.loads(_raw(capsys, ["inspect", "--json", *files])[1])
    kinds = [d["identity"]["kind"] for d in doc]
    assert kinds[3:5] == ["lora", "embedding"] and kinds[5] == "unknown", kinds
    severities = {g["severity"] for g in doc[0]["globals"]}
    assert severities == {"safe", "suspicious", "dangerous"}, doc[0]["globals"]
    assert doc[0]["extra"] and doc[0]["other_tensors"]["tensors"] and doc[2]["metadata"]


def test_key_is_part_of_the_record(
    tmp_path: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--key picks another dict as the state dict: its answer is stored apart."""
    z = str(_spread(tmp_path / "m")[0])
    reads = _reads(monkeypatch)
    plain = _raw(capsys, ["inspect", z])
    keyed = _raw(capsys, ["inspect", "--key", "optimizer_states", z])
    assert reads == ["trained.ckpt"] * 2 and plain != keyed
    assert _raw(capsys, ["inspect", "--key", "optimizer_states", "--no-cache", z]) == keyed
    del reads[:]
    assert _raw(capsys, ["inspect", "--key", "optimizer_states", z]) == keyed
    assert _raw(capsys, ["inspect", z]) == plain and reads == []


def test_jsonl_and_the_table_share_records(
    tmp_path: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [str(f) for f in _spread(tmp_path / "m")]
    fresh = _raw(capsys, ["inspect", "--no-cache", *files])
    _raw(capsys, ["inspect", "--jsonl", *files])
    reads = _reads(monkeypatch)
    assert _raw(capsys, ["inspect", *files]) == fresh and reads == []
    _, lines, _ = _run(capsys, ["inspect", "--jsonl", *files])
    assert [r["cached"] for r in _recs(lines)] == [True] * len(files)


def test_a_rewritten_file_and_another_name_are_read_again(
    tmp_path: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, meta, *_ = _spread(tmp_path / "m")
    first = _raw(capsys, ["inspect", str(meta)])
    save_file({"w": np.ones((8, 8), np.float32)}, str(meta), metadata={"ss_tag": "new"})
    reads = _reads(monkeypatch)
    again = _raw(capsys, ["inspect", str(meta)])
    assert reads == ["meta.safetensors"] and again != first and "8, 8" not in again[1]
    assert again == _raw(capsys, ["inspect", "--no-cache", str(meta)])
    assert "256 B" in again[1] and "new" in again[1]
    copy = tmp_path / "m" / "meta-ema-only.safetensors"
    shutil.copy2(meta, copy)
    os.link(meta, tmp_path / "m" / "linked.safetensors")
    del reads[:]
    for other in (copy, tmp_path / "m" / "linked.safetensors"):
        for opts in ([], ["--json"]):
            got = _raw(capsys, ["inspect", *opts, str(other)])
            assert got == _raw(capsys, ["inspect", *opts, "--no-cache", str(other)])
    # read by each first run and each --no-cache run; the second table run of a name hits
    assert reads.count("meta-ema-only.safetensors") == 3 and reads.count("linked.safetensors") == 3


def test_errors_standard_input_and_unreadable_files_are_not_cached(
    tmp_path: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, *_ = _spread(tmp_path / "m")
    bad = tmp_path / "m" / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    reads = _reads(monkeypatch)
    for _ in range(2):
        code, out, err = _raw(capsys, ["inspect", str(bad)])
        assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert reads == ["bad.safetensors"] * 2
    several = [_raw(capsys, ["inspect", "--json", str(a), str(bad)]) for _ in range(2)]
    assert several[0] == several[1] and several[0][0] == 2
    assert reads.count("bad.safetensors") == 4 and reads.count("trained.ckpt") == 1
    del reads[:]
    outs = []
    for _ in range(2):
        with open(a, encoding="latin-1") as stdin:  # `sdtool inspect - < trained.ckpt`
            monkeypatch.setattr(sys, "stdin", stdin)
            outs.append(_raw(capsys, ["inspect", "-"]))
    assert outs[0] == outs[1] and outs[0][0] == 0 and outs[0][1].startswith("-\n")
    assert len(reads) == 2  # standard input is read each time
