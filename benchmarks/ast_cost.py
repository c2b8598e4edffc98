"""Training cost of AST's K sub-nets against one single-density sparse run: wall time per step and FLOPs.

AST (Yang et al., NeurIPS 2022) trains K sub-nets over one shared weight tensor, one sub-net per iteration, and
claims that this costs what training one sparse model costs. This script trains the same model on the same real
batches (MNIST-5k digits from the embedded dataset) with the same objective (PGD-AT) for the same number of
optimizer steps, once with AST and once per single-density baseline, alternating the sides over ``--repeats``
rounds (each round starts from a different side), and reports AST / baseline for:

* wall time per step: the median over rounds of each side's whole run (topology events included), and the
  min-max of the per-round ratios;
* training FLOPs: what ``robust_sparse.flops.FlopsCounter`` counts for the same runs (the ``train_flops`` a
  training run records in metrics.csv), which scales each layer's cost by the density of the masks in use.

Which single run is "one sparse model" is not fixed by the claim, so there are four baselines, at the densest
and at the sparsest sub-net's density:

* RigL: sparse from the first step, as the separately trained models of the AST study (BENCHMARKS.md). Its
  update interval equals AST's, so both runs rewire as often: AST rewires each sub-net every ``update_every`` of
  its own steps, i.e. one of the K sub-nets every ``update_every`` global steps, RigL every ``update_every``.
* GMP (gradual magnitude pruning): the recipe each AST sub-net follows (dense start, cubic schedule down to its
  density, ``end_fraction`` of training), for one network. Against RigL, AST pays for starting dense; against GMP
  it does not, so the pair separates the cost of K sub-nets from the cost of pruning from dense.

AST's defaults are the AST study's (``configs/studies/ast_mnist5k.yaml``): sub-nets at 10/5/1%, gradient
correction on, rewiring every 3 of a sub-net's steps. The study's 90 steps are cut to 45 (3 epochs of 15
batches) and its PGD-10 to PGD-3 to fit five sides and five rounds in a quarter of an hour on one thread. Every
side runs the dense kernels with masked weights (as the studies do; ``train.sparse_kernels`` off), so on the CPU
time per step measures the engines' own work beside a fixed dense forward and backward, and the FLOPs ratio
is the most that sparse kernels could turn into time.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/ast_cost.py            # small_cnn, 45 steps of 128, PGD-3, 5 rounds, CPU
    python benchmarks/ast_cost.py --smoke --json out.json      # a seconds-long run at tiny sizes (a test runs it)
"""

from __future__ import annotations

import argparse
import json
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
from robust_sparse.datasets.images import BatchLoader, ImageSet  # noqa: E402
from robust_sparse.distributed import resolve_device  # noqa: E402
from robust_sparse.flops import FlopsCounter, dense_profile  # noqa: E402
from robust_sparse.models import build_model  # noqa: E402
from robust_sparse.objectives import build_objective  # noqa: E402
from robust_sparse.optim import build_optimization  # noqa: E402
from robust_sparse.sparse import build_sparsity  # noqa: E402
from robust_sparse.train import train_one_epoch  # noqa: E402

log = logging.getLogger("ast_cost")
# what measure() reads from the arguments: the JSON output records them, so that a run can be repeated
RUN_SETTINGS = ("model", "densities", "batch_size", "batches", "epochs", "update_every", "attack_steps")


def side_overrides(side: str, densities: list[float]) -> list[str]:
    """The sparsity settings of one side: ``ast``, or ``METHOD@densest`` / ``METHOD@sparsest``."""
    if side == "ast":
        return ["sparsity.method=ast", f"sparsity.ast.densities=[{', '.join(map(str, densities))}]"]
    method, which = side.split("@")
    return [f"sparsity.method={method}", f"sparsity.density={densities[0] if which == 'densest' else densities[-1]}"]


def measure(args, side: str, data: ImageSet, device: torch.device) -> tuple[float, FlopsCounter]:
    """(seconds, FLOPs counter) of one whole training run of ``args.epochs`` epochs of ``args.batches`` batches."""
    config = load_config(None, [
        f"model.name={args.model}", "objective=pgd_at", f"attack.steps={args.attack_steps}", "attack.eps=0.1",
        f"attack.step_size={2.5 * 0.1 / args.attack_steps}", f"data.batch_size={args.batch_size}",
        f"optim.epochs={args.epochs}", "optim.optimizer=sgdw", "optim.lr=0.05", "optim.weight_decay=5e-4",
        f"sparsity.update_every={args.update_every}", *side_overrides(side, args.densities)])
    torch.manual_seed(0)
    model = build_model(args.model, 10, 1, (0.5,), (0.25,)).to(device)
    loader = BatchLoader(data, args.batch_size, device, shuffle=True, seed=0, drop_last=True)
    optimizer, scheduler = build_optimization(config, model, len(loader))
    masker = build_sparsity(config.sparsity, model, args.model, optimizer, len(loader) * args.epochs, seed=0)
    objective = build_objective(config, model)
    flops = FlopsCounter(dense_profile(model, data.example_shape), config, masker)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.epochs):
        train_one_epoch(model, objective, optimizer, scheduler, loader, flops=flops)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, flops


def warm_up(args, data: ImageSet, device: torch.device) -> None:
    """One dense PGD-AT step, untimed, so that the first timed side does not pay for allocator and kernel set-up
    (the sparse sides cannot warm up in place: a step would move their pruning schedules)."""
    config = load_config(None, [f"model.name={args.model}", "objective=pgd_at", f"attack.steps={args.attack_steps}",
                                f"data.batch_size={args.batch_size}", "optim.epochs=1"])
    model = build_model(args.model, 10, 1, (0.5,), (0.25,)).to(device)
    warm = BatchLoader(data.take(slice(0, args.batch_size)), args.batch_size, device)
    optimizer, scheduler = build_optimization(config, model, len(warm))
    train_one_epoch(model, build_objective(config, model), optimizer, scheduler, warm)


def summarise(sides: list[str], seconds: dict[str, list[float]], flops: dict[str, FlopsCounter], steps: int
              ) -> list[dict]:
    """One row per baseline: AST / baseline in time per step (medians; min-max of the per-round ratios) and FLOPs."""
    ast = statistics.median(seconds["ast"]) / steps
    rows = []
    for side in sides[1:]:
        ratios = [a / b for a, b in zip(seconds["ast"], seconds[side])]
        base = statistics.median(seconds[side]) / steps
        rows.append({
            "baseline": side, "steps": steps, "AST s/step": ast,
            "AST s/step min": min(seconds["ast"]) / steps, "AST s/step max": max(seconds["ast"]) / steps,
            "base s/step": base, "base s/step min": min(seconds[side]) / steps,
            "base s/step max": max(seconds[side]) / steps, "time ratio": ast / base,
            "ratio min": min(ratios), "ratio max": max(ratios),
            "AST FLOPs": flops["ast"].train_flops, "base FLOPs": flops[side].train_flops,
            "FLOPs ratio": flops["ast"].train_flops / flops[side].train_flops,
            "AST vs dense": flops["ast"].train_flops / flops["ast"].dense_train,
            "base vs dense": flops[side].train_flops / flops[side].dense_train})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--densities", default="0.1,0.05,0.01", help="AST's sub-net densities, densest first")
    parser.add_argument("--baselines", default="rigl@densest,rigl@sparsest,gmp@densest,gmp@sparsest",
                        help="single-density runs: METHOD@densest or METHOD@sparsest")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=15, help="batches per epoch (the AST study's 2000 digits)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--update-every", type=int, default=3, help="sparsity.update_every of every side")
    parser.add_argument("--attack-steps", type=int, default=3, help="PGD steps of the training attack (pgd_at)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="also write every round's seconds and each side's FLOPs here")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run at tiny sizes (a test runs it)")
    args = parser.parse_args(argv)
    if args.smoke:  # every side on tiny_cnn: 12 steps, so that each of AST's 3 sub-nets rewires at least once
        args.model, args.batch_size, args.batches, args.epochs, args.update_every = "tiny_cnn", 4, 6, 2, 1
        args.attack_steps, args.repeats, args.device = 1, 2, "cpu"
    args.densities = [float(d) for d in args.densities.split(",")]
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = resolve_device(args.device)
    data = real_batches(args.batches * args.batch_size, 1, 28)
    sides = ["ast", *args.baselines.split(",")]
    steps = args.batches * args.epochs
    warm_up(args, data, device)
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    flops: dict[str, FlopsCounter] = {}
    for round_number in range(args.repeats):
        # each round starts one side later, so a drift in machine load does not always hit the same side
        shift = round_number % len(sides)
        for side in sides[shift:] + sides[:shift]:
            elapsed, flops[side] = measure(args, side, data, device)
            seconds[side].append(elapsed)
            log.info("round %d %s: %.2f s (%.3f s/step)", round_number + 1, side, elapsed, elapsed / steps)
    rows = summarise(sides, seconds, flops, steps)
    print(f"model {args.model}, AST densities {args.densities}, {steps} steps of {args.batch_size}, "  # noqa: T201
          f"PGD-{args.attack_steps} AT, update_every {args.update_every}, {args.repeats} rounds, {device.type}, "
          f"{torch.get_num_threads()} thread(s)")
    columns = ["baseline", "AST s/step", "base s/step", "time ratio", "ratio min", "ratio max", "FLOPs ratio",
               "AST vs dense", "base vs dense"]
    print(pd.DataFrame(rows)[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))  # noqa: T201
    per_side = pd.DataFrame([{"side": side, "s/step median": statistics.median(v) / steps, "min": min(v) / steps,
                              "max": max(v) / steps, "train FLOPs": flops[side].train_flops}
                             for side, v in seconds.items()])
    print(per_side.to_string(index=False, float_format=lambda v: f"{v:.4g}"))  # noqa: T201
    if args.json:
        args.json.write_text(json.dumps({
            "steps": steps, "sides": sides, "run": {key: getattr(args, key) for key in RUN_SETTINGS},
            "seconds": seconds, "train_flops": {side: counter.train_flops for side, counter in flops.items()},
            "dense_train_flops": {side: counter.dense_train for side, counter in flops.items()}, "rows": rows},
            indent=1))


if __name__ == "__main__":
    main()
