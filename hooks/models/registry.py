"""Model registry: short names and ``timm:`` / ``hf:`` / ``torchvision:`` / ``py:`` specs → an eval-mode model.

:func:`load_model` returns a :class:`~hooks.models.loaded.LoadedModel`: the module
(``forward(x: (B, 3, H, W) float32) -> logits``), its provenance (:class:`~hooks.models.loaded.ModelInfo`,
recorded in every activation store) and its evaluation preprocessing. This module resolves names
(:func:`resolve_name`, the :data:`REGISTRY` table) and hands the build to the loader of the source:
:mod:`~hooks.models.timm_loader`, :mod:`~hooks.models.hf_loader`, :mod:`~hooks.models.torchvision_loader`,
:mod:`~hooks.models.py_loader` and :mod:`~hooks.models.reference_loader` (the bundled models). Pretrained weights
come from the standard caches, downloaded when missing unless offline (:mod:`hooks.models.downloads`);
:func:`reload_model` rebuilds a store's model exactly, and refuses a store's ``py:`` code unless it is trusted
(:func:`trust_code`, :func:`check_rebuild_allowed`).
``weights=FILE`` loads a local state dict strictly (see :mod:`hooks.models.weights`); ``random_init`` builds the
framework's initialisation with every residual branch switched on (see :mod:`hooks.models.random_init`).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hooks.models.downloads import offline_requested
from hooks.models.hf_loader import _load_hf
from hooks.models.loaded import LoadedModel
from hooks.models.py_loader import _load_py
from hooks.models.random_init import INIT_SCHEMES, switch_branches_on
from hooks.models.reference_loader import _load_reference
from hooks.models.reference_models import REFERENCE_MODELS
from hooks.models.timm_loader import _load_timm, _timm_weights_location
from hooks.models.torchvision_loader import _load_torchvision
from hooks.models.weights import sha256_file
from repsim.errors import UsageError

SOURCES = ("timm", "hf", "torchvision", "py")


@dataclass(frozen=True)
class RegistryEntry:
    """A short name: the timm id (architecture.pretrained_tag), its preset family, and what the weights are."""

    timm_id: str
    family: str
    description: str


#: Short names → timm ids. Tags are the standard published weights of each paper / release.
REGISTRY: dict[str, RegistryEntry] = {
    # ViT (Dosovitskiy et al. 2021) with the AugReg weights of Steiner et al. 2022, "How to train your ViT":
    # ImageNet-21k pretraining, ImageNet-1k fine-tuning at 224 px; mean = std = 0.5.
    "vit_t16": RegistryEntry("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "vit", "ViT-Ti/16, AugReg IN-21k → IN-1k"),
    "vit_s16": RegistryEntry("vit_small_patch16_224.augreg_in21k_ft_in1k", "vit", "ViT-S/16, AugReg IN-21k → IN-1k"),
    "vit_b16": RegistryEntry("vit_base_patch16_224.augreg_in21k_ft_in1k", "vit", "ViT-B/16, AugReg IN-21k → IN-1k"),
    "vit_b32": RegistryEntry("vit_base_patch32_224.augreg_in21k_ft_in1k", "vit", "ViT-B/32, AugReg IN-21k → IN-1k"),
    "vit_l16": RegistryEntry("vit_large_patch16_224.augreg_in21k_ft_in1k", "vit", "ViT-L/16, AugReg IN-21k → IN-1k"),
    # DeiT (Touvron et al. 2021), ImageNet-1k only, the Facebook release.
    "deit_t16": RegistryEntry("deit_tiny_patch16_224.fb_in1k", "vit", "DeiT-Ti/16, IN-1k"),
    "deit_s16": RegistryEntry("deit_small_patch16_224.fb_in1k", "vit", "DeiT-S/16, IN-1k"),
    "deit_b16": RegistryEntry("deit_base_patch16_224.fb_in1k", "vit", "DeiT-B/16, IN-1k"),
    "deit_b16_distilled": RegistryEntry("deit_base_distilled_patch16_224.fb_in1k", "vit",
                                        "DeiT-B/16 distilled from a RegNetY teacher; class + distillation token"),
    # Self-supervised ViTs: DINO (Caron et al. 2021), DINOv2 (Oquab et al. 2024) with and without the 4
    # registers of Darcet et al. 2024, MAE (He et al. 2022). No classifier: the "logits" are the features.
    "dino_b16": RegistryEntry("vit_base_patch16_224.dino", "vit", "DINO ViT-B/16 (self-supervised, no head)"),
    "dinov2_b14": RegistryEntry("vit_base_patch14_dinov2.lvd142m", "vit",
                                "DINOv2 ViT-B/14, LVD-142M, 518 px (no head)"),
    "dinov2_b14_reg4": RegistryEntry("vit_base_patch14_reg4_dinov2.lvd142m", "vit",
                                     "DINOv2 ViT-B/14 with 4 registers, LVD-142M, 518 px (no head)"),
    "mae_b16": RegistryEntry("vit_base_patch16_224.mae", "vit", "MAE ViT-B/16 pretrained encoder (no head)"),
    # CLIP (Radford et al. 2021) image tower, OpenAI weights; the head is the 512-d image projection.
    "clip_b16": RegistryEntry("vit_base_patch16_clip_224.openai", "vit", "CLIP ViT-B/16 image encoder, OpenAI"),
    # BEiT (Bao et al. 2022): IN-22k self-supervised + IN-22k → IN-1k fine-tuning.
    "beit_b16": RegistryEntry("beit_base_patch16_224.in22k_ft_in22k_in1k", "vit", "BEiT-B/16, IN-22k → IN-1k"),
    "swin_t": RegistryEntry("swin_tiny_patch4_window7_224.ms_in1k", "swin", "Swin-T, window 7, Microsoft IN-1k"),
    "convnext_t": RegistryEntry("convnext_tiny.fb_in1k", "convnext", "ConvNeXt-T, Facebook IN-1k"),
    "convnext_b": RegistryEntry("convnext_base.fb_in1k", "convnext", "ConvNeXt-B, Facebook IN-1k"),
    # ResNets with the original torchvision weights (the reference of most representation-similarity work).
    "resnet18": RegistryEntry("resnet18.tv_in1k", "resnet", "ResNet-18, torchvision IN-1k weights (V1)"),
    "resnet50": RegistryEntry("resnet50.tv_in1k", "resnet", "ResNet-50, torchvision IN-1k weights (V1)"),
    "resnet101": RegistryEntry("resnet101.tv_in1k", "resnet", "ResNet-101, torchvision IN-1k weights (V1)"),
    "mixer_b16": RegistryEntry("mixer_b16_224.goog_in21k_ft_in1k", "mixer", "MLP-Mixer-B/16, Google IN-21k → IN-1k"),
    "nfnet_f0": RegistryEntry("dm_nfnet_f0.dm_in1k", "nfnet", "NFNet-F0, DeepMind IN-1k, 192 px (squash crop)"),
    "levit_128": RegistryEntry("levit_128.fb_dist_in1k", "levit", "LeViT-128, distilled, Facebook IN-1k"),
    "efficientnet_b0": RegistryEntry("efficientnet_b0.ra_in1k", "efficientnet",
                                     "EfficientNet-B0, timm RandAugment IN-1k"),
}


# ==========================================================================================================
# names
# ==========================================================================================================
def _normalise_short(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _tv_names() -> list[str]:
    import torchvision
    from torchvision.models import list_models as tv_list

    return tv_list(module=torchvision.models)  # image classifiers only


def _resolve_timm(ident: str, spec: str) -> str:
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(ident)
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, _timm_names(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UsageError(f"unknown timm model {arch!r} in {spec!r}{hint}")
    if tag:
        try:
            get_pretrained_cfg(ident)
        except RuntimeError:
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
            raise UsageError(f"timm model {arch} has no pretrained tag {tag!r}; known tags: {', '.join(tags) or 'none'}"
                             ) from None
    return ident


def resolve_name(spec: str) -> tuple[str, str]:
    """A model spec → (source, id).

    Short names (see :data:`REGISTRY`) give ("timm", timm id with tag); ``timm:<id>``, ``hf:<hub id or dir>``,
    ``torchvision:<name>`` and ``py:<file.py>:<factory>`` give their source and the rest. An unknown short
    name raises UsageError with the closest registry names (or the prefix to use when it names a timm model
    or a local directory).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("empty model name; see `repsim models`")
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    if sep:
        source = prefix.lower()
        if source not in SOURCES:
            close = difflib.get_close_matches(source, SOURCES, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}:{rest}?" if close else ""
            raise UsageError(f"unknown model source {prefix!r} in {spec!r}; use one of "
                             f"{', '.join(s + ':' for s in SOURCES)}{hint}")
        if not rest.strip():
            raise UsageError(f"{spec!r} names no model after '{prefix}:'")
        rest = rest.strip()
        if source == "timm":
            return "timm", _resolve_timm(rest, spec)
        if source == "torchvision":
            names = _tv_names()
            if rest not in names:
                close = difflib.get_close_matches(rest, names, n=5, cutoff=0.6)
                hint = f"; did you mean {', '.join('torchvision:' + c for c in close)}?" if close else ""
                raise UsageError(f"unknown torchvision classification model {rest!r}{hint}")
            return "torchvision", rest
        if source == "py":
            file, sep2, factory = rest.rpartition(":")
            if not sep2 or not file or not factory.isidentifier():
                raise UsageError(f"a py: spec is py:FILE.py:FACTORY (a function returning an nn.Module), got {spec!r}")
            return "py", f"{file}:{factory}"
        return "hf", rest
    key = _normalise_short(spec)
    if key in REGISTRY:
        return "timm", REGISTRY[key].timm_id
    if key in REFERENCE_MODELS:
        return "reference", key
    hints = []
    close = difflib.get_close_matches(key, [*REGISTRY, *REFERENCE_MODELS], n=3, cutoff=0.6)
    if close:
        hints.append(f"did you mean {', '.join(close)}?")
    try:
        import timm

        if timm.is_model(spec.split(".", 1)[0]):
            hints.append(f"{spec} is a timm model: use timm:{spec}")
    except Exception:  # noqa: BLE001 - only a hint
        pass
    if os.path.isdir(spec):
        hints.append(f"for a transformers model directory use hf:{spec}")
    if os.path.isfile(spec.split(":")[0]) and spec.endswith(".py"):
        hints.append(f"for your own model use py:{spec}:FACTORY")
    hint = ("; " + "; ".join(hints)) if hints else "; see `repsim models` (or use timm:/hf:/torchvision:/py:)"
    raise UsageError(f"unknown model {spec!r}{hint}")


# ==========================================================================================================
# public entry points
# ==========================================================================================================
_LOADERS = {"timm": _load_timm, "hf": _load_hf, "torchvision": _load_torchvision, "py": _load_py,
            "reference": _load_reference}


def load_model(
    spec: str,
    *,
    weights: str | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    init_seed: int = 0,
    init_scheme: str = "branches-on",
    offline: bool | None = None,
    revision: str | None = None,
    code_sha256: str | None = None,
) -> LoadedModel:
    """Build a model in eval mode with its provenance and preprocessing.

    spec : a short name (``repsim models``), ``timm:<id>``, ``hf:<hub id or dir>``, ``torchvision:<name>`` or
        ``py:<file.py>:<factory>``
    weights : a local state-dict file (.pt/.pth/.bin/.safetensors), loaded strictly
    random_init : build without any weights (excludes ``weights``), initialised by ``init_scheme``
    img_size : input side in pixels; architectures that size themselves by it (ViT family, Swin, Mixer, HF
        ViTs, torchvision ViTs) are built at it (timm resamples position embeddings), others only change
        their preprocessing
    mean, std, interpolation, crop_pct : override the model's preprocessing
    init_seed : seed of the random initialisation, so that a random-init model is the same in every
        process (a resumed extraction, a baseline rerun); recorded as ``weights["seed"]``. The global
        torch RNG state is left as it was.
    init_scheme : ``"branches-on"`` (default) or ``"framework"``, see :data:`INIT_SCHEMES`; recorded with
        what it changed as ``weights["init"]`` / ``weights["init_changes"]``
    offline : True never downloads (only the local caches; an empty cache is one UsageError); None (default)
        downloads missing pretrained weights unless ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set
        (see :func:`offline_requested`). Cached weights never touch the network either way.
    revision : hub branch, tag or commit of ``timm:`` / ``hf:`` weights (default: the cached or current
        ``main``); the commit actually used is recorded as ``weights["revision"]``
    """
    if init_scheme not in INIT_SCHEMES:
        raise UsageError(f"unknown init scheme {init_scheme!r}; one of {', '.join(INIT_SCHEMES)}")
    if weights and random_init:
        raise UsageError("--weights and --random-init exclude each other")
    if img_size is not None:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise UsageError(f"img_size must be a positive integer, got {img_size!r}")
    if weights is not None and not os.path.isfile(weights):
        raise UsageError(f"weights file not found: {weights}")
    source, ident = resolve_name(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        extra = {"code_sha256": code_sha256} if source == "py" else {}  # py: checked before the import
        module, info, prep = _LOADERS[source](spec.strip(), ident, weights, random_init, img_size,
                                              offline=offline_requested(offline), revision=revision, **extra)
        if info.weights.get("kind") == "random":
            # still under the seed: re-initialised zero weights draw from it
            changes = switch_branches_on(module) if init_scheme == "branches-on" else {}
            info.weights = {"kind": "random", "seed": int(init_seed), "init": init_scheme, "init_changes": changes}
    prep = prep.with_overrides(mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct)
    return LoadedModel(module=module.eval(), info=info, preprocessing=prep)


def list_models() -> list[dict[str, Any]]:
    """One row per short name: name, source, id, family, weights_offline (cached locally), description."""
    from timm.models import get_pretrained_cfg

    rows = []
    for name, entry in REGISTRY.items():
        try:
            cached, _ = _timm_weights_location(get_pretrained_cfg(entry.timm_id))
        except Exception:  # noqa: BLE001 - a listing never fails on one entry
            cached = None
        rows.append({"name": name, "source": "timm", "id": entry.timm_id, "family": entry.family,
                     "weights_offline": cached is not None, "description": entry.description})
    for name, ref in REFERENCE_MODELS.items():
        rows.append({"name": name, "source": "reference", "id": f"{ref.timm_arch} (reduced, see its model card)",
                     "family": ref.family, "weights_offline": os.path.isfile(ref.weights_file),
                     "description": ref.description})
    return rows


__all__ = [
    "REGISTRY", "RegistryEntry", "LoadedModel", "load_model", "reload_model", "list_models", "resolve_name",
    "trust_code", "check_rebuild_allowed",
]


_TRUST_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("repsim_trust_code", default=False)


@contextlib.contextmanager
def trust_code(enabled: bool = True):
    """Within this block :func:`reload_model` may import a store's ``py:`` model file (after checking its
    sha256). What ``--trust-code`` sets; off by default."""
    token = _TRUST_CODE.set(bool(enabled))
    try:
        yield
    finally:
        _TRUST_CODE.reset(token)


def check_rebuild_allowed(attrs: dict[str, Any], *, trust_code: bool | None = None) -> dict[str, Any]:
    """Refuse (UsageError) rebuilding a store's ``py:`` model unless code is trusted (``trust_code``, default the
    :func:`trust_code` block) and the store records the file's sha256; returns the ``load_model`` arguments
    that make the loader compare that sha256 before importing. Cheap: call it before any other work."""
    model = attrs["model"]
    w = model.get("weights", {})
    if not (model.get("source") == "py" or str(model.get("name", "")).strip().startswith("py:")):
        return {}
    file = str(model.get("source_id") or model.get("name", "")).removeprefix("py:").rpartition(":")[0]
    if not (_TRUST_CODE.get() if trust_code is None else trust_code):
        raise UsageError(f"the store's model is Python code ({file}): rebuilding it imports and runs that file; "
                         "pass --trust-code if you trust it")
    expected = model.get("code_sha256") or (w.get("sha256") if w.get("kind") == "factory" else None)
    if not expected:
        raise UsageError(f"the store records no sha256 of its model file {file} (an older store): the code "
                         "cannot be checked before it runs; re-extract the store")
    return {"code_sha256": expected}


def reload_model(attrs: dict[str, Any], *, offline: bool | None = None, trust_code: bool | None = None) -> LoadedModel:
    """Rebuild the model a store was extracted from, from its root attributes (``store.attrs``).

    The same spec, input size and weights: a weights file must still hash to the recorded sha256; a random
    initialisation uses the recorded seed and scheme (stores without ``init`` predate the scheme and were built
    with the framework's own initialisation); hub weights are taken at the recorded revision (commit) from the
    cache, or downloaded at it unless ``offline`` (see :func:`load_model`), and must hash to the recorded
    sha256 (torchvision's too). Preprocessing overrides recorded in the store are re-applied. Any mismatch is a
    UsageError: an analysis never runs on other weights than the store's.

    A ``py:`` model is Python code named by the store: it is refused unless ``trust_code`` (default: inside
    :func:`trust_code`, i.e. ``--trust-code``), and even then the file's sha256 must equal the recorded one
    before it is imported. Weights that need unpickling beyond tensors are refused unless ``--trust-pickle``
    (see :mod:`hooks.models.weights`).
    """
    model, prep = attrs["model"], attrs["preprocessing"]
    w = model.get("weights", {})
    kind = w.get("kind")
    code = check_rebuild_allowed(attrs, trust_code=trust_code)
    size = prep.get("img_size")
    img_size = int(size[0]) if isinstance(size, (list, tuple)) else (int(size) if size else None)
    kwargs: dict[str, Any] = dict(img_size=img_size, mean=prep.get("mean"), std=prep.get("std"),
                                  interpolation=prep.get("interpolation"), crop_pct=prep.get("crop_pct"),
                                  offline=offline, **code)
    if kind == "random":
        loaded = load_model(model["name"], random_init=True, init_seed=int(w.get("seed", 0)),
                            init_scheme=w.get("init", "framework"), **kwargs)
    elif kind == "file":
        path = w.get("file")
        if not path or not os.path.isfile(path):
            raise UsageError(f"the store's weights file {path} is gone: the model cannot be rebuilt")
        if sha256_file(path) != w.get("sha256"):
            raise UsageError(f"{path} changed since the extraction (sha256 differs): the model cannot be rebuilt")
        if model.get("source") == "hf" and os.path.dirname(path) == model.get("source_id"):
            # a transformers directory's own checkpoint: loaded as at extraction, by from_pretrained, which maps
            # the file's keys to the installed transformers' module names (a plain state dict load does not)
            loaded = load_model(model["name"], **kwargs)
            if loaded.info.weights.get("sha256") != w["sha256"]:
                raise UsageError(f"{model['source_id']} now holds other weights than {path} at extraction: the "
                                 "model cannot be rebuilt")
        else:
            loaded = load_model(model["name"], weights=path, **kwargs)
    elif kind == "hub":
        if not w.get("sha256"):  # nothing to check the rebuilt weights against: refuse before any download
            raise UsageError(f"the store records no sha256 of the hub weights of {model['name']}: the weights "
                             "cannot be checked and the model cannot be rebuilt; re-extract the store")
        loaded = load_model(model["name"], revision=w.get("revision"), **kwargs)
        now = loaded.info.weights
        if w.get("revision") and now.get("revision") != w["revision"]:
            raise UsageError(f"the hub weights of {model['name']} were found at revision {now.get('revision')}, the "
                             f"store was extracted at {w['revision']}: the model cannot be rebuilt")
        if now.get("sha256") != w["sha256"]:
            raise UsageError(f"the hub weights of {model['name']} ({now.get('cache_file')}) are not the ones the store "
                             f"was extracted with (sha256 {str(now.get('sha256'))[:12]}..., recorded "
                             f"{w['sha256'][:12]}...): the model cannot be rebuilt")
        if w.get("shards") and now.get("shards") != w["shards"]:
            raise UsageError(f"the hub weight shards of {model['name']} differ from the extraction's")
    else:  # bundled weights, or a py: factory that makes its own
        loaded = load_model(model["name"], **kwargs)
        if kind == "bundled" and loaded.info.weights.get("sha256") != w.get("sha256"):
            raise UsageError(f"the bundled {model['name']} weights changed since the extraction (another repsim "
                             "version?): the model cannot be rebuilt")
        if kind == "factory" and loaded.info.weights.get("sha256") != w.get("sha256"):
            raise UsageError(f"{model['name']} now builds other weights than at extraction (sha256 differs)")
    return loaded
