"""Linear transfer probes of a store (Kornblith, Shlens & Le 2019): per layer, a classifier fitted on frozen
features (:mod:`probes.solvers`: logistic regression or ridge, with the protocol, objective and stopping
test documented there), the strength chosen on a validation split, scored once on the test split;
:class:`ProbeResult` holds the per-layer accuracies with their provenance."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from probes.features import (
    FeatureSet,
    ProbeSplit,
    StoreLike,
    load_feature_set,
    make_split,
    plan_feature_sets,
)
from probes.solvers import (
    DEFAULT_HISTORY,
    DEFAULT_MAX_ITER,
    DEFAULT_RTOL,
    DEFAULT_TOL,
    LOSS_CONVENTION,
    METHODS,
    METRICS,
    RIDGE_CONVENTION,
    accuracy_scores,
    check_lambdas,
    fit_logreg,
    ridge_classify,
)
from repsim.devices import resolve_device
from repsim.errors import UsageError
from repsim.results import Result, save_figure_atomic


__all__ = ["ProbeResult", "ProbeRow", "linear_probe", "prepare_probe"]

# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------


@dataclass
class ProbeRow:
    """One feature set's probe: ``top1`` / ``mean_per_class`` on the test split (fractions in [0, 1]),
    ``train_top1`` on the final fitting data (train + val), ``val_top1`` at the chosen strength; ``lam`` the
    chosen λ, ``C = 1/(λ·n_fit)`` (logreg) or ``alpha = λ·n_fit`` (ridge), ``converged`` / ``n_iter`` of the
    final fit (all None for k-NN); for logreg also ``objective`` / ``grad_max`` / ``grad_norm`` /
    ``gap_bound`` of the final fit (see :class:`LinearFit`) and ``path_converged``, whether the validation-path
    fit whose score chose λ converged; ``val_curve`` one dict per strength (see :meth:`LinearFit.curve`);
    ``seconds`` the fitting wall time, ``read_seconds`` the time spent reading the features."""

    layer: str
    layers: list[str]
    reductions: list[str]
    dim: int
    top1: float
    mean_per_class: float
    train_top1: float | None = None
    val_top1: float | None = None
    lam: float | None = None
    C: float | None = None
    alpha: float | None = None
    converged: bool | None = None
    n_iter: int | None = None
    val_curve: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    read_seconds: float = 0.0
    path_converged: bool | None = None
    objective: float | None = None
    grad_max: float | None = None
    grad_norm: float | None = None
    gap_bound: float | None = None

    @property
    def fit_ok(self) -> bool:
        """False when the final fit or the validation-path fit at the chosen λ failed its stopping test."""
        return self.converged is not False and self.path_converged is not False


@dataclass(eq=False)
class ProbeResult(Result):
    """Per-layer transfer accuracies of one store with everything needed to reproduce them.

    ``rows`` in network order (one per layer, or one concat-last-K set); ``method`` logreg | ridge | knn;
    ``protocol`` the split (fraction or test store), seed, validation fraction, strength grid, objective
    convention, selection rule, standardisation, solver tolerances, k-NN parameters, ``n_train`` / ``n_val``
    / ``n_test``, ``n_classes``; ``store`` its path, fingerprint, model and n.
    """

    result_kind: ClassVar[str] = "repsim.probe"

    method: str
    features: str
    rows: list[ProbeRow]
    protocol: dict[str, Any]
    store: dict[str, Any]
    device: str = "cpu"
    repsim_version: str | None = None
    seconds: float = 0.0

    @property
    def layers(self) -> list[str]:
        return [r.layer for r in self.rows]

    @property
    def top1(self) -> np.ndarray:
        return np.array([r.top1 for r in self.rows])

    @property
    def best_layer(self) -> str:
        """The feature set with the highest test top-1 (the first of equals, in network order). Descriptive:
        choosing a layer by its test score is itself a selection on the test set."""
        return self.rows[int(np.argmax(self.top1))].layer

    def row(self, layer: str) -> ProbeRow:
        for r in self.rows:
            if r.layer == layer:
                return r
        raise UsageError(f"no row {layer!r} in this result (it has {', '.join(self.layers[:5])}...)")

    @property
    def label(self) -> str:
        """Legend text: model · method · features."""
        from repsim.plotting.cka_map import model_label

        model = model_label(self.store.get("model")) or os.path.basename(str(self.store.get("path", "")))
        return f"{model} · {self.method} · {self.features}"

    def summary(self) -> str:
        """A plain-text table (one line per row: test top-1 %, mean per-class %, λ, C, converged, iterations)."""
        head = f"{'layer':<28} {'top-1 %':>8} {'mpc %':>7} {'lambda':>9} {'C':>9} {'conv':>5} {'iter':>5}"
        lines = [f"{self.label}  (n_train={self.protocol.get('n_train')}, n_val={self.protocol.get('n_val')}, "
                 f"n_test={self.protocol.get('n_test')}, classes={self.protocol.get('n_classes')})", head]
        for r in self.rows:
            lam = "" if r.lam is None else f"{r.lam:.2e}"
            C = "" if r.C is None else f"{r.C:.2e}"
            conv = "" if r.converged is None else ("yes" if r.fit_ok else "NO")
            it = "" if r.n_iter is None else str(r.n_iter)
            name = r.layer if len(r.layer) <= 28 else "…" + r.layer[-27:]
            lines.append(f"{name:<28} {100 * r.top1:>8.2f} {100 * r.mean_per_class:>7.2f} {lam:>9} {C:>9} "
                         f"{conv:>5} {it:>5}")
        lines.append(f"best layer: {self.best_layer}")
        bad = [r for r in self.rows if not r.fit_ok]
        if bad:
            lines.append(f"WARNING: the fit at the selected lambda did not converge for {len(bad)} row(s): "
                         + ", ".join(f"{r.layer} (" + _row_problem(r) + ")" for r in bad[:6])
                         + (" ..." if len(bad) > 6 else "")
                         + "; their accuracies are of an unfinished fit: raise max_iter (repsim probe --max-iter), "
                         "or use float64 precision")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"ProbeResult({self.method}, {self.features}, {len(self.rows)} rows, best {self.best_layer!r} "
                f"{100 * float(self.top1.max()):.2f}%)")

    def json_fields(self) -> dict[str, Any]:
        """The fields and the ``best_layer``."""
        return dict(super().json_fields(), best_layer=self.best_layer)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
        """The rows rebuilt as :class:`ProbeRow` (keys a later version added are left out)."""
        known = {f.name for f in dataclasses.fields(ProbeRow)}
        return dict(fields, rows=[ProbeRow(**{k: v for k, v in r.items() if k in known}) for r in fields["rows"]])

    def plot(self, path: str | os.PathLike | None = None, others: Sequence["ProbeResult"] = (), *,
             metric: str = "top1", labels: Sequence[str] | None = None, ax: Any = None) -> Any:
        """Test accuracy (%) against depth, this result and ``others`` on one axis; saved to ``path`` (PNG,
        PDF, … by extension) when given; returns the Axes.

        When every result has the same rows the x axis is the layer (short names, see
        :func:`repsim.plotting.cka_map.short_layer_names`); otherwise each curve is placed on relative depth
        (row index / (rows − 1)). concat-last-K sets are drawn as dashed horizontal lines; the dotted grey
        line is chance (1 / classes of this result). ``metric``: top1 | mean_per_class.
        """
        from matplotlib.figure import Figure

        from repsim.plotting.cka_map import short_layer_names

        if metric not in METRICS:
            raise UsageError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        results = [self, *others]
        if labels is not None and len(labels) != len(results):
            raise UsageError(f"{len(labels)} labels for {len(results)} results")
        names = labels or [r.label for r in results]
        depth = [[row for row in r.rows if len(row.layers) == 1 or not row.layer.startswith("concat")]
                 for r in results]
        curves = [[row.layer for row in rows] for rows in depth if rows]
        same = all(c == curves[0] for c in curves)
        if ax is None:
            n_max = max(len(rows) for rows in depth) or 1
            fig = Figure(figsize=(min(4 + 0.35 * n_max, 14), 4.2))
            ax = fig.subplots()
        else:
            fig = ax.figure
        for k, (r, rows, name) in enumerate(zip(results, depth, names)):
            colour = f"C{k % 10}"
            y = [100 * (row.top1 if metric == "top1" else row.mean_per_class) for row in rows]
            if rows:
                x = np.arange(len(rows), dtype=float)
                if not same:
                    x = x / max(len(rows) - 1, 1)
                ax.plot(x, y, marker="o", ms=3.5, lw=1.5, color=colour, label=name)
            for row in r.rows:
                if row not in rows:
                    v = 100 * (row.top1 if metric == "top1" else row.mean_per_class)
                    ax.axhline(v, ls="--", lw=1.2, color=colour,
                               label=name if row.layer in name else f"{name} [{row.layer}]")
        n_classes = self.protocol.get("n_classes")
        if n_classes:
            ax.axhline(100.0 / n_classes, ls=":", lw=1, color="0.5", label="chance")
        if same and curves:
            ticks = np.arange(len(curves[0]))
            step = max(1, int(np.ceil(len(ticks) / 30)))
            ax.set_xticks(ticks[::step])
            ax.set_xticklabels(short_layer_names(curves[0])[::step], rotation=60, ha="right", fontsize=8)
            ax.set_xlabel("layer (network order)")
        else:
            ax.set_xlabel("relative depth (layer index / (layers − 1))")
        ax.set_ylabel("test top-1 accuracy (%)" if metric == "top1" else "test mean per-class accuracy (%)")
        ax.set_ylim(-1, 101)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax.set_title(f"linear transfer ({self.protocol.get('n_classes')} classes, n_test = "
                     f"{self.protocol.get('n_test')})" if len(results) == 1 else "transfer accuracy vs depth",
                     fontsize=10)
        fig.tight_layout()
        if path is not None:
            save_figure_atomic(fig, path, dpi=150)
        return ax




def _row_problem(r: ProbeRow) -> str:
    parts = []
    if r.converged is False:
        gap = "" if r.gap_bound is None or r.objective is None else \
            f": objective {r.objective:.4g}, up to {r.gap_bound:.1e} above its minimum"
        parts.append(f"final fit{gap}")
    if r.path_converged is False:
        parts.append("validation-path fit")
    return ", ".join(parts)


def _repsim_version() -> str | None:
    try:
        import repsim

        return str(repsim.__version__)
    except Exception:  # noqa: BLE001 - provenance is best effort
        return None


def _store_info(store: StoreLike) -> dict[str, Any]:
    model = getattr(store, "model_name", None) or (store.attrs.get("model") or {}).get("name")
    return {"path": str(store.path), "fingerprint": str(store.fingerprint), "model": model, "n": int(store.n),
            "dataset": (store.attrs.get("dataset") or {}).get("name")}


# ----------------------------------------------------------------------------------------------------
# Store-level driver
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    sets: list[FeatureSet]
    split: ProbeSplit


def prepare_probe(store: StoreLike, *, layers: Sequence[str] | None, features: str, split: float | None,
                  test_store: StoreLike | None, seed: int, val_fraction: float | None) -> _Prepared:
    """Validate everything up front (layers, feature mode, labels, split, test store) before any fitting."""
    for s in (store,) if test_store is None else (store, test_store):
        if not getattr(s, "complete", True):
            raise UsageError(f"{s.path} is incomplete (an extraction is unfinished or was killed): rerun the same "
                             "`repsim extract` command to finish it")
    sets = plan_feature_sets(store, layers, features)
    used = sorted({lay for fs in sets for lay in fs.layers}, key=list(store.layers).index)
    # a test store is checked layer by layer (kind, shape, prefix tokens) in make_split → check_test_store
    sp = make_split(store, split=split, val_fraction=val_fraction, seed=seed, test_store=test_store, layers=used)
    return _Prepared(sets, sp)


def _protocol(prep: _Prepared, *, split: float | None, test_store: StoreLike | None, seed: int,
              val_fraction: float | None, features: str) -> dict[str, Any]:
    sp = prep.split
    return {
        "split": None if test_store is not None else float(split),
        "test": sp.info["test"],
        "seed": int(seed),
        "val_fraction": val_fraction,
        "features": features,
        "feature_sets": [{"name": fs.name, "layers": fs.layers, "reductions": fs.reductions, "dim": fs.dim}
                         for fs in prep.sets],
        "n_train": int(sp.train.size),
        "n_val": int(sp.val.size),
        "n_test": int(sp.test.size),
        "n_classes": int(np.unique(np.concatenate([sp.y_train, sp.y_val, sp.y_test])).size),
        "split_rule": "per-class stratified, seeded (numpy default_rng([seed, 0]) test, [seed, 1] validation)",
    }


def _iter_features(store: StoreLike, test_store: StoreLike | None, prep: _Prepared
                   ) -> Iterator[tuple[FeatureSet, np.ndarray, np.ndarray, np.ndarray, float]]:
    """Yield (feature set, X_train, X_val, X_test, read seconds) — one feature set in memory at a time."""
    sp = prep.split
    for fs in prep.sets:
        t0 = time.perf_counter()
        X = load_feature_set(store, fs)
        Xte = X[sp.test] if test_store is None else load_feature_set(test_store, fs)[sp.test]
        Xtr, Xv = X[sp.train], X[sp.val]
        del X
        yield fs, Xtr, Xv, Xte, time.perf_counter() - t0


def linear_probe(
    store: StoreLike,
    *,
    layers: Sequence[str] | None = None,
    features: str = "mean",
    method: str = "logreg",
    split: float = 0.2,
    test_store: StoreLike | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    lambdas: Sequence[float] | np.ndarray | None = None,
    val_fraction: float = 0.2,
    standardize: bool = True,
    metric: str = "top1",
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    precision: str = "auto",
    patience: int | None = None,
    rtol: float = DEFAULT_RTOL,
) -> ProbeResult:
    """Linear transfer accuracy of every selected layer of ``store`` (Kornblith, Shlens & Le 2019 protocol).

    ``features``: cls | mean | gap | concat-last-K (see :mod:`probes.features`). ``method``: ``logreg``
    (multinomial logistic regression, L-BFGS, :func:`fit_logreg`) or ``ridge`` (closed form on one-hot
    targets, :func:`ridge_classify`; cheap screening). ``split``: the stratified test fraction, ignored when
    ``test_store`` (same model and layers, disjoint samples) is given. The strength is chosen on a stratified
    ``val_fraction`` of the training samples among ``lambdas`` (default 45 log-spaced values in [1e-6, 1e5]),
    then the probe is refit on train + val and scored on the test samples. ``metric`` selects λ by
    validation top-1 or mean per-class accuracy. ``device``: auto (CUDA when available) | cpu | cuda[:N].
    """
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise UsageError(f"val_fraction must be in (0, 1), got {val_fraction}")
    t_start = time.perf_counter()
    lam_grid = check_lambdas(lambdas)
    dev = resolve_device(device)
    prep = prepare_probe(store, layers=layers, features=features, split=split, test_store=test_store, seed=seed,
                         val_fraction=val_fraction)
    sp = prep.split
    from tqdm.auto import tqdm

    rows, precision_used = [], None
    bar = tqdm(total=len(prep.sets), desc=f"{method} probe", unit="layer", disable=not progress,
               dynamic_ncols=True)
    for fs, Xtr, Xv, Xte, read_s in _iter_features(store, test_store, prep):
        bar.set_postfix_str(fs.name[-30:])
        if method == "logreg":
            fit = fit_logreg(Xtr, sp.y_train, Xv, sp.y_val, lam_grid, refit=True, standardize=standardize,
                             metric=metric, tol=tol, max_iter=max_iter, rtol=rtol, precision=precision,
                             patience=patience,
                             device=dev, progress=progress, desc=fs.name[-24:])
        else:
            fit = ridge_classify(Xtr, sp.y_train, Xv, sp.y_val, lam_grid, refit=True, standardize=standardize,
                                 metric=metric, device=dev, progress=progress, desc=fs.name[-24:])
        top1, mpc = accuracy_scores(sp.y_test, fit.predict(Xte))
        train_top1 = accuracy_scores(np.concatenate([sp.y_train, sp.y_val]),
                                     fit.predict(np.concatenate([Xtr, Xv])))[0]
        rows.append(ProbeRow(
            layer=fs.name, layers=fs.layers, reductions=fs.reductions, dim=fs.dim, top1=top1, mean_per_class=mpc,
            train_top1=train_top1, val_top1=float(fit.val_top1[fit.best_index]), lam=fit.lam,
            C=fit.C if method == "logreg" else None, alpha=fit.lam * fit.n_fit if method == "ridge" else None,
            converged=fit.final_converged, n_iter=fit.final_n_iter, val_curve=fit.curve(),
            seconds=fit.seconds, read_seconds=read_s,
            **({"path_converged": fit.path_converged, "objective": fit.final_objective, "grad_max": fit.final_grad,
                "grad_norm": fit.final_grad_norm, "gap_bound": fit.final_gap_bound} if method == "logreg" else {}),
        ))
        precision_used = fit.precision
        bar.update(1)
    bar.close()
    protocol = _protocol(prep, split=split, test_store=test_store, seed=seed, val_fraction=val_fraction,
                         features=features)
    protocol.update({
        "method": method,
        "lambdas": [float(v) for v in lam_grid],
        "objective": LOSS_CONVENTION if method == "logreg" else RIDGE_CONVENTION,
        "C_mapping": "C = 1/(lambda * n_fit), n_fit = n_train + n_val for the reported (refit) model; "
                     "val_curve C values use n_train" if method == "logreg" else "alpha = lambda * n_fit",
        "selection": f"largest validation {metric} over the grid, ties to the larger lambda; then refit on "
                     "train + val with that lambda",
        "standardize": standardize,
        "solver": ({"name": "torch.optim.LBFGS", "line_search": "strong_wolfe", "tol": tol, "rtol": rtol,
                    "tol_meaning": "converged = max_i |dL/dtheta_i| / D_i <= tol (D_i = 1 for lambda <~ 1: "
                                   "scikit-learn's test) and gap_bound <= rtol * objective, gap_bound = "
                                   "||grad_W L||^2/(2 lambda) + ||grad_b L||^2/(2 min(lambda, q_b)) (duality-gap "
                                   "bound on objective - min objective)",
                    "max_iter": max_iter, "max_iter_meaning": "L-BFGS iterations per strength",
                    "history_size": DEFAULT_HISTORY, "warm_start": "strong to weak", "precision": precision,
                    "precision_used": precision_used,
                    "patience": patience}
                   if method == "logreg" else {"name": "eigendecomposition (float64)"}),
    })
    return ProbeResult(method=method, features=features, rows=rows, protocol=protocol, store=_store_info(store),
                       device=str(dev), repsim_version=_repsim_version(), seconds=time.perf_counter() - t_start)
