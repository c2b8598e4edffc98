"""PreAct ResNet-18 (He et al. 2016, identity mappings) as used for adversarial training by
Wong et al. (2020, "Fast is better than free") and Rice et al. (2020, "Overfitting in
adversarially robust deep learning"): BN-ReLU-conv blocks, a bias-free 1x1 convolution
shortcut on shape change, and a final BN-ReLU before pooling.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_sparse.models.normalize import Normalize, init_weights
from robust_sparse.models.registry import MODELS

__all__ = ["PreActBlock", "PreActResNet"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1-conv shortcut; also WRN's block.

    The parameter names (bn1, conv1, bn2, conv2, shortcut) are those of stored checkpoints and of the
    RobustBench/TRADES reference weights: renaming one breaks loading them.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input, as in the original pre-activation design
        # and the reference WRN code; the identity path carries the raw input.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with stages of width 64/128/256/512 and strides 1/2/2/2."""

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
        # No BN/ReLU after the stem: the first block pre-activates its input.
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        stages = []
        in_planes = 64
        for planes, stride, count in zip((64, 128, 256, 512), (1, 2, 2, 2), blocks):
            layers = []
            for i in range(count):
                layers.append(PreActBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # Blocks end on a conv, so the head needs its own BN-ReLU.
        self.bn = nn.BatchNorm2d(512)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


@MODELS.register("preact_resnet18")
def preact_resnet18(
    num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> nn.Module:
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, mean, std)
