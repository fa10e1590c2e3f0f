"""The timm ViT zoo (issue 17): every family extracts at a small size, and every captured family's attention
(a) leaves the model's outputs unchanged and (b) gives per-head statistics equal to a hook-free recomputation
of the probabilities from the layer's own weights, with the token geometry written out here by hand.

Family sweep: random-init, tiny configs (``timm.create_model(..., img_size=small)``, fewer blocks), so that a
timm change that breaks one family fails here rather than silently.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from hooks.capture.attention import AttentionCapture, find_attention_layers, no_attention_reason  # noqa: E402
from hooks.capture.attention_reduce import AttentionReducer  # noqa: E402
from repsim.attention.statistics import class_attention_statistics, grid_positions, head_statistics  # noqa: E402
from repsim.errors import UsageError  # noqa: E402

# name -> (timm kwargs, input size, what the capture reports)
FAMILIES = {
    "levit_128s": (dict(img_size=64), 64, "per-stage grids, biases, subsampling queries"),
    "levit_conv_128s": (dict(img_size=64), 64, "LeViT in its conv layout"),
    "cait_xxs24_224": (dict(img_size=32, depth=2), 32, "talking-heads self-attention + class attention"),
    "convit_tiny": (dict(img_size=32, depth=3, local_up_to_layer=2), 32, "GPSA then MHSA"),
    "pit_ti_224": (dict(img_size=64), 64, "per-stage grids after pooling"),
    "crossvit_tiny_240": (dict(img_size=120, depth=((1, 1, 0),) * 2), 120, "per-branch grids, cross-attention"),
    "twins_svt_small": (dict(img_size=224, depths=(2, 2, 2, 2)), 224, "local windows, global sub-sampled keys"),
}


def _build(name):
    kw, img, _ = FAMILIES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = timm.create_model(name, pretrained=False, **kw).eval()
    g = torch.Generator().manual_seed(1)
    # random-init attention is near uniform; larger q/k weights make maps that differ between tokens and heads
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "attention_biases" in n or "pos_proj" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return m, torch.randn(2, 3, img, img, generator=g)


# ------------------------------------------------------------------------------------------------------
# hook-free recomputation of the probabilities from each layer's own weights and its input
# ------------------------------------------------------------------------------------------------------
def _heads(t, B, N, H):
    return t.reshape(B, N, H, -1).permute(0, 2, 1, 3)


def _recompute(m, args, kwargs):
    kind = type(m).__module__ + "." + type(m).__name__
    x = args[0]
    H = m.num_heads
    if kind == "timm.models.levit.Attention":
        if m.use_conv:
            B, C, hh, ww = x.shape
            q, k, _ = m.qkv(x).view(B, H, -1, hh * ww).split([m.key_dim, m.key_dim, m.val_dim], dim=2)
            q, k = q.transpose(-2, -1), k.transpose(-2, -1)
        else:
            B, N, C = x.shape
            q, k, _ = m.qkv(x).view(B, N, H, -1).split([m.key_dim, m.key_dim, m.val_dim], dim=3)
            q, k = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3)
        return (q @ k.transpose(-2, -1) * m.scale + m.attention_biases[:, m.attention_bias_idxs]).softmax(-1)
    if kind == "timm.models.levit.AttentionDownsample":
        if m.use_conv:
            B, C, hh, ww = x.shape
            k, _ = m.kv(x).view(B, H, -1, hh * ww).split([m.key_dim, m.val_dim], dim=2)
            q = m.q(x).view(B, H, m.key_dim, -1)
            q, k = q.transpose(-2, -1), k.transpose(-2, -1)
        else:
            B, N, C = x.shape
            k, _ = m.kv(x).view(B, N, H, -1).split([m.key_dim, m.val_dim], dim=3)
            k = k.permute(0, 2, 1, 3)
            q = m.q(x).view(B, -1, H, m.key_dim).permute(0, 2, 1, 3)
        return (q @ k.transpose(-2, -1) * m.scale + m.attention_biases[:, m.attention_bias_idxs]).softmax(-1)
    if kind == "timm.models.cait.TalkingHeadAttn":
        B, N, C = x.shape
        q, k, _ = m.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        a = (q * m.scale) @ k.transpose(-2, -1)
        return m.proj_l(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1)  # before the proj_w head mixing
    if kind in ("timm.models.cait.ClassAttn", "timm.models.crossvit.CrossAttention"):
        B, N, C = x.shape
        wq, wk = (m.q, m.k) if hasattr(m, "q") else (m.wq, m.wk)
        q, k = _heads(wq(x[:, :1]), B, 1, H), _heads(wk(x), B, N, H)
        return (q @ k.transpose(-2, -1) * m.scale).softmax(-1)
    if kind == "timm.models.convit.GPSA":
        B, N, C = x.shape
        q, k = m.qk(x).reshape(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4)
        content = (q @ k.transpose(-2, -1) * m.scale).softmax(-1)
        positional = m.pos_proj(m.rel_indices.expand(B, -1, -1, -1)).permute(0, 3, 1, 2).softmax(-1)
        gate = torch.sigmoid(m.gating_param).view(1, -1, 1, 1)
        a = (1 - gate) * content + gate * positional
        return a / a.sum(-1, keepdim=True)
    if kind in ("timm.models.convit.MHSA", "timm.layers.attention.Attention"):
        B, N, C = x.shape
        q, k, _ = m.qkv(x).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
        if hasattr(m, "q_norm"):
            q, k = m.q_norm(q), m.k_norm(k)
        return (q @ k.transpose(-2, -1) * m.scale).softmax(-1)
    if kind == "timm.models.twins.LocallyGroupedAttn":
        hh, ww = args[1]
        B, N, C = x.shape
        ws = m.ws
        xs = F.pad(x.view(B, hh, ww, C), (0, 0, 0, (-ww) % ws, 0, (-hh) % ws))
        nh, nw = xs.shape[1] // ws, xs.shape[2] // ws
        xs = xs.reshape(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B, nh * nw, ws * ws, C)
        q, k, _ = m.qkv(xs).reshape(B, nh * nw, ws * ws, 3, H, C // H).permute(3, 0, 1, 4, 2, 5)
        return (q @ k.transpose(-2, -1) * m.scale).softmax(-1)  # (B, windows, H, ws², ws²)
    if kind == "timm.models.twins.GlobalSubSampleAttn":
        hh, ww = args[1]
        B, N, C = x.shape
        q = _heads(m.q(x), B, N, H)
        kx = x
        if m.sr is not None:
            kx = m.norm(m.sr(x.permute(0, 2, 1).reshape(B, C, hh, ww)).reshape(B, C, -1).permute(0, 2, 1))
        k = _heads(m.kv(kx)[..., :C], B, kx.shape[1], H)
        return (q @ k.transpose(-2, -1) * m.scale).softmax(-1)
    raise AssertionError(f"no recomputation for {kind}")


def _expected_geometry(model, name, path, layer):
    """The token geometry of ``path``, written out from the papers / timm configs (not read by repsim's code)."""
    if name.startswith("levit"):
        stage = int(path.split(".")[1])  # 64 px: stage grids 4, 2, 1 at 16, 32, 64 px
        if "downsample" in path:
            key = (4, 2, 1)[stage - 1]
            q = -(-key // 2)
            qpos = grid_positions((q, q)).double() * 2
            return dict(prefix=0, grid=(key, key), patch=16 * 2 ** (stage - 1), qpos=qpos)
        g = (4, 2, 1)[stage]
        return dict(prefix=0, grid=(g, g), patch=16 * 2 ** stage)
    if name.startswith("cait"):
        return dict(prefix=0 if "token_only" not in path else 1, grid=(2, 2), patch=16, cls="token_only" in path)
    if name.startswith("convit"):
        return dict(prefix=0 if int(path.split(".")[1]) < 2 else 1, grid=(2, 2), patch=16)
    if name.startswith("pit"):
        stage = int(path.split(".")[1])  # 64 px, kernel 16 stride 8: 7 x 7, then 4 x 4, 2 x 2
        return dict(prefix=1, grid=((7, 7), (4, 4), (2, 2))[stage], patch=8 * 2 ** stage)
    if name.startswith("crossvit"):
        parts = path.split(".")
        branch = int(parts[3]) if parts[2] == "blocks" else (int(parts[3]) + 1) % 2
        # branch 0: 120 px / 12 = 10 x 10; branch 1 sees the input resized to 112: 7 x 7 of 16 * 120 / 112 px
        return dict(prefix=1, grid=((10, 10), (7, 7))[branch], patch=(12, 16 * 120 / 112)[branch],
                    cls=parts[2] == "fusion")
    if name.startswith("twins"):
        stage, j = int(path.split(".")[1]), int(path.split(".")[2])
        g, px = (56, 28, 14, 7)[stage], (4, 8, 16, 32)[stage]  # 224 px
        if j == 0:
            return dict(prefix=0, grid=(g, g), patch=px, window=(7, 7))
        sr = (8, 4, 2, 1)[stage]
        if sr == 1:
            return dict(prefix=0, grid=(g, g), patch=px)
        # key (i, j) = sr x sr conv cell: centre at query cell sr·i + (sr - 1) / 2
        return dict(prefix=0, grid=(g // sr, g // sr), patch=px * sr, qpos=(grid_positions((g, g)).double() - (sr - 1) / 2) / sr)
    raise AssertionError(name)


def _windows(grid, ws):
    """Window-token positions of an unshifted window partition (row-major windows, row-major inside)."""
    gh, gw = grid
    nh, nw = math.ceil(gh / ws), math.ceil(gw / ws)
    pos = []
    for a in range(nh):
        for b in range(nw):
            pos.append([(a * ws + i, b * ws + j) for i in range(ws) for j in range(ws)])
    return torch.tensor(pos, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_capture_is_exact_and_stats_equal_recomputation(name):
    model, x = _build(name)
    layers = find_attention_layers(model)
    assert layers, name
    inputs: dict[str, list] = {}
    handles = [mod.register_forward_pre_hook(
        lambda mod, a, kw, p=p: inputs.setdefault(p, []).append((a, kw)), with_kwargs=True)
        for p, mod in model.named_modules() if p in {ly.path for ly in layers}]
    with torch.no_grad():
        ref = model(x)
    for h in handles:
        h.remove()
    reducer = AttentionReducer(layers)
    reducer.begin_batch(range(len(x)))
    with AttentionCapture(model, callback=reducer, store=True) as cap, torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)  # unfused vs fused kernels: 1e-5
    with torch.no_grad():
        again = model(x)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)  # everything restored on exit
    chunk = reducer.pop_chunk()
    modules = dict(model.named_modules())
    for ly in layers:
        (rec,) = cap.records[ly.path]
        a, kw = inputs[ly.path][0]
        with torch.no_grad():
            probs = _recompute(modules[ly.path], a, kw)
        exp = _expected_geometry(model, name, ly.path, ly)
        torch.testing.assert_close(rec.probs.reshape(probs.shape), probs.float(), rtol=1e-4, atol=1e-5)
        assert (rec.num_prefix_tokens, tuple(rec.grid)) == (exp["prefix"], exp["grid"]), ly.path
        assert np.allclose(rec.patch_size, (exp["patch"],) * 2), (ly.path, rec.patch_size)
        if exp.get("cls"):
            assert rec.class_query and probs.shape[-2] == 1
            st = class_attention_statistics(probs, exp["grid"], exp["prefix"])
            np.testing.assert_allclose(chunk[f"attn/{ly.path}/prefix_mass"], st["prefix_mass"], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(chunk[f"attn/{ly.path}/entropy"], st["entropy"], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(chunk[f"attn/{ly.path}/cls_map"], st["cls_map"].sum(0), rtol=1e-4, atol=1e-6)
            continue
        if "window" in exp:
            ws = exp["window"][0]
            st = head_statistics(probs, exp["grid"], exp["patch"], 0, positions=_windows(exp["grid"], ws)[:, None])
            dist = st["distance"].mean(1)
        else:
            st = head_statistics(probs, exp["grid"], exp["patch"], exp["prefix"], query_positions=exp.get("qpos"))
            dist = st["distance"]
        np.testing.assert_allclose(chunk[f"attn/{ly.path}/distance"], dist, rtol=1e-4, atol=1e-4)
        if "window" not in exp:
            np.testing.assert_allclose(chunk[f"attn/{ly.path}/prefix_mass"], st["prefix_mass"], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(chunk[f"attn/{ly.path}/entropy"], st["entropy"], rtol=1e-4, atol=1e-5)
        aligned = st["aligned_sum"] if "window" not in exp else st["aligned_sum"].sum(0)
        np.testing.assert_allclose(chunk[f"attn/{ly.path}/aligned"], aligned, rtol=1e-4, atol=1e-4)


def test_family_sweep_covers_every_attention_kind():
    """Each family's layers are captured with the kind this module recomputes (a new timm class fails here)."""
    kinds = {}
    for name in ("levit_128s", "cait_xxs24_224", "convit_tiny", "twins_svt_small", "crossvit_tiny_240"):
        model, _ = _build(name)
        kinds[name] = {ly.kind for ly in find_attention_layers(model)}
    assert kinds == {
        "levit_128s": {"timm_levit", "timm_levit_subsample"},
        "cait_xxs24_224": {"timm_talking_heads", "timm_class_attn"},
        "convit_tiny": {"timm_gpsa", "timm_convit_mhsa"},
        "twins_svt_small": {"timm_twins_local", "timm_twins_global"},
        "crossvit_tiny_240": {"timm_vit", "timm_cross_attn"},
    }


def test_xcit_is_refused_as_channel_attention():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, img_size=32, depth=1).eval()
    assert find_attention_layers(model) == []
    with pytest.raises(UsageError, match="over channels, not tokens") as err:
        AttentionCapture(model)
    assert "CNN" not in str(err.value)
    assert "over channels, not tokens" in no_attention_reason(model)


# ------------------------------------------------------------------------------------------------------
# extraction through the registry at a small size, one per family
# ------------------------------------------------------------------------------------------------------
REGISTRY = [("timm:pit_ti_224", 64, True), ("timm:levit_128s", 64, True), ("timm:cait_xxs24_224", 32, True),
            ("timm:convit_tiny", 32, True), ("timm:crossvit_tiny_240", 120, True), ("timm:twins_svt_small", 224, True),
            ("timm:xcit_nano_12_p16_224", 32, False)]


@pytest.mark.parametrize("spec,img,attention", REGISTRY, ids=[r[0].split(":")[1] for r in REGISTRY])
def test_family_extracts_at_a_small_size(spec, img, attention, tmp_path):
    from hooks.extract.loop import extract
    from hooks.models.registry import load_model
    from repsim.attention.report import attention_report
    from repsim.data.sources import open_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(spec, random_init=True, img_size=img)
        src = open_dataset("shapes", n=2, seed=0, image_size=img)
        store = extract(model, src, str(tmp_path / "s.zarr"), batch_size=2, chunk_size=2,
                        attention=attention, acts=True)
    assert store.complete
    if attention:
        report = attention_report(store)
        assert report.layers and all(np.isfinite(h.distance_px) for ly in report.layers for h in ly.heads)
    else:
        with pytest.raises(UsageError, match="over channels, not tokens"):
            extract(model, src, str(tmp_path / "a.zarr"), batch_size=2, chunk_size=2, attention=True)


def test_pit_builds_at_224_without_a_size_complaint():
    """Issue 17: "pit_ti_224.in1k was built for 432x432 px" (kernel 16 read as the stride 8)."""
    from hooks.models.registry import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model("timm:pit_ti_224", random_init=True, img_size=224)
    assert model.info.grid == (27, 27) and model.info.patch_size == (8, 8)
