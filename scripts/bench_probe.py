"""Benchmark: the logistic-regression probe (``probes.fit_logreg``) against scikit-learn's LogisticRegression.

    python scripts/bench_probe.py               # 20k train × 768 features, 100 classes (~10 min on 2 busy cores)
    python scripts/bench_probe.py --quick       # 4k × 256, 20 classes (~1 min)
    python scripts/bench_probe.py --threads 1   # steadier timings when other processes share the cores

What is measured
----------------
Synthetic, seeded features with class structure: class means in a 64-dimensional subspace, correlated
(mixed) noise, per-feature scales spread over ~e^±2 and a common offset, so that the linear probe reaches a
middling accuracy (neither chance nor 100%). ``--n`` training, ``--n/4`` validation and ``--n/4`` test samples.
The features are standardised once (training mean / std) and stored as float32; every fit below sees that same
array, so ours (``standardize=False``) and scikit-learn solve the *same* problem::

    min  mean cross-entropy + (λ/2)‖W‖²      ≡  scikit-learn  C·Σ CE + ½‖W‖²  with  C = 1/(λ·n_train)

with the same max-gradient test (``max|∇| ≤ tol``, ``--tol``, scikit-learn's ``tol`` for lbfgs) and iteration
cap. Ours also requires its objective to be certified within ``--rtol`` (relative) of the optimum (the duality-gap
bound of ``probes.solvers._Check``; default ``probes.solvers.DEFAULT_RTOL``); ``--rtol 0`` gives the max-gradient
test alone, i.e. the same stopping rule as scikit-learn (at the weak end of the grid that rule stops far from
the optimum: the ``L_sk - L`` column shows it for scikit-learn's solutions).

Rows
  repsim path   the protocol: ``fit_logreg`` over all 45 strengths (1e-6 … 1e5), strongest first, each fit
                warm-started from the previous one; its time at each benchmark strength is that strength's
                share of the path (per-strength timings of the one path run)
  repsim cold   ``fit_logreg`` at one strength from zero (no warm start)
  sklearn       ``LogisticRegression(C, solver="lbfgs", tol, max_iter)`` from zero, on the float32 array
                (scikit-learn ≥ 1.6 keeps float32 for lbfgs) and, with ``--sklearn-float64``, on its float64 copy

The benchmark strengths (``--strengths``, default 5 spread over 1e-5 … 1e3) plus the strength the path chose.
Accuracies are test top-1 of the model fitted on the training split at that strength (no refit), in %.
``× path`` / ``× cold``: scikit-learn's time over ours (> 1: ours is faster). Per-strength means at the end
compare the protocol's cost per strength (path total / 45) with scikit-learn's mean over the benchmark
strengths. Ratios are only meaningful within one run: the machine is shared and noisy (load average printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_data(n_train: int, d: int, c: int, sep: float, seed: int):
    """Seeded features with class structure; returns standardised float32 (train, val, test) and labels."""
    rng = np.random.default_rng(seed)
    n = n_train + 2 * (n_train // 4)
    y = rng.permutation(np.arange(n) % c)
    rank = min(64, d)
    means = rng.standard_normal((c, rank)) @ rng.standard_normal((rank, d)) / np.sqrt(rank)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    scales = np.exp(rng.uniform(-2, 2, d))
    X = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 4096):
        hi = min(lo + 4096, n)
        z = sep * means[y[lo:hi]] + rng.standard_normal((hi - lo, d)) @ mix + 0.5 * rng.standard_normal((hi - lo, d))
        X[lo:hi] = (z * scales + 3.0).astype(np.float32)
    a, b = n_train, n_train + n_train // 4
    mu = X[:a].mean(0, dtype=np.float64)
    sd = X[:a].std(0, dtype=np.float64)
    X = ((X - mu) / sd).astype(np.float32)
    return (X[:a], y[:a]), (X[a:b], y[a:b]), (X[b:], y[b:])


def objective(X: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray, lam: float) -> tuple[float, float]:
    """(mean CE + (λ/2)‖W‖², max|∇|) in float64 numpy — an independent check of both solvers' solutions."""
    from scipy.special import logsumexp, softmax

    n = X.shape[0]
    loss, gW, gb = 0.0, np.zeros_like(W, dtype=np.float64), np.zeros(W.shape[1])
    for lo in range(0, n, 4096):
        Xb = X[lo:lo + 4096].astype(np.float64)
        Z = Xb @ W + b
        yb = y[lo:lo + 4096]
        loss += float(np.sum(logsumexp(Z, axis=1) - Z[np.arange(len(yb)), yb]))
        P = softmax(Z, axis=1)
        P[np.arange(len(yb)), yb] -= 1.0
        gW += Xb.T @ P
        gb += P.sum(0)
    grad = np.concatenate([(gW / n + lam * W).ravel(), gb / n])
    return loss / n + 0.5 * lam * float(np.sum(W * W)), float(np.abs(grad).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4k × 256, 20 classes")
    p.add_argument("--n", type=int, default=None, help="training samples (default 20000; quick 4000)")
    p.add_argument("--dim", type=int, default=None, help="features (default 768; quick 256)")
    p.add_argument("--classes", type=int, default=None, help="classes (default 100; quick 20)")
    p.add_argument("--sep", type=float, default=None, help="class separation (default 0.12; quick 0.2)")
    p.add_argument("--strengths", type=int, default=5, help="benchmark strengths besides the chosen one")
    p.add_argument("--tol", type=float, default=1e-5, help="max|grad| stopping test, both solvers")
    p.add_argument("--max-iter", type=int, default=1000, help="iteration cap per fit, both solvers")
    p.add_argument("--rtol", type=float, default=None,
                   help="ours only: certified relative objective accuracy (default probes.solvers.DEFAULT_RTOL; "
                        "0 = the max-gradient test alone)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and scikit-learn (default: all)")
    p.add_argument("--sklearn-float64", action="store_true", help="also time scikit-learn on float64 features")
    p.add_argument("--path-repeats", type=int, default=2,
                   help="runs of the 45-strength path (before and after scikit-learn; the fastest is reported)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = args.n or (4000 if args.quick else 20000)
    d = args.dim or (256 if args.quick else 768)
    c = args.classes or (20 if args.quick else 100)
    sep = args.sep or (0.2 if args.quick else 0.12)

    import sklearn
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from probes.solvers import DEFAULT_LAMBDAS, DEFAULT_RTOL, accuracy_scores, fit_logreg

    rtol = DEFAULT_RTOL if args.rtol is None else args.rtol

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.threads:
        threadpool_limits(limits=args.threads)
    threads = args.threads or torch.get_num_threads()

    (Xt, yt), (Xv, yv), (Xs, ys) = make_data(n, d, c, sep, args.seed)
    load0 = os.getloadavg()
    print(f"data: train {Xt.shape}, val {Xv.shape}, test {Xs.shape}, {c} classes, float32, standardised; "
          f"tol {args.tol:g}, rtol (ours) {rtol:g}, max_iter {args.max_iter}, threads {threads}")
    print(f"torch {torch.__version__}, scikit-learn {sklearn.__version__}, {os.cpu_count()} CPUs, "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")

    fit_logreg(Xt[:200], yt[:200], lambdas=[1.0], device="cpu", standardize=False)  # warm-up (imports)

    def run_path():
        t0 = time.perf_counter()
        fit = fit_logreg(Xt, yt, Xv, yv, DEFAULT_LAMBDAS, standardize=False, tol=args.tol, max_iter=args.max_iter,
                         rtol=rtol, device="cpu", progress=sys.stderr.isatty(), desc="repsim path")
        return fit, time.perf_counter() - t0

    path, path_s = run_path()
    per_lam = dict(zip(path.lambdas.tolist(), path.seconds_per_lambda))
    iters = dict(zip(path.lambdas.tolist(), path.n_iter.tolist()))
    print(f"repsim path: 45 strengths in {path_s:.1f} s ({path_s / 45:.2f} s per strength), "
          f"{int(path.n_iter.sum())} L-BFGS iterations, all converged: {bool(path.converged.all())}; "
          f"chosen λ = {path.lam:.3g} (val top-1 {100 * path.val_top1[path.best_index]:.2f}%)")
    weak = int(np.argmin(path.lambdas))
    print(f"  weakest λ = {path.lambdas[weak]:.1e}: objective {path.objective[weak]:.6g}, gap bound "
          f"{path.gap_bound[weak]:.1e}, {int(path.n_iter[weak])} iterations, converged {bool(path.converged[weak])}")

    idx = np.unique(np.round(np.linspace(4, 36, args.strengths)).astype(int)) if args.strengths > 0 else []
    bench = sorted({float(DEFAULT_LAMBDAS[i]) for i in idx} | {float(path.lam)}, reverse=True)
    rows = []
    for lam in bench:
        C = 1.0 / (lam * n)
        cold = fit_logreg(Xt, yt, lambdas=[lam], standardize=False, tol=args.tol, max_iter=args.max_iter,
                          rtol=rtol, device="cpu")
        acc_cold = accuracy_scores(ys, cold.predict(Xs))[0]
        sk_runs = []
        for dtype in (np.float32, np.float64) if args.sklearn_float64 else (np.float32,):
            A = Xt.astype(dtype)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                t1 = time.perf_counter()
                sk = LogisticRegression(C=C, solver="lbfgs", tol=args.tol, max_iter=args.max_iter).fit(A, yt)
                sk_s = time.perf_counter() - t1
            conv = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
            acc_sk = accuracy_scores(ys, sk.predict(Xs.astype(dtype)))[0]
            obj_sk, g_sk = objective(Xt, yt, sk.coef_.T.astype(np.float64), sk.intercept_.astype(np.float64), lam)
            sk_runs.append((dtype.__name__, sk_s, int(sk.n_iter_[0]), conv, acc_sk, obj_sk, g_sk))
        obj_ours, g_ours = objective(Xt, yt, cold.coef, cold.intercept, lam)
        warm_s = per_lam[lam]
        rows.append((lam, C, warm_s, iters[lam], cold.seconds, cold.final_n_iter, acc_cold, sk_runs, obj_ours, g_ours))
        print(f"  λ = {lam:.3g}: repsim path {warm_s:.2f} s, cold {cold.seconds:.2f} s, sklearn "
              + ", ".join(f"{r[0]} {r[1]:.2f} s" for r in sk_runs), flush=True)

    path_times = [path_s]
    for _ in range(args.path_repeats - 1):  # again after scikit-learn: the machine's load drifts
        again, again_s = run_path()
        path_times.append(again_s)
        if again_s < path_s:
            path, path_s = again, again_s
    per_lam = dict(zip(path.lambdas.tolist(), path.seconds_per_lambda))
    rows = [(lam, C, per_lam[lam], *rest) for lam, C, _, *rest in rows]
    print(f"repsim path runs: {', '.join(f'{t:.1f} s' for t in path_times)}; the fastest is used below")
    load1 = os.getloadavg()
    print()
    head = (f"{'lambda':>9} {'C':>9} | {'path s':>7} {'it':>4} | {'cold s':>7} {'it':>4} | {'sklearn s':>9} "
            f"{'it':>4} {'dtype':>7} | {'x path':>6} {'x cold':>6} | {'acc %':>6} {'sk acc %':>8} {'|Δ| pt':>6} | "
            f"{'L_sk - L':>9} {'|∇| ours':>8} {'|∇| sk':>8}")
    print(head)
    print("-" * len(head))
    for lam, C, warm_s, warm_it, cold_s, cold_it, acc, sk_runs, obj_ours, g_ours in rows:
        for k, (dt, sk_s, sk_it, conv, acc_sk, obj_sk, g_sk) in enumerate(sk_runs):
            mark = "" if conv else "!"
            left = (f"{lam:>9.2e} {C:>9.2e} | {warm_s:>7.2f} {warm_it:>4d} | {cold_s:>7.2f} {cold_it:>4d}" if k == 0
                    else " " * 52)
            print(f"{left} | {sk_s:>9.2f} {sk_it:>3d}{mark:1} {dt:>7} | {sk_s / warm_s:>6.1f} {sk_s / cold_s:>6.1f} | "
                  f"{100 * acc:>6.2f} {100 * acc_sk:>8.2f} {100 * abs(acc - acc_sk):>6.2f} | "
                  f"{obj_sk - obj_ours:>9.1e} {g_ours:>8.1e} {g_sk:>8.1e}")
    print("-" * len(head))
    sk32 = [r[7][0][1] for r in rows]
    warm = [r[2] for r in rows]
    cold = [r[4] for r in rows]
    print(f"mean per strength over the {len(rows)} benchmark strengths: repsim path {np.mean(warm):.2f} s, "
          f"repsim cold {np.mean(cold):.2f} s, sklearn (float32) {np.mean(sk32):.2f} s")
    print(f"  sklearn / repsim path  = {np.mean(sk32) / np.mean(warm):.1f}×   (same strengths)")
    print(f"  sklearn / repsim cold  = {np.mean(sk32) / np.mean(cold):.1f}×   (same strengths, no warm start)")
    print(f"  sklearn / (path total / 45) = {np.mean(sk32) / (path_s / 45):.1f}×   "
          f"(protocol cost per strength, all 45 strengths)")
    ok = [r for r in rows if r[7][0][6] <= args.tol]
    print(f"  max |Δ test accuracy| = {100 * max(abs(r[6] - r[7][0][4]) for r in rows):.2f} points over all "
          f"strengths; {100 * max([abs(r[6] - r[7][0][4]) for r in ok] or [0.0]):.2f} points where scikit-learn's "
          f"solution passes its own gradient test ({len(ok)} of {len(rows)})")
    print("  L_sk - L: objective at scikit-learn's solution minus ours (> 0: ours is lower); |∇|: max|gradient|\n"
          "  of the objective at each solution, recomputed in float64 numpy; '!' = scikit-learn hit max_iter")
    print(f"load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
