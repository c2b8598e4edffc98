"""Per-layer cost of the CSR kernels against torch's dense convolution: the data behind the layout and ``auto``.

For each convolution shape of a CIFAR VGG-16 (3x3, stride 1, padding 1; channels and map sizes as the network
has them), each density and batch size: random masks, then, alternating with the dense kernel (``F.conv2d``
forward; ``torch.autograd.grad`` for the input and the weight gradient), the three products of
``robust_sparse.kernels``: forward, input gradient and the weight gradient at the non-zeros, in both grid layouts
(``cnhw``: images side by side, rows as wide as a map row; ``chwn``: the batch innermost, rows ``width x batch``
floats long). Medians of ``--repeats`` rounds; ``speedup`` = dense median / sparse median; ``work`` = density x
(padded grid / output pixels), the quantity ``train.sparse_kernels=auto`` compares with
``robust_sparse.kernels.training.AUTO_BUDGET``.

Usage::

    python benchmarks/sparse_kernels.py                      # VGG-16 shapes, densities 0.2 0.1 0.05 0.01, b32
    python benchmarks/sparse_kernels.py --batches 1 32 --densities 0.1 0.01
    python benchmarks/sparse_kernels.py --smoke              # seconds: a test runs it
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch
import torch.nn.functional as F

from robust_sparse.kernels import SparsePattern
from robust_sparse.kernels import csr_conv
from sparse_inference import markdown  # the benchmarks' one table format

log = logging.getLogger("sparse_kernels")
# (in channels, out channels, map size) of CIFAR VGG-16's 3x3 convolutions after the first
VGG16 = [(64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4), (512, 512, 4),
         (512, 512, 2)]
LAYOUTS = {"cnhw": 0, "chwn": 10_000}  # csr_conv._WIDE: maps narrower than this run with the batch innermost


def median_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for round_number in range(repeats):
        for name in (list(calls) if round_number % 2 == 0 else list(reversed(calls))):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def run_case(channels: int, outputs: int, size: int, density: float, batch: int, layout: str,
             repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(outputs, channels, 3, 3, generator=generator) < density
    weight = torch.randn(outputs, channels, 3, 3, generator=generator) * mask
    x = torch.randn(batch, channels, size, size, generator=generator)
    previous, csr_conv._WIDE = csr_conv._WIDE, LAYOUTS[layout]
    try:
        pattern = SparsePattern(mask, (1, 1), (1, 1))
        values = pattern.values(weight)
        geometry = pattern.geometry(x)
        out, rows, inner = pattern.forward(x, values, None)
        upstream = torch.randn(out.shape, generator=generator)
        x_dense, w_dense = x.clone().requires_grad_(), weight.clone().requires_grad_()
        dense_out = F.conv2d(x_dense, w_dense, None, 1, 1)
        times = median_ms({
            "dense_forward": lambda: F.conv2d(x, weight, None, 1, 1),
            "sparse_forward": lambda: pattern.forward(x, values, None, keep=False),
            "dense_input_grad": lambda: torch.autograd.grad(dense_out, x_dense, upstream, retain_graph=True),
            "sparse_input_grad": lambda: pattern.input_grad(upstream, values, geometry, channels),
            "dense_weight_grad": lambda: torch.autograd.grad(dense_out, w_dense, upstream, retain_graph=True),
            "sparse_weight_grad": lambda: pattern.weight_grad(upstream, rows, geometry, inner),
        }, repeats)
    finally:
        csr_conv._WIDE = previous
    (grid_h, grid_w), (out_h, out_w) = geometry.grid, geometry.out
    row = {"in": channels, "out": outputs, "map": size, "batch": batch, "density": density, "layout": layout,
           "work": density * grid_h * grid_w / (out_h * out_w)}
    for product in ("forward", "input_grad", "weight_grad"):
        row[f"{product}_speedup"] = times[f"dense_{product}"] / times[f"sparse_{product}"]
    row["dense_ms"] = sum(times[f"dense_{p}"] for p in ("forward", "input_grad", "weight_grad"))
    row["sparse_ms"] = sum(times[f"sparse_{p}"] for p in ("forward", "input_grad", "weight_grad"))
    row["speedup"] = row["dense_ms"] / row["sparse_ms"]
    sparse_fma = pattern.nnz * batch * out_h * out_w
    row["sparse_GFMA_per_s"] = sparse_fma / (times["sparse_forward"] * 1e6)
    row["dense_GFMA_per_s"] = mask.numel() * batch * out_h * out_w / (times["dense_forward"] * 1e6)
    log.info("%s", row)
    return row


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.2, 0.1, 0.05, 0.01])
    parser.add_argument("--batches", nargs="+", type=int, default=[32])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", help="also write the table here")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run at tiny sizes (a test runs it)")
    args = parser.parse_args(argv)
    shapes = VGG16
    if args.smoke:
        shapes, args.densities, args.batches, args.repeats = [(8, 8, 8)], [0.1], [2], 1
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("torch %s, %s, %s, %d thread(s)", torch.__version__, platform.processor() or platform.machine(),
             platform.platform(), args.threads)
    rows = [run_case(c, o, size, density, batch, layout, args.repeats)
            for batch in args.batches for (c, o, size) in shapes for density in args.densities
            for layout in args.layouts]
    table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(markdown(table))  # noqa: T201  (a markdown table, as BENCHMARKS.md shows it)
    return table


if __name__ == "__main__":
    main()
