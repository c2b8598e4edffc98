"""Model zoo: every architecture registers a factory in :data:`MODELS` under a short name.

A factory is called as ``factory(num_classes=..., in_channels=..., mean=..., std=...)`` and
returns an ``nn.Module`` that takes images in ``[0, 1]`` and applies its own
:class:`~robust_sparse.models.normalize.Normalize` first.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from robust_sparse.errors import UserError
from robust_sparse.models import preact_resnet, resnet, small_cnn, vgg, wide_resnet  # noqa: F401 (they register)
from robust_sparse.models.normalize import Normalize
from robust_sparse.models.registry import MODELS, ModelFactory
from robust_sparse.models.wide_resnet import wide_resnet

__all__ = ["MODELS", "ModelFactory", "Normalize", "build_model", "wide_resnet"]


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Module:
    """Build the registered model ``name``; raises UserError for unknown names or inconsistent shapes."""
    factory = MODELS.get(name)
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise UserError(f"in_channels must be >= 1, got {in_channels}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise UserError(
            f"model {name!r}: mean/std have {len(mean)}/{len(std)} entries "
            f"but in_channels is {in_channels}"
        )
    if any(s <= 0 for s in std):
        raise UserError(f"model {name!r}: std must be positive, got {tuple(std)}")
    return factory(
        num_classes=num_classes,
        in_channels=in_channels,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )
