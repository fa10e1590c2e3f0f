"""The ``timm:`` loader (and the short names, which are timm ids): pretrained weights from the hub or a URL.

Weights are looked up in the caches first and fetched through :mod:`hooks.models.downloads`; timm is then
pointed at the local file, so it never consults the hub itself.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from hooks.capture.layers import infer_family
from hooks.models.downloads import (
    _hf_cached,
    _hub_fetch,
    _hub_record,
    _offline_error,
    _url_cached,
    _url_fetch,
    hf_cache_dir,
    torch_hub_checkpoints_dir,
)
from hooks.models.loaded import ModelInfo, _check_patch_multiple, _pair_or_none, _read_geometry
from hooks.models.preprocess import Preprocessing
from hooks.models.weights import apply_state_dict, load_state_dict_file, sha256_file
from repsim.errors import UsageError

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin")
#: the safetensors twin that timm prefers over a pickled file of the same repo (timm.models._hub)
_SAFE_TWIN = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


def _timm_hub_filenames(cfg: Any) -> list[str]:
    """The files timm would load from the hub for this config, in its order of preference."""
    name = getattr(cfg, "hf_hub_filename", None)
    if name:
        return [_SAFE_TWIN[name], name] if name in _SAFE_TWIN else [name]
    return list(_HF_WEIGHT_FILES[:2])


def _timm_weights_location(cfg: Any, revision: str | None = None) -> tuple[str | None, str | None]:
    """(cached file or None, where the cache would be) for a timm pretrained config; never downloads."""
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        hit = _hf_cached(hub_id, _timm_hub_filenames(cfg), revision)
        if hit:
            return hit, None
    hit = _url_cached(getattr(cfg, "url", None))
    if hit:
        return hit, None
    if hub_id:
        return None, f"the Hugging Face cache {hf_cache_dir()} (hub repo {hub_id.partition('@')[0]})"
    if getattr(cfg, "url", None):
        fname = os.path.basename(urlparse(cfg.url).path)
        return None, f"the torch hub cache {torch_hub_checkpoints_dir()} (file {fname})"
    return None, None


def _timm_fetch(cfg: Any, tag: str, what: str, *, offline: bool, revision: str | None) -> tuple[str, dict[str, Any]]:
    """(local weights file, provenance record) for a timm pretrained config: cache first, then hub, then URL."""
    cached, where = _timm_weights_location(cfg, revision)
    hub_id = getattr(cfg, "hf_hub_id", None)
    repo = hub_id.partition("@")[0] if hub_id else None
    path = cached
    if path is None and not offline:
        if hub_id:
            path = _hub_fetch(hub_id, _timm_hub_filenames(cfg), revision=revision, offline=False, what=what)
        if path is None and getattr(cfg, "url", None):
            path = _url_fetch(cfg.url, offline=False, what=what)
    if path is None:
        if offline:
            raise _offline_error(what, where or "the timm cache")
        raise UsageError(f"{what}: the hub repo {repo} has none of {', '.join(_timm_hub_filenames(cfg))} and timm "
                         "names no other source; pass --weights FILE")
    if repo and "snapshots" in os.path.abspath(path).split(os.sep):
        return path, _hub_record(path, hub_id=repo, tag=tag)
    return path, {"kind": "hub", "tag": tag, "url": cfg.url, "cache_file": os.path.abspath(path),
                  "sha256": sha256_file(path)}


def _classifier_names(cfg: Any) -> list[str]:
    clf = getattr(cfg, "classifier", None) or "head"
    return [clf] if isinstance(clf, str) else list(clf)


def _timm_create(ident: str, img_size: int | None, **kwargs: Any) -> nn.Module:
    import timm

    if img_size is not None:
        try:
            return timm.create_model(ident, img_size=img_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            # CNNs take any input size: only the preprocessing changes.
    return timm.create_model(ident, **kwargs)


def _load_timm(name: str, ident: str, weights: str | None, random_init: bool, img_size: int | None, *,
               offline: bool = False, revision: str | None = None) -> tuple[nn.Module, ModelInfo, Preprocessing]:
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, _ = split_model_name_tag(ident)
    cfg = get_pretrained_cfg(ident)
    full_id = f"{arch}.{cfg.tag}" if cfg is not None and cfg.tag else arch
    kwargs: dict[str, Any] = {}
    state = None
    if weights:
        sd, digest = load_state_dict_file(weights)
        state = (sd, digest)
        # Size the classifier like the file (a CIFAR fine-tune has 10 classes; a backbone file has none).
        if cfg is not None:
            heads = [c for c in _classifier_names(cfg) if f"{c}.weight" in sd]
            if heads:
                kwargs["num_classes"] = int(sd[f"{heads[0]}.weight"].shape[0])
            elif not any(k.startswith(tuple(c + "." for c in _classifier_names(cfg))) for k in sd):
                kwargs["num_classes"] = 0
        kwargs["pretrained"] = False
        record: dict[str, Any] | None = None
    elif random_init:
        kwargs["pretrained"] = False
        record = {"kind": "random"}
    else:
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise UsageError(f"timm has no pretrained weights for {ident}: use --random-init or --weights FILE")
        if getattr(cfg, "custom_load", False) == "hf":
            raise UsageError(f"{full_id} uses a custom hub loader that repsim does not run; use --weights FILE")
        cached, record = _timm_fetch(cfg, full_id, f"{name} ({full_id})", offline=offline, revision=revision)
        # Point timm at the local file: it then never consults the hub itself. custom_load (the original .npz
        # loader of the AugReg ViTs) applies only to the URL file, not to the hub's safetensors.
        is_url_file = bool(cfg.url) and os.path.basename(urlparse(cfg.url).path) == os.path.basename(cached)
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = {"file": cached, "custom_load": bool(cfg.custom_load) and is_url_file}
    try:
        module = _timm_create(ident, img_size, **kwargs)
    except UsageError:
        raise
    except (RuntimeError, AssertionError, ValueError, TypeError, KeyError) as err:
        at = f" at img_size {img_size}" if img_size else ""
        msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UsageError(f"timm could not build {full_id}{at}: {msg}") from err
    if state is not None:
        record = apply_state_dict(module, state[0], weights, state[1])  # type: ignore[arg-type]
    module.eval()

    data_cfg = _timm_data_config(module)
    prep = Preprocessing(
        img_size=tuple(data_cfg["input_size"][1:]), mean=data_cfg["mean"], std=data_cfg["std"],
        interpolation=data_cfg["interpolation"] if data_cfg["interpolation"] in ("bicubic", "bilinear", "nearest")
        else "bicubic",
        crop_pct=data_cfg["crop_pct"], crop_mode=data_cfg.get("crop_mode") or "center",
    )
    if img_size is not None:
        prep = prep.with_overrides(img_size=img_size)
    prefix, patch, grid = _read_geometry(module)
    family = infer_family(module)
    if family == "levit":
        # LeViT's stem is four stride-2 convolutions: its token grid is the stem output, read back by running it.
        with torch.no_grad():
            h, w = module.stem(torch.zeros(1, 3, *prep.img_size)).shape[-2:]
        patch, grid = (16, 16), (int(h), int(w))
    pit_conv = getattr(getattr(module, "patch_embed", None), "conv", None) if type(module).__name__ == \
        "PoolingVisionTransformer" else None
    if isinstance(pit_conv, nn.Conv2d) and grid is not None:
        # PiT's patch convolution overlaps (kernel 16, stride 8): the token stride is the conv stride, and the
        # grid covers (g - 1)·stride + kernel - 2·padding px (224 at 27 × 27), not g·kernel
        k, st, pd = (_pair_or_none(v) for v in (pit_conv.kernel_size, pit_conv.stride, pit_conv.padding))
        patch = st
        covered = tuple((grid[i] - 1) * st[i] + k[i] - 2 * pd[i] for i in range(2))
        if covered != tuple(prep.img_size):
            raise UsageError(f"{full_id} was built for {covered[0]}x{covered[1]} px, not {prep.img_size[0]}x"
                             f"{prep.img_size[1]}; pass --img-size to build it at that size")
    elif grid is not None:
        _check_patch_multiple(prep.img_size, patch, full_id)
        if patch and (grid[0] * patch[0], grid[1] * patch[1]) != prep.img_size:
            raise UsageError(f"{full_id} was built for {grid[0] * patch[0]}x{grid[1] * patch[1]} px, not "
                             f"{prep.img_size[0]}x{prep.img_size[1]}; pass --img-size to build it at that size")
    info = ModelInfo(
        name=name, source="timm", source_id=full_id, family=family, weights=record or {"kind": "random"},
        num_prefix_tokens=prefix, patch_size=patch, grid=grid, num_classes=int(getattr(module, "num_classes", 0) or 0),
    )
    return module, info, prep


def _timm_data_config(module: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(module)
