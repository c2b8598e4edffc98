"""Evaluation: clean, PGD, FGSM, CW and AutoAttack accuracy with per-point flags; installed as ``robust_sparse.eval``.

* :func:`evaluate` (``runner``): a model, [0,1] images, labels and a list of attacks -> per-point flags per
  attack and the pointwise worst case (an :class:`Evaluation`, ``evaluation``), resumable from saved flags;
* ``specs``: the attack names (``pgd-50x10``, ``autoattack``, ...); ``autoattack``: the original AutoAttack
  behind one interface with adapters for its GitHub and PyPI APIs;
* ``sources``: where models come from (robust-sparse checkpoints, plain state_dicts, ``--model`` factories,
  RobustBench zoo models) and what a loaded model is (fingerprint, sparsity); ``points``: the protocol's inputs
  (dataset and threat-model names, the protocol radius, the test points);
* ``config``: :class:`EvalConfig`, the settings of ``robust-sparse eval`` and of a sweep's evaluation stage, with
  its rules; ``job``: the command on that config; ``spread``: the spread over attack seeds;
* ``sanity``: gradient-masking checks; ``store``: the results store (and a model card's rows of it);
  ``leaderboard``/``report``: comparison with published numbers, Markdown and plots.

:func:`evaluate_pgd` (re-exported from the core module :mod:`robust_sparse.accuracy`) is the short clean + PGD
evaluation used during training; training itself imports nothing from this package.
"""

from robust_sparse.accuracy import RobustnessResult, evaluate_pgd, pgd_step_size, predict
from robust_sparse.eval.config import EvalConfig
from robust_sparse.eval.evaluation import AttackOutcome, Evaluation
from robust_sparse.eval.runner import check_inputs, evaluate
from robust_sparse.eval.specs import AttackSpec, parse_attack, parse_attacks

__all__ = [
    "AttackOutcome", "AttackSpec", "EvalConfig", "Evaluation", "RobustnessResult", "check_inputs", "evaluate", "evaluate_pgd",
    "parse_attack", "parse_attacks", "pgd_step_size", "predict",
]
