"""VGG-16 with BatchNorm in the CIFAR variant used by HYDRA and BSR-Net: 13 bias-free 3x3
convolutions with four max-pools, a 2x2 adaptive average pool and a 2048-256-256-C
classifier without dropout.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from robust_sparse.models.normalize import Normalize, init_weights
from robust_sparse.models.registry import MODELS

__all__ = ["VGG", "VGG16_PLAN"]

# "M" is a 2x2 max-pool; a 32x32 input leaves the last conv block at 2x2x512.
VGG16_PLAN: tuple[Union[int, str], ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)


class VGG(nn.Module):
    """Conv-BN-ReLU stack following ``plan``, adaptive 2x2 pool, three-layer MLP head."""

    def __init__(
        self,
        plan: Sequence[Union[int, str]],
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            width = int(item)
            # No conv bias: the following BatchNorm's shift makes it redundant.
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        # Fixes the head's input size for any input resolution.
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * 2 * 2, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(self.normalize(x))))


@MODELS.register("vgg16")
def vgg16(
    num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> nn.Module:
    return VGG(VGG16_PLAN, num_classes, in_channels, mean, std)
