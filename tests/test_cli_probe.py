"""`repsim probe` end to end on stores of the labelled `shapes` data set."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli

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


def test_probe_json_and_plot(stores, tmp_path):
    res = run_cli("probe", *stores, "--method", "ridge", "--out", str(tmp_path / "p.json"),
                  "--plot", str(tmp_path / "p.png"), "--quiet")
    assert res.exit_code == 0, res.output
    for i in range(2):
        d = json.loads((tmp_path / f"p_{i}.json").read_text())
        assert d["kind"] == "repsim.probe" and d["best_layer"] in [r["layer"] for r in d["rows"]]
        assert all(0.0 <= r["top1"] <= 1.0 for r in d["rows"]) and d["protocol"]["n_test"] == 24
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    res = run_cli("probe", stores[0], "--method", "knn", "--k", "5", "--layers", "layer4.1", "--quiet")
    assert res.exit_code == 0 and "best layer: layer4.1" in res.output


def test_probe_errors(stores):
    assert_one_line_error(run_cli("probe", stores[0], "--features", "cls", "--layers", "layer4.1", "--quiet"),
                          "cls")
    assert_one_line_error(run_cli("probe", stores[0], "--test-store", stores[1], "--quiet"), "same samples")


def test_localize_cli(tmp_path):
    out = str(tmp_path / "v.zarr")
    assert run_cli("extract", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "64",
                   "--data", "shapes", "--n", "48", "--batch-size", "16", "--layers", "blocks.0,blocks.11",
                   "--save-inputs", "--out", out, "--quiet").exit_code == 0
    res = run_cli("localize", out, "--out", str(tmp_path / "l.json"), "--plot", str(tmp_path / "l.png"), "--quiet")
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "l.json").read_text())
    rows = {r["layer"]: r for r in d["rows"]}
    assert set(rows) == {"blocks.0", "blocks.11"}
    assert all(0.0 <= r["argmax_fraction"] <= 1.0 and r["position_chance"] == 1 / 16 for r in rows.values())
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
    res = run_cli("localize", out, "--no-cka", "--objects", "--pointing", "ig", "--pointing-images", "4",
                  "--class-tokens", "--out", str(tmp_path / "o.json"), "--quiet")
    assert res.exit_code == 0, res.output
    objects = json.loads((tmp_path / "o_objects.json").read_text())
    assert objects["kind"] == "repsim.object_localization" and len(objects["rows"]) == 2
    game = json.loads((tmp_path / "o_pointing.json").read_text())["games"]["ig"]
    assert game["n"] == 4 and 0.0 <= game["accuracy"] <= 1.0
    tokens = json.loads((tmp_path / "o_class_tokens.json").read_text())
    assert tokens["layers"] == ["blocks.0", "blocks.11"] and set(tokens["accuracy"]) >= {"centre", "cls", "mean"}
    plain = str(tmp_path / "p.zarr")
    assert run_cli("extract", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "64",
                   "--data", "shapes", "--n", "16", "--batch-size", "16", "--layers", "blocks.0",
                   "--out", plain, "--quiet").exit_code == 0
    assert_one_line_error(run_cli("localize", plain, "--quiet"), "--save-inputs")
    assert run_cli("localize", plain, "--no-cka", "--quiet").exit_code == 0
