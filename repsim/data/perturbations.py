"""Input perturbations for representation-robustness profiles (``repsim extract --perturb KIND:LEVEL``).

Naseer et al. 2021 ("Intriguing properties of vision transformers", Sec. 3) drop, shuffle and occlude image
patches and find that ViTs keep much of their accuracy where CNNs lose it; Raghu et al. 2021 ask where in
the network such differences arise. A :class:`Perturbation` is applied to the *preprocessed* model input (the
``(3, H, W)`` float32 tensor after resize, crop and normalisation), so its units are those of the normalised
input and two models with the same image size and preprocessing see exactly the same pixels, whatever their
own patch or stride. Its spatial unit is a patch grid given in pixels (``patch_px``, ``--perturb-patch``),
never a model's token grid.

Kinds (``KIND:LEVEL``; level 0 is the identity for every kind, returning the input tensor itself):

- ``patch-drop:F``: the fraction ``F`` in [0, 1] of the ``patch_px`` × ``patch_px`` patches (exactly
  ``round_half_up(F · n_patches)`` of them) set to 0, which after normalisation is the normalisation mean
  colour (the "mean image" of the data set the model was trained on; Naseer et al.'s random PatchDrop).
- ``patch-shuffle:K``: the image cut into a K × K grid of equal pieces (K must divide H and W) and the pieces
  put back in a random order (Naseer et al.'s shuffle grid size; K = 1 is the identity too). ``patch_px``
  is not used.
- ``occlude-centre:F``: a centred rectangle of the image's aspect ratio (a square on square images) with sides
  ``round(sqrt(F) · H)`` × ``round(sqrt(F) · W)`` pixels set to 0 (the mean colour): the share ``F`` of the
  area up to pixel rounding. Deterministic (no seed, no patch grid).
- ``noise:S``: Gaussian noise of standard deviation ``S`` in units of the normalised input added to every
  value (S = 1 is one training-set standard deviation of that channel).

Common corruptions (Hendrycks & Dietterich 2019) are not offered: the PyPI package ``imagecorruptions`` (last
release 2020) calls scikit-image's ``gaussian(..., multichannel=True)``, removed in scikit-image 0.21, and pulls
opencv-python (its maintained fork adds numba too); it also works on uint8 images, so it could not act on the
preprocessed tensor without a quantising round trip.

Seeding: every random draw of a sample comes from a generator seeded by
``sha256(f"{seed}|{kind}|{sample_id}")`` (first 8 bytes, 63 bits), so a sample gets the same perturbation
wherever it sits in a batch, in any run, on any machine with the same torch build. The level is
deliberately *not* in the seed: the patches dropped at F = 0.2 are a subset of those dropped at F = 0.4
(one random order of patches, cut at different lengths) and the noise at S = 0.2 is twice the noise at
S = 0.1, so the levels of a profile differ only by the level (common random numbers), not by a new draw.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from repsim.errors import UsageError

#: kind -> (what the level is, whether it uses the patch grid, whether it draws random numbers)
KINDS: dict[str, tuple[str, bool, bool]] = {
    "patch-drop": ("fraction of patch_px x patch_px patches set to the mean colour (0 after normalisation), 0..1",
                   True, True),
    "patch-shuffle": ("K: a K x K grid of pieces put back in random order (integer, 0 and 1: identity)",
                      False, True),
    "occlude-centre": ("share of the area covered by a centred rectangle of the mean colour, 0..1", False, False),
    "noise": ("std of Gaussian noise in units of the normalised input, >= 0", False, True),
}
DEFAULT_PATCH_PX = 16


def _kinds_text() -> str:
    return "patch-drop:F, patch-shuffle:K, occlude-centre:F, noise:S (see `repsim extract --help`)"


@dataclass(frozen=True)
class Perturbation:
    """One named perturbation at one level (see the module docstring for the kinds).

    kind : a key of :data:`KINDS`
    level : the kind's level (fraction, grid size K, or noise std in normalised units)
    patch_px : side of the patch grid in input pixels (patch-drop only; None for the other kinds)
    seed : global seed of the per-sample draws (None for the deterministic occlude-centre)
    """

    kind: str
    level: float
    patch_px: int | None = DEFAULT_PATCH_PX
    seed: int | None = 0

    @classmethod
    def parse(cls, spec: str, *, patch_px: int | None = None, seed: int = 0) -> Perturbation:
        """``"KIND:LEVEL"`` → a checked Perturbation; a bad kind, level or patch size raises UsageError."""
        kind, sep, level_text = str(spec).strip().partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise UsageError(f"--perturb {spec!r}: unknown kind {kind!r}; use one of {_kinds_text()}")
        if not sep or not level_text.strip():
            raise UsageError(f"--perturb {spec!r}: give a level as KIND:LEVEL, e.g. {kind}:"
                             f"{'4' if kind == 'patch-shuffle' else '0.5'}")
        try:
            level = float(level_text)
        except ValueError:
            raise UsageError(f"--perturb {spec!r}: the level {level_text.strip()!r} is not a number") from None
        what, uses_patch, uses_seed = KINDS[kind]
        if not math.isfinite(level) or level < 0:
            raise UsageError(f"--perturb {spec!r}: the level must be a finite number >= 0 ({kind}: {what})")
        if kind in ("patch-drop", "occlude-centre") and level > 1:
            raise UsageError(f"--perturb {spec!r}: {kind} takes a fraction in [0, 1], got {level:g}")
        if kind == "patch-shuffle" and level != int(level):
            raise UsageError(f"--perturb {spec!r}: patch-shuffle takes a whole grid size K (K x K pieces), "
                             f"got {level:g}")
        if patch_px is not None and not uses_patch:
            raise UsageError(f"--perturb-patch applies to patch-drop only; {kind} does not use a patch grid")
        px = (DEFAULT_PATCH_PX if patch_px is None else int(patch_px)) if uses_patch else None
        if px is not None and px < 1:
            raise UsageError(f"--perturb-patch must be a positive number of pixels, got {px}")
        return cls(kind=kind, level=int(level) if kind == "patch-shuffle" else level, patch_px=px,
                   seed=int(seed) if uses_seed else None)

    @property
    def is_identity(self) -> bool:
        """Level 0 (and patch-shuffle:1) leave every input as it is, bit for bit."""
        return self.level == 0 or (self.kind == "patch-shuffle" and self.level == 1)

    @property
    def label(self) -> str:
        """``"patch-drop:0.5"`` (the spec it was parsed from, normalised)."""
        return f"{self.kind}:{self.level:g}"

    def to_dict(self) -> dict[str, Any]:
        """``{kind, level, patch_px, seed}`` as recorded in a store's root attribute ``perturbation``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Perturbation:
        return cls(kind=str(d["kind"]), level=d["level"], patch_px=d.get("patch_px"), seed=d.get("seed"))

    def check_image(self, size: Sequence[int]) -> None:
        """Refuse an input size (H, W) the perturbation cannot tile: the patch (or K) must divide H and W."""
        h, w = (int(v) for v in size)
        if self.kind == "patch-drop" and (h % self.patch_px or w % self.patch_px):
            raise UsageError(f"--perturb-patch {self.patch_px} must divide the input size {h}x{w} (the patch grid is "
                             f"in input pixels): choose a divisor, e.g. {_divisor_hint(h, w, self.patch_px)}")
        if self.kind == "patch-shuffle" and self.level > 1 and (h % self.level or w % self.level):
            raise UsageError(f"--perturb {self.label}: {self.level} must divide the input size {h}x{w} (K x K equal "
                             f"pieces): choose e.g. {_divisor_hint(h, w, self.level)}")

    def n_patches(self, size: Sequence[int]) -> int:
        """Patches of the patch-drop grid on an (H, W) input."""
        h, w = (int(v) for v in size)
        return (h // self.patch_px) * (w // self.patch_px)

    def n_dropped(self, size: Sequence[int]) -> int:
        """Patches patch-drop sets to the mean colour on an (H, W) input: round-half-up(level · n_patches)."""
        return int(math.floor(self.level * self.n_patches(size) + 0.5))

    def apply(self, x: torch.Tensor, ids: Sequence[str]) -> torch.Tensor:
        """The perturbed batch (B, 3, H, W) float of preprocessed inputs ``x`` with sample ids ``ids`` (length
        B); ``x`` itself when the perturbation is the identity, else a new tensor (``x`` is not changed)."""
        if x.ndim != 4 or x.shape[0] != len(ids):
            raise ValueError(f"expected a (B, C, H, W) batch and B ids, got {tuple(x.shape)} and {len(ids)} ids")
        if self.is_identity:
            return x
        self.check_image(x.shape[-2:])
        return torch.stack([self.apply_one(x[i], ids[i]) for i in range(len(ids))])

    def apply_one(self, x: torch.Tensor, sample_id: str) -> torch.Tensor:
        """One perturbed input (C, H, W), drawn from the sample's own generator (see the module docstring)."""
        if self.is_identity:
            return x
        out = x.clone()
        _, h, w = out.shape
        if self.kind == "occlude-centre":
            oh, ow = round(math.sqrt(self.level) * h), round(math.sqrt(self.level) * w)
            top, left = (h - oh) // 2, (w - ow) // 2
            out[:, top:top + oh, left:left + ow] = 0
            return out
        g = self.generator(sample_id)
        if self.kind == "noise":
            noise = torch.randn(out.shape, generator=g, dtype=torch.float32)
            return out + (self.level * noise).to(out.dtype)
        if self.kind == "patch-drop":
            p, gw = self.patch_px, w // self.patch_px
            for k in torch.randperm(self.n_patches((h, w)), generator=g)[: self.n_dropped((h, w))].tolist():
                r, c = divmod(k, gw)
                out[:, r * p:(r + 1) * p, c * p:(c + 1) * p] = 0
            return out
        # patch-shuffle: K x K pieces of (H/K, W/K) pixels, put back in a random order (row-major slots)
        k = int(self.level)
        ph, pw = h // k, w // k
        pieces = out.reshape(-1, k, ph, k, pw).permute(1, 3, 0, 2, 4).reshape(k * k, -1, ph, pw)
        pieces = pieces[torch.randperm(k * k, generator=g)]
        return pieces.reshape(k, k, -1, ph, pw).permute(2, 0, 3, 1, 4).reshape(-1, h, w).contiguous()

    def generator(self, sample_id: str) -> torch.Generator:
        """The sample's generator: seeded by sha256 of (global seed, kind, sample id), not by its batch position."""
        digest = hashlib.sha256(f"{self.seed}|{self.kind}|{sample_id}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _divisor_hint(h: int, w: int, near: int) -> str:
    common = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
    return str(min(common, key=lambda d: (abs(d - near), d)))


__all__ = ["DEFAULT_PATCH_PX", "KINDS", "Perturbation"]
