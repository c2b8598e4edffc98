"""robust-sparse: train adversarially robust sparse networks and evaluate them honestly.

Commands: train, eval, export, sweep, report, configs, doctor (``robust-sparse COMMAND --help``). Every user error ends as one line on stderr and exit code 2; a diverged run exits with 3. Tracebacks are
for bugs only (``--debug`` shows them for user errors too).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from robust_sparse.files import rundir, shipped
from robust_sparse.errors import DivergenceError, ExitCode, UserError
from robust_sparse.chance import at_chance

log = logging.getLogger("robust_sparse")

QUICKSTART = shipped.path_of(shipped.QUICKSTART)  # `robust-sparse train` with no CONFIG


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + error; we promise one line
        raise UserError(f"{self.prog}: {message} (see --help)")


def _emit(text: str) -> None:
    """Command output (results, reports) goes to stdout; logs go to stderr through logging."""
    sys.stdout.write(text.rstrip("\n") + "\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("robust-sparse")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown (not installed)"


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run (default: the config's, auto)")


class _RegisteredAttacks:
    """The attack registry's names, read only when help is shown: the registry imports torch (which
    ``doctor`` must not need) and may hold attacks registered from Python after the parser was built."""

    def __str__(self) -> str:
        from robust_sparse.eval.specs import names_help

        return names_help()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robust-sparse", description=__doc__.splitlines()[0],
                     epilog="Start with `robust-sparse train` (the embedded MNIST-5k quickstart) and "
                            "`robust-sparse COMMAND --help`.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model (no CONFIG: the embedded MNIST-5k quickstart)")
    train.add_argument("config", nargs="?", help="a YAML config file, or the name of a shipped one (robust-sparse "
                                                 "configs lists them); default: the quickstart, quickstart_mnist5k")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set optim.lr=0.1 (repeatable)")
    train.add_argument("--out", help="run directory (overrides out_dir)")
    train.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config (CONFIG and every --set applied, validated) as YAML and exit")
    _add_device(train)

    evaluate = commands.add_parser(
        "eval", help="clean, PGD and AutoAttack accuracy of a model (RobustBench protocol); results appended to a store",
        description="Evaluate one model: a CHECKPOINT written by robust-sparse train, a RobustBench zoo model "
                    "(--robustbench-model), a state_dict for an architecture of the registry (--arch --weights), "
                    "or any model built by a factory of yours (--model FILE.py:FACTORY [--weights PATH]). "
                    "Points: the first n of the test split, in order. Per-point flags are saved, so a killed "
                    "evaluation resumes where it stopped.")
    evaluate.add_argument("checkpoint", nargs="?", help="a best.pt/last.pt written by robust-sparse train")
    evaluate.add_argument("--subnet", type=int, help="AST checkpoints: only this sub-net (0 = the densest; "
                                                     "default: every sub-net, one row each)")
    evaluate.add_argument("--robustbench-model", metavar="NAME", help="a RobustBench zoo entry, e.g. Standard")
    evaluate.add_argument("--model-dir",
                          help="RobustBench weights, laid out <dir>/<dataset>/<Linf|L2>/<NAME>.pt (default: models)")
    evaluate.add_argument("--arch", metavar="NAME", help="architecture of the registry for --weights, e.g. resnet18")
    evaluate.add_argument("--model", metavar="FILE.py:FACTORY",
                          help="any model: FACTORY() (in FILE.py, or package.module:FACTORY) returns an nn.Module "
                               "on [0,1] inputs that owns its normalisation; or torchvision:NAME / timm:NAME, built "
                               "as training builds it (the dataset's normalisation inside); weights from --weights")
    evaluate.add_argument("--model-kwargs", metavar="K=V,...",
                          help="keyword arguments of --model's factory, values read as YAML, e.g. "
                               "model_name=resnet18,num_classes=10 (or a mapping: '{num_classes: 10}')")
    evaluate.add_argument("--weights", metavar="PATH", help="a state_dict file for --arch or --model "
                                                            "(loaded with weights_only=True)")
    evaluate.add_argument("--weights-key", metavar="KEY",
                          help="the key of the state_dict inside the --weights file (default: the file is the "
                               "state_dict, or holds it under 'state_dict' or 'model')")
    evaluate.add_argument("--name", help="the model's name in the results (default: from the source)")
    evaluate.add_argument("--dataset", help="cifar10, cifar100, svhn, mnist5k or imagenet (default: the checkpoint's)")
    evaluate.add_argument("--data-root", help="local datasets in torchvision's layout (default: the run's, or data)")
    evaluate.add_argument("--download", action="store_true", default=None,
                          help="let torchvision download the test set")
    evaluate.add_argument("--data-file", help="evaluate on a torch file {'images', 'labels'} instead of the test set")
    evaluate.add_argument("--n-examples", type=int,
                          help="first n test points (default: the run's eval.n_examples, else 10000 or the whole set)")
    evaluate.add_argument("--threat-model", help="Linf, L2 or corruptions (CIFAR-10-C/CIFAR-100-C/ImageNet-C under "
                                                 "--data-root; default: the checkpoint's, else Linf)")
    evaluate.add_argument("--corruptions", help="--threat-model corruptions: comma-separated (default: RobustBench's 15)")
    evaluate.add_argument("--severities", help="--threat-model corruptions: comma-separated, 1-5 (default: all five)")
    evaluate.add_argument("--eps", help="radius, e.g. 8/255, or several: 2/255,4/255,8/255 "
                                        "(default: the run's; else 8/255 Linf / 0.5 L2 on CIFAR and SVHN)")
    attacks = evaluate.add_argument("--attacks", help="comma-separated, run in order (default: pgd,autoattack); "
                                                      "pgd and cw take :step=SIZE and :start=zero, e.g. "
                                                      "pgd-20x1:step=2/255:start=zero;")
    # argparse fills %(registered)s from the action's attributes when help is shown; added after add_argument,
    # which checks the help string's placeholders on newer Pythons
    attacks.registered = _RegisteredAttacks()
    attacks.help += " %(registered)s"
    evaluate.add_argument("--pgd-steps", type=int, help="steps of a bare 'pgd' (default: the run's, else 50)")
    evaluate.add_argument("--restarts", type=int, help="restarts of a bare 'pgd' (default: the run's, else 10)")
    evaluate.add_argument("--seed", type=int, action="append", metavar="SEED",
                          help="an attack seed: fixes every random start, AutoAttack's too (default 0); repeat it "
                               "for several, each a full run of the attacks and a row of its own, and their spread")
    evaluate.add_argument("--seeds", metavar="S,...", help="several attack seeds at once, e.g. 0,1,2 (as --seed)")
    evaluate.add_argument("--batch-size", type=int, help="points per attack batch (default 500)")
    evaluate.add_argument("--chained", action="store_true", default=None,
                          help="attack only points every previous attack left robust (faster; per-attack numbers "
                               "become cumulative)")
    evaluate.add_argument("--autoattack-backend", choices=["auto", "pyautoattack", "github"],
                          help="the original AutoAttack's API: GitHub autoattack if installed, else pyautoattack")
    evaluate.add_argument("--cross-check-torchattacks", action="store_true", default=None,
                          help="also run torchattacks.AutoAttack configured to match and report the difference")
    evaluate.add_argument("--large-eps", help="eps of the gradient-masking probe (default: 0.5 Linf; L2: the ball "
                                              "around that Linf ball)")
    evaluate.add_argument("--no-probe", action="store_true", default=None,
                          help="skip the large-eps gradient-masking probe")
    evaluate.add_argument("--results-dir", help="results store (default: <run dir>/eval for a checkpoint, else runs/eval)")
    evaluate.add_argument("--fresh", action="store_true", default=None,
                          help="discard saved per-point flags instead of resuming")
    evaluate.add_argument("--output", help="also write the result as JSON here")
    evaluate.add_argument("--no-progress", action="store_true", default=None, help="no progress bars")
    evaluate.add_argument("--config", metavar="FILE.yaml", help="the evaluation's settings as YAML: the fields of "
                          "robust_sparse.eval.config.EvalConfig (each flag is one of them, e.g. batch_size: 100)")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a field of the evaluation's config, e.g. --set seeds=0,1,2 (repeatable)")
    _add_device(evaluate)

    report = commands.add_parser("report", help="Markdown tables and plots from results stores (robust accuracy "
                                                "vs sparsity, against the leaderboard) or from a sweep directory "
                                                "(mean ± std over seeds, γ sensitivity, convergence)")
    report.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR", help="stores written by robust-sparse eval")
    report.add_argument("--out", help="where report.md and the plots go (default: a new folder beside the first "
                                      "RESULTS_DIR, or beside the run it belongs to: NAME-report)")
    report.add_argument("--leaderboard", help="a leaderboard CSV to use instead of the shipped one")
    report.add_argument("--exports", nargs="+", default=[], metavar="EXPORT_DIR",
                        help="dynamic AST exports (robust-sparse export of an AST checkpoint) whose measured "
                             "per-sub-net latency the AST trade-off plot shows beside density")
    report.add_argument("--thresholds", help="sweep reports: validation clean accuracies whose first epoch to report, "
                                             "comma-separated (default 0.5,0.7,0.8,0.9)")
    report.add_argument("--robust-thresholds", help="sweep reports: the same for validation PGD accuracy "
                                                    "(default 0.3,0.5,0.7,0.8)")
    report.add_argument("--reference", action="append", metavar="KEY=VALUE",
                        help="sweep reports: the setting paired differences are taken against, e.g. "
                             "sparsity.method=bsrnet (repeat for several keys; default agent.gamma=0)")
    report.add_argument("--correction", choices=["holm", "bh", "none"], default="holm",
                        help="sweep reports: how the p-values of the paired intervals are adjusted for many "
                             "comparisons: holm (family-wise error, the default), bh (false discovery rate), none")
    report.add_argument("--family", choices=["split", "metric", "report"], default="split",
                        help="sweep reports: which intervals are corrected together: split (the test-set intervals, "
                             "and the validation ones apart; the default), metric (one metric across settings), "
                             "report (all of them)")
    report.add_argument("--test-n", type=int, metavar="N",
                        help="a stored report's runs.csv (RESULTS_DIR = .../runs.csv): the test points its test "
                             "accuracies were measured on, where it does not say")

    export = commands.add_parser("export", help="write a sparse checkpoint as a plain state_dict, a compact file, "
                                                "safetensors and a sparse-inference model (an AST checkpoint: one "
                                                "dynamic model of every sub-net)")
    export.add_argument("checkpoint", help="a best.pt/last.pt written by robust-sparse train")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--subnet", type=int, help="AST checkpoints: only this sub-net (0 = the densest); without "
                                                   "it, one dynamic model that switches between all of them")
    export.add_argument("--hub", action="store_true",
                        help="also a Hugging Face Hub-style folder OUT/hub (config.json, model.safetensors, a model "
                             "card with the evaluation table); nothing is uploaded")
    export.add_argument("--onnx", action="store_true", help="also OUT/model.onnx, checked against PyTorch with "
                                                            "onnxruntime when installed")
    export.add_argument("--serving-batch", type=int, default=32, metavar="N",
                        help="AST dynamic export: the batch size of the serving latency measured per sub-net "
                             "(besides batch 1; default 32)")
    export.add_argument("--robustbench", metavar="NAME",
                        help="instead: RobustBench's zoo layout, OUT/<dataset>/<Linf|L2>/NAME.pt and a model-info "
                             "NAME.json (accuracies from the run's results store); load it with "
                             "robust_sparse.eval.zoo.register and robustbench.utils.load_model")
    export.add_argument("--results-dir", help="--robustbench: the results store to read accuracies from "
                                              "(default: <run dir>/eval)")
    export.add_argument("--force", action="store_true",
                        help="--robustbench: replace files at OUT/<dataset>/<Linf|L2>/NAME.* that robust-sparse "
                             "export did not write, and allow a name of RobustBench's own zoo")

    sweep = commands.add_parser("sweep", help="train (and evaluate) every run of a sweep file; resumable")
    sweep.add_argument("sweep_file", help="a shipped sweep's name (robust-sparse configs) or a YAML file: base, "
                                          "overrides, grid, random, out_dir, parallel, threads, backend, "
                                          "devices, slurm, eval (an evaluation stage: attacks, n_examples, eps, "
                                          "attack_seeds, batch_size, probe, and seeds: the training seeds of the "
                                          "runs to evaluate; or threat_model: corruptions, corruptions, severities)")
    sweep.add_argument("--out", help="sweep directory (overrides out_dir)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="prepare the run directories and list them only (backend slurm: also the submitit "
                            "parameters and each job's command, checked)")
    sweep.add_argument("--no-eval", action="store_true", help="train only: skip the sweep file's evaluation stage")
    sweep.add_argument("--yes", action="store_true", help="start a sweep of more than 256 runs")

    configs = commands.add_parser("configs", help="list the configs shipped with the package, or print one")
    configs.add_argument("name", nargs="?", help="print this shipped config (to copy and edit)")

    doctor = commands.add_parser("doctor", help="check the installed stack and say how to fix it")
    doctor.add_argument("--fix", action="store_true", help="apply the automatic fixes (pip commands, alias)")
    return parser


#: Path arguments of each command (argparse dest -> how the user spells it); an empty string is refused for each.
PATH_FLAGS = {
    "train": {"config": "CONFIG", "out": "--out"},
    "eval": {"checkpoint": "CHECKPOINT", "config": "--config", "model_dir": "--model-dir", "model": "--model",
             "weights": "--weights", "data_root": "--data-root", "data_file": "--data-file", "results_dir": "--results-dir",
             "output": "--output"},
    "report": {"out": "--out", "leaderboard": "--leaderboard"},
    "export": {"checkpoint": "CHECKPOINT", "out": "--out"},
    "sweep": {"sweep_file": "SWEEP_FILE", "out": "--out"},
}


def _refuse_empty_paths(args: argparse.Namespace) -> None:
    """``--out ""`` would mean the current directory (or, for train, the config's out_dir): refused instead."""
    for dest, flag in PATH_FLAGS.get(args.command, {}).items():
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            raise UserError(f"{flag}: must not be empty (give a path)")
    if args.command == "report" and any(not d.strip() for d in args.results_dirs):
        raise UserError("RESULTS_DIR: must not be empty (give a path)")


def _train(args: argparse.Namespace) -> int:
    # a name is looked up before the config stack (and torch) is imported: an unknown one fails at once
    config_file = shipped.resolve(args.config, "CONFIG") if args.config else QUICKSTART
    from robust_sparse.config import load_config
    from robust_sparse.train import fit

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.out is not None:
        overrides.append(f"out_dir={args.out}")
    config = load_config(config_file, overrides)
    if args.print_config:
        import yaml

        from robust_sparse.config import to_dict

        _emit(yaml.safe_dump(to_dict(config), sort_keys=False))
        return ExitCode.OK
    progress = not args.no_progress  # a bar on a terminal, periodic log lines in a file (robust_sparse.progress)
    result = fit(config, resume=args.resume, progress=progress)
    from robust_sparse.distributed import rank_and_world_size

    if rank_and_world_size()[0] != 0:  # under torchrun rank 0 reports the run (and runs AutoAttack) once
        return ExitCode.OK
    _emit(result.metrics.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if result.evaluation:
        _emit(_format_evaluation(result.evaluation))
    best = result.run_dir / "best.pt"
    if config.eval.autoattack_examples and best.is_file():
        _emit(_autoattack_after_training(best, config, progress))
    note = chance_note(config, result.metrics, result.evaluation)
    if note:
        _emit(f"warning: {note}")
    _emit(f"run directory: {result.run_dir}")
    return ExitCode.OK


def chance_note(config, metrics, evaluation: dict | None) -> str | None:
    """A run that ends at or below chance (the divergence rule's: accuracy below 1/classes + its margin) says so:
    its robust accuracy means nothing."""
    from robust_sparse.datasets.splits import dataset_info

    classes = dataset_info(config.data).num_classes
    margin = config.divergence.chance_margin  # the run's own: the rule training stopped on (robust_sparse.chance)
    measured = []
    if evaluation:
        measured.append(("test clean accuracy", evaluation["clean_accuracy"]))
    if len(metrics) and "val_clean_accuracy" in metrics:
        measured.append(("final validation clean accuracy", float(metrics["val_clean_accuracy"].iloc[-1])))
    low = [f"{what} {value:.4f}" for what, value in measured if at_chance(value, classes, margin)]
    if not low:
        return None
    return (f"{' and '.join(low)} at or below chance (1/{classes} = {1 / classes:.2f}, + margin "
            f"{config.divergence.chance_margin}): the model has learned nothing yet and its robust accuracy means "
            "nothing; train longer or check the learning rate and the data")


def _autoattack_after_training(best: Path, config, progress: bool) -> str:
    """The original AutoAttack on best.pt: the number published tables report, kept apart from the training loop."""
    from robust_sparse.eval import job
    from robust_sparse.distributed import resolve_device

    n = config.eval.autoattack_examples
    log.info("PGD, then AutoAttack (standard, original implementation) on the first %d test points of %s", n, best)
    outcome = job.autoattack_checkpoint(best, n, device=resolve_device(config.device), progress=progress)
    lines = []
    for row in outcome.rows:
        lines.append(f"AutoAttack standard ({row['n_examples']} points, {row['threat_model']} eps={row['eps']:.4g}, "
                     f"{row['wall_seconds'] / 60:.1f} min): clean accuracy {row['clean_acc']:.4f}, "
                     f"{row['pgd_attack']} accuracy {row['pgd_acc']:.4f}, AutoAttack accuracy "
                     f"{row['autoattack_acc']:.4f}" + (f" [{row['model']}]" if len(outcome.rows) > 1 else ""))
        lines += [f"  warning: {warning}" for warning in row["warnings"]]
    lines.append(f"AutoAttack results: {best.parent / 'eval' / 'results.csv'}")
    return "\n".join(lines)


def _format_evaluation(evaluation: dict) -> str:
    return (f"test ({evaluation['n_examples']} points, {evaluation['norm']} eps={evaluation['eps']:.4g}): "
            f"clean accuracy {evaluation['clean_accuracy']:.4f}, "
            f"PGD-{evaluation['pgd_steps']}x{evaluation['restarts']} accuracy {evaluation['pgd_accuracy']:.4f}")


#: ``robust-sparse eval``'s flags: argparse dest -> (the EvalConfig field it sets, the flag as the user spells it).
#: Each flag is a spelling of one field (robust_sparse/eval/config.py); errors about it name the flag.
EVAL_FLAGS = {
    "checkpoint": ("checkpoint", "CHECKPOINT"), "subnet": ("subnet", "--subnet"),
    "robustbench_model": ("robustbench_model", "--robustbench-model"), "model_dir": ("model_dir", "--model-dir"),
    "arch": ("arch", "--arch"), "model": ("model", "--model"), "weights": ("weights", "--weights"),
    "weights_key": ("weights_key", "--weights-key"), "name": ("name", "--name"), "dataset": ("dataset", "--dataset"),
    "data_root": ("data_root", "--data-root"), "download": ("download", "--download"),
    "data_file": ("data_file", "--data-file"), "n_examples": ("n_examples", "--n-examples"),
    "threat_model": ("threat_model", "--threat-model"), "corruptions": ("corruptions", "--corruptions"),
    "severities": ("severities", "--severities"), "eps": ("eps", "--eps"), "attacks": ("attacks", "--attacks"),
    "pgd_steps": ("pgd_steps", "--pgd-steps"), "restarts": ("restarts", "--restarts"),
    "batch_size": ("batch_size", "--batch-size"), "chained": ("chained", "--chained"),
    "autoattack_backend": ("autoattack_backend", "--autoattack-backend"),
    "cross_check_torchattacks": ("cross_check", "--cross-check-torchattacks"),
    "large_eps": ("large_eps", "--large-eps"), "no_probe": ("probe", "--no-probe"),
    "results_dir": ("results_dir", "--results-dir"), "fresh": ("resume", "--fresh"), "output": ("output", "--output"),
    "no_progress": ("progress", "--no-progress"), "device": ("device", "--device"),
}
NEGATED_FLAGS = ("no_probe", "fresh", "no_progress")  # store_true flags that set their field to False


def _eval_flags(args: argparse.Namespace) -> tuple[dict[str, object], dict[str, str]]:
    """The flags given, as EvalConfig fields (field -> value), and every field's flag. Text is passed as typed (the
    config's parser reads numbers and lists from it); the seed flags and --model-kwargs' NAME=VALUE are read here."""
    from robust_sparse.eval import sources

    flags: dict[str, object] = {}
    spellings = {key: flag for key, flag in EVAL_FLAGS.values()}
    spellings.update(seeds="--seeds" if args.seeds is not None else "--seed", model_kwargs="--model-kwargs")
    for dest, (key, flag) in EVAL_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            flags[key] = False if dest in NEGATED_FLAGS else value
    if "dataset" in flags:  # spelled in any case on the command line, as before
        flags["dataset"] = str(args.dataset).strip().lower()
    if args.seed is not None and args.seeds is not None:
        raise UserError("--seed and --seeds: give the attack seeds one way (--seeds 0,1,2 or --seed 0 --seed 1)")
    if args.seed is not None or args.seeds is not None:
        flags["seeds"] = list(args.seed) if args.seed is not None else args.seeds
    if args.model_kwargs is not None:  # EvalConfig's rules check that it goes with --model
        flags["model_kwargs"] = sources.parse_kwargs(args.model_kwargs, "--model-kwargs")
    return flags, spellings


def _eval(args: argparse.Namespace) -> int:
    """Every flag is checked first, then the test points are read, then the model is built: a bad value or a
    missing dataset never costs a model download or an attack, and never leaves a file behind."""
    from robust_sparse.eval import job
    from robust_sparse.eval.config import check_eval, load_eval_config

    # 1. the config: the file, the flags, the overrides; every rule (robust_sparse/eval/config.py)
    config, names = load_eval_config(args.config, args.overrides, *_eval_flags(args))
    config = check_eval(config, names)
    # 2. the models, the test points, the attacks (robust_sparse/eval/job.py)
    outcome = job.run_job(config, names)
    for row in outcome.rows:
        if row["threat_model"] == "corruptions":
            from robust_sparse.eval.corruptions import format_row

            _emit(format_row(row))
            continue
        _emit(job.format_row(row))
    for warning in outcome.warnings:
        _emit(f"warning: {warning}")
    if len(config.seeds) > 1:
        from robust_sparse.eval.spread import format_spread

        _emit(format_spread(outcome.spread))
    results_dir = outcome.results_dir
    _emit(f"results: {results_dir / 'results.csv'} (and results.json; per-point flags in {results_dir / 'flags'})")
    return ExitCode.OK


def _reference(items: list[str] | None) -> dict | None:
    """``--reference KEY=VALUE`` (repeatable) as {key: value}; None when not given."""
    if not items:
        return None
    from robust_sparse.studies.report import _parse_items

    for item in items:
        if "=" not in item or not item.partition("=")[0].strip():
            raise UserError(f"report --reference {item!r}: expected KEY=VALUE, e.g. agent.gamma=0")
    return _parse_items(items, "report --reference", strict=True)


def _levels(args: argparse.Namespace) -> dict[str, tuple[float, ...]]:
    """``--thresholds`` and ``--robust-thresholds`` as tuples of floats (only those given)."""
    from robust_sparse.config import coerce

    return {name: tuple(coerce(part, float, f"--{name.replace('_', '-')}") for part in text.split(",") if part.strip())
            for name, text in (("thresholds", args.thresholds), ("robust_thresholds", args.robust_thresholds))
            if text is not None}


def _report(args: argparse.Namespace) -> int:
    from robust_sparse.config.validation import MAX_EXAMPLES
    from robust_sparse.eval.report import build_report

    if args.test_n is not None and not 1 <= args.test_n <= MAX_EXAMPLES:  # a count of test points
        raise UserError(f"report --test-n {args.test_n}: must be in 1..{MAX_EXAMPLES}")
    stored = [Path(d).name == "runs.csv" and Path(d).is_file() for d in args.results_dirs]
    if any(stored):  # a report's stored runs.csv: its statistics again, without the run directories
        from robust_sparse.studies.report import write_stored_report

        if len(args.results_dirs) != 1 or not args.out:
            raise UserError("report RUNS_CSV: give one runs.csv and --out DIR")
        rundir.check_owned(args.out, rundir.Kind.REPORT, "report --out")
        levels = _levels(args)
        path = write_stored_report(args.results_dirs[0], args.out, _reference(args.reference), args.test_n,
                                   args.correction, args.family, **levels)
        _emit(f"report: {path}")
        return ExitCode.OK
    if args.test_n is not None:
        raise UserError("report --test-n: only for a stored runs.csv")
    out = args.out if args.out is not None else str(rundir.report_dir(args.results_dirs[0]))
    rundir.check_owned(out, rundir.Kind.REPORT, "report --out")
    args.out = out
    sweeps = [(Path(d) / "sweep.yaml").is_file() for d in args.results_dirs]
    if all(sweeps):  # sweep directories: one report over all of them
        from robust_sparse.studies.report import write_report

        if args.exports:
            raise UserError("report --exports: only for evaluation results stores (robust-sparse eval's), "
                            "not sweep directories")
        levels = _levels(args)
        reference = _reference(args.reference)
        path = write_report(list(args.results_dirs), args.out, reference=reference, **levels,
                            correction=args.correction, family=args.family)
        _emit(f"report: {path}")
        return ExitCode.OK
    if any(sweeps):
        raise UserError("report: give either sweep directories or evaluation results stores, not both")
    if args.thresholds is not None or args.robust_thresholds is not None or args.reference:
        raise UserError("report --thresholds/--robust-thresholds/--reference: only for sweep directories")

    path = build_report(args.results_dirs, args.out, args.leaderboard, exports=args.exports)
    _emit(f"report: {path}")
    return ExitCode.OK


#: a latency ratio within this of 1 is reported as no measurable difference: the fastest of 7 alternating runs
#: still moves by a few percent between builds on a quiet CPU (robust_sparse.deploy.inference.time_alternating)
LATENCY_NOISE = 0.05


def latency_claim(fast: dict) -> str:
    """What export measured, claimed only beyond noise: no sparse layer, no measurable difference, or a speed-up."""
    threads = f"{fast['threads']} thread{'s' if fast['threads'] != 1 else ''}"
    if not fast["sparse_layers"]:
        return (f"every layer kept dense (no sparse kernel measured faster here), {fast['dense_latency_ms']:.2f} ms "
                f"per image on {threads}")
    timing = (f"{len(fast['sparse_layers'])} sparse layer{'s' if len(fast['sparse_layers']) != 1 else ''}, "
              f"{fast['sparse_latency_ms']:.2f} ms vs {fast['dense_latency_ms']:.2f} ms dense per image on {threads}")
    if abs(fast["speedup"] - 1) < LATENCY_NOISE:
        return f"{timing}: no measurable difference"
    return f"{timing} ({fast['speedup']:.2f}x)"


def _export(args: argparse.Namespace) -> int:
    from robust_sparse.files.checkpoint import check_output_dir
    from robust_sparse.sparse.export import export_checkpoint

    if args.results_dir is not None and args.robustbench is None and not args.hub:
        raise UserError("--results-dir goes with --robustbench NAME or --hub")
    if args.robustbench is not None and (args.hub or args.onnx):
        raise UserError("export --robustbench writes RobustBench's zoo layout only: leave out --hub/--onnx")
    if args.force and args.robustbench is None:
        raise UserError("export --force goes with --robustbench NAME (the plain export's --out is a folder it owns)")
    if not 1 <= args.serving_batch <= 65536:
        raise UserError(f"--serving-batch {args.serving_batch}: must be in 1..65536")
    check_output_dir(args.out, "export --out")  # before the checkpoint is read
    if args.robustbench is not None:
        from robust_sparse.eval.zoo import export_to_zoo

        written = export_to_zoo(args.checkpoint, args.out, args.robustbench, subnet=args.subnet,
                                results_dir=args.results_dir, force=args.force)
        info = written["info"]
        _emit(f"RobustBench zoo entry {args.robustbench}: {written['weights']}, {written['model_info']} and the "
              f"loading recipe {written['recipe']} "
              f"(clean {info['clean_acc'] or 'not evaluated'}, AutoAttack {info['autoattack_acc'] or 'not evaluated'}"
              f", eps {info['eps']}); load with robust_sparse.eval.zoo.register({args.robustbench!r}, "
              f"{str(args.out)!r}, {info['dataset']!r}, {info['robust_sparse']['threat_model']!r}), then "
              "robustbench.utils.load_model")
        return ExitCode.OK
    rundir.check_owned(args.out, rundir.Kind.EXPORT, "export --out")
    evaluation = []
    if args.hub:
        from robust_sparse.eval.store import evaluation_rows

        evaluation = evaluation_rows(args.checkpoint, args.subnet, args.results_dir)
    summary = export_checkpoint(args.checkpoint, args.out, subnet=args.subnet, hub=args.hub, onnx=args.onnx,
                                serving_batch=args.serving_batch, evaluation=evaluation)
    if summary.get("kind") == "ast-dynamic":
        dynamic = summary["dynamic"]
        _emit(f"{dynamic['file']}: {dynamic['subnets']} sub-nets (densities "
              f"{', '.join(f'{d:.4f}' for d in dynamic['densities'])}), {dynamic['file_bytes']} bytes; load with "
              f"robust_sparse.load_dynamic({str(args.out)!r}), then .use(k) or .at_density(d)")
        for row in summary["subnets"]:
            _emit(f"sub-net {row['subnet']}: {row['batch1_sparse_ms']:.2f} ms sparse vs {row['batch1_dense_ms']:.2f} "
                  f"ms dense per image; batch {row['serving_batch']}: {row['serving_sparse_ms']:.2f} vs "
                  f"{row['serving_dense_ms']:.2f} ms")
        return ExitCode.OK
    _emit(f"density {summary['density']:.4f} over {summary['sparse_layers']} sparse layers; "
          f"model_dense.pt {summary['dense_file_bytes']} bytes, model_sparse.pt {summary['compact_file_bytes']} "
          f"bytes ({summary['compact_to_dense_size']:.1%}); written to {args.out}")
    fast = summary["sparse_inference"]
    if fast.get("skipped"):
        _emit(f"no sparse-inference model: {fast['skipped']}")
    else:
        _emit(f"{fast['file']}: {latency_claim(fast)}")
    if "network" in summary:
        _emit(f"{summary['network']['file']}: the {summary['network']['library']} network's own state_dict "
              "(export.json 'network' says how to load it)")
    if "onnx" in summary:
        onnx = summary["onnx"]
        _emit(f"{onnx['file']}: " + (f"max |ONNX - PyTorch| {onnx['max_abs_difference']:.2e} ({onnx['checked_with']})"
                                     if onnx["checked_with"] else "not checked (onnxruntime is not installed)"))
    if "hub" in summary:
        _emit(f"Hub-style folder: {summary['hub']} (robust_sparse.load_pretrained or RobustSparseModel.from_pretrained)")
    return ExitCode.OK


def _sweep(args: argparse.Namespace) -> int:
    from robust_sparse.studies.sweep import load_sweep, run_sweep

    sweep_file = shipped.resolve(args.sweep_file, "SWEEP_FILE", shipped.Kind.SWEEP)
    sweep = load_sweep(sweep_file, out_dir=args.out, yes=args.yes)
    index = run_sweep(sweep, dry_run=args.dry_run, evaluate=not args.no_eval)
    _emit(index.to_string(index=False))
    if args.dry_run and sweep.backend == "slurm":  # what would be submitted, and what each job runs
        from robust_sparse.studies.slurm import plan

        _emit(plan(sweep.slurm, sweep.out_dir, sweep.parallel, index))
    failed = (~index["status"].isin(["done", "diverged", "pending", "partial"])).sum()
    if "eval" in index:
        failed += index["eval"].astype(str).str.startswith("failed").sum()
    return ExitCode.FAILED if failed else ExitCode.OK


def _configs(args: argparse.Namespace) -> int:
    if args.name is not None:
        _emit(shipped.lookup(args.name, "NAME").read_text(encoding="utf-8"))
        return ExitCode.OK
    configs = shipped.shipped()
    if not configs:
        raise UserError(f"no shipped configs in {shipped.folder()} (reinstall robust-sparse)")
    _emit(shipped.table(configs))
    _emit(f"files: {shipped.folder()} (robust-sparse train NAME; a sweep: robust-sparse sweep NAME)")
    return ExitCode.OK


def _doctor(args: argparse.Namespace) -> int:
    from robust_sparse.environment import doctor

    results = doctor.run_checks()
    if args.fix:
        results = doctor.fix(results)
    _emit(doctor.format_report(results))
    return ExitCode.OK if all(r.ok for r in results) else ExitCode.FAILED


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop), raised where Ctrl-C would be so that every clean-up path
    for an interruption (checkpoints, saved per-point flags) runs for it too."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM handled like SIGINT while a command runs (the main thread only: signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resume_hint(args: argparse.Namespace | None) -> str:
    command = getattr(args, "command", None)
    if command == "train":
        return "resume with --resume"
    if command in ("eval", "sweep"):
        return "rerun the same command to resume"
    return "nothing to resume"


def main(argv: Sequence[str] | None = None) -> int:
    with _sigterm_as_interrupt():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("robust_sparse").setLevel(logging.DEBUG if args.verbose else logging.INFO)
        rundir.die_with_parent()  # a sweep's child: it ends with the sweep
        _refuse_empty_paths(args)
        return {"train": _train, "eval": _eval, "report": _report, "doctor": _doctor, "export": _export,
                "sweep": _sweep, "configs": _configs}[args.command](args)
    except UserError as error:
        if args is not None and args.debug:
            raise
        sys.stderr.write(f"robust-sparse: error: {error}\n")
        return ExitCode.USAGE
    except BrokenPipeError:  # the reader of stdout has gone (`| head`): nothing to say, and nobody to say it to
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return ExitCode.BROKEN_PIPE
    except OSError as error:  # disk full, permission, read-only where no path-aware handler caught it
        if args is not None and args.debug:
            raise
        where = error.filename if getattr(error, "filename", None) else "an output"
        sys.stderr.write(f"robust-sparse: error: {rundir.os_error(where, error, 'cannot use')}\n")
        return ExitCode.USAGE
    except DivergenceError as error:
        sys.stderr.write(f"robust-sparse: diverged: {error}\n")
        return ExitCode.DIVERGED
    except Terminated:
        sys.stderr.write(f"robust-sparse: terminated (SIGTERM); {_resume_hint(args)}\n")
        return ExitCode.TERMINATED
    except KeyboardInterrupt:
        sys.stderr.write(f"robust-sparse: interrupted; {_resume_hint(args)}\n")
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
