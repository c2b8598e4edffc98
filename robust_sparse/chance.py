"""When a model has learned nothing: its accuracy is below chance (1 / number of classes) plus a margin.

One rule, read in three places: training stops a run whose validation accuracy stays there (the divergence rule,
``divergence.patience`` epochs in a row), ``robust-sparse train`` warns when a run ends there, and the sweep report
flags such runs, each with the margin the run was trained with (``divergence.chance_margin``). No imports: the
config schema takes its default from here.
"""

from __future__ import annotations

#: The default margin above chance (``divergence.chance_margin``): 2 points, above the noise of a few hundred
#: validation points around 1/classes.
CHANCE_MARGIN = 0.02


def chance_level(num_classes: int, margin: float = CHANCE_MARGIN) -> float:
    """The accuracy (a fraction) below which a model of ``num_classes`` classes counts as at chance."""
    return 1.0 / num_classes + margin


def at_chance(accuracy: float, num_classes: int, margin: float = CHANCE_MARGIN) -> bool:
    """Whether ``accuracy`` is at chance: below 1/``num_classes`` + ``margin``."""
    return accuracy < chance_level(num_classes, margin)
