"""`repsim probe` end to end on stores of the labelled `shapes` data set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_drawn_png, assert_one_line_error, run_cli
from repsim import open_store

ARGS = ["--random-init", "--img-size", "32", "--data", "shapes", "--n", "120", "--batch-size", "40", "--quiet"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    out = []
    for name, model in (("r18", "timm:resnet18"), ("vit", "timm:vit_tiny_patch16_224")):
        path = str(root / f"{name}.zarr")
        assert run_cli("extract", "--model", model, *ARGS, "--pool", "mean", "--out", path).exit_code == 0
        out.append(path)
    return out


def _split(store, seed: int = 0, split: float = 0.2, val_fraction: float | None = 0.2):
    """(train, val, test) rows of the probe protocol: per-class stratified hold-outs (probes.features)."""
    from probes.features import SPLIT_STREAMS, stratified_holdout

    y = store.labels
    fit, test = stratified_holdout(y, split, seed, SPLIT_STREAMS["test"])
    if val_fraction is None:
        return fit, np.zeros(0, dtype=np.int64), test
    keep, held = stratified_holdout(y[fit], val_fraction, seed, SPLIT_STREAMS["val"])
    return fit[keep], fit[held], test


def _ridge_sklearn(X, y, train, val, test, lambdas) -> float:
    """The ridge probe with scikit-learn: z-scored features (StandardScaler), Ridge(alpha = lambda * n) on one-hot
    targets, arg-max class; lambda with the best validation top-1 (ties: the larger), refit on train + val."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    fit_rows = np.concatenate([train, val])
    classes = np.unique(y[fit_rows])
    onehot = (y[:, None] == classes[None, :]).astype(np.float64)

    def predict(rows, lam, query):
        scaler = StandardScaler().fit(X[rows])
        model = Ridge(alpha=lam * len(rows)).fit(scaler.transform(X[rows]), onehot[rows])
        return classes[model.predict(scaler.transform(X[query])).argmax(axis=1)]

    val_top1 = [np.mean(predict(train, lam, val) == y[val]) for lam in lambdas]
    best = max(range(len(lambdas)), key=lambda i: (val_top1[i], lambdas[i]))
    return float(np.mean(predict(fit_rows, lambdas[best], test) == y[test]))


def test_probe_json_and_plot(stores, tmp_path):
    from sklearn.neighbors import KNeighborsClassifier

    res = run_cli("probe", *stores, "--method", "ridge", "--out", str(tmp_path / "p.json"),
                  "--plot", str(tmp_path / "p.png"), "--quiet")
    assert res.exit_code == 0, res.output
    for i, path in enumerate(stores):
        d = json.loads((tmp_path / f"p_{i}.json").read_text())
        s = open_store(path)
        train, val, test = _split(s)
        assert d["kind"] == "repsim.probe" and d["protocol"]["n_test"] == 24 == len(test)
        lambdas = d["protocol"]["lambdas"]
        assert len(lambdas) == 45 and lambdas[0] == pytest.approx(1e-6) and lambdas[-1] == pytest.approx(1e5)
        ref = {layer: _ridge_sklearn(s.read(layer).astype(np.float64), s.labels, train, val, test, lambdas)
               for layer in s.layers}
        assert {r["layer"]: r["top1"] for r in d["rows"]} == pytest.approx(ref, abs=1e-12), path
        assert d["best_layer"] == max(s.layers, key=lambda layer: (ref[layer], -s.layers.index(layer)))
        assert max(ref.values()) > 1.5 / 8  # better than chance somewhere: the comparison has teeth
    assert_drawn_png(tmp_path / "p.png")
    # k-NN on two layers: top-1 from scikit-learn's weighted k-NN (cosine, votes exp(cos / T)), best layer its max
    s = open_store(stores[0])
    res = run_cli("probe", stores[0], "--method", "knn", "--k", "10", "--temperature", "0.005", "--layers",
                  "layer3.1,layer4.1",
                  "--out", str(tmp_path / "k.json"), "--quiet")
    assert res.exit_code == 0, res.output
    fit, _, test = _split(s, val_fraction=None)
    ref = {}
    for layer in ("layer3.1", "layer4.1"):
        X = s.read(layer).astype(np.float64)
        knn = KNeighborsClassifier(n_neighbors=10, metric="cosine", algorithm="brute",
                                   weights=lambda dist: np.exp((1.0 - dist) / 0.005)).fit(X[fit], s.labels[fit])
        ref[layer] = float(np.mean(knn.predict(X[test]) == s.labels[test]))
    d = json.loads((tmp_path / "k.json").read_text())
    assert {r["layer"]: r["top1"] for r in d["rows"]} == pytest.approx(ref, abs=1e-12)
    best = max(("layer3.1", "layer4.1"), key=lambda layer: (ref[layer], layer == "layer3.1"))
    assert f"best layer: {best}" in res.output and d["best_layer"] == best


def test_probe_errors(stores):
    assert_one_line_error(run_cli("probe", stores[0], "--features", "cls", "--layers", "layer4.1", "--quiet"),
                          "cls")
    assert_one_line_error(run_cli("probe", stores[0], "--test-store", stores[1], "--quiet"), "same samples")


def test_localize_cli(tmp_path):
    out = str(tmp_path / "v.zarr")
    assert run_cli("extract", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "64",
                   "--data", "shapes", "--n", "48", "--batch-size", "16", "--layers", "blocks.0,blocks.11",
                   "--save-inputs", "--out", out, "--quiet").exit_code == 0
    res = run_cli("localise", out, "--out", str(tmp_path / "l.json"), "--plot", str(tmp_path / "l.png"), "--quiet")
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "l.json").read_text())
    rows = {r["layer"]: r for r in d["rows"]}
    assert set(rows) == {"blocks.0", "blocks.11"} and d["protocol"]["n_images"] == 48
    # token-vs-patch CKA by hand (Raghu et al. 2021, Sec. 7): biased linear CKA in numpy between the token at
    # grid position p and the stored input pixels of the 16 x 16 patch q, for all p, q of the 4 x 4 grid
    s = open_store(out)
    x = s.read_inputs(0, 48).astype(np.float64)
    patches = [x[:, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16].reshape(48, -1) for i in range(4) for j in range(4)]

    def linear_cka(a, b):
        a, b = a - a.mean(0), b - b.mean(0)
        return np.sum((a.T @ b) ** 2) / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b))

    for layer, row in rows.items():
        tokens = s.read(layer).astype(np.float64)[:, 1:]  # the CLS token has no patch
        m = np.array([[linear_cka(tokens[:, p], patches[q]) for q in range(16)] for p in range(16)])
        own, other = np.mean(np.diag(m)), np.mean(m[~np.eye(16, dtype=bool)])
        assert row["own"] == pytest.approx(own, abs=1e-9) and row["other"] == pytest.approx(other, abs=1e-9)
        assert row["score"] == pytest.approx(own - other, abs=1e-9)
        assert row["argmax_fraction"] == pytest.approx(np.mean(m.argmax(axis=1) == np.arange(16)), abs=1e-12)
        assert row["position_chance"] == 1 / 16
    assert_drawn_png(tmp_path / "l.png")
    res = run_cli("localise", out, "--no-cka", "--objects", "--pointing", "ig", "--pointing-images", "4",
                  "--class-tokens", "--out", str(tmp_path / "o.json"), "--quiet")
    assert res.exit_code == 0, res.output
    objects = json.loads((tmp_path / "o_objects.json").read_text())
    assert objects["kind"] == "repsim.object_localization" and len(objects["rows"]) == 2
    game = json.loads((tmp_path / "o_pointing.json").read_text())["games"]["ig"]
    # the CLI reports the library's pointing game (tested against IG by hand in test_object_localisation) on
    # the store's first 4 images, and its accuracy is the share of hits
    from hooks.gradients.attribution import store_pointing_game

    lib = store_pointing_game(s, "ig", n=4)
    assert game["n"] == 4 and (game["targets"], game["hits"]) == (lib["targets"], lib["hits"])
    assert game["accuracy"] == pytest.approx(np.mean(lib["hits"]))
    tokens = json.loads((tmp_path / "o_class_tokens.json").read_text())
    assert tokens["layers"] == ["blocks.0", "blocks.11"] and set(tokens["accuracy"]) >= {"centre", "cls", "mean"}
    plain = str(tmp_path / "p.zarr")
    assert run_cli("extract", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "64",
                   "--data", "shapes", "--n", "16", "--batch-size", "16", "--layers", "blocks.0",
                   "--out", plain, "--quiet").exit_code == 0
    assert_one_line_error(run_cli("localise", plain, "--quiet"), "--save-inputs")
    assert run_cli("localise", plain, "--no-cka", "--quiet").exit_code == 0
