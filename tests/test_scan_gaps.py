"""Issue 12's last gaps: archives sdtool cannot open, and truncated pickles.

- An archive sdtool cannot look inside (RAR; a 7z py7zr refuses) is ``could not scan:
  unsupported archive (...)``, exit 2, with the reason: never "dangerous" for being unopenable.
- A plain pickle cut short anywhere (inside a frame included) is ``could not scan`` (exit 2),
  not a finding; a dangerous call made before the cut still makes it dangerous (exit 1).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import pytest

from sdtool.cli.main import main
from sdtool.scan import scan
from tests.scan_payloads import call_global

RAR5 = b"Rar!\x1a\x07\x01\x00" + bytes(64)  # a RAR 5 signature and an empty main header
RAR4 = b"Rar!\x1a\x07\x00" + bytes(64)


@pytest.mark.parametrize("head", [RAR4, RAR5], ids=["rar4", "rar5"])
def test_rar_is_could_not_scan_with_the_reason(
    tmp_path: Path, head: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "model.rar"
    p.write_bytes(head)
    r = scan(p)
    assert r.verdict == "not_scanned" and r.format == "rar" and not r.findings
    assert r.errors == [
        "not scanned: unsupported archive (RAR): sdtool reads no RAR (Python's RAR readers run "
        "an external unrar program); unpack it and scan the contents"
    ]
    assert main(["scan", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}: could not scan: unsupported archive (RAR)" in err


def test_rar_inside_a_zip_is_an_error_of_that_member(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("weights.rar", RAR5)
        z.writestr("ok.pkl", pickle.dumps({"a": 1}, protocol=2))
    p = tmp_path / "bundle.zip"
    p.write_bytes(buf.getvalue())
    r = scan(p)
    assert r.verdict == "error" and not r.findings
    assert [e.split(":")[0] for e in r.errors] == ["weights.rar"]
    # and a payload beside it still wins
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("evil.pkl", call_global("os", "system", proto=2))
    assert scan(p).verdict == "dangerous"


# -- truncated pickles -------------------------------------------------------------------------


def _framed() -> bytes:
    """A protocol-4 pickle with several frames (and a large bytes object between frames)."""
    obj = {"a": list(range(40_000)), "s": ["x" * i for i in range(150)], "b": b"y" * 70_000}
    return pickle.dumps(obj, protocol=4)


def _cuts(data: bytes) -> list[int]:
    """Cut points: inside every frame header, inside every frame, inside every opcode's
    argument near a frame end, and a spread over the whole stream."""
    cuts = set(range(1, len(data), max(1, len(data) // 60)))
    for op, arg, pos in pickletools.genops(data):
        if op.name == "FRAME":
            cuts.update({pos + 1, pos + 5, pos + 9, pos + 9 + arg // 2, pos + 9 + arg - 1})
    return sorted(c for c in cuts if 0 < c < len(data))


def test_truncated_pickle_is_could_not_scan_never_a_finding(tmp_path: Path) -> None:
    data = _framed()
    assert sum(op.name == "FRAME" for op, _, _ in pickletools.genops(data)) >= 3
    p = tmp_path / "cut.pkl"
    for cut in _cuts(data):
        p.write_bytes(data[:cut])
        r = scan(p)
        assert r.verdict in ("error", "not_scanned"), (cut, r.verdict, r.findings)
        assert not [f for f in r.findings if f.severity != "info"], (cut, r.findings)
        assert r.errors, cut


def test_truncated_pickle_exit_code_is_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _framed()
    frame = next(pos for op, _, pos in pickletools.genops(data) if op.name == "FRAME")
    p = tmp_path / "cut.pkl"
    p.write_bytes(data[: frame + 9 + 100])  # inside the first frame
    assert main(["scan", str(p)]) == 2
    assert "could not scan" in capsys.readouterr().err


def _framed_payload() -> bytes:
    """A protocol-4 pickle: a first frame that calls os.system, a second frame of data.

    The C unpickler reads a whole frame before running any of it, so a cut inside the first
    frame runs nothing; a cut inside the second runs the call first.
    """
    call = b"\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94"
    data = b"]\x94(" + b"K\x01" * 500 + b"e."
    frame = b"\x95" + struct.pack("<Q", len(call)) + call
    return b"\x80\x04" + frame + b"\x95" + struct.pack("<Q", len(data)) + data


def test_truncated_after_a_dangerous_call_is_still_dangerous(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _framed_payload()
    second = data.index(b"\x95", 11)
    p = tmp_path / "cut.pkl"
    for cut in (second, second + 5, second + 9, second + 200, len(data) - 1):
        p.write_bytes(data[:cut])
        r = scan(p)
        assert r.verdict == "dangerous", (cut, r.findings, r.errors)
        assert r.errors  # and the break is reported
        assert main(["scan", str(p)]) == 1
    for cut in (11, data.index(b"R\x94") + 1):  # inside the first frame: nothing runs
        p.write_bytes(data[:cut])
        assert scan(p).verdict == "error", cut
        assert main(["scan", str(p)]) == 2
    capsys.readouterr()


def test_framed_payload_positive_control(tmp_path: Path) -> None:
    """The loader's view of the same cuts: the call runs iff its frame is whole."""
    import sys
    import types

    data = _framed_payload().replace(b"\x02os", b"\x02xx")  # a harmless stand-in module
    ran: list[str] = []
    fake = types.ModuleType("xx")
    fake.system = lambda cmd: ran.append(cmd)  # type: ignore[attr-defined]
    second = data.index(b"\x95", 11)
    sys.modules["xx"] = fake
    try:
        for cut, runs in ((second + 200, True), (data.index(b"R\x94") + 1, False)):
            ran.clear()
            with pytest.raises(pickle.UnpicklingError):
                pickle.loads(data[:cut])
            assert bool(ran) is runs, cut
        ran.clear()
        assert pickle.loads(data) == [1] * 500 and ran == ["true"]
    finally:
        del sys.modules["xx"]


# -- issue 11: zip irregularities are typed values, not sentences matched by words -------------


def _flagged_zip(names: list[str], flag_member: str, prefix: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n in names:
            z.writestr(n, pickle.dumps({"a": 1}, protocol=2))
    data = bytearray(buf.getvalue())
    # set flag bit 0x40 (strong encryption) in the central entry of ``flag_member``
    at = data.index(b"PK\x01\x02")
    while True:
        nlen = int.from_bytes(data[at + 28 : at + 30], "little")
        if data[at + 46 : at + 46 + nlen].decode() == flag_member:
            data[at + 8] |= 0x40
            break
        at = data.index(b"PK\x01\x02", at + 4)
    return prefix + bytes(data)


def test_zip_irregularities_are_typed(tmp_path: Path) -> None:
    from sdtool.formats import zip as zipfmt
    from sdtool.scan.walkers.zip import IRREGULAR_RULES

    data = _flagged_zip(["a.pkl", "b.pkl"], "b.pkl", prefix=b"junk" * 4)
    arch = zipfmt.read_archive(io.BytesIO(data), len(data))
    kinds = [(i.kind, i.member) for i in arch.irregularities]
    assert kinds == [(zipfmt.Irregular.PREFIX, None), (zipfmt.Irregular.FLAG_BITS, "b.pkl")]
    assert str(arch.irregularities[0]) == "16 bytes before the zip archive"
    assert set(IRREGULAR_RULES) == set(zipfmt.Irregular)


def test_member_names_do_not_change_the_rule(tmp_path: Path) -> None:
    """Bug fixed by typing: the rule was recovered from the sentence by words, so a member
    whose *name* held "duplicate" or "local header" turned a flag-bit finding into another rule.
    """
    p = tmp_path / "m.zip"
    p.write_bytes(_flagged_zip(["duplicate before the zip local header.pkl"],
                               "duplicate before the zip local header.pkl"))  # fmt: skip
    r = scan(p)
    assert {f.rule for f in r.findings} == {"zip-flags"}, r.findings
