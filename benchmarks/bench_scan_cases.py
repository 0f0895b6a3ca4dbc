"""Detection on issue 12's new cases: sdtool beside picklescan, ModelScan and fickling.

Writes every case the tests build into a temporary folder, then runs each tool on every file
(each tool in its own process, through bench_scan.py's per-file drivers) and prints a table:

* malicious: every published bypass (tests/test_scan_advisories.py), the classes judged by
  capability (tests/test_scan_capabilities.py), the allowlisted callables that call an argument,
  and the parse-agreement attacks (tests/test_scan_agreement.py);
* benign: training artefacts built with the real libraries (tests/test_scan_benign.py shapes).

"flagged" is `dangerous` for sdtool, infected for picklescan, any issue for ModelScan, a severity
above LIKELY_SAFE for fickling. The other scanners live in a throwaway venv:
    python3 -m venv /tmp/scanners-venv
    /tmp/scanners-venv/bin/pip install picklescan modelscan fickling typing_extensions

Usage: python benchmarks/bench_scan_cases.py [--venv /tmp/scanners-venv] [--baseline /work/main]
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_scan import DRIVER, measure, table  # noqa: E402


def malicious_cases(out: Path) -> dict[str, str]:
    """name -> group, every malicious file written into ``out``."""
    from tests import test_scan_agreement as agree
    from tests import test_scan_capabilities as caps
    from tests.scan_payloads import (
        BINUNICODE,
        GLOBAL,
        PROTO,
        REDUCE,
        STACK_GLOBAL,
        STOP,
        TUPLE1,
        U,
        asm,
    )
    from tests.test_scan_advisories import ADVISORIES

    groups: dict[str, str] = {}
    for case in ADVISORIES:
        d = out / case.id
        d.mkdir()
        p = case.build(d)
        groups[str(p)] = "published bypasses"
    params = caps.test_classes_without_telltale_names_are_judged_by_capability
    for mark in params.pytestmark:  # type: ignore[attr-defined]
        if mark.name != "parametrize":
            continue
        for module, name, _ in mark.args[1]:
            data = asm(PROTO(4), U(module), U(name), STACK_GLOBAL, U("x"), TUPLE1, REDUCE, STOP)
            p = out / f"cap-{module}.{name}.pkl"
            p.write_bytes(data)
            groups[str(p)] = "capability (no telltale name)"
    for (module, name), args in caps.CALLS_ARG_PAYLOADS:
        p = out / f"callsarg-{module}.{name}.pkl"
        p.write_bytes(caps._call((module, name), *args))
        groups[str(p)] = "allowlisted callable calls an argument"
    body = asm(GLOBAL("os", "system"), BINUNICODE("id"), TUPLE1, REDUCE, STOP)
    agreement = {
        "string-escapes.pkl": b"S'\\157\\163'\nS'\\x73ystem'\n" + STACK_GLOBAL
        + BINUNICODE("id") + TUPLE1 + REDUCE + STOP,
        "no-proto.bin": asm(U("os"), U("system"), STACK_GLOBAL, U("id"), TUPLE1, REDUCE, STOP),
        "first-INT.bin": b"I1\n0" + body,
        "first-FLOAT.bin": b"F1.0\n0" + body,
        "first-NEWTRUE.bin": b"\x880" + body,
        "first-EMPTY_LIST.bin": b"]0" + body,
    }  # fmt: skip
    for name, data in agreement.items():
        p = out / name
        p.write_bytes(data)
        groups[str(p)] = "parse agreement"
    del agree
    return groups


def benign_cases(out: Path) -> list[str]:
    """Benign training artefacts built with the real libraries."""
    import joblib
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from transformers import TrainingArguments

    files: list[str] = []

    def save(name: str, obj: object) -> None:
        p = out / name
        torch.save(obj, p)
        files.append(str(p))

    save("training_args.bin", TrainingArguments(output_dir=str(out / "o"), report_to=[]))
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    save("optimizer.pt", opt.state_dict())
    save("rng.pt", {"torch": torch.get_rng_state(), "np": np.random.get_state()})
    dense = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    save("sparse.pt", {"coo": dense.to_sparse(), "csr": dense.to_sparse_csr()})
    save("quantized.pt", {"q": torch.quantize_per_tensor(dense, 0.1, 0, torch.qint8)})
    save("module.pt", torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    x = np.random.default_rng(0).normal(size=(20, 3))
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, (x[:, 0] > 0).astype(int))
    joblib.dump(pipe, out / "pipeline.joblib")
    (out / "pipeline.pkl").write_bytes(pickle.dumps(pipe, protocol=5))
    gen = {"g": np.random.default_rng(1), "m": np.matrix([[1, 2]])}
    (out / "numpy.pkl").write_bytes(pickle.dumps(gen, protocol=4))
    s = np.array(["a", "bc"], dtype=np.dtypes.StringDType())
    np.save(out / "strings.npy", s, allow_pickle=True)
    files += [str(out / n) for n in ("pipeline.joblib", "pipeline.pkl", "numpy.pkl", "strings.npy")]
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=Path("/tmp/scanners-venv"))
    ap.add_argument("--baseline", type=Path, help="another sdtool checkout to compare (its root)")
    args = ap.parse_args()
    tools = {"sdtool": (sys.executable, ROOT)}
    if args.baseline:
        tools[f"sdtool ({args.baseline.name})"] = (sys.executable, args.baseline)
    for t in ("picklescan", "modelscan", "fickling"):
        if (args.venv / "bin" / "python").exists():
            tools[t] = (str(args.venv / "bin" / "python"), ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        mal_dir, ben_dir = Path(tmp) / "malicious", Path(tmp) / "benign"
        mal_dir.mkdir()
        ben_dir.mkdir()
        groups = malicious_cases(mal_dir)
        benign = benign_cases(ben_dir)
        files = [*groups, *benign]
        names = sorted(set(groups.values()))
        rows = []
        for tool, (py, cwd) in tools.items():
            driver = tool.split(" ")[0]
            _, _, _, out = measure([py, "-c", DRIVER, driver, *files], cwd=cwd, timeout=1800)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            res = {r["file"]: r for r in map(json.loads, lines)}
            row = [tool]
            for g in names:
                mine = [f for f, gg in groups.items() if gg == g]
                row.append(f"{sum(res.get(f, {}).get('flagged', False) for f in mine)}/{len(mine)}")
            row.append(f"{sum(res.get(f, {}).get('flagged', False) for f in groups)}/{len(groups)}")
            row.append(f"{sum(res.get(f, {}).get('flagged', False) for f in benign)}/{len(benign)}")
            rows.append(row)
    table(
        "Detection on issue 12's new cases (flagged / cases)",
        ["tool", *names, "all malicious", "benign flagged"],
        rows,
    )


if __name__ == "__main__":
    main()
