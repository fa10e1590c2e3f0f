"""The bundled reference models: small timm networks trained on repsim's own ``shapes`` data set.

They make every command work on a fresh, offline machine on real *trained* networks (not random ones):
``repsim extract --model ref_vit --data shapes``. Each is a stock timm architecture at reduced width, so
every layer preset, attention hook and analysis applies unchanged:

=============  ==========================================================================================
``ref_vit``     ViT (timm ``VisionTransformer``, the ``vit_tiny_patch16_224`` entry) at 64 px, 8 px patches
                (8x8 tokens), width 96, depth 6, 4 heads, a class token; classifies from the class token.
                Its patch embedding is a small convolutional stem (:class:`ConvStemPatchEmbed`, Xiao et al.
                2021), see below.
``ref_vit_gap`` the same ViT without a class token, classifying from the mean of its tokens (global average
                pooling): the CLS-vs-GAP contrast of Raghu et al. 2021, "Do Vision Transformers See Like
                Convolutional Neural Networks?", Sec. 5 / Fig. 10.
``ref_resnet``  a ResNet-18 layout (timm ``resnet18`` class: 2-2-2-2 basic blocks) at quarter width
                (16-32-64-128 channels), 64 px.
=============  ==========================================================================================

Why a convolutional stem: with the usual linear "patchify" embedding, the ViT did not leave chance level
within the 10-minute CPU budget (cross-entropy 2.081-2.085 vs ln 8 = 2.079 after 200 steps, at three settings:
lr 1e-3 and 3e-3, 64 px / patch 8 and 32 px / patch 4, CLS and GAP), while the same ViT with the stem of
Xiao et al. 2021, "Early Convolutions Help Transformers See Better" (three stride-2 3x3 convolutions and a
1x1 projection instead of one 8x8 stride-8 convolution) learns at once. The stem keeps the token grid, the
patch geometry and every transformer block unchanged, so attention distances, head kinds and localisation
are measured exactly as for a patchify ViT; the difference to remember is that each token already
summarises its 8x8 patch non-linearly, and sees 15x15 px around it (its receptive field: the stem overlaps
neighbouring patches by up to 4 px on each side).

The weights (float16 safetensors, < 3 MB each) and one model card per model (``<name>.json``: architecture,
training configuration, held-out accuracy, sha256 of the weights file) live in ``hooks/models/reference_weights/``
and are produced by ``scripts/train_reference_models.py``, which is seeded and documents its data split:
training images are ``shapes`` seed :data:`TRAIN_SEED`; every ``shapes`` image of any other seed (the
default seed 0 included) is held out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from timm.layers import PatchEmbed
from torch import nn

from repsim.errors import UsageError

#: shapes seed of the training images; all other seeds are held out (the demo and the tests use seed 0).
TRAIN_SEED = 1000
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_weights")


@dataclass(frozen=True)
class ReferenceModel:
    """One bundled model: the timm architecture it is built from and its input geometry.

    timm_arch : a timm model name; ``kwargs`` override its defaults (width, depth, ...) in ``timm.create_model``
    family : the layer-preset family (:data:`hooks.capture.layers.FAMILIES`)
    img_size : input side in pixels (the ``shapes`` images are rendered at this size)
    mean, std : input normalisation per RGB channel, applied to [0, 1] pixels
    """

    name: str
    timm_arch: str
    family: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    description: str = ""

    @property
    def weights_file(self) -> str:
        """Absolute path of the bundled float16 safetensors file."""
        return os.path.join(WEIGHTS_DIR, f"{self.name}.safetensors")

    @property
    def card_file(self) -> str:
        """Absolute path of the model card (JSON)."""
        return os.path.join(WEIGHTS_DIR, f"{self.name}.json")


class ConvStemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with its single ``patch x patch`` stride-``patch`` convolution replaced by the
    convolutional stem of Xiao et al. 2021 (Sec. 3): ``log2(patch)`` 3x3 stride-2 convolutions, each with
    BatchNorm and ReLU, channels rising to ``embed_dim`` (``embed_dim / 2^(k-1)`` ... ``embed_dim``), then a
    1x1 convolution. Input (B, C, H, W) → tokens (B, H/patch * W/patch, embed_dim), the same grid, attributes
    (``patch_size``, ``grid_size``, ``num_patches``) and flattening as ``PatchEmbed``.
    """

    def __init__(self, img_size: Any = 224, patch_size: Any = 16, in_chans: int = 3, embed_dim: int = 768,
                 **kwargs: Any):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        ph, pw = self.patch_size
        steps = ph.bit_length() - 1
        if ph != pw or ph < 2 or 2 ** steps != ph:
            raise ValueError(f"ConvStemPatchEmbed needs a square power-of-two patch size, got {self.patch_size}")
        chans = [in_chans] + [max(1, embed_dim // 2 ** (steps - 1 - i)) for i in range(steps)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(chans[-1], embed_dim, 1))
        self.proj = nn.Sequential(*layers)


_VIT = dict(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=4, mlp_ratio=4.0, num_classes=8,
            embed_layer=ConvStemPatchEmbed)

REFERENCE_MODELS: dict[str, ReferenceModel] = {
    "ref_vit": ReferenceModel(
        "ref_vit", "vit_tiny_patch16_224", "vit", dict(_VIT, class_token=True, global_pool="token"),
        description="reference ViT on shapes, 64 px, patch 8 (conv stem), width 96, depth 6, class token"),
    "ref_vit_gap": ReferenceModel(
        "ref_vit_gap", "vit_tiny_patch16_224", "vit", dict(_VIT, class_token=False, global_pool="avg"),
        description="reference ViT on shapes as ref_vit, no class token: global average pooling"),
    "ref_resnet": ReferenceModel(
        "ref_resnet", "resnet18", "resnet", dict(channels=(16, 32, 64, 128), stem_width=16, num_classes=8),
        description="reference ResNet-18 layout at quarter width on shapes, 64 px"),
}


def get_reference(name: str) -> ReferenceModel:
    """The :class:`ReferenceModel` called ``name`` (UsageError listing the names otherwise)."""
    if name not in REFERENCE_MODELS:
        raise UsageError(f"unknown reference model {name!r}; bundled: {', '.join(REFERENCE_MODELS)}")
    return REFERENCE_MODELS[name]


def build_reference(name: str) -> nn.Module:
    """The architecture of reference model ``name``, randomly initialised (torch's global RNG), in train mode."""
    import timm

    ref = get_reference(name)
    return timm.create_model(ref.timm_arch, pretrained=False, **ref.kwargs)


def reference_card(name: str) -> dict[str, Any]:
    """The model card of ``name`` (architecture, training configuration, held-out accuracy, sha256).

    Raises UsageError when the weights were never built into this installation.
    """
    ref = get_reference(name)
    if not (os.path.isfile(ref.card_file) and os.path.isfile(ref.weights_file)):
        raise UsageError(f"the bundled weights of {name} are missing from {WEIGHTS_DIR}; rebuild them with "
                         "`python scripts/train_reference_models.py` or use --random-init")
    with open(ref.card_file, encoding="utf-8") as f:
        return json.load(f)


__all__ = ["ConvStemPatchEmbed", "TRAIN_SEED", "WEIGHTS_DIR", "ReferenceModel", "REFERENCE_MODELS", "get_reference", "build_reference",
           "reference_card"]
