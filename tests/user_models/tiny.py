"""Tiny ``py:`` model factories for the tests (``--model py:tests/user_models/tiny.py:<factory>``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv (3->6, 3x3) -> ReLU -> conv (6->8, stride 2) -> global mean -> head (8 -> 5 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.conv1(x)))
        return self.head(torch.relu(h).mean(dim=(2, 3)))


def cnn() -> nn.Module:
    """No ``pretrained`` argument: the factory makes its own weights (recorded as kind ``factory``)."""
    return TinyCNN()


def cnn_pretrained(pretrained: bool = True) -> nn.Module:
    """With a ``pretrained`` argument: ``--random-init`` builds it seeded (kind ``random``)."""
    return TinyCNN()


def swin(img_size: int = 56, pretrained: bool = False) -> nn.Module:
    """A tiny timm Swin: 4 px patches, 7 x 7 windows, two stages (14 x 14 and 7 x 7 grids at 56 px).

    The query / key projections are scaled up 6x: at timm's initialisation attention is nearly uniform within
    each window, so its statistics would hardly depend on where each token is; peaked attention makes them.
    """
    import timm

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size, window_size=7,
                              embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=5)
    with torch.no_grad():
        for stage in model.layers:
            for block in stage.blocks:
                dim = block.attn.qkv.in_features
                block.attn.qkv.weight[: 2 * dim] *= 6.0  # q and k rows; v unchanged
    return model
