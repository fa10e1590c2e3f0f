"""Figures of an :class:`repsim.attention_summary.AttentionReport`.

- :func:`plot_distance_vs_depth`: one dot per head, mean attention distance (px) against layer depth (the ViT
  paper's Fig. 7 / Raghu et al. 2021 Fig. 3), coloured by head kind; several reports can share the axes.
- :func:`plot_aligned_maps`: the aligned aggregated attention map of every layer × head (Walmer et al. 2023),
  the query at the centre cell.
- :func:`plot_rollout`: attention-rollout maps (Abnar & Zuidema 2020) of the first kept images, over the
  images when the store saved its inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from repsim.cka_plot import model_label, short_layer_names
from repsim.errors import UsageError

if TYPE_CHECKING:
    from repsim.attention_summary import AttentionReport
    from repsim.store import ActivationStore

KIND_COLOURS = {
    "strict_local": "#d62728",
    "soft_local": "#ff7f0e",
    "offset_local": "#9467bd",
    "axial": "#2ca02c",
    "global": "#1f77b4",
}
MARKERS = ("o", "s", "^", "D", "v", "P")


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_distance_vs_depth(reports: "AttentionReport | Sequence[AttentionReport]", ax: Any = None) -> Any:
    """Scatter of every head's mean attention distance (px) against its layer's depth; returns the Axes."""
    plt = _pyplot()
    if not isinstance(reports, Sequence):
        reports = [reports]
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    rng = np.random.default_rng(0)  # horizontal jitter so heads with equal distance stay visible
    for r_i, report in enumerate(reports):
        marker = MARKERS[r_i % len(MARKERS)]
        for layer in report.layers:
            for h in layer.heads:
                x = layer.depth + (rng.uniform(-0.15, 0.15) if len(reports) == 1 else (r_i - (len(reports) - 1) / 2) * 0.2)
                ax.scatter(x, h.distance_px, s=22, marker=marker, color=KIND_COLOURS.get(h.kind, "grey"),
                           edgecolors="black", linewidths=0.3, zorder=3)
    first = reports[0]
    top = max((h.distance_px for r in reports for ly in r.layers for h in ly.heads), default=1.0)
    uniform = [(ly.depth, ly.uniform_distance_px) for ly in first.layers if ly.uniform_distance_px is not None]
    if uniform:
        xs, ys = zip(*uniform)
        ax.plot(xs, ys, "--", color="grey", lw=1, zorder=2, label="uniform attention")
        top = max(top, max(ys))
    ax.set_ylim(0, top * 1.08)  # from 0, as in the ViT paper: local heads sit near the bottom
    names = short_layer_names([ly.layer for ly in first.layers])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("layer (network order)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.grid(alpha=0.3, zorder=0)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, markeredgecolor="black", label=k.replace("_", " "))
               for k, c in KIND_COLOURS.items()]
    if uniform:
        handles.append(plt.Line2D([], [], ls="--", color="grey", label="uniform attention"))
    if len(reports) > 1:
        handles += [plt.Line2D([], [], marker=MARKERS[i % len(MARKERS)], ls="", color="grey", label=r.model)
                    for i, r in enumerate(reports)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="head kind",
              title_fontsize=7, frameon=False)
    title = " vs ".join(model_label(r.model) for r in reports)
    ax.set_title(f"{title}: attention distance per head (n={first.n} images)", fontsize=10)
    return ax


def plot_aligned_maps(report: "AttentionReport", max_layers: int | None = None) -> Any:
    """Grid of aligned attention maps, layers as rows and heads as columns; returns the Figure."""
    plt = _pyplot()
    layers = report.layers[:max_layers] if max_layers else report.layers
    n_heads = max(ly.num_heads for ly in layers)
    fig, axes = plt.subplots(len(layers), n_heads, figsize=(1.1 * n_heads + 1.5, 1.1 * len(layers) + 0.8),
                             squeeze=False, constrained_layout=True)
    names = short_layer_names([ly.layer for ly in layers])
    image = None
    for i, layer in enumerate(layers):
        maps = report.aligned[layer.layer]
        # log scale: the centre cell of local heads otherwise hides everything else
        for h in range(n_heads):
            ax = axes[i, h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= layer.num_heads:
                ax.axis("off")
                continue
            m = maps[h]
            image = ax.imshow(np.log10(np.maximum(m, 1e-6)), cmap="magma", vmin=-4, vmax=0)
            gh, gw = (m.shape[0] + 1) // 2, (m.shape[1] + 1) // 2
            ax.plot(gw - 1, gh - 1, "+", color="cyan", ms=4, mew=0.8)
            head = layer.heads[h]
            ax.set_title(f"{head.kind.replace('_', ' ')}", fontsize=5, pad=1,
                         color=KIND_COLOURS.get(head.kind, "black"))
            if h == 0:
                ax.set_ylabel(names[i], fontsize=6)
            if i == len(layers) - 1:
                ax.set_xlabel(f"head {h}", fontsize=6)
    if image is not None:
        cbar = fig.colorbar(image, ax=axes, shrink=min(0.6, 4.0 / len(layers)), pad=0.01)
        cbar.set_label("log10 attention (aligned, normalised)", fontsize=7)
    fig.suptitle(f"{model_label(report.model)}: aligned attention maps (query at the + ; n={report.n})", fontsize=9)
    return fig


def plot_rollout(maps: np.ndarray, images: np.ndarray | None, model: str) -> Any:
    """Rollout maps (k, gh, gw), over the input images (k, 3, H, W; normalised pixels) when given."""
    plt = _pyplot()
    k = maps.shape[0]
    rows = 2 if images is not None else 1
    fig, axes = plt.subplots(rows, k, figsize=(2.2 * k, 2.2 * rows + 0.4), squeeze=False, constrained_layout=True)
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
    fig.suptitle(f"{model_label(model)}: attention rollout (Abnar & Zuidema 2020)", fontsize=9)
    return fig


def figure_paths(path: str | os.PathLike) -> dict[str, str]:
    """Where :func:`plot_attention_report` writes: ``path`` and two siblings with _aligned / _rollout."""
    root, ext = os.path.splitext(os.fspath(path))
    ext = ext or ".png"
    return {"distance": root + ext, "aligned": f"{root}_aligned{ext}", "rollout": f"{root}_rollout{ext}"}


def plot_attention_report(report: "AttentionReport", path: str | os.PathLike | None,
                          store: "ActivationStore | None" = None, rollout_images: int = 4) -> dict[str, Any]:
    """Draw the three figures; save them to :func:`figure_paths` of ``path`` when given.

    The rollout figure needs ``store`` with kept maps (``--attn-keep``); it is skipped otherwise. Returns
    ``{"distance": Axes, "aligned": Figure, "rollout": Figure | None, "paths": [...]}``.
    """
    plt = _pyplot()
    from repsim.attention_summary import store_rollout

    out: dict[str, Any] = {"paths": []}
    targets = figure_paths(path) if path is not None else {}
    ax = plot_distance_vs_depth(report)
    out["distance"] = ax
    figures = {"distance": ax.figure, "aligned": plot_aligned_maps(report)}
    out["aligned"] = figures["aligned"]
    out["rollout"] = None
    if store is not None and report.attn_keep > 0:
        try:
            maps = store_rollout(store, rollout_images)
        except UsageError:  # hierarchical models (Swin): rollout is not defined; skip that figure
            maps = None
        if maps is not None:
            images = store.read_inputs(0, maps.shape[0]) if store.has_inputs else None
            figures["rollout"] = out["rollout"] = plot_rollout(maps, images, report.model)
    for key, fig in figures.items():
        if key in targets:
            fig.savefig(targets[key], dpi=150)
            out["paths"].append(targets[key])
        if path is not None:
            plt.close(fig)
    return out


def plot_erf(layers: Sequence[str], radii: Sequence[float], maps: Sequence[np.ndarray], model: str,
             path: str | os.PathLike | None = None, n_images: int | None = None) -> Any:
    """Effective-receptive-field radius (px) per layer, on the same axis as attention distance, with the
    ERF maps of up to 6 layers; saved to ``path`` when given; returns the Figure."""
    plt = _pyplot()
    show = np.unique(np.linspace(0, len(layers) - 1, min(6, len(layers))).round().astype(int))
    fig = plt.figure(figsize=(2.0 * max(len(show), 3), 5.2), constrained_layout=True)
    grid = fig.add_gridspec(2, len(show), height_ratios=[1.3, 1])
    ax = fig.add_subplot(grid[0, :])
    names = short_layer_names(list(layers))
    ax.plot(range(len(layers)), radii, "o-", color="#1f77b4")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("layer (network order)")
    ax.set_ylabel("ERF radius (pixels)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{model_label(model)}: effective receptive field" + (f" (n={n_images} images)" if n_images else ""), fontsize=10)
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
        fig.savefig(os.fspath(path), dpi=150)
        plt.close(fig)
    return fig
