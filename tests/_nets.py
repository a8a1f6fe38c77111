"""Small networks the trainer's tests put in place of the U-Net++."""

from __future__ import annotations

import torch
from torch import nn

from cellfit.starting import TrainPlan
from cellfit.train import Trainer, new_model_info


class TinyNet(nn.Module):
    """A two-convolution stand-in for the U-Net++ (an ``encoder`` and the rest)."""

    def __init__(self, in_channels: int, n_classes: int) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.head = nn.Conv2d(4, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(x)))


class FakeNetTrainer(Trainer):
    """The trainer with its network stage replaced by a :class:`TinyNet`: every other
    stage is the real one."""

    def _build_network(self, planes, anns, model, info):
        self.plan, self.init = TrainPlan.SCRATCH, None
        self.info = new_model_info(self.config, planes, anns, scale=1.0)
        torch.manual_seed(self.config.seed)
        self.model = TinyNet(self.info.in_channels, self.info.n_classes)
        self.fine_tuning, self.base_lr, self.teacher = False, self.config.lr, None
