"""Logic shared across modules lives in one place (issue 18, "One home for each idea"): the callers of each shared
helper agree on what it decides."""

from __future__ import annotations

import numpy as np
import pytest

from probes.solvers import fit_logreg, ridge_classify
from repsim.errors import UsageError

FITTERS = [fit_logreg, ridge_classify]


def _data(n=40, d=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    return rng.normal(size=(n, d)) + 3.0 * y[:, None], y


@pytest.mark.parametrize("fit", FITTERS, ids=lambda f: f.__name__)
def test_both_linear_fitters_check_their_arguments_alike(fit):
    X, y = _data()
    with pytest.raises(UsageError, match=r"metric must be one of top1, mean_per_class, got 'f1'"):
        fit(X, y, X, y, metric="f1")
    with pytest.raises(UsageError, match=r"choosing among 2 strengths needs a validation set"):
        fit(X, y, lambdas=[1.0, 2.0])
    with pytest.raises(UsageError, match=r"refit=True needs a validation set to refit on"):
        fit(X, y, lambdas=[1.0], refit=True)
    with pytest.raises(UsageError, match=r"validation features have 2 dimensions, the training features 3"):
        fit(X, y, X[:, :2], y, lambdas=[1.0])
    with pytest.raises(UsageError, match=r"the training labels hold 1 class; a classifier needs at least 2"):
        fit(X, np.zeros_like(y), X, y)
    # an empty validation set is no validation set: one strength fits, no validation scores
    res = fit(X, y, X[:0], y[:0], lambdas=[0.1], device="cpu")
    assert res.val_top1.size == 0 and res.lam == 0.1
    # the empty set is still checked: its feature width must match
    with pytest.raises(UsageError, match=r"validation features have 2 dimensions"):
        fit(X, y, X[:0, :2], y[:0], lambdas=[0.1])


def _store(tmp_path, layers=("blocks.0", "blocks.1", "head")):
    from repsim.store.format import fingerprint_ids
    from repsim.store.reader import ActivationStore
    from repsim.store.writer import LayerSpec, StoreWriter

    ids = [f"s{i}" for i in range(4)]
    attrs = {"format_version": 1, "model": {"name": "m"}, "dataset": {"name": "d", "n": 4,
             "fingerprint": fingerprint_ids(ids)}, "extraction": {"chunk_size": 4, "dtype": "float32"}}
    specs = [LayerSpec(name, (2,), {"kind": "vector"}) for name in layers]
    w = StoreWriter.create(str(tmp_path / "s.zarr"), attrs, specs, ids, np.zeros(4, dtype=np.int64), dtype="float32")
    w.write_chunk(0, {name: np.ones((4, 2), dtype=np.float32) for name in layers})
    w.update_attrs(complete=True)
    return ActivationStore(str(tmp_path / "s.zarr"))


def test_every_store_layer_selection_names_missing_layers_alike(tmp_path):
    """One check (repsim.store.reader.check_layer_names) behind the CKA, probe and store layer lookups: the same line."""
    from probes.features import select_layers as probe_layers
    from repsim.measures.cka_engine import select_layers as cka_layers

    store = _store(tmp_path)
    want = (r"s\.zarr has no layer 'block.1' \(did you mean 'blocks\.1'\?\), 'zzz'; it has 3 layers "
            r"\(see `repsim info`\)$")
    for select in (cka_layers, probe_layers):
        with pytest.raises(UsageError, match=want):
            select(store, ["head", "block.1", "zzz"])
    with pytest.raises(UsageError, match=r"s\.zarr has no layer 'hed' \(did you mean 'head'\?\); it has 3 layers"):
        store.read("hed")
    # what differs, by design: CKA map axes keep the given order (repeats allowed); probe features go in
    # network order, each layer once
    assert cka_layers(store, ["head", "blocks.0", "head"]) == ["head", "blocks.0", "head"]
    assert probe_layers(store, ["head", "blocks.0"]) == ["blocks.0", "head"]
    with pytest.raises(UsageError, match="a layer is selected twice"):
        probe_layers(store, ["head", "head"])


def test_layer_kind_is_read_alike_by_cka_probes_and_localisation():
    """repsim.store.format.layer_kind: recorded kind, else the store format's layout for the shape; every reader agrees."""
    from probes.features import feature_reduction
    from probes.localisation import grid_positions
    from repsim.measures.cka_engine import feature_width
    from repsim.store.format import layer_kind

    assert layer_kind({"kind": "map", "shape": [5]}, "x") == "map"  # recorded kind wins
    kindless = {"tokens": [5, 4], "map": [4, 2, 3], "vector": [6]}
    for kind, shape in kindless.items():
        assert layer_kind({"shape": shape}, "x") == kind
    cmap = {"shape": kindless["map"]}  # a (C, H, W) map without a recorded kind, read by each analysis
    assert feature_width(cmap, "x", "mean") == 4  # CKA: channel means
    assert feature_reduction(cmap, "x", "mean") == ("spatial-mean", 4)  # probes: spatial mean
    assert grid_positions(cmap, "x") == ("map", (2, 3), 0)  # localisation: its H x W positions
    for bad in ({"kind": "graph", "shape": [3]}, {"shape": [1, 2, 3, 4]}):
        for read in (lambda i: layer_kind(i, "x"), lambda i: feature_width(i, "x", "mean"),
                     lambda i: feature_reduction(i, "x", "mean"), lambda i: grid_positions(i, "x")):
            with pytest.raises(UsageError, match=r"layer 'x' has unknown kind .* \(expected tokens, map or vector\)"):
                read(bad)


@pytest.mark.parametrize("chunk_size,max_read_rows", [(4, 4), (4, 12), (5, 3), (64, 64)])
def test_gather_rows_returns_the_asked_rows_reading_each_chunk_once(chunk_size, max_read_rows):
    """repsim.store.reader.gather_rows (the CKA engine's and localisation's row reader) against numpy indexing."""
    from repsim.errors import RepsimError
    from repsim.store.reader import gather_rows

    n = 23
    data = np.arange(n * 2).reshape(n, 2)
    positions = np.random.default_rng(chunk_size).permutation(n)[:11]
    reads = []

    def read(lo, hi):
        reads.append((lo, hi))
        return data[lo:hi]

    out = np.full((positions.size, 2), -1)
    for idx, rows in gather_rows(read, positions, n=n, chunk_size=chunk_size, max_read_rows=max_read_rows):
        out[idx] = rows
    np.testing.assert_array_equal(out, data[positions])
    touched = [c for lo, hi in reads for c in range(lo // chunk_size, -(-hi // chunk_size))]
    assert sorted(touched) == sorted(set(touched)) == sorted(set(positions // chunk_size))  # each once
    assert all(lo % chunk_size == 0 and hi - lo <= max(max_read_rows, chunk_size) for lo, hi in reads)
    with pytest.raises(RepsimError, match=r"^arr: reading rows 0\.\.\d+ returned 1 rows$"):
        list(gather_rows(lambda lo, hi: data[lo:lo + 1], np.array([0, 1]), n=n, chunk_size=chunk_size,
                         max_read_rows=max_read_rows, what="arr"))


def test_whole_set_grams_of_repsim_gram_give_biased_cka():
    """repsim.measures.gram's H K H stacks (used by localisation) multiply to cka_engine.cka (numpy, biased, float64)."""
    import torch

    from repsim.measures.cka_engine import cka
    from repsim.errors import NumericalError
    from repsim.measures.gram import centred_feature_grams, unit_centred_grams

    rng = np.random.default_rng(3)
    xs = [1e6 + rng.normal(size=(9, d)) for d in (2, 5)]  # a large offset: centring must come first
    ys = [rng.normal(size=(9, 3)) ** 2, rng.normal(size=(9, 7))]
    m = (unit_centred_grams(centred_feature_grams(xs), "x") @ unit_centred_grams(centred_feature_grams(ys), "y").T)
    want = np.array([[cka(x, y) for y in ys] for x in xs])
    np.testing.assert_allclose(m.numpy(), want, rtol=0, atol=1e-12)
    # a constant set has no self-HSIC: named by its place (first + index)
    grams = centred_feature_grams([xs[0], np.ones((9, 2))])
    with pytest.raises(NumericalError, match=r"^patch 11: self-HSIC is 0\.0 \(constant across images\?\)"):
        unit_centred_grams(grams, "patch", first=10)
    assert torch.allclose(unit_centred_grams(grams[:1], "x"), unit_centred_grams(grams[:1] + 5.0, "x"))


def test_one_store_protocol_that_the_store_implements(tmp_path):
    """CKA and probes type their stores with the one repsim.store.reader.StoreLike; ActivationStore has all of it."""
    import probes.features
    import repsim.measures.cka_engine
    from repsim.store.reader import StoreLike

    assert repsim.measures.cka_engine.StoreLike is StoreLike and probes.features.StoreLike is StoreLike
    members = set(StoreLike.__annotations__) | {k for k in vars(StoreLike) if not k.startswith("_")}
    assert {"path", "layers", "n", "ids", "labels", "fingerprint", "complete", "read", "layer_info"} <= members
    store = _store(tmp_path)
    assert [m for m in sorted(members) if not hasattr(store, m)] == []


def test_names_that_meant_two_things_now_say_which():
    """grid_positions (repsim.attention.statistics: cell coordinates) vs layer_grid (probes.localisation: a layer's kind, grid and
    prefix count, old name kept as an alias); TOKEN_MODES (CKA feature rows) vs TOKEN_READOUTS (class probe)."""
    import probes.localisation as loc
    from repsim.attention.statistics import grid_positions
    from repsim.measures.cka_engine import TOKEN_MODES

    info = {"kind": "tokens", "shape": [1 + 6, 8], "grid": [2, 3], "num_prefix_tokens": 1}
    assert loc.layer_grid(info, "t") == ("tokens", (2, 3), 1) and loc.grid_positions is loc.layer_grid
    assert grid_positions((2, 3)).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert TOKEN_MODES == ("flatten", "mean", "cls") and loc.TOKEN_READOUTS == ("centre", "cls", "mean")
    assert not hasattr(loc, "TOKEN_MODES")


def test_localisation_and_token_probes_pick_positioned_layers_alike(tmp_path):
    """probes.localisation._positioned_layers: the default and the checks of localise / token_class_probe /
    foreground_probe (a vector layer is skipped by default, refused by name; a missing name gets the store hint)."""
    from probes.localisation import _positioned_layers, localise
    from repsim.store.format import fingerprint_ids
    from repsim.store.reader import ActivationStore
    from repsim.store.writer import LayerSpec, StoreWriter

    ids = [f"s{i}" for i in range(4)]
    attrs = {"format_version": 1, "model": {"name": "m"}, "dataset": {"name": "d", "n": 4,
             "fingerprint": fingerprint_ids(ids)}, "extraction": {"chunk_size": 4, "dtype": "float32"}}
    specs = [LayerSpec("tok", (5, 2), {"kind": "tokens", "grid": [2, 2], "num_prefix_tokens": 1}),
             LayerSpec("vec", (3,), {"kind": "vector"}), LayerSpec("map", (2, 2, 2), {"kind": "map"})]
    w = StoreWriter.create(str(tmp_path / "p.zarr"), attrs, specs, ids, np.zeros(4, dtype=np.int64), dtype="float32")
    w.write_chunk(0, {"tok": np.ones((4, 5, 2), np.float32), "vec": np.ones((4, 3), np.float32),
                      "map": np.ones((4, 2, 2, 2), np.float32)})
    w.update_attrs(complete=True)
    store = ActivationStore(str(tmp_path / "p.zarr"))
    assert _positioned_layers(store, None, "to probe") == ["tok", "map"]
    assert _positioned_layers(store, ["map", "tok"], "to probe") == ["map", "tok"]
    assert _positioned_layers(store, "map", "to probe") == ["map"]
    with pytest.raises(UsageError, match=r"layer 'vec' is a vector layer \(3,\): it has no spatial positions"):
        _positioned_layers(store, ["tok", "vec"], "to probe")
    with pytest.raises(UsageError, match=r"p\.zarr has no layer 'mapp' \(did you mean 'map'\?\); it has 3 layers"):
        localise(store, ["mapp"])
    vec_only = _store(tmp_path)
    with pytest.raises(UsageError, match=r"s\.zarr has no token or map layer with known positions to localise$"):
        localise(vec_only)


def test_results_tag_write_and_read_back_through_one_pair_of_helpers(tmp_path):
    """repsim.results.finish_result / result_fields: the kind tag, the atomic file, later keys ignored, a
    wrong kind refused; TokenPatchCKA (whose own field is called kind) round-trips through them."""
    import json

    from probes.localisation import TokenPatchCKA
    from repsim.results import finish_result, result_fields
    from repsim.robustness import RobustnessResult

    d = finish_result({"layers": ["a"], "n": 3}, "repsim.x", tmp_path / "r.json")
    assert d == {"layers": ["a"], "n": 3, "kind": "repsim.x"} and json.loads((tmp_path / "r.json").read_text()) == d
    res = TokenPatchCKA(layer="t", kind="map", grid=[1, 2], patch_px=[4, 4], positions=[0, 1],
                        matrix=np.array([[0.9, 0.1], [0.2, 0.8]]), own=0.85, other=0.15, score=0.7,
                        argmax_fraction=1.0, n_images=5)
    j = res.to_json(tmp_path / "t.json")
    assert j["kind"] == "repsim.token_patch_cka" and j["layer_kind"] == "map"
    back = TokenPatchCKA.from_json(dict(json.loads((tmp_path / "t.json").read_text()), added_later=1))
    assert back.kind == "map" and back.score == 0.7 and np.array_equal(back.matrix, res.matrix)
    assert result_fields(TokenPatchCKA, j, "repsim.token_patch_cka")["layer"] == "t"
    assert "added_later" not in result_fields(RobustnessResult, {"kind": "repsim.robustness", "added_later": 1,
                                                                 "models": []}, "repsim.robustness")
    with pytest.raises(UsageError, match=r"not a repsim.probe result \(kind 'repsim.token_patch_cka'\)"):
        result_fields(TokenPatchCKA, j, "repsim.probe")
