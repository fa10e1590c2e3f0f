"""Attribution probes on the model itself (captum), scored by the pointing game on the ``shapes`` masks.

Methods
-------
* ``"ig"`` -- Integrated Gradients (:class:`captum.attr.IntegratedGradients`, Gauss-Legendre quadrature
  (captum's default rule), ``n_steps`` nodes, default 16) from a baseline image: ``"zero"`` (all zeros in the
  *normalised* input space, i.e. the preprocessing's mean colour everywhere) or ``"mean"`` (each image's own
  per-channel mean, a flat image of its average colour). The pixel map is ``Σ_channels |attribution|``.
* ``"gradcam"`` -- Grad-CAM (:class:`captum.attr.LayerGradCam`, ``relu_attributions=True``) at one layer:
  a (B, C, h, w) map, a channels-last (B, h, w, C) map (``layout="nhwc"``) or (B, T, D) tokens, whose
  ``num_prefix_tokens`` leading tokens are dropped and the rest reshaped row-major to the patch ``grid``
  (gh, gw). The layer's output is routed through a reshaping identity module (a forward hook; the values
  are unchanged) so that captum sees a (B, D, gh, gw) map. The h × w map is upsampled to the input size
  (bilinear, ``align_corners=False``; :meth:`captum.attr.LayerAttribution.interpolate`).

Both attribute the logit of the *target* class: the model's predicted class (default) or given labels.

Pointing game (Zhang et al. 2016, "Top-down neural attention by excitation backprop")
-------------------------------------------------------------------------------------
A hit when the attribution map's arg-max pixel (first in row-major order on ties) lies on the object mask
(in model-input coordinates), or within ``tolerance`` pixels of it in the Chebyshev (max-coordinate) sense:
the mask is dilated by a (2·tolerance + 1)² square. The default tolerance is 0 (exact); Zhang et al. used
15 px at 224 px. A *degenerate* map (constant, e.g. an all-zero Grad-CAM after the ReLU) counts as a miss
and is counted in ``degenerate``. ``accuracy = hits / n``.

:func:`store_pointing_game` rebuilds a store's model (:func:`hooks.models.registry.reload_model`) and its first
``n`` input images (:func:`hooks.gradients.erf.store_images`); the masks are re-rendered from the shapes sample ids
and passed through the same preprocessing transform as the images (mean 0, std 1, threshold 0.5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from repsim.errors import UsageError

from hooks.capture.activations import select_tensor

__all__ = ["METHODS", "attribution_maps", "pointing_game", "pointing_hits", "store_masks", "store_pointing_game"]

METHODS = ("ig", "gradcam")
BASELINES = ("zero", "mean")


class _ToGrid(nn.Module):
    """Identity on a layer's output that exposes it as a (B, C, h, w) map through ``self.as_map``."""

    def __init__(self, num_prefix_tokens: int = 0, grid: tuple[int, int] | None = None, layout: str = "auto"):
        super().__init__()
        self.npt, self.grid, self.layout = int(num_prefix_tokens), grid, layout
        self.as_map = nn.Identity()

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        if out.ndim == 4:
            if self.layout == "nhwc":
                return self.as_map(out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return self.as_map(out)
        if out.ndim == 3:
            if self.grid is None:
                raise UsageError("Grad-CAM on tokens needs the patch grid (gh, gw) and the number of prefix tokens")
            gh, gw = self.grid
            B, T, D = out.shape
            if T - self.npt != gh * gw:
                raise UsageError(f"{T} tokens = {self.npt} prefix + {T - self.npt} patch tokens do not match the "
                                 f"grid {gh}x{gw}")
            patches = out[:, self.npt:, :].transpose(1, 2).reshape(B, D, gh, gw)
            patches = self.as_map(patches).reshape(B, D, gh * gw).transpose(1, 2)
            return torch.cat([out[:, : self.npt, :], patches], dim=1)
        raise UsageError(f"Grad-CAM needs a (B, C, h, w) map or (B, T, D) tokens, got shape {tuple(out.shape)}")


def _parts(model: Any) -> tuple[nn.Module, Any]:
    module = getattr(model, "module", model)
    if not isinstance(module, nn.Module):
        raise UsageError(f"expected a LoadedModel or an nn.Module, got {type(model).__name__}")
    return module, getattr(model, "info", None)


def _forward(module: nn.Module):
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = select_tensor(module(x))[0]
        if out.ndim != 2:
            raise UsageError(f"the model's output has shape {tuple(out.shape)}; attribution needs (B, classes) logits")
        return out

    return fn


def _default_layer(module: nn.Module) -> str:
    """The last ``blocks`` entry of a transformer, else the last Conv2d module."""
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks):
        return f"blocks.{len(blocks) - 1}"
    convs = [name for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UsageError("no layer given for Grad-CAM and the model has no conv layer or blocks: pass layer=")
    return convs[-1]


def attribution_maps(model: Any, images: torch.Tensor, targets: torch.Tensor, *, method: str = "ig",
                     layer: str | None = None, baseline: str = "zero", n_steps: int = 16,
                     num_prefix_tokens: int | None = None, grid: tuple[int, int] | None = None,
                     layout: str = "auto") -> torch.Tensor:
    """(B, H, W) float32 attribution maps of ``images`` (B, 3, H, W) for the class indices ``targets`` (B,)."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    module, info = _parts(model)
    module.eval()
    fn = _forward(module)
    x = images.detach().float()
    t = targets.to(x.device).long()
    if method == "ig":
        if baseline not in BASELINES:
            raise UsageError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
        if n_steps < 2:
            raise UsageError(f"n_steps must be >= 2, got {n_steps}")
        base = torch.zeros_like(x) if baseline == "zero" else x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
        with torch.enable_grad():
            attr = IntegratedGradients(fn).attribute(x, baselines=base, target=t, n_steps=int(n_steps),
                                                     internal_batch_size=max(1, x.shape[0]) * int(n_steps))
        return attr.detach().abs().sum(dim=1).float()
    if method == "gradcam":
        path = layer or _default_layer(module)
        try:
            sub = module.get_submodule(path)
        except AttributeError:
            raise UsageError(f"no module {path!r} in the model") from None
        npt = num_prefix_tokens if num_prefix_tokens is not None else int(getattr(info, "num_prefix_tokens", 0) or 0)
        g = grid if grid is not None else getattr(info, "grid", None)
        proxy = _ToGrid(npt, tuple(g) if g is not None else None, layout).to(x.device)

        def hook(_m, _inp, out):
            if not isinstance(out, torch.Tensor):
                raise UsageError(f"layer {path} returns a {type(out).__name__}, not a tensor: choose another layer")
            return proxy(out)

        handle = sub.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                cam = LayerGradCam(fn, proxy.as_map).attribute(x, target=t, relu_attributions=True)
        finally:
            handle.remove()
        cam = LayerAttribution.interpolate(cam.detach().float(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
        return cam[:, 0]
    raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def pointing_hits(maps: torch.Tensor, masks: torch.Tensor | np.ndarray, tolerance: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hits bool (B,), points int (B, 2) as (y, x), degenerate bool (B,))`` of maps (B, H, W) on masks."""
    maps = torch.as_tensor(maps).detach().float().cpu()
    m = torch.as_tensor(np.asarray(masks), dtype=torch.float32)
    if m.shape != maps.shape:
        raise UsageError(f"masks of shape {tuple(m.shape)} do not match the attribution maps {tuple(maps.shape)}")
    if tolerance < 0:
        raise UsageError(f"tolerance must be >= 0 pixels, got {tolerance}")
    if tolerance:
        k = 2 * int(tolerance) + 1
        m = F.max_pool2d(m[:, None], kernel_size=k, stride=1, padding=int(tolerance))[:, 0]
    B, H, W = maps.shape
    flat = maps.reshape(B, -1)
    idx = flat.argmax(dim=1)
    ys, xs = idx // W, idx % W
    degenerate = (flat.max(dim=1).values == flat.min(dim=1).values) | ~torch.isfinite(flat).all(dim=1)
    hit = (m[torch.arange(B), ys, xs] > 0.5) & ~degenerate
    return hit.numpy(), torch.stack([ys, xs], dim=1).numpy(), degenerate.numpy()


def pointing_game(model: Any, images: torch.Tensor, masks: torch.Tensor | np.ndarray, method: str = "ig",
                  layer: str | None = None, target: Any = None, *, baseline: str = "zero", n_steps: int = 16,
                  tolerance: int = 0, batch_size: int = 8, num_prefix_tokens: int | None = None,
                  grid: tuple[int, int] | None = None, layout: str = "auto") -> dict[str, Any]:
    """Pointing-game accuracy of ``method`` attributions (module docstring).

    model : a :class:`hooks.models.registry.LoadedModel` or an ``nn.Module`` returning (B, classes) logits
    images : (B, 3, H, W) preprocessed inputs, on the model's device; masks : (B, H, W) bool object masks
    target : None (the predicted class), an int, or per-image class indices (B,)
    layer : Grad-CAM layer (module path); default the last ``blocks`` entry, else the last Conv2d
    num_prefix_tokens, grid, layout : token / channels-last geometry of the Grad-CAM layer (defaults from the
        LoadedModel's info, else 0 prefix tokens and channels-first)
    """
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    module, _ = _parts(model)
    module.eval()
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise UsageError(f"images must be (B, 3, H, W), got shape {tuple(x.shape)}")
    B = x.shape[0]
    masks = np.asarray(masks.cpu() if isinstance(masks, torch.Tensor) else masks).astype(bool)
    if masks.shape != (B, *x.shape[-2:]):
        raise UsageError(f"masks must be (B, H, W) = {(B, *x.shape[-2:])}, got {masks.shape}")
    if target is None:
        with torch.no_grad():
            targets = torch.cat([_forward(module)(x[i:i + batch_size]).argmax(dim=1)
                                 for i in range(0, B, batch_size)])
    elif isinstance(target, (int, np.integer)):
        targets = torch.full((B,), int(target), dtype=torch.long)
    else:
        targets = torch.as_tensor(np.asarray(target), dtype=torch.long).reshape(-1)
        if targets.numel() != B:
            raise UsageError(f"{targets.numel()} targets for {B} images")
    hits, points, degen = [], [], []
    for i in range(0, B, batch_size):
        maps = attribution_maps(model, x[i:i + batch_size], targets[i:i + batch_size], method=method, layer=layer,
                                baseline=baseline, n_steps=n_steps, num_prefix_tokens=num_prefix_tokens,
                                grid=grid, layout=layout)
        h, p, d = pointing_hits(maps, masks[i:i + batch_size], tolerance)
        hits.append(h)
        points.append(p)
        degen.append(d)
    hits_a = np.concatenate(hits) if hits else np.zeros(0, dtype=bool)
    return {"accuracy": float(hits_a.mean()) if B else float("nan"), "hits": hits_a.tolist(),
            "points": np.concatenate(points).tolist() if points else [], "n": int(B), "method": method,
            "layer": (layer or _default_layer(module)) if method == "gradcam" else None,
            "baseline": baseline if method == "ig" else None, "n_steps": int(n_steps) if method == "ig" else None,
            "tolerance": int(tolerance), "targets": targets.cpu().tolist(),
            "target": "predicted" if target is None else "given",
            "degenerate": int(np.concatenate(degen).sum()) if degen else 0}


def store_masks(store: Any, k: int, preprocessing: Any) -> np.ndarray:
    """Object masks (k, H, W) bool of a shapes store's first ``k`` samples in model-input coordinates: each
    re-rendered from its id and passed through ``preprocessing``'s transform (mean 0, std 1), threshold 0.5."""
    from PIL import Image

    from repsim.data.masks import shapes_masks

    if (store.attrs.get("dataset") or {}).get("name") != "shapes":
        raise UsageError(f"{store.path} was not extracted from the 'shapes' data set: the pointing game needs "
                         "its object masks (repsim extract --data shapes)")
    tf = dataclasses.replace(preprocessing, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).transform()
    out = []
    # id parsing, generator-version check and re-rendering: the shared ground truth of repsim.data.masks
    for mask in shapes_masks(store.ids[: min(k, store.n)]):
        img = Image.fromarray(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2))
        out.append(tf(img)[0].numpy() > 0.5)
    return np.stack(out)


def store_pointing_game(store: Any, method: str = "ig", n: int = 32, *, layer: str | None = None,
                        target: str = "predicted", baseline: str = "zero", n_steps: int = 16, tolerance: int = 0,
                        batch_size: int = 8, device: str = "cpu") -> dict[str, Any]:
    """Pointing game of the model a shapes store was extracted from, on the store's first ``n`` images.

    ``layer`` (Grad-CAM): a store layer name (its module path, grid and prefix tokens are read from the
    store); default the deepest token / map layer of the store. ``target``: ``"predicted"`` or ``"true"``
    (the store's labels: meaningful for a model trained on the shapes classes).
    """
    from hooks.gradients.erf import store_images
    from hooks.capture.layers import layer_layout
    from hooks.models.registry import reload_model

    if n < 1:
        raise UsageError(f"n must be >= 1, got {n}")
    if target not in ("predicted", "true"):
        raise UsageError(f"target must be 'predicted' or 'true', got {target!r}")
    loaded = reload_model(store.attrs)
    masks = store_masks(store, n, loaded.preprocessing)
    module = loaded.module.to(device)
    x = store_images(store, n, loaded.preprocessing.transform()).to(device)
    kwargs: dict[str, Any] = {}
    path = name = None
    if method == "gradcam":
        spatial = [ly for ly in store.layers if store.layer_info(ly).get("kind") in ("tokens", "map")]
        name = layer if layer is not None else (spatial[-1] if spatial else None)
        if name is None:
            raise UsageError(f"{store.path} has no token or map layer for Grad-CAM: pass layer=")
        info = store.layer_info(name)
        path = info.get("module")
        if not path or info.get("call_index") is not None:
            raise UsageError(f"layer {name!r} has no single module path: Grad-CAM needs one")
        kwargs = {"num_prefix_tokens": int(info.get("num_prefix_tokens") or 0),
                  "grid": tuple(info["grid"]) if info.get("grid") else None,
                  "layout": layer_layout(loaded.info.family, path, module)}
        if info.get("kind") == "tokens" and kwargs["grid"] is None:
            raise UsageError(f"layer {name!r} records no patch grid")
    labels = store.labels[: x.shape[0]] if target == "true" else None
    if labels is not None and (labels < 0).any():
        raise UsageError(f"{store.path} has unlabelled samples: use target='predicted'")
    res = pointing_game(loaded, x, masks, method=method, layer=path, target=labels, baseline=baseline,
                        n_steps=n_steps, tolerance=tolerance, batch_size=batch_size, **kwargs)
    res.update({"target": target, "store": str(store.path), "model": store.model_name,
                "store_layer": name})
    return res
