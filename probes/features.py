"""Probe inputs: one feature row per sample from stored activations, labels, and the train / val / test split.

Feature modes (``features=``)
-----------------------------
``cls``            token 0 of a token layer (n, T, D) → (n, D). Refused for layers without prefix tokens
                   (``num_prefix_tokens`` 0 or unrecorded), for feature maps and for vectors.
``mean``           the mean over the *patch* tokens (prefix tokens — CLS, registers, distillation — excluded)
                   of a token layer; the spatial mean over H, W of a map (n, C, H, W) → (n, C); a vector layer
                   (n, D) unchanged.
``gap``            global average pooling: the same reduction as ``mean`` (an alias kept for the CNN wording).
``concat-last-K``  one feature set: the concatenation, in network order, of the last ``K`` of the selected
                   layers, each reduced by CLS when it has a prefix token and by ``mean`` otherwise (the DINO
                   linear-evaluation recipe for ViTs, Caron et al. 2021, concatenates the CLS of the last 4
                   blocks).

Stored rows are read chunk by chunk (whole Zarr chunks, ``store.read(layer, start, stop)``), up-cast from the
stored dtype (float16 by default) to float32 *before* any arithmetic and reduced at once, so memory is
``n × feature dim`` float32 (plus one chunk of raw rows), never ``n × tokens × dim``.

Splits
------
``split=FRACTION`` holds out a seeded, per-class stratified test set of that fraction of the labelled samples;
the validation set used to choose the regularisation strength is carved from the remaining training samples
the same way (``val_fraction``, default 0.2). Each class contributes ``floor`` or ``ceil`` of its share (the
total is exactly ``round(fraction · n)``; largest remainders win, seeded ties), and a class never loses its
last training sample. With ``test_store=`` the whole main store is train + validation and the whole test store
is the test set; both must come from the same model and layers, use the same class list, and must not share
samples (see :func:`check_test_store`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from repsim.errors import UsageError
from repsim.store.format import layer_kind
from repsim.store.reader import StoreLike, check_layer_names

FEATURE_MODES = ("cls", "mean", "gap", "concat-last-K")
SPLIT_STREAMS = {"test": 0, "val": 1}  # independent seeded streams of np.random.default_rng([seed, stream])
MAX_READ_BYTES = 256 << 20  # raw rows read at once (float32 after the up-cast), at least one store chunk

__all__ = [
    "FEATURE_MODES",
    "FeatureSet",
    "ProbeSplit",
    "check_labels",
    "check_test_store",
    "feature_reduction",
    "load_feature_set",
    "make_split",
    "parse_features",
    "plan_feature_sets",
    "read_layer_features",
    "stratified_holdout",
]


# ----------------------------------------------------------------------------------------------------
# Feature modes
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """A parsed ``features=`` value: ``mode`` ∈ cls | mean | gap | concat, ``k`` for concat-last-K."""

    mode: str
    k: int | None
    text: str


def parse_features(features: str) -> FeatureSpec:
    """``"cls" | "mean" | "gap" | "concat-last-K"`` (K ≥ 1, e.g. ``"concat-last-4"``) → :class:`FeatureSpec`."""
    if not isinstance(features, str):
        raise UsageError(f"features must be a string ({', '.join(FEATURE_MODES)}), got {features!r}")
    text = features.strip().lower()
    if text in ("cls", "mean", "gap"):
        return FeatureSpec(text, None, text)
    m = re.fullmatch(r"concat-last-(\d+)", text)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise UsageError(f"features={features!r}: K must be >= 1")
        return FeatureSpec("concat", k, text)
    raise UsageError(f"features must be one of cls, mean, gap or concat-last-K (e.g. concat-last-4), got {features!r}")


def feature_reduction(info: dict[str, Any], layer: str, mode: str) -> tuple[str, int]:
    """How one layer becomes one row per sample under ``mode`` (cls | mean | gap | cls-or-mean).

    Returns ``(reduction, dim)`` with reduction ∈ ``cls`` (token 0), ``patch-mean`` (mean over tokens
    ``num_prefix_tokens:``), ``spatial-mean`` (mean over H, W of a (C, H, W) map) or ``identity`` (vectors).
    ``cls-or-mean`` is the per-layer rule of concat-last-K. Raises UsageError where the mode does not apply.
    """
    kind = layer_kind(info, layer)
    shape = tuple(int(s) for s in info["shape"])
    if kind == "vector":
        if mode == "cls":
            raise UsageError(f"features='cls' does not apply to layer {layer!r}: it is a vector layer "
                             f"{shape} with no tokens; use features='mean'")
        return "identity", int(np.prod(shape))
    if kind == "map":
        if mode == "cls":
            raise UsageError(f"features='cls' does not apply to layer {layer!r}: it is a feature map (C, H, W) "
                             "with no CLS token; use features='mean' or 'gap'")
        return "spatial-mean", shape[0]
    # tokens
    npt = info.get("num_prefix_tokens")
    if npt is None:
        raise UsageError(f"layer {layer!r} does not record its number of prefix tokens, so CLS and patch "
                         "tokens cannot be told apart; re-extract it with a model whose prefix tokens are known")
    npt = int(npt)
    if mode == "cls" and npt == 0:
        raise UsageError(f"features='cls' but layer {layer!r} has no prefix (CLS) token "
                         "(num_prefix_tokens = 0); use features='mean'")
    if mode == "cls" or (mode == "cls-or-mean" and npt > 0):
        return "cls", shape[1]
    if shape[0] - npt < 1:
        raise UsageError(f"layer {layer!r} has no patch tokens after its {npt} prefix tokens")
    return "patch-mean", shape[1]


def _reduce(rows: np.ndarray, reduction: str, npt: int) -> np.ndarray:
    """Raw stored rows (r, ...) → float32 (r, D); up-cast first, then reduce (float32 pairwise sums)."""
    if reduction == "cls":
        return np.asarray(rows[:, 0], dtype=np.float32)
    x = np.asarray(rows, dtype=np.float32)
    if reduction == "patch-mean":
        return x[:, npt:].mean(axis=1, dtype=np.float32)
    if reduction == "spatial-mean":
        return x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2, dtype=np.float32)
    return x.reshape(x.shape[0], -1)


def read_layer_features(store: StoreLike, layer: str, mode: str = "mean", *,
                        max_read_bytes: int = MAX_READ_BYTES) -> np.ndarray:
    """Features of every sample of ``layer``: float32 (store.n, D), in store order.

    ``mode``: cls | mean | gap | cls-or-mean (see :func:`feature_reduction`). Reads whole store chunks, at most
    about ``max_read_bytes`` of float32 raw rows at once; raises on non-finite values (naming layer and row).
    """
    if mode == "gap":
        mode = "mean"
    info = store.layer_info(layer)
    reduction, dim = feature_reduction(info, layer, mode)
    npt = int(info.get("num_prefix_tokens") or 0)
    row_bytes = 4 * int(np.prod(info["shape"]))
    cs = max(int(getattr(store, "chunk_size", 0) or 1024), 1)
    step = cs * max(1, max_read_bytes // max(row_bytes * cs, 1))
    n = int(store.n)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        block = store.read(layer, lo, hi)
        if block.shape[0] != hi - lo:
            raise UsageError(f"{store.path}: reading rows {lo}..{hi} of layer {layer!r} returned {block.shape[0]} rows")
        out[lo:hi] = _reduce(block, reduction, npt)
    bad = ~np.isfinite(out)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise UsageError(f"layer {layer!r} of {store.path} holds a non-finite feature (first at row {row}); "
                         "the activations overflowed float16 or the extraction is broken")
    return out


@dataclass
class FeatureSet:
    """One row of a probe result: the feature set ``name`` built from ``layers`` by ``reductions``."""

    name: str
    layers: list[str]
    reductions: list[str]
    dim: int


def plan_feature_sets(store: StoreLike, layers: Sequence[str] | None, features: str) -> list[FeatureSet]:
    """Check ``layers`` (default: all, network order) and ``features`` up front; one FeatureSet per probe row.

    cls / mean / gap: one set per layer. concat-last-K: a single set, the last K of ``layers``.
    """
    spec = parse_features(features)
    chosen = select_layers(store, layers)
    if spec.mode == "concat":
        if spec.k > len(chosen):
            raise UsageError(f"features={spec.text!r} needs at least {spec.k} layers, {len(chosen)} selected")
        last = chosen[-spec.k:]
        red = [feature_reduction(store.layer_info(lay), lay, "cls-or-mean") for lay in last]
        return [FeatureSet(spec.text, last, [r for r, _ in red], sum(d for _, d in red))]
    mode = "mean" if spec.mode == "gap" else spec.mode
    out = []
    for lay in chosen:
        red, dim = feature_reduction(store.layer_info(lay), lay, mode)
        out.append(FeatureSet(lay, [lay], [red], dim))
    return out


def load_feature_set(store: StoreLike, fs: FeatureSet) -> np.ndarray:
    """float32 (store.n, fs.dim): the feature set's layers reduced and concatenated in order."""
    modes = {"cls": "cls", "patch-mean": "mean", "spatial-mean": "mean", "identity": "mean"}
    parts = [read_layer_features(store, lay, modes[red]) for lay, red in zip(fs.layers, fs.reductions)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def select_layers(store: StoreLike, layers: Sequence[str] | None) -> list[str]:
    """``layers`` checked against the store and put in network order, each at most once (one feature block per
    layer; default: all of its layers). :func:`repsim.measures.cka_engine.select_layers` keeps the given order instead."""
    if layers is None:
        return list(store.layers)
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise UsageError("no layers selected")
    check_layer_names(store.path, store.layers, layers)
    if len(set(layers)) != len(layers):
        raise UsageError("a layer is selected twice")
    order = {lay: i for i, lay in enumerate(store.layers)}
    return sorted(layers, key=order.__getitem__)


# ----------------------------------------------------------------------------------------------------
# Labels and splits
# ----------------------------------------------------------------------------------------------------


def check_labels(store: StoreLike) -> np.ndarray:
    """The store's labels, int64 (n,); refuses unlabelled (-1) samples, naming how many and the first id."""
    y = np.asarray(store.labels, dtype=np.int64)
    if y.shape != (int(store.n),):
        raise UsageError(f"{store.path}: {y.shape[0]} labels for {store.n} samples")
    bad = np.flatnonzero(y < 0)
    if bad.size:
        first = store.ids[int(bad[0])] if hasattr(store, "ids") else int(bad[0])
        raise UsageError(f"{store.path}: {bad.size} of {y.size} samples have no label (-1, first {first!r}); "
                         "probes need labelled data: extract from an ImageFolder tree or an npz with labels")
    return y


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int, stream: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class stratified hold-out: ``(keep, held)`` sorted int64 positions into ``labels``.

    ``held`` has exactly ``round(fraction · n)`` positions (fewer only when the per-class cap binds): each class
    gives ``floor`` or ``ceil`` of ``fraction · n_c``, largest remainders first (ties in seeded random order),
    never its last kept sample. The randomness is ``np.random.default_rng([seed, stream])``.
    """
    labels = np.asarray(labels)
    if not 0.0 < float(fraction) < 1.0:
        raise UsageError(f"a split fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng([int(seed), int(stream)])
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    cap = np.maximum(counts - 1, 0)
    take = np.minimum(take, cap)
    target = int(round(fraction * labels.size))
    rest = target - int(take.sum())
    if rest > 0:
        frac = quota - np.floor(quota)
        tie = rng.random(classes.size)
        order = np.lexsort((tie, -frac))  # largest remainder first, seeded ties
        for c in order:
            if rest == 0:
                break
            if take[c] < cap[c] and frac[c] > 0:
                take[c] += 1
                rest -= 1
    held = []
    for c in range(classes.size):
        idx = np.flatnonzero(inverse == c)
        held.append(rng.permutation(idx)[: take[c]])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(labels.size, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask).astype(np.int64), held_idx.astype(np.int64)


@dataclass
class ProbeSplit:
    """Row positions of the train / val / test samples; ``test`` indexes ``test_store`` when one is given."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    y_train: np.ndarray
    y_val: np.ndarray
    y_test: np.ndarray
    external_test: bool
    info: dict[str, Any]

    @property
    def classes(self) -> np.ndarray:
        """The class labels present in train ∪ val (what a probe can predict), sorted."""
        return np.unique(np.concatenate([self.y_train, self.y_val]))


def make_split(store: StoreLike, *, split: float | None, val_fraction: float | None, seed: int,
               test_store: StoreLike | None = None, layers: Sequence[str] | None = None) -> ProbeSplit:
    """Train / val / test positions (see the module docstring). ``val_fraction=None``: no validation set
    (k-NN uses all non-test samples as its memory bank)."""
    y = check_labels(store)
    info: dict[str, Any] = {}
    if test_store is None:
        if split is None:
            raise UsageError("give a test fraction (split=0.2) or a separate test store")
        fit, test = stratified_holdout(y, float(split), seed, SPLIT_STREAMS["test"])
        y_test = y[test]
        info["test"] = {"kind": "fraction", "fraction": float(split)}
    else:
        info["test"] = {"kind": "store", **check_test_store(store, test_store, layers)}
        fit = np.arange(int(store.n), dtype=np.int64)
        y_test = check_labels(test_store)
        test = np.arange(int(test_store.n), dtype=np.int64)
    if val_fraction is None or val_fraction == 0:
        train, val = fit, np.zeros(0, dtype=np.int64)
    else:
        keep, held = stratified_holdout(y[fit], float(val_fraction), seed, SPLIT_STREAMS["val"])
        train, val = fit[keep], fit[held]
    if train.size == 0 or test.size == 0 or (val_fraction and val.size == 0):
        raise UsageError(f"too few samples ({store.n}) for a train / val / test split "
                         f"(split={split}, val_fraction={val_fraction})")
    sp = ProbeSplit(train, val, test, y[train], y[val], y_test, test_store is not None, info)
    unseen = np.setdiff1d(np.unique(y_test), sp.classes)
    if unseen.size:
        warnings.warn(f"{int(np.isin(y_test, unseen).sum())} test samples belong to {unseen.size} classes absent "
                      f"from the training data (e.g. {unseen[:5].tolist()}); they count as errors", stacklevel=4)
    return sp


def _model_key(store: StoreLike) -> dict[str, Any]:
    model = dict(store.attrs.get("model", {}))
    weights = model.get("weights") or {}
    key = weights.get("sha256") or [weights.get(k) for k in ("kind", "tag", "seed", "file")]
    return {"name": model.get("name"), "source_id": model.get("source_id"), "weights": key}


def check_test_store(store: StoreLike, test_store: StoreLike, layers: Sequence[str] | None) -> dict[str, Any]:
    """Refuse a test store from another model, with other layers (kind, per-sample shape, prefix tokens) or
    another class list, or holding any of the training samples (same ids from the same data set). Ids that
    coincide across *different* data sets (e.g. ``cat/0001.jpg`` under ``train/`` and ``val/``) only warn.
    Returns provenance for the result (path, fingerprint, n, overlap counts)."""
    if store.fingerprint == test_store.fingerprint:
        raise UsageError(f"the test store {test_store.path} holds the same samples as {store.path} "
                         "(equal fingerprints): a probe tested on its training data measures nothing")
    ka, kb = _model_key(store), _model_key(test_store)
    if ka != kb:
        raise UsageError(f"the test store comes from another model ({kb}) than {store.path} ({ka})")
    for lay in select_layers(store, layers):
        if lay not in test_store.layers:
            raise UsageError(f"layer {lay!r} is missing from the test store {test_store.path}")
        ia, ib = store.layer_info(lay), test_store.layer_info(lay)
        for key in ("kind", "shape", "num_prefix_tokens", "pool"):
            if ia.get(key) != ib.get(key):
                raise UsageError(f"layer {lay!r} differs between the stores: {key} {ia.get(key)!r} vs "
                                 f"{ib.get(key)!r} in {test_store.path}")
    ca = (store.attrs.get("dataset") or {}).get("classes")
    cb = (test_store.attrs.get("dataset") or {}).get("classes")
    if ca and cb and list(ca) != list(cb):
        raise UsageError(f"the stores use different class lists ({len(ca)} vs {len(cb)} classes, e.g. "
                         f"{_first_diff(ca, cb)}): label k would mean different classes")
    pa = (store.attrs.get("preprocessing") or {})
    pb = (test_store.attrs.get("preprocessing") or {})
    if pa != pb:
        warnings.warn(f"the test store was preprocessed differently ({pb} vs {pa})", stacklevel=5)
    shared = set(store.ids).intersection(test_store.ids)
    da, db = store.attrs.get("dataset") or {}, test_store.attrs.get("dataset") or {}
    same_source = (da.get("name"), da.get("root")) == (db.get("name"), db.get("root"))
    if shared and same_source:
        raise UsageError(f"{len(shared)} test samples (e.g. {sorted(shared)[0]!r}) are also in the training store "
                         f"(same data set {da.get('root') or da.get('name')!r}): extract disjoint samples")
    if shared:
        where_a, where_b = da.get("root") or da.get("name"), db.get("root") or db.get("name")
        warnings.warn(f"{len(shared)} sample ids occur in both stores (e.g. {sorted(shared)[0]!r}) although their "
                      f"data sets differ ({where_a!r} vs {where_b!r}); if these are the same images the test "
                      "accuracy is inflated", stacklevel=5)
    return {"path": str(test_store.path), "fingerprint": str(test_store.fingerprint), "n": int(test_store.n),
            "shared_ids": len(shared)}


def _first_diff(a: Sequence[Any], b: Sequence[Any]) -> str:
    for i, (x, z) in enumerate(zip(a, b)):
        if x != z:
            return f"class {i}: {x!r} vs {z!r}"
    return f"lengths {len(a)} vs {len(b)}"
