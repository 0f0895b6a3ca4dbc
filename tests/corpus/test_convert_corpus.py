"""Every benign corpus file that holds tensors converts to safetensors and verifies.

The corpus is data only: files are opened by sdtool's own readers (no unpickling by torch or
pickle), converted into tmp_path with verify=True (each tensor compared bitwise with its
source), and the output is read back by safetensors' reference reader.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import load_file

from sdtool import open_model
from sdtool.errors import SdtoolError
from sdtool.ops.convert import convert

FORMATS = {"zip torch", "legacy torch", "safetensors", "npz", "npy", "plain pickle"}


def test_benign_tensor_files_convert_and_verify(
    corpus: Path, tmp_path: Path, tally: list[str]
) -> None:
    manifest = json.loads((corpus / "manifest.json").read_text())
    converted, unreadable, empty = 0, [], 0
    for i, e in enumerate(manifest):
        if e["verdict"] != "benign" or e["format"] not in FORMATS:
            continue
        src = corpus / "files" / e["file"]
        try:
            with open_model(src) as m:
                n = len(m.tensors)
        except SdtoolError as err:  # e.g. object arrays: not numbers, nothing to convert
            unreadable.append(f"{e['file']}: {type(err).__name__}")
            continue
        if n == 0:
            empty += 1
            continue
        out = tmp_path / f"{i}.safetensors"
        r = convert(src, out, verify=True, on_overflow="warn")
        assert r.verified and r.tensors == n, e["file"]
        ref = load_file(str(out))
        assert len(ref) == n, e["file"]
        converted += 1
    assert converted >= 30
    tally.append(
        f"{converted} files converted and verified; {empty} hold no state-dict tensors; "
        f"{len(unreadable)} not readable as numbers ({', '.join(unreadable)})"
    )
