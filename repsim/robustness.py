"""Representation-robustness profiles: where in a network an input perturbation is absorbed.

Naseer et al. 2021 ("Intriguing properties of vision transformers") show that ViTs keep much of their accuracy
when most patches are dropped, shuffled or occluded, and CNNs do not; Raghu et al. 2021 compare
representations layer by layer. A profile compares a *clean* store with stores of the same model and the same
images extracted with ``repsim extract --perturb KIND:LEVEL`` (:mod:`repsim.data.perturbations`):

- per layer, debiased linear CKA (U-centred HSIC, Székely & Rizzo 2014; Kornblith et al. 2019 Eq. 5 with
  the unbiased HSIC estimator of Song et al. 2012) between the clean and the perturbed activations of the same
  images, rows paired by sample id (the stores' fingerprints must agree). Token and map layers are flattened
  per image, as ``repsim cka --tokens flatten``. A 95% interval comes from half-samples
  (:class:`repsim.measures.intervals.HalfSampleCKA`: the same seeded halves for every layer and level);
- the layer's relative depth (its position among the compared layers, 0 = first, 1 = last, network order);
- the first layer, in network order, whose CKA falls below ``threshold`` (0.5), or none; and the first whose
  whole interval lies below it ("resolved"). A layer that does not vary over the images in one of the two
  stores (e.g. every patch dropped: all inputs equal) has no CKA (0/0, reported as null and listed in
  ``constant_layers``); it keeps none of the clean layer's structure and counts as below the threshold;
- where the stores hold the model's logits (the last stored layer is a vector with one output per class of
  the data set) and labels: top-1 accuracy per store with a Wilson interval, and the accuracy drop against
  the clean store with a paired percentile bootstrap over images (the same images in both).

Several models: :func:`robustness_profiles` groups stores by model (the store's whole ``model`` record:
name, source, weights and their hash) and sample fingerprint, one clean store per group.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from repsim.errors import UsageError
from repsim.measures.intervals import (HALF_SAMPLE_METHOD, LEVEL, N_RESAMPLES, HalfSampleCKA, bootstrap_mean, centred_gram,
                              verdict, wilson_interval)
from repsim.results import Result, save_figure_atomic
from repsim.store.reader import ActivationStore, open_store

KIND = "repsim.robustness"
THRESHOLD = 0.5
#: feature columns per block when forming a float64 Gram: bounds the float64 copy of a wide layer
GRAM_COLUMNS = 16384


@dataclass
class LevelProfile:
    """One perturbed store compared with its clean store.

    ``cka``, ``cka_low``, ``cka_high``: per compared layer (the model's ``layers``), debiased linear CKA
    between clean and perturbed activations and its 95% half-sample interval. ``first_below``: the first layer
    with CKA < threshold (None: none), ``first_below_resolved``: the first whose interval lies below it;
    ``constant_layers``: layers without CKA because one side does not vary over the images (CKA NaN / null).
    ``accuracy``: {value, low, high, correct, n} (Wilson) or None; ``accuracy_drop``: clean minus perturbed
    top-1, {value, low, high, n, n_boot, level} (paired bootstrap), or None.
    """

    path: str
    perturbation: dict[str, Any]
    config_hash: str
    cka: list[float]
    cka_low: list[float]
    cka_high: list[float]
    first_below: str | None
    first_below_resolved: str | None
    accuracy: dict[str, Any] | None = None
    accuracy_drop: dict[str, Any] | None = None
    constant_layers: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.perturbation['kind']}:{self.perturbation['level']:g}"


@dataclass
class ModelProfile:
    """A model's clean store and its perturbed stores (``levels``, sorted by kind, then level)."""

    model: str  # display name (the store's model name)
    model_record: dict[str, Any]  # the clean store's root attribute ``model``
    clean_path: str
    clean_config_hash: str
    fingerprint: str
    n: int
    layers: list[str]
    relative_depth: list[float]
    logits_layer: str | None
    accuracy: dict[str, Any] | None  # clean top-1 {value, low, high, correct, n}, or None
    accuracy_note: str  # why there is no accuracy, or which layer and labels gave it
    levels: list[LevelProfile] = field(default_factory=list)
    chance: float | None = None  # 1 / number of classes, when there is an accuracy

    def kinds(self) -> list[str]:
        return sorted({lv.perturbation["kind"] for lv in self.levels})


@dataclass(eq=False)
class RobustnessResult(Result):
    """Robustness profiles of one or more models (see the module docstring); ``to_json`` / ``plot``."""

    result_kind: ClassVar[str] = KIND

    models: list[ModelProfile]
    tokens: str
    threshold: float
    resamples: int
    seed: int
    estimator: str = "debiased linear CKA (U-centred HSIC) on all n images"
    confidence_level: float = LEVEL
    interval_method: str = ""
    accuracy_method: str = ("Wilson score interval; drop = clean minus perturbed top-1, paired percentile bootstrap "
                            "over images")
    repsim_version: str | None = None

    @classmethod
    def from_fields(cls, fields: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
        """Each model's profile and its levels rebuilt as :class:`ModelProfile` / :class:`LevelProfile`."""
        models = [ModelProfile(**dict(m, levels=[LevelProfile(**lv) for lv in m.get("levels", [])]))
                  for m in fields["models"]]
        return dict(fields, models=models)

    def plot(self, path: str | os.PathLike | None) -> Any:
        """Accuracy vs level (one line per model, a panel per perturbation kind), then CKA(clean, perturbed) vs
        relative depth (a panel per model and kind, one line per level, 95% bands), in one flow of up to 4
        columns; saved to ``path`` when given; returns the Figure."""
        return plot_robustness(self, path)

    def summary_lines(self) -> list[str]:
        """Sentences for the terminal, each from a statistic with its interval."""
        lines = []
        for m in self.models:
            head = f"{m.model} (n={m.n}, {len(m.layers)} layers): clean top-1 "
            lines.append(head + (_pct(m.accuracy) if m.accuracy else f"not available ({m.accuracy_note})"))
            for lv in m.levels:
                acc = ""
                if lv.accuracy is not None:
                    drop = lv.accuracy_drop
                    acc = (f"top-1 {_pct(lv.accuracy)}, drop {_pct(drop, points=True)}"
                           + (" (not resolved)" if verdict(drop["low"], drop["high"]) == "not resolved" else "") + "; ")
                if lv.first_below is None:
                    where = f"CKA stays >= {self.threshold:g} at every layer (lowest {np.nanmin(_floats(lv.cka)):.2f})"
                elif lv.first_below in lv.constant_layers:
                    where = (f"first below at {lv.first_below}, which does not vary over the images of one of the "
                             "two stores (no CKA; counted as below the threshold)")
                else:
                    i = m.layers.index(lv.first_below)
                    word = verdict(lv.cka_low[i], lv.cka_high[i], self.threshold)
                    where = (f"CKA first below {self.threshold:g} at {lv.first_below} (depth "
                             f"{m.relative_depth[i]:.2f}): {lv.cka[i]:.2f} [{lv.cka_low[i]:.2f}, {lv.cka_high[i]:.2f}]"
                             + (", not resolved against the threshold" if word == "not resolved" else "")
                             + (f"; first resolved below at {lv.first_below_resolved}"
                                if lv.first_below_resolved not in (None, lv.first_below) else ""))
                lines.append(f"  {lv.label:<20} {acc}{where}")
        return lines


def _floats(values: Sequence[float | None]) -> np.ndarray:
    """Floats from JSON lists, where null (a CKA that does not exist) becomes NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _pct(s: dict[str, Any] | None, points: bool = False) -> str:
    """``"52.3% [48.0, 56.6]"``, or for a difference of accuracies ``"12.3 points [8.1, 16.0]"``."""
    if s is None:
        return "n/a"
    return f"{100 * s['value']:.1f}{' points' if points else '%'} [{100 * s['low']:.1f}, {100 * s['high']:.1f}]"


# ----------------------------------------------------------------------------------------------------
# Computation
# ----------------------------------------------------------------------------------------------------


def _open(store: ActivationStore | str | os.PathLike) -> ActivationStore:
    s = store if isinstance(store, ActivationStore) else open_store(os.fspath(store))
    s.require_complete()
    return s


def _canonical(d: Any) -> str:
    """One string per JSON-able record (sorted keys), for equality tests and grouping."""
    return json.dumps(d, sort_keys=True, default=str)


#: where a weights record says the file lay on the extracting machine: not part of which model it is
_LOCAL_WEIGHT_KEYS = ("file", "cache_file")


def model_identity(model: dict[str, Any]) -> str:
    """The store's ``model`` record as the identity of the network: everything but the machine-local paths of
    its weights file (``weights.file`` / ``weights.cache_file``) when the record has the file's sha256, so the
    same weights extracted on two machines, or from two caches, are the same model; other weights are not."""
    record = dict(model)
    weights = dict(record.get("weights") or {})
    if weights.get("sha256"):
        for key in _LOCAL_WEIGHT_KEYS:
            weights.pop(key, None)
    record["weights"] = weights
    return _canonical(record)


def perturbation_of(store: ActivationStore) -> dict[str, Any] | None:
    """The store's perturbation record {kind, level, patch_px, seed} (``extract --perturb``), None when clean."""
    p = store.attrs.get("perturbation")
    return dict(p) if p else None


def _check_pair(clean: ActivationStore, pert: ActivationStore) -> None:
    """Refuse (one line) a perturbed store that is not the same model, preprocessing and samples as ``clean``."""
    if perturbation_of(pert) is None:
        raise UsageError(f"{pert.path} is not perturbed (extracted without --perturb): give one clean store per "
                         "model and perturbed stores of the same model")
    if model_identity(clean.attrs["model"]) != model_identity(pert.attrs["model"]):
        raise UsageError(f"{pert.path} holds another model than the clean store {clean.path} "
                         f"({pert.model_name} vs {clean.model_name}, or other weights)")
    if clean.fingerprint != pert.fingerprint or clean.n != pert.n:
        raise UsageError(f"{pert.path} and the clean store {clean.path} hold different samples (fingerprints "
                         f"{pert.fingerprint[:12]} vs {clean.fingerprint[:12]}, n = {pert.n} vs {clean.n}): extract "
                         "both with the same --data, --n and --seed")
    if _canonical(clean.attrs["preprocessing"]) != _canonical(pert.attrs["preprocessing"]):
        raise UsageError(f"{pert.path} was preprocessed differently from the clean store {clean.path} "
                         "(image size, mean/std, interpolation or crop): the perturbation would not be the only "
                         "difference")


def _compared_layers(clean: ActivationStore, perturbed: Sequence[ActivationStore],
                     layers: Sequence[str] | None) -> list[str]:
    """The clean store's layers (or ``layers``) held by every perturbed store with the same per-image shape."""
    if layers:
        for layer in layers:
            clean.layer_info(layer)  # one line naming the unknown layer
        wanted = [x for x in clean.layers if x in set(layers)]
    else:
        wanted = list(clean.layers)
    out = []
    for layer in wanted:
        info = clean.layer_info(layer)
        held = [p for p in perturbed if layer in p.layers]
        if len(held) < len(perturbed):
            if layers:
                missing = next(p for p in perturbed if layer not in p.layers)
                raise UsageError(f"layer {layer!r} is not in {missing.path}")
            continue
        for p in held:
            other = p.layer_info(layer)
            if tuple(other["shape"]) != tuple(info["shape"]) or other.get("pool") != info.get("pool"):
                raise UsageError(f"layer {layer!r} has shape {tuple(other['shape'])} (pool {other.get('pool')}) in "
                                 f"{p.path} but {tuple(info['shape'])} (pool {info.get('pool')}) in the clean store "
                                 f"{clean.path}: extract both with the same --pool / --spatial-pool")
        out.append(layer)
    if not out:
        raise UsageError(f"the clean store {clean.path} and its perturbed stores have no layer in common")
    return out


def _layer_gram(store: ActivationStore, layer: str, tokens: str) -> tuple[np.ndarray, bool]:
    """(centred float64 Gram (n, n) of the layer's features (``tokens`` as in ``repsim cka``), whether the layer
    varies over the images). The Gram is accumulated over column blocks: centring is per column, so the blocks'
    Grams add up to the Gram of all columns, and the float64 copy never holds more than ``GRAM_COLUMNS`` columns.
    A layer "does not vary" when its variation about the mean image is at most ``max(1e-12, eps²)`` of its sum of
    squares, ``eps`` the machine epsilon of the layer's stored dtype (equal inputs give equal features up to
    rounding, and rounding float32 features that differ in their last bits to float16 can leave entries one
    float16 step apart: a share of the sum of squares up to about eps² = 9.5e-7, against 1.4e-14 in float32)."""
    import torch

    from repsim.measures.cka_engine import layer_features

    x = layer_features(store, layer, tokens=tokens, dtype=torch.float32).numpy()
    gram = np.zeros((x.shape[0], x.shape[0]), dtype=np.float64)
    for j in range(0, x.shape[1], GRAM_COLUMNS):
        gram += centred_gram(x[:, j:j + GRAM_COLUMNS]).numpy()
    total = float(np.square(x, dtype=np.float64).sum())
    stored = np.dtype(store.layer_info(layer).get("dtype", "float32"))
    tolerance = max(1e-12, float(np.finfo(stored).eps) ** 2 if stored.kind == "f" else 0.0)
    return gram, bool(np.trace(gram) > tolerance * total)


def logits_of(store: ActivationStore) -> tuple[str | None, str]:
    """(logits layer or None, explanation): the store's last layer when it is a vector with one output per class
    of the data set (and the model's ``num_classes`` agrees where recorded), as ``repsim demo`` reads accuracy."""
    classes = store.attrs["dataset"].get("classes") or []
    k = len(classes)
    if k < 2:
        return None, "the data set records no classes"
    last = store.layers[-1]
    shape = tuple(store.layer_info(last)["shape"])
    if shape != (k,):
        return None, f"the last stored layer {last} has shape {shape}, not the {k} class logits"
    declared = store.attrs["model"].get("num_classes")
    if declared not in (None, k):
        return None, f"the model has {declared} outputs but the data set {k} classes"
    if bool((store.labels < 0).any()):
        return None, "some samples have no label"
    return last, f"argmax of {last} against the data set's {k} class labels"


def top1_correct(store: ActivationStore, layer: str) -> np.ndarray:
    """Per image (n,), 1.0 where the argmax of the logits ``layer`` is the image's label, else 0.0."""
    logits = np.asarray(store.read(layer), dtype=np.float64)
    return (logits.argmax(axis=1) == store.labels).astype(np.float64)


def _accuracy(correct: np.ndarray) -> dict[str, Any]:
    k, n = int(correct.sum()), int(correct.size)
    lo, hi = wilson_interval(k, n)
    return {"value": k / n, "low": lo, "high": hi, "correct": k, "n": n}


def robustness_profile(
    clean: ActivationStore | str | os.PathLike,
    perturbed: Sequence[ActivationStore | str | os.PathLike],
    *,
    layers: Sequence[str] | None = None,
    tokens: str = "flatten",
    threshold: float = THRESHOLD,
    resamples: int = N_RESAMPLES,
    seed: int = 0,
    progress: bool = False,
) -> RobustnessResult:
    """Robustness profile of one model: ``clean`` (a store or path, extracted without ``--perturb``) against
    each of ``perturbed`` (same model, preprocessing and samples, extracted with ``--perturb``).

    ``layers``: the compared layers (default: every clean layer that all perturbed stores hold); ``tokens``:
    flatten | mean | cls, as in ``repsim cka``; ``threshold``: the CKA below which a layer counts as changed;
    ``resamples``: half-samples of the CKA interval (seeded by ``seed``). Refuses, in one line, incomplete stores,
    a perturbed clean store, another model, other samples or other preprocessing.
    """
    model = _profile_model(clean, perturbed, layers=layers, tokens=tokens, threshold=threshold,
                           resamples=resamples, seed=seed, progress=progress)
    return _result([model], tokens, threshold, resamples, seed)


def _result(models: list[ModelProfile], tokens: str, threshold: float, resamples: int, seed: int) -> RobustnessResult:
    import repsim

    return RobustnessResult(models=models, tokens=tokens, threshold=float(threshold), resamples=int(resamples),
                            seed=int(seed), interval_method=HALF_SAMPLE_METHOD.format(r=resamples),
                            repsim_version=repsim.__version__)


def _profile_model(clean_in: Any, perturbed_in: Sequence[Any], *, layers: Sequence[str] | None, tokens: str,
                   threshold: float, resamples: int, seed: int, progress: bool) -> ModelProfile:
    from tqdm.auto import tqdm

    if not 0.0 < float(threshold) < 1.0:
        raise UsageError(f"the CKA threshold must lie in (0, 1), got {threshold}")
    if resamples < 0:
        raise UsageError(f"resamples must be >= 0, got {resamples}")
    clean = _open(clean_in)
    if perturbation_of(clean) is not None:
        raise UsageError(f"{clean.path} is perturbed ({clean.attrs['perturbation']['kind']}): the clean store must be "
                         "extracted without --perturb")
    perturbed = [_open(p) for p in perturbed_in]
    if not perturbed:
        raise UsageError(f"no perturbed store for the clean store {clean.path}: extract the same model and data "
                         "with --perturb KIND:LEVEL")
    seen: dict[str, str] = {}
    for p in perturbed:
        _check_pair(clean, p)
        key = _canonical(perturbation_of(p))
        if key in seen:
            raise UsageError(f"{p.path} and {seen[key]} hold the same perturbation of the same model: give one")
        seen[key] = p.path
    if clean.n < 8:
        raise UsageError(f"{clean.path} holds {clean.n} images: the CKA interval needs at least 8")
    compared = _compared_layers(clean, perturbed, layers)
    perturbed.sort(key=lambda p: (perturbation_of(p)["kind"], float(perturbation_of(p)["level"])))

    cka = np.zeros((len(perturbed), len(compared), 3))
    bar = tqdm(total=len(compared) * len(perturbed), desc=f"robustness {clean.model_name}", unit="layer",
               disable=not progress, dynamic_ncols=True)
    constant: list[list[str]] = [[] for _ in perturbed]
    for j, layer in enumerate(compared):
        gram_clean, clean_varies = _layer_gram(clean, layer, tokens)
        for i, p in enumerate(perturbed):
            gram_pert, pert_varies = _layer_gram(p, layer, tokens)
            if clean_varies and pert_varies:
                # the same seeded halves for every layer and level: one draw, comparable across depth and level
                stat = HalfSampleCKA({layer: gram_clean}, {layer: gram_pert}, resamples=resamples, seed=seed)
                s = stat.interval(lambda v: float(v[0, 0]))
                cka[i, j] = (s["value"], s["low"], s["high"])
            else:  # 0/0: no CKA (see the module docstring)
                cka[i, j] = np.nan
                constant[i].append(layer)
            bar.update(1)
    bar.close()

    logits, note = logits_of(clean)
    correct_clean = top1_correct(clean, logits) if logits else None
    depth = [j / max(len(compared) - 1, 1) for j in range(len(compared))]
    levels = []
    for i, p in enumerate(perturbed):
        values, low, high = cka[i, :, 0], cka[i, :, 1], cka[i, :, 2]
        below = [layer for j, layer in enumerate(compared) if values[j] < threshold or layer in constant[i]]
        resolved = [layer for j, layer in enumerate(compared) if high[j] < threshold or layer in constant[i]]
        accuracy = drop = None
        if logits is not None:
            correct = top1_correct(p, logits)
            accuracy = _accuracy(correct)
            drop = bootstrap_mean(correct_clean, correct, seed=seed)
        levels.append(LevelProfile(
            path=p.path, perturbation=perturbation_of(p), config_hash=str(p.attrs.get("config_hash")),
            cka=values.tolist(), cka_low=low.tolist(), cka_high=high.tolist(),
            first_below=below[0] if below else None, first_below_resolved=resolved[0] if resolved else None,
            accuracy=accuracy, accuracy_drop=drop, constant_layers=constant[i]))
    return ModelProfile(
        model=clean.model_name, model_record=dict(clean.attrs["model"]), clean_path=clean.path,
        clean_config_hash=str(clean.attrs.get("config_hash")), fingerprint=clean.fingerprint, n=clean.n,
        layers=compared, relative_depth=depth, logits_layer=logits,
        accuracy=None if correct_clean is None else _accuracy(correct_clean), accuracy_note=note, levels=levels,
        chance=1.0 / len(clean.attrs["dataset"]["classes"]) if logits else None)


def group_by_model(stores: Sequence[ActivationStore | str | os.PathLike]
                   ) -> list[tuple[ActivationStore, list[ActivationStore]]]:
    """Split stores into (clean store, its perturbed stores) per model and sample set, in order of first mention.

    A group is one model record (name, source, weights and their hash) and one sample fingerprint; it must hold
    exactly one clean store (extracted without ``--perturb``). Refuses, in one line, a group without a clean
    store (naming why: no clean store of that model, or one with other samples) or with two.
    """
    opened = [_open(s) for s in stores]
    groups: dict[tuple[str, str], list[ActivationStore]] = {}
    for s in opened:
        groups.setdefault((model_identity(s.attrs["model"]), s.fingerprint), []).append(s)
    out = []
    for (model_key, fp), members in groups.items():
        clean = [s for s in members if perturbation_of(s) is None]
        pert = [s for s in members if perturbation_of(s) is not None]
        if len(clean) > 1:
            raise UsageError(f"two clean stores of {clean[0].model_name} with the same samples ({clean[0].path}, "
                             f"{clean[1].path}): give one")
        if not clean:
            others = [s for (mk, f), ms in groups.items() if mk == model_key and f != fp for s in ms
                      if perturbation_of(s) is None]
            why = (f"the clean store {others[0].path} of that model holds other samples (fingerprint "
                   f"{others[0].fingerprint[:12]} vs {fp[:12]}): extract both with the same --data, --n and --seed"
                   if others else "extract it without --perturb and add it to the arguments")
            raise UsageError(f"no clean store for {pert[0].path} ({pert[0].model_name}): {why}")
        if not pert:
            raise UsageError(f"no perturbed store of {clean[0].model_name} for the clean store {clean[0].path}: "
                             "extract the same model and data with --perturb KIND:LEVEL")
        out.append((clean[0], pert))
    return out


def robustness_profiles(
    stores: Sequence[ActivationStore | str | os.PathLike],
    *,
    layers: Sequence[str] | None = None,
    tokens: str = "flatten",
    threshold: float = THRESHOLD,
    resamples: int = N_RESAMPLES,
    seed: int = 0,
    progress: bool = False,
) -> RobustnessResult:
    """Robustness profiles of several models in one result: ``stores`` (clean and perturbed, any order) are
    grouped by :func:`group_by_model`, and each group is profiled as by :func:`robustness_profile`."""
    models = [_profile_model(clean, pert, layers=layers, tokens=tokens, threshold=threshold, resamples=resamples,
                             seed=seed, progress=progress)
              for clean, pert in group_by_model(stores)]
    names = [m.model for m in models]
    for m in models:  # one model on two sample sets: say which is which
        if names.count(m.model) > 1:
            m.model = f"{m.model} (n={m.n}, {m.fingerprint[:8]})"
    return _result(models, tokens, threshold, resamples, seed)


# ----------------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------------


def plot_robustness(result: RobustnessResult, path: str | os.PathLike | None) -> Any:
    """The figure of :meth:`RobustnessResult.plot`; returns the matplotlib Figure."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from repsim.plotting.cka_map import layer_labels, model_label

    kinds = sorted({k for m in result.models for k in m.kinds()})
    acc_kinds = [k for k in kinds if any(m.accuracy and k in m.kinds() for m in result.models)]
    panels = [(m, k) for m in result.models for k in m.kinds()]
    # one flow of panels, the accuracy panels first, then the CKA panels: a separate accuracy row left most of
    # its width empty; at most 4 columns (3 when that fills every row), so only the last row can have a gap
    total = len(acc_kinds) + len(panels)
    ncols = max(1, min(4, total))
    if total > 4 and total % 4 and total % 3 == 0:
        ncols = 3
    nrows = -(-total // ncols)
    fig = Figure(figsize=(5.6 * ncols + 1.6, 4.2 * nrows + 0.4), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    cells = iter((r, c) for r in range(nrows) for c in range(ncols))
    pct = 100.0
    model_colours = {m.model: colormaps["tab10"](i % 10) for i, m in enumerate(result.models)}

    for kind in acc_kinds:
        ax = fig.add_subplot(grid[next(cells)])
        for m in result.models:
            if not m.accuracy or kind not in m.kinds():
                continue
            lv = [x for x in m.levels if x.perturbation["kind"] == kind]
            x = [0.0] + [float(v.perturbation["level"]) for v in lv]  # level 0: the clean store
            acc = [m.accuracy] + [v.accuracy for v in lv]
            y = np.array([a["value"] for a in acc]) * pct
            err = np.array([[a["value"] - a["low"] for a in acc], [a["high"] - a["value"] for a in acc]]) * pct
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=model_colours[m.model],
                        label=f"{model_label(m.model)} (n={m.n})")
        ax.set_xlabel(f"{kind} level" + (" (fraction of patches)" if kind == "patch-drop" else
                                         " (pieces per side)" if kind == "patch-shuffle" else
                                         " (share of area)" if kind == "occlude-centre" else
                                         " (noise std, normalised units)"))
        for chance in sorted({m.chance for m in result.models if m.chance and kind in m.kinds()}):
            ax.axhline(pct * chance, color="0.5", linestyle=":", linewidth=1, label=f"chance ({pct * chance:.1f}%)")
        ax.set_ylabel("top-1 accuracy (%), 95% Wilson CI")
        ax.set_ylim(0, 100)
        ax.set_title(f"accuracy vs {kind} (level 0 = clean store)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)

    for m, kind in panels:
        ax = fig.add_subplot(grid[next(cells)])
        lv = [x for x in m.levels if x.perturbation["kind"] == kind]
        cmap = colormaps["viridis"]
        for i, v in enumerate(lv):
            colour = cmap(0.9 * i / max(len(lv) - 1, 1))
            ax.plot(m.relative_depth, _floats(v.cka), marker=".", color=colour,
                    label=f"level {v.perturbation['level']:g}")
            ax.fill_between(m.relative_depth, _floats(v.cka_low), _floats(v.cka_high), color=colour, alpha=0.2,
                            linewidth=0)
        ax.axhline(result.threshold, color="0.4", linestyle="--", linewidth=1,
                   label=f"CKA = {result.threshold:g}")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlim(-0.03, 1.03)
        names = layer_labels(m.layers)
        step = max(1, int(np.ceil(len(names) / 24)))
        ticks = sorted(set(range(0, len(names), step)) | {len(names) - 1})  # thinned, the last layer always named
        ax.set_xticks([m.relative_depth[t] for t in ticks], [names[t] for t in ticks], rotation=90, fontsize=7)
        ax.set_xlabel("layer, at its relative depth (first compared layer 0, last 1)")
        ax.set_ylabel("CKA(clean, perturbed), same layer")
        ax.set_title(f"{model_label(m.model)}: {kind}\ndebiased linear CKA, tokens={result.tokens}, n={m.n}, "
                     f"95% half-sample band", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    if path is not None:
        save_figure_atomic(fig, path, dpi=120)
    return fig


__all__ = ["LevelProfile", "ModelProfile", "RobustnessResult", "group_by_model", "logits_of", "perturbation_of",
           "plot_robustness", "robustness_profile", "robustness_profiles"]
