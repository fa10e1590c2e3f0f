"""Object-localisation probe: does a layer's token / map position know whether it lies on *the object*?

Only for stores extracted from repsim's procedural ``shapes`` data set (:mod:`repsim.shapes`), whose every
image has an exact ground-truth object mask.

Ground truth per token
----------------------
Each sample id ``shapes/v{V}/seed={S}/size={Z}/{i}`` names its scene; the mask is re-rendered with
:func:`repsim.shapes.render_shape_sample` ``(S, i, Z)`` (``V`` must equal the installed
:data:`repsim.shapes.GENERATOR_VERSION`, else the pixels could differ and the store is refused). The mask
(bool Z × Z) is carried into model-input coordinates by the geometry of the store's recorded preprocessing:
resized (PIL bilinear, on the float mask) to ``floor(H / crop_pct) × floor(W / crop_pct)`` and centre-cropped
to the input ``H × W`` (timm's evaluation transform; for the square shapes images the ``center``, ``squash``
and ``border`` crop modes agree). With ``crop_pct = 1`` and ``Z = H`` this is the identity. The *foreground
fraction* of grid cell (i, j) is the mean of that mask over the cell's input pixels, rows
``round(i·H/gh) … round((i+1)·H/gh)`` and columns likewise (a ViT's patch, a CNN map position's stride cell:
the same cells as :mod:`probes.localization`). A token is *foreground* when its fraction is > 0.5.

Probe
-----
Per layer, a linear classifier (``ridge``: :func:`probes.linear.ridge_classify`, default; or ``logreg``:
:func:`probes.linear.fit_logreg`) maps one token's representation (D,) to foreground / background. Images,
not tokens, are split with a seeded permutation (the split of :mod:`probes.localization`): the first
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
  i.e. the mean foreground token share, a second trivial reference.

:func:`object_localization` runs the probe on every token / map layer (vector layers skipped) and
:meth:`ObjectLocalizationResult.plot` draws IoU against depth.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from repsim.errors import UsageError
from repsim.json_output import jsonable, write_json_atomic

from probes.localization import _bounds, _image_split, _select_images, grid_positions, layer_tokens

__all__ = [
    "FOREGROUND_THRESHOLD",
    "ObjectLocalizationResult",
    "ObjectLocalizationRow",
    "foreground_fractions",
    "input_masks",
    "object_localization",
    "parse_shapes_id",
    "shapes_masks",
    "token_iou",
]

FOREGROUND_THRESHOLD = 0.5
_ID = re.compile(r"^shapes/v(\d+)/seed=(\d+)/size=(\d+)/(\d+)$")
DEFINITION = ("token foreground := fraction of the cell's input pixels on the object mask > 0.5; "
              "iou_mean = mean over test images with >= 1 true foreground token of |pred & true| / |pred | true|; "
              "iou_pooled = sum |pred & true| / sum |pred | true| over test images; "
              "baseline = predict background everywhere")


# ----------------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------------


def parse_shapes_id(sample_id: str) -> tuple[int, int, int, int]:
    """``(generator_version, seed, size, index)`` of a shapes sample id; UsageError for anything else."""
    m = _ID.match(str(sample_id))
    if m is None:
        raise UsageError(f"sample id {sample_id!r} is not a shapes id (shapes/v<V>/seed=<S>/size=<Z>/<i>)")
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


def _check_shapes_store(store: Any) -> None:
    d = (getattr(store, "attrs", {}) or {}).get("dataset") or {}
    if d.get("name") != "shapes":
        raise UsageError(f"{getattr(store, 'path', 'the store')} was extracted from the {d.get('name')!r} data set: "
                         "object localisation needs the ground-truth masks of the 'shapes' data set "
                         "(repsim extract --data shapes)")


def shapes_masks(ids: Sequence[str]) -> np.ndarray:
    """Ground-truth masks (n, Z, Z) bool of shapes samples, re-rendered from their ids (module docstring)."""
    from repsim.shapes import GENERATOR_VERSION, render_shape_sample

    out = []
    for sid in ids:
        version, seed, size, index = parse_shapes_id(sid)
        if version != GENERATOR_VERSION:
            raise UsageError(f"sample {sid!r} was made by shapes generator v{version}, this repsim has "
                             f"v{GENERATOR_VERSION}: its masks cannot be reproduced; re-extract the store")
        out.append(render_shape_sample(seed, index, size)[1])
    if len({m.shape for m in out}) > 1:
        raise UsageError("the store mixes shapes samples of several sizes")
    return np.stack(out) if out else np.zeros((0, 1, 1), dtype=bool)


def _prep_geometry(prep: dict[str, Any]) -> tuple[int, int, float]:
    size = prep.get("img_size")
    if size is None:
        raise UsageError("the store records no preprocessing img_size: token cells cannot be placed on the input")
    H, W = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))
    crop_pct = float(prep.get("crop_pct") or 1.0)
    return H, W, crop_pct


def input_masks(masks: np.ndarray, img_size: tuple[int, int], crop_pct: float = 1.0) -> np.ndarray:
    """Masks (n, Z, Z) carried to model-input coordinates: float32 (n, H, W) in [0, 1] (resize the float mask
    bilinearly to floor(H/crop_pct) x floor(W/crop_pct), centre crop H x W, as timm's eval transform does)."""
    H, W = img_size
    sh, sw = int(math.floor(H / crop_pct)), int(math.floor(W / crop_pct))
    top, left = int(round((sh - H) / 2.0)), int(round((sw - W) / 2.0))
    out = np.empty((len(masks), H, W), dtype=np.float32)
    for k, m in enumerate(np.asarray(masks)):
        im = Image.fromarray(np.asarray(m, dtype=np.float32), mode="F")
        if im.size != (sw, sh):
            im = im.resize((sw, sh), Image.Resampling.BILINEAR)
        a = np.asarray(im, dtype=np.float32)[top: top + H, left: left + W]
        if a.shape != (H, W):
            raise UsageError(f"cannot crop {H}x{W} from the resized {sh}x{sw} mask")
        out[k] = np.clip(a, 0.0, 1.0)
    return out


def foreground_fractions(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each grid cell's pixels on the object: float32 (n, gh·gw), row-major cells of ``masks``
    (n, H, W) (bool or float coverage)."""
    m = np.asarray(masks, dtype=np.float32)
    n, H, W = m.shape
    gh, gw = grid
    if gh > H or gw > W:
        raise UsageError(f"grid {gh}x{gw} is finer than the input {H}x{W}")
    cols = [m[:, r0:r1, c0:c1].mean(axis=(1, 2)) for r0, r1 in _bounds(H, gh) for c0, c1 in _bounds(W, gw)]
    return np.stack(cols, axis=1).astype(np.float32)


def token_iou(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-image IoU (n,) of boolean token sets (n, P) (NaN where the true set is empty) and the pooled IoU
    (NaN when every union is empty)."""
    pred, true = np.asarray(pred, dtype=bool), np.asarray(true, dtype=bool)
    inter = (pred & true).sum(axis=1).astype(np.float64)
    union = (pred | true).sum(axis=1).astype(np.float64)
    per = np.where(true.any(axis=1), inter / np.maximum(union, 1), np.nan)
    pooled = float(inter.sum() / union.sum()) if union.sum() > 0 else float("nan")
    return per, pooled


# ----------------------------------------------------------------------------------------------------
# Probe
# ----------------------------------------------------------------------------------------------------


@dataclass
class ObjectLocalizationRow:
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


@dataclass
class ObjectLocalizationResult:
    """Foreground-probe IoU per layer, in network order."""

    rows: list[ObjectLocalizationRow]
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

    def row(self, layer: str) -> ObjectLocalizationRow:
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

    def to_json(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """JSON-ready dict (kind ``repsim.object_localization``); written atomically to ``path`` when given."""
        d = jsonable({"kind": "repsim.object_localization", "rows": [asdict(r) for r in self.rows],
                       "protocol": self.protocol, "store": self.store, "seconds": self.seconds,
                       "definition": self.definition})
        if path is not None:
            write_json_atomic(path, d)
        return d

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """Test IoU (mean over images and pooled) against depth, with the all-foreground reference; saved to
        ``path`` when given; returns the Figure."""
        from matplotlib.figure import Figure

        from repsim.cka_plot import short_layer_names

        x = np.arange(len(self.rows))
        fig = Figure(figsize=(min(5 + 0.4 * len(x), 14), 3.8))
        ax = fig.subplots()
        ax.plot(x, [r.iou_mean for r in self.rows], marker="o", label="IoU (mean over test images)")
        ax.plot(x, [r.iou_pooled for r in self.rows], marker="s", ls="--", label="IoU (pooled)")
        ax.plot(x, [r.all_foreground_iou for r in self.rows], ls=":", color="0.5", label="all-foreground IoU")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("foreground-token IoU (test)")
        ax.set_xticks(x)
        ax.set_xticklabels(short_layer_names(self.layers), rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("layer (network order)")
        ax.set_title(f"linear object-localisation probe ({self.protocol.get('method')}, "
                     f"n = {self.protocol.get('n_images')})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        if path is not None:
            fig.savefig(os.fspath(path), dpi=150)
        return fig


def _probe_layer(tokens: np.ndarray, labels: np.ndarray, split: tuple[np.ndarray, np.ndarray, np.ndarray],
                 method: str, lambdas: np.ndarray, device: str) -> dict[str, Any]:
    from probes.linear import fit_logreg, ridge_classify

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
    return {"iou_mean": mean(per), "iou_pooled": pooled, "n_scored_images": int(scored.sum()), "accuracy": float((pred == true).mean()),
            "train_accuracy": float((train_pred == labels[fit_rows].reshape(-1).astype(bool)).mean()),
            "baseline_accuracy": float(1.0 - true.mean()), "baseline_iou": mean(base_per),
            "all_foreground_iou": mean(allfg_per), "foreground_share": float(true.mean()),
            "lam": float(fit.lam), "n_train_images": int(tr.size), "n_val_images": int(va.size),
            "n_test_images": int(te.size)}


def object_localization(store: Any, layers: Sequence[str] | None = None, *,
                        images: int | Sequence[int] | None = None, method: str = "ridge",
                        test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 0,
                        lambdas: Sequence[float] | None = None, device: str = "auto",
                        progress: bool = False) -> ObjectLocalizationResult:
    """Linear foreground-token probe per layer of a ``shapes`` store (module docstring).

    ``layers``: default every token / map layer with a known grid (vector layers skipped); a vector layer
    named explicitly is refused. ``images``: how many of the first rows or explicit row indices (default the
    first 512). ``method``: ``ridge`` (default) or ``logreg``. The image split is seeded by ``seed``.
    """
    from probes.linear import DEFAULT_LAMBDAS
    from repsim.devices import resolve_device

    t0 = time.perf_counter()
    _check_shapes_store(store)
    if method not in ("ridge", "logreg"):
        raise UsageError(f"method must be ridge or logreg, got {method!r}")
    if layers is None:
        chosen = []
        for lay in store.layers:
            try:
                grid_positions(store.layer_info(lay), lay)
            except UsageError:
                continue
            chosen.append(lay)
        if not chosen:
            raise UsageError(f"{store.path} has no token or map layer with a known grid to probe")
    else:
        chosen = list(layers)
        for lay in chosen:
            grid_positions(store.layer_info(lay), lay)  # raises for vector layers / unknown grids
    rows_idx = _select_images(store, images)
    ids = store.ids
    H, W, crop_pct = _prep_geometry((store.attrs.get("preprocessing") or {}))
    masks = input_masks(shapes_masks([ids[int(r)] for r in rows_idx]), (H, W), crop_pct)
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
        kind = grid_positions(store.layer_info(lay), lay)[0]
        tokens, grid = layer_tokens(store, lay, rows_idx)
        labels = (foreground_fractions(masks, grid) > FOREGROUND_THRESHOLD).astype(np.int64)
        r = _probe_layer(tokens, labels, split, method, lam, dev)
        out.append(ObjectLocalizationRow(layer=lay, kind=kind, grid=list(grid), seconds=time.perf_counter() - t1,
                                         **r))
    d = store.attrs.get("dataset") or {}
    protocol = {"method": method, "n_images": int(rows_idx.size), "test_fraction": test_fraction,
                "val_fraction": val_fraction, "seed": int(seed), "threshold": FOREGROUND_THRESHOLD,
                "input_size": [H, W], "crop_pct": crop_pct, "split": "by image, seeded permutation",
                "lambdas": [float(v) for v in lam]}
    store_info = {"path": str(store.path), "fingerprint": d.get("fingerprint"),
                  "model": (store.attrs.get("model") or {}).get("name"), "n": int(store.n),
                  "dataset": d.get("name")}
    return ObjectLocalizationResult(rows=out, protocol=protocol, store=store_info, seconds=time.perf_counter() - t0)
