"""U-centred linear Gram matrices: the per-batch terms of minibatch CKA, shared by extraction and analysis.

Minibatch CKA (Nguyen, Raghu & Kornblith 2021, Sec. 3.1) needs, per batch of m samples and per layer, only
the U-centred Gram ``K̃ᵤ`` (Székely & Rizzo 2014, Sec. 2) of the layer's features::

    CKA_mb(X, Y) = Σ_b ⟨K̃ᵤ, L̃ᵤ⟩_b / √(Σ_b ‖K̃ᵤ‖²_b · Σ_b ‖L̃ᵤ‖²_b)

:mod:`repsim.measures.cka_engine` forms these Grams from stored activations; ``repsim extract --grams`` forms the very
same ones while extracting and stores them (``grams/<layer>``, see :mod:`repsim.store`), so a CKA map between
two Gram stores needs no activations at all. Both call :func:`unbiased_gram`, so the two paths agree to the
float32 rounding of the stored Grams.

Numerics: features are up-cast (float16 → float32) and centred per column *before* the product, products in
float32 with TF32 off (or float64), U-centring in float64. A U-centred Gram has a zero diagonal and is
symmetric, so it is stored as its strict upper triangle (:func:`pack_triu`): ``⟨K̃, L̃⟩ = 2·⟨triu K̃, triu L̃⟩``.

Whole-set biased Grams (``H K H``, :func:`centred_feature_grams`, :func:`unit_centred_grams`) live here too: the
token ↔ input-patch CKA of :mod:`probes.localisation` multiplies stacks of them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from repsim.errors import NumericalError, UsageError

MIN_UNBIASED = 4  # the U-statistic divides by (m - 3): fewer than 4 samples is undefined
GRAM_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_gram_dtype(name: str) -> torch.dtype:
    """The torch dtype of a Gram-product precision name (``float32`` | ``float64``)."""
    if name not in GRAM_DTYPES:
        raise UsageError(f"gram_dtype must be float32 or float64, got {name!r}")
    return GRAM_DTYPES[name]


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise :class:`NumericalError` naming ``what`` and the first index when ``t`` holds a NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise NumericalError(f"non-finite value (NaN or Inf) in {what} at index {tuple(bad)}")


def from_numpy(x: np.ndarray) -> torch.Tensor:
    """Zero-copy where possible; read-only arrays (e.g. memory-mapped) are copied, torch needs writable memory."""
    x = np.ascontiguousarray(x)
    return torch.from_numpy(x if x.flags.writeable else x.copy())


def u_centre(gram: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """U-centre a symmetric (m, m) Gram in float64 (Székely–Rizzo 2014, Sec. 2), m ≥ 4.

    ``K̃ᵤ_ij = K_ij - r_i/(m-2) - r_j/(m-2) + s/((m-1)(m-2))`` off the diagonal (row sums ``r`` and total ``s``
    of K with zeroed diagonal), 0 on it. ``out``: optional float64 (m, m) buffer (may be a view into a
    preallocated stack) that receives the result.
    """
    m = gram.shape[0]
    if m < MIN_UNBIASED:
        raise UsageError(f"unbiased HSIC needs at least {MIN_UNBIASED} samples per batch, got {m}")
    if out is None:
        out = torch.empty((m, m), dtype=torch.float64, device=gram.device)
    k = out
    k.copy_(gram)
    # On the CPU the (m, m) steps run in numpy on the same memory: torch's thread pool costs more than these
    # small O(m²) operations (40 ms instead of 0.3 ms for m = 256 on a busy 2-core machine).
    lib, kk = (np, k.numpy()) if k.device.type == "cpu" else (torch, k)
    idx = lib.arange(m) if lib is np else torch.arange(m, device=k.device)
    kk[idx, idx] = 0.0
    means = kk.sum(0) / (m - 2)
    means -= means.sum() / (2 * (m - 1))
    kk -= means[:, None]
    kk -= means[None, :]
    kk[idx, idx] = 0.0
    return k


def unbiased_gram(
    features: torch.Tensor | np.ndarray,
    *,
    gram_dtype: str = "float32",
    what: str = "features",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """U-centred linear Gram of one batch, flattened: (m, ...) features → (m·m,) float64 on the features' device.

    The features are flattened per sample, up-cast (float16 → float32), centred per column, and only then
    multiplied (in ``gram_dtype``; call under TF32-off). ``what`` names the layer and batch in errors.
    ``out``: optional contiguous float64 (m·m,) buffer for the result (a row of a Gram stack).
    """
    dt = resolve_gram_dtype(gram_dtype)
    x = from_numpy(features) if isinstance(features, np.ndarray) else torch.as_tensor(features)
    x = x.reshape(x.shape[0], -1).to(dt)  # up-cast before any arithmetic
    m = x.shape[0]
    # The mean in the Gram dtype is enough: U-centring removes any constant shift exactly, so centring
    # only has to shrink a large common offset (X = 100 + 0.1·Z) before the products, to avoid cancellation.
    # (A product with a ones row computes it ~10x faster than a column reduction.)
    x = x - (torch.ones((1, m), dtype=x.dtype, device=x.device) @ x) / m
    g = x @ x.T
    # A NaN / Inf anywhere in x or in a product shows on the diagonal (|x_i·x_j| <= sqrt(g_ii g_jj)):
    # scanning m values instead of m·f keeps the check off the hot path; the full scan only names the culprit.
    if not bool(torch.isfinite(torch.diagonal(g)).all()):
        check_finite(x, what)
        check_finite(g, f"the Gram of {what}")
        raise NumericalError(f"non-finite Gram diagonal of {what}")
    g = (g + g.T) * 0.5  # float32 products are not bitwise symmetric
    view = None if out is None else out.view(m, m)
    return u_centre(g, out=view).reshape(-1)


def centred_feature_grams(feats: Sequence[Any], device: str | torch.device = "cpu") -> torch.Tensor:
    """Linear Grams ``X̃X̃ᵀ`` (K, n, n) float64 of K feature sets (n, d_k), each centred per column over its n rows
    first: ``X̃X̃ᵀ = H K H`` (Kornblith et al. 2019, Sec. 3, biased HSIC), centring before the product so that a
    large common offset cannot cancel (module docstring). Call under TF32-off."""
    out = []
    for f in feats:
        t = torch.as_tensor(np.asarray(f), dtype=torch.float64, device=device)
        t = t - t.mean(dim=0, keepdim=True)
        out.append(t @ t.T)
    return torch.stack(out)


def unit_centred_grams(grams: torch.Tensor, what: str, first: int = 0) -> torch.Tensor:
    """Double-centre each Gram of a stack (K, m, m) (``H K H``) and scale it to unit Frobenius norm: (K, m²)
    float64. Rows of two such stacks multiply to biased linear CKA, ``⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖)`` (Kornblith
    et al. 2019, Eq. 4-5). A zero or non-finite self-HSIC raises :class:`NumericalError` naming ``what`` and the
    set's index (``first`` + its place in the stack)."""
    g = grams - grams.mean(dim=-1, keepdim=True) - grams.mean(dim=-2, keepdim=True) \
        + grams.mean(dim=(-2, -1), keepdim=True)
    flat = g.reshape(g.shape[0], -1)
    nrm = torch.linalg.norm(flat, dim=1, keepdim=True)
    bad = ~torch.isfinite(nrm[:, 0]) | (nrm[:, 0] == 0)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise NumericalError(f"{what} {first + k}: self-HSIC is {float(nrm[k, 0]) ** 2} (constant across images?): "
                             "CKA is undefined")
    return flat / nrm


def packed_size(m: int) -> int:
    """Length m(m-1)/2 of a packed strict upper triangle of an (m, m) matrix."""
    return m * (m - 1) // 2


@functools.lru_cache(maxsize=8)
def _triu_flat(m: int, device: str) -> torch.Tensor:
    """Flat indices (row-major) of the strict upper triangle of an (m, m) matrix."""
    iu = torch.triu_indices(m, m, 1)
    return (iu[0] * m + iu[1]).to(device)


def pack_triu(gram: torch.Tensor, m: int) -> torch.Tensor:
    """Strict upper triangle (row-major) of an (m, m) matrix given flat (m·m,) or square: (m(m-1)/2,)."""
    return gram.reshape(-1)[_triu_flat(m, str(gram.device))]


def unpack_triu(packed: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_triu` for a zero-diagonal symmetric matrix: (m(m-1)/2,) → (m, m)."""
    out = torch.zeros((m, m), dtype=packed.dtype, device=packed.device)
    iu = torch.triu_indices(m, m, 1, device=packed.device)
    out[iu[0], iu[1]] = packed
    return out + out.T
