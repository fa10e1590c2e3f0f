"""Spatial-localisation probes: does token / map position p still represent *its own* input patch?

Raghu et al. 2021, "Do Vision Transformers See Like CNNs?", Sec. 7 (Fig. 9-11).

Token ↔ patch CKA (:func:`token_patch_cka`)
--------------------------------------------
For a token layer (n, T, D) the *positions* are the patch tokens after the ``num_prefix_tokens`` prefix
tokens, laid out row-major on the layer's recorded ``grid`` (gh, gw) (never guessed from sqrt(T)). For a map
layer (n, C, h, w) each spatial position's channel vector (C,) is a token and the grid is (h, w). The *input
patch* of grid cell (i, j) is the block of the saved preprocessed input (``inputs/pixels``, stored with
``repsim extract --save-inputs``) rows ``round(i·H/gh) … round((i+1)·H/gh)``, columns likewise: for a ViT
exactly its patch_size × patch_size patch, for a CNN the position's stride cell (H/h × W/w), not its full
receptive field. Patch features are the 3·ph·pw pixels, flattened.

``matrix[p, q]`` = linear CKA, *biased* (HSIC with the centring matrix H, as in Raghu et al.), across the n
images between the representation at position p (n × D) and the pixels of patch q (n × 3·ph·pw). It is
computed in float64 in the Gram form, ``⟨H K_p H, H L_q H⟩ / (‖H K_p H‖ ‖H L_q H‖)``, identical to
:func:`repsim.measures.cka_engine.cka` (``kernel="linear", debiased=False``) for every pair, but with one Gram per
position and one (P × n²)·(n² × Q) product instead of P·Q separate calls. Biased CKA is inflated when n is
not ≫ the feature dimension (every pair gets a positive floor), which is why the score below is a
*difference*; the estimator and n are recorded with every result.

Localisation score (per layer)::

    own   = mean_p CKA(p, p)
    other = mean_p mean_{q ≠ p} CKA(p, q)
    score = own − other                     (0: no preference for the own patch; a global vector scores
                                             exactly 0; larger: more localised)

plus ``argmax_fraction``: the fraction of positions p whose own patch is ``argmax_q CKA(p, q)``.

Position probe (:func:`position_probe`)
---------------------------------------
A linear classifier predicts each token's grid position index (0 … P−1, row-major) from its representation.
Images (not tokens) are split with a seeded permutation: the first ``1 − test_fraction`` (80 %) of the
images give the training tokens (of those, ``val_fraction`` of the images are the validation set that picks
the strength, then the probe is refit on train + val), the rest give the test tokens. Accuracy on the test
tokens; chance = 1 / P. Method ``ridge`` (:func:`probes.solvers.ridge_classify`, default, cheap) or ``logreg``
(:func:`probes.solvers.fit_logreg`).

:func:`localise` runs both on every token / map layer of a store and plots the score and the probe accuracy
against depth.

Per-token class probe (:func:`token_class_probe`)
-------------------------------------------------
Class accuracy of a linear probe (ridge by default) reading a *single* token — the centre patch token
(grid cell (gh // 2, gw // 2)) — against the CLS token (token layers with a prefix token only) and the mean of
the patch tokens, per layer: how much global (class) information each token carries (Raghu et al. Fig. 11).
Split: the stratified, seeded hold-out of :func:`probes.features.stratified_holdout` (test ``split`` of the
samples, validation ``val_fraction`` of the rest picks λ, then refit on train + val).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from repsim.measures.cka_engine import NumericalError
from repsim.devices import resolve_device, tf32_off
from repsim.errors import UsageError
from repsim.measures.gram import centred_feature_grams, unit_centred_grams
from repsim.results import Result, finish_result, jsonable, save_figure_atomic
from repsim.data.masks import cell_bounds
from repsim.store.format import layer_kind
from repsim.store.reader import check_layer_names, gather_rows

__all__ = [
    "DEFAULT_IMAGES",
    "LocalisationResult",
    "LocalisationRow",
    "PositionProbe",
    "TokenPatchCKA",
    "grid_positions",
    "layer_grid",
    "layer_tokens",
    "localisation_bootstrap",
    "localisation_interval",
    "plot_token_maps",
    "localisation_scores",
    "localise",
    "patch_pixels",
    "patch_token_cka_matrix",
    "position_probe",
    "token_patch_cka",
    "TokenClassProbe",
    "token_class_probe",
]

DEFAULT_IMAGES = 512  # images used by default: memory ~ 8·(P + Q)·n² bytes worst case is avoided (see below)
ESTIMATOR = "linear CKA, biased HSIC (centring matrix H), float64 Gram form"
SCORE_DEFINITION = ("score = mean_p CKA(p, own patch p) - mean_p mean_{q != p} CKA(p, q); "
                    "argmax_fraction = fraction of p with argmax_q CKA(p, q) == p")


# ----------------------------------------------------------------------------------------------------
# Geometry and reading
# ----------------------------------------------------------------------------------------------------


def layer_grid(info: dict[str, Any], layer: str) -> tuple[str, tuple[int, int], int]:
    """``(kind, (gh, gw), num_prefix_tokens)`` of a token or map layer; UsageError for anything else. (Not
    :func:`repsim.attention.statistics.grid_positions`, the (P, 2) cell coordinates of a grid.)"""
    kind = layer_kind(info, layer)
    shape = tuple(int(s) for s in info["shape"])
    if kind == "vector":
        raise UsageError(f"layer {layer!r} is a vector layer {shape}: it has no spatial positions to localise")
    if kind == "map":
        return kind, (shape[1], shape[2]), 0
    grid, npt = info.get("grid"), info.get("num_prefix_tokens")
    if grid is None or npt is None:
        raise UsageError(f"layer {layer!r} does not record its patch grid / number of prefix tokens, so token "
                         "positions are unknown; re-extract it with a model whose grid is known")
    gh, gw = (int(g) for g in grid)
    npt = int(npt)
    if shape[0] - npt != gh * gw:
        raise UsageError(f"layer {layer!r} has {shape[0]} tokens = {npt} prefix + {shape[0] - npt} patch tokens, "
                         f"which does not match its grid {gh}x{gw}")
    return kind, (gh, gw), npt


grid_positions = layer_grid  # the name this had first; kept for callers of the public API


def _select_images(store: Any, images: int | Sequence[int] | np.ndarray | None) -> np.ndarray:
    n = int(store.n)
    if images is None:
        return np.arange(min(n, DEFAULT_IMAGES), dtype=np.int64)
    if isinstance(images, (int, np.integer)):
        k = int(images)
        if k < 2:
            raise UsageError(f"images must be >= 2 (CKA needs at least 2 samples), got {k}")
        return np.arange(min(k, n), dtype=np.int64)  # store order is a seeded random permutation
    idx = np.unique(np.asarray(images, dtype=np.int64))
    if idx.size < 2 or idx[0] < 0 or idx[-1] >= n:
        raise UsageError(f"images must be >= 2 distinct row indices in [0, {n}), got {idx.size} "
                         f"in [{idx.min() if idx.size else ''}, {idx.max() if idx.size else ''}]")
    return idx


def _gather(store: Any, read: Any, rows: np.ndarray, what: str) -> np.ndarray:
    """Rows ``rows`` (sorted) of a store array through ``read(lo, hi)``, whole chunks at a time
    (:func:`repsim.store.reader.gather_rows`)."""
    chunk = max(int(getattr(store, "chunk_size", 0) or 256), 1)
    blocks = [b for _, b in gather_rows(read, rows, n=int(store.n), chunk_size=chunk, max_read_rows=chunk,
                                        what=what)]
    return np.concatenate(blocks, axis=0)  # ascending chunks of sorted rows: already in the order asked


def layer_tokens(store: Any, layer: str, rows: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Per-position representations of ``rows``: float32 (n, P, D) with P = gh·gw row-major, and the grid."""
    info = store.layer_info(layer)
    kind, grid, npt = layer_grid(info, layer)
    x = np.asarray(_gather(store, lambda a, b: store.read(layer, a, b), rows, f"{store.path}: layer {layer!r}"),
                   dtype=np.float32)
    if kind == "tokens":
        x = x[:, npt:, :]
    else:  # (n, C, h, w) -> (n, h·w, C)
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)
    if not np.isfinite(x).all():
        raise UsageError(f"layer {layer!r} of {store.path} holds non-finite activations")
    return np.ascontiguousarray(x), grid


# the cells of a grid on the input, shared with the object masks (repsim.data.masks)
_bounds = cell_bounds


def patch_pixels(inputs: np.ndarray, grid: tuple[int, int]) -> list[np.ndarray]:
    """Input patches of every grid cell (row-major): a list of P float32 arrays (n, 3·ph·pw).

    Cell (i, j) covers rows ``round(i·H/gh) … round((i+1)·H/gh)`` and the columns likewise (exactly the
    patch of a ViT, the stride cell of a CNN map position).
    """
    x = np.asarray(inputs, dtype=np.float32)
    n, _, H, W = x.shape
    gh, gw = grid
    if gh > H or gw > W:
        raise UsageError(f"grid {gh}x{gw} is finer than the saved input {H}x{W}")
    return [x[:, :, r0:r1, c0:c1].reshape(n, -1) for r0, r1 in _bounds(H, gh) for c0, c1 in _bounds(W, gw)]


def _read_inputs(store: Any, rows: np.ndarray) -> np.ndarray:
    if not getattr(store, "has_inputs", False):
        raise UsageError(f"{store.path} has no saved input pixels, which token-vs-patch localisation needs: "
                         "re-extract with `repsim extract --save-inputs`")
    return np.asarray(_gather(store, store.read_inputs, rows, f"{store.path}: inputs"), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# Array level
# ----------------------------------------------------------------------------------------------------


def _normalised_centred_grams(feats: Sequence[np.ndarray] | np.ndarray, dev: torch.device, what: str,
                              block: int = 16) -> torch.Tensor:
    """(K, n²) float64: for each feature set (n, d), vec(H X Xᵀ H) / ‖H X Xᵀ H‖_F (repsim.measures.gram), ``block`` n × n
    Grams at a time."""
    return torch.cat([unit_centred_grams(centred_feature_grams(feats[lo:lo + block], dev), what, lo)
                      for lo in range(0, len(feats), block)])


def patch_token_cka_matrix(tokens: np.ndarray, patches: Sequence[np.ndarray], *, positions: np.ndarray | None = None,
                           device: str | torch.device = "cpu") -> np.ndarray:
    """Biased linear CKA (float64) between tokens[:, p] (n, D) for p in ``positions`` (default all) and every
    patch q (n, d_q): (len(positions), Q). Equal to ``repsim.measures.cka_engine.cka(tokens[:, p], patches[q])``."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 3:
        raise UsageError(f"tokens must be (n, P, D), got shape {tokens.shape}")
    n = tokens.shape[0]
    if n < 2 or any(p.shape[0] != n for p in patches):
        raise UsageError(f"CKA needs the same n >= 2 images on both sides, got {n} and "
                         f"{sorted({p.shape[0] for p in patches})}")
    positions = np.arange(tokens.shape[1]) if positions is None else np.asarray(positions, dtype=np.int64)
    dev = resolve_device(device)
    with tf32_off(), torch.no_grad():
        L = _normalised_centred_grams(list(patches), dev, "input patch")
        K = _normalised_centred_grams([tokens[:, int(p)] for p in positions], dev, "token position")
        m = (K @ L.T).cpu().numpy()
    return m


def localisation_scores(matrix: np.ndarray, positions: np.ndarray | None = None) -> dict[str, float]:
    """``own``, ``other``, ``score = own − other`` and ``argmax_fraction`` of a (P', Q) token × patch matrix
    whose row k is position ``positions[k]`` (default k)."""
    m = np.asarray(matrix, dtype=np.float64)
    P, Q = m.shape
    if Q < 2:
        raise UsageError("a localisation score needs at least 2 grid positions")
    pos = np.arange(P) if positions is None else np.asarray(positions, dtype=np.int64)
    own = m[np.arange(P), pos]
    other = (m.sum(axis=1) - own) / (Q - 1)
    return {"own": float(own.mean()), "other": float(other.mean()), "score": float((own - other).mean()),
            "argmax_fraction": float(np.mean(np.argmax(m, axis=1) == pos))}


def localisation_bootstrap(tokens: np.ndarray, patches: Sequence[np.ndarray], *, positions: np.ndarray | None = None,
                           n_boot: int = 200, seed: int = 0, level: float = 0.95,
                           device: str | torch.device = "cpu") -> dict[str, Any]:
    """Percentile bootstrap over images of the localisation ``score`` (and ``own``, ``other``).

    Resample ``b`` draws n image indices with replacement from ``numpy.random.default_rng(seed)`` (the draw
    of :func:`repsim.measures.beyond_cka.bootstrap_interval`), and recomputes the token ↔ patch CKA matrix on
    those rows exactly as :func:`patch_token_cka_matrix` would (biased CKA; copies of an image are repeated
    rows, the usual bootstrap of a plug-in statistic), then :func:`localisation_scores`. Two calls with the
    same ``seed`` and n draw the same rows, so their ``samples`` are paired by image: the interval of a
    difference between two layers or two models on the same images is ``percentile(samples_a − samples_b)``.
    Returns ``score`` (all images), ``low``, ``high``, ``samples`` (n_boot,), ``level``, ``n``, ``n_boot``,
    ``seed``, ``method``.
    """
    tokens = np.asarray(tokens)
    n = tokens.shape[0]
    positions = np.arange(tokens.shape[1]) if positions is None else np.asarray(positions, dtype=np.int64)
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)
    samples = np.empty(int(n_boot), dtype=np.float64)
    with tf32_off(), torch.no_grad():
        K = centred_feature_grams([tokens[:, int(p)] for p in positions], dev)
        L = centred_feature_grams(list(patches), dev)
        observed = localisation_scores((unit_centred_grams(K, "token position")
                                        @ unit_centred_grams(L, "input patch").T).cpu().numpy(), positions)
        # A resample with repeated rows is the full set with multiplicities w (sum n). Its centred HSIC is
        # tr(M K M L) with M = W - w w'/n (W = diag w), and M K M = K o ww' - (u w' + w u')/n + c ww' with
        # u = w o (K w), c = w'K w / n², so <MKM, L> = <K, L o ww'> - 2 u'(L w)/n + c w'L w: one (P x n²)(n² x Q)
        # product per resample and no n x n gather. float32 (Grams of centred features; the scores need ~1e-4).
        K32 = K.to(torch.float32).reshape(len(K), -1)
        L32 = L.to(torch.float32).reshape(len(L), -1)
        K2, L2 = K32 * K32, L32 * L32

        def parts(g: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            gw = g.reshape(len(g), n, n) @ w  # (K, n) = K w
            return w[None, :] * gw, gw, (gw @ w) / (n * n)  # u, K w, c

        for b in range(int(n_boot)):
            idx = rng.integers(0, n, size=n)
            w = torch.as_tensor(np.bincount(idx, minlength=n), dtype=torch.float32, device=dev)
            ww = (w[:, None] * w[None, :]).reshape(-1)
            uk, kw, ck = parts(K32, w)
            ul, lw, cl = parts(L32, w)
            cross = K32 @ (L32 * ww[None, :]).T - 2.0 / n * (uk @ lw.T) + ck[:, None] * (lw @ w)[None, :]
            self_k = K2 @ ww - 2.0 / n * (uk * kw).sum(1) + ck * (kw @ w)
            self_l = L2 @ ww - 2.0 / n * (ul * lw).sum(1) + cl * (lw @ w)
            if bool((self_k <= 0).any()) or bool((self_l <= 0).any()):
                raise NumericalError("a bootstrap resample has zero self-HSIC (constant across its images)")
            m = cross / torch.sqrt(self_k[:, None] * self_l[None, :])
            samples[b] = localisation_scores(m.double().cpu().numpy(), positions)["score"]
    lo, hi = np.quantile(samples, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return {"score": observed["score"], "own": observed["own"], "other": observed["other"], "low": float(lo),
            "high": float(hi), "samples": samples, "level": float(level), "n": int(n), "n_boot": int(n_boot),
            "seed": int(seed), "method": "percentile bootstrap over images (rows drawn with replacement)"}


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------




def _store_info(store: Any) -> dict[str, Any]:
    attrs = getattr(store, "attrs", {}) or {}
    return {"path": str(store.path), "fingerprint": (attrs.get("dataset") or {}).get("fingerprint"),
            "model": (attrs.get("model") or {}).get("name"), "n": int(store.n)}


def _default_plot_positions(grid: tuple[int, int], positions: np.ndarray) -> list[int]:
    gh, gw = grid
    want = [0, gw - 1, (gh // 2) * gw + gw // 2, (gh - 1) * gw, gh * gw - 1]  # corners and centre
    have = set(int(p) for p in positions)
    out = [p for p in dict.fromkeys(want) if p in have]
    return out or [int(positions[0])]


@dataclass
class TokenPatchCKA(Result):
    """CKA between each position's representation and each input patch, for one layer.

    ``matrix`` (len(positions), gh·gw): row k is position ``positions[k]`` (row-major index on ``grid``),
    column q the input patch q. ``own``/``other``/``score``/``argmax_fraction``: see the module docstring.
    """

    result_kind: ClassVar[str] = "repsim.token_patch_cka"

    layer: str
    kind: str
    grid: list[int]
    patch_px: list[int]
    positions: list[int]
    matrix: np.ndarray
    own: float
    other: float
    score: float
    argmax_fraction: float
    n_images: int
    estimator: str = ESTIMATOR
    definition: str = SCORE_DEFINITION
    store: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def json_fields(self) -> dict[str, Any]:
        """The fields, with the layer's ``kind`` also as ``layer_kind`` (the JSON ``kind`` tags the result)."""
        return dict(super().json_fields(), layer_kind=self.kind)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
        """The layer kind from ``layer_kind``, the matrix as a float64 array."""
        return dict(fields, kind=raw["layer_kind"], matrix=np.asarray(fields["matrix"], dtype=np.float64))

    def map_for(self, p: int) -> np.ndarray:
        """CKA(p, ·) reshaped to the grid (gh, gw)."""
        if p not in self.positions:
            raise UsageError(f"position {p} was not computed (positions: {self.positions[:8]}...)")
        return np.asarray(self.matrix)[self.positions.index(p)].reshape(self.grid)

    def plot(self, path: str | os.PathLike | None = None, positions: Sequence[int] | None = None) -> Any:
        """Heat maps of CKA(p, ·) on the grid for a few token positions p (default: corners and centre), the
        position p outlined; one shared colour bar. Saved to ``path`` when given; returns the Figure."""
        return plot_token_maps({str((self.store or {}).get("model") or ""): self}, path, positions=positions)


def plot_token_maps(maps: "dict[str, TokenPatchCKA]", path: str | os.PathLike | None = None,
                    positions: Sequence[int] | None = None) -> Any:
    """Token ↔ patch CKA maps of several results (label → :class:`TokenPatchCKA`), one row each, on *one* colour
    scale (the range of all rows), so that rows compare by colour. Columns: the token positions (default
    corners and centre), each outlined in red. Returns the Figure; saved to ``path`` when given."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    items = list(maps.items())
    first = items[0][1]
    gh, gw = first.grid
    ps = list(positions) if positions is not None else _default_plot_positions((gh, gw), np.asarray(first.positions))
    fig = Figure(figsize=(2.3 * len(ps) + 1.6, 2.5 * len(items) + 0.8), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(items), len(ps), squeeze=False))
    vmin = min(float(np.min(r.matrix)) for _, r in items)
    vmax = max(float(np.max(r.matrix)) for _, r in items)
    im = None
    for row, (label, res) in enumerate(items):
        for ax, p in zip(axes[row], ps):
            im = ax.imshow(res.map_for(int(p)), vmin=vmin, vmax=vmax, cmap="viridis", interpolation="nearest")
            i, j = divmod(int(p), res.grid[1])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
            ax.set_title(f"token ({i}, {j})", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(f"{label} {res.layer}\nscore {res.score:.3f}\nown patch is max: "
                                f"{100 * res.argmax_fraction:.0f}%", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.85, label="CKA(token, input patch), one scale for all rows")
    fig.suptitle(f"CKA between one token and every input patch (red: the token's own patch); biased linear CKA "
                 f"over n = {first.n_images} images", fontsize=9)
    if path is not None:
        save_figure_atomic(fig, path, dpi=150)
    return fig


def localisation_interval(store: Any, layer: str, *, images: int | Sequence[int] | None = None, n_boot: int = 200,
                          seed: int = 0, level: float = 0.95, device: str = "cpu") -> dict[str, Any]:
    """:func:`localisation_bootstrap` of one layer of a store (the images of :func:`token_patch_cka`)."""
    rows = _select_images(store, images)
    tokens, grid = layer_tokens(store, layer, rows)
    patches = patch_pixels(_read_inputs(store, rows), grid)
    out = localisation_bootstrap(tokens, patches, n_boot=n_boot, seed=seed, level=level, device=device)
    out["layer"] = layer
    return out


def token_patch_cka(store: Any, layer: str, *, images: int | Sequence[int] | None = None,
                    max_positions: int | None = None, device: str = "cpu", _inputs: np.ndarray | None = None,
                    _rows: np.ndarray | None = None,
                    _tokens: tuple[np.ndarray, tuple[int, int]] | None = None) -> TokenPatchCKA:
    """Token ↔ input-patch CKA of one token or map layer (module docstring); needs ``--save-inputs``.

    ``images``: how many of the first rows (store order is a seeded random permutation), or explicit row
    indices; default the first :data:`DEFAULT_IMAGES`. ``max_positions``: compute the rows of at most that
    many positions p (evenly spaced in row-major order, all Q patches as columns). Cost: one n × n Gram per
    position and patch, (P' + Q)·n²·8 bytes.
    """
    t0 = time.perf_counter()
    info = store.layer_info(layer)
    kind, grid, _ = layer_grid(info, layer)
    if not getattr(store, "has_inputs", False):
        _read_inputs(store, np.zeros(0, dtype=np.int64))  # raises the UsageError naming --save-inputs
    rows = _select_images(store, images) if _rows is None else _rows
    inputs = _read_inputs(store, rows) if _inputs is None else _inputs
    tokens, grid = layer_tokens(store, layer, rows) if _tokens is None else _tokens
    P = grid[0] * grid[1]
    if max_positions is not None and max_positions < P:
        if max_positions < 1:
            raise UsageError(f"max_positions must be >= 1, got {max_positions}")
        positions = np.unique(np.linspace(0, P - 1, int(max_positions)).round().astype(np.int64))
    else:
        positions = np.arange(P, dtype=np.int64)
    patches = patch_pixels(inputs, grid)
    m = patch_token_cka_matrix(tokens, patches, positions=positions, device=device)
    s = localisation_scores(m, positions)
    H, W = inputs.shape[2:]
    return TokenPatchCKA(layer=layer, kind=kind, grid=list(grid), patch_px=[H / grid[0], W / grid[1]],
                         positions=[int(p) for p in positions], matrix=m, n_images=int(rows.size),
                         store=_store_info(store), seconds=time.perf_counter() - t0, **s)


# ----------------------------------------------------------------------------------------------------
# Position probe
# ----------------------------------------------------------------------------------------------------


@dataclass
class PositionProbe(Result):
    """Linear read-out of the grid position index from single tokens of one layer."""

    result_kind: ClassVar[str] = "repsim.position_probe"

    layer: str
    accuracy: float
    train_accuracy: float
    chance: float
    n_positions: int
    n_train_images: int
    n_val_images: int
    n_test_images: int
    method: str
    lam: float
    seed: int
    seconds: float = 0.0
    #: 95 % percentile bootstrap over the test *images* (tokens of one image are not independent)
    accuracy_low: float | None = None
    accuracy_high: float | None = None
    #: accuracy over each test image's P tokens, in test-row order (pairs two layers or models on the same split)
    image_accuracy: list[float] = field(default_factory=list)


def _image_split(n: int, test_fraction: float, val_fraction: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not 0.0 < test_fraction < 1.0 or not 0.0 < val_fraction < 1.0:
        raise UsageError("test_fraction and val_fraction must be in (0, 1)")
    perm = np.random.default_rng([int(seed), 2]).permutation(n)
    n_test = int(round(test_fraction * n))
    n_fit = n - n_test
    n_val = int(round(val_fraction * n_fit))
    if n_test < 1 or n_val < 1 or n_fit - n_val < 1:
        raise UsageError(f"{n} images are too few for a train / validation / test split of the images")
    return np.sort(perm[: n_fit - n_val]), np.sort(perm[n_fit - n_val: n_fit]), np.sort(perm[n_fit:])


def position_probe(store: Any, layer: str, *, images: int | Sequence[int] | None = None, method: str = "ridge",
                   test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 0,
                   lambdas: Sequence[float] | None = None, device: str = "auto",
                   _tokens: tuple[np.ndarray, tuple[int, int]] | None = None) -> PositionProbe:
    """Test accuracy of a linear classifier predicting each token's grid position (0 … P−1) from its
    representation (module docstring). Images, not tokens, are split (seeded): a test image's tokens are
    never seen in training. Does not need saved inputs."""
    from probes.solvers import DEFAULT_LAMBDAS, accuracy_scores, fit_logreg, ridge_classify

    if method not in ("ridge", "logreg"):
        raise UsageError(f"method must be ridge or logreg, got {method!r}")
    t0 = time.perf_counter()
    if _tokens is None:
        _tokens = layer_tokens(store, layer, _select_images(store, images))
    tokens, grid = _tokens
    n, P, D = tokens.shape
    if P < 2:
        raise UsageError(f"layer {layer!r} has a single grid position: nothing to predict")
    tr, va, te = _image_split(n, test_fraction, val_fraction, seed)

    def flat(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tokens[idx].reshape(-1, D), np.tile(np.arange(P, dtype=np.int64), idx.size)

    (Xtr, ytr), (Xv, yv), (Xte, yte) = flat(tr), flat(va), flat(te)
    lam = np.asarray(DEFAULT_LAMBDAS if lambdas is None else lambdas, dtype=np.float64)
    dev = resolve_device(device)
    if method == "ridge":
        fit = ridge_classify(Xtr, ytr, Xv, yv, lam, refit=True, device=dev)
    else:
        fit = fit_logreg(Xtr, ytr, Xv, yv, lam, refit=True, device=dev)
    from repsim.measures.intervals import bootstrap_mean

    pred = np.asarray(fit.predict(Xte))
    acc = accuracy_scores(yte, pred)[0]
    per_image = (pred.reshape(te.size, P) == yte.reshape(te.size, P)).mean(axis=1)
    ci = bootstrap_mean(per_image, seed=seed)
    train_acc = accuracy_scores(np.concatenate([ytr, yv]), fit.predict(np.concatenate([Xtr, Xv])))[0]
    return PositionProbe(layer=layer, accuracy=float(acc), train_accuracy=float(train_acc), chance=1.0 / P,
                         n_positions=P, n_train_images=int(tr.size), n_val_images=int(va.size),
                         n_test_images=int(te.size), method=method, lam=float(fit.lam), seed=int(seed),
                         seconds=time.perf_counter() - t0, accuracy_low=ci["low"], accuracy_high=ci["high"],
                         image_accuracy=[float(v) for v in per_image])


# ----------------------------------------------------------------------------------------------------
# Multi-layer driver
# ----------------------------------------------------------------------------------------------------


@dataclass
class LocalisationRow:
    layer: str
    kind: str
    grid: list[int]
    score: float | None
    own: float | None
    other: float | None
    argmax_fraction: float | None
    position_accuracy: float | None
    position_chance: float | None
    position_accuracy_low: float | None = None  # 95 % bootstrap interval over the test images
    position_accuracy_high: float | None = None


@dataclass
class LocalisationResult(Result):
    """Localisation score (and position-probe accuracy) per layer, in network order; ``maps`` keeps each
    layer's :class:`TokenPatchCKA` (not written by :meth:`to_json` unless ``with_maps``)."""

    result_kind: ClassVar[str] = "repsim.localize"

    rows: list[LocalisationRow]
    protocol: dict[str, Any]
    store: dict[str, Any]
    seconds: float
    maps: dict[str, TokenPatchCKA] = field(default_factory=dict)
    probes: dict[str, PositionProbe] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return [r.layer for r in self.rows]

    @property
    def scores(self) -> np.ndarray:
        return np.array([np.nan if r.score is None else r.score for r in self.rows])

    def summary(self) -> str:
        lines = [f"{'layer':<28} {'grid':>7} {'score':>7} {'own':>6} {'other':>6} {'argmax%':>8} {'pos%':>6}"]
        for r in self.rows:
            f = lambda v, s=1.0, w=6, p=3: (" " * w if v is None else f"{s * v:>{w}.{p}f}")  # noqa: E731
            lines.append(f"{r.layer[-28:]:<28} {'x'.join(map(str, r.grid)):>7} {f(r.score, w=7)} {f(r.own)} "
                         f"{f(r.other)} {f(r.argmax_fraction, 100, 8, 1)} {f(r.position_accuracy, 100, 6, 1)}")
        return "\n".join(lines)

    def to_json(self, path: str | os.PathLike | None = None, *, with_maps: bool = False) -> dict[str, Any]:
        """JSON-ready dict (kind ``repsim.localize``); written atomically to ``path`` when given."""
        d = {"rows": [asdict(r) for r in self.rows], "protocol": self.protocol, "store": self.store,
             "seconds": self.seconds, "probes": {k: v.to_json() for k, v in self.probes.items()}}
        if with_maps:
            d["maps"] = {k: v.to_json() for k, v in self.maps.items()}
        return finish_result(jsonable(d), self.result_kind, path)

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """Localisation score (left) and position-probe accuracy with chance (right) against depth; saved to
        ``path`` when given; returns the Figure."""
        from matplotlib.figure import Figure

        from repsim.plotting.cka_map import short_layer_names

        x = np.arange(len(self.rows))
        fig = Figure(figsize=(min(5 + 0.5 * len(x), 16), 3.8))
        ax1, ax2 = fig.subplots(1, 2)
        sc = [np.nan if r.score is None else r.score for r in self.rows]
        am = [np.nan if r.argmax_fraction is None else r.argmax_fraction for r in self.rows]
        ax1.plot(x, sc, marker="o", label="own − other CKA")
        ax1.set_ylabel("localisation score")
        ax1b = ax1.twinx()
        ax1b.plot(x, am, marker="s", ls="--", color="C1", label="own patch is argmax")
        ax1b.set_ylabel("fraction of positions")
        ax1b.set_ylim(-0.02, 1.02)
        ax1.axhline(0, color="0.5", lw=0.8, ls=":")
        ax1.set_title(f"token ↔ input-patch CKA (n = {self.protocol.get('n_images')})", fontsize=10)
        h1, l1 = ax1.get_legend_handles_labels()
        h2, l2 = ax1b.get_legend_handles_labels()
        ax1.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")
        pa = [np.nan if r.position_accuracy is None else 100 * r.position_accuracy for r in self.rows]
        ch = [np.nan if r.position_chance is None else 100 * r.position_chance for r in self.rows]
        ax2.plot(x, pa, marker="o", color="C2", label="position probe (test)")
        ax2.plot(x, ch, ls=":", color="0.5", label="chance (1/P)")
        ax2.set_ylim(-1, 101)
        ax2.set_ylabel("accuracy (%)")
        ax2.set_title("linear position probe", fontsize=10)
        ax2.legend(fontsize=8, loc="best")
        names = short_layer_names(self.layers)
        for ax in (ax1, ax2):
            ax.set_xticks(x)
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
            ax.set_xlabel("layer (network order)")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        if path is not None:
            save_figure_atomic(fig, path, dpi=150)
        return fig


def _positioned_layers(store: Any, layers: Sequence[str] | str | None, purpose: str) -> list[str]:
    """The layers that localisation, the token class probe and the foreground probe read, in the order given:
    by default the store's token / map layers whose token positions are known (vector layers and unknown grids
    skipped; none is an error naming ``purpose``); named ``layers`` must be in the store and have positions."""
    if layers is None:
        chosen = []
        for lay in store.layers:
            try:
                layer_grid(store.layer_info(lay), lay)
            except UsageError:
                continue
            chosen.append(lay)
        if not chosen:
            raise UsageError(f"{store.path} has no token or map layer with known positions {purpose}")
        return chosen
    chosen = [layers] if isinstance(layers, str) else list(layers)
    check_layer_names(store.path, store.layers, chosen)
    for lay in chosen:
        layer_grid(store.layer_info(lay), lay)  # raises for vector layers / unknown grids
    return chosen


def localise(store: Any, layers: Sequence[str] | None = None, *, images: int | Sequence[int] | None = None,
             max_positions: int | None = None, cka: bool = True, position: bool = True, method: str = "ridge",
             seed: int = 0, device: str = "auto", keep_maps: bool = True, progress: bool = False
             ) -> LocalisationResult:
    """Localisation score (token ↔ patch CKA) and position-probe accuracy for every selected layer.

    ``layers``: default every token / map layer with known positions (vector layers skipped); an explicitly
    named layer without positions is an error. ``cka=False`` skips the CKA part (then saved inputs are not
    needed); ``position=False`` skips the probe. Other arguments as in :func:`token_patch_cka` and
    :func:`position_probe`.
    """
    t0 = time.perf_counter()
    if hasattr(store, "require_complete"):
        store.require_complete()  # an unfinished or damaged store: one UsageError, never numbers that change later
    chosen = _positioned_layers(store, layers, "to localise")
    if layers is not None:  # rows in network order, each layer once
        order = {lay: i for i, lay in enumerate(store.layers)}
        chosen = sorted(dict.fromkeys(chosen), key=order.__getitem__)
    if not (cka or position):
        raise UsageError("nothing to do: both cka and position are off")
    if cka and not getattr(store, "has_inputs", False):
        _read_inputs(store, np.zeros(0, dtype=np.int64))
    rows_idx = _select_images(store, images)
    inputs = _read_inputs(store, rows_idx) if cka else None
    from tqdm.auto import tqdm

    rows, maps, probes_ = [], {}, {}
    for lay in tqdm(chosen, desc="localise", unit="layer", disable=not progress):
        toks = layer_tokens(store, lay, rows_idx)
        kind, grid, _ = layer_grid(store.layer_info(lay), lay)
        tp = pp = None
        if cka:
            tp = token_patch_cka(store, lay, max_positions=max_positions, device=device, _inputs=inputs,
                                 _rows=rows_idx, _tokens=toks)
            if keep_maps:
                maps[lay] = tp
        if position:
            pp = position_probe(store, lay, method=method, seed=seed, device=device, _tokens=toks)
            probes_[lay] = pp
        rows.append(LocalisationRow(layer=lay, kind=kind, grid=list(grid), score=tp and tp.score, own=tp and tp.own,
                                other=tp and tp.other, argmax_fraction=tp and tp.argmax_fraction,
                                position_accuracy=pp and pp.accuracy, position_chance=pp and pp.chance,
                                position_accuracy_low=pp and pp.accuracy_low,
                                position_accuracy_high=pp and pp.accuracy_high))
    protocol = {"n_images": int(rows_idx.size), "images": "first rows (store order is a seeded permutation)"
                if images is None or isinstance(images, (int, np.integer)) else "explicit rows",
                "max_positions": max_positions, "estimator": ESTIMATOR if cka else None,
                "definition": SCORE_DEFINITION if cka else None,
                "position_probe": {"method": method, "seed": seed, "test_fraction": 0.2, "val_fraction": 0.2,
                                   "split": "images, seeded numpy default_rng([seed, 2]) permutation"}
                if position else None}
    return LocalisationResult(rows=rows, protocol=protocol, store=_store_info(store), seconds=time.perf_counter() - t0,
                          maps=maps, probes=probes_)


# ----------------------------------------------------------------------------------------------------
# Per-token class probe
# ----------------------------------------------------------------------------------------------------

# which single token (or the patch-token mean) a class probe reads; not repsim.measures.cka_engine.TOKEN_MODES, which
# says how a whole token layer becomes one CKA feature row (flatten | mean | cls)
TOKEN_READOUTS = ("centre", "cls", "mean")


@dataclass
class TokenClassProbe(Result):
    """Test class accuracy per layer and token read-out (``centre`` | ``cls`` | ``mean``); None where a
    read-out does not apply (``cls`` of a map or of a token layer without prefix tokens)."""

    result_kind: ClassVar[str] = "repsim.token_class_probe"

    layers: list[str]
    accuracy: dict[str, list[float | None]]
    chance: float
    protocol: dict[str, Any]
    store: dict[str, Any]
    seconds: float = 0.0

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """Accuracy (%) against depth, one curve per token read-out, chance dotted; returns the Figure."""
        from matplotlib.figure import Figure

        from repsim.plotting.cka_map import short_layer_names

        x = np.arange(len(self.layers))
        fig = Figure(figsize=(min(4 + 0.4 * len(x), 14), 4.0), layout="constrained")
        ax = fig.subplots()
        for k, (mode, acc) in enumerate(self.accuracy.items()):
            y = [np.nan if a is None else 100 * a for a in acc]
            if not np.all(np.isnan(y)):
                ax.plot(x, y, marker="o", color=f"C{k}", label=f"{mode} token" if mode != "mean" else "token mean")
        ax.axhline(100 * self.chance, ls=":", color="0.5", label="chance")
        ax.set_xticks(x)
        ax.set_xticklabels(short_layer_names(self.layers), rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("test class accuracy (%)")
        ax.set_ylim(-1, 101)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"class probe from one token ({self.protocol.get('method')}, n_test = "
                     f"{self.protocol.get('n_test')})", fontsize=10)
        if path is not None:
            save_figure_atomic(fig, path, dpi=150)
        return fig


def _token_readouts(store: Any, layer: str) -> dict[str, np.ndarray | None]:
    """float32 (n, D) per read-out, read chunk by chunk (never n × T × D at once)."""
    info = store.layer_info(layer)
    kind, (gh, gw), npt = layer_grid(info, layer)
    centre = (gh // 2) * gw + gw // 2
    n, cs = int(store.n), max(int(getattr(store, "chunk_size", 0) or 256), 1)
    out: dict[str, list[np.ndarray]] = {m: [] for m in TOKEN_READOUTS}
    for lo in range(0, n, cs):
        x = np.asarray(store.read(layer, lo, min(lo + cs, n)), dtype=np.float32)
        if kind == "map":
            x = x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)
        patch = x[:, npt:]
        out["centre"].append(patch[:, centre])
        out["mean"].append(patch.mean(axis=1))
        if kind == "tokens" and npt > 0:
            out["cls"].append(x[:, 0])
    return {m: (np.concatenate(v) if v else None) for m, v in out.items()}


def token_class_probe(store: Any, layers: Sequence[str] | None = None, *, method: str = "ridge",
                      split: float = 0.2, val_fraction: float = 0.2, seed: int = 0,
                      lambdas: Sequence[float] | None = None, device: str = "auto") -> TokenClassProbe:
    """Class accuracy from the centre token vs the CLS token vs the patch-token mean, per layer (module
    docstring). Needs labels."""
    from probes.features import check_labels, stratified_holdout
    from probes.solvers import DEFAULT_LAMBDAS, accuracy_scores, fit_logreg, ridge_classify

    if method not in ("ridge", "logreg"):
        raise UsageError(f"method must be ridge or logreg, got {method!r}")
    t0 = time.perf_counter()
    y = check_labels(store)
    chosen = _positioned_layers(store, layers, "to probe")
    keep, test = stratified_holdout(y, split, seed, 0)
    tr_rel, va_rel = stratified_holdout(y[keep], val_fraction, seed, 1)
    tr, va = keep[tr_rel], keep[va_rel]
    lam = np.asarray(DEFAULT_LAMBDAS if lambdas is None else lambdas, dtype=np.float64)
    dev = resolve_device(device)
    acc: dict[str, list[float | None]] = {m: [] for m in TOKEN_READOUTS}
    for lay in chosen:
        feats = _token_readouts(store, lay)
        for mode in TOKEN_READOUTS:
            X = feats[mode]
            if X is None:
                acc[mode].append(None)
                continue
            fitter = ridge_classify if method == "ridge" else fit_logreg
            fit = fitter(X[tr], y[tr], X[va], y[va], lam, refit=True, device=dev)
            acc[mode].append(float(accuracy_scores(y[test], fit.predict(X[test]))[0]))
    protocol = {"method": method, "split": split, "val_fraction": val_fraction, "seed": seed,
                "n_train": int(tr.size), "n_val": int(va.size), "n_test": int(test.size),
                "centre": "grid cell (gh // 2, gw // 2)", "mean": "mean of the patch tokens (prefix excluded)",
                "split_rule": "per-class stratified, seeded (probes.features.stratified_holdout streams 0, 1)"}
    return TokenClassProbe(layers=chosen, accuracy=acc, chance=1.0 / np.unique(y).size, protocol=protocol,
                           store=_store_info(store), seconds=time.perf_counter() - t0)
