"""Small CNNs: ``small_cnn`` is the 4-conv/2-FC SmallCNN used for MNIST in TRADES-style
robustness work; ``tiny_cnn`` is a minimal network for fast unit tests.

Both have BatchNorm after every conv, like every BSR-Net architecture: without it the signal of a 90%-sparse
network at its (dense) He initialisation fades layer by layer and training never starts (we measured loss
stuck at ln 10 for BSR-Net, RigL and static masks alike). Both end in ``AdaptiveAvgPool2d(4)`` so they accept
28x28 and 32x32 inputs alike.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from robust_sparse.models.normalize import Normalize, init_weights
from robust_sparse.models.registry import MODELS

__all__ = ["SmallCNN", "TinyCNN"]


def _conv_bn_relu(in_channels: int, out_channels: int, padding: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=padding, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool (3x3, no padding, each conv + BN + ReLU), then FC 1024-200-C."""

    def __init__(
        self, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32, padding=0),
            *_conv_bn_relu(32, 32, padding=0),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64, padding=0),
            *_conv_bn_relu(64, 64, padding=0),
            nn.MaxPool2d(2),
            # 28x28 input already gives 4x4 here (an identity); 32x32 gives 5x5.
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 200),
            nn.ReLU(inplace=True),
            nn.Linear(200, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class TinyCNN(nn.Module):
    """conv8-pool-conv16 (3x3, padding 1, each conv + BN + ReLU), adaptive pool to 4x4, one FC layer."""

    def __init__(
        self, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 8, padding=1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(8, 16, padding=1),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


@MODELS.register("small_cnn")
def small_cnn(
    num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> nn.Module:
    return SmallCNN(num_classes, in_channels, mean, std)


@MODELS.register("tiny_cnn")
def tiny_cnn(
    num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> nn.Module:
    return TinyCNN(num_classes, in_channels, mean, std)
