"""The benign side stays clean (issue 12, item 7): real training artefacts, built with the real
libraries, are never dangerous, and the two parsers (opcode model, C unpickler) agree on them.
"""

from __future__ import annotations

import argparse
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdtool.scan import FileReport, scan


def _check(r: FileReport, *, safe: bool = False) -> None:
    assert r.verdict != "dangerous", [(f.rule, f.message) for f in r.findings]
    assert not [f for f in r.findings if f.rule == "parser-disagreement"]
    if safe:
        assert r.verdict == "safe", [(f.rule, f.message) for f in r.findings]


def _torch_save(tmp_path: Path, obj: Any, name: str = "x.pt", **kw: Any) -> Path:
    import torch

    p = tmp_path / name
    torch.save(obj, p, **kw)
    return p


@pytest.mark.slow
@pytest.mark.parametrize("hparams", ["argparse", "omegaconf"])
def test_lightning_checkpoint_with_hyper_parameters(tmp_path: Path, hparams: str) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    import torch
    from omegaconf import OmegaConf

    class Tiny(pl.LightningModule):
        def __init__(self, cfg: Any) -> None:
            super().__init__()
            self.save_hyperparameters(cfg)
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: Any, _: int) -> Any:
            return self.layer(batch[0]).sum()

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    cfg: Any = argparse.Namespace(lr=0.01, name="run")
    if hparams == "omegaconf":
        cfg = OmegaConf.create({"lr": 0.01, "model": {"width": 2}})
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[ckpt],
        accelerator="cpu",
    )
    trainer.fit(Tiny(cfg), data)
    for legacy in (False, True):
        path = tmp_path / "last.ckpt"
        if legacy:  # the same checkpoint in torch's legacy format
            obj = torch.load(path, weights_only=False)
            path = _torch_save(tmp_path, obj, "legacy.ckpt", _use_new_zipfile_serialization=False)
        _check(scan(path))


def test_hf_trainer_training_args(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[])
    _check(scan(_torch_save(tmp_path, args, "training_args.bin")))


@pytest.mark.parametrize("how", ["pickle", "joblib", "joblib-compressed"])
def test_sklearn_pipeline(tmp_path: Path, how: str) -> None:
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.random.default_rng(0).normal(size=(20, 3))
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, (x[:, 0] > 0).astype(int))
    p = tmp_path / "model.pkl"
    if how == "pickle":
        p.write_bytes(pickle.dumps(pipe, protocol=5))
    else:
        joblib.dump(pipe, p, compress=3 if how == "joblib-compressed" else 0)
    _check(scan(p))


def test_optimizer_state_and_whole_optimizer(tmp_path: Path) -> None:
    import torch

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    _check(scan(_torch_save(tmp_path, opt.state_dict(), "opt.pt")), safe=True)
    _check(scan(_torch_save(tmp_path, opt, "opt_obj.pt")))


def test_rng_states(tmp_path: Path) -> None:
    import torch

    states = {
        "torch": torch.get_rng_state(),
        "numpy_legacy": np.random.get_state(),
        "python": random.getstate(),
    }
    _check(scan(_torch_save(tmp_path, states, "rng.pt")), safe=True)
    for obj in (
        np.random.default_rng(1),
        np.random.Generator(np.random.Philox(2)),
        np.random.Generator(np.random.SFC64(3)),
        np.random.Generator(np.random.MT19937(4)),
        np.random.RandomState(5),
        np.random.SeedSequence(6),
    ):
        (tmp_path / "g.pkl").write_bytes(pickle.dumps(obj, protocol=4))
        _check(scan(tmp_path / "g.pkl"), safe=True)


def test_sparse_and_quantized_tensors(tmp_path: Path) -> None:
    import torch

    dense = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    objs = {
        "coo": dense.to_sparse(),
        "csr": dense.to_sparse_csr(),
        "q": torch.quantize_per_tensor(dense, 0.1, 0, torch.qint8),
        "qc": torch.quantize_per_channel(dense, torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), 0,
                                         torch.quint8),
    }  # fmt: skip
    for name, t in objs.items():
        _check(scan(_torch_save(tmp_path, {"t": t}, f"{name}.pt")))


def test_numpy_matrix_and_stringdtype(tmp_path: Path) -> None:
    m = np.matrix([[1, 2], [3, 4]])
    s = np.array(["a", "bc", "déf"], dtype=np.dtypes.StringDType())
    for proto in (2, 4, 5):
        (tmp_path / "m.pkl").write_bytes(pickle.dumps({"m": m, "s": s}, protocol=proto))
        _check(scan(tmp_path / "m.pkl"), safe=True)
    np.save(tmp_path / "s.npy", s, allow_pickle=True)
    _check(scan(tmp_path / "s.npy"), safe=True)


def test_whole_pickled_module(tmp_path: Path) -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten())
    r = scan(_torch_save(tmp_path, model, "model.pt"))
    _check(r)
    assert r.verdict == "suspicious"  # a whole module: classes are instantiated, not inert
