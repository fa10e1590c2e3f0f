"""The ``hf:`` loader: a Hugging Face transformers vision model (hub id or local directory) as ``module(x)`` → logits.

Config, preprocessing and weights come from one hub commit (fetched through :mod:`hooks.models.downloads`) or
from a local directory; geometry (prefix tokens, patch grid) is read from the model's embedding parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hooks.models.downloads import _hf_cached, _hub_fetch, _hub_record, _offline_error, hf_cache_dir
from hooks.models.loaded import ModelInfo, _check_patch_multiple, _pair_or_none
from hooks.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, crop_pct_for, default_preprocessing
from hooks.models.weights import apply_state_dict, load_state_dict_file, sha256_file
from repsim.errors import UsageError


class HFImageModel(nn.Module):
    """Wraps a transformers vision model so that ``module(x)`` → logits (or ``last_hidden_state``).

    ``x`` is (B, 3, H, W) float32 pixel values, already normalised. ``interpolate_pos_encoding`` is passed when
    the model runs at another size than its position embeddings were trained for.
    """

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool = False):
        super().__init__()
        self.model = model
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate_pos_encoding else {}
        out = self.model(pixel_values=x, **kwargs)
        if isinstance(out, torch.Tensor):
            return out
        for key in ("logits", "last_hidden_state"):
            value = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
            if isinstance(value, torch.Tensor):
                return value
        raise UsageError(f"{type(self.model).__name__} returned neither logits nor last_hidden_state")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load progress bars (they would interleave with repsim's own)."""
    from transformers.utils import logging as tlog

    enabled = tlog.is_progress_bar_enabled()
    verbosity = tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()  # its load report is redundant: repsim checks missing keys itself
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if enabled:
            tlog.enable_progress_bar()


def _hf_file(ident: str, filename: str, revision: str | None = None) -> str | None:
    if os.path.isdir(ident):
        path = os.path.join(ident, filename)
        return path if os.path.isfile(path) else None
    return _hf_cached(ident, [filename], revision)


_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _hf_preprocessing(ident: str, config: Any, revision: str | None = None) -> Preprocessing:
    """Preprocessing from the local ``preprocessor_config.json`` (ImageNet defaults when there is none)."""
    import json

    image_size = getattr(config, "image_size", None) or 224
    base = default_preprocessing(image_size if isinstance(image_size, int) else tuple(image_size))
    path = _hf_file(ident, "preprocessor_config.json", revision)
    if path is None:
        warnings.warn(f"{ident} has no preprocessor_config.json: using ImageNet mean/std, bicubic, crop_pct 0.875",
                      stacklevel=3)
        return base
    with open(path) as f:
        p = json.load(f)
    mean = p.get("image_mean", IMAGENET_MEAN) if p.get("do_normalize", True) else (0.0, 0.0, 0.0)
    std = p.get("image_std", IMAGENET_STD) if p.get("do_normalize", True) else (1.0, 1.0, 1.0)
    resample = p.get("resample", 2)
    interp = _PIL_RESAMPLE.get(resample)
    if interp is None:
        warnings.warn(f"{ident}: PIL resample {resample} is not supported; using bicubic", stacklevel=3)
        interp = "bicubic"
    size = p.get("size") or {}
    crop = p.get("crop_size") or {}
    do_crop = bool(p.get("do_center_crop", False)) and crop
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if "height" in size and "width" in size:
        if do_crop:
            img = (int(crop["height"]), int(crop["width"]))
            return Preprocessing(img, mean, std, interp, crop_pct_for(img[0], int(size["height"])), "squash")
        # HF ViT-style processors resize straight to (height, width), ignoring the aspect ratio.
        return Preprocessing((int(size["height"]), int(size["width"])), mean, std, interp, 1.0, "squash")
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        if "crop_pct" in p and p["crop_pct"]:
            # ConvNeXt-style: resize shorter side to edge / crop_pct, crop edge.
            return Preprocessing((edge, edge), mean, std, interp, float(p["crop_pct"]), "center")
        if do_crop:
            img = (int(crop["height"]), int(crop["width"]))
            return Preprocessing(img, mean, std, interp, crop_pct_for(img[0], edge), "center")
        return Preprocessing((edge, edge), mean, std, interp, 1.0, "center")
    warnings.warn(f"{ident}: unrecognised processor size {size!r}; using the model's image_size", stacklevel=3)
    return dataclasses.replace(base, mean=tuple(mean), std=tuple(std), interpolation=interp)


def _hf_class(config: Any) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForImageClassification

    if type(config) in AutoModelForImageClassification._model_mapping:
        return AutoModelForImageClassification
    return AutoModel


def _hf_geometry(model: nn.Module, config: Any, img: tuple[int, int]) -> tuple[int, tuple[int, int] | None,
                                                                                  tuple[int, int] | None]:
    emb = next((m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "embeddings"), None)
    if emb is None or not hasattr(emb, "patch_embeddings"):
        return 0, None, None
    prefix = 0
    for attr in ("cls_token", "distillation_token"):
        if isinstance(getattr(emb, attr, None), torch.Tensor):
            prefix += 1
    reg = getattr(emb, "register_tokens", None)
    if isinstance(reg, torch.Tensor):
        prefix += int(reg.shape[1])
    patch = _pair_or_none(getattr(config, "patch_size", None))
    if patch is None:
        return prefix, None, None
    _check_patch_multiple(img, patch, "this model")
    return prefix, patch, (img[0] // patch[0], img[1] // patch[1])


def _hf_from_pretrained(cls: Any, ident: str, cache_dir: str | None,
                        revision: str | None = None) -> tuple[nn.Module, list[str], list[str]]:
    """Load a checkpoint with ``cls``; return the model, its missing keys (the pooler aside) and mis-sized keys.

    Always from local files (the caller has fetched them), at ``revision`` (the commit the config came from).
    """
    try:
        model, report = cls.from_pretrained(ident, local_files_only=True, attn_implementation="eager",
                                            output_loading_info=True, cache_dir=cache_dir, revision=revision)
    except (OSError, ValueError) as err:
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load hf:{ident}: {msg}") from None
    # A backbone's pooler (tanh(dense(CLS))) is often absent from classification checkpoints; no preset
    # records it, so its random init does not matter.
    missing = sorted(k for k in report.get("missing_keys", ()) if not k.startswith("pooler.") and ".pooler." not in k)
    return model, missing, [str(m) for m in report.get("mismatched_keys", ())]


_HF_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json")


def _hf_fetch_weights(ident: str, commit: str | None, *, offline: bool, what: str) -> tuple[str | None, list[str]]:
    """(weights file or index, shard files) of a hub transformers model at ``commit``, fetched when online."""
    import json

    path = _hub_fetch(ident, _HF_MODEL_FILES, revision=commit, offline=offline, what=what)
    shards: list[str] = []
    if path is not None and path.endswith(".index.json"):
        with open(path) as f:
            names = sorted(set(json.load(f).get("weight_map", {}).values()))
        for shard in names:
            got = _hub_fetch(ident, [shard], revision=commit, offline=offline, what=what)
            if got is None:
                if offline:
                    raise _offline_error(what, f"the Hugging Face cache {hf_cache_dir()} (hub repo {ident}, {shard})")
                raise UsageError(f"{what}: the index names {shard}, which the hub repo does not have")
            shards.append(got)
    return path, shards


def _load_hf(name: str, ident: str, weights: str | None, random_init: bool, img_size: int | None, *,
             offline: bool = False, revision: str | None = None) -> tuple[nn.Module, ModelInfo, Preprocessing]:
    from transformers import AutoConfig

    local = os.path.isdir(ident)
    if not local and (ident.startswith(("/", ".", "~")) or ident.count("/") > 1 or os.path.exists(ident)):
        raise UsageError(f"hf:{ident}: no such model directory (a hub id looks like org/name)")
    where = f"the Hugging Face cache {hf_cache_dir()} (hub repo {ident})"
    cache_dir = None if local else hf_cache_dir()  # the cache checked here is the one transformers reads
    commit = None
    if not local:
        # Fetch the small files first (no progress bar worth showing), then pin every later file to the
        # commit the config came from, so that config, preprocessing and weights are one revision.
        cfg_file = _hub_fetch(ident, ["config.json"], revision=revision, offline=offline, what=f"hf:{ident}")
        if cfg_file is None:
            if offline:
                raise _offline_error(f"hf:{ident}", where)
            raise UsageError(f"hub repo {ident} has no config.json: not a transformers model")
        parts = os.path.abspath(cfg_file).split(os.sep)
        commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else revision
        _hub_fetch(ident, ["preprocessor_config.json"], revision=commit, offline=offline, what=f"hf:{ident}")
    try:
        config = AutoConfig.from_pretrained(ident, local_files_only=True, cache_dir=cache_dir, revision=commit)
    except (OSError, ValueError, KeyError) as err:
        if local:
            msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise UsageError(f"{ident} is not a transformers model directory: {msg}") from None
        raise _offline_error(f"hf:{ident}", where) from None
    trained_size = getattr(config, "image_size", None)
    trained = _pair_or_none(trained_size) if trained_size is not None else None
    cls = _hf_class(config)
    interpolate = False
    shards: list[str] = []
    if not (weights or random_init):
        # Outside _quiet_transformers: a download shows the hub's progress bar.
        if local:
            path = next((p for p in (_hf_file(ident, f) for f in _HF_MODEL_FILES) if p), None)
            if path is None:
                raise UsageError(f"{ident} holds no model.safetensors / pytorch_model.bin; pass --weights FILE "
                                 "or --random-init")
        else:
            path, shards = _hf_fetch_weights(ident, commit, offline=offline, what=f"hf:{ident}")
            if path is None:
                if offline:
                    raise _offline_error(f"hf:{ident}", where)
                raise UsageError(f"hub repo {ident} holds no model.safetensors / pytorch_model.bin")
    with _quiet_transformers():
        if weights or random_init:
            if img_size is not None and trained is not None:
                config.image_size = img_size  # build the position embeddings for this size
                trained = (img_size, img_size)
            # Auto classes build from a config with from_config, concrete model classes with _from_config
            build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
            model = build(config, attn_implementation="eager")
            record: dict[str, Any] = {"kind": "random"}
            if weights:
                sd, digest = load_state_dict_file(weights)
                record = apply_state_dict(model, sd, weights, digest)
        else:
            model, missing, mismatched = _hf_from_pretrained(cls, ident, cache_dir, commit)
            if missing and not mismatched and cls.__name__ == "AutoModelForImageClassification" and all(
                    "classifier" in k for k in missing):
                # The config names no architecture and the checkpoint has no head: load the backbone.
                from transformers import AutoModel

                model, missing, mismatched = _hf_from_pretrained(AutoModel, ident, cache_dir, commit)
            if missing or mismatched:
                bad = [*missing, *(str(m) for m in mismatched)]
                raise UsageError(f"hf:{ident}: the checkpoint lacks or mis-sizes {len(bad)} weights of "
                                 f"{type(model).__name__} (e.g. {', '.join(bad[:4])}); they would be random")
            if local:
                record = {"kind": "file", "file": os.path.abspath(path), "sha256": sha256_file(path)}
            else:
                record = _hub_record(path, hub_id=ident, tag=ident, shards=shards)
    model.eval()
    prep = _hf_preprocessing(ident, config, commit)
    if img_size is not None:
        prep = prep.with_overrides(img_size=img_size)
    if trained is not None and prep.img_size != trained:
        # Position embeddings were trained for another size: ask for interpolation where the forward has
        # the switch (ViT, DeiT, BEiT), and check with one dry run that the model accepts this size at all
        # (DINOv2 always interpolates; others refuse).
        interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        try:
            with torch.no_grad():
                HFImageModel(model, interpolate)(torch.zeros(1, 3, *prep.img_size))
        except Exception as err:  # noqa: BLE001 - any failure means this size is unsupported
            msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise UsageError(f"hf:{ident} was trained at {trained[0]}x{trained[1]} px and cannot run at "
                             f"{prep.img_size[0]}x{prep.img_size[1]}: {msg}") from None
    module = HFImageModel(model, interpolate_pos_encoding=interpolate).eval()
    prefix, patch, grid = _hf_geometry(model, config, prep.img_size)
    family = "hf_vit" if default_layers_ok(module, "hf_vit") else "generic"
    if family != "hf_vit":
        prefix, patch, grid = 0, None, None
    has_head = getattr(module.model, "classifier", None) is not None or any(
        "classifier" in n for n, _ in module.model.named_children())
    info = ModelInfo(
        name=name, source="hf", source_id=os.path.abspath(ident) if local else ident, family=family, weights=record,
        num_prefix_tokens=prefix, patch_size=patch, grid=grid,
        num_classes=int(getattr(config, "num_labels", 0) or 0) if has_head else 0,
    )
    return module, info, prep


def default_layers_ok(module: nn.Module, family: str) -> bool:
    """Whether ``module`` has the structure of ``family``'s preset (no fallback to the generic rule)."""
    from hooks.capture.layers import _PRESETS

    preset = _PRESETS.get(family)
    return preset is not None and preset(dict(module.named_modules())) is not None


__all__ = ["HFImageModel", "default_layers_ok"]
