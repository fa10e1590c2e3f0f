"""Tests that kill the mutants of the numerical core which survived the module tests (issue 18).

`scripts/mutation_score.sh` runs mutmut on the Gram / CKA estimators, the similarity measures, the attention
statistics and the linear-probe solvers. Each test here checks a function against an independent reference
(written out in numpy below) or a hand-built case with a known answer; its docstring names what it pins down.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cka import FakeStore, _data, _model_acts, _naive_minibatch

from repsim.measures.cka_engine import (
    MinibatchCKA,
    NumericalError,
    batch_plan,
    centre_gram,
    cka,
    cka_from_grams,
    cka_matrix,
    contiguous_plan,
    feature_space_linear_cka,
    gram_linear,
    gram_rbf,
    minibatch_cka,
    u_centre_np,
)
from repsim.errors import UsageError

# --- Gram and CKA estimators (repsim/measures/gram.py, repsim/measures/cka_engine.py) -------------------------------------------


def _pairwise_sq_dist(x: np.ndarray) -> np.ndarray:
    """‖x_i − x_j‖² by explicit differences (no Gram expansion)."""
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def test_gram_linear_centres_each_column():
    """gram_linear is X̃X̃ᵀ with *per-column* means removed (a global mean would leave column offsets in)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 4)) + np.array([10.0, -3.0, 0.0, 50.0])
    xc = x - x.mean(axis=0)
    np.testing.assert_allclose(gram_linear(x), xc @ xc.T, rtol=1e-12, atol=1e-10)


def test_rbf_default_bandwidth_is_the_median_squared_distance():
    """Default threshold 1: σ² = median of the n² squared distances (Kornblith et al.'s colab gram_rbf); cka(kernel=
    'rbf') is CKA of those Grams; threshold 0 is refused."""
    x, y = _data(3, 12, 3, 2)
    ref = {}
    for name, a in (("x", x), ("y", y)):
        d2 = _pairwise_sq_dist(a)
        ref[name] = np.exp(-d2 / (2.0 * np.median(d2)))
    np.testing.assert_allclose(gram_rbf(x), ref["x"], rtol=1e-12)
    assert cka(x, y, kernel="rbf") == pytest.approx(cka_from_grams(ref["x"], ref["y"]), rel=1e-12)
    with pytest.raises(UsageError, match="RBF threshold must be > 0, got 0"):
        gram_rbf(x, 0.0)


def test_u_centre_np_is_float64_and_leaves_its_input_alone():
    """u_centre_np returns a new float64 array (float32 input up-cast before any arithmetic); the caller's Gram is
    unchanged. Reference: Székely–Rizzo's formula K_ij − r_i/(n−2) − r_j/(n−2) + s/((n−1)(n−2)), written out."""
    rng = np.random.default_rng(1)
    f = rng.standard_normal((7, 3))
    k64 = f @ f.T + 100.0  # a large offset: float32 arithmetic would lose ~1e-5 of it
    k = k64.copy()
    np.fill_diagonal(k, 0.0)
    n = len(k)
    r, s = k.sum(1), k.sum()
    ref = k - r[:, None] / (n - 2) - r[None, :] / (n - 2) + s / ((n - 1) * (n - 2))
    np.fill_diagonal(ref, 0.0)
    before = k64.copy()
    out = u_centre_np(k64)
    np.testing.assert_array_equal(k64, before)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-11)
    out32 = u_centre_np(k64.astype(np.float32))
    assert out32.dtype == np.float64
    np.testing.assert_allclose(out32, u_centre_np(k64.astype(np.float32).astype(np.float64)), rtol=0, atol=1e-12)


def test_cka_names_the_bad_side_and_refuses_nan_grams():
    """Errors name the side (X or Y) at fault; a NaN Gram is refused by cka_from_grams, never returned as NaN."""
    x, y = _data(4, 10, 3)
    y_nan = y.copy()
    y_nan[2, 1] = np.nan
    with pytest.raises(NumericalError, match="^Y holds a non-finite value"):
        cka(x, y_nan)
    with pytest.raises(NumericalError, match="^X holds a non-finite value"):
        cka(y_nan, x)
    with pytest.raises(NumericalError, match="^Y holds a non-finite value"):
        feature_space_linear_cka(x, y_nan)
    with pytest.raises(NumericalError, match="^X holds a non-finite value"):
        feature_space_linear_cka(y_nan, x)
    with pytest.raises(NumericalError, match="self-HSIC of Y is 0"):
        feature_space_linear_cka(x, np.ones_like(y))
    k = x @ x.T
    k_nan = k.copy()
    k_nan[0, 1] = k_nan[1, 0] = np.nan
    with pytest.raises(NumericalError, match="self-HSIC of X is nan: not a finite non-negative number"):
        cka_from_grams(k_nan, k)
    with pytest.raises(NumericalError, match=r"self-HSIC of Y is 0 \(constant representation\)"):
        cka_from_grams(k, np.ones_like(k))
    with pytest.raises(UsageError, match=r"^Y must have shape \(n, features\)"):
        minibatch_cka(x, np.ones(10))
    with pytest.raises(UsageError, match=r"^X must have shape \(n, features\)"):
        minibatch_cka(np.ones(10), x)


def _reference_minibatch(x, y, batch_size, seed, repeats):
    """Mean and sample std (ddof 1) over repeats of the naive sum form, repeat r on the documented plan: one row
    per chunk, batch_plan seeded by default_rng([seed, r])."""
    rows = [np.array([i]) for i in range(len(x))]
    values = []
    for r in range(repeats):
        plan = batch_plan(rows, batch_size, np.random.default_rng([seed, r]))
        values.append(_naive_minibatch(x, y, [b for g in plan for b in g.batches]))
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if repeats > 1 else None)


def test_minibatch_cka_repeats_report_the_sample_std():
    """repeats > 1: the mean and the ddof-1 standard deviation over the per-repeat plans."""
    x, y = _data(6, 60, 4, 3, noise=2.0)
    mean, std = minibatch_cka(x, y, batch_size=12, repeats=3, seed=5, gram_dtype="float64", device="cpu")
    ref_mean, ref_std = _reference_minibatch(x, y, 12, 5, 3)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert std == pytest.approx(ref_std, rel=1e-8) and std > 1e-4
    _, std2 = minibatch_cka(x, y, batch_size=12, repeats=2, seed=5, gram_dtype="float64", device="cpu")
    assert std2 == pytest.approx(_reference_minibatch(x, y, 12, 5, 2)[1], rel=1e-8)


def test_minibatch_cka_defaults_are_batches_of_256_seed_0():
    """The documented defaults (batch_size=256, seed=0) decide the plan, hence the value, for n > 256."""
    x, y = _data(8, 300, 3, 2, noise=3.0)
    got, std = minibatch_cka(x, y, gram_dtype="float64", device="cpu")
    assert std is None
    assert got == pytest.approx(_reference_minibatch(x, y, 256, 0, 1)[0], rel=1e-10)


def test_exact_store_cka_refuses_a_constant_layer():
    """Exact (feature form, every layer narrower than n) on a store with a constant layer: an error naming it,
    never a NaN map."""
    acts = _model_acts(0, 40)
    acts["head"] = np.full_like(acts["head"], 3.0)
    with pytest.raises(NumericalError, match=r"self-HSIC of layer 'head' .* is 0 \(constant activations\)"):
        cka_matrix(FakeStore(acts), estimator="exact", progress=False, device="cpu")


def test_center_gram_is_float64_and_refuses_non_square():
    """centre_gram returns float64 (a float32 Gram is up-cast before centring, so it equals the float64 result) and
    refuses a non-square matrix."""
    rng = np.random.default_rng(2)
    f = rng.standard_normal((6, 2))
    k32 = (f @ f.T + 1000.0).astype(np.float32)  # the offset is where float32 centring would cancel
    for unbiased in (False, True):
        got = centre_gram(k32, unbiased=unbiased)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, centre_gram(k32.astype(np.float64), unbiased=unbiased), rtol=0, atol=1e-10)
    with pytest.raises(UsageError, match=r"a Gram matrix must be square, got shape \(3, 4\)"):
        centre_gram(np.ones((3, 4)))


def _batch_sizes(plan):
    return [len(b) for g in plan for b in g.batches]


def test_batch_plan_hand_built_cases():
    """Hand-built chunk layouts with known plans (the batch_plan docstring's rules)."""
    # Chunks of 4 rows and batches of 8: every group closes at exactly two chunks, every batch has 8 rows.
    rows = [np.arange(4 * c, 4 * c + 4) for c in range(8)]
    for seed in range(5):
        plan = batch_plan(rows, 8, np.random.default_rng(seed))
        assert [len(g.chunks) for g in plan] == [2, 2, 2, 2]
        assert _batch_sizes(plan) == [8, 8, 8, 8]
    # Empty chunks (no compared rows) are skipped, not the end of the plan: every row is still planned once.
    rows = [np.arange(0, 5), np.array([], dtype=np.int64), np.arange(5, 10), np.array([], dtype=np.int64),
            np.arange(10, 15)]
    for seed in range(5):
        plan = batch_plan(rows, 5, np.random.default_rng(seed))
        np.testing.assert_array_equal(np.sort(np.concatenate([b for g in plan for b in g.batches])), np.arange(15))
    # A remainder of exactly 4 rows is a batch of its own; one of 2 rows joins the group formed just before it.
    outcomes = set()
    for seed in range(20):  # chunk orders 8, 8 | 4 (a remainder of 4) or 8, 4, 8 / 4, 8, 8 (one group of 20 rows)
        plan = batch_plan([np.arange(0, 8), np.arange(8, 16), np.arange(16, 20)], 16, np.random.default_rng(seed))
        outcomes.add(tuple(_batch_sizes(plan)))
    assert outcomes == {(16, 4), (20,)}
    seen_tail = 0
    for seed in range(40):
        rows = [np.arange(8 * c, 8 * c + 8) for c in range(6)] + [np.arange(48, 50)]
        plan = batch_plan(rows, 8, np.random.default_rng(seed))
        sizes = [len(np.concatenate(g.batches)) for g in plan]
        if sizes.count(18) == 1:  # the 2-row chunk was the remainder
            seen_tail += 1
            assert sizes[-1] == 18 and 6 in plan[-1].chunks
    assert seen_tail > 0


def test_contiguous_plan_last_block_boundaries():
    """A last block of 4 rows stands alone, one of 3 joins the previous batch; n = 4 is one batch of 4."""
    assert _batch_sizes(contiguous_plan(20, 16)) == [16, 4]
    assert _batch_sizes(contiguous_plan(19, 16)) == [19]
    assert _batch_sizes(contiguous_plan(4, 16)) == [4]
    for g in contiguous_plan(40, 16):  # documented: a contiguous plan names no chunks
        assert g.chunks.dtype == np.int64 and g.chunks.size == 0


def test_minibatch_accumulator_counts_and_float64_sums():
    """MinibatchCKA counts batches and samples over update() and merge(), and up-casts float32 Grams before the
    products (the sums equal those of the same Grams given in float64)."""
    rng = np.random.default_rng(3)
    grams = [torch.from_numpy(rng.standard_normal((2, m * m)) * 1e3 + 1e4) for m in (5, 7, 6)]
    acc = MinibatchCKA(2, 2)
    for g in grams[:2]:
        acc.update(g.float(), g.float())
    other = MinibatchCKA(2, 2)
    other.update(grams[2].float(), grams[2].float(), batches=3, samples=20)
    acc.merge(other)
    assert (acc.n_batches, acc.n_samples) == (5, 5 + 7 + 20)
    ref = MinibatchCKA(2, 2)
    for g in grams:
        g64 = g.float().double()  # the float32 values, in float64
        ref.update(g64, g64)
    np.testing.assert_allclose(acc.cross.numpy(), ref.cross.numpy(), rtol=1e-13)
    np.testing.assert_allclose(acc.self_a.numpy(), ref.self_a.numpy(), rtol=1e-13)
    np.testing.assert_allclose(acc.self_b.numpy(), ref.self_b.numpy(), rtol=1e-13)


# --- similarity measures (repsim/measures/beyond_cka.py) -------------------------------------------------------

from repsim.measures.beyond_cka import (  # noqa: E402
    MEASURES,
    _clip_rho,
    _extreme,
    _neighbours,
    _nu,
    bootstrap_interval,
    similarity,
    similarity_details,
)


def test_cca_cap_keeps_the_small_side_whole_on_either_side():
    """rank(X̃) + rank(Ỹ) > n − 1: the side that fits in ⌊(n − 1)/2⌋ is kept whole and the other cut to the rest,
    whichever of X and Y is small; at exactly ⌊(n − 1)/2⌋ the small side still counts as fitting (n = 10: 9 = 4 + 5)."""
    rng = np.random.default_rng(7)
    big, small, four = rng.standard_normal((10, 30)), rng.standard_normal((10, 2)), rng.standard_normal((10, 4))
    for x, y, dims in ((small, big, (2, 7)), (big, small, (7, 2)), (four, big, (4, 5)), (big, four, (5, 4))):
        d = similarity_details(x, y, "cca", keep=1.0)
        assert (d["dims_x"], d["dims_y"]) == dims


def test_cca_statements_carry_the_right_numbers():
    """The degenerate-CCA warnings and notes state numbers the reader acts on: the bound n − 1, how many
    correlations dimension counting forces to 1, the cap, the repeats; checked on hand-sized cases."""
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((10, 6)), rng.standard_normal((10, 6))
    d = similarity_details(x, y, "cca", keep=1.0)  # ranks 6 + 6 > 9: 3 forced, both sides cut to 4
    assert d["warnings"][0] == ("CCA is degenerate on these data: rank(X̃) + rank(Ỹ) = 6 + 6 > n − 1 = 9, which "
                                "forces at least 3 canonical correlations to 1; each side was reduced by SVD "
                                "(keep=1.0 of the variance, then capped to 4 + 4 ≤ n − 1 = 9 dimensions so that no "
                                "canonical correlation is 1 by dimension counting)")
    assert d["warnings"][1] == ("CCA on 4 + 4 dimensions from 10 distinct samples is biased upwards when dimensions "
                                "/ n is not small; compare with permutation_null")
    assert not any("numerical rank" in note for note in d["notes"])  # full rank: no rank note
    wide = similarity_details(rng.standard_normal((10, 20)), y, "cca")  # rank 9 = n − 1 < 20 features: full rank
    assert not any("numerical rank" in note for note in wide["notes"])
    # variance in 2 directions: keep=0.99 alone brings 6 + 6 under the bound, the sentence closes without a cap
    z = rng.standard_normal((10, 6)) * np.array([10.0, 10.0, 1e-3, 1e-3, 1e-3, 1e-3])
    d = similarity_details(z, z[:, ::-1] + 1e-4 * rng.standard_normal((10, 6)), "cca")
    assert d["warnings"][0].endswith("each side was reduced by SVD (keep=0.99 of the variance)")
    s = np.linalg.svd(z - z.mean(0), compute_uv=False) ** 2
    assert d["variance_kept_x"] == pytest.approx(s[:d["dims_x"]].sum() / s.sum(), rel=1e-12)
    assert "variance_kept_y" in d and 0.99 <= d["variance_kept_y"] <= 1.0
    # rows repeated in X and Y alike: the note counts them and names the smaller bound
    rep = np.r_[np.arange(10), 0, 1]
    d = similarity_details(x[rep], y[rep], "cca", keep=1.0)
    assert d["notes"][0] == ("2 of the 12 samples repeat others (in X and Y alike): the CCA dimension bound is "
                             "distinct samples − 1 = 9")
    assert "> distinct samples − 1 = 9" in d["warnings"][0]
    assert not any("repeat others" in note for note in similarity_details(x, y, "cca")["notes"])


def test_svcca_statements_and_the_degeneracy_boundary():
    """SVCCA's notes and cap sentence state its numbers; rank(X̃) + rank(Ỹ) = n (just above n − 1) already counts
    as degenerate, so keep=0.99 reduces both sides (to 2 + 2 here) before any cap."""
    rng = np.random.default_rng(13)
    x, y = rng.standard_normal((10, 6)), rng.standard_normal((10, 6))
    d = similarity_details(x, y, "svcca", keep=1.0)
    assert d["notes"][0] == "SVD step kept 6 of rank 6 directions of X and 6 of 6 of Y (keep=1.0)"
    assert d["warnings"][0] == ("SVCCA kept 6 + 6 > n − 1 = 9 dimensions; capped to 4 + 4 ≤ n − 1 = 9 dimensions so "
                                "that no canonical correlation is 1 by dimension counting")
    scale = np.array([10.0, 10.0, 1e-3, 1e-3, 1e-3])
    d = similarity_details(rng.standard_normal((10, 5)) * scale, rng.standard_normal((10, 5)) * scale, "cca")
    assert (d["rank_x"], d["rank_y"], d["dims_x"], d["dims_y"]) == (5, 5, 2, 2)


def test_cca_edge_cases_by_hand():
    """n = 3 (the declared minimum) gives |Pearson| for one feature per side; a constant side is named; −0.0 and
    0.0 are the same sample; numerical rank follows numpy's matrix_rank (tolerance from the largest singular value)."""
    x, y = np.array([[0.0], [1.0], [3.0]]), np.array([[1.0], [0.0], [5.0]])
    assert similarity(x, y, "cca") == pytest.approx(abs(np.corrcoef(x[:, 0], y[:, 0])[0, 1]), rel=1e-12)
    with pytest.raises(NumericalError, match="^Y is constant across samples"):
        similarity(np.random.default_rng(0).standard_normal((6, 2)), np.ones((6, 2)), "cca")
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((8, 3)), rng.standard_normal((8, 3))
    a[1], b[1] = a[0], b[0]
    a[0, 0], a[1, 0] = 0.0, -0.0
    assert similarity_details(a, b, "cca")["n_distinct"] == 7
    low = np.outer(rng.standard_normal(12), [1e3, 2e3, 0.0]) + 1e-14 * rng.standard_normal((12, 3))
    d = similarity_details(low, rng.standard_normal((12, 2)), "cca")
    assert d["rank_x"] == np.linalg.matrix_rank(low - low.mean(0)) == 1


def test_canonical_correlation_and_procrustes_guards():
    """ν and ρ above 1 by more than 1e-8 are failures (raised), rounding above 1 is removed exactly; the check
    looks at the largest correlation."""
    eye = np.eye(3)
    assert _nu(eye / np.sqrt(3), eye / np.sqrt(3)) == 1.0
    assert _nu(eye / np.sqrt(3) * (1 + 1e-12), eye / np.sqrt(3)) == 1.0
    with pytest.raises(NumericalError, match="Procrustes ν = 1.5"):
        _nu(eye / np.sqrt(3) * 1.5, eye / np.sqrt(3))
    np.testing.assert_array_equal(_clip_rho(np.array([1.0 + 1e-12, 0.5])), [1.0, 0.5])
    with pytest.raises(NumericalError, match=r"a canonical correlation is \S*1\.5\)? > 1"):
        _clip_rho(np.array([1.5, 0.2]))


def _pwcca_reference_x_weighted(x: np.ndarray, y: np.ndarray) -> float:
    """PWCCA with X weighted (Morcos et al. 2018) from the whitened cross-covariance, for k_x = k_y + 1: the extra
    canonical variate of X is the direction of col(X̃) orthogonal to the others (unique up to sign), with ρ = 0."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc

    def invsqrt(a):
        w, v = np.linalg.eigh(a)
        return v @ np.diag(w ** -0.5) @ v.T

    u, rho, _ = np.linalg.svd(invsqrt(sxx) @ sxy @ invsqrt(syy))
    h = xc @ invsqrt(sxx) @ u  # (n, k_x) canonical variates of X, the last one with ρ = 0
    h /= np.linalg.norm(h, axis=0)
    alpha = np.abs(h.T @ xc).sum(1)
    return float(alpha[: rho.size] @ rho / alpha.sum())


def test_pwcca_forced_on_the_larger_side_and_scale_free():
    """weighted='x' with k_x = k_y + 1: the extra canonical direction enters the weights with ρ = 0 (checked
    against the whitened-covariance construction); PWCCA does not depend on the data's scale."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((50, 3))
    y = x[:, :2] @ rng.standard_normal((2, 2)) + 0.7 * rng.standard_normal((50, 2))
    assert similarity(x, y, "pwcca", weighted="x") == pytest.approx(_pwcca_reference_x_weighted(x, y), rel=1e-10)
    v = similarity(x, y, "pwcca")
    assert similarity(1e-4 * x, 1e-4 * y, "pwcca") == pytest.approx(v, rel=1e-10)


def test_rsa_edge_cases_by_hand():
    """An equilateral triangle has a constant Euclidean RDM: RSA is undefined and says which side; the
    correlation RDM works from 2 features (1 − r is then 0 or 2)."""
    tri = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    other = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 1.0]])
    with pytest.raises(NumericalError, match="the RDM of Y is constant"):
        similarity(other, tri, "rsa", rdm="euclidean", compare="pearson")
    with pytest.raises(NumericalError, match="the RDM of X is constant"):
        similarity(tri, other, "rsa", rdm="euclidean", compare="pearson")
    x2 = np.array([[1.0, 2.0], [2.0, 1.0], [0.0, 5.0], [3.0, 1.0]])  # r = ±1 between samples: d ∈ {0, 2}
    y2 = np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 3.0], [0.0, 5.0, 1.0], [3.0, 1.0, 2.0]])

    def corr_rdm_triangle(a):
        iu = np.triu_indices(len(a), 1)
        return (1.0 - np.corrcoef(a))[iu]

    ref = np.corrcoef(corr_rdm_triangle(x2), corr_rdm_triangle(y2))[0, 1]
    assert similarity(x2, y2, "rsa", compare="pearson") == pytest.approx(ref, rel=1e-12)


def test_knn_ties_direction_check_and_bootstrap_weights():
    """Ties go to the lower index (n > 16, where an unstable sort would reorder them); samples on one ray are
    refused whatever their lengths; a bootstrap resample's mknn weights each distinct image by its copies."""
    np.testing.assert_array_equal(_neighbours(np.zeros((40, 40)), 5)[[0, 3, 39]],
                                  [[1, 2, 3, 4, 5], [0, 1, 2, 4, 5], [0, 1, 2, 3, 4]])
    ray = np.outer(np.arange(1.0, 9.0), [1.0, 2.0, 0.5])
    with pytest.raises(NumericalError, match="all samples of X point in the same direction"):
        similarity(ray, np.random.default_rng(0).standard_normal((8, 3)), "mknn", k=2)
    rng = np.random.default_rng(11)
    x, y = rng.standard_normal((12, 4)), rng.standard_normal((12, 4))
    got = bootstrap_interval(x, y, "mknn", n_boot=1, seed=3, k=3)["samples"][0]
    idx = np.random.default_rng(3).integers(0, 12, size=12)
    uniq, counts = np.unique(idx, return_counts=True)

    def nbrs(a):
        z = a[uniq] / np.linalg.norm(a[uniq], axis=1, keepdims=True)
        s = z @ z.T
        np.fill_diagonal(s, -np.inf)
        return [set(np.argsort(-row, kind="stable")[:3]) for row in s]

    per = [len(p & q) / 3 for p, q in zip(nbrs(x), nbrs(y))]
    assert got == pytest.approx(np.average(per, weights=counts), rel=1e-12)


def test_p_value_counts_ties_and_uses_a_relative_tolerance():
    """"At least as extreme" includes exact ties on both orientations, and rounding within 1e-10·max(1, |observed|)."""
    sim, dist = MEASURES["cka"], MEASURES["procrustes"]
    np.testing.assert_array_equal(_extreme(sim, np.array([0.5, 0.5 - 5e-11, 0.5 - 2e-10, 0.6]), 0.5),
                                  [True, True, False, True])
    np.testing.assert_array_equal(_extreme(dist, np.array([0.5, 0.5 + 5e-11, 0.5 + 2e-10, 0.4]), 0.5),
                                  [True, True, False, True])
    np.testing.assert_array_equal(_extreme(sim, np.array([1.0 - 1.5e-10]), 1.0), [False])
    np.testing.assert_array_equal(_extreme(sim, np.array([100.0 - 5e-9, 100.0 - 2e-8]), 100.0), [True, False])


# --- attention statistics (repsim/attention/statistics.py, hooks/capture/attention_reduce.py) --------------------------------------


@pytest.mark.slow  # builds and runs a (tiny) Swin: several seconds on a busy 2-core machine
def test_reducer_refuses_padded_swin_windows():
    """A stage grid that is not a multiple of the window (64 px: 16 × 16 tokens, windows of 7) makes timm pad the
    windows; the online reducer refuses instead of averaging over padding tokens, which have no image position."""
    import timm

    from hooks.capture.attention import AttentionCapture, find_attention_layers
    from hooks.capture.attention_reduce import AttentionReducer

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, depths=(2, 2),
                              num_heads=(1, 2), embed_dim=16).eval()
    reducer = AttentionReducer(find_attention_layers(model))
    reducer.begin_batch(range(1))
    with pytest.raises(UsageError, match=r"stage grid \(16, 16\) is not a multiple of the window"):
        with AttentionCapture(model, callback=reducer), torch.no_grad():
            model(torch.randn(1, 3, 64, 64))


def _uniform(n_heads: int, n: int, batch: int = 1) -> torch.Tensor:
    return torch.full((batch, n_heads, n, n), 1.0 / n, dtype=torch.float64)


def test_attention_defaults_and_shapes_by_hand():
    """Defaults: no prefix tokens (entropy of uniform attention over N tokens is log N, prefix mass 0); a
    (H, N, N) input without a batch axis is accepted; a non-square patch weighs rows and columns differently."""
    from repsim.attention.statistics import attention_distance, attention_entropy, head_statistics

    a = _uniform(2, 9)
    np.testing.assert_allclose(attention_entropy(a).numpy(), np.log(9.0), rtol=1e-12)
    b = a.clone()
    b[..., 0, :] = 0.0
    b[..., 0, 0] = 1.0  # query 0 attends to itself only: its row has entropy 0, and it is a patch query
    np.testing.assert_allclose(attention_entropy(b).numpy(), 8.0 / 9.0 * np.log(9.0), rtol=1e-12)
    stats = head_statistics(a, (3, 3), 4)
    np.testing.assert_allclose(stats["entropy"].numpy(), np.log(9.0), rtol=1e-12)
    np.testing.assert_allclose(stats["prefix_mass"].numpy(), 0.0, atol=0)
    assert head_statistics(a[0], (3, 3), 4)["distance"].shape == (2,)
    # each patch of a 1 × 2 grid attends only to the other: the distance is one column step, pw pixels
    other = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]], dtype=torch.float64)
    assert float(attention_distance(other, (1, 2), (4, 8))) == pytest.approx(8.0)
    assert float(attention_distance(other.transpose(-1, -2), (2, 1), (4, 8))) == pytest.approx(4.0)


def test_pixel_distances_use_ph_down_rows_and_pw_across_columns():
    """Patch-centre distances on a 2 × 3 grid with (ph, pw) = (3, 4) px, written out by hand (a 3-4-5 triangle
    per diagonal step): rows are ph apart, columns pw. Checked on the function itself and through the
    ``positions`` path (Swin / user ViTs), which, unlike the default grid, is not cached; float patch sizes keep
    float64 precision."""
    from repsim.attention.statistics import _pixel_distances, attention_distance, grid_positions

    r = np.sqrt(73.0)  # (1, 2) steps: sqrt(3² + 8²)
    by_hand = np.array([  # tokens (0,0) (0,1) (0,2) (1,0) (1,1) (1,2)
        [0.0, 4.0, 8.0, 3.0, 5.0, r],
        [4.0, 0.0, 4.0, 5.0, 3.0, 5.0],
        [8.0, 4.0, 0.0, r, 5.0, 3.0],
        [3.0, 5.0, r, 0.0, 4.0, 8.0],
        [5.0, 3.0, 5.0, 4.0, 0.0, 4.0],
        [r, 5.0, 3.0, 8.0, 4.0, 0.0],
    ])
    pos = grid_positions((2, 3))
    np.testing.assert_allclose(_pixel_distances(pos, (3, 4)).numpy(), by_hand, rtol=1e-15)
    np.testing.assert_allclose(_pixel_distances(pos, (4, 3)).numpy(), _pixel_distances(pos[:, [1, 0]], (3, 4)),
                               rtol=1e-15)  # swapping the patch sides = swapping rows and columns
    # query i attends only to token 5 - i (the point reflection): distances r, 3, r, r, 3, r
    reflect = torch.eye(6, dtype=torch.float64).flip(1)[None, None]
    got = attention_distance(reflect, (2, 3), (3, 4), positions=pos.double())
    assert float(got) == pytest.approx((4 * r + 2 * 3.0) / 6, rel=1e-14)
    # a patch of (0.1, 0.3) px is not a float32 number: the scale must stay float64
    ph, pw = 0.1, 0.3
    dy, dx = pos[None, :, 0] - pos[:, None, 0], pos[None, :, 1] - pos[:, None, 1]
    ref = np.sqrt((dy.numpy() * ph) ** 2 + (dx.numpy() * pw) ** 2)
    np.testing.assert_allclose(_pixel_distances(pos.double(), (ph, pw)).numpy(), ref, rtol=1e-14)


def test_head_statistics_on_pooled_keys_by_hand():
    """Cross-grid head statistics (keys pooled 2× along one axis, as in PVT / MViT / Twins) with one CLS token and
    hand-known answers: 4 queries in a row over 2 keys, each query at (c − 0.5)/2 key steps. Head 0 puts half its
    row on CLS and half on key 0, head 1 its patch mass on the key containing the query. The mean distance is
    over queries (Nq = 4 ≠ Nk = 2, so a mean over keys is caught); along columns it counts pw, along rows ph."""
    from repsim.attention.statistics import head_statistics

    steps = torch.tensor([-0.25, 0.25, 0.75, 1.25], dtype=torch.float64)  # query centres in key steps
    attn = torch.zeros(1, 2, 5, 3, dtype=torch.float64)
    attn[0, :, 0, 0] = 1.0  # the CLS query: not a patch query, ignored
    attn[0, 0, 1:, 0] = attn[0, 0, 1:, 1] = 0.5
    attn[0, 1, 1:3, 1] = attn[0, 1, 3:5, 2] = 1.0
    ph, pw = 4.0, 8.0
    for axis, grid, scale in ((1, (1, 2), pw), (0, (2, 1), ph)):  # keys in a row, then in a column
        qpos = torch.zeros(4, 2, dtype=torch.float64)
        qpos[:, axis] = steps
        s = head_statistics(attn, grid, (ph, pw), 1, query_positions=qpos)
        # head 0: all patch mass on key 0, |offsets| 0.25, 0.25, 0.75, 1.25 steps; head 1: 0.25 steps each
        np.testing.assert_allclose(s["distance"].numpy(), [[scale * 2.5 / 4, scale * 0.25]], rtol=1e-14)
        np.testing.assert_allclose(s["prefix_mass"].numpy(), [[0.5, 0.0]], atol=0)
        np.testing.assert_allclose(s["entropy"].numpy(), [[np.log(2.0), 0.0]], rtol=1e-14)
        # queries sit in key cells 0, 0, 1, 1: head 0's offsets to key 0 are 0, 0, −1, −1; head 1's all 0
        canvas = np.array([[2.0, 2.0, 0.0], [0.0, 4.0, 0.0]])
        expected = canvas[:, None, :] if axis == 1 else canvas[:, :, None]
        np.testing.assert_array_equal(s["aligned_sum"].numpy(), expected)
    with pytest.raises(UsageError, match=r"^patch_size must be positive, got 0"):
        head_statistics(attn, (2, 1), 0, 1, query_positions=qpos)


def test_class_attention_statistics_by_hand():
    """One CLS query over 1 prefix key (the default) and a 2 × 2 grid: per-head prefix mass and entropy, the map
    renormalised per head, zeros (not NaN) for a head with no patch mass; (H, 1, S) without a batch axis works."""
    from repsim.attention.statistics import class_attention_statistics

    rows = torch.tensor([[[[0.2, 0.4, 0.2, 0.2, 0.0]], [[1.0, 0.0, 0.0, 0.0, 0.0]], [[0.5, 0.0, 0.0, 0.0, 0.5]]]],
                        dtype=torch.float64)
    s = class_attention_statistics(rows, (2, 2))
    np.testing.assert_allclose(s["prefix_mass"].numpy(), [[0.2, 1.0, 0.5]])
    np.testing.assert_allclose(s["entropy"].numpy(), [[-(0.2 * np.log(0.2) * 3 + 0.4 * np.log(0.4)), 0.0, np.log(2)]])
    np.testing.assert_allclose(s["cls_map"][0, 0].numpy(), [[0.5, 0.25], [0.25, 0.0]])
    np.testing.assert_array_equal(s["cls_map"][0, 1].numpy(), np.zeros((2, 2)))
    np.testing.assert_allclose(s["cls_map"][0, 2].numpy(), [[0.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(class_attention_statistics(rows[0], (2, 2))["prefix_mass"].numpy(), [0.2, 1.0, 0.5])


def test_rollout_defaults_by_hand():
    """Abnar & Zuidema's rollout with the defaults (residual 0.5·A + 0.5·I, later layer on the left, dtype of the
    input), against a hand product on 2 tokens; a non-square attention is refused."""
    from repsim.attention.statistics import attention_rollout

    a1 = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]], dtype=torch.float64)
    a2 = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]], dtype=torch.float64)
    h1 = 0.5 * a1[0, 0].numpy() + 0.5 * np.eye(2)
    h2 = 0.5 * a2[0, 0].numpy() + 0.5 * np.eye(2)
    r = attention_rollout([a1, a2])
    assert r.dtype == torch.float64
    np.testing.assert_allclose(r[0].numpy(), h2 @ h1, rtol=1e-15)
    with pytest.raises(UsageError, match=r"attns\[1\] must have shape \(B, H, N, N\)"):
        attention_rollout([a1, torch.ones(1, 1, 2, 3)])
    with pytest.raises(UsageError, match=r"attns\[0\] must have shape \(B, H, N, N\)"):
        attention_rollout([torch.ones(1, 2, 2)])


# --- linear probes (probes/solvers.py) ---------------------------------------------------------------------------


def _sk_ridge_val_top1(Xt, yt, Xv, yv, lam):
    """scikit-learn Ridge(alpha = λ·n) on one-hot targets of z-scored features (training mean and population
    std), arg-max on the validation rows: (validation top-1, validation scores)."""
    from sklearn.linear_model import Ridge

    mu, sd = Xt.mean(0), Xt.std(0)
    classes = np.unique(yt)
    onehot = (yt[:, None] == classes[None, :]).astype(np.float64)
    model = Ridge(alpha=lam * len(yt), fit_intercept=True, solver="svd").fit((Xt - mu) / sd, onehot)
    scores = model.predict((Xv - mu) / sd)
    return float(np.mean(classes[np.argmax(scores, 1)] == yv)), scores


@pytest.mark.parametrize("d", [6, 50])  # primal (d < n) and dual (d > n) eigen-solvers
def test_ridge_validation_curve_matches_scikit_learn(d):
    """Every λ's validation top-1 (the curve λ is chosen on) and the refitted decision function equal
    scikit-learn's Ridge on one-hot targets of standardised features, with offsets and scales far from 0 and 1."""
    from probes.solvers import ridge_classify

    rng = np.random.default_rng(12)
    n, c = 40, 3
    y = rng.integers(0, c, size=n + 30)
    X = rng.standard_normal((n + 30, d)) * np.geomspace(0.05, 20.0, d) + rng.uniform(-50, 50, d)  # sd < 1 and > 1
    X[:, :3] += 3.0 * np.eye(c)[y] * X[:, :3].std(0)
    Xt, yt, Xv, yv = X[:n], y[:n], X[n:], y[n:]
    lambdas = [1e-3, 0.1, 3.0]
    fit = ridge_classify(Xt, yt, Xv, yv, lambdas, device="cpu")
    ref = [_sk_ridge_val_top1(Xt, yt, Xv, yv, lam)[0] for lam in lambdas]
    np.testing.assert_allclose(fit.val_top1, ref, atol=1e-12)
    assert len(set(ref)) > 1  # the strengths are told apart, so the curve can catch a wrong one
    _, scores = _sk_ridge_val_top1(Xt, yt, Xv, yv, fit.lam)
    np.testing.assert_allclose(fit.decision_function(Xv), scores, rtol=1e-8, atol=1e-8)


def test_validation_metric_decides_the_strength_on_imbalanced_classes():
    """A hand-built case where top-1 and mean per-class accuracy disagree. Training: class 0 at x = 0 (8 rows),
    class 1 at x = 1 (2 rows); validation: 6 class-0 rows at 0, 3 at 0.8 and the class-1 row at 1. λ = 1e5
    predicts the majority class everywhere (top-1 9/10, per-class (1 + 0)/2); λ = 1e-6 separates the training
    classes at x ≈ 0.5 (top-1 7/10, per-class (6/9 + 1)/2). Each metric must pick its own best λ, in both
    solvers (ridge through _pick, logreg through its path loop)."""
    from probes.solvers import fit_logreg, ridge_classify

    Xt, yt = np.r_[[0.0] * 8, [1.0] * 2][:, None], np.r_[[0] * 8, [1] * 2]
    Xv, yv = np.r_[[0.0] * 6, [0.8] * 3, 1.0][:, None], np.r_[[0] * 9, 1]
    for solver in (ridge_classify, fit_logreg):
        for metric, lam in (("top1", 1e5), ("mean_per_class", 1e-6)):
            fit = solver(Xt, yt, Xv, yv, [1e5, 1e-6], metric=metric, device="cpu")
            np.testing.assert_allclose(fit.val_top1, [0.9, 0.7], rtol=1e-15)
            np.testing.assert_allclose(fit.val_mean_per_class, [0.5, (6 / 9 + 1) / 2], rtol=1e-15)
            assert fit.lam == lam, (solver.__name__, metric)


@pytest.mark.parametrize("d", [5, 40])  # primal (d <= n) and dual (d > n: 24 training rows, 36 in the refit)
@pytest.mark.parametrize("only_in", ["val", "train"])
def test_ridge_refit_when_the_last_class_is_missing_from_one_split(d, only_in):
    """refit=True with the last class (2) in one split only: the class count comes from all labels, so the
    statistics of the split without it still have 3 classes (a bincount sized by that split's largest label
    would have 2). The validation curve equals scikit-learn's Ridge on the training classes; the refit equals
    scikit-learn's RidgeClassifier on train + val (targets ±1, so its scores are 2·ours − 1)."""
    from sklearn.linear_model import RidgeClassifier

    from probes.solvers import ridge_classify

    rng = np.random.default_rng(21)

    def data(n, k):
        y = np.arange(n) % k
        X = rng.standard_normal((n, d)) * 3.0 + 10.0
        X[:, :3] += 2.0 * np.eye(3)[y]
        return X, y

    Xt, yt = data(24, 2 if only_in == "val" else 3)
    Xv, yv = data(12, 3 if only_in == "val" else 2)
    lambdas = [1e-2, 1.0]
    fit = ridge_classify(Xt, yt, Xv, yv, lambdas, refit=True, device="cpu")
    np.testing.assert_array_equal(fit.classes, [0, 1, 2])
    np.testing.assert_allclose(fit.val_top1, [_sk_ridge_val_top1(Xt, yt, Xv, yv, lam)[0] for lam in lambdas],
                               atol=1e-12)
    Xa, ya = np.vstack([Xt, Xv]), np.r_[yt, yv]
    mu, sd = Xa.mean(0), Xa.std(0)
    rc = RidgeClassifier(alpha=fit.lam * len(ya), solver="svd").fit((Xa - mu) / sd, ya)
    np.testing.assert_allclose(2.0 * fit.decision_function(Xa) - 1.0, rc.decision_function((Xa - mu) / sd),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver, n, d", [("ridge", 40, 4), ("ridge", 12, 20), ("logreg", 40, 4)])
def test_near_constant_feature_threshold_is_relative_to_the_mean(solver, n, d):
    """Standardisation treats a feature as constant when its sd ≤ 1e-12·max(|mean|, 1). At mean −1e6 (|mean| > 1,
    negative) a spread of 1e-7 (relative 1e-13: rounding-size) is constant, so the fit equals the fit without that
    column; a spread of 1e-5 (relative 1e-11) is a real feature, so the fit equals the fit with that column
    replaced by its own z-score (standardisation makes the fit invariant to the column's offset and scale). An
    absolute threshold (1e-12) would blow the first up to a unit-variance noise feature. Ridge primal
    (d ≤ n: its own statistics), ridge dual (d > n) and logreg (the row scaler)."""
    from probes.solvers import fit_logreg, ridge_classify

    rng = np.random.default_rng(5)
    y = np.arange(n) % 3
    base = rng.standard_normal((n, d)) + np.eye(3)[y] @ rng.standard_normal((3, d))
    z = rng.standard_normal(n)
    near, small = -1e6 + 1e-7 * z, -1e6 + 1e-5 * z
    fit_rows = 3 * n // 4

    def scores(X):
        fitter = fit_logreg if solver == "logreg" else ridge_classify
        fit = fitter(X[:fit_rows], y[:fit_rows], X[fit_rows:], y[fit_rows:], [0.05], device="cpu")
        return fit.decision_function(X[fit_rows:])

    without = scores(base)
    np.testing.assert_allclose(scores(np.c_[base, near]), without, rtol=0, atol=1e-9)
    z_small = (small - small[:fit_rows].mean()) / small[:fit_rows].std()  # the training rows' statistics
    with_small = scores(np.c_[base, small])
    # raw-unit scores: coef ~1e5 times x ~ -1e6 cancels against the intercept to ~1e-6 (float64 at 1e11)
    np.testing.assert_allclose(with_small, scores(np.c_[base, z_small]), rtol=0, atol=1e-4)
    assert np.abs(with_small - without).max() > 0.05  # the tiny feature does count


def test_standardising_scale_boundary_by_hand():
    """The rule itself on hand-picked values: constant (scale 1) iff sd ≤ 1e-12·max(|mean|, 1), boundary
    included; the floor 1 applies for |mean| < 1 (at mean 0.5 or 1.5 a sd of 1.2e-12 vs 1.6e-12 decides), the
    factor |mean| above it, whatever the sign."""
    from probes.solvers import _standardising_scale

    mean = torch.tensor([0.0, 0.5, 0.5, 1.5, 1.5, -1e6, -1e6, 1e6, 7.0], dtype=torch.float64)
    sd = torch.tensor([1.2e-12, 1e-12, 0.9e-12, 1.6e-12, 1.4e-12, 1.2e-6, 0.8e-6, 0.9e-6, 0.0], dtype=torch.float64)
    expected = [1.2e-12, 1.0, 1.0, 1.6e-12, 1.0, 1.2e-6, 1.0, 1.0, 1.0]
    np.testing.assert_array_equal(_standardising_scale(sd, mean).numpy(), expected)
