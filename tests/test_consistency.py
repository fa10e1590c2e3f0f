"""One interface: `repsim compare`'s CKA measures and `repsim cka` say which estimator they are and agree
when asked for the same one; result files get the user's normal permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from conftest import run_cli
from repsim.json_output import write_json_atomic

ARGS = ["--random-init", "--img-size", "32", "--data", "shapes", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency")
    paths = []
    for name, model in (("vit", "timm:vit_tiny_patch16_224"), ("r18", "timm:resnet18")):
        path = str(root / f"{name}.zarr")
        res = run_cli("extract", "--model", model, *ARGS, "--n", "24", "--out", path)
        assert res.exit_code == 0, res.output
        paths.append(path)
    return paths


LAYERS = ["--layers-a", "blocks.0,blocks.11", "--layers-b", "layer1.0,layer4.1"]


@pytest.mark.parametrize("measure", ["cka", "cka_debiased", "cka_rbf"])
@pytest.mark.parametrize("tokens", ["mean", "flatten"])
def test_compare_cka_names_its_estimator_and_equals_that_repsim_cka(two_stores, tmp_path, measure, tokens):
    """compare prints the `repsim cka` options of its CKA measure; running them gives the same map to 1e-9."""
    a, b = two_stores
    res = run_cli("compare", a, b, "--measure", measure, "--tokens", tokens, *LAYERS,
                  "--out", str(tmp_path / "cmp.json"), "--quiet")
    assert res.exit_code == 0, res.output
    line = next((ln for ln in res.output.splitlines() if "`repsim cka " in ln), None)
    assert line is not None, res.output  # the estimator is named, with the command that reproduces it
    assert "on all n=24 samples" in line and "plain `repsim cka` is the minibatch estimator" in line
    flags = line.split("`repsim cka ", 1)[1].split("`", 1)[0].split()
    assert f"--tokens {tokens}" in " ".join(flags)
    res2 = run_cli("cka", a, b, *flags, *LAYERS, "--out", str(tmp_path / "cka.json"), "--quiet")
    assert res2.exit_code == 0, res2.output
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    cka = json.loads((tmp_path / "cka.json").read_text())
    assert cmp["layers_a"] == cka["layers_a"] and cmp["layers_b"] == cka["layers_b"] and cmp["n"] == cka["n"]
    for row_c, row_k in zip(cmp["values"], cka["values"]):
        assert row_c == pytest.approx(row_k, abs=1e-9)


def test_default_outputs_name_different_estimators(two_stores):
    """Defaults differ by design (compare: all samples, tokens mean; cka: minibatch, tokens flatten): both say so."""
    a, b = two_stores
    cmp = run_cli("compare", a, b, "--measure", "cka", *LAYERS, "--quiet")
    cka = run_cli("cka", a, b, *LAYERS, "--quiet")
    assert cmp.exit_code == 0 and cka.exit_code == 0, cmp.output + cka.output
    assert "tokens=mean" in cmp.output and "--estimator exact" in cmp.output
    assert cka.output.startswith("minibatch linear CKA, tokens=flatten")


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
