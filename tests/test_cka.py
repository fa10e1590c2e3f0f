"""CKA engine: reference values, invariances, the minibatch sum form, numerics, and the store-level driver."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from repsim.measures.cka_engine import (
    CKAResult,
    MinibatchCKA,
    NumericalError,
    batch_plan,
    centre_gram,
    cka,
    cka_from_grams,
    cka_matrix,
    feature_space_linear_cka,
    gram_linear,
    gram_rbf,
    minibatch_cka,
    unbiased_gram,
)
from repsim.plotting.cka_map import short_layer_names
from repsim.errors import RepsimError, UsageError

FAST = settings(max_examples=25, deadline=None)


@pytest.fixture
def demo():
    """Kornblith et al.'s colab demo data (seeded draw order: X then Y)."""
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def _data(seed: int, n: int, p: int, q: int | None = None, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    q = p if q is None else q
    y = x @ rng.standard_normal((p, q)) + noise * rng.standard_normal((n, q))
    return x, y


def _orthogonal(rng: np.random.Generator, p: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((p, p)))
    return q * np.sign(np.diag(r))


# --- independent reference implementations (straight numpy, textbook formulas) ------------------------


def _hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def _hsic_unbiased_song(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC, written out term by term (not via U-centring)."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    term = np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2)) \
        - 2 / (n - 2) * (one @ kt @ lt @ one)
    return float(term / (n * (n - 3)))


def _naive_minibatch(xs, ys, batches) -> float:
    """Σ_b w_b·HSIC_u(X_b,Y_b) / √(Σ_b w_b·HSIC_u(X_b,X_b) · Σ_b w_b·HSIC_u(Y_b,Y_b)), w_b = m_b(m_b−3):
    the official implementation's raw U-centred dot products, one pair at a time."""
    num = sx = sy = 0.0
    for b in batches:
        x, y = np.asarray(xs[b], np.float64), np.asarray(ys[b], np.float64)
        k, l = x @ x.T, y @ y.T
        w = len(b) * (len(b) - 3)
        num += w * _hsic_unbiased_song(k, l)
        sx += w * _hsic_unbiased_song(k, k)
        sy += w * _hsic_unbiased_song(l, l)
    return num / np.sqrt(sx * sy)


# --- reference values -----------------------------------------------------------------------------------


def test_kornblith_demo_values(demo):
    x, y = demo
    assert cka(x, y) == pytest.approx(0.55761, abs=5e-6)
    assert cka(x, y, kernel="rbf", threshold=0.5) == pytest.approx(0.65483, abs=5e-6)
    assert cka(x, y, debiased=True) == pytest.approx(0.51346, abs=5e-6)


def test_biased_cka_matches_textbook_hsic(demo):
    x, y = demo
    k, l = x @ x.T, y @ y.T  # raw (uncentred) Grams: H does the centring in the textbook formula
    ref = _hsic_biased(k, l) / np.sqrt(_hsic_biased(k, k) * _hsic_biased(l, l))
    assert cka(x, y) == pytest.approx(ref, rel=1e-12)
    assert cka_from_grams(k, l) == pytest.approx(ref, rel=1e-12)


def test_debiased_cka_matches_song_formula(demo):
    x, y = demo
    k, l = x @ x.T, y @ y.T
    ref = _hsic_unbiased_song(k, l) / np.sqrt(_hsic_unbiased_song(k, k) * _hsic_unbiased_song(l, l))
    assert cka(x, y, debiased=True) == pytest.approx(ref, rel=1e-10)


def test_rbf_bandwidth_convention():
    """σ² = threshold² · median of all n² squared distances, diagonal zeros included."""
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    d2 = (x - x.T) ** 2
    med = np.median(d2)  # over 16 entries, 4 of them zero
    assert med == pytest.approx(np.median([0, 0, 0, 0, 1, 1, 9, 9, 49, 49, 4, 4, 36, 36, 16, 16]))
    np.testing.assert_allclose(gram_rbf(x, threshold=2.0), np.exp(-d2 / (2 * 4.0 * med)), rtol=1e-12)


# --- invariances ---------------------------------------------------------------------------------------


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(6, 30), p=st.integers(1, 8),
       scale=st.floats(1e-3, 1e3), shift=st.floats(-1e3, 1e3),
       kind=st.sampled_from([("linear", False), ("linear", True), ("rbf", False), ("rbf", True)]))
def test_invariances(seed, n, p, scale, shift, kind):
    kernel, debiased = kind
    rng = np.random.default_rng(seed)
    x, y = _data(seed, n, p, q=max(1, p - 1))
    base = cka(x, y, kernel=kernel, debiased=debiased)
    q = _orthogonal(rng, p)
    for xt in (x @ q, scale * x, x + shift * rng.standard_normal(p)):
        assert cka(xt, y, kernel=kernel, debiased=debiased) == pytest.approx(base, abs=1e-7)
    assert cka(y, x, kernel=kernel, debiased=debiased) == pytest.approx(base, abs=1e-12)  # symmetric
    assert cka(x, x, kernel=kernel, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    if not debiased:
        assert -1e-12 <= base <= 1 + 1e-12


def test_not_invariant_to_general_linear_map():
    x, y = _data(3, 60, 5)
    a = np.diag([1.0, 1.0, 1.0, 1.0, 30.0])  # invertible, but not a scaled orthogonal map
    assert np.linalg.cond(a) < 1e3
    assert cka(x, x @ a) < 0.9  # would be exactly 1 if CKA were invariant to invertible linear maps
    assert abs(cka(x @ a, y) - cka(x, y)) > 0.01


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(4, 25), p=st.integers(1, 12), q=st.integers(1, 12))
def test_gram_form_equals_feature_form(seed, n, p, q):
    x, y = _data(seed, n, p, q)
    ref = cka_from_grams(gram_linear(x), gram_linear(y))
    assert feature_space_linear_cka(x, y) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert cka(x, y) == pytest.approx(ref, rel=1e-9, abs=1e-12)  # whichever form cka() picked


def test_center_gram_is_hkh():
    x, _ = _data(1, 9, 4)
    k = x @ x.T + 3.0
    h = np.eye(9) - 1 / 9
    np.testing.assert_allclose(centre_gram(k), h @ k @ h, atol=1e-12)


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(4, 40), p=st.integers(1, 10))
def test_minibatch_single_batch_equals_debiased(seed, n, p):
    x, y = _data(seed, n, p, q=p + 2)
    full = cka(x, y, debiased=True)
    mean, std = minibatch_cka(x, y, batch_size=n, gram_dtype="float64", device="cpu")
    assert std is None
    assert mean == pytest.approx(full, abs=1e-10)
    mean32, _ = minibatch_cka(x.astype(np.float32), y.astype(np.float32), batch_size=n, device="cpu")
    assert mean32 == pytest.approx(cka(x.astype(np.float32), y.astype(np.float32), debiased=True), abs=1e-5)


# --- numerics ------------------------------------------------------------------------------------------


def test_large_offset_float32_matches_float64():
    """X = 100 + 0.1·Z in float32: Gram-then-centre loses the signal; centre-then-Gram must not."""
    z, w = _data(7, 200, 50, 30)
    x32 = (100 + 0.1 * z).astype(np.float32)
    y32 = (100 + 0.1 * w).astype(np.float32)
    x64, y64 = x32.astype(np.float64), y32.astype(np.float64)
    for debiased in (False, True):
        v = cka(x32, y32, debiased=debiased)
        assert np.isfinite(v) and v == pytest.approx(cka(x64, y64, debiased=debiased), abs=1e-5)
    ref = cka(x64, y64, debiased=True)
    for b in (200, 50):  # float32 Gram products on the minibatch path
        v, _ = minibatch_cka(x32, y32, batch_size=b, device="cpu")
        v64, _ = minibatch_cka(x64, y64, batch_size=b, gram_dtype="float64", device="cpu")
        assert np.isfinite(v) and v == pytest.approx(v64, abs=1e-5)
    assert minibatch_cka(x32, y32, batch_size=200, device="cpu")[0] == pytest.approx(ref, abs=1e-5)
    # The trap is real on this data: forming the float32 Gram before centring is visibly wrong.
    xt, yt = torch.from_numpy(x32), torch.from_numpy(y32)
    from repsim.measures.cka_engine import u_centre

    kb, lb = u_centre(xt @ xt.T).reshape(-1), u_centre(yt @ yt.T).reshape(-1)
    wrong = float(kb @ lb / kb.norm() / lb.norm())
    assert abs(wrong - ref) > 1e-3


def test_float16_input_is_upcast():
    rng = np.random.default_rng(0)
    x16 = (300 * rng.standard_normal((40, 8))).astype(np.float16)  # x·x ≈ 1e6 overflows float16 (max 65504)
    y16 = (x16.astype(np.float32) + 100 * rng.standard_normal((40, 8))).astype(np.float16)
    ref = cka(x16.astype(np.float64), y16.astype(np.float64), debiased=True)
    assert cka(x16, y16, debiased=True) == pytest.approx(ref, rel=1e-12)
    assert cka(torch.from_numpy(x16), torch.from_numpy(y16), debiased=True) == pytest.approx(ref, rel=1e-12)
    v, _ = minibatch_cka(x16, y16, batch_size=40, device="cpu")
    assert v == pytest.approx(ref, abs=1e-6)


def test_nan_inf_and_constant_inputs_raise():
    x, y = _data(0, 20, 3)
    bad = x.copy()
    bad[4, 1] = np.nan
    with pytest.raises(NumericalError, match="sample 4"):
        cka(bad, y)
    bad[4, 1] = np.inf
    with pytest.raises(NumericalError, match=r"non-finite value \(NaN or Inf\) in layer 0 \(a\)"):
        minibatch_cka(bad, y, batch_size=20, device="cpu")
    const = np.ones((20, 3))
    for kw, msg in (({}, "self-HSIC of X is 0"), ({"debiased": True}, "self-HSIC of X is 0"),
                    ({"kernel": "rbf"}, "median squared distance is 0")):
        with pytest.raises(NumericalError, match=msg):
            cka(const, y, **kw)
    with pytest.raises(NumericalError, match="constant"):
        minibatch_cka(const, y, batch_size=10, device="cpu")


def test_bad_input_is_usage_error():
    x, y = _data(0, 20, 3)
    with pytest.raises(UsageError, match="same number of samples.*got 20 and 19"):
        cka(x, y[:-1])
    with pytest.raises(UsageError, match="debiased CKA needs at least 4 samples, got 3"):
        cka(x[:3], y[:3], debiased=True)
    with pytest.raises(UsageError, match="kernel must be one of linear, rbf, got 'poly'"):
        cka(x, y, kernel="poly")
    with pytest.raises(UsageError, match=r"X must have shape \(n, features\), got shape \(20,\)"):
        cka(x[:, 0], y[:, 0])
    with pytest.raises(UsageError, match="batch size must be at least 4.*got 3"):
        minibatch_cka(x, y, batch_size=3)
    with pytest.raises(UsageError, match="at least 4 samples per batch, got 3"):
        unbiased_gram(torch.ones(3, 2))


# --- the minibatch sum form --------------------------------------------------------------------------


def test_sum_form_matches_naive_reference_with_uneven_last_batch():
    x, y = _data(11, 97, 6, 4)
    batches = [np.arange(0, 40), np.arange(40, 80), np.arange(80, 97)]  # last batch smaller
    acc = MinibatchCKA(1, 1)
    for b in batches:
        acc.update_features([x[b]], [y[b]], gram_dtype="float64")
    assert acc.result()[0, 0] == pytest.approx(_naive_minibatch(x, y, batches), rel=1e-10)
    # And it is not the per-batch-normalised variant (which differs when batch sizes differ).
    per_batch_mean = np.mean([cka(x[b], y[b], debiased=True) for b in batches])
    assert abs(acc.result()[0, 0] - per_batch_mean) > 1e-4


@pytest.mark.parametrize("n", [103, 110])  # remainder 3 (merged into the previous batch) and 10 (own batch)
def test_minibatch_cka_matches_naive_over_its_plan(n):
    x, y = _data(5, n, 5, 7)
    plan = batch_plan([np.array([i]) for i in range(n)], 25, np.random.default_rng([42, 0]))
    batches = [b for g in plan for b in g.batches]
    sizes = sorted(len(b) for b in batches)
    assert sizes == ([25, 25, 25, 28] if n == 103 else [10, 25, 25, 25, 25])
    v, _ = minibatch_cka(x, y, batch_size=25, seed=42, gram_dtype="float64", device="cpu")
    assert v == pytest.approx(_naive_minibatch(x, y, batches), rel=1e-10)


def test_stacked_all_pairs_equal_per_pair_loops():
    rng = np.random.default_rng(2)
    acts_a = [rng.standard_normal((60, d)) for d in (3, 8, 5)]
    acts_b = [acts_a[0] @ rng.standard_normal((3, 4)) + rng.standard_normal((60, 4)), rng.standard_normal((60, 9))]
    batches = [np.arange(0, 30), np.arange(30, 60)]
    cross = MinibatchCKA(3, 2)
    within = MinibatchCKA(3)
    for b in batches:
        cross.update_features([a[b] for a in acts_a], [a[b] for a in acts_b], gram_dtype="float64")
        within.update_features([a[b] for a in acts_a], gram_dtype="float64")
    got, got_w = cross.result(), within.result()
    for i, a in enumerate(acts_a):
        for j, bb in enumerate(acts_b):
            assert got[i, j] == pytest.approx(_naive_minibatch(a, bb, batches), rel=1e-10)
        for j, a2 in enumerate(acts_a):
            assert got_w[i, j] == pytest.approx(_naive_minibatch(a, a2, batches), rel=1e-10)
    np.testing.assert_array_equal(got_w, got_w.T)
    np.testing.assert_allclose(np.diag(got_w), 1.0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(n_chunks=st.integers(1, 30), cs=st.integers(1, 20), last=st.integers(0, 19), b=st.integers(4, 50),
       seed=st.integers(0, 100))
def test_batch_plan_partitions_whole_chunks(n_chunks, cs, last, b, seed):
    sizes = [cs] * (n_chunks - 1) + [min(last, cs) or cs]
    starts = np.cumsum([0] + sizes)
    n = int(starts[-1])
    chunk_rows = [np.arange(starts[c], starts[c + 1]) for c in range(n_chunks)]
    if n < 4:
        with pytest.raises(UsageError, match=f"minibatch CKA needs at least 4 samples, got {n}"):
            batch_plan(chunk_rows, b, np.random.default_rng(seed))
        return
    plan = batch_plan(chunk_rows, b, np.random.default_rng(seed))
    rows = np.concatenate([bt for g in plan for bt in g.batches])
    assert np.array_equal(np.sort(rows), np.arange(n))  # every row exactly once
    for g in plan:
        held = np.concatenate([chunk_rows[c] for c in g.chunks])
        assert np.array_equal(np.sort(np.concatenate(g.batches)), np.sort(held))  # groups are whole chunks
        assert all(len(bt) >= 4 for bt in g.batches)
        if len(g.batches) > 1 or len(held) >= b:
            assert all(b <= len(bt) < 2 * b for bt in g.batches)
    assert sum(len(np.concatenate(g.batches)) < b for g in plan) <= 1  # only one short group, the last
    if b % cs == 0 and last == 0 and n % b == 0 and n_chunks * cs >= 2 * b:
        assert all(len(bt) == b for g in plan for bt in g.batches)


def test_batch_plan_is_seeded_and_repeats_differ():
    rows = [np.arange(c * 64, (c + 1) * 64) for c in range(8)]
    p0 = batch_plan(rows, 256, np.random.default_rng([0, 0]))
    again = batch_plan(rows, 256, np.random.default_rng([0, 0]))
    p1 = batch_plan(rows, 256, np.random.default_rng([0, 1]))
    key = lambda plan: sorted(tuple(sorted(b)) for g in plan for b in g.batches)  # noqa: E731
    assert key(p0) == key(again)
    assert key(p0) != key(p1)
    # When a chunk holds a whole batch, groups still mix two chunks so repeats form different batches.
    rows = [np.arange(c * 32, (c + 1) * 32) for c in range(6)]
    assert key(batch_plan(rows, 32, np.random.default_rng(0))) != key(batch_plan(rows, 32, np.random.default_rng(1)))


# --- store level ---------------------------------------------------------------------------------------


class FakeStore:
    """In-memory object with the store interface cka_matrix reads; records every read."""

    def __init__(self, acts, *, ids=None, chunk_size=8, infos=None, complete=True, path="fake.zarr",
                 dtype=np.float32):
        self.acts = {k: np.asarray(v).astype(dtype) for k, v in acts.items()}
        self.layers = list(acts)
        self.n = len(next(iter(self.acts.values())))
        self.ids = list(ids) if ids is not None else [f"img{i:04d}" for i in range(self.n)]
        self.fingerprint = hashlib.sha256("\n".join(self.ids).encode()).hexdigest()
        self.complete = complete
        self.chunk_size = chunk_size
        self.path = path
        self.infos = infos or {}
        self.reads = []
        self.tf32_during_read = []

    def layer_info(self, layer):
        shape = self.acts[layer].shape[1:]
        default = {1: {"kind": "vector"}, 2: {"kind": "tokens", "num_prefix_tokens": 1, "grid": None},
                   3: {"kind": "map", "grid": None}}[len(shape)]
        return {**default, **self.infos.get(layer, {}), "shape": tuple(shape)}

    def read(self, layer, start=None, stop=None):
        self.reads.append((layer, start, stop))
        self.tf32_during_read.append(torch.backends.cuda.matmul.allow_tf32)
        return self.acts[layer][start:stop].copy()


def _model_acts(seed=0, n=64):
    """A tiny 'network': tokens (n, 5, 6) with a CLS token, a map (n, 3, 2, 2), and vectors."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((n, 5, 6))
    m = np.einsum("ntd,dc->nc", t, rng.standard_normal((6, 12))).reshape(n, 3, 2, 2) + 0.5 * rng.standard_normal(
        (n, 3, 2, 2))
    v = np.tanh(m.reshape(n, -1) @ rng.standard_normal((12, 7))) + 0.1 * rng.standard_normal((n, 7))
    return {"blocks.0": t, "blocks.1.conv": m, "head": v}


def _flat(a):
    return a.reshape(len(a), -1)


@pytest.mark.parametrize("estimator", ["minibatch", "exact", "debiased"])
def test_store_with_itself_is_symmetric_with_unit_diagonal(estimator):
    s = FakeStore(_model_acts(), chunk_size=8)
    r = cka_matrix(s, estimator=estimator, batch_size=16, progress=False, device="cpu")
    assert r.values.shape == (3, 3) and r.layers_a == r.layers_b == s.layers
    np.testing.assert_array_equal(r.values, r.values.T)
    np.testing.assert_allclose(np.diag(r.values), 1.0, atol=1e-12)
    cross = cka_matrix(s, FakeStore(_model_acts(), chunk_size=8), estimator=estimator, batch_size=16,
                       progress=False, device="cpu")
    np.testing.assert_allclose(cross.values, r.values, atol=1e-6)  # the two-model path agrees


@pytest.mark.parametrize("estimator,kernel", [("exact", "linear"), ("debiased", "linear"), ("exact", "rbf"),
                                              ("debiased", "rbf")])
def test_store_exact_matches_array_cka(estimator, kernel):
    acts = _model_acts(1, n=40)
    a, b = FakeStore(acts, chunk_size=6), FakeStore(_model_acts(2, n=40), chunk_size=6)
    r = cka_matrix(a, b, estimator=estimator, kernel=kernel, threshold=0.8, progress=False, device="cpu",
                   gram_dtype="float64")
    for i, la in enumerate(a.layers):
        for j, lb in enumerate(b.layers):
            ref = cka(_flat(a.acts[la]), _flat(b.acts[lb]), kernel=kernel, debiased=estimator == "debiased",
                      threshold=0.8)
            assert r.values[i, j] == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("n, form", [(40, "feature"), (24, "gram")])
@pytest.mark.parametrize("gram_dtype", ["float32", "float64"])
def test_exact_feature_form_and_gram_form_agree_with_array_cka(n, form, gram_dtype):
    """Exact linear CKA takes the feature-space form when every layer has fewer features than samples
    (here 30, 12 and 7 features), the Gram form otherwise; both equal the array API."""
    a, b = FakeStore(_model_acts(3, n=n), chunk_size=6), FakeStore(_model_acts(4, n=n), chunk_size=6)
    for other in (None, b):
        r = cka_matrix(a, other, estimator="exact", progress=False, device="cpu", gram_dtype=gram_dtype)
        assert r.exact_form == form
        sb = a if other is None else b
        for i, la in enumerate(a.layers):
            for j, lb in enumerate(sb.layers):
                ref = cka(_flat(a.acts[la]), _flat(sb.acts[lb]))
                assert r.values[i, j] == pytest.approx(ref, abs=1e-6 if gram_dtype == "float32" else 1e-12)


def test_store_minibatch_matches_naive_reference_and_reads_each_chunk_once():
    acts_a, acts_b = _model_acts(3, n=61), _model_acts(4, n=61)  # 61 = 7 chunks of 8 + a partial chunk of 5
    a, b = FakeStore(acts_a, chunk_size=8), FakeStore(acts_b, chunk_size=8)
    r = cka_matrix(a, b, batch_size=16, repeats=2, seed=9, progress=False, device="cpu", gram_dtype="float64")
    chunk_rows = [np.arange(c * 8, min((c + 1) * 8, 61)) for c in range(8)]
    passes = []
    for rep in range(2):
        plan = batch_plan(chunk_rows, 16, np.random.default_rng([9, rep]))
        batches = [bt for g in plan for bt in g.batches]
        passes.append([[_naive_minibatch(_flat(a.acts[la]), _flat(b.acts[lb]), batches) for lb in b.layers]
                       for la in a.layers])
    np.testing.assert_allclose(r.values, np.mean(passes, axis=0), rtol=1e-9)
    np.testing.assert_allclose(r.std, np.std(passes, axis=0, ddof=1), rtol=1e-6, atol=1e-12)
    assert r.std.max() > 0
    assert r.n == 61 and r.batch_size == 16 and r.repeats == 2
    for store in (a, b):
        for layer in store.layers:
            spans = [(lo, hi) for name, lo, hi in store.reads if name == layer]
            assert all(lo % 8 == 0 and (hi % 8 == 0 or hi == 61) for lo, hi in spans)  # whole chunks
            covered = sorted(c for lo, hi in spans for c in range(lo // 8, -(-hi // 8)))
            assert covered == sorted(list(range(8)) * 2)  # each chunk once per pass, 2 repeats


@pytest.mark.parametrize("estimator", ["minibatch", "exact", "debiased"])
def test_store_float32_gram_matches_float64(estimator):
    """A large common offset (50 + 0.1·Z): float32 Grams must agree with float64 ones."""
    acts = _model_acts(5, 48)
    a = FakeStore({k: 50 + 0.1 * v for k, v in acts.items()}, chunk_size=8)
    b = FakeStore({k: -30 + 0.1 * v for k, v in _model_acts(6, 48).items()}, chunk_size=8)
    for other in (None, b):
        r32 = cka_matrix(a, other, estimator=estimator, batch_size=16, progress=False, device="cpu")
        r64 = cka_matrix(a, other, estimator=estimator, batch_size=16, progress=False, device="cpu",
                         gram_dtype="float64")
        assert np.isfinite(r32.values).all()
        np.testing.assert_allclose(r32.values, r64.values, atol=1e-5)


def test_store_float16_is_upcast():
    acts = {k: 200 * v for k, v in _model_acts(6, 32).items()}  # squares overflow float16
    s16 = FakeStore(acts, chunk_size=8, dtype=np.float16)
    r = cka_matrix(s16, estimator="debiased", progress=False, device="cpu", gram_dtype="float64")
    ref = [[cka(_flat(s16.acts[x]).astype(np.float64), _flat(s16.acts[y]).astype(np.float64), debiased=True)
            for y in s16.layers] for x in s16.layers]
    np.testing.assert_allclose(r.values, ref, atol=1e-9)


@pytest.mark.parametrize("tokens", ["flatten", "mean", "cls"])
def test_tokens_modes(tokens):
    acts_a = _model_acts(7, 40)
    acts_b = _model_acts(8, 40)
    a = FakeStore({"tok": acts_a["blocks.0"], "vec": acts_a["head"]}, chunk_size=8)
    b = FakeStore({"tok": acts_b["blocks.0"], "map": acts_b["blocks.1.conv"]}, chunk_size=8,
                  infos={"tok": {"num_prefix_tokens": 2}})
    if tokens == "cls":
        with pytest.raises(UsageError, match="feature map"):
            cka_matrix(a, b, estimator="exact", tokens="cls", progress=False, device="cpu")
        b = FakeStore({"tok": acts_b["blocks.0"]}, chunk_size=8, infos={"tok": {"num_prefix_tokens": 2}})
    r = cka_matrix(a, b, estimator="exact", tokens=tokens, progress=False, device="cpu", gram_dtype="float64")
    assert r.tokens == tokens

    def rows(x, npt, kind):
        if tokens == "flatten" or kind == "vector":
            return _flat(x)
        if kind == "map":
            return x.mean(axis=(2, 3))
        return x[:, npt:].mean(axis=1) if tokens == "mean" else x[:, 0]

    fa = [rows(acts_a["blocks.0"], 1, "tokens"), rows(acts_a["head"], 0, "vector")]
    fb = [rows(acts_b["blocks.0"], 2, "tokens")] + ([] if tokens == "cls" else
                                                     [rows(acts_b["blocks.1.conv"], 0, "map")])
    ref = [[cka(x, y) for y in fb] for x in fa]
    np.testing.assert_allclose(r.values, ref, atol=1e-9)
    # the prefix count matters: 'mean' excludes 2 prefix tokens in b, so it differs from including them
    if tokens == "mean":
        assert abs(cka(fa[0], acts_b["blocks.0"].mean(axis=1)) - r.values[0, 0]) > 1e-4


def test_cls_without_prefix_token_refused():
    s = FakeStore({"tok": _model_acts()["blocks.0"]}, infos={"tok": {"num_prefix_tokens": 0}})
    with pytest.raises(UsageError, match="no prefix"):
        cka_matrix(s, tokens="cls", progress=False, device="cpu")


def test_different_fingerprints_refused_and_align_by_ids():
    acts = _model_acts(9, 48)
    a = FakeStore(acts, chunk_size=8)
    perm = np.random.default_rng(0).permutation(48)[:40]  # b holds 40 of a's samples, in another order,
    extra = np.random.default_rng(1).standard_normal((5,) + acts["head"].shape[1:])  # plus 5 of its own
    b_acts = {k: v[perm] for k, v in acts.items()}
    b_acts["head"] = np.concatenate([b_acts["head"], extra])
    b_acts = {k: (v if k == "head" else np.concatenate([v, v[:5]])) for k, v in b_acts.items()}
    b = FakeStore(b_acts, ids=[a.ids[i] for i in perm] + [f"other{i}" for i in range(5)], chunk_size=8)
    with pytest.raises(UsageError, match="first difference at row 0") as e:
        cka_matrix(a, b, progress=False, device="cpu")
    assert repr(a.ids[0]) in str(e.value) and repr(b.ids[0]) in str(e.value)
    r = cka_matrix(a, b, estimator="debiased", align="ids", progress=False, device="cpu", gram_dtype="float64")
    assert r.n == 40 and r.align == {"align": "ids", "dropped_a": 8, "dropped_b": 5}
    keep = np.sort(perm)
    ref = [[cka(_flat(acts[x][keep]), _flat(acts[y][keep]), debiased=True) for y in a.layers] for x in a.layers]
    np.testing.assert_allclose(r.values, ref, atol=1e-9)
    rm = cka_matrix(a, b, align="ids", batch_size=8, progress=False, device="cpu")  # minibatch path runs too
    np.testing.assert_allclose(np.diag(rm.values), 1.0, atol=1e-6)


def test_store_errors():
    acts = _model_acts(0, 32)
    s = FakeStore(acts)
    with pytest.raises(UsageError, match="incomplete"):
        cka_matrix(FakeStore(acts, complete=False), progress=False)
    with pytest.raises(UsageError, match="blocks.9"):
        cka_matrix(s, layers_a=["blocks.0", "blocks.9"], progress=False)
    short = FakeStore({k: v[:24] for k, v in acts.items()})
    with pytest.raises(UsageError, match="fingerprints differ"):
        cka_matrix(s, short, progress=False)
    with pytest.raises(UsageError, match="minibatch"):
        cka_matrix(s, estimator="exact", memory_budget=1000, progress=False)
    cases = [({"estimator": "nope"}, "estimator must be one of .*got 'nope'"),
             ({"kernel": "rbf"}, "rbf kernel is implemented for the exact and debiased estimators only"),
             ({"tokens": "avg"}, "tokens must be one of .*got 'avg'"),
             ({"repeats": 0}, "repeats must be >= 1, got 0"),
             ({"estimator": "exact", "repeats": 3}, "repeats only applies to the minibatch estimator"),
             ({"batch_size": 2}, "batch size must be at least 4.*got 2"),
             ({"align": "names"}, "align must be one of .*got 'names'"),
             ({"device": "cuda:7"}, "'cuda:7' requested but no CUDA GPU") if not torch.cuda.is_available()
             else ({"device": "tpu"}, "tpu")]
    for kw, msg in cases:
        with pytest.raises(UsageError, match=msg):
            cka_matrix(s, progress=False, **kw)


def test_store_nan_and_constant_layers_name_layer_and_batch():
    acts = _model_acts(0, 32)
    acts["head"] = acts["head"].copy()
    acts["head"][19, 2] = np.nan
    with pytest.raises(NumericalError, match=r"layer 'head'.*batch \d+.*rows"):
        cka_matrix(FakeStore(acts), batch_size=8, progress=False, device="cpu")
    with pytest.raises(NumericalError, match="'head'"):
        cka_matrix(FakeStore(acts), estimator="exact", progress=False, device="cpu")
    acts["head"] = np.full_like(acts["head"], 3.0)
    with pytest.raises(NumericalError, match="'head'.*constant"):
        cka_matrix(FakeStore(acts), batch_size=8, progress=False, device="cpu")
    assert issubclass(NumericalError, RepsimError)


def test_tf32_off_during_and_restored_after():
    s = FakeStore(_model_acts(0, 32))
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        cka_matrix(s, batch_size=8, progress=False, device="cpu")
        assert s.tf32_during_read and not any(s.tf32_during_read)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_to_json_round_trip(tmp_path):
    s = FakeStore(_model_acts(0, 32), path="/data/vit_tiny.zarr")
    r = cka_matrix(s, batch_size=8, repeats=2, progress=False, device="cpu")
    out = tmp_path / "sub" / "cka.json"
    d = r.to_json(out)
    assert os.listdir(out.parent) == ["cka.json"]  # written atomically, no temporary left behind
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(d))
    assert on_disk["values"] == r.values.tolist() and len(on_disk["std"]) == 3
    assert on_disk["model_a"] == "vit_tiny" and on_disk["estimator"] == "minibatch" and on_disk["n"] == 32
    back = CKAResult.from_json(out)
    np.testing.assert_array_equal(back.values, r.values)
    np.testing.assert_array_equal(back.std, r.std)
    for f in ("layers_a", "layers_b", "estimator", "kernel", "tokens", "n", "batch_size", "repeats", "seed",
              "fingerprint_a", "fingerprint_b", "path_a", "path_b", "align", "batch_rows", "n_batches"):
        assert getattr(back, f) == getattr(r, f), f


def test_plot_writes_png(tmp_path):
    s = FakeStore(_model_acts(0, 32))
    r = cka_matrix(s, batch_size=8, progress=False, device="cpu")
    out = tmp_path / "cka.png"
    ax = r.plot(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ax.images[0].origin == "lower"
    assert ax.figure.axes[-1].get_ylabel() == "CKA"
    assert "minibatch" in ax.get_title() and "n=32" in ax.get_title()
    names = [f"model.blocks.{i}" for i in range(70)]
    big = CKAResult(layers_a=names, layers_b=names,
                    values=np.eye(70), estimator="exact", kernel="linear", tokens="flatten", n=10, batch_size=None,
                    repeats=1, std=None, seed=0, fingerprint_a="x", fingerprint_b="x", path_a="a", path_b="b")
    ax = big.plot(tmp_path / "big.png")
    assert len(ax.get_yticks()) <= 30 and ax.get_yticklabels()[1].get_text() == "3"


def test_short_layer_names():
    assert short_layer_names(["model.blocks.0.mlp", "model.blocks.1.mlp"]) == ["0.mlp", "1.mlp"]
    assert short_layer_names(["stem", "head"]) == ["stem", "head"]
    assert short_layer_names(["a.b"]) == ["a.b"]
    assert len(short_layer_names(["x" * 80])[0]) <= 22
