"""Effective receptive fields (hooks.gradients.erf) against hand-computed receptive fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hooks.gradients.erf import effective_receptive_fields, erf_centroid, erf_radius
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


def _box_spread() -> float:
    """Mean distance of the 9 cells of a 3 × 3 box from its middle cell."""
    return (4 + 4 * math.sqrt(2)) / 9


def test_strided_map_offset_is_separate_from_the_spread():
    """16 px input, 3 × 3 stride-2 conv (padding 1): unit 3 of 8 reads pixels 5, 6, 7 (a box centred on 6) while
    its cell centre is 6.5. The radius is the box's own spread; the half pixel is the offset."""
    model = nn.Sequential(_ones_conv(3, stride=2))
    (r,) = effective_receptive_fields(model, ["0"], torch.randn(1, 1, 16, 16))
    assert r.centre_px == (6.5, 6.5)
    assert r.centroid_px == pytest.approx((6.0, 6.0), abs=1e-6)
    assert r.offset_px == pytest.approx((-0.5, -0.5), abs=1e-6)
    assert r.offset_norm_px == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert r.radius_px == pytest.approx(_box_spread(), abs=1e-6)
    # what was reported before: the mean distance from (6.5, 6.5) over the box 5..7 x 5..7
    old = sum(math.hypot(y - 6.5, x - 6.5) for y in (5, 6, 7) for x in (5, 6, 7)) / 9
    assert r.radius_from_centre_px == pytest.approx(old, abs=1e-6)
    assert r.radius_from_centre_px > r.radius_px + 0.1


class ShiftedBlob(nn.Module):
    """One 1-channel conv whose kernel is a known off-centre blob: the gradient of unit (i, j) w.r.t. the
    input is the kernel itself with its top-left at (i - pad, j - pad)."""

    def __init__(self, kernel: torch.Tensor):
        super().__init__()
        k = kernel.shape[-1]
        self.conv = nn.Conv2d(1, 1, k, padding=k // 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(kernel.view(1, 1, k, k))

    def forward(self, x):
        return self.conv(x.mean(1, keepdim=True))


@pytest.mark.parametrize("size", [21, 20])
def test_shifted_blob_spread_and_offset_by_hand(size):
    # a 7 x 7 kernel whose mass is a blob around kernel cell (1, 5): 2 rows up, 2 columns right of the middle
    ky, kx = np.mgrid[0:7, 0:7]
    kern = np.exp(-((ky - 1.0) ** 2 + (kx - 5.0) ** 2) / (2 * 0.8 ** 2))
    kern[kern < 0.05] = 0.0
    model = ShiftedBlob(torch.from_numpy(kern).float())
    (r,) = effective_receptive_fields(model, ["conv"], torch.randn(2, 3, size, size))
    i = (size - 1) // 2  # centre unit; stride 1: its centre is pixel i
    assert r.centre_px == (float(i), float(i))
    w = kern / kern.sum()
    my, mx = (w * ky).sum(), (w * kx).sum()  # kernel-cell centroid
    spread = sum(w[a, b] * math.hypot(a - my, b - mx) for a in range(7) for b in range(7))
    from_centre = sum(w[a, b] * math.hypot(a - 3, b - 3) for a in range(7) for b in range(7))
    assert r.centroid_px == pytest.approx((i - 3 + my, i - 3 + mx), abs=1e-5)
    assert r.offset_px == pytest.approx((my - 3, mx - 3), abs=1e-5)
    assert r.offset_px[0] < -1.5 and r.offset_px[1] > 1.5
    assert r.radius_px == pytest.approx(spread, abs=1e-5)
    assert r.radius_from_centre_px == pytest.approx(from_centre, abs=1e-5)
    assert abs(r.radius_from_centre_px - r.radius_px) <= r.offset_norm_px + 1e-9  # triangle inequality
    assert r.radius_px < 1.5 < r.radius_from_centre_px  # the spread alone is small; the old number was not


def test_centroid_and_radius_helpers():
    g = np.zeros((9, 9))
    g[1:4, 5:8] = 2.0  # box around (2, 6)
    assert erf_centroid(g) == pytest.approx((2.0, 6.0))
    assert erf_radius(g) == pytest.approx(_box_spread())
    assert erf_radius(-g) == pytest.approx(_box_spread())  # |gradient|
    assert all(math.isnan(v) for v in erf_centroid(np.zeros((3, 3))))
    with pytest.raises(UsageError, match="2-d"):
        erf_radius(np.zeros((2, 3, 3)))


def test_resnet_erf_grows_with_depth_and_bad_layers_refused():
    import timm

    # zero_init_last=False: timm's default zero-initialises each residual branch's last norm, every block is
    # then the identity and all ERFs are the stem's (spread ~3.6 px at every depth; only the offset of the
    # top-left-of-centre unit grows, -1.6 -> -13 px, which the old from-the-centre radius counted as growth)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, zero_init_last=False).eval()
    res = effective_receptive_fields(model, ["layer1", "layer2", "layer3", "layer4"], torch.randn(2, 3, 64, 64))
    radii = [r.radius_px for r in res]
    assert all(np.isfinite(radii)) and radii[0] < radii[1] < radii[2] < radii[3]
    with pytest.raises(UsageError, match="no module"):
        effective_receptive_fields(model, ["layer9"], torch.randn(1, 3, 32, 32))
    with pytest.raises(UsageError, match="maps"):
        effective_receptive_fields(model, ["global_pool"], torch.randn(1, 3, 32, 32))
