"""Attention statistics of vision transformers: pure math on attention probabilities (no model code).

Token geometry
--------------
Attention probabilities ``attn`` have shape ``(..., N, N)`` (queries × keys, rows sum to 1). The first
``num_prefix_tokens = p`` tokens are prefix tokens (CLS, registers, distillation); the remaining
``Np = N - p`` tokens are patch tokens. By default they lie row-major on a grid ``grid = (gh, gw)``
(``Np = gh·gw``, non-square allowed): patch token ``i`` sits at grid position ``(i // gw, i % gw)``.
``patch_size`` (an int or ``(ph, pw)``) is the token stride in pixels, so grid steps ``(dy, dx)`` are
``sqrt((dy·ph)² + (dx·pw)²)`` pixels apart. The prefix count and the grid must be read from the model,
never guessed from ``sqrt(N - 1)``: a mismatch raises :class:`~repsim.errors.UsageError`.

``positions`` (optional, every geometric function) replaces the default row-major grid: a tensor of
patch-token coordinates ``(row, col)`` in grid steps, shape ``(..., Np, 2)``, whose leading dims broadcast
against ``attn.shape[:-2]`` (right-aligned, as in numpy). With ``positions`` the token count is checked
against ``positions.shape[-2]`` instead of ``gh·gw``, and ``grid`` only sizes the aligned-attention canvas
(every position must then be an integer in ``[0, gh) × [0, gw)``). This is how windowed attention (Swin) is
handled: attention ``(B, nW, H, w², w²)`` with positions ``(nW, 1, w², 2)`` giving each window token's true
image coordinates after undoing the shifted-window roll, and ``num_prefix_tokens = 0``. Keys that Swin
masks out (tokens of a shifted window that came from the opposite image border) carry ~0 probability and
so contribute ~nothing.

Queries and keys on different grids
-----------------------------------
Some attention layers have their queries and keys on different token grids: LeViT's subsampling attention
(queries are every ``s``-th token of the key grid), Twins' global sub-sampled attention (keys are a
strided convolution's output over the query grid). There ``grid`` and ``patch_size`` describe the *keys*
(row-major, as above) and ``query_positions`` ``(..., Nq, 2)`` gives each patch query's centre in *key-grid
steps*, real-valued: key cell ``(i, j)`` has its centre at ``(i, j)``, so a query whose centre lies between
key centres gets a fractional position (Twins with ``sr = 2``: query row ``r`` sits at ``(r - 0.5) / 2``;
LeViT with ``s = 2``: query ``(r, c)`` *is* key token ``(2r, 2c)``). The attention then has shape
``(..., p + Nq, p + gh·gw)``. The distance between a query and a key is the distance between their patch
centres in input pixels, ``‖(pos_k - pos_q) ⊙ patch_size‖``: the same definition as for self-attention,
where ``pos_q`` is a key-grid position, so self-attention with ``query_positions = grid_positions(grid)``
gives exactly the self-attention numbers. For the aligned map each query is placed on the key cell that
contains its centre, ``round-half-up(pos_q)`` clamped to the grid (:func:`query_cells`; a query below the
last full row of keys, which the strided convolution dropped, goes to the last row), and offsets are in
key-grid steps.

*Class attention* (CaiT's ``ClassAttn``, CrossViT's cross-attention; Touvron et al. 2021, "Going deeper
with Image Transformers", Sec. 3; Chen et al. 2021, "CrossViT", Sec. 3.3): the only query is the class
token, which has no position, so there is no attention distance or aligned map; such a layer is reported
by :func:`class_attention_statistics` as a *CLS-to-patch map*.

Definitions
-----------
*Patch block and renormalisation.* Geometric statistics (distance, aligned maps) use patch-token queries
and patch-token keys only: the prefix keys are dropped and each query row is renormalised over the patch
keys, ``P̂_qk = A_qk / Σ_k' A_qk'`` (``k, k'`` patch keys). The prefix mass ``Σ_{k<p} A_qk`` is reported
separately (:func:`prefix_mass`). A row whose patch mass is exactly 0 (all its attention on prefix keys)
has no spatial distribution: it contributes distance 0 and nothing to the aligned map, but still counts as
a query in the mean over queries.

*Mean attention distance* (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Fig. 7 / Appendix
D.7; Raghu et al. 2021, "Do Vision Transformers See Like CNNs?", Sec. 5): for each patch query ``q``,
``d_q = Σ_k P̂_qk · ‖pos_k - pos_q‖_px`` (patch-centre distance in pixels, self = 0), averaged over the
patch queries. Uniform attention on a 14 × 14 grid with 16-px patches gives 116.49 px.

*Aligned attention* (Walmer et al. 2023, "Teaching Matters: Investigating the Role of Supervision in
Vision Transformers", aligned aggregated attention maps): each query's renormalised patch-key map is pasted
into a ``(2gh-1) × (2gw-1)`` canvas centred on the query, key offset ``(dy, dx) = key - query`` landing at
canvas cell ``[gh-1+dy, gw-1+dx]``, and summed over the queries. Implemented as one ``scatter_add_`` over
the flattened (query, key) axis with a precomputed offset index: per-query canvases (``B·H·Np·canvas``
floats: 220 MB for ViT-B/16 at batch 32, ~3.7 GB for a Swin-T stage-1 batch of 8 with its 111 × 111
canvas) are never formed. Callers sum maps over images (``sum_dims`` does it inside the scatter).

*Attention rollout* (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", Sec. 3): per
layer the head-mean attention, residual-corrected ``Â = 0.5·A + 0.5·I`` and row-renormalised; the layers
multiply with the later layer on the left, ``R = Â_L ··· Â_1``.

Numerics and memory
-------------------
Inputs may be torch tensors or numpy arrays; float16/bfloat16 (and integer) inputs are up-cast to float32,
float64 stays float64; results come back in that compute dtype on the input's device. Heavy operations hold
at most a couple of temporaries the size of the attention tensor (ViT-B/16 at 224 px, B = 32: 12 heads ×
197² × 32 ≈ 15 M floats, 60 MB each in float32). Row sums are not validated (masked or truncated rows are
legitimate input); a row summing to ``s`` simply weighs ``s`` in :func:`prefix_mass` and
:func:`attention_entropy`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from repsim.errors import UsageError

__all__ = [
    "AXIAL_EXCESS_MIN",
    "CENTROID_BOX",
    "HEAD_KINDS",
    "LOCAL_BOX",
    "LOCAL_DISTANCE_RATIO_MAX",
    "LOCAL_MASS_MIN",
    "OFFSET_MIN",
    "STRICT_CENTRE_MIN",
    "aligned_attention",
    "attention_distance",
    "attention_entropy",
    "attention_rollout",
    "centroid_offset",
    "class_attention_statistics",
    "classify_heads",
    "grid_positions",
    "head_features",
    "head_statistics",
    "prefix_mass",
    "query_cells",
    "rollout_map",
]

# ----------------------------------------------------------------------------------------------------
# Head classification (features computed by :func:`head_features`; rules applied by :func:`classify_heads`)
# ----------------------------------------------------------------------------------------------------

HEAD_KINDS: tuple[str, ...] = ("strict_local", "soft_local", "offset_local", "axial", "global")

LOCAL_MASS_MIN = 0.6
"""A head is *local* when ``local_excess ≥ 0.6`` (see :func:`head_features`): the larger of the share of
their attention that the queries able to reach the peak offset put on it (border queries handled) and the
mass within one step of the peak, each in excess of uniform attention's and normalised so that uniform
scores 0. A mixture ``α·(local head) + (1-α)·(uniform)`` scores ``α`` on any grid, so 0.6 means "clearly
more than half the attention is local": a one-offset head (whatever its border queries do) or a 3 × 3 blur
scores 1 (0.9 with 10 % uniform noise mixed in), *half neighbour, half uniform* 0.5 (not local: it is as
much global as local), uniform 0, row / column / axial heads 0.14–0.37 (the top: a column-only head on
6 × 10). The same threshold guards the broad-blur rule below (``concentration``)."""

LOCAL_DISTANCE_RATIO_MAX = 0.35
"""…or when the median length of its attention offsets is at most 0.35 of uniform attention's on the same
grid (``distance_ratio``) *and* at least :data:`LOCAL_MASS_MIN` of its attention departs from uniform
(``concentration``, the total-variation distance to uniform attention's aligned map): catches blurs broader
than 3 × 3 (a 5 × 5 blur has ``local_excess`` 0.37 but a ratio of 0.28 on 14 × 14, a Gaussian of σ = 2
steps 0.32) while axial heads (≥ 0.49 on 14 × 14 and 6 × 10: their mass runs along whole rows/columns)
stay non-local. The median, not the mean, so that a little spread-out mass (10 % uniform noise moves the
mean ratio of a 5 × 5 blur from 0.25 to 0.32) does not flip a local head; the concentration guard because
a median is blind to how the other half is spread (*half neighbour, half uniform* has ratio 0.14)."""

OFFSET_MIN = 0.5
"""A local head is *offset_local* when its *local centroid* (``local_centroid``: centroid of the
border-corrected attention in excess of uniform over the 5 × 5 offsets around the peak) lies at least half
a grid step from the query: its local mass is then nearer a neighbouring token than the query itself. A
left-neighbour head has ‖local centroid‖ = 1 whatever its border queries (which have no left neighbour) do:
attend to themselves, wrap to the other end of the row, follow raster order (0.93–1.0; the whole-map
centroid of the wrap-around head is 0); symmetric heads (self, blur) have 0 by symmetry. The window is 5 × 5
so that a blob centred one step off the query is seen whole even when the heaviest single offset is the
query itself."""

STRICT_CENTRE_MIN = 0.5
"""A centred local head is *strict_local* when the majority of its mass is on the query itself (centre
cell; every query can reach it, so no border correction is needed); otherwise *soft_local*. A self head
has 1.0 (0.9 noisy), a 3 × 3 blur ≈ 1/9 … 1/4 (border queries see fewer neighbours), mean ≈ 0.13 on
14 × 14."""

AXIAL_EXCESS_MIN = 0.6
"""A non-local head is *axial* when at least 0.6 of the mass that uniform attention puts off the centre
row ∪ centre column (offsets dy = 0 or dx = 0) has moved onto it: ``cross_excess = (c - c_u) / (1 - c_u)``
with ``c`` the head's cross mass and ``c_u = 1/gh + 1/gw - 1/(gh·gw)`` uniform attention's. Row-, column-
or row-and-column attention gives 1 (0.9 with 10 % noise), uniform 0; the normalisation makes the
threshold independent of the grid size. Like ``local_excess`` it is linear in a mixture with uniform
attention, so *half neighbour (on the cross), half uniform* scores 0.5 and stays global: 0.6, not 0.5."""

LOCAL_BOX = 1
"""Half-width (grid steps) of the box around the peak for ``local_excess``: 3 × 3 offsets."""

CENTROID_BOX = 2
"""Half-width (grid steps) of the window around the peak for ``local_centroid``: 5 × 5 offsets."""


# ----------------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------------


def _as_float(x: Any, name: str) -> torch.Tensor:
    """torch / numpy → floating torch tensor: float64 stays, everything else computes in float32."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise UsageError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}") from err
    if x.is_complex() or x.dtype == torch.bool:
        raise UsageError(f"{name} must hold real probabilities, got dtype {x.dtype}")
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def _pair(value: Any, name: str) -> tuple[int, int] | tuple[float, float]:
    if isinstance(value, (tuple, list)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        if len(value) != 2:
            raise UsageError(f"{name} must be one number or a pair (rows, cols), got {value!r}")
        a, b = value
    else:
        a = b = value
    if isinstance(a, bool) or isinstance(b, bool):
        raise UsageError(f"{name} must be positive numbers, got {value!r}")
    try:
        ok = float(a) > 0 and float(b) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UsageError(f"{name} must be positive, got {value!r}")
    return a, b


def _grid(grid: Any) -> tuple[int, int]:
    gh, gw = _pair(grid, "grid")
    if int(gh) != gh or int(gw) != gw:
        raise UsageError(f"grid must be two positive integers (rows, cols), got {grid!r}")
    return int(gh), int(gw)


def _prefix(num_prefix_tokens: Any) -> int:
    if isinstance(num_prefix_tokens, bool) or int(num_prefix_tokens) != num_prefix_tokens or num_prefix_tokens < 0:
        raise UsageError(f"num_prefix_tokens must be an integer >= 0, got {num_prefix_tokens!r}")
    return int(num_prefix_tokens)


def _check_attn(attn: torch.Tensor, p: int) -> int:
    """Validate ``(..., N, N)`` with at least one patch token; returns N."""
    if attn.ndim < 2 or attn.shape[-1] != attn.shape[-2]:
        raise UsageError(f"attention must have shape (..., N, N) (queries × keys), got {tuple(attn.shape)}")
    n = attn.shape[-1]
    if n <= p:
        raise UsageError(f"attention has N={n} tokens but num_prefix_tokens={p}: no patch tokens left")
    return n


def _prepare(attn: Any, grid: Any, num_prefix_tokens: Any, positions: Any
             ) -> tuple[torch.Tensor, tuple[int, int], int, torch.Tensor | None]:
    """Validated (attn as float, grid, prefix count, positions as float64 on attn's device or None)."""
    a = _as_float(attn, "attn")
    gh, gw = _grid(grid)
    p = _prefix(num_prefix_tokens)
    n = _check_attn(a, p)
    if positions is None:
        if n != p + gh * gw:
            raise UsageError(
                f"attention has N={n} tokens but num_prefix_tokens={p} + grid {gh}×{gw} = {p + gh * gw}: "
                "read the grid and prefix count from the model (or pass positions for windowed attention)")
        return a, (gh, gw), p, None
    pos = _as_float(positions, "positions").to(device=a.device, dtype=torch.float64)
    if pos.ndim < 2 or pos.shape[-1] != 2 or pos.shape[-2] != n - p:
        raise UsageError(
            f"positions must have shape (..., Np, 2) with Np = N - num_prefix_tokens = {n - p}, "
            f"got {tuple(pos.shape)}")
    lead = tuple(a.shape[:-2])
    plead = tuple(pos.shape[:-2])
    if len(plead) > len(lead) or any(s not in (1, t) for s, t in zip(reversed(plead), reversed(lead))):
        raise UsageError(f"positions leading dims {tuple(pos.shape[:-2])} do not broadcast to attention's {lead}")
    if not torch.isfinite(pos).all():
        raise UsageError("positions hold a non-finite value")
    return a, (gh, gw), p, pos


def _prepare_cross(attn: Any, grid: Any, num_prefix_tokens: Any, query_positions: Any
                   ) -> tuple[torch.Tensor, tuple[int, int], int, torch.Tensor]:
    """Validated (attn, key grid, prefix count, query positions (..., Nq, 2) float64) for attention whose
    queries lie on another grid than its keys (see "Queries and keys on different grids")."""
    a = _as_float(attn, "attn")
    gh, gw = _grid(grid)
    p = _prefix(num_prefix_tokens)
    if a.ndim < 2:
        raise UsageError(f"attention must have shape (..., Nq, Nk) (queries × keys), got {tuple(a.shape)}")
    if a.shape[-1] != p + gh * gw:
        raise UsageError(f"attention has {a.shape[-1]} keys but num_prefix_tokens={p} + key grid {gh}×{gw} = "
                         f"{p + gh * gw}: read the key grid and prefix count from the model")
    qp = _as_float(query_positions, "query_positions").to(device=a.device, dtype=torch.float64)
    if qp.ndim < 2 or qp.shape[-1] != 2 or qp.shape[-2] != a.shape[-2] - p or a.shape[-2] <= p:
        raise UsageError(f"query_positions must have shape (..., Nq, 2) with Nq = {a.shape[-2]} queries - "
                         f"num_prefix_tokens {p} (at least one), got {tuple(qp.shape)}")
    lead, plead = tuple(a.shape[:-2]), tuple(qp.shape[:-2])
    if len(plead) > len(lead) or any(s not in (1, t) for s, t in zip(reversed(plead), reversed(lead))):
        raise UsageError(f"query_positions leading dims {plead} do not broadcast to attention's {lead}")
    if not torch.isfinite(qp).all():
        raise UsageError("query_positions hold a non-finite value")
    return a, (gh, gw), p, qp


def query_cells(query_positions: Any, grid: tuple[int, int]) -> torch.Tensor:
    """The key cell ``(row, col)`` (int64) containing each query centre: ``floor(pos + 0.5)`` clamped to
    ``[0, gh) × [0, gw)``, for ``query_positions`` (..., Nq, 2) in key-grid steps (module docstring)."""
    gh, gw = _grid(grid)
    qp = _as_float(query_positions, "query_positions").to(torch.float64)
    cells = torch.floor(qp + 0.5).to(torch.int64)
    return torch.stack([cells[..., 0].clamp(0, gh - 1), cells[..., 1].clamp(0, gw - 1)], dim=-1)


def _cross_distances(qp: torch.Tensor, grid: tuple[int, int], patch: tuple[float, float]) -> torch.Tensor:
    """Query-centre to key-centre distances in pixels (..., Nq, Nk) float64."""
    kp = grid_positions(grid).to(device=qp.device, dtype=torch.float64)
    d = kp[None, :, :] - qp[..., :, None, :]  # key - query, (..., Nq, Nk, 2)
    scale = torch.tensor([float(patch[0]), float(patch[1])], dtype=torch.float64, device=qp.device)
    return (d * scale).square().sum(-1).sqrt()


def _cross_offset_index(qp: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Canvas index of every (query, key) pair with each query on the key cell containing it: (..., Nq·Nk)."""
    gh, gw = grid
    cells = query_cells(qp, grid)
    kp = grid_positions(grid).to(cells.device)
    dy = kp[None, :, 0] - cells[..., :, None, 0]
    dx = kp[None, :, 1] - cells[..., :, None, 1]
    idx = (gh - 1 + dy) * (2 * gw - 1) + (gw - 1 + dx)
    return idx.reshape(*idx.shape[:-2], -1)


# ----------------------------------------------------------------------------------------------------
# Geometry (cached for the default grid)
# ----------------------------------------------------------------------------------------------------


def grid_positions(grid: tuple[int, int]) -> torch.Tensor:
    """Row-major patch positions ``(gh·gw, 2)`` int64: token ``i`` → ``(i // gw, i % gw)`` in grid steps."""
    gh, gw = _grid(grid)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)


def _pixel_distances(pos: torch.Tensor, patch: tuple[float, float]) -> torch.Tensor:
    """Pairwise patch-centre distances in pixels ``(..., Nq, Nk)`` float64 from positions ``(..., Np, 2)``."""
    d = pos.to(torch.float64)[..., None, :, :] - pos.to(torch.float64)[..., :, None, :]  # key - query
    scale = torch.tensor([float(patch[0]), float(patch[1])], dtype=torch.float64, device=pos.device)
    return (d * scale).square().sum(-1).sqrt()


@functools.lru_cache(maxsize=32)
def _grid_distances(gh: int, gw: int, ph: float, pw: float, device: torch.device, dtype: torch.dtype
                    ) -> torch.Tensor:
    return _pixel_distances(grid_positions((gh, gw)), (ph, pw)).to(device=device, dtype=dtype)


def _offset_index(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Canvas index ``(gh-1+dy)·(2gw-1) + (gw-1+dx)`` of every (query, key) pair, flattened: ``(..., Np·Np)``."""
    gh, gw = grid
    if not torch.equal(pos, pos.round()):
        raise UsageError("positions must be integer grid steps for aligned attention")
    rows, cols = pos[..., 0], pos[..., 1]
    if rows.min() < 0 or rows.max() > gh - 1 or cols.min() < 0 or cols.max() > gw - 1:
        raise UsageError(f"positions must lie on the grid [0, {gh}) × [0, {gw}) for aligned attention")
    ipos = pos.to(torch.int64)
    dy = ipos[..., None, :, 0] - ipos[..., :, None, 0]  # (..., q, k): key - query
    dx = ipos[..., None, :, 1] - ipos[..., :, None, 1]
    idx = (gh - 1 + dy) * (2 * gw - 1) + (gw - 1 + dx)
    return idx.reshape(*idx.shape[:-2], -1)


@functools.lru_cache(maxsize=32)
def _grid_offset_index(gh: int, gw: int, device: torch.device) -> torch.Tensor:
    return _offset_index(grid_positions((gh, gw)).to(torch.float64), (gh, gw)).to(device)


def _renormalised_patch_block(a: torch.Tensor, p: int) -> torch.Tensor:
    """Patch queries × patch keys ``(..., Np, Np)``, each row divided by its patch mass (0-mass rows → 0)."""
    block = a[..., p:, p:]
    mass = block.sum(-1, keepdim=True)
    inv = torch.where(mass > 0, mass.reciprocal(), torch.zeros_like(mass))
    return block * inv


def _distance_from_block(pn: torch.Tensor, a: torch.Tensor, grid: tuple[int, int], patch: tuple[float, float],
                         pos: torch.Tensor | None) -> torch.Tensor:
    if pos is None:
        dist = _grid_distances(grid[0], grid[1], float(patch[0]), float(patch[1]), a.device, pn.dtype)
    else:
        dist = _pixel_distances(pos, patch).to(pn.dtype)
    return (pn * dist).sum(-1).mean(-1)


def _aligned_from_block(pn: torch.Tensor, grid: tuple[int, int], pos: torch.Tensor | None,
                        sum_dims: Sequence[int], query_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Scatter the renormalised block ``(*lead, Nq, Nk)`` into canvases, summing over ``sum_dims`` of lead
    (``query_pos``: queries on another grid than the keys, see :func:`_cross_offset_index`)."""
    gh, gw = grid
    lead = tuple(pn.shape[:-2])
    n_lead = len(lead)
    q = pn.shape[-1] * pn.shape[-2]
    flat = pn.reshape(*lead, q)
    if query_pos is not None:
        idx = _cross_offset_index(query_pos, grid)
        idx = idx.reshape((1,) * (n_lead + 1 - idx.ndim) + tuple(idx.shape))
    elif pos is None:
        idx = _grid_offset_index(gh, gw, pn.device).reshape((1,) * n_lead + (q,))
    else:
        idx = _offset_index(pos, grid)
        idx = idx.reshape((1,) * (n_lead + 1 - idx.ndim) + tuple(idx.shape))
    # dims along which the index does not vary are summed before scattering (cheap); the others are
    # folded into the scattered axis, so one canvas per kept index collects them
    presum = [d for d in sum_dims if idx.shape[d] == 1]
    fold = [d for d in sum_dims if idx.shape[d] != 1]
    keep = [d for d in range(n_lead) if d not in sum_dims]
    if presum:
        flat = flat.sum(dim=presum, keepdim=True)
    perm = keep + presum + fold + [n_lead]
    keep_shape = [flat.shape[d] for d in keep]
    src = flat.permute(perm).reshape(*keep_shape, -1)
    index = idx.permute(perm).reshape(*[idx.shape[d] for d in keep], -1).expand(*keep_shape, -1)
    out = src.new_zeros(*keep_shape, (2 * gh - 1) * (2 * gw - 1))
    out.scatter_add_(-1, index, src)
    return out.reshape(*keep_shape, 2 * gh - 1, 2 * gw - 1)


def _sum_dims(sum_dims: int | Sequence[int] | None, n_lead: int) -> list[int]:
    if sum_dims is None:
        return []
    dims = [sum_dims] if isinstance(sum_dims, int) else list(sum_dims)
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not -n_lead <= d < n_lead:
            raise UsageError(f"sum_dims must index attention's leading dims (there are {n_lead}), got {sum_dims!r}")
        out.append(int(d) % n_lead)
    if len(set(out)) != len(out):
        raise UsageError(f"sum_dims repeats a dim: {sum_dims!r}")
    return sorted(out)


# ----------------------------------------------------------------------------------------------------
# Per-head statistics
# ----------------------------------------------------------------------------------------------------


def attention_distance(attn: Any, grid: tuple[int, int], patch_size: int | tuple[int, int],
                       num_prefix_tokens: int = 0, positions: Any = None, *, query_positions: Any = None
                       ) -> torch.Tensor:
    """Mean attention distance in pixels, shape ``attn.shape[:-2]``.

    ``attn`` (..., N, N) attention probabilities, ``N = num_prefix_tokens + gh·gw`` (or ``+ Np`` with
    ``positions`` (..., Np, 2) in grid steps, see module docstring); ``patch_size`` token stride in pixels
    (int or ``(ph, pw)``). Definition (Dosovitskiy et al. 2021 Fig. 7; Raghu et al. 2021 Sec. 5): over patch
    queries ``q``, the mean of ``Σ_k P̂_qk · sqrt((dy·ph)² + (dx·pw)²)``, where ``P̂`` is the patch block with
    prefix keys dropped and rows renormalised over patch keys and ``(dy, dx)`` the key - query offset in grid
    steps (self = 0). Rows with zero patch mass contribute 0. Uniform attention, 14 × 14 grid, 16 px: 116.49.
    ``query_positions`` (..., Nq, 2): queries on another grid than the keys (module docstring); ``attn`` is
    then (..., p + Nq, p + gh·gw) and ``grid`` / ``patch_size`` are the keys'.
    """
    patch = _pair(patch_size, "patch_size")
    if query_positions is not None:
        if positions is not None:
            raise UsageError("pass positions (windowed attention) or query_positions (cross-grid), not both")
        a, g, p, qp = _prepare_cross(attn, grid, num_prefix_tokens, query_positions)
        pn = _renormalised_patch_block(a, p)
        return (pn * _cross_distances(qp, g, patch).to(pn.dtype)).sum(-1).mean(-1)
    a, g, p, pos = _prepare(attn, grid, num_prefix_tokens, positions)
    return _distance_from_block(_renormalised_patch_block(a, p), a, g, patch, pos)


def prefix_mass(attn: Any, num_prefix_tokens: int) -> torch.Tensor:
    """Mean over patch-token queries of the attention on prefix keys, shape ``attn.shape[:-2]``.

    ``attn`` (..., N, N); the result is ``mean_{q ≥ p} Σ_{k < p} A_qk`` in [0, 1] for probability rows,
    0 when ``num_prefix_tokens = 0``.
    """
    a = _as_float(attn, "attn")
    p = _prefix(num_prefix_tokens)
    _check_attn(a, p)
    return a[..., p:, :p].sum(-1).mean(-1)


def attention_entropy(attn: Any, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Mean over patch-token queries of the row entropy in nats, shape ``attn.shape[:-2]``.

    ``attn`` (..., N, N); entropy of the full row (all N keys, prefix included, not renormalised):
    ``H_q = -Σ_k A_qk log A_qk`` with ``0·log 0 = 0``. Uniform attention gives ``log N``.
    """
    a = _as_float(attn, "attn")
    p = _prefix(num_prefix_tokens)
    _check_attn(a, p)
    rows = a[..., p:, :]
    return -torch.special.xlogy(rows, rows).sum(-1).mean(-1)


def aligned_attention(attn: Any, grid: tuple[int, int], num_prefix_tokens: int = 0, positions: Any = None,
                      *, sum_dims: int | Sequence[int] | None = None, query_positions: Any = None) -> torch.Tensor:
    """Aligned aggregated attention maps (Walmer et al. 2023), shape ``attn.shape[:-2] + (2gh-1, 2gw-1)``.

    ``attn`` (..., N, N). Each patch query's renormalised patch-key map (prefix keys dropped, see
    :func:`attention_distance`) is pasted into a ``(2gh-1) × (2gw-1)`` canvas centred on the query — key
    offset ``(dy, dx) = key - query`` (grid steps) at cell ``[gh-1+dy, gw-1+dx]`` — and summed over the
    queries, so each map sums to the number of patch queries with non-zero patch mass (``Np`` normally).
    ``positions`` (..., Np, 2) must be integer grid positions inside ``grid``.

    ``sum_dims``: leading dims of ``attn`` to sum over inside the scatter (removed from the result), e.g.
    ``0`` for the batch. Memory-lean: dims along which ``positions`` do not vary are summed before
    scattering, the others (Swin windows) are folded into the scattered axis, so a canvas is only ever
    allocated per kept index. ``query_positions``: queries on another grid than the keys, each placed on the
    key cell containing its centre (:func:`query_cells`; canvas over the key grid).
    """
    if query_positions is not None:
        if positions is not None:
            raise UsageError("pass positions (windowed attention) or query_positions (cross-grid), not both")
        a, g, p, qp = _prepare_cross(attn, grid, num_prefix_tokens, query_positions)
        return _aligned_from_block(_renormalised_patch_block(a, p), g, None, _sum_dims(sum_dims, a.ndim - 2), qp)
    a, g, p, pos = _prepare(attn, grid, num_prefix_tokens, positions)
    dims = _sum_dims(sum_dims, a.ndim - 2)
    return _aligned_from_block(_renormalised_patch_block(a, p), g, pos, dims)


def head_statistics(attn: Any, grid: tuple[int, int], patch_size: int | tuple[int, int],
                    num_prefix_tokens: int = 0, positions: Any = None, *, query_positions: Any = None
                    ) -> dict[str, torch.Tensor]:
    """All per-head statistics of one batch of one layer, in one pass (float32 at least).

    ``attn`` (B, H, N, N) (any leading dims ``(B, ...)`` work; the first is the batch). Returns

    - ``distance``    (B, H): :func:`attention_distance`, pixels
    - ``prefix_mass`` (B, H): :func:`prefix_mass`
    - ``entropy``     (B, H): :func:`attention_entropy`, nats
    - ``aligned_sum`` (H, 2gh-1, 2gw-1): :func:`aligned_attention` summed over the batch

    The renormalised patch block is computed once and shared by the distance and the aligned maps.
    Windowed (Swin) form: ``attn`` (B, nW, H, w², w²) with ``positions`` (nW, 1, w², 2) gives ``distance``,
    ``prefix_mass`` and ``entropy`` of shape (B, nW, H) (average over windows: equal query counts) and
    ``aligned_sum`` (nW, H, 2gh-1, 2gw-1) (sum over windows).
    Cross-grid form (LeViT subsampling, Twins global sub-sampled attention): ``attn`` (B, H, p + Nq, p + gh·gw)
    with ``query_positions`` (Nq, 2) in key-grid steps; ``grid``, ``patch_size`` and the aligned canvas are
    the keys' (module docstring, "Queries and keys on different grids").
    """
    patch = _pair(patch_size, "patch_size")
    qp = None
    if query_positions is not None:
        if positions is not None:
            raise UsageError("pass positions (windowed attention) or query_positions (cross-grid), not both")
        a, g, p, qp = _prepare_cross(attn, grid, num_prefix_tokens, query_positions)
        pos = None
    else:
        a, g, p, pos = _prepare(attn, grid, num_prefix_tokens, positions)
    if a.ndim < 3:
        raise UsageError(f"head_statistics needs attention (B, H, N, N), got {tuple(a.shape)}")
    pn = _renormalised_patch_block(a, p)
    rows = a[..., p:, :]
    if qp is not None:
        distance = (pn * _cross_distances(qp, g, patch).to(pn.dtype)).sum(-1).mean(-1)
        return {
            "distance": distance,
            "prefix_mass": a[..., p:, :p].sum(-1).mean(-1),
            "entropy": -torch.special.xlogy(rows, rows).sum(-1).mean(-1),
            "aligned_sum": _aligned_from_block(pn, g, None, [0], qp),
        }
    return {
        "distance": _distance_from_block(pn, a, g, patch, pos),
        "prefix_mass": a[..., p:, :p].sum(-1).mean(-1),
        "entropy": -torch.special.xlogy(rows, rows).sum(-1).mean(-1),
        "aligned_sum": _aligned_from_block(pn, g, pos, [0]),
    }


def class_attention_statistics(attn: Any, grid: tuple[int, int], num_prefix_tokens: int = 1
                               ) -> dict[str, torch.Tensor]:
    """Statistics of class attention (CaiT ``ClassAttn``, Touvron et al. 2021 Sec. 3; CrossViT's cross-attention,
    Chen et al. 2021 Sec. 3.3): the class token is the only query, so the layer is a *CLS-to-patch map*.

    ``attn`` (B, H, 1, p + gh·gw): one query row over ``p`` prefix keys (the class token itself) and the patch
    keys, row-major on ``grid``. Returns

    - ``prefix_mass`` (B, H): the class token's attention on prefix keys
    - ``entropy``     (B, H): entropy of its row (all keys, nats)
    - ``cls_map``     (B, H, gh, gw): its attention on the patch keys, renormalised to sum 1 over them (prefix
      keys dropped, as for the distance; a row with no patch mass gives zeros)

    There is no attention distance nor aligned map: the query has no position.
    """
    a = _as_float(attn, "attn")
    gh, gw = _grid(grid)
    p = _prefix(num_prefix_tokens)
    if a.ndim < 3 or a.shape[-2] != 1 or a.shape[-1] != p + gh * gw:
        raise UsageError(f"class attention must have shape (..., 1, {p} + {gh}×{gw}) (one class-token query), got "
                         f"{tuple(a.shape)}")
    row = a[..., 0, :]
    block = row[..., p:]
    mass = block.sum(-1, keepdim=True)
    cls_map = block * torch.where(mass > 0, mass.reciprocal(), torch.zeros_like(mass))
    return {
        "prefix_mass": row[..., :p].sum(-1),
        "entropy": -torch.special.xlogy(row, row).sum(-1),
        "cls_map": cls_map.reshape(*cls_map.shape[:-1], gh, gw),
    }


# ----------------------------------------------------------------------------------------------------
# Aligned-map features and head classification
# ----------------------------------------------------------------------------------------------------


def _canvas(aligned: Any) -> tuple[torch.Tensor, int, int]:
    m = _as_float(aligned, "aligned").to(torch.float64)
    if m.ndim < 2 or m.shape[-2] % 2 == 0 or m.shape[-1] % 2 == 0:
        raise UsageError(f"aligned maps must have shape (..., 2gh-1, 2gw-1) (odd sizes), got {tuple(m.shape)}")
    return m, (m.shape[-2] + 1) // 2, (m.shape[-1] + 1) // 2


def _normalised(m: torch.Tensor) -> torch.Tensor:
    total = m.sum((-2, -1), keepdim=True)
    if not (total > 0).all():
        raise UsageError("an aligned attention map has no positive mass: nothing to classify")
    return m / total


def _offset_grids(gh: int, gw: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    dy = torch.arange(-(gh - 1), gh, dtype=torch.float64, device=device)[:, None].expand(2 * gh - 1, 2 * gw - 1)
    dx = torch.arange(-(gw - 1), gw, dtype=torch.float64, device=device)[None, :].expand(2 * gh - 1, 2 * gw - 1)
    return dy, dx


def _uniform_aligned(gh: int, gw: int, device: torch.device) -> torch.Tensor:
    """Normalised aligned map of uniform attention: ``(gh-|dy|)(gw-|dx|) / (gh·gw)²``."""
    dy, dx = _offset_grids(gh, gw, device)
    return (gh - dy.abs()) * (gw - dx.abs()) / float(gh * gw) ** 2


def centroid_offset(aligned: Any) -> torch.Tensor:
    """Centroid ``(dy, dx)`` in grid steps of aligned maps, relative to the canvas centre: shape (..., 2).

    ``aligned`` (..., 2gh-1, 2gw-1) (:func:`aligned_attention`), normalised to sum 1 first; a map with no
    positive mass raises :class:`UsageError`. Returned as float64.
    """
    m, gh, gw = _canvas(aligned)
    w = _normalised(m)
    dy, dx = _offset_grids(gh, gw, m.device)
    return torch.stack([(w * dy).sum((-2, -1)), (w * dx).sum((-2, -1))], dim=-1)


def _median_length(weights: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Weighted median of offset lengths: smallest length whose cumulative weight reaches 1/2. (M, C) → (M,)."""
    order = torch.argsort(length, stable=True)
    cum = weights[:, order].cumsum(-1)
    first = (cum >= 0.5 - 1e-9).to(torch.int8).argmax(-1)
    return length[order][first]


def head_features(aligned: Any) -> dict[str, torch.Tensor]:
    """Features of aligned maps (..., 2gh-1, 2gw-1) used by :func:`classify_heads` (float64, shape (...)).

    Computed on the map ``w`` normalised to sum 1, on a ``gh × gw`` grid with ``Nq = gh·gw`` queries.
    *Border correction*: only ``R(o) = (gh-|dy|)(gw-|dx|)`` queries have a key at offset ``o = (dy, dx)``, so
    ``share(o) = w(o)·Nq / R(o)`` is the mean attention at offset ``o`` over the queries that *can* attend
    there (``w = R/Nq²`` for uniform attention: the baseline pyramid, ``share = 1/Nq``; a head whose every
    query attends to offset ``o`` when it can has ``share(o) = 1`` whatever its border queries do instead).
    This assumes every patch query contributed one unit of mass (true for :func:`aligned_attention`'s sums
    unless a query's whole attention sits on prefix tokens).

    - ``centre_mass``     mass on the query itself (offset (0, 0); ``share`` = mass there)
    - ``peak_offset``     (..., 2) offset (dy, dx) of the heaviest cell of ``w`` (first one on ties)
    - ``peak_share``      ``share`` at the peak: the fraction of their attention that the queries which
                          can reach the peak offset put on it
    - ``peak_local_mass`` mass of ``w`` in the 3 × 3 neighbourhood of the peak (raw, not border-corrected)
    - ``local_excess``    how local the head is, in excess of uniform attention: the larger of
                          ``(peak_share - 1/Nq) / (1 - 1/Nq)`` (one fixed offset, border queries handled)
                          and ``(B - B_u) / (1 - B_u)`` with ``B = peak_local_mass`` and ``B_u`` uniform
                          attention's mass on the same offsets (a blur: every query's attention lies within
                          one step of the peak, border queries included). Uniform attention scores 0, a
                          one-offset head or a 3 × 3 blur 1, and a mixture ``α·head + (1-α)·uniform``
                          scores ``α`` times the head's score on any grid. 0 when the box covers the grid.
    - ``local_centroid``  (..., 2) centroid (dy, dx) of ``max(share - 1/Nq, 0)`` (attention in excess of
                          uniform) over the 5 × 5 offsets around the peak; the peak offset when nothing
                          there exceeds uniform
    - ``centroid``        (..., 2) :func:`centroid_offset` of the whole map (not used by the rules: border
                          queries that wrap around or follow raster order drag it to 0)
    - ``concentration``   ``½ Σ |w - w_u|``: total-variation distance to uniform attention's aligned map
                          ``w_u`` (0 uniform, → 1 for a one-token head; ``α·TV(local)`` for a mixture)
    - ``cross_excess``    ``(c - c_u) / (1 - c_u)``: mass ``c`` on the centre row ∪ centre column above
                          uniform attention's ``c_u``, as a fraction of what uniform puts off the cross
                          (0 when the grid is one row or column: everything is on the cross)
    - ``distance_ratio``  median offset length (grid steps; the smallest length holding half the mass)
                          over uniform attention's median on the same grid
    """
    m, gh, gw = _canvas(aligned)
    w = _normalised(m)
    lead = tuple(w.shape[:-2])
    ch, cw = 2 * gh - 1, 2 * gw - 1
    nq = float(gh * gw)
    dy, dx = _offset_grids(gh, gw, w.device)
    uni = _uniform_aligned(gh, gw, w.device)
    flat = w.reshape(-1, ch * cw)
    share = flat / (uni.reshape(1, -1) * nq)  # (M, C): w·Nq/R, R = Nq²·uni
    peak = flat.argmax(-1)
    py, px = dy.reshape(-1)[peak][:, None], dx.reshape(-1)[peak][:, None]  # (M, 1)
    fdy, fdx = dy.reshape(1, -1), dx.reshape(1, -1)
    box = ((fdy - py).abs() <= LOCAL_BOX) & ((fdx - px).abs() <= LOCAL_BOX)  # (M, C)
    peak_share = share.gather(-1, peak[:, None])[:, 0]
    b = (flat * box).sum(-1)  # raw mass within one step of the peak
    b_u = (uni.reshape(1, -1) * box).sum(-1)  # ... for uniform attention
    room = 1.0 - b_u
    box_excess = torch.where(room > 1e-12, (b - b_u) / room.clamp_min(1e-12), torch.zeros_like(b))
    local_excess = torch.maximum((peak_share - 1.0 / nq) / (1.0 - 1.0 / nq) if nq > 1 else torch.zeros_like(b),
                                 box_excess)
    win = ((fdy - py).abs() <= CENTROID_BOX) & ((fdx - px).abs() <= CENTROID_BOX)
    excess = (share - 1.0 / nq).clamp_min(0.0) * win
    ex_total = excess.sum(-1)
    has = ex_total > 1e-12
    safe = torch.where(has, ex_total, torch.ones_like(ex_total))
    local_centroid = torch.stack([
        torch.where(has, (excess * fdy).sum(-1) / safe, py[:, 0]),
        torch.where(has, (excess * fdx).sum(-1) / safe, px[:, 0]),
    ], dim=-1)
    peak_offset = torch.stack([py[:, 0], px[:, 0]], dim=-1)
    on_cross = (dy == 0) | (dx == 0)
    cross = (w * on_cross).sum((-2, -1))
    cross_u = float((uni * on_cross).sum())
    cross_excess = (cross - cross_u) / (1.0 - cross_u) if 1.0 - cross_u > 1e-12 else torch.zeros_like(cross)
    length = (dy.square() + dx.square()).sqrt().reshape(-1)
    ref = float(_median_length(uni.reshape(1, -1), length)[0])
    med = _median_length(flat, length)
    ratio = (med / ref if ref > 0 else torch.ones_like(med)).reshape(lead)
    return {
        "centre_mass": w[..., gh - 1, gw - 1],
        "peak_offset": peak_offset.reshape(*lead, 2),
        "peak_share": peak_share.reshape(lead),
        "peak_local_mass": b.reshape(lead),
        "local_excess": local_excess.reshape(lead),
        "local_centroid": local_centroid.reshape(*lead, 2),
        "centroid": centroid_offset(w),
        "concentration": 0.5 * (w - uni).abs().sum((-2, -1)),
        "cross_excess": cross_excess,
        "distance_ratio": ratio,
    }


def classify_heads(aligned: Any, *, local_mass_min: float = LOCAL_MASS_MIN,
                   local_distance_ratio_max: float = LOCAL_DISTANCE_RATIO_MAX, offset_min: float = OFFSET_MIN,
                   strict_centre_min: float = STRICT_CENTRE_MIN, axial_excess_min: float = AXIAL_EXCESS_MIN
                   ) -> np.ndarray:
    """Kind of each head from its aligned map: numpy str array of shape ``aligned.shape[:-2]``.

    ``aligned`` (..., 2gh-1, 2gw-1), typically summed over images (:func:`head_statistics`'s
    ``aligned_sum``). Heads are classified from *where the mass is* (Walmer et al. 2023's local / offset-local
    / axial / global attention patterns), with border queries handled by :func:`head_features`' per-offset
    correction; rules on its features, first match wins (thresholds: module constants):

    1. local when ``local_excess ≥ LOCAL_MASS_MIN`` (more than 0.6 of the attention on the 3 × 3 offsets
       around the peak, beyond uniform), or when ``distance_ratio ≤ LOCAL_DISTANCE_RATIO_MAX`` and
       ``concentration ≥ LOCAL_MASS_MIN`` (a broad blur); then
       ``offset_local`` if ``‖local_centroid‖ ≥ OFFSET_MIN`` grid steps, else ``strict_local`` if
       ``centre_mass ≥ STRICT_CENTRE_MIN``, else ``soft_local``;
    2. ``axial`` if ``cross_excess ≥ AXIAL_EXCESS_MIN``;
    3. ``global``.

    So a head that sends every query that has a left neighbour to it is ``offset_local`` whether its border
    queries attend to themselves, wrap to the far end of the row or follow raster order; *half neighbour,
    half uniform* is ``global`` (half of its attention is spread over the image). Grids below ~5 × 5 leave
    little room between the kinds; classify with care there. For windowed attention (Swin) the reference is
    uniform attention over the whole grid, so a head uniform inside its window reads as local.
    """
    f = head_features(aligned)
    local = (f["local_excess"] >= local_mass_min) | (
        (f["distance_ratio"] <= local_distance_ratio_max) & (f["concentration"] >= local_mass_min))
    offset = f["local_centroid"].norm(dim=-1) >= offset_min
    strict = f["centre_mass"] >= strict_centre_min
    axial = f["cross_excess"] >= axial_excess_min
    kinds = np.full(tuple(local.shape), "global", dtype="<U12")
    kinds[axial.cpu().numpy()] = "axial"
    loc = local.cpu().numpy()
    kinds[loc] = "soft_local"
    kinds[loc & strict.cpu().numpy()] = "strict_local"
    kinds[loc & offset.cpu().numpy()] = "offset_local"
    return kinds


# ----------------------------------------------------------------------------------------------------
# Attention rollout
# ----------------------------------------------------------------------------------------------------


def attention_rollout(attns: Sequence[Any], num_prefix_tokens: int = 0, residual: bool = True) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020, Sec. 3), shape (B, N, N).

    ``attns``: per layer in network order, attention (B, H, N, N). Per layer ``A = mean_h A_h``; with
    ``residual`` ``Â = 0.5·A + 0.5·I`` (the paper's account of skip connections), rows renormalised to sum
    1; ``R = Â_L ··· Â_1`` (later layer on the left), so ``R[b, i, j]`` is how much token ``i`` at the
    output draws on input token ``j``. ``num_prefix_tokens`` only validates the token count (rollout runs
    over all tokens, prefix included). Computed in float32 (float64 when the inputs are).
    """
    if isinstance(attns, (torch.Tensor, np.ndarray)) or len(attns) == 0:
        raise UsageError("attention_rollout needs a non-empty sequence of per-layer attention (B, H, N, N)")
    p = _prefix(num_prefix_tokens)
    layers = [_as_float(a, f"attns[{i}]") for i, a in enumerate(attns)]
    dtype = torch.float64 if any(a.dtype == torch.float64 for a in layers) else torch.float32
    first = layers[0]
    for i, a in enumerate(layers):
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise UsageError(f"attns[{i}] must have shape (B, H, N, N), got {tuple(a.shape)}")
        if (a.shape[0], a.shape[-1]) != (first.shape[0], first.shape[-1]):
            raise UsageError(f"attns[{i}] has shape {tuple(a.shape)}, attns[0] {tuple(first.shape)}: "
                             "batch and token counts must agree")
    _check_attn(first, p)
    n = first.shape[-1]
    eye = torch.eye(n, dtype=dtype, device=first.device)
    rollout = None
    for a in layers:
        a_hat = a.to(device=first.device, dtype=dtype).mean(1)
        if residual:
            a_hat = 0.5 * a_hat + 0.5 * eye
        a_hat = a_hat / a_hat.sum(-1, keepdim=True)
        rollout = a_hat if rollout is None else a_hat @ rollout
    return rollout


def rollout_map(rollout: Any, grid: tuple[int, int], num_prefix_tokens: int, query: str = "cls") -> torch.Tensor:
    """Spatial map of a rollout (..., N, N) over the patch tokens: shape (..., gh, gw).

    ``query="cls"``: the row of token 0 (CLS) over the patch keys; with ``num_prefix_tokens = 0`` there is
    no CLS token and it falls back to ``query="mean"``: the mean over the patch-query rows. Values are the
    raw rollout weights (prefix keys' share excluded, not renormalised).
    """
    r, (gh, gw), p, _ = _prepare(rollout, grid, num_prefix_tokens, None)
    if query not in ("cls", "mean"):
        raise UsageError(f"query must be 'cls' or 'mean', got {query!r}")
    if query == "cls" and p > 0:
        row = r[..., 0, p:]
    else:
        row = r[..., p:, p:].mean(-2)
    return row.reshape(*row.shape[:-1], gh, gw)

