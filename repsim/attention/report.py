"""Per-head attention summary of a store extracted with ``--attention`` (``repsim attention``).

The store holds per image × head statistics and per-chunk sums of the aligned attention maps (see
:mod:`repsim.store`, "Attention"). :func:`attention_report` reduces them over images: for every attention
layer and head the mean attention distance in pixels (mean and std over images; Dosovitskiy et al. 2021
Fig. 7, Raghu et al. 2021 Sec. 5), the attention mass on prefix tokens, the attention entropy, the centroid
offset (dy, dx) of the aligned aggregated attention map in grid steps, and the head kind from
:func:`repsim.attention.statistics.classify_heads` (Walmer et al. 2023).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from repsim.attention.statistics import (
    attention_distance,
    attention_rollout,
    centroid_offset,
    classify_heads,
    rollout_map,
)
from repsim.errors import UsageError
from repsim.results import Result, write_json_atomic
from repsim.store.reader import ActivationStore


@dataclass
class HeadSummary:
    """One head of one attention layer, reduced over the store's images."""

    head: int
    distance_px: float  # mean attention distance, mean over images
    distance_std_px: float  # ... standard deviation over images (ddof=1; 0 for one image)
    prefix_mass: float  # mean over images of the attention on prefix tokens
    entropy: float  # mean row entropy in nats
    offset: tuple[float, float]  # centroid (dy, dx) of the aligned map, grid steps
    kind: str  # strict_local | soft_local | offset_local | axial | global


@dataclass
class LayerSummary:
    layer: str
    depth: int  # position among the store's attention layers (0 = first)
    kind: str  # capture kind (timm_vit, timm_swin_window, hf_eager, torch_mha, ...)
    num_heads: int
    num_prefix_tokens: int
    grid: list[int]
    patch_size: list[int]
    heads: list[HeadSummary]
    uniform_distance_px: float | None = None  # what uniform attention over the grid gives (global layers)


@dataclass(eq=False)
class AttentionReport(Result):
    """Per-layer, per-head attention statistics of one store, with provenance; ``aligned[layer]`` holds the
    normalised aligned maps (heads, 2gh-1, 2gw-1) for plotting (not written to JSON)."""

    result_kind: ClassVar[str] = "repsim.attention"
    memory_only: ClassVar[tuple[str, ...]] = ('aligned',)

    path: str
    model: str
    fingerprint: str
    n: int
    layers: list[LayerSummary]
    attn_keep: int = 0
    repsim_version: str | None = None
    aligned: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    definitions: dict[str, str] = field(default_factory=dict)

    def plot(self, path: str | os.PathLike | None, store: ActivationStore | None = None,
             rollout_images: int = 4) -> dict[str, Any]:
        """Distance-vs-depth scatter, aligned maps and, when ``store`` kept maps (``--attn-keep``), the rollout
        of its first ``rollout_images`` images; see :func:`repsim.plotting.attention.plot_attention_report`."""
        from repsim.plotting.attention import plot_attention_report

        rollout = rollout_figure_data(store, rollout_images) if store is not None and self.attn_keep > 0 else None
        return plot_attention_report(self, path, rollout=rollout)


DEFINITIONS = {
    "distance_px": "mean attention distance: patch-centre distance in pixels weighted by attention, over patch "
                   "queries and patch keys (prefix keys dropped, rows renormalised); mean over queries, then images",
    "prefix_mass": "attention on prefix tokens (CLS/registers/distillation), mean over patch queries and images",
    "entropy": "entropy of the attention row in nats (all keys), mean over patch queries and images",
    "offset": "centroid (dy, dx) in grid steps of the aligned aggregated attention map (Walmer et al. 2023)",
    "kind": "head class from the aligned map, see repsim.attention.statistics.classify_heads",
}


def attention_report(store: ActivationStore, layers: list[str] | None = None) -> AttentionReport:
    """Reduce a store's attention statistics over its images (see the module docstring)."""
    if not store.complete:
        raise UsageError(f"{store.path} is incomplete: rerun the same `repsim extract` command to finish it")
    if not store.attention_layers:
        raise UsageError(
            f"{store.path} holds no attention statistics: extract with --attention "
            f"(a CNN has no attention: `repsim attention --erf` gives its effective receptive fields)")
    names = store.attention_layers if layers is None else list(layers)
    summaries, aligned_maps = [], {}
    for layer in names:
        info = store.attention_info(layer)
        dist = store.read_attention(layer, "distance").astype(np.float64)  # (n, H)
        prefix = store.read_attention(layer, "prefix_mass").astype(np.float64)
        ent = store.read_attention(layer, "entropy").astype(np.float64)
        aligned = store.read_attention(layer, "aligned").astype(np.float64).sum(axis=0)  # (H, 2gh-1, 2gw-1)
        total = aligned.sum(axis=(-2, -1), keepdims=True)
        aligned = np.divide(aligned, total, out=np.zeros_like(aligned), where=total > 0)
        offsets = centroid_offset(torch.from_numpy(aligned)).numpy()
        kinds = list(classify_heads(torch.from_numpy(aligned)))
        n = dist.shape[0]
        heads = [
            HeadSummary(
                head=h,
                distance_px=float(dist[:, h].mean()),
                distance_std_px=float(dist[:, h].std(ddof=1)) if n > 1 else 0.0,
                prefix_mass=float(prefix[:, h].mean()),
                entropy=float(ent[:, h].mean()),
                offset=(float(offsets[h, 0]), float(offsets[h, 1])),
                kind=str(kinds[h]),
            )
            for h in range(dist.shape[1])
        ]
        uniform = None
        if info.get("window_size") is None:
            n_patch = int(info["grid"][0]) * int(info["grid"][1])
            flat = torch.full((1, n_patch, n_patch), 1.0 / n_patch, dtype=torch.float64)
            uniform = float(attention_distance(flat, tuple(info["grid"]), tuple(info["patch_size"]), 0)[0])
        summaries.append(LayerSummary(
            layer=layer, depth=store.attention_layers.index(layer), kind=info["kind"],
            num_heads=int(info["num_heads"]), num_prefix_tokens=int(info["num_prefix_tokens"]),
            grid=list(info["grid"]), patch_size=list(info["patch_size"]), heads=heads, uniform_distance_px=uniform,
        ))
        aligned_maps[layer] = aligned.astype(np.float32)
    return AttentionReport(
        path=store.path, model=store.model_name, fingerprint=store.fingerprint, n=store.n, layers=summaries,
        attn_keep=int(store.attrs.get("attention", {}).get("attn_keep", 0)),
        repsim_version=store.attrs.get("repsim_version"), aligned=aligned_maps, definitions=dict(DEFINITIONS),
    )


def store_rollout(store: ActivationStore, images: int = 4) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) of the first ``images`` kept images: (images, gh, gw) maps of
    the CLS token's rollout over patch tokens (mean over patch queries without a prefix token).

    Needs kept maps (``--attn-keep``) of every global-attention layer, all with one token geometry.
    """
    kept = int(store.attrs.get("attention", {}).get("attn_keep", 0))
    layers = [ly for ly in store.attention_layers if store.attention_info(ly).get("window_size") is None]
    if kept == 0 or not layers:
        raise UsageError(f"{store.path} keeps no attention maps for rollout: extract with --attention --attn-keep N")
    k = min(images, kept, store.n)
    infos = [store.attention_info(ly) for ly in layers]
    geometry = {(i["num_prefix_tokens"], tuple(i["grid"])) for i in infos}
    if len(geometry) != 1:
        raise UsageError("attention rollout needs one token geometry across layers (not a hierarchical model)")
    prefix, grid = geometry.pop()
    maps = [torch.from_numpy(store.read_attention(ly, "maps", 0, k).astype(np.float32)) for ly in layers]
    roll = attention_rollout(maps, num_prefix_tokens=prefix)
    return rollout_map(roll, tuple(grid), prefix).numpy()


def rollout_figure_data(store: ActivationStore, images: int = 4) -> tuple[np.ndarray, np.ndarray | None] | None:
    """What the rollout figure draws: :func:`store_rollout` maps (k, gh, gw) and the first k preprocessed inputs
    (k, 3, H, W; None when the store saved none), or None where rollout is not defined (no kept maps,
    hierarchical models such as Swin)."""
    try:
        maps = store_rollout(store, images)
    except UsageError:  # no kept maps, or several token geometries: the figure is skipped
        return None
    return maps, store.read_inputs(0, maps.shape[0]) if store.has_inputs else None


def erf_json(store: ActivationStore, results: list[Any], images: int, path: str | os.PathLike | None = None
             ) -> dict[str, Any]:
    """JSON of effective-receptive-field results (:class:`hooks.gradients.erf.ERFResult`): per layer the radius (spread
    about the gradient's centroid), the unit's centre, the centroid and the offset, all in input pixels."""
    d = {
        "kind": "repsim.erf",
        "path": store.path,
        "model": store.model_name,
        "fingerprint": store.fingerprint,
        "images": min(images, store.n),
        "layers": [{"layer": r.layer, "radius_px": float(r.radius_px), "centre_px": list(r.centre_px),
                    "centroid_px": [float(v) for v in r.centroid_px], "offset_px": [float(v) for v in r.offset_px],
                    "radius_from_centre_px": float(r.radius_from_centre_px)}
                   for r in results],
        "definition": "g = |gradient| of the layer's centre unit (row (h-1)//2, column (w-1)//2, summed over "
                      "channels) w.r.t. the input, averaged over colour channels and images, normalised to sum 1 "
                      "(Luo et al. 2016); centroid mu = sum_p g(p) p; radius = sum_p g(p) ||p - mu|| (the spread "
                      "about the centroid); offset = mu - c, c the centre unit's centre in the input, "
                      "(i + 0.5) H/h - 0.5; radius_from_centre = sum_p g(p) ||p - c|| mixes spread and offset; "
                      "pixels, (y, x)",
        "repsim_version": store.attrs.get("repsim_version"),
    }
    if path is not None:
        write_json_atomic(os.fspath(path), d)
    return d
