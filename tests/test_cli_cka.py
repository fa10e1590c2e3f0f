"""`repsim cka` end to end on stores written by `repsim extract` (tiny random models, procedural data)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from repsim import cka as cka_arrays
from repsim import cka_matrix, open_store
from conftest import assert_drawn_png
from conftest import assert_one_line_error as _one_line_error
from conftest import run_cli as run

VIT = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "32"]
RESNET = ["--model", "timm:resnet18", "--random-init", "--img-size", "32"]
DATA = ["--data", "shapes", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, vit_tiny_store):
    """``vit`` and ``resnet``: 32 shapes images (seed 0); ``other``: the ViT on 24 images (the session's store)."""
    root = tmp_path_factory.mktemp("cka")
    out = {}
    for name, model, n, seed in (("vit", VIT, 32, 0), ("resnet", RESNET, 32, 0)):
        path = str(root / f"{name}.zarr")
        res = run("extract", *model, *DATA, "--n", str(n), "--seed", str(seed), "--out", path)
        assert res.exit_code == 0, res.output
        out[name] = path
    out["other"] = vit_tiny_store
    return out


def test_self_map_symmetric_unit_diagonal_json_and_plot(stores, tmp_path):
    js, png = tmp_path / "self.json", tmp_path / "self.png"
    res = run("cka", stores["vit"], "--batch-size", "16", "--out", str(js), "--plot", str(png), "--quiet")
    assert res.exit_code == 0, res.output
    d = json.loads(js.read_text())
    v = np.asarray(d["values"])
    s = open_store(stores["vit"])
    assert d["layers_a"] == d["layers_b"] == s.layers and v.shape == (len(s.layers),) * 2
    np.testing.assert_allclose(v, v.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(v), 1.0, atol=1e-9)
    assert d["estimator"] == "minibatch" and d["tokens"] == "flatten" and d["n"] == 32 and d["batch_size"] == 16
    assert d["fingerprint_a"] == d["fingerprint_b"] == s.fingerprint and d["std"] is None
    assert_drawn_png(png)


def test_cross_model_equals_array_cka_on_the_stored_rows(stores, tmp_path):
    """The store path (chunked reads, float16 up-cast, flatten) equals the array API on the same rows."""
    js = tmp_path / "x.json"
    res = run("cka", stores["vit"], stores["resnet"], "--estimator", "debiased", "--out", str(js), "--quiet")
    assert res.exit_code == 0, res.output
    d = json.loads(js.read_text())
    a, b = open_store(stores["vit"]), open_store(stores["resnet"])
    la, lb = d["layers_a"][3], d["layers_b"][-1]
    x = a.read(la).astype(np.float64).reshape(a.n, -1)
    y = b.read(lb).astype(np.float64).reshape(b.n, -1)
    ref = cka_arrays(x, y, debiased=True)
    got = d["values"][3][len(d["layers_b"]) - 1]
    assert got == pytest.approx(ref, abs=1e-6)


def test_repeats_report_std_and_python_api_agrees(stores, tmp_path):
    js = tmp_path / "r.json"
    res = run("cka", stores["vit"], stores["resnet"], "--batch-size", "8", "--repeats", "3", "--tokens", "mean",
              "--layers-a", "blocks.0,blocks.11", "--layers-b", "layer1.0", "--out", str(js), "--quiet")
    assert res.exit_code == 0, res.output
    d = json.loads(js.read_text())
    assert d["repeats"] == 3 and np.asarray(d["std"]).shape == (2, 1) and d["tokens"] == "mean"
    api = cka_matrix(open_store(stores["vit"]), open_store(stores["resnet"]), layers_a=["blocks.0", "blocks.11"],
                     layers_b=["layer1.0"], batch_size=8, repeats=3, tokens="mean", progress=False)
    np.testing.assert_allclose(api.values, d["values"], atol=1e-12)


def test_different_samples_refused_unless_align_ids(stores, tmp_path):
    _one_line_error(run("cka", stores["vit"], stores["other"], "--quiet"), "hold different samples")
    res = run("cka", stores["vit"], stores["other"], "--align", "ids", "--estimator", "exact",
              "--layers-a", "blocks.0", "--layers-b", "blocks.0", "--out", str(tmp_path / "a.json"), "--quiet")
    # n=24 with the same seed is a prefix of n=32: 24 shared ids, 8 dropped from A
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "a.json").read_text())
    assert d["n"] == 24 and d["align"] == {"align": "ids", "dropped_a": 8, "dropped_b": 0}
    a, b = open_store(stores["vit"]), open_store(stores["other"])
    ref = cka_arrays(a.read("blocks.0")[:24].astype(np.float64).reshape(24, -1),
                     b.read("blocks.0").astype(np.float64).reshape(24, -1))
    assert d["values"][0][0] == pytest.approx(ref, abs=1e-6)
    assert "8 samples dropped" in res.output


def test_bad_input_one_line_exit_2(stores, tmp_path):
    _one_line_error(run("cka", stores["vit"], "--layers-a", "blocks.99", "--quiet"), "blocks.99")
    _one_line_error(run("cka", str(tmp_path / "absent.zarr"), "--quiet"), "no store")
    _one_line_error(run("cka", stores["vit"], "--batch-size", "2", "--quiet"), "at least 4")
    _one_line_error(run("cka", stores["vit"], "--kernel", "rbf", "--quiet"), "rbf")
    _one_line_error(run("cka", stores["vit"], "--repeats", "2", "--estimator", "exact", "--quiet"), "repeats")
