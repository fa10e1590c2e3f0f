"""Stores behind fsspec URLs (memory:// here; s3:// and gs:// work the same with their fsspec packages)."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest

from conftest import VIT_TINY_ARGS, assert_one_line_error, run_cli, run_killed_after_chunks
from repsim import cka_matrix, open_store
from repsim.errors import UsageError
from repsim.store.verify import verify_store

ARGS = VIT_TINY_ARGS  # the options of the local store: the same command writes it to a URL below


@pytest.fixture(scope="module")
def stores(vit_tiny_store):
    """The session's local ViT store, and a copy of it behind a memory:// URL."""
    local = vit_tiny_store
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


def test_remote_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("REPSIM_STAGING_DIR", str(tmp_path / "staging"))
    assert_one_line_error(run_cli("info", "memory://nowhere/x.zarr"), "no repsim store")
    assert_one_line_error(run_cli("extract", *ARGS, "--out", "memory://x/y.zarr", "--shard", "0/2"),
                          "shared file-system path")
    fsspec.filesystem("memory").pipe("/junk/j.zarr/object", b"not a store")
    assert_one_line_error(run_cli("extract", *ARGS, "--out", "memory://junk/j.zarr"), "not a repsim store")


def test_extract_to_url_stages_resumes_and_uploads(stores, tmp_path, monkeypatch):
    """--out URL: staged locally (a kill resumes there), uploaded data-first once complete, bit-identical."""
    from hooks.extract.loop import plan_extraction
    from hooks.models.registry import load_model
    from repsim.store.remote import staging_path
    from repsim.data.sources import open_dataset

    local, _ = stores
    monkeypatch.setenv("REPSIM_STAGING_DIR", str(tmp_path / "staging"))
    url = "memory://repsim-out/staged.zarr"
    model = load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=32)
    source = open_dataset("shapes", n=24, seed=0, image_size=32)
    plan = plan_extraction(model, source, url, batch_size=8, chunk_size=8)
    assert plan.remote == url and plan.out == staging_path(url)
    run_killed_after_chunks(plan, 1)  # killed after one chunk
    assert not fsspec.filesystem("memory").exists("/repsim-out/staged.zarr")  # nothing uploaded yet
    res = run_cli("extract", *ARGS, "--chunk-size", "8", "--out", url)  # the same command resumes and uploads
    assert res.exit_code == 0 and f"wrote {url}" in res.output
    a, r = open_store(local), open_store(url)
    assert r.complete and verify_store(r).ok and r.ids == a.ids
    for layer in a.layers:
        np.testing.assert_array_equal(r.read(layer), a.read(layer))
    assert not (tmp_path / "staging" / staging_path(url).rsplit("/", 1)[-1]).exists()  # staging removed
    assert "already complete" in run_cli("extract", *ARGS, "--chunk-size", "8", "--out", url).output


def test_interrupted_upload_is_not_a_store_and_reuploads(stores, tmp_path, monkeypatch):
    from repsim.store import remote as remote_output

    monkeypatch.setenv("REPSIM_STAGING_DIR", str(tmp_path / "staging"))
    url = "memory://repsim-out/interrupted.zarr"
    real_put = fsspec.implementations.memory.MemoryFileSystem.put
    calls = []

    def put_data_only(self, lpaths, rpaths, *args, **kwargs):
        calls.append(len(lpaths))
        if any(p.endswith("zarr.json") for p in rpaths):
            raise OSError("connection reset")  # the metadata upload dies
        return real_put(self, lpaths, rpaths, *args, **kwargs)

    monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "put", put_data_only)
    res = run_cli("extract", *ARGS, "--out", url)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 1 and len(errors) == 1 and "connection reset" in errors[0], res.output
    assert "rerun the same command" in errors[0] and "Traceback" not in res.output
    assert calls and fsspec.filesystem("memory").ls("/repsim-out/interrupted.zarr")  # data objects are there
    with pytest.raises(UsageError, match=f"no repsim store at {url}"):
        open_store(url)  # but without its metadata it is no store
    monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "put", real_put)
    res = run_cli("extract", *ARGS, "--out", url)  # staged store still there: uploads again, no re-extraction
    assert res.exit_code == 0, res.output
    assert open_store(url).complete and remote_output.is_store(url)
