"""Architectures from outside the registry: ``torchvision:NAME``, ``timm:NAME`` and :func:`register_model`.

A spec ``torchvision:resnet18`` builds ``torchvision.models.get_model("resnet18", num_classes=C, **kwargs)``, a
spec ``timm:resnet18`` builds ``timm.create_model("resnet18", num_classes=C, in_chans=K, **kwargs)``; both are
wrapped behind the dataset's Normalize layer (:class:`Normalized`), so that they take [0, 1] inputs as every
model here, and train, sparsify and evaluate like the built-in ones. ``model.kwargs`` are passed through
(``pretrained``/``weights`` included: then the model's own statistics must be the dataset's, as they are for
ImageNet). ``model.cifar_stem: true`` swaps a ResNet-family model's ImageNet stem (7x7 stride-2 convolution, then
a stride-2 max-pool: a 32-pixel image leaves it at 8x8) for the CIFAR one (3x3 stride-1 convolution, no pool), as
CIFAR ResNets have (:func:`apply_cifar_stem`). The parameter names stay the library's, so the exported network
loads into ``apply_cifar_stem(timm.create_model(...))`` with ``strict=True``.

:func:`register_model` adds a factory of a user's module under a plain name, in the calling process; a sweep's
processes learn it from ``$ROBUST_SPARSE_PLUGINS`` (:mod:`robust_sparse.plugins`), as they do for sparse methods.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

import torch
from torch import nn

from robust_sparse import plugins
from robust_sparse.errors import ConfigError, UserError
from robust_sparse.models.registry import MODELS, REGISTERED_MODELS

LIBRARIES = ("torchvision", "timm")


class Normalized(nn.Module):
    """``network(normalize(x))``: an outside network that expects normalised inputs, on [0, 1] images."""

    def __init__(self, normalize: nn.Module, network: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalize(x))


def split_spec(name: str) -> tuple[str, str] | None:
    """``torchvision:resnet18`` -> ("torchvision", "resnet18"); None for a plain registry name."""
    library, sep, model = name.partition(":")
    return (library, model) if sep and library in LIBRARIES else None


def _timm():
    from robust_sparse.environment.compat import dependency_warnings_filtered

    try:
        with dependency_warnings_filtered():
            import timm
    except ImportError:
        raise UserError("model.name timm:...: timm is not installed: pip install timm") from None
    return timm


def library_names(library: str) -> list[str]:
    if library == "torchvision":
        import torchvision.models

        return sorted(torchvision.models.list_models())
    return sorted(_timm().list_models())


def check_model_name(name: str) -> None:
    """``name`` is a registered model (after importing the plugins a sweep names) or a library model."""
    spec = split_spec(name)
    if spec is not None:
        library, model = spec
        names = library_names(library)
        if model not in names:
            close = difflib.get_close_matches(model, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"model.name: {library} has no model {model!r}{hint}")
        return
    if name not in MODELS:
        plugins.import_from_environment()
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of: {', '.join(MODELS)}, or "
                          f"torchvision:NAME, timm:NAME (or a name registered with robust_sparse.register_model)")


def build_library_model(library: str, model: str, num_classes: int, in_channels: int,
                        kwargs: dict[str, Any]) -> nn.Module:
    options = dict(kwargs)
    options.setdefault("num_classes", num_classes)
    try:
        if library == "torchvision":
            import torchvision.models

            if in_channels != 3:
                raise UserError(f"model.name torchvision:{model}: torchvision's models take 3 channels, the "
                                f"dataset has {in_channels} (use timm:{model}, which takes in_chans)")
            return torchvision.models.get_model(model, **options)
        options.setdefault("in_chans", in_channels)
        return _timm().create_model(model, **options)
    except UserError:
        raise
    except Exception as error:  # unknown keyword, bad value: the library's own message, in one line
        first = (str(error).strip().splitlines() or [""])[0]
        raise UserError(f"model {library}:{model} with model.kwargs {kwargs}: {type(error).__name__}: {first}") from None


def apply_cifar_stem(network: nn.Module, spec: str = "the model") -> nn.Module:
    """The CIFAR stem in place of an ImageNet ResNet's: ``conv1`` becomes a 3x3 stride-1 convolution (same
    channels, He-initialised as both libraries initialise it) and ``maxpool`` an ``nn.Identity``. Works for
    torchvision's and timm's ResNet family (resnet*, resnext*, wide_resnet*, ...); returns ``network``.

    To load an exported ``model.cifar_stem`` network outside this toolkit::

        network = apply_cifar_stem(timm.create_model("resnet18", num_classes=10))
        network.load_state_dict(torch.load("model_network.pt", weights_only=True), strict=True)
    """
    conv, pool = getattr(network, "conv1", None), getattr(network, "maxpool", None)
    if not (isinstance(conv, nn.Conv2d) and isinstance(pool, (nn.MaxPool2d, nn.Identity))):
        raise UserError(f"model.cifar_stem: {spec} has no ResNet stem (a conv1 convolution and a maxpool); "
                        "the CIFAR stem is for ResNet-family models (torchvision:resnet18, timm:resnet50, ...)")
    stem = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1,
                     bias=conv.bias is not None)
    nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
    if stem.bias is not None:
        nn.init.zeros_(stem.bias)
    network.conv1, network.maxpool = stem, nn.Identity()
    return network


def register_model(name: str, factory: Callable[..., nn.Module], *, module: str | None = None) -> None:
    """Make ``model.name = name`` train (and ``eval --arch name`` evaluate) ``factory(num_classes=...,
    in_channels=..., mean=..., std=..., **model.kwargs)``, an ``nn.Module`` on [0, 1] images that normalises
    them itself (e.g. with :class:`~robust_sparse.models.Normalize`).

    ``module`` is the importable module that makes this call, which a sweep's processes import to know the name
    (default: the module defining ``factory``).
    """
    if not name or name != name.strip() or ":" in name:
        raise ValueError(f"model name {name!r}: give a non-empty name without ':' (that prefix is a library's)")
    MODELS.register(name)(factory)
    REGISTERED_MODELS[name] = module or getattr(factory, "__module__", None) or ""
