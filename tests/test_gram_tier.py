"""The Gram tier (``extract --grams``): stored U-centred Grams give the same minibatch CKA as the activations.

References are independent of the engine: numpy float64 U-centring (``u_centre_np`` of ``gram_linear``) of the
stored activations, and an in-memory minibatch accumulation over the same consecutive batches.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import zarr

from conftest import assert_one_line_error, run_cli
from hooks.extract.loop import extract
from hooks.models.registry import load_model
from repsim import cka_matrix, open_store
from repsim.measures.cka_engine import MinibatchCKA, NumericalError, contiguous_plan, gram_linear, u_centre_np
from repsim.data.sources import open_dataset
from repsim.errors import UsageError
from repsim.measures.gram import pack_triu, unpack_triu

CS = 16  # chunk rows = Gram batch


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grams")
    torch.manual_seed(0)
    vit = load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=32)
    res = load_model("timm:resnet18", random_init=True, img_size=32)
    out = {}
    for n in (70, 67):  # last chunk of 6 rows (kept) and of 3 rows (too few for the unbiased HSIC)
        src = open_dataset("shapes", n=n, seed=0, image_size=32)
        out[f"vit{n}"] = extract(vit, src, str(tmp / f"vit{n}.zarr"), batch_size=8, chunk_size=CS, grams=True,
                                 layers=["blocks.1", "blocks.3", "head"])
        out[f"res{n}"] = extract(res, src, str(tmp / f"res{n}.zarr"), batch_size=8, chunk_size=CS, grams=True,
                                 layers=["layer1.0", "layer3.1", "fc"])
    src = open_dataset("shapes", n=70, seed=0, image_size=32)
    out["res70_only"] = extract(res, src, str(tmp / "res_only.zarr"), batch_size=8, chunk_size=CS, grams=True,
                                acts=False, layers=["layer1.0", "layer3.1", "fc"])
    out["res70_plain"] = extract(res, src, str(tmp / "res_plain.zarr"), batch_size=8, chunk_size=CS,
                                 layers=["layer1.0", "layer3.1", "fc"])
    return out


def test_stored_gram_is_the_u_centred_gram_of_the_stored_rows(stores):
    s = stores["vit70"]
    for chunk, m in ((0, CS), (4, 6)):
        x = s.read("blocks.3", chunk * CS, chunk * CS + m).astype(np.float64).reshape(m, -1)
        ref = u_centre_np(gram_linear(x))
        packed = np.asarray(s.read_grams("blocks.3", chunk, chunk + 1)[0], dtype=np.float64)
        got = unpack_triu(torch.from_numpy(packed[: m * (m - 1) // 2]), m).numpy()
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
        assert not packed[m * (m - 1) // 2:].any()  # the unused tail of a short chunk is 0


def _reference_minibatch(a, b, rows_used):
    """In-memory minibatch CKA over consecutive batches of CS rows of the stored activations."""
    acc = MinibatchCKA(len(a.layers), len(b.layers))
    for lo in range(0, rows_used, CS):
        hi = min(lo + CS, rows_used)
        acc.update_features([a.read(ly, lo, hi) for ly in a.layers], [b.read(ly, lo, hi) for ly in b.layers],
                            gram_dtype="float64")
    return acc.result()


@pytest.mark.parametrize("n", [70, 67])
def test_gram_path_equals_activation_path(stores, n):
    a, b = stores[f"vit{n}"], stores[f"res{n}"]
    g = cka_matrix(a, b, batch_size=CS, progress=False, device="cpu")
    assert g.source == "grams" and g.plan == "contiguous"
    used = 64 if n == 67 else 70
    assert g.rows_used == used and a.gram_info["rows_used"] == used
    np.testing.assert_allclose(g.values, _reference_minibatch(a, b, used), atol=1e-6)
    if n == 70:
        act = cka_matrix(a, b, batch_size=CS, progress=False, device="cpu", source="activations")
        assert act.source == "activations" and act.plan == "contiguous"
        np.testing.assert_allclose(g.values, act.values, atol=1e-6)
        within = cka_matrix(a, batch_size=CS, progress=False, device="cpu")
        within_act = cka_matrix(a, batch_size=CS, progress=False, device="cpu", source="activations")
        assert within.source == "grams"
        np.testing.assert_allclose(within.values, within_act.values, atol=1e-6)
        np.testing.assert_allclose(np.diag(within.values), 1.0, atol=1e-12)


def test_gram_only_store(stores):
    only, full = stores["res70_only"], stores["res70"]
    assert not only.has_acts and only.gram_info["source_dtype"] == "float32"
    assert not os.path.exists(os.path.join(only.path, "acts"))
    with pytest.raises(UsageError, match="Gram matrices only"):
        only.read("fc")
    assert only.layer_info("layer1.0")["shape"] == full.layer_info("layer1.0")["shape"]
    g = cka_matrix(stores["vit70"], only, batch_size=CS, progress=False, device="cpu")
    act = cka_matrix(stores["vit70"], full, batch_size=CS, progress=False, device="cpu", source="activations")
    # float32 Grams vs Grams of the float16-stored activations: equal up to float16 rounding
    np.testing.assert_allclose(g.values, act.values, atol=5e-3)
    with pytest.raises(UsageError, match="only Grams"):
        cka_matrix(stores["vit70"], only, batch_size=8, progress=False, device="cpu")
    assert_one_line_error(run_cli("probe", only.path, "--quiet"), "Gram matrices only")


def test_grams_refused_when_they_cannot_serve(stores):
    a, b = stores["vit70"], stores["res70"]
    for kw, why in (({"batch_size": 8}, "batch"), ({"tokens": "mean"}, "tokens"),
                    ({"repeats": 2}, "repeats"), ({"estimator": "exact"}, "minibatch")):
        with pytest.raises(UsageError, match=why):
            cka_matrix(a, b, progress=False, device="cpu", source="grams", **({"batch_size": CS} | kw))
        r = cka_matrix(a, b, progress=False, device="cpu", **({"batch_size": CS} | kw))  # auto falls back
        assert r.source == "activations"
    with pytest.raises(UsageError, match="no Grams"):
        cka_matrix(a, stores["res70_plain"], batch_size=CS, progress=False, device="cpu", source="grams")


def test_damaged_gram_chunk_never_yields_a_number(stores, tmp_path):
    import shutil

    path = str(tmp_path / "dmg.zarr")
    shutil.copytree(stores["res70"].path, path)
    chunk_dir = os.path.join(path, "grams", "fc", "c", "2")
    shutil.rmtree(chunk_dir)  # a lost chunk reads as the fill value, NaN, never as 0
    assert np.isnan(zarr.open_array(os.path.join(path, "grams", "fc"), mode="r")[2]).all()
    with pytest.raises((UsageError, NumericalError), match="damaged"):
        cka_matrix(stores["vit70"], open_store(path), batch_size=CS, progress=False, device="cpu")


def test_cli_says_which_path_and_how_to_make_it_cheaper(stores):
    res = run_cli("cka", stores["vit70"].path, stores["res70"].path, "--batch-size", str(CS))
    assert res.exit_code == 0, res.output
    assert "from the stored Grams" in res.output and "tip:" not in res.output
    res = run_cli("cka", stores["vit70"].path, stores["res70_plain"].path, "--batch-size", str(CS))
    assert res.exit_code == 0, res.output
    assert "from the stored activations" in res.output and "tip: extract with --grams" in res.output
    assert_one_line_error(run_cli("cka", stores["vit70"].path, stores["res70"].path, "--batch-size", "8",
                                  "--source", "grams", "--quiet"), "batch")


def test_contiguous_plan_partitions_rows():
    for n, b in ((70, 16), (67, 16), (64, 16), (5, 16), (9, 4)):
        plan = contiguous_plan(n, b)
        rows = np.concatenate([bt for g in plan for bt in g.batches])
        np.testing.assert_array_equal(rows, np.arange(n))
        sizes = [len(bt) for g in plan for bt in g.batches]
        assert min(sizes) >= 4 and all(s == b for s in sizes[:-1]) and sizes[-1] < b + 4


def test_pack_roundtrip():
    rng = np.random.default_rng(0)
    k = u_centre_np(gram_linear(rng.standard_normal((9, 5))))
    k = (k + k.T) / 2
    t = torch.from_numpy(k)
    np.testing.assert_array_equal(unpack_triu(pack_triu(t, 9), 9).numpy(), k)
    assert abs(2 * float(pack_triu(t, 9) @ pack_triu(t, 9)) - float((k * k).sum())) < 1e-9
