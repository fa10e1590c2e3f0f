"""Input preprocessing of a model: the evaluation transform, as data that can be stored and compared.

A :class:`Preprocessing` is what turns a PIL image into the ``(3, H, W)`` float32 tensor a model was trained
to see (resize, centre crop, scale to [0, 1], normalise). It is recorded in every activation store, so two
stores made with different preprocessing are never silently compared. The transform itself is built by
:func:`timm.data.create_transform` (evaluation mode), the same code path timm uses to evaluate its models.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from repsim.errors import UsageError

#: ImageNet statistics (per RGB channel, on pixel values scaled to [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
#: "center": resize the shorter side to img_size / crop_pct (aspect kept), centre crop to img_size.
#: "squash": resize each side to img_size / crop_pct (aspect not kept), centre crop (what HF ViT processors do).
#: "border": resize the longer side to img_size / crop_pct, pad with the mean colour, centre crop.
CROP_MODES = ("center", "squash", "border")


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        size = (int(value), int(value))
    else:
        try:
            size = tuple(int(v) for v in value)  # type: ignore[union-attr]
        except TypeError:
            raise UsageError(f"{what} must be an int or (H, W), got {value!r}") from None
        if len(size) != 2:
            raise UsageError(f"{what} must be an int or (H, W), got {value!r}")
    if min(size) < 1:
        raise UsageError(f"{what} must be positive, got {value!r}")
    return size  # type: ignore[return-value]


def _triple(value: Sequence[float], what: str) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be three numbers (R, G, B), got {value!r}") from None
    if len(t) != 3 or not all(math.isfinite(v) for v in t):
        raise UsageError(f"{what} must be three finite numbers (R, G, B), got {value!r}")
    return t  # type: ignore[return-value]


class _ToRGB:
    """Convert any PIL image (L, LA, P, RGBA, CMYK, I;16 ...) to RGB; a module-level class so it pickles."""

    def __call__(self, img: Any) -> Any:
        return img if getattr(img, "mode", "RGB") == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing of a model.

    img_size : (H, W) of the model input in pixels
    mean, std : per RGB channel, applied to pixel values scaled to [0, 1]: ``x = (v / 255 - mean) / std``
    interpolation : resize filter, "bicubic" | "bilinear" | "nearest"
    crop_pct : the image is resized to ``floor(img_size / crop_pct)`` (shorter side for "center"), then
        centre-cropped to img_size; 1.0 means no crop margin
    crop_mode : "center" | "squash" | "border" (see :data:`CROP_MODES`)
    """

    img_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        # Normalise the types (lists from JSON, numpy floats, ints) so equality and hashing are exact,
        # and validate once so every consumer can trust the values.
        object.__setattr__(self, "img_size", _pair(self.img_size, "img_size"))
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        std = _triple(self.std, "std")
        if min(std) <= 0:
            raise UsageError(f"std must be > 0 for every channel, got {std}")
        object.__setattr__(self, "std", std)
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        try:
            crop_pct = float(self.crop_pct)
        except (TypeError, ValueError):
            raise UsageError(f"crop_pct must be a number in (0, 1], got {self.crop_pct!r}") from None
        if not 0.0 < crop_pct <= 1.0:
            raise UsageError(f"crop_pct must be in (0, 1], got {crop_pct}")
        object.__setattr__(self, "crop_pct", crop_pct)
        if self.crop_mode not in CROP_MODES:
            raise UsageError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")

    # -- serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples as lists); :meth:`from_dict` inverts it exactly."""
        return {
            "img_size": list(self.img_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they would mean a newer format)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UsageError(f"unknown preprocessing field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: d[k] for k in names if k in d})

    # -- the transform -------------------------------------------------------------------------------------
    def transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image (any mode) → float32 tensor (3, H, W), normalised.

        Built with ``timm.data.create_transform(..., is_training=False)``; a leading step converts
        non-RGB images (greyscale, palette, RGBA) to RGB so every image gives three channels.
        """
        from timm.data import create_transform
        from torchvision import transforms

        h, w = self.img_size
        # timm resizes to floor(size / crop_pct): ratios taken from other pipelines go through crop_pct_for.
        tf = create_transform(
            input_size=(3, h, w),
            is_training=False,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
        )
        return transforms.Compose([_ToRGB(), *tf.transforms])

    def resize_size(self) -> tuple[int, int]:
        """(H, W) the image is resized to before the centre crop (timm's ``floor(img_size / crop_pct)``)."""
        return (math.floor(self.img_size[0] / self.crop_pct), math.floor(self.img_size[1] / self.crop_pct))

    def with_overrides(
        self,
        *,
        img_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
    ) -> Preprocessing:
        """A copy with the given fields replaced (None keeps the current value); validated like the original."""
        changes: dict[str, Any] = {}
        if img_size is not None:
            changes["img_size"] = _pair(img_size, "img_size")
        if mean is not None:
            changes["mean"] = mean
        if std is not None:
            changes["std"] = std
        if interpolation is not None:
            changes["interpolation"] = interpolation
        if crop_pct is not None:
            changes["crop_pct"] = crop_pct
        return dataclasses.replace(self, **changes)


def crop_pct_for(crop: int, resize: int) -> float:
    """crop_pct such that timm's ``floor(crop / crop_pct)`` gives exactly ``resize`` (e.g. 224 / 232).

    ``crop / resize`` in floating point can make ``crop / (crop / resize)`` land just below ``resize``, and
    the floor would then resize to one pixel less than the reference pipeline (torchvision, HF).
    """
    if crop < 1 or resize < crop:
        raise UsageError(f"cannot express resize {resize} / crop {crop} as a crop_pct in (0, 1]")
    pct = crop / resize
    if math.floor(crop / pct) != resize:
        pct = crop / (resize + 1e-6)
    return pct


def default_preprocessing(img_size: int | Sequence[int] = 224) -> Preprocessing:
    """ImageNet mean/std, bicubic, crop_pct 0.875: the fallback for models that declare nothing."""
    return Preprocessing(img_size=_pair(img_size, "img_size"), mean=IMAGENET_MEAN, std=IMAGENET_STD)
