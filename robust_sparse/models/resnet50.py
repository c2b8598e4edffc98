"""ResNet-50 for 224-pixel inputs (ImageNet): torchvision's architecture (He et al. 2016, bottleneck blocks
3/4/6/3, stride on the 3x3 convolution as in torchvision's v1.5), behind this package's own Normalize layer, so
that it takes images in [0, 1] like every model here."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from robust_sparse.models.external import Normalized
from robust_sparse.models.normalize import Normalize
from robust_sparse.models.registry import MODELS


@MODELS.register("resnet50")
def resnet50(num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    from torchvision.models import resnet50 as torchvision_resnet50

    network = torchvision_resnet50(num_classes=num_classes)
    if in_channels != 3:
        network.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(network.conv1.weight, mode="fan_out", nonlinearity="relu")
    return Normalized(Normalize(mean, std), network)
