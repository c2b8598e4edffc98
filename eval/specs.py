"""The attack registry: every name ``robust-sparse eval --attacks``, :func:`evaluate` and a sweep's ``eval`` stage
accept, how its spelling parses (``pgd-50x10``, without ``eval``) and how the runner builds it.

===================  =====================================================================================
``fgsm``             one full step (Goodfellow et al.)
``pgd[-K[xR]]``      PGD on the cross-entropy, K steps of 2.5*eps/K from a random start, R restarts; a
                     point is robust only if no restart fools it (BSR-Net/AGENT: ``pgd-50x10``)
``cw[-K[xR]]``       the same PGD on the Carlini-Wagner margin loss (CW-inf)
``...:step=S``       pgd and cw: step size S in pixel units (``2/255``, ``0.01``) instead of 2.5*eps/K
``...:start=zero``   pgd and cw: from the clean point instead of a random start (deterministic: one restart)
``autoattack``       AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (original implementation)
``apgd-ce`` ...      one sub-attack of AutoAttack standard alone: ``apgd-ce``, ``apgd-t``, ``fab-t``,
                     ``square``
``torchattacks-aa``  ``torchattacks.AutoAttack`` configured like the original (cross-checks only)
===================  =====================================================================================

Each name is an :class:`AttackKind` in :data:`ATTACKS`; :func:`register_attack` adds one from Python (exported
as ``robust_sparse.register_attack``). The runner (:mod:`robust_sparse.eval.runner`) only asks a kind for its
units and builds each through it; the CLI's ``--attacks`` help lists :func:`names_help`. A new process knows the
attacks of the modules named in ``$ROBUST_SPARSE_PLUGINS`` (:mod:`robust_sparse.plugins`; imported on first
need); a sweep sets it for its evaluation processes.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass
import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from robust_sparse.attacks import CW, FGSM, PGD, Attack
from robust_sparse.accuracy import pgd_step_size
from robust_sparse import plugins
from robust_sparse.errors import UserError
from robust_sparse.eval.autoattack import (STANDARD_ATTACKS, WHITE_BOX_ATTACKS, AutoAttackBackend, select_backend,
                                           torchattacks_autoattack)
from robust_sparse.registry import Registry

log = logging.getLogger(__name__)

#: Images, labels -> adversarial images: what one unit of an attack is, once built.
AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_NAME = re.compile(r"[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*")
_STEPS_SUFFIX = re.compile(r"(.+?)-(\d+)(?:x(\d+))?")


class AttackContext:
    """What the runner gives a kind's builder: the model and threat model of one evaluation, and the original
    AutoAttack, created once (on first use) and shared by every AutoAttack unit of the evaluation."""

    def __init__(self, model: nn.Module, *, norm: str, eps: float, seed: int, device: torch.device,
                 num_classes: int | None, backend_name: str = "auto",
                 backend: AutoAttackBackend | None = None) -> None:
        self.model, self.norm, self.eps, self.seed, self.device = model, norm, eps, seed, device
        self.num_classes, self.backend_name, self._backend = num_classes, backend_name, backend
        self._autoattack: Any = None

    @property
    def backend(self) -> AutoAttackBackend:
        if self._backend is None:
            self._backend = select_backend(self.backend_name)
        return self._backend

    @property
    def backend_used(self) -> AutoAttackBackend | None:
        """The AutoAttack backend if one was selected (an evaluation without AutoAttack never imports it)."""
        return self._backend

    def autoattack_unit(self, sub_attack: str) -> AttackFn:
        if self._autoattack is None:
            self._autoattack = self.backend.create(self.model, norm=self.norm, eps=self.eps, seed=self.seed,
                                                   device=self.device)
        backend, handle = self.backend, self._autoattack
        # One call per batch with bs = the batch: the loop of AutoAttack's own run_standard_evaluation
        return lambda images, labels: backend.attack(handle, sub_attack, images, labels, batch_size=len(images))


@dataclass(frozen=True)
class AttackKind:
    """One name of the registry.

    ``build(context, spec, unit)`` returns the unit's attack (images, labels -> adversarial images). An
    ``iterative`` kind takes ``-K[xR]``: K steps and R restarts, one unit per restart; other kinds run
    ``units`` in order (default: one unit, the name), each on the points the previous ones left robust.
    """

    name: str
    label: str  # display name; an iterative kind's is upper-cased with -KxR
    build: Callable[[AttackContext, "AttackSpec", str], AttackFn]
    iterative: bool = False
    bare_restarts: bool = False  # a bare iterative name takes the default restarts (pgd), else one (cw)
    units: tuple[str, ...] = ()
    black_box: frozenset[str] = frozenset()  # units that do not follow gradients (Square)
    takes_step_and_start: bool = False  # accepts ``:step=S`` and ``:start=zero`` (the PGD family)
    module: str | None = None  # the module that registers it, for child processes (None: built in)

    def unit_names(self, spec: "AttackSpec") -> tuple[str, ...]:
        if self.iterative:
            return tuple(f"restart {r + 1}" for r in range(spec.restarts))
        return self.units or (self.name,)

    @property
    def spelling(self) -> str:
        return f"{self.name}[-K[xR]]" if self.iterative else self.name


#: name -> AttackKind; built-ins below, users' through register_attack.
ATTACKS: Registry[AttackKind] = Registry("attack")


@dataclass(frozen=True)
class AttackSpec:
    kind: str
    steps: int = 0  # iterative kinds only
    restarts: int = 1  # iterative kinds only
    step_size: float | None = None  # the PGD family: None is 2.5 * eps / steps
    random_start: bool = True  # the PGD family: False starts from the clean point

    @property
    def attack_kind(self) -> AttackKind:
        return ATTACKS.get(self.kind)

    @property
    def parameters(self) -> str:
        """The parameters that differ from the defaults, as spelled: ``:step=2/255:start=zero``, or ``""``."""
        return ((f":step={_size_text(self.step_size)}" if self.step_size is not None else "")
                + ("" if self.random_start else ":start=zero"))

    @property
    def key(self) -> str:
        """Canonical spelling, e.g. ``pgd-50x10`` or ``pgd-20x1:step=2/255``; the results and flags key (every
        parameter is in it, so flags computed with another step size or start are never reused)."""
        kind = self.attack_kind
        return f"{self.kind}-{self.steps}x{self.restarts}{self.parameters}" if kind.iterative else self.kind

    @property
    def label(self) -> str:
        """Display name, e.g. ``PGD-50x10``, ``PGD-20x1:start=zero``, ``AutoAttack``."""
        kind = self.attack_kind
        return f"{kind.label}-{self.steps}x{self.restarts}{self.parameters}" if kind.iterative else kind.label

    @property
    def units(self) -> tuple[str, ...]:
        """The runs a point goes through, each only on the points the previous ones left robust."""
        return self.attack_kind.unit_names(self)

    def passes_per_point(self, unit: str) -> float | None:
        """About how many forward+backward passes unit ``unit`` spends on a point it cannot break (its budget):
        what an ETA before the first finished batch is estimated from. None for a registered attack."""
        kind = self.attack_kind
        if kind.iterative:
            return float(self.steps + 1)  # the steps, then the check of the result
        return PASSES_PER_POINT.get(unit)

    def unit_is_white_box(self, unit: str) -> bool:
        return unit not in self.attack_kind.black_box

    def build(self, context: AttackContext, unit: str) -> AttackFn:
        return self.attack_kind.build(context, self, unit)


def names_help() -> str:
    """The registered names as ``--attacks`` accepts them, in registration order."""
    plugins.import_from_environment()
    return ", ".join(kind.spelling for _, kind in ATTACKS.entries())


def parse_attack(text: str, *, default_steps: int = 50, default_restarts: int = 10) -> AttackSpec:
    """``"pgd-50x10"`` -> ``AttackSpec("pgd", 50, 10)``; bare ``pgd`` takes the defaults, bare ``cw`` one restart;
    ``"pgd-20x1:step=2/255:start=zero"`` also sets the step size and starts from the clean point."""
    name, *parameters = text.strip().lower().split(":")
    spec = _parse(name, default_steps, default_restarts)
    if spec is None and plugins.import_from_environment():
        spec = _parse(name, default_steps, default_restarts)
    if spec is None:
        raise UserError(f"unknown attack {text.strip().split(':')[0]!r}; choose from: {names_help()}")
    if spec.attack_kind.iterative and (spec.steps < 1 or spec.restarts < 1):
        raise UserError(f"attack {text!r}: steps and restarts must be >= 1")
    return _with_parameters(spec, name, parameters, text.strip()) if parameters else spec


def _with_parameters(spec: AttackSpec, name: str, parameters: list[str], text: str) -> AttackSpec:
    """``spec`` (parsed from ``name``) with the ``step=`` and ``start=`` of ``text``'s ``:``-separated parameters.
    A zero start is deterministic, so it runs once: a bare name gets one restart, an explicit ``xR`` > 1 is refused."""
    if not spec.attack_kind.takes_step_and_start:
        takers = ", ".join(name for name, kind in ATTACKS.entries() if kind.takes_step_and_start)
        raise UserError(f"attack {text!r}: {spec.kind} takes no parameters (step= and start= are for {takers})")
    values: dict[str, str] = {}
    for parameter in parameters:
        field, equals, value = parameter.partition("=")
        if field not in ("step", "start") or not equals:
            raise UserError(f"attack {text!r}: unknown parameter {parameter!r}; {spec.kind} takes step=SIZE "
                            "(e.g. step=2/255) and start=random|zero")
        if field in values:
            raise UserError(f"attack {text!r}: {field}= is given twice")
        values[field] = value.strip()
    step_size, random_start = spec.step_size, spec.random_start
    if "step" in values:
        step_size = _size(values["step"])
        if step_size is None:
            raise UserError(f"attack {text!r}: step={values['step']}: must be a finite size > 0 in pixel units, "
                            "e.g. step=2/255 or step=0.01")
    if "start" in values:
        if values["start"] not in ("random", "zero"):
            raise UserError(f"attack {text!r}: start={values['start']}: choose random or zero")
        random_start = values["start"] == "random"
    restarts = spec.restarts
    if not random_start and restarts > 1:
        match = _STEPS_SUFFIX.fullmatch(name)
        if match is not None and match.group(3) is not None:
            raise UserError(f"attack {text!r}: start=zero is deterministic, so its {restarts} restarts would "
                            f"repeat one run; use one restart, e.g. {spec.kind}-{spec.steps}x1:start=zero")
        restarts = 1
    return AttackSpec(spec.kind, spec.steps, restarts, step_size, random_start)


def _size(text: str) -> float | None:
    """``"2/255"`` or ``"0.01"`` as a float; None unless it is a finite number > 0."""
    numerator, slash, denominator = text.partition("/")
    try:
        value = float(numerator) / float(denominator) if slash else float(numerator)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _size_text(value: float) -> str:
    """The canonical spelling of a step size, read back by :func:`_size` to the same float: ``k/255`` when it is
    exactly that, else the shortest decimal."""
    k = round(value * 255)
    return f"{k}/255" if k >= 1 and k / 255 == value else repr(value)


def _parse(name: str, default_steps: int, default_restarts: int) -> AttackSpec | None:
    if name in ATTACKS:
        kind = ATTACKS.get(name)
        if not kind.iterative:
            return AttackSpec(name)
        return AttackSpec(name, default_steps, default_restarts if kind.bare_restarts else 1)
    match = _STEPS_SUFFIX.fullmatch(name)
    if match is None or match.group(1) not in ATTACKS or not ATTACKS.get(match.group(1)).iterative:
        return None
    kind, steps, restarts = match.groups()
    return AttackSpec(kind, int(steps), int(restarts) if restarts else 1)


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


def attack_modules(specs: Iterable[AttackSpec]) -> tuple[str, ...]:
    """The modules a child process must import to know these attacks (those registered from Python).

    Raises UserError for an attack registered in ``__main__``: a child process cannot import that.
    """
    modules = []
    for spec in specs:
        module = spec.attack_kind.module
        if module is not None:
            module = plugins.importable(module, f"attack {spec.kind!r}")
        if module is not None and module not in modules:
            modules.append(module)
    return tuple(modules)



# ----------------------------------------------------------------------------------------------------------
# registering from Python


def register_attack(name: str, attack: type[Attack] | Callable[..., torch.Tensor], *, label: str | None = None,
                    iterative: bool = False, black_box: bool = False, module: str | None = None) -> AttackKind:
    """Make ``attack`` usable by name: in :func:`evaluate` through :func:`parse_attacks`, in ``robust-sparse eval
    --attacks NAME`` run in the same process (``robust_sparse.cli.main``), and in a sweep file's ``eval`` stage.

    Args:
        name: lower case, e.g. ``"my-attack"``; must not be registered yet.
        attack: an :class:`~robust_sparse.attacks.Attack` subclass, built per unit as
            ``attack(model, norm=..., eps=...)``, or a function called per batch as
            ``attack(model, images, labels, norm=..., eps=...)``; either returns adversarial images in [0, 1]
            (points outside the eps-ball do not count). Iterative ones also get ``steps=K``.
        label: display name in results (default: ``name``).
        iterative: accept ``NAME-K[xR]`` (K steps, R restarts, each a seeded run on the survivors).
        black_box: the attack does not follow gradients (used by the gradient-masking checks).
        module: the importable module that calls this function, which a sweep's evaluation processes import
            (default: the module that defines ``attack``).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"attack name {name!r}: use lower-case letters, digits, '_' and '-' (e.g. 'my-attack')")
    if _parse(name, 1, 1) is not None:  # a registered name, or a spelling of one such as pgd-5
        raise UserError(f"attack {name!r} is already registered; registered: {names_help()}")
    if not callable(attack):
        raise UserError(f"register_attack({name!r}, ...): expected an Attack subclass or a function, got {attack!r}")
    is_class = inspect.isclass(attack)
    if is_class and not issubclass(attack, Attack):
        raise UserError(f"register_attack({name!r}, ...): {attack.__name__} is a class but not a "
                        "robust_sparse.attacks.Attack subclass")

    def build(context: AttackContext, spec: AttackSpec, unit: str) -> AttackFn:
        extra = {"steps": spec.steps} if iterative else {}
        if is_class:
            return attack(context.model, norm=context.norm, eps=context.eps, **extra)
        return lambda images, labels: attack(context.model, images, labels, norm=context.norm, eps=context.eps,
                                             **extra)

    kind = AttackKind(name=name, label=label or name, build=build, iterative=iterative,
                      black_box=frozenset({name}) if black_box else frozenset(),
                      module=module or getattr(attack, "__module__", None) or "")
    ATTACKS.register(name)(kind)
    return kind


# ----------------------------------------------------------------------------------------------------------
# built-in attacks


def _fgsm(context: AttackContext, spec: AttackSpec, unit: str) -> AttackFn:
    return FGSM(context.model, norm=context.norm, eps=context.eps)


def _pgd(context: AttackContext, spec: AttackSpec, unit: str) -> AttackFn:
    # one restart per unit: the runner seeds each restart and runs it on the points the previous ones left
    return PGD(context.model, norm=context.norm, eps=context.eps, steps=spec.steps, restarts=1,
               step_size=_step_size(context, spec), random_start=spec.random_start)


def _cw(context: AttackContext, spec: AttackSpec, unit: str) -> AttackFn:
    return CW(context.model, norm=context.norm, eps=context.eps, steps=spec.steps,
              step_size=_step_size(context, spec), random_start=spec.random_start)


def _step_size(context: AttackContext, spec: AttackSpec) -> float:
    return spec.step_size if spec.step_size is not None else pgd_step_size(context.eps, spec.steps)


def _autoattack(context: AttackContext, spec: AttackSpec, unit: str) -> AttackFn:
    return context.autoattack_unit(unit)


def _torchattacks_autoattack(context: AttackContext, spec: AttackSpec, unit: str) -> AttackFn:
    if context.num_classes is None:
        raise UserError("torchattacks-aa needs the number of classes")
    return torchattacks_autoattack(context.model, norm=context.norm, eps=context.eps, n_classes=context.num_classes,
                                   seed=context.seed)


#: The standard AutoAttack budget per point in forward+backward passes of the model (Croce & Hein 2020, version
#: "standard"): APGD-CE 100 iterations; APGD-T 9 target classes x 100. FAB-T (9 targets x 100 iterations, each a
#: forward and two logits' gradients) and Square (5000 forward-only queries) cost more than their arithmetic on a
#: small model, whose passes are cheap beside each step's own work: measured on the quickstart's model on 2 cores
#: (a pass 0.515 ms per point; 224 points robust to the end) APGD-T took 900 passes' time per point, FAB-T 1840
#: and Square 2170. Points broken early cost less, so these give the time of a point that survives every unit.
PASSES_PER_POINT: dict[str, float] = {"fgsm": 2.0, "apgd-ce": 101.0, "apgd-t": 901.0, "fab-t": 1900.0,
                                      "square": 2200.0}
_SUB_ATTACK_LABELS = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square"}
_BLACK_BOX = frozenset(STANDARD_ATTACKS) - WHITE_BOX_ATTACKS

for _kind in (
    AttackKind("fgsm", "FGSM", _fgsm),
    AttackKind("pgd", "PGD", _pgd, iterative=True, bare_restarts=True, takes_step_and_start=True),
    AttackKind("cw", "CW", _cw, iterative=True, takes_step_and_start=True),
    AttackKind("autoattack", "AutoAttack", _autoattack, units=STANDARD_ATTACKS, black_box=_BLACK_BOX),
    *(AttackKind(sub, _SUB_ATTACK_LABELS[sub], _autoattack, black_box=_BLACK_BOX & {sub}) for sub in STANDARD_ATTACKS),
    AttackKind("torchattacks-aa", "torchattacks-AA", _torchattacks_autoattack),
):  # in the order of the table above; the CLI's help lists them so
    ATTACKS.register(_kind.name)(_kind)
del _kind
