"""The model registry, in a module of its own: the model files import it to register themselves, and
``robust_sparse/models/__init__.py`` imports them, so the registry exists before any of them runs without the
package importing itself back half-initialised."""

from __future__ import annotations

from typing import Callable

from torch import nn

from robust_sparse.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")

#: names added by :func:`robust_sparse.register_model` -> the module that registers them (for a sweep's processes)
REGISTERED_MODELS: dict[str, str] = {}
