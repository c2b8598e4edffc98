"""Typed run configuration: defaults in one place, YAML files, ``--set a.b=value`` overrides.

- :mod:`~robust_sparse.config.schema`: the dataclasses and Enums (every field, its default and why), with the
  sparsity section and what the config knows of each sparse method in :mod:`~robust_sparse.config.sparsity`, and
  the built-in methods' sections and rules in :mod:`~robust_sparse.config.builtin_methods` (imported here, so
  that every config knows them; the methods' code in robust_sparse/sparse/ imports this package, not the reverse);
- :mod:`~robust_sparse.config.parsing`: YAML and overrides -> typed dataclasses, and back (``to_dict``);
- :mod:`~robust_sparse.config.validation`: the rules, each a one-line ConfigError naming its field.

Every name other modules import is re-exported here, so ``from robust_sparse.config import X`` is the one
import path.
"""

# first: the built-in sparse methods' settings, which every SparsityConfig's default sections read
from robust_sparse.config import builtin_methods  # noqa: F401
from robust_sparse.config.parsing import (coerce, config_from_dict, from_dict, load_config, merge, parse_override,
                                          read_yaml, save_config, spell, to_dict)
from robust_sparse.config.schema import (AgentConfig, AgentEstimator, AgentVariant, AttackConfig, BatchNormMode, DataConfig,
                                         DeviceChoice, DivergenceConfig, ExecutionConfig, FinalTestConfig,
                                         FullGradInputs, ModelConfig, Norm, ObjectiveName, OptimConfig, OptimizerName,
                                         Precision, ProbeConfig, PruneScope, Schedule, SnapshotMask, SparseKernelsMode, SparsityConfig,
                                         TrackingConfig, TrainConfig, ValidationConfig, WandbConfig,
                                         WandbMode)
from robust_sparse.config.validation import validate
# the sparsity sections and their closed choices (sparse/ reads them)
from robust_sparse.config.schema import (REGISTERED_SPARSITY_METHODS, Growth, PruneSchedule,  # noqa: E402
                                         sparse_methods)
from robust_sparse.config.sparsity import SPARSITY_METHODS, MethodSettings, declare  # noqa: E402

__all__ = [
    "AgentConfig", "AgentEstimator", "AgentVariant", "AttackConfig", "BatchNormMode", "DataConfig", "DeviceChoice",
    "DivergenceConfig", "ExecutionConfig", "FinalTestConfig", "FullGradInputs", "ModelConfig", "Norm", "ObjectiveName",
    "OptimConfig", "OptimizerName", "Precision", "ProbeConfig", "PruneScope", "Schedule", "SnapshotMask", "SparseKernelsMode", "SparsityConfig",
    "TrackingConfig", "TrainConfig", "ValidationConfig", "WandbConfig", "WandbMode",
    "coerce", "config_from_dict", "from_dict", "merge", "load_config", "parse_override", "read_yaml", "spell", "save_config",
    "to_dict", "validate",
    "Growth", "PruneSchedule", "REGISTERED_SPARSITY_METHODS", "sparse_methods",
    "MethodSettings", "SPARSITY_METHODS", "declare",
]
