"""The linear solvers of the transfer probes, on arrays: multinomial logistic regression (L-BFGS) and closed-form
ridge (the store-level probe is :func:`probes.linear.linear_probe`).

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

Numerics: the standardised features are held in float32 or float64 (``precision``; ``"auto"`` takes float64
when n·d·c ≤ 2²⁸, i.e. whenever it is cheap, float32 otherwise). The two products per evaluation (``XW`` and
``Xᵀ(P − Y)``) and the softmax run in that precision with TF32 off; the sums over samples, the penalty, the
parameters and the L-BFGS state are float64. The mean/std statistics are float64.

Solver: ``torch.optim.LBFGS`` (strong-Wolfe line search, history ``history_size``), full batch, on diagonally
rescaled parameters ``u = D ⊙ θ`` with ``D = max(1, √(λ + q·E[x_j²]))`` for the weights of feature j, 1 for the
biases, ``q = (1/c)(1 − 1/c)``: the square root of the Hessian diagonal at W = 0, so strongly regularised
weights (curvature up to 1e5) and the unpenalised biases (curvature ~1/c) are equally conditioned.

Stopping test (``converged``), checked on the full objective at the returned point, both of:
(1) ``max_i |∂L/∂θ_i| / D_i ≤ tol``; since D = 1 for biases and for all weights whenever λ + q·E[x²] ≤ 1
(λ ≲ 1 on standardised features), this is scikit-learn's lbfgs test ``max|∇L| ≤ tol`` there, and the
gradient in the preconditioned metric for stronger regularisation, where an absolute test would ask for
changes of L below float64 resolution; (2) ``gap_bound ≤ rtol · L``, with ``gap_bound = ‖∇_W L‖²/(2λ) +
‖∇_b L‖²/(2·min(λ, q_b))``: the first term is the Fenchel duality gap at the dual point given by the softmax
probabilities (exact whenever ∂L/∂b = 0), the second charges the unpenalised biases at curvature
min(λ, min_k π_k(1 − π_k)) (class frequencies π) — see ``_Check``. Test (1) alone is scale-blind at the
weak end of the grid: at λ = 1e-6 the objective is ~1e-4 nats and curves as little as λ, so a gradient of
1e-5 left L 5-36% above its minimum (relative to scikit-learn at tol 1e-12) while the fit said
``converged`` (issue 12, item 8). With (2) the relative gap to scikit-learn's optimum is ~1e-6. When L-BFGS
stops with the test unmet (torch's own gradient test, a loss change below 1e-14) it continues from the same
state with a tighter gradient target until the test holds, ``max_iter`` iterations are spent, or a call no
longer lowers L. Defaults: ``tol = 1e-5`` (scikit-learn's default is 1e-4), ``rtol = 1e-5``, ``max_iter =
1000`` L-BFGS iterations per strength, ``history_size = 20``. Every strength records the objective, max and
2-norm of the gradient, the gap bound and the iterations used (``LinearFit``, the JSON's ``val_curve``); a
fit that fails the test (iteration cap, or no further decrease representable in the working precision —
float32 gradients are too noisy to certify the weak end) is flagged ``converged=False`` and, when it is the
selected strength's (path or refit), warned about and named in ``ProbeResult.summary()`` (the CLI output).

Warm starts: the path runs from the strongest to the weakest regularisation, each fit starting from the
previous solution and its L-BFGS curvature memory, moved to the new strength exactly (only the penalty depends
on λ, so a pair (s, y) becomes (s, y + Δλ·s) on the weights). The problem is strictly convex for λ > 0, so the
solution does not depend on the start; a warm-started fit typically needs a handful of evaluations. The refit
on train + val starts from the chosen path solution and memory (an approximation there: the data grew).
CPU threads: the O(n·d·c) products use torch's thread count (one thread for small problems); the O(d·c) L-BFGS
vector updates run on one thread, since on a shared machine splitting a 10⁵-element dot product over threads
costs milliseconds of synchronisation per call.
Selection: the largest validation top-1 (or mean per-class accuracy, ``metric=``); ties go to the *larger* λ.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from repsim.devices import resolve_device, tf32_off
from repsim.errors import UsageError

DEFAULT_LAMBDAS: np.ndarray = np.logspace(-6, 5, 45)
METHODS = ("logreg", "ridge")
METRICS = ("top1", "mean_per_class")
LOSS_CONVENTION = ("mean softmax cross-entropy over the n fitting samples + (lambda/2)*||W||_F^2, bias not "
                   "penalised; scikit-learn LogisticRegression C = 1/(lambda*n)")
RIDGE_CONVENTION = ("(1/(2n))*||XW + 1b^T - Y||_F^2 + (lambda/2)*||W||_F^2 on one-hot Y, bias not penalised, "
                    "arg-max prediction; scikit-learn Ridge alpha = lambda*n")
AUTO_FLOAT64_MAX = 1 << 28  # n·d·c at or below which precision="auto" computes in float64
DEFAULT_TOL = 1e-5
DEFAULT_RTOL = 1e-5
DEFAULT_MAX_ITER = 1000
DEFAULT_HISTORY = 20

__all__ = ["DEFAULT_LAMBDAS", "LinearFit", "accuracy_scores", "check_lambdas", "fit_logreg", "ridge_classify"]


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
    without a validation set), ``converged`` and ``n_iter`` (L-BFGS iterations over all solver calls at that
    strength; 0 for ridge) and, for logreg, the stopping test's numbers at each returned point (see
    ``probes.linear._Check``): ``objective`` L (mean cross-entropy + (λ/2)‖W‖², nats, standardised
    features), ``grad_max`` (preconditioned max|∂L/∂θ|), ``grad_norm`` (‖∇L‖₂), ``gap_bound`` (a bound on L
    minus its minimum, nats). ``lam`` is the chosen strength, ``n_fit`` the samples of the final fit (train,
    or train + val with ``refit``), ``final_converged`` / ``final_n_iter`` / ``final_grad`` (= grad_max) /
    ``final_objective`` / ``final_grad_norm`` / ``final_gap_bound`` describe it; ``tol`` / ``rtol`` /
    ``max_iter`` are the stopping test and cap used (None for ridge).
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
    objective: np.ndarray | None = None
    grad_max: np.ndarray | None = None
    grad_norm: np.ndarray | None = None
    gap_bound: np.ndarray | None = None
    final_objective: float | None = None
    final_grad_norm: float | None = None
    final_gap_bound: float | None = None
    rtol: float | None = None
    tol: float | None = None
    max_iter: int | None = None

    @property
    def path_converged(self) -> bool:
        """Whether the validation-path fit at the selected strength passed its stopping test (the one whose
        validation score chose λ; the final model is ``final_converged``)."""
        return bool(self.converged[self.best_index])

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
        converged, n_iter, and for logreg objective, grad_max, grad_norm, gap_bound}."""
        out = []
        for i, lam in enumerate(self.lambdas):
            row = {
                "lambda": float(lam), "C": 1.0 / (float(lam) * self.n_train),
                "val_top1": float(self.val_top1[i]) if len(self.val_top1) else None,
                "val_mean_per_class": float(self.val_mean_per_class[i]) if len(self.val_mean_per_class) else None,
                "converged": bool(self.converged[i]), "n_iter": int(self.n_iter[i]),
            }
            for key in ("objective", "grad_max", "grad_norm", "gap_bound"):
                arr = getattr(self, key)
                if arr is not None and i < len(arr):
                    row[key] = float(arr[i])
            out.append(row)
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


def _check_fit_args(X_train: Any, y_train: Any, X_val: Any, y_val: Any, lambdas: Any, metric: str, refit: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray, bool,
                               np.ndarray]:
    """The argument checks :func:`fit_logreg` and :func:`ridge_classify` share: checked (X_train, y_train,
    X_val, y_val), the λ grid, whether there is a (non-empty) validation set, and the training classes."""
    X_train, y_train = _check_xy(X_train, y_train, "training")
    lam_grid = check_lambdas(lambdas)
    if metric not in METRICS:
        raise UsageError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    has_val = X_val is not None
    if has_val:
        X_val, y_val = _check_xy(X_val, y_val, "validation", X_train.shape[1])
        has_val = X_val.shape[0] > 0
    if not has_val and lam_grid.size > 1:
        raise UsageError(f"choosing among {lam_grid.size} strengths needs a validation set (X_val, y_val)")
    if refit and not has_val:
        raise UsageError("refit=True needs a validation set to refit on")
    classes = np.unique(y_train)
    if classes.size < 2:
        raise UsageError(f"the training labels hold {classes.size} class; a classifier needs at least 2")
    return X_train, y_train, X_val, y_val, lam_grid, has_val, classes


def check_lambdas(lambdas: Any) -> np.ndarray:
    """The regularisation strengths (k,) float64 as given (None: :data:`DEFAULT_LAMBDAS`); UsageError unless
    every one is positive and finite."""
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


def _standardising_scale(sd: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per-feature scale (d,) float64 for z-scoring: ``sd``, or 1 (centre only) where the feature is constant up
    to rounding, ``sd ≤ 1e-12·max(|mean|, 1)``. Relative to the mean because float64 values near ``mean`` are
    ~2e-16·|mean| apart, so rounding alone leaves a spread of that order: an absolute threshold would blow a
    constant feature at |mean| = 1e6 (spread ~1e-10) up to unit-variance noise."""
    return torch.where(sd <= 1e-12 * torch.clamp(mean.abs(), min=1.0), torch.ones_like(sd), sd)


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
            self.scale = _standardising_scale(torch.sqrt(ss / n), self.mean)
        else:
            self.scale = torch.ones(d, dtype=torch.float64, device=X.device)

    @classmethod
    def from_stats(cls, mean: torch.Tensor, scale: torch.Tensor) -> "_Scaler":
        obj = cls.__new__(cls)
        obj.mean, obj.scale = mean, scale
        return obj

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


def _pick(top1: np.ndarray, mpc: np.ndarray, lambdas: np.ndarray, metric: str) -> int:
    """Index of the best strength: largest metric, ties → the larger λ."""
    m = np.asarray(top1 if metric == "top1" else mpc)
    best = np.flatnonzero(m == m.max())
    return int(best[np.argmax(np.asarray(lambdas)[best])])


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


SMALL_WORK = 1 << 22  # n·d·c below which every CPU kernel runs on one thread (parallel regions cost more)


def _heavy_threads(n: int, d: int, c: int) -> int:
    """Threads for the O(n·d·c) kernels: torch's setting, or 1 for small problems."""
    return 1 if n * d * c < SMALL_WORK else torch.get_num_threads()


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
        self.threads = (threads or _heavy_threads(self.n, self.d, c)) if self.cpu else None
        self.evals = 0  # passes over the data
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def loss_grad(self, theta: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(θ), ∇L(θ)), both float64. The two products in ``X.dtype``; logits + bias, log-softmax, the sums
        over samples, the penalty and the gradient assembly in float64 (a float32 softmax leaves ~1e-9 noise in
        L, enough to stall the line search on the biases at strong regularisation). The data part at the last
        θ is cached: a new λ at the same θ (warm start) costs no pass over the data."""
        d, c, n, dt = self.d, self.c, self.n, self.X.dtype
        W = theta[: d * c].view(d, c)
        b = theta[d * c:]
        cached = self._cache
        if cached is not None and torch.equal(cached[0], theta):
            nll_n, gdata = cached[1], cached[2]
        else:
            Wd = W.to(dt)
            gW = torch.zeros((d, c), dtype=dt, device=theta.device)
            gb = torch.zeros(c, dtype=torch.float64, device=theta.device)
            nll = torch.zeros((), dtype=torch.float64, device=theta.device)
            with _num_threads(self.threads):
                for lo in range(0, n, self.block):
                    Xb, yb = self.X[lo:lo + self.block], self.y[lo:lo + self.block]
                    logp = torch.mm(Xb, Wd).to(torch.float64).add_(b).log_softmax(dim=1)
                    nll -= logp.gather(1, yb[:, None]).sum()
                    p = logp.exp_()  # softmax probabilities, in place
                    p.scatter_add_(1, yb[:, None], self._minus_one(yb.shape[0], p.device))
                    gb += p.sum(0)
                    gW.addmm_(Xb.T, p.to(dt))
            nll_n = nll / n
            gdata = torch.cat([gW.to(torch.float64).reshape(-1), gb]).div_(n)
            self._cache = (theta.clone(), nll_n, gdata)
            self.evals += 1
        grad = gdata.clone()
        grad[: d * c].add_(theta[: d * c], alpha=lam)
        loss = nll_n + 0.5 * lam * torch.dot(theta[: d * c], theta[: d * c])
        return loss, grad

    def _minus_one(self, rows: int, device: torch.device) -> torch.Tensor:
        m = getattr(self, "_m1", None)
        if m is None or m.shape[0] < rows:
            m = self._m1 = torch.full((rows, 1), -1.0, dtype=torch.float64, device=device)
        return m[:rows]

    def preconditioner(self, lam: float) -> torch.Tensor:
        """Diagonal scaling ``D`` (d·c + c,): ``max(1, √(λ + q·E[x_j²]))`` for the weights of feature j and 1 for
        the biases, ``q = (1/c)(1 − 1/c)`` — the square root of the Hessian diagonal at W = 0 (uniform softmax),
        floored at 1 so that only strongly curved coordinates are rescaled. Without it the weights (curvature
        ≥ λ, up to 1e5) and the unpenalised biases (curvature ~1/c) differ by up to ~10⁷ and L-BFGS stalls."""
        if getattr(self, "_m2", None) is None:
            m2 = torch.zeros(self.d, dtype=torch.float64, device=self.X.device)
            for lo in range(0, self.n, self.block):
                xb = self.X[lo:lo + self.block].to(torch.float64)
                m2 += (xb * xb).sum(0)
            self._m2 = m2 / self.n
        q = (1.0 / self.c) * (1.0 - 1.0 / self.c)
        dw = torch.clamp(torch.sqrt(lam + q * self._m2), min=1.0)[:, None].expand(self.d, self.c).reshape(-1)
        return torch.cat([dw, torch.ones(self.c, dtype=torch.float64, device=self.X.device)])

    def certify(self, theta: torch.Tensor, lam: float, D: torch.Tensor, tol: float,
                rtol: float) -> "_Check":
        """The stopping test at ``θ`` (one pass over the data unless cached): see :class:`_Check`."""
        loss, grad = self.loss_grad(theta, lam)
        return _Check.of(float(loss), grad, D, lam, self.bias_curvature(), self.d * self.c, tol, rtol)

    def bias_curvature(self) -> float:
        """``min_k π_k(1 − π_k)`` of the fitting labels' class frequencies π: a lower estimate of the biases'
        curvature (the smallest non-zero eigenvalue of diag(π) − ππᵀ, the bias Hessian at W = 0, is ≥ it)."""
        q = getattr(self, "_qb", None)
        if q is None:
            pi = torch.bincount(self.y, minlength=self.c).double() / self.n
            q = self._qb = float((pi * (1.0 - pi)).min())
        return q

    def solve(self, lam: float, theta0: torch.Tensor, tol: float, max_iter: int, history: int,
              memory: "_Memory | None" = None, rtol: float = 0.0
              ) -> tuple[torch.Tensor, "_Check", int, "_Memory | None"]:
        """Minimise from ``θ0``; returns (θ, the stopping test at θ (:class:`_Check`), iterations, memory).

        L-BFGS runs on ``u = D ⊙ θ`` (:meth:`preconditioner`). Stopping test (``_Check.converged``), both of:

        1. ``max_i |∂L/∂θ_i| / D_i ≤ tol``: scikit-learn's test ``max|∇L| ≤ tol`` wherever ``D_i = 1`` (all
           biases; all weights when λ + q·E[x²] ≤ 1, i.e. λ ≲ 1 on standardised features), the gradient in the
           preconditioned metric for strongly regularised weights (an absolute test there asks for changes of L
           below float64 resolution: at λ = 1e5 a step that halves a 2e-5 gradient lowers L by ~1e-15);
        2. ``gap_bound ≤ rtol · L(θ)`` (when ``rtol > 0``): a bound on ``L(θ) − min L`` (:class:`_Check`). Test 1
           alone is not enough at the weak end of the grid: at λ = 1e-6 the objective is so flat (curvature
           down to λ) that ``max|∇L| = 1e-5`` leaves L 5-36% above its minimum (issue 12, item 8).

        Torch's LBFGS stops on its own max-abs gradient test (``tolerance_grad``), the iteration cap, or a
        stall (loss change or step below ``tolerance_change``); whenever it stops with the test above unmet and
        iterations left, it is called again on the same state (same curvature memory) with a gradient target
        tightened by the factor the bound asks for; a call that does not lower L ends the solve (a stall: no
        further decrease representable in this precision), reported as not converged. ``max_iter`` counts
        L-BFGS iterations over all calls.

        ``memory``: the curvature pairs of the previous strength's solve (warm starts along the path). The data
        term does not depend on λ, so a pair (s, y) of strength λ' is exactly a pair of strength λ after
        ``y += (λ − λ')·s`` on the weight coordinates; the solver starts with that memory instead of a
        steepest-descent step of length 1/‖g‖₁ (the first step of a fresh L-BFGS), saving most of the
        iterations a warm start would otherwise spend rebuilding curvature.
        """
        D = self.preconditioner(lam)
        theta0 = theta0.detach()
        u = (theta0 * D).clone()
        u0 = u.clone()
        opt = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, max_eval=max(2 * max_iter, 25),
                                tolerance_grad=tol, tolerance_change=1e-14, history_size=history,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            theta = theta0 if torch.equal(u, u0) else u.detach() / D  # the start exactly: a cache hit
            loss, grad = self.loss_grad(theta, lam)
            u.grad = grad / D
            return loss

        def point() -> torch.Tensor:
            return theta0 if torch.equal(u, u0) else u.detach() / D

        if memory is not None and memory.pairs:
            memory.install(opt, u, lam, D, self.d * self.c)
        state = opt.state[u]
        check = self.certify(point(), lam, D, tol, rtol)
        n_iter = 0
        while not check.converged and n_iter < max_iter:
            group = opt.param_groups[0]
            group["tolerance_grad"] = check.next_target(tol)
            group["max_iter"] = max_iter - n_iter
            group["max_eval"] = max(2 * (max_iter - n_iter), 25)
            before = state.get("n_iter", 0)
            with _num_threads(1 if self.cpu else None):
                opt.step(closure)
            n_iter += int(state.get("n_iter", 0)) - before
            new = self.certify(point(), lam, D, tol, rtol)  # cached: the optimiser's last evaluation was here
            stalled = not new.loss < check.loss
            check = new
            if stalled:
                break
        return point(), check, n_iter, _Memory.harvest(state, lam, D)


@dataclass(frozen=True)
class _Check:
    """The stopping test of one fit at its returned point θ (all float64; L the objective of the module
    docstring on the standardised features when ``standardize``).

    ``loss`` L(θ); ``grad_max`` max_i |∂L/∂θ_i| / D_i (the preconditioned max-abs gradient, = max|∇L| for
    λ ≲ 1); ``grad_norm`` ‖∇L(θ)‖₂ (weights and biases, plain coordinates); ``gap_bound`` a bound on
    ``L(θ) − min L``::

        gap_bound = ‖∇_W L‖² / (2λ) + ‖∇_b L‖² / (2·min(λ, q_b))

    The first term is the Fenchel duality gap of the problem at the dual point α_i = softmax(x_iᵀW + b) (the
    standard certificate for L2-regularised logistic regression): for the loss ℓ_i(z) = logsumexp(z) − z_{y_i}
    with conjugate ℓ_i*(v) = Σ_k q_k log q_k (q = v + e_{y_i} in the simplex), the dual of
    min (1/n)Σ ℓ_i(Wᵀx_i + b) + (λ/2)‖W‖² is max over Σ_i v_i = 0 of −(1/n)Σ ℓ_i*(v_i) − ‖(1/n)Σ x_i v_iᵀ‖²/(2λ);
    at v_i = p_i − e_{y_i}, Fenchel–Young equality gives P − D = ‖λW + (1/n)Σ x_i v_iᵀ‖²/(2λ) = ‖∇_W L‖²/(2λ)
    exactly, and that point is dual-feasible exactly when ∂L/∂b = (1/n)Σ v_i = 0. The second term charges
    the remaining (unpenalised) bias gradient at curvature min(λ, q_b), ``q_b = min_k π_k(1 − π_k)`` (class
    frequencies π; the bias Hessian at W = 0 is diag(π) − ππᵀ, whose non-zero eigenvalues are ≥ q_b): an
    estimate, not a bound, since the biases' curvature falls where the classes are fitted perfectly.
    ``target`` = rtol · L(θ); ``converged`` = ``grad_max ≤ tol`` and (``rtol`` = 0 or ``gap_bound ≤ target``).
    """

    loss: float
    grad_max: float
    grad_norm: float
    gap_bound: float
    target: float
    converged: bool

    @classmethod
    def of(cls, loss: float, grad: torch.Tensor, D: torch.Tensor, lam: float, q_b: float, n_w: int, tol: float,
           rtol: float) -> "_Check":
        gw2 = float(torch.dot(grad[:n_w], grad[:n_w]))
        gb2 = float(torch.dot(grad[n_w:], grad[n_w:]))
        gmax = float((grad / D).abs().max())
        gap = gw2 / (2.0 * lam) + gb2 / (2.0 * min(lam, q_b))
        target = rtol * loss
        ok = gmax <= tol and (rtol <= 0 or gap <= target)
        return cls(loss, gmax, float(np.sqrt(gw2 + gb2)), gap, target, bool(ok))

    def next_target(self, tol: float) -> float:
        """torch's ``tolerance_grad`` (max-abs, in the preconditioned coordinates) for the next call: ``tol``,
        or, when only the bound is unmet, the present max-abs gradient shrunk by the factor √(target/gap) the
        bound asks for (at most 1/2, at least 1e-3 per call)."""
        if self.grad_max > tol or self.target <= 0 or self.gap_bound <= self.target:
            return tol
        shrink = min(0.5, max(1e-3, 0.9 * float(np.sqrt(self.target / self.gap_bound))))
        return min(tol, self.grad_max * shrink)


class _Memory:
    """L-BFGS curvature pairs in θ coordinates, tagged with the strength they were measured at."""

    KEYS = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "n_iter")

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], lam: float):
        self.pairs, self.lam = pairs, lam

    @classmethod
    def harvest(cls, state: dict[str, Any], lam: float, D: torch.Tensor) -> "_Memory | None":
        """From torch's LBFGS state (u = D ⊙ θ: s_θ = s_u / D, y_θ = y_u · D); None if the state is not the
        layout this code knows (then warm starts simply begin with fresh curvature)."""
        if not all(k in state for k in ("old_dirs", "old_stps")):
            return None
        pairs = [(s_u / D, y_u * D) for s_u, y_u in zip(state["old_stps"], state["old_dirs"])]
        return cls(pairs, lam)

    def install(self, opt: torch.optim.LBFGS, u: torch.Tensor, lam: float, D: torch.Tensor, n_w: int) -> int:
        """Seed a fresh optimiser's state with the pairs moved to strength ``lam`` and scaling ``D``; returns
        the iteration count it starts from (its first iteration then takes the L-BFGS direction, step 1)."""
        dirs, stps, ro = [], [], []
        for s_t, y_t in self.pairs:
            y_t = y_t.clone()
            y_t[:n_w].add_(s_t[:n_w], alpha=lam - self.lam)
            s_u, y_u = s_t * D, y_t / D
            ys = float(y_u.dot(s_u))
            if ys > 1e-10:
                dirs.append(y_u)
                stps.append(s_u)
                ro.append(1.0 / ys)
        if not dirs:
            return 0
        state = opt.state[u]
        state.update({
            "func_evals": 0, "n_iter": 1, "d": torch.zeros_like(u), "t": 0.0, "old_dirs": dirs,
            "old_stps": stps, "ro": ro, "H_diag": float(dirs[-1].dot(stps[-1]) / dirs[-1].dot(dirs[-1])),
            "prev_flat_grad": torch.zeros_like(u), "prev_loss": None,
        })
        return 1


@dataclass(frozen=True)
class _Lbfgs:
    """The per-strength solver settings of :func:`fit_logreg`: the stopping test (``tol``, ``rtol``; see
    :class:`_Check`), the iteration cap per strength and the L-BFGS memory; refuses values it cannot run with."""

    tol: float
    rtol: float
    max_iter: int
    history: int

    def __post_init__(self) -> None:
        if self.tol <= 0 or self.max_iter < 1 or self.history < 1 or not self.rtol >= 0:
            raise UsageError(f"need tol > 0, max_iter >= 1, history_size >= 1, rtol >= 0 (got {self.tol}, "
                             f"{self.max_iter}, {self.history}, {self.rtol})")

    def solve(self, prob: _SoftmaxProblem, lam: float, theta0: torch.Tensor, memory: _Memory | None
              ) -> tuple[torch.Tensor, _Check, int, _Memory | None]:
        """:meth:`_SoftmaxProblem.solve` at strength ``lam`` from ``theta0`` (d·c + c,) with these settings."""
        return prob.solve(float(lam), theta0, self.tol, self.max_iter, self.history, memory, self.rtol)


def _softmax_problem(X: np.ndarray, y: np.ndarray, classes: np.ndarray, standardize: bool, dtype: torch.dtype,
                     dev: torch.device) -> tuple[_Scaler, _SoftmaxProblem]:
    """The standardisation of the fitting rows ``X`` (n, d) (:class:`_Scaler`) and the softmax problem on them:
    features z-scored into ``dtype`` on ``dev``, labels ``y`` (n,) as column indices into ``classes`` (c,). The
    raw features' device copy is freed before the problem is built."""
    Xd = _to_device(X, dev)
    scaler = _Scaler(Xd, standardize)
    Xs = scaler.apply(Xd, dtype)
    del Xd
    return scaler, _SoftmaxProblem(Xs, torch.from_numpy(_encode(y, classes)).to(dev), classes.size)


@dataclass
class _Path:
    """The fitted part of a λ path, strongest first (``patience`` may stop it early), one entry per strength:
    ``lambdas``, the stopping test at the returned point (``checks``), L-BFGS iterations, seconds and, with a
    validation set, top-1 and mean per-class accuracy (fractions; empty without). ``best`` indexes the chosen
    strength, ``theta`` (d·c + c,) float64 is its solution (standardised features) and ``memory`` its L-BFGS
    curvature pairs (the refit's warm start)."""

    lambdas: np.ndarray
    checks: list[_Check]
    iters: list[int]
    seconds: list[float]
    top1: list[float]
    mpc: list[float]
    best: int
    theta: torch.Tensor
    memory: _Memory | None


def _fit_path(prob: _SoftmaxProblem, lambdas: np.ndarray, val: tuple[torch.Tensor, np.ndarray, np.ndarray] | None,
              *, metric: str, warm_start: bool, patience: int | None, solver: _Lbfgs, progress: bool,
              desc: str) -> _Path:
    """Fit the strengths ``lambdas`` (strongest first) in turn, each from the previous solution and curvature
    memory when ``warm_start`` (else from zero), and choose one.

    ``val`` = (standardised validation features (m, d) in the problem's dtype and device, their column indices
    into the classes (m,) (-1 for classes the problem never saw), their labels (m,)), or None with a single λ.
    The choice is the highest validation ``metric`` (top1 | mean_per_class); ties keep the earlier, stronger λ.
    ``patience``: stop once that many strengths have scored below the best so far (equal scores do not count).
    """
    from tqdm.auto import tqdm

    d, c = prob.d, prob.c
    theta = torch.zeros(d * c + c, dtype=torch.float64, device=prob.X.device)
    memory = None
    top1, mpc, iters, secs, checks = [], [], [], [], []
    best, best_score, theta_best, since_best, memory_best = 0, -1.0, theta, 0, None
    bar = tqdm(lambdas, desc=desc, unit="λ", disable=not progress, leave=False, dynamic_ncols=True)
    for i, lam in enumerate(bar):
        t0 = time.perf_counter()
        if not warm_start:
            theta, memory = torch.zeros_like(theta), None
        theta, chk, it, memory = solver.solve(prob, lam, theta, memory)
        secs.append(time.perf_counter() - t0)
        checks.append(chk)
        iters.append(it)
        if val is None:
            theta_best = theta
            continue
        Xv, yv_idx, y_val = val
        a, m = _val_metrics(_predict_idx(Xv, theta[: d * c].view(d, c), theta[d * c:], prob.block), yv_idx, y_val)
        top1.append(a)
        mpc.append(m)
        score = a if metric == "top1" else m
        bar.set_postfix(val=f"{100 * score:.1f}%", it=it)
        if score > best_score:  # strictly better: ties keep the earlier, larger λ
            best, best_score, theta_best, since_best, memory_best = i, score, theta, 0, memory
        elif score < best_score:  # a plateau (e.g. chance level at the strong end) is not a decline
            since_best += 1
            if patience is not None and since_best >= patience:
                break
    bar.close()
    return _Path(lambdas[: len(checks)], checks, iters, secs, top1, mpc, best, theta_best, memory_best)


def _refit(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, classes: np.ndarray,
           path: _Path, *, standardize: bool, dtype: torch.dtype, dev: torch.device, warm_start: bool,
           solver: _Lbfgs) -> tuple[np.ndarray, _Scaler, torch.Tensor, _Check, int]:
    """Refit on train + val ((n + m, d), standardised anew) at the path's chosen λ, starting from its solution
    re-indexed to the classes of train + val (new classes start at 0) and, when ``warm_start`` and no class was
    added, from its curvature memory. Returns (classes (c',), scaler, θ (d·c' + c',), stopping test, iterations)."""
    X_all = np.concatenate([X_train, X_val.astype(X_train.dtype, copy=False)])
    y_all = np.concatenate([y_train, y_val])
    classes_all = np.unique(y_all)
    theta0 = _expand_theta(path.theta, classes, classes_all, X_train.shape[1])
    scaler, prob = _softmax_problem(X_all, y_all, classes_all, standardize, dtype, dev)
    # the path's curvature at the chosen λ approximates the refit's (same features, more rows)
    memory = path.memory if warm_start and classes_all.size == classes.size else None
    theta, final, n_iter, _ = solver.solve(prob, path.lambdas[path.best], theta0, memory)
    return classes_all, scaler, theta, final, n_iter


def _warn_unconverged(desc: str, path: _Path, final: _Check, final_iters: int, *, refit: bool, solver: _Lbfgs,
                      dtype: torch.dtype) -> None:
    """Warn, at :func:`fit_logreg`'s caller, when the returned model (``final``: the refit, or the path fit at
    the chosen λ) or the path fit that chose λ failed its stopping test: which fit, why, after how many
    iterations."""
    path_check = path.checks[path.best]
    if final.converged and path_check.converged:
        return
    if not final.converged:
        what, bad, spent = ("the refit" if refit else "the fit"), final, final_iters
    else:
        what, bad, spent = "the validation-path fit", path_check, path.iters[path.best]
    hint = ", or use precision='float64'" if dtype == torch.float32 else ""
    warnings.warn(f"{desc}: {what} at the selected lambda = {float(path.lambdas[path.best]):.3g} did not converge: "
                  f"{_describe(bad, solver.tol, solver.rtol)} after {spent} L-BFGS iterations (cap "
                  f"{solver.max_iter}); raise max_iter{hint}", stacklevel=3)  # 3: the caller of fit_logreg


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
    rtol: float = DEFAULT_RTOL,
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
    no validation set. ``patience``: stop the path once that many strengths have scored below the best
    validation score so far (equal scores do not count; None: fit the whole grid, as the protocol does).
    ``refit``: refit on train + val at the chosen λ (warm-started) and return that model. ``metric``: top1 |
    mean_per_class, the validation score that picks λ. ``tol`` / ``rtol`` / ``max_iter`` / ``history_size``:
    L-BFGS stopping test ``max_i |∂L/∂θ_i| / D_i ≤ tol`` (scikit-learn's ``max|∇L| ≤ tol`` for λ ≲ 1) and
    ``gap_bound ≤ rtol · L`` (a bound on the distance of the objective from its minimum; ``rtol=0`` switches
    it off) — module docstring, ``_Check`` —, the iteration cap per strength, and memory. ``precision``:
    auto | float32 | float64 (module docstring). ``device``: auto (CUDA when available) | cpu | cuda[:N].
    Returns a :class:`LinearFit`.
    """
    t_start = time.perf_counter()
    X_train, y_train, X_val, y_val, lam_grid, has_val, classes = _check_fit_args(
        X_train, y_train, X_val, y_val, lambdas, metric, refit)
    solver = _Lbfgs(tol=tol, rtol=rtol, max_iter=max_iter, history=history_size)
    n, d = X_train.shape
    dev = resolve_device(device)
    dt = _precision(precision, n, d, classes.size)
    small = dev.type == "cpu" and _heavy_threads(n, d, classes.size) == 1
    with tf32_off(), torch.no_grad(), _num_threads(1 if small else None):
        scaler, prob = _softmax_problem(X_train, y_train, classes, standardize, dt, dev)
        val = (scaler.apply(_to_device(X_val, dev), dt), _encode(y_val, classes), y_val) if has_val else None
        strongest_first = lam_grid[np.argsort(-lam_grid, kind="stable")]
        path = _fit_path(prob, strongest_first, val, metric=metric, warm_start=warm_start, patience=patience,
                         solver=solver, progress=progress, desc=desc)
        if refit:
            del prob, val  # the path's standardised features go before the refit's are made
            classes, scaler, theta, final, final_iters = _refit(
                X_train, y_train, X_val, y_val, classes, path, standardize=standardize, dtype=dt, dev=dev,
                warm_start=warm_start, solver=solver)
            n_fit = n + X_val.shape[0]
        else:
            theta, final, final_iters, n_fit = path.theta, path.checks[path.best], path.iters[path.best], n
        c = classes.size
        coef, intercept = scaler.to_raw(theta[: d * c].view(d, c), theta[d * c:])
    _warn_unconverged(desc, path, final, final_iters, refit=refit, solver=solver, dtype=dt)
    checks = path.checks
    return LinearFit(
        method="logreg", classes=classes, coef=coef, intercept=intercept, lam=float(path.lambdas[path.best]),
        n_fit=int(n_fit), n_train=int(n), lambdas=path.lambdas, val_top1=np.asarray(path.top1, dtype=np.float64),
        val_mean_per_class=np.asarray(path.mpc, dtype=np.float64),
        converged=np.asarray([c_.converged for c_ in checks], dtype=bool),
        n_iter=np.asarray(path.iters, dtype=np.int64), best_index=path.best, final_converged=bool(final.converged),
        final_n_iter=int(final_iters), final_grad=float(final.grad_max), standardize=standardize,
        precision=str(dt).replace("torch.", ""), device=str(dev), seconds=time.perf_counter() - t_start,
        seconds_per_lambda=path.seconds, objective=np.array([c_.loss for c_ in checks]),
        grad_max=np.array([c_.grad_max for c_ in checks]), grad_norm=np.array([c_.grad_norm for c_ in checks]),
        gap_bound=np.array([c_.gap_bound for c_ in checks]), final_objective=final.loss,
        final_grad_norm=final.grad_norm, final_gap_bound=final.gap_bound, rtol=float(rtol), tol=float(tol),
        max_iter=int(max_iter),
    )


def _describe(chk: "_Check", tol: float, rtol: float) -> str:
    """Why a fit failed its stopping test, in words."""
    parts = []
    if chk.grad_max > tol:
        parts.append(f"max|grad| = {chk.grad_max:.2e} > tol = {tol:g}")
    if rtol > 0 and chk.gap_bound > chk.target:
        parts.append(f"objective {chk.loss:.6g} may be up to {chk.gap_bound:.2e} above its minimum "
                     f"(> rtol*objective = {chk.target:.2e})")
    return "; ".join(parts) or "stopping test unmet"


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


# ----------------------------------------------------------------------------------------------------
# Closed-form ridge regression on one-hot targets
# ----------------------------------------------------------------------------------------------------


@dataclass
class _RidgeStats:
    """Sufficient statistics of raw features for ridge, float64: row count, feature sums (d,), the Gram
    ``Σ (x − m₀)(x − m₀)ᵀ`` about a fixed shift ``m₀`` (d, d) (the training mean: no cancellation for features
    with large offsets), per-class sums of ``x − m₀`` (c, d) and class counts (c,). Train and val statistics
    add up, so the refit on train + val needs no second pass over the data."""

    n: int
    shift: torch.Tensor
    s1: torch.Tensor
    gram: torch.Tensor
    class_sums: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def accumulate(cls, X: torch.Tensor, y_idx: torch.Tensor, c: int, shift: torch.Tensor,
                   block: int = 1 << 14) -> "_RidgeStats":
        n, d = X.shape
        dev = X.device
        s1 = torch.zeros(d, dtype=torch.float64, device=dev)
        gram = torch.zeros((d, d), dtype=torch.float64, device=dev)
        sums = torch.zeros((c, d), dtype=torch.float64, device=dev)
        for lo in range(0, n, block):
            xb = X[lo:lo + block].to(torch.float64) - shift
            gram.addmm_(xb.T, xb)
            sums.index_add_(0, y_idx[lo:lo + block], xb)
            s1 += xb.sum(0)
        counts = torch.bincount(y_idx, minlength=c).to(torch.float64)
        return cls(n, shift, s1, gram, sums, counts)

    def __add__(self, other: "_RidgeStats") -> "_RidgeStats":
        return _RidgeStats(self.n + other.n, self.shift, self.s1 + other.s1, self.gram + other.gram,
                           self.class_sums + other.class_sums, self.counts + other.counts)


class _RidgeEig:
    """Eigen-decomposition of the centred (standardised) Gram of the fitting rows, for the whole λ path.

    Primal (d ≤ n, from :class:`_RidgeStats`): ``X̃ᵀX̃ = V diag(s) Vᵀ`` (d, d), ``W(λ) = V diag(1/(s + nλ)) Vᵀ
    X̃ᵀỸ``. Dual (d > n, from the rows): ``X̃X̃ᵀ = U diag(s) Uᵀ`` (n, n), ``W(λ) = X̃ᵀ U diag(1/(s + nλ)) Uᵀ Ỹ``.
    ``X̃`` are the centred, optionally scaled features, ``Ỹ`` the centred one-hot targets; everything float64;
    the tiny negative eigenvalues of rounding are set to 0. ``scaler`` maps coefficients back to raw units.
    """

    def __init__(self, n: int, s: torch.Tensor, M: torch.Tensor, B: torch.Tensor, ybar: torch.Tensor,
                 scaler: _Scaler, dual: bool):
        self.n, self.s, self.M, self.B, self.ybar, self.scaler, self.dual = n, torch.clamp(s, min=0.0), M, B, \
            ybar, scaler, dual

    @classmethod
    def primal(cls, st: _RidgeStats, standardize: bool) -> "_RidgeEig":
        n = st.n
        delta = st.s1 / n  # mean − shift
        G = st.gram - n * torch.outer(delta, delta)  # Σ (x − μ)(x − μ)ᵀ
        R = (st.class_sums - st.counts[:, None] * delta[None, :]).T  # Σ (x − μ) e_yᵀ = X̃ᵀỸ (d, c)
        mean = st.shift + delta
        if standardize:
            sd = _standardising_scale(torch.sqrt(torch.clamp(torch.diagonal(G) / n, min=0.0)), mean)
        else:
            sd = torch.ones_like(mean)
        G = G / torch.outer(sd, sd)
        R = R / sd[:, None]
        s, V = torch.linalg.eigh(G)
        return cls(n, s, V, V.T @ R, st.counts / n, _Scaler.from_stats(mean, sd), dual=False)

    @classmethod
    def dual_from_rows(cls, X: torch.Tensor, y_idx: torch.Tensor, c: int, standardize: bool) -> "_RidgeEig":
        n = X.shape[0]
        scaler = _Scaler(X, standardize)
        X64 = scaler.apply(X, torch.float64)
        ybar = torch.bincount(y_idx, minlength=c).to(torch.float64) / n
        Yc = -ybar.expand(n, c).clone()
        Yc[torch.arange(n, device=X.device), y_idx] += 1.0
        s, U = torch.linalg.eigh(X64 @ X64.T)
        return cls(n, s, X64.T @ U, U.T @ Yc, ybar, scaler, dual=True)

    def project(self, Xq: torch.Tensor, block: int = 1 << 14) -> torch.Tensor:
        """Raw query features (m, d) → coordinates (m, r) in the eigenbasis (float32: only arg-max is used)."""
        M = self.M.to(torch.float32)
        out = torch.empty((Xq.shape[0], M.shape[1]), dtype=torch.float32, device=Xq.device)
        for lo in range(0, Xq.shape[0], block):
            xs = (Xq[lo:lo + block].to(torch.float64) - self.scaler.mean) / self.scaler.scale
            out[lo:lo + block] = xs.to(torch.float32) @ M
        return out

    def scores(self, A: torch.Tensor, lam: float) -> torch.Tensor:
        """Predicted targets (m, c), float32, of projected queries ``A`` at strength λ."""
        f = (1.0 / (self.s + self.n * lam)).to(torch.float32)
        return (A * f) @ self.B.to(torch.float32) + self.ybar.to(torch.float32)

    def coef(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """Raw-unit (coef (d, c), intercept (c,)) at λ, float64."""
        W = (self.M / (self.s + self.n * lam)) @ self.B
        return self.scaler.to_raw(W, self.ybar.clone())


def ridge_classify(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    lambdas: Sequence[float] | np.ndarray | None = None,
    *,
    refit: bool = False,
    standardize: bool = True,
    metric: str = "top1",
    device: str | torch.device = "auto",
    progress: bool = False,
    desc: str = "ridge",
) -> LinearFit:
    """Ridge regression on one-hot targets, arg-max prediction; λ chosen on a validation set (cheap screening).

    Minimises ``(1/2n)‖XW + 1bᵀ − Y‖²_F + (λ/2)‖W‖²_F`` (scikit-learn ``Ridge(alpha=λ·n)``) in closed form: one
    float64 eigen-decomposition of the d × d (or, when d > n, the n × n) centred Gram of the fitting rows serves
    every λ of the grid (default :data:`DEFAULT_LAMBDAS`); the refit on train + val reuses the training Gram
    plus the validation one (one pass over the data in all). Validation scores per λ are float32 products
    (only their arg-max is used). Arguments and the returned :class:`LinearFit` as in :func:`fit_logreg`
    (``converged`` always true, ``n_iter`` 0; ``C`` does not apply, ``alpha = λ·n_fit``).
    """
    t_start = time.perf_counter()
    X_train, y_train, X_val, y_val, lam_grid, has_val, classes_train = _check_fit_args(
        X_train, y_train, X_val, y_val, lambdas, metric, refit)
    n, d = X_train.shape
    classes = np.unique(np.concatenate([y_train, y_val])) if refit else classes_train
    c = classes.size
    dev = resolve_device(device)
    from tqdm.auto import tqdm

    small = dev.type == "cpu" and _heavy_threads(n, d, d) == 1
    with tf32_off(), torch.no_grad(), _num_threads(1 if small else None):
        Xt = _to_device(X_train, dev)
        yt_idx = torch.from_numpy(_encode(y_train, classes)).to(dev)
        shift = Xt[: min(n, 1 << 16)].to(torch.float64).mean(0)
        if d > n:
            eig = _RidgeEig.dual_from_rows(Xt, yt_idx, c, standardize)
            st_train = None
        else:
            st_train = _RidgeStats.accumulate(Xt, yt_idx, c, shift)
            eig = _RidgeEig.primal(st_train, standardize)
        top1, mpc, secs = [], [], []
        if has_val:
            Xv = _to_device(X_val, dev)
            A = eig.project(Xv)
            yv_idx = _encode(y_val, classes)
            unseen = torch.from_numpy(~np.isin(classes, classes_train)).to(dev)  # never predicted on the path
            for lam in tqdm(lam_grid, desc=desc, unit="λ", disable=not progress, leave=False, dynamic_ncols=True):
                t0 = time.perf_counter()
                sc = eig.scores(A, float(lam))
                if bool(unseen.any()):
                    sc[:, unseen] = -torch.inf
                a, m = _val_metrics(torch.argmax(sc, dim=1).cpu().numpy(), yv_idx, y_val)
                top1.append(a)
                mpc.append(m)
                secs.append(time.perf_counter() - t0)
            best = _pick(np.asarray(top1), np.asarray(mpc), lam_grid, metric)
        else:
            best = 0
        lam_best = float(lam_grid[best])
        n_fit = n
        if refit:
            yv_t = torch.from_numpy(_encode(y_val, classes)).to(dev)
            n_fit = n + X_val.shape[0]
            if st_train is not None:  # primal: add the validation statistics
                eig = _RidgeEig.primal(st_train + _RidgeStats.accumulate(Xv, yv_t, c, shift), standardize)
            else:
                X_all, y_all = torch.cat([Xt, Xv.to(Xt.dtype)]), torch.cat([yt_idx, yv_t])
                eig = (_RidgeEig.dual_from_rows(X_all, y_all, c, standardize) if d > n_fit
                       else _RidgeEig.primal(_RidgeStats.accumulate(X_all, y_all, c, shift), standardize))
        coef, intercept = eig.coef(lam_best)
    k = lam_grid.size
    return LinearFit(
        method="ridge", classes=classes, coef=coef, intercept=intercept, lam=lam_best, n_fit=int(n_fit),
        n_train=int(n), lambdas=lam_grid, val_top1=np.asarray(top1, dtype=np.float64),
        val_mean_per_class=np.asarray(mpc, dtype=np.float64), converged=np.ones(k, dtype=bool),
        n_iter=np.zeros(k, dtype=np.int64), best_index=best, final_converged=True, final_n_iter=0,
        final_grad=0.0, standardize=standardize, precision="float64", device=str(dev),
        seconds=time.perf_counter() - t_start, seconds_per_lambda=secs,
    )
