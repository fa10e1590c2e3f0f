"""Attention as segmentation: does a head's attention map cover the object? (``repsim attention --segmentation``)

Caron et al. 2021 ("Emerging Properties in Self-Supervised Vision Transformers", DINO, Sec. 4.2.1 and Fig. 3)
showed that the last-layer CLS attention of self-supervised ViTs segments the object; Walmer et al. 2023
("Teaching Matters") compare this across supervision; Peruzzo et al. 2022 ("Spatial Entropy as an Inductive
Bias for Vision Transformers") measure how blob-like a map is. This module scores every head of every global
attention layer of a store against ground-truth object masks.

Query map
---------
Per image and head, the *query map* ``a`` (gh·gw patch weights, summing to 1) is the CLS query's attention over
the patch keys, renormalised over them (prefix keys dropped: the first prefix token is the class token in timm,
Hugging Face and torchvision ViTs), or, for a model without prefix tokens (a GAP ViT, LeViT) or whose prefix
tokens are registers only (timm ``vit_*_reg4_gap``: ``class_token`` False in the capture's layer record), the mean
over the patch queries of their rows (each a distribution over the patch keys). Extraction with ``--attention`` stores
it for every image (``attn/<layer>/query_map``, :mod:`repsim.store`; :func:`query_maps`); windowed layers (Swin,
Twins local attention) have no query that sees the whole image and are skipped, and so are stores written
before query maps existed (re-extract with ``--attention``).

Thresholded attention (DINO's mass rule)
----------------------------------------
DINO keeps "the top 60% of the mass" (``visualize_attention.py``: sort the normalised map, keep the patches
whose cumulative mass from the top reaches 0.6). :func:`mass_threshold` keeps the smallest *superlevel set*
``{p : a_p ≥ t}`` of the map whose mass is at least ``mass`` (default :data:`MASS` = 0.6): the ``k`` largest
weights, ``k`` the smallest count whose sum reaches ``mass``, plus every patch tied with the ``k``-th. Without
ties this is exactly DINO's set; with ties at the boundary DINO keeps an arbitrary subset (its sort order), this
keeps all of them, so the result never depends on patch order: ``[0.4, 0.2, 0.2, 0.2]`` keeps all four (DINO:
0.4 and one or two of the 0.2s), and a uniform map keeps every patch (exactly the all-foreground prediction).
Sums within :data:`MASS_TOLERANCE` of ``mass`` reach it (float rounding: 0.1 + 0.2 + 0.3 ≠ 0.6 in floating point).

Ground truth and Jaccard
------------------------
Masks come from :mod:`repsim.data.masks` (re-rendered ``shapes`` masks, or a folder of PNGs) in model-input
coordinates; a patch is foreground when more than half of its pixels are on the object
(:data:`repsim.data.masks.FOREGROUND_THRESHOLD`, the foreground probe's rule). Per image, the Jaccard index
``|A ∩ M| / |A ∪ M|`` of the kept patches ``A`` and the foreground patches ``M``. Images without a foreground
patch on the layer's grid have no defined Jaccard and are left out (``n_scored``). The reference is the
*all-foreground* prediction (``A`` = every patch, Jaccard ``|M| / (gh·gw)``), a score any map reaches by
spreading out. Means over images come with 95 % percentile bootstrap intervals over images
(:func:`repsim.measures.intervals.bootstrap_mean`), the gain over the reference with a paired one; a head is "above the
reference" only when the gain's interval excludes 0 (:func:`repsim.measures.intervals.verdict`).

The *best head* (highest mean gain over the reference, paired by image, over all layers and heads) is selected
on the same images it is scored on, which favours it (winner's curse); ``best_held_out`` therefore also selects
the best head on the even rows and scores it on the odd rows, with its own intervals. The gain, not the raw
Jaccard, ranks heads because the reference depends on the grid: on a coarse grid the all-foreground prediction
already scores higher, so raw Jaccard would favour coarse layers of a model whose layers differ in grid.

Spatial entropy (Peruzzo et al. 2022, Sec. 3)
---------------------------------------------
For a map ``a`` on the gh × gw grid with mean ``ā``: the *blob* pixels ``B = {p : a_p > ā}``, split into
connected components ``C_1 … C_m`` with 8-connectivity (diagonal neighbours join: ``scipy.ndimage.label`` with a
3 × 3 structuring element), weighted by their excess over the mean, ``P(C_j) = Σ_{p ∈ C_j} (a_p − ā) /
Σ_{p ∈ B} (a_p − ā)``, and ``SE(a) = −Σ_j P(C_j) log P(C_j)`` (nats). This is the paper's definition as its
authors implement it (``BlobLoss`` in github.com/helia95/SAR, ``attention_losses.py``: ``B_mask = x > mean``,
OpenCV 8-connected components, ``p = Σ relu(x − mean)`` per component over the total); one blob gives 0, ``m``
equal blobs ``log m``. A map with no patch above its mean (uniform) has no blob and no defined entropy (NaN,
left out of the means, ``n_entropy`` counts the others); excesses below :data:`ENTROPY_TOLERANCE` · ``ā`` are
float rounding of a flat map, not blobs. The paper's own number is for the last layer's CLS map of supervised
vs. self-supervised ViTs; lower means more object-like (fewer, more concentrated blobs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from repsim.attention.statistics import _as_float, _grid, _prefix, _renormalised_patch_block, class_attention_statistics
from repsim.errors import UsageError
from repsim.measures.intervals import LEVEL, bootstrap_mean, ci_text, verdict
from repsim.results import Result, save_figure_atomic
from repsim.data.masks import FOREGROUND_THRESHOLD, patch_foreground, store_input_masks, token_iou

__all__ = [
    "ENTROPY_TOLERANCE",
    "MASS",
    "MASS_TOLERANCE",
    "AttentionSegmentation",
    "HeadSegmentation",
    "LayerSegmentation",
    "attention_segmentation",
    "mass_threshold",
    "plot_attention_segmentation",
    "query_map_kind",
    "query_maps",
    "spatial_entropy",
]

MASS = 0.6
"""Fraction of the attention mass the thresholded map keeps (DINO, Caron et al. 2021 Sec. 4.2.1 / Fig. 3)."""

MASS_TOLERANCE = 1e-9
"""A cumulative mass within this (absolute) of ``mass`` reaches it: float rounding, not a real shortfall."""

ENTROPY_TOLERANCE = 1e-6
"""Excesses over the map's mean below this fraction of the mean are not blob pixels (float rounding of a flat
map, whose float32 weights differ in the last bit)."""

N_BOOT = 1000
OVERLAY_HEADS = 3
OVERLAY_IMAGES = 4

DEFINITIONS = {
    "query_map": "cls: the CLS query's attention over the patch keys, renormalised over them; mean: the mean over "
                 "the patch queries of their patch-key rows (models without prefix tokens)",
    "mass_threshold": "the smallest superlevel set {a >= t} of the query map holding at least `mass` of its "
                      "weight (DINO's rule; ties at the threshold all kept)",
    "foreground_patch": f"more than {FOREGROUND_THRESHOLD:.0%} of the patch's input pixels on the object mask",
    "jaccard": "|kept ∩ foreground| / |kept ∪ foreground| per image; mean over images with >= 1 foreground patch",
    "all_foreground_jaccard": "Jaccard of keeping every patch (= foreground share of the grid): the reference",
    "gain": "jaccard - all_foreground_jaccard, paired by image",
    "spatial_entropy": "Peruzzo et al. 2022 Sec. 3: entropy (nats) of the mass (excess over the map's mean) of the "
                       "8-connected components of {a > mean(a)}; NaN for a map with nothing above its mean",
    "interval": f"{LEVEL:.0%} percentile bootstrap over images (repsim.measures.intervals.bootstrap_mean)",
}


# ----------------------------------------------------------------------------------------------------
# Per-map math
# ----------------------------------------------------------------------------------------------------


def query_map_kind(num_prefix_tokens: int, class_token: bool | None = None) -> str:
    """``"cls"`` when the layer has prefix tokens and the first is a class token (``class_token`` True, or None:
    not recorded, the case of every ViT family with prefix tokens but register-only ones), else ``"mean"``."""
    return "cls" if int(num_prefix_tokens) > 0 and class_token is not False else "mean"


def query_maps(attn: Any, grid: tuple[int, int], num_prefix_tokens: int, class_token: bool | None = None
               ) -> torch.Tensor:
    """Query map of every image and head (module docstring): shape ``attn.shape[:-2] + (gh·gw,)``, rows summing
    to 1 (0 where the query puts nothing on patch keys).

    ``attn`` (..., Nq, p + gh·gw): probabilities over ``p = num_prefix_tokens`` prefix keys and the patch keys,
    row-major on ``grid`` (the queries may lie on another grid, e.g. LeViT's subsampling attention). With
    ``p > 0`` the row of query 0 (the class token), its patch part renormalised; with ``p = 0``, or prefix tokens
    that are registers only (``class_token=False``), the mean of the patch-query rows, each renormalised over the
    patch keys (:func:`query_map_kind`). Computed in float32 (float64 stays).
    """
    a = _as_float(attn, "attn")
    gh, gw = _grid(grid)
    p = _prefix(num_prefix_tokens)
    if a.ndim < 2 or a.shape[-1] != p + gh * gw or a.shape[-2] <= p:
        raise UsageError(f"attention must have shape (..., queries, {p} + {gh}x{gw} keys) with at least one patch "
                         f"query, got {tuple(a.shape)}")
    if query_map_kind(p, class_token) == "cls":
        return class_attention_statistics(a[..., :1, :], (gh, gw), p)["cls_map"].flatten(-2)
    return _renormalised_patch_block(a, p).mean(-2)


def mass_threshold(maps: Any, mass: float = MASS) -> np.ndarray:
    """Kept patches, bool of ``maps``' shape: per map (last axis), the smallest superlevel set ``{a ≥ t}`` whose
    weight is at least ``mass`` of the map's total (DINO's rule, ties kept; module docstring).

    ``maps`` (..., P) non-negative weights with a positive sum (any scale: each map is normalised first).
    """
    if isinstance(mass, bool) or not isinstance(mass, (int, float, np.floating)) or not 0.0 < float(mass) <= 1.0:
        raise UsageError(f"mass must be a fraction in (0, 1], got {mass!r}")
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim < 1 or m.shape[-1] < 1:
        raise UsageError(f"maps must have shape (..., patches), got {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any():
        raise UsageError("attention maps must hold finite, non-negative weights")
    total = m.sum(-1, keepdims=True)
    if (total <= 0).any():
        raise UsageError("an attention map has no weight on the patches: nothing to threshold")
    w = m / total
    ranked = -np.sort(-w, axis=-1)  # descending
    reached = np.cumsum(ranked, axis=-1) >= float(mass) - MASS_TOLERANCE
    k = reached.argmax(axis=-1)  # the last entry is 1 >= mass, so some index reaches it
    threshold = np.take_along_axis(ranked, k[..., None], axis=-1)
    return w >= threshold


def _blobs(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(spatial entropy, component count) of maps (M, gh, gw): one ``scipy.ndimage.label`` call over the stack,
    with a structuring element that joins the 8 neighbours within a map and nothing across maps."""
    from scipy import ndimage

    mean = maps.mean(axis=(1, 2), keepdims=True)
    excess = maps - mean
    above = excess > ENTROPY_TOLERANCE * np.abs(mean)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity in the map plane (Peruzzo et al. 2022 / SAR's cv2 connectivity=8)
    labels, n_labels = ndimage.label(above, structure=structure)
    count = len(maps)
    if n_labels == 0:
        return np.full(count, np.nan), np.zeros(count, dtype=np.int64)
    flat = labels.reshape(-1)
    mass = np.bincount(flat, weights=np.where(above, excess, 0.0).reshape(-1), minlength=n_labels + 1)[1:]
    owner = np.empty(n_labels, dtype=np.int64)  # the map each component lies in
    where = np.flatnonzero(flat)
    owner[flat[where] - 1] = where // (maps.shape[1] * maps.shape[2])
    total = np.bincount(owner, weights=mass, minlength=count)
    share = mass / total[owner]
    from scipy.special import xlogy

    entropy = np.bincount(owner, weights=-xlogy(share, share), minlength=count)
    components = np.bincount(owner, minlength=count)
    return np.where(components > 0, entropy, np.nan), components


def spatial_entropy(maps: Any) -> np.ndarray:
    """Spatial entropy (Peruzzo et al. 2022 Sec. 3; module docstring) of maps (..., gh, gw), in nats, shape
    ``maps.shape[:-2]``; NaN for a map with no weight above its mean. Scale-free: ``c·a`` has the entropy of ``a``."""
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim < 2 or min(m.shape[-2:]) < 1:
        raise UsageError(f"maps must have shape (..., rows, cols), got {m.shape}")
    if not np.isfinite(m).all():
        raise UsageError("attention maps must be finite")
    lead = m.shape[:-2]
    return _blobs(m.reshape(-1, *m.shape[-2:]))[0].reshape(lead)


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------


@dataclass
class HeadSegmentation:
    """One head of one layer, over the scored images (module docstring); intervals: 95 % bootstrap."""

    head: int
    jaccard: float
    jaccard_low: float
    jaccard_high: float
    gain: float  # jaccard - all-foreground Jaccard, paired by image
    gain_low: float
    gain_high: float
    verdict: str  # "higher" / "lower" than the all-foreground reference, or "not resolved"
    kept_share: float  # mean share of the patches the mass rule keeps
    spatial_entropy: float  # nats, mean over images with a defined entropy
    entropy_low: float
    entropy_high: float
    n_entropy: int
    components: float  # mean number of blobs
    n_weightless: int = 0  # images whose query map has no weight on the patches: left out of every statistic


@dataclass
class LayerSegmentation:
    layer: str
    depth: int  # position among the store's attention layers
    grid: list[int]
    query: str  # "cls" | "mean"
    n_scored: int  # images with at least one foreground patch on this grid
    foreground_share: float  # mean share of foreground patches over the scored images
    baseline: float  # all-foreground Jaccard, mean over the scored images
    baseline_low: float
    baseline_high: float
    heads: list[HeadSegmentation]


@dataclass(eq=False)
class AttentionSegmentation(Result):
    """Attention-as-segmentation scores of one store (:func:`attention_segmentation`), with provenance.

    ``jaccard`` / ``entropy`` hold the per-image values (layer → (n, heads), NaN where undefined) and
    ``overlay`` what the figure draws; neither goes to JSON.
    """

    result_kind: ClassVar[str] = "repsim.attention_segmentation"
    memory_only: ClassVar[tuple[str, ...]] = ('jaccard', 'entropy', 'overlay')

    model: str
    store: dict[str, Any]
    mass: float
    n_images: int
    masks: str  # where the masks came from
    layers: list[LayerSegmentation]
    skipped: dict[str, str]
    best: dict[str, Any]
    best_held_out: dict[str, Any]
    seconds: float = 0.0
    definitions: dict[str, str] = field(default_factory=lambda: dict(DEFINITIONS))
    jaccard: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    entropy: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    overlay: dict[str, Any] = field(default_factory=dict, repr=False)

    def layer(self, name: str) -> LayerSegmentation:
        for ly in self.layers:
            if ly.layer == name:
                return ly
        raise UsageError(f"no segmentation result for layer {name!r}")

    def matrix(self, what: str = "jaccard") -> np.ndarray:
        """(layers, max heads) of a head statistic (``jaccard``, ``gain``, ``spatial_entropy``, ...), NaN-padded."""
        width = max(len(ly.heads) for ly in self.layers)
        out = np.full((len(self.layers), width), np.nan)
        for i, ly in enumerate(self.layers):
            for h in ly.heads:
                out[i, h.head] = getattr(h, what)
        return out

    def summary(self) -> str:
        """Lines for the terminal; every comparison worded from its interval."""
        b, o = self.best, self.best_held_out
        lines = [f"attention as segmentation: {self.model}, n={self.n_images} images, masks: {self.masks}, "
                 f"DINO mass rule {self.mass:g}; Jaccard [95% CI] per layer: best head / all-foreground reference"]
        width = max(len(ly.layer) for ly in self.layers)
        for ly in self.layers:
            top = max(ly.heads, key=lambda h: -np.inf if not np.isfinite(h.jaccard) else h.jaccard)
            jac = ci_text(top.jaccard, top.jaccard_low, top.jaccard_high)
            ref = ci_text(ly.baseline, ly.baseline_low, ly.baseline_high)
            lines.append(f"  {ly.layer:<{width}}  head {top.head}: {jac}  reference {ref}"
                         f"  spatial entropy {top.spatial_entropy:.2f} nats  ({ly.query} query, n={ly.n_scored})")
        if b:
            jac = ci_text(b["jaccard"], b["jaccard_low"], b["jaccard_high"])
            ref = ci_text(b["baseline"], b["baseline_low"], b["baseline_high"])
            lines.append(f"best head {b['layer']} #{b['head']}: Jaccard {jac} vs all-foreground {ref}: "
                         f"gain {ci_text(b['gain'], b['gain_low'], b['gain_high'])}, {_verdict_words(b['verdict'])}")
        if o:
            lines.append(f"  selected on the even images, scored on the {o['n_scored']} odd ones: {o['layer']} "
                         f"#{o['head']} gain {ci_text(o['gain'], o['gain_low'], o['gain_high'])}, "
                         f"{_verdict_words(o['verdict'])}")
        for layer, why in self.skipped.items():
            lines.append(f"  skipped {layer}: {why}")
        lost = sum(h.n_weightless for ly in self.layers for h in ly.heads)
        if lost:
            lines.append(f"  {lost} head maps had no weight on the patches (attention wholly on prefix tokens) and "
                         "were left out of their head's statistics (n_weightless in the JSON)")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """Jaccard heat map and best-head overlays (:func:`plot_attention_segmentation`); returns the Figure."""
        return plot_attention_segmentation(self, path)


def _verdict_words(v: str) -> str:
    return {"higher": "above the reference", "lower": "below the reference"}.get(v, "not resolved against the "
                                                                                    "reference")


# ----------------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------------


def _usable_layers(store: Any, layers: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    if not store.attention_layers:
        raise UsageError(f"{store.path} holds no attention statistics: re-extract with --attention")
    names = list(store.attention_layers if layers is None else layers)
    for name in names:
        store.attention_info(name)  # unknown names: one line
    usable, skipped, old = [], {}, []
    for name in names:
        info = store.attention_info(name)
        if info.get("window_size") is not None:
            skipped[name] = "windowed attention: no query attends to the whole image"
        elif f"attn/{name}/query_map" not in store.extra_arrays:
            old.append(name)
        else:
            usable.append(name)
    if old and not usable and not skipped:
        raise UsageError(f"{store.path} keeps no per-image query maps (it was extracted before repsim stored them): "
                         "re-extract with --attention for attention segmentation")
    for name in old:
        skipped[name] = "no query map stored (re-extract with --attention)"
    if not usable:
        raise UsageError(f"{store.path} has no global-attention layer to segment ({len(skipped)} skipped: "
                         f"{next(iter(skipped.values()))})")
    return usable, skipped


def _head(head: int, jac: np.ndarray, base: np.ndarray, keep_share: np.ndarray, ent: np.ndarray,
          comps: np.ndarray, n_boot: int, seed: int, n_weightless: int = 0) -> HeadSegmentation:
    """One head's statistics over images; ``keep_share`` is NaN for the ``n_weightless`` images whose map has no
    weight on the patches (left out of every mean)."""
    has_map = np.isfinite(keep_share)
    j = bootstrap_mean(jac, n_boot=n_boot, seed=seed)
    g = bootstrap_mean(jac, base, n_boot=n_boot, seed=seed)
    e = bootstrap_mean(ent, n_boot=n_boot, seed=seed)
    return HeadSegmentation(head=head, jaccard=j["value"], jaccard_low=j["low"], jaccard_high=j["high"],
                            gain=g["value"], gain_low=g["low"], gain_high=g["high"],
                            verdict=verdict(g["low"], g["high"]),
                            kept_share=float(keep_share[has_map].mean()) if has_map.any() else float("nan"),
                            spatial_entropy=e["value"], entropy_low=e["low"], entropy_high=e["high"],
                            n_entropy=int(e["n"]),
                            components=float(comps[has_map].mean()) if has_map.any() else float("nan"),
                            n_weightless=n_weightless)


def _best(per_image: dict[str, np.ndarray], base: dict[str, np.ndarray], rows: np.ndarray, n_boot: int, seed: int
          ) -> dict[str, Any]:
    """The head with the highest mean gain over the all-foreground reference (Jaccard minus reference, paired by
    image, over the images ``rows`` where its Jaccard is defined: positions into the per-image arrays) and its
    statistics on the same rows (module docstring: why the gain and not the raw Jaccard)."""
    best = None
    for layer, jac in per_image.items():
        gain = jac[rows] - base[layer][rows][:, None]  # (rows, heads), NaN where the Jaccard is undefined
        with np.errstate(invalid="ignore"):
            means = np.nanmean(gain, axis=0) if np.isfinite(gain).any() else np.full(jac.shape[1], np.nan)
        for h, m in enumerate(means):
            if np.isfinite(m) and (best is None or m > best[0]):
                best = (float(m), layer, h)
    if best is None:
        return {}
    _, layer, h = best
    return {"layer": layer, "head": int(h), **_scores(per_image[layer][:, h], base[layer], rows, n_boot, seed)}


def _scores(jac: np.ndarray, base: np.ndarray, rows: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    j = bootstrap_mean(jac[rows], n_boot=n_boot, seed=seed)
    b = bootstrap_mean(base[rows], n_boot=n_boot, seed=seed)
    g = bootstrap_mean(jac[rows], base[rows], n_boot=n_boot, seed=seed)
    return {"jaccard": j["value"], "jaccard_low": j["low"], "jaccard_high": j["high"], "baseline": b["value"],
            "baseline_low": b["low"], "baseline_high": b["high"], "gain": g["value"], "gain_low": g["low"],
            "gain_high": g["high"], "verdict": verdict(g["low"], g["high"]), "n_scored": int(g["n"])}


def attention_segmentation(store: Any, layers: Sequence[str] | None = None, *, mass: float = MASS,
                           masks_dir: str | os.PathLike | None = None, images: int | None = None,
                           n_boot: int = N_BOOT, seed: int = 0, progress: bool = False) -> AttentionSegmentation:
    """Score every head's query map of a store against object masks (module docstring).

    ``store``: an :class:`repsim.store.reader.ActivationStore` extracted with ``--attention``. ``layers``: attention
    layers (default all; windowed ones are skipped and listed in ``skipped``). ``mass``: the DINO mass rule's
    fraction. ``masks_dir``: a folder of mask PNGs (:func:`repsim.data.masks.folder_masks`); default: re-render the
    masks of a ``shapes`` store. ``images``: score the first ``images`` rows (default all). ``n_boot``, ``seed``:
    the bootstrap over images.
    """
    t0 = time.perf_counter()
    store.require_complete()
    mass_threshold(np.ones(1), mass)  # validates mass before any work
    usable, skipped = _usable_layers(store, layers)
    n = store.n if images is None else int(images)
    if isinstance(images, bool) or not 1 <= n <= store.n:
        raise UsageError(f"images must be between 1 and the store's {store.n}, got {images!r}")
    rows = np.arange(n)
    cover = store_input_masks(store, rows, masks_dir)  # (n, H, W) object coverage in model-input pixels
    per_layer, per_image, base_of, entropy_of = [], {}, {}, {}
    overlay_maps: dict[str, np.ndarray] = {}
    it = usable
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(usable, desc="attention segmentation")
    for layer in it:
        info = store.attention_info(layer)
        gh, gw = (int(v) for v in info["grid"])
        qmap = store.read_attention(layer, "query_map", 0, n).astype(np.float64)  # (n, heads, gh·gw)
        heads = qmap.shape[1]
        true = patch_foreground(cover, (gh, gw))  # (n, P)
        scored = true.any(-1)
        # A query whose attention lies wholly on prefix tokens (or underflowed in float16) has no map on the
        # patches: nothing to segment, so its image is left out for that head (NaN), never scored as 0.
        weightless = qmap.sum(-1) <= 0  # (n, heads)
        keep = mass_threshold(np.where(weightless[..., None], 1.0, qmap), mass)  # (n, heads, P)
        jac = token_iou(keep, true[:, None, :])[0]  # (n, heads), NaN where no foreground patch
        jac[weightless] = np.nan
        kept_share = np.where(weightless, np.nan, keep.mean(-1))
        base = token_iou(np.ones_like(true), true)[0]  # (n,)
        ent, comps = _blobs(qmap.reshape(n * heads, gh, gw))
        ent, comps = ent.reshape(n, heads), comps.reshape(n, heads)
        b = bootstrap_mean(base, n_boot=n_boot, seed=seed)
        per_layer.append(LayerSegmentation(
            layer=layer, depth=store.attention_layers.index(layer), grid=[gh, gw],
            query=info.get("query_map") or query_map_kind(int(info.get("num_prefix_tokens") or 0)),
            n_scored=int(scored.sum()), foreground_share=float(true[scored].mean()) if scored.any() else float("nan"),
            baseline=b["value"], baseline_low=b["low"], baseline_high=b["high"],
            heads=[_head(h, jac[:, h], base, kept_share[:, h], ent[:, h], comps[:, h], n_boot, seed,
                         n_weightless=int(weightless[:, h].sum())) for h in range(heads)]))
        per_image[layer], base_of[layer], entropy_of[layer] = jac, base, ent
        overlay_maps[layer] = qmap[: 4 * OVERLAY_IMAGES].astype(np.float32)
    everything = np.arange(n)
    best = _best(per_image, base_of, everything, n_boot, seed)
    held_out = {}
    if n >= 4:
        chosen = _best(per_image, base_of, everything[0::2], n_boot, seed)
        if chosen:
            held_out = {"layer": chosen["layer"], "head": chosen["head"], "selected_on": "even rows",
                        "scored_on": "odd rows",
                        **_scores(per_image[chosen["layer"]][:, chosen["head"]], base_of[chosen["layer"]],
                                  everything[1::2], n_boot, seed)}
    d = store.attrs.get("dataset") or {}
    result = AttentionSegmentation(
        model=store.model_name,
        store={"path": str(store.path), "fingerprint": store.fingerprint, "n": int(store.n), "dataset": d.get("name"),
               "config_hash": store.attrs.get("config_hash"), "repsim_version": store.attrs.get("repsim_version")},
        mass=float(mass), n_images=n,
        masks=os.fspath(masks_dir) if masks_dir is not None else "shapes generator (re-rendered from the sample ids)",
        layers=per_layer, skipped=skipped, best=best, best_held_out=held_out, seconds=time.perf_counter() - t0,
        jaccard=per_image, entropy=entropy_of)
    result.overlay = _overlay_data(store, result, overlay_maps, cover)
    return result


# ----------------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------------


def _overlay_data(store: Any, result: AttentionSegmentation, maps: dict[str, np.ndarray], cover: np.ndarray
                  ) -> dict[str, Any]:
    """What the overlay panels draw: the best heads (by mean gain over the reference, as :func:`_best`), for each
    its first scored images among the leading rows, their query maps, kept patches, mask coverage and (where
    available) input pixels."""
    ranked = sorted(((h.gain, ly.layer, h.head) for ly in result.layers for h in ly.heads if np.isfinite(h.gain)),
                    reverse=True)[:OVERLAY_HEADS]
    rows_needed = sorted({int(r) for _, layer, h in ranked for r in _overlay_rows(result, layer, h, len(maps[layer]))})
    images = _input_images(store, rows_needed)
    panels = []
    for _, layer, h in ranked:
        ly = result.layer(layer)
        gh, gw = ly.grid
        for r in _overlay_rows(result, layer, h, len(maps[layer])):
            qmap = maps[layer][r, h]
            panels.append({"layer": layer, "head": h, "row": r, "jaccard": float(result.jaccard[layer][r, h]),
                           "map": qmap.reshape(gh, gw), "kept": mass_threshold(qmap, result.mass).reshape(gh, gw),
                           "mask": cover[r], "image": None if images is None else images[rows_needed.index(r)]})
    return {"panels": panels, "heads": [(layer, h) for _, layer, h in ranked]}


def _overlay_rows(result: AttentionSegmentation, layer: str, head: int, available: int) -> list[int]:
    jac = result.jaccard[layer][:available, head]
    return [int(r) for r in np.flatnonzero(np.isfinite(jac))[:OVERLAY_IMAGES]]


def _input_images(store: Any, rows: list[int]) -> np.ndarray | None:
    """Input pixels (k, H, W, 3) in [0, 1] of store rows: the saved inputs un-normalised, else shapes images
    re-rendered from their ids through the input geometry, else None (the figure then draws the maps alone)."""
    if not rows:
        return None
    prep = store.attrs.get("preprocessing") or {}
    if store.has_inputs:
        x = np.stack([store.read_inputs(r, r + 1)[0] for r in rows]).astype(np.float32)  # (k, 3, H, W)
        mean = np.asarray(prep.get("mean") or (0.0, 0.0, 0.0), dtype=np.float32)[None, :, None, None]
        std = np.asarray(prep.get("std") or (1.0, 1.0, 1.0), dtype=np.float32)[None, :, None, None]
        return np.clip(x * std + mean, 0.0, 1.0).transpose(0, 2, 3, 1)
    if (store.attrs.get("dataset") or {}).get("name") != "shapes":
        return None
    from repsim.data.masks import _preprocessing_geometry, input_masks, parse_shapes_id
    from repsim.data.shapes import render_shape_sample

    hw, crop_pct, crop_mode = _preprocessing_geometry(prep)
    out = []
    for r in rows:
        _, seed, size, index = parse_shapes_id(store.ids[r])
        rgb = render_shape_sample(seed, index, size)[0].astype(np.float32) / 255.0
        # the same geometry as the masks, channel by channel (bilinear: close to the model's bicubic input)
        out.append(np.stack([input_masks([rgb[..., c]], hw, crop_pct, crop_mode)[0] for c in range(3)], axis=-1))
    return np.stack(out)


def plot_attention_segmentation(result: AttentionSegmentation, path: str | os.PathLike | None = None) -> Any:
    """Left: layer × head heat map of the mean Jaccard (the all-foreground reference of each layer's grid in the
    row label, heads whose gain interval is above it marked ``*``). Right: the best heads (rows) on the first
    scored images (columns): the input (when available), the kept patches of the mass rule tinted over it with the
    query map's weights, and the object's outline (mask coverage 0.5). Saved to ``path`` when given; returns the
    Figure."""
    from matplotlib.figure import Figure

    from repsim.plotting.cka_map import layer_labels, model_label

    mat = result.matrix("jaccard")
    panels = result.overlay.get("panels", [])
    heads = result.overlay.get("heads", [])
    n_cols = max((sum(1 for p in panels if (p["layer"], p["head"]) == key) for key in heads), default=0)
    L, Hn = mat.shape
    fig = Figure(figsize=(4.0 + 0.45 * Hn + 2.0 * n_cols, max(4.2, 0.35 * L + 2.2, 2.0 * len(heads) + 1.6)),
                 layout="constrained")
    outer = fig.add_gridspec(1, 2, width_ratios=[2.2 + 0.45 * Hn, max(2.0 * n_cols, 0.01)])
    ax = fig.add_subplot(outer[0])
    # Jaccard is on an absolute scale: start at 0, end at the next tenth above the largest value (at least 0.5)
    top = float(np.nanmax(mat)) if np.isfinite(mat).any() else 1.0
    vmax = min(1.0, max(0.5, np.ceil(top * 10 + 1e-9) / 10))
    image = ax.imshow(mat, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", origin="lower")
    for i, ly in enumerate(result.layers):
        for h in ly.heads:
            if np.isfinite(h.jaccard):
                ax.text(h.head, i, f"{h.jaccard:.2f}" + ("*" if h.verdict == "higher" else ""), ha="center",
                        va="center", fontsize=7, color="white" if h.jaccard < 0.55 * vmax else "black")
    ax.set_xticks(range(Hn))
    ax.set_xlabel("head")
    names = layer_labels([ly.layer for ly in result.layers], roles=False)
    ax.set_yticks(range(L))
    ax.set_yticklabels([f"{nm}  (ref {ly.baseline:.2f})" for nm, ly in zip(names, result.layers)], fontsize=7)
    ax.set_ylabel("attention layer (depth ↑); ref = all-foreground Jaccard")
    cbar = fig.colorbar(image, ax=ax, shrink=0.8)
    cbar.set_label("mean Jaccard, thresholded map vs object", fontsize=8)
    ax.set_title("* = gain over the reference > 0 (95% CI per head, not corrected for the number of heads)",
                 fontsize=7)
    if panels:
        sub = outer[1].subgridspec(len(heads), n_cols)
        short = dict(zip([ly.layer for ly in result.layers], names))
        tint = None
        pax_all = []
        for i, key in enumerate(heads):
            mine = [p for p in panels if (p["layer"], p["head"]) == key]
            stats = next(h for h in result.layer(key[0]).heads if h.head == key[1])
            for j, p in enumerate(mine):
                pax = fig.add_subplot(sub[i, j])
                pax_all.append(pax)
                tint = _draw_panel(pax, p)
                pax.set_title(f"row {p['row']}: J = {p['jaccard']:.2f}", fontsize=7)
                if j == 0:
                    jac = ci_text(stats.jaccard, stats.jaccard_low, stats.jaccard_high)
                    pax.set_ylabel(f"{short[key[0]]} #{key[1]}\nJ {jac}", fontsize=7)
        if tint is not None:
            fig.colorbar(tint, ax=pax_all, shrink=0.6, pad=0.01).set_label(
                "attention / map maximum (kept patches)", fontsize=7)
    model = model_label(result.model)
    first = result.layers[0]
    fig.suptitle(f"{model}: attention as segmentation ({first.query} query; kept = smallest top set with "
                 f"{result.mass:.0%} of the weight, DINO), n = {result.n_images} images\nforeground patch: > "
                 f"{FOREGROUND_THRESHOLD:.0%} of its pixels on the object. Right: the best heads on the first images, "
                 "kept patches coloured over the grey image, object outline in cyan", fontsize=9)
    if path is not None:
        save_figure_atomic(fig, path, dpi=130)
    return fig


def _draw_panel(ax: Any, p: dict[str, Any]) -> Any:
    """One overlay: the input in grey at half contrast (colours of the scene would hide the tint), the kept
    patches coloured by their weight relative to the map's maximum, the object outline; returns the tint image."""
    mask = p["mask"]
    H, W = mask.shape
    if p["image"] is not None:
        grey = p["image"].mean(-1)
        ax.imshow(0.25 + 0.5 * grey, cmap="gray", vmin=0, vmax=1, extent=(0, W, H, 0))
    else:
        ax.imshow(np.full((H, W), 0.5), cmap="gray", vmin=0, vmax=1, extent=(0, W, H, 0))
    kept = np.where(p["kept"], p["map"] / max(float(p["map"].max()), 1e-12), np.nan)
    tint = ax.imshow(kept, cmap="plasma", alpha=0.8, vmin=0, vmax=1, extent=(0, W, H, 0), interpolation="nearest")
    ax.contour(np.arange(W) + 0.5, np.arange(H) + 0.5, mask, levels=[0.5], colors="cyan", linewidths=1.4)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    return tint
