"""The procedural shapes data set: determinism, mask/image agreement, geometry bounds, balance, learnability."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from repsim.data.sources import open_dataset
from repsim.errors import UsageError
from repsim.data.shapes import (
    GENERATOR_VERSION,
    MIN_CONTRAST,
    SHAPE_CLASSES,
    ShapesDataset,
    render_shape_sample,
    shape_label,
)

SIZES = (16, 32, 50, 224)


def _erode(m: np.ndarray) -> np.ndarray:
    """3x3 binary erosion (pixels outside the image count as False)."""
    p = np.pad(m, 1)
    out = np.ones_like(m)
    for dy in range(3):
        for dx in range(3):
            out &= p[dy : dy + m.shape[0], dx : dx + m.shape[1]]
    return out


def _dilate(m: np.ndarray) -> np.ndarray:
    return ~_erode(~m)


def test_constants():
    assert MIN_CONTRAST == 100.0
    assert SHAPE_CLASSES == ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart")


@pytest.mark.parametrize("size", SIZES)
def test_deterministic_and_distinct(size):
    a_img, a_mask, a_lab = render_shape_sample(7, 3, size)
    np.random.seed(123)  # global numpy state must not matter
    b_img, b_mask, b_lab = render_shape_sample(7, 3, size)
    assert a_img.shape == (size, size, 3) and a_img.dtype == np.uint8
    assert a_mask.shape == (size, size) and a_mask.dtype == bool
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert a_lab == b_lab == shape_label(7, 3)
    for seed, index in ((7, 4), (8, 3)):
        c_img, c_mask, _ = render_shape_sample(seed, index, size)
        assert not np.array_equal(a_img, c_img) and not np.array_equal(a_mask, c_mask)


@pytest.mark.parametrize("size", SIZES)
def test_mask_geometry_and_contrast(size):
    for i in range(40 if size < 224 else 12):
        img, mask, label = render_shape_sample(1, i, size)
        frac = mask.mean()
        assert 0.08 <= frac <= 0.40, (i, frac)
        # fully inside: the mask never touches the border
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()), i
        img = img.astype(float)
        inner = _erode(_erode(mask))  # pixels 2 px inside the object: exactly its flat colour
        outside = ~_dilate(mask)  # background beyond the anti-aliased rim
        if inner.sum() >= 3:
            colour = img[inner].mean(0)
            assert np.abs(img[inner] - colour).max() <= 1.0, i
            # every background pixel is far from the object colour, not just the background mean
            dist = np.linalg.norm(img[outside] - colour, axis=1)
            assert dist.min() >= 98, (i, dist.min())  # documented: >= 100 before rounding to uint8
        # the mask lines up with the object: inside-mask mean colour vs the ring just outside
        ring = _dilate(_dilate(mask)) & ~mask
        gap = np.linalg.norm(img[mask].mean(0) - img[ring].mean(0))
        assert gap > 40, (i, gap)


def test_scales_are_the_same_scene():
    # random draws do not depend on the size: 224 px box-downsampled to 32 px matches the 32 px render
    ious = []
    for i in range(30):
        _, m32, l32 = render_shape_sample(2, i, 32)
        _, m224, l224 = render_shape_sample(2, i, 224)
        assert l32 == l224
        down = m224.reshape(32, 7, 32, 7).mean((1, 3)) >= 0.5
        ious.append((down & m32).sum() / (down | m32).sum())
    assert min(ious) > 0.5 and np.mean(ious) > 0.75, ious


def test_labels_balanced():
    labels = np.array([shape_label(0, i) for i in range(800)])
    counts = np.bincount(labels, minlength=len(SHAPE_CLASSES))
    assert len(counts) == len(SHAPE_CLASSES) and counts.min() > 0
    assert counts.max() <= 2 * 800 / len(SHAPE_CLASSES), counts
    # the label the renderer uses is the one shape_label predicts
    assert all(render_shape_sample(0, i, 16)[2] == labels[i] for i in range(50))


def _invariant_features(m: np.ndarray) -> np.ndarray:
    """Translation/rotation/scale-invariant mask features: radial histograms of area and outline pixels."""
    yy, xx = np.nonzero(m)
    a = len(yy)
    cy, cx = yy.mean(), xx.mean()
    r = np.hypot(yy - cy, xx - cx) / np.sqrt(a)
    by, bx = np.nonzero(m & ~_erode(m))
    rb = np.hypot(by - cy, bx - cx) / np.sqrt(a)
    return np.concatenate([np.histogram(r, 16, (0, 1.6))[0] / a, np.histogram(rb, 16, (0, 1.6))[0] / len(rb),
                           [len(rb) / np.sqrt(a)]])


def test_learnable():
    raw, inv, y = [], [], []
    for i in range(1200):
        _, m, label = render_shape_sample(5, i, 32)
        raw.append(m.reshape(8, 4, 8, 4).mean((1, 3)).ravel())  # 8x8-downsampled mask
        inv.append(_invariant_features(m))
        y.append(label)
    raw, inv, y = np.array(raw), np.array(inv), np.array(y)
    chance = 1 / len(SHAPE_CLASSES)
    clf = LogisticRegression(max_iter=2000).fit(raw[:900], y[:900])
    assert clf.score(raw[900:], y[900:]) > 2 * chance  # position and rotation vary: raw pixels are hard
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(inv[:900], y[:900])
    assert clf.score(inv[900:], y[900:]) > 0.8  # the shape itself is clearly identifiable


def test_fast_enough():
    t = time.perf_counter()
    for i in range(1000):
        render_shape_sample(0, i, 64)
    assert time.perf_counter() - t < 5.0


def test_dataset_source():
    ds = open_dataset("shapes", n=20, seed=4, image_size=50)
    assert isinstance(ds, ShapesDataset) and len(ds) == 20 and ds.name == "shapes" and ds.root is None
    assert ds.ids == [f"shapes/v{GENERATOR_VERSION}/seed=4/size=50/{i}" for i in range(20)]
    assert ds.classes == list(SHAPE_CLASSES) and ds.labels.dtype == np.int64
    for i in (0, 7, 19):
        img, mask, label = render_shape_sample(4, i, 50)
        got = ds.load(i)
        assert got.mode == "RGB" and got.size == (50, 50)
        np.testing.assert_array_equal(np.asarray(got), img)
        np.testing.assert_array_equal(ds.load_mask(i), mask)
        assert ds.labels[i] == label
    d = ds.describe()
    assert d["n"] == 20 and d["seed"] == 4 and d["params"]["image_size"] == 50 and d["fingerprint"] == ds.fingerprint
    # prefix property and default n
    assert open_dataset("shapes", n=10, seed=4, image_size=50).ids == ds.ids[:10]
    assert len(open_dataset("shapes", seed=4, image_size=16)) == 1000
    assert open_dataset("shapes", n=20, seed=5, image_size=50).fingerprint != ds.fingerprint
    with pytest.raises(IndexError):
        ds.load(20)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(n=10, image_size=15), "image size"),
        (dict(n=10, image_size=224.0), "image size"),
        (dict(n=0), "positive"),
        (dict(n=-3), "positive"),
        (dict(n=10, seed=-1), "seed"),
    ],
)
def test_bad_input(kwargs, words):
    with pytest.raises(UsageError, match=words):
        open_dataset("shapes", **kwargs)


def test_bad_render_args():
    with pytest.raises(UsageError, match="image size"):
        render_shape_sample(0, 0, 8)
    with pytest.raises(UsageError, match="index"):
        render_shape_sample(0, -1, 32)
