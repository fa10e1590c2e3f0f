"""Intervals behind comparative claims (used by `repsim demo`'s report and the probes): every one with its uncertainty.

Pure numpy / torch helpers, no store or plotting code, so each one can be checked against an independent
reference (see ``tests/test_demo.py``):

- :func:`wilson_interval`: score interval of a binomial proportion (an accuracy on n test images);
  :func:`newcombe_difference`: the hybrid score interval of a difference of two proportions (Newcombe 1998,
  method 10), computed as if the two were independent: for two probes scored on the *same* test images (positively
  correlated) it is conservative (wider than a paired interval).
- :func:`bootstrap_mean`: percentile bootstrap over images of a mean of per-image values (or of a paired
  difference of two per-image values).
- :class:`HalfSampleCKA`: debiased (U-centred) linear CKA between every layer pair of two feature sets, on all
  n images, and on ``R`` random halves of the images drawn *without* replacement. The bootstrap with replacement
  would put copies of one image into the U-statistic as if they were distinct pairs, which inflates debiased CKA
  (the library's own ``bootstrap_interval`` notes this upward bias); a half-sample holds every image at most once,
  and for an asymptotically linear statistic its spread over halves equals the sampling spread at n
  (finite-population correction: var(n/2 of n) = σ²(2/n − 1/n) = σ²/n; McCarthy 1969, Efron 1982 Sec. 8).
  Any statistic of the CKA matrix (a decay, a correspondence slope) is computed on every half, and its percentile
  interval over halves is reported.
- :func:`correspondence`: where each layer of A finds its most similar layer of B, and the least-squares slope
  of that best-match relative depth on A's relative depth (1: a diagonal band, 0: every layer of A matches the
  same depth of B).
- :func:`verdict` / :func:`ci_text`: the words a sentence may use given an interval: ``"higher"`` /
  ``"lower"`` only when the interval excludes the null value, else ``"not resolved"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from repsim.measures.gram import u_centre

LEVEL = 0.95
N_RESAMPLES = 200
HALF_SAMPLE_METHOD = ("half-sampling: {r} random halves of the n images drawn without replacement (seeded); "
                      "debiased linear CKA on each half; percentile interval of the statistic over halves "
                      "(its spread approximates the sampling spread at n for asymptotically linear statistics; "
                      "with-replacement copies would bias the U-statistic upwards)")


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2.0)


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of the proportion ``successes / n`` (fractions in [0, 1])."""
    if n <= 0:
        return float("nan"), float("nan")
    z = _z(level)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, level: float = LEVEL) -> tuple[float, float, float]:
    """``(p1 − p2, low, high)``: Newcombe's hybrid score interval (1998, method 10) from the two Wilson intervals."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, level)
    l2, u2 = wilson_interval(k2, n2, level)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, low, high


def percentile_interval(samples: Any, level: float = LEVEL) -> tuple[float, float]:
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(s, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def bootstrap_mean(values: Any, other: Any = None, *, n_boot: int = 1000, seed: int = 0,
                   level: float = LEVEL) -> dict[str, float]:
    """Percentile bootstrap over images of ``mean(values)`` (or of ``mean(values − other)``, paired by image).

    Non-finite entries (images where the per-image value is undefined) are dropped first (pairwise when
    ``other`` is given). Returns ``value``, ``low``, ``high``, ``n`` (images used), ``n_boot``, ``level``.
    """
    v = np.asarray(values, dtype=np.float64)
    if other is not None:
        v = v - np.asarray(other, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "n_boot": n_boot,
                "level": level}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = percentile_interval(means, level)
    return {"value": float(v.mean()), "low": lo, "high": hi, "n": int(v.size), "n_boot": n_boot, "level": level}


def bootstrap_paired(fn: Callable[..., float], *arrays: Any, n_boot: int = 1000, seed: int = 0,
                     level: float = LEVEL) -> dict[str, float]:
    """Percentile bootstrap over images of a statistic ``fn(*arrays)`` of per-image arrays (each (n,), rows
    paired by image): every replicate resamples the same image indices in all arrays, so a statistic of
    several models' results on the same images keeps their pairing (e.g. a ratio of mean accuracies, which
    :func:`bootstrap_mean` cannot express). Returns ``value`` (on all images), ``low``, ``high``, ``n``,
    ``n_boot``, ``level``; replicates where ``fn`` is not finite are dropped before the percentiles.
    """
    xs = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = xs[0].shape[0]
    if any(x.shape[0] != n for x in xs):
        raise ValueError("bootstrap_paired needs arrays of equal length (one value per image)")
    rng = np.random.default_rng(seed)
    reps = np.array([fn(*(x[idx] for x in xs)) for idx in rng.integers(0, n, size=(n_boot, n))], dtype=np.float64)
    lo, hi = percentile_interval(reps[np.isfinite(reps)], level)
    return {"value": float(fn(*xs)), "low": lo, "high": hi, "n": int(n), "n_boot": n_boot, "level": level}


def verdict(low: float, high: float, null: float = 0.0) -> str:
    """``"higher"`` when the interval lies above ``null``, ``"lower"`` when below, else ``"not resolved"``."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "not resolved"
    if low > null:
        return "higher"
    if high < null:
        return "lower"
    return "not resolved"


def ci_text(value: float, low: float, high: float, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    """``"0.05 [0.03, 0.07]"``: the value with its interval (``scale`` 100 and unit "%" for percentages)."""
    f = f"{{:.{digits}f}}"
    return (f"{f.format(scale * value)}{unit} [{f.format(scale * low)}, {f.format(scale * high)}]"
            if np.isfinite(low) and np.isfinite(high) else f"{f.format(scale * value)}{unit}")


def statistic(value: float, low: float, high: float, **extra: Any) -> dict[str, Any]:
    """A summary.json entry: ``value``, ``low``, ``high``, ``level``, ``verdict`` (against 0) and extras."""
    return {"value": float(value), "low": float(low), "high": float(high), "level": LEVEL,
            "verdict": verdict(low, high), **extra}


# ----------------------------------------------------------------------------------------------------
# Debiased CKA on all images and on half-samples
# ----------------------------------------------------------------------------------------------------


def _u_centre(k: np.ndarray) -> np.ndarray:
    """U-centring (:func:`repsim.measures.gram.u_centre`, Székely–Rizzo 2014), in place, of a stack (L, m, m) of symmetric
    float64 Grams. numpy memory throughout: these are many small O(m²) steps, which torch would spread over its
    thread pool at a cost far above the work (a 64 × 64 half-sample block took 13 ms with 2 threads on a busy
    2-core machine, 0.2 ms with one)."""
    for gram in k:
        g = torch.from_numpy(gram)
        u_centre(g, out=g)
    return k


def _cka_from(ka: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """Debiased CKA matrix (La, Lb) from stacks of U-centred Grams (La, m, m), (Lb, m, m)."""
    fa, fb = ka.reshape(ka.shape[0], -1), kb.reshape(kb.shape[0], -1)
    hab = fa @ fb.T
    na = np.sqrt(np.maximum(np.einsum("ij,ij->i", fa, fa), 0.0))
    nb = np.sqrt(np.maximum(np.einsum("ij,ij->i", fb, fb), 0.0))
    return hab / (na[:, None] * nb[None, :])


def _gram_stack(grams: Mapping[str, Any]) -> np.ndarray:
    """(L, n, n) float64 stack of the Grams (numpy arrays or CPU tensors)."""
    return np.stack([np.asarray(g.detach().cpu() if isinstance(g, torch.Tensor) else g, dtype=np.float64)
                     for g in grams.values()])


def centred_gram(x: Any) -> torch.Tensor:
    """float64 (n, n) Gram of features (n, ...) flattened per image and centred over the n images first."""
    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    t = t.reshape(t.shape[0], -1)
    t = t - t.mean(0, keepdim=True)
    return t @ t.T


class HalfSampleCKA:
    """Debiased linear CKA between the layers of two models (or one) from their Grams, with half-samples.

    ``grams_a`` / ``grams_b``: dicts layer → (n, n) Gram (:func:`centred_gram`) of the same n images;
    ``grams_b=None``: within one model. A half-sample's Gram is a sub-matrix of the full one (U-centring removes
    the centring constants, so this equals the debiased CKA of the half's own features).
    """

    def __init__(self, grams_a: Mapping[str, Any], grams_b: Mapping[str, Any] | None = None, *,
                 resamples: int = N_RESAMPLES, seed: int = 0):
        self.layers_a = list(grams_a)
        self.layers_b = list(grams_b if grams_b is not None else grams_a)
        self._ka = _gram_stack(grams_a)
        self._kb = self._ka if grams_b is None else _gram_stack(grams_b)
        self.n = int(self._ka.shape[-1])
        if self._kb.shape[-1] != self.n:
            raise ValueError("both models' Grams must be over the same n images")
        if self.n < 8:
            raise ValueError(f"half-sampling needs at least 8 images, got {self.n}")
        self.resamples, self.seed = int(resamples), int(seed)
        self.observed = self._matrix(None)
        rng = np.random.default_rng(seed)
        self.halves = [np.sort(rng.permutation(self.n)[: self.n // 2]) for _ in range(self.resamples)]
        self.replicates = (np.stack([self._matrix(h) for h in self.halves]) if self.resamples
                           else np.zeros((0, len(self.layers_a), len(self.layers_b))))

    @classmethod
    def from_features(cls, feats_a: Mapping[str, Any], feats_b: Mapping[str, Any] | None = None,
                      **kwargs: Any) -> "HalfSampleCKA":
        """From features (layer → (n, ...)) instead of Grams."""
        ga = {k: centred_gram(v) for k, v in feats_a.items()}
        gb = None if feats_b is None else {k: centred_gram(v) for k, v in feats_b.items()}
        return cls(ga, gb, **kwargs)

    def _matrix(self, rows: np.ndarray | None) -> np.ndarray:
        def sub(k: np.ndarray) -> np.ndarray:  # a new array: U-centring works in place
            return k.copy() if rows is None else k[:, rows[:, None], rows[None, :]]

        ua = _u_centre(sub(self._ka))
        ub = ua if self._kb is self._ka else _u_centre(sub(self._kb))
        return _cka_from(ua, ub)

    def interval(self, fn: Callable[[np.ndarray], float], level: float = LEVEL) -> dict[str, Any]:
        """``fn`` (a statistic of a CKA matrix) on all images and its percentile interval over the halves."""
        value = float(fn(self.observed))
        reps = np.array([fn(m) for m in self.replicates], dtype=np.float64)
        lo, hi = percentile_interval(reps, level)
        return statistic(value, lo, hi, method=HALF_SAMPLE_METHOD.format(r=self.resamples), n=self.n)


def correspondence(values: np.ndarray) -> dict[str, Any]:
    """Best match of every row layer among the columns: ``best`` (indices), relative depths, and ``slope``,
    the least-squares slope of the best match's relative depth (j / (Lb − 1)) on the row's (i / (La − 1)).

    ``slope`` is 1 for a diagonal band, 0 when every row matches the same depth of B (including the case of
    one constant best match, where a correlation would be undefined), negative for a reversed order.
    """
    v = np.asarray(values, dtype=np.float64)
    la, lb = v.shape
    best = v.argmax(axis=1)
    x = np.arange(la) / max(la - 1, 1)
    y = best / max(lb - 1, 1)
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum()) if la > 1 else float("nan")
    return {"best": best.tolist(), "best_relative_depth": y.round(4).tolist(), "slope": slope}


def adjacent_minus_far(values: np.ndarray) -> float:
    """Mean CKA of adjacent layers (|i − j| = 1) minus the CKA of the first and last layer of a square map."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.mean(np.diag(v, 1)) - v[0, -1])


__all__ = [
    "HalfSampleCKA", "LEVEL", "centred_gram", "N_RESAMPLES", "adjacent_minus_far", "bootstrap_mean",
    "bootstrap_paired", "ci_text", "correspondence", "newcombe_difference", "percentile_interval", "statistic",
    "verdict", "wilson_interval",
]
