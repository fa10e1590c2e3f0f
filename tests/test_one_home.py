"""Logic shared across modules lives in one place (issue 18, "One home for each idea"): the callers of each shared
helper agree on what it decides."""

from __future__ import annotations

import numpy as np
import pytest

from probes.linear import fit_logreg, ridge_classify
from repsim.errors import UsageError

FITTERS = [fit_logreg, ridge_classify]


def _data(n=40, d=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    return rng.normal(size=(n, d)) + 3.0 * y[:, None], y


@pytest.mark.parametrize("fit", FITTERS, ids=lambda f: f.__name__)
def test_both_linear_fitters_check_their_arguments_alike(fit):
    X, y = _data()
    with pytest.raises(UsageError, match=r"metric must be one of top1, mean_per_class, got 'f1'"):
        fit(X, y, X, y, metric="f1")
    with pytest.raises(UsageError, match=r"choosing among 2 strengths needs a validation set"):
        fit(X, y, lambdas=[1.0, 2.0])
    with pytest.raises(UsageError, match=r"refit=True needs a validation set to refit on"):
        fit(X, y, lambdas=[1.0], refit=True)
    with pytest.raises(UsageError, match=r"validation features have 2 dimensions, the training features 3"):
        fit(X, y, X[:, :2], y, lambdas=[1.0])
    with pytest.raises(UsageError, match=r"the training labels hold 1 class; a classifier needs at least 2"):
        fit(X, np.zeros_like(y), X, y)
    # an empty validation set is no validation set: one strength fits, no validation scores
    res = fit(X, y, X[:0], y[:0], lambdas=[0.1], device="cpu")
    assert res.val_top1.size == 0 and res.lam == 0.1
    # the empty set is still checked: its feature width must match
    with pytest.raises(UsageError, match=r"validation features have 2 dimensions"):
        fit(X, y, X[:0, :2], y[:0], lambdas=[0.1])
