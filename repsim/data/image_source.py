"""The base class of every image source (:mod:`repsim.data.sources`, :mod:`repsim.data.shapes`): ordered ids, labels, lazy loading.

It lives below both modules so that :mod:`repsim.data.shapes` can subclass it and :mod:`repsim.data.sources` can open the
shapes data set without the two importing each other. :mod:`repsim.data.sources` re-exports :class:`ImageSource`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from repsim.errors import UsageError
from repsim.store.format import fingerprint_ids


class ImageSource:
    """An ordered, possibly subsetted list of images with ids and labels.

    Attributes: ``name`` (the kind: "shapes", "digits", "npz", "imagefolder" or "folder"), ``root``
    (absolute path of the file or folder, None for generated or bundled data), ``ids`` (stable unique
    sample ids in store order), ``labels`` (int64 (n,), -1 where a sample has no label), ``classes``
    (class names indexed by label, [] when unlabelled), ``seed``.
    """

    name: str
    root: str | None
    ids: list[str]
    labels: np.ndarray
    classes: list[str]
    seed: int

    def __init__(
        self,
        *,
        name: str,
        root: str | None,
        ids: Sequence[str],
        labels: np.ndarray,
        classes: Sequence[str],
        seed: int,
        params: dict[str, Any],
    ):
        ids = [str(i) for i in ids]
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(ids),):
            raise ValueError(f"labels of shape {labels.shape} for {len(ids)} ids")  # a bug, not user input
        check_ids(ids, where=root or name)
        self.name, self.root, self.ids, self.labels = name, root, ids, labels
        self.classes, self.seed, self._params = [str(c) for c in classes], int(seed), dict(params)

    def __len__(self) -> int:
        return len(self.ids)

    def _index(self, i: int) -> int:
        i = operator.index(i)
        if not 0 <= i < len(self.ids):  # no negative indexing: a -1 from a bug must not load the last image
            raise IndexError(f"sample index {i} out of range for {len(self.ids)} samples")
        return i

    def load(self, i: int) -> Image.Image:
        """The ``i``-th sample in store order as an RGB PIL image; raises :class:`CorruptImageError`."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the ordered ids joined by newlines (utf-8): equal fingerprints = same samples, same order."""
        return fingerprint_ids(self.ids)

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance: name, root, n, seed, fingerprint, classes and kind-specific params."""
        return {
            "name": self.name,
            "root": self.root,
            "n": len(self),
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "classes": list(self.classes),
            "params": dict(self._params),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, root={self.root!r}, n={len(self)}, seed={self.seed})"


def check_ids(ids: Sequence[str], *, where: str) -> None:
    seen: set[str] = set()
    for i in ids:
        if "\n" in i:  # the fingerprint joins ids with newlines: an id holding one would make it ambiguous
            raise UsageError(f"{where}: sample id {i!r} contains a newline")
        if i in seen:
            raise UsageError(f"{where}: sample id {i!r} occurs more than once; ids must be unique")
        seen.add(i)
