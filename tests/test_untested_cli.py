"""Public behaviour that had no test (issue 18): each test fails when the behaviour breaks.

Swin attention statistics in a store against numpy on the captured windows; ``--spatial-pool`` against a hand
pooling of the unpooled store; ``cka --kernel rbf`` against a numpy RBF CKA; ``probe --test-store`` against
scikit-learn; ``--workers 0`` and ``--scheduler`` (a loopback Dask cluster); ``extract --force`` / ``--strict``;
``layers --all``.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from repsim import open_store

TINY = pathlib.Path(__file__).resolve().parent / "user_models" / "tiny.py"
DATA = ["--data", "shapes", "--offline"]


# -- Swin attention statistics written to a store ----------------------------------------------------------------
def _swin_statistics_by_hand(model, x: torch.Tensor) -> dict[str, dict[str, np.ndarray]]:
    """Per image x head statistics of every Swin block, from the captured window probabilities, in numpy.

    Each window token's stage-grid position comes from the capture (shift undone); for every query the mean
    distance is sum_k p_qk * ||pos_q - pos_k|| * stride (px), the entropy -sum_k p_qk ln p_qk; every window
    has ws^2 queries, so the per-image value is the mean over all queries of all windows. Aligned maps: p_qk
    summed at canvas cell (pos_k - pos_q) + (gh - 1, gw - 1) over queries, windows and images.
    """
    from hooks.capture.attention import AttentionCapture

    with torch.no_grad(), AttentionCapture(model) as cap:
        model(x)
    out = {}
    for path, (rec,) in cap.records.items():
        p = rec.probs.double().numpy()  # (B, nW, H, N, N)
        pos = rec.positions.numpy().astype(np.float64)  # (nW, N, 2)
        assert not rec.padded.any()
        stride = np.asarray(rec.patch_size, dtype=np.float64)
        gh, gw = rec.grid
        delta = pos[:, None, :, :] - pos[:, :, None, :]  # (nW, N_q, N_k, 2): key minus query
        dist = np.sqrt(((delta * stride) ** 2).sum(-1))
        d = np.einsum("bwhqk,wqk->bhwq", p, dist)
        ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)  # (B, nW, H, N)
        canvas = np.zeros((p.shape[2], 2 * gh - 1, 2 * gw - 1))
        cells = (delta + np.array([gh - 1, gw - 1])).astype(int)
        for w in range(p.shape[1]):
            for q in range(p.shape[3]):
                np.add.at(canvas, (slice(None), cells[w, q, :, 0], cells[w, q, :, 1]),
                          p[:, w, :, q, :].sum(0))
        out[path] = {"distance": d.reshape(*d.shape[:2], -1).mean(-1), "entropy": ent.mean(axis=(1, 3)),
                     "prefix_mass": np.zeros(d.shape[:2]), "aligned": canvas}
    return out


@pytest.mark.slow
def test_swin_attention_statistics_in_the_store_equal_numpy_on_the_captured_windows(tmp_path):
    from hooks.gradients.erf import store_images
    from hooks.models.registry import reload_model

    out = str(tmp_path / "swin.zarr")
    res = run_cli("extract", "--model", f"py:{TINY}:swin", "--random-init", "--img-size", "56", *DATA, "--n", "6",
                  "--batch-size", "3", "--chunk-size", "3", "--layers", "head.fc", "--attention", "--quiet",
                  "--out", out)
    assert res.exit_code == 0, res.output
    s = open_store(out)
    names = [f"layers.{i}.blocks.{j}.attn" for i in range(2) for j in range(2)]
    assert s.attention_layers == names
    info = s.attention_info("layers.0.blocks.1.attn")
    assert (info["grid"], info["patch_size"], info["window_size"], info["shift_size"]) == (
        [14, 14], [4, 4], [7, 7], [3, 3])
    loaded = reload_model(s.attrs, trust_code=True)  # the same seeded random init
    x = store_images(s, s.n, loaded.preprocessing.transform())
    ref = _swin_statistics_by_hand(loaded.module, x)
    assert sorted(ref) == names
    for layer in names:
        for stat in ("distance", "entropy", "prefix_mass"):
            np.testing.assert_allclose(s.read_attention(layer, stat), ref[layer][stat], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{layer} {stat}")
        aligned = s.read_attention(layer, "aligned")  # (n_chunks, heads, 2gh-1, 2gw-1): per-chunk sums
        assert aligned.shape[0] == 2
        np.testing.assert_allclose(aligned.sum(0), ref[layer]["aligned"], rtol=1e-5, atol=1e-4, err_msg=layer)
    # the statistics have teeth: shifted windows are not the unshifted ones, and not uniform attention
    d0 = s.read_attention("layers.0.blocks.0.attn", "distance")
    assert np.ptp(d0) > 0.1


# -- shared tiny CNN stores (py: factory, float32) -----------------------------------------------------------------
CNN = ["--model", f"py:{TINY}:cnn_pretrained", "--random-init", "--img-size", "32", "--dtype", "float32",
       "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> dict[str, str]:
    """Stores of one seeded random CNN: ``train`` (40 shapes images, seed 0), ``pooled`` (the same with
    --spatial-pool 3), ``test`` (24 other images, seed 1)."""
    root = tmp_path_factory.mktemp("cnn")
    runs = {"train": ["--n", "40"], "pooled": ["--n", "40", "--spatial-pool", "3"],
            "test": ["--n", "24", "--seed", "1"]}
    out = {}
    for name, extra in runs.items():
        out[name] = str(root / f"{name}.zarr")
        res = run_cli("extract", *CNN, *DATA, "--layers", "conv1,conv2,head", *extra, "--out", out[name])
        assert res.exit_code == 0, res.output
    return out


def _adaptive_mean_pool(a: np.ndarray, k: int) -> np.ndarray:
    """(n, C, H, W) -> (n, C, k, k) by hand: output cell i averages input rows floor(iH/k) .. ceil((i+1)H/k) - 1
    (PyTorch's adaptive pooling bins, which overlap when k does not divide H)."""
    n, c, h, w = a.shape
    out = np.empty((n, c, k, k))
    for i in range(k):
        r0, r1 = (i * h) // k, -(-((i + 1) * h) // k)
        for j in range(k):
            c0, c1 = (j * w) // k, -(-((j + 1) * w) // k)
            out[:, :, i, j] = a[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def test_spatial_pool_equals_a_hand_pooling_of_the_unpooled_store(cnn):
    full, pooled = open_store(cnn["train"]), open_store(cnn["pooled"])
    assert full.ids == pooled.ids
    for layer, size in (("conv1", 32), ("conv2", 16)):  # 3 divides neither: overlapping bins
        assert tuple(full.layer_info(layer)["shape"]) == (8 if layer == "conv2" else 6, size, size)
        info = pooled.layer_info(layer)
        assert info["kind"] == "map" and tuple(info["grid"]) == (3, 3) and tuple(info["shape"][1:]) == (3, 3)
        np.testing.assert_allclose(pooled.read(layer), _adaptive_mean_pool(full.read(layer).astype(np.float64), 3),
                                   rtol=1e-5, atol=1e-6, err_msg=layer)
    np.testing.assert_array_equal(pooled.read("head"), full.read("head"))  # vectors are left alone
    assert pooled.attrs["extraction"]["spatial_pool"] == 3 and full.attrs["extraction"]["spatial_pool"] is None


# -- cka --kernel rbf ----------------------------------------------------------------------------------------------
def _rbf_cka_numpy(x: np.ndarray, y: np.ndarray, threshold: float) -> float:
    """Kornblith et al. (2019) RBF CKA, transcribed from their notebook: K = exp(-d² / (2 t² median d²)) over all
    n² pairs, HSIC = tr(KHLH) (biased), CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    from scipy.spatial.distance import cdist

    def gram(z):
        # squared distances summed from the differences (the notebook's |x|² + |y|² - 2xy loses ~1e-8 to
        # cancellation on features with a large mean)
        z = z.reshape(len(z), -1).astype(np.float64)
        d2 = cdist(z, z, "sqeuclidean")
        return np.exp(-d2 / (2 * threshold ** 2 * np.median(d2)))

    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ gram(x) @ h, h @ gram(y) @ h
    return float(np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


def test_cka_kernel_rbf_equals_numpy(cnn, tmp_path):
    a, b = open_store(cnn["train"]), open_store(cnn["pooled"])
    ref = np.array([[_rbf_cka_numpy(a.read(la), b.read(lb), 0.5) for lb in b.layers] for la in a.layers])
    # float64 Gram products: equal to rounding; the default float32 products (sums in float64): to 1e-6
    for gram_dtype, atol in (("float64", 1e-10), ("float32", 1e-6)):
        out = tmp_path / f"rbf_{gram_dtype}.json"
        res = run_cli("cka", a.path, b.path, "--kernel", "rbf", "--estimator", "exact", "--threshold", "0.5",
                      "--gram-dtype", gram_dtype, "--out", str(out), "--quiet")
        assert res.exit_code == 0, res.output
        d = json.loads(out.read_text())
        assert (d["kernel"], d["estimator"], d["threshold"]) == ("rbf", "exact", 0.5)
        np.testing.assert_allclose(np.asarray(d["values"]), ref, rtol=0, atol=atol, err_msg=gram_dtype)
    linear = np.array([[_rbf_cka_numpy(a.read(la), b.read(lb), 1e6) for lb in b.layers] for la in a.layers])
    assert np.abs(ref - linear).max() > 0.01  # at t = 0.5 RBF CKA differs from its wide-kernel (linear) limit
    # the minibatch estimator (the default) has no rbf kernel: one line that says which to use
    assert_one_line_error(run_cli("cka", a.path, "--kernel", "rbf", "--quiet"), "exact and debiased estimators")


# -- probe --test-store ----------------------------------------------------------------------------------------
def _knn_sklearn(x_train, y_train, x_test, k: int, temperature: float) -> np.ndarray:
    """DINO's weighted k-NN (Caron et al. 2021) with scikit-learn: cosine neighbours, votes exp(cos / T)."""
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda dist: np.exp((1.0 - dist) / temperature))
    return clf.fit(x_train, y_train).predict(x_test)


def _mean_features(store, layer: str) -> np.ndarray:
    """The probe's ``mean`` features by hand: maps averaged over positions, vectors as they are (float64)."""
    a = store.read(layer).astype(np.float64)
    return a.mean(axis=(2, 3)) if a.ndim == 4 else a


def test_probe_test_store_equals_scikit_learn(cnn, tmp_path):
    train, test = open_store(cnn["train"]), open_store(cnn["test"])
    assert not set(train.ids) & set(test.ids)
    out = tmp_path / "p.json"
    res = run_cli("probe", train.path, "--test-store", test.path, "--method", "knn", "--k", "5",
                  "--temperature", "0.1", "--out", str(out), "--quiet")
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert d["protocol"]["n_train"] == 40 and d["protocol"]["n_test"] == 24 and d["protocol"]["test"]["kind"] == "store"
    got = {r["layer"]: r["top1"] for r in d["rows"]}
    ref = {layer: float(np.mean(_knn_sklearn(_mean_features(train, layer), train.labels,
                                             _mean_features(test, layer), 5, 0.1) == test.labels))
           for layer in train.layers}
    assert got == pytest.approx(ref, abs=1e-12)
    assert d["best_layer"] == max(train.layers, key=lambda layer: (ref[layer], -train.layers.index(layer)))
    # the test store's own samples are never the training samples: the same store as its own test store is refused
    assert_one_line_error(run_cli("probe", train.path, "--test-store", train.path, "--quiet"), "same samples")


# -- --workers 0, --scheduler ------------------------------------------------------------------------------------
def test_workers_zero_is_one_line(cnn, tmp_path):
    assert_one_line_error(run_cli("cka", cnn["train"], "--workers", "0", "--quiet"), "--workers must be >= 1, got 0")
    assert_one_line_error(run_cli("extract", *CNN, *DATA, "--n", "8", "--workers", "0",
                                  "--out", str(tmp_path / "w.zarr")), "--workers must be >= 1, got 0")
    assert not (tmp_path / "w.zarr").exists()


@pytest.mark.slow
def test_scheduler_runs_cka_on_that_cluster(cnn, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    from repsim import cka_matrix

    a, b = open_store(cnn["train"]), open_store(cnn["pooled"])
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0", silence_logs=50) as cluster:
        with distributed.Client(cluster) as client:
            def tasks_seen(dask_scheduler) -> int:
                # tasks that ever finished (state_counts accumulates transitions)
                return sum(p.state_counts.get("memory", 0) for p in dask_scheduler.task_prefixes.values())

            assert client.run_on_scheduler(tasks_seen) == 0
            res = run_cli("cka", a.path, b.path, "--batch-size", "8", "--tokens", "mean", "--scheduler",
                          cluster.scheduler_address, "--out", str(tmp_path / "s.json"), "--quiet")
            assert res.exit_code == 0, res.output
            ran = client.run_on_scheduler(tasks_seen)
    assert ran >= 5  # the 5 batches of 8 rows ran as tasks on that cluster
    got = np.asarray(json.loads((tmp_path / "s.json").read_text())["values"])
    local = cka_matrix(a, b, batch_size=8, tokens="mean", progress=False)
    np.testing.assert_allclose(got, local.values, rtol=0, atol=1e-10)
    assert_one_line_error(run_cli("cka", a.path, "--scheduler", "tcp://127.0.0.1:9", "--quiet"),
                          "cannot reach the Dask scheduler at tcp://127.0.0.1:9")


# -- extract --force, --strict --------------------------------------------------------------------------------
def test_extract_force_skips_only_the_disk_check(tmp_path, monkeypatch):
    from hooks.extract.loop import ExtractionPlan

    monkeypatch.setattr(ExtractionPlan, "free_bytes", lambda self: 1000)  # a nearly full disk
    out = str(tmp_path / "f.zarr")
    args = [*CNN, *DATA, "--n", "8", "--layers", "conv1", "--out", out]
    res = run_cli("extract", *args)
    # the plan (sizes) on stdout, then the refusal as the one stderr line
    assert res.exit_code == 2 and "Traceback" not in res.output and "up to 192.0 KB in all" in res.stdout
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: the store needs up to 192.0 KB but only 1000 B is free") and "--force" in line
    assert not os.path.exists(out)
    res = run_cli("extract", *args, "--force")
    assert res.exit_code == 0, res.output
    assert open_store(out).complete and open_store(out).read("conv1").shape == (8, 6, 32, 32)


def _image_folder(root: pathlib.Path) -> pathlib.Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated: not an image")
    return root


def test_extract_strict_refuses_a_corrupt_image_that_is_otherwise_skipped(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    args = [*CNN, "--data", str(folder), "--layers", "head"]
    res = run_cli("extract", *args, "--strict", "--out", str(tmp_path / "strict.zarr"))
    assert_one_line_error(res, "corrupt image (--strict)")
    assert "3.png" in res.output and not (tmp_path / "strict.zarr").exists()
    with pytest.warns(UserWarning, match="skipping corrupt image"):
        res = run_cli("extract", *args, "--out", str(tmp_path / "lax.zarr"))
    assert res.exit_code == 0, res.output
    s = open_store(str(tmp_path / "lax.zarr"))
    assert s.n == 6 and not any(i.endswith("3.png") for i in s.ids)
    assert [d["id"] for d in s.attrs["dataset"]["skipped"]] == ["b/3.png"]


# -- layers --all ------------------------------------------------------------------------------------------------
def test_layers_all_lists_every_module_and_depth_limits(tmp_path):
    import timm

    def listed(output: str) -> list[str]:
        return [ln[2:].split()[0] for ln in output.splitlines()[2:] if ln[:2] in ("* ", "  ")]

    model = timm.create_model("resnet18", pretrained=False)
    modules = [name for name, _ in model.named_modules() if name]
    res = run_cli("layers", "timm:resnet18", "--random-init", "--img-size", "32", "--all")
    assert res.exit_code == 0, res.output
    assert sorted(listed(res.output)) == sorted(modules)  # every module once, however deep
    res = run_cli("layers", "timm:resnet18", "--random-init", "--img-size", "32")
    default = listed(res.output)
    assert "layer2.0.downsample.0" not in default and "layer2.0.conv1" in default
    assert set(default) == {m for m in modules if m.count(".") < 3}
    res = run_cli("layers", "timm:resnet18", "--random-init", "--img-size", "32", "--depth", "1")
    preset = [ln[2:].split()[0] for ln in res.output.splitlines()[2:] if ln.startswith("* ")]
    assert set(listed(res.output)) == {m for m in modules if "." not in m} | set(preset)
    assert "layer1.0" in preset and "layer1.0.conv1" not in listed(res.output)
