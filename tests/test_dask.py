"""Dask scale-out on a local cluster (2 worker processes, loopback only): distributed CKA and extraction."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import VIT_TINY_FLOAT32_ARGS, run_cli
from repsim import cka_matrix, open_store

distributed = pytest.importorskip("dask.distributed")

ARGS = ["--random-init", "--img-size", "32", "--data", "shapes", "--n", "48", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    out = []
    for name, model in (("vit", "timm:vit_tiny_patch16_224"), ("r18", "timm:resnet18")):
        path = str(root / f"{name}.zarr")
        assert run_cli("extract", "--model", model, *ARGS, "--out", path).exit_code == 0
        out.append(open_store(path))
    return out


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=":0", silence_logs=50)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.mark.slow
def test_distributed_equals_local(stores, client):
    a, b = stores
    kw = dict(batch_size=16, repeats=2, seed=3, tokens="mean", progress=False, device="cpu")
    local = cka_matrix(a, b, **kw)
    remote = cka_matrix(a, b, client=client, **kw)
    np.testing.assert_allclose(remote.values, local.values, rtol=0, atol=1e-10)
    np.testing.assert_allclose(remote.std, local.std, rtol=0, atol=1e-10)
    within_local = cka_matrix(a, **kw)
    within_remote = cka_matrix(a, client=client, **kw)
    np.testing.assert_allclose(within_remote.values, within_local.values, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_cli_workers(stores, tmp_path):
    a, b = stores
    res = run_cli("cka", a.path, b.path, "--batch-size", "16", "--tokens", "mean", "--workers", "2",
                  "--out", str(tmp_path / "w.json"), "--quiet")
    assert res.exit_code == 0, res.output
    local = cka_matrix(a, b, batch_size=16, tokens="mean", progress=False)
    import json

    got = np.asarray(json.loads((tmp_path / "w.json").read_text())["values"])
    np.testing.assert_allclose(got, local.values, rtol=0, atol=1e-10)
    res = run_cli("cka", a.path, "--estimator", "exact", "--workers", "2", "--quiet")
    assert res.exit_code == 2 and "minibatch" in res.output


class _KillFirstTask(distributed.WorkerPlugin):
    """Fault injection from the test, not the library: on each worker, wrap ``repsim.measures.cka_engine._group_sums`` so
    that the first task anywhere to claim ``marker`` (an exclusive create) kills its worker process, as a crashed
    machine would. Workers started later (the nanny's replacement) get the same wrapper; the marker is taken."""

    def __init__(self, marker: str):
        self.marker = marker

    def setup(self, worker):
        import os

        import repsim.measures.cka_engine as engine

        real, marker = engine._group_sums, self.marker

        def group_sums(*args, **kwargs):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return real(*args, **kwargs)
            os._exit(1)

        engine._group_sums = group_sums


@pytest.mark.slow
def test_killed_worker_is_retried_with_the_same_result(stores, tmp_path):
    a, b = stores
    marker = tmp_path / "killed"
    kw = dict(batch_size=16, seed=1, tokens="mean", progress=False, device="cpu")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0", silence_logs=50) as cluster, \
            distributed.Client(cluster) as c:
        c.register_plugin(_KillFirstTask(str(marker)))
        remote = cka_matrix(a, b, client=c, **kw)
    assert marker.exists()  # a worker really died mid-run
    np.testing.assert_allclose(remote.values, cka_matrix(a, b, **kw).values, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_distributed_extraction_equals_local(tmp_path, vit_tiny_float32_store):
    local, dist = vit_tiny_float32_store, str(tmp_path / "d.zarr")  # the session's store: the same command, local
    res = run_cli("extract", *VIT_TINY_FLOAT32_ARGS, "--out", dist, "--workers", "2")
    assert res.exit_code == 0, res.output
    a, b = open_store(local), open_store(dist)
    assert b.complete and a.ids == b.ids
    for layer in a.layers:
        np.testing.assert_array_equal(a.read(layer), b.read(layer))
