"""Time of each evaluation attack per test point, for one checkpoint, on the current device and threads.

Every attack of ``--attacks`` runs standalone (on every point, as ``robust-sparse eval`` without ``--chained``)
through :func:`robust_sparse.eval.evaluate`, without the large-eps probe and without saved flags, on the first
``--n`` test points. Wall time and the process's CPU time are both given: with one thread, the CPU time is what
the attack costs on an idle core, whatever else shares the machine. Early exits make the cost depend on the
model: a restart of PGD-KxR and each AutoAttack sub-attack after APGD-CE only attack the points still robust, so
the table gives the robust accuracy beside the time. Prints a Markdown table and writes ``--json``.

Usage (one core, a checkpoint of the CIFAR-10-prefix study)::

    OMP_NUM_THREADS=1 python benchmarks/attack_cost.py --checkpoint RUN/best.pt --n 50 \\
        --attacks pgd-20x1,pgd-50x10,autoattack --json attack_cost.json
    python benchmarks/attack_cost.py --smoke      # a seconds-long run at tiny sizes (a test runs it)

``--smoke`` without ``--checkpoint`` writes one to a temporary directory first (:func:`smoke_checkpoint`: tiny_cnn
trained naturally for a few batches of MNIST-5k), then times cheap attacks on a few points.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

SMOKE_ATTACKS = "pgd-2x1,pgd-2x2,autoattack"


def smoke_checkpoint(directory: Path) -> Path:
    """``directory/best.pt`` as ``robust-sparse train`` saves it (config and weights): tiny_cnn on MNIST-5k, trained
    naturally for a few batches of 64, so that it classifies most test points and the attacks have work to do."""
    from robust_sparse.files.checkpoint import save_checkpoint
    from robust_sparse.config import load_config, to_dict
    from robust_sparse.datasets.splits import dataset_info
    from robust_sparse.datasets.mnist5k import load_mnist5k
    from robust_sparse.models import build_model

    config = load_config(None, ["model.name=tiny_cnn", "data.dataset=mnist5k", "device=cpu"])
    info = dataset_info(config.data)
    torch.manual_seed(0)
    model = build_model("tiny_cnn", info.num_classes, info.in_channels, info.mean, info.std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train, _ = load_mnist5k()
    for start in range(0, 1024, 64):
        images, labels = train.images[start:start + 64].float() / 255, train.labels[start:start + 64]
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    path = Path(directory) / "best.pt"
    save_checkpoint({"config": to_dict(config), "model": model.eval().state_dict(), "epoch": 1}, path)
    return path


def main(argv: list[str] | None = None) -> None:
    from robust_sparse.files.atomic import write_atomic
    from robust_sparse.eval import evaluate
    from robust_sparse.eval.points import load_points
    from robust_sparse.eval.sources import from_checkpoint
    from robust_sparse.eval.specs import parse_attacks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a best.pt written by robust-sparse train (required without --smoke)")
    parser.add_argument("--n", type=int, default=50, help="first n test points (default 50)")
    parser.add_argument("--attacks", default="pgd-20x1,pgd-50x10,autoattack")
    parser.add_argument("--eps", type=float, help="default: the run's training eps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run at tiny sizes (a test runs it)")
    args = parser.parse_args(argv)
    if args.checkpoint is None and not args.smoke:
        parser.error("--checkpoint is required (or --smoke)")
    if args.smoke:  # a few points, cheap PGD and AutoAttack standard; a checkpoint of its own unless one is given
        args.n, args.attacks, args.threads = 8, SMOKE_ATTACKS, 1
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        if args.checkpoint is None:
            args.checkpoint = str(smoke_checkpoint(Path(scratch)))
        loaded = from_checkpoint(args.checkpoint)
    images, labels = load_points(loaded.dataset, args.n, root=loaded.data_root or "data")
    model = loaded.model.eval()
    eps = args.eps if args.eps is not None else loaded.eps
    rows = []
    for spec in parse_attacks(args.attacks):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = evaluate(model, images, labels, norm=loaded.norm or "linf", eps=eps, attacks=[spec],
                          batch_size=500, seed=0, large_eps=None)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        rows.append({"attack": spec.label, "n": len(labels), "seconds": round(seconds, 2),
                     "seconds_per_point": round(seconds / len(labels), 4), "cpu_seconds": round(cpu_seconds, 2),
                     "cpu_seconds_per_point": round(cpu_seconds / len(labels), 4),
                     "clean_accuracy": result.clean_accuracy, "robust_accuracy": result.accuracies()[spec.label],
                     "threads": torch.get_num_threads(), "checkpoint": args.checkpoint})
    print("| attack | n | wall s | wall s/point | CPU s | CPU s/point | clean | robust |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['attack']} | {row['n']} | {row['seconds']:.1f} | {row['seconds_per_point']:.3f} | "
              f"{row['cpu_seconds']:.1f} | {row['cpu_seconds_per_point']:.3f} | {row['clean_accuracy']:.3f} | "
              f"{row['robust_accuracy']:.3f} |")
    if args.json:
        write_atomic(Path(args.json), json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
