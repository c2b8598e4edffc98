"""Pre-activation Wide ResNets WRN-depth-k (Zagoruyko & Komodakis 2016) in the form used by
TRADES, MART and Rice et al. for adversarial training on CIFAR: three groups of width
16k/32k/64k, BN-ReLU-conv blocks, 1x1 convolution shortcuts on shape change, and no dropout.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_sparse.models.normalize import Normalize, init_weights
from robust_sparse.models.registry import MODELS
# WRN's block is the pre-activation block (same layers, same names, so RobustBench-style state_dicts load).
from robust_sparse.models.preact_resnet import PreActBlock

__all__ = ["WideResNet", "wide_resnet"]


class WideResNet(nn.Module):
    """WRN-depth-k: 3x3 stem of 16 channels, three groups of (depth-4)/6 blocks, BN-ReLU head."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        groups = []
        in_planes = 16
        for planes, stride in zip(widths, (1, 2, 2)):
            layers = []
            for i in range(n):
                layers.append(PreActBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            groups.append(nn.Sequential(*layers))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def wide_resnet(
    depth: int,
    widen_factor: int,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> WideResNet:
    """Build WRN-``depth``-``widen_factor``; raises ValueError unless (depth - 4) % 6 == 0."""
    return WideResNet(depth, widen_factor, num_classes, in_channels, mean, std)


def _register(name: str, depth: int, widen_factor: int) -> None:
    def factory(
        num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
    ) -> nn.Module:
        return wide_resnet(depth, widen_factor, num_classes, in_channels, mean, std)

    factory.__name__ = name
    factory.__doc__ = f"WRN-{depth}-{widen_factor} (pre-activation, no dropout)."
    MODELS.register(name)(factory)


for _name, _depth, _k in (
    ("wrn28_4", 28, 4),
    ("wrn28_10", 28, 10),
    ("wrn34_10", 34, 10),
    ("wrn34_20", 34, 20),
):
    _register(_name, _depth, _k)
del _name, _depth, _k
