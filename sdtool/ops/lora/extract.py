"""``extract``: a LoRA from the difference of two checkpoints; ``resize``: a LoRA to a new rank.

Both are SVDs, module by module. extract at a fixed rank streams: the plan needs only the
shapes, so each module's matrix (``tuned - base`` rows of one weight) is factored when the
writer reaches its first factor and let go once both are written; memory is one module at a
time. A dynamic rank (and resize, whose inputs are small) factors every module while planning
and holds the factors until they are written.

Per module (kohya networks/extract_lora_from_models.py, resize_lora.py): a kxk conv is
flattened to [out, in*k*k] (1x1 squeezed); ``M = U S Vh``; keep ``r`` singular values;
``up = U_r diag(S_r)`` ([out, r] or [out, r, 1, 1]), ``down = Vh_r`` ([r, in] or
[r, in, k, k]). extract writes ``alpha = r`` (scale 1); resize keeps the module's scale:
``alpha = old_alpha / old_rank * r``. The rank (``choose_rank``) is ``rank`` (``conv_rank``
for kxk convs), or kohya's dynamic rules capped at it: ``sv_ratio``, ``sv_cumulative``,
``sv_fro``. ``clamp_quantile < 1`` clamps up and down to +-quantile(|values|) as kohya does
(1.0, the default, does not clamp, so extract-then-bake reproduces the difference up to
the rank).

SVD: torch.linalg.svd when torch is installed (numpy.linalg.svd otherwise); a fixed rank under
a quarter of the matrix's smaller side uses a randomized SVD (Halko et al., 8 extra columns,
2 power iterations, seeded: the same inputs give the same file).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sdtool import __version__, dtypes
from sdtool.dtypes import DType
from sdtool.errors import UsageError
from sdtool.formats.open import opened, path_of
from sdtool.layouts.lora import kohya_prefix
from sdtool.model import ModelFile, Storage, TensorInfo, contiguous_strides
from sdtool.ops.arith import PIECE, SCRATCH, WORKERS, Inputs, Overflows, write_result
from sdtool.ops.lora import math as lm
from sdtool.ops.lora.bake import base_index, pattern_alpha, peft_alphas
from sdtool.ops.lora.names import BaseTarget, ModuleId, parse_lora
from sdtool.results import JsonKey, Result, json_key, rounded
from sdtool.vocab import dtype_name
from sdtool.write import WriteOptions, options_from, output_format
from sdtool.write.atomic import check_output
from sdtool.write.plan import OutTensor

SCHEMA_EXTRACT = "sdtool.lora-extract/1"
SCHEMA_RESIZE = "sdtool.lora-resize/1"
#: kohya resize_lora's MIN_SV: a matrix whose largest singular value is below is "zero"
MIN_SV = 1e-6
DYNAMIC = ("sv_ratio", "sv_cumulative", "sv_fro")
OVERSAMPLE, POWER_ITERS = 8, 2
#: ss_base_model_version values kohya writes
MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl-base": "sdxl_base_v1-0"}
#: nn.Embedding weights (2-D, but no LoRA module adapts them)
EMBEDDING = re.compile(r"(token|position|positional)_embedding|embed_tokens|(^|\.)shared\.weight$")
#: families whose kohya UNet LoRAs use diffusers module paths (library/original_unet.py)
DIFFUSERS_NAMED_UNET = ("sd1", "sd2")


def choose_rank(s: np.ndarray, rank: int, method: str | None, param: float | None) -> int:
    """How many singular values to keep (kohya resize_lora's rank_resize, exactly).

    ``s``: singular values, descending. Dynamic methods: ``sv_ratio`` keeps those above
    s[0] / param; ``sv_cumulative`` up to the fraction ``param`` of their sum; ``sv_fro`` up
    to the fraction ``param`` of the Frobenius norm; each index clamped to [1, len(s) - 1] and
    then +1 (kohya's formula), capped at ``rank``. A zero matrix keeps 1.
    """
    n = len(s)
    if n == 0 or s[0] <= MIN_SV:
        return 1
    if method is None:
        k = rank
    else:
        assert param is not None
        if method == "sv_ratio":
            index = int(np.sum(s > s[0] / param))
        elif method == "sv_cumulative":
            index = int(np.searchsorted(np.cumsum(s) / np.sum(s), param)) + 1
        else:
            sq = np.square(s.astype(np.float64))
            index = int(np.searchsorted(np.cumsum(sq) / np.sum(sq), param**2)) + 1
        k = max(1, min(index, n - 1)) + 1
    return max(1, min(k, rank, n))


def svd(m: np.ndarray, rank: int | None, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(U, S, Vh) of the float32 matrix ``m``; truncated/randomized when ``rank`` is small."""
    small = min(m.shape)
    if rank is not None and rank * 4 < small and small > 64:
        return _randomized(m, rank, seed)
    torch = lm._torch()
    if torch is None:
        u, s, vh = np.linalg.svd(m, full_matrices=False)
        return u.astype(np.float32), s.astype(np.float32), vh.astype(np.float32)
    u, s, vh = torch.linalg.svd(torch.from_numpy(np.ascontiguousarray(m)), full_matrices=False)
    return u.numpy(), s.numpy(), vh.numpy()


def _randomized(m: np.ndarray, rank: int, seed: int) -> tuple[np.ndarray, ...]:
    """Halko, Martinsson & Tropp: range of m @ G, power iterations, SVD of the small matrix
    (torch's kernels when installed; G from numpy's seeded generator either way)."""
    rng = np.random.default_rng(seed)
    k = min(rank + OVERSAMPLE, min(m.shape))
    g = rng.standard_normal((m.shape[1], k)).astype(np.float32)
    torch = lm._torch()
    if torch is not None:
        tm_ = torch.from_numpy(np.ascontiguousarray(m, np.float32))
        tq, _ = torch.linalg.qr(tm_ @ torch.from_numpy(g))
        for _ in range(POWER_ITERS):
            tq, _ = torch.linalg.qr(tm_.T @ tq)
            tq, _ = torch.linalg.qr(tm_ @ tq)
        tub, ts, tvh = torch.linalg.svd(tq.T @ tm_, full_matrices=False)
        return (tq @ tub).numpy(), ts.numpy(), tvh.numpy()
    q, _ = np.linalg.qr(m @ g)
    for _ in range(POWER_ITERS):
        q, _ = np.linalg.qr(m.T @ q)
        q, _ = np.linalg.qr(m @ q)
    ub, s, vh = np.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub).astype(np.float32), s.astype(np.float32), vh.astype(np.float32)


def factor(
    m: np.ndarray,
    *,
    rank: int,
    method: str | None,
    param: float | None,
    clamp_quantile: float,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """up [out, r], down [r, in], r, and the Frobenius fraction kept, for the matrix ``m``."""
    u, s, vh = svd(m, rank if method is None else None, seed)
    r = choose_rank(s, rank, method, param)
    up = u[:, :r] * s[:r][None, :]
    down = vh[:r]
    if clamp_quantile < 1:
        hi = np.float32(
            np.quantile(np.concatenate([up.reshape(-1), down.reshape(-1)]), clamp_quantile)
        )
        up = np.clip(up, -hi, hi)
        down = np.clip(down, -hi, hi)
    sq = np.square(s.astype(np.float64))
    kept = float(np.sqrt(sq[:r].sum() / sq.sum())) if sq.sum() > 0 else 1.0
    return np.ascontiguousarray(up), np.ascontiguousarray(down), r, kept


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleReport:
    name: str  # the LoRA module name written
    source: str  # the base key (extract) or the input stem (resize)
    rank: int
    old_rank: int | None = None
    fro_kept: float | None = None


@dataclass(frozen=True)
class LoraOpResult(Result):
    """What extract / resize wrote. ``to_json`` is docs/lora.md's schema."""

    JSON_KEYS: ClassVar[tuple[JsonKey, ...]] = (
        "schema", "inputs", "output", "rank", "conv_rank", "method", "param", "dtype",
        "dry_run", "modules", "zero", "not_targets", "skipped", "metadata", "output_bytes",
        "verified", "seconds",
    )  # fmt: skip

    schema: str
    inputs: list[Path]
    output: Path
    rank: int
    conv_rank: int
    method: str | None
    param: float | None
    dtype: str
    modules: list[ModuleReport] = field(default_factory=list)
    zero: list[str] = field(default_factory=list)  # layers whose difference is zero
    not_targets: list[str] = field(default_factory=list)  # changed, but no LoRA module
    skipped: dict[str, str] = field(default_factory=dict)  # key or stem -> why
    metadata: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False
    overflows: dict[str, int] = field(default_factory=dict)
    output_bytes: int = 0
    verified: bool = False
    seconds: float = field(default=0.0, metadata=json_key(as_=rounded))


# -- extract --------------------------------------------------------------------------------


def _dynamic(
    sv_ratio: float | None, sv_fro: float | None, sv_cumulative: float | None
) -> tuple[str | None, float | None]:
    given = [
        (n, v)
        for n, v in zip(DYNAMIC, (sv_ratio, sv_cumulative, sv_fro), strict=True)
        if v is not None
    ]
    if len(given) > 1:
        raise UsageError("give at most one of sv_ratio=..., sv_cumulative=..., sv_fro=...")
    if not given:
        return None, None
    name, value = given[0]
    if name == "sv_ratio" and value <= 1:
        raise UsageError(f"sv_ratio={value} must be above 1 (largest / smallest kept)")
    if name != "sv_ratio" and not 0 < value <= 1:
        raise UsageError(f"{name}={value} must be in (0, 1]")
    return name, value


def extract_targets(
    base: ModelFile, *, conv: bool
) -> tuple[dict[str, tuple[str, BaseTarget]], dict[str, str]]:
    """LoRA module name (kohya) -> (base key, target) for every extractable weight, and the
    weights left out with the reason. Names follow what kohya writes for the family: diffusers
    module paths for SD 1.x/2.x UNets, the checkpoint's own (ldm/BFL/SAI) paths otherwise, HF
    paths for text encoders (OpenCLIP's fused q/k/v as three modules)."""
    from sdtool.identify import identify

    family = identify(base).architecture
    index = base_index(base)
    by_key: dict[str, list[tuple[ModuleId, BaseTarget]]] = {}
    for mid, target in index.items():
        by_key.setdefault(target.key, []).append((mid, target))
    te_count = len({mid[0] for mid, _ in index.items() if mid[0] != "unet"})
    out: dict[str, tuple[str, BaseTarget]] = {}
    left: dict[str, str] = {}
    for key, cands in by_key.items():
        info = base.tensors[key]
        if not info.dtype.is_float or len(info.shape) not in (2, 4):
            continue
        if EMBEDDING.search(key):
            left[key] = "an embedding, not a Linear/Conv"
            continue
        if len(info.shape) == 4 and info.shape[2:] != (1, 1) and not conv:
            left[key] = "a kxk conv (extracted only with a conv rank above 0)"
            continue
        comp = cands[0][0][0]
        native = [c for c in cands if c[1].via == "native"]
        # kohya names SD 1.x/2.x UNet modules by diffusers paths, everything else by the
        # checkpoint's own paths; text encoders without HF names (OpenCLIP) by their HF names
        if (comp == "unet" and family in DIFFUSERS_NAMED_UNET) or not native:
            chosen = [c for c in cands if c[1].via != "native"] or cands
        else:
            chosen = native
        chosen.sort(key=lambda c: c[1].rows or (0, 0))
        seen_rows: set[tuple[int, int] | None] = set()
        for (cp, path), target in chosen:
            if target.rows in seen_rows:
                continue
            seen_rows.add(target.rows)
            out[kohya_prefix(None, cp, te_count == 1) + "_" + path] = (key, target)
    return out, left


def _info(shape: tuple[int, ...], dtype: DType, key: str) -> TensorInfo:
    """A TensorInfo for a computed tensor (no bytes in any file)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return TensorInfo(dtype, shape, contiguous_strides(shape), 0, Storage(key, dtype, nbytes))


class _Pairs:
    """A module's (up, down) factors, handed to their two output tensors: given, or computed
    by ``compute`` when the writer asks for the first of them and let go once both were
    taken (computed again if asked again, e.g. by verify)."""

    def __init__(
        self,
        up: np.ndarray | None = None,
        down: np.ndarray | None = None,
        compute: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
        name: str = "",
    ) -> None:
        self.name = name
        self.value = None if up is None or down is None else (up, down)
        self.compute = compute
        self.ahead: _Ahead | None = None
        self.index = 0
        self.taken: set[int] = set()
        self.lock = threading.Lock()

    def take(self, i: int) -> np.ndarray:
        with self.lock:
            if self.value is None:
                assert self.compute is not None
                self.value = self.compute() if self.ahead is None else self.ahead.get(self)
            v = self.value[i]
            if self.compute is not None:
                self.taken.add(i)
                if len(self.taken) == 2:
                    self.value, self.taken = None, set()
            return v


class _Ahead:
    """Factors the module the writer asks for and the next one at once, on ``WORKERS``
    threads with torch's own threads at 1: small QRs and SVDs on BLAS threads cost ~100x
    their work in thread hand-offs (measured), whole modules in parallel use both cores.
    At most ``WORKERS`` modules' factors are in memory."""

    def __init__(self) -> None:
        self.order: list[_Pairs] = []
        self.futures: dict[int, Future[tuple[np.ndarray, np.ndarray]]] = {}
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None

    def add(self, pair: _Pairs) -> None:
        pair.ahead, pair.index = self, len(self.order)
        self.order.append(pair)

    def get(self, pair: _Pairs) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            assert self.pool is not None
            for p in self.order[pair.index : pair.index + WORKERS]:
                if id(p) not in self.futures and p.compute is not None:
                    self.futures[id(p)] = self.pool.submit(p.compute)
            f = self.futures.pop(id(pair))
        return f.result()

    @contextmanager
    def running(self, names: list[str]) -> Iterator[None]:
        """Workers (and torch at one thread) for the block; ``names``: the modules in the
        order the writer reaches them."""
        rank = {n: i for i, n in enumerate(names)}
        self.order.sort(key=lambda p: rank.get(p.name, len(rank)))
        for i, p in enumerate(self.order):
            p.index = i
        torch = lm._torch()
        before = torch.get_num_threads() if torch is not None else 0
        if torch is not None:
            torch.set_num_threads(1)
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="sdtool-svd")
        try:
            yield
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
            self.futures.clear()
            if torch is not None:
                torch.set_num_threads(before)


def _factor_later(
    tm: ModelFile,
    bm: ModelFile,
    key: str,
    rows: tuple[int, int] | None,
    io: Inputs,
    r: int,
    clamp_quantile: float,
    kept: dict[str, float],
) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """The factors of ``tuned - base`` (``rows`` of ``key``) at the fixed rank ``r``: a matrix
    whose largest singular value is below MIN_SV gets rank 1 from ``choose_rank``, padded
    with zero columns / rows to ``r`` (the same product)."""

    def full() -> np.ndarray:
        diff = _diff_rows(tm, bm, key, rows, io)
        return diff.reshape(diff.shape[0], -1)

    return _refactor_later(full, r, clamp_quantile, kept, key)


FP16 = dtypes.from_code("F16")  # extract's default: the dtype LoRAs are shared in


@dataclass(frozen=True, kw_only=True)
class LoraResizeOptions(WriteOptions):
    """resize's options: the write options, and the rank rule (below)."""

    rank: int = 8
    conv_rank: int | None = None  # None: ``rank``
    sv_ratio: float | None = None
    sv_fro: float | None = None
    sv_cumulative: float | None = None
    clamp_quantile: float = 1.0


@dataclass(frozen=True, kw_only=True)
class LoraExtractOptions(LoraResizeOptions):
    """extract's options: resize's, with extract's defaults (rank 32, kxk convs left out,
    an fp16 LoRA)."""

    rank: int = 32
    conv_rank: int | None = 0
    dtype: DType | None = FP16


def extract(
    tuned: str | Path | ModelFile,
    base: str | Path | ModelFile,
    out: str | Path,
    options: LoraExtractOptions | None = None,
    **changes: Any,
) -> LoraOpResult:
    """Extract a kohya-format LoRA of ``tuned - base`` into ``out``.

    ``tuned`` and ``base`` are paths or opened ModelFiles (left open); ``options`` is a
    LoraExtractOptions, or its fields as keywords:

    Args:
        rank: the rank (the cap, with a dynamic method) of Linear and 1x1 conv modules.
        conv_rank: the same for kxk convs; 0 leaves them out (kohya's default).
        sv_ratio / sv_fro / sv_cumulative: a dynamic rank, as kohya's resize defines them.
        clamp_quantile: clamp the factors at this quantile (kohya: 0.99); 1.0 does not clamp.
        dtype: the LoRA's dtype (fp16, bf16, fp32).

    A layer whose difference is exactly zero is left out and listed in ``zero``; changed
    weights no LoRA module covers (norms, embeddings, kxk convs without a conv rank) are listed
    in ``not_targets``.
    """
    t0 = time.perf_counter()
    o = options_from(LoraExtractOptions, options, changes)
    rank, conv_rank, clamp_quantile = o.rank, o.conv_rank or 0, o.clamp_quantile
    dtype, overwrite, dry_run = o.dtype, o.overwrite, o.dry_run
    method, param = _dynamic(o.sv_ratio, o.sv_fro, o.sv_cumulative)
    _check_ranks(rank, conv_rank, clamp_quantile)
    target_dt = _dtype(dtype)
    tuned_p, base_p, out = path_of(tuned), path_of(base), Path(out)
    output_format(out)
    if not dry_run:
        check_output(out, inputs=[tuned_p, base_p], overwrite=overwrite)
    with ExitStack() as stack:
        tm = stack.enter_context(opened(tuned))
        bm = stack.enter_context(opened(base))
        io = stack.enter_context(Inputs())
        targets, left = extract_targets(bm, conv=conv_rank > 0)
        result = LoraOpResult(
            SCHEMA_EXTRACT, [tuned_p, base_p], out, rank, conv_rank, method, param,
            dtype_name(target_dt.code),
            dry_run=dry_run,
        )  # fmt: skip
        plan: list[OutTensor] = []
        keys_done: set[str] = set()
        ahead = _Ahead()
        kept: dict[str, float] = {}  # source -> share of the norm kept (fixed rank)
        for name, (key, target) in targets.items():
            if key not in tm.tensors or tm.tensors[key].shape != bm.tensors[key].shape:
                why = "not in TUNED" if key not in tm.tensors else "TUNED has another shape"
                result.skipped[key] = why
                continue
            keys_done.add(key)
            if not _differs(tm, bm, key, target.rows, io):
                result.zero.append(name)
                continue
            info = bm.tensors[key]
            kxk = len(info.shape) == 4 and info.shape[2:] != (1, 1)
            r_cap = conv_rank if kxk else rank
            if method is None:
                # a fixed rank: the shapes are known, the SVD waits for the writer (one
                # module's factors in memory at a time)
                rows = info.shape[0] if target.rows is None else target.rows[1] - target.rows[0]
                r = min(r_cap, rows, prod(info.shape[1:]))
                result.modules.append(ModuleReport(name, key, r))
                if dry_run:
                    continue
                later = _factor_later(tm, bm, key, target.rows, io, r, clamp_quantile, kept)
                up_shape, down_shape = _factor_shapes(info.shape, target.rows, r)
                pair = _Pairs(compute=later, name=name)
                ahead.add(pair)
                plan += _module_plan(name, tm, pair, up_shape, down_shape, r, float(r), target_dt)
                continue
            diff = _diff_rows(tm, bm, key, target.rows, io)
            mat = diff.reshape(diff.shape[0], -1)
            del diff
            # the rank is known only after the SVD: factor now (dry runs too), write later
            up, down, r, share = factor(
                mat, rank=r_cap, method=method, param=param, clamp_quantile=clamp_quantile
            )
            del mat
            result.modules.append(ModuleReport(name, key, r, fro_kept=round(share, 6)))
            if dry_run:
                continue
            up_shape, down_shape = _factor_shapes(info.shape, target.rows, r)
            pair = _Pairs(up, down)
            plan += _module_plan(name, tm, pair, up_shape, down_shape, r, float(r), target_dt)
        for key in tm.tensors:
            if key in keys_done or key not in bm.tensors or key in result.skipped:
                continue
            if tm.tensors[key].dtype.is_float and _differs(tm, bm, key, None, io):
                result.not_targets.append(key + (f" ({left[key]})" if key in left else ""))
        from sdtool.identify import identify

        family = identify(bm).architecture
        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": "Dynamic" if method else str(rank),
            "ss_network_alpha": "Dynamic" if method else str(float(rank)),
            "ss_network_args": json.dumps(
                {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))}
                if conv_rank
                else {}
            ),
            "ss_v2": str(family == "sd2"),
            "ss_base_model_version": MODEL_VERSION.get(family or "", family or "unknown"),
            "sdtool_lora_extract": json.dumps(
                {
                    "sdtool_version": __version__,
                    "tuned": tuned_p.name,
                    "base": base_p.name,
                    "rank": rank,
                    "conv_rank": conv_rank,
                    "method": method,
                    "param": param,
                    "clamp_quantile": clamp_quantile,
                }
            ),
        }
        result = replace(result, metadata=meta)
        # the writer reaches the factors in safetensors' order: by name
        with ahead.running(sorted(p.name for p in ahead.order)):
            return _finish(result, plan, kept, out, meta, o, t0)


def _check_ranks(rank: int, conv_rank: int, clamp_quantile: float) -> None:
    if rank < 1:
        raise UsageError(f"rank={rank} must be at least 1")
    if conv_rank < 0:
        raise UsageError(f"conv_rank={conv_rank} must be 0 (no convs) or more")
    if not 0 < clamp_quantile <= 1:
        raise UsageError(f"clamp_quantile={clamp_quantile} must be in (0, 1]")


def _dtype(dtype: DType | None) -> DType:
    if dtype is None:
        raise UsageError("dtype='keep' is not a dtype for a LoRA (fp16, bf16, fp32)")
    return dtype


def _diff_rows(
    tm: ModelFile, bm: ModelFile, key: str, rows: tuple[int, int] | None, io: Inputs
) -> np.ndarray:
    a, b = io.whole(tm, key), io.whole(bm, key)
    if rows is not None:
        a, b = a[rows[0] : rows[1]], b[rows[0] : rows[1]]
    return a - b


def _differs(
    tm: ModelFile, bm: ModelFile, key: str, rows: tuple[int, int] | None, io: Inputs
) -> bool:
    """Whether ``key`` (its ``rows``) differs in value between TUNED and BASE (another shape
    counts as a difference; +0 equals -0), read piece by piece into reused buffers."""
    ti, bi = tm.tensors[key], bm.tensors[key]
    if ti.shape != bi.shape:
        return True
    per = prod(ti.shape[1:]) if ti.shape else 1
    start, stop = (0, ti.numel) if rows is None else (rows[0] * per, rows[1] * per)
    for s in range(start, stop, PIECE):
        c = min(PIECE, stop - s)
        a = io.f32_into(tm, key, s, SCRATCH.f32(0, c), 0)
        b = io.f32_into(bm, key, s, SCRATCH.f32(1, c), 1)
        if not np.array_equal(a, b):
            return True
    return False


def _factor_shapes(
    shape: tuple[int, ...], rows: tuple[int, int] | None, r: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out = shape[0] if rows is None else rows[1] - rows[0]
    if len(shape) == 4:
        return (out, r, 1, 1), (r, *shape[1:])
    return (out, r), (r, *shape[1:])


def _module_plan(
    name: str,
    src: ModelFile,
    pair: _Pairs,
    up_shape: tuple[int, ...],
    down_shape: tuple[int, ...],
    r: int,
    alpha: float,
    dt: DType,
    up_key: str = ".lora_up.weight",
    down_key: str = ".lora_down.weight",
) -> list[OutTensor]:
    from sdtool.ops.arith import Output

    def make(i: int, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            o = Output(shape, dt)
            o.put(0, pair.take(i))
            return o.array()

        return run

    f32 = dtypes.from_code("F32")
    return [
        OutTensor(name + up_key, src, _info(up_shape, dt, name), dt, make(0, up_shape)),
        OutTensor(name + down_key, src, _info(down_shape, dt, name), dt, make(1, down_shape)),
        OutTensor(
            name + ".alpha",
            src,
            _info((), f32, name),
            f32,
            lambda: np.array(alpha, np.float32),
        ),
    ]


def _finish(
    result: LoraOpResult,
    plan: list[OutTensor],
    kept: dict[str, float],
    out: Path,
    meta: dict[str, str],
    o: WriteOptions,
    t0: float,
) -> LoraOpResult:
    """Write the plan with the write options (``overwrite``, ``verify``, ``on_overflow``,
    ``progress``); the result with its output fields."""
    if result.dry_run:
        return replace(result, seconds=time.perf_counter() - t0)
    if not plan:
        raise UsageError("nothing to write: no module has a non-zero difference")
    done = write_result(
        result, plan, out, t0, metadata=meta, overwrite=o.overwrite, verify=o.verify,
        overflows=Overflows(o.on_overflow), progress=o.progress,
    )  # fmt: skip
    # fixed-rank modules were factored while writing: their kept share is known now
    modules = [replace(m, fro_kept=kept.get(m.source, m.fro_kept)) for m in done.modules]
    return replace(done, modules=modules)


# -- resize ---------------------------------------------------------------------------------


def resize(
    src: str | Path | ModelFile,
    out: str | Path,
    options: LoraResizeOptions | None = None,
    **changes: Any,
) -> LoraOpResult:
    """Resize every LoRA/LoCon module of ``src`` to ``rank`` (convs: ``conv_rank``, default
    ``rank``) by SVD of ``up @ down``, keeping each module's scale (kohya resize_lora).

    Module names and up/down key spellings stay as they were; ``.alpha`` is written for every
    module (``old_alpha / old_rank * new_rank``; no alpha: the old scale 1 or PEFT's
    lora_alpha / r). LoHa / LoKr / full-diff modules are copied unchanged and listed in
    ``skipped``; other keys are copied as they are. ``src`` is a path or an opened ModelFile
    (left open); ``options`` a LoraResizeOptions, or its fields as keywords.
    """
    t0 = time.perf_counter()
    o = options_from(LoraResizeOptions, options, changes)
    rank, clamp_quantile = o.rank, o.clamp_quantile
    conv_rank = rank if o.conv_rank is None else o.conv_rank
    dtype, overwrite, dry_run = o.dtype, o.overwrite, o.dry_run
    method, param = _dynamic(o.sv_ratio, o.sv_fro, o.sv_cumulative)
    _check_ranks(rank, conv_rank, clamp_quantile)
    src_p, out = path_of(src), Path(out)
    output_format(out)
    if not dry_run:
        check_output(out, inputs=[src_p], overwrite=overwrite)
    with ExitStack() as stack:
        lm_ = stack.enter_context(opened(src))
        io = stack.enter_context(Inputs())
        parsed = parse_lora(lm_.tensors)
        peft_alpha, pattern = peft_alphas(lm_)
        result = LoraOpResult(
            SCHEMA_RESIZE, [src_p], out, rank, conv_rank, method, param,
            dtype_name(None if dtype is None else dtype.code),
            dry_run=dry_run,
        )  # fmt: skip
        plan: list[OutTensor] = []
        done: set[str] = set()
        ahead = _Ahead()
        kept: dict[str, float] = {}  # source -> share of the norm kept (fixed rank)
        for stem, mod in parsed.modules.items():
            if mod.kind != "lora":
                result.skipped[stem] = f"a {mod.kind} module: copied unchanged"
                continue
            k_up, k_down = mod.keys["up"], mod.keys["down"]
            up_i, down_i = lm_.tensors[k_up], lm_.tensors[k_down]
            old_rank = down_i.shape[0]
            if "mid" in mod.keys:
                kernel = lm_.tensors[mod.keys["mid"]].shape[2:]
                shape = (up_i.shape[0], prod(down_i.shape[1:]), *kernel)
            else:
                shape = (up_i.shape[0], *down_i.shape[1:])
            if "alpha" in mod.keys:
                old_alpha = float(io.f32(lm_, mod.keys["alpha"]).reshape(-1)[0])
            elif peft_alpha is not None:
                old_alpha = pattern_alpha(stem, pattern, peft_alpha)
            else:
                old_alpha = float(old_rank)
            kxk = len(shape) == 4 and shape[2:] != (1, 1)
            cap = conv_rank if kxk else rank
            full_of = _full_later(lm_, mod.keys, io, shape)
            done.update(mod.keys.values())
            dt = _dtype(dtype) if dtype else up_i.dtype
            up_key, down_key = k_up[len(stem) :], k_down[len(stem) :]
            if method is None:
                # a fixed rank: the shapes are known, the SVD waits for the writer (one
                # module's factors in memory at a time, as extract)
                r = min(cap, shape[0], prod(shape[1:]))
                result.modules.append(ModuleReport(stem, stem, r, old_rank))
                if dry_run:
                    continue
                later = _refactor_later(full_of, r, clamp_quantile, kept, stem)
                pair = _Pairs(compute=later, name=stem)
                ahead.add(pair)
            else:
                # the rank is known only after the SVD: factor now (dry runs too), write later
                upn, downn, r, share = factor(
                    full_of(), rank=cap, method=method, param=param, clamp_quantile=clamp_quantile
                )
                result.modules.append(ModuleReport(stem, stem, r, old_rank, round(share, 6)))
                if dry_run:
                    continue
                pair = _Pairs(upn, downn)
            up_shape = (shape[0], r, 1, 1) if len(shape) == 4 else (shape[0], r)
            down_shape = (r, *shape[1:])
            plan += _module_plan(
                stem, lm_, pair, up_shape, down_shape, r, old_alpha / old_rank * r, dt,
                up_key=up_key, down_key=down_key,
            )  # fmt: skip
        for key, info in lm_.tensors.items():
            if key not in done:
                plan.append(OutTensor(key, lm_, info, info.dtype))
        meta = dict(lm_.metadata)
        meta.setdefault("format", "pt")
        if any(k.startswith("ss_") for k in meta):
            alphas = {str(t.make()) for t in plan if t.name.endswith(".alpha") and t.make}
            meta["ss_network_dim"] = "Dynamic" if method else str(rank)
            meta["ss_network_alpha"] = alphas.pop() if len(alphas) == 1 else "Dynamic"
        meta["sdtool_lora_resize"] = json.dumps(
            {"sdtool_version": __version__, "rank": rank, "conv_rank": conv_rank,
             "method": method, "param": param, "clamp_quantile": clamp_quantile}
        )  # fmt: skip
        result = replace(result, metadata=meta)
        # the writer reaches the factors in safetensors' order: by name
        with ahead.running(sorted(p.name for p in ahead.order)):
            return _finish(result, plan, kept, out, meta, o, t0)


def _full_later(
    m: ModelFile, keys: dict[str, str], io: Inputs, shape: tuple[int, ...]
) -> Callable[[], np.ndarray]:
    """``up @ down`` of a LoRA/LoCon module (through ``mid`` for a Tucker LoCon), as the
    matrix [out, in * k * k], read when called."""

    def run() -> np.ndarray:
        up, down = io.whole(m, keys["up"]), io.whole(m, keys["down"])
        old_rank = down.shape[0]
        if "mid" in keys:
            mid = io.whole(m, keys["mid"])
            full = lm.einsum(
                "ijkl,oi,jm->omkl", mid, up.reshape(shape[0], -1), down.reshape(old_rank, -1)
            )
        elif len(down.shape) == 4 and down.shape[2:] != (1, 1):
            full = lm.conv_updown(up, down)
        else:
            full = lm.mm(up.reshape(up.shape[0], -1), down.reshape(old_rank, -1))
        return full.reshape(shape[0], -1)

    return run


def _refactor_later(
    full_of: Callable[[], np.ndarray],
    r: int,
    clamp_quantile: float,
    kept: dict[str, float],
    source: str,
) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """The factors of ``full_of()`` at the fixed rank ``r`` (padded with zeros to ``r`` when
    the product is zero: the same product); the share of the norm kept goes to
    ``kept[source]`` (the module's report is made once the writer has run)."""

    def run() -> tuple[np.ndarray, np.ndarray]:
        up, down, got, share = factor(
            full_of(), rank=r, method=None, param=None, clamp_quantile=clamp_quantile
        )
        kept[source] = round(share, 6)
        if got < r:
            up = np.pad(up, ((0, 0), (0, r - got)))
            down = np.pad(down, ((0, r - got), (0, 0)))
        return up, down

    return run
