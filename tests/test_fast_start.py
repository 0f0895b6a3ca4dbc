"""Issue 10, item 4: a fast start. Which modules ``sdtool --help``, ``scan`` and ``inspect``
import (the figures are in benchmarks/bench_start.py, not timed here), the cheap forged-memo
walk the loader runs before unpickling, and shell completion of choices."""

from __future__ import annotations

import io
import itertools
import pickle
import pickletools
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sdtool.formats.unpickler import _forged_memo_put

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-sd15-ema.ckpt"

PROBE = """
import io, sys, contextlib
from sdtool.cli.main import main
with contextlib.redirect_stdout(io.TextIOWrapper(io.BytesIO())):  # --jsonl writes bytes
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(" ".join(sorted(sys.modules)))
"""  # imports nothing the commands might not (json, for one)


def imported(argv: list[str], env: dict[str, str]) -> set[str]:
    """The modules a fresh process has loaded after running ``sdtool ARGV``."""
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    return set(r.stdout.splitlines()[-1].split())


HEAVY = {"torch", "ml_dtypes", "diffusers", "transformers", "gguf", "py7zr", "joblib", "tqdm"}
HEAVY |= {"distributed", "dask"}  # --cluster only
#: what no ``--help`` needs: the hashing and caching machinery, temp files, JSON
HELP_FREE = {"numpy", "rich", "safetensors", "sqlite3", "tempfile", "hashlib", "json", "isal"}
HELP_FREE |= {"sdtool.cache", "sdtool.ops.hash", "sdtool.formats", "sdtool.scan", "sdtool.identify"}


def _under(mods: set[str], *prefixes: str) -> set[str]:
    return {m for m in mods if m.split(".")[0] in prefixes or m.startswith(prefixes)}


def test_help_imports_click_and_nothing_of_the_library(sub_env: dict[str, str]) -> None:
    mods = imported(["--help"], sub_env)
    assert not _under(mods, *HEAVY, *HELP_FREE)
    assert {m for m in mods if m.startswith("sdtool")} <= {
        "sdtool",
        "sdtool.cli",
        "sdtool.cli.main",
        "sdtool.errors",
        "sdtool.records",  # vocab's dataclass
        "sdtool.vocab",
    }


@pytest.mark.parametrize(
    "argv",
    [["scan", str(EXAMPLE)], ["inspect", str(EXAMPLE)], ["inspect", "--no-cache", str(EXAMPLE)]],
)
def test_scan_and_inspect_import_only_their_path(argv: list[str], sub_env: dict[str, str]) -> None:
    """The first run (nothing cached) of each, and inspect's cold path without the cache."""
    mods = imported(argv, sub_env)
    # off a terminal both print without rich (sdtool.cli.plain) and list without numpy
    assert not _under(mods, *HEAVY, "numpy", "rich"), sorted(_under(mods, *HEAVY, "numpy", "rich"))
    assert not _under(mods, "sdtool.layouts", "sdtool.ops.convert", "sdtool.ops.prune")
    if argv[0] == "inspect":  # the verdict column needs the allowlist, not the pickle machine
        assert not {"sdtool.scan.vm", "sdtool.scan.containers", "sdtool.scan.rules"} & mods
        assert not _under(mods, "sdtool.scan.walkers")
        # nor the scan report's dataclasses (each costs ~5M instructions to create), nor the
        # LoRA rows' regexes (a checkpoint is no LoRA)
        # nor the facts of torch's other containers (the example is a torch zip)
        assert not {"sdtool.scan.report", "sdtool.identify.lora_rows"} & mods
        # nor the capability table: the allowlist answers for every global of the example
        assert "sdtool.scan.capabilities" not in mods and "sdtool.scan.classify" in mods
        assert "sdtool.formats.torchfacts" not in mods and "sdtool.formats.torchfile" in mods
        assert "sdtool.formats.zip_readings" not in mods  # the scanner's readings of a zip
        assert "sdtool.identify.tables" in mods  # the probe can fail: identify did run
    else:
        assert "sdtool.scan.report" in mods  # the probe can fail: scan does load it


@pytest.mark.parametrize(
    "command", ["inspect", "scan", "convert", "prune", "extract", "hash", "diff", "merge", "lora"]
)
def test_command_help_imports_nothing_heavy(command: str, sub_env: dict[str, str]) -> None:
    """``sdtool COMMAND --help`` loads the command's module and click: not numpy, not rich, not
    the cache's sqlite3 or hashing (``hash --help`` lists its algorithms from sdtool.vocab)."""
    mods = imported([command, "--help"], sub_env)
    assert not _under(mods, *HEAVY, *HELP_FREE), sorted(_under(mods, *HEAVY, *HELP_FREE))


def test_inspect_of_a_tiny_file_imports_no_numpy_no_rich(sub_env: dict[str, str]) -> None:
    """Listing names, dtypes, shapes and offsets needs the header and the pickle only: no
    numpy (the restricted unpickler builds tensor references without it), no rich (its report
    prints as plain text off a terminal: sdtool.cli.plain), no cache with --no-cache, no
    safetensors, no temp files (standard input is not involved), no gzip once the key-set
    tables have their compact copy (the first run makes it)."""
    imported(["inspect", "--no-cache", str(EXAMPLE)], sub_env)
    mods = imported(["inspect", "--no-cache", str(EXAMPLE)], sub_env)
    banned = {"numpy", "rich", "safetensors", "sqlite3", "tempfile", "sdtool.cache", "gzip"}
    banned |= {"tarfile", "shutil", "zipfile"}  # torch's TAR format loads tarfile when met
    banned |= {"sdtool.ops.inspect_cache", "sdtool.scan.ruleset"}  # the cache's lookup
    assert not _under(mods, *HEAVY, *banned), sorted(_under(mods, *HEAVY, *banned))
    assert "sdtool.identify.tables" in mods  # the probe can fail: the file was read


#: what a cached ``inspect`` answer (table, --json, --quiet, --jsonl) never loads: the readers,
#: identification and its tables, the report's classes, scan's classification, the renderer
#: of identities (its lines are stored), numpy, rich (packages, then single modules)
CACHED_FREE = {"sdtool.formats", "sdtool.identify", "sdtool.layouts", "numpy", "rich"}
CACHED_FREE |= {"safetensors", "tempfile", "hashlib", "gzip", "zipfile"}
CACHED_FREE_MODULES = {"sdtool.model", "sdtool.ops.inspect", "sdtool.results", "sdtool.dtypes"}
CACHED_FREE_MODULES |= {"sdtool.scan.classify", "sdtool.scan.allowlist", "sdtool.scan.report"}
CACHED_FREE_MODULES |= {"sdtool.cli.identity"}


@pytest.mark.parametrize(
    "options", [[], ["--json"], ["--quiet"], ["--jsonl"], ["--tensors", "--filter", "*.bias"]]
)
def test_a_cached_inspect_loads_only_the_lookup(
    options: list[str], sub_env: dict[str, str]
) -> None:
    """Issue 10.4: the second inspect of an unchanged file answers from the result cache
    without importing what reads or identifies it (the output is the same: test_inspect_cache).
    The first run reads the file (it loads identification) and stores the record."""
    first = imported(["inspect", *options, str(EXAMPLE)], sub_env)
    assert "sdtool.identify.tables" in first and "sdtool.ops.inspect_cache" in first
    mods = imported(["inspect", *options, str(EXAMPLE)], sub_env)
    assert not _under(mods, *HEAVY, *CACHED_FREE), sorted(_under(mods, *HEAVY, *CACHED_FREE))
    assert not CACHED_FREE_MODULES & mods, sorted(CACHED_FREE_MODULES & mods)
    assert {"sdtool.ops.inspect_cache", "sdtool.cache", "sqlite3"} <= mods  # it did look up


def test_lora_rows_are_still_named_by_the_tables() -> None:
    """The LoRA rows load on first use, under their old names in ``identify.tables`` too."""
    from sdtool.identify import lora_rows, tables

    for name in ("LORA_CONTEXT_MODULE", "LORA_MODULE_ARCH", "TRAINERS", "LoraArch", "Trainer"):
        assert getattr(tables, name) is getattr(lora_rows, name)
    with pytest.raises(AttributeError):
        _ = tables.NO_SUCH_TABLE


def test_other_containers_facts_are_still_named_by_torchfile() -> None:
    """The legacy / TAR / pickle facts load off the zip path, under their old names too."""
    from sdtool.formats import torchfacts, torchfile

    for name in ("LegacyFacts", "PickleFacts", "RawSpan", "TarFacts"):
        assert getattr(torchfile, name) is getattr(torchfacts, name)
    with pytest.raises(AttributeError):
        _ = torchfile.NO_SUCH_NAME


def test_zip_readings_are_still_named_by_zip() -> None:
    """The scanner's readings of a zip load on first use, under their old names too."""
    from sdtool.formats import zip as zipfmt
    from sdtool.formats import zip_readings

    for name in ("EndRecord", "LocalHeader", "local_headers", "read_archives"):
        assert getattr(zipfmt, name) is getattr(zip_readings, name)
    with pytest.raises(AttributeError):
        _ = zipfmt.NO_SUCH_NAME


def test_dtype_table_item_sizes_are_numpys() -> None:
    """The dtype table names numpy types by string (numpy is imported only to read values):
    the item sizes it states are numpy's and ml_dtypes'."""
    import ml_dtypes
    import numpy as np

    from sdtool.dtypes import DTYPES

    for d in DTYPES.values():
        t = getattr(ml_dtypes, d.np_type) if d.lazy else d.np_type
        assert np.dtype(t).itemsize == d.itemsize, d.code
        assert d.numpy == np.dtype(t).newbyteorder("<"), d.code


def test_hash_names_in_vocab_are_the_algorithms() -> None:
    """``hash --help`` and completion read vocab.HASH_NAMES: the same names, in the same order,
    as the algorithms ops.hash computes."""
    from sdtool.ops.hash import ALGORITHMS
    from sdtool.vocab import HASH_NAMES

    assert tuple(ALGORITHMS) == HASH_NAMES


def _reference(data: bytes) -> tuple[tuple[str, int, int] | None, bool]:
    """The check as pickletools.genops sees it (what the walker replaced), and whether genops
    stopped at a malformed opcode argument."""
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(arg, int) and arg > count:
                return (op.name, arg, count), False
    except ValueError:
        return None, True
    return None, False


def test_forged_memo_walk_agrees_with_pickletools() -> None:
    """Same answer as genops; where genops already gave up on a malformed argument (a STRING
    that is not ASCII: the unpickler fails there too), the walker may still find the forgery."""
    rng = random.Random(7)
    obj = {"a": [1, 2.5, "x" * 300, b"y" * 70_000], "b": {i: str(i) for i in range(300)}}
    base = [pickle.dumps(obj, protocol=p) for p in range(6)]
    base.append(b"(dp0\nS'a'\np1\nI1\nsS'b'\np99\nI2\ns.")  # a forged text PUT
    base.append(b"\x80\x02}q\x00(X\x01\x00\x00\x00ar\x35\x0a\x73\x56K\x01u.")  # LONG_BINPUT
    cases = list(base)
    for data in base:
        for _ in range(60):
            b = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            cases.append(bytes(b[: rng.randint(1, len(b))]))
    for data in cases:
        got = _forged_memo_put(io.BytesIO(data), 0)
        expected, malformed = _reference(data)
        assert got == expected or (malformed and expected is None), data[:40]
    assert _forged_memo_put(io.BytesIO(base[-1]), 0) == ("LONG_BINPUT", 0x56730A35, 5)
    assert _forged_memo_put(io.BytesIO(base[-2]), 0) == ("PUT", 99, 8)


def _complete(words: str, sub_env: dict[str, str]) -> list[str]:
    env = dict(sub_env, _SDTOOL_COMPLETE="bash_complete", COMP_WORDS=words,
               COMP_CWORD=str(len(words.split(" ")) - 1))  # fmt: skip
    code = "import sys; sys.argv[0] = 'sdtool'; from sdtool.cli.main import run; run()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return [ln.split(",", 1)[1] for ln in r.stdout.splitlines()]


def test_shell_completion_completes_choices(sub_env: dict[str, str]) -> None:
    assert _complete("sdtool ", sub_env)[:3] == ["inspect", "scan", "convert"]
    assert _complete("sdtool convert m.ckpt --dtype fp", sub_env) == [
        "fp32", "fp16", "fp8_e4m3fn", "fp8_e5m2",
    ]  # fmt: skip
    assert "vae" in _complete("sdtool extract m.ckpt --component ", sub_env)
    assert _complete("sdtool prune m.ckpt --drop vae,u", sub_env) == ["vae,unet", "vae,unknown"]


def _nesting_reference(data: bytes) -> bool:
    """The tuple-nesting check as it was written over pickletools.genops (before it was folded
    into the memo walk): True when it refuses the stream."""
    from sdtool.formats.unpickler import MAX_TUPLE_DEPTH, MAX_TUPLE_TREE

    arity = {"TUPLE": -1, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
    stack: list[tuple[int, int]] = []
    marks: list[int] = []
    memo: dict[int, tuple[int, int]] = {}
    flat = (0, 1)

    def pop_mark() -> list[tuple[int, int]]:
        cut = marks.pop() if marks else 0
        items = stack[cut:]
        del stack[cut:]
        return items

    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in arity:
                n = arity[name]
                if n < 0:
                    items = pop_mark()
                else:
                    items, stack[len(stack) - n :] = stack[len(stack) - n :], []
                depth = 1 + max((x[0] for x in items), default=0)
                size = 1 + sum(x[1] for x in items)
                if depth > MAX_TUPLE_DEPTH or size > MAX_TUPLE_TREE:
                    return True
                stack.append((depth, size))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if stack:
                    memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, flat))
            elif name == "DUP":
                stack.append(stack[-1] if stack else flat)
            else:
                before = op.stack_before
                if pickletools.markobject in before:
                    pop_mark()
                    del stack[max(0, len(stack) - before.index(pickletools.markobject)) :]
                elif before:
                    del stack[max(0, len(stack) - len(before)) :]
                for kind in op.stack_after:
                    if kind is pickletools.markobject:
                        marks.append(len(stack))
                    else:
                        stack.append(flat)
    except ValueError:
        pass
    return False


def _refuses(data: bytes, *, nesting_only: bool = False) -> bool:
    """Does the one walk refuse ``data`` (a tuple nested too deeply, or a forged memo index)?"""
    from sdtool.errors import CorruptFile

    try:
        forged = _forged_memo_put(io.BytesIO(data), 0)
    except CorruptFile as e:
        assert "nested" in e.message
        return True
    return forged is not None and not nesting_only


def test_one_walk_checks_memo_and_tuple_nesting_as_genops_did() -> None:
    """Issue 12: the nesting pre-check is folded into the memo walk (one pass, no genops);
    it refuses exactly what the genops version refused on hostile and mutated streams."""
    deep = [
        b"\x80\x02}" + b"N" + b"\x85" * 1001 + b"K\x01s.",  # a deep tuple as a dict key
        b"\x80\x02" + b"(" * 1001 + b"N" + b"t" * 1001 + b".",  # MARK ... TUPLE nesting
        b"\x80\x04\x8f(N" + b"\x85" * 1001 + b"\x90.",  # deep tuple in a set
        b"\x80\x02N\x85q\x00" + b"h\x00h\x00\x86q\x00" * 40 + b".",  # (t, t) through the memo
        b"\x80\x02N\x85" + b"2\x86" * 40 + b".",  # t = (t, t) forty times through DUP
        b"(lp0\nN" + b"\x85p0\ng0\n" * 1001 + b".",  # text PUT/GET keep the depth
    ]
    for data in deep:
        assert _nesting_reference(data), data[:20]
        assert _refuses(data, nesting_only=True), data[:20]
    shallow = [b"\x80\x02" + b"N\x85" * 10 + b".", pickle.dumps(((1, 2), (3, (4,))), 2)]
    rng = random.Random(11)
    benign = [pickle.dumps({"a": (1, (2, (3,))), "b": [()] * 5}, p) for p in range(6)]
    base = [*deep, *shallow, *benign]
    cases = list(base)
    for data in base:
        for _ in range(40):
            b = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] = rng.choice(b"(t\x85\x86\x872hqpgN0")
            cases.append(bytes(b))
    # what genops refused, the walk refuses (as nesting, or earlier as a forged memo index)
    missed = [c[:30] for c in cases if _nesting_reference(c) and not _refuses(c)]
    assert not missed, missed
    # the walk may refuse more only where genops gave up on a malformed argument it steps over
    disagree = [c for c in cases if _refuses(c, nesting_only=True) != _nesting_reference(c)]
    assert len(disagree) <= len(cases) // 20, len(disagree)


@pytest.mark.parametrize("sub", ["bake", "extract", "resize"])
def test_lora_subcommand_help_imports_nothing_heavy(sub: str, sub_env: dict[str, str]) -> None:
    """``sdtool lora bake --help`` (and extract, resize): click and the cli module only."""
    mods = imported(["lora", sub, "--help"], sub_env)
    assert not _under(mods, *HEAVY, "numpy", "rich", "sdtool.ops", "sdtool.formats")


def _generic_walk(f: io.BytesIO, start: int) -> tuple[str, int, int] | None:
    """The walk one opcode at a time, by the layout and stack-effect tables alone (as it was
    written before the fast kinds): the reference the loader's walk must equal exactly."""
    from sdtool.formats import unpickler as u

    stack: list[tuple[int, int]] = []
    marks: list[int] = []
    memo: dict[int, tuple[int, int]] = {}
    f.seek(start)
    buf = f.read(u._WALK_CHUNK)
    base, i, count, end = start, 0, 0, len(buf)
    while True:
        if i + 9 > end:
            f.seek(base + i)
            base, buf, i = base + i, f.read(u._WALK_CHUNK), 0
            end = len(buf)
            if not end:
                return None
        code = buf[i]
        layout = u._LAYOUT_TABLE[code]
        if layout is None or code == u._STOP:
            return None
        i += 1
        index = -1
        if layout >= 0:
            if i + layout > end:
                return None
            if code in u._BIN_MEMO:
                index = int.from_bytes(buf[i : i + layout], "little")
                if code in (u._BINPUT, u._LONG_BINPUT) and index > count:
                    return ("BINPUT" if code == u._BINPUT else "LONG_BINPUT", index, count)
            i += layout
        elif layout <= u._ARG_LEN1:
            width = u._WIDTH[layout]
            if i + width > end:
                return None
            n = int.from_bytes(buf[i : i + width], "little", signed=layout == u._ARG_LEN4)
            if n < 0:
                return None
            i += width + n
        else:
            for _ in range(2 if layout == u._ARG_TWO_LINES else 1):
                nl = buf.find(b"\n", i)
                while nl < 0:
                    if end - i > u._MAX_LINE:
                        return None
                    more = f.read(u._WALK_CHUNK)
                    if not more:
                        return None
                    buf += more
                    end = len(buf)
                    nl = buf.find(b"\n", i)
                line, i = buf[i:nl], nl + 1
            if code in (u._PUT, u._GET):
                try:
                    index = int(line)
                except ValueError:
                    return None
                if code == u._PUT and index > count:
                    return ("PUT", index, count)
        kind, below, pushes = u._EFFECTS[code]
        if kind == u._FX_PLAIN:
            if below:
                del stack[max(0, len(stack) - below) :]
            stack.extend([(0, 1)] * pushes)
        else:
            u._stack_effect(code, kind, below, index, stack, marks, memo, count)
        count += 1


def _walk_outcome(walk: Any, data: bytes, start: int = 0) -> Any:
    from sdtool.errors import CorruptFile

    try:
        return walk(io.BytesIO(data), start)
    except CorruptFile as e:
        return e.message


@pytest.mark.parametrize("chunk", [1 << 20, 64, 16])
def test_fast_walk_equals_the_generic_walk(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader's walk takes the common opcodes by fast kinds and checks bounds per window,
    not per opcode: on torch's pickles, every protocol, hostile and mutated streams, cut at
    every length and read through small windows, it answers exactly as one opcode at a time
    (the same forged PUT at the same count, the same refusal message, or nothing)."""
    from sdtool.formats import unpickler as u

    monkeypatch.setattr(u, "_WALK_CHUNK", chunk)
    t = (1, (2, (3,)))
    obj = {"a": [t, t, (), "k" * 300, b"b" * 300, 2.5, -7, 1 << 70, True, None]}
    obj["s"], obj["f"], obj["b"] = {1, 2}, frozenset({t}), bytearray(b"xy")
    base = [pickle.dumps(obj, protocol=p) for p in range(6)]
    base.append(_torch_pickle())
    base += [
        b"\x80\x02}q\x00(X\x01\x00\x00\x00ar\x35\x0a\x73\x56K\x01u.",  # forged LONG_BINPUT
        b"(dp0\nS'a'\np1\nI1\nsS'b'\np99\nI2\ns.",  # forged text PUT
        b"\x80\x02N\x85q\x00" + b"h\x00h\x00\x86q\x00" * 40 + b".",  # (t, t) through the memo
        b"\x80\x02" + b"(" * 1001 + b"N" + b"t" * 1001 + b".",  # MARK ... TUPLE nesting
        b"\x80\x02N\x85" + b"2\x86" * 40 + b".",  # t = (t, t) forty times through DUP
        b"\x80\x02N\x85r\x00\x00\x00\x00" + b"j\x00\x00\x00\x00\x85r\x00\x00\x00\x00" * 1001,
    ]
    for n in (2, 3):  # a PUT naming the count of opcodes before it is legal, one more forged
        base += [b"\x80\x02Nr" + n.to_bytes(4, "little") + b"N.", b"\x80\x02Nq" + bytes([n]) + b"."]
        base.append(b"NN" + f"p{n}\n".encode() + b".")
    rng = random.Random(5)
    cases = list(base)
    for data in base:
        cases += [data[:n] for n in range(0, min(len(data), 400))]
        for _ in range(30):
            b = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.choice([rng.randrange(256), *b"(t\x85\x86hjqrX\x8c"])
            cases.append(bytes(b[: rng.randint(1, len(b))]))
    for data in cases:
        for start in (0, 3) if len(data) > 3 else (0,):
            fast = _walk_outcome(u._forged_memo_put, data, start)
            assert fast == _walk_outcome(_generic_walk, data, start), (data[:60], start)


def _torch_pickle() -> bytes:
    """data.pkl of the tiny example checkpoint (torch's own pickler output)."""
    import zipfile

    with zipfile.ZipFile(EXAMPLE) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def test_tensor_records_taken_at_once_equal_the_generic_walk() -> None:
    """The walk takes torch's ~27-opcode tensor records in one step (``_TENSOR_RECORD``): the
    memo entries it stores are the generic walk's (each fetched and nested up to just past the
    depth limit refuses at the same opcode), and changed records (any byte of them, or a GET
    that fetches a tuple into the storage id) answer as one opcode at a time."""
    from sdtool.formats import unpickler as u

    data = _torch_pickle()
    records = list(u._TENSOR_RECORD.finditer(data))
    assert len(records) == 1828  # of 1,831 tensors (the first ones GLOBAL their callables)
    rng = random.Random(9)
    chosen = records[:4] + rng.sample(records[4:150], 4)
    cases = []
    for m in chosen:
        for group in (5, 7, 9, 11, 12, 13, 14):  # every PUT of the record
            op = m.group(group)
            if op is not None:
                get = b"j" + int.from_bytes(op[1:], "little").to_bytes(4, "little")
                cases += [data[: m.end()] + get + b"\x85" * n + b"." for n in range(998, 1002)]
        for _ in range(25):
            b = bytearray(data[: m.end() + 300])
            b[rng.randrange(m.start(), m.end())] = rng.choice(
                [rng.randrange(256), *b"hjqrKMJXt()\x85\x86\x87QR\x88\x89\x00\x01\x05\x09\xff"]
            )
            cases.append(bytes(b))
    for before, m in itertools.pairwise(chosen):
        args = before.group(13)  # the previous record's arguments tuple, (2, n) in the memo
        if m.start() > before.end() and args is not None:
            index = int.from_bytes(args[1:], "little")
            gets = [b"j" + index.to_bytes(4, "little")] + [b"h" + bytes([index])] * (index < 256)
            put = m.group(7) or b"q\x00"  # the storage id tuple, now three deep
            again = b"j" + int.from_bytes(put[1:], "little").to_bytes(4, "little")
            for group, get in itertools.product((1, 2, 6), gets):  # name, type or device GET
                spliced = data[: m.start(group)] + get + data[m.end(group) : m.end()]
                cases += [spliced + again + b"\x85" * n + b"." for n in range(996, 1002)]
    for case in cases:
        fast = _walk_outcome(u._forged_memo_put, case)
        assert fast == _walk_outcome(_generic_walk, case), case[-40:]


SETTLE_PROBE = """
import gc, sys
import sdtool.formats.open as opening
events = []
real_freeze, real_open = gc.freeze, opening.open_model
gc.freeze = lambda: (events.append("freeze"), real_freeze())[1]
opening.open_model = lambda *a, **k: (events.append("read"), real_open(*a, **k))[1]
sys.argv = ["sdtool", *sys.argv[1:]]
from sdtool.cli.main import run
try:
    run()
except SystemExit as e:
    print(" ".join(events), e.code, file=sys.stderr)
"""


def test_the_console_process_freezes_the_read_path_once_before_reading(
    sub_env: dict[str, str],
) -> None:
    """run() freezes the CLI; the first file read freezes what inspect imported for it
    (settle), never anything built from a file: the second file is read unfrozen."""
    r = subprocess.run(
        [sys.executable, "-c", SETTLE_PROBE, "inspect", "--no-cache", str(EXAMPLE), str(EXAMPLE)],
        capture_output=True,
        text=True,
        env=sub_env,
    )
    assert r.stderr.splitlines()[-1] == "freeze freeze read read 0", r.stderr


def test_main_as_a_library_call_freezes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    import gc

    from sdtool.cli.main import main

    before = gc.get_freeze_count()
    assert main(["inspect", "--no-cache", str(EXAMPLE)]) == 0
    assert gc.get_freeze_count() == before
