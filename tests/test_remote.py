"""Issue 17 point 3: remote files (https://, http://, hf://) read by HTTP range requests.

Every test runs against tests/httpserver.py on 127.0.0.1 (no network), which counts the
requests and bytes it serves: inspect of safetensors in at most 2 requests, of a torch zip by
its end records, directory and pickle only, scan reading only what holds pickles, hash in one
streamed pass, retries, one-line errors with exit 2, and the hf:// mapping and token rules.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdtool import remote
from sdtool.cli.main import main
from sdtool.errors import FileAccessError, UsageError
from sdtool.ops.hash import hash_file
from sdtool.ops.inspect import inspect
from sdtool.scan import scan
from sdtool.urls import UrlPath, as_path, is_url
from tests.httpserver import FileServer, serve
from tests.scan_payloads import call_global

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """No sleeping between retries, no token from the environment or a token file."""
    monkeypatch.setattr(remote, "BACKOFF", 0.0)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "SDTOOL_HTTP_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", "/nonexistent/sdtool-test-token")


@pytest.fixture
def server() -> Iterator[FileServer]:
    with serve() as s:
        yield s


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A safetensors file, a torch zip of a small model (~10 MB, 80 tensors), and the same zip
    with a malicious data.pkl."""
    import torch

    d = tmp_path_factory.mktemp("remote")
    st = d / "model.safetensors"
    save_file(
        {f"model.layers.{i}.weight": np.full((256, 256), i, np.float32) for i in range(24)},
        str(st),
        metadata={"ss_network_dim": "4"},
    )
    ckpt = d / "model.ckpt"
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(40)])
    torch.save({"state_dict": model.state_dict(), "global_step": 7}, ckpt)
    bad = d / "evil.ckpt"
    with zipfile.ZipFile(ckpt) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):  # os.system first, then the state dict
                assert data[:2] == b"\x80\x02"
                data = call_global("os", "system", "echo pwned")[:-1] + b"0" + data[2:]
            out.writestr(info, data)
    return {"st": st, "ckpt": ckpt, "evil": bad}


def _host(server: FileServer, files: dict[str, Path]) -> None:
    for p in files.values():
        server.files["/" + p.name] = p.read_bytes()


def _same_report(url: str, local: Path) -> None:
    got, want = inspect(url).to_json(), inspect(local).to_json()
    assert got.pop("path") == url
    want.pop("path")
    assert got == want


# -- inspect ----------------------------------------------------------------------------------


def test_safetensors_inspect_in_one_request(server: FileServer, files: dict[str, Path]) -> None:
    _host(server, files)
    _same_report(server.url("/model.safetensors"), files["st"])
    assert server.requests == 1
    assert server.seen[0].range == f"bytes=0-{remote.FIRST - 1}"


def test_a_header_longer_than_the_first_read_costs_one_more(
    server: FileServer, tmp_path: Path
) -> None:
    p = tmp_path / "meta.safetensors"
    save_file({"w": np.zeros((4, 4), np.float16)}, str(p), metadata={"big": "x" * (3 * MiB)})
    server.files["/meta.safetensors"] = p.read_bytes()
    _same_report(server.url("/meta.safetensors"), p)
    assert server.requests == 2


def test_torch_zip_inspect_reads_directory_and_pickle_only(
    server: FileServer, files: dict[str, Path]
) -> None:
    _host(server, files)
    size = files["ckpt"].stat().st_size
    _same_report(server.url("/model.ckpt"), files["ckpt"])
    # the first read, the end records + directory, nothing per tensor (80 storages)
    assert server.requests <= 3, [s.range for s in server.seen]
    assert server.bytes_sent <= remote.FIRST + 256 * 1024 < size // 8


def test_tensor_bytes_read_on_demand(server: FileServer, files: dict[str, Path]) -> None:
    from sdtool.formats.open import open_model

    _host(server, files)
    for key in ("st", "ckpt"):
        url = server.url("/" + files[key].name)
        with open_model(url) as m, open_model(files[key]) as local:
            assert isinstance(m.path, UrlPath)
            key = list(m.tensors)[-1]
            assert np.array_equal(m.read(key), local.read(key))


# -- scan -------------------------------------------------------------------------------------


def test_scan_malicious_zip_same_verdict_reading_only_pickles(
    server: FileServer, files: dict[str, Path]
) -> None:
    _host(server, files)
    for key in ("evil", "ckpt"):
        server.reset()
        got, want = scan(server.url("/" + files[key].name)), scan(files[key])
        assert got.verdict == want.verdict
        assert [(f.rule, f.severity, f.message) for f in got.findings] == [
            (f.rule, f.severity, f.message) for f in want.findings
        ]
        assert server.bytes_sent <= remote.FIRST + 256 * 1024
    assert scan(files["evil"]).verdict == "dangerous"


def test_scan_cli_over_http(server: FileServer, files: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    _host(server, files)
    code = main(["scan", "--no-cache", "--json", server.url("/evil.ckpt")])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1
    assert doc["files"][0]["path"] == server.url("/evil.ckpt")
    assert doc["files"][0]["verdict"] == "dangerous"


# -- hash -------------------------------------------------------------------------------------


def test_hash_streams_the_file_once(server: FileServer, files: dict[str, Path]) -> None:
    _host(server, files)
    for key in ("st", "ckpt"):
        server.reset()
        p = files[key]
        got = hash_file(server.url("/" + p.name))
        assert got.hashes == hash_file(p).hashes
        assert got.size == p.stat().st_size
        assert server.bytes_sent == p.stat().st_size  # every byte once
        assert server.requests <= 3


def test_hash_cli(server: FileServer, files: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    _host(server, files)
    url = server.url("/model.safetensors")
    assert main(["hash", "--no-cache", "--format", "sha256sum", url]) == 0
    out = capsys.readouterr().out
    assert out.split() == [
        hash_file(files["st"], algorithms=["sha256"]).hashes["sha256"].lower(),
        url,
    ]


# -- failures ---------------------------------------------------------------------------------


def test_retries_5xx_and_429(server: FileServer, files: dict[str, Path]) -> None:
    _host(server, files)
    server.fail_first = [500, 503, 429]
    _same_report(server.url("/model.safetensors"), files["st"])
    assert [s.status for s in server.seen] == [500, 503, 429, 206]


def test_gives_up_after_the_retries(
    server: FileServer, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _host(server, files)
    monkeypatch.setenv("SDTOOL_HTTP_RETRIES", "2")
    server.fail_first = [502] * 5
    with pytest.raises(FileAccessError, match=r"HTTP 502.*3 tries"):
        inspect(server.url("/model.safetensors"))
    assert server.requests == 3


@pytest.mark.parametrize(
    ("status", "expected"),
    [(404, "not found (HTTP 404)"), (401, "set HF_TOKEN"), (403, "set HF_TOKEN")],
)
def test_errors_are_one_line_exit_2(
    server: FileServer,
    capsys,
    status: int,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    server.status["/org/repo/resolve/main/m.safetensors"] = status
    for command in ("inspect", "hash"):
        assert main([command, "hf://org/repo/m.safetensors"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
        assert err.startswith("sdtool: hf://org/repo/m.safetensors: ")
    assert main(["scan", "--no-cache", "hf://org/repo/m.safetensors"]) == 2
    assert expected in capsys.readouterr().err


def test_bad_urls(capsys) -> None:  # type: ignore[no-untyped-def]
    for url in ("hf://org/repo", "https:///nohost", "hf://org/repo/file@"):
        assert main(["inspect", url]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "URL" in err, err


def test_timeout(server: FileServer, files: dict[str, Path], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _host(server, files)
    monkeypatch.setenv("SDTOOL_HTTP_TIMEOUT", "0.2")
    monkeypatch.setenv("SDTOOL_HTTP_RETRIES", "1")
    server.stall = 5.0
    with pytest.raises(FileAccessError, match=r"timed out after 0.2 s .*2 tries"):
        inspect(server.url("/model.safetensors"))


def test_connection_refused(capsys) -> None:  # type: ignore[no-untyped-def]
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    assert main(["inspect", f"http://127.0.0.1:{port}/m.safetensors"]) == 2
    assert "connection refused" in capsys.readouterr().err


def test_no_range_support_spools_with_a_warning(
    server: FileServer, files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _host(server, files)
    server.ranges = False
    with caplog.at_level(logging.WARNING, "sdtool.remote"):
        _same_report(server.url("/model.ckpt"), files["ckpt"])
    assert "does not support range requests" in caplog.text
    assert server.requests == 1
    assert hash_file(server.url("/model.ckpt")).hashes == hash_file(files["ckpt"]).hashes


def test_no_range_support_over_the_cap(
    server: FileServer, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _host(server, files)
    server.ranges = False
    monkeypatch.setenv("SDTOOL_REMOTE_SPOOL_MAX", str(MiB))
    with pytest.raises(FileAccessError, match="SDTOOL_REMOTE_SPOOL_MAX"):
        inspect(server.url("/model.ckpt"))


# -- hf:// and the token ----------------------------------------------------------------------


def test_hf_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    r = remote.resolve
    hub = "https://huggingface.co"
    assert r("hf://org/repo/m.safetensors") == f"{hub}/org/repo/resolve/main/m.safetensors"
    assert (
        r("hf://org/repo/unet/m.safetensors@v1.0")
        == f"{hub}/org/repo/resolve/v1.0/unet/m.safetensors"
    )
    assert r("hf://org/repo@abc123/m.bin") == f"{hub}/org/repo/resolve/abc123/m.bin"
    assert r("hf://datasets/org/data/x.ckpt") == f"{hub}/datasets/org/data/resolve/main/x.ckpt"
    assert r("hf://org/repo/a b.ckpt") == f"{hub}/org/repo/resolve/main/a%20b.ckpt"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080/")
    assert r("hf://o/r/f.ckpt") == "http://mirror.local:8080/o/r/resolve/main/f.ckpt"
    with pytest.raises(UsageError):
        r("hf://org/repo")
    with pytest.raises(UsageError):
        r("ftp://host/x")


def test_token_goes_to_the_hub_only(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve() as hub, serve() as cdn, serve() as other:
        monkeypatch.setenv("HF_ENDPOINT", hub.base)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        data = files["st"].read_bytes()
        hub.files["/org/repo/resolve/v2/m.safetensors"] = data
        _same_report("hf://org/repo/m.safetensors@v2", files["st"])
        assert [s.authorization for s in hub.seen] == ["Bearer hf_secret"]
        # a redirect to another host (the hub's CDN) drops the token
        hub.reset()
        hub.redirects["/org/repo/resolve/main/m.safetensors"] = cdn.url("/signed/m.safetensors")
        cdn.files["/signed/m.safetensors"] = data
        assert hash_file("hf://org/repo/m.safetensors").size == len(data)
        assert hub.seen[0].authorization == "Bearer hf_secret"
        assert cdn.seen and all(s.authorization is None for s in cdn.seen)
        assert hub.requests == 1  # later ranges go straight to the CDN
        # a plain URL to any other host never carries it
        other.files["/m.safetensors"] = data
        inspect(other.url("/m.safetensors"))
        assert other.seen[0].authorization is None


def test_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("hf_from_file\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(token))
    assert remote.hf_token() == "hf_from_file"
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_env")
    assert remote.hf_token() == "hf_env"


def test_url_paths() -> None:
    p = as_path("hf://org/repo/unet/m.safetensors@v1")
    assert isinstance(p, UrlPath) and str(p) == "hf://org/repo/unet/m.safetensors@v1"
    assert p.name == "m.safetensors"
    assert as_path("https://h/x.ckpt?download=1").name == "x.ckpt"
    assert is_url("HTTPS://h/x") and not is_url("./https/x") and not is_url(Path("a"))


# -- start-up ---------------------------------------------------------------------------------


def test_local_files_never_load_the_http_code(tmp_path: Path, sub_env: dict[str, str]) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"w": np.zeros(4, np.float32)}, str(p))
    probe = (
        "import sys, io, contextlib; from sdtool.cli.main import main\n"
        "for argv in (['inspect', sys.argv[1]], ['scan', '--no-cache', sys.argv[1]],"
        " ['hash', '--no-cache', sys.argv[1]]):\n"
        "    with contextlib.redirect_stdout(io.StringIO()): main(argv)\n"
        "print(sorted(m for m in sys.modules if m in ('sdtool.remote', 'http.client')))"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, str(p)], capture_output=True, text=True, env=sub_env
    )
    assert r.returncode == 0, r.stderr
    assert "sdtool.remote" not in r.stdout.splitlines()[-1]


def test_inspect_cli_json_names_the_url(server: FileServer, files: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    _host(server, files)
    url = server.url("/model.safetensors")
    assert main(["inspect", "--json", url]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == url
    assert main(["inspect", url]) == 0
    assert url in capsys.readouterr().out


def test_http_proxy_from_the_environment(
    server: FileServer, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY is honoured (the server plays the proxy: it sees absolute URLs), NO_PROXY too."""
    _host(server, files)
    for name in ("http_proxy", "https_proxy", "no_proxy", "NO_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.base)
    url = "http://models.invalid/model.safetensors"
    _same_report(url, files["st"])
    assert server.seen[0].target == url
    monkeypatch.setenv("NO_PROXY", "models.invalid")
    monkeypatch.setenv("SDTOOL_HTTP_RETRIES", "0")
    with pytest.raises(FileAccessError, match=r"cannot read from models\.invalid"):
        inspect(url)


def test_legacy_torch_and_empty_files(server: FileServer, tmp_path: Path) -> None:
    import torch

    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(6.0)}, legacy, _use_new_zipfile_serialization=False)
    server.files["/legacy.pt"] = legacy.read_bytes()
    _same_report(server.url("/legacy.pt"), legacy)
    server.files["/empty.bin"] = b""
    assert hash_file(server.url("/empty.bin")).size == 0
    assert scan(server.url("/empty.bin")).errors == ["not scanned: the file is empty"]


def test_gguf_over_http(server: FileServer, tmp_path: Path) -> None:
    """GGUF headers are read through the block cache; quantized tensors dequantize on demand."""
    import gguf

    from sdtool.formats.open import open_model

    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), arch="flux")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(100)])
    x = np.linspace(-1, 1, 8 * 512, dtype=np.float32).reshape(8, 512)
    w.add_tensor("q8", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    w.add_tensor("f32", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    server.files["/m.gguf"] = p.read_bytes()
    _same_report(server.url("/m.gguf"), p)
    assert server.requests == 1
    with open_model(server.url("/m.gguf")) as m, open_model(p) as local:
        for name in ("q8", "f32"):
            assert np.array_equal(m.read(name), local.read(name))
    assert scan(server.url("/m.gguf")).verdict == scan(p).verdict
