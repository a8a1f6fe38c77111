"""Small networks the trainer's tests put in place of the U-Net++."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """A two-convolution stand-in for the U-Net++ (an ``encoder`` and the rest)."""

    def __init__(self, in_channels: int, n_classes: int) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.head = nn.Conv2d(4, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(x)))
