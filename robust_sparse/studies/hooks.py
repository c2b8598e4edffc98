"""Per-study hooks: what one kind of study adds to the generic sweep report (robust_sparse.studies.report).

The report itself knows runs, grid keys, accuracies, costs, paired differences and the evaluation stage, and
names no config key of any method. A study whose runs log more (AGENT's γ, c_t and cosine: robust_sparse.studies.
agent_gamma) registers a :class:`StudyHook`: the columns it reads from each run, the flags a reader must see
first, the setting its paired differences default to, and its own report sections. A hook whose columns are
absent from a sweep adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import pandas as pd


class Place(str, Enum):
    """Where in the report a hook's section goes."""

    AFTER_TABLES = "after tables"  # after the accuracy, paired and evaluation-stage tables
    AFTER_CONVERGENCE = "after convergence"  # after the epochs-to-accuracy table and the convergence figure


@dataclass(frozen=True)
class Context:
    """What a hook's section may use: the report's frames and the report's own ways to show a figure and to take
    paired differences (so that a hook draws and compares exactly as the generic sections do)."""

    runs: pd.DataFrame  # one row per run (robust_sparse.studies.report.collect)
    curves: pd.DataFrame  # one row per run and epoch (its metrics.csv); empty without any
    table: pd.DataFrame  # mean ± std over seeds per setting (report.aggregate)
    keys: list[str]  # the grid keys but seed
    labels: dict[str, str]  # metric -> axis label
    reference: dict[str, Any] | None  # report --reference, None: the hooks' default (:func:`default_reference`)
    out: Path  # the report folder
    steps: pd.DataFrame | None  # epochs to each validation accuracy (report.epochs_to_accuracy); None without curves
    figure: Callable[..., list[str]]  # (figure, out, name, heading, text) -> the report's lines that show it
    markdown: Callable[[pd.DataFrame], str]  # a frame as the report's Markdown table
    paired: Callable[[dict[str, Any] | None], pd.DataFrame]  # the paired table against a reference


def _none(*_: Any) -> Any:
    return None


@dataclass(frozen=True)
class StudyHook:
    """One study's part of the report. Every callable gets what it names and returns nothing to add when the
    sweep is not of its kind."""

    name: str
    prefixes: tuple[str, ...] = ()  # the columns it adds to a run start with one: never grid keys
    averaged: tuple[str, ...] = ()  # its run columns averaged over seeds in summary.csv (mean, std)
    ranges: tuple[tuple[str, str], ...] = ()  # (min column, max column) pairs: min and max over seeds
    run_columns: Callable[[Path, pd.DataFrame], dict[str, Any]] = lambda run_dir, metrics: {}
    flags: Callable[[pd.DataFrame], list[str]] = lambda runs: []
    reference: Callable[[pd.DataFrame], dict[str, Any] | None] = _none  # the paired comparison's default
    sections: dict[Place, Callable[[Context], list[str]]] = field(default_factory=dict)


_HOOKS: dict[str, StudyHook] = {}


def register(hook: StudyHook) -> StudyHook:
    """Add ``hook`` to every report (again under the same name: replaced)."""
    _HOOKS[hook.name] = hook
    return hook


def unregister(name: str) -> None:
    """Remove the hook registered as ``name`` (none: nothing to do)."""
    _HOOKS.pop(name, None)


def hooks() -> list[StudyHook]:
    """The registered hooks, in the order they were registered."""
    return list(_HOOKS.values())


def default_reference(runs: pd.DataFrame) -> dict[str, Any] | None:
    """The first hook's default reference setting the runs have; None: no paired section unless one is given."""
    for hook in hooks():
        reference = hook.reference(runs)
        if reference:
            return reference
    return None
