"""Attack specifications: the names ``robust-sparse eval --attacks`` accepts, parsed without ``eval``.

===================  =====================================================================================
``fgsm``             one full step (Goodfellow et al.)
``pgd[-K[xR]]``      PGD on the cross-entropy, K steps of 2.5*eps/K from a random start, R restarts; a
                     point is robust only if no restart fools it (BSR-Net/AGENT: ``pgd-50x10``)
``cw[-K[xR]]``       the same PGD on the Carlini-Wagner margin loss (CW-inf)
``autoattack``       AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (original implementation)
``apgd-ce`` ...      one sub-attack of AutoAttack standard alone: ``apgd-ce``, ``apgd-t``, ``fab-t``,
                     ``square``
``torchattacks-aa``  ``torchattacks.AutoAttack`` configured like the original (cross-checks only)
===================  =====================================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from robust_sparse.errors import UserError
from robust_sparse.eval.autoattack import STANDARD_ATTACKS, WHITE_BOX_ATTACKS

#: Kinds that take ``-K`` / ``-KxR``.
ITERATIVE = ("pgd", "cw")
SIMPLE = ("fgsm", "autoattack", *STANDARD_ATTACKS, "torchattacks-aa")
_ITERATIVE_PATTERN = re.compile(r"^(pgd|cw)(?:-(\d+)(?:x(\d+))?)?$")
_LABELS = {"fgsm": "FGSM", "autoattack": "AutoAttack", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T",
           "fab-t": "FAB-T", "square": "Square", "torchattacks-aa": "torchattacks-AA"}
HELP = "fgsm, pgd[-K[xR]], cw[-K[xR]], autoattack, apgd-ce, apgd-t, fab-t, square, torchattacks-aa"


@dataclass(frozen=True)
class AttackSpec:
    kind: str
    steps: int = 0  # pgd/cw only
    restarts: int = 1  # pgd/cw only

    @property
    def key(self) -> str:
        """Canonical spelling, e.g. ``pgd-50x10``; used in file names and as the results key."""
        return f"{self.kind}-{self.steps}x{self.restarts}" if self.kind in ITERATIVE else self.kind

    @property
    def label(self) -> str:
        """Display name, e.g. ``PGD-50x10``, ``AutoAttack``."""
        if self.kind in ITERATIVE:
            return f"{self.kind.upper()}-{self.steps}x{self.restarts}"
        return _LABELS[self.kind]

    @property
    def units(self) -> tuple[str, ...]:
        """The runs a point goes through, each only on the points the previous ones left robust."""
        if self.kind in ITERATIVE:
            return tuple(f"restart {r + 1}" for r in range(self.restarts))
        if self.kind == "autoattack":
            return STANDARD_ATTACKS
        return (self.kind,)

    def unit_is_white_box(self, unit: str) -> bool:
        if self.kind == "autoattack":
            return unit in WHITE_BOX_ATTACKS
        return self.kind != "square"


def parse_attack(text: str, *, default_steps: int = 50, default_restarts: int = 10) -> AttackSpec:
    """``"pgd-50x10"`` -> ``AttackSpec("pgd", 50, 10)``; bare ``pgd`` takes the defaults, bare ``cw`` one restart."""
    name = text.strip().lower()
    match = _ITERATIVE_PATTERN.match(name)
    if match:
        kind, steps, restarts = match.group(1), match.group(2), match.group(3)
        steps_value = int(steps) if steps else default_steps
        restarts_value = int(restarts) if restarts else (default_restarts if kind == "pgd" and not steps else 1)
        if steps_value < 1 or restarts_value < 1:
            raise UserError(f"attack {text!r}: steps and restarts must be >= 1")
        return AttackSpec(kind, steps_value, restarts_value)
    if name in SIMPLE:
        return AttackSpec(name)
    raise UserError(f"unknown attack {text.strip()!r}; choose from: {HELP}")


def parse_attacks(texts: str | Iterable[str], *, default_steps: int = 50, default_restarts: int = 10) -> list[AttackSpec]:
    """A comma-separated list (or several), in order, without duplicates."""
    items = [texts] if isinstance(texts, str) else list(texts)
    specs: list[AttackSpec] = []
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            spec = parse_attack(part, default_steps=default_steps, default_restarts=default_restarts)
            if spec in specs:
                raise UserError(f"attack {spec.key!r} is listed twice")
            specs.append(spec)
    return specs
