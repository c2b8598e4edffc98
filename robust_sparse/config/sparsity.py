"""The sparsity section of the run configuration: the method, its budget and topology updates, and each
method's own settings in its section, ``sparsity.<method>.*`` (``sparsity.bsrnet.*``, ``sparsity.gse.*``, ...).

What the config knows of a sparse method is a :class:`MethodSettings` record in :data:`SPARSITY_METHODS`: its
section's dataclass, its rules, the defaults of the shared fields it leaves at None, the optimizer it pairs with,
the allocations it brings. The built-in methods' records are in :mod:`~robust_sparse.config.builtin_methods`; a
method registered from Python (``register_sparsity_method``) adds its own. The sparse-method registry
(robust_sparse/sparse/methods.py) holds what runs: each method's ``build``, allocation functions and checkpoint
views, looked up by the same name.

The config owns the settings, not the registry, because a config is checked completely when it is read (every
rule a one-line error naming its field, before any work) and written back completely (every section at its
defaults): it needs each method's settings and rules then, and those are plain data. Owning them here, the config
imports no method file and no torch, and the registry imports the config, never the other way round. The flat and
renamed names of earlier versions are translated when a config is read (parsing.py: ``nest_flat_names``), never
afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from types import MappingProxyType
from typing import Any, Callable, Mapping

from robust_sparse.registry import Registry


class PruneScope(str, Enum):
    GLOBAL = "global"
    LAYERWISE = "layerwise"


class Growth(str, Enum):
    """How SET/RigL/ITOP choose the connections they grow (sparse/strategies.py)."""

    RANDOM = "random"  # SET, SET-ITOP
    GRADIENT = "gradient"  # RigL: largest dense-gradient magnitude
    MOMENTUM = "momentum"  # SNFS: largest running average of dense gradients


class PruneSchedule(str, Enum):
    CONSTANT = "constant"  # SET
    COSINE = "cosine"  # RigL, ITOP: prune_rate/2 * (1 + cos(pi t / T_end))


# Names robust_sparse.register_sparsity_method added (sparse/methods.py): a sweep's runs import their modules.
REGISTERED_SPARSITY_METHODS: dict[str, str] = {}  # name -> the module that registered it

# The flat names of the first versions (sparsity.ast_densities, ...), still read from YAML, --set and saved
# configs: each -> (its method's section, the field there).
FLAT_SPARSITY_NAMES = {
    **{name: ("bsrnet", name) for name in ("noise_scale", "temperature", "l1", "regrow_value")},
    **{f"gse_{name}": ("gse", name) for name in ("sampler", "samples_per_class", "scope")},
    "gse_candidates": ("gse", "candidate_multiple"),
    **{f"ast_{name}": ("ast", name) for name in ("densities", "init_density", "offset", "gc", "gc_beta", "nested",
                                                 "subnet_bn", "prune_from")},
    "dense_checkpoint": ("magnitude_prune", "dense_checkpoint"),
}

# Fields of a method's section renamed since (section, old name) -> new name, translated the same way:
# sparsity.gse.candidates was GSE's candidate multiple (the paper's gamma, which AGENT's agent.gamma also names).
RENAMED_SECTION_FIELDS = {("gse", "candidates"): "candidate_multiple"}


@dataclass(frozen=True)
class MethodSettings:
    """What the config knows of one sparse method (its implementation is in robust_sparse/sparse/):

    * ``section``: the dataclass of ``sparsity.<name>.*`` (None: no settings of its own), parsed with the
      config's typed parser (one-line errors naming the field) and read back as ``sparsity.section(name)``;
    * ``validate(sparsity)``: its rules, raising a one-line :class:`~robust_sparse.errors.ConfigError` (run when
      it is selected);
    * ``defaults``: what the shared fields it leaves at None resolve to (``update_every``, ``prune_rate``,
      ``prune_schedule``, ``growth``, ``distribution``);
    * ``optimizer``: the ``optim.optimizer`` it trains with when the config gives none (None: the dense default);
    * ``distributions``: the layer-wise allocations it brings, selectable as ``sparsity.distribution``: name ->
      why only this method may use it (None: any method may);
    * ``ignores_density``: why ``sparsity.density`` means nothing to it (None: it is the method's budget).
    """

    name: str
    section: type | None = None
    validate: Callable[[SparsityConfig], None] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    optimizer: str | None = None
    distributions: Mapping[str, str | None] = field(default_factory=dict)
    ignores_density: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "distributions", MappingProxyType(dict(self.distributions)))


SPARSITY_METHODS = Registry[MethodSettings]("sparsity method")

# the allocations every method may use (sparse/density.py); methods bring their own through their settings
SHARED_DISTRIBUTIONS = ("uniform", "erk")


def declare(settings: MethodSettings) -> MethodSettings:
    """Add ``settings`` to :data:`SPARSITY_METHODS` under its name; a name declared twice, defaults for fields
    ``sparsity`` does not have, or an allocation name another method brings already, raise."""
    name = settings.name
    if not name or name != name.strip() or name == "none":
        raise ValueError(f"sparsity method name {name!r}: give a non-empty name other than 'none'")
    unknown = set(settings.defaults) - {f.name for f in fields(SparsityConfig)}
    if unknown:
        raise ValueError(f"sparsity method {name!r}: defaults for {sorted(unknown)}, not fields of sparsity")
    taken = set(distribution_owners()) & set(settings.distributions)
    if taken:
        raise ValueError(f"sparsity method {name!r}: distribution {sorted(taken)[0]!r} is registered already")
    return SPARSITY_METHODS.register(name)(settings)


def sparse_methods() -> Registry[MethodSettings]:
    """Every sparse method's settings by name (:data:`SPARSITY_METHODS`)."""
    return SPARSITY_METHODS


def distribution_owners() -> dict[str, MethodSettings | None]:
    """``sparsity.distribution`` -> the settings of the method that brings it (None: a shared one, uniform or erk)."""
    owners: dict[str, MethodSettings | None] = dict.fromkeys(SHARED_DISTRIBUTIONS)
    for _, settings in SPARSITY_METHODS.entries():
        owners.update(dict.fromkeys(settings.distributions, settings))
    return owners


def section_types(written_with: SparsityConfig | None = None) -> dict[str, type]:
    """``sparsity.<method>`` -> the dataclass of that method's section, for every method with one.

    Given a config, the sections written with it (parsing.py, ``to_dict``): every built-in method's, and a method
    registered from Python (``register_sparsity_method``) only when it is the config's own, so that a saved config
    still loads in a process that has not imported that plugin."""
    return {name: settings.section for name, settings in SPARSITY_METHODS.entries() if settings.section is not None
            and (written_with is None or name not in REGISTERED_SPARSITY_METHODS or name == written_with.method)}


def default_sections() -> dict[str, Any]:
    """Every method's section at its defaults."""
    return {name: kind() for name, kind in section_types().items()}


@dataclass
class SparsityConfig:
    """Sparse training. Fields left at None take the method's default (its record's ``defaults``); a method's own
    fields are in its section, ``sparsity.<method>.*`` (:meth:`section`)."""

    method: str = "none"  # "none" (dense training) or a registered method's name (sparse/methods.py)
    density: float = 0.1  # fraction of conv/linear weights kept: 0.1 = 90% sparsity, 0.01 = 99%
    # a registered layer-wise allocation (uniform, erk, and the methods' own); None: the method's default
    distribution: str | None = None
    # Are the first conv/linear layer and the classifier sparse too? None: by the model (sparse/masker.py,
    # sparsifiable): yes for a CNN (BSR-Net; RigL keeps the first conv dense), no for a transformer (its patch
    # embedding and head stay dense). Reading a config makes it true for a model named without timm:/torchvision:
    # (parsing.py: resolve_layer_ends), so that those configs save and resume as they did before this rule.
    include_first: bool | None = None
    include_last: bool | None = None
    # topology updates: SET / RigL / ITOP, and GSE and AST as their sections say
    update_every: int | None = None  # iterations between topology updates (delta T)
    prune_rate: float | None = None  # fraction of each layer's active weights replaced per update
    prune_schedule: PruneSchedule | None = None  # cosine (RigL, ITOP) or constant (SET)
    growth: Growth | None = None  # random (SET, SET-ITOP), gradient (RigL), momentum (SNFS)
    end_fraction: float = 0.75  # topology updates stop after this fraction of training (RigL's T_end)
    prune_scope: PruneScope = PruneScope.GLOBAL  # magnitude_prune and AST: one |W| threshold, or one per layer
    # method name -> its section's settings, read and written as sparsity.<method>.* (parsing.py), not as a key
    sections: dict[str, Any] = field(default_factory=lambda: default_sections(), metadata={"inline": section_types})

    def section(self, method: str) -> Any:
        """``sparsity.<method>``'s settings: those read from the config, else the section's defaults."""
        if method not in self.sections:
            types = section_types()
            if method not in types:
                raise KeyError(f"sparsity method {method!r} has no section of its own")
            self.sections[method] = types[method]()
        return self.sections[method]
