"""Tests of repsim.attention.statistics: attention distance, prefix mass, entropy, aligned maps, head kinds, rollout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from repsim.attention.statistics import (
    AXIAL_EXCESS_MIN,
    LOCAL_MASS_MIN,
    aligned_attention,
    attention_distance,
    attention_entropy,
    attention_rollout,
    centroid_offset,
    classify_heads,
    grid_positions,
    head_features,
    head_statistics,
    prefix_mass,
    rollout_map,
)
from repsim.errors import UsageError

# ----------------------------------------------------------------------------------------------------
# helpers: synthetic heads and brute-force references (plain numpy / Python)
# ----------------------------------------------------------------------------------------------------


def close(actual, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """assert_allclose on tensors / arrays (numpy's: torch.testing's first call costs ~1 s of lazy imports)."""
    def as_np(x):
        return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)

    a, e = as_np(actual), as_np(expected)
    assert a.shape == e.shape, (a.shape, e.shape)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def _cells(gh: int, gw: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(gh) for c in range(gw)]


def synthetic_head(kind: str, gh: int, gw: int, noise: float = 0.0) -> np.ndarray:
    """Patch-only attention (Np, Np) of a named synthetic head, mixed with ``noise`` × uniform."""
    cells = np.array(_cells(gh, gw))
    r, c = cells[:, None, 0], cells[:, None, 1]  # query (column vector)
    rk, ck = cells[None, :, 0], cells[None, :, 1]  # key (row vector)
    same = (rk == r) & (ck == c)
    raster = np.arange(gh * gw)
    rules = {
        "self": same,
        # key col = query col - 1; at the left border the query attends to itself
        "left": np.where(c > 0, (rk == r) & (ck == c - 1), same),
        # ... at the left border it wraps to the other end of its row (offset (0, gw - 1))
        "left_wrap": (rk == r) & (ck == (c - 1) % gw),
        # ... it follows raster order: token i attends to token i - 1 (the left border to the end of the row
        # above, offset (-1, gw - 1)); token 0 to itself
        "left_raster": raster[None, :] == np.maximum(raster[:, None] - 1, 0),
        # key row = query row - 1, wrapping to the bottom row at the top border (offset (gh - 1, 0))
        "up_wrap": (ck == c) & (rk == (r - 1) % gh),
        # a 3 × 3 blur centred one step to the left (clipped at the border; the left column sees dx = 0 only)
        "shifted_blur": (abs(rk - r) <= 1) & (ck >= c - 2) & (ck <= c),
        "blur": (abs(rk - r) <= 1) & (abs(ck - c) <= 1),
        "blur5": (abs(rk - r) <= 2) & (abs(ck - c) <= 2),
        "uniform": np.ones_like(same),
        "axial": (rk == r) | (ck == c),
        "row": (rk == r) & (ck >= 0),
        "column": (ck == c) & (rk >= 0),
    }
    a = rules[kind].astype(np.float64)
    a /= a.sum(1, keepdims=True)
    return (1 - noise) * a + noise / len(cells)


def random_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random probability rows (Dirichlet-like, some near-zero entries)."""
    x = rng.gamma(0.3, size=shape)
    return x / x.sum(-1, keepdims=True)


def with_prefix(patch: np.ndarray, p: int, mass: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Embed patch rows (..., Np, Np) into (..., p+Np, p+Np): patch query q puts ``mass[..., q]`` on the prefix."""
    lead, n = patch.shape[:-2], patch.shape[-1]
    full = np.zeros(lead + (p + n, p + n))
    full[..., :p, :] = random_rows(rng, lead + (p, p + n)) if p else 0.0
    full[..., p:, p:] = patch * (1 - mass[..., None])
    if p:
        split = random_rows(rng, lead + (n, p))
        full[..., p:, :p] = split * mass[..., None]
    return full


def brute_distance(patch: np.ndarray, gh: int, gw: int, ph: float, pw: float) -> float:
    """Mean attention distance of one head's patch rows (Np, Np) by a double loop."""
    cells = _cells(gh, gw)
    total = 0.0
    for q, (r, c) in enumerate(cells):
        row_mass = sum(patch[q])
        acc = 0.0
        for k, (rk, ck) in enumerate(cells):
            acc += patch[q, k] * math.sqrt(((rk - r) * ph) ** 2 + ((ck - c) * pw) ** 2)
        total += acc / row_mass if row_mass > 0 else 0.0
    return total / len(cells)


def brute_aligned(patch: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """Aligned map (2gh-1, 2gw-1) of one head's patch rows by explicit per-query canvases."""
    cells = _cells(gh, gw)
    out = np.zeros((2 * gh - 1, 2 * gw - 1))
    for q, (r, c) in enumerate(cells):
        canvas = np.zeros_like(out)
        row = patch[q] / patch[q].sum()
        for k, (rk, ck) in enumerate(cells):
            canvas[gh - 1 + rk - r, gw - 1 + ck - c] += row[k]
        out += canvas
    return out


# ----------------------------------------------------------------------------------------------------
# attention distance
# ----------------------------------------------------------------------------------------------------


def test_uniform_distance_vit_b16_reference():
    n = 196
    attn = torch.full((1, 2, 1 + n, 1 + n), 1.0 / (1 + n))  # CLS gets its share; rows renormalised
    d = attention_distance(attn, (14, 14), 16, num_prefix_tokens=1)
    assert d.shape == (1, 2)
    assert torch.all((d - 116.5).abs() < 0.05), d
    # the exact value: mean pairwise centre distance over all 196² ordered pairs incl. self, × 16 px
    g = grid_positions((14, 14)).numpy()
    exact = np.sqrt(((g[:, None] - g[None]) ** 2).sum(-1)).mean() * 16
    assert d[0, 0].item() == pytest.approx(exact, rel=1e-5)
    assert attention_distance(attn, (14, 14), (16, 16), 1)[0, 0].item() == pytest.approx(exact, rel=1e-5)


def test_self_attention_distance_is_zero():
    attn = torch.eye(12)[None]
    assert attention_distance(attn, (3, 4), 16).item() == 0.0


def test_non_square_distance_against_brute_force():
    rng = np.random.default_rng(0)
    gh, gw, ph, pw = 3, 5, 8, 12
    patch = random_rows(rng, (2, 3, gh * gw, gh * gw))
    attn = with_prefix(patch, 1, rng.uniform(0.0, 0.5, size=(2, 3, gh * gw)), rng)
    d = attention_distance(torch.from_numpy(attn), (gh, gw), (ph, pw), 1).numpy()
    ref = np.array([[brute_distance(patch[b, h], gh, gw, ph, pw) for h in range(3)] for b in range(2)])
    np.testing.assert_allclose(d, ref, rtol=1e-10)


def test_zero_patch_mass_row_contributes_zero():
    gh, gw = 2, 3
    attn = np.zeros((1 + 6, 1 + 6))
    attn[:, 1:] = 1.0 / 6
    attn[0] = 0
    attn[0, 0] = 1
    attn[3] = 0
    attn[3, 0] = 1.0  # patch query 2 looks only at CLS
    d = attention_distance(attn, (gh, gw), 1, 1).item()
    uni = np.full((6, 6), 1 / 6)
    ref = brute_distance(np.where(np.arange(6)[:, None] == 2, 0.0, uni), gh, gw, 1, 1)
    assert d == pytest.approx(ref, rel=1e-6)
    m = aligned_attention(attn, (gh, gw), 1)
    assert m.sum().item() == pytest.approx(5.0, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# prefix handling
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0, 1, 2, 5])
def test_prefix_count_does_not_change_geometry(p):
    rng = np.random.default_rng(1)
    gh, gw = 4, 5
    patch = random_rows(rng, (2, 3, gh * gw, gh * gw))
    base = torch.from_numpy(patch)
    mass = rng.uniform(0.05, 0.7, size=(2, 3, gh * gw)) if p else np.zeros((2, 3, gh * gw))
    attn = torch.from_numpy(with_prefix(patch, p, mass, rng))
    close(attention_distance(attn, (gh, gw), 16, p), attention_distance(base, (gh, gw), 16))
    close(aligned_attention(attn, (gh, gw), p), aligned_attention(base, (gh, gw)))
    close(prefix_mass(attn, p), torch.from_numpy(mass.mean(-1)))
    stats = head_statistics(attn, (gh, gw), 16, p)
    close(stats["prefix_mass"], torch.from_numpy(mass.mean(-1)))
    close(stats["aligned_sum"], aligned_attention(base, (gh, gw)).sum(0))


def test_prefix_mass_without_prefix_is_zero():
    attn = torch.softmax(torch.randn(2, 3, 6, 6), -1)
    assert torch.equal(prefix_mass(attn, 0), torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------------------
# entropy
# ----------------------------------------------------------------------------------------------------


def test_entropy_uniform_and_one_hot():
    n = 197
    uni = torch.full((2, 12, n, n), 1.0 / n)
    close(attention_entropy(uni, 1), torch.full((2, 12), math.log(n)))
    assert torch.equal(attention_entropy(torch.eye(10)[None], 0), torch.zeros(1))  # 0·log 0 = 0


def test_entropy_against_numpy():
    rng = np.random.default_rng(2)
    attn = random_rows(rng, (3, 9, 9))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(attn > 0, attn * np.log(attn), 0.0)[:, 2:].sum(-1).mean(-1)
    np.testing.assert_allclose(attention_entropy(attn, 2).numpy(), h, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------
# aligned attention
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gh,gw,p", [(3, 5, 0), (4, 4, 1), (5, 2, 3)])
def test_aligned_against_brute_force(gh, gw, p):
    rng = np.random.default_rng(3)
    patch = random_rows(rng, (2, 2, gh * gw, gh * gw))
    attn = with_prefix(patch, p, rng.uniform(0, 0.5, size=(2, 2, gh * gw)), rng)
    m = aligned_attention(attn, (gh, gw), p).numpy()
    assert m.shape == (2, 2, 2 * gh - 1, 2 * gw - 1)
    for b in range(2):
        for h in range(2):
            np.testing.assert_allclose(m[b, h], brute_aligned(patch[b, h], gh, gw), rtol=1e-10, atol=1e-12)


def test_aligned_rows_sum_and_sum_dims():
    attn = torch.softmax(torch.randn(3, 4, 1 + 24, 1 + 24), -1)
    m = aligned_attention(attn, (4, 6), 1)
    close(m.sum((-2, -1)), torch.full((3, 4), 24.0))
    close(aligned_attention(attn, (4, 6), 1, sum_dims=0), m.sum(0))
    close(aligned_attention(attn, (4, 6), 1, sum_dims=(0, 1)), m.sum((0, 1)))
    stats = head_statistics(attn, (4, 6), 16, 1)
    close(stats["aligned_sum"].sum((-2, -1)), torch.full((4,), 3 * 24.0))


def test_head_statistics_matches_functions():
    attn = torch.softmax(3 * torch.randn(4, 3, 2 + 15, 2 + 15), -1)
    stats = head_statistics(attn, (3, 5), (8, 16), 2)
    assert set(stats) == {"distance", "prefix_mass", "entropy", "aligned_sum"}
    close(stats["distance"], attention_distance(attn, (3, 5), (8, 16), 2))
    close(stats["prefix_mass"], prefix_mass(attn, 2))
    close(stats["entropy"], attention_entropy(attn, 2))
    close(stats["aligned_sum"], aligned_attention(attn, (3, 5), 2).sum(0))
    assert stats["distance"].shape == (4, 3) and stats["aligned_sum"].shape == (3, 5, 9)
    assert all(v.dtype == torch.float32 for v in stats.values())


# ----------------------------------------------------------------------------------------------------
# positions (permuted order, windowed attention)
# ----------------------------------------------------------------------------------------------------


def test_permuted_tokens_with_positions_give_same_results():
    gh, gw, p = 4, 5, 1
    attn = torch.softmax(2 * torch.randn(2, 3, p + gh * gw, p + gh * gw, dtype=torch.float64), -1)
    perm = torch.randperm(gh * gw)
    order = torch.cat([torch.arange(p), p + perm])
    permuted = attn[..., order, :][..., order]
    pos = grid_positions((gh, gw))[perm]
    close(attention_distance(permuted, (gh, gw), 16, p, positions=pos),
                               attention_distance(attn, (gh, gw), 16, p))
    close(aligned_attention(permuted, (gh, gw), p, positions=pos),
                               aligned_attention(attn, (gh, gw), p))
    close(attention_entropy(permuted, p), attention_entropy(attn, p))
    a = head_statistics(permuted, (gh, gw), 16, p, positions=pos)
    b = head_statistics(attn, (gh, gw), 16, p)
    for key in a:
        close(a[key], b[key])


def test_windowed_positions_match_block_diagonal_global_attention():
    """Swin form: (B, nW, H, w², w²) with positions (nW, 1, w², 2) = global attention restricted to windows."""
    gh, gw, ws, heads, batch = 4, 6, 2, 3, 2
    windows = [(r0, c0) for r0 in range(0, gh, ws) for c0 in range(0, gw, ws)]
    pos = torch.tensor([[(r0 + i, c0 + j) for i in range(ws) for j in range(ws)] for r0, c0 in windows])
    win = torch.softmax(torch.randn(batch, len(windows), heads, ws * ws, ws * ws, dtype=torch.float64), -1)
    full = torch.zeros(batch, heads, gh * gw, gh * gw, dtype=torch.float64)
    flat = pos[..., 0] * gw + pos[..., 1]  # (nW, w²) row-major token index
    for w in range(len(windows)):
        full[:, :, flat[w][:, None], flat[w][None, :]] = win[:, w]
    wpos = pos[:, None]  # (nW, 1, w², 2)
    d_win = attention_distance(win, (gh, gw), 16, 0, positions=wpos)
    assert d_win.shape == (batch, len(windows), heads)
    close(d_win.mean(1), attention_distance(full, (gh, gw), 16))
    a_win = aligned_attention(win, (gh, gw), 0, positions=wpos)
    close(a_win.sum(1), aligned_attention(full, (gh, gw)))
    close(aligned_attention(win, (gh, gw), 0, positions=wpos, sum_dims=(0, 1)),
                               aligned_attention(full, (gh, gw)).sum(0))
    stats = head_statistics(win, (gh, gw), 16, 0, positions=wpos)
    close(stats["aligned_sum"], a_win.sum(0))


@settings(max_examples=25, deadline=None)
@given(gh=st.integers(1, 5), gw=st.integers(1, 5), p=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_property_invariants(gh, gw, p, seed):
    gen = torch.Generator().manual_seed(seed)
    n = p + gh * gw
    attn = torch.softmax(3 * torch.randn(2, 2, n, n, generator=gen, dtype=torch.float64), -1)
    d = attention_distance(attn, (gh, gw), 16, p)
    dmax = 16 * math.hypot(gh - 1, gw - 1)
    assert torch.all(d >= 0) and torch.all(d <= dmax + 1e-9)
    m = aligned_attention(attn, (gh, gw), p)
    close(m.sum((-2, -1)), torch.full((2, 2), float(gh * gw), dtype=torch.float64))
    perm = torch.randperm(gh * gw, generator=gen)
    order = torch.cat([torch.arange(p), p + perm])
    pos = grid_positions((gh, gw))[perm]
    permuted = attn[..., order, :][..., order]
    close(attention_distance(permuted, (gh, gw), 16, p, positions=pos), d)
    close(aligned_attention(permuted, (gh, gw), p, positions=pos), m)


# ----------------------------------------------------------------------------------------------------
# head classification
# ----------------------------------------------------------------------------------------------------

EXPECTED = {"self": "strict_local", "left": "offset_local", "blur": "soft_local", "uniform": "global",
            "axial": "axial", "row": "axial", "column": "axial",
            # one fixed offset for every query that has it; border queries wrap / follow raster order
            "left_wrap": "offset_local", "left_raster": "offset_local", "up_wrap": "offset_local",
            "shifted_blur": "offset_local"}


def _aligned_of(kind: str, gh: int, gw: int, noise: float = 0.0) -> torch.Tensor:
    return aligned_attention(torch.from_numpy(synthetic_head(kind, gh, gw, noise)), (gh, gw))


@pytest.mark.parametrize("grid", [(14, 14), (6, 10)])
@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_classify_synthetic_heads(grid, noise):
    gh, gw = grid
    kinds = list(EXPECTED)
    maps = torch.stack([_aligned_of(k, gh, gw, noise) for k in kinds])
    got = classify_heads(maps)
    assert got.shape == (len(kinds),)
    assert dict(zip(kinds, got.tolist())) == EXPECTED


def test_classify_more_shapes_and_leading_dims():
    maps = torch.stack([_aligned_of(k, 14, 14) for k in ("column", "blur5", "uniform", "self")]).reshape(2, 2, 27, 27)
    assert classify_heads(maps).tolist() == [["axial", "soft_local"], ["global", "strict_local"]]
    # noisy column-only on a non-square grid is still axial; a noisy 5 × 5 blur is still local (median distance)
    assert classify_heads(_aligned_of("column", 6, 10, 0.1)).item() == "axial"
    assert classify_heads(_aligned_of("blur5", 14, 14, 0.1)).item() == "soft_local"


@pytest.mark.parametrize("grid", [(14, 14), (6, 10)])
def test_offset_head_centroid(grid):
    gh, gw = grid
    c = centroid_offset(_aligned_of("left", gh, gw))
    # left-border queries fall back to self: dx = -(gw - 1) / gw exactly
    close(c, torch.tensor([0.0, -(gw - 1) / gw], dtype=torch.float64))
    assert abs(c[1].item() + 1) < 0.2
    f = head_features(_aligned_of("left", gh, gw))
    assert f["peak_offset"].tolist() == [0.0, -1.0]
    for sym in ("self", "blur", "uniform", "axial"):
        close(centroid_offset(_aligned_of(sym, gh, gw)), torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("grid", [(14, 14), (6, 10)])
@pytest.mark.parametrize("kind, offset", [("left_wrap", (0, -1)), ("left_raster", (0, -1)), ("up_wrap", (-1, 0)),
                                          ("left", (0, -1))])
def test_border_queries_do_not_hide_an_offset_head(grid, kind, offset):
    """Every query that has a key at ``offset`` attends only there; border queries go elsewhere. The old rule
    (whole-map centroid ≥ 0.5) called the wrap-around and raster heads soft_local: their centroid is ~0."""
    gh, gw = grid
    m = _aligned_of(kind, gh, gw)
    f = head_features(m)
    assert f["peak_offset"].tolist() == [float(o) for o in offset]
    close(f["peak_share"], 1.0)  # border-corrected: all of the attention of the queries that can reach it
    assert f["local_excess"].item() >= 1.0 - 1e-12
    if kind != "left":  # the self fallback puts 1/gw of the mass on (0, 0), inside the 5 × 5 window
        close(f["local_centroid"], torch.tensor(offset, dtype=torch.float64))
    assert f["local_centroid"].norm().item() > 0.9
    if kind in ("left_wrap", "up_wrap"):  # what fooled the old rule: the wrapped mass balances the centroid
        close(centroid_offset(m), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert classify_heads(m).item() == "offset_local"
    # with uniform noise and on a map normalised to sum 1 (as attention_summary passes it)
    assert classify_heads(_aligned_of(kind, gh, gw, 0.2)).item() == "offset_local"
    assert classify_heads(m / m.sum()).item() == "offset_local"


@pytest.mark.parametrize("grid", [(14, 14), (6, 10)])
@pytest.mark.parametrize("kind, local_kind", [("self", "strict_local"), ("left", "offset_local"),
                                              ("left_wrap", "offset_local"), ("up_wrap", "offset_local")])
def test_mixture_with_uniform_is_local_only_when_mostly_local(grid, kind, local_kind):
    """α·head + (1-α)·uniform: local only for α clearly above one half (LOCAL_MASS_MIN = 0.6). Half neighbour,
    half uniform used to be soft_local / strict_local (its median offset length is that of the local half)."""
    gh, gw = grid
    for alpha, want in ((0.3, "global"), (0.5, "global"), (0.55, "global"), (0.65, local_kind), (0.9, local_kind)):
        m = _aligned_of(kind, gh, gw, noise=1 - alpha)
        f = head_features(m)
        if kind in ("self", "left_wrap", "up_wrap"):  # exact: linear in α, the uniform part scores 0
            close(f["local_excess"], alpha, rtol=1e-9)
            close(f["cross_excess"], alpha, rtol=1e-9)
        assert classify_heads(m).item() == want, (alpha, {k: v.tolist() for k, v in f.items()})
    assert LOCAL_MASS_MIN == 0.6 and AXIAL_EXCESS_MIN == 0.6


def test_head_features_border_correction_by_hand():
    """share(o) = w(o)·Nq/R(o) on a 2 × 3 grid, by hand: a head whose queries all attend to the key right of them
    (the right column attends to itself)."""
    gh, gw = 2, 3
    a = np.zeros((6, 6))
    for q, (r, c) in enumerate(_cells(gh, gw)):
        a[q, q + 1 if c < gw - 1 else q] = 1.0
    m = aligned_attention(torch.from_numpy(a), (gh, gw))
    f = head_features(m)
    # mass: 4 queries at (0, +1), 2 at (0, 0) → w = 4/6, 2/6; R(0, +1) = 2·2 = 4, R(0, 0) = 6
    assert f["peak_offset"].tolist() == [0.0, 1.0]
    close(f["peak_share"], (4 / 6) * 6 / 4)
    close(f["centre_mass"], 2 / 6)
    # all mass within one step of the peak; uniform's there: Σ (2-|dy|)(3-|dx|)/36 over dy ∈ {-1, 0, 1},
    # dx ∈ {0, 1, 2} = 4·6/36; both parts of local_excess are 1
    close(f["peak_local_mass"], 1.0)
    close(f["local_excess"], 1.0)
    half = head_features(aligned_attention(torch.from_numpy(0.5 * a + 0.5 / 6), (gh, gw)))
    close(half["peak_share"], 0.5 + 0.5 / 6)
    close(half["peak_local_mass"], 0.5 + 0.5 * 24 / 36)
    close(half["local_excess"], 0.5)
    # local centroid: excess over 1/6 at (0, 1): 1 - 1/6, at (0, 0): 2/6 - 1/6
    close(f["local_centroid"], torch.tensor([0.0, (5 / 6) / (5 / 6 + 1 / 6)], dtype=torch.float64))
    uni = np.array([[(gh - abs(dy)) * (gw - abs(dx)) / 36 for dx in range(-2, 3)] for dy in range(-1, 2)])
    w = m.numpy() / 6
    close(f["concentration"], 0.5 * np.abs(w - uni).sum())


def test_classify_rejects_empty_map():
    with pytest.raises(UsageError, match="no positive mass"):
        classify_heads(torch.zeros(3, 5))
    with pytest.raises(UsageError, match="odd"):
        classify_heads(torch.ones(4, 5))


# ----------------------------------------------------------------------------------------------------
# rollout
# ----------------------------------------------------------------------------------------------------


def test_rollout_identity():
    eye = torch.eye(7).expand(2, 3, 7, 7)
    close(attention_rollout([eye], 1), torch.eye(7).expand(2, 7, 7))
    close(attention_rollout([eye, eye], 1, residual=False), torch.eye(7).expand(2, 7, 7))


@pytest.mark.parametrize("residual", [True, False])
def test_rollout_against_numpy(residual):
    rng = np.random.default_rng(4)
    layers = [random_rows(rng, (2, 4, 6, 6)) for _ in range(3)]
    ref = []
    for b in range(2):
        r = np.eye(6)
        for a in layers:  # later layer on the left
            m = a[b].mean(0)
            if residual:
                m = 0.5 * m + 0.5 * np.eye(6)
            m = m / m.sum(1, keepdims=True)
            r = m @ r
        ref.append(r)
    got = attention_rollout([torch.from_numpy(a) for a in layers], 1, residual=residual)
    np.testing.assert_allclose(got.numpy(), np.stack(ref), rtol=1e-10)
    close(got.sum(-1), torch.ones(2, 6, dtype=torch.float64))


def test_rollout_map():
    r = torch.rand(2, 1 + 6, 1 + 6)
    close(rollout_map(r, (2, 3), 1), r[:, 0, 1:].reshape(2, 2, 3))
    close(rollout_map(r, (2, 3), 1, query="mean"), r[:, 1:, 1:].mean(1).reshape(2, 2, 3))
    r0 = torch.rand(2, 6, 6)
    close(rollout_map(r0, (2, 3), 0), r0.mean(1).reshape(2, 2, 3))
    with pytest.raises(UsageError, match=r"query must be 'cls' or 'mean', got 'max'"):
        rollout_map(r, (2, 3), 1, query="max")


# ----------------------------------------------------------------------------------------------------
# dtypes and bad input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_is_upcast(dtype):
    attn = torch.softmax(torch.randn(2, 3, 1 + 20, 1 + 20), -1)
    low = attn.to(dtype)
    ref = attn.to(dtype).float()
    stats = head_statistics(low, (4, 5), 16, 1)
    assert all(v.dtype == torch.float32 for v in stats.values())
    close(stats["distance"], attention_distance(ref, (4, 5), 16, 1))
    close(attention_distance(low, (4, 5), 16, 1), stats["distance"])
    close(aligned_attention(low, (4, 5), 1), aligned_attention(ref, (4, 5), 1))
    assert attention_rollout([low, low], 1).dtype == torch.float32
    np16 = low.float().numpy().astype(np.float16)
    assert attention_entropy(np16, 1).dtype == torch.float32


def test_bad_shapes_raise_usage_error():
    attn = torch.softmax(torch.randn(2, 3, 197, 197), -1)
    with pytest.raises(UsageError, match=r"N=197 tokens but num_prefix_tokens=0 \+ grid 14×14 = 196"):
        attention_distance(attn, (14, 14), 16, 0)
    with pytest.raises(UsageError, match="N=197"):
        head_statistics(attn, (14, 14), 16, 2)
    with pytest.raises(UsageError, match="N=197"):
        aligned_attention(attn, (13, 15), 1)
    with pytest.raises(UsageError, match=r"\(\.\.\., N, N\)"):
        attention_distance(attn[..., :-1], (14, 14), 16, 1)
    with pytest.raises(UsageError, match="no patch tokens"):
        attention_entropy(torch.eye(3), 3)
    with pytest.raises(UsageError, match="positions"):
        attention_distance(attn, (14, 14), 16, 1, positions=torch.zeros(195, 2))
    with pytest.raises(UsageError, match="broadcast"):
        attention_distance(attn, (14, 14), 16, 1, positions=grid_positions((14, 14)).expand(5, 196, 2))
    with pytest.raises(UsageError, match="integer"):
        aligned_attention(attn, (14, 14), 1, positions=grid_positions((14, 14)) + 0.5)
    with pytest.raises(UsageError, match="on the grid"):
        aligned_attention(attn, (14, 14), 1, positions=grid_positions((14, 14)) + 1)
    with pytest.raises(UsageError, match="num_prefix_tokens"):
        prefix_mass(attn, -1)
    with pytest.raises(UsageError, match="grid"):
        attention_distance(attn, (14, 0), 16, 1)
    with pytest.raises(UsageError, match="patch_size"):
        attention_distance(attn, (14, 14), 0, 1)
    with pytest.raises(UsageError, match="sequence"):
        attention_rollout([])
    with pytest.raises(UsageError, match="agree"):
        attention_rollout([attn, attn[:, :, :10, :10]], 1)


# ---------------------------------------------------------------------------------------------------------
# queries and keys on different grids (LeViT subsampling, Twins global sub-sampled keys); class attention
# ---------------------------------------------------------------------------------------------------------
def test_cross_grid_distance_is_between_query_and_key_centres_in_pixels():
    from repsim.attention.statistics import aligned_attention, attention_distance, query_cells

    # Twins-like: 4 x 4 queries of 8 px, keys = 2 x 2 cells of a stride-2 conv (16 px); query r at (r - 0.5) / 2
    qpos = (grid_positions((4, 4)).double() - 0.5) / 2
    attn = torch.zeros(1, 1, 16, 4, dtype=torch.float64)
    attn[0, 0, :, 0] = 1.0  # every query on key (0, 0), centred at pixel (8, 8)
    d = attention_distance(attn, (2, 2), 16, 0, query_positions=qpos)
    centres = (grid_positions((4, 4)).double() + 0.5) * 8  # query centres in px
    expected = (centres - 8.0).norm(dim=-1).mean()
    assert float(d) == pytest.approx(float(expected), abs=1e-9)
    # query (0, 0) lies in key cell (0, 0), query (3, 3) in (1, 1): its offset to key (0, 0) is (-1, -1)
    cells = query_cells(qpos, (2, 2))
    assert cells[0].tolist() == [0, 0] and cells[15].tolist() == [1, 1] and cells[5].tolist() == [0, 0]
    al = aligned_attention(attn, (2, 2), 0, query_positions=qpos)[0, 0]
    assert float(al[1, 1]) == 4 and float(al[0, 0]) == 4 and float(al.sum()) == 16  # 3 x 3 canvas


def test_cross_grid_with_query_positions_of_the_keys_is_self_attention():
    from repsim.attention.statistics import head_statistics

    a = torch.rand(2, 3, 17, 17, generator=torch.Generator().manual_seed(0)).softmax(-1)
    s1 = head_statistics(a, (4, 4), (16, 8), 1)
    s2 = head_statistics(a, (4, 4), (16, 8), 1, query_positions=grid_positions((4, 4)).double())
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k])


def test_levit_subsampled_queries_sit_on_their_key_token():
    from repsim.attention.statistics import attention_distance

    qpos = grid_positions((2, 2)).double() * 2  # query (r, c) = key (2r, 2c) of a 4 x 4 grid
    attn = torch.zeros(1, 1, 4, 16, dtype=torch.float64)
    for q, (r, c) in enumerate(qpos.long().tolist()):
        attn[0, 0, q, r * 4 + min(c + 1, 3)] = 1.0  # the key right of the query's own token
    assert float(attention_distance(attn, (4, 4), 16, 0, query_positions=qpos)) == pytest.approx(16.0)


def test_class_attention_statistics():
    from repsim.attention.statistics import class_attention_statistics

    a = torch.tensor([0.5, 0.25, 0.25, 0.0, 0.0]).view(1, 1, 1, 5)
    st = class_attention_statistics(a, (2, 2), 1)
    assert float(st["prefix_mass"]) == pytest.approx(0.5)
    assert float(st["entropy"]) == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    assert st["cls_map"][0, 0].tolist() == [[0.5, 0.5], [0.0, 0.0]]
    with pytest.raises(UsageError, match="one class-token query"):
        class_attention_statistics(torch.rand(1, 1, 2, 5), (2, 2), 1)
