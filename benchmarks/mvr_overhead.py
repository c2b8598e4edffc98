"""Wall time of an MVR (STORM) epoch against the same epoch with SGD, natural and PGD-AT, beside the FLOPs ratio.

MVR takes one more forward and backward per step than SGD: the loss's gradient at the previous weights on the
current batch. robust_sparse.flops counts it; this script measures what it costs in time. Both sides train the
same model on the same real batches (MNIST-5k digits), alternating over ``--repeats`` rounds; the table gives
the medians, the spread (min-max of the per-round ratios) and the ratio of the FLOPs robust_sparse.flops counted
for the same epochs.

Usage::

    python benchmarks/mvr_overhead.py                 # small_cnn, dense, 16 batches of 128, 5 rounds, CPU
    python benchmarks/mvr_overhead.py --smoke         # a seconds-long run at tiny sizes (a test runs it)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from sparse_overhead import real_batches  # noqa: E402

from robust_sparse.config import load_config  # noqa: E402
from robust_sparse.datasets.images import BatchLoader  # noqa: E402
from robust_sparse.distributed import resolve_device  # noqa: E402
from robust_sparse.flops import FlopsCounter, dense_profile  # noqa: E402
from robust_sparse.models import build_model  # noqa: E402
from robust_sparse.objectives import build_objective  # noqa: E402
from robust_sparse.optim import build_optimization  # noqa: E402
from robust_sparse.train import train_one_epoch  # noqa: E402

log = logging.getLogger("mvr_overhead")


def measure(args, optimizer_name: str, objective: str, data, device: torch.device) -> tuple[float, float]:
    """(seconds, training FLOPs) of one epoch after a one-batch warm-up."""
    config = load_config(None, [f"model.name={args.model}", f"objective={objective}", f"optim.optimizer={optimizer_name}",
                                f"attack.steps={args.attack_steps}", f"data.batch_size={args.batch_size}",
                                "optim.epochs=1", "attack.eps=0.1", "attack.step_size=0.025"])
    torch.manual_seed(0)
    model = build_model(args.model, 10, 1, (0.5,), (0.25,)).to(device)
    loader = BatchLoader(data, args.batch_size, device, shuffle=True, seed=0, drop_last=True)
    optimizer, scheduler = build_optimization(config, model, len(loader))
    goal = build_objective(config, model)
    warm = BatchLoader(data.take(slice(0, args.batch_size)), args.batch_size, device)
    train_one_epoch(model, goal, optimizer, scheduler, warm)  # the first step: MVR has no previous weights yet
    flops = FlopsCounter(dense_profile(model, data.example_shape), config, None)
    start = time.perf_counter()
    train_one_epoch(model, goal, optimizer, scheduler, loader, flops=flops)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, flops.train_flops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps of the training attack (pgd_at)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run at tiny sizes (a test runs it)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch_size, args.batches, args.repeats, args.attack_steps = "tiny_cnn", 8, 2, 1, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = resolve_device(args.device)
    data = real_batches(args.batches * args.batch_size, 1, 28)
    rows = []
    for objective in ("natural", "pgd_at"):
        seconds = {"sgd": [], "mvr": []}
        flops = {}
        for round_number in range(args.repeats):
            # alternate which side goes first, so a drift in machine speed does not favour one side
            for side in (("sgd", "mvr") if round_number % 2 == 0 else ("mvr", "sgd")):
                elapsed, flops[side] = measure(args, side, objective, data, device)
                seconds[side].append(elapsed)
                log.info("%s round %d %s: %.2f s", objective, round_number + 1, side, elapsed)
        ratios = [m / s for m, s in zip(seconds["mvr"], seconds["sgd"])]
        rows.append({"objective": objective, "batches": args.batches, "SGD s/epoch": statistics.median(seconds["sgd"]),
                     "MVR s/epoch": statistics.median(seconds["mvr"]),
                     "time ratio": statistics.median(seconds["mvr"]) / statistics.median(seconds["sgd"]),
                     "ratio min": min(ratios), "ratio max": max(ratios), "FLOPs ratio": flops["mvr"] / flops["sgd"]})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))  # noqa: T201


if __name__ == "__main__":
    main()
