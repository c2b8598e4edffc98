"""One ``robust-sparse eval`` invocation: a model, its test points, a suite of attacks at one or more eps.

For every attack seed and eps it runs :func:`robust_sparse.eval.runner.evaluate` (resuming from saved flags),
applies the gradient-masking checks, appends a row to the results store and, when asked, compares the original
AutoAttack with ``torchattacks.AutoAttack`` configured to match on the same points.

:func:`run_job` is the whole command once its config is checked (:class:`~robust_sparse.eval.config.EvalConfig`):
which models to load (every sub-net of an AST checkpoint), the test points, the :class:`Protocol` a checkpoint
carries unless the config overrides it, the results store, and the ``--output`` file. The CLI only maps its
flags onto the config and prints.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from robust_sparse.distributed import device_name
from robust_sparse.files import rundir
from robust_sparse.files.atomic import write_atomic
from robust_sparse.errors import UserError
import robust_sparse.eval.points as points
import robust_sparse.eval.sanity as sanity
import robust_sparse.eval.sources as sources
from robust_sparse.eval.config import DEFAULT_ATTACKS, EvalConfig, Names
from robust_sparse.eval.points import data_fingerprint
from robust_sparse.eval.runner import Evaluation, evaluate
from robust_sparse.eval.sources import LoadedModel, model_fingerprint, sparsity_stats
from robust_sparse.eval.specs import AttackSpec
from robust_sparse.eval.spread import seed_spread
from robust_sparse.eval.store import append_result, flags_path, threat_label
from robust_sparse.flops import inference_flops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """How one model is attacked: an :class:`~robust_sparse.eval.config.EvalConfig` with the checkpoint's defaults
    filled in (its norm, eps, PGD steps and restarts) and the attack names parsed."""

    norm: str
    eps: tuple[float, ...]
    attacks: tuple[AttackSpec, ...]
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 500
    chained: bool = False
    autoattack_backend: str = "auto"
    large_eps: float | str | None = "auto"  # the gradient-masking probe's eps; None: no probe
    cross_check: bool = False


@dataclass
class EvalOutcome:
    rows: list[dict[str, Any]]
    evaluations: list[Evaluation]
    warnings: list[str]  # across eps (non-monotone accuracy)


def cross_check_attacks(attacks: list[AttackSpec]) -> list[AttackSpec]:
    """The suite with the original AutoAttack and torchattacks' matched copy both in it."""
    attacks = list(attacks)
    for kind in ("autoattack", "torchattacks-aa"):
        if not any(spec.kind == kind for spec in attacks):
            attacks.append(AttackSpec(kind))
    return attacks


def cross_check_summary(evaluation: Evaluation) -> dict[str, Any] | None:
    original, copy = evaluation.outcome("autoattack"), evaluation.outcome("torchattacks-aa")
    if original is None or copy is None:
        return None
    return {
        "autoattack_acc": original.accuracy, "torchattacks_acc": copy.accuracy,
        "difference": copy.accuracy - original.accuracy,
        "points_disagreeing": int((original.robust ^ copy.robust).sum()),
        "robust_only_under_torchattacks": int((copy.robust & ~original.robust).sum()),
        "robust_only_under_autoattack": int((original.robust & ~copy.robust).sum()),
    }


def run(loaded: LoadedModel, images: torch.Tensor, labels: torch.Tensor, protocol: Protocol, results_dir: Path, *,
        device: torch.device, num_classes: int, resume: bool = True, progress: bool = False) -> EvalOutcome:
    """One model under ``protocol`` on the test points (CPU tensors): one row per eps and seed into the results
    store, which is locked meanwhile (one writer per store)."""
    with rundir.locked(results_dir, rundir.Kind.EVAL, "--results-dir"):
        return _run(loaded, images, labels, protocol, results_dir, device, num_classes, resume, progress)


def _run(loaded: LoadedModel, cpu_images: torch.Tensor, cpu_labels: torch.Tensor, protocol: Protocol,
         results_dir: Path, device: torch.device, num_classes: int, resume: bool, progress: bool) -> EvalOutcome:
    model = loaded.model.to(device).eval()
    attacks = cross_check_attacks(list(protocol.attacks)) if protocol.cross_check else list(protocol.attacks)
    images, labels = cpu_images.to(device), cpu_labels.to(device)
    fingerprints = {"model_fingerprint": model_fingerprint(model),
                    "data_fingerprint": data_fingerprint(cpu_images, cpu_labels),
                    "autoattack_backend": protocol.autoattack_backend}
    stats = {**sparsity_stats(model), **_inference_flops(model, tuple(cpu_images.shape[1:]))}
    threat = threat_label(protocol.norm)
    rows, evaluations, across = [], [], []
    for seed in protocol.seeds:  # every seed's flags in files of their own: a seed added later reuses the others
        per_seed = []
        for eps in protocol.eps:
            # The file is keyed by what determines its flags (model, points, eps, seed, mode); the attack list, the
            # batch size and the probe are keys inside it (runner.attack_state_key), so changing them reuses it.
            where = dict(model=loaded.name, dataset=loaded.dataset, threat_model=threat, eps=eps)
            state = flags_path(results_dir, **where, settings={
                **fingerprints, "n": len(labels), "seed": seed, "chained": protocol.chained})
            legacy = flags_path(results_dir, **where, settings={  # the layout before: one file per suite
                **fingerprints, "large_eps": protocol.large_eps, "n": len(labels), "seed": seed,
                "batch_size": protocol.batch_size, "chained": protocol.chained, "attacks": [a.key for a in attacks]})
            if not resume:
                for path in (state, legacy):
                    path.unlink(missing_ok=True)
            evaluation = evaluate(
                model, images, labels, norm=protocol.norm, eps=eps, attacks=attacks, batch_size=protocol.batch_size,
                seed=seed, chained=protocol.chained, num_classes=num_classes, state_path=state,
                settings=fingerprints, legacy_state_path=legacy, progress=progress,
                autoattack_backend=protocol.autoattack_backend, large_eps=protocol.large_eps,
            )
            row = _row(loaded, protocol.norm, device, evaluation, stats, fingerprints, state)
            append_result(results_dir, row)
            rows.append(row)
            per_seed.append(evaluation)
        across += sanity.check_monotone(per_seed) if len(per_seed) > 1 else []
        evaluations += per_seed
    for warning in across:
        log.warning("%s", warning)
    return EvalOutcome(rows, evaluations, across)


@dataclass
class JobOutcome:
    rows: list[dict[str, Any]]
    warnings: list[str]  # across eps (non-monotone accuracy)
    results_dir: Path

    @property
    def spread(self) -> pd.DataFrame:
        """Mean, std, min and max of every accuracy over the attack seeds (robust_sparse.eval.spread)."""
        return seed_spread(pd.DataFrame(self.rows))


def default_results_dir(config: EvalConfig) -> Path:
    """Where an evaluation's store goes: ``results_dir``, else beside the checkpoint, else runs/eval."""
    if config.results_dir:
        return Path(config.results_dir)
    if config.checkpoint is not None:
        return Path(config.checkpoint).parent / "eval"
    return Path("runs") / "eval"


def run_job(config: EvalConfig, names: Names = Names()) -> JobOutcome:
    """The whole of ``robust-sparse eval`` once ``config`` is validated (:func:`~robust_sparse.eval.config.check_eval`).
    Local models first (a checkpoint names the dataset), then the test points, then a zoo model (maybe a
    download): a missing dataset never costs a download. Each model's rows go to the results store."""
    from robust_sparse.config.validation import check_radius
    from robust_sparse.datasets import DATASETS
    from robust_sparse.datasets.splits import dataset_info
    from robust_sparse.eval.specs import parse_attacks
    from robust_sparse.distributed import resolve_device

    if config.corruptions_track:
        return run_corruptions_job(config)
    models, dataset = local_models(config, names)
    first = models[0] if models else None
    threat = config.threat_model.value if config.threat_model is not None else None
    norm = threat or (first.norm if first else None) or "linf"
    for eps in config.eps or []:  # the norm is known now (a checkpoint's): the radius rule once more
        check_radius(names.value("eps", f"{eps:.4g}"), eps, norm)
    images, labels = points.load_points(
        dataset, config.n_examples or (first.n_examples if first else None),
        root=config.data_root or (first.data_root if first else None) or "data", download=config.download,
        data_file=config.data_file, data=first.data if first else None, norm=norm)
    if models is None:
        models = [sources.from_robustbench(config.robustbench_model, dataset, threat or "linf", config.model_dir)]
        first = models[0]
        if config.name:
            first.name = config.name

    # the protocol: the checkpoint's threat model and settings unless the config says otherwise
    eps_values = config.eps if config.eps is not None else [
        first.eps if first.eps is not None and norm == first.norm else points.protocol_eps(dataset, norm)]
    attacks = parse_attacks(config.attacks or DEFAULT_ATTACKS,
                            default_steps=config.pgd_steps or first.pgd_steps or 50,
                            default_restarts=config.restarts or first.restarts or 10)
    large_eps = config.large_eps
    if config.probe and large_eps is None:
        info = dataset_info(first.data) if first.data is not None else DATASETS.get(dataset)
        large_eps = sanity.default_large_eps(norm, (info.in_channels, info.image_size, info.image_size))
    protocol = Protocol(norm=norm, eps=tuple(eps_values), attacks=tuple(attacks), seeds=tuple(config.seeds),
                        batch_size=config.batch_size, chained=config.chained,
                        autoattack_backend=config.autoattack_backend.value, large_eps=large_eps,
                        cross_check=config.cross_check)
    results_dir = default_results_dir(config)

    device = resolve_device(config.device.value)
    rows, warnings = [], []
    for loaded in models:
        num_classes = (dataset_info(loaded.data) if loaded.data is not None else DATASETS.get(loaded.dataset)).num_classes
        outcome = run(loaded, images, labels, protocol, results_dir, device=device, num_classes=num_classes,
                      resume=config.resume, progress=config.progress)
        rows += outcome.rows
        warnings += outcome.warnings
    if config.output:
        records = [{**row, "checkpoint": config.checkpoint, "epoch": first.epoch, "norm": norm,
                    "clean_accuracy": row["clean_acc"], "pgd_accuracy": row["pgd_acc"],
                    "autoattack_accuracy": row["autoattack_acc"], "worst_case_accuracy": row["worst_acc"]}
                   for row in rows]
        write_atomic(Path(config.output), json.dumps(records[0] if len(records) == 1 else records, indent=2,
                                                     default=str))
    return JobOutcome(rows, warnings, results_dir)


def local_models(config: EvalConfig, names: Names) -> tuple[list[LoadedModel] | None, str | None]:
    """The models read from local files and the dataset (a checkpoint's own); no models for a zoo model."""
    if config.checkpoint is not None:
        models = sources.from_checkpoint_subnets(config.checkpoint, data_root=config.data_root,
                                                 subnets=None if config.subnet is None else [config.subnet])
        if config.dataset is not None and config.dataset != models[0].dataset:
            raise UserError(f"{names.value('dataset', config.dataset)}: the checkpoint was trained on "
                            f"{models[0].dataset}")
        if config.name:  # keep the sub-net suffix: one results key per sub-net
            for model in models:
                model.name = config.name + model.suffix
        return models, models[0].dataset
    if config.model is not None:
        model = sources.from_factory(config.model, config.dataset, config.weights, config.weights_key,
                                     config.model_kwargs)
    elif config.arch is not None:
        model = sources.from_weights(config.arch, config.weights, config.dataset)
    else:
        return None, config.dataset
    if config.name:
        model.name = config.name
    return [model], config.dataset


def _inference_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> dict[str, float | None]:
    """One example's forward FLOPs at the model's zero pattern, and against dense (robust_sparse.flops); None for
    a model FlopCounterMode cannot run (a foreign model may use operations it does not know): it still evaluates."""
    try:
        return inference_flops(model, input_shape)
    except Exception as error:  # noqa: BLE001 - any failure of the count must not stop the evaluation
        log.warning("inference FLOPs not counted for this model (%s: %s)", type(error).__name__, error)
        return {"inference_flops": None, "inference_flops_vs_dense": None}


def _row(loaded: LoadedModel, norm: str, device: torch.device, evaluation: Evaluation, stats: dict[str, Any],
         fingerprints: dict[str, str], state: Path) -> dict[str, Any]:
    pgd = evaluation.outcome("pgd")
    autoattack = evaluation.outcome("autoattack")
    row: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": loaded.name, "source": loaded.source, "path": loaded.path, "architecture": loaded.architecture,
        "dataset": loaded.dataset, "threat_model": threat_label(norm), "eps": evaluation.eps,
        "train_images": loaded.train_images, "epochs": loaded.epochs, "epoch": loaded.epoch,
        "selection": loaded.selection, "estimator": loaded.estimator,
        "n_examples": evaluation.n, "seed": evaluation.seed, "batch_size": evaluation.batch_size,
        "mode": "chained" if evaluation.chained else "standalone",
        "attacks": ",".join(o.spec.key for o in evaluation.outcomes),
        "clean_acc": evaluation.clean_accuracy,
        "pgd_attack": pgd.label if pgd else None, "pgd_acc": pgd.accuracy if pgd else None,
        "autoattack_acc": autoattack.accuracy if autoattack else None,
        "worst_acc": evaluation.worst_accuracy, "per_attack": evaluation.accuracies(),
        "sparsity": stats["sparsity"], "params": stats["params"], "nonzero_params": stats["nonzero_params"],
        "train_flops": loaded.train_flops, "train_flops_vs_dense": loaded.train_flops_vs_dense,
        "inference_flops": stats["inference_flops"], "inference_flops_vs_dense": stats["inference_flops_vs_dense"],
        "wall_seconds": round(evaluation.seconds, 3), "device": device_name(device),
        "session_seconds": round(evaluation.session_seconds, 3) if evaluation.session_seconds is not None else None,
        "autoattack_backend": evaluation.autoattack_backend or None,
        "large_eps": evaluation.probe["eps"] if evaluation.probe else None,
        "large_eps_acc": evaluation.probe["accuracy"] if evaluation.probe else None,
        "warnings": list(evaluation.warnings), "model_fingerprint": fingerprints["model_fingerprint"],
        "data_fingerprint": fingerprints["data_fingerprint"], "flags_file": str(state),
        "torch_version": torch.__version__,
    }
    summary = cross_check_summary(evaluation)
    if summary is not None:
        row["cross_check"] = summary
    return row


def wall_time(row: dict[str, Any]) -> str:
    """This command's seconds, and the total over the interrupted attempts it resumed when they differ (the
    store's ``wall_seconds`` is that total)."""
    total, session = float(row["wall_seconds"]), row.get("session_seconds")
    if session is None or abs(total - float(session)) < 0.5:
        return f"{total:.1f} s"
    return f"{float(session):.1f} s this run, {total:.1f} s over all attempts"


def format_row(row: dict[str, Any]) -> str:
    """The lines ``robust-sparse eval`` prints for one row."""
    lines = [f"{row['model']} on {row['dataset']} ({row['n_examples']} points, {row['threat_model']} "
             f"eps={row['eps']:.4g}, seed {row['seed']}, {wall_time(row)} on {row['device']}): "
             f"clean accuracy {row['clean_acc']:.4f}"]
    for label, value in row["per_attack"].items():
        lines.append(f"  {label:<24} {value:.4f}")
    if len(row["per_attack"]) > 1:
        lines.append(f"  {'worst case':<24} {row['worst_acc']:.4f}")
    lines.append(f"  sparsity {row['sparsity']:.4f}, {row['nonzero_params']:,} non-zero of {row['params']:,} parameters")
    check = row.get("cross_check")
    if check:
        lines.append(f"  cross-check: torchattacks-AA (configured to match) {check['torchattacks_acc']:.4f} vs "
                     f"original AutoAttack {check['autoattack_acc']:.4f}: difference {check['difference']:+.4f} "
                     f"({check['points_disagreeing']} points disagree)")
    for warning in row["warnings"]:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def run_corruptions_job(config: EvalConfig) -> JobOutcome:
    """An :class:`~robust_sparse.eval.config.EvalConfig` with ``threat_model: corruptions`` (validated: no radius
    or attacks): clean accuracy on the test points, then every corruption and severity; one row per model into
    the results store."""
    from robust_sparse.distributed import resolve_device
    from robust_sparse.eval.corruptions import (SEVERITIES, check_files, default_corruptions,
                                                evaluate_model)

    models, dataset = local_models(config, Names())
    first = models[0] if models else None
    root = config.data_root or (first.data_root if first else None) or "data"
    corruptions = tuple(config.corruptions) if config.corruptions else default_corruptions()
    severities = tuple(config.severities) if config.severities else SEVERITIES
    n = check_files(root, dataset, corruptions, severities, config.n_examples)  # before any model download
    images, labels = points.load_points(dataset, n, root=root, download=config.download, data_file=config.data_file)
    if models is None:
        models = [sources.from_robustbench(config.robustbench_model, dataset, "linf", config.model_dir)]
        if config.name:
            models[0].name = config.name
    results_dir = default_results_dir(config)
    device = resolve_device(config.device.value)
    rows = []
    for loaded in models:
        rows.append(evaluate_model(loaded, images, labels, root, dataset, corruptions, severities, n,
                                   config.batch_size, device, results_dir))
    if config.output:
        write_atomic(Path(config.output), json.dumps(rows[0] if len(rows) == 1 else rows, indent=2, default=str))
    return JobOutcome(rows, [], results_dir)


def autoattack_checkpoint(checkpoint: str | Path, n_examples: int, *, device: torch.device,
                          progress: bool = False, seed: int = 0) -> EvalOutcome:
    """PGD at the checkpoint's own setting, then the original AutoAttack (standard), on the first ``n_examples``
    test points of a robust-sparse checkpoint, at its evaluation eps, into ``<run dir>/eval`` (resumable from the
    per-point flags there). The PGD row makes the store hold both numbers a report shows for the same points.

    What ``robust-sparse train`` runs after training when ``eval.autoattack_examples`` is set. AST checkpoints
    give one row per sub-net, as ``robust-sparse eval`` does.
    """
    from robust_sparse.datasets.splits import dataset_info
    from robust_sparse.eval.points import load_points
    from robust_sparse.eval.sources import from_checkpoint_subnets
    from robust_sparse.eval.specs import parse_attacks

    checkpoint = Path(checkpoint)
    models = from_checkpoint_subnets(checkpoint)
    first = models[0]
    images, labels = load_points(first.dataset, n_examples, root=first.data_root or "data", data=first.data)
    attacks = parse_attacks(f"pgd-{first.pgd_steps or 20}x{first.restarts or 1},autoattack")
    protocol = Protocol(norm=first.norm or "linf", eps=(first.eps,), attacks=tuple(attacks), seeds=(seed,))
    outcome = EvalOutcome([], [], [])
    for loaded in models:
        result = run(loaded, images, labels, protocol, checkpoint.parent / "eval", device=device,
                     num_classes=dataset_info(first.data).num_classes, progress=progress)
        outcome.rows += result.rows
        outcome.evaluations += result.evaluations
        outcome.warnings += result.warnings
    return outcome
