"""Attention-probability capture: equals a manual recomputation, leaves outputs unchanged, reads geometry."""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from hooks.capture.attention import AttentionCapture, find_attention_layers, swin_window_positions
from repsim.errors import UsageError

torch.manual_seed(0)


def _timm(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval()


def _run(model: nn.Module, x: torch.Tensor, **cap_kw):
    """(output without capture, output with capture, capture)."""
    with torch.no_grad():
        ref = model(x)
        with AttentionCapture(model, **cap_kw) as cap:
            out = model(x)
    return ref, out, cap


def _fused_flags(model: nn.Module) -> dict[str, bool]:
    return {p: m.fused_attn for p, m in model.named_modules() if isinstance(getattr(m, "fused_attn", None), bool)}


# ----------------------------------------------------------------------------------------------------------
# timm ViT family
# ----------------------------------------------------------------------------------------------------------
def test_vit_shapes_rows_outputs_and_fused_restored():
    model = _timm("vit_tiny_patch16_224", img_size=32)
    flags = _fused_flags(model)
    assert flags and all(flags.values()), "timm should fuse attention by default"
    x = torch.randn(2, 3, 32, 32)
    ref, out, cap = _run(model, x)
    assert (ref - out).abs().max() <= 1e-5
    assert _fused_flags(model) == flags
    assert [layer.path for layer in cap.layers] == [f"blocks.{i}.attn" for i in range(12)]
    for layer in cap.layers:
        assert (layer.kind, layer.num_heads, layer.num_prefix_tokens, layer.grid, layer.patch_size) == (
            "timm_vit", 3, 1, (2, 2), (16, 16))
        (rec,) = cap.records[layer.path]
        assert rec.probs.dtype == torch.float32 and rec.probs.device.type == "cpu"
        assert rec.probs.shape == (2, 3, 5, 5)
        assert (rec.probs >= 0).all()
        torch.testing.assert_close(rec.probs.sum(-1), torch.ones(2, 3, 5), atol=1e-5, rtol=0)
        assert (rec.num_prefix_tokens, rec.grid, rec.patch_size, rec.forward_index, rec.call_index) == (
            1, (2, 2), (16, 16), 0, 0)


def test_vit_probs_equal_manual_recomputation():
    model = _timm("vit_tiny_patch16_224", img_size=32)
    blk = model.blocks[3]
    seen = {}
    h = blk.norm1.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.detach().clone()))
    try:
        _, _, cap = _run(model, torch.randn(2, 3, 32, 32))
    finally:
        h.remove()
    x = seen["x"]
    attn = blk.attn
    B, N, C = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, attn.num_heads, C // attn.num_heads)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)
    manual = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // attn.num_heads), dim=-1)
    torch.testing.assert_close(cap.records["blocks.3.attn"][0].probs, manual, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,img,prefix,grid", [
    ("deit_tiny_distilled_patch16_224", 32, 2, (2, 2)),
    ("vit_small_patch14_reg4_dinov2", 28, 5, (2, 2)),
    ("vit_tiny_patch16_224", (32, 48), 1, (2, 3)),
])
def test_prefix_and_grid_read_from_the_model(name, img, prefix, grid):
    model = _timm(name, img_size=img, depth=2)
    assert model.num_prefix_tokens == prefix  # the model says so; the capture must agree
    layers = find_attention_layers(model)
    assert len(layers) == 2
    assert all((la.num_prefix_tokens, la.grid) == (prefix, grid) for la in layers)
    h, w = (img, img) if isinstance(img, int) else img
    ref, out, cap = _run(model, torch.randn(2, 3, h, w))
    n = prefix + grid[0] * grid[1]
    for recs in cap.records.values():
        assert recs[0].probs.shape[-2:] == (n, n)
        assert (recs[0].num_prefix_tokens, recs[0].grid) == (prefix, grid)
    assert (ref - out).abs().max() <= 1e-5


def test_dynamic_img_size_grid_comes_from_the_run():
    model = _timm("vit_tiny_patch16_224", img_size=32, depth=1, dynamic_img_size=True)
    _, _, cap = _run(model, torch.randn(2, 3, 32, 64))
    rec = cap.records["blocks.0.attn"][0]
    assert rec.grid == (2, 4) and rec.probs.shape == (2, 3, 9, 9)
    assert cap.layers[0].grid == (2, 2)  # the static grid the model was built for


def test_beit_relative_position_bias():
    model = _timm("beit_base_patch16_224", img_size=32, depth=2, embed_dim=64, num_heads=2)
    with torch.no_grad():  # timm initialises the relative position bias to 0: make it matter
        for blk in model.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 1)
    ref, out, cap = _run(model, torch.randn(2, 3, 32, 32))
    assert (ref - out).abs().max() <= 1e-5
    assert [la.kind for la in cap.layers] == ["timm_beit"] * 2
    for recs in cap.records.values():
        p = recs[0].probs
        assert p.shape == (2, 2, 5, 5)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 5), atol=1e-5, rtol=0)
    # the bias is inside: recompute block 0 by hand from its normed input
    blk = model.blocks[0]
    seen = {}
    h = blk.norm1.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.detach().clone()))
    try:
        _, _, cap2 = _run(model, torch.randn(1, 3, 32, 32), layers=["blocks.0.attn"])
    finally:
        h.remove()
    a = blk.attn
    with torch.no_grad():
        qkv = F.linear(seen["x"], a.qkv.weight, torch.cat((a.q_bias, a.k_bias, a.v_bias))).reshape(1, 5, 3, 2, 32)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4)
        logits = (q * a.scale) @ k.transpose(-2, -1)
        manual = torch.softmax(logits + a._get_rel_pos_bias(), -1)
        without_bias = torch.softmax(logits, -1)
    got = cap2.records["blocks.0.attn"][0].probs
    torch.testing.assert_close(got, manual, atol=1e-6, rtol=1e-5)
    assert (got - without_bias).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------------
# Swin windows
# ----------------------------------------------------------------------------------------------------------
def _swin(img: int) -> nn.Module:
    return _timm("swin_tiny_patch4_window7_224", img_size=img, depths=(2, 2), num_heads=(1, 2), embed_dim=16)


@pytest.mark.parametrize("img", [56, 64])  # 14x14 stage grid (no padding), 16x16 (padded to 21x21)
def test_swin_window_records(img):
    model = _swin(img)
    # the attention module's input, in window order, and the block input: to check positions end to end
    win_in, blk_in = {}, {}
    handles = []
    for i, stage in enumerate(model.layers):
        for j, blk in enumerate(stage.blocks):
            path = f"layers.{i}.blocks.{j}.attn"
            handles.append(blk.attn.register_forward_pre_hook(
                lambda m, a, path=path: win_in.__setitem__(path, a[0].detach().clone())))
            handles.append(blk.register_forward_pre_hook(
                lambda m, a, path=path, blk=blk: blk_in.__setitem__(path, blk.norm1(a[0]).detach().clone())))
    try:
        ref, out, cap = _run(model, torch.randn(2, 3, img, img))
    finally:
        for h in handles:
            h.remove()
    assert (ref - out).abs().max() <= 1e-5
    g0 = img // 4
    layers = {la.path: la for la in cap.layers}
    assert layers["layers.0.blocks.1.attn"].shift_size == (3, 3)
    assert layers["layers.0.blocks.0.attn"].shift_size == (0, 0)
    assert (layers["layers.0.blocks.0.attn"].grid, layers["layers.0.blocks.0.attn"].patch_size) == ((g0, g0), (4, 4))
    assert (layers["layers.1.blocks.0.attn"].grid, layers["layers.1.blocks.0.attn"].patch_size) == (
        (g0 // 2, g0 // 2), (8, 8))
    assert layers["layers.1.blocks.0.attn"].stage == "layers.1"
    for path, (rec,) in cap.records.items():
        gh, gw = rec.grid
        ws = rec.window_size[0]
        nw = math.ceil(gh / ws) * math.ceil(gw / ws)
        heads = layers[path].num_heads
        assert rec.probs.shape == (2, nw, heads, ws * ws, ws * ws)
        assert rec.positions.shape == (nw, ws * ws, 2) and rec.positions.dtype == torch.long
        assert rec.padded.shape == (nw, ws * ws)
        # real tokens: a permutation of the stage grid; padded ones marked (-1, -1)
        real = rec.positions[~rec.padded]
        assert sorted((real[:, 0] * gw + real[:, 1]).tolist()) == list(range(gh * gw))
        assert (rec.positions[rec.padded] == -1).all()
        assert int((~rec.padded).sum()) == gh * gw
        # rows sum to 1 (masked keys carry ~e^-100)
        torch.testing.assert_close(rec.probs.sum(-1), torch.ones(rec.probs.shape[:-1]), atol=1e-5, rtol=0)
        # end to end: the window tokens timm attended over are the block's (normed) input at `positions`
        x = blk_in[path]
        expect = torch.zeros(2, nw, ws * ws, x.shape[-1])
        expect[:, ~rec.padded] = x[:, real[:, 0], real[:, 1]]
        torch.testing.assert_close(win_in[path].view(2, nw, ws * ws, -1), expect, atol=0, rtol=0)
        # Which pairs attend (probability > 1e-20; masked pairs get ~e^-100) against the un-rolled positions.
        pos = rec.positions
        d = (pos[:, :, None, :] - pos[:, None, :, :]).abs()  # (nW, N, N, 2)
        both = ~rec.padded[:, :, None] & ~rec.padded[:, None, :]
        attends = (rec.probs > 1e-20).any(0).any(1) & both
        if not rec.padded.any():
            # no padding: two window tokens attend to each other iff they are within one window of each other
            # in the original grid; positions left rolled would put wrapped-around pairs ~gh apart
            assert torch.equal(attends, both & (d < ws).all(-1))
            if any(rec.shift_size):
                assert not attends[both].all()  # the shift mask did cut pairs
        else:
            # timm builds the shift mask on the padded grid, so pairs that wrap around the (unpadded) grid
            # are not cut: they are within one window cyclically
            d = torch.minimum(d, torch.tensor([gh, gw]) - d)
            assert (d[attends] < ws).all()


def test_swin_positions_undo_the_roll():
    pos, padded = swin_window_positions((4, 4), (2, 2), (1, 1))
    assert not padded.any()
    # window 0 holds shifted rows/cols 0..1, i.e. original rows/cols 1..2
    assert pos[0].tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    # the last window wraps around
    assert pos[3].tolist() == [[3, 3], [3, 0], [0, 3], [0, 0]]
    pos, padded = swin_window_positions((3, 3), (2, 2), (0, 0))
    assert padded.sum() == 16 - 9 and pos[3].tolist() == [[2, 2], [-1, -1], [-1, -1], [-1, -1]]


# ----------------------------------------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------------------------------------
def test_hf_vit_eager_capture():
    from transformers import ViTConfig, ViTForImageClassification

    from hooks.models.hf_loader import HFImageModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=3)
    hf = ViTForImageClassification(cfg).eval()
    impl = hf.config._attn_implementation
    assert impl != "eager"
    model = HFImageModel(hf)
    x = torch.randn(2, 3, 32, 32)
    ref, out, cap = _run(model, x)
    assert hf.config._attn_implementation == impl  # restored
    assert (ref - out).abs().max() <= 1e-5
    assert [la.kind for la in cap.layers] == ["hf_eager"] * 2
    assert all((la.num_prefix_tokens, la.grid, la.patch_size, la.num_heads) == (1, (4, 4), (8, 8), 2)
               for la in cap.layers)
    for recs in cap.records.values():
        p = recs[0].probs
        assert p.shape == (2, 2, 17, 17) and recs[0].grid == (4, 4)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 17), atol=1e-5, rtol=0)
    # the same maps transformers itself returns with output_attentions under eager attention
    with torch.no_grad():
        hf.set_attn_implementation("eager")
        want = hf(pixel_values=x, output_attentions=True).attentions
        hf.set_attn_implementation(impl)
    assert len(want) == 2
    for w, recs in zip(want, cap.records.values()):
        torch.testing.assert_close(recs[0].probs, w, atol=1e-6, rtol=1e-5)


def test_hf_dinov2_registers_prefix():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_register_tokens=4)
    model = Dinov2WithRegistersModel(cfg).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad(), AttentionCapture(model) as cap:
        model(pixel_values=x)
    (rec,) = next(iter(cap.records.values()))
    assert (rec.num_prefix_tokens, rec.grid) == (5, (4, 6)) and rec.probs.shape == (2, 2, 29, 29)


# ----------------------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------------------
class _MHANet(nn.Module):
    def __init__(self, batch_first: bool, need_weights: bool, average: bool):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.batch_first, self.need_weights, self.average = batch_first, need_weights, average

    def forward(self, x):  # x: (B, L, 8)
        h = self.proj(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        out, w = self.attn(h, h, h, need_weights=self.need_weights, average_attn_weights=self.average)
        return out, w, h


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_mha_per_head_weights(batch_first, need_weights, average):
    torch.manual_seed(0)
    net = _MHANet(batch_first, need_weights, average).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        out0, w0, h = net(x)
        with AttentionCapture(net, geometry={"attn": (1, (2, 2), 16)}) as cap:
            out1, w1, _ = net(x)
        out2, w2, _ = net(x)
    assert "forward" not in net.attn.__dict__  # unwrapped
    assert (out0 - out1).abs().max() <= 1e-5 and torch.equal(out0, out2)
    if need_weights:
        assert w1.shape == w0.shape
        torch.testing.assert_close(w1, w0, atol=1e-6, rtol=0)
    else:
        assert w0 is None and w1 is None
    (rec,) = cap.records["attn"]
    assert rec.kind == "torch_mha" and (rec.num_prefix_tokens, rec.grid, rec.patch_size) == (1, (2, 2), (16, 16))
    # manual softmax(QK^T / sqrt(d)) per head
    hb = h if batch_first else h.transpose(0, 1)  # (B, L, E)
    wq, wk, _ = net.attn.in_proj_weight.chunk(3)
    bq, bk, _ = net.attn.in_proj_bias.chunk(3)
    q = F.linear(hb, wq, bq).view(2, 5, 4, 4).transpose(1, 2)
    k = F.linear(hb, wk, bk).view(2, 5, 4, 4).transpose(1, 2)
    manual = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)
    assert rec.probs.shape == (2, 4, 5, 5)
    torch.testing.assert_close(rec.probs, manual, atol=1e-6, rtol=1e-5)


def test_mha_without_geometry_has_none():
    net = _MHANet(True, False, True).eval()
    with torch.no_grad(), AttentionCapture(net) as cap:
        net(torch.randn(2, 5, 8))
    rec = cap.records["attn"][0]
    assert rec.grid is None and rec.num_prefix_tokens is None
    with pytest.raises(UsageError, match="not a capturable attention layer"):
        AttentionCapture(net, geometry={"proj": (0, (1, 5), 1)})


# ----------------------------------------------------------------------------------------------------------
# API: callback, store, clear, layers, repeated forwards, exceptions, refusal
# ----------------------------------------------------------------------------------------------------------
def test_callback_store_clear_and_layer_selection():
    model = _timm("vit_tiny_patch16_224", img_size=32, depth=3)
    x = torch.randn(2, 3, 32, 32)
    stats = []

    def cb(path, rec):
        stats.append((path, rec.forward_index, float(rec.probs[:, :, :, 0].mean())))

    with torch.no_grad(), AttentionCapture(model, callback=cb) as cap:
        model(x)
        model(x)
    assert cap.records == {f"blocks.{i}.attn": [] for i in range(3)}  # a callback alone keeps nothing
    assert [(p, f) for p, f, _ in stats] == [(f"blocks.{i}.attn", f) for f in (0, 1) for i in range(3)]
    with torch.no_grad(), AttentionCapture(model, layers=["blocks.1.attn"], store_device=None) as cap:
        model(x)
        model(x)
        assert [r.forward_index for r in cap.records["blocks.1.attn"]] == [0, 1]
        cap.clear()
        assert cap.records == {"blocks.1.attn": []}
    with pytest.raises(UsageError, match="not an attention layer"):
        AttentionCapture(model, layers=["blocks.1.mlp"])


def test_state_restored_after_an_exception():
    model = _timm("vit_tiny_patch16_224", img_size=32, depth=1)
    flags = _fused_flags(model)
    with pytest.raises(AssertionError), AttentionCapture(model):
        model(torch.randn(2, 3, 32, 40))  # wrong size: timm raises inside the forward
    assert _fused_flags(model) == flags
    assert not model.blocks[0].attn.attn_drop._forward_pre_hooks


def test_cnn_is_refused():
    with pytest.raises(UsageError, match=r"no attention layers that repsim can capture") as err:
        AttentionCapture(_timm("resnet18"))
    assert "CNN" not in str(err.value)  # the same message serves transformers whose attention is not found
    assert find_attention_layers(_timm("resnet18")) == []


def test_unknown_attention_is_reported_not_guessed():
    class MysteryAttention(nn.Module):  # attention-like by name, computed in a way repsim does not know
        def forward(self, x):
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = MysteryAttention()

        def forward(self, x):
            return self.mix(x)

    with pytest.raises(UsageError, match="MysteryAttention: computes attention in a way repsim does not know"):
        AttentionCapture(Net())


def test_cait_class_attention_is_a_cls_to_patch_map():
    model = _timm("cait_xxs24_224", img_size=32, depth=1)
    cap = AttentionCapture(model)
    assert [la.kind for la in cap.layers] == ["timm_talking_heads", "timm_class_attn", "timm_class_attn"]
    with torch.no_grad(), cap:
        model(torch.randn(2, 3, 32, 32))
    rec = cap.records["blocks_token_only.0.attn"][0]
    assert rec.probs.shape == (2, 4, 1, 5) and rec.class_query and rec.grid == (2, 2) and rec.num_prefix_tokens == 1
    rec = cap.records["blocks.0.attn"][0]  # talking heads: before the class token is appended
    assert rec.probs.shape == (2, 4, 4, 4) and rec.num_prefix_tokens == 0 and rec.grid == (2, 2)


def test_attention_over_sub_sequences_is_refused():
    from timm.layers import Attention

    class WindowedNet(nn.Module):  # a global attention module run on 2 windows per image
        def __init__(self):
            super().__init__()
            self.attn = Attention(16, num_heads=2)

        def forward(self, x):  # (B, 8, 16)
            return self.attn(x.reshape(-1, 4, 16)).reshape(x.shape)

    net = WindowedNet().eval()
    with pytest.raises(UsageError, match="attends over 4 sequences for a batch of 2"), torch.no_grad(), \
            AttentionCapture(net):
        net(torch.randn(2, 8, 16))
    assert net.attn.fused_attn  # restored


def test_timm_like_module_checked_at_run_time():
    class Odd(nn.Module):  # looks like timm attention, but attn_drop does not see probabilities
        def __init__(self):
            super().__init__()
            self.num_heads, self.fused_attn = 2, True
            self.qkv = nn.Linear(8, 24)
            self.attn_drop = nn.Dropout(0.0)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
            logits = self.attn_drop(q @ k.transpose(-2, -1))  # logits, not probabilities
            return (logits.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)

    net = Odd().eval()
    assert [la.kind for la in find_attention_layers(net)] == ["timm_like"]
    with pytest.raises(UsageError, match="not a .* probability map"), torch.no_grad(), AttentionCapture(net):
        net(torch.randn(2, 5, 8))


def test_hf_swin_is_refused_clearly():
    from transformers import SwinConfig, SwinModel

    model = SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                 window_size=4))
    with pytest.raises(UsageError, match="use the timm model"):
        AttentionCapture(model)
