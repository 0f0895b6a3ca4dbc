"""The README, true to the letter (issue 10, item 8).

Every block marked ``<!-- readme: run -->`` is run in a scratch folder, one ``$ sdtool ...`` line
at a time (blocks in README order share the folder, so ``hash tiny.safetensors`` sees what
``convert`` wrote), and what each command prints on stdout must equal the lines shown under it.
``<!-- readme: python -->`` blocks are executed there. Blocks marked
``<!-- readme: illustrative ... -->`` show files too big to ship and are not run; unmarked blocks
(sections this test does not know) are left alone.
"""

from __future__ import annotations

import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scan_payloads import (
    MEMOIZE,
    NONE,
    PROTO,
    REDUCE,
    STACK_GLOBAL,
    STOP,
    TUPLE1,
    TUPLE2,
    U,
    asm,
)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"<!-- readme: (\w+)[^>]*-->\n```[^\n]*\n(.*?)\n```", re.S)


def _frame(body: bytes) -> bytes:
    return b"\x95" + struct.pack("<Q", len(body)) + body


def samples() -> dict[str, bytes]:
    """The two scan samples the README shows, assembled opcode by opcode (protocol 4, framed),
    laid out as pickle.dumps lays out a __reduce__ to a global."""
    eval_call = asm(
        U("builtins"), MEMOIZE, U("eval"), MEMOIZE, STACK_GLOBAL, MEMOIZE,  # import builtins.eval
        U("print('hi!')"), MEMOIZE, TUPLE1, MEMOIZE, REDUCE, MEMOIZE, STOP,  # eval(...)
    )  # fmt: skip
    runcode = asm(
        U("idlelib.pyshell"), MEMOIZE, U("ModifiedInterpreter.runcode"), MEMOIZE,
        STACK_GLOBAL, MEMOIZE,  # GHSA-3gf5-cxq9-w223: an IDLE method that runs source code
        NONE, U("__import__('os').system('id')#####"), MEMOIZE, TUPLE2, MEMOIZE,
        REDUCE, MEMOIZE, STOP,
    )  # fmt: skip
    return {
        "malicious1_v4.pkl": PROTO(4) + _frame(eval_call),
        "GHSA-3gf5-cxq9-w223.pkl": PROTO(4) + _frame(runcode),
    }


def blocks() -> list[tuple[str, str]]:
    """(kind, body) of every marked block, in README order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(README.read_text(encoding="utf-8"))]


def commands(body: str) -> list[tuple[str, str]]:
    """(command line, expected stdout) pairs of a console block."""
    out: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        else:
            assert out, f"output before any command: {line!r}"
            out[-1][1].append(line)
    return [(cmd, "\n".join(lines).rstrip("\n")) for cmd, lines in out]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    (d / "examples").mkdir()
    (d / "examples" / "tiny-sd15-ema.ckpt").write_bytes(
        (REPO / "examples" / "tiny-sd15-ema.ckpt").read_bytes()
    )
    for name, data in samples().items():
        (d / name).write_bytes(data)
    return d


def test_the_markers_are_used() -> None:
    kinds = [k for k, _ in blocks()]
    assert kinds.count("run") >= 4 and "python" in kinds and "illustrative" in kinds
    assert set(kinds) <= {"run", "python", "illustrative"}, kinds


def test_every_runnable_block(scratch: Path, sub_env: dict[str, str]) -> None:
    env = {k: v for k, v in sub_env.items() if k != "COLUMNS"}
    checked = 0
    for kind, body in blocks():
        if kind == "python":
            r = subprocess.run(
                [sys.executable, "-c", body], cwd=scratch, capture_output=True, text=True, env=env
            )
            assert r.returncode == 0, r.stderr
            continue
        if kind != "run":
            continue
        for cmd, expected in commands(body):
            argv = shlex.split(cmd, comments=True)
            assert argv[0] == "sdtool", cmd
            r = subprocess.run(
                [sys.executable, "-m", "sdtool", *argv[1:]],
                cwd=scratch,
                capture_output=True,
                text=True,
                env=env,
            )
            assert r.stdout.rstrip("\n") == expected, f"$ {cmd}\n{r.stderr}"
            checked += 1
    assert checked >= 6


def test_command_one_leaves_nothing_in_the_clone() -> None:
    """README command 1 writes its output to a temp folder, never into the clone."""
    text = README.read_text(encoding="utf-8")
    one = next(
        ln for ln in text.splitlines() if ln.startswith("python3 -m venv") and "convert" in ln
    )
    for part in one.split("&&"):
        words = shlex.split(part)
        if len(words) > 1 and words[0].endswith("sdtool") and words[1] in ("convert", "prune"):
            outs = [w for w in words[3:] if not w.startswith("-") and "." in w]
            assert outs and all(w.startswith("${TMPDIR:-/tmp}/") for w in outs), part


def test_install_line_names_the_cpu_wheel() -> None:
    text = README.read_text(encoding="utf-8")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text
