"""Evaluation: clean and robust accuracy; installed as ``robust_sparse.eval``."""

from robust_sparse.eval.accuracy import RobustnessResult, evaluate_pgd, pgd_step_size, predict

__all__ = ["RobustnessResult", "evaluate_pgd", "pgd_step_size", "predict"]
