"""repsim's own procedural data set: one coloured shape on a textured background, with its exact mask.

Every sample shows one object of :data:`SHAPE_CLASSES` (in this fixed order; the label is the index)::

    0 circle   1 square   2 triangle   3 star   4 cross   5 ring   6 hexagon   7 heart

drawn at a random position, rotation (uniform over 360°), area and flat colour over a random background
texture. The background is one or a weighted mix of two of four textures (smooth value noise, sine
stripes, a rotated checkerboard, a linear gradient); the texture value ``t`` in [0, 1] blends two random
colours ``c0 + t (c1 - c0)``, so every background pixel lies on the RGB segment [c0, c1]. The object
colour is drawn at Euclidean RGB distance >= :data:`MIN_CONTRAST` (0..255 units) from that whole segment,
so the object contrasts with *every* background pixel, not only with the background's mean.

Geometry. Each shape is a polygon (a ring: two) normalised so that its vertices lie within the unit
circle, hence any rotation stays inside a disc of radius ``r``. The object area is drawn uniformly in
[:data:`AREA_RANGE`] of the image (capped where the disc would not fit) and ``r`` follows from the shape's
unit area; the centre is drawn so the disc keeps :data:`MARGIN_PX` pixels from every border, so the object
is always fully inside the image and its mask never touches the border. Edges are anti-aliased: the mask
is drawn at 4x resolution with ``PIL.ImageDraw`` and box-downsampled to a coverage ``alpha`` in [0, 1];
the image is ``background (1 - alpha) + colour alpha`` and the mask is ``alpha >= 0.5``.

Determinism. Sample ``index`` of ``seed`` is generated from ``np.random.default_rng([seed, index])`` alone
(no global state), so any sample can be generated independently: resumable extraction, parallel workers.
The random draws do not depend on ``image_size``: the same (seed, index) at 32 px and at 224 px is the
same scene at two resolutions (up to the pixel margin). The label is the generator's first draw, so
labels are known without rendering (:func:`shape_label`). :data:`GENERATOR_VERSION` is recorded in the
store's provenance and must be bumped whenever the pixels a (seed, index, size) produces change.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from repsim.data.image_source import ImageSource
from repsim.errors import UsageError

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart")
GENERATOR_VERSION = 1
MIN_IMAGE_SIZE = 16
AREA_RANGE = (0.10, 0.32)  # object area as a fraction of the image, before the fit cap
MARGIN_PX = 1.5  # free pixels between the object's bounding disc and the image border
MIN_CONTRAST = 100.0  # RGB distance (0..255 units) between the object colour and every background colour
SUPERSAMPLE = 4  # the mask is drawn at 4x and box-downsampled: anti-aliased edges
TEXTURES = ("noise", "stripes", "checker", "gradient")
_N_COLOUR_CANDIDATES = 64


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _cross(half_width: float = 0.3) -> np.ndarray:
    w = half_width
    return np.array([(w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w),
                     (-1, w), (-w, w), (-w, 1), (w, 1)], dtype=float)


def _heart(n: int = 96) -> np.ndarray:
    # The classic heart curve: x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t.
    t = 2 * np.pi * np.arange(n) / n
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y], axis=1)  # image y points down


def _normalise(rings: list[np.ndarray]) -> list[np.ndarray]:
    """Centre on the bounding box of the outer outline and scale its farthest vertex to radius 1."""
    outer = rings[0]
    centre = (outer.min(0) + outer.max(0)) / 2
    scale = np.linalg.norm(outer - centre, axis=1).max()
    return [(r - centre) / scale for r in rings]


def _shoelace(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# name -> [outer outline, holes...] in unit coordinates (all vertices within the unit circle)
_OUTLINES: dict[str, list[np.ndarray]] = {
    "circle": _normalise([_regular(96)]),
    "square": _normalise([_regular(4, phase=np.pi / 4)]),
    "triangle": _normalise([_regular(3, phase=np.pi / 2)]),
    "star": _normalise([_star()]),
    "cross": _normalise([_cross()]),
    "ring": _normalise([_regular(96), _regular(96, radius=0.55)]),
    "hexagon": _normalise([_regular(6)]),
    "heart": _normalise([_heart()]),
}
_UNIT_AREA = {k: _shoelace(v[0]) - sum(_shoelace(h) for h in v[1:]) for k, v in _OUTLINES.items()}
assert tuple(_OUTLINES) == SHAPE_CLASSES


def _check(seed: int, index: int, image_size: int) -> None:
    for name, v in (("seed", seed), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise UsageError(f"shapes: {name} must be a non-negative integer, got {v!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise UsageError(f"shapes: image size must be an integer >= {MIN_IMAGE_SIZE} px, got {image_size!r}")


def shape_label(seed: int, index: int) -> int:
    """The class label of sample ``index`` of ``seed`` without rendering it (the generator's first draw)."""
    return int(np.random.default_rng([seed, index]).integers(len(SHAPE_CLASSES)))


def _texture(kind: str, rng: np.random.Generator, size: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A texture value in [0, 1], float32 (size, size); ``u``, ``v`` are pixel-centre coordinates in [0, 1]."""
    theta = rng.uniform(0, 2 * np.pi)
    a = u * np.cos(theta) + v * np.sin(theta)  # coordinate along a random direction
    b = -u * np.sin(theta) + v * np.cos(theta)
    if kind == "noise":  # smooth value noise: a random k x k grid, bicubic-upsampled
        k = int(rng.integers(3, 10))
        grid = rng.random((k, k)).astype(np.float32)
        t = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))
        lo, hi = float(t.min()), float(t.max())
        return (t - lo) / max(hi - lo, 1e-6)
    if kind == "stripes":
        freq, phase = rng.uniform(2, 10), rng.uniform(0, 2 * np.pi)  # cycles per image width
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * a + phase)
    if kind == "checker":
        cells, du, dv = rng.uniform(2, 9), rng.random(), rng.random()  # cells per image width
        return ((np.floor(cells * a + du) + np.floor(cells * b + dv)) % 2).astype(np.float32)
    if kind == "gradient":
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / max(hi - lo, 1e-6)
    raise AssertionError(kind)


def _segment_distance(points: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """Euclidean distance of each row of ``points`` (m, 3) to the segment [c0, c1] in RGB space."""
    d = c1 - c0
    s = np.clip((points - c0) @ d / max(float(d @ d), 1e-12), 0.0, 1.0)
    return np.linalg.norm(points - (c0 + s[:, None] * d), axis=1)


def render_shape_sample(seed: int, index: int, image_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Render sample ``index`` of the shapes data set for ``seed`` at ``image_size`` x ``image_size`` px.

    Returns ``(image, mask, label)``: image uint8 (H, W, 3) RGB, mask bool (H, W) True on the object
    (pixels at least half covered), label an int indexing :data:`SHAPE_CLASSES`. Pure function of its
    arguments: the same (seed, index, image_size) always gives identical arrays.
    """
    _check(seed, index, image_size)
    size = int(image_size)
    rng = np.random.default_rng([int(seed), int(index)])
    # Draw order is part of the data set's definition (GENERATOR_VERSION): label first (see shape_label).
    label = int(rng.integers(len(SHAPE_CLASSES)))
    name = SHAPE_CLASSES[label]

    # Background: t in [0, 1] from one texture or a weighted mix of two, blending colours c0 and c1.
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = np.meshgrid(centres, centres)  # u along x (columns), v along y (rows)
    kinds = rng.choice(len(TEXTURES), size=2, replace=False)
    mix = rng.random() < 0.5
    weight = rng.uniform(0.3, 0.7)
    t = _texture(TEXTURES[kinds[0]], rng, size, u, v)
    t2 = _texture(TEXTURES[kinds[1]], rng, size, u, v)
    if mix:
        t = weight * t + (1 - weight) * t2
    c0, c1 = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)

    # Object colour: the first random candidate far enough from the whole background segment; else the
    # farthest RGB-cube corner (>= 190 away for every one of 2e5 random segments tried; the fallback is
    # rare: none of 2e4 random backgrounds needed it).
    candidates = rng.uniform(0, 255, size=(_N_COLOUR_CANDIDATES, 3))
    dist = _segment_distance(candidates, c0, c1)
    ok = np.flatnonzero(dist >= MIN_CONTRAST)
    if ok.size:
        colour = candidates[ok[0]]
    else:
        corners = 255.0 * np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=float)
        colour = corners[np.argmax(_segment_distance(corners, c0, c1))]

    # Geometry, in units of the image width: area -> bounding radius, then a centre that keeps the disc
    # MARGIN_PX away from every border.
    area_u, cx_u, cy_u, angle = rng.random(), rng.random(), rng.random(), rng.uniform(0, 2 * np.pi)
    r_max = 0.5 - MARGIN_PX / size
    a_max = min(AREA_RANGE[1], _UNIT_AREA[name] * r_max**2)
    area = AREA_RANGE[0] + area_u * (a_max - AREA_RANGE[0]) if a_max > AREA_RANGE[0] else a_max
    r = min(math.sqrt(area / _UNIT_AREA[name]), r_max)
    lo, hi = r + MARGIN_PX / size, 1 - r - MARGIN_PX / size
    cx, cy = lo + cx_u * (hi - lo), lo + cy_u * (hi - lo)

    # Coverage alpha: polygons at SUPERSAMPLE x resolution, box-averaged down.
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    for k, outline in enumerate(_OUTLINES[name]):
        pts = (outline @ rot.T * r + (cx, cy)) * big - 0.5  # PIL puts integer coordinates at pixel centres
        draw.polygon([tuple(p) for p in pts], fill=255 if k == 0 else 0)
    alpha = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0

    background = c0 + t[..., None] * (c1 - c0)
    image = background * (1 - alpha[..., None]) + colour * alpha[..., None]
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, alpha >= 0.5, label


class ShapesDataset(ImageSource):
    """``n`` samples of the shapes data set for ``seed`` at ``image_size`` px, in index order 0..n-1.

    Order: plain ``range(n)``, not a permutation. Every sample is already an independent random draw
    (its label included), so any contiguous block is a uniform random sample, and keeping index order
    makes a smaller store a prefix of a larger one with the same seed. Ids are
    ``"shapes/v{GENERATOR_VERSION}/seed={seed}/size={image_size}/{index}"`` (the generator version makes
    the fingerprint change when the generator does).
    """

    def __init__(self, n: int = 1000, *, seed: int = 0, image_size: int = 224):
        _check(seed, 0, image_size)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise UsageError(f"shapes: n must be a positive integer, got {n!r}")
        self.seed, self.image_size = int(seed), int(image_size)
        self._indices = np.arange(int(n))
        super().__init__(
            name="shapes",
            root=None,
            ids=[f"shapes/v{GENERATOR_VERSION}/seed={self.seed}/size={self.image_size}/{i}" for i in self._indices],
            labels=np.array([shape_label(self.seed, int(i)) for i in self._indices], dtype=np.int64),
            classes=list(SHAPE_CLASSES),
            seed=self.seed,
            params={
                "image_size": self.image_size,
                "generator_version": GENERATOR_VERSION,
                "order": "range(n)",
            },
        )

    def _render(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        return render_shape_sample(self.seed, int(self._indices[self._index(i)]), self.image_size)

    def load(self, i: int) -> Image.Image:
        """The ``i``-th sample as an RGB image of ``image_size`` x ``image_size`` px."""
        return Image.fromarray(self._render(i)[0])

    def load_mask(self, i: int) -> np.ndarray:
        """Ground-truth object mask of the ``i``-th sample: bool (image_size, image_size), True on the object."""
        return self._render(i)[1]
