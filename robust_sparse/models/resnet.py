"""ResNet-18/34 in the standard CIFAR form (He et al. 2016 as adapted for 32x32 inputs):
a 3x3 stem convolution with no max-pool, four BasicBlock stages of width 64/128/256/512
with strides 1/2/2/2, global average pooling and one linear layer.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_sparse.models.normalize import Normalize, init_weights
from robust_sparse.models.registry import MODELS

__all__ = ["BasicBlock", "ResNet"]


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # Projection shortcut only where the identity cannot match the output shape.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet built from BasicBlocks; ``blocks`` gives the number of blocks per stage."""

    def __init__(
        self,
        blocks: Sequence[int],
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        in_planes = 64
        for planes, stride, count in zip((64, 128, 256, 512), (1, 2, 2, 2), blocks):
            layers = []
            for i in range(count):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


@MODELS.register("resnet18")
def resnet18(
    num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> nn.Module:
    return ResNet((2, 2, 2, 2), num_classes, in_channels, mean, std)


@MODELS.register("resnet34")
def resnet34(
    num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> nn.Module:
    return ResNet((3, 4, 6, 3), num_classes, in_channels, mean, std)
