"""Object-localisation probe (probes.foreground_probe) and pointing game (hooks.gradients.attribution)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from probes.foreground_probe import (
    foreground_fractions,
    input_masks,
    object_localisation,
    parse_shapes_id,
    shapes_masks,
    token_iou,
)
from repsim.errors import UsageError
from repsim.data.shapes import MIN_CONTRAST, ShapesDataset, render_shape_sample
from repsim.store.format import fingerprint_ids
from repsim.store.reader import ActivationStore
from repsim.store.writer import LayerSpec, StoreWriter
from conftest import assert_drawn_png

IMG, PATCH = 32, 4
GRID = IMG // PATCH
P = GRID * GRID


def make_store(path, acts, *, dataset="shapes", n=None, seed=0, crop_pct=1.0):
    n = n or next(iter(acts.values())).shape[0]
    if dataset == "shapes":
        ids = ShapesDataset(n, seed=seed, image_size=IMG).ids
    else:
        ids = [f"img{i:05d}.png" for i in range(n)]
    attrs = {
        "format_version": 1,
        "model": {"name": "synthetic", "source": "test", "patch_size": PATCH, "num_prefix_tokens": 1,
                  "grid": [GRID, GRID]},
        "dataset": {"name": dataset, "root": None, "n": n, "seed": seed, "fingerprint": fingerprint_ids(ids)},
        "preprocessing": {"img_size": [IMG, IMG], "crop_pct": crop_pct},
        "extraction": {"chunk_size": 64, "dtype": "float32", "save_inputs": False},
    }
    specs = []
    for name, a in acts.items():
        info = ({"kind": "tokens", "num_prefix_tokens": 1, "grid": [GRID, GRID]} if a.ndim == 3 else
                {"kind": "map", "grid": list(a.shape[2:])} if a.ndim == 4 else {"kind": "vector"})
        specs.append(LayerSpec(name, tuple(a.shape[1:]), info))
    w = StoreWriter.create(str(path), attrs, specs, ids, np.zeros(n, dtype=np.int64), dtype="float32")
    for c in range(-(-n // 64)):
        rows = w.chunk_rows(c)
        w.write_chunk(c, {k: v[rows] for k, v in acts.items()})
    w.update_attrs(complete=True)
    return ActivationStore(str(path))


def _true_fractions(n, seed=0):
    """Independent ground truth: render, then block-average the mask over PATCH x PATCH cells."""
    m = np.stack([render_shape_sample(seed, i, IMG)[1] for i in range(n)]).astype(np.float32)
    return m.reshape(n, GRID, PATCH, GRID, PATCH).mean(axis=(2, 4)).reshape(n, P)


# ------------------------------------------------------------------------------------------------ masks

def test_masks_line_up_with_the_object():
    ds = ShapesDataset(6, seed=3, image_size=48)
    masks = shapes_masks(ds.ids)
    assert masks.shape == (6, 48, 48) and masks.dtype == bool
    for i in range(6):
        assert np.array_equal(masks[i], ds.load_mask(i))
        img = np.asarray(ds.load(i), dtype=np.float64)
        m = masks[i]
        # interior / exterior away from the anti-aliased edge (erode both by one pixel)
        inner = m.copy()
        outer = ~m
        for ax in (0, 1):
            for s in (1, -1):
                inner &= np.roll(m, s, axis=ax)
                outer &= ~np.roll(m, s, axis=ax)
        obj = img[inner]
        assert obj.std(axis=0).max() < 1.0  # the object is one flat colour
        colour = obj.mean(axis=0)
        dist = np.linalg.norm(img[outer] - colour, axis=1)
        assert dist.min() >= MIN_CONTRAST - 2  # every background pixel contrasts with it
        assert 0.08 < m.mean() < 0.4  # area within AREA_RANGE (anti-aliasing aside)


def test_parse_id_and_refuse_other_ids():
    assert parse_shapes_id("shapes/v1/seed=2/size=32/17") == (1, 2, 32, 17)
    with pytest.raises(UsageError, match="not a shapes id"):
        parse_shapes_id("img0001.png")
    with pytest.raises(UsageError, match="generator"):
        shapes_masks(["shapes/v999/seed=0/size=32/0"])


def test_fractions_and_crop_geometry():
    masks = shapes_masks(ShapesDataset(4, image_size=IMG).ids)
    same = input_masks(masks, (IMG, IMG), 1.0)
    assert np.array_equal(same, masks.astype(np.float32))  # identity geometry
    np.testing.assert_allclose(foreground_fractions(same, (GRID, GRID)), _true_fractions(4), atol=1e-6)
    # crop_pct < 1 agrees with the real preprocessing transform applied to the mask image
    from PIL import Image

    from hooks.models.preprocess import Preprocessing

    prep = Preprocessing((IMG, IMG), (0, 0, 0), (1, 1, 1), "bilinear", 0.875, "center")
    tf = prep.transform()
    mine = input_masks(masks, (IMG, IMG), 0.875)
    for k, m in enumerate(masks):
        ref = tf(Image.fromarray(np.repeat(m[..., None].astype(np.uint8) * 255, 3, axis=2)))[0].numpy()
        assert np.mean((ref > 0.5) == (mine[k] > 0.5)) > 0.97


def test_token_iou():
    pred = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    true = np.array([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=bool)
    per, pooled = token_iou(pred, true)
    assert per[0] == pytest.approx(1 / 3) and np.isnan(per[1])  # no true foreground: no IoU
    assert pooled == pytest.approx(1 / 3)
    per, pooled = token_iou(np.array([[1, 0]], dtype=bool), np.array([[0, 0]], dtype=bool))
    assert np.isnan(per[0]) and pooled == 0.0  # a false positive still costs pooled IoU


# ------------------------------------------------------------------------------------------------ probe


def test_probe_reads_encoded_fractions_and_not_random(tmp_path):
    n, D = 120, 8
    rng = np.random.default_rng(0)
    frac = _true_fractions(n)
    good = rng.normal(size=(n, 1 + P, D)).astype(np.float32) * 0.05
    good[:, 1:, 0] = frac  # feature 0 = the patch's foreground fraction, plus small noise elsewhere
    rand = rng.normal(size=(n, 1 + P, D)).astype(np.float32)
    cmap = np.repeat(frac.reshape(n, 1, GRID, GRID), 4, axis=1) + rng.normal(size=(n, 4, GRID, GRID)) * 0.01
    vec = rng.normal(size=(n, 5)).astype(np.float32)
    store = make_store(tmp_path / "s.zarr", {"good": good, "rand": rand, "cmap": cmap.astype(np.float32),
                                             "vec": vec})
    res = object_localisation(store, device="cpu")
    assert res.layers == ["good", "rand", "cmap"]  # vector layer skipped
    g, r, c = res.row("good"), res.row("rand"), res.row("cmap")
    assert g.n_test_images == 24 and g.n_train_images + g.n_val_images == 96
    assert g.iou_mean > 0.9 and g.iou_pooled > 0.9 and g.accuracy > 0.97
    assert c.iou_mean > 0.9
    assert 0.05 < g.foreground_share < 0.5
    assert g.baseline_accuracy == pytest.approx(1 - g.foreground_share)
    assert g.baseline_iou == 0.0 and g.n_scored_images == 24
    assert g.all_foreground_iou == pytest.approx(g.foreground_share, rel=0.1)
    assert r.iou_pooled < 0.3 and r.accuracy < r.baseline_accuracy + 0.03
    # uncertainty: bootstrap over the scored test images; the gain over "all foreground" is paired by image
    assert g.iou_low <= g.iou_mean <= g.iou_high and g.iou_high - g.iou_low < 0.2
    assert g.gain_over_all_foreground == pytest.approx(g.iou_mean - g.all_foreground_iou, abs=1e-12)
    assert g.gain_low > 0 and 0 < g.predicted_foreground_share < 0.5
    d = res.to_json(tmp_path / "ol.json")
    assert json.loads((tmp_path / "ol.json").read_text())["kind"] == "repsim.object_localization"
    assert d["rows"][0]["layer"] == "good"
    res.plot(tmp_path / "ol.png")
    assert_drawn_png(tmp_path / "ol.png")
    with pytest.raises(UsageError, match="'vec' is a vector layer"):
        object_localisation(store, layers=["vec"], device="cpu")
    lr = object_localisation(store, layers=["good"], method="logreg", device="cpu", lambdas=[1e-3, 1e-2])
    assert lr.row("good").iou_mean > 0.9


def test_non_shapes_store_refused(tmp_path):
    acts = {"t": np.zeros((10, 1 + P, 4), dtype=np.float32)}
    store = make_store(tmp_path / "f.zarr", acts, dataset="fake")
    with pytest.raises(UsageError, match="shapes"):
        object_localisation(store)


# ------------------------------------------------------------------------------------------------ pointing game


class _ObjectSum(nn.Module):
    """Logit 0 = sum of positive-weight conv responses: only non-zero (object) pixels contribute."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        nn.init.uniform_(self.conv.weight, 0.1, 1.0)

    def forward(self, x):
        s = torch.relu(self.conv(x)).sum(dim=(1, 2, 3))
        return torch.stack([s, -s], dim=1)


def _object_images(n=6, size=32):
    masks = shapes_masks(ShapesDataset(n, seed=1, image_size=size).ids)
    x = torch.from_numpy(masks.astype(np.float32))[:, None].repeat(1, 3, 1, 1)  # object 1, background 0
    return x, masks


def _ig_reference(model, x, targets, baseline="zero", n_steps=16):
    """Integrated Gradients by hand (Sundararajan et al. 2017, Eq. 1), no captum: (x - x0) times the path
    integral of d logit[target] / dx from the baseline x0 to x, by Gauss-Legendre quadrature with ``n_steps``
    nodes on [0, 1] (captum's default rule); the pixel map is the sum over channels of |attribution|."""
    x0 = torch.zeros_like(x) if baseline == "zero" else x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    integral = torch.zeros_like(x)
    for node, weight in zip(nodes, weights):
        xi = (x0 + (node + 1) / 2 * (x - x0)).detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(model(xi).gather(1, targets[:, None]).sum(), xi)
        integral += weight / 2 * grad
    return ((x - x0) * integral).abs().sum(dim=1)


def _pointing_by_hand(maps, masks):
    """(points [(y, x)], hits, degenerate) of maps (B, H, W): arg-max pixel (first in row-major order), a hit
    when it lies on the mask and the map is not constant."""
    flat = maps.reshape(maps.shape[0], -1)
    idx = flat.argmax(dim=1)
    points = [[int(i) // maps.shape[2], int(i) % maps.shape[2]] for i in idx]
    degenerate = [bool(f.max() == f.min()) for f in flat]
    hits = [bool(masks[i][y, x_]) and not degenerate[i] for i, (y, x_) in enumerate(points)]
    return points, hits, degenerate


def test_pointing_game_ig_finds_the_object():
    from hooks.gradients.attribution import attribution_maps, pointing_game

    torch.manual_seed(0)
    x, masks = _object_images()
    res = pointing_game(_ObjectSum(), x, masks, method="ig", n_steps=8)
    assert res["accuracy"] == 1.0 and all(res["hits"]) and res["n"] == 6
    assert res["targets"] == [0] * 6 and res["degenerate"] == 0
    # the mean-colour baseline: maps equal IG by hand, and the game scores exactly their arg-max pixels
    # (coloured images on a grey ground: each channel has its own mean, unlike the grey object images)
    x = x * torch.tensor([1.0, 0.4, 0.1]).view(1, 3, 1, 1) + torch.tensor([0.2, 0.3, 0.5]).view(1, 3, 1, 1)
    model = _ObjectSum()
    targets = torch.zeros(6, dtype=torch.long)
    ref = _ig_reference(model, x, targets, baseline="mean", n_steps=8)
    maps = attribution_maps(model, x, targets, method="ig", baseline="mean", n_steps=8)
    torch.testing.assert_close(maps, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    assert not torch.allclose(ref, _ig_reference(model, x, targets, baseline="zero", n_steps=8))  # baselines differ
    res = pointing_game(model, x, masks, method="ig", baseline="mean", target=0, n_steps=8)
    points, hits, degenerate = _pointing_by_hand(ref, masks)
    assert res["n"] == 6 and res["points"] == points and res["hits"] == hits
    assert res["degenerate"] == sum(degenerate) and res["accuracy"] == pytest.approx(np.mean(hits))
    assert (res["baseline"], res["n_steps"], res["targets"]) == ("mean", 8, [0] * 6)
    # Grad-CAM on the hand-built model's conv also points at the object
    res = pointing_game(_ObjectSum(), x, masks, method="gradcam", layer="conv", tolerance=1)
    assert res["accuracy"] == 1.0


def test_pointing_game_tolerance_and_degenerate():
    from hooks.gradients.attribution import pointing_hits

    maps = torch.zeros(2, 8, 8)
    maps[0, 0, 0] = 1.0
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[:, 2:4, 2:4] = True
    hits, pts, deg = pointing_hits(maps, masks, tolerance=0)
    assert not hits.any() and deg.tolist() == [False, True] and pts[0].tolist() == [0, 0]
    hits, _, _ = pointing_hits(maps, masks, tolerance=2)
    assert hits.tolist() == [True, False]


def _gradcam_reference(model, x, targets, layer, num_prefix_tokens=0, grid=None):
    """Grad-CAM by hand (Selvaraju et al. 2017), no captum: plain autograd on the layer's output.

    Weights = spatial mean of d logit[target] / d A; map = ReLU(sum_c w_c A_c), bilinearly upsampled
    (align_corners=False). Tokens (B, T, D): prefix dropped, patch tokens laid out row-major on ``grid``.
    """
    import torch.nn.functional as F

    seen = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.setdefault("a", out))
    try:
        with torch.enable_grad():
            logits = model(x)
            (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), seen["a"])
    finally:
        handle.remove()
    act = seen["a"].detach()
    if act.ndim == 3:
        B, _, D = act.shape
        act = act[:, num_prefix_tokens:].transpose(1, 2).reshape(B, D, *grid)
        grad = grad[:, num_prefix_tokens:].transpose(1, 2).reshape(B, D, *grid)
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("arch,layer", [("resnet18", "layer2"), ("vit_tiny_patch16_224", "blocks.0")])
def test_gradcam_on_tiny_timm_models_equals_a_hand_computation(arch, layer):
    """The maps equal Grad-CAM computed by hand (a token map shifted by one token, a transposed grid or a
    wrong layer would not), and the pointing game scores the arg-max of exactly those maps."""
    import timm

    from hooks.gradients.attribution import attribution_maps, pointing_game

    torch.manual_seed(0)
    kw = {"depth": 2, "img_size": 32, "patch_size": 8, "embed_dim": 48, "num_heads": 2} if "vit" in arch else {}
    model = timm.create_model(arch, pretrained=False, num_classes=8, **kw).eval()
    x, masks = _object_images(n=3, size=32)
    x = x + 0.1 * torch.randn_like(x)
    # resnet18 layer2: a 4 x 4 map; ViT: the first of two blocks (the last block's patch tokens get no gradient
    # through the CLS-token head, so its Grad-CAM is all zero and would check nothing)
    extra = {"num_prefix_tokens": 1, "grid": (4, 4)} if "vit" in arch else {}
    with torch.no_grad():
        targets = model(x).argmax(dim=1)
    ref = _gradcam_reference(model, x, targets, layer, **extra)
    flat_ref = ref.reshape(3, -1)
    degenerate = (flat_ref.amax(dim=1) == flat_ref.amin(dim=1)).tolist()  # all zero after the ReLU
    assert ref.shape == (3, 32, 32) and sum(degenerate) <= 1  # mostly informative maps: the check has teeth
    maps = attribution_maps(model, x, targets, method="gradcam", layer=layer, **extra)
    torch.testing.assert_close(maps, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    res = pointing_game(model, x, masks, method="gradcam", layer=layer, **extra)
    assert res["layer"] == layer and res["targets"] == targets.tolist() and res["degenerate"] == sum(degenerate)
    flat = flat_ref.argmax(dim=1)
    points = torch.stack([flat // 32, flat % 32], dim=1)
    assert res["points"] == points.tolist()
    assert res["hits"] == [bool(masks[i, y, x_]) and not degenerate[i] for i, (y, x_) in enumerate(points.tolist())]
    assert res["accuracy"] == pytest.approx(np.mean(res["hits"]))


def test_gradcam_maps_have_input_shape():
    from hooks.gradients.attribution import attribution_maps

    x, _ = _object_images(n=2)
    maps = attribution_maps(_ObjectSum(), x, torch.zeros(2, dtype=torch.long), method="gradcam", layer="conv")
    assert maps.shape == (2, 32, 32) and (maps >= 0).all()
    with pytest.raises(UsageError, match="method must be one of ig, gradcam, got 'saliency'"):
        attribution_maps(_ObjectSum(), x, torch.zeros(2, dtype=torch.long), method="saliency")


def test_store_pointing_game_end_to_end(tmp_path):
    """A random-init resnet18 store of shapes images: masks follow the preprocessing, both methods run."""
    from hooks.gradients.attribution import store_masks, store_pointing_game
    from hooks.extract.loop import extract
    from hooks.models.registry import load_model

    model = load_model("timm:resnet18", random_init=True, img_size=32)
    store = extract(model, ShapesDataset(12, seed=0, image_size=32), str(tmp_path / "r.zarr"),
                    layers=["layer1.0", "layer4.1"], device="cpu", batch_size=12, dtype="float32")
    masks = store_masks(store, 4, model.preprocessing)
    mine = input_masks(shapes_masks(store.ids[:4]), (32, 32), model.preprocessing.crop_pct) > 0.5
    assert masks.shape == (4, 32, 32) and np.mean(masks == mine) > 0.97
    # by hand on the same model and images: the store's first 4 samples, targets = predicted classes
    data = ShapesDataset(12, seed=0, image_size=32)
    assert store.ids[:4] == data.ids[:4]
    x = torch.stack([model.preprocessing.transform()(data.load(i)) for i in range(4)])
    with torch.no_grad():
        targets = model.module(x).argmax(dim=1)
    refs = {"ig": _ig_reference(model.module, x, targets, n_steps=4),
            "gradcam": _gradcam_reference(model.module, x, targets, "layer4.1")}
    for method in ("ig", "gradcam"):
        res = store_pointing_game(store, method, n=4, n_steps=4)
        points, hits, degenerate = _pointing_by_hand(refs[method], masks)
        assert res["n"] == 4 and res["targets"] == targets.tolist(), method
        assert res["points"] == points and res["hits"] == hits and res["degenerate"] == sum(degenerate), method
        assert res["accuracy"] == pytest.approx(np.mean(hits))
    assert res["store_layer"] == "layer4.1" and res["layer"] == "layer4.1"
    fake = make_store(tmp_path / "f.zarr", {"t": np.zeros((4, 1 + P, 4), dtype=np.float32)}, dataset="fake")
    with pytest.raises(UsageError, match="shapes"):
        store_masks(fake, 2, model.preprocessing)


class _TokenModel(nn.Module):
    """ViT-like: a CLS token + 8x8 patch tokens (row-major); logit = sum of positive patch-token features."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 6, PATCH, stride=PATCH, bias=False)
        nn.init.uniform_(self.patch.weight, 0.1, 1.0)
        self.cls = nn.Parameter(torch.full((1, 1, 6), 5.0))
        self.block = nn.Identity()

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, P, D), row-major cells
        t = self.block(torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1))
        s = torch.relu(t[:, 1:]).sum(dim=(1, 2))
        return torch.stack([s, -s], dim=1)


def test_gradcam_on_tokens_points_at_the_object():
    """Prefix tokens dropped and the patch tokens laid out row-major: a transposed grid would miss."""
    from hooks.gradients.attribution import attribution_maps, pointing_game

    torch.manual_seed(0)
    x, masks = _object_images(n=8)
    res = pointing_game(_TokenModel(), x, masks, method="gradcam", layer="block", num_prefix_tokens=1,
                        grid=(GRID, GRID))
    assert res["accuracy"] == 1.0 and res["degenerate"] == 0
    maps = attribution_maps(_TokenModel(), x, torch.zeros(8, dtype=torch.long), method="gradcam", layer="block",
                            num_prefix_tokens=1, grid=(GRID, GRID))
    cells = maps.reshape(8, GRID, PATCH, GRID, PATCH).mean(dim=(2, 4)).reshape(8, P).numpy()
    frac = foreground_fractions(masks, (GRID, GRID))
    for k in range(8):  # the cell map follows the object's coverage
        assert np.corrcoef(cells[k], frac[k])[0, 1] > 0.8
    with pytest.raises(UsageError, match="grid"):
        pointing_game(_TokenModel(), x, masks, method="gradcam", layer="block", num_prefix_tokens=1, grid=(4, 4))


def test_store_masks_render_shapes_ids_and_refuse_other_generators():
    """The pointing game's masks come from repsim.data.masks' shapes ids: at the model's size with crop_pct 1 the
    transform is the identity, so they are the rendered masks; another generator version is refused."""
    from types import SimpleNamespace

    from hooks.gradients.attribution import store_masks
    from hooks.models.preprocess import Preprocessing
    from repsim.data.shapes import GENERATOR_VERSION

    ids = ShapesDataset(3, seed=1, image_size=IMG).ids
    prep = Preprocessing((IMG, IMG), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), crop_pct=1.0)
    store = SimpleNamespace(attrs={"dataset": {"name": "shapes"}}, ids=ids, n=3, path="s.zarr")
    truth = np.stack([render_shape_sample(1, i, IMG)[1] for i in range(2)])
    np.testing.assert_array_equal(store_masks(store, 2, prep), truth)
    old = SimpleNamespace(attrs=store.attrs, ids=[f"shapes/v{GENERATOR_VERSION + 1}/seed=1/size={IMG}/0"], n=1,
                          path="o.zarr")
    with pytest.raises(UsageError, match=f"shapes generator v{GENERATOR_VERSION + 1}, this repsim has"):
        store_masks(old, 1, prep)
    with pytest.raises(UsageError, match="'cat/1.png' is not a shapes id"):
        store_masks(SimpleNamespace(attrs=store.attrs, ids=["cat/1.png"], n=1, path="c.zarr"), 1, prep)


def test_probe_labels_follow_the_recorded_crop(tmp_path):
    """crop_pct 0.5: the foreground labels are the masks carried through the recorded preprocessing (resize the
    mask to 2x, keep the centre), built here by hand with PIL; features that encode those fractions probe well."""
    from PIL import Image

    n, D = 120, 4
    big = 2 * IMG
    crop = []
    for i in range(n):
        m = render_shape_sample(0, i, IMG)[1].astype(np.float32)
        up = np.asarray(Image.fromarray(m, mode="F").resize((big, big), Image.Resampling.BILINEAR))
        crop.append(np.clip(up[IMG // 2: IMG // 2 + IMG, IMG // 2: IMG // 2 + IMG], 0, 1))
    frac = np.stack(crop).reshape(n, GRID, PATCH, GRID, PATCH).mean(axis=(2, 4)).reshape(n, P)
    rng = np.random.default_rng(1)
    good = rng.normal(size=(n, 1 + P, D)).astype(np.float32) * 0.05
    good[:, 1:, 0] = frac
    store = make_store(tmp_path / "c.zarr", {"good": good}, crop_pct=0.5)
    res = object_localisation(store, device="cpu")
    g = res.row("good")
    assert res.protocol["crop_pct"] == 0.5 and g.iou_mean > 0.9 and g.accuracy > 0.97
