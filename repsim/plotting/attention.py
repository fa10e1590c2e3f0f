"""Figures of an :class:`repsim.attention.report.AttentionReport`.

- :func:`plot_distance_vs_depth`: one dot per head, mean attention distance (px) against layer depth (the ViT
  paper's Fig. 7 / Raghu et al. 2021 Fig. 3), coloured by head kind; several reports can share the axes.
- :func:`plot_aligned_maps`: the aligned aggregated attention map of every layer × head (Walmer et al. 2023),
  the query at the centre cell.
- :func:`plot_rollout`: attention-rollout maps (Abnar & Zuidema 2020) of the first kept images, over the
  images when the store saved its inputs.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from repsim.plotting.cka_map import layer_labels, model_label
from repsim.results import save_figure_atomic


class AttentionSummary(Protocol):
    """What the figures read from an attention report (:class:`repsim.attention.report.AttentionReport` has
    these fields): ``layers`` (per layer: ``layer``, ``depth``, ``num_heads``, ``uniform_distance_px`` and
    ``heads``, each with ``distance_px``, ``distance_std_px`` and ``kind``), ``aligned[layer]`` the normalised
    aligned maps (heads, 2gh-1, 2gw-1), ``n`` images, ``model``. A protocol, not the summary's class: the plot
    module takes results as data and does not import the module that computes them (no import cycle)."""

    model: str
    n: int
    layers: Sequence[Any]
    aligned: dict[str, np.ndarray]

KIND_COLOURS = {
    "strict_local": "#d62728",
    "soft_local": "#ff7f0e",
    "offset_local": "#9467bd",
    "axial": "#2ca02c",
    "global": "#1f77b4",
}
MARKERS = ("o", "s", "^", "D", "v", "P")
#: the colour scale of the aligned maps spans at least x1/2 .. x2 of uniform attention, so that a map within
#: ~20 % of uniform reads (nearly) flat instead of being stretched over the whole colour map
MIN_LOG2_RANGE = 1.0


def _figure(figsize: tuple[float, float], layout: str = "constrained") -> Any:
    """A bare matplotlib Figure (no pyplot): renders headless with Agg, never piles up in pyplot's figure list,
    and shows once (not twice) when returned as a notebook cell's value under ``%matplotlib inline``."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout=layout)


def uniform_aligned_map(grid: tuple[int, int]) -> np.ndarray:
    """The aligned map of *uniform* attention on a (gh, gw) grid, normalised to sum 1: (2gh-1, 2gw-1).

    Pasting every query's map on a canvas centred on the query, offset (dy, dx) is reached by
    (gh − |dy|)(gw − |dx|) queries, so uniform attention (1/P on every key) aligns to the pyramid
    (gh − |dy|)(gw − |dx|) / (gh·gw)²: a centred peak that says nothing about locality.
    """
    gh, gw = (int(g) for g in grid)
    dy = np.abs(np.arange(-(gh - 1), gh))[:, None]
    dx = np.abs(np.arange(-(gw - 1), gw))[None, :]
    return ((gh - dy) * (gw - dx) / float(gh * gw) ** 2).astype(np.float64)


def relative_to_uniform(aligned: np.ndarray) -> np.ndarray:
    """Aligned maps (..., 2gh-1, 2gw-1) divided per offset by the uniform-attention pyramid.

    Each map is normalised to sum 1 first; the result is the mean attention a query puts on the key at that
    offset in units of uniform attention (1/P): 1 everywhere for uniform (global) attention, > 1 at the centre
    for a local head, > 1 off-centre for an offset head.
    """
    m = np.asarray(aligned, dtype=np.float64)
    gh, gw = (m.shape[-2] + 1) // 2, (m.shape[-1] + 1) // 2
    total = m.sum(axis=(-2, -1), keepdims=True)
    m = np.divide(m, total, out=np.zeros_like(m), where=total > 0)
    return m / uniform_aligned_map((gh, gw))


def plot_distance_vs_depth(reports: AttentionSummary | Sequence[AttentionSummary], ax: Any = None) -> Any:
    """Scatter of every head's mean attention distance (px) against its layer's depth, with its 95 % interval
    over images (± 1.96 · std / √n); returns the Axes. The legend lists only the head kinds that occur."""
    from matplotlib.lines import Line2D

    if not isinstance(reports, Sequence):
        reports = [reports]
    if ax is None:
        ax = _figure((8, 4.5)).subplots()
    rng = np.random.default_rng(0)  # horizontal jitter so heads with equal distance stay visible
    seen: list[str] = []
    for r_i, report in enumerate(reports):
        marker = MARKERS[r_i % len(MARKERS)]
        for layer in report.layers:
            for h in layer.heads:
                x = layer.depth + (rng.uniform(-0.15, 0.15) if len(reports) == 1 else (r_i - (len(reports) - 1) / 2) * 0.2)
                half = 1.96 * h.distance_std_px / np.sqrt(max(report.n, 1))
                colour = KIND_COLOURS.get(h.kind, "grey")
                ax.errorbar(x, h.distance_px, yerr=half, fmt=marker, ms=5, color=colour, mec="black", mew=0.3,
                            elinewidth=0.8, capsize=1.5, zorder=3)
                if h.kind not in seen:
                    seen.append(h.kind)
    first = reports[0]
    top = max((h.distance_px for r in reports for ly in r.layers for h in ly.heads), default=1.0)
    uniform = [(ly.depth, ly.uniform_distance_px) for ly in first.layers if ly.uniform_distance_px is not None]
    if uniform:
        xs, ys = zip(*uniform)
        ax.plot(xs, ys, "--", color="grey", lw=1, zorder=2, label="uniform attention")
        top = max(top, max(ys))
    ax.set_ylim(0, top * 1.08)  # from 0, as in the ViT paper: local heads sit near the bottom
    names = layer_labels([ly.layer for ly in first.layers])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("attention layer (network order)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.grid(alpha=0.3, zorder=0)
    order = [k for k in KIND_COLOURS if k in seen] + [k for k in seen if k not in KIND_COLOURS]
    handles = [Line2D([], [], marker="o", ls="", color=KIND_COLOURS.get(k, "grey"), markeredgecolor="black",
                      label=k.replace("_", " ")) for k in order]
    if uniform:
        handles.append(Line2D([], [], ls="--", color="grey", label="uniform attention"))
    if len(reports) > 1:
        handles += [Line2D([], [], marker=MARKERS[i % len(MARKERS)], ls="", color="grey", label=r.model)
                    for i, r in enumerate(reports)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="head kind",
              title_fontsize=7, frameon=False)
    title = " vs ".join(model_label(r.model) for r in reports)
    ax.set_title(f"{title}: mean attention distance per head, 95% CI over images (n={first.n} images)",
                 fontsize=10)
    return ax


def plot_aligned_maps(report: AttentionSummary, max_layers: int | None = None) -> Any:
    """Grid of aligned attention maps relative to uniform attention, layers as rows and heads as columns.

    Each panel is :func:`relative_to_uniform` of the head's aligned map on a log2 scale: white = uniform
    attention at that offset (a global head is flat white), red = more than uniform (a local head is a red
    centre, an offset head a red spot off the +), blue = less. One colour scale for all panels, spanning the
    data's range (at least x1/2 .. x2). Returns the Figure.
    """
    from matplotlib.colors import TwoSlopeNorm

    layers = report.layers[:max_layers] if max_layers else report.layers
    n_heads = max(ly.num_heads for ly in layers)
    fig = _figure((1.25 * n_heads + 2.0, 1.2 * len(layers) + 1.1))
    axes = np.atleast_2d(fig.subplots(len(layers), n_heads, squeeze=False))
    names = layer_labels([ly.layer for ly in layers])
    rel = {ly.layer: np.log2(np.maximum(relative_to_uniform(report.aligned[ly.layer]), 1e-6)) for ly in layers}
    lo = min(float(v.min()) for v in rel.values())
    hi = max(float(v.max()) for v in rel.values())
    norm = TwoSlopeNorm(vmin=min(lo, -MIN_LOG2_RANGE), vcenter=0.0, vmax=max(hi, MIN_LOG2_RANGE))
    image = None
    for i, layer in enumerate(layers):
        for h in range(n_heads):
            ax = axes[i, h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= layer.num_heads:
                ax.axis("off")
                continue
            m = rel[layer.layer][h]
            image = ax.imshow(m, cmap="RdBu_r", norm=norm, interpolation="nearest")
            gh, gw = (m.shape[0] + 1) // 2, (m.shape[1] + 1) // 2
            ax.plot(gw - 1, gh - 1, "+", color="black", ms=5, mew=0.8)
            head = layer.heads[h]
            ax.set_title(f"{head.kind.replace('_', ' ')}, {head.distance_px:.0f} px", fontsize=6, pad=1.5,
                         color=KIND_COLOURS.get(head.kind, "black"))
            if h == 0:
                ax.set_ylabel(names[i], fontsize=7)
            if i == len(layers) - 1:
                ax.set_xlabel(f"head {h}", fontsize=7)
    if image is not None:
        cbar = fig.colorbar(image, ax=axes, shrink=min(0.8, 5.0 / len(layers)), pad=0.02)
        ticks = list(range(int(np.ceil(norm.vmin)), int(np.floor(norm.vmax)) + 1))  # inside the scale only
        cbar.set_ticks(ticks)
        cbar.set_ticklabels([f"x{2.0 ** t:g}" if t >= 0 else f"x1/{2.0 ** -t:g}" for t in ticks])
        cbar.set_label("attention at offset / uniform attention (log scale)", fontsize=7)
        cbar.ax.tick_params(labelsize=7)
    fig.suptitle(f"{model_label(report.model)}: aligned attention relative to uniform attention (query at +; "
                 f"n={report.n} images)\nwhite = uniform (global), red centre = local, red off-centre = offset",
                 fontsize=9)
    return fig


def plot_rollout(maps: np.ndarray, images: np.ndarray | None, model: str) -> Any:
    """Rollout maps (k, gh, gw), over the input images (k, 3, H, W; normalised pixels) when given.

    Attention rollout (Abnar & Zuidema 2020) multiplies the layers' attention matrices (each averaged over
    heads, plus the identity for the residual stream) to estimate how much each input patch flows into the
    CLS token (or the mean patch token without one); each map is scaled to its own maximum."""
    k = maps.shape[0]
    rows = 2 if images is not None else 1
    fig = _figure((2.2 * k + 1.0, 2.2 * rows + 0.7))
    axes = np.atleast_2d(fig.subplots(rows, k, squeeze=False))
    image = None
    for j in range(k):
        m = maps[j] / max(float(maps[j].max()), 1e-12)
        if images is not None:
            img = images[j].astype(np.float32).transpose(1, 2, 0)
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)
            axes[0, j].imshow(img)
            axes[0, j].set_title(f"image {j}", fontsize=8)
            axes[1, j].imshow(img)
            h, w = img.shape[:2]
            image = axes[1, j].imshow(m, cmap="inferno", alpha=0.6, extent=(0, w, h, 0), vmin=0, vmax=1)
        else:
            image = axes[0, j].imshow(m, cmap="inferno", vmin=0, vmax=1)
            axes[0, j].set_title(f"image {j}", fontsize=8)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.7).set_label("rollout attention (max = 1)", fontsize=7)
    title = (f"{model_label(model)}: attention rollout (Abnar & Zuidema 2020) of the first {k} images: where the "
             "input patches flow into the read-out token, each map scaled to its maximum")
    # wrapped to the figure's width (about 13 characters per inch at 9 pt): a two-image figure is narrow
    fig.suptitle(textwrap.fill(title, width=max(40, int(13 * fig.get_figwidth()))), fontsize=9)
    return fig


def figure_paths(path: str | os.PathLike) -> dict[str, str]:
    """Where :func:`plot_attention_report` writes: ``path`` and two siblings with _aligned / _rollout."""
    root, ext = os.path.splitext(os.fspath(path))
    ext = ext or ".png"
    return {"distance": root + ext, "aligned": f"{root}_aligned{ext}", "rollout": f"{root}_rollout{ext}"}


def plot_attention_report(report: AttentionSummary, path: str | os.PathLike | None,
                          rollout: tuple[np.ndarray, np.ndarray | None] | None = None) -> dict[str, Any]:
    """Draw the three figures; save them to :func:`figure_paths` of ``path`` when given.

    ``rollout``: ``(maps, images)`` for the rollout figure, as :func:`plot_rollout` takes them (rollout maps
    (k, gh, gw), the preprocessed inputs (k, 3, H, W) or None); without it that figure is skipped.
    :meth:`repsim.attention.report.AttentionReport.plot` reads both from a store. Returns
    ``{"distance": Axes, "aligned": Figure, "rollout": Figure | None, "paths": [...]}``.
    """
    out: dict[str, Any] = {"paths": []}
    targets = figure_paths(path) if path is not None else {}
    ax = plot_distance_vs_depth(report)
    out["distance"] = ax
    figures = {"distance": ax.figure, "aligned": plot_aligned_maps(report)}
    out["aligned"] = figures["aligned"]
    out["rollout"] = None
    if rollout is not None:
        figures["rollout"] = out["rollout"] = plot_rollout(rollout[0], rollout[1], report.model)
    for key, fig in figures.items():
        if key in targets:
            save_figure_atomic(fig, targets[key], dpi=150)
            out["paths"].append(targets[key])
    return out


def plot_erf(layers: Sequence[str], radii: Sequence[float], maps: Sequence[np.ndarray], model: str,
             path: str | os.PathLike | None = None, n_images: int | None = None) -> Any:
    """Effective-receptive-field radius (px) per layer, on the same axis as attention distance, with the
    ERF maps of up to 6 layers; saved to ``path`` when given; returns the Figure."""
    show = np.unique(np.linspace(0, len(layers) - 1, min(6, len(layers))).round().astype(int))
    fig = _figure((max(2.1 * len(show), 7.5) + 1.0, 6.0))
    grid = fig.add_gridspec(2, len(show), height_ratios=[1.4, 1])
    ax = fig.add_subplot(grid[0, :])
    names = layer_labels(list(layers))
    ax.plot(range(len(layers)), radii, "o-", color="#1f77b4")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("layer (network order)")
    ax.set_ylabel("ERF radius (pixels)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{model_label(model)}: effective receptive field (Luo et al. 2016)"
                 + (f", n={n_images} images" if n_images else ""), fontsize=10)
    image = None
    for j, i in enumerate(show):
        sub = fig.add_subplot(grid[1, j])
        m = maps[i] / max(float(maps[i].max()), 1e-12)
        image = sub.imshow(m, cmap="viridis", vmin=0, vmax=1)
        sub.set_title(f"{names[i]}\n{radii[i]:.1f} px", fontsize=7)
        sub.set_xticks([])
        sub.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=fig.axes[1:], shrink=0.8).set_label("|gradient| (max = 1)", fontsize=7)
    if path is not None:
        save_figure_atomic(fig, path, dpi=150)
    return fig
