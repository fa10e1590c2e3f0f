"""Aligned attention maps are drawn relative to uniform attention: uniform reads flat, local reads as a peak."""

from __future__ import annotations

import numpy as np
import torch

from repsim.attention.statistics import aligned_attention
from repsim.plotting.attention import relative_to_uniform, uniform_aligned_map
from repsim.plotting.cka_map import layer_labels


def _aligned(attn: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    # the library's own aligner (independent of the plot module), summed over queries
    return aligned_attention(attn, grid).double().numpy()


def test_uniform_attention_is_flat_relative_to_the_pyramid():
    g = (5, 4)
    p = g[0] * g[1]
    raw = _aligned(torch.full((1, p, p), 1.0 / p, dtype=torch.float64), g).reshape(2 * g[0] - 1, 2 * g[1] - 1)
    raw = raw / raw.sum()
    np.testing.assert_allclose(raw, uniform_aligned_map(g), rtol=1e-12)  # the pyramid, a centred peak by itself
    assert raw[g[0] - 1, g[1] - 1] > 10 * raw[0, 0]
    np.testing.assert_allclose(relative_to_uniform(raw), 1.0, rtol=1e-12)  # ... and flat relative to uniform


def test_local_attention_peaks_at_the_centre():
    g = (6, 6)
    p = g[0] * g[1]
    raw = _aligned(torch.eye(p, dtype=torch.float64)[None], g).reshape(11, 11)  # every query attends to itself
    rel = relative_to_uniform(raw)
    assert rel[5, 5] == rel.max() and rel[5, 5] == np.float64(p)  # all mass at offset 0: P times uniform
    assert np.count_nonzero(rel) == 1


def test_layer_labels_keep_context_and_name_the_head():
    assert layer_labels(["blocks.0.attn", "blocks.1.attn"]) == ["blocks.0.attn", "blocks.1.attn"]
    assert layer_labels(["patch_embed", "blocks.0", "head_drop", "head"])[-2:] == ["pre-logits", "logits"]
    assert layer_labels(["maxpool", "layer4.1", "global_pool", "fc"])[-2:] == ["pre-logits", "logits"]
    assert layer_labels(["a.head", "a.fc"]) == ["head", "fc"]  # not the preset's final pair: names kept
