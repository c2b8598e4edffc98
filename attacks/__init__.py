"""Attacks over inputs in [0, 1]; installed as ``robust_sparse.attacks``."""

from robust_sparse.attacks.base import Attack, project
from robust_sparse.attacks.pgd import PGD
from robust_sparse.attacks.trades import TradesKL

__all__ = ["Attack", "PGD", "TradesKL", "project"]
