"""Layer × layer maps of any similarity measure between two stores (``repsim compare``).

The store front end of :mod:`repsim.measures.beyond_cka`: every layer of store A against every layer of store B (or
of A itself), on the samples both hold (equal fingerprints, or ``align="ids"``). Each layer becomes one row
per image by ``tokens``: ``auto`` (the default) is ``flatten`` for the CKA measures (n × (T·D) matrices, as
``repsim cka`` and the CKA papers) and ``mean`` (patch-token / spatial mean, which keeps CCA and Procrustes
well-posed and the memory small) for every other measure; ``mean``, ``flatten`` and ``cls`` force one mode.

``cka`` is ``repsim cka``'s default estimator, run through :func:`repsim.measures.cka_engine.cka_matrix` with its
defaults: minibatch linear CKA (Nguyen, Raghu & Kornblith 2021, Sec. 3.1: unbiased HSIC summed over batches of
256 consecutive store rows), float32 Gram products, stored Grams when both stores have them, so
``compare --measure cka`` and ``repsim cka`` give the same map. It streams and never holds all samples.
The all-sample CKA variants keep explicit names: ``cka_biased`` (plug-in HSIC on all n; Kornblith et al.
2019), ``cka_debiased`` (U-centred HSIC on all n), ``cka_rbf`` (RBF kernel, plug-in). These, like the other
measures, need all samples at once (an SVD, an RDM, neighbourhoods, n × n Grams), so A's layers are held in
memory and B's are streamed one at a time, read chunk by chunk in float64. Optional uncertainty per cell: a
seeded permutation null (p-value) and a seeded percentile bootstrap over images; both resample the n images,
so they are refused for the minibatch ``cka`` (one line naming ``cka_debiased`` / ``cka_biased``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from repsim.measures.cka_engine import (aligned_positions, cka_matrix, default_memory_budget, feature_width, layer_features,
                               select_layers)
from repsim.errors import UsageError
from repsim.measures.gram import MIN_UNBIASED
from repsim.results import Result
from repsim.measures.beyond_cka import (
    MEASURES,
    SimilarityWarning,
    bootstrap_interval,
    permutation_null,
    similarity_details,
)


#: compare's name for the all-sample plug-in CKA, :data:`repsim.measures.beyond_cka.MEASURES`'s ``cka``
#: (compare's own ``cka`` is the minibatch estimator of ``repsim cka``).
MEASURE_ALIASES: dict[str, str] = {"cka_biased": "cka"}

#: the minibatch ``cka`` measure's options and their defaults: ``repsim cka``'s defaults
MINIBATCH_OPTIONS: dict[str, Any] = {"batch_size": 256, "gram_dtype": "float32", "plan": "auto", "source": "auto"}

#: compare's CKA measures -> (``repsim cka --estimator``, ``--kernel``) computing the same map
CKA_EQUIVALENTS: dict[str, tuple[str, str]] = {
    "cka": ("minibatch", "linear"),
    "cka_biased": ("exact", "linear"),
    "cka_debiased": ("debiased", "linear"),
    "cka_rbf": ("exact", "rbf"),
}

#: every measure compare accepts, in MEASURES order with ``cka_biased`` beside ``cka``
COMPARE_MEASURES: tuple[str, ...] = tuple(
    name for m in MEASURES for name in ((m, "cka_biased") if m == "cka" else (m,)))

TOKEN_CHOICES = ("auto", "mean", "flatten", "cls")


def minibatch_cka_spec() -> dict[str, Any]:
    """Metadata of compare's ``cka`` (the minibatch estimator), in the form of ``MeasureSpec.to_dict()``."""
    d = MEASURES["cka"].to_dict()
    d.update(
        name="cka", range=[-1.0, 1.0], needs_all_samples=False, min_samples=MIN_UNBIASED,
        options=dict(MINIBATCH_OPTIONS),
        description="minibatch linear CKA: unbiased (U-centred) HSIC summed over batches of consecutive store rows, "
                    "Σ_b⟨K̃_b,L̃_b⟩ / √(Σ_b‖K̃_b‖² Σ_b‖L̃_b‖²) (repsim.measures.cka_engine.cka_matrix, as `repsim cka`)",
        citation="Nguyen, Raghu & Kornblith (2021), Do Wide and Deep Networks Learn the Same Things?, ICLR, Sec. 3.1",
        bootstrap_note="no permutation null or bootstrap here (they resample all n images at once): use "
                       "cka_debiased or cka_biased",
    )
    return d


def measure_spec(measure: str) -> dict[str, Any]:
    """JSON-ready metadata (kind, orientation, range, identity value, citation, ...) of a compare measure."""
    check_measure(measure)
    if measure == "cka":
        return minibatch_cka_spec()
    return dict(MEASURES[MEASURE_ALIASES.get(measure, measure)].to_dict(), name=measure)


def check_measure(measure: str, null: int = 0, bootstrap: int = 0) -> None:
    """Refuse, with a UsageError, an unknown measure or an uncertainty request the measure cannot serve."""
    if measure not in COMPARE_MEASURES:
        raise UsageError(f"unknown measure {measure!r}; choose from {', '.join(COMPARE_MEASURES)}")
    for n_, what in ((null, "null"), (bootstrap, "bootstrap")):
        if isinstance(n_, bool) or not isinstance(n_, int) or n_ < 0:
            raise UsageError(f"{what} must be a non-negative integer, got {n_!r}")
    if measure == "cka" and (null or bootstrap):
        raise UsageError("--null / --bootstrap resample all n images at once, which the minibatch cka does not "
                         "hold: use --measure cka_debiased (U-centred, all n) or cka_biased (plug-in, all n)")


def resolve_tokens(measure: str, tokens: str) -> str:
    """``tokens="auto"``: ``flatten`` for the CKA measures (as ``repsim cka``), ``mean`` for the others."""
    if tokens not in TOKEN_CHOICES:
        raise UsageError(f"tokens must be one of {', '.join(TOKEN_CHOICES)}, got {tokens!r}")
    if tokens != "auto":
        return tokens
    return "flatten" if measure in CKA_EQUIVALENTS else "mean"


def cka_equivalent(measure: str, tokens: str, options: dict[str, Any] | None = None) -> str | None:
    """The ``repsim cka`` flags giving the same map as compare's CKA ``measure`` ("" = none: plain ``repsim cka``;
    None for measures that are not CKA). ``tokens`` is the resolved token mode.

    ``cka`` is ``repsim cka``'s minibatch estimator with its defaults (flags only where ``tokens`` or the options
    differ from them: equal to ~1e-12); ``cka_biased`` / ``cka_debiased`` / ``cka_rbf`` are ``repsim cka
    --estimator exact|debiased [--kernel rbf --threshold t] --tokens <tokens> --gram-dtype float64`` (compare
    computes them in float64 on all n samples; equal to ~1e-12).
    """
    if measure not in CKA_EQUIVALENTS:
        return None
    estimator, kernel = CKA_EQUIVALENTS[measure]
    opts = dict(options or {})
    if estimator == "minibatch":
        flags = [] if tokens == "flatten" else [f"--tokens {tokens}"]
        for key, default in MINIBATCH_OPTIONS.items():
            if key in opts and opts[key] != default:
                flags.append(f"--{key.replace('_', '-')} {opts[key]}")
        return " ".join(flags)
    flags = f"--estimator {estimator}"
    if kernel == "rbf":
        flags += f" --kernel rbf --threshold {float(opts.get('threshold', 1.0)):g}"
    return f"{flags} --tokens {tokens} --gram-dtype float64"


@dataclass(eq=False)
class CompareResult(Result):
    """One measure's layer × layer map with its orientation and provenance.

    ``values[i, j]`` is the measure between ``layers_a[i]`` and ``layers_b[j]``; ``p_values`` (permutation
    null, when ``null > 0``), ``ci_low`` / ``ci_high`` (percentile bootstrap at ``level``, when
    ``bootstrap > 0``) have the same shape. ``spec`` is the measure's metadata (kind, orientation, range,
    identity value, citation). ``notes`` lists per-cell adjustments (e.g. CCA dimension reductions).
    ``minibatch`` (the minibatch ``cka`` only): how ``repsim.measures.cka_engine.cka_matrix`` computed it (estimator,
    batch_size, n_batches, batch_rows, plan, source: stored Grams or activations, gram_dtype, rows_used, device).
    """

    result_kind: ClassVar[str] = "repsim.compare"

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
    minibatch: dict[str, Any] | None = None

    def plot(self, path: str | os.PathLike | None, ax: Any = None) -> Any:
        """Layer × layer heat map; for distances the colour map is reversed so bright always means alike.

        The colour scale is the measure's range, except for similarities that may go below 0 only by estimation
        noise (minibatch / debiased CKA, range [-1, 1]): their scale starts at min(0, smallest value), so the
        map uses the colours as ``repsim cka``'s plot does instead of spending half of them on unused values."""
        from repsim.plotting.cka_map import plot_layer_map

        lo, hi = self.spec["range"]
        finite = np.isfinite([lo, hi]).all()
        if self.spec["kind"] == "similarity" and lo < 0 and self.spec["identity_value"] == hi:
            lo = min(0.0, float(np.nanmin(self.values)))
        label = f"{self.measure} ({self.spec['kind']})"
        better = "lower" if self.spec["kind"] == "distance" else "higher"
        how = f"{self.measure} ({self.spec['kind']}, {better} = more alike)\n"
        if self.minibatch:
            rows = self.minibatch["batch_rows"] or [self.minibatch["batch_size"]] * 2
            size = f"{rows[0]}" if rows[0] == rows[1] else f"{rows[0]}-{rows[1]}"
            nb = self.minibatch["n_batches"]
            how += f"minibatch linear CKA, tokens={self.tokens}, n={self.n}, {nb} batch{'es' if nb != 1 else ''} of {size}"
        else:
            how += f"tokens={self.tokens}, n={self.n}, all samples"
        return plot_layer_map(self.values, self.layers_a, self.layers_b, model_a=self.model_a, model_b=self.model_b,
                              same_store=self.path_a == self.path_b, subtitle=how, label=label,
                              vmin=lo if finite else None, vmax=hi if finite else None,
                              reverse=self.spec["kind"] == "distance", path=path, ax=ax)


def compare_matrix(
    store_a: Any,
    store_b: Any = None,
    *,
    measure: str = "procrustes",
    tokens: str = "auto",
    layers_a: list[str] | None = None,
    layers_b: list[str] | None = None,
    align: str = "fingerprint",
    null: int = 0,
    bootstrap: int = 0,
    level: float = 0.95,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    device: str = "auto",
) -> CompareResult:
    """``measure`` (a name in :data:`COMPARE_MEASURES`) between every layer pair of two stores.

    ``store_b=None`` compares ``store_a`` with itself (symmetric measures fill the upper triangle once).
    ``tokens``: see the module docstring (``auto``: flatten for CKA, mean otherwise). ``null=R``: permutation
    null with R shuffles of the sample pairing per cell (p-values); ``bootstrap=R``: percentile interval at
    ``level`` over R resamplings of the images; both seeded by ``seed`` (cell (i, j) uses ``seed`` as is: the
    same resamples for every cell, so cells stay comparable); both refused for the minibatch ``cka``.
    ``measure="cka"`` is :func:`repsim.measures.cka_engine.cka_matrix` with ``repsim cka``'s defaults (``options`` may
    change :data:`MINIBATCH_OPTIONS`; ``device`` is where its Gram products run); every other measure is
    computed on all n samples in float64 on the CPU.
    """
    check_measure(measure, null, bootstrap)
    tokens = resolve_tokens(measure, tokens)
    options = dict(options or {})
    if measure == "cka":
        return _minibatch_cka(store_a, store_b, tokens=tokens, layers_a=layers_a, layers_b=layers_b, align=align,
                              seed=seed, options=options, progress=progress, device=device)
    from tqdm.auto import tqdm

    spec = MEASURES[MEASURE_ALIASES.get(measure, measure)]
    within = store_b is None
    sb = store_a if within else store_b
    la = select_layers(store_a, layers_a)
    lb = la if within and layers_b is None else select_layers(sb, layers_b)
    for s in (store_a,) if within else (store_a, sb):
        if hasattr(s, "require_complete"):
            s.require_complete()  # unfinished, or damaged metadata (e.g. lost chunk digests): one line, no number
        elif not s.complete:
            raise UsageError(f"{s.path} is incomplete: rerun the same `repsim extract` command to finish it")
    pos_a, pos_b, align_info = aligned_positions(store_a, None if within else sb, align)
    n = len(pos_a)
    if n < spec.min_samples:
        raise UsageError(f"{measure} needs at least {spec.min_samples} samples, got {n}")
    # A's layers are held whole in float64 while B's stream: refuse in one line what would not fit (a ViT's
    # flattened tokens are ~150k features per image) rather than be killed for memory
    widths_a = [feature_width(store_a.layer_info(ly), ly, tokens) for ly in la]
    width_b = max(feature_width(sb.layer_info(ly), ly, tokens) for ly in lb)
    need, budget = 8 * n * (sum(widths_a) + width_b), default_memory_budget()
    if need > budget:
        raise UsageError(f"{measure} on all n={n} samples with tokens={tokens} holds {need / 2**30:.1f} GiB of "
                         f"features, more than half the free memory ({budget / 2**30:.1f} GiB): use --tokens mean, "
                         "fewer --layers-a, fewer images, or `repsim cka` (minibatch, streams every layer)")

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
                    d = similarity_details(x, y, spec.name, **options)
                values[i, j] = d["value"]
                notes += [f"{cell}: {w}" for w in d.get("warnings", [])]  # adjustments the reader must know
                if null:
                    p_values[i, j] = permutation_null(x, y, spec.name, n_perm=null, seed=seed, **options)["p_value"]
                if bootstrap:
                    bi = bootstrap_interval(x, y, spec.name, n_boot=bootstrap, seed=seed, level=level, **options)
                    ci_low[i, j], ci_high[i, j] = bi["low"], bi["high"]
                if same_lists and spec.symmetric and i != j:
                    for arr in (values, p_values, ci_low, ci_high):
                        if arr is not None:
                            arr[j, i] = arr[i, j]
            bar.update(1)
    if not np.isfinite(values).all():
        raise UsageError(f"{measure} gave a non-finite value; see the layers' features (constant activations?)")
    return CompareResult(
        measure=measure, spec=measure_spec(measure), layers_a=list(la), layers_b=list(lb), values=values, tokens=tokens,
        n=n, fingerprint_a=str(store_a.fingerprint), fingerprint_b=str(sb.fingerprint), path_a=str(store_a.path),
        path_b=str(sb.path), model_a=str(store_a.attrs.get("model", {}).get("name", "")),
        model_b=str(sb.attrs.get("model", {}).get("name", "")), options=options, align=align_info, null=null,
        bootstrap=bootstrap, level=level, seed=seed, p_values=p_values, ci_low=ci_low, ci_high=ci_high,
        notes=notes, repsim_version=store_a.attrs.get("repsim_version"),
    )


def _minibatch_cka(store_a: Any, store_b: Any, *, tokens: str, layers_a: list[str] | None,
                   layers_b: list[str] | None, align: str, seed: int, options: dict[str, Any], progress: bool,
                   device: str) -> CompareResult:
    """compare's ``cka``: :func:`repsim.measures.cka_engine.cka_matrix` with ``repsim cka``'s defaults, as a CompareResult."""
    unknown = sorted(set(options) - set(MINIBATCH_OPTIONS))
    if unknown:
        raise UsageError(f"measure 'cka' has no option {', '.join(map(repr, unknown))} "
                         f"(its options: {', '.join(MINIBATCH_OPTIONS)})")
    opts = dict(MINIBATCH_OPTIONS, **options)
    r = cka_matrix(store_a, store_b, estimator="minibatch", kernel="linear", tokens=tokens, layers_a=layers_a,
                   layers_b=layers_b, batch_size=opts["batch_size"], repeats=1, seed=seed, device=device,
                   progress=progress, align=align, gram_dtype=opts["gram_dtype"], plan=opts["plan"],
                   source=opts["source"])
    details = {"estimator": r.estimator, "batch_size": r.batch_size, "n_batches": r.n_batches,
               "batch_rows": r.batch_rows, "plan": r.plan, "source": r.source, "gram_dtype": r.gram_dtype,
               "rows_used": r.rows_used, "device": r.device}
    sb = store_a if store_b is None else store_b
    return CompareResult(
        measure="cka", spec=minibatch_cka_spec(), layers_a=list(r.layers_a), layers_b=list(r.layers_b),
        values=np.asarray(r.values, dtype=np.float64), tokens=tokens, n=r.n, fingerprint_a=r.fingerprint_a,
        fingerprint_b=r.fingerprint_b, path_a=r.path_a, path_b=r.path_b, model_a=r.model_a, model_b=r.model_b,
        options={k: v for k, v in opts.items() if k in options}, align=r.align, seed=seed,
        repsim_version=r.repsim_version or sb.attrs.get("repsim_version"), minibatch=details,
    )
