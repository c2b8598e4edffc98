"""Reading a configuration: YAML (``load_yaml``, a checked SafeLoader) -> dataclass defaults -> ``--set a.b=value``
overrides -> :func:`~robust_sparse.config.validation.validate`, and writing it back.

Nothing is ever evaluated as code: numbers written as fractions (``8/255``) are parsed by a regular expression.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Union

import yaml

from robust_sparse.config.schema import (FLAT_SPARSITY_NAMES, RENAMED_SECTION_FIELDS, OptimizerName, TrainConfig,
                                         sparse_methods)
from robust_sparse.config.validation import validate
from robust_sparse.config.yaml_input import load_yaml
from robust_sparse import plugins
from robust_sparse.datasets import DATASETS
from robust_sparse.errors import ConfigError
from robust_sparse.files.atomic import write_atomic

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# dict <-> dataclass


_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
# YAML 1.1 reads "1e-4" (no dot) as a string; accept it, and fractions such as "8/255", without eval.
_FLOAT = re.compile(rf"^\s*({_NUMBER})\s*$")
_FRACTION = re.compile(rf"^\s*({_NUMBER})\s*/\s*({_NUMBER})\s*$")


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming the field."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return coerce(value, inner, where)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:  # keyword arguments handed to a factory: YAML values as they are
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise ConfigError(f"{where}: expected a mapping of names to values, got {value!r}")
        return dict(value)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        if isinstance(value, bool) and {"on", "off"} <= {m.value for m in annotation}:
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        try:
            return annotation(value)
        except ValueError:
            allowed = ", ".join(m.value for m in annotation)
            raise ConfigError(f"{where}: {value!r} is not one of {allowed}") from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        number = _number(value, where)
        if not math.isfinite(number):  # .inf, .nan, 1e999: a run would only diverge (or never stop)
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")  # a bug in this module


def _number(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and (match := _FLOAT.match(value)):
        return float(match.group(1))
    if isinstance(value, str) and (match := _FRACTION.match(value)):
        numerator, denominator = float(match.group(1)), float(match.group(2))
        if denominator == 0:
            raise ConfigError(f"{where}: division by zero in {value!r}")
        return numerator / denominator
    raise ConfigError(f"{where}: expected a number (or a fraction like 8/255), got {value!r}")


def from_dict(cls: type, data: Any, prefix: str = "", names: Callable[[str], str] | None = None) -> Any:
    """``data`` (YAML values) as a ``cls`` dataclass, each value coerced to its field's annotation; unknown fields
    and wrong types are one-line ConfigErrors naming the field: ``prefix.field``, or ``names(field path)`` where
    the values came from elsewhere (``robust-sparse eval`` names its flags, e.g. ``--batch-size``)."""
    if not isinstance(data, dict):
        where = (names(prefix) if names is not None and prefix else prefix) or "config"
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    inline = [f for f in dataclasses.fields(cls) if "inline" in f.metadata]
    known = {f.name for f in dataclasses.fields(cls)} - {f.name for f in inline}
    # an inline field (the sparsity methods' sections) takes the keys its metadata's function names, at this level
    sections = {name: kind for f in inline for name, kind in f.metadata["inline"]().items()}
    if inline and set(data) - known - set(sections) and plugins.import_from_environment():
        sections = {name: kind for f in inline for name, kind in f.metadata["inline"]().items()}  # a plugin's section
    unknown = sorted(set(data) - known - set(sections), key=str)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown field {names(where) if names is not None else where!r}; known fields here: "
                          f"{', '.join(sorted(known | set(sections)))}")
    values: dict[str, Any] = {f.name: {name: kind() for name, kind in sections.items()} for f in inline}
    for name, raw in data.items():
        where = f"{prefix}.{name}" if prefix else name
        if name in sections:
            values[inline[0].name][name] = from_dict(sections[name], raw, where, names)
            continue
        spelled = names(where) if names is not None else where
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = from_dict(annotation, raw, where, names)
        else:
            values[name] = coerce(raw, annotation, spelled)
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-Python view (Enums as values): what goes into YAML files and checkpoints. An inline field's entries
    (the sparsity methods' sections) are written at its dataclass's level, every one its metadata names."""

    def plain(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    result: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if "inline" in f.metadata:
            for name, kind in f.metadata["inline"](config).items():
                result[name] = to_dict(value[name] if name in value else kind())
        elif dataclasses.is_dataclass(value):
            result[f.name] = to_dict(value)
        else:
            result[f.name] = plain(value)
    return result


def merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value, where)
        elif isinstance(value, dict) and merged.get(key) is not None:
            # `attack: 0.1` then `--set attack.eps=...`: replacing the scalar would hide the first mistake
            raise ConfigError(f"{where}: expected a mapping of fields (e.g. {where}.{next(iter(value))}), "
                              f"got {merged[key]!r}")
        else:
            merged[key] = value
    return merged


def spell(value: Any) -> str:
    """A config value as run names, overrides and W&B tags write it: YAML's flow form, a whole float as an
    integer (``0.0`` -> ``0``), so that a run named ``agent.gamma=0`` (the grid's ``0``) is tagged with the same
    ``0`` its resolved config (``0.0``) gives (robust_sparse.tracking). The inverse of :func:`parse_override`'s value reading."""
    return yaml.safe_dump(_whole(value), default_flow_style=True).strip().removesuffix("...").strip()


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:  # 1e20 stays 1.0e+20
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_whole(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    return value


def parse_override(text: str) -> dict[str, Any]:
    """``optim.lr=0.1`` -> ``{"optim": {"lr": 0.1}}``; the value is read as YAML (so lists work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    value = load_yaml(raw, f"--set {key.strip()}", if_invalid=raw) if raw.strip() else None
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (UTF-8) YAML file") from None
    data = load_yaml(text, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of fields, not {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; validated."""
    data: dict[str, Any] = nest_flat_names(read_yaml(path)) if path is not None else {}
    if path is not None and not data:
        # An empty file would train the schema defaults (dense PGD-AT), while no file trains the quickstart
        # (BSR-Net, 90% sparse): either reading is a guess, and an empty file is more often a mistake (a
        # truncated copy, the wrong path) than a request for the defaults. Say so instead of guessing.
        raise ConfigError(f"config file {path} is empty; give at least one field (e.g. objective: pgd_at), or "
                          "no CONFIG for the quickstart")
    if path is not None and isinstance(data, dict) and "out_dir" not in data:
        # a config of its own never trains into another run's directory (the schema's default is the quickstart's)
        data["out_dir"] = f"runs/{Path(path).stem}"
    for text in overrides:
        data = merge(data, nest_flat_names(parse_override(text)))
    config = from_dict(TrainConfig, data, "")
    _method_defaults(config, data)
    _protocol_eps(config, data)
    resolve_layer_ends(config)
    validate(config)
    return config


def _protocol_eps(config: TrainConfig, data: dict[str, Any]) -> None:
    """``attack.eps`` not given in the file or an override: the dataset's protocol radius for ``attack.norm`` (its
    record in robust_sparse/datasets/: RobustBench's 8/255 for CIFAR-10, 0.5 under L2), where the schema's one
    default, MNIST's 0.1, served every dataset before. ``attack.step_size`` not given either: eps / 4, the
    ratio of both MNIST's (0.025 at 0.1) and CIFAR's (2/255 at 8/255) recipes; with eps given and no step size
    it stays 0.025, so a config that set eps trains as it did. ``train`` logs which eps it used
    (``describe_eps``). Saved configs hold both values, so a checkpoint resumes and is evaluated with its own."""
    attack = data.get("attack")
    given = attack if isinstance(attack, dict) else {}
    if "eps" in given or config.data.dataset not in DATASETS:  # an unknown dataset: validate() says so
        return
    config.attack.eps = DATASETS.get(config.data.dataset).protocol(config.attack.norm).eps
    if "step_size" not in given:
        config.attack.step_size = config.attack.eps / 4


def describe_eps(config: TrainConfig) -> str:
    """Where ``attack.eps`` came from, for the run's log: the dataset's protocol radius, or another."""
    if config.data.dataset not in DATASETS:
        return ""
    protocol = DATASETS.get(config.data.dataset).protocol(config.attack.norm)
    if math.isclose(config.attack.eps, protocol.eps, rel_tol=0, abs_tol=1e-12):
        return f"{config.data.dataset}'s protocol eps for {config.attack.norm.value}"
    return f"not {config.data.dataset}'s protocol eps for {config.attack.norm.value} ({protocol.eps:.6g})"


def _method_defaults(config: TrainConfig, data: dict[str, Any]) -> None:
    """The optimizer the sparse method pairs with (its record's ``optimizer``: BSR-Net trains with tfa SGDW, decay
    decoupled from the gradient and not scaled by the learning rate), unless ``optim.optimizer`` is given in the
    file or an override (``train`` then warns). The quickstart leaves the optimizer to this rule, so a dense
    baseline derived from it trains with ``sgd``; a debug line, not an info one: every command on the quickstart
    would otherwise print it, before its one-line errors too."""
    optim = data.get("optim")
    given = isinstance(optim, dict) and "optimizer" in optim
    methods = sparse_methods()
    record = methods.get(config.sparsity.method) if config.sparsity.method in methods else None
    if record is not None and record.optimizer is not None and not given:
        config.optim.optimizer = OptimizerName(record.optimizer)
        log.debug("sparsity.method = %s: optim.optimizer = %s (the method's pairing), as optim.optimizer was not "
                  "given", record.name, record.optimizer)


def resolve_layer_ends(config: TrainConfig) -> None:
    """``sparsity.include_first/include_last`` left out (None: by the model) is True for a model named without a
    library prefix: the toolkit's own architectures, all CNNs (tests/test_vit.py checks it), and those registered
    with ``register_model``, whose first and last layers were sparse before the rule too. So their configs, saved
    and compared on resume, read true as they always did. A ``timm:``/``torchvision:`` model keeps None, decided
    when it is built (``sparse/masker.py``: ``sparsifiable``; a transformer's embedding and head stay dense).
    By the name alone: config does not import the models (tests/test_config.py)."""
    if ":" not in config.model.name:
        sparsity = config.sparsity
        sparsity.include_first = True if sparsity.include_first is None else sparsity.include_first
        sparsity.include_last = True if sparsity.include_last is None else sparsity.include_last


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved in a checkpoint (it is re-validated: a hand-edited checkpoint gets no pass)."""
    config = from_dict(TrainConfig, nest_flat_names(data), "")
    resolve_layer_ends(config)
    validate(config, machine=False)  # maybe written on another machine: its workers and batch need not fit here
    return config


def nest_flat_names(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with the earlier versions' sparsity names translated: the first versions' flat names
    (``sparsity.ast_densities``) moved into their method's section (``sparsity.ast.densities``), and renamed
    section fields given their new name (``sparsity.gse.candidates`` -> ``sparsity.gse.candidate_multiple``), so
    that old configs, sweep files and checkpoints still load. Applied to each source (file, override, saved
    config) before merging, so later sources still win; nothing reads the old names after this."""
    sparsity = data.get("sparsity") if isinstance(data, dict) else None
    if not isinstance(sparsity, dict):
        return data
    renamed = any(isinstance(sparsity.get(section), dict) and old in sparsity[section]
                  for section, old in RENAMED_SECTION_FIELDS)
    if not renamed and not any(key in FLAT_SPARSITY_NAMES for key in sparsity):
        return data
    nested = {key: value for key, value in sparsity.items() if key not in FLAT_SPARSITY_NAMES}
    for (section, old), new in RENAMED_SECTION_FIELDS.items():
        current = nested.get(section)
        if isinstance(current, dict) and old in current:
            if new in current:
                raise ConfigError(f"sparsity.{section}.{old} and sparsity.{section}.{new} are the same field: "
                                  "give one")
            nested[section] = {(new if key == old else key): value for key, value in current.items()}
    for key, value in sparsity.items():
        if key not in FLAT_SPARSITY_NAMES:
            continue
        section, name = FLAT_SPARSITY_NAMES[key]
        current = nested.get(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"sparsity.{section}: expected a mapping of fields, got {current!r}")
        if name in current:
            raise ConfigError(f"sparsity.{key} and sparsity.{section}.{name} are the same field: give one")
        nested[section] = {**current, name: value}
    return {**data, "sparsity": nested}


def save_config(config: TrainConfig, path: str | Path) -> None:
    write_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))

