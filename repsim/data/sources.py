"""Image sources: what ``repsim extract --data SPEC`` reads, in a fixed, documented sample order.

``SPEC`` is one of

* ``shapes`` -- repsim's procedural data set (:mod:`repsim.data.shapes`), generated at the model's input size;
* ``digits`` -- scikit-learn's bundled 8x8 handwritten digits (1797 images, ``load_digits``), grey levels
  0..16 scaled to uint8 as ``round(v * 255 / 16)`` and replicated to RGB, at the native 8x8 size (the
  model's transform resizes later);
* a ``.npz`` file -- ``images`` uint8 (N, H, W, 3) or grey (N, H, W) / (N, H, W, 1), optional ``labels``
  (integer (N,), -1 = unlabelled), ``ids`` (strings (N,), unique) and ``classes`` (strings, indexed by
  label); the arrays are read once into memory;
* a directory -- an *ImageFolder* tree when its subfolders hold images (classes = sorted subfolder names,
  label = index, ids = relative posix paths such as ``"cat/0001.jpg"``; images may sit in nested folders
  below a class folder) or else a *flat folder* of images (ids = file names, labels -1). Image files are
  recognised by extension, case-insensitively (:data:`IMAGE_EXTENSIONS`); names starting with ``.`` are
  skipped (``.ipynb_checkpoints``, macOS ``._x.jpg`` files); paths are listed in sorted order. Images are
  decoded lazily, one per :meth:`ImageSource.load` call, never all at once. EXIF orientation is not
  applied (as torchvision's ImageFolder).

The keywords win over a folder of the same name: pass ``./shapes`` for a folder called ``shapes``.

Sample order and subsets
------------------------
The store's sample order is a *seeded random permutation* of the whole data set::

    order = np.random.default_rng(seed).permutation(total)[:n]       # n=None: all samples

so any contiguous block of the store is a uniform random sample of the data set, which the minibatch CKA
estimator relies on (a class-sorted order would make each minibatch one or two classes and bias it). The
same spec, ``n`` and ``seed`` give the same ids in the same order, hence the same fingerprint
(sha256 of the ids joined by newlines); a smaller ``n`` with the same seed is a prefix of a larger one.
``shapes`` is unbounded and every sample is an independent draw, so it uses indices ``range(n)``
(``n`` defaults to 1000) -- see :class:`repsim.data.shapes.ShapesDataset`.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np
from PIL import Image

from repsim.errors import RepsimError, UsageError
from repsim.data.image_source import ImageSource, check_ids
from repsim.data.shapes import ShapesDataset
from repsim.store.format import fingerprint_ids

__all__ = [
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "DigitsSource",
    "FolderSource",
    "ImageFolderSource",
    "ImageSource",
    "NpzSource",
    "fingerprint_ids",
    "open_dataset",
    "subset_order",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_SPECS_HELP = "an image folder, an ImageFolder tree, a .npz file, 'shapes' or 'digits'"


class CorruptImageError(RepsimError):
    """An image file that cannot be decoded (the extractor skips it with a warning, or fails under --strict)."""


def subset_order(total: int, n: int | None, seed: int, *, where: str) -> np.ndarray:
    """Store order: ``default_rng(seed).permutation(total)[:n]`` (int64 indices into the full data set).

    ``n=None`` keeps all ``total`` samples (still permuted). ``n > total`` raises :class:`UsageError`.
    """
    if total <= 0:
        raise UsageError(f"{where}: the data set is empty")
    if n is None:
        n = total
    if n > total:
        raise UsageError(f"{where}: n={n} is larger than the data set, which has {total} samples")
    return np.random.default_rng(seed).permutation(total)[:n].astype(np.int64)


_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(im: Image.Image, where: str) -> Image.Image:
    """RGB of a decoded image. 16-bit greyscale (PNG / TIFF modes ``I;16*``, or ``I`` holding 0..65535) is scaled
    to 8 bits (v / 257, rounded: 65535 -> 255); PIL's own ``convert`` would clip every value above 255 to white.
    Wider or floating-point pixels have no known range and are refused."""
    if im.mode in _WIDE_GREY:
        a = np.asarray(im)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise CorruptImageError(f"{where}: {im.mode} pixels outside 0..65535 (min {int(a.min())}, max "
                                    f"{int(a.max())}): only 8- and 16-bit images are supported")
        grey = np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if im.mode in ("F", "I;32", "I;32L", "I;32B"):
        raise CorruptImageError(f"{where}: {im.mode} (32-bit / floating-point) pixels have no fixed range: convert "
                                "the image to 8- or 16-bit")
    return im.convert("RGB")


def _decode(path: str) -> Image.Image:
    """Open and fully decode one image file as RGB (PIL is lazy: ``convert`` forces the decode)."""
    try:
        with Image.open(path) as im:
            return _to_rgb(im, path)
    except CorruptImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # UnidentifiedImageError and "image file is truncated" are OSErrors; some plugins raise the others.
        raise CorruptImageError(f"cannot decode image {path}: {err}") from err


class _FileSource(ImageSource):
    """Images read from files, one at a time; ``paths`` are absolute, in store order."""

    def __init__(self, *, paths: list[str], **kwargs: Any):
        super().__init__(**kwargs)
        self._paths = paths

    def load(self, i: int) -> Image.Image:
        return _decode(self._paths[self._index(i)])

    def path(self, i: int) -> str:
        """Absolute file path of the ``i``-th sample."""
        return self._paths[self._index(i)]


class FolderSource(_FileSource):
    """A flat folder of images: ids are the file names, every label is -1."""


class ImageFolderSource(_FileSource):
    """An ImageFolder tree ``root/<class>/.../<image>``: classes = sorted class-folder names."""


class _ArraySource(ImageSource):
    """Images held in a uint8 array (N, H, W, 3) or (N, H, W); ``order`` maps store order to rows."""

    def __init__(self, *, images: np.ndarray, order: np.ndarray, **kwargs: Any):
        super().__init__(**kwargs)
        self._images, self._order = images, order

    def load(self, i: int) -> Image.Image:
        a = np.ascontiguousarray(self._images[self._order[self._index(i)]])
        return Image.fromarray(a).convert("RGB")  # grey (H, W) -> RGB by replication


class NpzSource(_ArraySource):
    """Images from a ``.npz`` file (see the module docstring for the arrays it may hold)."""


class DigitsSource(_ArraySource):
    """scikit-learn's bundled 8x8 digits, uint8 0..255, labels 0..9."""


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_below(folder: str) -> list[str]:
    """Relative posix paths of all images below ``folder`` (recursively), sorted by path string."""
    found = []
    for cur, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(cur, folder)
        for f in files:
            if _is_image(f):
                found.append(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
    return sorted(found)


def _open_directory(root: str, n: int | None, seed: int) -> ImageSource:
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    top = [e for e in entries if os.path.isfile(os.path.join(root, e)) and _is_image(e)]
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    per_class = {d: _images_below(os.path.join(root, d)) for d in subdirs}
    classes = [d for d in subdirs if per_class[d]]
    if classes:
        if top:
            raise UsageError(
                f"{root}: found {len(top)} images at the top level and class subfolders ({', '.join(classes[:3])}"
                f"{', ...' if len(classes) > 3 else ''}); expected either a flat folder of images or an ImageFolder "
                f"tree with every image inside a class folder"
            )
        empty = [d for d in subdirs if not per_class[d]]
        if empty:
            # torchvision's ImageFolder fails here too; silently dropping a class would shift every label.
            raise UsageError(
                f"{root}: class folder(s) {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''} hold no images "
                f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))}); remove them or add images"
            )
        rel = [f"{c}/{p}" for c in classes for p in per_class[c]]
        lab = np.array([k for k, c in enumerate(classes) for _ in per_class[c]], dtype=np.int64)
        order = subset_order(len(rel), n, seed, where=root)
        return ImageFolderSource(
            name="imagefolder", root=root, ids=[rel[j] for j in order], labels=lab[order], classes=classes,
            seed=seed, paths=[os.path.join(root, *rel[j].split("/")) for j in order],
            params={"total": len(rel), "order": "permutation"},
        )
    if not top:
        raise UsageError(
            f"{root}: no images found (expected image files with extensions {', '.join(sorted(IMAGE_EXTENSIONS))}, "
            f"or class subfolders holding them)"
        )
    order = subset_order(len(top), n, seed, where=root)
    return FolderSource(
        name="folder", root=root, ids=[top[j] for j in order], labels=np.full(len(order), -1), classes=[],
        seed=seed, paths=[os.path.join(root, top[j]) for j in order],
        params={"total": len(top), "order": "permutation"},
    )


def _strings(a: np.ndarray, key: str, path: str) -> list[str]:
    if a.ndim != 1 or a.dtype.kind not in "USiu":
        raise UsageError(f"{path}: '{key}' has dtype {a.dtype} and shape {a.shape}; expected a 1-D array of strings")
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in a.tolist()]


def _open_npz(path: str, n: int | None, seed: int) -> ImageSource:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UsageError(f"cannot read {path} as a .npz file: {err}") from err
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UsageError(f"{path} holds a single array, not a .npz archive with an 'images' array")
    with z:
        try:
            arrays = {k: z[k] for k in ("images", "labels", "ids", "classes") if k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:  # object arrays need pickle: refused
            raise UsageError(f"cannot read {path}: {err}") from err
        found = ", ".join(z.files) or "nothing"
    if "images" not in arrays:
        raise UsageError(f"{path}: no 'images' array (found: {found}); expected uint8 images (N, H, W, 3) or (N, H, W)")
    images = arrays["images"]
    if images.dtype != np.uint8:
        raise UsageError(f"{path}: 'images' has dtype {images.dtype}; expected uint8 (0..255)")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)) or 0 in images.shape[1:]:
        raise UsageError(
            f"{path}: 'images' has shape {images.shape}; expected (N, H, W, 3) RGB or (N, H, W) greyscale, NHWC"
        )
    total = images.shape[0]
    if total == 0:
        raise UsageError(f"{path}: 'images' holds no images (shape {images.shape})")
    labels = np.full(total, -1, dtype=np.int64)
    if "labels" in arrays:
        lab = arrays["labels"]
        if lab.dtype.kind not in "iu" or lab.shape != (total,):
            raise UsageError(
                f"{path}: 'labels' has dtype {lab.dtype} and shape {lab.shape}; expected integers of shape ({total},)"
            )
        if lab.size and lab.min() < -1:
            raise UsageError(f"{path}: 'labels' holds {int(lab.min())}; expected class indices >= 0, or -1 for none")
        labels = lab.astype(np.int64)
    classes: list[str] = []
    if "classes" in arrays:
        classes = _strings(arrays["classes"], "classes", path)
        if labels.size and labels.max() >= len(classes):
            raise UsageError(f"{path}: label {int(labels.max())} has no name in 'classes' ({len(classes)} names)")
    elif labels.size and labels.max() >= 0:
        classes = [str(k) for k in range(int(labels.max()) + 1)]  # unnamed classes: their indices
    ids = [str(k) for k in range(total)]
    if "ids" in arrays:
        ids = _strings(arrays["ids"], "ids", path)
        if len(ids) != total:
            raise UsageError(f"{path}: 'ids' has {len(ids)} entries for {total} images")
        check_ids(ids, where=path)  # check before subsetting: a duplicate outside the subset is still wrong
    order = subset_order(total, n, seed, where=path)
    return NpzSource(
        name="npz", root=path, ids=[ids[j] for j in order], labels=labels[order], classes=classes, seed=seed,
        images=images, order=order,
        params={"total": int(total), "image_shape": [int(s) for s in images.shape[1:]], "order": "permutation"},
    )


def _open_digits(n: int | None, seed: int) -> ImageSource:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no network

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # grey levels 0..16 -> 0..255
    labels = np.asarray(d.target, dtype=np.int64)
    order = subset_order(len(images), n, seed, where="digits")
    return DigitsSource(
        name="digits", root=None, ids=[f"digits/{j}" for j in order], labels=labels[order],
        classes=[str(k) for k in range(10)], seed=seed, images=images, order=order,
        params={"total": int(len(images)), "source": "sklearn.datasets.load_digits", "scale": "round(v * 255 / 16)",
                "image_size": 8, "order": "permutation"},
    )


def open_dataset(spec: str, *, n: int | None = None, seed: int = 0, image_size: int = 224) -> ImageSource:
    """Open the image source named by ``spec`` (see the module docstring), ``n`` samples in seeded order.

    ``n``: number of samples (None: all; 1000 for ``shapes``). ``seed``: non-negative integer fixing the
    order. ``image_size``: side in pixels of generated ``shapes`` images (ignored by the other kinds,
    whose images keep their own size). Bad input raises :class:`UsageError`.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0):
        raise UsageError(f"n must be a positive number of samples, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    n = None if n is None else int(n)
    seed = int(seed)
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"no data set given; expected {_SPECS_HELP}")
    if spec == "shapes":
        return ShapesDataset(1000 if n is None else n, seed=seed, image_size=image_size)
    if spec == "digits":
        return _open_digits(n, seed)
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.exists(path):
        raise UsageError(f"data set {spec!r} not found: no such file or folder; expected {_SPECS_HELP}")
    if os.path.isdir(path):
        return _open_directory(path, n, seed)
    if path.lower().endswith(".npz"):
        return _open_npz(path, n, seed)
    raise UsageError(f"data set {spec!r} is a file but not a .npz archive; expected {_SPECS_HELP}")
