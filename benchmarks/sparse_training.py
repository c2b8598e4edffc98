"""Wall time of one PGD-AT step of a sparse model against the dense step, with the sparse CSR kernels on and off.

For each model, batch size, thread count and sparsity: the model with static masks at that sparsity
(``sparsity.distribution``, ERK by default, as RigL/SET/ITOP allocate them) takes one PGD-10 adversarial
training step (L-inf 8/255, step 2/255: ten attack forwards and input gradients, the training forward and
backward, the optimizer step and the mask owner's hooks), exactly as ``robust-sparse train`` runs it
(``train_one_epoch`` over a one-batch loader). The variants, alternated within every round:

* ``dense``: the same architecture without masks (the baseline of every ratio);
* ``masked``: masks over dense kernels, ``train.sparse_kernels=off`` (the toolkit before the CSR kernels);
* ``auto``: ``train.sparse_kernels=auto``, each layer sparse where the cost model says it pays;
* ``on``: every masked layer on the CSR kernels;
* ``growth``: ``auto`` on a step whose engine wants the dense gradient (RigL's growth steps: the training pass
  runs dense, the attack sparse).

The table gives the median seconds per step, the min-max spread, the speed-up over dense (dense median /
variant median) and beside it the FLOPs ratio: the FLOPs-weighted density of the Conv2d/Linear layers (dense
FLOPs per layer counted by ``torch.utils.flop_counter`` on the input each layer sees), whose inverse is what a
kernel that only paid for its non-zeros would reach (``sparse_inference.flops_ratio``: the masked weights' own
zeros).

The batches are real MNIST-5k digits (the embedded dataset), padded to 32x32 and repeated over three channels:
speed does not depend on the pixel values, but we do not time random noise.

Usage::

    python benchmarks/sparse_training.py                                   # VGG-16, ResNet-18; b32; 1 thread
    python benchmarks/sparse_training.py --batches 32 128 --threads 1 2 --sparsities 0.9 0.95 0.99
    python benchmarks/sparse_training.py --smoke                           # seconds: a test runs it
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch
from torch import nn

from robust_sparse.config import load_config
from robust_sparse.datasets.images import BatchLoader, ImageSet
from robust_sparse.datasets.mnist5k import load_mnist5k
from robust_sparse.kernels import SparseKernels
from robust_sparse.models import build_model
from robust_sparse.objectives import build_objective
from robust_sparse.optim import build_optimization
from robust_sparse.sparse import StaticEngine, build_sparsity
from robust_sparse.train import train_one_epoch
from sparse_inference import flops_ratio, markdown  # the same FLOPs ratio and table as the inference benchmark

log = logging.getLogger("sparse_training")
VARIANTS = ("dense", "masked", "auto", "on", "growth")


class _GrowthEveryStep(StaticEngine):
    """Static masks whose every step wants the dense gradient, as a RigL growth step does."""

    def wants_dense_grad(self, step: int) -> bool:
        return True


def real_batch(batch: int, channels: int, size: int) -> ImageSet:
    train, _ = load_mnist5k()
    images = train.images[:batch]
    pad = (size - 28) // 2
    images = nn.functional.pad(images, (pad, size - 28 - pad, pad, size - 28 - pad))
    return ImageSet(images.repeat(1, channels, 1, 1), train.labels[:batch])


class Step:
    """One variant: model, optimizer, objective, masks and kernels; ``__call__`` takes one PGD-AT step."""

    def __init__(self, arch: str, variant: str, sparsity: float, data: ImageSet, args: argparse.Namespace) -> None:
        overrides = [f"model.name={arch}", "attack.eps=8/255", "attack.step_size=2/255", f"attack.steps={args.steps}",
                     f"data.batch_size={len(data.labels)}", "optim.epochs=1", "device=cpu"]
        if variant != "dense":
            overrides += ["sparsity.method=static", f"sparsity.density={1 - sparsity:.6g}",
                          f"sparsity.distribution={args.distribution}"]
        config = load_config(None, overrides)
        torch.manual_seed(0)
        channels = data.images.shape[1]
        self.model = build_model(arch, 10, channels, (0.5,) * channels, (0.25,) * channels)
        self.loader = BatchLoader(data, len(data.labels), torch.device("cpu"), shuffle=False)
        self.optimizer, self.scheduler = build_optimization(config, self.model, len(self.loader))
        self.objective = build_objective(config, self.model)
        self.masker = build_sparsity(config.sparsity, self.model, arch, self.optimizer, 1_000_000, seed=0)
        self.kernels = None
        if variant == "growth":
            self.masker.engine = _GrowthEveryStep()
        if variant in ("auto", "on", "growth"):
            self.kernels = SparseKernels(self.model, self.masker, auto=variant != "on")
        self.masks = {} if self.masker is None else self.masker.masks

    def __call__(self) -> float:
        start = time.perf_counter()
        train_one_epoch(self.model, self.objective, self.optimizer, self.scheduler, self.loader, kernels=self.kernels)
        return time.perf_counter() - start


def run_case(arch: str, batch: int, threads: int, sparsities: list[float], args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(threads)
    small = arch in ("tiny_cnn", "small_cnn")
    data = real_batch(batch, 1 if small else 3, 28 if small else 32)
    steps: dict[tuple[str, float], Callable[[], float]] = {("dense", 0.0): Step(arch, "dense", 0.0, data, args)}
    for sparsity in sparsities:
        for variant in args.variants:
            if variant != "dense":
                steps[(variant, sparsity)] = Step(arch, variant, sparsity, data, args)
    for step in steps.values():
        step()  # warm-up: allocator, numba's compile (cached on disk after the first run), the auto choice
    seconds: dict[tuple[str, float], list[float]] = {key: [] for key in steps}
    for round_number in range(args.repeats):
        keys = list(steps) if round_number % 2 == 0 else list(reversed(steps))  # alternate the order too
        for key in keys:
            seconds[key].append(steps[key]())
        log.info("%s b%d t%d round %d: %s", arch, batch, threads, round_number + 1,
                 ", ".join(f"{v}@{s:g} {seconds[(v, s)][-1]:.2f}s" for v, s in keys))
    dense = statistics.median(seconds[("dense", 0.0)])
    images = data.images[:1].float() / 255
    rows = []
    for (variant, sparsity), values in seconds.items():
        step = steps[(variant, sparsity)]
        median = statistics.median(values)
        ratio = flops_ratio(copy.deepcopy(step.model).eval(), images) if variant != "dense" else 1.0
        kernels = getattr(step, "kernels", None)
        rows.append({
            "model": arch, "batch": batch, "threads": threads, "sparsity": sparsity, "variant": variant,
            "s_per_step": median, "spread_s": f"{min(values):.3f}-{max(values):.3f}",
            "speedup": dense / median, "flops_speedup": 1 / ratio,
            "kernel_layers": "" if kernels is None else f"{kernels.layers}/{len(step.masks)}",
        })
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    parser.add_argument("--batches", nargs="+", type=int, default=[32])
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--variants", nargs="+", default=["masked", "auto", "growth"], choices=VARIANTS[1:])
    parser.add_argument("--distribution", default="erk", choices=["erk", "uniform", "er"])
    parser.add_argument("--steps", type=int, default=10, help="PGD steps of the training attack")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (alternating variants)")
    parser.add_argument("--csv", help="also write the table here")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every variant (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.sparsities, args.batches, args.threads = ["tiny_cnn"], [0.9], [4], [1]
        args.steps, args.repeats, args.variants = 1, 1, list(VARIANTS[1:])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("torch %s, %s, %s", torch.__version__, platform.processor() or platform.machine(), platform.platform())
    rows = []
    for arch in args.models:
        for batch in args.batches:
            for threads in args.threads:
                rows += run_case(arch, batch, threads, args.sparsities, args)
    table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(markdown(table))  # noqa: T201  (a benchmark prints its table, as BENCHMARKS.md shows it)
    return table


if __name__ == "__main__":
    main()
