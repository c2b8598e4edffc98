"""Attacks over inputs in [0, 1]; installed as ``robust_sparse.attacks``."""

from robust_sparse.attacks.base import Attack, project
from robust_sparse.attacks.cw import CW, margin_loss
from robust_sparse.attacks.fgsm import FGSM
from robust_sparse.attacks.pgd import PGD
from robust_sparse.attacks.trades import TradesKL

__all__ = ["Attack", "CW", "FGSM", "PGD", "TradesKL", "margin_loss", "project"]
