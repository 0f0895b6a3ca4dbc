"""The key-set tables' compact copy (identify.keysets): the shipped signatures.json.gz, unpacked
once into the cache folder as marshal, read back by later runs; a damaged, foreign or unwritable
copy only costs an unpacking, never a wrong table."""

from __future__ import annotations

import gzip
import json
import marshal
import os
from pathlib import Path

import pytest

from sdtool.identify import keysets as K


def _shipped() -> dict[str, dict[str, object]]:
    """signatures.json.gz as JSON, read here without sdtool."""
    data = json.loads(gzip.decompress(K.DATA.read_bytes()))
    return data["signatures"]  # type: ignore[no-any-return]


def _no_unpacking(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(raw: bytes) -> K.Compact:
        raise AssertionError("unpacked the JSON although a good compact copy was there")

    monkeypatch.setattr(K, "unpack", refuse)


def test_compact_tables_are_the_shipped_json() -> None:
    """Same signatures in the same order, same keys, optional keys and shapes per profile."""
    shipped = _shipped()
    tables = K._compact()
    assert [sid for sid, *_ in tables] == list(shipped)
    for sid, keys, optional, raw_shapes in tables:
        d = shipped[sid]
        assert list(keys) == d["keys"], sid
        assert list(optional) == d["optional"], sid
        shapes = {p: [list(s) for s in v] for p, v in marshal.loads(raw_shapes).items()}
        assert shapes == json.loads(d["shapes"]), sid  # type: ignore[arg-type]


def test_signatures_read_shapes_as_tuples_by_key() -> None:
    """``Signature.shapes``: profile -> key -> shape tuple, as the JSON lists say."""
    sig = K.signatures()["unet-ldm"]
    expected = json.loads(_shipped()["unet-ldm"]["shapes"])  # type: ignore[arg-type]
    assert list(sig.shapes) == list(expected)
    for profile, shapes in expected.items():
        assert sig.shapes[profile] == {k: tuple(s) for k, s in zip(sig.keys, shapes, strict=True)}


def test_first_run_keeps_the_copy_and_the_next_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    path = K.compact_path(K.DATA.read_bytes())
    assert path.parent == Path(os.environ["SDTOOL_CACHE_DIR"]) and not path.exists()
    first = K._compact()
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    _no_unpacking(monkeypatch)
    assert K._compact() == first


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # cut short
        lambda b: b"not marshal at all",
        lambda b: b"",
        lambda b: marshal.dumps(((K.COMPACT_FORMAT, 0, 0), ())),  # another file's stamp
        lambda b: marshal.dumps([1, 2, 3]),  # not the layout
        lambda b: marshal.dumps((marshal.loads(b)[0], ((1, 2, 3, 4),))),  # right stamp, wrong rows
        lambda b: marshal.dumps((marshal.loads(b)[0], (("no-such-signature", (), (), b""),))),
    ],
)
def test_a_damaged_or_foreign_copy_is_unpacked_again(damage: object) -> None:
    good = K._compact()
    path = K.compact_path(K.DATA.read_bytes())
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    assert K._compact() == good
    assert marshal.loads(path.read_bytes())[1] == good  # and kept right again


def test_changed_package_data_gets_its_own_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another signatures file (a new sdtool version) never reads the old copy."""
    old = K._compact()
    data = json.loads(gzip.decompress(K.DATA.read_bytes()))
    data["signatures"]["vae"]["keys"][0] = "renamed.weight"
    other = tmp_path / "signatures.json.gz"
    other.write_bytes(gzip.compress(json.dumps(data).encode(), mtime=0))
    assert K.compact_path(other.read_bytes()) != K.compact_path(K.DATA.read_bytes())
    monkeypatch.setattr(K, "DATA", other)
    new = {sid: keys for sid, keys, *_ in K._compact()}
    assert new["vae"][0] == "renamed.weight"
    assert {sid: keys for sid, keys, *_ in old}["vae"][0] != "renamed.weight"


def test_an_unwritable_cache_folder_costs_only_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder cannot be made under a file")
    monkeypatch.setenv("SDTOOL_CACHE_DIR", str(blocker / "sdtool"))
    assert [sid for sid, *_ in K._compact()] == list(_shipped())


def test_cache_folder_follows_the_result_caches_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdtool.cache import default_dir

    raw = K.DATA.read_bytes()
    for env in ({"SDTOOL_CACHE_DIR": str(tmp_path / "a")}, {"XDG_CACHE_HOME": str(tmp_path)}, {}):
        for name in ("SDTOOL_CACHE_DIR", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert K.compact_path(raw).parent == default_dir()


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX owners and modes")
@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_copy_others_could_write_is_not_read(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """marshal is not hardened against hostile bytes: a copy that group or others could have
    written (the file, or its folder: a shared or restored cache) is unpacked again instead;
    the copy sdtool keeps is private (0600) and read on the next run."""
    good = K._compact()
    path = K.compact_path(K.DATA.read_bytes())
    assert path.stat().st_mode & 0o777 == 0o600
    unpacked: list[bytes] = []
    real = K.unpack
    monkeypatch.setattr(K, "unpack", lambda raw: unpacked.append(raw) or real(raw))
    target = path if where == "file" else path.parent
    mode = target.stat().st_mode & 0o777
    target.chmod(mode | 0o022)
    try:
        assert K._compact() == good
        assert len(unpacked) == 1
    finally:
        target.chmod(mode)
    path.chmod(0o600)  # a rewritten copy is private again; a private one is read, not unpacked
    assert K._compact() == good
    assert len(unpacked) == 1
