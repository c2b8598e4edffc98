"""AutoAttack through robust-sparse against the original called directly, and torchattacks against both.

For one model and the first ``--n`` test points at ``--eps`` the script times, alternating ``--repeats`` times:

* **project**: :func:`robust_sparse.eval.evaluate` with ``attacks=[autoattack]`` (the original implementation
  driven sub-attack by sub-attack through the adapter, early exit, per-point flags saved to a fresh file as
  ``robust-sparse eval`` does);
* **original**: ``pyautoattack.AutoAttack(..., version="standard", seed)`` and its ``run_standard_evaluation``
  on the same points with the same batch size, nothing else;

checks that the per-point robust flags are identical, and then runs ``torchattacks.AutoAttack`` twice on the
same points, once configured to match (:func:`robust_sparse.eval.autoattack.torchattacks_autoattack`) and once
with its defaults (only the seed fixed, so that the run is reproducible), reporting the accuracy difference
against the original. Prints a Markdown table and writes ``--json``.

Usage (the quickstart checkpoint is a small CNN adversarially trained on MNIST-5k)::

    robust-sparse train --out runs/quickstart
    python benchmarks/autoattack_vs_original.py --checkpoint runs/quickstart/best.pt --n 100 --eps 0.1
    python benchmarks/autoattack_vs_original.py --smoke   # a seconds-long run at tiny sizes (a test runs it)

``--smoke`` without ``--checkpoint`` writes a tiny_cnn checkpoint to a temporary directory first (as
``benchmarks/attack_cost.py --smoke`` does), and runs every side once on 4 points at eps 0.3 (unless ``--eps``),
where APGD-CE fools the non-robust model on every point and the later sub-attacks have nothing left; the JSON goes
to the temporary directory unless ``--json`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from attack_cost import smoke_checkpoint  # noqa: E402


def _original(model, images, labels, *, norm, eps, seed, batch_size):
    import pyautoattack

    attack = pyautoattack.AutoAttack(model, device=str(images.device), eps=eps, norm="Linf" if norm == "linf" else "L2",
                                     seed=seed, version="standard")
    adversarial, _ = attack.run_standard_evaluation(images, labels, batch_size=batch_size)
    with torch.no_grad():
        return torch.cat([model(adversarial[i:i + batch_size]).argmax(1) for i in range(0, len(labels), batch_size)]) == labels


def _torchattacks(attack, model, images, labels, batch_size):
    robust = []
    for start in range(0, len(labels), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        adversarial = attack(x, y)
        with torch.no_grad():
            robust.append(model(adversarial).argmax(1) == y)
    return torch.cat(robust)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a robust-sparse checkpoint (required without --smoke)")
    parser.add_argument("--n", type=int, default=100, help="first n test points")
    parser.add_argument("--eps", type=float, default=None, help="default: the run's eps")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-torchattacks", action="store_true")
    parser.add_argument("--json", help="default autoattack_benchmark.json (with --smoke: a temporary file)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run at tiny sizes (a test runs it)")
    args = parser.parse_args(argv)
    if args.checkpoint is None and not args.smoke:
        parser.error("--checkpoint is required (or --smoke)")
    if args.smoke:
        args.n, args.repeats, args.device = 4, 1, "cpu"
        args.eps = 0.3 if args.eps is None else args.eps
    with tempfile.TemporaryDirectory() as scratch:
        if args.checkpoint is None:
            args.checkpoint = str(smoke_checkpoint(Path(scratch)))
        if args.json is None:
            args.json = str(Path(scratch) / "autoattack_benchmark.json") if args.smoke else "autoattack_benchmark.json"
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import torchattacks

    from robust_sparse.datasets import DATASETS
    from robust_sparse.eval import evaluate, parse_attacks
    from robust_sparse.eval.autoattack import torchattacks_autoattack
    from robust_sparse.eval.points import load_points
    from robust_sparse.eval.sources import from_checkpoint

    loaded = from_checkpoint(args.checkpoint)
    device = torch.device(args.device)
    model = loaded.model.to(device).eval()
    eps = args.eps if args.eps is not None else loaded.eps
    norm = loaded.norm
    images, labels = load_points(loaded.dataset, args.n)
    images, labels = images.to(device), labels.to(device)
    num_classes = DATASETS.get(loaded.dataset).num_classes
    times = {"project": [], "original": []}
    flags = {}
    for repeat in range(args.repeats):
        for side in ("project", "original") if repeat % 2 == 0 else ("original", "project"):
            started = time.perf_counter()
            if side == "project":
                with tempfile.TemporaryDirectory() as directory:
                    result = evaluate(model, images, labels, norm=norm, eps=eps, attacks=parse_attacks("autoattack"),
                                      batch_size=args.batch_size, seed=args.seed, num_classes=num_classes,
                                      state_path=Path(directory) / "flags.pt", autoattack_backend="pyautoattack")
                robust = result.outcomes[0].robust
                unit_accuracies = result.outcomes[0].unit_accuracies()
            else:
                robust = _original(model, images, labels, norm=norm, eps=eps, seed=args.seed,
                                   batch_size=args.batch_size).cpu()
            times[side].append(time.perf_counter() - started)
            flags.setdefault(side, robust)
            assert torch.equal(flags[side], robust), f"{side} is not deterministic"
            print(f"repeat {repeat + 1} {side}: {times[side][-1]:.1f} s, accuracy {robust.float().mean():.4f}",
                  file=sys.stderr)
    summary = {
        "checkpoint": args.checkpoint, "model": loaded.architecture, "dataset": loaded.dataset, "norm": norm,
        "eps": eps, "n": args.n, "batch_size": args.batch_size, "seed": args.seed, "device": str(device),
        "threads": torch.get_num_threads(), "clean_accuracy": result.clean_accuracy,
        "project_seconds": times["project"], "original_seconds": times["original"],
        "project_median_s": statistics.median(times["project"]), "original_median_s": statistics.median(times["original"]),
        "project_accuracy": flags["project"].float().mean().item(),
        "original_accuracy": flags["original"].float().mean().item(),
        "identical_flags": bool(torch.equal(flags["project"], flags["original"])),
        "after_each_sub_attack": unit_accuracies,
    }
    summary["ratio_project_over_original"] = summary["project_median_s"] / summary["original_median_s"]
    if not args.skip_torchattacks:
        for name, attack in [
            ("torchattacks_matched", torchattacks_autoattack(model, norm=norm, eps=eps, n_classes=num_classes, seed=args.seed)),
            ("torchattacks_default", torchattacks.AutoAttack(model, norm="Linf" if norm == "linf" else "L2", eps=eps,
                                                             version="standard", n_classes=num_classes, seed=args.seed)),
        ]:
            started = time.perf_counter()
            robust = _torchattacks(attack, model, images, labels, args.batch_size).cpu()
            summary[f"{name}_seconds"] = time.perf_counter() - started
            summary[f"{name}_accuracy"] = robust.float().mean().item()
            summary[f"{name}_minus_original"] = summary[f"{name}_accuracy"] - summary["original_accuracy"]
            summary[f"{name}_points_disagreeing"] = int((robust ^ flags["original"]).sum())
            print(f"{name}: {summary[f'{name}_seconds']:.1f} s, accuracy {summary[f'{name}_accuracy']:.4f}",
                  file=sys.stderr)
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"| implementation | robust accuracy | wall time (median of {args.repeats}) |")
    print("|---|---|---|")
    print(f"| robust-sparse (original AA via adapter) | {summary['project_accuracy']:.4f} | {summary['project_median_s']:.1f} s |")
    print(f"| original pyautoattack, called directly | {summary['original_accuracy']:.4f} | {summary['original_median_s']:.1f} s |")
    if not args.skip_torchattacks:
        for name in ("torchattacks_matched", "torchattacks_default"):
            print(f"| {name.replace('_', ' ')} | {summary[f'{name}_accuracy']:.4f} "
                  f"({summary[f'{name}_minus_original'] * 100:+.2f} points) | {summary[f'{name}_seconds']:.1f} s (1 run) |")
    print(f"\nidentical per-point flags: {summary['identical_flags']}; time ratio project/original: "
          f"{summary['ratio_project_over_original']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
