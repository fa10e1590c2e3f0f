"""Similarity measures beyond CKA: hand-derived references, reference packages, invariances, validation,
the degenerate-CCA reduction, permutation nulls and bootstrap intervals (repsim.measures.beyond_cka)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr, spearmanr

from repsim.measures import cka_engine
from repsim.errors import UsageError
from repsim.measures.beyond_cka import (
    MEASURES,
    MeasureSpec,
    NumericalError,
    SimilarityWarning,
    bootstrap_interval,
    canonical_correlations,
    permutation_null,
    similarity,
    similarity_details,
)

FAST = settings(max_examples=20, deadline=None, derandomize=True)
NAMES = [
    "procrustes", "procrustes_1mnu", "procrustes_euclid", "cca", "cca_r2", "svcca", "pwcca", "pwcca_reference",
    "rsa", "mknn", "jaccard_knn", "cka", "cka_debiased", "cka_rbf",
]


def _pair(seed: int, n: int = 60, p: int = 8, q: int = 6, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """X (n, p) and a noisy linear read-out Y (n, q) sharing a 3-dimensional signal, with offsets."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    x = z @ rng.standard_normal((3, p)) + 0.5 * rng.standard_normal((n, p)) + 2.0
    y = z @ rng.standard_normal((3, q)) + noise * rng.standard_normal((n, q)) - 1.0
    return x, y


def _orthogonal(rng: np.random.Generator, p: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((p, p)))
    return q * np.sign(np.diag(r))


def _centred_orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """k orthonormal n-vectors, each orthogonal to the all-ones vector (sample-centred)."""
    a = rng.standard_normal((n, k))
    a -= a.mean(axis=0)
    q, _ = np.linalg.qr(a)
    return q


# --- independent reference implementations (straight numpy, textbook formulas) ------------------------


def ref_procrustes_nu(x: np.ndarray, y: np.ndarray) -> float:
    """ν = ‖X̂ᵀŶ‖_* from a direct SVD (Williams et al. 2021)."""
    xh = x - x.mean(0)
    yh = y - y.mean(0)
    xh /= np.linalg.norm(xh)
    yh /= np.linalg.norm(yh)
    return float(np.linalg.svd(xh.T @ yh, compute_uv=False).sum())


def ref_canonical_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Textbook CCA: eigenvalues of Σxx⁻¹ Σxy Σyy⁻¹ Σyx (full-rank, p + q < n)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    m = np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)
    ev = np.sort(np.real(np.linalg.eigvals(m)))[::-1][: min(x.shape[1], y.shape[1])]
    return np.sqrt(np.clip(ev, 0, 1))


def official_pwcca(acts1: np.ndarray, acts2: np.ndarray) -> float:
    """The arithmetic of google/svcca ``pwcca.compute_pwcca`` (epsilon = 0, acts1 the smaller side), rewritten:
    inputs are neurons × datapoints; ``u`` from the SVD of the whitened cross-covariance; "directions"
    ``uᵀ(acts − mean) + mean``; QR; weights Σ|Pᵀ actsᵀ| over neurons."""
    nx = acts1.shape[0]
    cov = np.cov(acts1, acts2)
    sxx, sxy, syy = cov[:nx, :nx], cov[:nx, nx:], cov[nx:, nx:]
    xmax, ymax = np.abs(sxx).max(), np.abs(syy).max()
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)

    def inv_sqrt(a: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(np.linalg.pinv(a))
        return v @ np.diag(np.sqrt(w)) @ v.T

    u, s, _ = np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy))
    mean = acts1.mean(axis=1, keepdims=True)
    dirns = u.T @ (acts1 - mean) + mean
    p, _ = np.linalg.qr(dirns.T)
    w = np.abs(p.T @ acts1.T).sum(axis=1)
    w /= w.sum()
    return float(np.sum(w * np.abs(s)))


def svcca_compute_pwcca(acts1: np.ndarray, acts2: np.ndarray, epsilon: float = 0.0
                        ) -> tuple[float, np.ndarray, np.ndarray]:
    """A line-by-line numpy transcription of google/svcca ``pwcca.compute_pwcca(acts1, acts2, epsilon)`` and the
    parts of ``cca_core`` it runs (``get_cca_similarity`` with compute_coefs=True, compute_dirns=False;
    ``compute_ccas``, ``remove_small``, ``positivedef_matrix_sqrt``), https://github.com/google/svcca (pwcca.py,
    cca_core.py). Inputs are neurons × datapoints. One deliberate change, marked: the ``else`` branch (acts2
    weighted) uses ``acts2[y_idxs]`` where the original has ``acts1[y_idxs]`` (google/svcca PR #9; the original
    raises an IndexError there). Returns (pwcca value, weights, coefficients), as the original."""
    assert acts1.shape[1] == acts2.shape[1]
    assert acts1.shape[0] < acts1.shape[1]
    numx, numy = acts1.shape[0], acts2.shape[0]
    covariance = np.cov(acts1, acts2)
    sigmaxx = covariance[:numx, :numx]
    sigmaxy = covariance[:numx, numx:]
    sigmayx = covariance[numx:, :numx]
    sigmayy = covariance[numx:, numx:]
    xmax = np.max(np.abs(sigmaxx))
    ymax = np.max(np.abs(sigmayy))
    sigmaxx /= xmax
    sigmayy /= ymax
    sigmaxy /= np.sqrt(xmax * ymax)
    sigmayx /= np.sqrt(xmax * ymax)
    # compute_ccas → remove_small
    x_idxs = np.abs(np.diagonal(sigmaxx)) >= epsilon
    y_idxs = np.abs(np.diagonal(sigmayy)) >= epsilon
    sxx = sigmaxx[x_idxs][:, x_idxs]
    sxy = sigmaxy[x_idxs][:, y_idxs]
    syy = sigmayy[y_idxs][:, y_idxs]
    sxx += epsilon * np.eye(sxx.shape[0])
    syy += epsilon * np.eye(syy.shape[0])
    inv_xx, inv_yy = np.linalg.pinv(sxx), np.linalg.pinv(syy)

    def positivedef_matrix_sqrt(array: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(array)
        return np.dot(v, np.dot(np.diag(np.sqrt(w)), np.conj(v).T))

    invsqrt_xx, invsqrt_yy = positivedef_matrix_sqrt(inv_xx), positivedef_matrix_sqrt(inv_yy)
    u, s, v = np.linalg.svd(np.dot(invsqrt_xx, np.dot(sxy, invsqrt_yy)))
    s = np.abs(s)
    # get_cca_similarity (compute_coefs): coef_x = u.T, coef_y = v, per-neuron means over datapoints
    coef_x, coef_y = u.T, v
    neuron_means1 = np.mean(acts1, axis=1, keepdims=True)
    neuron_means2 = np.mean(acts2, axis=1, keepdims=True)
    # compute_pwcca
    if np.sum(x_idxs) <= np.sum(y_idxs):
        dirns = np.dot(coef_x, (acts1[x_idxs] - neuron_means1)) + neuron_means1
        acts, idxs = acts1, x_idxs
    else:
        dirns = np.dot(coef_y, (acts2[y_idxs] - neuron_means2)) + neuron_means2  # PR #9: acts2, not acts1
        acts, idxs = acts2, y_idxs
    P, _ = np.linalg.qr(dirns.T)
    weights = np.sum(np.abs(np.dot(P.T, acts[idxs].T)), axis=1)
    weights = weights / np.sum(weights)
    return float(np.sum(weights * s)), weights, s


# --- registry and metadata -----------------------------------------------------------------------------


def test_registry_names_and_metadata_are_complete() -> None:
    assert list(MEASURES) == NAMES
    for name, spec in MEASURES.items():
        assert isinstance(spec, MeasureSpec) and spec.name == name
        assert spec.kind in ("similarity", "distance")
        lo, hi = spec.range
        assert lo < hi and lo <= spec.identity_value <= hi
        assert spec.identity_value == (hi if spec.kind == "similarity" else 0.0)
        assert isinstance(spec.needs_all_samples, bool) and isinstance(spec.symmetric, bool)
        assert spec.min_samples >= 2 and spec.description and spec.citation and spec.invariances
        assert spec.bootstrap_note
        assert spec.higher_is_more_similar == (spec.kind == "similarity")
        assert ("higher" in spec.orientation) == spec.higher_is_more_similar
        meta = spec.to_dict()
        json.dumps(meta)  # JSON-ready
        assert meta["kind"] == spec.kind and meta["range"] == [lo, hi]
    assert MEASURES["procrustes"].range == (0.0, math.pi / 2)
    assert MEASURES["procrustes_euclid"].range == (0.0, math.sqrt(2))
    assert MEASURES["rsa"].range == (-1.0, 1.0)
    assert not MEASURES["pwcca"].symmetric and not MEASURES["pwcca_reference"].symmetric
    assert "google/svcca" in MEASURES["pwcca_reference"].citation
    assert [n for n, s in MEASURES.items() if s.needs_all_samples] == [
        "rsa", "mknn", "jaccard_knn", "cka_debiased", "cka_rbf"]


@pytest.mark.parametrize("name", NAMES)
def test_identical_inputs_give_the_identity_value(name: str) -> None:
    x, _ = _pair(0, n=40, p=7)
    spec = MEASURES[name]
    assert similarity(x, x, name) == pytest.approx(spec.identity_value, abs=1e-6)
    assert spec.function(x, x) == similarity(x, x, name)
    wide = np.random.default_rng(1).standard_normal((20, 45))  # p > n (CCA family reduces both alike)
    if name == "pwcca_reference":  # the reference code asserts fewer neurons than datapoints: refused, not reduced
        with pytest.raises(UsageError, match="fewer neurons than datapoints"):
            similarity(wide, wide, name)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimilarityWarning)
        assert similarity(wide, wide, name, **({"k": 5} if "knn" in name else {})) == pytest.approx(
            spec.identity_value, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_values_lie_in_the_declared_range_and_symmetry_holds(name: str) -> None:
    spec = MEASURES[name]
    for seed in range(3):
        x, y = _pair(seed, n=50, p=6, q=9, noise=3.0)
        v = similarity(x, y, name)
        assert spec.range[0] - 1e-12 <= v <= spec.range[1] + 1e-12
        if spec.symmetric:
            assert similarity(y, x, name) == pytest.approx(v, abs=1e-10)


def test_every_function_is_deterministic_and_accepts_torch() -> None:
    x, y = _pair(3, n=40, p=5, q=4)
    for name in NAMES:
        a = similarity(x, y, name)
        assert similarity(x.copy(), y.copy(), name) == a
        assert similarity(torch.from_numpy(x), torch.from_numpy(y), name) == pytest.approx(a, abs=1e-12)
    # low precision is up-cast before any arithmetic: same value as the up-cast numpy array
    xt = torch.from_numpy(x).to(torch.bfloat16)
    assert similarity(xt, y, "procrustes") == pytest.approx(similarity(xt.float().numpy(), y, "procrustes"), abs=1e-12)
    xh = torch.from_numpy(x).half()
    assert similarity(xh, y, "cca") == pytest.approx(similarity(xh.float().numpy(), y, "cca"), abs=1e-12)


# --- input validation ------------------------------------------------------------------------------------


def test_bad_input_raises_usage_error() -> None:
    x, y = _pair(0, n=30, p=4, q=3)
    cases = [
        (lambda: similarity(x[:, 0], y), "2-D"),
        (lambda: similarity(x.reshape(30, 2, 2), y), "2-D"),
        (lambda: similarity(x, y[:-1]), "same samples"),
        (lambda: similarity(np.where(np.eye(30, 4) > 0, np.nan, x), y), "non-finite"),
        (lambda: similarity(x, np.where(np.eye(30, 3) > 0, np.inf, y)), "non-finite"),
        (lambda: similarity(x + 1j, y), "real"),
        (lambda: similarity(x.astype(str), y), "numeric"),
        (lambda: similarity(np.zeros((30, 0)), y), "no features"),
        (lambda: similarity(x, y, "procrustees"), "did you mean 'procrustes'"),
        (lambda: similarity(x, y, "cka", kernel="rbf"), "no option 'kernel'"),
        (lambda: similarity(x, y, "rsa", rdm="cosine"), "rdm must be one of"),
        (lambda: similarity(x, y, "rsa", compare="kendall"), "compare must be one of"),
        (lambda: similarity(x, y, "mknn", k=30), "k + 1"),
        (lambda: similarity(x, y, "mknn", k=0), "k must be"),
        (lambda: similarity(x, y, "svcca", keep=0.0), "keep"),
        (lambda: similarity(x, y, "svcca", keep=1.5), "keep"),
        (lambda: similarity(x, y, "pwcca", weighted="z"), "weighted"),
        (lambda: similarity(x, y, "cka_rbf", threshold=0), "threshold"),
        (lambda: similarity(x[:3], y[:3], "cka_debiased"), "at least 4 samples"),
        (lambda: similarity(x[:2], y[:2], "cca"), "at least 3 samples"),
        (lambda: similarity(x[:, :1], y, "rsa"), "at least 2 features"),
        (lambda: permutation_null(x, y, "cka", n_perm=0), "n_perm"),
        (lambda: permutation_null(x, y, "cka", seed=-1), "seed"),
        (lambda: bootstrap_interval(x, y, "cka", level=1.0), "level"),
        (lambda: bootstrap_interval(x, y, "cka", n_boot=2.5), "n_boot"),
    ]
    for call, fragment in cases:
        with pytest.raises(UsageError, match=None) as info:
            call()
        assert fragment.lower() in str(info.value).lower(), (fragment, str(info.value))


@pytest.mark.parametrize("name", NAMES)
def test_constant_representation_is_a_numerical_error(name: str) -> None:
    x, _ = _pair(0, n=30, p=4)
    const = np.ones((30, 4))
    # every measure must name the degenerate input (or, for the RBF kernel, its undefined bandwidth)
    with pytest.raises(NumericalError, match=r"constant|RBF bandwidth undefined|point in the same direction"):
        similarity(x, const, name, **({"k": 5} if "knn" in name else {}))


def test_constant_row_errors_name_the_sample() -> None:
    x, y = _pair(0, n=30, p=4)
    x[7] = 3.0
    with pytest.raises(NumericalError, match="sample 7"):
        similarity(x, y, "rsa")
    x[7] = 0.0
    with pytest.raises(NumericalError, match="sample 7"):
        similarity(x, y, "mknn", k=3)


# --- Procrustes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,p,q", [(50, 6, 6), (50, 8, 3), (20, 45, 30)])
def test_procrustes_matches_a_direct_svd(n: int, p: int, q: int) -> None:
    rng = np.random.default_rng(n + p + q)
    x = rng.standard_normal((n, p)) * rng.uniform(0.5, 3, p) + 4
    y = np.concatenate([x, x], axis=1)[:, :q] @ rng.standard_normal((q, q)) + rng.standard_normal((n, q))
    nu = ref_procrustes_nu(x, y)
    assert similarity(x, y, "procrustes") == pytest.approx(math.acos(nu), abs=1e-12)
    assert similarity(x, y, "procrustes_1mnu") == pytest.approx(1 - nu, abs=1e-12)
    assert similarity(x, y, "procrustes_euclid") == pytest.approx(math.sqrt(2 - 2 * nu), abs=1e-12)
    assert similarity_details(x, y, "procrustes")["nu"] == pytest.approx(nu, abs=1e-12)


def test_procrustes_is_the_aligned_angle_and_residual() -> None:
    """ν is attained by the optimal rotation (U Vᵀ of the cross product) and √(2 − 2ν) is its residual."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((80, 5))
    y = x @ _orthogonal(rng, 5) + 0.1 * rng.standard_normal((80, 5))
    xh, yh = x - x.mean(0), y - y.mean(0)
    xh /= np.linalg.norm(xh)
    yh /= np.linalg.norm(yh)
    u, _, vt = np.linalg.svd(yh.T @ xh)
    rot = u @ vt  # argmax_Q ⟨X̂, ŶQ⟩
    assert similarity(x, y, "procrustes") == pytest.approx(math.acos(np.sum(xh * (yh @ rot))), abs=1e-12)
    assert similarity(x, y, "procrustes_euclid") == pytest.approx(np.linalg.norm(xh - yh @ rot), abs=1e-12)
    assert similarity(x, y, "procrustes") < 0.2  # a rotated copy plus a little noise is close


def test_procrustes_zero_pads_the_smaller_side() -> None:
    x, y = _pair(2, n=40, p=7, q=4)
    padded = np.concatenate([y, np.zeros((40, 3))], axis=1)
    assert similarity(x, y, "procrustes") == pytest.approx(similarity(x, padded, "procrustes"), abs=1e-12)


@FAST
@given(seed=st.integers(0, 10_000))
def test_procrustes_invariances(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = _pair(seed, n=30, p=5, q=5)
    base = similarity(x, y, "procrustes")
    moved = (3.7 * y @ _orthogonal(rng, 5)) + rng.standard_normal(5) * 10  # rotation, isotropic scale, shift
    assert similarity(x, moved, "procrustes") == pytest.approx(base, abs=1e-9)
    stretched = y * np.array([1.0, 1.0, 1.0, 1.0, 20.0])  # anisotropic scaling is not an invariance
    assert abs(similarity(x, stretched, "procrustes") - base) > 1e-4


@FAST
@given(seed=st.integers(0, 10_000))
def test_procrustes_angle_is_a_metric(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b, c = (rng.standard_normal((15, 4)) + (i == 1) * rng.standard_normal((15, 4)) for i in range(3))
    dab, dbc, dac = (similarity(u, v, "procrustes") for u, v in ((a, b), (b, c), (a, c)))
    assert dac <= dab + dbc + 1e-12
    assert similarity(a, b, "procrustes") == pytest.approx(similarity(b, a, "procrustes"), abs=1e-14)


# --- CCA family --------------------------------------------------------------------------------------------


def test_cca_recovers_constructed_canonical_correlations_exactly() -> None:
    """X = [q1, q2, q3]·M_x, Y = [ρ1 q1 + √(1−ρ1²) q4, ρ2 q2 + √(1−ρ2²) q5]·M_y with orthonormal centred q's:
    the sample canonical correlations are exactly ρ1, ρ2, whatever the invertible mixings and offsets."""
    rng = np.random.default_rng(0)
    q = _centred_orthonormal(rng, 200, 5)
    r1, r2 = 0.9, 0.4
    x = q[:, :3] @ rng.standard_normal((3, 3)) + 5.0
    y = np.stack([r1 * q[:, 0] + math.sqrt(1 - r1**2) * q[:, 3], r2 * q[:, 1] + math.sqrt(1 - r2**2) * q[:, 4]], 1)
    y = y @ rng.standard_normal((2, 2)) - 2.0
    np.testing.assert_allclose(canonical_correlations(x, y), [r1, r2], atol=1e-12)
    assert similarity(x, y, "cca") == pytest.approx((r1 + r2) / 2, abs=1e-12)
    assert similarity(x, y, "cca_r2") == pytest.approx((r1**2 + r2**2) / 2, abs=1e-12)
    assert similarity(x, y, "svcca", keep=1.0) == pytest.approx((r1 + r2) / 2, abs=1e-12)
    d = similarity_details(x, y, "cca")
    assert (d["rank_x"], d["rank_y"], d["dims_x"], d["dims_y"], d["reduced"]) == (3, 2, 3, 2, False)
    assert d["warnings"] == []


def test_cca_matches_population_canonical_correlations() -> None:
    """X = [z1, z2, e1], Y = [z1 + a·e2, z2 + b·e3]: population ρ_i = 1/√(1 + a²), 1/√(1 + b²)."""
    rng = np.random.default_rng(1)
    n, a, b = 20_000, 0.5, 2.0
    z1, z2, e1, e2, e3 = rng.standard_normal((5, n))
    x = np.stack([z1, z2, e1], 1)
    y = np.stack([z1 + a * e2, z2 + b * e3], 1)
    rho = canonical_correlations(x, y)
    np.testing.assert_allclose(rho, [1 / math.sqrt(1 + a**2), 1 / math.sqrt(1 + b**2)], atol=0.02)
    np.testing.assert_allclose(rho, ref_canonical_correlations(x, y), atol=1e-10)


@FAST
@given(seed=st.integers(0, 10_000))
def test_cca_is_invariant_to_invertible_linear_maps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = _pair(seed, n=60, p=5, q=4)
    np.testing.assert_allclose(canonical_correlations(x, y), ref_canonical_correlations(x, y), atol=1e-9)
    mx, my = rng.standard_normal((5, 5)) + 3 * np.eye(5), rng.standard_normal((4, 4)) + 3 * np.eye(4)
    for name in ("cca", "cca_r2"):
        base = similarity(x, y, name)
        assert similarity(x @ mx + 7, y @ my - 3, name) == pytest.approx(base, abs=1e-9)
    # SVCCA (keep < 1) is only invariant to orthogonal maps, isotropic scaling and translation
    base = similarity(x, y, "svcca")
    assert similarity(2.5 * x @ _orthogonal(rng, 5) + 1, y, "svcca") == pytest.approx(base, abs=1e-9)


def test_degenerate_cca_reduces_and_says_so() -> None:
    """p ≥ n: every canonical correlation of the raw column spaces is 1. The measure must not return that."""
    rng = np.random.default_rng(2)
    n = 40
    x, y = rng.standard_normal((n, 60)), rng.standard_normal((n, 50))  # independent
    qx, _ = np.linalg.qr(x - x.mean(0))
    qy, _ = np.linalg.qr(y - y.mean(0))
    qx, qy = qx[:, : n - 1], qy[:, : n - 1]
    assert np.linalg.svd(qx.T @ qy, compute_uv=False).mean() == pytest.approx(1.0)  # the degenerate naive value
    for name in ("cca", "cca_r2", "pwcca", "svcca"):
        with pytest.warns(SimilarityWarning, match="n − 1"):
            v = similarity(x, y, name)
        assert v < 0.95
        d = similarity_details(x, y, name)
        assert d["value"] == v and d["reduced"] and d["warnings"]
        assert (d["rank_x"], d["rank_y"]) == (n - 1, n - 1)
        assert d["dims_x"] + d["dims_y"] <= n - 1
        assert max(d["canonical_correlations"]) < 1 - 1e-6
    with pytest.warns(SimilarityWarning, match="degenerate"):
        rho = canonical_correlations(x, y)
    assert rho.max() < 1 - 1e-6 and rho.size == 19
    # an unbalanced pair keeps the small side whole and cuts the large one to fit
    d = similarity_details(x[:, :20], y[:, :19], "cca")  # 20 + 19 ≤ n − 1: plain CCA, no adjustment
    assert d["warnings"] == [] and not d["reduced"]
    small = rng.standard_normal((n, 3))
    d = similarity_details(x, small, "cca", keep=1.0)
    assert (d["dims_x"], d["dims_y"]) == (n - 1 - 3, 3) and d["reduced"]


def test_cca_counts_distinct_samples() -> None:
    """Repeated rows shrink the space the centred columns live in: 40 images twice each hold 39 dimensions, not
    79, so 25 + 25 features force 11 unit correlations unless reduced; duplication changes nothing else."""
    rng = np.random.default_rng(30)
    x, y = rng.standard_normal((40, 25)), rng.standard_normal((40, 25))
    rep = np.repeat(np.arange(40), 2)
    for name in ("cca", "cca_r2", "svcca", "pwcca"):
        d, d2 = similarity_details(x, y, name), similarity_details(x[rep], y[rep], name)
        assert d2["n_distinct"] == 40 and d2["dims_x"] + d2["dims_y"] <= 39
        assert d2["value"] == pytest.approx(d["value"], abs=1e-10) and d2["value"] < 0.95
    # a bootstrap resample: the collapsed (distinct rows, weighted) path equals the expanded rows
    idx = rng.integers(0, 40, 40)
    for name in ("cca", "svcca", "pwcca"):
        spec = MEASURES[name]
        fast = spec._impl(x[idx], y[idx], dict(spec.options), idx)
        slow = spec._impl(x[idx], y[idx], dict(spec.options), None)
        assert fast[0] == pytest.approx(slow[0], abs=1e-10)
        assert fast[1]["n_distinct"] == len(np.unique(idx)) and max(fast[1]["canonical_correlations"]) < 1 - 1e-6


def test_rank_deficient_cca_uses_the_column_space() -> None:
    x, y = _pair(4, n=80, p=4, q=3)
    dup = np.concatenate([x, x[:, :2] @ np.array([[1.0], [2.0]])], axis=1)  # a collinear extra feature
    d = similarity_details(dup, y, "cca")
    assert d["rank_x"] == 4 and not d["warnings"] and any("rank 4" in note for note in d["notes"])
    assert d["value"] == pytest.approx(similarity(x, y, "cca"), abs=1e-10)


def test_svcca_reference_and_keep_rules() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((100, 10)) * np.geomspace(10, 0.01, 10)
    y = x[:, :4] @ rng.standard_normal((4, 8)) + 0.5 * rng.standard_normal((100, 8))

    def reduce(a: np.ndarray, keep: float) -> np.ndarray:
        u, s, _ = np.linalg.svd(a - a.mean(0), full_matrices=False)
        k = int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= keep)) + 1
        return u[:, :k] * s[:k]

    rx, ry = reduce(x, 0.99), reduce(y, 0.99)
    expected = ref_canonical_correlations(rx, ry).mean()
    d = similarity_details(x, y, "svcca")
    assert d["value"] == pytest.approx(expected, abs=1e-10)
    assert (d["dims_x"], d["dims_y"]) == (rx.shape[1], ry.shape[1]) and d["dims_x"] < 10
    assert d["variance_kept_x"] >= 0.99
    d3 = similarity_details(x, y, "svcca", keep=3)
    assert (d3["dims_x"], d3["dims_y"]) == (3, 3)
    assert d3["value"] == pytest.approx(ref_canonical_correlations(reduce(x, 1.0)[:, :3], reduce(y, 1.0)[:, :3]).mean())
    assert similarity(x, y, "svcca", keep=1.0) == pytest.approx(similarity(x, y, "cca"), abs=1e-10)


# --- PWCCA -------------------------------------------------------------------------------------------------


def test_pwcca_closed_form() -> None:
    """X = [q1, q2]·M: its canonical variates are ±q1, ±q2, so α_i = Σ_j |M_ij| and PWCCA = Σα_iρ_i / Σα_i."""
    rng = np.random.default_rng(7)
    q = _centred_orthonormal(rng, 150, 6)
    r1, r2 = 0.8, 0.3
    m = np.array([[2.0, -1.0, 0.5], [0.2, 0.1, -3.0]])
    x = q[:, :2] @ m + 1.5
    y = np.stack([r1 * q[:, 0] + math.sqrt(1 - r1**2) * q[:, 3], r2 * q[:, 1] + math.sqrt(1 - r2**2) * q[:, 4],
                  q[:, 5]], 1) @ rng.standard_normal((3, 3))
    alpha = np.abs(m).sum(axis=1)
    d = similarity_details(x, y, "pwcca")
    assert d["weighted_side"] == "X"
    assert d["value"] == pytest.approx((alpha @ [r1, r2]) / alpha.sum(), abs=1e-12)
    np.testing.assert_allclose(d["weights"], alpha / alpha.sum(), atol=1e-12)


def test_pwcca_matches_the_official_code_on_centred_whitened_features() -> None:
    rng = np.random.default_rng(8)
    q = _centred_orthonormal(rng, 300, 4)
    x = 3.0 * q  # centred, orthonormal columns: the official "directions" are then the canonical variates
    y = x[:, :3] @ rng.standard_normal((3, 7)) + rng.standard_normal((300, 7))
    assert similarity(x, y, "pwcca") == pytest.approx(official_pwcca(x.T, y.T), abs=1e-10)
    # ... and why the official arithmetic is not the default: it changes with a translation of X
    assert abs(official_pwcca((x + 5).T, y.T) - official_pwcca(x.T, y.T)) > 0.05
    assert similarity(x + 5, y, "pwcca") == pytest.approx(similarity(x, y, "pwcca"), abs=1e-12)


def test_pwcca_sides_and_invariances() -> None:
    rng = np.random.default_rng(9)
    x, y = _pair(9, n=120, p=6, q=6)
    # the side weighted is a property of the variates, not of the argument order
    assert similarity(x, y, "pwcca", weighted="x") == pytest.approx(similarity(y, x, "pwcca", weighted="y"))
    assert similarity(x, y, "pwcca") == similarity(x, y, "pwcca", weighted="x")  # tie → X
    assert abs(similarity(x, y, "pwcca") - similarity(y, x, "pwcca")) > 1e-6  # asymmetric
    # fewer dimensions on Y: Y is weighted in both argument orders
    x2, y2 = _pair(10, n=120, p=8, q=4)
    assert similarity_details(x2, y2, "pwcca")["weighted_side"] == "Y"
    assert similarity(x2, y2, "pwcca") == pytest.approx(similarity(y2, x2, "pwcca"), abs=1e-12)
    base = similarity(x, y, "pwcca")
    signs_perm = np.diag(rng.choice([-1.0, 1.0], 6))[rng.permutation(6)]
    assert similarity(4.0 * x @ signs_perm + 9, y, "pwcca") == pytest.approx(base, abs=1e-10)
    assert abs(similarity(x @ _orthogonal(rng, 6), y, "pwcca") - base) > 1e-6  # L1 weights: not rotation-invariant


def _raw_acts(seed: int, n: int, p: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Layer-like activations: shared signal, correlated (mixed) features of unequal scale, large offsets."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    x = (z @ rng.standard_normal((4, p)) + 0.7 * rng.standard_normal((n, p)) @ rng.standard_normal((p, p)))
    y = z @ rng.standard_normal((4, q)) + rng.standard_normal((n, q))
    return x * np.exp(rng.uniform(-1, 1, p)) + rng.uniform(0, 5, p), np.maximum(y, 0) + 0.3 * y + 1.0


@pytest.mark.parametrize("n,p,q,eps", [(300, 5, 9, 0.0), (300, 9, 5, 0.0), (250, 6, 6, 0.0), (200, 4, 12, 1e-3),
                                       (400, 12, 7, 1e-6), (60, 20, 30, 0.0)])
def test_pwcca_reference_reproduces_the_google_svcca_code(n: int, p: int, q: int, eps: float) -> None:
    x, y = _raw_acts(n + p + q, n, p, q)
    want, w_ref, s_ref = svcca_compute_pwcca(x.T.copy(), y.T.copy(), eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimilarityWarning)  # (60, 20, 30): degenerate, warned, not reduced
        d = similarity_details(x, y, "pwcca_reference", epsilon=eps)
    assert d["value"] == pytest.approx(want, abs=1e-8)
    np.testing.assert_allclose(d["weights"], w_ref, atol=1e-8)
    np.testing.assert_allclose(d["canonical_correlations"], s_ref, atol=1e-8)
    assert d["weighted_side"] == ("X" if p <= q else "Y")
    assert bool(d["warnings"]) == (p + q > n - 1)


def test_pwcca_reference_differs_from_the_paper_version_where_documented() -> None:
    x, y = _raw_acts(5, 300, 5, 9)
    ref, paper = similarity(x, y, "pwcca_reference"), similarity(x, y, "pwcca")
    assert abs(ref - paper) > 0.01  # the two are not the same number on raw activations
    # the reference's weights move with a translation of the weighted side; the paper version's do not
    assert abs(similarity(x + 10.0, y, "pwcca_reference") - ref) > 1e-3
    assert similarity(x + 10.0, y, "pwcca") == pytest.approx(paper, abs=1e-10)
    # both agree when the weighted side is centred with orthonormal columns (the official "directions" are then
    # the canonical variates, and uncentred = centred neurons)
    q = _centred_orthonormal(np.random.default_rng(3), 300, 4)
    rng = np.random.default_rng(4)
    yq = q[:, :3] @ rng.standard_normal((3, 7)) + rng.standard_normal((300, 7))
    assert similarity(3.0 * q, yq, "pwcca_reference") == pytest.approx(similarity(3.0 * q, yq, "pwcca"), abs=1e-9)
    # isotropic scaling of either side and a translation / invertible map of the unweighted side: unchanged
    a = np.random.default_rng(6).standard_normal((9, 9))
    assert similarity(4.0 * x, 0.5 * y @ a - 3.0, "pwcca_reference") == pytest.approx(ref, abs=1e-9)


def test_pwcca_reference_epsilon_drops_neurons_and_refusals() -> None:
    x, y = _raw_acts(7, 300, 6, 9)
    x[:, 2] = 1.0 + 1e-4 * np.random.default_rng(0).standard_normal(300)  # rescaled variance ~1e-8 < epsilon
    d = similarity_details(x, y, "pwcca_reference", epsilon=1e-6)
    assert (d["neurons_kept_x"], d["neurons_kept_y"]) == (5, 9)
    # the reference itself crashes after dropping a neuron (shape mismatch); the evident intent — the same
    # computation on the kept neurons (the rescaling by max |Σ_xx| is unchanged: the dropped neuron is tiny)
    keep = np.arange(6) != 2
    assert d["value"] == pytest.approx(svcca_compute_pwcca(x[:, keep].T.copy(), y.T.copy(), 1e-6)[0], abs=1e-8)
    # rank-deficient side at epsilon 0: pinv leaves eigenvalues at ±rounding, and the reference returns a number,
    # NaN or an SVD failure by luck; here the same number or a clear error, never NaN; epsilon > 0 always works
    for seed in range(6):
        xs, ys = _raw_acts(seed, 300, 6, 9)
        xr = np.concatenate([xs[:, :4], xs[:, :2] @ np.ones((2, 1))], axis=1)
        try:
            v = similarity(xr, ys, "pwcca_reference")
        except NumericalError as e:
            assert "epsilon" in str(e)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                assert v == pytest.approx(svcca_compute_pwcca(xr.T.copy(), ys.T.copy(), 0.0)[0], abs=1e-8)
        assert similarity(xr, ys, "pwcca_reference", epsilon=1e-6) == pytest.approx(
            svcca_compute_pwcca(xr.T.copy(), ys.T.copy(), 1e-6)[0], abs=1e-8)
    with pytest.raises(UsageError, match="epsilon"):
        similarity(x, y, "pwcca_reference", epsilon=-1.0)
    with pytest.raises(UsageError, match="no option 'keep'"):
        similarity(x, y, "pwcca_reference", keep=0.99)
    with pytest.raises(UsageError, match="fewer neurons than datapoints"):
        similarity(x[:6], y[:6], "pwcca_reference")
    with pytest.raises(NumericalError, match="constant"):
        similarity(x, np.ones((300, 3)), "pwcca_reference")


# --- RSA ---------------------------------------------------------------------------------------------------


def test_rsa_matches_scipy() -> None:
    x, y = _pair(11, n=45, p=9, q=5, noise=2.0)
    for rdm, metric in (("correlation", "correlation"), ("euclidean", "euclidean")):
        dx, dy = pdist(x, metric), pdist(y, metric)
        assert similarity(x, y, "rsa", rdm=rdm) == pytest.approx(spearmanr(dx, dy)[0], abs=1e-10)
        assert similarity(x, y, "rsa", rdm=rdm, compare="pearson") == pytest.approx(pearsonr(dx, dy)[0], abs=1e-8)
    assert similarity_details(x, y, "rsa")["n_pairs"] == 45 * 44 // 2


def test_rsa_matches_rsatoolbox() -> None:
    rsatoolbox = pytest.importorskip("rsatoolbox")
    from rsatoolbox.data import Dataset
    from rsatoolbox.rdm import calc_rdm, compare

    x, y = _pair(12, n=40, p=8, q=6, noise=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("correlation", "euclidean"):  # rsatoolbox's "euclidean" is squared / p: same ranks
            rx, ry = calc_rdm(Dataset(x), method=method), calc_rdm(Dataset(y), method=method)
            expected = float(compare(rx, ry, method="spearman")[0, 0])
            assert similarity(x, y, "rsa", rdm=method) == pytest.approx(expected, abs=1e-8), rsatoolbox
        rx, ry = calc_rdm(Dataset(x), method="correlation"), calc_rdm(Dataset(y), method="correlation")
        expected = float(compare(rx, ry, method="corr")[0, 0])
    assert similarity(x, y, "rsa", compare="pearson") == pytest.approx(expected, abs=1e-8)
    # bootstrap duplicates: rsatoolbox's RDMs.subsample_pattern marks copy-pair dissimilarities NaN and drops them
    idx = np.random.default_rng(0).integers(0, 40, 40)
    spec = MEASURES["rsa"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for compare_, method in (("spearman", "spearman"), ("pearson", "corr")):
            rdms = [calc_rdm(Dataset(a, obs_descriptors={"image": np.arange(40)}), method="correlation",
                             descriptor="image").subsample_pattern("image", idx) for a in (x, y)]
            expected = float(compare(*rdms, method=method)[0, 0])
            got = spec._resampler(x, y, {**spec.options, "compare": compare_})(idx)
            assert got == pytest.approx(expected, abs=1e-10)


def test_rsa_invariances() -> None:
    rng = np.random.default_rng(13)
    x, y = _pair(13, n=40, p=6, q=6)
    base = similarity(x, y, "rsa")
    per_sample = x * rng.uniform(0.2, 5, (40, 1)) + rng.normal(0, 10, (40, 1))  # x_i → a_i x_i + b_i, a_i > 0
    assert similarity(per_sample, y, "rsa") == pytest.approx(base, abs=1e-10)
    assert similarity(x[:, rng.permutation(6)], y, "rsa") == pytest.approx(base, abs=1e-10)
    assert abs(similarity(x @ _orthogonal(rng, 6), y, "rsa") - base) > 1e-4  # the correlation RDM is not
    base_e = similarity(x, y, "rsa", rdm="euclidean", compare="pearson")
    moved = 3.0 * x @ _orthogonal(rng, 6) + 11
    assert similarity(moved, y, "rsa", rdm="euclidean", compare="pearson") == pytest.approx(base_e, abs=1e-10)


# --- mutual k-NN -------------------------------------------------------------------------------------------


def test_mknn_hand_example() -> None:
    """Points on rays at the angles below (k = 2, cosine): X and Y swap the positions of samples 2 and 3.
    X neighbourhoods {1,2} {0,2} {1,0} {4,5} {3,5} {4,3}; Y: {1,3} {0,3} {4,5} {1,0} {2,5} {4,2};
    overlaps 1, 1, 0, 0, 1, 1 → mknn = 4 / 12, Jaccard = mean(1/3, 1/3, 0, 0, 1/3, 1/3) = 2/9."""
    def rays(degrees: list[float], radii: list[float]) -> np.ndarray:
        t = np.deg2rad(degrees)
        return np.stack([np.cos(t), np.sin(t)], 1) * np.array(radii)[:, None]

    x = rays([0, 10, 20, 90, 100, 110], [1, 2, 3, 1, 5, 0.5])  # radii are irrelevant for cosine neighbours
    y = rays([0, 10, 90, 20, 100, 110], [1, 1, 1, 1, 1, 1])
    assert similarity(x, y, "mknn", k=2) == pytest.approx(1 / 3)
    assert similarity(x, y, "jaccard_knn", k=2) == pytest.approx(2 / 9)


def test_mknn_matches_sklearn_neighbours() -> None:
    from sklearn.neighbors import NearestNeighbors

    x, y = _pair(14, n=70, p=6, q=5, noise=2.0)
    k = 7

    def sets(a: np.ndarray) -> list[set[int]]:
        idx = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(a).kneighbors(a)[1]
        return [set(row) - {i} if i in row else set(row[:k]) for i, row in enumerate(idx)]

    sx, sy = sets(x), sets(y)
    inter = np.array([len(a & b) for a, b in zip(sx, sy)])
    union = np.array([len(a | b) for a, b in zip(sx, sy)])
    assert similarity(x, y, "mknn", k=k) == pytest.approx(np.mean(inter / k), abs=1e-12)
    assert similarity(x, y, "jaccard_knn", k=k) == pytest.approx(np.mean(inter / union), abs=1e-12)


def test_mknn_invariances() -> None:
    rng = np.random.default_rng(15)
    x, y = _pair(15, n=50, p=5, q=5)
    base = similarity(x, y, "mknn", k=5)
    moved = 2.0 * x @ _orthogonal(rng, 5) * rng.uniform(0.1, 10, (50, 1))  # rotation, per-sample scale
    assert similarity(moved, y, "mknn", k=5) == base
    assert similarity(x + 5.0, y, "mknn", k=5) != base  # cosine of uncentred rows: not translation-invariant


# --- CKA delegation ----------------------------------------------------------------------------------------


def test_cka_measures_delegate_to_the_engine() -> None:
    x, y = _pair(16, n=50, p=7, q=4)
    assert similarity(x, y, "cka") == cka_engine.cka(x, y)
    assert similarity(x, y, "cka_debiased") == cka_engine.cka(x, y, debiased=True)
    assert similarity(x, y, "cka_rbf", threshold=0.5) == cka_engine.cka(x, y, kernel="rbf", threshold=0.5)


# --- permutation null --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_permutation_fast_paths_equal_recomputation(name: str) -> None:
    spec = MEASURES[name]
    x, y = _pair(17, n=45, p=6, q=5)
    opts = dict(spec.options)
    if spec._permuter is None:  # pwcca_reference: recomputed per permutation (no fast path to check)
        r = permutation_null(x, y, name, n_perm=3, seed=0)
        perms = np.random.default_rng(0)
        assert r["null"] == pytest.approx([similarity(x, y[perms.permutation(45)], name) for _ in range(3)])
        return
    fn = spec._permuter(x, y, opts)
    rng = np.random.default_rng(0)
    for perm in (np.arange(45), rng.permutation(45), rng.permutation(45)):
        assert fn(perm) == pytest.approx(similarity(x, y[perm], name), abs=1e-10)


def test_permutation_null_p_value_and_determinism() -> None:
    x, y = _pair(18, n=40, p=5, q=4, noise=8.0)
    for name in ("cka", "procrustes"):
        r = permutation_null(x, y, name, n_perm=50, seed=3)
        assert r["null"].shape == (50,) and r["observed"] == similarity(x, y, name)
        extreme = r["null"] >= r["observed"] if name == "cka" else r["null"] <= r["observed"]
        assert r["p_value"] == (1 + extreme.sum()) / 51
        again = permutation_null(x, y, name, n_perm=50, seed=3)
        np.testing.assert_array_equal(again["null"], r["null"])
        assert not np.array_equal(permutation_null(x, y, name, n_perm=50, seed=4)["null"], r["null"])


def test_permutation_null_calibration() -> None:
    """Independent X, Y: p-values roughly uniform; dependent: the smallest possible p-value."""
    ps = []
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        x, y = rng.standard_normal((25, 4)), rng.standard_normal((25, 3))
        ps.append(permutation_null(x, y, "procrustes", n_perm=99, seed=seed)["p_value"])
    ps = np.array(ps)
    assert np.mean(ps < 0.05) <= 6 / 40 and 0.3 < ps.mean() < 0.7
    x, y = _pair(19, n=60, p=5, q=4, noise=0.5)
    for name in ("procrustes", "cca", "svcca", "pwcca", "rsa", "mknn", "cka"):
        assert permutation_null(x, y, name, n_perm=49, seed=0)["p_value"] == pytest.approx(1 / 50), name


def test_permutation_null_carries_the_cca_reduction_warning() -> None:
    rng = np.random.default_rng(22)  # (data seed 20 happened to give the observed value the smallest rank)
    x, y = rng.standard_normal((30, 40)), rng.standard_normal((30, 35))
    r = permutation_null(x, y, "cca", n_perm=20, seed=0)
    assert r["warnings"] and r["observed"] < 0.95 and r["observed"] == similarity(x, y, "cca")
    # the null is the reduced CCA of row-permuted pairs (seeded as in the fast-path test), the p-value its rank
    perms = np.random.default_rng(0)
    null = np.array([similarity(x, y[perms.permutation(30)], "cca") for _ in range(20)])
    np.testing.assert_allclose(r["null"], null, rtol=0, atol=1e-10)
    assert r["p_value"] == (1 + np.sum(null >= r["observed"])) / 21  # CCA: larger = more alike


# --- bootstrap ---------------------------------------------------------------------------------------------


def test_bootstrap_interval_contains_observed_and_shrinks_with_n() -> None:
    widths = {}
    big_x, big_y = _pair(21, n=250, p=5, q=4, noise=2.0)
    for n in (50, 250):
        x, y = big_x[:n], big_y[:n]  # one population, two sample sizes
        for name in ("procrustes", "cka", "rsa"):
            r = bootstrap_interval(x, y, name, n_boot=40, seed=1)
            assert r["samples"].shape == (40,) and r["low"] <= r["observed"] <= r["high"], (name, n, r)
            assert r["notes"][0] == MEASURES[name].bootstrap_note
            widths[name, n] = r["high"] - r["low"]
    for name in ("procrustes", "cka", "rsa"):
        assert widths[name, 250] < 0.7 * widths[name, 50], name
    r1 = bootstrap_interval(x, y, "mknn", n_boot=10, seed=5)
    np.testing.assert_array_equal(r1["samples"], bootstrap_interval(x, y, "mknn", n_boot=10, seed=5)["samples"])


def test_bootstrap_duplicates_are_handled_for_rsa_and_knn() -> None:
    """Every image twice with its copies marked: RSA and k-NN equal their values on the distinct images."""
    x, y = _pair(22, n=40, p=6, q=5, noise=2.0)
    idx = np.repeat(np.arange(40), 2)
    for name, opts in (("rsa", {}), ("rsa", {"compare": "pearson", "rdm": "euclidean"}), ("mknn", {"k": 4}),
                       ("jaccard_knn", {"k": 4})):
        spec = MEASURES[name]
        full = {**spec.options, **opts}
        expected = similarity(x, y, name, **opts)
        assert spec._impl(x[idx], y[idx], full, idx)[0] == pytest.approx(expected, abs=1e-10)
        assert spec._resampler(x, y, full)(idx) == pytest.approx(expected, abs=1e-10)
        # without the copies marked, duplicates would be each other's neighbours / zero dissimilarities
        assert similarity(x[idx], y[idx], name, **opts) > expected + 0.01
    # a random resample: the fast resampler equals recomputation on the resampled rows
    rng = np.random.default_rng(0)
    boot = rng.integers(0, 40, 40)
    for name in ("rsa", "mknn"):
        spec = MEASURES[name]
        opts = dict(spec.options, **({"k": 4} if name == "mknn" else {}))
        assert spec._resampler(x, y, opts)(boot) == pytest.approx(spec._impl(x[boot], y[boot], opts, boot)[0])
