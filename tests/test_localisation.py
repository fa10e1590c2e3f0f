"""Spatial-localisation probes (probes.localise): token ↔ input-patch CKA and the position probe, on
synthetic stores with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from probes.localisation import (
    TokenPatchCKA,
    localisation_scores,
    localise,
    patch_pixels,
    patch_token_cka_matrix,
    position_probe,
    token_patch_cka,
)
from repsim.measures.cka_engine import cka
from repsim.errors import UsageError
from repsim.store.format import fingerprint_ids
from repsim.store.reader import ActivationStore
from repsim.store.writer import LayerSpec, StoreWriter
from conftest import assert_drawn_png

IMG, PATCH, D = 16, 4, 24  # 4x4 grid of 4x4-pixel patches, 48 pixel features per patch
GRID = IMG // PATCH
P = GRID * GRID


def make_store(path, acts, inputs=None, *, infos=None, chunk=32):
    n = next(iter(acts.values())).shape[0]
    ids = [f"img{i:05d}.png" for i in range(n)]
    attrs = {
        "format_version": 1,
        "model": {"name": "synthetic", "source": "test", "patch_size": PATCH, "num_prefix_tokens": 1,
                  "grid": [GRID, GRID]},
        "dataset": {"name": "fake", "root": None, "n": n, "fingerprint": fingerprint_ids(ids)},
        "preprocessing": {"img_size": [IMG, IMG]},
        "extraction": {"chunk_size": chunk, "dtype": "float32", "save_inputs": inputs is not None},
    }
    infos = infos or {}
    specs = []
    for name, a in acts.items():
        default = ({"kind": "tokens", "num_prefix_tokens": 1, "grid": [GRID, GRID]} if a.ndim == 3 else
                   {"kind": "map", "grid": list(a.shape[2:])} if a.ndim == 4 else {"kind": "vector"})
        specs.append(LayerSpec(name, tuple(a.shape[1:]), {**default, **infos.get(name, {})}))
    w = StoreWriter.create(str(path), attrs, specs, ids, np.arange(n) % 3, dtype="float32",
                           input_shape=None if inputs is None else tuple(inputs.shape[1:]))
    for c in range(-(-n // chunk)):
        rows = w.chunk_rows(c)
        w.write_chunk(c, {k: v[rows] for k, v in acts.items()},
                      inputs=None if inputs is None else inputs[rows].astype(np.float16))
    w.update_attrs(complete=True)
    return ActivationStore(str(path))


def _patches(x):
    """(n, 3, IMG, IMG) → (n, P, 3·PATCH²), row-major patches (the ViT patchify)."""
    n = x.shape[0]
    t = x.reshape(n, 3, GRID, PATCH, GRID, PATCH).transpose(0, 2, 4, 1, 3, 5)
    return t.reshape(n, P, -1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 160
    x = rng.standard_normal((n, 3, IMG, IMG)).astype(np.float16).astype(np.float32)
    pt = _patches(x)
    W = rng.standard_normal((3 * PATCH * PATCH, D)) / 7
    local = pt @ W  # each token a linear function of its own patch
    glob = np.broadcast_to(x.reshape(n, 3, -1).mean(-1) @ rng.standard_normal((3, D)), (P, n, D)).transpose(1, 0, 2)
    glob = glob + rng.standard_normal((n, 1, D)) * 0.5  # same global vector at every position
    onehot = np.tile(np.eye(P, D) * 3.0, (n, 1, 1)) + 0.3 * rng.standard_normal((n, P, D))
    shuffled = np.stack([onehot[i, rng.permutation(P)] for i in range(n)])
    cls = rng.standard_normal((n, 1, D))
    acts = {name: np.concatenate([cls, a], axis=1).astype(np.float32)
            for name, a in (("local", local), ("global", glob), ("position", onehot), ("shuffled", shuffled))}
    # a CNN-like map (C, h, w) = (D, 4, 4): the channel vector at (i, j) is the linear image of its stride cell
    acts["map"] = local.transpose(0, 2, 1).reshape(n, D, GRID, GRID).astype(np.float32)
    acts["pooled"] = rng.standard_normal((n, D)).astype(np.float32)
    store = make_store(tmp_path_factory.mktemp("loc") / "s.zarr", acts, x)
    return store, x, acts


def test_matrix_matches_repsim_cka(synthetic):
    store, x, acts = synthetic
    tok = acts["local"][:64, 1:]
    patches = patch_pixels(x[:64], (GRID, GRID))
    m = patch_token_cka_matrix(tok, patches, positions=np.array([0, 5, 15]))
    assert m.shape == (3, P)
    for k, p in enumerate([0, 5, 15]):
        for q in (0, 5, 9):
            assert m[k, q] == pytest.approx(cka(tok[:, p], patches[q]), abs=1e-10)
    assert np.allclose(patches[5], _patches(x[:64])[:, 5])


def test_local_tokens_are_localised(synthetic, tmp_path):
    store, _, _ = synthetic
    r = token_patch_cka(store, "local")
    assert isinstance(r, TokenPatchCKA) and r.matrix.shape == (P, P) and r.grid == [GRID, GRID]
    assert r.own > 0.5 and r.score > 0.35 and r.argmax_fraction == 1.0
    d = r.to_json(tmp_path / "tp.json")
    assert json.load(open(tmp_path / "tp.json"))["kind"] == "repsim.token_patch_cka"
    assert TokenPatchCKA.from_json(d).score == pytest.approx(r.score)
    fig = r.plot(tmp_path / "tp.png")
    assert_drawn_png(tmp_path / "tp.png")
    assert len(fig.axes) == 5 + 1  # corners, centre, colour bar
    assert r.map_for(0).shape == (GRID, GRID)


def test_map_layer_uses_stride_cells(synthetic):
    store, _, _ = synthetic
    r = token_patch_cka(store, "map", max_positions=6)
    assert r.kind == "map" and r.patch_px == [PATCH, PATCH] and r.matrix.shape == (6, P)
    assert r.argmax_fraction == 1.0 and r.score > 0.35
    # same numbers in a (C, h, w) map as in the equivalent patch tokens: the stride cells are the ViT patches
    t = token_patch_cka(store, "local", max_positions=6)
    assert np.allclose(r.matrix, t.matrix, atol=1e-9)


def test_global_vector_scores_zero(synthetic):
    store, _, _ = synthetic
    r = token_patch_cka(store, "global")
    assert abs(r.score) < 1e-9  # identical rows: own − other cancels exactly


def test_scores_definition():
    m = np.array([[0.9, 0.1, 0.2], [0.3, 0.8, 0.1], [0.5, 0.6, 0.4]])
    s = localisation_scores(m)
    assert s["own"] == pytest.approx(0.7)
    assert s["other"] == pytest.approx(np.mean([0.15, 0.2, 0.55]))
    assert s["score"] == pytest.approx(s["own"] - s["other"])
    assert s["argmax_fraction"] == pytest.approx(2 / 3)


def test_position_probe(synthetic):
    store, _, _ = synthetic
    pos = position_probe(store, "position", seed=0)
    assert pos.accuracy > 0.99 and pos.chance == 1 / P
    assert pos.n_test_images == 32 and pos.n_train_images + pos.n_val_images == 128
    shuf = position_probe(store, "shuffled", seed=0)
    assert shuf.accuracy < 3 * shuf.chance  # chance 1/16


def test_refuses_store_without_inputs(tmp_path):
    rng = np.random.default_rng(1)
    store = make_store(tmp_path / "noin.zarr", {"t": rng.standard_normal((20, 1 + P, D)).astype(np.float32)})
    with pytest.raises(UsageError, match="--save-inputs"):
        token_patch_cka(store, "t")
    with pytest.raises(UsageError, match="--save-inputs"):
        localise(store)
    res = localise(store, cka=False)  # the position probe alone needs no pixels
    assert res.rows[0].score is None and res.rows[0].position_accuracy is not None


def test_refuses_layers_without_positions(synthetic, tmp_path):
    store, _, _ = synthetic
    with pytest.raises(UsageError, match="no spatial positions"):
        token_patch_cka(store, "pooled")
    rng = np.random.default_rng(2)
    s2 = make_store(tmp_path / "nogrid.zarr", {"t": rng.standard_normal((8, 1 + P, D)).astype(np.float32)},
                    infos={"t": {"grid": None}})
    with pytest.raises(UsageError, match="grid"):
        position_probe(s2, "t")


def test_localize_all_layers(synthetic, tmp_path):
    store, _, _ = synthetic
    res = localise(store, images=128, max_positions=8, device="cpu")
    assert res.layers == ["local", "global", "position", "shuffled", "map"]  # the vector layer is skipped
    by = {r.layer: r for r in res.rows}
    assert by["local"].score > 0.3 and abs(by["global"].score) < 0.02  # exact 0 only over all positions
    assert by["position"].position_accuracy > 0.99
    assert by["local"].position_accuracy < 3 / P  # content without position information: chance
    assert by["shuffled"].position_accuracy < 3 / P
    assert res.protocol["n_images"] == 128
    d = res.to_json(tmp_path / "loc.json", with_maps=True)
    assert d["kind"] == "repsim.localize" and set(d["maps"]) == set(res.layers)
    res.plot(tmp_path / "loc.png")
    assert_drawn_png(tmp_path / "loc.png")
    assert "local" in res.summary()


def test_end_to_end_tiny_vit(tmp_path):
    """A random-init timm ViT-Tiny/16 at 64 px (4x4 grid) through hooks.extract.loop --save-inputs: the patch
    embedding is a linear function of its own patch (plus a fixed position embedding), so early blocks are
    strongly localised and the position embedding makes position decodable."""
    import torch

    from hooks.extract.loop import extract
    from hooks.models.registry import load_model
    from repsim.data.sources import open_dataset

    torch.manual_seed(0)
    vit = load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=64)
    data = open_dataset("shapes", n=48, seed=3, image_size=64)
    store = extract(vit, data, str(tmp_path / "v.zarr"), layers=["blocks.0", "blocks.11"], batch_size=16,
                    dtype="float32", save_inputs=True, progress=False)
    assert store.has_inputs and store.layer_info("blocks.0")["grid"] == [4, 4]
    res = localise(store, device="cpu")
    first = res.rows[0]
    assert first.layer == "blocks.0" and first.argmax_fraction > 0.8 and first.score > 0.1
    assert first.position_accuracy > 0.9


def test_token_class_probe(tmp_path):
    """The class is written into the CLS token only / into every patch token: the read-outs differ."""
    from probes.localisation import token_class_probe

    rng = np.random.default_rng(3)
    n, c = 150, 3
    y = np.arange(n) % c
    code = np.eye(c, D)[y] * 3.0
    cls_only = 0.3 * rng.standard_normal((n, 1 + P, D))
    cls_only[:, 0] += code
    everywhere = 0.3 * rng.standard_normal((n, 1 + P, D)) + code[:, None, :]
    store = make_store(tmp_path / "c.zarr", {"cls_only": cls_only.astype(np.float32),
                                             "everywhere": everywhere.astype(np.float32)})
    assert np.array_equal(store.labels, y)
    r = token_class_probe(store, device="cpu")
    assert r.layers == ["cls_only", "everywhere"] and r.chance == pytest.approx(1 / 3)
    assert r.accuracy["cls"][0] > 0.95 and r.accuracy["centre"][0] < 0.6 and r.accuracy["mean"][0] < 0.6
    assert min(r.accuracy[m][1] for m in ("cls", "centre", "mean")) > 0.95
    r.to_json(tmp_path / "c.json")
    r.plot(tmp_path / "c.png")


def test_localisation_bootstrap_resamples_are_the_cka_of_the_resampled_images(synthetic):
    from probes.localisation import localisation_bootstrap

    store, x, acts = synthetic
    tok = acts["local"][:48, 1:]
    patches = patch_pixels(x[:48], (GRID, GRID))
    b = localisation_bootstrap(tok, patches, n_boot=3, seed=7)
    assert b["score"] == pytest.approx(localisation_scores(patch_token_cka_matrix(tok, patches))["score"], abs=1e-12)
    rng = np.random.default_rng(7)  # the documented draw: rows with replacement, one vector per resample
    for k in range(3):
        idx = rng.integers(0, 48, size=48)
        ref = localisation_scores(patch_token_cka_matrix(tok[idx], [p[idx] for p in patches]))["score"]
        assert b["samples"][k] == pytest.approx(ref, abs=2e-5)  # float32 resamples
    assert b["low"] <= b["high"]
    # same seed, same n: paired resamples, so a layer against itself differs by exactly 0
    again = localisation_bootstrap(tok, patches, n_boot=3, seed=7)
    assert np.array_equal(b["samples"], again["samples"])


def test_position_probe_interval_is_over_images(synthetic):
    store, _, _ = synthetic
    shuf = position_probe(store, "shuffled", seed=0)
    assert len(shuf.image_accuracy) == shuf.n_test_images
    assert np.mean(shuf.image_accuracy) == pytest.approx(shuf.accuracy)
    assert shuf.accuracy_low <= shuf.accuracy <= shuf.accuracy_high and shuf.accuracy_high > shuf.accuracy_low


def test_us_spellings_of_earlier_releases_still_resolve():
    """The code settled on UK spelling (issue 18); the old US names resolve to the new objects with a
    FutureWarning, and ``repsim localize`` runs ``repsim localise`` without being listed."""
    import warnings

    from click.testing import CliRunner

    import probes
    from repsim.app.cli import cli

    for old, new in probes._RENAMED.items():
        with pytest.warns(FutureWarning, match=f"probes.{old} is now probes.{new}"):
            assert getattr(probes, old) is getattr(probes, new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probes.localise is probes.localisation.localise  # the new name warns nothing
    runner = CliRunner()
    listed = runner.invoke(cli, ["--help"]).output
    assert "localise" in listed and "localize" not in listed
    old_help, new_help = (runner.invoke(cli, [name, "--help"]) for name in ("localize", "localise"))
    assert old_help.exit_code == new_help.exit_code == 0
    assert old_help.output.replace("localize", "localise") == new_help.output
