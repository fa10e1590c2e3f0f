"""Array-level representational similarity measures beyond CKA ("Beyond CKA"): Procrustes shape metrics, the
CCA family (mean CCA, R²_CCA, SVCCA, PWCCA), RSA, mutual k-NN, plus permutation nulls and bootstrap intervals.

Every measure compares two representations of the *same* n samples: ``X`` (n, p) and ``Y`` (n, q), samples as
rows, features as columns (numpy or torch, any real dtype; computed in float64). ``p`` and ``q`` may differ.
Pooled per-layer features from two stores fit directly: ``similarity(store_a.read(la), store_b.read(lb))``.

Entry points
------------
``similarity(X, Y, measure, **options) -> float``          the value.
``similarity_details(X, Y, measure, **options) -> dict``    the value plus what was done to get it (ranks, kept
                                                            dimensions, canonical correlations, notes, warnings).
``permutation_null(X, Y, measure, n_perm, seed, **options)``  observed value, null distribution, p-value.
``bootstrap_interval(X, Y, measure, n_boot, seed, level, **options)``  percentile interval over images.
``MEASURES: dict[str, MeasureSpec]``                         the registry: orientation, range, identity value,
                                                            invariances, citation, options and function.

Measures (``MEASURES`` holds the same facts in machine-readable form)
--------------------------------------------------------------------
Notation: ``X̃ = HX`` column-centred (``H = I - 11ᵀ/n``); ``X̂ = X̃ / ‖X̃‖_F``; ``Q_X`` (n, k_x) an orthonormal basis
of the column space of ``X̃`` (from its SVD, numerical rank ``s_i > s_1 · max(n, p) · eps``, as numpy's
``matrix_rank``); ``ρ_1 ≥ … ≥ ρ_m`` (``m = min(k_x, k_y)``) the canonical correlations, i.e. the singular values
of ``Q_Xᵀ Q_Y`` (Björck & Golub 1973; Kornblith et al. 2019, Table 1).

``procrustes``         Williams, Kunz, Kornblith & Linderman (2021), "Generalized Shape Metrics on Neural
                       Representations", NeurIPS: the angular shape metric with the orthogonal group
                       (their α = 1): ``θ = min_Q arccos⟨X̂, ŶQ⟩ = arccos ν`` with ``ν = ‖X̂ᵀŶ‖_*`` (nuclear norm;
                       the smaller side is implicitly zero-padded when p ≠ q). A metric: radians in [0, π/2].
``procrustes_1mnu``    ``1 − ν`` in [0, 1] (a monotone transform of the same quantity, not a metric).
``procrustes_euclid``  ``√(2 − 2ν) = min_Q ‖X̂ − ŶQ‖_F`` in [0, √2], the Euclidean (chordal) Procrustes metric
                       on unit-norm shapes (Williams et al. 2021; Ding, Denain & Steinhardt 2021).
``cca``                mean canonical correlation ``ρ̄ = Σρ_i / m`` (Kornblith et al. 2019, Table 1, "ρ̄_CCA").
``cca_r2``             ``R²_CCA = Σρ_i² / m`` (Kornblith et al. 2019, Table 1). Both divide by ``m = min(k_x, k_y)``,
                       so both are symmetric.
``svcca``              Raghu, Gilmer, Yosinski & Sohl-Dickstein (2017), "SVCCA", NeurIPS: keep the top singular
                       directions of each centred side explaining ``keep`` (default 0.99) of its variance
                       (``s_i²``), then the mean canonical correlation of the two reduced sides. ``keep`` may also be
                       an int: that many directions (as the google/svcca tutorials do).
``pwcca``              Morcos, Raghu & Bengio (2018), "Insights on representational similarity in neural networks
                       with canonical correlation", NeurIPS, projection weighting: ``Σ α_i ρ_i / Σ α_i``
                       with ``α_i = Σ_j |⟨h_i, x̃_j⟩|``, ``h_i`` the i-th unit-norm canonical variate of the weighted
                       side and ``x̃_j`` its j-th centred feature (neuron) column. See "PWCCA conventions" below.
``pwcca_reference``    the same measure computed exactly as the widely used reference code does (google/svcca
                       ``pwcca.compute_pwcca``), to reproduce published PWCCA values; see "pwcca_reference"
                       below for where it differs from ``pwcca``. Option ``epsilon`` (default 0, as the reference).
``rsa``                Kriegeskorte, Mur & Bandettini (2008), "Representational similarity analysis": the
                       representational dissimilarity matrix (RDM) of each side (``rdm="correlation"``:
                       ``1 − Pearson(x_i, x_j)`` between samples, or ``"euclidean"``: ``‖x_i − x_j‖``), compared by
                       the Spearman (default) or Pearson correlation of their upper triangles (k = 1, the diagonal
                       excluded). In [−1, 1].
``mknn``               Huh, Cheung, Wang & Isola (2024), "The Platonic Representation Hypothesis", ICML,
                       mutual k-nearest-neighbour alignment: ``mean_i |N_k(i; X) ∩ N_k(i; Y)| / k`` with
                       neighbourhoods by cosine similarity of the (uncentred) rows, the sample itself excluded.
                       As ``mutual_knn`` in the authors' platonic-rep ``metrics.py`` (L2-normalised rows, self
                       excluded), without their pipeline's clamping of features at the 95th percentile of |x|
                       (do that upstream if wanted).
``jaccard_knn``        the same neighbourhoods compared by ``mean_i |∩| / |∪|`` (the k-NN Jaccard similarity of
                       Klabunde, Schumacher, Strohmaier & Lemmerich 2025, ACM Computing Surveys 57(9), "Similarity of
                       Neural Network Models", neighbourhood-based measures).
``cka``, ``cka_debiased``, ``cka_rbf``  delegated to :func:`repsim.measures.cka_engine.cka` (linear biased, linear with the
                       unbiased HSIC, RBF kernel with ``threshold``); see that module for definitions.

CCA on too few samples (the degenerate case)
--------------------------------------------
Centred samples live in an (n − 1)-dimensional space, so whenever ``rank(X̃) + rank(Ỹ) > n − 1`` the two column
spaces intersect and at least ``rank(X̃) + rank(Ỹ) − (n − 1)`` canonical correlations equal 1 by dimension counting
alone (all of them when p ≥ n): mean CCA would report a meaningless ≈ 1. ``cca``, ``cca_r2`` and ``pwcca`` then
reduce each side by SVD before CCA: the top directions explaining ``keep`` (default 0.99) of the variance, and then,
if the kept dimensions still sum above n − 1, a cap so that ``k_x + k_y ≤ n − 1`` (the larger side is cut to
``n − 1 − k_small`` when the smaller side fits in ⌊(n − 1)/2⌋, otherwise both to ⌊(n − 1)/2⌋). ``svcca`` applies the
same cap after its own reduction. The reduction is never silent: :func:`similarity` emits a
:class:`SimilarityWarning` and :func:`similarity_details` reports ``rank_x``, ``dims_x``, ``variance_kept_x`` (and
for Y), ``reduced`` and the reason under ``warnings``. Even below the bound CCA is biased upwards when k/n is not
small (it fits k_x·k_y parameters); compare against :func:`permutation_null` rather than against 0. A rank-deficient
side (collinear features) is not degenerate by itself: CCA then works in its column space and ``notes`` says so.
Repeated samples (rows identical in X and Y alike: bootstrap copies, a duplicated image) shrink the space: n above
is then the number of *distinct* samples (reported as ``n_distinct``).

PWCCA conventions (what differs from the google/svcca code, and why)
--------------------------------------------------------------------
Morcos et al.'s code (google/svcca ``pwcca.compute_pwcca``) takes activations as *neurons × datapoints*; here
samples are rows, so their ``acts1`` is ``X.T``, their "neurons" are our feature columns and their
``np.dot(P.T, acts.T)`` is our ``Hᵀ X̃`` (k × p). Kept from the official code: the weighted side is the one with
fewer CCA dimensions (their ``sum(x_idxs) <= sum(y_idxs)``; ties → X), so ``pwcca(X, Y)`` and ``pwcca(Y, X)`` agree
when the CCA dimensions differ and may differ when they tie (``weighted="x"`` or ``"y"`` forces a side; extra
canonical directions of a larger weighted side have ρ = 0, since they are orthogonal to the other side); weights are
``Σ_j |·|`` over that side's neurons, normalised to sum 1; the correlations are all ``m`` of them (no trailing-zero
trimming). Deliberately different: the official code builds its "directions" as ``u.T @ (acts - mean) + mean`` with
``u`` the left singular vectors of the *whitened* cross-covariance, omitting ``Σ_xx^{-1/2}``, so they are not the
canonical variates the paper defines; adding the means back also makes its value depend on a translation of the data
and on the arbitrary signs LAPACK gives to ``u``. Here ``h_i`` are the true canonical variates (``Q_X U``, already
orthonormal and centred), which gives the paper's definition, translation-invariant and sign-free. The two coincide
when the weighted side is centred with orthonormal (whitened) columns; ``tests/test_similarity.py`` checks that
against a transcription of the official function. The official ``else`` branch also indexes ``acts1`` where it means
``acts2`` (google/svcca PR #9); the Y-weighted branch here uses Y.

pwcca_reference (the reference code's numbers)
----------------------------------------------
``pwcca_reference(X, Y, epsilon=0)`` equals google/svcca ``compute_pwcca(X.T, Y.T, epsilon)[0]`` (pwcca.py, with
``cca_core.get_cca_similarity``; checked to 1e-8 against a line-by-line transcription in
``tests/test_similarity.py``), so values published with that code can be reproduced. Where it differs from the
paper-exact ``pwcca``:

1. Weights. The reference takes ``u`` (left singular vectors of ``Σ_xx^{-1/2} Σ_xy Σ_yy^{-1/2}`` of the rescaled
   covariances) and forms "directions" ``uᵀ(acts − mean) + mean`` over the datapoints, omitting ``Σ_xx^{-1/2}``
   (its own ``compute_dirns`` includes it), then orthonormalises them by QR; the weight of correlation i is
   ``Σ_j |⟨P_i, a_j⟩|`` with ``a_j`` the *uncentred* j-th neuron. ``pwcca`` uses the canonical variates
   ``h_i`` (``Σ_xx^{-1/2}`` included, centred, unit norm) against the centred neurons. The reference's weights
   therefore depend on a translation of the weighted side, on its conditioning and on the signs LAPACK gives
   to ``u``; they coincide with ``pwcca``'s when that side is centred with orthonormal columns.
2. Side. The reference weights the side with fewer *neurons* kept (``sum(x_idxs) <= sum(y_idxs)``, ties → X);
   ``pwcca`` the side with fewer CCA dimensions after its rank / degeneracy reduction. When Y has fewer
   neurons the reference's ``else`` branch uses ``acts1[y_idxs]`` where it means ``acts2`` (an IndexError in
   current numpy; google/svcca PR #9 fixes it): here that branch follows the fix.
3. Epsilon. The covariance blocks are first divided by their largest absolute entry; neurons whose rescaled
   variance is below ``epsilon`` are dropped and ``epsilon`` is added to the rescaled diagonals before the
   pseudo-inverse (so it is relative to the largest variance, not absolute). With neurons dropped the
   reference's ``compute_pwcca`` fails on a shape mismatch (all neurons' means against the kept neurons); here
   the kept neurons' means are used. With ``epsilon = 0`` a rank-deficient block leaves eigenvalues of its
   pseudo-inverse at ±rounding, so the reference returns a number, NaN or an SVD failure by rounding luck:
   where the square root is NaN this raises :class:`NumericalError` (pass ``epsilon > 0``) instead.
4. No dimension reduction, no clipping: the correlations are the singular values as computed (all
   ``min(k_x, k_y)`` of them, no trailing-zero trimming); ``p ≥ n`` is refused (the reference asserts fewer
   neurons than datapoints for ``acts1``), and ``k_x + k_y > n − 1`` (correlations forced to 1) is warned
   about, not reduced.

Uncertainty
-----------
:func:`permutation_null` shuffles the pairing (rows of Y) with ``numpy.random.default_rng(seed)``; p-value
``(1 + #{null at least as extreme}) / (1 + n_perm)``, "extreme" meaning at least as similar as observed (≥ for
similarities, ≤ for distances; one-sided: "more similar than chance"). What does not change under a permutation is
computed once: Procrustes keeps each side's (n, min(n, p)) shape factor and needs one min(n, p) × min(n, q) SVD per
permutation; the CCA family keeps its orthonormal bases (the n × p SVDs are done once) and needs one k_x × k_y SVD;
RSA and k-NN permute precomputed RDM ranks / neighbour lists; CKA permutes precomputed centred Grams (n ≤ 4096).
:func:`bootstrap_interval` resamples images with replacement (rows of X and Y together) and reports the percentile
interval. Bootstrap duplicates are handled per measure: RSA drops the dissimilarities between copies of the same
image (they are 0 in both RDMs and would inflate agreement; as rsatoolbox's ``RDMs.subsample_pattern`` does for its
bootstrap); mknn / jaccard_knn find neighbours among the *distinct* resampled images and weight each by its
multiplicity (copies would otherwise be each other's nearest neighbours in both spaces). Distinct images are ~63 %
of n, so k-NN neighbourhoods are wider in a resample; read its interval as a spread, not as an unbiased interval.
Covariance- and Gram-based measures take duplicates as repeated rows (the usual bootstrap; for debiased CKA a copy
pair enters the U-statistic as a distinct pair, a known upward bias); the CCA family computes each resample on its
distinct images weighted by their counts (the same value, fewer rows) and bounds its dimensions by the number of
distinct images (see above).

Numerics: float64 throughout (float16 / bfloat16 inputs are up-cast first); features are centred before any
product; deterministic (no randomness outside the seeded resampling; ties in neighbour rankings are broken by the
lower sample index). Bad input (shape, sample count, non-finite values, unknown option) raises
:class:`repsim.errors.UsageError`; data on which a measure is undefined (a constant representation, a constant RDM)
raises :class:`repsim.measures.cka_engine.NumericalError`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from difflib import get_close_matches
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from repsim.measures.cka_engine import NumericalError, centre_gram, cka as _cka, gram_linear, gram_rbf
from repsim.errors import UsageError

__all__ = [
    "MEASURES",
    "MeasureSpec",
    "NumericalError",
    "SimilarityWarning",
    "bootstrap_interval",
    "canonical_correlations",
    "permutation_null",
    "similarity",
    "similarity_details",
]

_EPS = np.finfo(np.float64).eps
_GRAM_PERMUTE_MAX_N = 4096  # CKA permutation fast path holds two n × n float64 matrices
_RHO_SLACK = 1e-8  # a canonical correlation / ν above 1 by more than this is a bug, not rounding


class SimilarityWarning(UserWarning):
    """A measure's value needed a documented adjustment (e.g. CCA dimension reduction); see the details' notes."""


Impl = Callable[[np.ndarray, np.ndarray, dict[str, Any], "np.ndarray | None"], tuple[float, dict[str, Any]]]
Prepared = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class MeasureSpec:
    """Metadata and entry point of one measure (one entry of :data:`MEASURES`).

    ``kind``: ``"similarity"`` (higher = more alike) or ``"distance"`` (lower = more alike, 0 for identical
    inputs). ``range``: the attainable (low, high) interval of the value (radians for the angular Procrustes
    metric, unitless otherwise). ``identity_value``: the value of ``(X, X)``. ``needs_all_samples``: True when the
    value depends on n × n relations between samples (an RDM, neighbourhoods, a Gram), so all n rows must be in
    memory together (O(n²)); False when it depends on the data only through column means and the covariance
    blocks Σ_xx, Σ_xy, Σ_yy, which a streaming caller can accumulate chunk by chunk in O((p + q)²) memory.
    ``symmetric``: ``f(X, Y) == f(Y, X)``. ``min_samples``: the smallest n accepted. ``options``: accepted keyword
    options and their defaults. ``invariances``: transformations (of either side) that leave the value unchanged.
    ``function(X, Y, **options) -> float`` computes it (the same as ``similarity(X, Y, name, **options)``).
    """

    name: str
    kind: str
    range: tuple[float, float]
    identity_value: float
    needs_all_samples: bool
    description: str
    citation: str
    symmetric: bool
    min_samples: int
    options: Mapping[str, Any]
    invariances: tuple[str, ...]
    bootstrap_note: str
    function: Callable[..., float] = field(repr=False, compare=False)
    _impl: Impl = field(repr=False, compare=False)
    _permuter: Callable[[np.ndarray, np.ndarray, dict[str, Any]], Prepared] | None = field(
        default=None, repr=False, compare=False)
    _resampler: Callable[[np.ndarray, np.ndarray, dict[str, Any]], Prepared] | None = field(
        default=None, repr=False, compare=False)

    @property
    def higher_is_more_similar(self) -> bool:
        """True for similarities, False for distances."""
        return self.kind == "similarity"

    @property
    def orientation(self) -> str:
        """One line for tables and CLI output, e.g. ``"distance: lower = more similar, 0 = identical"``."""
        if self.kind == "similarity":
            return f"similarity: higher = more similar, {_fmt(self.identity_value)} = identical"
        return f"distance: lower = more similar, {_fmt(self.identity_value)} = identical"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata (everything but the function)."""
        return {
            "name": self.name, "kind": self.kind, "orientation": self.orientation, "range": list(self.range),
            "identity_value": self.identity_value, "needs_all_samples": self.needs_all_samples,
            "symmetric": self.symmetric, "min_samples": self.min_samples, "options": dict(self.options),
            "invariances": list(self.invariances), "description": self.description, "citation": self.citation,
            "bootstrap_note": self.bootstrap_note,
        }


def _fmt(v: float) -> str:
    return "π/2" if math.isclose(v, math.pi / 2) else f"{v:g}"


# ----------------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------------


def _as_matrix(a: Any, name: str) -> np.ndarray:
    """numpy / torch (n, features) → float64 (n, features); UsageError on anything else or non-finite values."""
    if isinstance(a, torch.Tensor):
        if a.is_complex():
            raise UsageError(f"{name} must be real-valued, got a complex tensor")
        a = a.detach().cpu()
        if a.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16; up-cast before any arithmetic
            a = a.float()
        a = a.numpy()
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{name} must be a numeric array of shape (n, features): {e}") from e
    if arr.dtype.kind not in "biuf":
        raise UsageError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise UsageError(f"{name} must be 2-D (n samples as rows, features as columns), got shape {arr.shape}; "
                         "pool or flatten token / spatial dimensions first")
    if arr.shape[1] == 0:
        raise UsageError(f"{name} has no features (shape {arr.shape})")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise UsageError(f"{name} holds a non-finite value (NaN or Inf; first at sample {bad[0]}, feature {bad[1]})")
    return arr


def _spec(measure: str) -> MeasureSpec:
    if not isinstance(measure, str) or measure not in MEASURES:
        hint = get_close_matches(str(measure), list(MEASURES), n=1)
        raise UsageError(f"unknown similarity measure {measure!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; known: {', '.join(MEASURES)}")
    return MEASURES[measure]


def _prepare(x: Any, y: Any, measure: str, options: dict[str, Any]
             ) -> tuple[MeasureSpec, np.ndarray, np.ndarray, dict[str, Any]]:
    spec = _spec(measure)
    xa = _as_matrix(x, "X")
    ya = _as_matrix(y, "Y")
    if xa.shape[0] != ya.shape[0]:
        raise UsageError(f"X and Y must hold the same samples (rows), got {xa.shape[0]} and {ya.shape[0]} rows")
    if xa.shape[0] < spec.min_samples:
        raise UsageError(f"{spec.name} needs at least {spec.min_samples} samples, got {xa.shape[0]}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        accepted = ", ".join(spec.options) if spec.options else "none"
        raise UsageError(f"measure {spec.name!r} has no option {', '.join(map(repr, unknown))} "
                         f"(its options: {accepted})")
    opts = dict(spec.options)
    opts.update(options)
    return spec, xa, ya, opts


def _centre(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


# ----------------------------------------------------------------------------------------------------
# Procrustes shape metrics (Williams et al. 2021)
# ----------------------------------------------------------------------------------------------------


def _shape_factor(x: np.ndarray, name: str) -> np.ndarray:
    """A (n, r) matrix ``A`` with ``AAᵀ = X̂X̂ᵀ`` (X̂ centred, unit Frobenius norm), r = min(n, p).

    ``‖X̂ᵀŶ‖_* = ‖AᵀB‖_*`` for any such factors (X̂ = A Oᵀ with orthonormal O), so p > n costs an n × n problem.
    Row i of A belongs to sample i, so permuting the samples permutes the rows of A.
    """
    xc = _centre(x)
    nrm = float(np.linalg.norm(xc))
    if nrm == 0.0:
        raise NumericalError(f"{name} is constant across samples (zero variance after centring): the Procrustes "
                             "shape metric is undefined")
    xh = xc / nrm
    if xh.shape[1] <= xh.shape[0]:
        return xh
    u, s, _ = np.linalg.svd(xh, full_matrices=False)
    return u * s


def _nu(a: np.ndarray, b: np.ndarray) -> float:
    nu = float(np.linalg.svd(a.T @ b, compute_uv=False).sum())
    if not nu <= 1.0 + _RHO_SLACK:
        raise NumericalError(f"Procrustes ν = {nu!r} exceeds 1: a numerical failure")
    return min(max(nu, 0.0), 1.0)  # ν ∈ [0, 1] exactly; only rounding (~1e-16) is removed here


_PROCRUSTES_VALUE: dict[str, Callable[[float], float]] = {
    "procrustes": lambda nu: math.acos(nu),
    "procrustes_1mnu": lambda nu: 1.0 - nu,
    "procrustes_euclid": lambda nu: math.sqrt(max(2.0 - 2.0 * nu, 0.0)),
}


def _procrustes_impl(variant: str) -> Impl:
    to_value = _PROCRUSTES_VALUE[variant]

    def impl(x: np.ndarray, y: np.ndarray, opts: dict[str, Any], groups: np.ndarray | None
             ) -> tuple[float, dict[str, Any]]:
        nu = _nu(_shape_factor(x, "X"), _shape_factor(y, "Y"))
        return to_value(nu), {"nu": nu}

    return impl


def _procrustes_permuter(variant: str) -> Callable[[np.ndarray, np.ndarray, dict[str, Any]], Prepared]:
    to_value = _PROCRUSTES_VALUE[variant]

    def prepare(x: np.ndarray, y: np.ndarray, opts: dict[str, Any]) -> Prepared:
        a, b = _shape_factor(x, "X"), _shape_factor(y, "Y")
        return lambda perm: to_value(_nu(a, b[perm]))

    return prepare


# ----------------------------------------------------------------------------------------------------
# CCA family
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Side:
    """One side prepared for CCA: centred data, its SVD, numerical rank and the kept orthonormal basis."""

    centred: np.ndarray  # (n, p)
    u: np.ndarray  # (n, min(n, p)) left singular vectors of the centred data
    s: np.ndarray  # singular values, descending
    rank: int
    k: int = 0  # dimensions kept for CCA

    @property
    def basis(self) -> np.ndarray:
        """(n, k) orthonormal basis of the kept column space (top-k left singular vectors)."""
        return self.u[:, :self.k]

    @property
    def variance_kept(self) -> float:
        v = self.s[:self.rank] ** 2
        return float(v[:self.k].sum() / v.sum())


def _side(x: np.ndarray, name: str, weights: np.ndarray | None = None) -> _Side:
    """SVD of the centred data. ``weights`` (counts of distinct rows, e.g. bootstrap copies): rows are centred on
    the weighted mean and scaled by √w, which has the singular values of the expanded data and left singular
    vectors with the same inner products (``Dᵀ D = W`` for the duplication matrix D), so CCA is unchanged."""
    if weights is None:
        xc = _centre(x)
    else:
        w = weights.astype(np.float64)
        xc = (x - (w @ x) / w.sum()) * np.sqrt(w)[:, None]
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    tol = s[0] * max(xc.shape) * _EPS if s.size else 0.0
    rank = int((s > tol).sum())
    if rank == 0:
        raise NumericalError(f"{name} is constant across samples (rank 0 after centring): canonical correlations "
                             "are undefined")
    return _Side(xc, u, s, rank, rank)


def _n_keep(side: _Side, keep: float | int) -> int:
    """Directions kept by the ``keep`` rule: a variance fraction in (0, 1] or an int count (≤ rank)."""
    if isinstance(keep, numbers.Integral):
        return min(int(keep), side.rank)
    var = side.s[:side.rank] ** 2
    frac = np.cumsum(var) / var.sum()
    return min(int(np.searchsorted(frac, keep, side="left")) + 1, side.rank)


def _check_keep(keep: Any) -> float | int:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise UsageError(f"keep must be a variance fraction in (0, 1] or an integer >= 1, got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise UsageError(f"keep as a number of directions must be >= 1, got {keep}")
        return int(keep)
    if not 0.0 < float(keep) <= 1.0:
        raise UsageError(f"keep as a variance fraction must be in (0, 1], got {keep}")
    return float(keep)


def _cap(kx: int, ky: int, n: int) -> tuple[int, int]:
    """Largest dimensions (≤ kx, ky) with kx + ky ≤ n − 1, so that no canonical correlation is forced to 1."""
    room = n - 1
    if kx + ky <= room:
        return kx, ky
    half = room // 2
    if kx <= half:
        return kx, room - kx
    if ky <= half:
        return room - ky, ky
    return half, half


def _n_distinct_rows(x: np.ndarray, y: np.ndarray) -> int:
    """Number of distinct joint rows ``[x_i, y_i]`` (exact comparison; −0.0 counts as 0.0)."""
    xy = np.ascontiguousarray(np.concatenate([x, y], axis=1) + 0.0)
    return int(np.unique(xy.view(np.dtype((np.void, xy.dtype.itemsize * xy.shape[1]))).ravel()).size)


def _collapse(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One row per distinct group (bootstrap copies) with its count as weight; unchanged when groups is None."""
    if groups is None:
        return x, y, None
    _, first, counts = np.unique(groups, return_index=True, return_counts=True)
    return x[first], y[first], counts


def _cca_sides(x: np.ndarray, y: np.ndarray, mode: str, keep: float | int, weights: np.ndarray | None = None
               ) -> tuple[_Side, _Side, dict[str, Any]]:
    """Prepare both sides for CCA (``mode`` "cca" or "svcca"); returns the sides and the facts to report.

    The dimension bound is the number of *distinct* samples minus 1: centred columns of data whose rows repeat
    (bootstrap copies, duplicated images) live in that smaller space. ``weights``: rows are distinct, with counts.
    """
    n_total = int(weights.sum()) if weights is not None else x.shape[0]
    n = x.shape[0] if weights is not None else _n_distinct_rows(x, y)
    if n < 3:
        raise NumericalError(f"CCA needs at least 3 distinct samples, got {n}")
    sx, sy = _side(x, "X", weights), _side(y, "Y", weights)
    notes: list[str] = []
    warns: list[str] = []
    bound = "n − 1" if n == n_total else "distinct samples − 1"
    if n < n_total:
        notes.append(f"{n_total - n} of the {n_total} samples repeat others (in X and Y alike): the CCA dimension "
                     f"bound is distinct samples − 1 = {n - 1}")
    if mode == "svcca":
        sx.k, sy.k = _n_keep(sx, keep), _n_keep(sy, keep)
        notes.append(f"SVD step kept {sx.k} of rank {sx.rank} directions of X and {sy.k} of {sy.rank} of Y "
                     f"(keep={keep})")
    elif sx.rank + sy.rank > n - 1:
        sx.k, sy.k = _n_keep(sx, keep), _n_keep(sy, keep)
        warns.append(
            f"CCA is degenerate on these data: rank(X̃) + rank(Ỹ) = {sx.rank} + {sy.rank} > {bound} = {n - 1}, "
            f"which forces at least {sx.rank + sy.rank - (n - 1)} canonical correlations to 1; each side was reduced "
            f"by SVD (keep={keep} of the variance")
    for side, nm in ((sx, "X"), (sy, "Y")):
        if side.rank < min(side.centred.shape[1], n - 1):
            notes.append(f"{nm} has numerical rank {side.rank} < {side.centred.shape[1]} features: CCA uses its "
                         f"{side.rank}-dimensional column space")
    kx, ky = _cap(sx.k, sy.k, n)
    if (kx, ky) != (sx.k, sy.k):
        msg = (f"capped to {kx} + {ky} ≤ {bound} = {n - 1} dimensions so that no canonical correlation is 1 by "
               "dimension counting")
        if warns:
            warns[-1] += f", then {msg})"
        else:
            warns.append(f"SVCCA kept {sx.k} + {sy.k} > {bound} = {n - 1} dimensions; {msg}")
        sx.k, sy.k = kx, ky
    elif warns:
        warns[-1] += ")"
    if warns:
        warns.append(f"CCA on {sx.k} + {sy.k} dimensions from {n} distinct samples is biased upwards when "
                     "dimensions / n is not small; compare with permutation_null")
    info = {
        "n_distinct": n, "rank_x": sx.rank, "rank_y": sy.rank, "dims_x": sx.k, "dims_y": sy.k,
        "variance_kept_x": sx.variance_kept, "variance_kept_y": sy.variance_kept,
        "reduced": (sx.k, sy.k) != (sx.rank, sy.rank), "notes": notes, "warnings": warns,
    }
    return sx, sy, info


def _rhos(m: np.ndarray) -> np.ndarray:
    rho = np.linalg.svd(m, compute_uv=False)
    return _clip_rho(rho)


def _clip_rho(rho: np.ndarray) -> np.ndarray:
    if rho.size and not rho[0] <= 1.0 + _RHO_SLACK:
        raise NumericalError(f"a canonical correlation is {rho[0]!r} > 1: a numerical failure")
    return np.clip(rho, 0.0, 1.0)  # singular values of Q_xᵀQ_y lie in [0, 1]; only rounding is removed


_CCA_SUMMARY: dict[str, Callable[[np.ndarray], float]] = {
    "cca": lambda rho: float(rho.mean()),
    "cca_r2": lambda rho: float((rho**2).mean()),
    "svcca": lambda rho: float(rho.mean()),
}


def _cca_impl(name: str) -> Impl:
    summary = _CCA_SUMMARY[name]
    mode = "svcca" if name == "svcca" else "cca"

    def impl(x: np.ndarray, y: np.ndarray, opts: dict[str, Any], groups: np.ndarray | None
             ) -> tuple[float, dict[str, Any]]:
        x, y, weights = _collapse(x, y, groups)
        sx, sy, info = _cca_sides(x, y, mode, _check_keep(opts["keep"]), weights)
        rho = _rhos(sx.basis.T @ sy.basis)
        info["canonical_correlations"] = rho.tolist()
        return summary(rho), info

    return impl


def _cca_permuter(name: str) -> Callable[[np.ndarray, np.ndarray, dict[str, Any]], Prepared]:
    summary = _CCA_SUMMARY[name]
    mode = "svcca" if name == "svcca" else "cca"

    def prepare(x: np.ndarray, y: np.ndarray, opts: dict[str, Any]) -> Prepared:
        sx, sy, _ = _cca_sides(x, y, mode, _check_keep(opts["keep"]))  # singular values ignore row order
        qx, qy = sx.basis, sy.basis
        return lambda perm: summary(_rhos(qx.T @ qy[perm]))

    return prepare


def _pwcca_from(qx: np.ndarray, qy: np.ndarray, cx: np.ndarray, cy: np.ndarray, side: str
                ) -> tuple[float, np.ndarray, np.ndarray]:
    """PWCCA from orthonormal bases and the projections ``C = Qᵀ X̃`` (k × p) of the centred features.

    Canonical variates ``H_X = Q_X U`` (n, k_x), ``H_Y = Q_Y V`` (n, k_y) from ``Q_XᵀQ_Y = U diag(ρ) Vᵀ``; the weight
    of variate i is ``Σ_j |(Hᵀ X̃)_ij| = Σ_j |(Uᵀ C_X)_ij|``. Returns (value, weights, correlations padded to k).
    """
    u, rho, vt = np.linalg.svd(qx.T @ qy, full_matrices=True)
    rho = _clip_rho(rho)
    proj = u.T @ cx if side == "x" else vt @ cy
    alpha = np.abs(proj).sum(axis=1)
    total = alpha.sum()
    if not total > 0:
        raise NumericalError(f"PWCCA weights of {side.upper()} sum to {total}: undefined")
    alpha = alpha / total
    rho_full = np.zeros(alpha.shape[0])
    rho_full[:rho.size] = rho  # directions beyond min(k_x, k_y) are orthogonal to the other side: ρ = 0
    return float(alpha @ rho_full), alpha, rho_full


def _pwcca_setup(x: np.ndarray, y: np.ndarray, opts: dict[str, Any], weights: np.ndarray | None = None
                 ) -> tuple[_Side, _Side, dict[str, Any], str]:
    weighted = _check_choice(opts["weighted"], "weighted", ("auto", "x", "y"))
    sx, sy, info = _cca_sides(x, y, "cca", _check_keep(opts["keep"]), weights)
    side = ("x" if sx.k <= sy.k else "y") if weighted == "auto" else weighted
    info["weighted_side"] = side.upper()
    return sx, sy, info, side


def _pwcca_impl(x: np.ndarray, y: np.ndarray, opts: dict[str, Any], groups: np.ndarray | None
                ) -> tuple[float, dict[str, Any]]:
    x, y, weights = _collapse(x, y, groups)
    sx, sy, info, side = _pwcca_setup(x, y, opts, weights)
    qx, qy = sx.basis, sy.basis
    cx = qx.T @ sx.centred if side == "x" else None
    cy = qy.T @ sy.centred if side == "y" else None
    value, alpha, rho = _pwcca_from(qx, qy, cx, cy, side)  # type: ignore[arg-type]
    info["canonical_correlations"] = rho[:min(sx.k, sy.k)].tolist()
    info["weights"] = alpha.tolist()
    return value, info


def _pwcca_permuter(x: np.ndarray, y: np.ndarray, opts: dict[str, Any]) -> Prepared:
    sx, sy, _, side = _pwcca_setup(x, y, opts)
    qx, qy = sx.basis, sy.basis
    # Permuting Y's rows permutes Q_Y's rows and Ỹ's rows alike, so C_Y = Q_YᵀỸ does not change.
    cx = qx.T @ sx.centred if side == "x" else None
    cy = qy.T @ sy.centred if side == "y" else None
    return lambda perm: _pwcca_from(qx, qy[perm], cx, cy, side)[0]  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# PWCCA as the google/svcca reference code computes it (``pwcca_reference``)
# ----------------------------------------------------------------------------------------------------


def _ref_invsqrt(a: np.ndarray) -> np.ndarray:
    """google/svcca ``cca_core.positivedef_matrix_sqrt(np.linalg.pinv(a))``: the eigen square root of the
    pseudo-inverse, as the reference computes it (NaN where rounding leaves a pinv eigenvalue below 0)."""
    w, v = np.linalg.eigh(np.linalg.pinv(a))
    with np.errstate(invalid="ignore"):
        wsqrt = np.sqrt(w)
    return np.dot(v, np.dot(np.diag(wsqrt), np.conj(v).T))


def _pwcca_reference_impl(x: np.ndarray, y: np.ndarray, opts: dict[str, Any], groups: np.ndarray | None
                          ) -> tuple[float, dict[str, Any]]:
    """PWCCA with the arithmetic of google/svcca ``pwcca.compute_pwcca(acts1=X.T, acts2=Y.T, epsilon)``
    (which calls ``cca_core.get_cca_similarity``), step by step; the module docstring ("pwcca_reference")
    lists where that differs from the paper-exact ``pwcca``. ``x`` (n, p), ``y`` (n, q); bootstrap copies
    (``groups``) are simply repeated datapoints, as they would be for the reference code."""
    eps = opts["epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps >= 0):
        raise UsageError(f"epsilon must be a finite number >= 0, got {eps!r}")
    eps = float(eps)
    n, p = x.shape
    q = y.shape[1]
    if p >= n:
        raise UsageError(f"pwcca_reference reproduces google/svcca, whose get_cca_similarity requires fewer "
                         f"neurons than datapoints in acts1 (X): X has {p} features for {n} samples; use 'pwcca' "
                         "(which reduces degenerate CCA by SVD and says so) or reduce X first")
    # get_cca_similarity: np.cov (ddof = 1) of the stacked neurons, each block rescaled by its max |entry|
    cov = np.cov(np.ascontiguousarray(x.T), np.ascontiguousarray(y.T))  # neurons × datapoints, as the reference
    sxx, sxy, syy = cov[:p, :p], cov[:p, p:], cov[p:, p:]
    xmax, ymax = float(np.max(np.abs(sxx))), float(np.max(np.abs(syy)))
    for m, nm in ((xmax, "X"), (ymax, "Y")):
        if not m > 0:
            raise NumericalError(f"{nm} is constant across samples: canonical correlations are undefined")
    sxx = sxx / xmax
    syy = syy / ymax
    sxy = sxy / np.sqrt(xmax * ymax)
    # remove_small: neurons whose *rescaled* variance is below epsilon are dropped
    xk = np.abs(np.diagonal(sxx)) >= eps
    yk = np.abs(np.diagonal(syy)) >= eps
    if not xk.any() or not yk.any():
        raise NumericalError(f"every neuron of {'X' if not xk.any() else 'Y'} has rescaled variance below "
                             f"epsilon = {eps:g}: the reference code returns no correlations")
    sxx = sxx[xk][:, xk]
    syy = syy[yk][:, yk]
    sxy = sxy[xk][:, yk]
    # compute_ccas: epsilon on the rescaled diagonals, pinv, eigen square root, SVD of the whitened cross-covariance
    sxx = sxx + eps * np.eye(sxx.shape[0])
    syy = syy + eps * np.eye(syy.shape[0])
    ix, iy = _ref_invsqrt(sxx), _ref_invsqrt(syy)
    arr = np.dot(ix, np.dot(sxy, iy))
    if not np.all(np.isfinite(arr)):
        raise NumericalError("the google/svcca arithmetic gives NaN here: a covariance block is rank-deficient "
                             "(pinv leaves eigenvalues that round below 0 and their square root is NaN); the "
                             "reference's users pass epsilon > 0 (e.g. 1e-6, as its robust_cca_similarity), or use "
                             "'pwcca'")
    u, rho, vh = np.linalg.svd(arr)
    rho = np.abs(rho)
    kx, ky = int(xk.sum()), int(yk.sum())
    # compute_pwcca: the side with fewer kept neurons (ties → X); its "directions" are coefᵀ(acts − mean) + mean
    side = "x" if kx <= ky else "y"
    coef, acts = (u.T, x[:, xk]) if side == "x" else (vh, y[:, yk])
    mean = acts.mean(axis=0)
    dirns = np.dot(coef, (acts - mean).T) + mean[:, None]  # (k, n): rows = directions over the datapoints
    pq, _ = np.linalg.qr(dirns.T)  # (n, k)
    alpha = np.sum(np.abs(np.dot(pq.T, acts)), axis=1)  # Σ over the side's (uncentred) neurons
    total = float(alpha.sum())
    if not total > 0 or not math.isfinite(total):
        raise NumericalError(f"PWCCA weights of {side.upper()} sum to {total}: undefined")
    alpha = alpha / total
    value = float(np.sum(alpha * rho))
    warns: list[str] = []
    notes = [f"google/svcca compute_pwcca arithmetic (epsilon = {eps:g}); weighted side {side.upper()} "
             f"({min(kx, ky)} kept neurons ≤ {max(kx, ky)}, ties → X)"]
    if kx < p or ky < q:
        notes.append(f"epsilon = {eps:g} dropped {p - kx} neuron(s) of X and {q - ky} of Y (rescaled variance "
                     "below epsilon); the reference's compute_pwcca then fails on a shape mismatch, here the kept "
                     "neurons' means are used")
    if side == "y":
        notes.append("Y weighted: the reference's else branch indexes acts1 where it means acts2 (google/svcca PR "
                     "#9; it raises an IndexError there in current numpy); this follows the fix")
    if kx + ky > n - 1:
        warns.append(f"CCA is degenerate on these data: {kx} + {ky} neurons > n − 1 = {n - 1} forces at least "
                     f"{kx + ky - (n - 1)} canonical correlations to 1; the reference code does not reduce "
                     "(use 'pwcca', which does and says so)")
    info = {"weighted_side": side.upper(), "weights": alpha.tolist(), "canonical_correlations": rho.tolist(),
            "neurons_kept_x": kx, "neurons_kept_y": ky, "notes": notes, "warnings": warns}
    return value, info


def canonical_correlations(x: Any, y: Any, *, keep: float | int | None = None) -> np.ndarray:
    """Canonical correlations (descending, float64) of ``x`` (n, p) and ``y`` (n, q) on centred features.

    ``keep=None``: CCA on the full column spaces, with the degenerate-case reduction described in the module
    docstring (a :class:`SimilarityWarning` says when it happens). ``keep`` given: the SVCCA reduction first
    (variance fraction or count). Length ``min(k_x, k_y)``.
    """
    measure, opts = ("cca", {}) if keep is None else ("svcca", {"keep": keep})
    d = similarity_details(x, y, measure, **opts)
    if d["warnings"]:
        warnings.warn("; ".join(d["warnings"]), SimilarityWarning, stacklevel=2)
    return np.asarray(d["canonical_correlations"], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------
# RSA
# ----------------------------------------------------------------------------------------------------


def _rdm(x: np.ndarray, kind: str, name: str) -> np.ndarray:
    """(n, n) float64 RDM with zero diagonal: ``1 − Pearson(x_i, x_j)`` or ``‖x_i − x_j‖`` (feature units)."""
    if kind == "correlation":
        if x.shape[1] < 2:
            raise UsageError(f"the correlation RDM needs at least 2 features, {name} has {x.shape[1]}")
        z = x - x.mean(axis=1, keepdims=True)
        nrm = np.linalg.norm(z, axis=1)
        if not (nrm > 0).all():
            i = int(np.argmin(nrm))
            raise NumericalError(f"sample {i} of {name} is constant across features: its correlation distance "
                                 "is undefined (use rdm='euclidean')")
        z /= nrm[:, None]
        d = 1.0 - z @ z.T
    else:
        xc = _centre(x)  # distances are translation invariant; centring keeps the Gram well scaled
        g = xc @ xc.T
        sq = np.diag(g)
        d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0))  # max(): rounding only, d² ≥ 0
    d = (d + d.T) / 2.0
    np.fill_diagonal(d, 0.0)
    return d


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    for nm, v in (("X", na), ("Y", nb)):
        if v == 0.0:
            raise NumericalError(f"the RDM of {nm} is constant (all dissimilarities equal): RSA is undefined")
    return float(np.clip((a @ b) / na / nb, -1.0, 1.0))


def _rsa_compare(dx: np.ndarray, dy: np.ndarray, compare: str) -> float:
    if compare == "spearman":
        return _pearson(rankdata(dx), rankdata(dy))  # average ranks for ties, as scipy.stats.spearmanr
    return _pearson(dx, dy)


def _rsa_opts(opts: dict[str, Any]) -> tuple[str, str]:
    return (_check_choice(opts["rdm"], "rdm", ("correlation", "euclidean")),
            _check_choice(opts["compare"], "compare", ("spearman", "pearson")))


def _triangle(d: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    i, j = np.triu_indices(d.shape[0], k=1)
    if groups is not None:  # drop pairs of copies of one image (bootstrap duplicates)
        keep = groups[i] != groups[j]
        i, j = i[keep], j[keep]
    return d[i, j]


def _rsa_impl(x: np.ndarray, y: np.ndarray, opts: dict[str, Any], groups: np.ndarray | None
              ) -> tuple[float, dict[str, Any]]:
    kind, compare = _rsa_opts(opts)
    tx, ty = _triangle(_rdm(x, kind, "X"), groups), _triangle(_rdm(y, kind, "Y"), groups)
    if tx.size < 3:
        raise UsageError(f"RSA needs at least 3 distinct sample pairs, got {tx.size}")
    return _rsa_compare(tx, ty, compare), {"n_pairs": int(tx.size)}


def _rsa_permuter(x: np.ndarray, y: np.ndarray, opts: dict[str, Any]) -> Prepared:
    kind, compare = _rsa_opts(opts)
    n = x.shape[0]
    iu = np.triu_indices(n, k=1)
    mats = []
    for arr, nm in ((x, "X"), (y, "Y")):
        t = _rdm(arr, kind, nm)[iu]
        t = rankdata(t) if compare == "spearman" else t  # ranks of a permuted triangle are permuted ranks
        t = t - t.mean()
        nrm = float(np.linalg.norm(t))
        if nrm == 0.0:
            raise NumericalError(f"the RDM of {nm} is constant (all dissimilarities equal): RSA is undefined")
        m = np.zeros((n, n))
        m[iu] = t / nrm
        mats.append(m + m.T)
    cx, cy = mats
    return lambda perm: float(np.clip((cx * cy[np.ix_(perm, perm)]).sum() / 2.0, -1.0, 1.0))


def _rsa_resampler(x: np.ndarray, y: np.ndarray, opts: dict[str, Any]) -> Prepared:
    kind, compare = _rsa_opts(opts)
    dx, dy = _rdm(x, kind, "X"), _rdm(y, kind, "Y")  # a dissimilarity depends on its two samples only

    def value(idx: np.ndarray) -> float:
        sub = np.ix_(idx, idx)
        return _rsa_compare(_triangle(dx[sub], idx), _triangle(dy[sub], idx), compare)

    return value


# ----------------------------------------------------------------------------------------------------
# Mutual k-nearest neighbours
# ----------------------------------------------------------------------------------------------------


def _cosine(x: np.ndarray, name: str) -> np.ndarray:
    nrm = np.linalg.norm(x, axis=1)
    if not (nrm > 0).all():
        raise NumericalError(f"sample {int(np.argmin(nrm))} of {name} is the zero vector: its cosine "
                             "similarity is undefined")
    z = x / nrm[:, None]
    if float(np.ptp(z, axis=0).max()) <= 1e-12:
        raise NumericalError(f"all samples of {name} point in the same direction (a constant representation up to "
                             "scale): cosine neighbourhoods are undefined")
    return z @ z.T


def _neighbours(sim: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of the k most similar other samples per row; ties → lower index (stable sort)."""
    s = sim.copy()
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def _overlap(nx: np.ndarray, ny: np.ndarray) -> np.ndarray:
    """|N_x(i) ∩ N_y(i)| per row (neighbour lists hold distinct indices)."""
    n = nx.shape[0]
    member = np.zeros((n, n), dtype=bool)
    rows = np.arange(n)[:, None]
    member[rows, nx] = True
    return member[rows, ny].sum(axis=1)


def _knn_score(name: str, counts: np.ndarray, k: int, weights: np.ndarray | None = None) -> float:
    c = counts.astype(np.float64)
    per = c / k if name == "mknn" else c / (2 * k - c)
    return float(np.average(per, weights=weights))


def _knn_k(opts: dict[str, Any], n_distinct: int) -> int:
    k = _check_int(opts["k"], "k", 1)
    if k >= n_distinct:
        raise UsageError(f"k = {k} neighbours need at least k + 1 = {k + 1} distinct samples, got {n_distinct}")
    return k


def _knn_impl(name: str) -> Impl:
    def impl(x: np.ndarray, y: np.ndarray, opts: dict[str, Any], groups: np.ndarray | None
             ) -> tuple[float, dict[str, Any]]:
        weights = None
        if groups is not None:  # one neighbourhood per distinct image, weighted by its number of copies
            _, first, weights = np.unique(groups, return_index=True, return_counts=True)
            x, y = x[first], y[first]
        k = _knn_k(opts, x.shape[0])
        counts = _overlap(_neighbours(_cosine(x, "X"), k), _neighbours(_cosine(y, "Y"), k))
        return _knn_score(name, counts, k, weights), {"k": k}

    return impl


def _knn_permuter(name: str) -> Callable[[np.ndarray, np.ndarray, dict[str, Any]], Prepared]:
    def prepare(x: np.ndarray, y: np.ndarray, opts: dict[str, Any]) -> Prepared:
        k = _knn_k(opts, x.shape[0])
        n = x.shape[0]
        nx, ny = _neighbours(_cosine(x, "X"), k), _neighbours(_cosine(y, "Y"), k)
        member = np.zeros((n, n), dtype=bool)
        rows = np.arange(n)[:, None]
        member[rows, nx] = True

        def value(perm: np.ndarray) -> float:
            inv = np.empty(n, dtype=np.intp)
            inv[perm] = np.arange(n)
            nyp = inv[ny[perm]]  # neighbours of row i of Y[perm]: rows j with perm[j] ∈ N_y(perm[i])
            return _knn_score(name, member[rows, nyp].sum(axis=1), k)

        return value

    return prepare


def _knn_resampler(name: str) -> Callable[[np.ndarray, np.ndarray, dict[str, Any]], Prepared]:
    def prepare(x: np.ndarray, y: np.ndarray, opts: dict[str, Any]) -> Prepared:
        sx, sy = _cosine(x, "X"), _cosine(y, "Y")  # cosine similarity depends on its two samples only

        def value(idx: np.ndarray) -> float:
            uniq, counts = np.unique(idx, return_counts=True)
            k = _knn_k(opts, uniq.size)
            sub = np.ix_(uniq, uniq)
            return _knn_score(name, _overlap(_neighbours(sx[sub], k), _neighbours(sy[sub], k)), k, counts)

        return value

    return prepare


# ----------------------------------------------------------------------------------------------------
# CKA (delegated to repsim.measures.cka_engine)
# ----------------------------------------------------------------------------------------------------

_CKA_ARGS: dict[str, dict[str, Any]] = {
    "cka": {"kernel": "linear", "debiased": False},
    "cka_debiased": {"kernel": "linear", "debiased": True},
    "cka_rbf": {"kernel": "rbf", "debiased": False},
}


def _cka_threshold(name: str, opts: dict[str, Any]) -> float:
    if name != "cka_rbf":
        return 1.0
    t = opts["threshold"]
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not float(t) > 0:
        raise UsageError(f"threshold must be a number > 0, got {t!r}")
    return float(t)


def _cka_impl(name: str) -> Impl:
    def impl(x: np.ndarray, y: np.ndarray, opts: dict[str, Any], groups: np.ndarray | None
             ) -> tuple[float, dict[str, Any]]:
        return float(_cka(x, y, threshold=_cka_threshold(name, opts), **_CKA_ARGS[name])), {}

    return impl


def _cka_permuter(name: str) -> Callable[[np.ndarray, np.ndarray, dict[str, Any]], Prepared]:
    def prepare(x: np.ndarray, y: np.ndarray, opts: dict[str, Any]) -> Prepared:
        args = _CKA_ARGS[name]
        thr = _cka_threshold(name, opts)
        if x.shape[0] > _GRAM_PERMUTE_MAX_N:  # two n × n Grams would be too large: recompute per permutation
            return lambda perm: float(_cka(x, y[perm], threshold=thr, **args))
        # Centring (biased or U-) commutes with a joint row/column permutation of a Gram, so permuting Y's
        # samples permutes its centred Gram: CKA = ⟨K̃, P L̃ Pᵀ⟩ / (‖K̃‖ ‖L̃‖) with both norms fixed.
        grams = []
        for arr in (x, y):
            g = gram_linear(arr) if args["kernel"] == "linear" else gram_rbf(arr, thr)
            g = centre_gram(g, unbiased=args["debiased"])
            nrm = float(np.linalg.norm(g))
            if not nrm > 0:
                raise NumericalError("self-HSIC is 0 (constant representation): CKA is undefined")
            grams.append(g / nrm)
        kx, ky = grams
        return lambda perm: float(np.vdot(kx, ky[np.ix_(perm, perm)]))

    return prepare


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def similarity_details(x: Any, y: Any, measure: str = "procrustes", **options: Any) -> dict[str, Any]:
    """The value of ``measure`` between ``x`` (n, p) and ``y`` (n, q), with what was done to compute it.

    Returns a JSON-ready dict: ``measure``, ``value`` (float), ``kind``, ``orientation``, ``range``,
    ``identity_value``, ``n``, ``p``, ``q``, ``options`` (resolved, defaults filled in), ``notes`` and ``warnings``
    (lists of sentences; a warning means the value needed an adjustment the reader must know about, e.g. the
    degenerate-CCA reduction), plus measure-specific facts: ``nu`` (Procrustes); ``rank_x``/``rank_y``,
    ``dims_x``/``dims_y``, ``variance_kept_x``/``_y``, ``reduced``, ``canonical_correlations`` (CCA family);
    ``weighted_side`` and ``weights`` (PWCCA); ``n_pairs`` (RSA); ``k`` (k-NN). Emits no warnings itself.
    """
    spec, xa, ya, opts = _prepare(x, y, measure, options)
    value, info = spec._impl(xa, ya, opts, None)
    out: dict[str, Any] = {
        "measure": spec.name, "value": float(value), "kind": spec.kind, "orientation": spec.orientation,
        "range": list(spec.range), "identity_value": spec.identity_value,
        "n": int(xa.shape[0]), "p": int(xa.shape[1]), "q": int(ya.shape[1]), "options": opts,
        "notes": [], "warnings": [],
    }
    out.update(info)
    return out


def similarity(x: Any, y: Any, measure: str = "procrustes", **options: Any) -> float:
    """``measure`` (a key of :data:`MEASURES`) between ``x`` (n, p) and ``y`` (n, q) of the same n samples.

    Arrays are numpy or torch, samples as rows; computed in float64. Check ``MEASURES[measure].kind`` for the
    orientation (similarity: higher = more alike; distance: lower = more alike). A value that needed an
    adjustment (CCA on too few samples) comes with a :class:`SimilarityWarning`; :func:`similarity_details`
    returns the same value with the facts behind it.
    """
    d = similarity_details(x, y, measure, **options)
    if d["warnings"]:
        warnings.warn(f"{d['measure']}: " + "; ".join(d["warnings"]), SimilarityWarning, stacklevel=2)
    return d["value"]


def _extreme(spec: MeasureSpec, values: np.ndarray, observed: float) -> np.ndarray:
    """Values at least as similar as ``observed`` (a tiny relative tolerance counts rounding ties as extreme)."""
    tol = 1e-10 * max(1.0, abs(observed))
    return values >= observed - tol if spec.kind == "similarity" else values <= observed + tol


def permutation_null(x: Any, y: Any, measure: str = "procrustes", n_perm: int = 1000, seed: int = 0,
                     **options: Any) -> dict[str, Any]:
    """Permutation test of "X and Y are more alike than with the sample pairing shuffled".

    Draws ``n_perm`` permutations of Y's rows from ``numpy.random.default_rng(seed)`` and recomputes the measure
    (reusing everything a permutation leaves unchanged; see the module docstring). Returns ``observed`` (float),
    ``null`` (n_perm,) float64, ``p_value = (1 + #{null at least as similar as observed}) / (1 + n_perm)`` (one
    sided; ≥ for similarities, ≤ for distances), ``measure``, ``kind``, ``n``, ``n_perm``, ``seed``,
    ``options``, ``notes`` and ``warnings`` of the observed value.
    """
    spec, xa, ya, opts = _prepare(x, y, measure, options)
    n_perm = _check_int(n_perm, "n_perm", 1)
    seed = _check_int(seed, "seed", 0)
    observed, info = spec._impl(xa, ya, opts, None)
    if spec._permuter is not None:
        fn = spec._permuter(xa, ya, opts)
    else:
        def fn(perm: np.ndarray) -> float:
            return spec._impl(xa, ya[perm], opts, None)[0]
    n = xa.shape[0]
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm, dtype=np.float64)
    for b in range(n_perm):
        null[b] = fn(rng.permutation(n))
    p_value = (1.0 + float(_extreme(spec, null, observed).sum())) / (1.0 + n_perm)
    return {
        "measure": spec.name, "kind": spec.kind, "observed": float(observed), "null": null, "p_value": p_value,
        "n": n, "n_perm": n_perm, "seed": seed, "options": opts,
        "notes": list(info.get("notes", [])), "warnings": list(info.get("warnings", [])),
    }


def bootstrap_interval(x: Any, y: Any, measure: str = "procrustes", n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95, **options: Any) -> dict[str, Any]:
    """Percentile bootstrap interval of ``measure`` over images (rows of X and Y resampled together).

    Draws ``n_boot`` index vectors of length n with replacement from ``numpy.random.default_rng(seed)``;
    duplicates are handled per measure (``MEASURES[measure].bootstrap_note``). Returns ``observed``, ``low`` and
    ``high`` (the (1 ∓ level)/2 quantiles of ``samples``), ``samples`` (n_boot,) float64, ``level``, ``measure``,
    ``kind``, ``n``, ``n_boot``, ``seed``, ``options``, ``method`` ("percentile"), ``notes`` (the duplicate
    handling first) and ``warnings`` of the observed value.
    """
    spec, xa, ya, opts = _prepare(x, y, measure, options)
    n_boot = _check_int(n_boot, "n_boot", 1)
    seed = _check_int(seed, "seed", 0)
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.0 < float(level) < 1.0:
        raise UsageError(f"level must be in (0, 1), got {level!r}")
    observed, info = spec._impl(xa, ya, opts, None)
    if spec._resampler is not None:
        fn = spec._resampler(xa, ya, opts)
    else:
        def fn(idx: np.ndarray) -> float:
            return spec._impl(xa[idx], ya[idx], opts, idx)[0]
    n = xa.shape[0]
    rng = np.random.default_rng(seed)
    samples = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        try:
            samples[b] = fn(idx)
        except NumericalError as e:
            raise NumericalError(f"bootstrap resample {b} (seed {seed}): {e}") from e
    low, high = np.quantile(samples, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return {
        "measure": spec.name, "kind": spec.kind, "observed": float(observed), "low": float(low),
        "high": float(high), "samples": samples, "level": float(level), "method": "percentile", "n": n,
        "n_boot": n_boot, "seed": seed, "options": opts,
        "notes": [spec.bootstrap_note, *info.get("notes", [])], "warnings": list(info.get("warnings", [])),
    }


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------

_WILLIAMS = ("Williams, Kunz, Kornblith & Linderman (2021), Generalized Shape Metrics on Neural Representations, "
             "NeurIPS (angular shape metric, orthogonal group, α = 1)")
_KORNBLITH = ("Kornblith, Norouzi, Lee & Hinton (2019), Similarity of Neural Network Representations Revisited, "
              "ICML, Table 1")
_COPIES = "bootstrap copies of an image enter as repeated rows (weights in the covariances)"
_CCA_COPIES = ("bootstrap copies enter as repeated rows (each distinct image once, weighted by its count: the same "
               "CCA); a resample holds ~63 % distinct images, which bounds its CCA dimensions, so the degenerate-"
               "case SVD reduction can apply to resamples although not to the full data, and CCA's upward bias "
               "grows as dimensions / distinct images grows: the interval can sit above the observed value")
_CCA_INV = ("invertible linear maps of either side (while no reduction applies)", "translation")
_SHAPE_INV = ("orthogonal transforms", "translation", "isotropic scaling")


def _bind(name: str) -> Callable[..., float]:
    def function(x: Any, y: Any, **options: Any) -> float:
        return similarity(x, y, name, **options)

    function.__name__ = name
    function.__qualname__ = name
    function.__doc__ = f"``similarity(x, y, {name!r}, **options)``; see ``MEASURES[{name!r}]``."
    return function


def _spec_of(name: str, kind: str, rng: tuple[float, float], identity: float, needs_all: bool, symmetric: bool,
             min_samples: int, options: dict[str, Any], invariances: tuple[str, ...], description: str,
             citation: str, bootstrap_note: str, impl: Impl,
             permuter: Callable[[np.ndarray, np.ndarray, dict[str, Any]], Prepared] | None = None,
             resampler: Callable[[np.ndarray, np.ndarray, dict[str, Any]], Prepared] | None = None) -> MeasureSpec:
    return MeasureSpec(
        name=name, kind=kind, range=rng, identity_value=identity, needs_all_samples=needs_all,
        description=description, citation=citation, symmetric=symmetric, min_samples=min_samples,
        options=MappingProxyType(options), invariances=invariances, bootstrap_note=bootstrap_note,
        function=_bind(name), _impl=impl, _permuter=permuter, _resampler=resampler,
    )


def _registry() -> dict[str, MeasureSpec]:
    specs = [
        _spec_of("procrustes", "distance", (0.0, math.pi / 2), 0.0, False, True, 2, {}, _SHAPE_INV,
                 "angular Procrustes shape metric arccos ‖X̂ᵀŶ‖_* (radians; X̂ centred, unit Frobenius norm)",
                 _WILLIAMS, _COPIES, _procrustes_impl("procrustes"), _procrustes_permuter("procrustes")),
        _spec_of("procrustes_1mnu", "distance", (0.0, 1.0), 0.0, False, True, 2, {}, _SHAPE_INV,
                 "1 − ν with ν = ‖X̂ᵀŶ‖_* the Procrustes alignment (cosine of the angular shape metric)",
                 _WILLIAMS, _COPIES, _procrustes_impl("procrustes_1mnu"), _procrustes_permuter("procrustes_1mnu")),
        _spec_of("procrustes_euclid", "distance", (0.0, math.sqrt(2.0)), 0.0, False, True, 2, {}, _SHAPE_INV,
                 "Euclidean Procrustes metric √(2 − 2ν) = min_Q ‖X̂ − ŶQ‖_F on unit-norm centred shapes",
                 _WILLIAMS + "; Ding, Denain & Steinhardt (2021), Grounding Representation Similarity with "
                 "Statistical Testing, NeurIPS", _COPIES,
                 _procrustes_impl("procrustes_euclid"), _procrustes_permuter("procrustes_euclid")),
        _spec_of("cca", "similarity", (0.0, 1.0), 1.0, False, True, 3, {"keep": 0.99}, _CCA_INV,
                 "mean canonical correlation Σρ_i / min(k_x, k_y) on centred features (SVD-reduced and reported "
                 "when rank(X̃) + rank(Ỹ) > n − 1)", _KORNBLITH + " (ρ̄_CCA)", _CCA_COPIES,
                 _cca_impl("cca"), _cca_permuter("cca")),
        _spec_of("cca_r2", "similarity", (0.0, 1.0), 1.0, False, True, 3, {"keep": 0.99}, _CCA_INV,
                 "R²_CCA = mean squared canonical correlation Σρ_i² / min(k_x, k_y) (same reduction rule as cca)",
                 _KORNBLITH + " (R²_CCA)", _CCA_COPIES, _cca_impl("cca_r2"), _cca_permuter("cca_r2")),
        _spec_of("svcca", "similarity", (0.0, 1.0), 1.0, False, True, 3, {"keep": 0.99},
                 ("orthogonal transforms", "translation", "isotropic scaling"),
                 "SVCCA: top singular directions keeping `keep` of each side's variance, then mean canonical "
                 "correlation", "Raghu, Gilmer, Yosinski & Sohl-Dickstein (2017), SVCCA: Singular Vector Canonical "
                 "Correlation Analysis for Deep Learning Dynamics and Interpretability, NeurIPS", _CCA_COPIES,
                 _cca_impl("svcca"), _cca_permuter("svcca")),
        _spec_of("pwcca", "similarity", (0.0, 1.0), 1.0, False, False, 3, {"keep": 0.99, "weighted": "auto"},
                 ("translation", "isotropic scaling", "permutations and sign flips of features"),
                 "projection-weighted CCA Σα_iρ_i/Σα_i, α_i = Σ_j|⟨h_i, x̃_j⟩| over the weighted side's canonical "
                 "variates (side with fewer CCA dimensions, ties → X); asymmetric",
                 "Morcos, Raghu & Bengio (2018), Insights on representational similarity in neural networks with "
                 "canonical correlation, NeurIPS (projection weighting); google/svcca pwcca.py",
                 _CCA_COPIES, _pwcca_impl, _pwcca_permuter),
        _spec_of("pwcca_reference", "similarity", (0.0, 1.0), 1.0, False, False, 3, {"epsilon": 0.0},
                 ("isotropic scaling of either side",
                  "translation and invertible linear maps of the unweighted side (epsilon = 0)"),
                 "PWCCA as google/svcca compute_pwcca computes it (to reproduce published values): weights "
                 "from QR-orthonormalised u_iᵀ(x − x̄) + x̄ (u: singular vectors of the whitened cross-"
                 "covariance, no Σ^{-1/2}) against the uncentred neurons; side with fewer neurons (ties → X); "
                 "epsilon on the rescaled covariances; asymmetric, not translation-invariant",
                 "Morcos, Raghu & Bengio (2018), Insights on representational similarity in neural networks with "
                 "canonical correlation, NeurIPS; reference code google/svcca pwcca.py compute_pwcca and "
                 "cca_core.py get_cca_similarity (Y-weighted branch as in google/svcca PR #9)",
                 "bootstrap copies enter as repeated datapoints (as they would for the reference code)",
                 _pwcca_reference_impl),
        _spec_of("rsa", "similarity", (-1.0, 1.0), 1.0, True, True, 3,
                 {"rdm": "correlation", "compare": "spearman"},
                 ("rdm='correlation': per-sample positive scaling and shifts, feature permutations",
                  "rdm='euclidean': orthogonal transforms, translation, isotropic scaling",
                  "compare='spearman': monotone transforms of the dissimilarities"),
                 "correlation (Spearman or Pearson) of the upper triangles of the two RDMs "
                 "(1 − Pearson between samples, or Euclidean distance)",
                 "Kriegeskorte, Mur & Bandettini (2008), Representational similarity analysis - connecting the "
                 "branches of systems neuroscience, Front. Syst. Neurosci. 2:4",
                 "dissimilarities between copies of the same image are dropped (as rsatoolbox's bootstrap)",
                 _rsa_impl, _rsa_permuter, _rsa_resampler),
        _spec_of("mknn", "similarity", (0.0, 1.0), 1.0, True, True, 2, {"k": 10},
                 ("orthogonal transforms", "isotropic scaling", "per-sample positive scaling"),
                 "mutual k-NN alignment: mean over samples of |N_k(i;X) ∩ N_k(i;Y)| / k (cosine similarity, "
                 "self excluded)", "Huh, Cheung, Wang & Isola (2024), The Platonic Representation Hypothesis, "
                 "ICML (mutual nearest-neighbour metric; platonic-rep metrics.py mutual_knn)",
                 "neighbours are found among the distinct resampled images (copies excluded), each image weighted "
                 "by its number of copies; ~63 % of images are distinct, so neighbourhoods are wider than on all n",
                 _knn_impl("mknn"), _knn_permuter("mknn"), _knn_resampler("mknn")),
        _spec_of("jaccard_knn", "similarity", (0.0, 1.0), 1.0, True, True, 2, {"k": 10},
                 ("orthogonal transforms", "isotropic scaling", "per-sample positive scaling"),
                 "k-NN Jaccard: mean over samples of |N_k(i;X) ∩ N_k(i;Y)| / |N_k(i;X) ∪ N_k(i;Y)| (cosine, self "
                 "excluded)", "Klabunde, Schumacher, Strohmaier & Lemmerich (2025), Similarity of Neural Network "
                 "Models: A Survey of Functional and Representational Measures, ACM Computing Surveys 57(9), "
                 "neighbourhood-based measures (k-NN Jaccard similarity)",
                 "neighbours are found among the distinct resampled images (copies excluded), each image weighted "
                 "by its number of copies; ~63 % of images are distinct, so neighbourhoods are wider than on all n",
                 _knn_impl("jaccard_knn"), _knn_permuter("jaccard_knn"), _knn_resampler("jaccard_knn")),
        _spec_of("cka", "similarity", (0.0, 1.0), 1.0, False, True, 2, {}, _SHAPE_INV,
                 "linear CKA, biased (plug-in) HSIC (repsim.measures.cka_engine.cka)", _KORNBLITH + ", Sec. 3", _COPIES,
                 _cka_impl("cka"), _cka_permuter("cka")),
        _spec_of("cka_debiased", "similarity", (-1.0, 1.0), 1.0, True, True, 4, {}, _SHAPE_INV,
                 "linear CKA with the unbiased HSIC (U-centring; repsim.measures.cka_engine.cka(debiased=True))",
                 _KORNBLITH + "; Song et al. (2012) unbiased HSIC",
                 "bootstrap copies enter the U-statistic as distinct pairs (an upward bias)",
                 _cka_impl("cka_debiased"), _cka_permuter("cka_debiased")),
        _spec_of("cka_rbf", "similarity", (0.0, 1.0), 1.0, True, True, 2, {"threshold": 1.0}, _SHAPE_INV,
                 "RBF-kernel CKA, σ² = threshold² · median squared distance (repsim.measures.cka_engine.cka(kernel='rbf'))",
                 _KORNBLITH + ", Sec. 3 (RBF kernel)",
                 "bootstrap copies add zero distances (they enter the median bandwidth and the Gram)",
                 _cka_impl("cka_rbf"), _cka_permuter("cka_rbf")),
    ]
    return {s.name: s for s in specs}


MEASURES: dict[str, MeasureSpec] = _registry()
"""Every measure by name, in a stable order (Procrustes, CCA family, RSA, k-NN, CKA)."""
