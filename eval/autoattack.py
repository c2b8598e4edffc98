"""AutoAttack (Croce & Hein, 2020, https://arxiv.org/abs/2003.01690) behind one small interface.

Reported AutoAttack numbers come from the original implementation, which exists with two APIs:

* the GitHub package ``autoattack`` (fra31/auto-attack, the commit RobustBench pins):
  ``AutoAttack(model, norm, eps, seed, verbose, attacks_to_run, version, is_tf_model, device, log_path)`` and
  ``run_standard_evaluation(x, y, bs=250) -> x_adv``; it prints its log to stdout;
* the PyPI package ``pyautoattack`` (0.2.0, what robustbench installs): keyword-only
  ``AutoAttack(model, *, attacks, device, eps, norm, seed, version)`` and
  ``run_standard_evaluation(x, y, /, *, batch_size, state_path) -> (x_adv, y_adv)``; it logs through
  ``logging`` (logger ``"auto-attack"``).

:class:`AutoAttackBackend` is the interface the evaluation runner uses: ``create`` builds the standard version
(APGD-CE, APGD-T with 9 targets, FAB-T with 9 targets, Square with 5000 queries, all at 100 iterations) with a
fixed seed, and ``attack`` runs *one* of its sub-attacks on a batch through ``run_standard_evaluation``, so
the runner can attack only the points still robust, save per-point flags after every batch and show progress.
Run batch by batch on the points the previous sub-attacks left robust, this is exactly the loop of
``run_standard_evaluation`` itself (each sub-attack re-seeds with the same seed on every batch), so the
accuracy equals that of the original called directly with the same seed and batch size (a test checks it).

``torchattacks.AutoAttack`` is not equivalent with its defaults (10 iterations instead of 100, ``n_classes-1``
targets, Square's rescaled schedule, a time-based seed): :func:`torchattacks_autoattack` builds it configured
to match, for cross-checks only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import io
import logging
import re
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from robust_sparse.errors import UserError

log = logging.getLogger(__name__)

#: The sub-attacks of AutoAttack's standard version, in the order it runs them.
STANDARD_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
#: Those that follow gradients; Square is black-box (score-based).
WHITE_BOX_ATTACKS = frozenset({"apgd-ce", "apgd-t", "fab-t"})

_NORMS = {"linf": "Linf", "l2": "L2"}
_NUMBER = re.compile(r"\d+")  # point counts in AutoAttack's warnings


def aa_norm(norm: str) -> str:
    """Our ``linf``/``l2`` as AutoAttack spells them."""
    try:
        return _NORMS[norm.lower()]
    except KeyError:
        raise UserError(f"AutoAttack supports the linf and l2 threat models, not {norm!r}") from None


class AutoAttackBackend(ABC):
    """The original AutoAttack through one of its two APIs. ``attack_class`` is that API's ``AutoAttack``."""

    name: str = "autoattack"

    def __init__(self, attack_class: type) -> None:
        self.attack_class = attack_class
        self.messages: list[str] = []  # warnings from AutoAttack's own checks (randomness, logits, ...)

    @abstractmethod
    def create(self, model: nn.Module, *, norm: str, eps: float, seed: int, device: torch.device | str) -> Any:
        """An AutoAttack object of the standard version for ``model`` (norm as ``"linf"``/``"l2"``)."""

    @abstractmethod
    def run(self, handle: Any, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int) -> torch.Tensor:
        """``handle.run_standard_evaluation`` with this API's arguments; returns the adversarial images."""

    def attack(self, handle: Any, sub_attack: str, images: torch.Tensor, labels: torch.Tensor,
               *, batch_size: int) -> torch.Tensor:
        """Run one standard sub-attack (``"apgd-ce"``, ...) with the standard version's settings."""
        if sub_attack not in STANDARD_ATTACKS:
            raise ValueError(f"unknown AutoAttack sub-attack {sub_attack!r}")
        # Both APIs read the list of attacks to run from this attribute at every call, and the standard
        # version's hyper-parameters (set in the constructor) stay as they are.
        handle.attacks_to_run = [sub_attack]
        return self.run(handle, images, labels, batch_size=batch_size)

    def _note(self, message: str) -> None:
        """Keep each distinct message once; those differing only in their numbers (AutoAttack's "there are N
        points with zero gradient!", once per call) once, with the largest numbers."""
        message = message.strip()
        if not message:
            return
        for index, kept in enumerate(self.messages):
            if _NUMBER.sub("#", kept) == _NUMBER.sub("#", message):
                if _numbers(message) > _numbers(kept):
                    self.messages[index] = message
                return
        self.messages.append(message)


def _numbers(message: str) -> list[int]:
    return [int(number) for number in _NUMBER.findall(message)]


class GitHubAutoAttack(AutoAttackBackend):
    """The GitHub API (``autoattack`` package, or robust-sparse's alias over pyautoattack)."""

    name = "autoattack (GitHub API)"

    def create(self, model, *, norm, eps, seed, device):
        return self.attack_class(model, norm=aa_norm(norm), eps=eps, seed=seed, verbose=False,
                                 version="standard", device=device, log_path=None)

    def run(self, handle, images, labels, *, batch_size):
        # The GitHub package prints (its check warnings included): route that text into logging instead.
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            result = handle.run_standard_evaluation(images, labels, bs=batch_size)
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.debug("autoattack: %s", line)
                if "warning" in line.lower():
                    self._note(line)
        return result[0] if isinstance(result, tuple) else result


class _Collect(logging.Handler):
    def __init__(self, sink) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink(record.getMessage())


class PyAutoAttack(AutoAttackBackend):
    """The PyPI API (``pyautoattack``)."""

    name = "pyautoattack"

    def create(self, model, *, norm, eps, seed, device):
        return self.attack_class(model, device=device, eps=eps, norm=aa_norm(norm), seed=seed, version="standard")

    def run(self, handle, images, labels, *, batch_size):
        handler = _Collect(self._note)
        logger = logging.getLogger("auto-attack")
        logger.addHandler(handler)
        try:
            adversarial, _ = handle.run_standard_evaluation(images, labels, batch_size=batch_size)
        finally:
            logger.removeHandler(handler)
        return adversarial


BACKENDS = ("auto", "pyautoattack", "github")


def select_backend(name: str = "auto") -> AutoAttackBackend:
    """``auto``: a genuine GitHub ``autoattack`` installation if there is one, else ``pyautoattack``.

    ``github`` takes ``autoattack`` through :func:`robust_sparse.environment.compat.import_autoattack`, which serves the
    GitHub API over pyautoattack when only the latter is installed.
    """
    if name not in BACKENDS:
        raise UserError(f"--autoattack-backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        # PathFinder sees installed packages only, not the alias finder robust_sparse appends to sys.meta_path.
        name = "github" if importlib.machinery.PathFinder.find_spec("autoattack") is not None else "pyautoattack"
    if name == "pyautoattack":
        try:
            module = importlib.import_module("pyautoattack")
        except ImportError:
            raise UserError("AutoAttack is not installed: pip install pyautoattack (or run robust-sparse doctor)") \
                from None
        return PyAutoAttack(module.AutoAttack)
    from robust_sparse.environment.compat import import_autoattack

    return GitHubAutoAttack(import_autoattack().AutoAttack)


def torchattacks_autoattack(model: nn.Module, *, norm: str, eps: float, n_classes: int, seed: int):
    """``torchattacks.AutoAttack`` configured like the original standard version.

    Its defaults differ in three ways (torchattacks 3.5.1): APGD, APGD-T and FAB run 10 iterations (100 in the
    original), APGD-T and FAB-T attack ``n_classes - 1`` targets (9 in the original), and Square uses the
    rescaled p-schedule (``resc_schedule=False`` in the original). The seed is fixed here (the default is
    ``time.time()``).
    """
    import torchattacks

    attack = torchattacks.AutoAttack(model, norm=aa_norm(norm), eps=eps, version="standard",
                                     n_classes=n_classes, seed=seed)
    parts = attack._autoattack.attacks
    kinds = (torchattacks.APGD, torchattacks.APGDT, torchattacks.FAB, torchattacks.Square)
    if len(parts) != 4 or not all(isinstance(p, k) for p, k in zip(parts, kinds)):
        raise RuntimeError("torchattacks.AutoAttack no longer has the APGD/APGDT/FAB/Square layout of 3.5.1")
    apgd, apgd_t, fab, square = parts
    for part in (apgd, apgd_t, fab):
        part.steps = 100
    apgd_t.n_target_classes = fab.n_target_classes = min(9, n_classes - 1)
    square.rescale_schedule = False
    return attack
