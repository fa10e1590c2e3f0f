"""Layer × layer maps of any similarity measure between two stores (``repsim compare``).

The store front end of :mod:`repsim.similarity_measures`: every layer of store A against every layer of store B (or
of A itself), on the samples both hold (equal fingerprints, or ``align="ids"``). Each layer becomes one row
per image by ``tokens`` (default ``mean``: patch-token / spatial mean, which keeps CCA and Procrustes
well-posed; ``flatten`` as in the CKA papers gives n × (T·D) matrices), read chunk by chunk in float64. The
measures need all samples at once (an SVD, an RDM, neighbourhoods), so A's layers are held in memory and
B's are streamed one at a time. Optional uncertainty per cell: a seeded permutation null (p-value) and a
seeded percentile bootstrap over images.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from repsim.cka_engine import aligned_positions, layer_features, select_layers
from repsim.errors import UsageError
from repsim.json_output import write_json_atomic
from repsim.similarity_measures import MEASURES, SimilarityWarning, bootstrap_interval, permutation_null, similarity_details


#: The ``repsim cka`` options that compute the same numbers as compare's CKA measures (compare computes every
#: measure on all n samples at once; ``repsim cka`` defaults to the minibatch estimator, batches of 256
#: consecutive store rows, ``tokens=flatten``, float32 Gram products, so its default map differs).
CKA_EQUIVALENTS: dict[str, tuple[str, str]] = {
    "cka": ("exact", "linear"),
    "cka_debiased": ("debiased", "linear"),
    "cka_rbf": ("exact", "rbf"),
}


def cka_equivalent(measure: str, tokens: str, options: dict[str, Any] | None = None) -> str | None:
    """The ``repsim cka`` options giving the same map as compare's CKA ``measure`` (None for other measures).

    compare's ``cka`` is the biased (plug-in HSIC) linear CKA on all n samples, ``cka_debiased`` the U-centred
    one, ``cka_rbf`` the biased RBF one: ``repsim cka --estimator exact|debiased [--kernel rbf --threshold t]
    --tokens <tokens> --gram-dtype float64`` (equal to ~1e-12). ``repsim cka`` without options is the minibatch
    estimator on ``tokens=flatten`` and differs.
    """
    if measure not in CKA_EQUIVALENTS:
        return None
    estimator, kernel = CKA_EQUIVALENTS[measure]
    flags = f"--estimator {estimator}"
    if kernel == "rbf":
        flags += f" --kernel rbf --threshold {float((options or {}).get('threshold', 1.0)):g}"
    return f"{flags} --tokens {tokens} --gram-dtype float64"


@dataclass(eq=False)
class CompareResult:
    """One measure's layer × layer map with its orientation and provenance.

    ``values[i, j]`` is the measure between ``layers_a[i]`` and ``layers_b[j]``; ``p_values`` (permutation
    null, when ``null > 0``), ``ci_low`` / ``ci_high`` (percentile bootstrap at ``level``, when
    ``bootstrap > 0``) have the same shape. ``spec`` is the measure's metadata (kind, orientation, range,
    identity value, citation). ``notes`` lists per-cell adjustments (e.g. CCA dimension reductions).
    """

    measure: str
    spec: dict[str, Any]
    layers_a: list[str]
    layers_b: list[str]
    values: np.ndarray
    tokens: str
    n: int
    fingerprint_a: str
    fingerprint_b: str
    path_a: str
    path_b: str
    model_a: str = ""
    model_b: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    align: dict[str, Any] = field(default_factory=dict)
    null: int = 0
    bootstrap: int = 0
    level: float = 0.95
    seed: int = 0
    p_values: np.ndarray | None = None
    ci_low: np.ndarray | None = None
    ci_high: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    repsim_version: str | None = None

    def to_json(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """JSON-ready dict (arrays as lists of rows); written atomically to ``path`` when given."""
        d = asdict(self)
        for key in ("values", "p_values", "ci_low", "ci_high"):
            v = getattr(self, key)
            d[key] = None if v is None else np.asarray(v, dtype=float).tolist()
        d["kind"] = "repsim.compare"
        if path is not None:
            write_json_atomic(path, d)
        return d

    def plot(self, path: str | os.PathLike | None, ax: Any = None) -> Any:
        """Layer × layer heat map; for distances the colour map is reversed so bright always means alike."""
        from repsim.cka_plot import plot_layer_map

        lo, hi = self.spec["range"]
        finite = np.isfinite([lo, hi]).all()
        label = f"{self.measure} ({self.spec['kind']})"
        better = "lower" if self.spec["kind"] == "distance" else "higher"
        how = f"{self.measure} ({self.spec['kind']}, {better} = more alike)\ntokens={self.tokens}, n={self.n}"
        return plot_layer_map(self.values, self.layers_a, self.layers_b, model_a=self.model_a, model_b=self.model_b,
                              same_store=self.path_a == self.path_b, subtitle=how, label=label,
                              vmin=lo if finite else None, vmax=hi if finite else None,
                              reverse=self.spec["kind"] == "distance", path=path, ax=ax)


def compare_matrix(
    store_a: Any,
    store_b: Any = None,
    *,
    measure: str = "procrustes",
    tokens: str = "mean",
    layers_a: list[str] | None = None,
    layers_b: list[str] | None = None,
    align: str = "fingerprint",
    null: int = 0,
    bootstrap: int = 0,
    level: float = 0.95,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> CompareResult:
    """``measure`` (a name in :data:`repsim.similarity_measures.MEASURES`) between every layer pair of two stores.

    ``store_b=None`` compares ``store_a`` with itself (symmetric measures fill the upper triangle once).
    ``null=R``: permutation null with R shuffles of the sample pairing per cell (p-values); ``bootstrap=R``:
    percentile interval at ``level`` over R resamplings of the images; both seeded by ``seed`` (cell
    (i, j) uses ``seed`` as is: the same resamples for every cell, so cells stay comparable).
    """
    from tqdm.auto import tqdm

    if measure not in MEASURES:
        raise UsageError(f"unknown measure {measure!r}; choose from {', '.join(MEASURES)}")
    spec = MEASURES[measure]
    options = dict(options or {})
    for n_, what in ((null, "null"), (bootstrap, "bootstrap")):
        if isinstance(n_, bool) or not isinstance(n_, int) or n_ < 0:
            raise UsageError(f"{what} must be a non-negative integer, got {n_!r}")
    within = store_b is None
    sb = store_a if within else store_b
    la = select_layers(store_a, layers_a)
    lb = la if within and layers_b is None else select_layers(sb, layers_b)
    for s in (store_a,) if within else (store_a, sb):
        if not s.complete:
            raise UsageError(f"{s.path} is incomplete: rerun the same `repsim extract` command to finish it")
    pos_a, pos_b, align_info = aligned_positions(store_a, None if within else sb, align)
    n = len(pos_a)
    if n < spec.min_samples:
        raise UsageError(f"{measure} needs at least {spec.min_samples} samples, got {n}")

    def feats(store: Any, layer: str, pos: np.ndarray) -> np.ndarray:
        return layer_features(store, layer, tokens=tokens, positions=pos, dtype=torch.float64).numpy()

    values = np.full((len(la), len(lb)), np.nan)
    p_values = np.full_like(values, np.nan) if null else None
    ci_low = np.full_like(values, np.nan) if bootstrap else None
    ci_high = np.full_like(values, np.nan) if bootstrap else None
    notes: list[str] = []
    same_lists = la == lb and (within or sb is store_a)
    with tqdm(total=len(la) + len(lb), desc=f"compare {measure}", unit="layer", disable=not progress,
              leave=False) as bar:
        xs = []
        for layer in la:
            xs.append(feats(store_a, layer, pos_a))
            bar.update(1)
        for j, layer_b in enumerate(lb):
            y = xs[la.index(layer_b)] if same_lists else feats(sb, layer_b, pos_b)
            for i, x in enumerate(xs):
                if same_lists and spec.symmetric and j < i:
                    continue  # filled from (j, i)
                cell = f"{la[i]} vs {layer_b}"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SimilarityWarning)
                    d = similarity_details(x, y, measure, **options)
                values[i, j] = d["value"]
                notes += [f"{cell}: {w}" for w in d.get("warnings", [])]  # adjustments the reader must know
                if null:
                    p_values[i, j] = permutation_null(x, y, measure, n_perm=null, seed=seed, **options)["p_value"]
                if bootstrap:
                    bi = bootstrap_interval(x, y, measure, n_boot=bootstrap, seed=seed, level=level, **options)
                    ci_low[i, j], ci_high[i, j] = bi["low"], bi["high"]
                if same_lists and spec.symmetric and i != j:
                    for arr in (values, p_values, ci_low, ci_high):
                        if arr is not None:
                            arr[j, i] = arr[i, j]
            bar.update(1)
    if not np.isfinite(values).all():
        raise UsageError(f"{measure} gave a non-finite value; see the layers' features (constant activations?)")
    return CompareResult(
        measure=measure, spec=spec.to_dict(), layers_a=list(la), layers_b=list(lb), values=values, tokens=tokens,
        n=n, fingerprint_a=str(store_a.fingerprint), fingerprint_b=str(sb.fingerprint), path_a=str(store_a.path),
        path_b=str(sb.path), model_a=str(store_a.attrs.get("model", {}).get("name", "")),
        model_b=str(sb.attrs.get("model", {}).get("name", "")), options=options, align=align_info, null=null,
        bootstrap=bootstrap, level=level, seed=seed, p_values=p_values, ci_low=ci_low, ci_high=ci_high,
        notes=notes, repsim_version=store_a.attrs.get("repsim_version"),
    )
