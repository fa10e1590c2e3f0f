"""`repsim compare`: any measure of repsim.similarity_measures between the layers of stores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from repsim import open_store
from repsim.cka_engine import layer_features
from repsim.compare import compare_matrix
from repsim.similarity_measures import MEASURES, similarity

ARGS = ["--random-init", "--img-size", "32", "--data", "shapes", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    out = {}
    for name, model, n in (("vit", "timm:vit_tiny_patch16_224", 40), ("r18", "timm:resnet18", 40),
                           ("vit24", "timm:vit_tiny_patch16_224", 24)):
        path = str(root / f"{name}.zarr")
        assert run_cli("extract", "--model", model, *ARGS, "--n", str(n), "--out", path).exit_code == 0
        out[name] = open_store(path)
    return out


@pytest.mark.parametrize("measure", ["procrustes", "cca", "pwcca", "rsa", "mknn", "cka"])
def test_cells_equal_the_array_api(stores, measure):
    a, b = stores["vit"], stores["r18"]
    la, lb = ["blocks.0", "blocks.11"], ["layer1.0", "layer4.1"]
    opts = {"k": 5} if measure == "mknn" else {}
    r = compare_matrix(a, b, measure=measure, layers_a=la, layers_b=lb, options=opts, progress=False)
    assert r.spec["kind"] == MEASURES[measure].kind and r.values.shape == (2, 2)
    for i, x in enumerate(la):
        for j, y in enumerate(lb):
            fx = layer_features(a, x, tokens="mean", dtype=torch.float64).numpy()
            fy = layer_features(b, y, tokens="mean", dtype=torch.float64).numpy()
            with _no_fail():
                ref = similarity(fx, fy, measure, **opts)
            assert r.values[i, j] == pytest.approx(ref, abs=1e-10)


class _no_fail:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def test_within_store_identity_diagonal_and_symmetry(stores):
    a = stores["vit"]
    layers = ["blocks.0", "blocks.5", "blocks.11"]
    for measure in ("procrustes", "cka", "rsa"):
        r = compare_matrix(a, measure=measure, layers_a=layers, progress=False)
        np.testing.assert_allclose(np.diag(r.values), MEASURES[measure].identity_value, atol=1e-6)
        np.testing.assert_allclose(r.values, r.values.T, atol=1e-12)


def test_uncertainty_and_cli_outputs(stores, tmp_path):
    a, b = stores["vit"], stores["r18"]
    res = run_cli("compare", a.path, b.path, "--measure", "procrustes,cka", "--layers-a", "blocks.11",
                  "--layers-b", "layer4.1", "--null", "19", "--bootstrap", "20", "--out", str(tmp_path / "c.json"),
                  "--plot", str(tmp_path / "c.png"), "--quiet")
    assert res.exit_code == 0, res.output
    for m in ("procrustes", "cka"):
        d = json.loads((tmp_path / f"c_{m}.json").read_text())
        assert d["measure"] == m and d["spec"]["kind"] in ("similarity", "distance") and d["null"] == 19
        p = d["p_values"][0][0]
        assert 1 / 20 <= p <= 1.0
        # (a percentile interval need not contain the observed value: biased CKA shifts under resampling)
        lo, hi, v = d["ci_low"][0][0], d["ci_high"][0][0], d["values"][0][0]
        assert lo < hi and lo - (hi - lo) < v < hi + (hi - lo)
        assert (tmp_path / f"c_{m}.png").read_bytes()[:4] == b"\x89PNG"
    assert "distance: lower = more similar" in res.output


def test_errors(stores):
    a, c = stores["vit"], stores["vit24"]
    assert_one_line_error(run_cli("compare", a.path, "--measure", "nope", "--quiet"), "unknown measure")
    assert_one_line_error(run_cli("compare", a.path, c.path, "--quiet"), "different samples")
    res = run_cli("compare", a.path, c.path, "--align", "ids", "--layers-a", "blocks.0", "--layers-b", "blocks.0",
                  "--quiet")
    assert res.exit_code == 0 and "n=24" in res.output
