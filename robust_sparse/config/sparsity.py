"""The sparsity section of the run configuration: the method, its budget and topology updates, and each
method's own settings in its section, ``sparsity.<method>.*`` (``sparsity.bsrnet.*``, ``sparsity.gse.*``, ...).

The methods themselves, with their section's dataclass, rules, defaults and optimizer pairing, are records of
the sparse-method registry (robust_sparse/sparse/methods.py), one per method file: :func:`sparse_methods` reads
it, so the names a config accepts are those registered. The flat and renamed names of earlier versions are
translated when a config is read (parsing.py: ``nest_flat_names``), never afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


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


# Names robust_sparse.register_sparsity_method added (sparse/methods.py): sparsity.method accepts them too.
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


def sparse_methods():
    """The sparse-method registry (robust_sparse/sparse/methods.py) with every method of the package registered.

    Imported on first use, not with this module: the methods import torch, and ``import robust_sparse.config``
    does not."""
    import robust_sparse.sparse  # noqa: F401  (importing the package registers every method file in it)
    from robust_sparse.sparse.methods import METHODS

    return METHODS


def distribution_owners() -> dict[str, Any]:
    """``sparsity.distribution`` -> the record of the method that brings it (None: a shared one, uniform or erk)."""
    from robust_sparse.sparse.methods import SHARED_DISTRIBUTIONS

    owners: dict[str, Any] = dict.fromkeys(SHARED_DISTRIBUTIONS)
    for _, record in sparse_methods().entries():
        owners.update(dict.fromkeys(record.distributions, record))
    return owners


def section_types(written_with: "SparsityConfig | None" = None) -> dict[str, type]:
    """``sparsity.<method>`` -> the dataclass of that method's section, for every registered method with one.

    Given a config, the sections written with it (parsing.py, ``to_dict``): every built-in method's, and a method
    registered from Python (``register_sparsity_method``) only when it is the config's own, so that a saved config
    still loads in a process that has not imported that plugin."""
    return {name: record.section for name, record in sparse_methods().entries() if record.section is not None
            and (written_with is None or name not in REGISTERED_SPARSITY_METHODS or name == written_with.method)}


def default_sections() -> dict[str, Any]:
    """Every registered method's section at its defaults."""
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
