"""`repsim extract --attention` and `repsim attention`: stored statistics equal a hook-free recomputation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hooks.extract.loop import extract, plan_extraction, run_extraction
from hooks.models.registry import load_model
from repsim.attention.statistics import aligned_attention, attention_distance, attention_entropy, prefix_mass
from repsim.attention.report import attention_report, store_rollout
from conftest import run_cli as _cli, run_killed_after_chunks
from repsim.data.sources import open_dataset
from repsim.errors import UsageError
from repsim.store.verify import verify_store

VIT = "timm:vit_tiny_patch16_224"
IMG = 64  # grid 4 x 4, 17 tokens


@pytest.fixture(scope="module")
def vit():
    return load_model(VIT, random_init=True, img_size=IMG)


@pytest.fixture(scope="module")
def shapes():
    return open_dataset("shapes", n=12, seed=5, image_size=IMG)


def _direct_attention(model, source, idx):
    """Attention probabilities of every block for samples ``idx``, recomputed from the qkv weights."""
    transform = model.preprocessing.transform()
    x = torch.stack([transform(source.load(i)) for i in idx])
    m = model.module
    out = []
    with torch.no_grad():
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for blk in m.blocks:
            a = blk.attn
            b, n, c = h.shape
            qkv = a.qkv(blk.norm1(h)).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
            q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
            out.append(((q * a.scale) @ k.transpose(-2, -1)).softmax(-1))
            h = blk(h)
    return out


@pytest.fixture(scope="module")
def store(vit, shapes, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("attn") / "v.zarr")
    # chunk 8 over 12 samples: a full and a partial chunk; keep 5 maps: straddles the 4-image batches
    return extract(vit, shapes, out, layers=["blocks.*"], batch_size=4, chunk_size=8, dtype="float32",
                   attention=True, attn_keep=5)


def test_stored_statistics_equal_recomputation(store, vit, shapes):
    assert store.attention_layers == [f"blocks.{i}.attn" for i in range(12)]
    info = store.attention_info("blocks.3.attn")
    assert info["num_heads"] == 3 and info["grid"] == [4, 4] and info["num_prefix_tokens"] == 1
    assert info["patch_size"] == [16, 16]
    direct = _direct_attention(vit, shapes, range(12))
    for i, ref in enumerate(direct):
        layer = f"blocks.{i}.attn"
        np.testing.assert_allclose(store.read_attention(layer, "distance"),
                                   attention_distance(ref, (4, 4), 16, 1).numpy(), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(store.read_attention(layer, "prefix_mass"), prefix_mass(ref, 1).numpy(),
                                   atol=1e-5)
        np.testing.assert_allclose(store.read_attention(layer, "entropy"), attention_entropy(ref, 1).numpy(),
                                   atol=1e-4)
        aligned = store.read_attention(layer, "aligned")
        assert aligned.shape == (2, 3, 7, 7)  # one row per sample chunk
        np.testing.assert_allclose(aligned[0], aligned_attention(ref[:8], (4, 4), 1).sum(0).numpy(), atol=1e-4)
        np.testing.assert_allclose(aligned.sum(0), aligned_attention(ref, (4, 4), 1).sum(0).numpy(), atol=1e-4)
        maps = store.read_attention(layer, "maps")
        assert maps.shape == (5, 3, 17, 17) and maps.dtype == np.float16
        np.testing.assert_allclose(maps.astype(np.float32), ref[:5].numpy(), atol=1e-3)
    assert verify_store(store).ok


def test_activations_unchanged_by_the_attention_capture(store, vit, shapes, tmp_path):
    """Fused attention is switched off for the capture: the stored activations must not move."""
    plain = extract(vit, shapes, str(tmp_path / "p.zarr"), layers=["blocks.*"], batch_size=4, chunk_size=8,
                    dtype="float32")
    for layer in plain.layers:
        np.testing.assert_allclose(store.read(layer), plain.read(layer), atol=1e-5, rtol=1e-5)


def test_resume_keeps_attention_arrays_identical(store, vit, shapes, tmp_path):
    out = str(tmp_path / "r.zarr")
    kw = dict(layers=["blocks.*"], batch_size=4, chunk_size=8, dtype="float32", attention=True, attn_keep=5)
    run_killed_after_chunks(plan_extraction(vit, shapes, out, **kw), 1)
    resumed = run_extraction(plan_extraction(vit, shapes, out, **kw))
    assert resumed.complete
    for layer in store.attention_layers:
        for stat in ("distance", "aligned", "maps"):
            np.testing.assert_array_equal(resumed.read_attention(layer, stat), store.read_attention(layer, stat))


def test_report_and_rollout(store):
    report = attention_report(store)
    assert [ly.layer for ly in report.layers] == store.attention_layers
    ly = report.layers[0]
    assert len(ly.heads) == 3 and ly.grid == [4, 4]
    dist = store.read_attention("blocks.0.attn", "distance").astype(np.float64)
    assert ly.heads[1].distance_px == pytest.approx(dist[:, 1].mean())
    assert ly.heads[1].distance_std_px == pytest.approx(dist[:, 1].std(ddof=1))
    d = report.to_json()
    json.dumps(d, allow_nan=False)
    assert d["n"] == 12 and d["fingerprint"] == store.fingerprint and "definitions" in d


def _reference_rollout(attns, grid):
    """Abnar & Zuidema (2020) in numpy: per layer the head mean, 0.5 A + 0.5 I, rows renormalised, later layers
    multiplied on the left; the CLS row over the patch tokens, row-major on the grid."""
    out = []
    for b in range(attns[0].shape[0]):
        r = np.eye(attns[0].shape[-1])
        for a in attns:
            m = 0.5 * a[b].mean(0) + 0.5 * np.eye(a.shape[-1])
            r = (m / m.sum(1, keepdims=True)) @ r
        out.append(r[0, 1:].reshape(grid))
    return np.stack(out)


def test_store_rollout_equals_a_recomputation(store, vit, shapes):
    """Every block's hook-free attention enters the rollout, in network order (first-layer-only, last-layer-only
    or a reversed product would differ)."""
    direct = [a.double().numpy() for a in _direct_attention(vit, shapes, range(3))]
    roll = store_rollout(store, images=3)
    assert roll.shape == (3, 4, 4)
    ref = _reference_rollout(direct, (4, 4))
    np.testing.assert_allclose(roll, ref, rtol=0, atol=2e-4)  # the kept maps are float16
    for partial in (direct[:1], direct[-1:], direct[::-1]):  # the tolerance separates the wrong rollouts
        assert np.abs(_reference_rollout(partial, (4, 4)) - ref).max() > 2e-3


def test_attention_requires_attention_layers(tmp_path, shapes):
    cnn = load_model("timm:resnet18", random_init=True, img_size=IMG)
    with pytest.raises(UsageError, match="no attention"):
        plan_extraction(cnn, shapes, str(tmp_path / "c.zarr"), attention=True)


def test_cli_attention_and_erf(store, tmp_path):
    js, png = tmp_path / "a.json", tmp_path / "a.png"
    res = _cli("attention", store.path, "--out", str(js), "--plot", str(png))
    assert res.exit_code == 0, res.output
    d = json.loads(js.read_text())
    head = d["layers"][0]["heads"][0]
    assert set(head) >= {"distance_px", "distance_std_px", "prefix_mass", "entropy", "offset", "kind"}
    for p in (png, tmp_path / "a_aligned.png", tmp_path / "a_rollout.png"):
        assert p.read_bytes()[:4] == b"\x89PNG", p

    r18 = str(tmp_path / "r18.zarr")
    res = _cli("extract", "--model", "timm:resnet18", "--random-init", "--img-size", "32", "--data", "shapes",
               "--n", "8", "--batch-size", "4", "--out", r18, "--quiet")
    assert res.exit_code == 0, res.output
    res = _cli("attention", r18)
    assert res.exit_code == 2 and "--erf" in res.output and "Traceback" not in res.output
    res = _cli("attention", r18, "--erf", "--erf-images", "2", "--out", str(tmp_path / "e.json"),
               "--plot", str(tmp_path / "e.png"))
    assert res.exit_code == 0, res.output
    e = json.loads((tmp_path / "e.json").read_text())
    radii = [ly["radius_px"] for ly in e["layers"]]
    assert e["kind"] == "repsim.erf" and len(radii) >= 4 and radii[-1] > radii[0]
    res = _cli("extract", "--model", "timm:resnet18", "--random-init", "--img-size", "32", "--data", "shapes",
               "--n", "8", "--attention", "--out", str(tmp_path / "x.zarr"), "--quiet")
    assert res.exit_code == 2 and "no attention" in res.output


def test_random_vit_b16_at_224_attends_uniformly():
    """Random init (timm's trunc-normal, std 0.02) gives near-zero logits: every head's distance is the
    uniform value, 116.5 px on 14 x 14 patches of 16 px (the reference of the ViT paper's Fig. 7)."""
    from hooks.capture.attention import AttentionCapture
    from repsim.attention.statistics import head_statistics

    model = load_model("vit_b16", random_init=True)
    assert model.info.grid == (14, 14) and model.info.num_prefix_tokens == 1
    x = torch.randn(2, 3, 224, 224)
    dist = []
    with AttentionCapture(model.module, callback=lambda p, r: dist.append(
            head_statistics(r.probs, r.grid, r.patch_size, r.num_prefix_tokens)["distance"])), torch.no_grad():
        model.module(x)
    d = torch.stack(dist)  # (12 layers, 2 images, 12 heads)
    assert d.shape == (12, 2, 12)
    assert float((d - 116.49).abs().max()) < 0.02 * 116.49
