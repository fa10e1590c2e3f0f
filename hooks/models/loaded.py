"""What a model loader returns, and the geometry helpers every loader uses.

A loader (:mod:`~hooks.models.timm_loader`, :mod:`~hooks.models.hf_loader`, :mod:`~hooks.models.torchvision_loader`,
:mod:`~hooks.models.py_loader`, :mod:`~hooks.models.reference_loader`) builds the module
(``forward(x: (B, 3, H, W) float32) -> logits``), its provenance (:class:`ModelInfo`, recorded in every
activation store) and its evaluation preprocessing; :func:`hooks.models.registry.load_model` puts them in a
:class:`LoadedModel`.

Geometry is read from the built model, never guessed: a declared ``repsim_geometry``
(:mod:`hooks.models.geometry`) or timm-style attributes (:func:`_read_geometry`: ``num_prefix_tokens``, the patch
grid from the patch embedding at the chosen ``img_size``); the Hugging Face loader reads its embedding parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from hooks.models.geometry import declared_geometry
from hooks.models.preprocess import Preprocessing
from repsim.errors import UsageError


@dataclass
class ModelInfo:
    """Provenance of a loaded model, JSON-able, recorded in the store.

    name : what the user typed ("vit_b16", "timm:resnet18", ...)
    source : "timm" | "hf" | "torchvision" | "py" | "reference"
    source_id : timm id with pretrained tag / hub id or local directory / torchvision name / "file.py:factory"
    family : layer-preset family (see :data:`hooks.capture.layers.FAMILIES`)
    weights : {"kind": "random", "seed", "init" (see :data:`~hooks.models.random_init.INIT_SCHEMES`), "init_changes"}
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


__all__ = ["LoadedModel", "ModelInfo"]
