"""Attention as segmentation (repsim.attention.segmentation): the mass rule, Jaccard against hand-made answers,
spatial entropy on hand-built maps, the stored query maps against the kept full maps, masks and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_drawn_png, assert_one_line_error, run_cli
from repsim.attention.segmentation import attention_segmentation, mass_threshold, query_maps, spatial_entropy
from repsim.errors import UsageError
from repsim.data.masks import folder_masks, input_masks, mask_file_name
from repsim.data.shapes import ShapesDataset, render_shape_sample
from repsim.store.format import fingerprint_ids
from repsim.store.reader import ActivationStore
from repsim.store.writer import ArraySpec, LayerSpec, StoreWriter

IMG, PATCH = 32, 4
GRID = IMG // PATCH
P = GRID * GRID
HEADS = 2


# ------------------------------------------------------------------------------------------------ helpers

def _true_patches(n, seed=0):
    """Independent ground truth: render each shape, block-average its mask over PATCH x PATCH cells, > half."""
    m = np.stack([render_shape_sample(seed, i, IMG)[1] for i in range(n)]).astype(np.float64)
    return m.reshape(n, GRID, PATCH, GRID, PATCH).mean(axis=(2, 4)).reshape(n, P) > 0.5


def make_attention_store(path, qmaps, *, dataset="shapes", ids=None, root=None, windowed=(), query_maps_kept=True,
                         img_size=(IMG, IMG)):
    """A store as `repsim extract --attention` lays it out, with hand-chosen query maps (layer → (n, heads, P))
    and plain filler for the other per-head statistics."""
    n = next(iter(qmaps.values())).shape[0]
    ids = ids if ids is not None else ShapesDataset(n, seed=0, image_size=IMG).ids
    attrs = {
        "format_version": 1,
        "model": {"name": "handmade", "source": "test", "patch_size": PATCH, "num_prefix_tokens": 1,
                  "grid": [GRID] * 2},
        "dataset": {"name": dataset, "root": root, "n": n, "seed": 0, "fingerprint": fingerprint_ids(ids)},
        "preprocessing": {"img_size": list(img_size), "crop_pct": 1.0, "crop_mode": "center"},
        "extraction": {"chunk_size": 64, "dtype": "float32", "save_inputs": False},
        "attention": {"layers": list(qmaps), "class_layers": [], "attn_keep": 0, "info": {
            layer: {"kind": "timm_vit", "num_heads": HEADS, "num_prefix_tokens": 1, "grid": [GRID, GRID],
                    "patch_size": [PATCH, PATCH], "window_size": [2, 2] if layer in windowed else None,
                    "shift_size": None, "query_map": "cls"} for layer in qmaps}},
    }
    extra = []
    for layer in qmaps:
        extra += [ArraySpec(f"attn/{layer}/{s}", (HEADS,), "float32") for s in ("distance", "prefix_mass", "entropy")]
        extra.append(ArraySpec(f"attn/{layer}/aligned", (HEADS, 2 * GRID - 1, 2 * GRID - 1), "float32", rows="chunks"))
        if query_maps_kept and layer not in windowed:
            extra.append(ArraySpec(f"attn/{layer}/query_map", (HEADS, P), "float32"))
    acts = np.zeros((n, 1 + P, 3), dtype=np.float32)
    w = StoreWriter.create(str(path), attrs, [LayerSpec("blocks.0", (1 + P, 3), {"kind": "tokens"})], ids,
                           np.zeros(n, dtype=np.int64), dtype="float32", extra=extra)
    for c in range(-(-n // 64)):
        rows = w.chunk_rows(c)
        m = rows.stop - rows.start
        values = {}
        for layer, q in qmaps.items():
            values |= {f"attn/{layer}/{s}": np.ones((m, HEADS), np.float32)
                       for s in ("distance", "prefix_mass", "entropy")}
            values[f"attn/{layer}/aligned"] = np.ones((HEADS, 2 * GRID - 1, 2 * GRID - 1), np.float32)
            if query_maps_kept and layer not in windowed:
                values[f"attn/{layer}/query_map"] = q[rows].astype(np.float32)
        w.write_chunk(c, {"blocks.0": acts[rows]}, extra=values)
    w.update_attrs(complete=True)
    return ActivationStore(str(path))


def _dino_mask(attn, mass):
    """DINO's visualize_attention.py, transcribed in numpy: sort ascending, normalise, keep where the cumulative
    sum exceeds 1 - mass, undo the sort."""
    idx = np.argsort(attn, axis=-1)
    val = np.take_along_axis(attn, idx, axis=-1)
    val = val / val.sum(-1, keepdims=True)
    th = np.cumsum(val, axis=-1) > (1 - mass)
    out = np.empty_like(th)
    np.put_along_axis(out, idx, th, axis=-1)
    return out


# ------------------------------------------------------------------------------------------------ the mass rule

def test_mass_rule_keeps_the_smallest_top_set():
    assert mass_threshold([0.3, 0.3, 0.2, 0.2]).tolist() == [True, True, False, False]  # 0.6 reached exactly
    assert mass_threshold([0.1, 0.2, 0.3, 0.4]).tolist() == [False, False, True, True]  # 0.4 alone is short
    assert mass_threshold([0.5, 0.3, 0.1, 0.1]).tolist() == [True, True, False, False]
    assert mass_threshold([5.0, 3.0, 1.0, 1.0]).tolist() == [True, True, False, False]  # any scale
    # ties at the threshold are all kept: the 0.4 alone holds too little, any 0.2 completes 0.6, so all three
    # 0.2s stay (DINO keeps one or two of them, by its sort order); documented in the module docstring
    assert mass_threshold([0.4, 0.2, 0.2, 0.2]).tolist() == [True] * 4
    assert mass_threshold([0.2, 0.2, 0.4, 0.2], mass=0.4).tolist() == [False, False, True, False]
    assert mass_threshold(np.full(10, 0.1)).all()
    assert mass_threshold([0.7, 0.1, 0.1, 0.1], mass=1.0).all()


def test_mass_rule_equals_dino_without_ties():
    rng = np.random.default_rng(0)
    maps = rng.dirichlet(np.full(64, 0.3), size=(50, 3))
    for mass in (0.3, 0.6, 0.9):
        np.testing.assert_array_equal(mass_threshold(maps, mass), _dino_mask(maps, mass))


def test_mass_rule_refuses_bad_input():
    with pytest.raises(UsageError, match="mass must be a fraction"):
        mass_threshold([0.5, 0.5], mass=1.5)
    with pytest.raises(UsageError, match="no weight on the patches"):
        mass_threshold([[0.5, 0.5], [0.0, 0.0]])
    with pytest.raises(UsageError, match="non-negative"):
        mass_threshold([0.5, -0.1])


# ------------------------------------------------------------------------------------------------ spatial entropy

def test_spatial_entropy_of_hand_built_maps():
    one = np.zeros((6, 6))
    one[1:3, 1:4] = 1.0
    assert spatial_entropy(one) == pytest.approx(0.0, abs=1e-12)
    two = one.copy()
    two[4:6, 0:3] = 1.0  # a second, equal blob two rows below
    assert spatial_entropy(two) == pytest.approx(np.log(2), abs=1e-12)
    diagonal = np.zeros((6, 6))
    diagonal[1, 1] = diagonal[2, 2] = 1.0  # corner neighbours: one blob under 8-connectivity
    assert spatial_entropy(diagonal) == pytest.approx(0.0, abs=1e-12)
    # blob masses are the excess over the map's mean (Peruzzo et al.; SAR's relu(x - mean)), not the raw weights
    uneven = np.zeros((6, 6))
    uneven[0, 0], uneven[4, 4] = 3.0, 1.0
    mean = 4.0 / 36
    p = np.array([3.0 - mean, 1.0 - mean]) / (4.0 - 2 * mean)
    assert spatial_entropy(uneven) == pytest.approx(-(p * np.log(p)).sum(), abs=1e-12)
    assert np.isnan(spatial_entropy(np.full((4, 4), 0.25)))  # nothing above the mean: undefined
    batch = spatial_entropy(np.stack([one, two, 7.0 * two]))  # per map, scale-free
    np.testing.assert_allclose(batch, [0.0, np.log(2), np.log(2)], atol=1e-12)


# ------------------------------------------------------------------------------------------------ Jaccard via a store

def test_map_equal_to_the_mask_scores_jaccard_1_and_uniform_the_reference(tmp_path):
    n = 40
    true = _true_patches(n)
    scored = true.any(1)
    assert 10 < scored.sum() and not true.all(1).any()
    exact = np.where(true, 1.0, 0.0) + np.where(true.any(1, keepdims=True), 0.0, 1.0)  # no object: uniform
    exact /= exact.sum(1, keepdims=True)
    uniform = np.full((n, P), 1.0 / P)
    q = np.stack([exact, uniform], axis=1)  # head 0 = the mask itself, head 1 = uniform
    store = make_attention_store(tmp_path / "s.zarr", {"blocks.0.attn": q, "blocks.1.attn": q[:, ::-1]},
                                 windowed=())
    res = attention_segmentation(store, n_boot=200)
    ly = res.layer("blocks.0.attn")
    assert ly.n_scored == scored.sum()
    reference = (true.sum(1) / P)[scored].mean()  # all-foreground Jaccard by hand: |M| / P
    assert ly.baseline == pytest.approx(reference, abs=1e-12)
    exact_head, uniform_head = ly.heads
    assert exact_head.jaccard == 1.0 and exact_head.jaccard_low == 1.0 and exact_head.verdict == "higher"
    np.testing.assert_array_equal(res.jaccard["blocks.0.attn"][scored, 0], 1.0)
    assert exact_head.spatial_entropy >= 0 and uniform_head.n_entropy == 0  # uniform: no blob
    # uniform attention keeps every patch (ties all kept): exactly the all-foreground prediction
    assert uniform_head.jaccard == pytest.approx(reference, abs=1e-12) and uniform_head.gain == 0.0
    assert uniform_head.verdict == "not resolved" and uniform_head.kept_share == 1.0
    assert res.best["layer"] in ("blocks.0.attn", "blocks.1.attn") and res.best["jaccard"] == 1.0
    assert res.best_held_out["jaccard"] == 1.0 and res.best_held_out["n_scored"] == scored[1::2].sum()
    assert res.layer("blocks.1.attn").heads[1].jaccard == 1.0  # heads swapped in the second layer
    d = res.to_json()
    json.dumps(d, allow_nan=False)
    assert d["kind"] == "repsim.attention_segmentation" and d["store"]["fingerprint"] == store.fingerprint


def test_windowed_layers_are_skipped_and_old_stores_refused(tmp_path):
    q = np.full((4, HEADS, P), 1.0 / P)
    store = make_attention_store(tmp_path / "w.zarr", {"a": q, "b": q}, windowed=("b",))
    res = attention_segmentation(store, n_boot=10)
    assert [ly.layer for ly in res.layers] == ["a"] and "windowed" in res.skipped["b"]
    old = make_attention_store(tmp_path / "o.zarr", {"a": q}, query_maps_kept=False)
    with pytest.raises(UsageError, match="re-extract with --attention"):
        attention_segmentation(old)
    assert_one_line_error(run_cli("attention", old.path, "--segmentation"), "re-extract with --attention")


# ------------------------------------------------------------------------------------------------ masks

@pytest.mark.parametrize("crop_mode,crop_pct,size", [("center", 0.875, (40, 28)), ("squash", 0.875, (28, 40)),
                                                     ("border", 1.0, (40, 28)), ("center", 1.0, (28, 40))])
def test_input_masks_follow_the_timm_eval_geometry(crop_mode, crop_pct, size):
    """The mask lands where timm's evaluation transform puts the image (independent reference)."""
    from hooks.models.preprocess import Preprocessing

    rng = np.random.default_rng(1)
    mask = np.zeros(size, dtype=bool)
    mask[5:21, 3:17] = True
    mask[rng.random(size) < 0.05] = True
    prep = Preprocessing(img_size=(24, 24), mean=(0, 0, 0), std=(1, 1, 1), interpolation="bilinear",
                         crop_pct=crop_pct, crop_mode=crop_mode)
    ref = prep.transform()(Image.fromarray(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)))[0].numpy()
    mine = input_masks([mask], (24, 24), crop_pct, crop_mode)[0]
    np.testing.assert_allclose(mine, ref, atol=1.5 / 255)  # the reference went through uint8


def _folder_store(tmp_path, sizes, objects=None):
    """A flat image folder (ids = file names), masks for it (``objects[i]``: the pixel value of image i's object,
    top half; 0 = an empty mask; default 255), and a hand-built attention store over it."""
    images = tmp_path / "images"
    images.mkdir()
    ids = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(images / f"im{i}.jpg")
        ids.append(f"im{i}.jpg")
    q = np.full((len(ids), HEADS, P), 1.0 / P)
    store = make_attention_store(tmp_path / "f.zarr", {"a": q}, dataset="folder", ids=ids, root=str(images))
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, (h, w) in enumerate(sizes):
        m = np.zeros((h, w), np.uint8)
        m[: h // 2] = 255 if objects is None else objects[i]  # the top half is the object
        Image.fromarray(m).save(masks / f"im{i}.png")
    return store, masks


def test_masks_folder(tmp_path):
    store, masks = _folder_store(tmp_path, [(IMG, IMG), (IMG, 2 * IMG), (2 * IMG, IMG), (IMG, IMG)],
                                 objects=[255, 1, 7, 0])  # any non-zero value is object; the last mask is empty
    assert mask_file_name("cat/0001.JPG") == "cat/0001.png" and mask_file_name("img_7") == "img_7.png"
    res = attention_segmentation(store, masks_dir=masks, n_boot=10)
    # by hand: the centre crop of the 64-row image keeps rows 16..47, of which 16..31 are object: in every input
    # the top half (32 of 64 patches) is object, so the all-foreground Jaccard is 0.5 (a top crop would give 1);
    # the image without object has no defined Jaccard and is left out (counted as 0 the mean would be 0.375)
    assert res.layer("a").baseline == pytest.approx(0.5) and res.layer("a").n_scored == 3
    assert [int(m.sum()) for m in folder_masks(masks, store.ids)] == [IMG * IMG // 2] + [IMG * IMG] * 2 + [0]


def test_masks_folder_validation_exits_2(tmp_path):
    store, masks = _folder_store(tmp_path, [(IMG, IMG), (IMG, IMG)])
    assert_one_line_error(run_cli("attention", store.path, "--segmentation"), "pass --masks DIR")
    assert_one_line_error(run_cli("attention", store.path, "--segmentation", "--masks", str(tmp_path / "none")),
                          "no such folder")
    assert_one_line_error(run_cli("attention", store.path, "--masks", str(masks)), "need --segmentation")
    assert_one_line_error(run_cli("attention", store.path, "--segmentation", "--erf"), "use one of them")
    (masks / "im1.png").unlink()
    assert_one_line_error(run_cli("attention", store.path, "--segmentation", "--masks", str(masks)),
                          "1 of 2 samples have no mask, e.g. im1.png")
    Image.fromarray(np.zeros((IMG, IMG, 3), np.uint8)).save(masks / "im1.png")
    assert_one_line_error(run_cli("attention", store.path, "--segmentation", "--masks", str(masks)),
                          "single-channel")
    Image.fromarray(np.zeros((IMG, IMG + 1), np.uint8)).save(masks / "im1.png")
    assert_one_line_error(run_cli("attention", store.path, "--segmentation", "--masks", str(masks)),
                          "must have the original image's size")
    (masks / "im1.png").write_bytes(b"not a png")
    assert_one_line_error(run_cli("attention", store.path, "--segmentation", "--masks", str(masks)),
                          "cannot be decoded")
    assert_one_line_error(run_cli("attention", store.path, "--segmentation", "--mass", "0"), "mass must be")


# ------------------------------------------------------------------------------------------------ extraction

@pytest.fixture(scope="module")
def vit_stores(tmp_path_factory):
    """Random-init tiny ViTs (the bundled architectures, 64 px, 8 x 8 patches, 6 blocks of 4 heads) extracted with
    --attention on shapes: a CLS ViT and a GAP ViT (no prefix token)."""
    from hooks.extract.loop import extract
    from hooks.models.registry import load_model
    from repsim.data.sources import open_dataset

    root = tmp_path_factory.mktemp("seg")
    shapes = open_dataset("shapes", n=10, seed=3, image_size=64)
    kw = dict(layers=["blocks.5"], batch_size=4, chunk_size=8, dtype="float32", attention=True, attn_keep=5)
    return tuple(extract(load_model(name, random_init=True), shapes, str(root / f"{name}.zarr"), **kw)
                 for name in ("ref_vit", "ref_vit_gap"))


@pytest.mark.slow
def test_query_map_equals_the_cls_row_of_the_kept_maps(vit_stores):
    """The per-image query map is the CLS row over the patch keys, renormalised (CLS model), or the mean patch
    query's row (GAP model), of the full maps kept for the first K images (float16)."""
    cls_store, gap_store = vit_stores
    for layer in cls_store.attention_layers:
        full = cls_store.read_attention(layer, "maps").astype(np.float64)  # (5, heads, 65, 65)
        row = full[:, :, 0, 1:]
        np.testing.assert_allclose(cls_store.read_attention(layer, "query_map")[:5],
                                   row / row.sum(-1, keepdims=True), rtol=2e-3, atol=1e-5)
        assert cls_store.attention_info(layer)["query_map"] == "cls"
    for layer in gap_store.attention_layers:
        full = gap_store.read_attention(layer, "maps").astype(np.float64)  # (5, heads, 64, 64): no prefix
        np.testing.assert_allclose(gap_store.read_attention(layer, "query_map")[:5], full.mean(-2),
                                   rtol=2e-3, atol=1e-5)
        assert gap_store.attention_info(layer)["query_map"] == "mean"
    q = cls_store.read_attention(cls_store.attention_layers[0], "query_map")
    assert q.shape == (10, 4, 64) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_query_maps_survive_a_killed_extraction(vit_stores, tmp_path):
    """A resumed extraction writes the same query maps as one that ran through (the fixture's CLS store)."""
    from conftest import run_killed_after_chunks
    from hooks.extract.loop import plan_extraction, run_extraction
    from hooks.models.registry import load_model
    from repsim.data.sources import open_dataset

    cls_store = vit_stores[0]
    kw = dict(layers=["blocks.5"], batch_size=4, chunk_size=8, dtype="float32", attention=True, attn_keep=5)
    model, shapes = load_model("ref_vit", random_init=True), open_dataset("shapes", n=10, seed=3, image_size=64)
    out = str(tmp_path / "r.zarr")
    run_killed_after_chunks(plan_extraction(model, shapes, out, **kw), 1)
    resumed = run_extraction(plan_extraction(model, shapes, out, **kw))
    for layer in cls_store.attention_layers:
        np.testing.assert_array_equal(resumed.read_attention(layer, "query_map"),
                                      cls_store.read_attention(layer, "query_map"))


def test_query_maps_function():
    import torch

    a = torch.softmax(torch.randn(2, 3, 1 + 9, 1 + 9, dtype=torch.float64), -1)
    q = query_maps(a, (3, 3), 1)
    np.testing.assert_allclose(q.numpy(), (a[:, :, 0, 1:] / a[:, :, 0, 1:].sum(-1, keepdim=True)).numpy())
    b = torch.softmax(torch.randn(2, 3, 5, 9, dtype=torch.float64), -1)  # queries on a coarser grid (LeViT)
    np.testing.assert_allclose(query_maps(b, (3, 3), 0).numpy(), b.mean(-2).numpy())
    with pytest.raises(UsageError, match="keys"):
        query_maps(b, (3, 4), 0)


@pytest.mark.slow
def test_cli_writes_the_segmentation_section(vit_stores, tmp_path):
    cls_store, gap_store = vit_stores
    js, png = tmp_path / "a.json", tmp_path / "a.png"
    res = run_cli("attention", cls_store.path, "--segmentation", "--out", str(js), "--plot", str(png))
    assert res.exit_code == 0, res.output
    d = json.loads(js.read_text())
    assert d["kind"] == "repsim.attention" and d["layers"]  # the attention report is untouched
    seg = d["segmentation"]
    assert seg["kind"] == "repsim.attention_segmentation" and seg["mass"] == 0.6 and seg["n_images"] == 10
    assert [ly["layer"] for ly in seg["layers"]] == cls_store.attention_layers
    head = seg["layers"][0]["heads"][0]
    assert 0.0 <= head["jaccard_low"] <= head["jaccard"] <= head["jaccard_high"] <= 1.0
    assert "best head" in res.output and "selected on the even images" in res.output
    assert_drawn_png(tmp_path / "a_segmentation.png")
    res = run_cli("attention", gap_store.path, "--segmentation", "--mass", "0.5", "--out", str(js))
    assert res.exit_code == 0, res.output
    seg = json.loads(js.read_text())["segmentation"]
    assert seg["mass"] == 0.5 and {ly["query"] for ly in seg["layers"]} == {"mean"}


def test_a_map_without_weight_on_the_patches_is_left_out_not_scored_zero(tmp_path):
    """All of a query's attention on the class token (its patch part zero) used to abort the whole analysis;
    that image is now left out for that head (NaN, counted in n_weightless), and the other heads and images
    score as before."""
    n = 24
    true = _true_patches(n)
    scored = true.any(1)
    exact = np.where(true, 1.0, 0.0) + np.where(true.any(1, keepdims=True), 0.0, 1.0)
    q = np.stack([exact, exact], axis=1)
    lost = int(np.flatnonzero(scored)[0])
    q[lost, 1] = 0.0  # head 1 of one scored image: no weight on the patches
    res = attention_segmentation(make_attention_store(tmp_path / "s.zarr", {"blocks.0.attn": q}), n_boot=50)
    full, partial = res.layer("blocks.0.attn").heads
    assert full.n_weightless == 0 and partial.n_weightless == 1
    assert np.isnan(res.jaccard["blocks.0.attn"][lost, 1]) and res.jaccard["blocks.0.attn"][lost, 0] == 1.0
    share = np.where(scored, true.sum(1) / P, 1.0)  # the mass rule keeps the mask (uniform map: every patch)
    assert full.kept_share == pytest.approx(share.mean(), abs=1e-12)
    assert partial.jaccard == 1.0 and partial.kept_share == pytest.approx(np.delete(share, lost).mean(), abs=1e-12)
    # the gain pairs the same images: the lost one's reference is left out too
    base = (true.sum(1) / P)[scored]
    keep = np.ones(scored.sum(), dtype=bool)
    keep[0] = False
    assert partial.gain == pytest.approx(1.0 - base[keep].mean(), abs=1e-12)
    assert full.gain == pytest.approx(1.0 - base.mean(), abs=1e-12)
    assert "1 head maps had no weight on the patches" in res.summary()


def test_register_tokens_without_a_class_token_use_the_mean_query():
    """timm ViTs with register tokens but no class token (``vit_*_reg4_gap``): the first prefix token is a
    register, so the query map is the mean over patch queries (each renormalised over the patch keys), not the
    row of query 0; with a class token (registers or not) it stays the class token's row."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from hooks.capture.attention import find_attention_layers
    from repsim.attention.segmentation import query_map_kind

    common = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    reg_only = VisionTransformer(reg_tokens=4, class_token=False, global_pool="avg", no_embed_class=True, **common)
    cls_reg = VisionTransformer(reg_tokens=4, class_token=True, no_embed_class=True, **common)
    plain = VisionTransformer(**common)
    (lr,), (lc,), (lp,) = (find_attention_layers(m) for m in (reg_only, cls_reg, plain))
    assert (lr.num_prefix_tokens, lr.class_token) == (4, False)
    assert (lc.num_prefix_tokens, lc.class_token) == (5, True) and (lp.num_prefix_tokens, lp.class_token) == (1, True)
    assert [query_map_kind(ly.num_prefix_tokens, ly.class_token) for ly in (lr, lc, lp)] == ["mean", "cls", "cls"]
    assert query_map_kind(1) == "cls" and query_map_kind(0) == "mean"  # not recorded: as before

    a = torch.softmax(torch.randn(2, 2, 4 + 16, 4 + 16, dtype=torch.float64), -1)
    patch = a[..., 4:, 4:]
    by_hand = (patch / patch.sum(-1, keepdim=True)).mean(-2)  # mean over the 16 patch queries
    np.testing.assert_allclose(query_maps(a, (4, 4), 4, class_token=False).numpy(), by_hand.numpy(), rtol=1e-12)
    row = a[..., 0, 4:]
    np.testing.assert_allclose(query_maps(a, (4, 4), 4).numpy(), (row / row.sum(-1, keepdim=True)).numpy(),
                               rtol=1e-12)


def test_best_head_is_ranked_by_gain_over_the_grid_reference():
    """On a coarse grid the all-foreground reference already scores high, so the head with the highest raw Jaccard
    there can gain less than a fine-grid head: the best head is the one with the highest paired gain."""
    from repsim.attention.segmentation import _best

    rows = np.arange(4)
    coarse_base, fine_base = np.full(4, 0.5), np.full(4, 0.2)
    per_image = {"coarse": np.full((4, 1), 0.6), "fine": np.array([[0.5], [0.5], [0.5], [np.nan]])}
    best = _best(per_image, {"coarse": coarse_base, "fine": fine_base}, rows, n_boot=50, seed=0)
    assert (best["layer"], best["head"]) == ("fine", 0)
    assert best["jaccard"] == pytest.approx(0.5) and best["gain"] == pytest.approx(0.3) and best["n_scored"] == 3
