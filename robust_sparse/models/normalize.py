"""Input normalisation layer and the weight initialisation shared by every model.

Every model in :mod:`robust_sparse.models` takes images in ``[0, 1]`` and normalises them
itself, so that attacks can work (and clip) in pixel space while the dataset statistics
travel with the checkpoint.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["Normalize", "init_weights"]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with mean and std stored as ``[1, C, 1, 1]`` buffers."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if len(mean) == 0:
            raise ValueError("mean and std must have at least one channel")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        # Buffers (not parameters): they must be saved and moved with the model,
        # but never trained or pruned.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}"


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convolutions and unit/zero BatchNorm; Linear keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
