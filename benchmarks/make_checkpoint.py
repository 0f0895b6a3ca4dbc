"""Generate an SD 1.5-shaped Lightning training checkpoint for the benchmarks.

Real keys, shapes and dtypes from ../shared/reference/layouts/sd1-ldm.yaml (UNet, VAE, CLIP-L,
EMA copy, noise schedule: 1,831 tensors, 7.7 GB fp32), wrapped the way SD 1.x training
checkpoints are: ``state_dict`` plus ``global_step``, ``epoch``, ``pytorch-lightning_version`` and a
``callbacks`` dict keyed by the pickled ``ModelCheckpoint`` class (a stand-in module is installed
while saving, so the pickle names the real global without needing pytorch_lightning).

    python benchmarks/make_checkpoint.py /work/bench/sd15-ema.ckpt            # zip (torch >= 1.6)
    python benchmarks/make_checkpoint.py out.ckpt --legacy                    # 5-pickle legacy
    python benchmarks/make_checkpoint.py out.ckpt --scale 0.01                # tiny shapes

An existing output is reused (pass --force to rebuild); a lock keeps two runs from building at once.
"""

from __future__ import annotations

import argparse
import fcntl
import re
import sys
import time
import types
from pathlib import Path

LAYOUTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "layouts"
_LINE = re.compile(r"^    (\S+): \{shape: \[([0-9, ]*)\], dtype: (\w+)")


def read_layout(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, torch dtype name) from an sd-mecha layout yaml (its regular subset)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if m:
            shape = tuple(int(x) for x in m.group(2).split(",") if x.strip())
            out[m.group(1)] = (shape, m.group(3))
    return out


def _fake_lightning() -> type:
    """A class that pickles as pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint."""
    names = [
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ]
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    mod = sys.modules[names[-1]]

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    return ModelCheckpoint


def build(scale: float = 1.0, seed: int = 0) -> dict:
    """The checkpoint dict (needs torch)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    layout = read_layout(LAYOUTS / "sd1-ldm.yaml")
    sd: dict[str, torch.Tensor] = {}
    for key, (shape, dtype) in layout.items():
        if scale != 1.0 and not key.endswith("position_ids"):
            shape = tuple(max(1, round(s * scale)) if s > 8 else s for s in shape)
        dt = getattr(torch, dtype)
        if key.endswith("position_ids"):
            sd[key] = torch.arange(shape[-1], dtype=dt).reshape(shape)
        elif key == "model_ema.num_updates":
            sd[key] = torch.tensor(470000, dtype=dt)
        elif key == "model_ema.decay":
            sd[key] = torch.tensor(0.9999, dtype=dt)
        elif dt.is_floating_point:
            sd[key] = torch.empty(shape, dtype=dt).normal_(0, 0.02, generator=g)
        else:
            sd[key] = torch.zeros(shape, dtype=dt)
    mc = _fake_lightning()
    return {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {mc: {"monitor": None, "best_model_score": None, "best_model_path": ""}},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--legacy", action="store_true", help="torch's pre-1.6 5-pickle format")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink shapes (1.0 = real)")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out.with_name(a.out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if a.out.exists() and not a.force:
            print(f"{a.out} exists ({a.out.stat().st_size / 1e9:.2f} GB); reusing it")
            return
        import torch

        t0 = time.perf_counter()
        ckpt = build(a.scale)
        tmp = a.out.with_name(a.out.name + ".tmp")
        torch.save(ckpt, tmp, _use_new_zipfile_serialization=not a.legacy)
        tmp.replace(a.out)
        n = len(ckpt["state_dict"])
        print(
            f"wrote {a.out}: {n} tensors, {a.out.stat().st_size / 1e9:.2f} GB "
            f"in {time.perf_counter() - t0:.1f} s"
        )


if __name__ == "__main__":
    main()
