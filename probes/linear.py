"""Linear transfer probes on frozen features: multinomial logistic regression (L-BFGS) and closed-form ridge.

Protocol (Kornblith, Shlens & Le 2019, "Do Better ImageNet Models Transfer Better?", Sec. 3 / App. A.3, and
the same recipe in SimCLR, Chen et al. 2020, App. B.8): an L2-regularised multinomial logistic regression on
frozen features, minimised with full-batch L-BFGS; the strength is chosen on a validation split held out from
the training data among 45 log-spaced values in [1e-6, 1e5]; the model is then refit on train + validation with
that strength and scored once on the test split.

Objective and conventions
-------------------------
For fitting samples ``x_i`` (d,), labels ``y_i`` ∈ {0..c-1}, weights ``W`` (d, c) and bias ``b`` (c,)::

    L(W, b) = (1/n) Σ_i CE(softmax(x_iᵀW + b), y_i) + (λ/2)·‖W‖²_F          (the bias is not penalised)

This is scikit-learn's ``LogisticRegression(C=...)`` objective ``C·Σ_i CE + ½‖W‖²`` divided by ``C·n``, so
``C = 1 / (λ · n)`` with ``n`` the number of samples of *that* fit (train for the path, train + val for the
refit; both are recorded). Ridge minimises ``(1/2n)‖XW + 1bᵀ − Y‖²_F + (λ/2)‖W‖²_F`` on one-hot targets ``Y``
(scikit-learn ``Ridge(alpha=λ·n)``) and predicts the arg-max column.

Standardisation (default on): features are z-scored with the mean and standard deviation of the fitting
samples (float64 statistics; constant features are centred only) before fitting, and the coefficients are
mapped back to raw feature units afterwards (``coef``, ``intercept`` apply to raw features). Rationale: layer
scales differ by orders of magnitude across depth (ViT residual streams grow, a few channels carry huge
outliers), so without it one λ grid would mean something different per layer and L-BFGS would be badly
conditioned. With ``standardize=False`` the objective is the one above on the raw features.

Numerics: features are held in float32 (``precision="float32"``) or float64; the two matrix products per
evaluation (``XW`` and ``Xᵀ(P − Y)``) run in that precision with TF32 off; the softmax, the loss, the gradient
sums, the parameters and the L-BFGS state are float64. ``precision="auto"`` uses float64 when a product is
small (n·d·c ≤ 2²⁸) and float32 otherwise. L-BFGS: ``torch.optim.LBFGS`` with a strong-Wolfe line search,
stopped when ``max|∇L| ≤ tol`` (scikit-learn's ``tol`` for lbfgs is the same test on the same objective) or
after ``max_iter`` iterations; ``converged`` reports the gradient test at the returned point.

Warm starts: the path runs from the strongest to the weakest regularisation, each fit starting from the
previous solution (the problem is strictly convex for λ > 0, so the solution does not depend on the start).
Selection: the largest validation top-1 (or mean per-class accuracy, ``metric=``); ties go to the *larger* λ.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from probes.features import (
    FeatureSet,
    ProbeSplit,
    StoreLike,
    load_feature_set,
    make_split,
    plan_feature_sets,
    resolve_device,
    tf32_off,
)
from repsim.errors import UsageError
from repsim.json_output import write_json_atomic

DEFAULT_LAMBDAS: np.ndarray = np.logspace(-6, 5, 45)
METHODS = ("logreg", "ridge")
METRICS = ("top1", "mean_per_class")
LOSS_CONVENTION = ("mean softmax cross-entropy over the n fitting samples + (lambda/2)*||W||_F^2, bias not "
                   "penalised; scikit-learn LogisticRegression C = 1/(lambda*n)")
RIDGE_CONVENTION = ("(1/(2n))*||XW + 1b^T - Y||_F^2 + (lambda/2)*||W||_F^2 on one-hot Y, bias not penalised, "
                    "arg-max prediction; scikit-learn Ridge alpha = lambda*n")
AUTO_FLOAT64_MAX = 1 << 28  # n·d·c at or below which precision="auto" computes in float64
DEFAULT_TOL = 1e-5
DEFAULT_MAX_ITER = 1000
DEFAULT_HISTORY = 20

__all__ = [
    "DEFAULT_LAMBDAS",
    "LinearFit",
    "ProbeResult",
    "ProbeRow",
    "accuracy_scores",
    "fit_logreg",
    "linear_probe",
    "ridge_classify",
]


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def accuracy_scores(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """``(top-1, mean per-class accuracy)`` as fractions in [0, 1]; the per-class mean runs over the classes
    present in ``y_true`` (each class's recall, then their unweighted mean)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise UsageError(f"labels {y_true.shape} and predictions {y_pred.shape} must be equal-length vectors")
    if y_true.size == 0:
        raise UsageError("no samples to score")
    hit = y_true == y_pred
    classes, inverse = np.unique(y_true, return_inverse=True)
    per_class = np.bincount(inverse, weights=hit, minlength=classes.size) / np.bincount(inverse, minlength=classes.size)
    return float(hit.mean()), float(per_class.mean())


# ----------------------------------------------------------------------------------------------------
# Fitted linear classifier
# ----------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LinearFit:
    """A linear classifier fitted at one strength, with the validation path that chose it.

    ``coef`` (d, c) and ``intercept`` (c,) act on *raw* features: ``scores = X @ coef + intercept``, column j
    is class ``classes[j]``. ``lambdas`` is the part of the grid that was fitted (strongest first for
    logreg, as given for ridge), with per-strength ``val_top1`` / ``val_mean_per_class`` (fractions; empty
    without a validation set), ``converged`` and ``n_iter`` (L-BFGS iterations; 0 for ridge). ``lam`` is
    the chosen strength, ``n_fit`` the samples of the final fit (train, or train + val with ``refit``),
    ``final_converged`` / ``final_n_iter`` / ``final_grad`` describe it.
    """

    method: str
    classes: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    lam: float
    n_fit: int
    n_train: int
    lambdas: np.ndarray
    val_top1: np.ndarray
    val_mean_per_class: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    best_index: int
    final_converged: bool
    final_n_iter: int
    final_grad: float
    standardize: bool
    precision: str
    device: str
    seconds: float
    seconds_per_lambda: list[float] = field(default_factory=list)

    @property
    def C(self) -> float:
        """scikit-learn's ``C`` of the final fit: ``1 / (λ · n_fit)`` (logreg) — for ridge ``alpha = λ·n_fit``."""
        return 1.0 / (self.lam * self.n_fit)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Class scores (n, c) float64 of raw features ``X`` (n, d)."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.coef.shape[0]:
            raise UsageError(f"features must have shape (n, {self.coef.shape[0]}), got {X.shape}")
        return X.astype(np.float64) @ self.coef + self.intercept

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted labels (n,) (values of ``classes``); ties go to the first class."""
        return self.classes[np.argmax(self.decision_function(X), axis=1)]

    def curve(self) -> list[dict[str, Any]]:
        """The validation curve as JSON-ready rows {lambda, C (for n_train), val_top1, val_mean_per_class,
        converged, n_iter}."""
        out = []
        for i, lam in enumerate(self.lambdas):
            out.append({
                "lambda": float(lam), "C": 1.0 / (float(lam) * self.n_train),
                "val_top1": float(self.val_top1[i]) if len(self.val_top1) else None,
                "val_mean_per_class": float(self.val_mean_per_class[i]) if len(self.val_mean_per_class) else None,
                "converged": bool(self.converged[i]), "n_iter": int(self.n_iter[i]),
            })
        return out


# ----------------------------------------------------------------------------------------------------
# Shared preparation
# ----------------------------------------------------------------------------------------------------


def _check_xy(X: Any, y: Any, name: str, d: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().float().numpy()
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2:
        raise UsageError(f"{name} features must have shape (n, d), got {X.shape}")
    if y.shape != (X.shape[0],):
        raise UsageError(f"{name} labels must have shape ({X.shape[0]},), got {y.shape}")
    if d is not None and X.shape[1] != d:
        raise UsageError(f"{name} features have {X.shape[1]} dimensions, the training features {d}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise UsageError(f"{name} labels must be integers, got {y.dtype}")
    if (y < 0).any():
        raise UsageError(f"{name} labels hold {int((y < 0).sum())} negative (unlabelled, -1) values")
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float32)
    if not np.isfinite(X).all():
        raise UsageError(f"{name} features hold non-finite values")
    return X, y.astype(np.int64)


def _lambdas(lambdas: Any) -> np.ndarray:
    lam = np.atleast_1d(np.asarray(DEFAULT_LAMBDAS if lambdas is None else lambdas, dtype=np.float64))
    if lam.ndim != 1 or lam.size == 0 or not np.all(np.isfinite(lam)) or not np.all(lam > 0):
        raise UsageError(f"regularisation strengths must be positive and finite, got {lambdas!r}")
    return lam


def _precision(precision: str, n: int, d: int, c: int) -> torch.dtype:
    if precision == "auto":
        return torch.float64 if n * d * c <= AUTO_FLOAT64_MAX else torch.float32
    if precision in ("float32", "float64"):
        return getattr(torch, precision)
    raise UsageError(f"precision must be auto, float32 or float64, got {precision!r}")


class _Scaler:
    """Per-feature mean and scale (float64, on device) of the fitting rows; ``scale`` 1 where constant."""

    def __init__(self, X: torch.Tensor, standardize: bool, block: int = 1 << 16):
        n, d = X.shape
        s = torch.zeros(d, dtype=torch.float64, device=X.device)
        for lo in range(0, n, block):
            s += X[lo:lo + block].sum(0, dtype=torch.float64)
        self.mean = s / n
        if standardize:
            ss = torch.zeros(d, dtype=torch.float64, device=X.device)
            for lo in range(0, n, block):
                r = X[lo:lo + block].double() - self.mean
                ss += (r * r).sum(0)
            sd = torch.sqrt(ss / n)
            tiny = sd <= 1e-12 * torch.clamp(self.mean.abs(), min=1.0)
            self.scale = torch.where(tiny, torch.ones_like(sd), sd)
        else:
            self.scale = torch.ones(d, dtype=torch.float64, device=X.device)

    def apply(self, X: torch.Tensor, dtype: torch.dtype, block: int = 1 << 16) -> torch.Tensor:
        out = torch.empty(X.shape, dtype=dtype, device=X.device)
        for lo in range(0, X.shape[0], block):
            out[lo:lo + block] = ((X[lo:lo + block].double() - self.mean) / self.scale).to(dtype)
        return out

    def to_raw(self, W: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Coefficients of standardised features → coefficients of raw features (float64 numpy)."""
        Wr = W.double() / self.scale[:, None]
        br = b.double() - (self.mean / self.scale) @ W.double()
        return Wr.cpu().numpy(), br.cpu().numpy()


def _encode(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Labels → column indices into ``classes``; -1 for labels the classifier never saw."""
    pos = np.searchsorted(classes, y)
    pos = np.clip(pos, 0, classes.size - 1)
    return np.where(classes[pos] == y, pos, -1)


def _scores(fit_score: float, metric: str) -> None:  # pragma: no cover - placeholder for typing clarity
    return None


def _pick(top1: np.ndarray, mpc: np.ndarray, lambdas: np.ndarray, metric: str) -> int:
    """Index of the best strength: largest metric, ties → the larger λ."""
    m = top1 if metric == "top1" else mpc
    best = np.flatnonzero(m == m.max())
    return int(best[np.argmax(lambdas[best])])


def _to_device(X: np.ndarray, dev: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(X))
    return t.to(dev) if dev.type != "cpu" else t


def _predict_idx(Xs: torch.Tensor, W: torch.Tensor, b: torch.Tensor, block: int) -> np.ndarray:
    out = []
    Wd = W.to(Xs.dtype)
    for lo in range(0, Xs.shape[0], block):
        z = (Xs[lo:lo + block] @ Wd).double() + b
        out.append(torch.argmax(z, dim=1))
    return torch.cat(out).cpu().numpy()


def _val_metrics(pred_idx: np.ndarray, yv_idx: np.ndarray, yv: np.ndarray) -> tuple[float, float]:
    hit = pred_idx == yv_idx  # unseen classes are -1 and never hit
    classes, inv = np.unique(yv, return_inverse=True)
    per = np.bincount(inv, weights=hit, minlength=classes.size) / np.bincount(inv, minlength=classes.size)
    return float(hit.mean()), float(per.mean())


# ----------------------------------------------------------------------------------------------------
# Multinomial logistic regression
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    """Temporarily run torch's CPU kernels on ``n`` threads (None: unchanged)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _SoftmaxProblem:
    """Mean cross-entropy + (λ/2)‖W‖² of standardised features on one device; parameters flat float64
    ``θ = [vec(W) (d·c), b (c)]``. Products in ``X.dtype``, everything else float64; rows in blocks so the
    (rows, c) float64 logits stay ≤ ~2²⁴ elements.

    CPU threads: the O(n·d·c) products and O(n·c) softmax run on ``threads`` threads (torch's setting by
    default), the O(d·c) L-BFGS vector bookkeeping on one: on a busy machine, splitting a 10⁵-element dot
    product over threads costs milliseconds of synchronisation, which dominated the solve.
    """

    def __init__(self, Xs: torch.Tensor, y_idx: torch.Tensor, c: int, threads: int | None = None):
        self.X, self.y, self.c = Xs, y_idx, c
        self.n, self.d = Xs.shape
        self.block = max(1, min(self.n, (1 << 24) // max(c, 1)))
        self.cpu = Xs.device.type == "cpu"
        self.threads = (threads or torch.get_num_threads()) if self.cpu else None
        self.evals = 0

    def loss_grad(self, theta: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(θ), ∇L(θ)), both float64. Products and softmax in ``X.dtype``; the sums over samples, the
        penalty and the gradient assembly in float64."""
        d, c, n, dt = self.d, self.c, self.n, self.X.dtype
        W = theta[: d * c].view(d, c)
        b = theta[d * c:]
        Wd, bd = W.to(dt), b.to(dt)
        gW = torch.zeros((d, c), dtype=dt, device=theta.device)
        gb = torch.zeros(c, dtype=torch.float64, device=theta.device)
        nll = torch.zeros((), dtype=torch.float64, device=theta.device)
        with _num_threads(self.threads):
            for lo in range(0, n, self.block):
                Xb, yb = self.X[lo:lo + self.block], self.y[lo:lo + self.block]
                logp = torch.addmm(bd, Xb, Wd).log_softmax(dim=1)
                nll -= logp.gather(1, yb[:, None]).sum(dtype=torch.float64)
                p = logp.exp_()  # softmax probabilities, in place
                p.scatter_add_(1, yb[:, None], self._minus_one(yb.shape[0], dt, p.device))
                gb += p.sum(0, dtype=torch.float64)
                gW.addmm_(Xb.T, p)
        grad = torch.empty_like(theta)
        torch.add(gW.to(torch.float64).reshape(-1).div_(n), theta[: d * c], alpha=lam, out=grad[: d * c])
        torch.div(gb, n, out=grad[d * c:])
        loss = nll / n + 0.5 * lam * torch.dot(theta[: d * c], theta[: d * c])
        self.evals += 1
        return loss, grad

    def _minus_one(self, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        m = getattr(self, "_m1", None)
        if m is None or m.shape[0] < rows:
            m = self._m1 = torch.full((rows, 1), -1.0, dtype=dtype, device=device)
        return m[:rows]

    def preconditioner(self, lam: float) -> torch.Tensor:
        """Diagonal scaling ``D`` (d·c + c,) ≈ √(Hessian diagonal) at W = 0, uniform softmax: ``λ + E[x_j²]·q``
        for the weights, ``q`` for the biases, ``q = (1/c)(1 − 1/c)``. Without it the weights (curvature ≥ λ, up
        to 1e5) and the unpenalised biases (curvature ~1/c) differ by ~10⁷ at strong regularisation and L-BFGS
        stalls with the biases unconverged."""
        if getattr(self, "_m2", None) is None:
            m2 = torch.zeros(self.d, dtype=torch.float64, device=self.X.device)
            for lo in range(0, self.n, self.block):
                xb = self.X[lo:lo + self.block].to(torch.float64)
                m2 += (xb * xb).sum(0)
            self._m2 = m2 / self.n
        q = (1.0 / self.c) * (1.0 - 1.0 / self.c)
        dw = torch.sqrt(lam + q * self._m2)[:, None].expand(self.d, self.c).reshape(-1)
        db = torch.full((self.c,), math.sqrt(q), dtype=torch.float64, device=self.X.device)
        return torch.cat([dw, db])

    def solve(self, lam: float, theta0: torch.Tensor, tol: float, max_iter: int, history: int
              ) -> tuple[torch.Tensor, bool, int, float]:
        """Minimise from ``theta0``; returns (θ, converged, iterations, max|∇L| at θ).

        L-BFGS runs on ``u = D ⊙ θ`` (:meth:`preconditioner`); its gradient test is ``max|∇_u L| ≤ tol / max D``,
        which implies ``max|∇_θ L| ≤ tol``, and the returned flag re-checks ``max|∇_θ L| ≤ tol`` itself.
        """
        D = self.preconditioner(lam)
        u = (theta0.detach() * D).clone()
        opt = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, max_eval=max(2 * max_iter, 25),
                                tolerance_grad=tol / float(D.max()), tolerance_change=1e-14,
                                history_size=history, line_search_fn="strong_wolfe")
        last: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            theta = u.detach() / D
            loss, grad = self.loss_grad(theta, lam)
            last["u"], last["grad"] = u.detach().clone(), grad
            u.grad = grad / D
            return loss

        with _num_threads(1 if self.cpu else None):
            opt.step(closure)
        n_iter = int(opt.state[u].get("n_iter", 0)) if u in opt.state else 0
        theta = u.detach() / D
        if "u" in last and torch.equal(last["u"], u.detach()):
            grad = last["grad"]  # the optimiser's last evaluation was at the returned point
        else:
            _, grad = self.loss_grad(theta, lam)
        gmax = float(grad.abs().max())
        return theta, bool(gmax <= tol), n_iter, gmax


def fit_logreg(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    lambdas: Sequence[float] | np.ndarray | None = None,
    *,
    refit: bool = False,
    standardize: bool = True,
    metric: str = "top1",
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    history_size: int = DEFAULT_HISTORY,
    warm_start: bool = True,
    patience: int | None = None,
    precision: str = "auto",
    device: str | torch.device = "auto",
    progress: bool = False,
    desc: str = "logreg",
) -> LinearFit:
    """L2-regularised multinomial logistic regression, strength chosen on a validation set (module docstring).

    ``X_train`` (n, d) and ``X_val`` (m, d) raw features (float32 / float64), ``y_*`` integer labels (any
    non-negative values; the classes are those of ``y_train``, plus ``y_val``'s with ``refit``). ``lambdas``:
    the strengths λ of the objective (default :data:`DEFAULT_LAMBDAS`, 45 log-spaced values in [1e-6, 1e5]);
    fitted strongest first, each from the previous solution when ``warm_start`` (else from zero). One λ needs
    no validation set. ``patience``: stop the path after that many strengths without a new best validation
    score (None: fit the whole grid, as the protocol does). ``refit``: refit on train + val at the chosen λ
    (warm-started) and return that model. ``tol`` / ``max_iter`` / ``history_size``: L-BFGS stopping test
    ``max|∇L| ≤ tol``, iteration cap per strength, and memory. Returns a :class:`LinearFit`.
    """
    t_start = time.perf_counter()
    X_train, y_train = _check_xy(X_train, y_train, "training")
    d = X_train.shape[1]
    lam_grid = _lambdas(lambdas)
    if metric not in METRICS:
        raise UsageError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    has_val = X_val is not None
    if has_val:
        X_val, y_val = _check_xy(X_val, y_val, "validation", d)
        if X_val.shape[0] == 0:
            has_val = False
    if not has_val and lam_grid.size > 1:
        raise UsageError(f"choosing among {lam_grid.size} strengths needs a validation set (X_val, y_val)")
    if refit and not has_val:
        raise UsageError("refit=True needs a validation set to refit on")
    if tol <= 0 or max_iter < 1 or history_size < 1:
        raise UsageError(f"need tol > 0, max_iter >= 1, history_size >= 1 (got {tol}, {max_iter}, {history_size})")
    classes = np.unique(y_train)
    if classes.size < 2:
        raise UsageError(f"the training labels hold {classes.size} class; a classifier needs at least 2")
    c = classes.size
    dev = resolve_device(device)
    dt = _precision(precision, X_train.shape[0], d, c)
    order = np.argsort(-lam_grid, kind="stable")  # strongest first
    path = lam_grid[order]

    from tqdm.auto import tqdm

    with tf32_off(), torch.no_grad():
        Xt = _to_device(X_train, dev)
        scaler = _Scaler(Xt, standardize)
        Xs = scaler.apply(Xt, dt)
        del Xt
        y_idx = torch.from_numpy(_encode(y_train, classes)).to(dev)
        prob = _SoftmaxProblem(Xs, y_idx, c)
        if has_val:
            Xv = scaler.apply(_to_device(X_val, dev), dt)
            yv_idx = _encode(y_val, classes)
        theta = torch.zeros(d * c + c, dtype=torch.float64, device=dev)
        thetas, top1, mpc, conv, iters, secs = [], [], [], [], [], []
        best_so_far, since_best = -1.0, 0
        bar = tqdm(path, desc=desc, unit="λ", disable=not progress, leave=False, dynamic_ncols=True)
        for lam in bar:
            t0 = time.perf_counter()
            start = theta if warm_start else torch.zeros_like(theta)
            theta, ok, it, _ = prob.solve(float(lam), start, tol, max_iter, history_size)
            secs.append(time.perf_counter() - t0)
            thetas.append(theta)
            conv.append(ok)
            iters.append(it)
            if has_val:
                W, b = theta[: d * c].view(d, c), theta[d * c:]
                a, m = _val_metrics(_predict_idx(Xv, W, b, prob.block), yv_idx, y_val)
                top1.append(a)
                mpc.append(m)
                score = a if metric == "top1" else m
                bar.set_postfix(val=f"{100 * score:.1f}%", it=it)
                if score > best_so_far:
                    best_so_far, since_best = score, 0
                else:
                    since_best += 1
                    if patience is not None and since_best >= patience:
                        break
        bar.close()
        fitted = path[: len(thetas)]
        top1_a, mpc_a = np.asarray(top1), np.asarray(mpc)
        best = _pick(top1_a, mpc_a, fitted, metric) if has_val else 0
        lam_best = float(fitted[best])
        theta_best = thetas[best]
        n_fit = X_train.shape[0]
        if refit:
            X_all = np.concatenate([X_train, X_val.astype(X_train.dtype, copy=False)])
            y_all = np.concatenate([y_train, y_val])
            classes_all = np.unique(y_all)
            theta0 = _expand_theta(theta_best, classes, classes_all, d)
            classes, c = classes_all, classes_all.size
            Xa = _to_device(X_all, dev)
            scaler = _Scaler(Xa, standardize)
            Xs = scaler.apply(Xa, dt)
            del Xa
            prob = _SoftmaxProblem(Xs, torch.from_numpy(_encode(y_all, classes)).to(dev), c)
            theta_best, ok, it, gmax = prob.solve(lam_best, theta0, tol, max_iter, history_size)
            n_fit = X_all.shape[0]
        else:
            _, ok, it, gmax = conv[best], conv[best], iters[best], float(prob.loss_grad(theta_best, lam_best)[1].abs().max())
        coef, intercept = scaler.to_raw(theta_best[: d * c].view(d, c), theta_best[d * c:])
    if not ok:
        warnings.warn(f"{desc}: L-BFGS stopped after {it} iterations with max|grad| = {gmax:.2e} > tol = {tol:g} "
                      f"at lambda = {lam_best:.3g}; raise max_iter or tol", stacklevel=2)
    return LinearFit(
        method="logreg", classes=classes, coef=coef, intercept=intercept, lam=lam_best, n_fit=int(n_fit),
        n_train=int(X_train.shape[0]), lambdas=fitted, val_top1=top1_a, val_mean_per_class=mpc_a,
        converged=np.asarray(conv, dtype=bool), n_iter=np.asarray(iters, dtype=np.int64), best_index=best,
        final_converged=bool(ok), final_n_iter=int(it), final_grad=float(gmax), standardize=standardize,
        precision=str(dt).replace("torch.", ""), device=str(dev), seconds=time.perf_counter() - t_start,
        seconds_per_lambda=secs,
    )


def _expand_theta(theta: torch.Tensor, classes: np.ndarray, classes_all: np.ndarray, d: int) -> torch.Tensor:
    """Re-index a flat [vec(W), b] from ``classes`` to ``classes_all`` (new classes start at 0)."""
    c = classes.size
    if classes_all.size == c:
        return theta
    W, b = theta[: d * c].view(d, c), theta[d * c:]
    pos = torch.from_numpy(np.searchsorted(classes_all, classes)).to(theta.device)
    W2 = torch.zeros((d, classes_all.size), dtype=theta.dtype, device=theta.device)
    b2 = torch.zeros(classes_all.size, dtype=theta.dtype, device=theta.device)
    W2[:, pos] = W
    b2[pos] = b
    return torch.cat([W2.reshape(-1), b2])
