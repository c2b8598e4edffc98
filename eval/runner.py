"""The evaluation runner: clean accuracy, then every attack of a suite, with per-point flags.

Protocol
    Each attack is evaluated on its own (``chained=False``, the default): it attacks the points the model
    classifies correctly, and its robust accuracy is its own, comparable with published numbers for that
    attack. The worst case over all attacks is the pointwise AND of their flags. With ``chained=True`` every
    attack only sees the points all previous attacks left robust: faster when only the worst case matters,
    and the per-attack columns are then cumulative.

Early exit
    An attack is a sequence of *units* (PGD's restarts; AutoAttack's APGD-CE, APGD-T, FAB-T, Square), each
    run only on the points the previous units left robust, in batches of ``batch_size``, as AutoAttack
    does. A point is broken only by a valid adversarial example: inside the eps-ball and [0, 1] (checked).

Resume
    With ``state_path`` the flags are saved (atomically) after batches, at most every few seconds, and at the
    end of every unit. A rerun with the same settings continues after the last saved batch and gives the
    same flags as an uninterrupted run: every batch is seeded from ``(seed, attack, unit)`` alone and the
    batches of a unit are fixed when it starts. One file holds everything finished for a model, its points,
    eps, seed and mode; inside it each attack is keyed by what its flags depend on (its parameters, the
    batch size, which partitions its points and seeds each batch, and in chained mode the attacks before
    it), so a rerun with another attack list, another batch size or without the probe reuses every finished
    attack, the clean flags and the probe.

Results as a table
    :meth:`Evaluation.to_frame` gives one tidy DataFrame, one row per attack (``clean`` and ``worst case``
    included, and AutoAttack's parts), with the columns model, subnet, dataset, threat_model, eps, seed, mode,
    attack, kind, accuracy (a fraction), n, correct, ci_low and ci_high (95% Wilson): the schema of
    :data:`robust_sparse.eval.store.TIDY_COLUMNS`, described there, which the results store's rows give through
    :func:`robust_sparse.eval.store.tidy`; frames of several evaluations concatenate.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from robust_sparse.attacks import CW
from robust_sparse.files.checkpoint import load_checkpoint, save_checkpoint
from robust_sparse.config.validation import check_radius
from robust_sparse.errors import CheckpointError, UserError
from robust_sparse.progress import Heartbeat
from robust_sparse.progress import progress as progress_bar
import robust_sparse.eval.sanity as sanity
from robust_sparse.accuracy import pgd_step_size, predict
from robust_sparse.eval.autoattack import AutoAttackBackend
from robust_sparse.eval.specs import AttackContext, AttackSpec
# the results' types are the evaluation module's; imported here too, where they have always been importable from
from robust_sparse.eval.evaluation import AttackOutcome, Evaluation, fraction

log = logging.getLogger(__name__)

STATE_KIND = "robust-sparse-eval-flags/2"
LEGACY_STATE_KIND = "robust-sparse-eval-flags/1"  # one file per attack list, batch size and probe eps
SAVE_EVERY_SECONDS = 5.0
PROBE_POINTS = 1000  # the large-eps probe attacks at most this many (the first) points
PROBE_STEPS = 20


# ----------------------------------------------------------------------------------------------------------
# input checks


def check_inputs(images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> None:
    """Images float [N, C, H, W] in [0, 1] (unnormalised: models own their normalisation); labels int64 [N]."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise UserError(f"images must be a tensor [N, C, H, W], got shape {tuple(getattr(images, 'shape', ()))}")
    if not images.is_floating_point():
        raise UserError(f"images must be float in [0, 1], got dtype {images.dtype} (divide uint8 images by 255)")
    if len(images) and not bool(torch.isfinite(images).all()):
        raise UserError("images contain NaN or infinite values")
    if len(images):
        low, high = images.min().item(), images.max().item()
        if low < 0 or high > 1:
            raise UserError(f"images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]: pass unnormalised "
                            "images (the model owns its normalisation)")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or len(labels) != len(images):
        raise UserError(f"labels must be a 1-D tensor with one label per image ({len(images)})")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise UserError(f"labels must be integers, got dtype {labels.dtype}")
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes - 1}], got [{labels.min().item()}, {labels.max().item()}]")


def _check_model_output(model: nn.Module, images: torch.Tensor, num_classes: int | None) -> None:
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device != images.device:
        raise UserError(f"the model is on {parameter.device} but the images are on {images.device}")
    try:
        with torch.no_grad():
            logits = model(images[:2])
    except RuntimeError as error:
        raise UserError(f"the model cannot process images of shape {tuple(images.shape[1:])}: "
                        f"{str(error).strip().splitlines()[0]}") from None
    if logits.dim() != 2 or len(logits) != len(images[:2]):
        raise UserError(f"the model must return logits [N, classes], got shape {tuple(logits.shape)}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise UserError(f"the model returns {logits.shape[1]} logits but the dataset has {num_classes} classes")


# ----------------------------------------------------------------------------------------------------------
# seeding and validity of every unit (each attack is built by its entry of robust_sparse.eval.specs.ATTACKS)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed every generator for one batch and give the caller's RNG state back afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _unit_seed(seed: int, spec: AttackSpec, unit_index: int) -> int:
    """Our own attacks: one seed per (seed, attack, restart). AutoAttack re-seeds itself with ``seed``."""
    return (seed * 1_000_003 + zlib.crc32(spec.key.encode()) * 7919 + unit_index) % (2**63 - 1)


def _valid(adversarial: torch.Tensor, images: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Per point: finite, inside [0, 1] and inside the eps-ball (float32 rounding tolerated)."""
    delta = (adversarial - images).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    flat = adversarial.flatten(1)
    tolerance = 1e-5
    return (torch.isfinite(flat).all(1) & (flat.amin(1) >= -tolerance) & (flat.amax(1) <= 1 + tolerance)
            & (size <= eps * (1 + tolerance) + tolerance))


# ----------------------------------------------------------------------------------------------------------
# state (per-point flags on disk)


def attack_state_key(attack: str, batch_size: int, before: Sequence[str] = ()) -> str:
    """The key of one attack's flags in a state file: the attack with its parameters (``spec.key``), the batch
    size, and in chained mode the attacks that chose its points."""
    return f"{attack}@bs{batch_size}" + (f"<-{'+'.join(before)}" if before else "")


class _State:
    def __init__(self, path: Path | None, settings: dict[str, Any], legacy_path: Path | None = None) -> None:
        self.path, self.settings = path, settings
        self.data: dict[str, Any] = {"kind": STATE_KIND, "settings": settings, "attacks": {}, "seconds": 0.0}
        self._last_save = 0.0
        if path is not None and path.is_file():
            saved = self._read(path)
            if saved is not None and saved.get("kind") == STATE_KIND and saved.get("settings") == settings:
                saved.pop("format", None)
                self.data = saved
                log.info("resuming from %s", path)
            elif saved is not None:
                log.info("flags in %s were computed with other settings; starting afresh", path)
        elif legacy_path is not None and legacy_path.is_file():
            saved = self._read(legacy_path)
            if saved is not None and saved.get("kind") == LEGACY_STATE_KIND:
                self._adopt_legacy(saved, legacy_path)

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            return load_checkpoint(path)
        except CheckpointError as error:
            log.warning("ignoring unreadable flags file %s: %s", path, error)
            return None

    def _adopt_legacy(self, saved: dict[str, Any], path: Path) -> None:
        """A flags file of the previous layout (one per attack list and batch size): its attacks re-keyed."""
        old = saved.get("settings") or {}
        if any(old.get(key) != value for key, value in self.settings.items()):
            return
        order, batch_size = list(old.get("attacks") or []), old.get("batch_size")
        attacks = {}
        for key, flags in (saved.get("attacks") or {}).items():
            before = order[:order.index(key)] if old.get("chained") and key in order else []
            attacks[attack_state_key(key, batch_size, before)] = flags
        self.data.update({key: saved[key] for key in ("clean", "probe", "seconds") if key in saved})
        self.data["attacks"] = attacks
        log.info("resuming from %s (the previous flags layout)", path)

    def save(self, force: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if force or now - self._last_save >= SAVE_EVERY_SECONDS:
            save_checkpoint(self.data, self.path)
            self._last_save = now


# ----------------------------------------------------------------------------------------------------------
# the runner


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: str,
    eps: float,
    attacks: Sequence[AttackSpec],
    batch_size: int = 500,
    seed: int = 0,
    chained: bool = False,
    num_classes: int | None = None,
    state_path: str | Path | None = None,
    settings: dict[str, Any] | None = None,
    legacy_state_path: str | Path | None = None,
    progress: bool = False,
    autoattack_backend: str = "auto",
    backend: AutoAttackBackend | None = None,
    large_eps: float | str | None = "auto",
) -> Evaluation:
    """Clean accuracy and every attack in ``attacks`` on [0,1] ``images`` (on the model's device).

    Args:
        model: maps [0,1] images to logits; evaluated in eval mode (its mode is restored afterwards).
        norm, eps: the threat model (``"linf"``/``"l2"``, pixel units).
        attacks: the suite, run in order (see :mod:`robust_sparse.eval.specs`).
        batch_size: points per attack batch (AutoAttack's ``bs``; its results depend on it through seeding).
        seed: fixes every random start, AutoAttack's included (``robust-sparse eval --seeds 0,1,2`` calls this once
            per seed, robust_sparse/eval/job.py).
        chained: attack only points every previous attack left robust (per-attack numbers become cumulative).
        num_classes: checked against the model's output; needed by ``torchattacks-aa``.
        state_path: where per-point flags are saved, and resumed from when the settings match (n, norm, eps,
            seed, chained and ``settings``); inside it each attack is keyed by :func:`attack_state_key`.
        settings: extra identification stored with the flags (model and data fingerprints, ...).
        legacy_state_path: a flags file of the previous layout, read when ``state_path`` does not exist yet.
        progress: a bar with an ETA on a terminal, periodic log lines elsewhere (:mod:`robust_sparse.progress`).
        autoattack_backend: ``auto``, ``pyautoattack`` or ``github`` (see :func:`select_backend`).
        backend: an already built backend (tests inject fakes here).
        large_eps: the gradient-masking probe: a 20-step margin PGD without random start at this eps on the
            first 1000 points; its accuracy should be ~0. ``"auto"``: :func:`sanity.default_large_eps` (L-inf
            0.5); ``None``: no probe.

    The gradient-masking checks of :mod:`robust_sparse.eval.sanity` run on the result: their warnings are in
    ``Evaluation.warnings`` and in the log.
    """
    if norm not in ("linf", "l2"):
        raise UserError(f"threat model must be linf or l2, got {norm!r}")
    check_radius(f"eps = {eps}", eps, norm)
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    check_inputs(images, labels, num_classes)
    if large_eps == "auto":
        large_eps = sanity.default_large_eps(norm, tuple(images.shape[1:]))
    elif large_eps is not None:  # 'auto' or None (no probe) otherwise
        check_radius(f"large_eps = {large_eps}", large_eps, None, positive=True)
    labels = labels.long()
    device = images.device
    settings = {"n": len(labels), "norm": norm, "eps": float(eps), "seed": seed, "chained": chained,
                **(settings or {})}
    state = _State(Path(state_path) if state_path is not None else None, settings,
                   Path(legacy_state_path) if legacy_state_path is not None else None)
    started = time.monotonic()
    was_training = model.training
    model.eval()
    context = AttackContext(model, norm=norm, eps=eps, seed=seed, device=device, num_classes=num_classes,
                            backend_name=autoattack_backend, backend=backend)
    invalid: dict[str, int] = {}
    try:
        if len(labels):
            _check_model_output(model, images, num_classes)
        if "clean" not in state.data:
            state.data["clean"] = (predict(model, images, batch_size) == labels).cpu()
            state.save(force=True)
        clean = state.data["clean"]
        log.info("%s eps=%.4g on %d points: clean accuracy %.4f", norm, eps, len(labels), fraction(clean))
        pass_seconds = _plan(model, images, labels, clean, attacks, state, batch_size=batch_size, chained=chained,
                             eps=eps, large_eps=large_eps)
        outcomes = []
        alive = clean.clone()
        for position, spec in enumerate(attacks):
            key = attack_state_key(spec.key, batch_size, [s.key for s in attacks[:position]] if chained else ())
            outcome = _run_attack(spec, key, context, state, images, labels, clean if not chained else alive,
                                  norm=norm, eps=eps, seed=seed, batch_size=batch_size, progress=progress,
                                  invalid=invalid, pass_seconds=pass_seconds)
            outcomes.append(outcome)
            alive &= outcome.robust
        probe = None
        if large_eps is not None and len(labels):
            probe = _probe(model, images, labels, clean, state, norm=norm, eps=large_eps, batch_size=batch_size,
                           seed=seed, progress=progress)
    finally:
        model.train(was_training)
        session_seconds = time.monotonic() - started
        state.data["seconds"] = state.data.get("seconds", 0.0) + session_seconds
        state.save(force=True)
    backend_used = context.backend_used
    evaluation = Evaluation(norm=norm, eps=float(eps), seed=seed, batch_size=batch_size, chained=chained,
                            clean=clean, outcomes=outcomes, seconds=state.data["seconds"], probe=probe,
                            invalid=invalid, autoattack_messages=list(backend_used.messages) if backend_used else [],
                            autoattack_backend=backend_used.name if backend_used else "",
                            session_seconds=session_seconds)
    evaluation.warnings = sanity.check_evaluation(evaluation)
    for warning in evaluation.warnings:
        log.warning("%s", warning)
    return evaluation


def seconds_per_pass(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """Seconds one forward+backward (the input gradient, what an attack step costs) takes per point, on a batch
    of up to 128 points (the attacks' batches, or less: per-point cost falls with the batch), the second of two
    timed runs (the first pays for allocation)."""
    count = max(1, min(batch_size, len(labels), 128))
    x, y = images[:count].clone().requires_grad_(True), labels[:count]
    timings = []
    with torch.enable_grad():
        for _ in range(2):
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            if loss.requires_grad:  # a model without gradients (a black box behind a wrapper): its forward only
                torch.autograd.grad(loss, x, allow_unused=True)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            timings.append(time.perf_counter() - start)
    return timings[-1] / count


def _plan(model, images, labels, clean, attacks: Sequence[AttackSpec], state: _State, *, batch_size, chained, eps,
          large_eps) -> float | None:
    """Say what this evaluation will run and about how long it may take, before it starts; returns the measured
    seconds per pass and point that the heartbeats' ETAs use until a batch has finished (None: nothing to run)."""
    todo = [spec for position, spec in enumerate(attacks)
            if not (state.data["attacks"].get(attack_state_key(
                spec.key, batch_size, [s.key for s in attacks[:position]] if chained else ())) or {}).get("complete")]
    probe_points = int(clean[:PROBE_POINTS].sum()) if large_eps is not None and "probe" not in state.data else 0
    if (not todo or eps == 0) and not probe_points or not len(labels):
        return None
    pass_seconds = seconds_per_pass(model, images, labels, batch_size)
    correct = int(clean.sum())
    parts, total, unknown = [], 0.0, []
    for spec in todo if eps != 0 else []:
        budgets = [spec.passes_per_point(unit) for unit in spec.units]
        if any(b is None for b in budgets):
            unknown.append(spec.label)
        passes = sum(b for b in budgets if b is not None)
        total += passes * correct * pass_seconds
        parts.append(f"{spec.label} ({len(spec.units)} unit{'s' if len(spec.units) != 1 else ''}"
                     + (f", up to {passes:.0f} passes per point" if passes else "") + ")")
    if probe_points:
        total += (PROBE_STEPS + 1) * probe_points * pass_seconds
        parts.append(f"the large-eps probe ({PROBE_STEPS}-step margin PGD on {probe_points} points; --no-probe "
                     "skips it)")
    log.info("plan: %s on the %d of %d points classified correctly; about %.0f s if every point survives every unit "
             "(an estimate: one forward+backward costs %.3g ms per point on this model here; later units only attack "
             "what earlier ones left robust, so a model that breaks costs less)%s", ", then ".join(parts), correct,
             len(labels), total, 1e3 * pass_seconds, f"; no estimate for {', '.join(unknown)}" if unknown else "")
    return pass_seconds


def _run_attack(spec: AttackSpec, key: str, context: AttackContext, state: _State, images, labels, candidates, *,
                norm, eps, seed, batch_size, progress, invalid, pass_seconds: float | None = None) -> AttackOutcome:
    n, units = len(labels), spec.units
    saved = state.data["attacks"].get(key)
    if saved is None:
        saved = {"robust": candidates.clone(), "broken_by": torch.full((n,), -1, dtype=torch.int8),
                 "done": torch.zeros(len(units), n, dtype=torch.bool), "complete": False}
        state.data["attacks"][key] = saved
    robust, broken_by, done = saved["robust"], saved["broken_by"], saved["done"]
    if saved["complete"]:
        log.info("%s eps=%.4g %s finished before: %d/%d robust (from the saved flags)", norm, eps, spec.label,
                 int(robust.sum()), n)
        return AttackOutcome(spec, robust, broken_by)
    if eps == 0:  # at eps 0 the ball is a point: robust accuracy is clean accuracy
        saved["complete"] = True
        return AttackOutcome(spec, robust, broken_by)
    device = images.device
    for index, unit_name in enumerate(units):
        todo = robust & ~done[index]
        if not bool(todo.any()):
            continue
        attack = spec.build(context, unit_name)
        points = torch.nonzero(todo).flatten()
        description = spec.label if len(units) == 1 else f"{spec.label} {unit_name}"
        started = time.monotonic()
        chunks = points.split(batch_size)
        with progress_bar(total=int(done[index].sum()) + len(points), initial=int(done[index].sum()),
                          desc=f"{description} on the points still robust", unit="pt", enabled=progress) as bar:
            for number, chunk in enumerate(chunks):
                on_device = chunk.to(device)
                x, y = images[on_device], labels[on_device]
                # a batch reports nothing until it ends (AutoAttack's can take many minutes): a heartbeat
                # says what runs meanwhile, with an ETA from the batches of this unit already finished
                finished = sum(len(c) for c in chunks[:number])
                budget = spec.passes_per_point(unit_name)
                heartbeat = Heartbeat(f"{description} batch {number + 1}/{len(chunks)}", len(chunk),
                                      points_after=len(points) - finished - len(chunk),
                                      seconds_per_point=(time.monotonic() - started) / finished if finished else None,
                                      estimated_seconds_per_point=(budget * pass_seconds if budget is not None
                                                                   and pass_seconds is not None else None),
                                      enabled=progress)
                with heartbeat, _seeded(_unit_seed(seed, spec, index), device):
                    adversarial = attack(x, y)
                with torch.no_grad():
                    fooled = (context.model(adversarial).argmax(1) != y)
                    valid = _valid(adversarial, x, norm, eps)
                rejected = int((fooled & ~valid).sum())
                if rejected:
                    invalid[spec.label] = invalid.get(spec.label, 0) + rejected
                    log.warning("%s %s returned %d examples outside the threat model; they do not count",
                                spec.label, unit_name, rejected)
                broken = chunk[(fooled & valid).cpu()]
                robust[broken] = False
                broken_by[broken] = index
                done[index, chunk] = True
                state.save()
                bar.update(len(chunk))
        state.save(force=True)
        log.info("%s eps=%.4g %s%s: %d/%d robust (%.1f s)", norm, eps, spec.label,
                 "" if len(units) == 1 else f" after {unit_name}", int(robust.sum()), n, time.monotonic() - started)
    saved["complete"] = True
    state.save(force=True)
    return AttackOutcome(spec, robust, broken_by)


def _probe(model, images, labels, clean, state: _State, *, norm, eps, batch_size, seed,
           progress: bool = False) -> dict[str, Any]:
    """Margin PGD from the clean point (no random start) at a large eps: a working gradient breaks ~every point.

    Without a random start a zero or useless gradient leaves the points where they are, so a masked model keeps
    its clean accuracy here instead of being broken by noise alone.
    """
    key = {"eps": float(eps), "steps": PROBE_STEPS, "points": min(PROBE_POINTS, len(labels))}
    saved = state.data.get("probe")
    if saved is not None and saved.get("key") == key:
        return saved["result"]
    points = key["points"]
    robust = clean[:points].clone()
    attack = CW(model, norm=norm, eps=eps, steps=PROBE_STEPS, step_size=pgd_step_size(eps, PROBE_STEPS),
                random_start=False)
    candidates = torch.nonzero(robust).flatten()
    log.info("large-eps probe (gradient-masking check): %d-step margin PGD from the clean point at %s eps=%.4g on "
             "the %d correctly classified of the first %d points; its accuracy should be ~0 (--no-probe skips it)",
             PROBE_STEPS, norm, eps, len(candidates), points)
    with progress_bar(total=len(candidates), desc=f"large-eps probe {norm} eps={eps:.4g}", unit="correct pt",
                      enabled=progress) as bar:
        for chunk in candidates.split(batch_size):
            on_device = chunk.to(images.device)
            with _seeded(seed, images.device):
                adversarial = attack(images[on_device], labels[on_device])
            with torch.no_grad():
                fooled = (model(adversarial).argmax(1) != labels[on_device]) & _valid(adversarial, images[on_device],
                                                                                       norm, eps)
            robust[chunk[fooled.cpu()]] = False
            bar.update(len(chunk))
    result = {"eps": float(eps), "points": points, "steps": PROBE_STEPS, "accuracy": fraction(robust),
              "clean_accuracy": fraction(clean[:points])}
    state.data["probe"] = {"key": key, "result": result}
    state.save(force=True)
    log.info("large-eps probe: %s eps=%.4g, %d-step margin PGD from the clean point: accuracy %.4f on %d points",
             norm, eps, PROBE_STEPS, result["accuracy"], points)
    return result
