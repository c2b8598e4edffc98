"""Dense vs sparse CPU inference latency (``robust_sparse.sparse_inference``) at CIFAR shapes.

For each architecture, mask distribution, sparsity, batch size and thread count: masks are drawn at random
with the layer densities of the sparse engines' allocations (``uniform``: the same density in every Linear/Conv2d
layer; ``erk``: Erdős–Rényi-Kernel, as ``sparsity.distribution=erk`` allocates them), the sparse-inference model
is built under that batch size and thread count (its per-layer choice is measured then), and the dense and the
sparse model are timed on the same input, alternating, ``--repeats`` times. The table gives medians, the
min-max spread, the speed-up (dense median / sparse median) and beside it the FLOPs ratio: the FLOPs-weighted
density of the Linear/Conv2d layers, with each layer's dense FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` on the dense layer and the input it sees. 1 / FLOPs ratio is the
speed-up a kernel that only paid for its nonzeros would reach. Logits are checked against dense (1e-4).

The masks are random positions, not trained ones: a trained mask's pattern (not its density) would change
memory access, and the CSR kernels do not exploit structure either way.

Usage::

    python benchmarks/sparse_inference.py                    # the full grid: 2 models x 2 masks x 3 sparsities
                                                             # x batch 1 and 128 x 1 and all threads
    python benchmarks/sparse_inference.py --batches 1        # batch 1 only (minutes)
    python benchmarks/sparse_inference.py --batches 128 --large-batch-sparsities 0.9 0.99 \
        --large-batch-distributions uniform --large-batch-repeats 3
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from robust_sparse.models import build_model
from robust_sparse.sparse import density as allocation
from robust_sparse.inference import sparse_inference

log = logging.getLogger("sparse_inference")
CIFAR = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
DISTRIBUTIONS = {"uniform": allocation.uniform, "erk": allocation.erk}


def masked_model(arch: str, distribution: str, sparsity: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch, 10, 3, *CIFAR).eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    densities = DISTRIBUTIONS[distribution]({name: tuple(m.weight.shape) for name, m in layers.items()},
                                            1.0 - sparsity)
    with torch.no_grad():
        for name, layer in layers.items():
            keep = max(1, round(densities[name] * layer.weight.numel()))
            mask = torch.zeros(layer.weight.numel(), dtype=torch.bool)
            mask[torch.randperm(layer.weight.numel())[:keep]] = True
            layer.weight.mul_(mask.view_as(layer.weight))
    return model


def flops_ratio(model: nn.Module, images: torch.Tensor) -> float:
    """FLOPs-weighted density of the Linear/Conv2d layers, dense FLOPs from FlopCounterMode per layer."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name):
        def hook(_module, args, _output):
            inputs.setdefault(name, args[0])
        return hook

    hooks = [m.register_forward_hook(keep_input(name)) for name, m in layers.items()]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    dense = sparse = 0.0
    for name, layer in layers.items():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            layer(inputs[name])
        flops = counter.get_total_flops()
        dense += flops
        sparse += flops * float(layer.weight.count_nonzero()) / layer.weight.numel()
    return sparse / dense


def time_both(dense, sparse, images, repeats):
    dense_times, sparse_times = [], []
    with torch.no_grad():
        dense(images), sparse(images)
        for _ in range(repeats):
            for model, times in ((dense, dense_times), (sparse, sparse_times)):
                start = time.perf_counter()
                model(images)
                times.append(time.perf_counter() - start)
    return dense_times, sparse_times


def run_case(arch, distribution, sparsity, batch, threads, args) -> dict:
    torch.set_num_threads(threads)
    large = batch > 1
    repeats = args.large_batch_repeats if large else args.repeats
    build_repeats = args.large_batch_repeats if large else args.build_repeats
    model = masked_model(arch, distribution, sparsity)
    images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    fast = sparse_inference(model, images, repeats=build_repeats)
    build_s = time.perf_counter() - start
    with torch.no_grad():
        error = float((fast(images) - model(images)).abs().max())
    if error > 1e-4:
        raise AssertionError(f"{arch} {distribution} {sparsity}: logits differ by {error}")
    dense_times, sparse_times = time_both(model, fast, images, repeats)
    dense_ms, sparse_ms = statistics.median(dense_times) * 1e3, statistics.median(sparse_times) * 1e3
    ratio = flops_ratio(model, images[:1])
    report = fast.report()
    row = {
        "model": arch, "masks": distribution, "sparsity": sparsity, "batch": batch, "threads": threads,
        "dense_ms": dense_ms, "dense_spread_ms": f"{min(dense_times) * 1e3:.1f}-{max(dense_times) * 1e3:.1f}",
        "sparse_ms": sparse_ms, "sparse_spread_ms": f"{min(sparse_times) * 1e3:.1f}-{max(sparse_times) * 1e3:.1f}",
        "speedup": dense_ms / sparse_ms, "flops_ratio": ratio, "flops_speedup": 1 / ratio,
        "sparse_layers": f"{int(report['sparse'].sum())}/{len(report)}", "build_s": build_s,
    }
    log.info("%s", row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--distributions", nargs="+", default=["uniform", "erk"], choices=sorted(DISTRIBUTIONS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    parser.add_argument("--threads", nargs="+", type=int, default=sorted({1, torch.get_num_threads()}))
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per case (alternating sides)")
    parser.add_argument("--build-repeats", type=int, default=5, help="rounds per layer in the build's choice")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 128])
    parser.add_argument("--large-batch-repeats", type=int, default=5,
                        help="timed rounds and build rounds per case at a batch size above 1")
    parser.add_argument("--large-batch-sparsities", nargs="+", type=float, default=None,
                        help="the sparsities run at batch sizes above 1 (default: all of --sparsities)")
    parser.add_argument("--large-batch-distributions", nargs="+", default=None, choices=sorted(DISTRIBUTIONS),
                        help="the mask distributions run at batch sizes above 1 (default: all)")
    parser.add_argument("--csv", help="also write the table here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("torch %s, %s, %s, %d threads available", torch.__version__, platform.processor() or platform.machine(),
             platform.platform(), torch.get_num_threads())
    large_sparsities = args.large_batch_sparsities or args.sparsities
    large_distributions = args.large_batch_distributions or args.distributions
    rows = []
    for arch in args.models:
        for distribution in args.distributions:
            for sparsity in args.sparsities:
                large = sparsity in large_sparsities and distribution in large_distributions
                for batch in [b for b in args.batches if b == 1 or large]:
                    for threads in args.threads:
                        rows.append(run_case(arch, distribution, sparsity, batch, threads, args))
    table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    formats = {"dense_ms": "{:.1f}", "sparse_ms": "{:.1f}", "speedup": "{:.2f}", "flops_ratio": "{:.4f}",
               "flops_speedup": "{:.1f}", "build_s": "{:.1f}"}
    shown = table.assign(**{c: table[c].map(f.format) for c, f in formats.items()})
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---:|" * len(shown.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    print("\n".join(lines))  # a markdown table, as BENCHMARKS.md shows it


if __name__ == "__main__":
    main()
