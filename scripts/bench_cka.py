"""Benchmark: repsim's CKA engine against peer libraries from PyPI, and against this machine's GEMM throughput.

    python scripts/bench_cka.py                 # 12 layers, n = 2048, dim 768, batch 256 (~2 min on 2 idle cores)
    python scripts/bench_cka.py --quick         # small smoke run (~30 s)
    python scripts/bench_cka.py --threads 1     # steadier timings when other processes share the cores
    python scripts/bench_cka.py --offset 10     # large feature means: shows the float32 peers' cancellation error
    python scripts/bench_cka.py --profile       # also: where repsim's minibatch time goes (torch.profiler)

What is measured
----------------
All implementations see the *same activations*: ``--layers`` synthetic float32 layers of ``--n`` samples and
``--dim`` features (a seeded "residual stream": each layer adds a nonlinear update, so neighbouring layers are
similar and distant ones less; every layer has a per-feature mean offset, as real activations do). The task is
the within-model ``L × L`` CKA map.

Minibatch CKA (Nguyen, Raghu & Kornblith 2021: unbiased HSIC₁ per minibatch, accumulated over batches) on the
*same batches*: the plan ``cka_matrix`` draws for an in-memory store with chunks of 64 rows (``batch_plan`` with
``np.random.default_rng([seed, 0])``). With ``n`` a multiple of ``--batch`` every batch holds exactly ``--batch``
rows, so repsim's sum form and the peers' sum-of-HSIC / mean-of-HSIC forms are the same estimator.

  repsim  MinibatchCKA.update_features   one Gram per layer per batch, all pairs from one product of the stacked
                                         U-centred Grams (the engine's hot path)
  repsim  cka_matrix(store)              the production path: the same, plus reading rows from an in-memory store
  repsim  minibatch_cka (pairwise API)   one call per pair i <= j; draws its own batches (one row per chunk), so
                                         its values are compared with the float64 reference on *its* batches only
  peers   torch-cka, pytorch-cka,        through their own public entry points: hooked "tap" models whose layer i
          cka-pytorch                    outputs the precomputed activations of layer i for the batch's sample
                                         indices, fed by a DataLoader that yields the same index batches
          ckatorch                       its ``cka_batch`` (its minibatch core) per pair on the stacked batches
                                         (its ``CKA`` class cannot be used as-is: it keeps only the last batch of
                                         each epoch and needs (B, tokens, dim) inputs)

Exact (biased, full-data) linear CKA: repsim ``cka_matrix(estimator="exact")`` (one n × n Gram per layer), repsim
``cka`` per pair and ckatorch ``cka_base`` per pair. The per-pair APIs run on ``--exact-pairs`` pairs and their
time is scaled to the L(L+1)/2 unique pairs of the map (marked ``*``): every pair has the same shapes and cost.

References: a float64 numpy implementation of each estimator, written independently of repsim (the HSIC₁ trace
formula of Song et al. 2012 for the minibatch estimator; centred Grams for the exact one), on the same batches.

GEMM: torch.matmul float32 GFLOP/s measured here on matrices shaped like the Gram work ((batch × dim) @ (dim ×
batch)), interleaved with repsim's timed runs so both see the same machine load. "Gram work" is 2·m²·dim FLOPs
per layer per batch for X Xᵀ plus 2·L²·m² for the pair product; repsim's achieved rate is that over its wall time.

How to read the table
---------------------
``wall s``: best of ``--rounds`` runs for the fast implementations (repsim, pytorch-cka, GEMM, interleaved round
by round), best of ``--slow-repeats`` for the slow ones. ``× repsim``: peer time / repsim time (> 1: repsim is
faster; minibatch rows are divided by the MinibatchCKA row, exact rows by the exact cka_matrix row).
``Δ repsim``: max |value - repsim's value| over all L × L entries (same estimator, same batches; over the timed
pairs for ``*`` rows); ``Δ f64``: the same against the float64 reference. Ratios are only meaningful within one
run: the machine is shared and noisy (load average printed; with 2 threads and a busy second core, torch's
parallel regions stall and times swing by up to 10×).

The float32 peers form Grams of *uncentred* features, so their error grows with the features' mean offset
(|Δ| ≈ 5e-5 at ``--offset 1``, ≈ 0.3 at ``--offset 10``); repsim centres each batch before the Gram.

Peers are not project dependencies: a peer that is not installed is skipped with a note. They install without
touching torch/numpy: ``pip install --no-deps torch-cka ckatorch pytorch-cka cka-pytorch`` (cka-pytorch also needs
``torchmetrics lightning lightning-utilities``; ckatorch and cka-pytorch import seaborn for plotting only, so a
stand-in module is registered when seaborn is absent).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("TQDM_DISABLE", "1")  # peers' progress bars (torch-cka has no switch)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from repsim.measures.cka_engine import MinibatchCKA, batch_plan, cka, cka_matrix, minibatch_cka  # noqa: E402

CHUNK = 64  # rows per chunk of the in-memory store (a typical store layout)


# ----------------------------------------------------------------------------------------------------
# Activations, batches, an in-memory store
# ----------------------------------------------------------------------------------------------------


def make_activations(n: int, dim: int, layers: int, seed: int, offset: float) -> list[np.ndarray]:
    """``layers`` float32 arrays (n, dim): a residual stream h ← h + tanh(2 h W_l) + noise, normalised per layer,
    plus a per-feature mean offset (N(0, offset²) per feature, feature std ≈ 1). Anisotropic spectrum."""
    g = torch.Generator().manual_seed(seed)
    spec = (1 + torch.arange(dim, dtype=torch.float32)) ** -0.5
    h = torch.randn(n, dim, generator=g) * spec
    h = h / h.std()
    out = []
    for _ in range(layers):
        w = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
        noise = torch.randn(n, dim, generator=g) * spec * (math.sqrt(dim) / spec.norm())
        h = h + torch.tanh(2 * h @ w) + 0.3 * noise
        h = h / h.std()
        out.append((h + offset * torch.randn(dim, generator=g)).numpy().astype(np.float32))
    return out


def store_plan(n: int, batch: int, seed: int) -> list[np.ndarray]:
    """The batches ``cka_matrix`` forms for repeat 0 on a store of ``CHUNK``-row chunks (documented plan rule)."""
    chunks = [np.arange(c * CHUNK, min((c + 1) * CHUNK, n)) for c in range(-(-n // CHUNK))]
    return [b for g in batch_plan(chunks, batch, np.random.default_rng([seed, 0])) for b in g.batches]


def pairwise_plan(n: int, batch: int, seed: int) -> list[np.ndarray]:
    """The batches ``minibatch_cka`` forms for repeat 0 (one row per chunk)."""
    rows = [np.array([i]) for i in range(n)]
    return [b for g in batch_plan(rows, batch, np.random.default_rng([seed, 0])) for b in g.batches]


class ArrayStore:
    """In-memory object with the store interface ``cka_matrix`` reads (``repsim.measures.cka_engine.StoreLike``)."""

    def __init__(self, feats: list[np.ndarray]):
        self.acts = {f"blocks.{i}": f for i, f in enumerate(feats)}
        self.layers = list(self.acts)
        self.n = len(feats[0])
        self.ids = [f"s{i}" for i in range(self.n)]
        self.fingerprint = hashlib.sha256("\n".join(self.ids).encode()).hexdigest()
        self.complete = True
        self.chunk_size = CHUNK
        self.path = "in-memory"

    def layer_info(self, layer: str) -> dict:
        return {"kind": "vector", "shape": tuple(self.acts[layer].shape[1:])}

    def read(self, layer: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        return self.acts[layer][start:stop]


# ----------------------------------------------------------------------------------------------------
# float64 numpy references (independent of repsim's code)
# ----------------------------------------------------------------------------------------------------


def ref_minibatch(feats: list[np.ndarray], batches: list[np.ndarray]) -> np.ndarray:
    """Minibatch CKA, float64: per batch the HSIC₁ numerator of Song et al. (2012) for all pairs at once,
    ``tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((m-1)(m-2)) - 2/(m-2)·1ᵀK̃L̃1`` (K̃: Gram with zeroed diagonal),
    summed over batches; CKA = cross / √(self · self)."""
    total = 0.0
    for idx in batches:
        m = len(idx)
        ks = []
        for f in feats:
            x = f[idx].astype(np.float64)
            x -= x.mean(axis=0)
            k = x @ x.T
            np.fill_diagonal(k, 0.0)
            ks.append(k.ravel())
        ks = np.stack(ks)
        r = ks.reshape(len(feats), m, m).sum(axis=2)  # row sums (L, m)
        s = r.sum(axis=1)
        total = total + ks @ ks.T + np.outer(s, s) / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * (r @ r.T)
    d = np.sqrt(np.diag(total))
    return total / d[:, None] / d[None, :]


def ref_exact(feats: list[np.ndarray]) -> np.ndarray:
    """Biased linear CKA, float64: cosine of the centred Grams ``X̃X̃ᵀ`` (all n samples)."""
    grams = []
    for f in feats:
        x = f.astype(np.float64)
        x -= x.mean(axis=0)
        k = (x @ x.T).ravel()
        grams.append(k / np.linalg.norm(k))
    grams = np.stack(grams)
    return grams @ grams.T


# ----------------------------------------------------------------------------------------------------
# repsim
# ----------------------------------------------------------------------------------------------------


def repsim_stacked(bank: list[torch.Tensor], batches: list[torch.Tensor]) -> np.ndarray:
    """MinibatchCKA.update_features on each batch: one Gram per layer, all pairs from one stacked product."""
    acc = MinibatchCKA(len(bank), device="cpu")
    for idx in batches:
        acc.update_features([f.index_select(0, idx) for f in bank])
    return acc.result()


def repsim_store(store: ArrayStore, batch: int, seed: int) -> np.ndarray:
    return cka_matrix(store, estimator="minibatch", batch_size=batch, seed=seed, device="cpu",
                      progress=False).values


def repsim_pairwise(bank: list[torch.Tensor], batch: int, seed: int) -> np.ndarray:
    """minibatch_cka for every pair i <= j (what a user of the pairwise API writes for a symmetric map)."""
    n_l = len(bank)
    out = np.empty((n_l, n_l))
    for i in range(n_l):
        for j in range(i, n_l):
            out[i, j] = out[j, i] = minibatch_cka(bank[i], bank[j], batch_size=batch, seed=seed, device="cpu")[0]
    return out


def repsim_exact_store(store: ArrayStore) -> np.ndarray:
    return cka_matrix(store, estimator="exact", device="cpu", progress=False).values


def repsim_exact_pairs(feats: list[np.ndarray], pairs: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    return {(i, j): cka(feats[i], feats[j]) for i, j in pairs}


# ----------------------------------------------------------------------------------------------------
# Peers
# ----------------------------------------------------------------------------------------------------

NOTES: list[str] = []


def _stand_in_seaborn() -> None:
    """ckatorch and cka-pytorch import seaborn at import time, for plotting only (never called here)."""
    try:
        import seaborn  # noqa: F401
    except ImportError:
        sys.modules["seaborn"] = types.ModuleType("seaborn")
        NOTES.append("seaborn is not installed: a stand-in module was registered (ckatorch and cka-pytorch import "
                     "it for plotting only; no compute path touches it)")


def _peer(module: str, dist: str) -> types.ModuleType | None:
    try:
        mod = __import__(module, fromlist=["_"])
    except Exception as e:  # noqa: BLE001 - any import failure means: skip this peer
        NOTES.append(f"{dist} skipped: `import {module}` failed ({type(e).__name__}: {e}); install with "
                     f"`pip install --no-deps {dist}`")
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        mod.bench_version = version(dist)
    except PackageNotFoundError:
        mod.bench_version = "?"
    return mod


class _Tap(nn.Module):
    """A 'layer' that outputs the precomputed activations of the samples whose indices it is given."""

    def __init__(self, feats: torch.Tensor):
        super().__init__()
        self.feats = feats  # a plain attribute: .to() / hooks never copy the bank

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.feats.index_select(0, idx)


class TapModel(nn.Module):
    """An identity 'network' for hook-based peers: its module ``layer{i}`` outputs layer i's activations."""

    def __init__(self, bank: list[torch.Tensor]):
        super().__init__()
        for i, f in enumerate(bank):
            self.add_module(f"layer{i}", _Tap(f))

    def forward(self, idx: torch.Tensor) -> None:
        for tap in self.children():
            tap(idx)


def _loader(batches: list[torch.Tensor]) -> torch.utils.data.DataLoader:
    """Yields ``[idx, idx]`` per batch (input, dummy target), no per-sample collation cost."""
    return torch.utils.data.DataLoader([(b, b) for b in batches], batch_size=None, shuffle=False)


def _names(n_l: int) -> list[str]:
    return [f"layer{i}" for i in range(n_l)]


def peer_torch_cka(mod, bank, batches) -> np.ndarray:
    """torch-cka ``CKA.compare``: per batch, per pair (i, j): L = YYᵀ recomputed, 3 unbiased HSICs each with a
    full m × m × m product trace(K @ L); float32; mean over batches. Two tap models (its two-model usage)."""
    names = _names(len(bank))
    c = mod.CKA(TapModel(bank), TapModel(bank), model1_name="a", model2_name="b", model1_layers=names,
                model2_layers=names, device="cpu")
    loader = _loader(batches)
    c.compare(loader, loader)
    return c.hsic_matrix.double().numpy()


def peer_pytorch_cka(mod, bank, batches) -> np.ndarray:
    """pytorch-cka ``compute_cka`` with the same model twice (its fastest path): one float32 Gram per layer per
    batch, all pairs via einsum over the stacked Grams (hsic_cross); float32 sums; result clamped to [0, 1]."""
    model = TapModel(bank)
    return mod.compute_cka(model, model, _loader(batches), layers=_names(len(bank)), device="cpu",
                           progress=False)[0].double().numpy()


def peer_cka_pytorch(mod, bank, batches) -> np.ndarray:
    """cka-pytorch ``CKACalculator``: float32 Gram in the forward hook, HSIC₁ via bmm (an m³ product per pair) in
    groups of 64 pairs; ε = 1e-4 added under the square root of the denominator. Two tap models."""
    calc = mod.CKACalculator(TapModel(bank), TapModel(bank), model1_layers=_names(len(bank)),
                             device=torch.device("cpu"), verbose=False)
    out = calc.calculate_cka_matrix(_loader(batches), num_epochs=1)
    calc.hook_manager1.clear_all()
    calc.hook_manager2.clear_all()
    return out.double().numpy()


def peer_ckatorch(mod, bank, batches) -> np.ndarray:
    """ckatorch ``cka_batch`` per pair (i, j), as its CKA class loops, on the stacked batches (n_b, m, dim):
    float64 Grams of both layers recomputed per pair, HSIC₁ via bmm (m³ per batch), Σ over batches."""
    stacks = [torch.stack([f.index_select(0, idx) for idx in batches]) for f in bank]
    n_l = len(bank)
    out = np.empty((n_l, n_l))
    for i in range(n_l):
        for j in range(n_l):
            out[i, j] = float(mod.cka_batch(stacks[i], stacks[j]))
    return out


def peer_ckatorch_exact(mod, feats_t: list[torch.Tensor], pairs) -> dict[tuple[int, int], float]:
    """ckatorch ``cka_base`` (biased, linear, float64, n × n Grams) per pair on all n samples."""
    return {(i, j): float(mod.cka_base(feats_t[i], feats_t[j], kernel="linear", unbiased=False))
            for i, j in pairs}


# ----------------------------------------------------------------------------------------------------
# GEMM throughput
# ----------------------------------------------------------------------------------------------------


def gemm_seconds(x: torch.Tensor, min_time: float = 0.05) -> float:
    """Seconds per ``x @ x.T`` (float32, the Gram's own form), over enough calls to last ``min_time``."""
    x @ x.T
    reps, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            x @ x.T
        t = time.perf_counter() - t0
        if t >= min_time:
            return t / reps
        reps *= 2


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    estimator: str
    precision: str
    seconds: float
    values: np.ndarray | None
    ref: np.ndarray | None  # float64 reference of the same estimator on the same batches
    base: str  # which repsim row the ratio and Δ are taken against ("" for none)
    note: str = ""


def timed(fn: Callable, *args) -> tuple[float, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        out = fn(*args)
        return time.perf_counter() - t0, out


def best_of(k: int, fn: Callable, *args) -> tuple[float, object]:
    """Best wall time of ``k`` runs (the machine is shared: the minimum is the least disturbed run)."""
    runs = [timed(fn, *args) for _ in range(max(1, k))]
    return min(t for t, _ in runs), runs[-1][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n", type=int, default=2048, help="samples (a multiple of --batch gives equal batches)")
    ap.add_argument("--dim", type=int, default=768, help="features per layer (768: a ViT-B token, pooled)")
    ap.add_argument("--offset", type=float, default=1.0, help="std of the per-feature mean offsets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved runs of the fast implementations")
    ap.add_argument("--slow-repeats", type=int, default=2, help="runs of each slow implementation (best kept)")
    ap.add_argument("--exact-pairs", type=int, default=12, help="pairs timed for the per-pair exact APIs")
    ap.add_argument("--skip-exact", action="store_true", help="minibatch comparison only")
    ap.add_argument("--skip-slow", action="store_true", help="skip peers that take more than a few seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--profile", action="store_true", help="profile repsim's minibatch path (torch.profiler)")
    ap.add_argument("--quick", action="store_true", help="n=512, dim=256, 2 rounds, 2 exact pairs")
    args = ap.parse_args()
    if args.quick:
        args.n, args.dim, args.rounds, args.exact_pairs, args.slow_repeats = 512, 256, 2, 2, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    n_l, n, b, d = args.layers, args.n, args.batch, args.dim
    load0 = os.getloadavg()[0]
    print(f"bench_cka: {n_l} layers × n={n} × dim={d} float32 (offset {args.offset}), batch {b}, seed {args.seed}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}; load avg {load0:.1f}")

    t0 = time.perf_counter()
    feats = make_activations(n, d, n_l, args.seed, args.offset)
    bank = [torch.from_numpy(f) for f in feats]
    plan = store_plan(n, b, args.seed)
    batches = [torch.from_numpy(p) for p in plan]
    sizes = sorted({len(p) for p in plan})
    print(f"data: {time.perf_counter() - t0:.1f} s; {len(plan)} batches of {sizes} rows (the cka_matrix plan)")
    if len(sizes) > 1:
        NOTES.append(f"batch sizes differ ({sizes}): the peers' mean-of-HSIC form then differs from repsim's sum "
                     "form, and ckatorch (stacked batches) is skipped")

    _stand_in_seaborn()
    peers = {
        "torch-cka": _peer("torch_cka", "torch-cka"),
        "pytorch-cka": _peer("cka", "pytorch-cka"),
        "cka-pytorch": _peer("cka_pytorch", "cka-pytorch"),
        "ckatorch": _peer("ckatorch", "ckatorch"),
    }
    if peers["pytorch-cka"] is not None and not hasattr(peers["pytorch-cka"], "compute_cka"):
        NOTES.append("pytorch-cka skipped: the importable `cka` module is not pytorch-cka (another `cka` dist?)")
        peers["pytorch-cka"] = None

    t0 = time.perf_counter()
    ref_mb = ref_minibatch(feats, plan)
    print(f"float64 minibatch reference: {time.perf_counter() - t0:.1f} s")

    rows: list[Row] = []
    mb = "minibatch HSIC₁ (Nguyen)"

    # -- fast implementations, interleaved round by round (GEMM measured in the same rounds) ------------------
    x_gemm = torch.randn(b, d)
    fast: dict[str, tuple[Callable, tuple]] = {
        "repsim MinibatchCKA (stacked)": (repsim_stacked, (bank, batches)),
        "repsim cka_matrix (store)": (repsim_store, (ArrayStore(feats), b, args.seed)),
    }
    if peers["pytorch-cka"] is not None:
        fast["pytorch-cka"] = (lambda *a: peer_pytorch_cka(peers["pytorch-cka"], *a), (bank, batches))
    times: dict[str, list[float]] = {k: [] for k in fast}
    gemm: list[float] = []
    vals: dict[str, np.ndarray] = {}
    for name, (fn, a) in fast.items():  # warm-up (thread pools, lazy imports)
        timed(fn, *(a if name != "repsim MinibatchCKA (stacked)" else (bank, batches[:1])))
    for _ in range(args.rounds):
        gemm.append(gemm_seconds(x_gemm))
        for name, (fn, a) in fast.items():
            t, vals[name] = timed(fn, *a)
            times[name].append(t)
    print(f"fast implementations: {args.rounds} interleaved rounds done")

    def med(name: str) -> str:
        return f"median {np.median(times[name]):.3f} s; "

    base_mb = "repsim MinibatchCKA (stacked)"
    rows.append(Row(base_mb, mb, "f32 Gram, f64 rest", min(times[base_mb]), vals[base_mb], ref_mb, base_mb,
                    med(base_mb) + "all pairs from 1 product/batch"))
    rows.append(Row("repsim cka_matrix (store)", mb, "f32 Gram, f64 rest", min(times["repsim cka_matrix (store)"]),
                    vals["repsim cka_matrix (store)"], ref_mb, base_mb, med("repsim cka_matrix (store)")
                    + "incl. store reads"))
    if "pytorch-cka" in times:
        rows.append(Row(f"pytorch-cka {peers['pytorch-cka'].bench_version}", mb, "float32",
                        min(times["pytorch-cka"]), vals["pytorch-cka"], ref_mb, base_mb,
                        med("pytorch-cka") + "stacked Grams, einsum"))

    # -- slow implementations: one run each -------------------------------------------------------------------
    pw_plan = pairwise_plan(n, b, args.seed)
    t, v = best_of(args.slow_repeats, repsim_pairwise, bank, b, args.seed)
    rows.append(Row("repsim minibatch_cka (pairwise)", mb, "f32 Gram, f64 rest", t, v, ref_minibatch(feats, pw_plan),
                    "", f"{n_l * (n_l + 1) // 2} calls, own batches"))
    slow = [("torch-cka", peer_torch_cka, "float32", "per-pair Gram + 3 m³ traces"),
            ("cka-pytorch", peer_cka_pytorch, "float32", "m³ bmm per pair"),
            ("ckatorch", peer_ckatorch, "float64", "cka_batch per pair")]
    for key, fn, prec, note in slow:
        mod = peers[key]
        if mod is None:
            continue
        if args.skip_slow:
            NOTES.append(f"{key} not run (--skip-slow)")
            continue
        if key == "ckatorch" and len(sizes) > 1:
            continue
        timed(fn, mod, bank, [batches[0][:16]])  # warm-up on one small batch
        t, v = best_of(args.slow_repeats, fn, mod, bank, batches)
        rows.append(Row(f"{key} {mod.bench_version}", mb, prec, t, v, ref_mb, base_mb, note))
        print(f"{key}: {t:.2f} s")

    # -- exact (biased) CKA on all n samples ------------------------------------------------------------------
    exact_rows: list[Row] = []
    gemm_exact: list[float] = []
    if not args.skip_exact:
        t0 = time.perf_counter()
        ref_ex = ref_exact(feats)
        print(f"float64 exact reference: {time.perf_counter() - t0:.1f} s")
        all_pairs = [(i, j) for i in range(n_l) for j in range(i, n_l)]
        step = max(1, math.ceil(len(all_pairs) / max(1, args.exact_pairs)))
        pairs = all_pairs[::step][: args.exact_pairs]
        scale = len(all_pairs) / len(pairs)
        store = ArrayStore(feats)
        timed(repsim_exact_store, ArrayStore([f[:256] for f in feats]))  # warm-up
        ex_times = []
        x_big = torch.randn(n, d)
        for _ in range(max(1, min(2, args.rounds))):
            gemm_exact.append(gemm_seconds(x_big, 0.2))
            t, v_ex = timed(repsim_exact_store, store)
            ex_times.append(t)
        base_ex = "repsim cka_matrix exact"
        ex = "exact, biased (Kornblith)"
        exact_rows.append(Row(base_ex, ex, "f32 Gram, f64 rest", min(ex_times), v_ex, ref_ex, base_ex,
                              "1 n×n Gram per layer"))

        def pair_matrix(d_: dict) -> np.ndarray:
            m = np.full((n_l, n_l), np.nan)
            for (i, j), val in d_.items():
                m[i, j] = m[j, i] = val
            return m

        t, v = best_of(args.slow_repeats, repsim_exact_pairs, feats, pairs)
        exact_rows.append(Row("repsim cka (pairwise) *", ex, "float64", t * scale, pair_matrix(v), ref_ex, base_ex,
                              f"{len(pairs)} of {len(all_pairs)} pairs timed"))
        if peers["ckatorch"] is not None:
            mod = peers["ckatorch"]
            t, v = best_of(args.slow_repeats, peer_ckatorch_exact, mod, bank, pairs)
            exact_rows.append(Row(f"ckatorch {mod.bench_version} cka_base *", ex, "float64", t * scale,
                                  pair_matrix(v), ref_ex, base_ex, f"{len(pairs)} of {len(all_pairs)} pairs timed"))

    # -- table ------------------------------------------------------------------------------------------------
    by_name = {r.name: r for r in rows + exact_rows}

    def delta(a: np.ndarray | None, ref: np.ndarray | None) -> str:
        if a is None or ref is None:
            return "—"
        return f"{np.nanmax(np.abs(a - ref)):.1e}"

    print()
    hdr = (f"{'implementation':<34} {'estimator':<26} {'precision':<19} {'wall s':>8} {'× repsim':>9} "
           f"{'Δ repsim':>9} {'Δ f64':>9}  note")
    print(hdr)
    print("-" * len(hdr))
    for r in rows + exact_rows:
        base = by_name.get(r.base)
        ratio = f"{r.seconds / base.seconds:.1f}" if base is not None else "—"
        d_rep = delta(r.values, base.values) if base is not None and base is not r else "—"
        print(f"{r.name:<34} {r.estimator:<26} {r.precision:<19} {r.seconds:>8.3f} {ratio:>9} {d_rep:>9} "
              f"{delta(r.values, r.ref):>9}  {r.note}")
    print("-" * len(hdr))

    # -- GEMM efficiency ---------------------------------------------------------------------------------------
    sizes_all = [len(p) for p in plan]
    gram_flops = sum(n_l * 2 * m * m * d + 2 * n_l * n_l * m * m for m in sizes_all)
    gemm_rate = 2 * b * b * d / min(gemm)
    r_mb = by_name[base_mb]
    achieved = gram_flops / r_mb.seconds
    print(f"GEMM  float32 ({b}×{d}) @ ({d}×{b}) on this machine: {gemm_rate / 1e9:.1f} GFLOP/s (best of "
          f"{len(gemm)}; median {2 * b * b * d / np.median(gemm) / 1e9:.1f})")
    print(f"repsim minibatch Gram work: {gram_flops / 1e9:.2f} GFLOP ({n_l} Grams × {len(plan)} batches + pair "
          f"products) in {r_mb.seconds:.3f} s = {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / gemm_rate:.0f}% of "
          f"the measured GEMM rate (Gram work alone at that rate: {gram_flops / gemm_rate:.3f} s)")
    eff_ex = None
    if exact_rows:
        ex_flops = n_l * 2 * n * n * d + 2 * n_l * n_l * n * n
        gemm_ex_rate = 2 * n * n * d / min(gemm_exact)
        eff_ex = ex_flops / exact_rows[0].seconds / gemm_ex_rate
        print(f"GEMM  float32 ({n}×{d}) @ ({d}×{n}): {gemm_ex_rate / 1e9:.1f} GFLOP/s; repsim exact Gram work "
              f"{ex_flops / 1e9:.1f} GFLOP in {exact_rows[0].seconds:.2f} s = {100 * eff_ex:.0f}% of it")

    # -- targets -----------------------------------------------------------------------------------------------
    peer_rows = [r for r in rows if not r.name.startswith("repsim")]
    load1 = os.getloadavg()[0]
    print(f"load avg: {load0:.1f} at start, {load1:.1f} at end ({os.cpu_count()} cores)")
    if max(load0, load1) > 0.5 * (os.cpu_count() or 1):
        print("WARNING: other processes are using this machine's cores: multi-threaded timings then swing by up to "
              "10× (medians above); compare best-of times only, or rerun idle / with --threads 1")
    print("\ntargets (12 × 12 minibatch map):")
    if peer_rows:
        fastest = min(peer_rows, key=lambda r: r.seconds)
        speed = fastest.seconds / r_mb.seconds
        print(f"  speed  >= 10× the fastest peer ({fastest.name}, {fastest.seconds:.3f} s): {speed:.1f}× — "
              f"{'MET' if speed >= 10 else 'NOT MET'}")
        worst = max(float(np.max(np.abs(r.values - r_mb.values))) for r in peer_rows)
        print(f"  values equal to same-estimator peers: max |Δ| = {worst:.1e} over {len(peer_rows)} peers "
              f"(the float32 peers' rounding of uncentred Grams; grows with --offset) — "
              f"{'MET' if worst <= 1e-4 else 'NOT MET'} at 1e-4")
    else:
        print("  no peer installed: speed and value targets not assessed")
    eff = achieved / gemm_rate
    print(f"  Gram work >= 50% of measured GEMM throughput: {100 * eff:.0f}% — {'MET' if eff >= 0.5 else 'NOT MET'}"
          + (f" (exact path: {100 * eff_ex:.0f}%)" if eff_ex is not None else ""))
    for note in NOTES:
        print(f"note: {note}")

    if args.profile:
        profile_repsim(bank, batches)


def profile_repsim(bank: list[torch.Tensor], batches: list[torch.Tensor]) -> None:
    """Top ops of repsim's stacked minibatch path by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    repsim_stacked(bank, batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        repsim_stacked(bank, batches)
    print("\nrepsim MinibatchCKA.update_features, ops by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
