"""Token geometry that a user model declares: how repsim reads the tokens of a ViT it cannot inspect.

repsim reads a ViT's token layout from the model (timm's ``patch_embed`` / ``num_prefix_tokens``, the Hugging
Face embeddings, torchvision's ``VisionTransformer``) and never guesses it from ``sqrt(N − 1)``. Research
code often builds ViTs from ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` with nothing repsim can
read; such a model declares its geometry with one attribute on the module the ``py:`` factory returns (or
on the sub-module that owns the attention layers)::

    model.repsim_geometry = {"grid": (gh, gw), "num_prefix_tokens": 1, "patch_size": 16}

or, from the command line, ``repsim extract --grid GHxGW --prefix-tokens K --patch-size P`` (the flags fill
in or override the attribute's fields). The three fields:

``grid``               (gh, gw): patch tokens per column × per row, ``gh·gw`` of them, row-major after the
                       prefix tokens (patch token ``i`` at grid cell ``(i // gw, i % gw)``); an int means square
``num_prefix_tokens``  tokens (CLS, registers, distillation) before the patch tokens, >= 0
``patch_size``         token stride in input pixels, ``(ph, pw)`` or an int; ``gh·ph × gw·pw`` must be the
                       input size

With it, every ``nn.MultiheadAttention`` (and any other global-attention layer whose layout repsim cannot
read) under the declaring module is captured with this layout (``--attention``: mean attention distance,
aligned maps, ... see :mod:`repsim.attention.statistics`), and the model's token layers are recorded with the grid and
prefix count, so ``repsim localise`` and ``--pool mean`` know which tokens are patches. Token outputs must
be batch first, ``(B, N, D)`` (``nn.TransformerEncoder(..., batch_first=True)``); an attention call whose
token count is not ``num_prefix_tokens + gh·gw`` is an error, never a guessed layout.

Geometry read from a timm / Hugging Face / torchvision model wins only when it is there: a declaration that
contradicts it is refused (:func:`apply_geometry`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from repsim.errors import UsageError

GEOMETRY_ATTR = "repsim_geometry"
"""Name of the module attribute holding a declared geometry (a mapping, see the module docstring)."""

_FIELDS = ("grid", "num_prefix_tokens", "patch_size")


@dataclass(frozen=True)
class TokenGeometry:
    """A validated token layout: ``grid`` (gh, gw), ``num_prefix_tokens`` (>= 0), ``patch_size`` (ph, pw) px."""

    grid: tuple[int, int]
    num_prefix_tokens: int
    patch_size: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        """Tokens per image: ``num_prefix_tokens + gh·gw``."""
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]

    @property
    def img_size(self) -> tuple[int, int]:
        """Input size (H, W) in pixels that the grid covers: ``(gh·ph, gw·pw)``."""
        return self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1]

    def to_dict(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "num_prefix_tokens": self.num_prefix_tokens,
                "patch_size": list(self.patch_size)}


def _positive_pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise UsageError(f"{what} must be a positive integer or a pair (rows, cols), got {value!r}")
    items = (value, value) if isinstance(value, int) else value
    try:
        pair = tuple(items)
    except TypeError:
        raise UsageError(f"{what} must be a positive integer or a pair (rows, cols), got {value!r}") from None
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise UsageError(f"{what} must be a positive integer or a pair of positive integers (rows, cols), "
                         f"got {value!r}")
    return int(pair[0]), int(pair[1])


def parse_geometry(value: Any, where: str = GEOMETRY_ATTR) -> TokenGeometry:
    """A :class:`TokenGeometry` from a mapping ``{"grid", "num_prefix_tokens", "patch_size"}`` (all three, no
    other keys) or a :class:`TokenGeometry`; :class:`~repsim.errors.UsageError` naming ``where`` otherwise."""
    if isinstance(value, TokenGeometry):
        return value
    if not isinstance(value, Mapping):
        raise UsageError(f"{where} must be a dict {{'grid': (gh, gw), 'num_prefix_tokens': K, 'patch_size': P}}, "
                         f"got {type(value).__name__}")
    unknown = sorted(set(map(str, value)) - set(_FIELDS))
    if unknown:
        raise UsageError(f"{where} has unknown key {unknown[0]!r}; its keys are {', '.join(_FIELDS)}")
    missing = [k for k in _FIELDS if value.get(k) is None]
    if missing:
        raise UsageError(f"{where} lacks {', '.join(missing)} (needs grid, num_prefix_tokens and patch_size)")
    prefix = value["num_prefix_tokens"]
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise UsageError(f"{where}: num_prefix_tokens must be an integer >= 0, got {prefix!r}")
    return TokenGeometry(_positive_pair(value["grid"], f"{where}: grid"), int(prefix),
                         _positive_pair(value["patch_size"], f"{where}: patch_size"))


def declared_geometry(module: nn.Module) -> TokenGeometry | None:
    """The geometry ``module`` declares through its :data:`GEOMETRY_ATTR` attribute (None when it has none);
    a malformed declaration raises :class:`~repsim.errors.UsageError`."""
    value = getattr(module, GEOMETRY_ATTR, None)
    if value is None:
        return None
    return parse_geometry(value, f"{type(module).__name__}.{GEOMETRY_ATTR}")


def parse_grid(text: str | None) -> tuple[int, int] | None:
    """``"14x14"`` / ``"6x10"`` / ``"14"`` (square) → (gh, gw); None passes through. For ``--grid``."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×,]\s*(\d+))?\s*", str(text))
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise UsageError(f"--grid must be GHxGW (patch rows x columns, e.g. 14x14), got {text!r}")
    gh = int(m.group(1))
    return gh, int(m.group(2)) if m.group(2) is not None else gh


def geometry_from_flags(module: nn.Module, grid: tuple[int, int] | None = None,
                        num_prefix_tokens: int | None = None, patch_size: int | tuple[int, int] | None = None
                        ) -> TokenGeometry | None:
    """The module's declared geometry with the given fields filled in / overridden; None when there is
    neither a declaration nor a flag. A partial result (some field neither declared nor given) raises."""
    declared = declared_geometry(module)
    if declared is None and grid is None and num_prefix_tokens is None and patch_size is None:
        return None
    fields: dict[str, Any] = declared.to_dict() if declared is not None else {}
    for key, flag, value in (("grid", "--grid", grid), ("num_prefix_tokens", "--prefix-tokens", num_prefix_tokens),
                             ("patch_size", "--patch-size", patch_size)):
        if value is not None:
            fields[key] = tuple(value) if isinstance(value, (tuple, list)) else value
    missing = [flag for key, flag in (("grid", "--grid"), ("num_prefix_tokens", "--prefix-tokens"),
                                      ("patch_size", "--patch-size")) if fields.get(key) is None]
    if missing:
        raise UsageError(f"the token geometry needs {', '.join(missing)} too (or a `{GEOMETRY_ATTR}` attribute on "
                         "the model with grid, num_prefix_tokens and patch_size)")
    return parse_geometry(fields, "--grid/--prefix-tokens/--patch-size")


def apply_geometry(loaded: Any, grid: tuple[int, int] | None = None, num_prefix_tokens: int | None = None,
                   patch_size: int | tuple[int, int] | None = None) -> TokenGeometry | None:
    """Give a loaded model (:class:`hooks.models.loaded.LoadedModel`) the declared and / or flagged geometry.

    Sets :data:`GEOMETRY_ATTR` on ``loaded.module`` (what :mod:`hooks.capture.attention` reads) and the model
    info's ``num_prefix_tokens`` / ``grid`` / ``patch_size`` (what the activation capture records on token
    layers and the store keeps). Refused: a grid × patch size that is not the input size, and a geometry that
    contradicts one the registry read from the model itself. Returns the geometry, or None when there is
    nothing declared and no flag given (the model is left as it is).
    """
    module, info = loaded.module, loaded.info
    geometry = geometry_from_flags(module, grid, num_prefix_tokens, patch_size)
    if geometry is None:
        return None
    img = tuple(int(v) for v in loaded.preprocessing.img_size)
    if geometry.img_size != img:
        gh, gw = geometry.grid
        ph, pw = geometry.patch_size
        raise UsageError(f"token geometry {gh}x{gw} patches of {ph}x{pw} px covers {gh * ph}x{gw * pw} px but the "
                         f"input is {img[0]}x{img[1]} px: fix the grid / patch size or pass the matching --img-size")
    if info.grid is not None and declared_geometry(module) is None:
        read = (int(info.num_prefix_tokens), tuple(info.grid), tuple(info.patch_size or ()))
        if read != (geometry.num_prefix_tokens, geometry.grid, geometry.patch_size):
            raise UsageError(f"{info.name} has its own token geometry (prefix {read[0]}, grid {read[1]}, patch "
                             f"{read[2]}); --grid/--prefix-tokens/--patch-size may not contradict it")
    setattr(module, GEOMETRY_ATTR, geometry.to_dict())
    info.num_prefix_tokens, info.grid, info.patch_size = (geometry.num_prefix_tokens, geometry.grid,
                                                          geometry.patch_size)
    return geometry


__all__ = ["GEOMETRY_ATTR", "TokenGeometry", "apply_geometry", "declared_geometry", "geometry_from_flags",
           "parse_geometry", "parse_grid"]
