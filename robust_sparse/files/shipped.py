"""The configs that ship with the package: the repository's ``configs/`` folder, installed as the package data
``robust_sparse.configs``, so that an installed wheel can run them by name.

A name is the file's path under ``configs/`` without ``.yaml``: ``cifar10_pgdat_resnet18``,
``papers/bsrnet_vgg16_cifar10_pgdat``, ``studies/engines_mnist5k``. Wherever a config file is accepted, an existing
path wins; otherwise the value is looked up as a name, written bare, as ``configs:NAME``, or as the documentation
spells it (``configs/NAME.yaml``). A file's description is its first comment line.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import yaml

from robust_sparse.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "configs:"
QUICKSTART = "quickstart_mnist5k"  # what `robust-sparse train` runs with no CONFIG


class Kind(str, Enum):
    """What a shipped YAML file is, told by its keys; each kind has the command that runs it."""

    TRAIN = "train"
    SWEEP = "sweep"

    @property
    def command(self) -> str:
        return f"robust-sparse {self.value}"

    @property
    def label(self) -> str:
        return "training config" if self is Kind.TRAIN else "sweep file"


# Keys of a sweep file that no training config has (robust_sparse.studies.sweep.Sweep against TrainConfig; named
# here rather than read from Sweep, which sits above this module)
_SWEEP_KEYS = frozenset({"base", "overrides", "grid", "random"})


@dataclass(frozen=True)
class ShippedConfig:
    name: str
    path: Path
    kind: Kind
    description: str


def folder() -> Path:
    """Where the shipped configs are: the package data of an installed wheel, or the checkout's configs/."""
    package = Path(__file__).resolve().parents[1]
    if (package / "configs").is_dir():  # a wheel's robust_sparse/configs
        return package / "configs"
    # An editable install: setuptools' editable finder cannot import a folder without __init__.py inside a regular
    # package, so the mapping is not visible through imports; the checkout has the folder beside the package.
    return package.parent / "configs"


def path_of(name: str) -> Path:
    """The file of a shipped config by its exact name (whether or not it exists)."""
    return folder() / f"{name}.yaml"


def name_of(value: str) -> str:
    """``configs:NAME``, ``configs/NAME.yaml`` and ``NAME.yaml`` all name ``NAME``."""
    text = value.removeprefix(PREFIX).replace("\\", "/").removeprefix("./").removeprefix("configs/")
    return text.removesuffix(".yaml")


def _read(path: Path) -> tuple[Kind, str]:
    """(kind, description) of one file: its keys tell a sweep from a training config."""
    text = path.read_text(encoding="utf-8")
    description = ""
    for line in text.splitlines():
        if line.strip():  # the first non-blank line is the header comment, or there is none
            description = line.strip().lstrip("#").strip() if line.lstrip().startswith("#") else ""
            break
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:  # listed all the same; loading it names the error
        data = None
    kind = Kind.SWEEP if isinstance(data, dict) and _SWEEP_KEYS & set(data) else Kind.TRAIN
    return kind, description


def shipped() -> list[ShippedConfig]:
    """Every shipped config, the top-level ones first, then each subfolder's, by name."""
    root = folder()
    found = []
    for path in root.rglob("*.yaml") if root.is_dir() else []:
        name = path.relative_to(root).with_suffix("").as_posix()
        found.append(ShippedConfig(name, path, *_read(path)))
    return sorted(found, key=lambda c: ("/" in c.name, c.name))


def table(configs: list[ShippedConfig]) -> str:
    """NAME, KIND and DESCRIPTION columns, plain text."""
    width = max([len("NAME"), *(len(c.name) for c in configs)])
    rows = [f"{'NAME':<{width}}  KIND   DESCRIPTION"]
    rows += [f"{c.name:<{width}}  {c.kind.value:<5}  {c.description}" for c in configs]
    return "\n".join(rows)


def resolve(value: str | Path, argument: str, kind: Kind = Kind.TRAIN) -> Path:
    """The file a config argument means: an existing path as given, else the shipped config of that name
    (:func:`lookup`)."""
    text = str(value)
    if not text.startswith(PREFIX) and Path(text).exists():
        return Path(text)
    path = lookup(text, argument, kind)
    log.info("%s: %s is the shipped config %s", argument, text, path)
    return path


def lookup(value: str, argument: str, kind: Kind | None = None, tried: Path | None = None) -> Path:
    """The shipped config that ``value`` names, of ``kind`` (None: either). An unknown name, or a shipped file of
    the other kind (a sweep given to train), is a one-line ConfigError naming ``argument`` (and the file ``tried``
    first, when it is not ``value`` itself) and the names there are."""
    name = name_of(value)
    if not name.strip():
        raise ConfigError(f"{argument}: must not be empty (give a shipped config's name: robust-sparse configs)")
    path = path_of(name)
    root = folder()
    if path.resolve().is_relative_to(root.resolve()) and path.is_file():  # "../x" names no shipped file
        found, _ = _read(path)
        if kind is not None and found != kind:
            raise ConfigError(f"{argument}: {name} is a shipped {found.label}, not a {kind.label}; run it with "
                              f"{found.command} {name}")
        return path
    names = [c.name for c in shipped() if kind is None or c.kind == kind]
    what = kind.label if kind is not None else "config"
    file = tried if tried is not None else value
    if not names:
        raise ConfigError(f"{argument}: {value} not found: no file {file}, and no shipped configs in {root} "
                          "(reinstall robust-sparse)")
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"{argument}: {value} not found: no file {file}, nor a shipped {what} of that name{hint}; "
                      f"shipped: {', '.join(names)} (robust-sparse configs describes them)")
