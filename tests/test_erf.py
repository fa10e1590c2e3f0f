"""Effective receptive fields (hooks.erf) against hand-computed receptive fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hooks.erf import effective_receptive_fields, erf_radius
from repsim.errors import UsageError


def _ones_conv(k: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(1, 1, k, stride=stride, padding=k // 2, bias=False)
    nn.init.ones_(conv.weight)
    return conv


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = _ones_conv(3)
        self.c2 = _ones_conv(3)

    def forward(self, x):
        return self.c2(self.c1(x.mean(1, keepdim=True)))


def test_radius_of_a_3x3_box_and_a_point():
    g = np.zeros((9, 9))
    g[3:6, 3:6] = 1
    assert erf_radius(g, (4, 4)) == pytest.approx((4 + 4 * math.sqrt(2)) / 9)
    point = np.zeros((5, 5))
    point[2, 2] = 1
    assert erf_radius(point, (2, 2)) == 0.0
    assert math.isnan(erf_radius(np.zeros((3, 3)), (1, 1)))


def test_linear_convs_have_their_exact_receptive_fields():
    model = TwoConvs()
    x = torch.randn(2, 3, 15, 15)
    r1, r2 = effective_receptive_fields(model, ["c1", "c2"], x)
    # c1: all-ones 3x3 box around the centre pixel (7, 7)
    box = np.zeros((15, 15))
    box[6:9, 6:9] = 1
    np.testing.assert_allclose(r1.map, box / box.sum(), atol=1e-7)
    assert r1.centre_px == (7.0, 7.0)
    assert r1.radius_px == pytest.approx((4 + 4 * math.sqrt(2)) / 9, abs=1e-6)
    # c2 after c1: the 5x5 box convolved with itself: weights (1,2,3,2,1) x (1,2,3,2,1)
    tri = np.array([1, 2, 3, 2, 1], dtype=float)
    ref = np.zeros((15, 15))
    ref[5:10, 5:10] = np.outer(tri, tri)
    np.testing.assert_allclose(r2.map, ref / ref.sum(), atol=1e-7)
    assert r2.radius_px == pytest.approx(erf_radius(ref, (7, 7)), abs=1e-6)  # float32 gradients
    assert r2.radius_px > r1.radius_px


def test_centre_of_a_strided_map_in_input_pixels():
    model = nn.Sequential(_ones_conv(3, stride=2))
    (r,) = effective_receptive_fields(model, ["0"], torch.randn(1, 1, 16, 16))
    # output 8x8, centre unit index 3 -> input pixel 3*2 = 6 (padding 1, kernel 3 centred on 2*i)
    assert r.centre_px == (6.5, 6.5)  # the cell centre convention: (i + 0.5) * stride - 0.5
    peak = np.unravel_index(np.argmax(r.map), r.map.shape)
    assert abs(peak[0] - 6) <= 1 and abs(peak[1] - 6) <= 1


def test_resnet_erf_grows_with_depth_and_bad_layers_refused():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    res = effective_receptive_fields(model, ["layer1", "layer2", "layer3", "layer4"], torch.randn(2, 3, 64, 64))
    radii = [r.radius_px for r in res]
    assert all(np.isfinite(radii)) and radii[0] < radii[-1]
    with pytest.raises(UsageError, match="no module"):
        effective_receptive_fields(model, ["layer9"], torch.randn(1, 3, 32, 32))
    with pytest.raises(UsageError, match="maps"):
        effective_receptive_fields(model, ["global_pool"], torch.randn(1, 3, 32, 32))
