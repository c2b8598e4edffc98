"""The sparse methods by name: a registry of small records that :func:`build_sparsity` looks up.

Each method's file registers itself (``bsrnet.py``, ``prune_regrow.py`` for SET/RigL/ITOP, ``gse.py``, ``ast.py``,
``static.py`` for static masks and magnitude pruning). A method is a ``build(setup) -> (masks, engine)``
function: ``setup`` (:class:`Setup`) carries the config, the model's sparse parameters and the seeded
generators; the masker is made here, so every method gets the same mask owner. Users add their own with
:func:`register_sparsity_method` and select it by name in a config (``sparsity.method``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from robust_sparse import plugins
from robust_sparse.config import REGISTERED_SPARSITY_METHODS, SparsityConfig
from robust_sparse.errors import ConfigError, UserError
from robust_sparse.registry import Registry
from robust_sparse.sparse import density as allocation
from robust_sparse.sparse.masker import Engine, SparseMasker, sparsifiable


@dataclass
class Setup:
    """What a method's ``build`` gets: the config, the sparse parameters and the seeded generators."""

    config: SparsityConfig
    model: nn.Module
    model_name: str
    optimizer: torch.optim.Optimizer
    params: dict[str, nn.Parameter]
    total_steps: int
    seed: int
    score_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None  # GSE: step -> batch
    generator: torch.Generator = field(init=False)  # the initial topology
    engine_generator: torch.Generator = field(init=False)  # the engine's draws, on the parameters' device

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + 7919)
        self.engine_generator = torch.Generator(device=self.device).manual_seed(self.seed + 104729)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {name: p.shape for name, p in self.params.items()}

    @property
    def end_step(self) -> int:
        """The last step that may change the topology (``sparsity.end_fraction`` of training)."""
        return max(1, int(self.config.end_fraction * self.total_steps))

    def densities(self, density: float | None = None, default: str = "erk") -> dict[str, float]:
        """Layer densities for a global ``density`` (the config's by default): ``sparsity.distribution``
        when given, else the method's ``default`` (a name in :data:`DISTRIBUTIONS`)."""
        chosen = self.config.distribution
        allocate = DISTRIBUTIONS[default if chosen is None else chosen.value]
        return allocate(self, self.config.density if density is None else density)

    def random_masks(self, densities: dict[str, float], rounding: Callable[[float], int] = round
                     ) -> dict[str, torch.Tensor]:
        return random_masks(self.shapes, densities, self.generator, self.device, rounding)


Build = Callable[[Setup], "tuple[dict[str, torch.Tensor], Engine]"]

# layer-wise allocations by name, (setup, global density) -> {layer: density}; methods add their own
# (bsrnet.py: BSR-Net's hand-set initial densities, gse.py: GSE's Erdős–Rényi)
DISTRIBUTIONS: dict[str, Callable[[Setup, float], dict[str, float]]] = {
    "uniform": lambda setup, density: allocation.uniform(setup.shapes, density),
    "erk": lambda setup, density: allocation.erk(setup.shapes, density),
}


@dataclass(frozen=True)
class SavedView:
    """One network stored in a checkpoint: sub-net ``index`` of several, or the only one (``index`` None)."""

    index: int | None
    weights: dict[str, torch.Tensor]  # a plain state_dict of the model class
    masks: dict[str, torch.Tensor]


def _single_saved_view(checkpoint: dict[str, Any]) -> list[SavedView]:
    return [SavedView(None, checkpoint["model"], (checkpoint.get("sparsity") or {}).get("masks", {}))]


@dataclass(frozen=True)
class SparseMethod:
    """A registered method: ``build(setup) -> (initial masks, engine)``; ``saved_views(checkpoint)`` lists the
    networks a checkpoint of it holds (one, unless the method trains several)."""

    build: Build
    saved_views: Callable[[dict[str, Any]], list[SavedView]] = _single_saved_view


METHODS = Registry[SparseMethod]("sparsity method")


def register_sparsity_method(name: str, build: Build, *,
                             saved_views: Callable[[dict[str, Any]], list[SavedView]] | None = None,
                             module: str | None = None) -> None:
    """Make ``sparsity.method = name`` train with ``build(setup) -> (masks, engine)``.

    ``setup`` is a :class:`Setup`; ``masks`` maps each of ``setup.params`` to a bool tensor of its shape, and
    ``engine`` is an :class:`~robust_sparse.sparse.masker.Engine` (the base class keeps the masks fixed).
    ``module`` is the importable module that makes this call, which a sweep's processes import to know the name
    (:mod:`robust_sparse.plugins`; default: the module defining ``build``).
    """
    if not name or name != name.strip() or name == "none":
        raise ValueError(f"sparsity method name {name!r}: give a non-empty name other than 'none'")
    METHODS.register(name)(SparseMethod(build, saved_views or _single_saved_view))
    # sparsity.method accepts it from now on
    REGISTERED_SPARSITY_METHODS[name] = module or getattr(build, "__module__", None) or ""


def method_name(method: Any) -> str:
    """``sparsity.method`` as a plain string (built-in names are Enum members, registered ones strings)."""
    return getattr(method, "value", method)


def build_sparsity(config, model: nn.Module, model_name: str, optimizer: torch.optim.Optimizer,
                   total_steps: int, seed: int, *, score_batch=None) -> SparseMasker | None:
    """Attach the configured sparse training to ``model``/``optimizer``; None for dense training.

    ``score_batch`` (GSE only, required there): ``score_batch(step)`` returns the (images, labels) batch on which
    GSE scores its candidate connections at optimizer step ``step``, on the model's device and already
    adversarial under AT.
    """
    name = method_name(config.method)
    if name == "none":
        return None
    if name not in METHODS:
        plugins.import_from_environment()
    method = METHODS.get(name)
    params = sparsifiable(model, config.include_first, config.include_last)
    if not params:
        raise ConfigError(f"sparsity.method = {name}: model {model_name!r} has no sparsifiable "
                          "(conv or linear) layer")
    setup = Setup(config, model, model_name, optimizer, params, total_steps, seed, score_batch)
    masks, engine = method.build(setup)
    return SparseMasker(params, optimizer, masks, engine)


# ---- masks ---------------------------------------------------------------------------------------------


def random_masks(shapes: dict[str, torch.Size], densities: dict[str, float], generator: torch.Generator,
                 device: torch.device, rounding=round) -> dict[str, torch.Tensor]:
    """Exactly ``rounding(density * numel)`` active positions per layer, uniformly at random."""
    masks = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        keep = min(numel, max(1, rounding(densities[name] * numel)))
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=generator)[:keep]] = True
        masks[name] = flat.view(shape).to(device)
    return masks


# ---- checkpoints ---------------------------------------------------------------------------------------


def saved_views(checkpoint: dict[str, Any]) -> list[SavedView]:
    """The networks a robust-sparse checkpoint holds, as its method stores them."""
    name = method_name(((checkpoint.get("config") or {}).get("sparsity") or {}).get("method", "none"))
    if name not in METHODS:
        plugins.import_from_environment()  # a method registered from Python, in a sweep's evaluation process
    method = METHODS.get(name) if name in METHODS else None
    return (method.saved_views if method is not None else _single_saved_view)(checkpoint)


def pick_view(views: list[SavedView], index: int | None, path: Any) -> SavedView:
    """Sub-net ``index`` (``--subnet``) of a checkpoint's networks; None picks the only one."""
    several = views[0].index is not None
    if several and index is None:
        raise UserError(f"{path} holds {len(views)} sub-nets (an AST checkpoint): pass --subnet K "
                        f"(0..{len(views) - 1}, 0 = the densest)")
    if not several and index is not None:
        raise UserError(f"--subnet {index}: {path} has one network, no sub-nets (not an AST checkpoint)")
    if several and not 0 <= index < len(views):
        raise UserError(f"--subnet {index}: this checkpoint has sub-nets 0..{len(views) - 1}")
    return views[index] if several else views[0]
