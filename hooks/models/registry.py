"""Model registry: short names and ``timm:`` / ``hf:`` / ``torchvision:`` / ``py:`` specs → an eval-mode model.

:func:`load_model` returns a :class:`LoadedModel`: the module (``forward(x: (B, 3, H, W) float32) -> logits``),
its provenance (:class:`ModelInfo`, recorded in every activation store) and its evaluation preprocessing.

Pretrained weights live in the ecosystem's standard caches: the Hugging Face hub cache (timm and transformers
models; ``HF_HOME`` / ``HF_HUB_CACHE``) and the torch hub checkpoint directory (torchvision and URL-hosted timm
weights; ``TORCH_HOME``). The cache is looked at first, so a cached model never touches the network. A miss is
downloaded into that cache with the hub's own progress bar (``hf_hub_download`` / torch hub), unless downloads
are off (``offline=True``, the CLI's ``--offline``, or ``HF_HUB_OFFLINE=1``): then it is one
:class:`~repsim.errors.UsageError` naming the ways out (``--weights FILE``, ``--random-init``, or a populated
cache). A hub model's provenance records the repo, the commit (revision) and the sha256 of the file, checked
against the hub's (see :func:`_hub_record`); :func:`reload_model` rebuilds exactly that.
``weights=FILE`` loads a local state dict strictly (see :mod:`hooks.models.weights`).

``random_init`` builds the framework's initialisation with every residual branch and the classifier switched
on (see :func:`switch_branches_on`; timm's ``zero_init_last`` alone makes every ResNet block the identity).

Geometry is read from the built model, never guessed: ``num_prefix_tokens`` (class token, registers,
distillation token) from timm's attribute / the HF embedding parameters, the patch grid from the patch
embedding at the chosen ``img_size``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import difflib
import importlib.util
import inspect
import math
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from hooks.models.geometry import declared_geometry
from hooks.capture.layers import infer_family
from hooks.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, crop_pct_for, default_preprocessing
from hooks.models.reference_models import REFERENCE_MODELS, build_reference, get_reference, reference_card
from hooks.models.weights import apply_state_dict, load_state_dict_file, sha256_file
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


@dataclass
class ModelInfo:
    """Provenance of a loaded model, JSON-able, recorded in the store.

    name : what the user typed ("vit_b16", "timm:resnet18", ...)
    source : "timm" | "hf" | "torchvision" | "py" | "reference"
    source_id : timm id with pretrained tag / hub id or local directory / torchvision name / "file.py:factory"
    family : layer-preset family (see :data:`hooks.capture.layers.FAMILIES`)
    weights : {"kind": "random", "seed", "init" (see :data:`INIT_SCHEMES`), "init_changes"}
        | {"kind": "hub", "tag", "hub_id", "filename", "revision" (commit), "sha256", "cache_file"} (hub files)
        | {"kind": "hub", "tag", "url", "sha256", "cache_file"} (torch-hub files: torchvision, URL-hosted timm)
        | {"kind": "file", "file", "sha256"}
        | {"kind": "factory", ...} (a ``py:`` factory that made its own weights)
        | {"kind": "bundled", "file", "sha256", "top1_accuracy"} (a reference model, see
        :mod:`hooks.models.reference_models`)
    num_prefix_tokens : class + register + distillation tokens, read from the model; 0 for CNNs
    patch_size : (ph, pw) in pixels, or None
    grid : patch grid (gh, gw) at the model's input size, or None
    num_classes : classifier outputs (0 when the model has no classifier; its output is then the features)
    """

    name: str
    source: str
    source_id: str
    family: str
    weights: dict[str, Any]
    num_prefix_tokens: int = 0
    patch_size: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None
    num_classes: int = 0
    code_sha256: str | None = None  # py: models only: sha256 of the factory's file, checked before it is imported

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples as lists)."""
        d = dataclasses.asdict(self)
        if d["code_sha256"] is None:
            del d["code_sha256"]
        d["patch_size"] = list(self.patch_size) if self.patch_size else None
        d["grid"] = list(self.grid) if self.grid else None
        return d


@dataclass
class LoadedModel:
    """An eval-mode model, its provenance and its preprocessing."""

    module: nn.Module
    info: ModelInfo
    preprocessing: Preprocessing


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
# caches and downloads: the local cache is always looked at first, so a cached model never touches the network
# ==========================================================================================================
def hf_cache_dir() -> str:
    """The Hugging Face hub cache directory (HF_HUB_CACHE / HF_HOME / ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def torch_hub_checkpoints_dir() -> str:
    """The torch hub checkpoint directory (TORCH_HOME / ~/.cache/torch → hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_requested(offline: bool | None = None) -> bool:
    """Whether downloads are off: ``offline=True`` (``--offline``), or ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``.

    The environment is read at each call (huggingface_hub reads it once, at import), so a variable set after
    import still counts; huggingface_hub's own import-time flag counts too. Offline applies to every source:
    the torch hub (torchvision, URL-hosted timm weights) is not contacted either.
    """
    if offline:
        return True
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in _TRUE


def _hf_cached(repo: str, filenames: Sequence[str], revision: str | None = None) -> str | None:
    """Path of the first of ``filenames`` present in the local hub cache for ``repo`` (no network).

    ``repo`` may carry a pinned revision (``org/name@rev``, timm's syntax); ``revision`` overrides it. A branch
    or tag is resolved through the cache's ``refs/``, a commit hash directly.
    """
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, pinned = repo.partition("@")
    rev = revision or pinned or None
    for fname in filenames:
        try:
            hit = try_to_load_from_cache(repo_id, fname, revision=rev, cache_dir=hf_cache_dir())
        except Exception:  # noqa: BLE001 - malformed ids are simply not cached
            return None
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _url_cached(url: str | None) -> str | None:
    if not url:
        return None
    path = os.path.join(torch_hub_checkpoints_dir(), os.path.basename(urlparse(url).path))
    return path if os.path.isfile(path) else None


_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin")
#: the safetensors twin that timm prefers over a pickled file of the same repo (timm.models._hub)
_SAFE_TWIN = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _download_error(what: str, source: str, err: BaseException) -> UsageError:
    return UsageError(
        f"cannot download the weights of {what} from {source} ({type(err).__name__}: {_first_line(err)}); check the "
        "network (proxy, HF_ENDPOINT), or pass --weights FILE (a local state dict) or --random-init, or copy a "
        "populated cache here and pass --offline"
    )


def _hub_fetch(repo: str, filenames: Sequence[str], *, revision: str | None, offline: bool, what: str) -> str | None:
    """Local path of the first of ``filenames`` that the hub repo has, downloading it when it is not cached.

    The cache is consulted first for all names (no network when any is there). Offline, a miss is None.
    Online, the names are tried in order with one HEAD request each (no retries: a machine without network
    learns it in milliseconds instead of after the client's five backoffs); the first the repo has is fetched
    by ``hf_hub_download`` into the standard cache, with the hub's progress bar. None when the repo has none
    of them. Repository / revision / gating / network failures are one UsageError.
    """
    hit = _hf_cached(repo, filenames, revision)
    if hit is not None or offline:
        return hit
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, pinned = repo.partition("@")
    rev = revision or pinned or None
    source = f"{constants.ENDPOINT} ({repo_id}{'@' + rev if rev else ''})"
    for fname in filenames:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, fname, revision=rev), retry_on_errors=False)
            return hf_hub_download(repo_id, fname, revision=rev, cache_dir=hf_cache_dir())
        except RemoteEntryNotFoundError:
            continue
        except GatedRepoError:
            raise UsageError(f"{repo_id} is a gated hub repository: accept its terms on the hub and log in "
                             "(`hf auth login`), or pass --weights FILE") from None
        except RepositoryNotFoundError:
            raise UsageError(f"no hub repository {repo_id} at {constants.ENDPOINT} (a private one needs "
                             "`hf auth login`)") from None
        except RevisionNotFoundError:
            raise UsageError(f"hub repository {repo_id} has no revision {rev!r}") from None
        except Exception as err:  # noqa: BLE001 - network, proxy, server and disk errors all end here
            raise _download_error(what, source, err) from err
    return None


def _url_fetch(url: str, *, offline: bool, what: str) -> str | None:
    """Local path of a URL-hosted checkpoint in the torch hub cache, downloading it (progress bar) when online.

    File names carrying a hash prefix (``resnet18-f37072fd.pth``) are checked against it, as torch hub does.
    """
    hit = _url_cached(url)
    if hit is not None or offline:
        return hit
    from torch.hub import HASH_REGEX, download_url_to_file

    fname = os.path.basename(urlparse(url).path)
    dst = os.path.join(torch_hub_checkpoints_dir(), fname)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    found = HASH_REGEX.search(fname)
    try:
        download_url_to_file(url, dst, found.group(1) if found else None, progress=True)
    except Exception as err:  # noqa: BLE001 - URLError, HTTPError, hash mismatch (RuntimeError), disk full
        raise _download_error(what, url, err) from err
    return dst


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


def _offline_error(what: str, where: str) -> UsageError:
    return UsageError(
        f"no pretrained weights for {what} in the local caches and downloads are off (--offline / HF_HUB_OFFLINE): "
        f"run once without --offline on a machine with network, or pass --weights FILE (a local state dict) or "
        f"--random-init; the cache looked in is {where}"
    )


def _verified_sha256(path: str) -> str:
    """sha256 of a hub cache file, checked against its blob name where the hub named it by its sha256.

    LFS files (all weights) are stored as ``blobs/<sha256 the hub announced>``: a truncated or altered file is
    caught here, before anything reads it. Small git files are named by their git sha1, which says nothing
    about the sha256; they are only hashed.
    """
    try:
        digest = sha256_file(path)
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    blob = os.path.realpath(path)
    name = os.path.basename(blob)
    if re.fullmatch(r"[0-9a-f]{64}", name) and name != digest:
        raise UsageError(f"{path} is damaged (sha256 {digest[:12]}..., the hub's is {name[:12]}...): delete {blob} "
                         "and run again to download it afresh")
    return digest


def _hub_record(cache_file: str, *, hub_id: str, tag: str | None = None,
                shards: Sequence[str] = ()) -> dict[str, Any]:
    """Provenance of a hub file: ``{"kind": "hub", "hub_id", "tag", "filename", "revision", "sha256", ...}``.

    tag : the timm id with its pretrained tag (timm models); hub_id : the repo (org/name); revision : the
    commit hash, read from the cache layout ``.../models--org--name/snapshots/<commit>/<file>``; sha256 : of
    the file's bytes (checked against the hub's, see :func:`_verified_sha256`); shards : for a sharded
    checkpoint, ``{"shards": {file: sha256}}`` of every shard besides the index file.
    """
    path = os.path.abspath(cache_file)
    rec: dict[str, Any] = {"kind": "hub", "hub_id": hub_id}
    if tag:
        rec["tag"] = tag
    parts = path.split(os.sep)
    if "snapshots" in parts:
        i = parts.index("snapshots")
        rec["revision"] = parts[i + 1]
        rec["filename"] = "/".join(parts[i + 2:])
    else:
        rec["filename"] = os.path.basename(path)
    rec["sha256"] = _verified_sha256(path)
    if shards:
        rec["shards"] = {os.path.basename(s): _verified_sha256(s) for s in shards}
    rec["cache_file"] = path
    return rec


# ==========================================================================================================
# geometry
# ==========================================================================================================
def _pair_or_none(v: Any) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    return t if len(t) == 2 else None  # type: ignore[return-value]


def _read_geometry(module: nn.Module) -> tuple[int, tuple[int, int] | None, tuple[int, int] | None]:
    """(num_prefix_tokens, patch_size, grid): a declared ``repsim_geometry`` (:mod:`hooks.models.geometry`) first, else
    timm-style attributes; (0, None, None) when absent."""
    declared = declared_geometry(module)
    if declared is not None:
        return declared.num_prefix_tokens, declared.patch_size, declared.grid
    prefix = int(getattr(module, "num_prefix_tokens", 0) or 0)
    pe = None
    for name in ("patch_embed", "stem"):
        cand = getattr(module, name, None)
        if isinstance(cand, nn.Module) and hasattr(cand, "grid_size") and hasattr(cand, "patch_size"):
            pe = cand
            break
    if pe is None:
        return prefix, None, None
    return prefix, _pair_or_none(pe.patch_size), _pair_or_none(pe.grid_size)


def _check_patch_multiple(img: tuple[int, int], patch: tuple[int, int] | None, what: str) -> None:
    if patch and (img[0] % patch[0] or img[1] % patch[1]):
        raise UsageError(f"img_size {img[0]}x{img[1]} is not a multiple of the patch size {patch[0]}x{patch[1]} of "
                         f"{what}: the border pixels would be dropped")


# ==========================================================================================================
# timm
# ==========================================================================================================
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


# ==========================================================================================================
# Hugging Face transformers
# ==========================================================================================================
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


# ==========================================================================================================
# torchvision
# ==========================================================================================================
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


# ==========================================================================================================
# py:<file.py>:<factory>
# ==========================================================================================================
def _load_py(name: str, ident: str, weights: str | None, random_init: bool, img_size: int | None,
             code_sha256: str | None = None, **_hub: Any) -> tuple[nn.Module, ModelInfo, Preprocessing]:
    file, _, factory_name = ident.rpartition(":")
    path = os.path.abspath(os.path.expanduser(file))
    if not os.path.isfile(path):
        raise UsageError(f"py: model file not found: {file}")
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as err:
        raise UsageError(f"cannot read {file}: {err.strerror or err}") from None
    digest = hashlib.sha256(source).hexdigest()
    if code_sha256 is not None and digest != code_sha256:
        # checked on the bytes that would run, before anything is imported
        raise UsageError(f"{file} changed since the extraction (sha256 {digest[:12]}..., recorded "
                         f"{code_sha256[:12]}...): refusing to import it; the model cannot be rebuilt")
    mod_name = f"repsim_user_model_{digest[:16]}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {file} as a Python module")
    user = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = user  # so classes defined there pickle (data-loader workers)
    try:
        exec(compile(source, path, "exec"), user.__dict__)  # noqa: S102 - the hashed bytes, not a re-read file
    except Exception as err:  # noqa: BLE001 - the user's code: report it as their input error, keep the chain
        sys.modules.pop(mod_name, None)
        raise UsageError(f"importing {file} failed: {type(err).__name__}: {err}") from err
    factory = getattr(user, factory_name, None)
    if not callable(factory):
        options = [n for n, v in vars(user).items() if callable(v) and not n.startswith("_")
                   and getattr(v, "__module__", None) == mod_name]
        close = difflib.get_close_matches(factory_name, options, n=3, cutoff=0.5)
        if close:
            hint = f"; did you mean {', '.join(close)}?"
        else:
            hint = f"; it defines {', '.join(options[:8])}" if options else ""
        raise UsageError(f"{file} has no function {factory_name!r}{hint}")
    params = inspect.signature(factory).parameters
    kwargs: dict[str, Any] = {}
    if random_init and "pretrained" in params:
        kwargs["pretrained"] = False
    if img_size is not None and "img_size" in params:
        kwargs["img_size"] = img_size
    try:
        module = factory(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's code
        raise UsageError(f"{file}:{factory_name}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(module, nn.Module):
        raise UsageError(f"{file}:{factory_name}() returned a {type(module).__name__}, not a torch.nn.Module")
    if weights:
        sd, wdigest = load_state_dict_file(weights)
        record: dict[str, Any] = apply_state_dict(module, sd, weights, wdigest)
    elif random_init and "pretrained" in params:
        record = {"kind": "random"}
    else:
        if random_init:
            warnings.warn(f"{factory_name}() takes no `pretrained` argument: its weights are whatever it makes",
                          stacklevel=3)
        record = {"kind": "factory", "factory": f"{path}:{factory_name}", "sha256": digest}
    module.eval()
    cfg = getattr(module, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        prep = Preprocessing(tuple(cfg["input_size"][1:]), cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD),
                             cfg.get("interpolation", "bicubic") if cfg.get("interpolation") in
                             ("bicubic", "bilinear", "nearest") else "bicubic",
                             cfg.get("crop_pct") or 0.875, cfg.get("crop_mode") or "center")
    else:
        prep = default_preprocessing(224)
    if img_size is not None:
        prep = prep.with_overrides(img_size=img_size)
    prefix, patch, grid = _read_geometry(module)
    if grid is not None and patch is not None:
        _check_patch_multiple(prep.img_size, patch, f"{file}:{factory_name}")
        if (grid[0] * patch[0], grid[1] * patch[1]) != prep.img_size:
            raise UsageError(f"{file}:{factory_name}() builds a {grid[0]}x{grid[1]} patch grid "
                             f"({grid[0] * patch[0]} px) but the input is {prep.img_size[0]} px; "
                             "give the factory an img_size parameter or pass the matching --img-size")
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    num_classes = int(getattr(module, "num_classes", 0) or (linears[-1].out_features if linears else 0))
    info = ModelInfo(
        name=name, source="py", source_id=f"{file}:{factory_name}", family=infer_family(module), weights=record,
        num_prefix_tokens=prefix, patch_size=patch, grid=grid, num_classes=num_classes, code_sha256=digest,
    )
    return module, info, prep


# ==========================================================================================================
# the bundled reference models (hooks.models.reference_models)
# ==========================================================================================================
def _load_reference(name: str, ident: str, weights: str | None, random_init: bool, img_size: int | None,
                    **_hub: Any) -> tuple[nn.Module, ModelInfo, Preprocessing]:
    ref = get_reference(ident)
    module = build_reference(ident)
    if weights:
        sd, digest = load_state_dict_file(weights)
        record: dict[str, Any] = apply_state_dict(module, sd, weights, digest)
    elif random_init:
        record = {"kind": "random"}
    else:
        card = reference_card(ident)
        sd, digest = load_state_dict_file(ref.weights_file)  # hashes the file as it reads it
        if digest != card["weights"]["sha256"]:
            raise UsageError(f"{ref.weights_file} does not match its model card (sha256 differs): reinstall repsim "
                             "or rebuild it with scripts/train_reference_models.py")
        apply_state_dict(module, sd, ref.weights_file, digest)  # load_state_dict casts float16 into float32
        record = {"kind": "bundled", "file": os.path.basename(ref.weights_file), "sha256": digest,
                  "top1_accuracy": card["evaluation"]["top1_accuracy"]}
    module.eval()
    if img_size is not None and img_size != ref.img_size and hasattr(module, "set_input_size"):
        # timm ViT: resample the position embeddings to the new grid (a CNN takes any size as it is)
        _check_patch_multiple((img_size, img_size), _read_geometry(module)[1], ident)
        module.set_input_size(img_size=img_size)
    prep = Preprocessing((ref.img_size, ref.img_size), ref.mean, ref.std, "bicubic", 1.0, "center")
    if img_size is not None:
        prep = prep.with_overrides(img_size=img_size)
    prefix, patch, grid = _read_geometry(module)
    info = ModelInfo(name=name, source="reference", source_id=f"{ident} ({ref.timm_arch} at reduced size)",
                     family=infer_family(module), weights=record, num_prefix_tokens=prefix, patch_size=patch,
                     grid=grid, num_classes=int(getattr(module, "num_classes", 0) or 0))
    return module, info, prep


# ==========================================================================================================
# random initialisation without switched-off branches
# ==========================================================================================================
#: Random initialisations :func:`load_model` can build (recorded as ``weights["init"]``).
#: ``"branches-on"`` (the default): the framework's own initialisation (timm, torchvision, transformers, or the
#: ``py:`` factory), then every residual branch and the classifier switched on (:func:`switch_branches_on`).
#: ``"framework"``: the framework's initialisation untouched (the start of a training run: with timm's
#: ``zero_init_last`` every ResNet block is the identity). Stores written before repsim recorded ``init``
#: were built this way, and :func:`reload_model` rebuilds them so.
INIT_SCHEMES = ("branches-on", "framework")

#: parameter names of layer-scale factors and skip-init gains: they multiply a residual branch
_GATE_NAMES = re.compile(r"gamma(_\d)?|layer_scale(_parameter)?|lambda_?\d|skipinit_gain")
#: modules whose gamma is not a branch gate (ConvNeXt-V2's GRN starts at gamma = 0 as the identity by design)
_NOT_GATES = re.compile(r"GlobalResponseNorm|GRN", re.IGNORECASE)
#: a gate this small (or a norm scale of exactly 0) leaves its branch off: 1e-6 (ConvNeXt), 1e-5 (DINOv2,
#: CaiT), 0 (NFNet skip-init). BEiT's 0.1 is a real, if damped, branch and stays.
_GATE_OFF = 1e-3


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or (
        "norm" in type(module).__name__.lower() and not _NOT_GATES.search(type(module).__name__))


@torch.no_grad()
def switch_branches_on(module: nn.Module) -> dict[str, list[str]]:
    """Undo the initialisations that switch residual branches or the classifier off (in place).

    Frameworks initialise networks for *training*: timm zeroes the last norm scale of every ResNet / LeViT
    residual branch (``zero_init_last``), ConvNeXt and DINOv2 scale each branch by a layer-scale of 1e-6 /
    1e-5, NFNet multiplies it by a skip-init gain of 0, MLP-Mixer and torchvision's ViT zero the classifier.
    Untrained, such a network is degenerate: every block is (nearly) the identity, consecutive blocks have CKA
    1 and the logits are constant, which is useless as the random baseline of a representation analysis.
    This sets, with no other change:

    - a norm layer's scale (``weight``) that is exactly 0 to 1, PyTorch's default for norm layers;
    - a constant layer-scale / skip-init gain (``gamma``, ``gamma_1``, ``layer_scale``, ``lambda1``,
      ``skipinit_gain``, ...) with ``|value| <= 1e-3`` to 1, i.e. the architecture without layer scale;
    - an ``nn.Linear`` / ``nn.Conv*`` weight that is exactly 0 to PyTorch's default init of that layer
      (Kaiming-uniform with a = sqrt(5)); its bias is left as it is. This draws from the torch RNG, so
      call it under the seed of the build.

    Returns the changed parameter names per rule (empty lists dropped), for the provenance record.
    """
    changes: dict[str, list[str]] = {"norm_scale_0_to_1": [], "gate_to_1": [], "zero_weight_to_default_init": []}
    gated: set[int] = set()
    for mname, mod in module.named_modules():
        prefix = mname + "." if mname else ""
        if not _NOT_GATES.search(type(mod).__name__):
            for pname, p in mod.named_parameters(recurse=False):
                if (_GATE_NAMES.fullmatch(pname) and p.numel() and bool((p == p.reshape(-1)[0]).all())
                        and abs(float(p.reshape(-1)[0])) <= _GATE_OFF):
                    p.fill_(1.0)
                    gated.add(id(p))
                    changes["gate_to_1"].append(prefix + pname)
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or w.numel() == 0 or id(w) in gated or bool(w.any()):
            continue
        if _is_norm(mod):
            w.fill_(1.0)
            changes["norm_scale_0_to_1"].append(prefix + "weight")
        elif isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            changes["zero_weight_to_default_init"].append(prefix + "weight")
    return {k: v for k, v in changes.items() if v}


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
    "REGISTRY", "RegistryEntry", "ModelInfo", "LoadedModel", "HFImageModel", "load_model", "reload_model",
    "list_models", "resolve_name", "INIT_SCHEMES", "switch_branches_on", "offline_requested",
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
