"""Centred kernel alignment (CKA) between layer representations: exact, debiased and minibatch estimators.

Definitions (Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of Neural Network Representations
Revisited", Sec. 3). For ``n`` samples with features ``X`` (n, p) and ``Y`` (n, q), Gram matrices ``K`` and
``L`` (n, n), and the centring matrix ``H = I - 11ᵀ/n``::

    HSIC(K, L) = tr(KHLH) / (n - 1)²              CKA(K, L) = HSIC(K, L) / √(HSIC(K, K) · HSIC(L, L))

Linear kernel: ``K = X̃X̃ᵀ`` with column-centred ``X̃ = HX``, so that CKA equals the feature-space form
``‖X̃ᵀỸ‖²_F / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F)`` (same paper, Sec. 3, "linear CKA"). RBF kernel: ``K_ij =
exp(-‖x_i - x_j‖² / (2σ²))`` with ``σ² = threshold² · median_ij ‖x_i - x_j‖²``, the median taken over the
*full* n × n matrix of squared distances, its n zero diagonal entries included (exactly as ``gram_rbf`` in
Kornblith's reference colab; ``threshold`` is that function's argument).

Estimators
----------
``exact``     the biased (plug-in) CKA above, on all n samples.
``debiased``  HSIC replaced by the unbiased estimator of Song et al. (2012) written with Székely–Rizzo (2014)
              U-centring: ``HSIC_u(K, L) = ⟨K̃ᵤ, L̃ᵤ⟩ / (n(n - 3))``, where ``K̃ᵤ`` is the U-centred Gram
              (:func:`u_centre`). This is "debiased CKA" of Kornblith et al. (2019, Appendix / colab,
              ``cka(..., debiased=True)``). Needs n ≥ 4.
``minibatch`` Nguyen, Raghu & Kornblith (2021) "Do Wide and Deep Networks Learn the Same Things?", Sec. 3.1:
              unbiased HSIC accumulated over minibatches in the *sum* form::

                  CKA_mb = Σ_b ⟨K̃ᵤ,L̃ᵤ⟩_b / √(Σ_b ‖K̃ᵤ‖²_b · Σ_b ‖L̃ᵤ‖²_b)

              The per-batch factor 1/(m_b(m_b - 3)) is *not* applied, matching the official implementation
              (google-research ``do_wide_and_deep_networks_learn_the_same_things/efficient_CKA.py``,
              ``MinibatchCKA``, which accumulates raw dot products of U-centred Grams). With equal batch sizes
              the factors cancel and this is exactly the paper's mean-of-HSIC₁ form; with unequal batches each
              batch's unbiased HSIC is weighted by m_b(m_b - 3) in numerator and denominator alike, so the
              ratio stays consistent. A single batch holding all n samples gives exactly debiased CKA.

Numerics (the traps this module avoids): features are centred (per batch) *before* any Gram is formed, so a
large common offset never cancels catastrophically in float32; stored float16 activations are up-cast before
any arithmetic; Gram products run in float32 with TF32 off (or float64 when asked), everything after the Gram
(centring, dot products, sums) in float64. A NaN, an Inf or a negative self-HSIC raises
:class:`NumericalError` naming the layer and the batch; nothing is clamped. Unbiased estimators need ≥ 4
samples per batch.

Speed and memory (minibatch): per batch, one Gram per layer; all layer pairs come from one product of the
stacked U-centred Grams ``(L_a, m²) @ (L_b, m²)ᵀ``; self terms are squared row norms. Only per-layer Grams of
the current chunk group are held, never the features of all layers.

Batch plans: ``contiguous`` (one repeat, the default) takes consecutive store rows as batches — a store's
order is a seeded random permutation, so each block is a uniform random sample, and it reads without any
gather; ``shuffled`` (:func:`batch_plan`) draws seeded groups of whole chunks, a new plan per repeat.

Stored Grams: stores extracted with ``--grams`` hold each layer's U-centred Gram per chunk (the Gram math is
:mod:`repsim.measures.gram`, shared with extraction). When both stores hold them for the requested batch size,
:func:`cka_matrix` sums packed dot products of the stored Grams (contiguous plan, chunks as batches) and never
reads an activation; the result's ``source`` says which path was taken.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from repsim.devices import resolve_device as _resolve_device
from repsim.devices import tf32_off as _tf32_off
from repsim.errors import NumericalError, RepsimError, UsageError
from repsim.measures.gram import MIN_UNBIASED, u_centre, unbiased_gram
from repsim.measures.gram import check_finite as _check_finite
from repsim.measures.gram import from_numpy as _from_numpy
from repsim.measures.gram import resolve_gram_dtype as _gram_dtype
from repsim.results import Result, finish_result
from repsim.store.format import layer_kind
from repsim.store.reader import StoreLike, check_layer_names, consecutive_slice, gather_rows

ESTIMATORS = ("minibatch", "exact", "debiased")
KERNELS = ("linear", "rbf")
TOKEN_MODES = ("flatten", "mean", "cls")  # how a token / map layer becomes one CKA feature row per sample
ALIGN_MODES = ("fingerprint", "ids")
PLANS = ("auto", "contiguous", "shuffled")
SOURCES = ("auto", "grams", "activations")

__all__ = [
    "CKAResult",
    "MinibatchCKA",
    "NumericalError",
    "PlanGroup",
    "batch_plan",
    "centre_gram",
    "cka",
    "cka_from_grams",
    "cka_matrix",
    "contiguous_plan",
    "feature_space_linear_cka",
    "gram_linear",
    "gram_rbf",
    "minibatch_cka",
    "u_centre",
    "u_centre_np",
    "unbiased_gram",
]


# ----------------------------------------------------------------------------------------------------
# In-memory estimators (numpy, float64)
# ----------------------------------------------------------------------------------------------------


def _as_float64_2d(x: Any, name: str) -> np.ndarray:
    """numpy / torch (n, ...) → float64 (n, features). Low-precision inputs are up-cast first."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim < 2:
        raise UsageError(f"{name} must have shape (n, features), got shape {x.shape}")
    x = x.astype(np.float64, copy=False).reshape(x.shape[0], -1)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise NumericalError(f"{name} holds a non-finite value (first at sample {bad[0]}, feature {bad[1]})")
    return x


def gram_linear(x: np.ndarray) -> np.ndarray:
    """Linear Gram ``X̃X̃ᵀ`` (n, n) float64 of column-centred features (centring first: see module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    return x @ x.T


def gram_rbf(x: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """RBF Gram ``exp(-d²/(2σ²))`` (n, n), ``σ² = threshold² · median(d²)`` over all n² pairs incl. the diagonal.

    Same convention as Kornblith et al.'s colab ``gram_rbf``. ``d²`` is in squared feature units.
    """
    if not threshold > 0:
        raise UsageError(f"RBF threshold must be > 0, got {threshold}")
    g = gram_linear(x)  # distances are translation invariant; centring keeps |x|² small
    sq = np.diag(g)
    d2 = sq[:, None] + sq[None, :] - 2.0 * g
    d2 = np.maximum(d2, 0.0)  # rounding can leave -1e-16 where the distance is 0; distances are >= 0
    np.fill_diagonal(d2, 0.0)
    med = float(np.median(d2))
    if not med > 0:
        raise NumericalError(
            "RBF bandwidth undefined: the median squared distance is 0 (at least half of all sample pairs "
            "coincide); use the linear kernel"
        )
    return np.exp(-d2 / (2.0 * threshold**2 * med))


def u_centre_np(gram: np.ndarray) -> np.ndarray:
    """Székely–Rizzo (2014, Sec. 2) U-centring of a symmetric (n, n) Gram, n ≥ 4; returns float64 (n, n).

    ``K̃ᵤ_ij = K_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2))`` off the diagonal (row sums ``r`` and total ``s``
    of K with zeroed diagonal), 0 on it. ``⟨K̃ᵤ, L̃ᵤ⟩ / (n(n-3))`` is the unbiased HSIC.
    """
    k = np.array(gram, dtype=np.float64, copy=True)
    n = k.shape[0]
    if n < MIN_UNBIASED:
        raise UsageError(f"unbiased HSIC needs at least {MIN_UNBIASED} samples, got {n}")
    np.fill_diagonal(k, 0.0)
    means = k.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    k -= means[:, None]
    k -= means[None, :]
    np.fill_diagonal(k, 0.0)
    return k


def centre_gram(gram: np.ndarray, unbiased: bool = False) -> np.ndarray:
    """Centre a symmetric Gram (n, n): ``HKH`` (biased) or the U-centred form (unbiased). float64 copy."""
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise UsageError(f"a Gram matrix must be square, got shape {gram.shape}")
    if unbiased:
        return u_centre_np(gram)
    means = gram.mean(axis=0)
    means = means - means.mean() / 2  # K - r/n - c/n + s/n² with r = c (symmetric)
    return gram - means[:, None] - means[None, :]


def cka_from_grams(gram_x: np.ndarray, gram_y: np.ndarray, debiased: bool = False) -> float:
    """CKA of two (n, n) Grams: ``⟨K̃, L̃⟩ / (‖K̃‖_F ‖L̃‖_F)`` with biased or U-centring (the 1/(n-1)² or
    1/(n(n-3)) factors cancel)."""
    kx = centre_gram(gram_x, unbiased=debiased)
    ky = centre_gram(gram_y, unbiased=debiased)
    return _cosine(kx.ravel(), ky.ravel(), "X", "Y")


def _cosine(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> float:
    na, nb = float(a @ a), float(b @ b)
    for nm, v in ((name_a, na), (name_b, nb)):
        if not math.isfinite(v) or v < 0:
            raise NumericalError(f"self-HSIC of {nm} is {v}: not a finite non-negative number")
        if v == 0:
            raise NumericalError(f"self-HSIC of {nm} is 0 (constant representation): CKA is undefined")
    return float(a @ b) / math.sqrt(na) / math.sqrt(nb)


def feature_space_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Biased linear CKA in feature space, ``‖X̃ᵀỸ‖²_F / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F)`` of x (n, p), y (n, q).

    Cost O(n(p+q)²) and no n × n Gram: the cheap form when feature dimensions are small.
    """
    x = _as_float64_2d(x, "X")
    y = _as_float64_2d(y, "Y")
    _check_pair(x, y)
    x = x - x.mean(axis=0, keepdims=True)
    y = y - y.mean(axis=0, keepdims=True)
    xy = np.linalg.norm(x.T @ y) ** 2
    xx = np.linalg.norm(x.T @ x)
    yy = np.linalg.norm(y.T @ y)
    for nm, v in (("X", xx), ("Y", yy)):
        if v == 0:
            raise NumericalError(f"self-HSIC of {nm} is 0 (constant representation): CKA is undefined")
    return float(xy / (xx * yy))


def _check_pair(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[0] != y.shape[0]:
        raise UsageError(f"X and Y must have the same number of samples (rows), got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        raise UsageError(f"CKA needs at least 2 samples, got {x.shape[0]}")


def cka(x: Any, y: Any, *, kernel: str = "linear", debiased: bool = False, threshold: float = 1.0) -> float:
    """CKA between representations ``x`` (n, p) and ``y`` (n, q) of the same n samples (numpy or torch).

    Trailing dimensions beyond the second are flattened (n, T, D) → (n, T·D). Computation is in float64
    (float16 / bfloat16 / float32 inputs are up-cast first). ``kernel`` is ``"linear"`` or ``"rbf"``
    (bandwidth ``σ² = threshold² · median d²``, see :func:`gram_rbf`); ``debiased`` selects the unbiased HSIC
    (n ≥ 4). Biased linear CKA uses the feature-space form when both feature dimensions are ≤ n (cheaper,
    identical in exact arithmetic), the Gram form otherwise. Returns a float in [-1, 1] (≥ 0 when biased).
    """
    if kernel not in KERNELS:
        raise UsageError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    x = _as_float64_2d(x, "X")
    y = _as_float64_2d(y, "Y")
    _check_pair(x, y)
    n = x.shape[0]
    if debiased and n < MIN_UNBIASED:
        raise UsageError(f"debiased CKA needs at least {MIN_UNBIASED} samples, got {n}")
    if kernel == "linear" and not debiased and max(x.shape[1], y.shape[1]) <= n:
        return feature_space_linear_cka(x, y)
    if kernel == "linear":
        kx, ky = gram_linear(x), gram_linear(y)
    else:
        kx, ky = gram_rbf(x, threshold), gram_rbf(y, threshold)
    return cka_from_grams(kx, ky, debiased=debiased)


# ----------------------------------------------------------------------------------------------------
# Minibatch engine (torch; CPU or GPU)
# ----------------------------------------------------------------------------------------------------


class MinibatchCKA:
    """Accumulates minibatch CKA for all layer pairs (Nguyen et al. 2021, sum form; see the module docstring).

    ``MinibatchCKA(La)`` compares a model with itself (one stack of Grams, symmetric result);
    ``MinibatchCKA(La, Lb)`` two models. Feed each batch's stacked U-centred Grams to :meth:`update`
    (shape (L, m·m), from :func:`unbiased_gram`) or raw per-layer features to :meth:`update_features`.
    Sums are float64 on ``device``.
    """

    def __init__(self, n_layers_a: int, n_layers_b: int | None = None, *, device: str | torch.device = "cpu"):
        self.within = n_layers_b is None
        self.device = torch.device(device)
        lb = n_layers_a if n_layers_b is None else n_layers_b
        self.cross = torch.zeros((n_layers_a, lb), dtype=torch.float64, device=self.device)
        self.self_a = torch.zeros(n_layers_a, dtype=torch.float64, device=self.device)
        self.self_b = torch.zeros(lb, dtype=torch.float64, device=self.device)
        self.n_batches = 0
        self.n_samples = 0

    def update(self, grams_a: torch.Tensor, grams_b: torch.Tensor | None = None, *, what: str = "batch",
               batches: int = 1, samples: int | None = None) -> None:
        """Add one batch: ``grams_a`` (La, m²) [and ``grams_b`` (Lb, m²)] float64 U-centred Grams.

        Stored Gram tiers pass several batches at once as concatenated packed triangles (La, k·m(m-1)/2):
        ``batches`` and ``samples`` then say how many batches and rows they hold (the factor 2 of packing
        cancels in the CKA ratio)."""
        if self.within != (grams_b is None):
            raise ValueError("pass grams_b exactly when the accumulator compares two models")
        grams_a = grams_a.to(self.device, torch.float64)
        m2 = grams_a.shape[1]
        if self.within:
            # One product gives every pair; the self terms are its diagonal (the squared row norms).
            prod = grams_a @ grams_a.T
            sa = sb = torch.diagonal(prod).clone()
        else:
            grams_b = grams_b.to(self.device, torch.float64)
            if grams_b.shape[1] != m2:
                raise ValueError(f"the two Gram stacks disagree on the batch size: {m2} vs {grams_b.shape[1]}")
            prod = grams_a @ grams_b.T
            sa = (grams_a * grams_a).sum(dim=1)
            sb = (grams_b * grams_b).sum(dim=1)
        _check_finite(prod, f"the HSIC cross terms of {what}")
        self.cross += prod
        self.self_a += sa
        self.self_b += sb
        self.n_batches += batches
        self.n_samples += math.isqrt(m2) if samples is None else int(samples)

    def update_features(
        self,
        feats_a: Sequence[Any],
        feats_b: Sequence[Any] | None = None,
        *,
        gram_dtype: str = "float32",
    ) -> None:
        """Add one batch given per-layer features, each (m, ...) for the same m samples."""
        with _tf32_off():
            stacks = []
            for side, feats in (("a", feats_a), ("b", feats_b)):
                if feats is None:
                    stacks.append(None)
                    continue
                m = int(np.shape(feats[0])[0])
                stack = torch.empty((len(feats), m * m), dtype=torch.float64, device=self.device)
                for i, f in enumerate(feats):
                    unbiased_gram(_to_device(f, self.device), gram_dtype=gram_dtype, out=stack[i],
                                  what=f"layer {i} ({side}), batch {self.n_batches}")
                stacks.append(stack)
            ga, gb = stacks
        self.update(ga, gb, what=f"batch {self.n_batches}")

    def merge(self, other: "MinibatchCKA") -> None:
        """Add another accumulator's sums (partial sums of other batches, e.g. from a Dask worker)."""
        self.cross += other.cross.to(self.device)
        self.self_a += other.self_a.to(self.device)
        self.self_b += other.self_b.to(self.device)
        self.n_batches += other.n_batches
        self.n_samples += other.n_samples

    def result(self, names_a: Sequence[str] | None = None, names_b: Sequence[str] | None = None) -> np.ndarray:
        """CKA matrix (La, Lb) float64. Raises :class:`NumericalError` on a non-positive self-HSIC."""
        if self.n_batches == 0:
            raise RepsimError("MinibatchCKA.result() before any update()")
        names_a = list(names_a) if names_a is not None else [f"a[{i}]" for i in range(len(self.self_a))]
        names_b = list(names_b) if names_b is not None else (
            names_a if self.within else [f"b[{i}]" for i in range(len(self.self_b))])
        for names, s in ((names_a, self.self_a), (names_b, self.self_b)):
            s = s.cpu().numpy()
            for name, v in zip(names, s):
                if not math.isfinite(v) or v < 0:
                    raise NumericalError(f"self-HSIC of layer {name!r} summed over {self.n_batches} batches is "
                                         f"{v}: a bug or corrupt activations (never clamped)")
                if v == 0:
                    raise NumericalError(f"self-HSIC of layer {name!r} is 0 over all {self.n_batches} batches: its "
                                         "activations are constant, CKA is undefined")
        na = torch.sqrt(self.self_a)
        nb = torch.sqrt(self.self_b)
        out = (self.cross / na[:, None] / nb[None, :]).cpu().numpy()
        if self.within:
            out = (out + out.T) / 2  # exact symmetry (the product is symmetric only up to rounding)
        return out


def _to_device(x: Any, device: torch.device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = _from_numpy(x)
    return torch.as_tensor(x).to(device)


# ----------------------------------------------------------------------------------------------------
# Batch plans
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanGroup:
    """One read unit of a batch plan: whole chunks, read once, whose shuffled rows are split into batches.

    ``chunks``: chunk indices (ascending); ``batches``: arrays of row indices (into the compared row space).
    """

    chunks: np.ndarray
    batches: list[np.ndarray]


def batch_plan(chunk_rows: Sequence[np.ndarray], batch_size: int, rng: np.random.Generator) -> list[PlanGroup]:
    """A seeded minibatch plan over whole chunks; every row lands in exactly one batch.

    ``chunk_rows[c]`` lists the row indices held by chunk ``c`` (in-memory arrays: one row per chunk).
    The chunks are visited in a random order (``rng``) and gathered into groups: a group closes once it holds
    ≥ ``batch_size`` rows *and* ≥ 2 chunks (so that, even when a chunk holds a whole batch, different
    repeats form different batches). A group's rows are shuffled and split into ``max(1, rows //
    batch_size)`` batches of near-equal size: batches hold exactly ``batch_size`` rows when the chunk size
    divides ``batch_size`` (the default store layout), otherwise between ``batch_size`` and
    ``2·batch_size - 1``. Only the last group may be smaller than ``batch_size`` (an uneven last batch);
    when it has fewer than 4 rows (too few for the unbiased HSIC) it is merged into the previous group.
    """
    if batch_size < MIN_UNBIASED:
        raise UsageError(f"batch size must be at least {MIN_UNBIASED} (unbiased HSIC), got {batch_size}")
    counts = np.array([len(r) for r in chunk_rows], dtype=np.int64)
    total = int(counts.sum())
    if total < MIN_UNBIASED:
        raise UsageError(f"minibatch CKA needs at least {MIN_UNBIASED} samples, got {total}")
    groups: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for c in rng.permutation(len(chunk_rows)):
        if counts[c] == 0:
            continue
        current.append(int(c))
        rows += int(counts[c])
        if rows >= batch_size and len(current) >= 2:
            groups.append(current)
            current, rows = [], 0
    if current:
        if rows < MIN_UNBIASED and groups:
            groups[-1].extend(current)  # the remainder is too small for a batch of its own
        else:
            groups.append(current)
    plan = []
    for g in groups:
        idx = np.concatenate([np.asarray(chunk_rows[c], dtype=np.int64) for c in g])
        idx = idx[rng.permutation(len(idx))]
        n_batches = max(1, len(idx) // batch_size)
        plan.append(PlanGroup(chunks=np.sort(np.asarray(g, dtype=np.int64)),
                              batches=list(np.array_split(idx, n_batches))))
    return plan


def contiguous_plan(n_rows: int, batch_size: int) -> list[PlanGroup]:
    """Batches of consecutive rows ``[j·B, (j+1)·B)`` of the compared row space (store order), one per group.

    A store's sample order is a seeded random permutation of its data set, so each block is a uniform random
    sample; reading whole consecutive rows needs no gather. A last block of fewer than 4 rows (too few for
    the unbiased HSIC) is merged into the previous batch. This is the plan of a Gram tier (``--grams``: the
    store's chunks are its batches), so both paths compute the same sums. ``chunks`` is left empty.
    """
    if batch_size < MIN_UNBIASED:
        raise UsageError(f"batch size must be at least {MIN_UNBIASED} (unbiased HSIC), got {batch_size}")
    if n_rows < MIN_UNBIASED:
        raise UsageError(f"minibatch CKA needs at least {MIN_UNBIASED} samples, got {n_rows}")
    bounds = list(range(0, n_rows, batch_size)) + [n_rows]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_UNBIASED:
        del bounds[-2]
    empty = np.zeros(0, dtype=np.int64)
    return [PlanGroup(chunks=empty, batches=[np.arange(lo, hi, dtype=np.int64)])
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def _repeat_rng(seed: int, repeat: int) -> np.random.Generator:
    """The plan of repeat ``r`` is drawn from ``np.random.default_rng([seed, r])``."""
    return np.random.default_rng([int(seed), int(repeat)])


def minibatch_cka(
    x: Any,
    y: Any,
    *,
    batch_size: int = 256,
    repeats: int = 1,
    seed: int = 0,
    device: str = "auto",
    gram_dtype: str = "float32",
) -> tuple[float, float | None]:
    """Minibatch CKA (sum form) of in-memory ``x`` (n, ...) and ``y`` (n, ...): (mean, std over repeats).

    Repeat ``r`` shuffles the rows with :func:`batch_plan` (one row per chunk) seeded by ``[seed, r]``.
    ``std`` is the sample standard deviation (ddof=1) over repeats, None when ``repeats == 1``.
    """
    if repeats < 1:
        raise UsageError(f"repeats must be >= 1, got {repeats}")
    xa, ya = _as_tensor_rows(x, "X"), _as_tensor_rows(y, "Y")
    if xa.shape[0] != ya.shape[0]:
        raise UsageError(f"X and Y must have the same number of samples (rows), got {xa.shape[0]} and {ya.shape[0]}")
    dev = _resolve_device(device)
    n = xa.shape[0]
    rows = [np.array([i]) for i in range(n)]
    values = []
    for r in range(repeats):
        acc = MinibatchCKA(1, 1, device=dev)
        for group in batch_plan(rows, batch_size, _repeat_rng(seed, r)):
            for b in group.batches:
                ib = torch.from_numpy(b)
                acc.update_features([xa[ib]], [ya[ib]], gram_dtype=gram_dtype)
        values.append(float(acc.result(["X"], ["Y"])[0, 0]))
    std = float(np.std(values, ddof=1)) if repeats > 1 else None
    return float(np.mean(values)), std


def _as_tensor_rows(x: Any, name: str) -> torch.Tensor:
    t = _from_numpy(x) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    if t.ndim < 2:
        raise UsageError(f"{name} must have shape (n, features), got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


# ----------------------------------------------------------------------------------------------------
# Stores
# ----------------------------------------------------------------------------------------------------


def feature_width(info: dict[str, Any], layer: str, tokens: str) -> int:
    """Features per sample row of ``layer`` (its store ``layer_info``) read with ``tokens`` (flatten | mean |
    cls); a ``tokens`` mode the layer cannot serve raises UsageError (validated up front)."""
    kind = layer_kind(info, layer)
    shape = tuple(int(s) for s in info["shape"])
    if kind == "vector" or tokens == "flatten":
        return int(np.prod(shape))
    if kind == "map":
        if tokens == "cls":
            raise UsageError(f"tokens='cls' does not apply to layer {layer!r}: it is a feature map (C, H, W); "
                             "use tokens='flatten' or 'mean'")
        return shape[0]  # mean: global average over H, W
    npt = info.get("num_prefix_tokens")
    if npt is None:
        raise UsageError(f"layer {layer!r} does not record its number of prefix tokens, so tokens={tokens!r} "
                         "cannot tell CLS from patch tokens; use tokens='flatten'")
    if tokens == "cls" and int(npt) == 0:
        raise UsageError(f"tokens='cls' but layer {layer!r} has no prefix (CLS) token; use 'mean' or 'flatten'")
    if tokens == "mean" and shape[0] - int(npt) < 1:
        raise UsageError(f"layer {layer!r} has no patch tokens after its {npt} prefix tokens")
    return shape[1]


def _rows_to_features(x: np.ndarray, info: dict[str, Any], tokens: str, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """Stored rows (r, ...) → (r, f) features in ``dtype`` on ``device``; up-cast before any arithmetic.

    tokens (r, T, D): flatten → (r, T·D); mean → mean over the patch tokens (prefix tokens excluded);
    cls → token 0. maps (r, C, H, W): flatten → (r, C·H·W); mean → average over H, W. vectors unchanged.
    """
    t = _from_numpy(x).to(device).to(dtype)
    kind = layer_kind(info, "?")
    if kind == "tokens" and tokens == "mean":
        t = t[:, int(info["num_prefix_tokens"]):].mean(dim=1)
    elif kind == "tokens" and tokens == "cls":
        t = t[:, 0]
    elif kind == "map" and tokens == "mean":
        t = t.mean(dim=(2, 3))
    return t.reshape(t.shape[0], -1)


def _gather(store: StoreLike, layer: str, positions: np.ndarray, max_read_rows: int
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`repsim.store.reader.gather_rows` of ``layer``. (Batch plans follow store A's chunks; store B is read with
    the same rows, so when B's chunk size differs, or B is aligned by id in another order, a B chunk touched by
    two groups is read twice.)"""
    return gather_rows(lambda lo, hi: store.read(layer, lo, hi), positions, n=int(store.n),
                       chunk_size=int(store.chunk_size), max_read_rows=max_read_rows,
                       what=f"{store.path}: layer {layer!r}")


def _read_features(store: StoreLike, layer: str, positions: np.ndarray, info: dict[str, Any], tokens: str,
                   device: torch.device, dtype: torch.dtype, feat_dim: int, max_read_rows: int) -> torch.Tensor:
    """Features (len(positions), f) of ``layer`` at store rows ``positions``, in that order."""
    out = torch.empty((len(positions), feat_dim), dtype=dtype, device=device)
    for idx, rows in _gather(store, layer, positions, max_read_rows):
        run = consecutive_slice(idx)
        out[torch.from_numpy(idx).to(device) if run is None else run] = _rows_to_features(rows, info, tokens,
                                                                                          device, dtype)
    return out


def layer_features(store: StoreLike, layer: str, *, tokens: str = "flatten", positions: np.ndarray | None = None,
                   dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
    """One row of features per sample of ``layer``: (len(positions), f) in ``dtype``, read chunk by chunk.

    ``tokens`` as in :func:`cka_matrix` (flatten | mean over patch tokens or positions | cls);
    ``positions``: store rows to read, in that order (default all).
    """
    if tokens not in TOKEN_MODES:
        raise UsageError(f"tokens must be one of {', '.join(TOKEN_MODES)}, got {tokens!r}")
    info = store.layer_info(layer)
    dim = feature_width(info, layer, tokens)
    pos = np.arange(int(store.n), dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64)
    return _read_features(store, layer, pos, info, tokens, _resolve_device(device), dtype, dim,
                          max(int(store.chunk_size), 1024))


def aligned_positions(store_a: StoreLike, store_b: StoreLike | None, align: str = "fingerprint"
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Rows (pos_a, pos_b) of the samples two stores share (``align``: fingerprint | ids), with the numbers
    dropped; refuses stores holding different samples under ``fingerprint`` (see :func:`cka_matrix`)."""
    if align not in ALIGN_MODES:
        raise UsageError(f"align must be one of {', '.join(ALIGN_MODES)}, got {align!r}")
    return _align(store_a, store_b, align)


def select_layers(store: StoreLike, layers: Sequence[str] | None) -> list[str]:
    """``layers`` checked against the store, in the order given (the axes of a CKA map; a layer may repeat;
    default: all of the store's layers, in network order). :func:`probes.features.select_layers` differs: it
    sorts into network order and refuses repeats (one feature block per layer)."""
    if layers is None:
        out = list(store.layers)
    else:
        if isinstance(layers, str):
            layers = [layers]
        out = list(layers)
        check_layer_names(store.path, store.layers, out)
    if not out:
        raise UsageError(f"no layers selected from {store.path}")
    return out


def _first_difference(ids_a: list[str], ids_b: list[str]) -> str:
    for i, (a, b) in enumerate(zip(ids_a, ids_b)):
        if a != b:
            return f"first difference at row {i}: {a!r} vs {b!r}"
    i = min(len(ids_a), len(ids_b))
    extra = ids_a[i] if len(ids_a) > i else ids_b[i]
    return f"one is a prefix of the other; first extra id at row {i}: {extra!r}"


def _align(store_a: StoreLike, store_b: StoreLike | None, align: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Row positions (pos_a, pos_b) of the compared samples in each store, ordered by position in A."""
    n_a = int(store_a.n)
    if store_b is None or store_b is store_a:
        pos = np.arange(n_a, dtype=np.int64)
        return pos, pos, {"align": "fingerprint", "dropped_a": 0, "dropped_b": 0}
    if store_a.fingerprint == store_b.fingerprint and int(store_b.n) == n_a:
        pos = np.arange(n_a, dtype=np.int64)
        return pos, pos, {"align": "fingerprint", "dropped_a": 0, "dropped_b": 0}
    ids_a, ids_b = list(store_a.ids), list(store_b.ids)
    if align == "fingerprint":
        raise UsageError(
            f"{store_a.path} and {store_b.path} hold different samples (fingerprints differ, n = {n_a} vs "
            f"{store_b.n}; {_first_difference(ids_a, ids_b)}); extract both from the same data set, n and seed, "
            "or compare the samples both hold with --align ids (align='ids')"
        )
    for path, ids in ((store_a.path, ids_a), (store_b.path, ids_b)):
        if len(set(ids)) != len(ids):
            raise UsageError(f"{path} holds duplicate sample ids: cannot align by id")
    where_b = {s: i for i, s in enumerate(ids_b)}
    pos_a = np.array([i for i, s in enumerate(ids_a) if s in where_b], dtype=np.int64)
    if len(pos_a) == 0:
        raise UsageError(f"{store_a.path} and {store_b.path} have no sample id in common")
    pos_b = np.array([where_b[ids_a[i]] for i in pos_a], dtype=np.int64)
    return pos_a, pos_b, {"align": "ids", "dropped_a": n_a - len(pos_a), "dropped_b": int(store_b.n) - len(pos_a)}


def _model_name(store: StoreLike) -> str:
    name = getattr(store, "model_name", None)
    if name:
        return str(name)
    base = os.path.basename(str(store.path).rstrip("/"))
    return base[: -len(".zarr")] if base.endswith(".zarr") else base


def _repsim_version() -> str | None:
    try:
        import repsim

        return str(repsim.__version__)
    except Exception:  # noqa: BLE001 - provenance is best effort
        return None


def default_memory_budget() -> int:
    """Half the memory available now (bytes)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.5)
    except Exception:  # noqa: BLE001
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
        except (ValueError, OSError, AttributeError):
            return 8 << 30


@dataclass(eq=False)
class CKAResult(Result):
    """A layer × layer CKA map with what is needed to reproduce it.

    ``values[i, j]`` is the CKA of ``layers_a[i]`` and ``layers_b[j]`` (mean over repeats); ``std`` the
    sample standard deviation over repeats (same shape) or None. ``n`` is the number of samples compared;
    ``batch_size`` the requested minibatch size (None for exact / debiased) and ``batch_rows`` the
    [smallest, largest] batch actually formed.
    """

    result_kind: ClassVar[str] = "repsim.cka"

    layers_a: list[str]
    layers_b: list[str]
    values: np.ndarray
    estimator: str
    kernel: str
    tokens: str
    n: int
    batch_size: int | None
    repeats: int
    std: np.ndarray | None
    seed: int
    fingerprint_a: str
    fingerprint_b: str
    path_a: str
    path_b: str
    model_a: str = ""
    model_b: str = ""
    threshold: float | None = None
    align: dict[str, Any] = field(default_factory=dict)
    n_batches: int | None = None
    batch_rows: list[int] | None = None
    gram_dtype: str = "float32"
    device: str = "cpu"
    repsim_version: str | None = None
    exact_form: str | None = None  # exact estimator: "feature" (‖XᵀY‖²) or "gram" (n × n Grams)
    source: str = "activations"  # minibatch: "grams" (stored Gram tier) or "activations"
    plan: str | None = None  # minibatch: "contiguous" (consecutive store rows) or "shuffled" (seeded chunk plan)
    rows_used: int | None = None  # samples in the sums (a Gram tier leaves out a last chunk of < 4 rows)

    def to_json(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """The result as a JSON-ready dict (``values``/``std`` as lists of rows); written atomically to
        ``path`` when given (temporary file in the same folder, then ``os.replace``)."""
        d = asdict(self)
        d["values"] = np.asarray(self.values, dtype=float).tolist()
        d["std"] = None if self.std is None else np.asarray(self.std, dtype=float).tolist()
        return finish_result(d, "repsim.cka", path)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
        """``values`` / ``std`` as float64 arrays."""
        std = fields.get("std")
        return dict(fields, values=np.asarray(fields["values"], dtype=np.float64),
                    std=None if std is None else np.asarray(std, dtype=np.float64))

    def plot(self, path: str | os.PathLike | None, ax: Any = None) -> Any:
        """Layer × layer heat map (see :func:`repsim.plotting.cka_map.plot_cka`); saved to ``path``; returns the Axes."""
        from repsim.plotting.cka_map import plot_cka

        return plot_cka(self, path, ax=ax)


def cka_matrix(
    store_a: StoreLike,
    store_b: StoreLike | None = None,
    *,
    estimator: str = "minibatch",
    kernel: str = "linear",
    tokens: str = "flatten",
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    batch_size: int = 256,
    repeats: int = 1,
    seed: int = 0,
    device: str = "auto",
    threshold: float = 1.0,
    progress: bool = True,
    align: str = "fingerprint",
    gram_dtype: str = "float32",
    memory_budget: int | None = None,
    client: Any = None,
    plan: str = "auto",
    source: str = "auto",
) -> CKAResult:
    """CKA between every layer of ``store_a`` and every layer of ``store_b`` (or of ``store_a`` itself).

    ``estimator``: ``minibatch`` (default; Nguyen et al. 2021 sum form, linear kernel, ``batch_size`` rows per
    batch, see :func:`batch_plan`), ``exact`` (biased) or ``debiased`` (both on all n samples, one n × n
    Gram per layer, linear or rbf kernel; refused with a UsageError when the Grams would not fit in
    ``memory_budget`` bytes, default half the available memory). ``tokens``: how token / map layers become
    one row per sample (``flatten`` as in the papers, ``mean`` over patch tokens / spatial positions, ``cls``
    token 0). ``store_b=None`` gives the within-model map (each layer's Gram computed once, symmetric).
    Stores must hold the same samples (equal fingerprints) unless ``align="ids"``, which compares the ids
    both hold (the numbers dropped are recorded in ``result.align``). ``repeats`` (minibatch only)
    re-draws the batch plan with seeds ``[seed, r]`` and reports mean and std. ``device``: auto (CUDA when
    available), cpu, cuda[:N]. ``gram_dtype``: precision of the Gram products (float32 with TF32 off, or
    float64); all sums are float64. Minibatch memory: one chunk group of one layer's features (about
    ``max(batch_size, 2·chunk_size)`` rows) plus the U-centred Grams of that group's batches for every
    layer, independent of n. ``client``: a ``dask.distributed.Client``; the minibatch plan's groups then
    run as Dask tasks that read the stores by path (the stores must be reachable from the workers) and
    return partial sums, added here in float64 (equal to the local result up to summation order, ~1e-12).

    ``plan`` (minibatch): ``contiguous`` batches of consecutive store rows (the store order is a seeded random
    permutation, so each is a uniform random sample), ``shuffled`` (seeded groups of whole chunks, see
    :func:`batch_plan`; a fresh plan per repeat) or ``auto`` (contiguous for one repeat, shuffled for more).
    ``source``: ``grams`` reads the U-centred Grams stored by ``repsim extract --grams`` instead of the
    activations (no features read, no Gram formed: the contiguous plan with the store's chunks as batches,
    equal to the activation path with the same plan up to the float32 rounding of the stored Grams, ~1e-7);
    ``activations`` never does; ``auto`` uses the Grams whenever both stores hold them for the same samples
    and ``batch_size`` equals their batch rows, with ``tokens='flatten'``, one repeat and the linear kernel.
    ``result.source`` says which path was taken.
    """
    _check_estimator_and_kernel(estimator, kernel, threshold)
    _check_row_modes(tokens, align)
    _check_repeats_and_batches(estimator, repeats, client, batch_size)
    _check_plan_and_source(plan, source, repeats)
    gdt = _gram_dtype(gram_dtype)

    la, other, lb = _compared_layers(store_a, store_b, layers_a, layers_b)
    sb = store_a if other is None else other
    _require_complete((store_a,) if other is None else (store_a, other))
    pos_a, pos_b, align_info = _compared_samples(store_a, other, align, estimator)
    m = len(pos_a)
    use_grams = _use_stored_grams(store_a, other, estimator, kernel, tokens, repeats, plan, batch_size, align_info,
                                  source)
    side_a, side_b = _compared_sides(store_a, other, la, lb, pos_a, pos_b, tokens)
    dev = _resolve_device(device)

    plan_info: dict[str, Any] = {}
    std = None
    exact_form = None
    plan_kind = _minibatch_plan_kind(estimator, use_grams, plan, repeats)
    with _tf32_off():
        if use_grams:
            values, plan_info = _gram_tier_pass(side_a, side_b, dev, progress)
        elif estimator == "minibatch":
            values, std, plan_info = _minibatch_repeats(side_a, side_b, tokens, batch_size, seed, repeats, dev, gdt,
                                                        progress, client, plan_kind)
        else:
            values, exact_form = _exact_pass(side_a, side_b, tokens, estimator, kernel, threshold, dev, gdt,
                                             progress, memory_budget, batch_size)

    return CKAResult(
        layers_a=list(la), layers_b=list(lb), values=np.asarray(values, dtype=np.float64),
        estimator=estimator, kernel=kernel, tokens=tokens, n=m,
        batch_size=batch_size if estimator == "minibatch" else None, repeats=repeats, std=std, seed=seed,
        fingerprint_a=str(store_a.fingerprint), fingerprint_b=str(sb.fingerprint),
        path_a=str(store_a.path), path_b=str(sb.path), model_a=_model_name(store_a), model_b=_model_name(sb),
        threshold=threshold if kernel == "rbf" else None, align=align_info,
        n_batches=plan_info.get("n_batches"), batch_rows=plan_info.get("batch_rows"),
        gram_dtype=gram_dtype, device=str(dev), repsim_version=_repsim_version(), exact_form=exact_form,
        source="grams" if use_grams else "activations", plan=plan_kind,
        rows_used=plan_info.get("rows_used", m),
    )


# The argument checks of cka_matrix, in the order it runs them (the first problem found is the one reported).
def _check_estimator_and_kernel(estimator: str, kernel: str, threshold: float) -> None:
    """Refuse an unknown estimator or kernel, the rbf kernel with the minibatch estimator, and an RBF
    ``threshold`` (bandwidth as a fraction of the median distance) that is not > 0."""
    if estimator not in ESTIMATORS:
        raise UsageError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if kernel not in KERNELS:
        raise UsageError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "rbf" and estimator == "minibatch":
        raise UsageError("the rbf kernel is implemented for the exact and debiased estimators only; "
                         "use estimator='exact' or 'debiased', or kernel='linear'")
    if kernel == "rbf" and not threshold > 0:
        raise UsageError(f"RBF threshold must be > 0, got {threshold}")


def _check_row_modes(tokens: str, align: str) -> None:
    """Refuse an unknown ``tokens`` mode (how a layer becomes one row per sample) or ``align`` mode (how the
    two stores' samples are matched)."""
    if tokens not in TOKEN_MODES:
        raise UsageError(f"tokens must be one of {', '.join(TOKEN_MODES)}, got {tokens!r}")
    if align not in ALIGN_MODES:
        raise UsageError(f"align must be one of {', '.join(ALIGN_MODES)}, got {align!r}")


def _check_repeats_and_batches(estimator: str, repeats: int, client: Any, batch_size: int) -> None:
    """Refuse ``repeats`` < 1, repeats or a Dask client with a deterministic (exact / debiased) estimator, and
    minibatches (``batch_size`` rows) too small for the unbiased HSIC."""
    if repeats < 1:
        raise UsageError(f"repeats must be >= 1, got {repeats}")
    if repeats > 1 and estimator != "minibatch":
        raise UsageError(f"repeats only applies to the minibatch estimator ({estimator} is deterministic)")
    if client is not None and estimator != "minibatch":
        raise UsageError(f"distributed CKA (workers / scheduler) runs the minibatch estimator, not {estimator}")
    if estimator == "minibatch" and batch_size < MIN_UNBIASED:
        raise UsageError(f"batch size must be at least {MIN_UNBIASED} (unbiased HSIC), got {batch_size}")


def _check_plan_and_source(plan: str, source: str, repeats: int) -> None:
    """Refuse an unknown batch ``plan`` or data ``source``, and repeats with the fixed contiguous plan."""
    if plan not in PLANS:
        raise UsageError(f"plan must be one of {', '.join(PLANS)}, got {plan!r}")
    if source not in SOURCES:
        raise UsageError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if plan == "contiguous" and repeats > 1:
        raise UsageError("repeats > 1 re-draw the batch plan: use plan='shuffled' (or 'auto')")


def _compared_layers(store_a: StoreLike, store_b: StoreLike | None, layers_a: Sequence[str] | None,
                     layers_b: Sequence[str] | None) -> tuple[list[str], StoreLike | None, list[str]]:
    """(layers of A, the second store or None for the within-model map, layers of the second store).

    One store with a second layer list that differs from the first is a cross comparison of the store with
    itself (the second store is then ``store_a``); the within-model map uses A's layers on both axes.
    """
    la = select_layers(store_a, layers_a)
    if store_b is None and layers_b is not None and list(layers_b) != la:
        store_b = store_a  # two different layer lists of one store: a cross comparison
    if store_b is None:
        return la, None, la
    return la, store_b, select_layers(store_b, layers_b)


def _require_complete(stores: Sequence[StoreLike]) -> None:
    """Refuse an unfinished store, or one with damaged metadata, before any number is computed."""
    for s in stores:
        if hasattr(s, "require_complete"):
            s.require_complete()  # unfinished, or damaged metadata (e.g. lost chunk digests): one line, no number
        elif not s.complete:
            raise UsageError(f"{s.path} is incomplete (an extraction is unfinished or was killed): rerun the same "
                             "`repsim extract` command to finish it")


def _compared_samples(store_a: StoreLike, store_b: StoreLike | None, align: str, estimator: str
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Row positions (pos_a, pos_b), each (m,) int64, of the samples both stores hold (see :func:`_align`),
    refused when there are too few for the estimator (the unbiased HSIC needs ``MIN_UNBIASED``, any CKA 2)."""
    pos_a, pos_b, align_info = _align(store_a, store_b, align)
    m = len(pos_a)
    if estimator != "exact" and m < MIN_UNBIASED:
        raise UsageError(f"{estimator} CKA needs at least {MIN_UNBIASED} samples, got {m}")
    if m < 2:
        raise UsageError(f"CKA needs at least 2 samples, got {m}")
    return pos_a, pos_b, align_info


def _use_stored_grams(store_a: StoreLike, store_b: StoreLike | None, estimator: str, kernel: str, tokens: str,
                      repeats: int, plan: str, batch_size: int, align_info: dict[str, Any], source: str) -> bool:
    """Whether the map is computed from the stored Grams (``source``: auto | grams | activations); refuses
    ``source='grams'`` when they cannot serve the request, and a Grams-only store when they are not used."""
    why_not = _gram_tier_obstacle(store_a, store_b, estimator, kernel, tokens, repeats, plan, batch_size, align_info)
    if source == "grams" and why_not:
        raise UsageError(f"cannot use the stored Grams: {why_not}")
    use_grams = source != "activations" and not why_not
    if not use_grams:
        for s in (store_a,) if store_b is None else (store_a, store_b):
            if not getattr(s, "has_acts", True):
                raise UsageError(f"{s.path} holds only Grams (--no-acts) and they cannot serve this request: "
                                 f"{why_not or 'source=activations was asked for'}")
    return use_grams


def _compared_sides(store_a: StoreLike, store_b: StoreLike | None, la: list[str], lb: list[str],
                    pos_a: np.ndarray, pos_b: np.ndarray, tokens: str) -> tuple[_Side, _Side | None]:
    """The two axes of the map: each store with its layers, compared rows, layer infos and feature widths
    under ``tokens`` (the second side is None for the within-model map)."""
    infos_a = {layer: store_a.layer_info(layer) for layer in la}
    infos_b = infos_a if store_b is None else {layer: store_b.layer_info(layer) for layer in lb}
    dims_a = {layer: feature_width(infos_a[layer], layer, tokens) for layer in la}
    dims_b = dims_a if store_b is None else {layer: feature_width(infos_b[layer], layer, tokens) for layer in lb}
    side_a = _Side(store_a, la, pos_a, infos_a, dims_a)
    return side_a, None if store_b is None else _Side(store_b, lb, pos_b, infos_b, dims_b)


def _minibatch_plan_kind(estimator: str, use_grams: bool, plan: str, repeats: int) -> str | None:
    """The minibatch batch plan actually used (None for the exact / debiased estimators): the stored Grams
    fix the contiguous plan; ``auto`` is contiguous for one repeat and shuffled for more."""
    if estimator != "minibatch":
        return None
    return "contiguous" if use_grams or plan == "contiguous" or (plan == "auto" and repeats == 1) else "shuffled"


def _minibatch_repeats(a: _Side, b: _Side | None, tokens: str, batch_size: int, seed: int, repeats: int,
                       dev: torch.device, gdt: torch.dtype, progress: bool, client: Any, plan_kind: str | None
                       ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Minibatch CKA over ``repeats`` passes (plan seeds ``[seed, r]``): (mean map (La, Lb), sample std with
    ddof 1 over the passes or None for one pass, the last pass's plan facts)."""
    passes = []
    plan_info: dict[str, Any] = {}
    for r in range(repeats):
        vals, plan_info = _minibatch_pass(a, b, tokens, batch_size, _repeat_rng(seed, r), r, repeats, dev, gdt,
                                          progress, client=client, plan_kind=plan_kind)
        passes.append(vals)
    return np.mean(passes, axis=0), np.std(passes, axis=0, ddof=1) if repeats > 1 else None, plan_info


def _exact_pass(a: _Side, b: _Side | None, tokens: str, estimator: str, kernel: str, threshold: float,
                dev: torch.device, gdt: torch.dtype, progress: bool, memory_budget: int | None, batch_size: int
                ) -> tuple[np.ndarray, str]:
    """Exact (biased) or debiased CKA on all samples: (map (La, Lb), form used). Linear exact CKA uses the
    feature-space form (``"feature"``) when it fits ``memory_budget`` bytes (default half the available
    memory), else one n × n Gram per layer (``"gram"``)."""
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    if estimator == "exact" and kernel == "linear" and _feature_form_fits(a, b, len(a.pos), gdt, budget):
        return _exact_feature_form(a, b, tokens, dev, gdt, progress, batch_size), "feature"
    return _exact_matrix(a, b, tokens, estimator == "debiased", kernel, threshold, dev, gdt, progress, budget,
                         batch_size), "gram"


def _gram_tier_obstacle(store_a: StoreLike, store_b: StoreLike | None, estimator: str, kernel: str, tokens: str,
                        repeats: int, plan: str, batch_size: int, align_info: dict[str, Any]) -> str | None:
    """Why the stored Grams cannot give this CKA map (None when they can)."""
    stores = [store_a] if store_b is None else [store_a, store_b]
    infos = [getattr(s, "gram_info", None) for s in stores]
    missing = [s.path for s, g in zip(stores, infos) if not g]
    if missing:
        return f"{missing[0]} holds no Grams (extract with --grams)"
    if estimator != "minibatch" or kernel != "linear":
        return f"Grams serve the minibatch estimator with the linear kernel, not {estimator}/{kernel}"
    if tokens != infos[0]["tokens"]:
        return f"the Grams are of {infos[0]['tokens']!r} features, not tokens={tokens!r}"
    if repeats > 1 or plan == "shuffled":
        return "the Grams fix one batch plan (the store's chunks): repeats / a shuffled plan need activations"
    rows = {int(g["batch_rows"]) for g in infos}
    if len(rows) > 1:
        return f"the stores' Gram batches differ ({sorted(rows)} rows)"
    if batch_size != rows.pop():
        return (f"--batch-size {batch_size} differs from the Grams' batch of {infos[0]['batch_rows']} rows "
                f"(use --batch-size {infos[0]['batch_rows']})")
    if align_info.get("align") != "fingerprint" or align_info.get("dropped_a") or align_info.get("dropped_b"):
        return "the stores hold different samples (Grams need the same samples in the same order)"
    return None


def _gram_tier_pass(a: _Side, b: _Side | None, dev: torch.device, progress: bool,
                    block_chunks: int = 16) -> tuple[np.ndarray, dict[str, Any]]:
    """Minibatch CKA from stored Grams: Σ over chunks of packed dot products, ``block_chunks`` chunks of every
    layer at a time (La·block·m(m-1)/2 float64 values in memory)."""
    from tqdm.auto import tqdm

    store_a = a.store
    rows = store_a.gram_batch_rows()
    used = [c for c, m in enumerate(rows) if m > 0]
    acc = MinibatchCKA(len(a.layers), None if b is None else len(b.layers), device=dev)
    with tqdm(total=len(used), desc="CKA (Grams)", unit="batch", disable=not progress, leave=False) as bar:
        for c0 in range(0, store_a.n_chunks(), block_chunks):
            c1 = min(c0 + block_chunks, store_a.n_chunks())
            k = sum(1 for c in range(c0, c1) if rows[c] > 0)
            if k == 0:
                continue
            stacks = []
            for side in (a,) if b is None else (a, b):
                parts = []
                for layer in side.layers:
                    g = torch.from_numpy(np.asarray(side.store.read_grams(layer, c0, c1), dtype=np.float64))
                    if not bool(torch.isfinite(g).all()):
                        raise NumericalError(f"the stored Grams of layer {layer!r} in {side.store.path} hold NaN/Inf "
                                             f"(chunks {c0}..{c1 - 1}): the store is damaged, run `repsim verify`")
                    parts.append(g.reshape(-1))
                stack = torch.stack(parts).to(dev)
                stacks.append(stack)
            acc.update(stacks[0], None if b is None else stacks[1], what=f"Gram chunks {c0}..{c1 - 1}",
                       batches=k, samples=sum(rows[c0:c1]))
            bar.update(k)
    values = acc.result(a.layers, None if b is None else b.layers)
    sizes = [rows[c] for c in used]
    return values, {"n_batches": len(used), "batch_rows": [int(min(sizes)), int(max(sizes))],
                    "rows_used": int(sum(sizes))}


@dataclass
class _Side:
    store: StoreLike
    layers: list[str]
    pos: np.ndarray
    infos: dict[str, dict[str, Any]]
    dims: dict[str, int]


def _minibatch_pass(a: _Side, b: _Side | None, tokens: str, batch_size: int, rng: np.random.Generator,
                    repeat: int, repeats: int, dev: torch.device, gdt: torch.dtype, progress: bool,
                    client: Any = None, plan_kind: str = "shuffled") -> tuple[np.ndarray, dict[str, Any]]:
    """One pass over the data with a batch plan (``contiguous`` or a fresh ``shuffled`` one); returns (CKA
    matrix, plan facts).

    With a Dask ``client`` each plan group (whole chunks of store A, one or more batches) is a task that
    reads its rows from the stores by path and returns partial sums; the client adds them in float64.
    """
    from tqdm.auto import tqdm

    if plan_kind == "contiguous":
        plan = contiguous_plan(len(a.pos), batch_size)
    else:
        cs = int(a.store.chunk_size)
        chunk_of = a.pos // cs  # plan over store A's chunks: each is read once per pass
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.searchsorted(chunk_of[order], np.arange(int(chunk_of.max()) + 2))
        chunk_rows = [order[bounds[c]:bounds[c + 1]] for c in range(len(bounds) - 1)]
        plan = batch_plan(chunk_rows, batch_size, rng)
    sizes = [len(bt) for g in plan for bt in g.batches]
    acc = MinibatchCKA(len(a.layers), None if b is None else len(b.layers), device=dev)
    desc = "CKA" + (f" (repeat {repeat + 1}/{repeats})" if repeats > 1 else "")
    firsts = np.cumsum([0] + [len(g.batches) for g in plan])  # global number of each group's first batch
    with tqdm(total=len(sizes), desc=desc, unit="batch", disable=not progress, leave=False) as bar:
        if client is None:
            for group, first in zip(plan, firsts):
                acc.merge(_group_sums(a, b, group.batches, int(first), repeat, tokens, dev, gdt))
                bar.update(len(group.batches))
        else:
            from dask.distributed import as_completed

            spec_a, spec_b = _side_spec(a), None if b is None else _side_spec(b)
            futures = [client.submit(_remote_group_sums, spec_a, spec_b, group.batches, int(first), repeat,
                                     tokens, str(gdt).replace("torch.", ""), pure=False)
                       for group, first in zip(plan, firsts)]
            for future in as_completed(futures):
                part = future.result()
                acc.merge(part)
                bar.update(part.n_batches)
    values = acc.result(a.layers, None if b is None else b.layers)
    return values, {"n_batches": len(sizes), "batch_rows": [int(min(sizes)), int(max(sizes))], "rows_used": len(a.pos)}


def _group_sums(a: _Side, b: _Side | None, batches: Sequence[np.ndarray], first_batch: int, repeat: int,
                tokens: str, dev: torch.device, gdt: torch.dtype) -> MinibatchCKA:
    """Partial minibatch sums of one plan group: its rows are read once per layer, one Gram per layer and
    batch, all pairs from one product per batch."""
    acc = MinibatchCKA(len(a.layers), None if b is None else len(b.layers), device=dev)
    gname = "float64" if gdt == torch.float64 else "float32"
    rows = np.concatenate(batches)  # common-row indices, already shuffled
    edges = np.cumsum([0] + [len(bt) for bt in batches])
    stacks = []
    with _tf32_off():
        for side in (a,) if b is None else (a, b):
            grams = [torch.empty((len(side.layers), int(s) ** 2), dtype=torch.float64, device=dev)
                     for s in np.diff(edges)]
            max_read = max(len(rows), int(side.store.chunk_size))
            for li, layer in enumerate(side.layers):
                feats = _read_features(side.store, layer, side.pos[rows], side.infos[layer], tokens, dev, gdt,
                                       side.dims[layer], max_read)
                for j in range(len(batches)):
                    pos = side.pos[batches[j]]
                    what = (f"layer {layer!r} of {side.store.path}, batch {first_batch + j} of repeat {repeat} "
                            f"({len(pos)} samples, store rows {pos.min()}..{pos.max()})")
                    unbiased_gram(feats[edges[j]:edges[j + 1]], gram_dtype=gname, what=what, out=grams[j][li])
                del feats
            stacks.append(grams)
    for j in range(len(batches)):
        acc.update(stacks[0][j], None if b is None else stacks[1][j], what=f"batch {first_batch + j} of repeat {repeat}")
    return acc


_WORKER_STORES: dict[str, Any] = {}  # stores opened by Dask tasks in this worker process


def _side_spec(side: _Side) -> dict[str, Any]:
    """What a Dask worker needs to rebuild a :class:`_Side`: the store's path (or URL), not the open store."""
    attrs = getattr(side.store, "attrs", {})
    return {"path": str(side.store.path), "layers": list(side.layers), "pos": side.pos, "infos": side.infos,
            "dims": side.dims, "config": (attrs.get("config_hash"), attrs.get("created"))}


def _remote_group_sums(spec_a: dict[str, Any], spec_b: dict[str, Any] | None, batches: list[np.ndarray],
                       first_batch: int, repeat: int, tokens: str, gram_dtype: str) -> MinibatchCKA:
    """Dask task: open the stores on the worker, compute one group's partial sums on CPU."""
    from repsim.store.reader import open_store

    def side(spec: dict[str, Any]) -> _Side:
        key = (spec["path"], spec["config"])  # a store rewritten in place is reopened
        store = _WORKER_STORES.get(key)
        if store is None:  # opened once per worker process, not once per task
            store = _WORKER_STORES[key] = open_store(spec["path"])
        return _Side(store, spec["layers"], spec["pos"], spec["infos"], spec["dims"])

    return _group_sums(side(spec_a), None if spec_b is None else side(spec_b), batches, first_batch, repeat,
                       tokens, torch.device("cpu"), _gram_dtype(gram_dtype))


def _feature_form_fits(a: _Side, b: _Side | None, m: int, gdt: torch.dtype, budget: int) -> bool:
    """Use the feature-space form when every layer has fewer features than samples (no n × n Gram, fewer
    FLOPs) and A's centred features fit the memory budget."""
    sides = [a] if b is None else [a, b]
    if not all(d < m for s in sides for d in s.dims.values()):
        return False
    elem = 8 if gdt == torch.float64 else 4
    return (sum(a.dims.values()) + max(max(s.dims.values()) for s in sides)) * m * elem < budget


def _exact_feature_form(a: _Side, b: _Side | None, tokens: str, dev: torch.device, gdt: torch.dtype,
                        progress: bool, batch_size: int) -> np.ndarray:
    """Exact (biased) linear CKA in feature space (Kornblith et al. 2019, Sec. 3, "Linear CKA"): with
    column-centred X (n, p) and Y (n, q), CKA = ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F). A's centred features are held;
    B's layers are streamed. Products in ``gdt`` (TF32 off), squares and sums in float64."""
    from tqdm.auto import tqdm

    m = len(a.pos)
    max_read = max(int(a.store.chunk_size), batch_size, 1024)

    def centred(side: _Side, layer: str) -> tuple[torch.Tensor, float]:
        f = _read_features(side.store, layer, side.pos, side.infos[layer], tokens, dev, gdt, side.dims[layer],
                           max_read)
        what = f"layer {layer!r} of {side.store.path} (all {m} samples)"
        _check_finite(f, what)
        f -= f.mean(dim=0, dtype=torch.float64).to(gdt)  # centre before any product
        self_hsic = float((f.T @ f).to(torch.float64).pow(2).sum().sqrt())
        if not math.isfinite(self_hsic):
            raise NumericalError(f"non-finite self-HSIC of {what}")
        if self_hsic == 0:
            raise NumericalError(f"self-HSIC of {what} is 0 (constant activations): CKA is undefined")
        return f, self_hsic

    def cross(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x.T @ y).to(torch.float64).pow(2).sum())

    total = len(a.layers) + (0 if b is None else len(b.layers))
    with tqdm(total=total, desc="CKA (feature form)", unit="layer", disable=not progress, leave=False) as bar:
        xs = []
        for layer in a.layers:
            xs.append(centred(a, layer))
            bar.update(1)
        if b is None:
            values = np.eye(len(xs))
            for i in range(len(xs)):
                for j in range(i + 1, len(xs)):
                    values[i, j] = values[j, i] = cross(xs[i][0], xs[j][0]) / (xs[i][1] * xs[j][1])
        else:
            values = np.empty((len(a.layers), len(b.layers)))
            for j, layer in enumerate(b.layers):
                y, sy = centred(b, layer)
                for i, (x, sx) in enumerate(xs):
                    values[i, j] = cross(x, y) / (sx * sy)
                bar.update(1)
    return values


def _exact_matrix(a: _Side, b: _Side | None, tokens: str, debiased: bool, kernel: str, threshold: float,
                  dev: torch.device, gdt: torch.dtype, progress: bool, budget: int, batch_size: int) -> np.ndarray:
    """Full-data CKA: one n × n Gram per layer (one layer's features in memory at a time)."""
    from tqdm.auto import tqdm

    m = len(a.pos)
    sides = [a] if b is None else [a, b]
    elem = 8 if gdt == torch.float64 else 4
    max_feat = max(max(s.dims.values()) for s in sides)
    held = len(a.layers)  # A's normalised Grams are held; B's are streamed one at a time
    need = (held + 3) * m * m * 8 + m * max_feat * (elem + 2)
    if need > budget:
        raise UsageError(
            f"estimator {'debiased' if debiased else 'exact'} on n={m} samples needs about {need / 2**30:.1f} GiB "
            f"({held} held n×n float64 Grams plus the largest layer's features), over the memory budget of "
            f"{budget / 2**30:.1f} GiB: use estimator='minibatch' (or fewer layers / samples)"
        )
    max_read = max(int(a.store.chunk_size), batch_size, 1024)

    def normalised_gram(side: _Side, layer: str) -> np.ndarray:
        feats = _read_features(side.store, layer, side.pos, side.infos[layer], tokens, dev, gdt, side.dims[layer],
                               max_read)
        what = f"layer {layer!r} of {side.store.path} (all {m} samples)"
        _check_finite(feats, what)
        feats -= feats.mean(dim=0, dtype=torch.float64).to(gdt)  # centre before the Gram
        g = (feats @ feats.T).to(torch.float64)
        del feats
        g = ((g + g.T) / 2).cpu().numpy()
        if not np.isfinite(g).all():
            raise NumericalError(f"non-finite value in the Gram of {what}")
        if kernel == "rbf":
            sq = np.diag(g)
            d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)  # rounding only: distances are >= 0
            np.fill_diagonal(d2, 0.0)
            del g
            med = float(np.median(d2))
            if not med > 0:
                raise NumericalError(f"RBF bandwidth undefined for {what}: the median squared distance is 0")
            g = np.exp(-d2 / (2.0 * threshold**2 * med))
            del d2
        g = centre_gram(g, unbiased=debiased)
        nrm2 = float(np.vdot(g, g))
        if not math.isfinite(nrm2) or nrm2 < 0:
            raise NumericalError(f"self-HSIC of {what} is {nrm2}")
        if nrm2 == 0:
            raise NumericalError(f"self-HSIC of {what} is 0 (constant activations): CKA is undefined")
        return (g / math.sqrt(nrm2)).ravel()

    total = len(a.layers) + (0 if b is None else len(b.layers))
    with tqdm(total=total, desc="CKA (full Grams)", unit="layer", disable=not progress, leave=False) as bar:
        ga = np.empty((len(a.layers), m * m), dtype=np.float64)
        for i, layer in enumerate(a.layers):
            ga[i] = normalised_gram(a, layer)
            bar.update(1)
        if b is None:
            values = ga @ ga.T
            values = (values + values.T) / 2
        else:
            values = np.empty((len(a.layers), len(b.layers)))
            for j, layer in enumerate(b.layers):
                values[:, j] = ga @ normalised_gram(b, layer)
                bar.update(1)
    return values
