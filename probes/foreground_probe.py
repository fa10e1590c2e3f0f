"""Object-localisation probe: does a layer's token / map position know whether it lies on *the object*?

Only for stores extracted from repsim's procedural ``shapes`` data set (:mod:`repsim.data.shapes`), whose every
image has an exact ground-truth object mask.

Ground truth per token
----------------------
Each sample id ``shapes/v{V}/seed={S}/size={Z}/{i}`` names its scene; the mask is re-rendered with
:func:`repsim.data.shapes.render_shape_sample` ``(S, i, Z)`` (``V`` must equal the installed
:data:`repsim.data.shapes.GENERATOR_VERSION`, else the pixels could differ and the store is refused). The mask
(bool Z × Z) is carried into model-input coordinates by the geometry of the store's recorded preprocessing:
resized (PIL bilinear, on the float mask) to ``floor(H / crop_pct) × floor(W / crop_pct)`` and centre-cropped
to the input ``H × W`` (timm's evaluation transform; for the square shapes images the ``center``, ``squash``
and ``border`` crop modes agree). With ``crop_pct = 1`` and ``Z = H`` this is the identity. The *foreground
fraction* of grid cell (i, j) is the mean of that mask over the cell's input pixels, rows
``round(i·H/gh) … round((i+1)·H/gh)`` and columns likewise (a ViT's patch, a CNN map position's stride cell:
the same cells as :mod:`probes.localisation`). A token is *foreground* when its fraction is > 0.5.

Probe
-----
Per layer, a linear classifier (``ridge``: :func:`probes.solvers.ridge_classify`, default; or ``logreg``:
:func:`probes.solvers.fit_logreg`) maps one token's representation (D,) to foreground / background. Images,
not tokens, are split with a seeded permutation (the split of :mod:`probes.localisation`): the first
``1 − test_fraction`` (80 %) of the images give the training tokens, of those ``val_fraction`` of the images
pick the regularisation strength, then the probe is refit on train + val. On the test images:

* ``iou_mean``: mean over the test images of ``|pred ∩ true| / |pred ∪ true|`` (predicted vs true foreground
  token sets of the image). Images without any true foreground token (possible on coarse grids, where no
  cell is more than half covered) have no defined IoU and are left out of this mean; ``n_scored_images``
  says how many were kept (NaN when none). Their false positives still count in the pooled IoU and in
  the accuracy;
* ``iou_pooled``: intersections and unions summed over *all* test images, then divided;
* ``accuracy``: token accuracy; ``baseline_accuracy``: accuracy of predicting *background everywhere*
  (whose IoU, ``baseline_iou``, is 0 by construction);
* ``all_foreground_iou``: mean IoU (same images as ``iou_mean``) of predicting *foreground everywhere*,
  i.e. the mean foreground token share, a second trivial reference;
* uncertainty: ``iou_low`` / ``iou_high``, a 95 % percentile bootstrap of ``iou_mean`` over the scored test
  images, and ``gain_over_all_foreground`` (``iou_mean − all_foreground_iou``, paired by image) with
  ``gain_low`` / ``gain_high``; ``predicted_foreground_share``: the share of test tokens the probe calls
  foreground.

Coarse grids: on a 2 × 2 map (a ResNet's last stage at 64 px) a cell is a quarter of the image and is rarely
more than half covered by the shape, so only a few percent of the cells are foreground. The least-squares
probe then predicts *background everywhere* (``predicted_foreground_share`` = 0), its accuracy equals the
always-background baseline and its IoU is exactly 0: this says the grid is too coarse for the 0.5 rule, not that
the layer has lost the object. :func:`plot_object_localisation` draws such layers as hollow markers and says so.

:func:`object_localisation` runs the probe on every token / map layer (vector layers skipped) and
:meth:`ObjectLocalisationResult.plot` draws IoU against depth.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from repsim.errors import UsageError
from repsim.results import Result, save_figure_atomic
# the ground truth lives in the library (attention segmentation scores against the same cells); re-exported
from repsim.data.masks import (FOREGROUND_THRESHOLD, _preprocessing_geometry, foreground_fractions, input_masks,
                          parse_shapes_id, shapes_masks, store_input_masks, token_iou)

from probes.localisation import _image_split, _positioned_layers, _select_images, layer_grid, layer_tokens

__all__ = [
    "FOREGROUND_THRESHOLD",
    "ObjectLocalisationResult",
    "ObjectLocalisationRow",
    "foreground_fractions",
    "input_masks",
    "object_localisation",
    "parse_shapes_id",
    "plot_object_localisation",
    "shapes_masks",
    "token_iou",
]

DEFINITION = ("token foreground := fraction of the cell's input pixels on the object mask > 0.5; "
              "iou_mean = mean over test images with >= 1 true foreground token of |pred & true| / |pred | true|; "
              "iou_pooled = sum |pred & true| / sum |pred | true| over test images; "
              "baseline = predict background everywhere")


# ----------------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------------


def _check_shapes_store(store: Any) -> None:
    d = (getattr(store, "attrs", {}) or {}).get("dataset") or {}
    if d.get("name") != "shapes":
        raise UsageError(f"{getattr(store, 'path', 'the store')} was extracted from the {d.get('name')!r} data set: "
                         "object localisation needs the ground-truth masks of the 'shapes' data set "
                         "(repsim extract --data shapes)")


# ----------------------------------------------------------------------------------------------------
# Probe
# ----------------------------------------------------------------------------------------------------


@dataclass
class ObjectLocalisationRow:
    layer: str
    kind: str
    grid: list[int]
    iou_mean: float
    iou_pooled: float
    accuracy: float
    train_accuracy: float
    baseline_accuracy: float
    baseline_iou: float
    all_foreground_iou: float
    foreground_share: float  # share of foreground tokens among the test tokens
    n_scored_images: int  # test images with >= 1 true foreground token (those averaged in iou_mean)
    lam: float
    n_train_images: int
    n_val_images: int
    n_test_images: int
    seconds: float = 0.0
    predicted_foreground_share: float = float("nan")  # share of test tokens the probe calls foreground
    iou_low: float = float("nan")  # 95 % percentile bootstrap of iou_mean over the scored test images
    iou_high: float = float("nan")
    gain_over_all_foreground: float = float("nan")  # iou_mean - all_foreground_iou (paired by image)
    gain_low: float = float("nan")
    gain_high: float = float("nan")


@dataclass
class ObjectLocalisationResult(Result):
    """Foreground-probe IoU per layer, in network order."""

    result_kind: ClassVar[str] = "repsim.object_localization"

    rows: list[ObjectLocalisationRow]
    protocol: dict[str, Any]
    store: dict[str, Any]
    seconds: float
    definition: str = DEFINITION

    @property
    def layers(self) -> list[str]:
        return [r.layer for r in self.rows]

    @property
    def iou(self) -> np.ndarray:
        return np.array([r.iou_mean for r in self.rows])

    def row(self, layer: str) -> ObjectLocalisationRow:
        for r in self.rows:
            if r.layer == layer:
                return r
        raise UsageError(f"no result for layer {layer!r}")

    def summary(self) -> str:
        lines = [f"{'layer':<28} {'grid':>7} {'IoU':>6} {'pooled':>7} {'acc%':>6} {'base%':>6}"]
        for r in self.rows:
            lines.append(f"{r.layer[-28:]:<28} {'x'.join(map(str, r.grid)):>7} {r.iou_mean:>6.3f} "
                         f"{r.iou_pooled:>7.3f} {100 * r.accuracy:>6.1f} {100 * r.baseline_accuracy:>6.1f}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """Test IoU against depth with its 95 % bootstrap interval and the all-foreground reference; see
        :func:`plot_object_localisation`. Saved to ``path`` when given; returns the Figure."""
        label = (self.store.get("model") or "model") if isinstance(self.store, dict) else "model"
        return plot_object_localisation({label: self}, path)


def plot_object_localisation(results: dict[str, "ObjectLocalisationResult"],
                             path: str | os.PathLike | None = None) -> Any:
    """IoU of the foreground-token probe against depth, one curve per result (label → result).

    Error bars: 95 % bootstrap over the scored test images. Dotted, same colour: the all-foreground IoU of that
    model's grid (the trivial reference; it depends on the grid, so each model has its own). Hollow markers:
    layers where the probe predicts no foreground token at all (IoU 0 by construction; a grid too coarse for
    the > 50 % rule, see the module docstring), annotated with the grid. One model: x is the layer (names);
    several: relative depth. Returns the Figure; saved to ``path`` when given.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from repsim.plotting.cka_map import short_layer_names

    several = len(results) > 1
    width = 7.5 if several else min(5 + 0.45 * max(len(r.rows) for r in results.values()), 14)
    fig = Figure(figsize=(width, 4.4), layout="constrained")
    ax = fig.subplots()
    notes = []
    for k, (name, res) in enumerate(results.items()):
        c = f"C{k}"
        m = len(res.rows)
        x = np.linspace(0, 1, m) if several else np.arange(m)
        iou = np.array([r.iou_mean for r in res.rows], dtype=float)
        lo = np.array([r.iou_low for r in res.rows], dtype=float)
        hi = np.array([r.iou_high for r in res.rows], dtype=float)
        err = np.vstack([np.clip(iou - lo, 0, None), np.clip(hi - iou, 0, None)])
        err = np.where(np.isfinite(err), err, 0.0)
        ax.errorbar(x, iou, yerr=err, color=c, marker="o", ms=5, capsize=2.5, lw=1.5, label=name)
        ax.plot(x, [r.all_foreground_iou for r in res.rows], ls=":", color=c, lw=1.2)
        dead = [i for i, r in enumerate(res.rows) if r.predicted_foreground_share == 0]
        if dead:
            ax.plot(x[dead], iou[dead], ls="", marker="o", ms=7, mfc="white", mec=c, mew=1.5, zorder=4)
            r0 = res.rows[dead[0]]
            grid = "x".join(map(str, r0.grid))
            notes.append(f"{name} {', '.join(short_layer_names(res.layers)[i] for i in dead)} ({grid} grid): "
                         f"{100 * r0.foreground_share:.1f}% of cells > half on the object, so the probe "
                         "predicts background everywhere (IoU 0)")
        if not several:
            ax.set_xticks(x)
            ax.set_xticklabels(short_layer_names(res.layers), rotation=60, ha="right", fontsize=8)
    first = next(iter(results.values()))
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], ls=":", color="0.3"))
    labels.append("all cells foreground (reference, per model)")
    if any(r.predicted_foreground_share == 0 for res in results.values() for r in res.rows):
        handles.append(Line2D([], [], ls="", marker="o", mfc="white", mec="0.3"))
        labels.append("probe predicts no foreground")
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_ylim(-0.02, 1.0)
    ax.set_ylabel("foreground-cell IoU, test images (95% CI)")
    ax.set_xlabel("relative depth (first tap = 0, last = 1)" if several else "layer (network order)")
    ax.grid(alpha=0.3)
    p = first.protocol
    fig.suptitle(f"Where is the object? Linear foreground probe per token / map position ({p.get('method')}, "
                 f"n = {p.get('n_images')} images,\n{round(p.get('test_fraction', 0.2) * p.get('n_images', 0))} "
                 "of them for testing; a cell is foreground when > 50% of its pixels are on the shape)", fontsize=9)
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, color="0.25", va="bottom", ha="left", wrap=True)
        fig.get_layout_engine().set(rect=(0, 0.07 * len(notes), 1, 1 - 0.07 * len(notes)))
    if path is not None:
        save_figure_atomic(fig, path, dpi=150)
    return fig


def _probe_layer(tokens: np.ndarray, labels: np.ndarray, split: tuple[np.ndarray, np.ndarray, np.ndarray],
                 method: str, lambdas: np.ndarray, device: str, seed: int = 0) -> dict[str, Any]:
    from probes.solvers import fit_logreg, ridge_classify
    from repsim.measures.intervals import bootstrap_mean

    n, P, D = tokens.shape
    tr, va, te = split
    fit_rows = np.concatenate([tr, va])
    if np.unique(labels[tr]).size < 2 or np.unique(labels[fit_rows]).size < 2:
        raise UsageError("the training images hold only one token class (all foreground or all background)")
    yv = labels[va].reshape(-1)
    Xtr, ytr = tokens[tr].reshape(-1, D), labels[tr].reshape(-1)
    Xv = tokens[va].reshape(-1, D)
    if method == "ridge":
        fit = ridge_classify(Xtr, ytr, Xv, yv, lambdas, refit=True, device=device)
    else:
        fit = fit_logreg(Xtr, ytr, Xv, yv, lambdas, refit=True, device=device)
    pred = np.asarray(fit.predict(tokens[te].reshape(-1, D))).reshape(te.size, P).astype(bool)
    true = labels[te].astype(bool)
    per, pooled = token_iou(pred, true)
    base_per, _ = token_iou(np.zeros_like(true), true)
    allfg_per, _ = token_iou(np.ones_like(true), true)
    train_pred = np.asarray(fit.predict(tokens[fit_rows].reshape(-1, D))).astype(bool)
    scored = np.isfinite(per)
    mean = (lambda v: float(np.mean(v[scored])) if scored.any() else float("nan"))  # noqa: E731
    ci = bootstrap_mean(per, seed=seed)
    gain = bootstrap_mean(per, allfg_per, seed=seed)
    return {"iou_mean": mean(per), "iou_pooled": pooled, "n_scored_images": int(scored.sum()),
            "predicted_foreground_share": float(pred.mean()), "iou_low": ci["low"], "iou_high": ci["high"],
            "gain_over_all_foreground": gain["value"], "gain_low": gain["low"], "gain_high": gain["high"],
            "accuracy": float((pred == true).mean()),
            "train_accuracy": float((train_pred == labels[fit_rows].reshape(-1).astype(bool)).mean()),
            "baseline_accuracy": float(1.0 - true.mean()), "baseline_iou": mean(base_per),
            "all_foreground_iou": mean(allfg_per), "foreground_share": float(true.mean()),
            "lam": float(fit.lam), "n_train_images": int(tr.size), "n_val_images": int(va.size),
            "n_test_images": int(te.size)}


def object_localisation(store: Any, layers: Sequence[str] | None = None, *,
                        images: int | Sequence[int] | None = None, method: str = "ridge",
                        test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 0,
                        lambdas: Sequence[float] | None = None, device: str = "auto",
                        progress: bool = False) -> ObjectLocalisationResult:
    """Linear foreground-token probe per layer of a ``shapes`` store (module docstring).

    ``layers``: default every token / map layer with a known grid (vector layers skipped); a vector layer
    named explicitly is refused. ``images``: how many of the first rows or explicit row indices (default the
    first 512). ``method``: ``ridge`` (default) or ``logreg``. The image split is seeded by ``seed``.
    """
    from probes.solvers import DEFAULT_LAMBDAS
    from repsim.devices import resolve_device

    t0 = time.perf_counter()
    _check_shapes_store(store)
    if method not in ("ridge", "logreg"):
        raise UsageError(f"method must be ridge or logreg, got {method!r}")
    chosen = _positioned_layers(store, layers, "to probe")
    rows_idx = _select_images(store, images)
    (H, W), crop_pct, _ = _preprocessing_geometry(store.attrs.get("preprocessing") or {})
    masks = store_input_masks(store, rows_idx)  # the ground truth attention segmentation scores against
    split = _image_split(rows_idx.size, test_fraction, val_fraction, seed)
    lam = np.asarray(DEFAULT_LAMBDAS if lambdas is None else lambdas, dtype=np.float64)
    dev = resolve_device(device)
    out = []
    it = chosen
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(chosen, desc="object localisation")
    for lay in it:
        t1 = time.perf_counter()
        kind = layer_grid(store.layer_info(lay), lay)[0]
        tokens, grid = layer_tokens(store, lay, rows_idx)
        labels = (foreground_fractions(masks, grid) > FOREGROUND_THRESHOLD).astype(np.int64)
        r = _probe_layer(tokens, labels, split, method, lam, dev, seed)
        out.append(ObjectLocalisationRow(layer=lay, kind=kind, grid=list(grid), seconds=time.perf_counter() - t1,
                                         **r))
    d = store.attrs.get("dataset") or {}
    protocol = {"method": method, "n_images": int(rows_idx.size), "test_fraction": test_fraction,
                "val_fraction": val_fraction, "seed": int(seed), "threshold": FOREGROUND_THRESHOLD,
                "input_size": [H, W], "crop_pct": crop_pct, "split": "by image, seeded permutation",
                "lambdas": [float(v) for v in lam]}
    store_info = {"path": str(store.path), "fingerprint": d.get("fingerprint"),
                  "model": (store.attrs.get("model") or {}).get("name"), "n": int(store.n),
                  "dataset": d.get("name")}
    return ObjectLocalisationResult(rows=out, protocol=protocol, store=store_info, seconds=time.perf_counter() - t0)
