"""The settings of one ``robust-sparse eval``, and of a sweep's evaluation stage: :class:`EvalConfig`.

It is read by the training config's parser (:mod:`robust_sparse.config.parsing`): defaults, then a YAML file
(``eval --config FILE``), then the command's flags, then ``--set key=value`` overrides; the flags are only other
spellings of its fields (``--batch-size 8`` is ``batch_size: 8``). Every rule is written once, in
:func:`validate_eval` (values alone, raised before anything is read) and :func:`check_eval` (what the values name:
an export's protocol, a zoo entry, the output paths); the radius rule is
:func:`robust_sparse.config.validation.check_radius`, the attack syntax :func:`robust_sparse.eval.specs.parse_attacks`.
Errors are one line naming the field as the user gave it: ``batch_size = 0`` from a file or ``--set``,
``--batch-size 0`` from a flag, ``sweep eval.batch_size = 0`` from a sweep file (:class:`Names`).

Lists (``eps``, ``seeds``, ``corruptions``, ``severities``) may also be written as one value or comma-separated
(``--eps 2/255,4/255``, ``seeds: 0,1,2``); ``attacks`` is a comma-separated text or a list of names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Sequence

from robust_sparse.config import DeviceChoice, from_dict, merge, parse_override, read_yaml
from robust_sparse.config.validation import (MAX_BATCH, MAX_EXAMPLES, MAX_SEED, MAX_STEPS, check_batch_memory,
                                             check_radius)
from robust_sparse.config.yaml_input import load_yaml
from robust_sparse.errors import ConfigError, UserError

DEFAULT_ATTACKS = "pgd,autoattack"
MAX_SUBNET = 10_000
# Every radius and every seed is a full evaluation of its own (one row each): lists past these are a pasted range
# that would run for weeks, not a study.
MAX_RADII = 100
MAX_SEEDS = 1_000


class ThreatModel(str, Enum):
    """The threat model; RobustBench spells them ``Linf`` and ``L2``, so any case is accepted."""

    LINF = "linf"
    L2 = "l2"
    CORRUPTIONS = "corruptions"  # CIFAR-10-C/CIFAR-100-C/ImageNet-C (robust_sparse.eval.corruptions)

    @classmethod
    def _missing_(cls, value: object) -> "ThreatModel | None":
        if isinstance(value, str):
            return next((member for member in cls if member.value == value.strip().lower()), None)
        return None


class BackendChoice(str, Enum):
    """The original AutoAttack's API (robust_sparse.eval.autoattack.select_backend)."""

    AUTO = "auto"
    PYAUTOATTACK = "pyautoattack"
    GITHUB = "github"


@dataclass
class EvalConfig:
    """One evaluation. None: the checkpoint's value where it carries one, else the protocol's default."""

    # the model: exactly one of checkpoint, robustbench_model, arch (with weights) and model
    checkpoint: str | None = None  # a best.pt/last.pt written by robust-sparse train
    subnet: int | None = None  # AST checkpoints: one sub-net (0 = the densest); None: every sub-net, one row each
    robustbench_model: str | None = None  # a RobustBench zoo entry, e.g. Standard
    model_dir: str = "models"  # RobustBench weights, <dir>/<dataset>/<Linf|L2>/<NAME>.pt
    arch: str | None = None  # an architecture of the registry, for weights
    model: str | None = None  # FILE.py:FACTORY, package.module:FACTORY, torchvision:NAME or timm:NAME
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of model's factory
    weights: str | None = None  # a state_dict file for arch or model (loaded with weights_only=True)
    weights_key: str | None = None  # the state_dict's key inside the weights file
    name: str | None = None  # the model's name in the results
    # the test points: the first n_examples of the test split, in order
    dataset: str | None = None  # a registered dataset's name (robust_sparse/datasets/)
    n_examples: int | None = None
    data_root: str | None = None
    data_file: str | None = None  # a torch file {'images', 'labels'} instead of the test split
    download: bool = False
    # the protocol
    threat_model: ThreatModel | None = None
    eps: list[float] | None = None  # one row per radius
    attacks: str | None = None  # comma-separated, run in order; None: pgd,autoattack
    pgd_steps: int | None = None  # of a bare "pgd" (default: the run's, else 50)
    restarts: int | None = None  # of a bare "pgd" (default: the run's, else 10)
    probe: bool = True  # the large-eps gradient-masking probe
    large_eps: float | None = None  # the probe's radius; None: sanity.default_large_eps
    corruptions: list[str] | None = None  # threat_model corruptions; None: RobustBench's 15
    severities: list[int] | None = None  # threat_model corruptions; None: 1-5
    # the run
    seeds: list[int] = field(default_factory=lambda: [0])  # the attacks' seeds: every attack runs once per seed
    batch_size: int = 500
    chained: bool = False  # attack only the points every previous attack left robust
    autoattack_backend: BackendChoice = BackendChoice.AUTO
    cross_check: bool = False  # also torchattacks.AutoAttack configured to match, and the difference
    device: DeviceChoice = DeviceChoice.AUTO
    resume: bool = True  # False: discard saved per-point flags
    progress: bool = True
    results_dir: str | None = None  # None: <run dir>/eval for a checkpoint, else runs/eval
    output: str | None = None  # also write the rows here as JSON

    @property
    def corruptions_track(self) -> bool:
        return self.threat_model is ThreatModel.CORRUPTIONS


#: Fields that may be written as one value or a comma-separated text instead of a list.
LIST_FIELDS = ("eps", "seeds", "corruptions", "severities")


@dataclass(frozen=True)
class Names:
    """How errors name a field: as a config spells it (``prefix`` + field: ``batch_size = 0``, ``sweep
    eval.batch_size = 0``), or as the flag its value came from (``flags``: field -> flag: ``--batch-size 0``)."""

    prefix: str = ""
    flags: Mapping[str, str] = field(default_factory=dict)
    keys: Mapping[str, str] = field(default_factory=dict)  # field -> the key a file spells it with, where other

    def __call__(self, where: str) -> str:
        """The name of a field path (list items keep their ``[i]``)."""
        base, bracket, rest = where.partition("[")
        return (self.flags.get(base) or f"{self.prefix}{self.keys.get(base, base)}") + (bracket + rest if bracket else "")

    def value(self, name: str, value: Any) -> str:
        """``--flag value`` or ``field = value``: the subject of a rule's message."""
        return f"{self.flags[name]} {value}" if name in self.flags else f"{self(name)} = {value}"


def _listed(value: Any, where: str) -> Any:
    """One value or a comma-separated text as a list, each part read as YAML (``0,1`` -> [0, 1])."""
    if isinstance(value, str):
        return [load_yaml(part, where, if_invalid=part.strip()) for part in value.split(",") if part.strip()]
    if value is None or isinstance(value, list):
        return value
    return [value]


def normalise(data: dict[str, Any], names: Names) -> dict[str, Any]:
    """``data`` with lists written as one value or comma-separated text made lists, and a list of attacks joined."""
    data = dict(data)
    for key in LIST_FIELDS:
        if key in data:
            data[key] = _listed(data[key], names(key))
    if isinstance(data.get("attacks"), list):
        data["attacks"] = ",".join(map(str, data["attacks"]))
    return data


def eval_config_from_dict(data: dict[str, Any], names: Names = Names()) -> EvalConfig:
    """``data`` (YAML values) as a validated EvalConfig."""
    config = from_dict(EvalConfig, normalise(data, names), "", names)
    validate_eval(config, names)
    return config


def load_eval_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                     flags: Mapping[str, Any] | None = None,
                     spellings: Mapping[str, str] | None = None) -> tuple[EvalConfig, Names]:
    """Defaults, then the YAML file, then ``flags`` (field -> value, from a command's flags), then ``key=value``
    overrides; validated. ``spellings``: field -> flag, how errors name a field whose value did not come from the
    file or an override (``--batch-size 0``). Returns the config and those names (for :func:`check_eval`)."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    spelled = dict(spellings or {})
    for key in data:
        if key not in (flags or {}):
            spelled.pop(key, None)  # a value from the file is named as its field
    data.update(flags or {})
    for text in overrides:
        update = parse_override(text)
        for key in update:
            spelled.pop(key, None)  # --set wins over a flag, and is named as a field
        data = merge(data, update)
    names = Names(flags=spelled)
    return eval_config_from_dict(data, names), names


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_eval(config: EvalConfig, names: Names = Names()) -> None:
    """The values alone: nothing is read. What they name is checked by :func:`check_eval`."""
    from robust_sparse.eval.specs import names_help, parse_attacks

    sources = {"checkpoint": config.checkpoint, "robustbench_model": config.robustbench_model, "arch": config.arch,
               "model": config.model}
    chosen = [names(key) for key, value in sources.items() if value is not None]
    _check(len(chosen) == 1, "eval needs exactly one model: a CHECKPOINT, --robustbench-model NAME, --arch NAME "
           "--weights PATH, or --model FILE.py:FACTORY [--weights PATH]"
           + (f" (got {' and '.join(chosen)})" if chosen else ""))
    _check(config.arch is None or config.weights is not None,
           f"{names('arch')} needs {names('weights')} PATH (a state_dict for that architecture)")
    _check(config.weights is None or config.arch is not None or config.model is not None,
           f"{names('weights')} goes with {names('arch')} NAME or {names('model')} FILE.py:FACTORY")
    _check(config.weights_key is None or config.weights is not None,
           f"{names('weights_key')} needs {names('weights')}")
    _check(config.subnet is None or config.checkpoint is not None,
           f"{names('subnet')} is for AST checkpoints written by robust-sparse train")
    _check(not config.model_kwargs or config.model is not None, f"{names('model_kwargs')} goes with {names('model')}")
    if config.model is not None:
        from robust_sparse.eval.sources import parse_factory

        parse_factory(config.model)
    if config.dataset is not None:
        from robust_sparse.datasets import DATASETS

        _check(config.dataset in DATASETS,
               f"{names('dataset')}: {config.dataset!r} is not one of {', '.join(DATASETS.names())}")
        _check(DATASETS.get(config.dataset).num_classes != 0,  # imagefolder: any class count
               f"{names.value('dataset', config.dataset)}: evaluate a CHECKPOINT trained on it (its config names "
               "the classes)")
    for key, value, low, high in (("batch_size", config.batch_size, 1, MAX_BATCH),
                                  ("pgd_steps", config.pgd_steps, 1, MAX_STEPS),
                                  ("restarts", config.restarts, 1, MAX_STEPS),
                                  ("n_examples", config.n_examples, 1, MAX_EXAMPLES),
                                  ("subnet", config.subnet, 0, MAX_SUBNET)):
        _check(value is None or low <= value <= high, f"{names.value(key, value)}: must be in {low}..{high}")
    _check(bool(config.seeds), f"{names('seeds')}: give at least one seed, e.g. 0")
    _check(len(config.seeds) <= MAX_SEEDS, f"{names('seeds')}: {len(config.seeds)} seeds; give at most {MAX_SEEDS}")
    for seed in config.seeds:
        _check(0 <= seed <= MAX_SEED, f"{names.value('seeds', seed)}: must be in 0..{MAX_SEED}")
    _check(len(set(config.seeds)) == len(config.seeds), f"{names.value('seeds', config.seeds)}: a seed is listed twice")
    _check(not (config.chained and config.cross_check),
           f"{names('cross_check')} compares standalone attacks: drop {names('chained')}")
    _check(config.large_eps is None or config.probe,
           f"{names('large_eps')} and {names('probe')} contradict each other")
    if config.large_eps is not None:
        check_radius(names.value("large_eps", config.large_eps), config.large_eps, None, positive=True)
    if config.corruptions_track:
        given = [names(key) for key in ("eps", "attacks", "large_eps", "chained", "cross_check")
                 if getattr(config, key) not in (None, False)]
        _check(not given, f"{names.value('threat_model', 'corruptions')} has no radius or attacks: drop "
               f"{', '.join(given)}")
        _check(len(config.seeds) == 1,
               f"{names.value('threat_model', 'corruptions')} has no random starts: give one seed")
        from robust_sparse.eval.corruptions import parse_corruptions, parse_severities

        try:
            parse_corruptions(None if config.corruptions is None else ",".join(config.corruptions))
            parse_severities(None if config.severities is None else ",".join(map(str, config.severities)))
        except UserError as error:
            text = str(error)
            for key in ("corruptions", "severities"):  # the parsers speak of the flags
                text = text.replace(f"--{key}", names(key))
            raise ConfigError(text) from None
        return
    _check(config.corruptions is None and config.severities is None,
           f"{names('corruptions')} and {names('severities')} go with {names.value('threat_model', 'corruptions')}")
    if config.eps is not None:
        _check(bool(config.eps), f"{names('eps')}: give at least one radius, e.g. 8/255")
        _check(len(config.eps) <= MAX_RADII, f"{names('eps')}: {len(config.eps)} radii; give at most {MAX_RADII}")
        norm = config.threat_model.value if config.threat_model is not None else None
        for eps in config.eps:  # without a threat model the checkpoint's norm decides: checked again then
            check_radius(names.value("eps", f"{eps:.4g}"), eps, norm)
    text = DEFAULT_ATTACKS if config.attacks is None else config.attacks
    try:  # names and parameters checked now; the checkpoint's defaults fill in a bare pgd later
        parsed = parse_attacks(text)
    except ConfigError:
        raise
    except UserError as error:
        raise ConfigError(f"{names('attacks')}: {error}") from None
    _check(bool(parsed), f"{names.value('attacks', repr(text))}: names no attack; give a comma-separated list, e.g. "
           f"pgd,autoattack (choose from: {names_help()})")


def check_eval(config: EvalConfig, names: Names = Names()) -> EvalConfig:
    """What the values name, read cheaply before any model or data: an exported model's protocol (its dataset
    fills in ``dataset``), the zoo entry, the output file and the results store. Returns the completed config."""
    from robust_sparse.files import rundir
    import robust_sparse.eval.points as points
    import robust_sparse.eval.sources as sources

    dataset = config.dataset
    exported = sources.exported_protocol(config.weights) if config.arch is not None else None
    if dataset is None and exported is not None:  # an exported model carries its run's protocol
        dataset = points.parse_dataset(exported["dataset"])
    _check(dataset is not None or config.checkpoint is not None,
           f"{names('dataset')} is required with {names('robustbench_model')}, {names('arch')} and {names('model')}")
    if dataset is not None:  # (a checkpoint names its dataset only once it is read: there, the range alone holds)
        from robust_sparse.datasets import DATASETS

        info = DATASETS.get(dataset)
        check_batch_memory(names.value("batch_size", config.batch_size), config.batch_size, info.in_channels,
                           info.image_size, f"{dataset}'s {info.image_size}x{info.image_size} images")
    if config.robustbench_model is not None:  # the corruptions track takes L-inf zoo entries
        norm = ThreatModel.LINF if config.corruptions_track else config.threat_model or ThreatModel.LINF
        sources.check_robustbench_name(config.robustbench_model, dataset, norm.value)
    if config.output is not None:  # writable now, not after an hour of attacks
        rundir.check_output_file(config.output, names("output"))
    if config.results_dir is not None:
        rundir.check_owned(config.results_dir, rundir.Kind.EVAL, names("results_dir"))
    return dataclasses.replace(config, dataset=dataset)
