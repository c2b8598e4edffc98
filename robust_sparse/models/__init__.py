"""Model zoo: every architecture registers a factory in :data:`MODELS` under a short name.

A factory is called as ``factory(num_classes=..., in_channels=..., mean=..., std=...)`` and
returns an ``nn.Module`` that takes images in ``[0, 1]`` and applies its own
:class:`~robust_sparse.models.normalize.Normalize` first. ``torchvision:NAME`` and ``timm:NAME`` build a library's
model behind the same layer (:mod:`robust_sparse.models.external`), and :func:`register_model` adds a user's.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from robust_sparse.errors import UserError
from robust_sparse.models import (preact_resnet, resnet, resnet50, small_cnn, vgg,  # noqa: F401 (they register)
                                   wide_resnet)
from robust_sparse.models.external import (Normalized, apply_cifar_stem, build_library_model, check_model_name,
                                           register_model, split_spec)
from robust_sparse.models.normalize import Normalize
from robust_sparse.models.registry import MODELS, REGISTERED_MODELS, ModelFactory
from robust_sparse.models.wide_resnet import wide_resnet

__all__ = ["MODELS", "REGISTERED_MODELS", "ModelFactory", "Normalize", "Normalized", "apply_cifar_stem", "build_model",
           "check_model_name", "register_model", "split_spec", "wide_resnet"]


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    kwargs: dict[str, Any] | None = None,
    cifar_stem: bool = False,
) -> nn.Module:
    """Build the registered model ``name`` (or ``torchvision:NAME``, ``timm:NAME``) with the factory's extra
    keyword arguments ``kwargs``; ``cifar_stem``: a library ResNet with the CIFAR stem (:func:`apply_cifar_stem`).
    Raises UserError for unknown names or inconsistent shapes."""
    spec = split_spec(name)
    if spec is None:
        check_model_name(name)  # a name registered in a plugin module a sweep's process has not imported yet
    factory = MODELS.get(name) if spec is None else None
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
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if cifar_stem and spec is None:
        raise UserError(f"model.cifar_stem: {name!r} is this toolkit's own model, already built for its dataset's "
                        "image size; the CIFAR stem is for torchvision:/timm: ResNet-family models")
    if spec is not None:
        network = build_library_model(*spec, num_classes, in_channels, kwargs or {})
        if cifar_stem:
            apply_cifar_stem(network, name)
        return Normalized(Normalize(mean, std), network)
    try:
        return factory(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **(kwargs or {}))
    except TypeError as error:
        if not kwargs:
            raise
        raise UserError(f"model.kwargs {kwargs}: model {name!r} does not take them ({error})") from None
