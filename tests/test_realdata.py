"""Validation on real pretrained networks and real images (../shared/realdata): skipped when absent.

The CIFAR-10 ResNet-20 checkpoint (legacy torch pickle, ``module.``-prefixed keys) is loaded through the
``py:`` factory path with ``--weights``; its stored logits must classify the JPEG CIFAR-10 copy at the
accuracy its README states (about 80%), and its CKA map and ERFs must show the known structure.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from repsim import cka_matrix, open_store

REAL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "realdata"
CKPT = REAL / "cifar10-resnets" / "resnet20-12fca82f.th"
DATA = REAL / "cifar10_test_from_jpeg.npz"
FACTORY = pathlib.Path(__file__).resolve().parent / "realdata" / "cifar_resnet.py"

pytestmark = pytest.mark.skipif(not (CKPT.exists() and DATA.exists()), reason="../shared/realdata is absent")


@pytest.fixture(scope="module")
def r20(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("real") / "r20.zarr")
    res = run_cli("extract", "--model", f"py:{FACTORY}:resnet20", "--weights", str(CKPT), "--img-size", "32",
                  "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--crop-pct", "1.0",
                  "--data", str(DATA), "--n", "1000", "--pool", "gap", "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    return open_store(out)


def test_real_resnet20_accuracy_and_provenance(r20):
    logits = r20.read("linear").astype(np.float32)
    acc = float((logits.argmax(1) == r20.labels).mean())
    assert 0.75 < acc < 0.86, acc  # README: ~80% on the JPEG copy (91.8% on the original test set)
    w = r20.attrs["model"]["weights"]
    assert w["kind"] == "file" and w["file"] == str(CKPT) and len(w["sha256"]) == 64


def test_real_resnet20_cka_structure(r20, tmp_path):
    r = cka_matrix(r20, estimator="exact", progress=False)
    v = r.values
    np.testing.assert_allclose(np.diag(v), 1.0, atol=1e-9)
    # neighbours are more similar than distant layers, and the logits resemble the last block most
    assert v[0, 1] > v[0, -2] and v[-1, -2] == max(v[-1, :-1])
    res = run_cli("attention", r20.path, "--erf", "--trust-code", "--erf-images", "4", "--out", str(tmp_path / "e.json"))
    # gap-pooled layers have no maps: a clear refusal, not a number
    assert_one_line_error(res, "has no spatial-map layers (pooled with --pool, or a transformer)")
    assert not (tmp_path / "e.json").exists()
