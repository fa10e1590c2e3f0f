"""Ground-truth object masks of a store's samples, carried to model-input coordinates and to a token grid.

Two sources of masks:

* the ``shapes`` data set (:mod:`repsim.data.shapes`): each sample id ``shapes/v{V}/seed={S}/size={Z}/{i}`` names its
  scene, and the mask is re-rendered with :func:`repsim.data.shapes.render_shape_sample` ``(S, i, Z)``; ``V`` must
  equal the installed :data:`repsim.data.shapes.GENERATOR_VERSION`, else the pixels could differ and the store is
  refused (:func:`shapes_masks`);
* a folder of mask images for any other data set (:func:`folder_masks`): one single-channel PNG per sample,
  named after the sample id with its image extension replaced by ``.png`` (:func:`mask_file_name`: id
  ``cat/0001.jpg`` → ``DIR/cat/0001.png``, id ``img_7`` → ``DIR/img_7.png``), the size of the *original* image,
  pixel value 0 = background, anything else = object (0/255 binary masks, 0/1 masks and label images whose
  classes are > 0 all work; VOC's 255 "void" border counts as object).

A mask (bool or float coverage, original image coordinates) is carried into model-input coordinates by the
geometry of the store's recorded preprocessing (:func:`input_masks`), the same geometry as timm's evaluation
transform (:func:`repsim.store`'s ``preprocessing``: ``img_size``, ``crop_pct``, ``crop_mode``): resized
(PIL bilinear, on the float mask) to ``floor(H / crop_pct) × floor(W / crop_pct)`` — the shorter side for
``center`` (aspect kept), each side for ``squash``, the longer side for ``border`` — then centre-cropped (or,
for ``border``, padded with background) to the input ``H × W``. For the square shapes images at the model's
size and ``crop_pct = 1`` this is the identity. Bilinear resizing of the float mask keeps each input pixel's
object *coverage* in [0, 1] instead of a nearest-neighbour guess.

The *foreground fraction* of grid cell (i, j) is the mean coverage over the cell's input pixels, rows
``round(i·H/gh) … round((i+1)·H/gh)`` and columns likewise (:func:`cell_bounds`: a ViT's patch, a CNN map
position's stride cell). A cell is *foreground* when its fraction is > :data:`FOREGROUND_THRESHOLD` (0.5: more
than half of its pixels on the object; a cell exactly half covered is background), the rule of the foreground
probe (:mod:`probes.foreground_probe`) and of attention segmentation (:mod:`repsim.attention.segmentation`),
so their scores are over the same ground truth.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from repsim.errors import UsageError

__all__ = [
    "FOREGROUND_THRESHOLD",
    "cell_bounds",
    "folder_masks",
    "foreground_fractions",
    "input_masks",
    "mask_file_name",
    "parse_shapes_id",
    "patch_foreground",
    "shapes_masks",
    "store_input_masks",
    "token_iou",
]

FOREGROUND_THRESHOLD = 0.5
"""A grid cell is foreground when more than this fraction of its input pixels lie on the object."""

_SHAPES_ID = re.compile(r"^shapes/v(\d+)/seed=(\d+)/size=(\d+)/(\d+)$")
_CROP_MODES = ("center", "squash", "border")


# ----------------------------------------------------------------------------------------------------
# Grid cells
# ----------------------------------------------------------------------------------------------------


def cell_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of ``parts`` cells along an axis of ``size`` input pixels: cell ``k`` spans
    ``round(k·size/parts) … round((k+1)·size/parts)`` (a ViT patch, a CNN map position's stride cell)."""
    edges = [int(round(k * size / parts)) for k in range(parts + 1)]
    return [(edges[k], edges[k + 1]) for k in range(parts)]


def foreground_fractions(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each grid cell's pixels on the object: float32 (n, gh·gw), row-major cells of ``masks``
    (n, H, W) (bool or float coverage)."""
    m = np.asarray(masks, dtype=np.float32)
    n, H, W = m.shape
    gh, gw = grid
    if gh > H or gw > W:
        raise UsageError(f"grid {gh}x{gw} is finer than the input {H}x{W}")
    cols = [m[:, r0:r1, c0:c1].mean(axis=(1, 2)) for r0, r1 in cell_bounds(H, gh) for c0, c1 in cell_bounds(W, gw)]
    return np.stack(cols, axis=1).astype(np.float32)


def token_iou(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-image IoU (Jaccard index) of boolean token sets along the last axis, ``|pred ∩ true| / |pred ∪ true|``,
    shape ``broadcast(pred, true).shape[:-1]`` (NaN where the true set is empty: no object cell on this grid),
    and the pooled IoU (intersections and unions summed over everything; NaN when every union is empty)."""
    pred, true = np.asarray(pred, dtype=bool), np.asarray(true, dtype=bool)
    inter = (pred & true).sum(axis=-1).astype(np.float64)
    union = (pred | true).sum(axis=-1).astype(np.float64)
    per = np.where(np.broadcast_to(true.any(axis=-1), inter.shape), inter / np.maximum(union, 1), np.nan)
    pooled = float(inter.sum() / union.sum()) if union.sum() > 0 else float("nan")
    return per, pooled


def patch_foreground(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Foreground cells, bool (n, gh·gw) row-major: fraction > :data:`FOREGROUND_THRESHOLD` (module docstring)."""
    return foreground_fractions(masks, grid) > FOREGROUND_THRESHOLD


# ----------------------------------------------------------------------------------------------------
# Input geometry
# ----------------------------------------------------------------------------------------------------


def _resized_size(h: int, w: int, img_size: tuple[int, int], crop_pct: float, crop_mode: str) -> tuple[int, int]:
    """(rows, cols) an h × w image is resized to before the centre crop, as timm's evaluation transform does
    (``transforms_imagenet_eval``: torchvision ``Resize`` / timm ``ResizeKeepRatio``)."""
    sh, sw = math.floor(img_size[0] / crop_pct), math.floor(img_size[1] / crop_pct)
    if crop_mode == "squash":
        return sh, sw
    if crop_mode == "center" and sh == sw:
        # torchvision Resize(int): the shorter side to sh, the longer one int(sh * long / short)
        return (sh, int(sh * w / h)) if h <= w else (int(sh * h / w), sh)
    # timm ResizeKeepRatio: the shorter side (center, non-square target) or the longer side (border) fits
    ratio = max(h / sh, w / sw) if crop_mode == "border" else min(h / sh, w / sw)
    return round(h / ratio), round(w / ratio)


def _crop_or_pad(a: np.ndarray, H: int, W: int) -> np.ndarray:
    """Centre crop to H × W, padding with 0 (background) first where ``a`` is smaller (torchvision's
    ``center_crop`` offsets: pad ``(H - h) // 2`` before, crop from ``round((h - H) / 2)``)."""
    h, w = a.shape
    if h < H or w < W:
        top, left = max(H - h, 0) // 2, max(W - w, 0) // 2
        a = np.pad(a, ((top, max(H - h, 0) - top), (left, max(W - w, 0) - left)))
        h, w = a.shape
    r0, c0 = int(round((h - H) / 2.0)), int(round((w - W) / 2.0))
    return a[r0: r0 + H, c0: c0 + W]


def input_masks(masks: Sequence[np.ndarray] | np.ndarray, img_size: tuple[int, int], crop_pct: float = 1.0,
                crop_mode: str = "center") -> np.ndarray:
    """Masks in original image coordinates (a sequence of (h, w) arrays, sizes may differ; bool or float
    coverage) carried to model-input coordinates: float32 (n, H, W) coverage in [0, 1] (module docstring:
    bilinear resize of the float mask as the evaluation transform resizes the image, then centre crop)."""
    if crop_mode not in _CROP_MODES:
        raise UsageError(f"crop_mode must be one of {', '.join(_CROP_MODES)}, got {crop_mode!r}")
    H, W = int(img_size[0]), int(img_size[1])
    out = np.empty((len(masks), H, W), dtype=np.float32)
    for k, m in enumerate(masks):
        m = np.asarray(m, dtype=np.float32)
        if m.ndim != 2 or min(m.shape) < 1:
            raise UsageError(f"a mask must be a 2-D (rows, cols) array, got shape {m.shape}")
        rows, cols = _resized_size(m.shape[0], m.shape[1], (H, W), float(crop_pct), crop_mode)
        im = Image.fromarray(m, mode="F")
        if im.size != (cols, rows):
            im = im.resize((cols, rows), Image.Resampling.BILINEAR)
        out[k] = np.clip(_crop_or_pad(np.asarray(im, dtype=np.float32), H, W), 0.0, 1.0)
    return out


def _preprocessing_geometry(prep: dict[str, Any]) -> tuple[tuple[int, int], float, str]:
    size = prep.get("img_size")
    if size is None:
        raise UsageError("the store records no preprocessing img_size: token cells cannot be placed on the input")
    hw = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))
    return hw, float(prep.get("crop_pct") or 1.0), str(prep.get("crop_mode") or "center")


# ----------------------------------------------------------------------------------------------------
# Mask sources
# ----------------------------------------------------------------------------------------------------


def parse_shapes_id(sample_id: str) -> tuple[int, int, int, int]:
    """``(generator_version, seed, size, index)`` of a shapes sample id; UsageError for anything else."""
    m = _SHAPES_ID.match(str(sample_id))
    if m is None:
        raise UsageError(f"sample id {sample_id!r} is not a shapes id (shapes/v<V>/seed=<S>/size=<Z>/<i>)")
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


def shapes_masks(ids: Sequence[str]) -> np.ndarray:
    """Ground-truth masks (n, Z, Z) bool of shapes samples, re-rendered from their ids (module docstring)."""
    from repsim.data.shapes import GENERATOR_VERSION, render_shape_sample

    out = []
    for sid in ids:
        version, seed, size, index = parse_shapes_id(sid)
        if version != GENERATOR_VERSION:
            raise UsageError(f"sample {sid!r} was made by shapes generator v{version}, this repsim has "
                             f"v{GENERATOR_VERSION}: its masks cannot be reproduced; re-extract the store")
        out.append(render_shape_sample(seed, index, size)[1])
    if len({m.shape for m in out}) > 1:
        raise UsageError("the store mixes shapes samples of several sizes")
    return np.stack(out) if out else np.zeros((0, 1, 1), dtype=bool)


def mask_file_name(sample_id: str) -> str:
    """Relative path of a sample's mask in a masks folder: the id with its image extension (if any) replaced by
    ``.png`` (``cat/0001.jpg`` → ``cat/0001.png``; ``img_7`` → ``img_7.png``). Ids that would leave the folder
    (absolute, ``..``) are refused."""
    from repsim.data.sources import IMAGE_EXTENSIONS

    sid = str(sample_id)
    parts = sid.split("/")
    if sid.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"sample id {sid!r} cannot name a file inside the masks folder")
    stem, ext = os.path.splitext(sid)
    return (stem if ext.lower() in IMAGE_EXTENSIONS else sid) + ".png"


def _read_mask(path: str, shown: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.format != "PNG":
                raise UsageError(f"mask {shown} is a {im.format} file, not a PNG")
            if im.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise UsageError(f"mask {shown} has {im.mode} pixels: save masks as single-channel PNGs "
                                 "(mode 1, L, P or 16-bit), 0 = background, anything else = object")
            a = np.asarray(im)
    except UsageError:
        raise
    except (OSError, ValueError) as err:
        raise UsageError(f"mask {shown} cannot be decoded as an image ({err})") from None
    return a != 0


def folder_masks(folder: str | os.PathLike, ids: Sequence[str], image_sizes: Sequence[tuple[int, int] | None]
                 | None = None) -> list[np.ndarray]:
    """Object masks (bool, original image size each) of samples ``ids`` from a masks folder (module docstring).

    Validated, each failure one :class:`UsageError` line: the folder exists; every sample has its PNG (the
    count missing and the first one named); each decodes, is single-channel, and — where ``image_sizes[k]`` =
    (rows, cols) of the sample's image is known — has the image's size.
    """
    root = os.fspath(folder)
    if not os.path.isdir(root):
        raise UsageError(f"--masks {root}: no such folder")
    names = [mask_file_name(s) for s in ids]
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise UsageError(f"--masks {root}: {len(missing)} of {len(names)} samples have no mask, e.g. {missing[0]} "
                         "(one PNG per sample id, its image extension replaced by .png)")
    out = []
    for k, name in enumerate(names):
        m = _read_mask(os.path.join(root, name), os.path.join(root, name))
        want = None if image_sizes is None else image_sizes[k]
        if want is not None and tuple(m.shape) != tuple(want):
            raise UsageError(f"mask {os.path.join(root, name)} is {m.shape[0]}x{m.shape[1]} px but its image is "
                             f"{want[0]}x{want[1]}: masks must have the original image's size")
        out.append(m)
    return out


def _image_sizes(store: Any, rows: np.ndarray) -> list[tuple[int, int] | None]:
    """(rows, cols) of the original images of a folder data set when its files are still there, else None
    (read from the file headers; nothing is decoded)."""
    d = (getattr(store, "attrs", {}) or {}).get("dataset") or {}
    root = d.get("root")
    ids = store.ids
    out: list[tuple[int, int] | None] = []
    for r in rows:
        path = os.path.join(root, ids[int(r)]) if root and d.get("name") in ("folder", "imagefolder") else None
        if path is None or not os.path.isfile(path):
            out.append(None)
            continue
        try:
            with Image.open(path) as im:
                out.append((im.size[1], im.size[0]))
        except OSError:
            out.append(None)
    return out


def store_input_masks(store: Any, rows: Sequence[int] | np.ndarray, masks_dir: str | os.PathLike | None = None
                      ) -> np.ndarray:
    """Object coverage (len(rows), H, W) float32 in [0, 1] of store rows ``rows``, in model-input coordinates.

    Masks from ``masks_dir`` when given (:func:`folder_masks`, checked against the original image sizes where
    the data set's files are reachable), else re-rendered from the ids of a ``shapes`` store; a store of any
    other data set without ``masks_dir`` is refused in one line.
    """
    rows = np.asarray(rows, dtype=np.int64)
    hw, crop_pct, crop_mode = _preprocessing_geometry((store.attrs.get("preprocessing") or {}))
    ids = store.ids
    if masks_dir is not None:
        raw = folder_masks(masks_dir, [ids[int(r)] for r in rows], _image_sizes(store, rows))
    else:
        d = (store.attrs.get("dataset") or {}).get("name")
        if d != "shapes":
            raise UsageError(f"{store.path} was extracted from the {d!r} data set, whose object masks repsim cannot "
                             "render: pass --masks DIR (one PNG per sample id)")
        raw = list(shapes_masks([ids[int(r)] for r in rows]))
    return input_masks(raw, hw, crop_pct, crop_mode)
