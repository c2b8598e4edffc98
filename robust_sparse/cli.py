"""``robust-sparse``: train, eval, doctor.

Every user error ends as one line on stderr and exit code 2; a diverged run exits with 3. Tracebacks are
for bugs only (``--debug`` shows them for user errors too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from robust_sparse.errors import DivergenceError, UserError

log = logging.getLogger("robust_sparse")

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + error; we promise one line
        raise UserError(f"{self.prog}: {message} (see --help)")


def _emit(text: str) -> None:
    """Command output (results, reports) goes to stdout; logs go to stderr through logging."""
    sys.stdout.write(text.rstrip("\n") + "\n")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run (default: the config's, auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robust-sparse", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model (no CONFIG: the embedded MNIST-5k quickstart)")
    train.add_argument("config", nargs="?", help="YAML config (see configs/); defaults are the quickstart")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set optim.lr=0.1 (repeatable)")
    train.add_argument("--out", help="run directory (overrides out_dir)")
    train.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device(train)

    evaluate = commands.add_parser("eval", help="clean and PGD accuracy of a checkpoint on the test set")
    evaluate.add_argument("checkpoint", help="a best.pt/last.pt written by robust-sparse train")
    evaluate.add_argument("--n-examples", type=int, help="first n test points (default: the run's eval.n_examples)")
    evaluate.add_argument("--pgd-steps", type=int, help="PGD steps (default: the run's eval.pgd_steps)")
    evaluate.add_argument("--restarts", type=int, help="PGD restarts (default: the run's eval.restarts)")
    evaluate.add_argument("--eps", help="radius, e.g. 8/255 (default: the run's)")
    evaluate.add_argument("--output", help="write the result as JSON here")
    _add_device(evaluate)

    export = commands.add_parser("export", help="write a sparse checkpoint as a plain state_dict and a compact file")
    export.add_argument("checkpoint", help="a best.pt/last.pt written by robust-sparse train")
    export.add_argument("--out", required=True, help="output directory")

    doctor = commands.add_parser("doctor", help="check the installed stack and say how to fix it")
    doctor.add_argument("--fix", action="store_true", help="apply the automatic fixes (pip commands, alias)")
    return parser


def _train(args: argparse.Namespace) -> int:
    from robust_sparse.config import load_config
    from robust_sparse.train import fit

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.out:
        overrides.append(f"out_dir={args.out}")
    config = load_config(args.config, overrides)
    result = fit(config, resume=args.resume, progress=not args.no_progress and sys.stderr.isatty())
    _emit(result.metrics.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if result.evaluation:
        _emit(_format_evaluation(result.evaluation))
    _emit(f"run directory: {result.run_dir}")
    return 0


def _format_evaluation(evaluation: dict) -> str:
    return (f"test ({evaluation['n_examples']} points, {evaluation['norm']} eps={evaluation['eps']:.4g}): "
            f"clean accuracy {evaluation['clean_accuracy']:.4f}, "
            f"PGD-{evaluation['pgd_steps']}x{evaluation['restarts']} accuracy {evaluation['pgd_accuracy']:.4f}")


def _eval(args: argparse.Namespace) -> int:
    from robust_sparse.checkpoint import load_checkpoint
    from robust_sparse.config import _coerce, config_from_dict, validate
    from robust_sparse.data import DATASETS, load_raw
    from robust_sparse.models import build_model
    from robust_sparse.train import evaluate_test, resolve_device

    state = load_checkpoint(args.checkpoint)
    config = config_from_dict(state["config"])
    changes = {}
    if args.n_examples is not None:
        changes["n_examples"] = args.n_examples
    if args.pgd_steps is not None:
        changes["pgd_steps"] = args.pgd_steps
    if args.restarts is not None:
        changes["restarts"] = args.restarts
    if args.eps is not None:
        changes["eps"] = _coerce(args.eps, float, "--eps")
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, **changes))
    validate(config)
    device = resolve_device(args.device or config.device)
    _, test = load_raw(config.data, need_train=False)
    if config.eval.n_examples > len(test):
        raise UserError(f"--n-examples {config.eval.n_examples}: the test set has only {len(test)} points")
    info = DATASETS[config.data.dataset]
    model = build_model(config.model.name, info.num_classes, info.in_channels, info.mean, info.std)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UserError(f"{args.checkpoint}: weights do not fit {config.model.name}: "
                        f"{str(error).splitlines()[0]}") from None
    model.to(device)
    evaluation = {"checkpoint": str(args.checkpoint), "epoch": state["epoch"],
                  **evaluate_test(model, test, config, device)}
    _emit(_format_evaluation(evaluation))
    if args.output:
        Path(args.output).write_text(json.dumps(evaluation, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from robust_sparse.sparse.export import export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.out)
    _emit(f"density {summary['density']:.4f} over {summary['sparse_layers']} sparse layers; "
          f"model_dense.pt {summary['dense_file_bytes']} bytes, model_sparse.pt {summary['compact_file_bytes']} "
          f"bytes ({summary['compact_to_dense_size']:.1%}); written to {args.out}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from robust_sparse import doctor

    results = doctor.run_checks()
    if args.fix:
        results = doctor.fix(results)
    _emit(doctor.format_report(results))
    return 0 if all(r.ok for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("robust_sparse").setLevel(logging.DEBUG if args.verbose else logging.INFO)
        return {"train": _train, "eval": _eval, "doctor": _doctor, "export": _export}[args.command](args)
    except UserError as error:
        if args is not None and args.debug:
            raise
        sys.stderr.write(f"robust-sparse: error: {error}\n")
        return EXIT_USER_ERROR
    except DivergenceError as error:
        sys.stderr.write(f"robust-sparse: diverged: {error}\n")
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        sys.stderr.write("robust-sparse: interrupted; resume with --resume\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
