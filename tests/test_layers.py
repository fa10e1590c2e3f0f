"""Layer presets, pattern selection and output layouts, checked on real (randomly initialised) models.

Every preset is run: each path must exist, fire during a forward pass in the listed order, the pre-logits
tap must be exactly what the classifier receives, and the logits tap must be what the model returns.
"""

from __future__ import annotations

import re
import warnings

import pytest
import timm
import torch
from torch import nn

from hooks.capture.layers import FAMILIES, default_layers, infer_family, layer_layout, select_layers
from repsim.errors import UsageError

# (timm id, create kwargs, input side, family); small variants / sizes so the whole file stays fast
FAMILY_MODELS = [
    ("vit_tiny_patch16_224", dict(img_size=32), 32, "vit"),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32), 32, "vit"),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=3), 28, "vit"),
    ("vit_base_patch16_clip_224", dict(img_size=32, depth=2), 32, "vit"),
    ("beit_base_patch16_224", dict(img_size=32, depth=2), 32, "vit"),
    ("swin_tiny_patch4_window7_224", dict(img_size=32), 32, "swin"),
    ("resnet18", {}, 32, "resnet"),
    ("convnext_atto", {}, 32, "convnext"),
    ("convnext_tiny", {}, 32, "convnext"),
    ("mixer_s16_224", dict(img_size=32), 32, "mixer"),
    ("dm_nfnet_f0", {}, 64, "nfnet"),
    ("levit_128s", dict(img_size=64), 64, "levit"),
    ("efficientnet_b0", {}, 32, "efficientnet"),
]


def _build(arch: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **kwargs).eval()


def _run_with_hooks(module: nn.Module, paths: list[str], x: torch.Tensor, input_of: str | None = None):
    """Forward once; return (firing order, {path: [outputs]}, inputs of `input_of`, model output)."""
    mods = dict(module.named_modules())
    order: list[str] = []
    outs: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    seen_inputs: list[torch.Tensor] = []
    handles = []
    for p in paths:
        def hook(_m, _i, o, p=p):
            order.append(p)
            outs[p].append(o.detach().clone())
        handles.append(mods[p].register_forward_hook(hook))
    if input_of is not None:
        def grab_input(_m, i, _o):
            seen_inputs.append(i[0].detach().clone())

        handles.append(mods[input_of].register_forward_hook(grab_input))
    try:
        with torch.no_grad():
            y = module(x)
    finally:
        for h in handles:
            h.remove()
    return order, outs, seen_inputs, y


@pytest.mark.parametrize("arch,kwargs,size,family", FAMILY_MODELS, ids=[m[0] for m in FAMILY_MODELS])
def test_preset_fires_in_network_order(arch, kwargs, size, family):
    model = _build(arch, kwargs)
    assert infer_family(model) == family
    paths = default_layers(model, family)
    names = dict(model.named_modules())
    assert len(paths) == len(set(paths)) and all(p in names for p in paths)
    assert len(paths) >= 5  # stem, >= 2 blocks, pre-logits, logits

    distilled = "head_dist" in names or "head_dist.linear" in names
    logits_path = paths[-2] if distilled else paths[-1]
    pre = paths[-3] if distilled else paths[-2]
    x = torch.randn(2, 3, size, size)
    order, outs, clf_in, y = _run_with_hooks(model, paths, x, input_of=logits_path)

    # network order: the first firing of each path follows the preset order, and every path fires
    first = list(dict.fromkeys(order))
    assert first == paths
    for p in paths:
        expected_calls = 2 if (distilled and p == "head_drop") else 1  # DeiT runs head_drop on both tokens
        assert len(outs[p]) == expected_calls, p

    # pre-logits is exactly the classifier input (B, D), and the logits tap is the model output
    pooled = outs[pre][0]
    assert pooled.ndim == 2 and pooled.shape[0] == 2
    torch.testing.assert_close(pooled, clf_in[0], rtol=0, atol=0)
    if distilled:
        other = paths[-1]
        torch.testing.assert_close((outs[logits_path][0] + outs[other][0]) / 2, y, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(outs[logits_path][0], y, rtol=0, atol=0)

    # the blocks carry the residual stream: token models keep prefix + grid tokens throughout
    if family == "vit":
        gh, gw = model.patch_embed.grid_size
        for p in paths:
            if p.startswith("blocks."):
                assert outs[p][0].shape[1] == model.num_prefix_tokens + gh * gw
        assert outs["patch_embed"][0].shape[1] == gh * gw


def test_every_family_has_a_preset_or_is_generic():
    assert set(FAMILIES) - {"generic", "hf_vit"} == {f for *_, f in FAMILY_MODELS}


def test_block_lists_are_complete():
    # the preset lists every block, not a sample: compare with the architecture's own depth
    vit = _build("vit_tiny_patch16_224", dict(img_size=32))
    assert [p for p in default_layers(vit, "vit") if p.startswith("blocks.")] == [f"blocks.{i}" for i in range(12)]
    r18 = _build("resnet18", {})
    blocks = [p for p in default_layers(r18, "resnet") if p.startswith("layer")]
    assert blocks == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    swin = _build("swin_tiny_patch4_window7_224", dict(img_size=32))
    depths = [len(stage.blocks) for stage in swin.layers]
    assert depths == [2, 2, 6, 2]
    assert sum(p.startswith("layers.") for p in default_layers(swin, "swin")) == sum(depths)


def _build_any(arch: str, kwargs: dict) -> nn.Module:
    if arch.startswith("torchvision:"):
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.get_model(arch.split(":", 1)[1], weights=None).eval()
    return _build(arch, kwargs)


@pytest.mark.parametrize("arch,kwargs", [
    ("swin_tiny_patch4_window7_224", dict(img_size=32)),
    ("convnext_tiny", {}),  # channels-last norm / MLP inside the blocks
    ("convnext_atto", {}),  # conv_mlp: channels-first everywhere
    ("torchvision:swin_t", {}),
    ("torchvision:convnext_tiny", {}),
])
def test_layer_layout_matches_every_4d_output(arch, kwargs):
    model = _build_any(arch, kwargs)
    family = infer_family(model)
    outs: dict[str, torch.Size] = {}
    def record(name):
        def hook(_m, _i, o):
            if isinstance(o, torch.Tensor):
                outs.setdefault(name, o.shape)  # first call; a hook must return None
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for h in handles:
        h.remove()
    # feature maps only: timm Swin's attention probabilities (B*windows, heads, N, N) are not images
    four_d = {n: s for n, s in outs.items() if len(s) == 4 and not re.search(r"\.attn\.(softmax|attn_drop)$", n)}
    assert len(four_d) > 10
    n_nhwc = 0
    for name, shape in four_d.items():
        # at 32 px the spatial sides (<= 16) are far smaller than any channel count (>= 40)
        truth = "nhwc" if shape[3] > shape[1] else "auto"
        assert layer_layout(family, name, module=model) == truth, (name, shape)
        n_nhwc += truth == "nhwc"
    if arch == "convnext_atto":
        assert n_nhwc == 0
    else:
        assert n_nhwc > 5
    # presets of channels-first families never need a permutation
    assert all(layer_layout("resnet", p) == "auto" for p in default_layers(_build("resnet18", {}), "resnet"))


def test_swin_block_outputs_are_nhwc_in_preset():
    model = _build("swin_tiny_patch4_window7_224", dict(img_size=32))
    paths = default_layers(model, "swin")
    assert [layer_layout("swin", p) for p in paths[:-2]] == ["nhwc"] * (len(paths) - 2)
    assert layer_layout("swin", "head.drop") == "auto" and layer_layout("swin", "head.fc") == "auto"


# -- select_layers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    return _build("vit_tiny_patch16_224", dict(img_size=32))


def test_select_star_stays_in_one_component(vit):
    assert select_layers(vit, ["blocks.*"]) == [f"blocks.{i}" for i in range(12)]
    deep = select_layers(vit, ["blocks.**"])
    assert "blocks.0.attn.qkv" in deep and "blocks.0" in deep and "blocks" not in deep
    assert select_layers(vit, ["blocks.1?"]) == ["blocks.10", "blocks.11"]
    assert select_layers(vit, ["blocks.[02]"]) == ["blocks.0", "blocks.2"]
    assert select_layers(vit, ["blocks.*.attn"]) == [f"blocks.{i}.attn" for i in range(12)]


def test_select_registration_order_no_duplicates(vit):
    got = select_layers(vit, ["head", "blocks.1", "patch_embed", "blocks.[01]", "blocks.1"])
    assert got == ["patch_embed", "blocks.0", "blocks.1", "head"]
    r18 = _build("resnet18", {})
    assert select_layers(r18, ["layer3.*"]) == ["layer3.0", "layer3.1"]
    assert select_layers(r18, "fc") == ["fc"]


def test_select_unknown_pattern_suggests(vit):
    with pytest.raises(UsageError, match=r"did you mean .*blocks\.1"):
        select_layers(vit, ["block.1"])
    with pytest.raises(UsageError, match="blocks"):
        select_layers(vit, ["block.*"])
    with pytest.raises(UsageError, match="matches no module"):
        select_layers(vit, ["zzzz_nothing"])
    with pytest.raises(UsageError, match="empty layer pattern"):
        select_layers(vit, [""])


def test_select_bracket_without_match_raises(vit):
    with pytest.raises(UsageError, match=r"'blocks\.\[!0-9\]' matches no module"):
        select_layers(vit, ["blocks.[!0-9]"])


# -- generic rule and fallbacks ----------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.act(self.fc(x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.body = nn.Sequential(*[_Block(16) for _ in range(3)])
        self.mlp_inside = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])  # leaf list: not blocks
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = self.body(self.embed(x))
        for lin in self.mlp_inside:
            x = lin(x)
        return self.out(x)


def test_generic_rule_blocks_then_last_linear():
    net = _Net().eval()
    paths = default_layers(net, "generic")
    assert paths == ["body.0", "body.1", "body.2", "out"]
    order, _, _, y = _run_with_hooks(net, paths, torch.randn(2, 8))
    assert list(dict.fromkeys(order)) == paths


def test_generic_rule_without_blocks():
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert default_layers(plain, "generic") == ["0", "1", "2"]

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3)
            self.conv2 = nn.Conv2d(4, 4, 3)
            self.fc = nn.Linear(4, 2)

    assert default_layers(Flat(), "generic") == ["conv1", "conv2", "fc"]


def test_torchvision_vit_uses_generic_rule_in_order():
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64).eval()
    assert infer_family(model) == "generic"  # same class name as timm's ViT, other structure
    paths = default_layers(model, "generic")
    assert paths == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", "heads.head"]
    order, outs, _, y = _run_with_hooks(model, paths, torch.randn(1, 3, 32, 32))
    assert list(dict.fromkeys(order)) == paths
    torch.testing.assert_close(outs["heads.head"][0], y)


def test_family_mismatch_falls_back_with_warning():
    r18 = _build("resnet18", {})
    with pytest.warns(UserWarning, match="generic"):
        paths = default_layers(r18, "vit")
    assert paths[0] == "layer1.0" and paths[-1] == "fc"
    with pytest.raises(UsageError, match="unknown model family"):
        default_layers(r18, "transformer")


def test_user_class_named_like_timm_is_not_a_timm_family():
    class ResNet(nn.Module):  # a user's own ResNet: names differ from timm's, so no timm preset
        def __init__(self):
            super().__init__()
            self.layer1 = nn.Sequential(_Block(4), _Block(4))
            self.linear = nn.Linear(4, 2)

    assert infer_family(ResNet()) == "generic"
    assert default_layers(ResNet(), "generic") == ["layer1.0", "layer1.1", "linear"]
    assert re.fullmatch(r"generic", infer_family(nn.Linear(2, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default_layers(_build("resnet18", {}), "resnet")[0] == "maxpool"
