"""Stores behind fsspec URLs (memory:// here; s3:// and gs:// work the same with their fsspec packages)."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from repsim import cka_matrix, open_store
from repsim.verify import verify_store

ARGS = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--data", "shapes",
        "--n", "24", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    local = str(tmp_path_factory.mktemp("remote") / "v.zarr")
    assert run_cli("extract", *ARGS, "--out", local).exit_code == 0
    url = "memory://repsim-test/v.zarr"
    fs = fsspec.filesystem("memory")
    fs.put(local, "/repsim-test/v.zarr", recursive=True)
    return local, url


def test_remote_store_reads_like_local(stores):
    local, url = stores
    a, r = open_store(local), open_store(url)
    assert r.path == url and r.layers == a.layers and r.fingerprint == a.fingerprint and r.complete
    np.testing.assert_array_equal(r.read("blocks.3"), a.read("blocks.3"))
    assert verify_store(r).ok and r.nbytes_on_disk() > 0
    np.testing.assert_allclose(cka_matrix(r, a, batch_size=8, progress=False).values,
                               cka_matrix(a, a, batch_size=8, progress=False).values, atol=1e-12)


def test_remote_store_cli_and_dask_threads(stores, tmp_path):
    local, url = stores
    res = run_cli("info", url)
    assert res.exit_code == 0 and "complete" in res.output
    assert run_cli("verify", url, "--quiet").exit_code == 0
    distributed = pytest.importorskip("dask.distributed")
    # memory:// lives in this process: a threads-only cluster shares it (real clusters use s3:// etc.)
    with distributed.LocalCluster(n_workers=2, processes=False, dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        r = open_store(url)
        got = cka_matrix(r, batch_size=8, progress=False, client=client).values
    np.testing.assert_allclose(got, cka_matrix(open_store(local), batch_size=8, progress=False).values, atol=1e-10)


def test_remote_errors(tmp_path):
    assert_one_line_error(run_cli("info", "memory://nowhere/x.zarr"), "no repsim store")
    assert_one_line_error(run_cli("extract", *ARGS, "--out", "memory://x/y.zarr"), "file-system path")
