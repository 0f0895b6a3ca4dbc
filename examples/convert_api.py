"""Convert a checkpoint to fp16 safetensors with sdtool's public API, then look at the result.

python examples/convert_api.py model.ckpt model-fp16.safetensors
"""

from __future__ import annotations

import sys

from sdtool import convert, open_model


def main(src: str, dst: str) -> None:
    result = convert(src, dst, dtype="fp16", verify=True, on_overflow="warn")
    print(f"{result.tensors} tensors, {result.cast} cast to fp16, verified={result.verified}")
    print(f"{result.input_bytes:,} -> {result.output_bytes:,} bytes")
    for name, count in result.overflows.items():
        print(f"warning: {count} values of {name} became inf in fp16")
    for item in result.not_carried:
        print(f"not carried: {item}")
    with open_model(dst) as m:  # the output reads back like any model file
        ints = [n for n, t in m.tensors.items() if not t.dtype.is_float]
        print(f"metadata keys: {sorted(m.metadata)}; integer tensors kept: {ints}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
