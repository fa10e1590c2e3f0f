"""Effective receptive fields of convolutional layers: the CNN counterpart of attention distance.

Luo et al. 2016 ("Understanding the Effective Receptive Field in Deep CNNs", Sec. 2): the gradient of a
layer's centre unit with respect to the input image shows which pixels that unit actually depends on. Per
layer we take the output map (B, C, h, w), sum its centre position (row ``(h-1)//2``, column ``(w-1)//2``:
top-left of centre on even grids) over channels (the channel average up to a constant), back-propagate to
the input, and average |gradient| over colour channels and images: an (H, W) map ``g``. With weights
``ĝ(p) = |g(p)| / Σ_q |g(q)|`` over input pixels ``p = (y, x)``:

    centroid μ = Σ_p ĝ(p) · p                              (pixels, (y, x))
    radius     = Σ_p ĝ(p) · ‖p − μ‖                        (pixels: the spread about the centroid)
    offset     = μ − c                                     (pixels, (dy, dx); c = the unit's centre in the input)

The radius is the same statistic as the mean attention distance (attention weights ↔ normalised gradient
magnitudes), so CNN and ViT layers share one axis. It is measured about the gradient's own centroid, not
about ``c``: the mean distance from ``c`` (``radius_from_centre_px``, what was reported before) mixes the
field's spread with its offset — an even grid's centre unit sits half a stride off the image centre, and
padding and strided convolutions shift the field off the unit's centre (timm ResNets: a stride-2 3 × 3
convolution with padding 1 puts unit ``i`` on input pixel ``2i``, not on ``2i + 0.5``) — and the two are
reported separately. By the triangle inequality ``|radius_from_centre − radius| ≤ ‖offset‖``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from repsim.errors import UsageError

from hooks.capture.activations import select_tensor

if TYPE_CHECKING:
    from repsim.store.reader import ActivationStore


@dataclass
class ERFResult:
    """Effective receptive field of one layer (see the module docstring for the formulas).

    radius_px : mean distance (pixels) of the image-averaged |gradient| map from its own centroid: the
        field's spread
    map : that |gradient| map (H, W), normalised to sum 1
    centre_px : (y, x) of the centre unit's centre in input pixels, ``(i + 0.5)·H/h − 0.5``
    centroid_px : (y, x) |gradient|-weighted centroid in input pixels
    offset_px : (dy, dx) = centroid − centre, pixels: how far the field sits off the unit
    radius_from_centre_px : mean distance from ``centre_px`` instead of the centroid (mixes spread and
        offset; the statistic reported before the two were separated)
    """

    layer: str
    radius_px: float
    map: np.ndarray
    centre_px: tuple[float, float]
    centroid_px: tuple[float, float] = (float("nan"), float("nan"))
    offset_px: tuple[float, float] = (float("nan"), float("nan"))
    radius_from_centre_px: float = float("nan")

    @property
    def offset_norm_px(self) -> float:
        """‖offset_px‖ in pixels."""
        return float(np.hypot(*self.offset_px))


def _centre(size: int, out_size: int) -> tuple[int, float]:
    """Index of the centre unit of an axis of ``out_size`` and its centre in input pixels."""
    i = (out_size - 1) // 2
    return i, (i + 0.5) * size / out_size - 0.5


def _weights(grad_map: np.ndarray) -> np.ndarray | None:
    g = np.abs(np.asarray(grad_map, dtype=np.float64))
    if g.ndim != 2:
        raise UsageError(f"an ERF map must be 2-d (H, W), got shape {g.shape}")
    total = g.sum()
    return g / total if total > 0 else None


def erf_centroid(grad_map: np.ndarray) -> tuple[float, float]:
    """|gradient|-weighted centroid (y, x) in pixels of ``grad_map`` (H, W); (nan, nan) when it is all 0."""
    w = _weights(grad_map)
    if w is None:
        return float("nan"), float("nan")
    ys, xs = np.mgrid[0 : w.shape[0], 0 : w.shape[1]]
    return float((w * ys).sum()), float((w * xs).sum())


def erf_radius(grad_map: np.ndarray, centre: tuple[float, float] | None = None) -> float:
    """|gradient|-weighted mean distance (pixels) of ``grad_map`` (H, W) from ``centre`` (y, x).

    ``centre=None`` (the ERF radius): about the map's own centroid (:func:`erf_centroid`), the spread alone.
    nan for an all-zero map.
    """
    w = _weights(grad_map)
    if w is None:
        return float("nan")
    if centre is None:
        centre = erf_centroid(w)
    ys, xs = np.mgrid[0 : w.shape[0], 0 : w.shape[1]]
    return float((w * np.hypot(ys - centre[0], xs - centre[1])).sum())


def erf_result(layer: str, grad_map: np.ndarray, centre: tuple[float, float]) -> ERFResult:
    """All ERF statistics of one |gradient| map (H, W) whose unit sits at ``centre`` (y, x) pixels."""
    g = np.abs(np.asarray(grad_map, dtype=np.float64))
    total = g.sum()
    mu = erf_centroid(g)
    return ERFResult(layer=layer, radius_px=erf_radius(g), map=(g / total if total > 0 else g).astype(np.float32),
                     centre_px=(float(centre[0]), float(centre[1])), centroid_px=mu,
                     offset_px=(mu[0] - float(centre[0]), mu[1] - float(centre[1])),
                     radius_from_centre_px=erf_radius(g, centre))


def effective_receptive_fields(
    module: nn.Module, layers: Sequence[str], images: torch.Tensor, *, layout: dict[str, str] | None = None
) -> list[ERFResult]:
    """ERF of each of ``layers`` (module paths with (B, C, h, w) outputs) over ``images`` (B, 3, H, W).

    One forward pass; one backward per layer (``retain_graph``). Layers whose output is not a spatial map
    (tokens, vectors) are refused. ``layout[path] == "nhwc"`` marks channels-last outputs (timm Swin,
    ConvNeXt interiors).
    """
    layout = layout or {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for path in layers:
        try:
            sub = module.get_submodule(path)
        except AttributeError:
            raise UsageError(f"no module {path!r} in the model") from None

        def hook(_m, _inp, out, _p=path):
            outputs.setdefault(_p, select_tensor(out)[0])

        handles.append(sub.register_forward_hook(hook))
    module.eval()
    x = images.detach().clone().float().requires_grad_(True)
    try:
        with torch.enable_grad():
            module(x)
            results = []
            for path in layers:
                out = outputs.get(path)
                if out is None:
                    raise UsageError(f"layer {path} did not run during the forward pass")
                if layout.get(path) == "nhwc" and out.ndim == 4:
                    out = out.permute(0, 3, 1, 2)
                if out.ndim != 4:
                    raise UsageError(f"layer {path} gives shape {tuple(out.shape)}: the ERF needs (B, C, h, w) maps")
                h, w = out.shape[-2:]
                iy, cy = _centre(x.shape[-2], h)
                ix, cx = _centre(x.shape[-1], w)
                (grad,) = torch.autograd.grad(out[:, :, iy, ix].sum(), x, retain_graph=True)
                g = grad.abs().mean(dim=(0, 1)).double().cpu().numpy()  # mean over images and colour channels
                results.append(erf_result(path, g, (cy, cx)))
    finally:
        for h in handles:
            h.remove()
    return results


def store_images(store: "ActivationStore", k: int, transform) -> torch.Tensor:
    """The first ``k`` model inputs of a store: its saved inputs, else its data set reopened from the recorded
    provenance (refused unless the sample ids are found again), preprocessed, and perturbed as recorded in the
    store's ``perturbation`` attribute (``extract --perturb``: the saved inputs are already perturbed), so the
    ERF and attributions of a perturbed store see the pixels its activations came from."""
    from repsim.data.sources import open_dataset
    from repsim.data.perturbations import Perturbation

    k = min(k, store.n)
    if store.has_inputs:
        return torch.from_numpy(store.read_inputs(0, k).astype(np.float32))
    d = store.attrs["dataset"]
    size = store.attrs["preprocessing"].get("img_size")
    size = int(size[0]) if isinstance(size, (list, tuple)) else int(size or 224)
    source = open_dataset(d.get("root") or d["name"], n=int(d["n"]) + len(d.get("skipped", [])),
                          seed=int(d.get("seed", 0)), image_size=size)
    where = {sid: i for i, sid in enumerate(source.ids)}
    ids = store.ids[:k]
    if any(sid not in where for sid in ids):
        raise UsageError(f"the images of {store.path} cannot be found again from its provenance "
                         f"({d.get('root') or d['name']}): re-extract with --save-inputs")
    x = torch.stack([transform(source.load(where[sid])) for sid in ids])
    recorded = store.attrs.get("perturbation")
    return x if recorded is None else Perturbation.from_dict(recorded).apply(x, list(ids))


def store_erf(store: "ActivationStore", images: int = 8, device: str = "cpu") -> list[ERFResult]:
    """ERFs of every map layer of the model a store was extracted from, on the store's first ``images``."""
    from hooks.capture.layers import layer_layout
    from hooks.models.registry import reload_model

    if images < 1:
        raise UsageError(f"--erf-images must be >= 1, got {images}")
    maps = [ly for ly in store.layers if store.layer_info(ly).get("kind") == "map"]
    if not maps:
        raise UsageError(f"{store.path} has no spatial-map layers (pooled with --pool, or a transformer): "
                         "the ERF needs (C, H, W) layers")
    loaded = reload_model(store.attrs)
    module = loaded.module.to(device)
    x = store_images(store, images, loaded.preprocessing.transform()).to(device)
    paths = [store.layer_info(ly)["module"] for ly in maps]
    if len(set(paths)) != len(paths):
        raise UsageError("a module called several times per forward: the ERF is defined per call, not supported")
    family = loaded.info.family
    layout = {p: layer_layout(family, p, module) for p in paths}
    results = effective_receptive_fields(module, paths, x, layout=layout)
    for r, name in zip(results, maps):
        r.layer = name
    return results
