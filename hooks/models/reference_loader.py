"""The loader of the bundled reference models (:mod:`hooks.models.reference_models`): their weights file is
checked against its model card's sha256 before it is loaded."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from hooks.capture.layers import infer_family
from hooks.models.loaded import ModelInfo, _check_patch_multiple, _read_geometry
from hooks.models.preprocess import Preprocessing
from hooks.models.reference_models import build_reference, get_reference, reference_card
from hooks.models.weights import apply_state_dict, load_state_dict_file
from repsim.errors import UsageError


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
