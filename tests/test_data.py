"""Image sources: folder / ImageFolder / npz / digits load with the right ids, labels and pixels, in the
documented seeded order; corrupt files and every kind of bad input give clear errors."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from repsim.data.sources import CorruptImageError, ImageSource, fingerprint_ids, open_dataset
from repsim.errors import UsageError


def _colour(k: int) -> tuple[int, int, int]:
    """A distinct solid colour per image, so a loaded image tells which file it came from."""
    return (17 * k % 256, 101 * k % 256, 53 * k % 256)


def _write(path, k: int, size=(6, 5)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(os.path.splitext(path)[1].lower(), None)
    # JPEG is lossy: check colours with a tolerance; PNG/BMP exactly
    Image.new("RGB", size, _colour(k)).save(path, format=fmt or os.path.splitext(path)[1][1:].upper())


def _pixel(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=float)[2, 2]


@pytest.fixture()
def flat(tmp_path):
    root = tmp_path / "flat"
    names = ["b.png", "a.PNG", "c.bmp", "d.Jpeg", "e.png", "f.png", "g.png"]
    for k, name in enumerate(names):
        _write(str(root / name), k)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"garbage")  # hidden files are skipped
    return root, {name: k for k, name in enumerate(names)}


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "tree"
    files = {"dog/1.png": 0, "dog/2.png": 1, "cat/x.png": 2, "cat/deep/y.png": 3, "cat/z.png": 4,
             "ant/only.png": 5, "cat/b.png": 6, "cat/q.png": 7}
    for rel, k in files.items():
        _write(str(root / rel), k)
    (root / ".ipynb_checkpoints").mkdir()
    return root, files


def test_fingerprint_reference():
    assert fingerprint_ids(["a", "b/c.jpg"]) == hashlib.sha256(b"a\nb/c.jpg").hexdigest()
    assert fingerprint_ids(["ab"]) != fingerprint_ids(["a", "b"])


def test_flat_folder(flat):
    root, colours = flat
    src = open_dataset(str(root), seed=3)
    assert isinstance(src, ImageSource) and src.name == "folder" and src.root == str(root)
    assert sorted(src.ids) == sorted(colours) and len(src) == 7
    assert src.labels.dtype == np.int64 and (src.labels == -1).all() and src.classes == []
    # the documented order: a seeded permutation of the sorted file list
    perm = np.random.default_rng(3).permutation(7)
    assert src.ids == [sorted(colours)[j] for j in perm]
    for i, name in enumerate(src.ids):  # pixels follow their ids through the permutation
        img = src.load(i)
        assert img.mode == "RGB" and img.size == (6, 5)
        tol = 8 if name.lower().endswith(("jpg", "jpeg")) else 0
        np.testing.assert_allclose(_pixel(img), _colour(colours[name]), atol=tol)
    assert src.fingerprint == hashlib.sha256("\n".join(src.ids).encode()).hexdigest()


def test_imagefolder(tree):
    root, files = tree
    src = open_dataset(str(root), seed=0)
    assert src.name == "imagefolder" and src.classes == ["ant", "cat", "dog"]
    # classes in sorted order, files within a class in sorted relative-path order, then the seeded permutation
    canonical = ["ant/only.png", "cat/b.png", "cat/deep/y.png", "cat/q.png", "cat/x.png", "cat/z.png", "dog/1.png",
                 "dog/2.png"]
    assert src.ids == [canonical[j] for j in np.random.default_rng(0).permutation(8)]
    for i, rel in enumerate(src.ids):
        assert src.labels[i] == src.classes.index(rel.split("/")[0])
        np.testing.assert_array_equal(_pixel(src.load(i)), _colour(files[rel]))
    d = src.describe()
    json.dumps(d)
    assert d["name"] == "imagefolder" and d["n"] == 8 and d["seed"] == 0 and d["fingerprint"] == src.fingerprint
    assert d["classes"] == ["ant", "cat", "dog"] and d["root"] == str(root)


def test_imagefolder_labels_match_torchvision(tree):
    datasets = pytest.importorskip("torchvision.datasets")
    root, _ = tree
    (root / ".ipynb_checkpoints").rmdir()  # torchvision would take the hidden folder for a class; repsim skips it
    ref = datasets.ImageFolder(str(root))
    src = open_dataset(str(root))
    assert src.classes == ref.classes
    ref_label = {os.path.relpath(p, root).replace(os.sep, "/"): y for p, y in ref.samples}
    assert {i: int(y) for i, y in zip(src.ids, src.labels)} == ref_label


def test_order_subset_and_fingerprint(flat):
    root, colours = flat
    a, b = open_dataset(str(root), n=4, seed=1), open_dataset(str(root), n=4, seed=1)
    assert a.ids == b.ids and a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.labels, b.labels)
    c = open_dataset(str(root), n=4, seed=2)
    assert c.ids != a.ids and c.fingerprint != a.fingerprint
    assert len(set(a.ids)) == 4 and set(a.ids) <= set(colours)
    full = open_dataset(str(root), seed=1)
    assert full.ids[:4] == a.ids  # a smaller n is a prefix of the larger one
    assert set(full.ids) == set(colours)


def test_corrupt_image(flat):
    root, colours = flat
    (root / "zz_bad.jpg").write_bytes(b"\x00this is not a jpeg" * 20)
    good = root / "h.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good, format="JPEG")
    data = good.read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])  # a truncated download
    src = open_dataset(str(root))  # opening never decodes
    assert len(src) == 10
    bad = {"zz_bad.jpg", "trunc.jpg"}
    for i, name in enumerate(src.ids):
        if name in bad:
            with pytest.raises(CorruptImageError, match=name):
                src.load(i)
        else:
            assert src.load(i).mode == "RGB"


def _npz(tmp_path, name="d.npz", **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return str(p)


def test_npz_rgb(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(9, 5, 7, 3), dtype=np.uint8)
    ids = np.array([f"img{k}" for k in range(9)])
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, -1])
    path = _npz(tmp_path, images=images, labels=labels, ids=ids, classes=np.array(["x", "y", "z"]))
    src = open_dataset(path, n=6, seed=5)
    assert src.name == "npz" and src.root == path and src.classes == ["x", "y", "z"] and len(src) == 6
    perm = np.random.default_rng(5).permutation(9)[:6]
    assert src.ids == [f"img{j}" for j in perm]
    np.testing.assert_array_equal(src.labels, labels[perm])
    for i, j in enumerate(perm):
        np.testing.assert_array_equal(np.asarray(src.load(i)), images[j])
    json.dumps(src.describe())


@pytest.mark.parametrize("shape", [(4, 6, 5), (4, 6, 5, 1)])
def test_npz_grey_and_defaults(tmp_path, shape):
    images = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    src = open_dataset(_npz(tmp_path, images=images, labels=np.array([2, 0, 2, 1], dtype=np.int32)), seed=0)
    perm = np.random.default_rng(0).permutation(4)
    assert src.ids == [str(j) for j in perm] and src.classes == ["0", "1", "2"]
    for i, j in enumerate(perm):
        img = np.asarray(src.load(i))
        assert img.shape == (6, 5, 3)
        for ch in range(3):
            np.testing.assert_array_equal(img[..., ch], images[j].reshape(6, 5))
    unlabelled = open_dataset(_npz(tmp_path, "u.npz", images=images))
    assert (unlabelled.labels == -1).all() and unlabelled.classes == []


def test_digits():
    from sklearn.datasets import load_digits

    ref = load_digits()
    src = open_dataset("digits", seed=1)
    assert src.name == "digits" and src.root is None and len(src) == 1797
    assert src.classes == [str(k) for k in range(10)]
    perm = np.random.default_rng(1).permutation(1797)
    assert src.ids == [f"digits/{j}" for j in perm]
    np.testing.assert_array_equal(src.labels, ref.target[perm])
    for i in (0, 5, 1796):
        j = perm[i]
        img = np.asarray(src.load(i))
        assert img.shape == (8, 8, 3) and img.dtype == np.uint8
        expect = np.rint(ref.images[j] * 255 / 16)
        for ch in range(3):
            np.testing.assert_array_equal(img[..., ch], expect)
    # grey level 16 maps to 255, 0 to 0
    all_px = np.concatenate([np.asarray(src.load(i)).ravel() for i in range(50)])
    assert all_px.min() == 0 and all_px.max() == 255
    sub = open_dataset("digits", n=30, seed=1)
    assert sub.ids == src.ids[:30] and open_dataset("digits", n=30, seed=2).ids != sub.ids


def test_index_out_of_range(flat):
    src = open_dataset(str(flat[0]))
    with pytest.raises(IndexError):
        src.load(len(src))
    with pytest.raises(IndexError):
        src.load(-1)


# ---------------------------------------------------------------------------------------------- bad input


def _bad(spec, words, **kwargs):
    with pytest.raises(UsageError, match=words) as info:
        open_dataset(spec, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_common(tmp_path, flat):
    root = str(flat[0])
    _bad(root, "larger than the data set, which has 7", n=8)
    _bad("digits", "larger than the data set, which has 1797", n=5000)
    _bad(root, "positive", n=0)
    _bad(root, "positive", n=-2)
    _bad(root, "positive", n=True)
    _bad(root, "seed", seed=-1)
    _bad(str(tmp_path / "missing"), "not found")
    _bad("", "no data set")
    _bad("shape", "not found")  # a typo of a keyword is a missing path, and says what was expected
    (tmp_path / "empty").mkdir()
    _bad(str(tmp_path / "empty"), "no images found")
    (tmp_path / "only_txt").mkdir()
    (tmp_path / "only_txt" / "a.txt").write_text("x")
    _bad(str(tmp_path / "only_txt"), "no images found")
    (tmp_path / "x.csv").write_text("a,b")
    _bad(str(tmp_path / "x.csv"), "not a .npz")


def test_bad_folders(tmp_path, tree):
    root, _ = tree
    (root / "empty_class").mkdir()
    _bad(str(root), "empty_class.*hold no images")
    mixed = tmp_path / "mixed"
    _write(str(mixed / "top.png"), 1)
    _write(str(mixed / "cls" / "a.png"), 2)
    _bad(str(mixed), "top level and class subfolders")


def test_bad_npz(tmp_path):
    img = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    _bad(_npz(tmp_path, "a.npz", pixels=img), r"no 'images' array \(found: pixels\)")
    _bad(_npz(tmp_path, "b.npz", images=img.astype(np.float32)), "dtype float32; expected uint8")
    _bad(_npz(tmp_path, "c.npz", images=np.zeros((3, 4, 4, 4), np.uint8)), r"shape \(3, 4, 4, 4\); expected")
    _bad(_npz(tmp_path, "d.npz", images=np.zeros((3, 4), np.uint8)), r"shape \(3, 4\); expected")
    _bad(_npz(tmp_path, "e.npz", images=np.zeros((0, 4, 4), np.uint8)), "no images")
    _bad(_npz(tmp_path, "f.npz", images=img, labels=np.array([0, 1])), r"'labels'.*shape \(2,\).*\(3,\)")
    _bad(_npz(tmp_path, "g.npz", images=img, labels=np.array([0.0, 1.0, 2.0])), "'labels' has dtype float64")
    _bad(_npz(tmp_path, "h.npz", images=img, labels=np.array([0, 3, 1]), classes=np.array(["a", "b"])),
         "label 3 has no name")
    _bad(_npz(tmp_path, "i.npz", images=img, labels=np.array([0, -2, 1])), "-2")
    _bad(_npz(tmp_path, "j.npz", images=img, ids=np.array(["a", "b", "a"])), "'a' occurs more than once")
    _bad(_npz(tmp_path, "k.npz", images=img, ids=np.array(["a", "b"])), "'ids' has 2 entries for 3 images")
    _bad(_npz(tmp_path, "l.npz", images=img, ids=np.array(["a", "b\nc", "d"])), "newline")
    _bad(_npz(tmp_path, "m.npz", images=img, ids=np.array([{"x": 1}, 2, 3], dtype=object)), "cannot read")
    (tmp_path / "junk.npz").write_bytes(b"definitely not a zip archive")
    _bad(str(tmp_path / "junk.npz"), "cannot read")
    np.save(tmp_path / "single.npy", img)
    os.rename(tmp_path / "single.npy", tmp_path / "single.npz")
    _bad(str(tmp_path / "single.npz"), "single array")


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    # PIL's convert("RGB") clips I;16 values above 255 to white: a 16-bit scan turned 99.6% white
    folder = tmp_path / "grey16"
    folder.mkdir()
    a = (np.arange(8 * 32, dtype=np.uint32).reshape(8, 32) * 257).astype(np.uint16)  # 0 .. 65535 in steps of 257
    Image.fromarray(a).save(folder / "a.png")
    assert Image.open(folder / "a.png").mode.startswith("I")
    src = open_dataset(str(folder))
    rgb = np.asarray(src.load(0))
    assert rgb.shape == (8, 32, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.rint(a / 257.0).astype(np.uint8))  # 65535 -> 255, 257 -> 1
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    assert (rgb == 255).mean() < 0.01


def test_float_images_are_refused(tmp_path):
    folder = tmp_path / "float"
    folder.mkdir()
    Image.fromarray(np.full((4, 4), 3.5, dtype=np.float32), mode="F").save(folder / "f.tif")
    with pytest.raises(CorruptImageError, match="no fixed range"):
        open_dataset(str(folder)).load(0)
