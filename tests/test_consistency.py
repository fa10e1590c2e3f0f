"""One interface: `repsim compare --measure cka` is `repsim cka` (same defaults, same map); compare's all-sample
CKA measures say which `repsim cka` options reproduce them; result files get the user's normal permissions."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from repsim.results import write_json_atomic

ARGS = ["--random-init", "--img-size", "32", "--data", "shapes", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    """Tiny stores with stored Grams too, so `repsim cka`'s default reads the Gram tier and `--tokens mean` the
    activations: both paths of the minibatch estimator are compared."""
    root = tmp_path_factory.mktemp("consistency")
    paths = []
    for name, model in (("vit", "timm:vit_tiny_patch16_224"), ("r18", "timm:resnet18")):
        path = str(root / f"{name}.zarr")
        res = run_cli("extract", "--model", model, *ARGS, "--grams", "--n", "24", "--out", path)
        assert res.exit_code == 0, res.output
        paths.append(path)
    return paths


LAYERS = ["--layers-a", "blocks.0,blocks.11", "--layers-b", "layer1.0,layer4.1"]


def _values(path):
    d = json.loads(path.read_text())
    return d, np.asarray(d["values"], dtype=float)


@pytest.mark.parametrize("pair", ["cross", "within"])
@pytest.mark.parametrize("extra", [[], ["--tokens", "mean"]], ids=["defaults", "tokens-mean"])
def test_compare_cka_equals_repsim_cka_by_default(two_stores, tmp_path, pair, extra):
    """Issue 13's "done when": `repsim compare --measure cka` and `repsim cka`, each with its defaults (every
    layer), write the same map (JSON, to 1e-12); so do both with the same non-default --tokens. The defaults read
    the stored Grams, tokens=mean reads the activations: both minibatch paths."""
    stores = two_stores if pair == "cross" else two_stores[:1]
    cmp = run_cli("compare", *stores, "--measure", "cka", *extra, "--out", str(tmp_path / "cmp.json"), "--quiet")
    cka = run_cli("cka", *stores, *extra, "--out", str(tmp_path / "cka.json"), "--quiet")
    assert cmp.exit_code == 0 and cka.exit_code == 0, cmp.output + cka.output
    c, cv = _values(tmp_path / "cmp.json")
    k, kv = _values(tmp_path / "cka.json")
    assert (c["layers_a"], c["layers_b"], c["n"], c["tokens"]) == (k["layers_a"], k["layers_b"], k["n"], k["tokens"])
    assert cv.shape == kv.shape == (len(k["layers_a"]), len(k["layers_b"])) and min(cv.shape) >= 8
    np.testing.assert_allclose(cv, kv, rtol=0, atol=1e-12)
    assert c["minibatch"]["source"] == k["source"] == ("activations" if extra else "grams")
    assert c["minibatch"]["n_batches"] == k["n_batches"] and c["minibatch"]["batch_size"] == k["batch_size"] == 256
    same = "`repsim cka`" if not extra else "`repsim cka --tokens mean`"
    assert f"the same map as {same}" in cmp.output, cmp.output
    assert f"tokens={k['tokens']}" in cmp.output and k["estimator"] == "minibatch"


@pytest.mark.parametrize("measure", ["cka_biased", "cka_debiased", "cka_rbf"])
@pytest.mark.parametrize("tokens", ["mean", "flatten"])
def test_all_sample_cka_names_its_estimator_and_equals_that_repsim_cka(two_stores, tmp_path, measure, tokens):
    """compare prints the `repsim cka` options of its all-sample CKA measures; running them gives the same map."""
    a, b = two_stores
    res = run_cli("compare", a, b, "--measure", measure, "--tokens", tokens, *LAYERS,
                  "--out", str(tmp_path / "cmp.json"), "--quiet")
    assert res.exit_code == 0, res.output
    line = next((ln for ln in res.output.splitlines() if "`repsim cka " in ln), None)
    assert line is not None, res.output  # the estimator is named, with the command that reproduces it
    assert "on all n=24 samples" in line and "compare's cka, is the minibatch estimator" in line
    flags = line.split("`repsim cka ", 1)[1].split("`", 1)[0].split()
    assert f"--tokens {tokens}" in " ".join(flags)
    res2 = run_cli("cka", a, b, *flags, *LAYERS, "--out", str(tmp_path / "cka.json"), "--quiet")
    assert res2.exit_code == 0, res2.output
    cmp, cv = _values(tmp_path / "cmp.json")
    cka, kv = _values(tmp_path / "cka.json")
    assert cmp["layers_a"] == cka["layers_a"] and cmp["layers_b"] == cka["layers_b"] and cmp["n"] == cka["n"]
    assert cka["estimator"] == ("debiased" if measure == "cka_debiased" else "exact")
    np.testing.assert_allclose(cv, kv, rtol=0, atol=1e-9)


def test_auto_tokens_per_measure(two_stores):
    """--tokens auto (the default): flatten for CKA measures, mean for the others; the output says which."""
    a, b = two_stores
    res = run_cli("compare", a, b, "--measure", "procrustes,cka_debiased", *LAYERS, "--quiet")
    assert res.exit_code == 0, res.output
    heads = [ln for ln in res.output.splitlines() if ln.startswith(("procrustes (", "cka_debiased ("))]
    assert len(heads) == 2 and "tokens=mean" in heads[0] and "tokens=flatten" in heads[1], heads


def test_uncertainty_is_refused_for_the_minibatch_cka(two_stores, tmp_path):
    """--null / --bootstrap need all n images at once: refused for cka in one line naming the measures that serve
    them, before any map is computed or written (even when listed after a measure that could run)."""
    a, b = two_stores
    for flag in ("--null", "--bootstrap"):
        res = run_cli("compare", a, b, "--measure", "procrustes,cka", flag, "5", *LAYERS,
                      "--out", str(tmp_path / "c.json"), "--quiet")
        assert_one_line_error(res, "cka_debiased")
    assert not list(tmp_path.iterdir())
    res = run_cli("compare", a, b, "--measure", "cka_debiased", "--null", "5", *LAYERS, "--quiet")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_json_results_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = tmp_path / f"r{umask:o}.json"
        write_json_atomic(path, {"a": 1})
        write_json_atomic(path, {"a": 2})  # replacing keeps them too
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        assert json.loads(path.read_text()) == {"a": 2}
        assert os.umask(umask) == umask  # the umask is left as it was
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    finally:
        os.umask(old)
