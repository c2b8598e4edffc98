"""The sparse methods by name: a registry of records, one per method, that :func:`build_sparsity` reads.

Each method's file registers its own :class:`SparseMethod` (``bsrnet.py``, ``prune_regrow.py`` for SET/RigL/ITOP,
``gse.py``, ``ast.py``, ``static.py`` for static masks and magnitude pruning, ...): its ``build(setup) -> (masks,
engine)``, the layer-wise allocations it brings and, if it draws batches of its own, their source. What a config
says about the method (its section ``sparsity.<name>.*``, rules, defaults, optimizer pairing) is its
:class:`~robust_sparse.config.sparsity.MethodSettings`, declared under the same name in the config package
(robust_sparse/config/builtin_methods.py; config/sparsity.py says why there) and read here as the record's
``settings``. Importing :mod:`robust_sparse.sparse` imports every module of the package, so a new method is its
file here plus its settings there. ``setup`` (:class:`Setup`) carries the config, the model's sparse parameters
and the seeded generators; the masker is made here, so every method gets the same mask owner. Users add their own
with :func:`register_sparsity_method` and select it by name in a config (``sparsity.method``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from robust_sparse import plugins
from robust_sparse.config.sparsity import (REGISTERED_SPARSITY_METHODS, SPARSITY_METHODS, MethodSettings,
                                          SparsityConfig, declare)
from robust_sparse.errors import ConfigError, UserError
from robust_sparse.registry import Registry
import robust_sparse.sparse.density as allocation
from robust_sparse.sparse.masker import Engine, SparseMasker, sparsifiable

if TYPE_CHECKING:
    from robust_sparse.datasets.images import ImageSet

BatchSource = Callable[[int], "tuple[torch.Tensor, torch.Tensor]"]  # optimizer step -> (images, labels)


@dataclass(frozen=True)
class TrainingData:
    """What the training loop lends a method that draws batches of its own (its record's ``batch_source``): the
    training split, the device, the run's seed and the objective's attack (None: natural training)."""

    train: "ImageSet"
    device: torch.device
    seed: int
    perturb: Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"] | None = None


@dataclass
class Setup:
    """What a method's ``build`` gets: the config, its section, the sparse parameters and the seeded generators."""

    config: SparsityConfig
    model: nn.Module
    model_name: str
    optimizer: torch.optim.Optimizer
    params: dict[str, nn.Parameter]
    total_steps: int
    seed: int
    method: "SparseMethod"
    batch_source: BatchSource | None = None  # the method's own batches (its record's batch_source), if it has any
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
    def section(self) -> Any:
        """The method's own settings, ``sparsity.<method>.*`` (None if its record declares no section)."""
        return self.config.section(self.method.name) if self.method.section is not None else None

    def setting(self, name: str) -> Any:
        """A shared field of ``sparsity`` (``update_every``, ``prune_rate``, ...): the config's value, or the
        method's default (its record's ``defaults``) where the config left it at None."""
        value = getattr(self.config, name)
        return self.method.defaults.get(name) if value is None else value

    @property
    def end_step(self) -> int:
        """The last step that may change the topology (``sparsity.end_fraction`` of training)."""
        return max(1, int(self.config.end_fraction * self.total_steps))

    def densities(self, density: float | None = None) -> dict[str, float]:
        """Layer densities for a global ``density`` (the config's by default): ``sparsity.distribution``, or the
        method's default (``defaults["distribution"]``, erk if it names none)."""
        chosen = self.setting("distribution") or "erk"
        return distributions()[chosen](self, self.config.density if density is None else density)

    def random_masks(self, densities: dict[str, float], rounding: Callable[[float], int] = round
                     ) -> dict[str, torch.Tensor]:
        return random_masks(self.shapes, densities, self.generator, self.device, rounding)


Build = Callable[[Setup], "tuple[dict[str, torch.Tensor], Engine]"]


# a layer-wise allocation: (setup, global density) -> {layer: density}
Allocate = Callable[[Setup, float], "dict[str, float]"]


@dataclass(frozen=True)
class SavedView:
    """One network stored in a checkpoint: sub-net ``index`` of several, or the only one (``index`` None)."""

    index: int | None
    weights: dict[str, torch.Tensor]  # a plain state_dict of the model class
    masks: dict[str, torch.Tensor]


def _single_saved_view(checkpoint: dict[str, Any]) -> list[SavedView]:
    return [SavedView(None, checkpoint["model"], (checkpoint.get("sparsity") or {}).get("masks", {}))]


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class SparseMethod:
    """One sparse method as it runs; its config settings are ``settings`` (declared under the same name).

    * ``build(setup) -> (initial masks, engine)``;
    * ``allocations``: the functions of the layer-wise allocations its settings name (``distributions``);
    * ``batch_source(setup, data)``: for a method that draws batches of its own, ``step -> (images, labels)``
      from the :class:`TrainingData` the training loop lends it;
    * ``saved_views(checkpoint)``: the networks a checkpoint of it holds (one, unless it trains several).
    """

    name: str
    build: Build
    allocations: Mapping[str, Allocate] = field(default_factory=dict)
    batch_source: "Callable[[Setup, TrainingData], BatchSource] | None" = None
    saved_views: Callable[[dict[str, Any]], list[SavedView]] = _single_saved_view

    def __post_init__(self) -> None:
        object.__setattr__(self, "allocations", _frozen(self.allocations))

    @property
    def settings(self) -> MethodSettings:
        """What the config knows of this method: section, rules, defaults, optimizer (config/sparsity.py)."""
        return SPARSITY_METHODS.get(self.name)

    @property
    def section(self) -> type | None:
        return self.settings.section

    @property
    def defaults(self) -> Mapping[str, Any]:
        return self.settings.defaults

    @property
    def ignores_density(self) -> str | None:
        return self.settings.ignores_density


METHODS = Registry[SparseMethod]("sparsity method")

# the shared allocations' functions (their names: config/sparsity.py, SHARED_DISTRIBUTIONS)
SHARED_ALLOCATIONS: dict[str, Allocate] = {
    "uniform": lambda setup, density: allocation.uniform(setup.shapes, density),
    "erk": lambda setup, density: allocation.erk(setup.shapes, density),
}


def register(method: SparseMethod) -> SparseMethod:
    """Add ``method`` to :data:`METHODS` under its name, whose settings are declared already; a name registered
    twice, or allocations other than those its settings name, raise."""
    if method.name not in SPARSITY_METHODS:
        raise ValueError(f"sparsity method {method.name!r}: no settings declared under this name (built-in: "
                         "robust_sparse/config/builtin_methods.py; else use register_sparsity_method)")
    if set(method.allocations) != set(method.settings.distributions):
        raise ValueError(f"sparsity method {method.name!r}: allocations {sorted(method.allocations)}, but its "
                         f"settings name {sorted(method.settings.distributions)}")
    return METHODS.register(method.name)(method)


def distributions() -> dict[str, Allocate]:
    """Every layer-wise allocation's function by name (``sparsity.distribution``): the shared ones and the methods'."""
    found = dict(SHARED_ALLOCATIONS)
    for _, method in METHODS.entries():
        found.update(method.allocations)
    return found


def register_sparsity_method(name: str, build: Build, *, section: type | None = None,
                             validate: Callable[[SparsityConfig], None] | None = None,
                             defaults: Mapping[str, Any] | None = None, optimizer: str | None = None,
                             saved_views: Callable[[dict[str, Any]], list[SavedView]] | None = None,
                             module: str | None = None) -> None:
    """Make ``sparsity.method = name`` train with ``build(setup) -> (masks, engine)``.

    ``setup`` is a :class:`Setup`; ``masks`` maps each of ``setup.params`` to a bool tensor of its shape, and
    ``engine`` is an :class:`~robust_sparse.sparse.masker.Engine` (:class:`~robust_sparse.sparse.masker.StaticEngine`
    keeps the masks fixed). ``section`` (a dataclass) gives the method settings of its own, ``sparsity.<name>.*``,
    parsed and checked as the built-in methods' are and read back as ``setup.section``; ``validate``, ``defaults``
    and ``optimizer`` are as in :class:`~robust_sparse.config.sparsity.MethodSettings`. ``module`` is the
    importable module that makes this call, which a sweep's processes import to know the name
    (:mod:`robust_sparse.plugins`; default: the module defining ``build``).
    """
    if name in METHODS:
        raise ValueError(f"sparsity method {name!r} is already registered")
    declare(MethodSettings(name, section, validate, defaults=defaults or {}, optimizer=optimizer))
    register(SparseMethod(name, build, saved_views=saved_views or _single_saved_view))
    # a sweep's processes import this module to know the name (sweep.py)
    REGISTERED_SPARSITY_METHODS[name] = module or getattr(build, "__module__", None) or ""


def method_name(method: Any) -> str:
    """``sparsity.method`` as a plain string (a saved config may hold an Enum member's value or the name)."""
    return getattr(method, "value", method)


def build_sparsity(config, model: nn.Module, model_name: str, optimizer: torch.optim.Optimizer,
                   total_steps: int, seed: int, *, data: TrainingData | None = None,
                   batch_source: BatchSource | None = None) -> SparseMasker | None:
    """Attach the configured sparse training to ``model``/``optimizer``; None for dense training.

    A method that draws batches of its own (GSE's scoring batch) gets them from ``batch_source(step)`` when it is
    given, else from its record's ``batch_source`` over ``data`` (what ``train`` passes): the (images, labels)
    for optimizer step ``step``, on the model's device.
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
    setup = Setup(config, model, model_name, optimizer, params, total_steps, seed, method)
    if batch_source is None and method.batch_source is not None and data is not None:
        batch_source = method.batch_source(setup, data)
    setup.batch_source = batch_source
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
