"""The ``torchvision:`` loader: torchvision image classifiers with their published default weights.

torchvision's weight files are fetched into the torch hub cache through :mod:`hooks.models.downloads` (their
names carry a hash prefix, checked on download); the provenance records the file's sha256.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from torch import nn

from hooks.capture.layers import infer_family
from hooks.models.downloads import _offline_error, _url_cached, _url_fetch, torch_hub_checkpoints_dir
from hooks.models.loaded import ModelInfo, _check_patch_multiple, _pair_or_none
from hooks.models.preprocess import Preprocessing, crop_pct_for, default_preprocessing
from hooks.models.weights import apply_state_dict, load_state_dict_file, sha256_file
from repsim.errors import UsageError


def _load_torchvision(name: str, ident: str, weights: str | None, random_init: bool, img_size: int | None, *,
                      offline: bool = False, revision: str | None = None) -> tuple[nn.Module, ModelInfo, Preprocessing]:
    from torchvision.models import get_model, get_model_weights

    try:
        default = get_model_weights(ident).DEFAULT
    except (ValueError, KeyError, AttributeError):
        default = None
    kwargs: dict[str, Any] = {}
    if img_size is not None and ident.startswith("vit_"):
        kwargs["image_size"] = img_size  # torchvision ViTs size their position embedding at construction
    if weights or random_init:
        build_weights = None
    else:
        if default is None:
            raise UsageError(f"torchvision has no pretrained weights for {ident}: use --random-init or --weights FILE")
        # torchvision's file names carry a hash prefix, checked on download; get_model then reads the cache.
        if _url_fetch(default.url, offline=offline, what=f"torchvision:{ident} ({default})") is None:
            raise _offline_error(f"torchvision:{ident} ({default})",
                                 f"the torch hub cache {torch_hub_checkpoints_dir()} (file "
                                 f"{os.path.basename(urlparse(default.url).path)})")
        build_weights = default
    try:
        module = get_model(ident, weights=build_weights, **kwargs)
    except (ValueError, RuntimeError, TypeError, AssertionError) as err:
        msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UsageError(f"torchvision could not build {ident}: {msg}") from err
    if weights:
        sd, digest = load_state_dict_file(weights)
        record = apply_state_dict(module, sd, weights, digest)
    elif random_init:
        record = {"kind": "random"}
    else:
        assert default is not None
        cache_file = _url_cached(default.url)
        assert cache_file is not None
        record = {"kind": "hub", "tag": str(default), "url": default.url, "cache_file": cache_file,
                  "sha256": sha256_file(cache_file)}
    module.eval()
    if default is not None:
        t = default.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        interp = t.interpolation.value if t.interpolation.value in ("bicubic", "bilinear", "nearest") else "bilinear"
        prep = Preprocessing((crop, crop), tuple(t.mean), tuple(t.std), interp, crop_pct_for(crop, resize), "center")
    else:
        prep = default_preprocessing(224)
    if img_size is not None:
        prep = prep.with_overrides(img_size=img_size)
    prefix, patch, grid = 0, None, None
    if hasattr(module, "class_token") and hasattr(module, "patch_size") and hasattr(module, "image_size"):
        # torchvision VisionTransformer: one class token, a fixed square patch grid
        prefix = 1
        patch = _pair_or_none(module.patch_size)
        grid = (module.image_size // module.patch_size, module.image_size // module.patch_size)
        _check_patch_multiple(prep.img_size, patch, ident)
        if (module.image_size, module.image_size) != prep.img_size:
            raise UsageError(f"torchvision:{ident} is built for {module.image_size} px; pass --img-size to change both")
    info = ModelInfo(
        name=name, source="torchvision", source_id=ident, family=infer_family(module), weights=record,
        num_prefix_tokens=prefix, patch_size=patch, grid=grid, num_classes=_tv_num_classes(module),
    )
    return module, info, prep


def _tv_num_classes(module: nn.Module) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else 0
