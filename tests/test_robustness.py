"""Perturbations (repsim.data.perturbations), perturbed extraction, and robustness profiles (repsim.robustness).

References are independent of the code under test: hand-built tensors with known answers, the clean store's
own inputs with patches zeroed by hand, repsim.measures.cka_engine.cka (Gram-form debiased CKA, a separate
implementation from the half-sample Grams), and accuracies counted with numpy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_drawn_png, assert_one_line_error, kept_unchanged, run_cli, run_killed_after_chunks
from hooks.extract.loop import extract, plan_extraction, run_extraction
from hooks.models.registry import load_model
from repsim import open_store
from repsim.measures.cka_engine import cka, layer_features
from repsim.data.sources import open_dataset
from repsim.errors import UsageError
from repsim.data.perturbations import Perturbation
from repsim.robustness import RobustnessResult, group_by_model, robustness_profile, robustness_profiles

N = 16  # images of the module's stores: 64 px shapes, the bundled models


def _patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(C, H, W) → (H/p, W/p, C, p, p): the p x p patches on their grid."""
    c, h, w = x.shape
    return x.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4)


def _zero_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """bool (H/p, W/p): which patches are entirely 0."""
    return (_patches(x, p) == 0).flatten(2).all(-1)


# -- the perturbations on hand-built tensors ---------------------------------------------------------------


@pytest.mark.parametrize(("level", "dropped"), [(0.3, 5), (0.5, 8), (0.53, 8), (0.55, 9), (1.0, 16)])
def test_patch_drop_drops_round_level_times_patches(level, dropped):
    x = 1.0 + torch.rand(1, 3, 16, 16)  # no zeros of its own: every 0 is a dropped pixel
    y = Perturbation.parse(f"patch-drop:{level}", patch_px=4).apply(x, ["img"])
    zero = _zero_patches(y[0], 4)
    assert int(zero.sum()) == dropped  # 16 patches of 4 px: round(0.3·16 = 4.8) = 5, round(8.8) = 9, ...
    assert int((y[0] == 0).sum()) == dropped * 3 * 16  # only whole patches, all channels
    keep = ~zero.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(y[0][:, keep], x[0][:, keep])


def test_seeding_is_per_sample_id_not_batch_position():
    x = (1 + torch.arange(3 * 32 * 32, dtype=torch.float32)).reshape(1, 3, 32, 32).repeat(3, 1, 1, 1)  # 3 equal
    for spec in ("patch-drop:0.4", "patch-shuffle:4", "noise:0.3"):
        p = Perturbation.parse(spec, seed=7)
        a = p.apply(x, ["a", "b", "c"])
        b = p.apply(x[:2], ["c", "a"])
        assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0]), spec  # same id, same draw, any position
        assert not torch.equal(a[0], a[1]), spec  # another id, another draw (equal images)
        assert not torch.equal(a[0], Perturbation.parse(spec, seed=8).apply(x[:1], ["a"])[0]), spec  # the seed counts


def test_level_zero_is_the_identity_and_levels_nest():
    x = torch.randn(2, 3, 16, 16)
    for spec in ("patch-drop:0", "patch-shuffle:0", "patch-shuffle:1", "occlude-centre:0", "noise:0"):
        assert Perturbation.parse(spec).apply(x, ["a", "b"]) is x, spec
    # documented common random numbers: the patches dropped at 0.25 are among those dropped at 0.5, and the
    # noise at 0.2 is twice the noise at 0.1
    d1 = _zero_patches(Perturbation.parse("patch-drop:0.25", patch_px=4).apply(x + 10, ["a", "b"])[0], 4)
    d2 = _zero_patches(Perturbation.parse("patch-drop:0.5", patch_px=4).apply(x + 10, ["a", "b"])[0], 4)
    assert int(d1.sum()) == 4 and int(d2.sum()) == 8 and bool((d2 | ~d1).all())
    n1 = Perturbation.parse("noise:0.1").apply(x, ["a", "b"]) - x
    n2 = Perturbation.parse("noise:0.2").apply(x, ["a", "b"]) - x
    torch.testing.assert_close(n2, 2 * n1, rtol=1e-5, atol=1e-6)
    assert abs(float(n1.std()) - 0.1) < 0.01


def test_shuffle_permutes_whole_pieces_and_occlusion_is_centred():
    x = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(1, 3, 8, 8)  # every piece distinct
    y = Perturbation.parse("patch-shuffle:2").apply(x, ["a"])
    pieces_in = [tuple(p.flatten().tolist()) for p in _patches(x[0], 4).reshape(4, 3, 4, 4)]
    pieces_out = [tuple(p.flatten().tolist()) for p in _patches(y[0], 4).reshape(4, 3, 4, 4)]
    assert sorted(pieces_out) == sorted(pieces_in) and pieces_out != pieces_in
    o = Perturbation.parse("occlude-centre:0.25").apply(x + 1, ["a"])[0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True  # sqrt(0.25)·8 = 4 px square, centred
    assert torch.equal(o[0] == 0, expected) and torch.equal(o[2] == 0, expected)


@pytest.mark.parametrize(("spec", "patch", "message"), [
    ("blur:1", None, "unknown kind 'blur'"),
    ("patch-drop", None, "give a level as KIND:LEVEL"),
    ("patch-drop:half", None, "is not a number"),
    ("patch-drop:1.5", None, "fraction in [0, 1]"),
    ("noise:-0.1", None, "finite number >= 0"),
    ("noise:inf", None, "finite number >= 0"),
    ("patch-shuffle:2.5", None, "whole grid size"),
    ("noise:0.1", 8, "applies to patch-drop only"),
    ("patch-drop:0.5", 0, "positive number of pixels"),
])
def test_bad_specs_are_refused(spec, patch, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Perturbation.parse(spec, patch_px=patch)


def test_grid_must_divide_the_input():
    with pytest.raises(UsageError, match="--perturb-patch 12 must divide the input size 64x64"):
        Perturbation.parse("patch-drop:0.5", patch_px=12).check_image((64, 64))
    with pytest.raises(UsageError, match="3 must divide the input size 64x64"):
        Perturbation.parse("patch-shuffle:3").check_image((64, 64))


# -- perturbed extraction ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes():
    return open_dataset("shapes", n=N, seed=5, image_size=64)


@pytest.fixture(scope="module")
def ref_vit():
    return load_model("ref_vit")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, shapes, ref_vit):
    """ref_vit on N shapes images: clean, patch-drop 0 / 0.5 / 1 (8 px patches), inputs saved."""
    root = tmp_path_factory.mktemp("rob")
    kw = dict(batch_size=8, chunk_size=8, save_inputs=True)
    out = {"clean": extract(ref_vit, shapes, str(root / "clean.zarr"), **kw)}
    for level in (0, 0.5, 1):
        out[level] = extract(ref_vit, shapes, str(root / f"pd{level}.zarr"), **kw,
                             perturbation=Perturbation.parse(f"patch-drop:{level}", patch_px=8))
    return out


@pytest.fixture(scope="module")
def ref_resnet_patch_drop_store(tmp_path_factory, shapes):
    """ref_resnet on the N shapes images with half of the 8-px patches dropped, inputs saved. Read only."""
    out = str(tmp_path_factory.mktemp("rob_cnn") / "cnn_pd.zarr")
    store = extract(load_model("ref_resnet"), shapes, out, batch_size=16, save_inputs=True,
                    perturbation=Perturbation.parse("patch-drop:0.5", patch_px=8))
    with kept_unchanged(out):
        yield store


def test_vit_and_cnn_see_the_same_perturbed_pixels(stores, shapes, ref_resnet_patch_drop_store):
    """ref_resnet (a CNN) and ref_vit, 64 px, same preprocessing: the stored perturbed inputs are equal bit for
    bit, and equal to the clean inputs with exactly 32 of the 64 8-px patches zeroed."""
    cnn = ref_resnet_patch_drop_store
    vit_x, cnn_x, clean_x = stores[0.5].read_inputs(), cnn.read_inputs(), stores["clean"].read_inputs()
    assert np.array_equal(vit_x.view(np.uint16), cnn_x.view(np.uint16))
    for i in range(N):
        zero = _zero_patches(torch.from_numpy(vit_x[i].astype(np.float32)), 8).numpy()
        assert zero.sum() == 32
        keep = ~np.repeat(np.repeat(zero, 8, 0), 8, 1)
        assert np.array_equal(vit_x[i][:, keep], clean_x[i][:, keep])
    assert cnn.fingerprint == stores["clean"].fingerprint and cnn.ids == shapes.ids


def test_level_zero_store_is_bit_identical_and_recorded(stores, shapes):
    clean, zero = stores["clean"], stores[0]
    for layer in clean.layers:
        assert np.array_equal(clean.read(layer).view(np.uint8), zero.read(layer).view(np.uint8)), layer
    assert zero.attrs["perturbation"] == {"kind": "patch-drop", "level": 0.0, "patch_px": 8, "seed": 0}
    assert "perturbation" not in clean.attrs
    assert zero.fingerprint == clean.fingerprint == shapes.fingerprint
    assert zero.attrs["config_hash"] != clean.attrs["config_hash"]


@pytest.mark.slow
def test_perturbed_store_resumes_bit_identical_and_refuses_another_perturbation(tmp_path, stores, shapes, ref_vit):
    p = Perturbation.parse("patch-drop:0.5", patch_px=8)
    out = str(tmp_path / "killed.zarr")
    plan = plan_extraction(ref_vit, shapes, out, batch_size=8, chunk_size=8, save_inputs=True, perturbation=p)
    assert not run_killed_after_chunks(plan, 1).complete
    plan = plan_extraction(ref_vit, shapes, out, batch_size=8, chunk_size=8, save_inputs=True, perturbation=p)
    assert plan.resume
    resumed = run_extraction(plan, progress=False)
    assert resumed.complete and resumed.attrs["config_hash"] == stores[0.5].attrs["config_hash"]
    for name in ["inputs/pixels", *resumed.layers]:  # the same bits as the uninterrupted store
        read = (lambda s: s.read_inputs()) if name == "inputs/pixels" else (lambda s, n=name: s.read(n))
        assert np.array_equal(read(resumed).view(np.uint8), read(stores[0.5]).view(np.uint8)), name
    with pytest.raises(UsageError, match="another configuration \\(different perturbation\\)"):
        plan_extraction(ref_vit, shapes, out, batch_size=8, chunk_size=8, save_inputs=True,
                        perturbation=Perturbation.parse("patch-drop:0.25", patch_px=8))


def test_cli_refuses_bad_perturbations_in_one_line(tmp_path):
    base = ["extract", "--model", "ref_vit", "--data", "shapes", "--n", "4", "--quiet", "--out"]
    assert_one_line_error(run_cli(*base, str(tmp_path / "a.zarr"), "--perturb", "blur:2"), "unknown kind 'blur'")
    assert_one_line_error(run_cli(*base, str(tmp_path / "b.zarr"), "--perturb", "patch-drop:0.5", "--perturb-patch",
                                  "12"), "--perturb-patch 12 must divide the input size 64x64")
    assert_one_line_error(run_cli(*base, str(tmp_path / "c.zarr"), "--perturb-patch", "8"),
                          "--perturb-patch needs --perturb")
    assert not (tmp_path / "b.zarr").exists()


# -- robustness profiles ----------------------------------------------------------------------------------


def test_profile_matches_independent_cka_and_counted_accuracy(stores):
    r = robustness_profile(stores["clean"], [stores[0.5], stores[0]], resamples=20)
    (m,) = r.models
    assert [lv.perturbation["level"] for lv in m.levels] == [0, 0.5]  # sorted by level
    same, half = m.levels
    # CKA(clean, clean) = 1 at every layer: the level-0 store holds the clean activations
    np.testing.assert_allclose(same.cka, 1.0, rtol=0, atol=1e-12)
    assert same.first_below is None and same.constant_layers == []
    for j, layer in enumerate(m.layers):
        x = layer_features(stores["clean"], layer).numpy()
        y = layer_features(stores[0.5], layer).numpy()
        assert half.cka[j] == pytest.approx(cka(x, y, debiased=True), abs=1e-9), layer
        assert half.cka_low[j] <= half.cka[j] + 0.05 and half.cka_high[j] >= half.cka[j] - 0.05
    below = [layer for layer, v in zip(m.layers, half.cka) if v < 0.5]
    assert half.first_below == (below[0] if below else None)
    assert m.relative_depth[0] == 0 and m.relative_depth[-1] == 1 and m.layers == stores["clean"].layers
    # accuracy: argmax of the stored logits (the last layer, 8 classes) against the labels, counted here
    labels = stores["clean"].labels
    correct = [int((s.read("head").astype(np.float32).argmax(1) == labels).sum())
               for s in (stores["clean"], stores[0.5])]
    assert m.logits_layer == "head" and m.accuracy["correct"] == correct[0] and half.accuracy["correct"] == correct[1]
    assert half.accuracy_drop["value"] == pytest.approx((correct[0] - correct[1]) / N)
    assert same.accuracy_drop["value"] == 0.0 and same.accuracy == m.accuracy


def test_all_patches_dropped_has_no_cka_and_counts_as_below(stores, tmp_path):
    r = robustness_profile(stores["clean"], [stores[1]], resamples=10)
    lv = r.models[0].levels[0]
    assert lv.constant_layers == r.models[0].layers  # every input is 0: no layer varies over the images
    assert lv.first_below == r.models[0].layers[0] and all(np.isnan(lv.cka))
    d = r.to_json(tmp_path / "r.json")  # null, not NaN, in the JSON
    assert json.loads((tmp_path / "r.json").read_text())["models"][0]["levels"][0]["cka"][0] is None
    assert d["kind"] == "repsim.robustness"


def test_grouping_refusals(stores, tmp_path, shapes, ref_vit):
    groups = group_by_model([stores[0.5], stores["clean"], stores[0]])
    assert len(groups) == 1 and groups[0][0].path == stores["clean"].path and len(groups[0][1]) == 2
    with pytest.raises(UsageError, match="no clean store for .*pd0.5.zarr"):
        group_by_model([stores[0.5]])
    with pytest.raises(UsageError, match="two clean stores of ref_vit"):
        group_by_model([stores["clean"], stores["clean"].path, stores[0.5]])
    with pytest.raises(UsageError, match="is perturbed .*the clean store must be extracted without --perturb"):
        robustness_profile(stores[0], [stores[0.5]])
    with pytest.raises(UsageError, match="is not perturbed"):
        robustness_profile(stores["clean"], [stores["clean"]])
    with pytest.raises(UsageError, match="hold the same perturbation of the same model"):
        robustness_profile(stores["clean"], [stores[0.5], stores[0.5].path])
    other = extract(ref_vit, open_dataset("shapes", n=N, seed=6, image_size=64), str(tmp_path / "o.zarr"),
                    batch_size=8, perturbation=Perturbation.parse("patch-drop:0.5", patch_px=8))
    with pytest.raises(UsageError, match="hold different samples"):
        robustness_profile(stores["clean"], [other])
    with pytest.raises(UsageError, match="holds other samples"):
        group_by_model([stores["clean"], stores[0.5], other])


@pytest.mark.slow
def test_several_models_cli_json_and_figure(stores, tmp_path, shapes, ref_resnet_patch_drop_store):
    c = extract(load_model("ref_resnet"), shapes, str(tmp_path / "cnn.zarr"), batch_size=16)
    p = ref_resnet_patch_drop_store  # its saved inputs play no part in the profile
    res = run_cli("robustness", stores[0.5].path, c.path, stores["clean"].path, p.path, "--resamples", "10",
                  "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"), "--quiet")
    assert res.exit_code == 0, res.output
    assert "ref_vit (n=16" in res.output and "ref_resnet (n=16" in res.output and "patch-drop:0.5" in res.output
    assert_drawn_png(tmp_path / "r.png")
    r = RobustnessResult.from_json(tmp_path / "r.json")
    assert [m.model for m in r.models] == ["ref_vit", "ref_resnet"]
    direct = robustness_profiles([c, p], resamples=10)
    assert r.models[1].levels[0].cka == direct.models[0].levels[0].cka
    assert r.models[1].clean_path == c.path and r.models[1].fingerprint == c.fingerprint
    assert_one_line_error(run_cli("robustness", stores[0.5].path, "--quiet"), "no clean store")


def test_erf_and_attribution_inputs_of_a_perturbed_store_are_perturbed(tmp_path, stores, shapes, ref_vit):
    """hooks.gradients.erf.store_images (the inputs of ``attention --erf`` and the attribution probes) rebuilds a perturbed
    store's images from its provenance and perturbs them as recorded: equal to the inputs the extraction saved,
    not the clean ones."""
    from hooks.gradients.erf import store_images

    p = Perturbation.parse("patch-drop:0.5", patch_px=8)
    bare = extract(ref_vit, shapes, str(tmp_path / "bare.zarr"), batch_size=8, chunk_size=8, perturbation=p)
    assert not bare.has_inputs
    rebuilt = store_images(bare, 4, ref_vit.preprocessing.transform()).numpy()
    saved = stores[0.5].read_inputs(0, 4).astype(np.float32)
    assert np.array_equal(rebuilt == 0, saved == 0)
    np.testing.assert_allclose(rebuilt, saved, rtol=2e-3, atol=1e-6)  # saved inputs are float16
    clean = stores["clean"].read_inputs(0, 4).astype(np.float32)
    assert not np.allclose(rebuilt, clean, rtol=2e-3, atol=1e-6)


def test_model_identity_ignores_where_the_weights_lay_not_what_they_are():
    """The same weights (same sha256) from another cache or install are the same model; other weights, or a
    file without a hash, are not."""
    from repsim.robustness import model_identity

    rec = {"name": "ref_vit", "source": "reference", "weights": {"kind": "bundled", "file": "/a/w.safetensors",
                                                                 "sha256": "ab"}}
    moved = {**rec, "weights": {**rec["weights"], "file": "/b/w.safetensors"}}
    cached = {**rec, "weights": {**rec["weights"], "cache_file": "/c/x"}}
    other = {**rec, "weights": {**rec["weights"], "sha256": "cd"}}
    unhashed = [{**rec, "weights": {"kind": "file", "file": f}} for f in ("/a/w.pt", "/b/w.pt")]
    assert model_identity(rec) == model_identity(moved) == model_identity(cached)
    assert model_identity(rec) != model_identity(other)
    assert model_identity(unhashed[0]) != model_identity(unhashed[1])
    assert rec["weights"]["file"] == "/a/w.safetensors"  # the store's record is not changed


def test_rounding_to_float16_does_not_make_equal_images_vary(tmp_path):
    """Images whose float32 features differ only in their last bits (equal inputs, e.g. every patch dropped) can
    round to float16 values one step apart; that is storage rounding, not variation: the layer does not vary.
    Variation well above float16's resolution still counts, and float32 keeps the 1e-12 tolerance."""
    from repsim.robustness import _layer_gram
    from repsim.store.format import fingerprint_ids
    from repsim.store.reader import ActivationStore
    from repsim.store.writer import LayerSpec, StoreWriter

    def store(name, rows, dtype):
        ids = [f"s{i}" for i in range(len(rows))]
        attrs = {"format_version": 1, "model": {"name": "m"}, "dataset": {"name": "d", "n": len(rows),
                 "fingerprint": fingerprint_ids(ids)}, "extraction": {"chunk_size": len(rows), "dtype": dtype}}
        w = StoreWriter.create(str(tmp_path / name), attrs, [LayerSpec("f", (64,), {"kind": "vector"})], ids,
                               np.zeros(len(rows), dtype=np.int64), dtype=dtype)
        w.write_chunk(0, {"f": np.asarray(rows, dtype=np.float32)})
        w.update_attrs(complete=True)
        return ActivationStore(str(tmp_path / name))

    base = np.full(64, 1000.25, dtype=np.float32)  # float16 spacing at 1000 is 0.5: 1000.25 sits on a tie
    nudged = [base + np.float32(s) * np.where(np.arange(64) % 2, 1e-4, 0.0).astype(np.float32)
              for s in (-1, 1, -1, 1, 1, -1)]  # last-bit differences in half the entries
    stored = store("tie16.zarr", nudged, "float16").read("f").astype(np.float64)
    assert np.ptp(stored, axis=0).max() == 0.5  # float16 rounding put some entries one step apart
    gram, varies = _layer_gram(store("tie16.zarr", nudged, "float16"), "f", "flatten")
    assert np.trace(gram) > 0 and not varies
    real = [base + np.float32(s) for s in (-4, 4, -4, 4, 4, -4)]  # 8 float16 steps apart: real variation
    assert _layer_gram(store("real16.zarr", real, "float16"), "f", "flatten")[1]
    tiny = [base + np.float32(s) * np.float32(1e-2) for s in (-1, 1, -1, 1, 1, -1)]  # share 1e-10
    assert _layer_gram(store("tiny32.zarr", tiny, "float32"), "f", "flatten")[1]  # float32 resolves it
