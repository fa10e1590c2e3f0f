"""Effective receptive fields of convolutional layers: the CNN counterpart of attention distance.

Luo et al. 2016 ("Understanding the Effective Receptive Field in Deep CNNs"): the gradient of a layer's
centre unit with respect to the input image shows which pixels that unit actually depends on. Per layer we
take the output map (B, C, h, w), sum its centre position over channels (the channel average up to a
constant), back-propagate to the input, and average |gradient| over colour channels and images: an
(H, W) map. Its *radius* is the |gradient|-weighted mean distance in pixels from the centre unit's position
in the input,

    radius = Σ_p |g(p)| · ‖p − c‖ / Σ_p |g(p)|,

the same statistic as the mean attention distance (attention weights ↔ normalised gradient magnitudes), so
CNN and ViT layers share one axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from repsim.errors import UsageError

from hooks.capture import select_tensor

if TYPE_CHECKING:
    from repsim.store import ActivationStore


@dataclass
class ERFResult:
    """Effective receptive field of one layer: ``radius_px``, the radius (pixels) of the image-averaged
    |gradient| map, and that map (H, W) normalised to sum 1."""

    layer: str
    radius_px: float
    map: np.ndarray
    centre_px: tuple[float, float]  # (y, x) of the centre unit in input pixels


def _centre(size: int, out_size: int) -> tuple[int, float]:
    """Index of the centre unit of an axis of ``out_size`` and its centre in input pixels."""
    i = (out_size - 1) // 2
    return i, (i + 0.5) * size / out_size - 0.5


def erf_radius(grad_map: np.ndarray, centre: tuple[float, float]) -> float:
    """|gradient|-weighted mean distance (pixels) of ``grad_map`` (H, W) from ``centre`` (y, x)."""
    g = np.abs(np.asarray(grad_map, dtype=np.float64))
    total = g.sum()
    if not total > 0:
        return float("nan")
    ys, xs = np.mgrid[0 : g.shape[0], 0 : g.shape[1]]
    dist = np.hypot(ys - centre[0], xs - centre[1])
    return float((g * dist).sum() / total)


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
                total = g.sum()
                results.append(ERFResult(layer=path, radius_px=erf_radius(g, (cy, cx)),
                                         map=(g / total if total > 0 else g).astype(np.float32),
                                         centre_px=(float(cy), float(cx))))
    finally:
        for h in handles:
            h.remove()
    return results


def store_images(store: "ActivationStore", k: int, transform) -> torch.Tensor:
    """The first ``k`` preprocessed images of a store: its saved inputs, else its data set reopened from
    the recorded provenance (refused unless the sample fingerprint still matches)."""
    from repsim.data import open_dataset

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
    return torch.stack([transform(source.load(where[sid])) for sid in ids])


def store_erf(store: "ActivationStore", images: int = 8, device: str = "cpu") -> list[ERFResult]:
    """ERFs of every map layer of the model a store was extracted from, on the store's first ``images``."""
    from hooks.layers import layer_layout
    from hooks.registry import reload_model

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
