"""One ``robust-sparse eval`` invocation: a model, its test points, a suite of attacks at one or more eps.

For every eps it runs :func:`robust_sparse.eval.runner.evaluate` (resuming from saved flags), applies the
gradient-masking checks, appends a row to the results store and, when asked, compares the original
AutoAttack with ``torchattacks.AutoAttack`` configured to match on the same points.

:func:`run_job` is the whole command once its flags are checked (:class:`EvalJob`): which models to load (every
sub-net of an AST checkpoint), the test points, the protocol a checkpoint carries unless a flag overrides it,
the results store, and the ``--output`` file. The CLI only parses, checks flags and prints.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robust_sparse import rundir
from robust_sparse.checkpoint import write_atomic
from robust_sparse.config import DatasetName
from robust_sparse.errors import UserError
from robust_sparse.eval import loading, sanity
from robust_sparse.eval.loading import LoadedModel, data_fingerprint, model_fingerprint, sparsity_stats, threat_label
from robust_sparse.eval.runner import Evaluation, evaluate
from robust_sparse.eval.specs import AttackSpec
from robust_sparse.eval.store import append_result, flags_path
from robust_sparse.flops import inference_flops

log = logging.getLogger(__name__)


@dataclass
class EvalRequest:
    loaded: LoadedModel
    images: torch.Tensor  # float [N, C, H, W] in [0, 1], CPU
    labels: torch.Tensor
    norm: str
    eps: list[float]
    attacks: list[AttackSpec]
    num_classes: int
    results_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    batch_size: int = 500
    chained: bool = False
    resume: bool = True
    progress: bool = False
    autoattack_backend: str = "auto"
    large_eps: float | str | None = "auto"  # the gradient-masking probe's eps; None: no probe
    cross_check: bool = False


@dataclass
class EvalOutcome:
    rows: list[dict[str, Any]]
    evaluations: list[Evaluation]
    warnings: list[str]  # across eps (non-monotone accuracy)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


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


def default_results_dir(job: "EvalJob") -> Path:
    """Where an evaluation's store goes: ``--results-dir``, else beside the checkpoint, else runs/eval."""
    if job.results_dir:
        return Path(job.results_dir)
    if job.checkpoint is not None:
        return Path(job.checkpoint).parent / "eval"
    return Path("runs") / "eval"


def run(request: EvalRequest) -> EvalOutcome:
    """The request's evaluations, its results store locked meanwhile (one writer per store)."""
    with rundir.locked(request.results_dir, rundir.Kind.EVAL, "--results-dir"):
        return _run(request)


def _run(request: EvalRequest) -> EvalOutcome:
    loaded, device = request.loaded, request.device
    if request.cross_check and request.chained:
        raise UserError("--cross-check-torchattacks compares standalone attacks: drop --chained")
    model = loaded.model.to(device).eval()
    attacks = cross_check_attacks(request.attacks) if request.cross_check else list(request.attacks)
    images, labels = request.images.to(device), request.labels.to(device)
    fingerprints = {"model_fingerprint": model_fingerprint(model),
                    "data_fingerprint": data_fingerprint(request.images, request.labels),
                    "autoattack_backend": request.autoattack_backend}
    stats = {**sparsity_stats(model), **_inference_flops(model, tuple(request.images.shape[1:]))}
    threat = threat_label(request.norm)
    rows, evaluations = [], []
    for eps in request.eps:
        # The file is keyed by what determines its flags (model, points, eps, seed, mode); the attack list, the
        # batch size and the probe are keys inside it (runner.attack_state_key), so changing them reuses it.
        where = dict(model=loaded.name, dataset=loaded.dataset.value, threat_model=threat, eps=eps)
        state = flags_path(request.results_dir, **where, settings={
            **fingerprints, "n": len(labels), "seed": request.seed, "chained": request.chained})
        legacy = flags_path(request.results_dir, **where, settings={  # the layout before: one file per suite
            **fingerprints, "large_eps": request.large_eps, "n": len(labels), "seed": request.seed,
            "batch_size": request.batch_size, "chained": request.chained, "attacks": [a.key for a in attacks]})
        if not request.resume:
            for path in (state, legacy):
                path.unlink(missing_ok=True)
        evaluation = evaluate(
            model, images, labels, norm=request.norm, eps=eps, attacks=attacks, batch_size=request.batch_size,
            seed=request.seed, chained=request.chained, num_classes=request.num_classes, state_path=state,
            settings=fingerprints, legacy_state_path=legacy, progress=request.progress,
            autoattack_backend=request.autoattack_backend, large_eps=request.large_eps,
        )
        row = _row(request, evaluation, stats, fingerprints, state)
        append_result(request.results_dir, row)
        rows.append(row)
        evaluations.append(evaluation)
    across = sanity.check_monotone(evaluations) if len(evaluations) > 1 else []
    for warning in across:
        log.warning("%s", warning)
    return EvalOutcome(rows, evaluations, across)


@dataclass
class EvalJob:
    """One ``robust-sparse eval``, every flag already checked. None: the checkpoint's value, else the default."""

    # the model: exactly one of checkpoint, robustbench_model, arch (with weights) and factory
    checkpoint: str | None = None
    robustbench_model: str | None = None
    arch: str | None = None
    factory: str | None = None  # FILE.py:FACTORY or module:FACTORY, or torchvision:NAME / timm:NAME
    factory_kwargs: dict[str, Any] = field(default_factory=dict)  # --model-kwargs
    weights: str | None = None
    weights_key: str | None = None
    subnet: int | None = None  # AST checkpoints: one sub-net; None: every sub-net, one row each
    model_dir: str | None = None  # RobustBench weights
    name: str | None = None  # the results key
    # the test points
    dataset: DatasetName | None = None
    n_examples: int | None = None
    data_root: str | None = None
    data_file: str | None = None
    download: bool = False
    # the protocol
    threat: str | None = None  # "linf" or "l2"
    eps: list[float] | None = None
    attacks: str = "pgd,autoattack"
    pgd_steps: int | None = None  # of a bare "pgd"
    restarts: int | None = None
    probe: bool = True
    large_eps: float | None = None  # None with probe: the default for the threat model and image shape
    # the run
    device: str = "auto"
    seed: int = 0
    batch_size: int = 500
    chained: bool = False
    resume: bool = True
    progress: bool = True
    autoattack_backend: str = "auto"
    cross_check: bool = False
    # the corruptions track (threat "corruptions"): None is RobustBench's 15 corruptions, severities 1-5
    corruptions: list[str] | None = None
    severities: list[int] | None = None
    results_dir: str | None = None  # None: <run dir>/eval for a checkpoint, else runs/eval
    output: str | None = None  # also write the rows here as JSON


@dataclass
class JobOutcome:
    rows: list[dict[str, Any]]
    warnings: list[str]  # across eps (non-monotone accuracy)
    results_dir: Path


def run_job(job: EvalJob) -> JobOutcome:
    """Local models first (a checkpoint names the dataset), then the test points, then a zoo model (maybe a
    download): a missing dataset never costs a download. Each model's rows go to the results store."""
    from robust_sparse.data import DATASETS, dataset_info
    from robust_sparse.eval.specs import parse_attacks
    from robust_sparse.distributed import resolve_device

    if job.threat == "corruptions":
        from robust_sparse.eval.corruptions import run_corruptions_job

        return run_corruptions_job(job)
    models, dataset = _local_models(job)
    first = models[0] if models else None
    images, labels = loading.load_points(
        dataset, job.n_examples or (first.n_examples if first else None),
        root=job.data_root or (first.data_root if first else None) or "data", download=job.download,
        data_file=job.data_file, data=first.data if first else None)
    if models is None:
        models = [loading.from_robustbench(job.robustbench_model, dataset, job.threat or "linf", job.model_dir)]
        first = models[0]
        if job.name:
            first.name = job.name

    # the protocol: the checkpoint's threat model and settings unless a flag says otherwise
    norm = job.threat or first.norm or "linf"
    eps_values = job.eps if job.eps is not None else [
        first.eps if first.eps is not None and norm == first.norm else loading.PROTOCOL_EPS[(dataset, norm)]]
    for eps in eps_values:
        if norm == "linf" and eps > 1:
            raise UserError(f"--eps {eps:.4g}: must be <= 1 for linf (inputs are in [0, 1])")
    attacks = parse_attacks(job.attacks, default_steps=job.pgd_steps or first.pgd_steps or 50,
                            default_restarts=job.restarts or first.restarts or 10)
    if not attacks:
        raise UserError(f"attacks {job.attacks!r}: name at least one attack, e.g. pgd,autoattack")
    large_eps = job.large_eps
    if job.probe and large_eps is None:
        info = dataset_info(first.data) if first.data is not None else DATASETS[dataset]
        large_eps = sanity.default_large_eps(norm, (info.in_channels, info.image_size, info.image_size))
    results_dir = default_results_dir(job)

    device = resolve_device(job.device)
    rows, warnings = [], []
    for loaded in models:
        outcome = run(EvalRequest(
            loaded=loaded, images=images, labels=labels, norm=norm, eps=eps_values, attacks=attacks,
            num_classes=(dataset_info(loaded.data) if loaded.data is not None else DATASETS[loaded.dataset]).num_classes,
            results_dir=results_dir, device=device, seed=job.seed,
            batch_size=job.batch_size, chained=job.chained, resume=job.resume, progress=job.progress,
            autoattack_backend=job.autoattack_backend, large_eps=large_eps, cross_check=job.cross_check,
        ))
        rows += outcome.rows
        warnings += outcome.warnings
    if job.output:
        records = [{**row, "checkpoint": job.checkpoint, "epoch": first.epoch, "norm": norm,
                    "clean_accuracy": row["clean_acc"], "pgd_accuracy": row["pgd_acc"],
                    "autoattack_accuracy": row["autoattack_acc"], "worst_case_accuracy": row["worst_acc"]}
                   for row in rows]
        write_atomic(Path(job.output), json.dumps(records[0] if len(records) == 1 else records, indent=2,
                                                  default=str))
    return JobOutcome(rows, warnings, results_dir)


def _local_models(job: EvalJob) -> tuple[list[LoadedModel] | None, DatasetName | None]:
    """The models read from local files and the dataset (a checkpoint's own); no models for a zoo model."""
    if job.checkpoint is not None:
        models = loading.from_checkpoint_subnets(job.checkpoint, data_root=job.data_root,
                                                 subnets=None if job.subnet is None else [job.subnet])
        if job.dataset is not None and job.dataset is not models[0].dataset:
            raise UserError(f"--dataset {job.dataset.value}: the checkpoint was trained on {models[0].dataset.value}")
        if job.name:  # keep the sub-net suffix: one results key per sub-net
            for model in models:
                model.name = job.name + model.suffix
        return models, models[0].dataset
    if job.factory is not None:
        model = loading.from_factory(job.factory, job.dataset, job.weights, job.weights_key, job.factory_kwargs)
    elif job.arch is not None:
        model = loading.from_weights(job.arch, job.weights, job.dataset)
    else:
        return None, job.dataset
    if job.name:
        model.name = job.name
    return [model], job.dataset


def _inference_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> dict[str, float | None]:
    """One example's forward FLOPs at the model's zero pattern, and against dense (robust_sparse.flops); None for
    a model FlopCounterMode cannot run (a foreign model may use operations it does not know): it still evaluates."""
    try:
        return inference_flops(model, input_shape)
    except Exception as error:  # noqa: BLE001 - any failure of the count must not stop the evaluation
        log.warning("inference FLOPs not counted for this model (%s: %s)", type(error).__name__, error)
        return {"inference_flops": None, "inference_flops_vs_dense": None}


def _row(request: EvalRequest, evaluation: Evaluation, stats: dict[str, Any], fingerprints: dict[str, str],
         state: Path) -> dict[str, Any]:
    loaded = request.loaded
    pgd = evaluation.outcome("pgd")
    autoattack = evaluation.outcome("autoattack")
    row: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": loaded.name, "source": loaded.source, "path": loaded.path, "architecture": loaded.architecture,
        "dataset": loaded.dataset.value, "threat_model": threat_label(request.norm), "eps": evaluation.eps,
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
        "wall_seconds": round(evaluation.seconds, 3), "device": device_name(request.device),
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


def format_row(row: dict[str, Any]) -> str:
    """The lines ``robust-sparse eval`` prints for one row."""
    lines = [f"{row['model']} on {row['dataset']} ({row['n_examples']} points, {row['threat_model']} "
             f"eps={row['eps']:.4g}, seed {row['seed']}, {row['wall_seconds']:.1f} s on {row['device']}): "
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


def autoattack_checkpoint(checkpoint: str | Path, n_examples: int, *, device: torch.device,
                          progress: bool = False, seed: int = 0) -> EvalOutcome:
    """The original AutoAttack (standard) on the first ``n_examples`` test points of a robust-sparse checkpoint,
    at its evaluation eps, into ``<run dir>/eval`` (resumable from the per-point flags there).

    What ``robust-sparse train`` runs after training when ``eval.autoattack_examples`` is set. AST checkpoints
    give one row per sub-net, as ``robust-sparse eval`` does.
    """
    from robust_sparse.data import dataset_info
    from robust_sparse.eval.loading import from_checkpoint_subnets, load_points
    from robust_sparse.eval.specs import parse_attacks

    checkpoint = Path(checkpoint)
    models = from_checkpoint_subnets(checkpoint)
    first = models[0]
    images, labels = load_points(first.dataset, n_examples, root=first.data_root or "data", data=first.data)
    outcome = EvalOutcome([], [], [])
    for loaded in models:
        request = EvalRequest(loaded=loaded, images=images, labels=labels, norm=first.norm or "linf",
                              eps=[first.eps], attacks=parse_attacks("autoattack"),
                              num_classes=dataset_info(first.data).num_classes, results_dir=checkpoint.parent / "eval",
                              device=device, seed=seed, progress=progress)
        result = run(request)
        outcome.rows += result.rows
        outcome.evaluations += result.evaluations
        outcome.warnings += result.warnings
    return outcome

