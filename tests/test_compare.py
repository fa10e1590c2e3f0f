"""`repsim compare`: any measure of repsim.measures.beyond_cka between the layers of stores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from repsim import open_store
from repsim.measures.cka_engine import layer_features
from repsim.measures.compare import compare_matrix
from repsim.errors import UsageError
from repsim.measures.beyond_cka import MEASURES, bootstrap_interval, permutation_null, similarity

ARGS = ["--random-init", "--img-size", "32", "--data", "shapes", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, vit_tiny_store):
    """``vit`` and ``r18``: 40 shapes images (seed 0); ``vit24``: the ViT on 24 images (the session's store)."""
    root = tmp_path_factory.mktemp("cmp")
    out = {}
    for name, model, n in (("vit", "timm:vit_tiny_patch16_224", 40), ("r18", "timm:resnet18", 40)):
        path = str(root / f"{name}.zarr")
        assert run_cli("extract", "--model", model, *ARGS, "--n", str(n), "--out", path).exit_code == 0
        out[name] = open_store(path)
    out["vit24"] = open_store(vit_tiny_store)
    return out


@pytest.mark.parametrize("measure", ["procrustes", "cca", "pwcca", "rsa", "mknn", "cka_biased", "cka_debiased"])
def test_cells_equal_the_array_api(stores, measure):
    """Every all-sample cell is the array measure on the layers' features; the default tokens are flatten for the
    CKA measures (as `repsim cka`) and mean for the others. compare's cka_biased is the array API's cka."""
    a, b = stores["vit"], stores["r18"]
    la, lb = ["blocks.0", "blocks.11"], ["layer1.0", "layer4.1"]
    opts = {"k": 5} if measure == "mknn" else {}
    array_measure = "cka" if measure == "cka_biased" else measure
    tokens = "flatten" if measure.startswith("cka") else "mean"
    r = compare_matrix(a, b, measure=measure, layers_a=la, layers_b=lb, options=opts, progress=False)
    assert r.spec["kind"] == MEASURES[array_measure].kind and r.values.shape == (2, 2) and r.tokens == tokens
    for i, x in enumerate(la):
        for j, y in enumerate(lb):
            fx = layer_features(a, x, tokens=tokens, dtype=torch.float64).numpy()
            fy = layer_features(b, y, tokens=tokens, dtype=torch.float64).numpy()
            with _no_fail():
                ref = similarity(fx, fy, array_measure, **opts)
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
    for measure in ("procrustes", "cka", "cka_biased", "rsa"):
        r = compare_matrix(a, measure=measure, layers_a=layers, progress=False)
        np.testing.assert_allclose(np.diag(r.values), r.spec["identity_value"], atol=1e-6)
        np.testing.assert_allclose(r.values, r.values.T, atol=1e-12)


def _reference_uncertainty(x, y, measure, n_perm, n_boot, seed=0, level=0.95):
    """The documented procedure, written out with the plain measure (no permuter / resampler shortcuts):
    p = (1 + #{shuffled pairings at least as similar as observed}) / (1 + R); percentile interval of the
    measure over resampled image rows (copies as repeated rows, as procrustes and cka document)."""
    sim = MEASURES[measure].kind == "similarity"
    obs = similarity(x, y, measure)
    rng = np.random.default_rng(seed)
    null = np.array([similarity(x, y[rng.permutation(len(x))], measure) for _ in range(n_perm)])
    tol = 1e-10 * max(1.0, abs(obs))
    p = (1 + int(np.sum(null >= obs - tol if sim else null <= obs + tol))) / (1 + n_perm)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), size=len(x))
        boots.append(similarity(x[idx], y[idx], measure))
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return obs, p, lo, hi


def test_uncertainty_and_cli_outputs(stores, tmp_path):
    """p-values and intervals in the CLI's JSON equal the procedure recomputed by hand."""
    a, b = stores["vit"], stores["r18"]
    res = run_cli("compare", a.path, b.path, "--measure", "procrustes,cka_biased", "--layers-a", "blocks.11",
                  "--layers-b", "layer4.1", "--null", "19", "--bootstrap", "20", "--out", str(tmp_path / "c.json"),
                  "--plot", str(tmp_path / "c.png"), "--tokens", "mean", "--quiet")
    assert res.exit_code == 0, res.output
    fx = layer_features(a, "blocks.11", tokens="mean", dtype=torch.float64).numpy()
    fy = layer_features(b, "layer4.1", tokens="mean", dtype=torch.float64).numpy()
    for m, array_measure in (("procrustes", "procrustes"), ("cka_biased", "cka")):
        d = json.loads((tmp_path / f"c_{m}.json").read_text())
        assert d["measure"] == m and d["spec"]["kind"] == MEASURES[array_measure].kind and d["null"] == 19
        with _no_fail():
            obs, p, lo, hi = _reference_uncertainty(fx, fy, array_measure, 19, 20)
        assert d["values"][0][0] == pytest.approx(obs, abs=1e-10)
        assert d["p_values"][0][0] == pytest.approx(p, abs=1e-12)
        assert d["ci_low"][0][0] == pytest.approx(lo, abs=1e-9) and d["ci_high"][0][0] == pytest.approx(hi, abs=1e-9)
        assert (tmp_path / f"c_{m}.png").read_bytes()[:4] == b"\x89PNG"
    assert "distance: lower = more similar" in res.output


def test_uncertainty_on_hand_built_cases():
    """Known answers: Y = a rotated, scaled, shifted X is more alike than every shuffle (p = 1 / (1 + R)) and every
    resample gives the identity value (a zero-width interval there); an independent Y is not significant."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((30, 5))
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    y = 3.0 * x @ q + 1.0
    for m in ("procrustes", "cka"):
        ident = MEASURES[m].identity_value
        null = permutation_null(x, y, m, n_perm=19, seed=0)
        assert null["observed"] == pytest.approx(ident, abs=1e-6) and null["p_value"] == pytest.approx(1 / 20)
        boot = bootstrap_interval(x, y, m, n_boot=10, seed=0)
        assert boot["low"] == pytest.approx(ident, abs=1e-6) and boot["high"] == pytest.approx(ident, abs=1e-6)
        assert permutation_null(x, rng.standard_normal((30, 5)), m, n_perm=99, seed=0)["p_value"] > 0.05


def test_errors(stores):
    a, c = stores["vit"], stores["vit24"]
    assert_one_line_error(run_cli("compare", a.path, "--measure", "nope", "--quiet"), "unknown measure")
    assert_one_line_error(run_cli("compare", a.path, c.path, "--quiet"), "different samples")
    res = run_cli("compare", a.path, c.path, "--align", "ids", "--layers-a", "blocks.0", "--layers-b", "blocks.0",
                  "--quiet")
    assert res.exit_code == 0 and "n=24" in res.output


def test_all_sample_measures_refuse_what_would_not_fit_in_memory(stores, monkeypatch):
    """A's layers are held whole: with tokens=flatten two token layers of vit (40 images, 5 x 192 each) and
    B's widest need 40 x 3 x 960 x 8 B = 0.9 MB, refused in one line naming the way out under a 256 KiB
    budget; tokens=mean (40 x 3 x 192 x 8 B = 184 kB) fits."""
    import repsim.measures.compare as compare

    monkeypatch.setattr(compare, "default_memory_budget", lambda: 2**18)
    a = stores["vit"]
    layers = [ly for ly in a.layers if ly.startswith("blocks.")][:2]
    with pytest.raises(UsageError, match=r"cka_biased on all n=40 samples with tokens=flatten holds .* GiB .*--tokens mean"):
        compare_matrix(a, measure="cka_biased", tokens="flatten", layers_a=layers, progress=False)
    assert compare_matrix(a, measure="cka_biased", tokens="mean", layers_a=layers, progress=False).n == 40


def test_python_api_refuses_a_store_with_damaged_metadata(stores, tmp_path):
    """compare_matrix (not only the CLI) refuses a store whose chunk digests are lost: no numbers."""
    import pathlib
    import shutil

    copy = tmp_path / "vit.zarr"
    shutil.copytree(stores["vit"].path, copy)
    (pathlib.Path(copy) / "progress" / "chunk_digest" / "zarr.json").unlink()
    with pytest.raises(UsageError, match="progress/chunk_digest"):
        compare_matrix(open_store(str(copy)), measure="procrustes", progress=False)
