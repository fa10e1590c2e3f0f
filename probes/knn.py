"""Weighted k-nearest-neighbour classification on frozen features (DINO protocol).

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", Sec. 4.1 / App. (``eval_knn.py``
of facebookresearch/dino): features are L2-normalised, the similarity is the cosine ``s = x̂ᵀt̂``, the ``k = 20``
most similar training samples vote for their class with weight ``exp(s / T)``, ``T = 0.07``, and the class with
the largest summed vote wins. Here the weights are computed as ``exp((s − s_max)/T)`` with ``s_max`` the query's
top similarity: the same vote up to a per-query factor (identical decisions), without overflow for small ``T``.
Class ties go to the smallest label; ties among equally similar neighbours at the k-th place are broken by
``torch.topk`` (deterministic on one device). A zero feature vector has cosine 0 with everything.

No parameter is tuned, so :func:`knn_probe` uses every non-test sample (train + what the linear probe holds
out for validation) as the memory bank.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from probes.features import StoreLike
from probes.linear import ProbeResult, ProbeRow, _iter_features, _protocol, _repsim_version, _store_info, prepare_probe
from probes.solvers import _check_xy, _to_device, accuracy_scores
from repsim.devices import resolve_device, tf32_off
from repsim.errors import UsageError

__all__ = ["knn_classify", "knn_probe"]


def knn_classify(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_query: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    return_scores: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted k-NN predictions (DINO, module docstring) for ``X_query`` (m, d) from ``X_train`` (n, d).

    Returns predicted labels (m,) (values of ``y_train``); with ``return_scores`` also ``scores`` (m, c) — the
    normalised vote of each class, rows summing to 1 — and ``classes`` (c,), the label of each column.
    ``k`` is capped at n (with a warning). Queries run in batches of ``batch_size`` (default: ~64 MiB of
    similarities), similarities in float32 with TF32 off.
    """
    X_train, y_train = _check_xy(X_train, y_train, "training")
    X_query = np.asarray(X_query)
    if X_query.ndim != 2 or X_query.shape[1] != X_train.shape[1]:
        raise UsageError(f"query features must have shape (m, {X_train.shape[1]}), got {X_query.shape}")
    if not np.isfinite(X_query).all():
        raise UsageError("query features hold non-finite values")
    if int(k) < 1:
        raise UsageError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise UsageError(f"temperature must be > 0, got {temperature}")
    n = X_train.shape[0]
    if k > n:
        warnings.warn(f"k = {k} exceeds the {n} training samples; using k = {n}", stacklevel=2)
        k = n
    classes = np.unique(y_train)
    c = classes.size
    dev = resolve_device(device)
    bs = int(batch_size) if batch_size else max(1, (1 << 24) // max(n, 1))
    preds, all_scores = [], []
    with tf32_off(), torch.no_grad():
        bank = torch.nn.functional.normalize(_to_device(X_train.astype(np.float32, copy=False), dev), dim=1)
        labels = torch.from_numpy(np.searchsorted(classes, y_train)).to(dev)
        for lo in range(0, X_query.shape[0], bs):
            q = torch.nn.functional.normalize(
                _to_device(np.asarray(X_query[lo:lo + bs], dtype=np.float32), dev), dim=1)
            sim, idx = torch.topk(q @ bank.T, k, dim=1, largest=True, sorted=True)
            w = torch.exp((sim.double() - sim[:, :1].double()) / temperature)
            votes = torch.zeros((q.shape[0], c), dtype=torch.float64, device=dev)
            votes.scatter_add_(1, labels[idx], w)
            preds.append(torch.argmax(votes, dim=1).cpu())
            if return_scores:
                all_scores.append((votes / votes.sum(1, keepdim=True)).cpu())
    pred = classes[torch.cat(preds).numpy()] if preds else np.zeros(0, dtype=classes.dtype)
    if return_scores:
        scores = torch.cat(all_scores).numpy() if all_scores else np.zeros((0, c))
        return pred, scores, classes
    return pred


def knn_probe(
    store: StoreLike,
    *,
    k: int = 20,
    temperature: float = 0.07,
    layers: Sequence[str] | None = None,
    features: str = "mean",
    split: float = 0.2,
    test_store: StoreLike | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> ProbeResult:
    """Weighted k-NN test accuracy (DINO: cosine, k = 20, T = 0.07) of every selected layer of ``store``.

    Split, features and test store as in :func:`probes.linear.linear_probe`; the memory bank is every non-test
    sample (no validation split: nothing is tuned). Rows carry no λ / C / convergence fields.
    """
    t_start = time.perf_counter()
    dev = resolve_device(device)
    if int(k) < 1:
        raise UsageError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise UsageError(f"temperature must be > 0, got {temperature}")
    prep = prepare_probe(store, layers=layers, features=features, split=split, test_store=test_store, seed=seed,
                         val_fraction=None)
    sp = prep.split
    from tqdm.auto import tqdm

    rows = []
    k_used = min(int(k), int(sp.train.size))
    for fs, Xtr, _, Xte, read_s in tqdm(_iter_features(store, test_store, prep), total=len(prep.sets),
                                        desc="k-NN probe", unit="layer", disable=not progress, dynamic_ncols=True):
        t0 = time.perf_counter()
        pred = knn_classify(Xtr, sp.y_train, Xte, k=k_used, temperature=temperature, device=dev)
        top1, mpc = accuracy_scores(sp.y_test, pred)
        rows.append(ProbeRow(layer=fs.name, layers=fs.layers, reductions=fs.reductions, dim=fs.dim, top1=top1,
                             mean_per_class=mpc, seconds=time.perf_counter() - t0, read_seconds=read_s))
    protocol = _protocol(prep, split=split, test_store=test_store, seed=seed, val_fraction=None, features=features)
    protocol.update({
        "method": "knn", "k": int(k), "k_used": k_used, "temperature": float(temperature),
        "similarity": "cosine of L2-normalised features; votes weighted by exp(sim / T) (Caron et al. 2021)",
        "memory_bank": "all non-test samples",
    })
    return ProbeResult(method="knn", features=features, rows=rows, protocol=protocol, store=_store_info(store),
                       device=str(dev), repsim_version=_repsim_version(), seconds=time.perf_counter() - t_start)
