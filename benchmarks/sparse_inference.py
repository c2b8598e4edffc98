"""Dense vs sparse CPU inference latency at CIFAR shapes: the toolkit's ``sparse_inference`` against the peers.

For each architecture, mask distribution, sparsity, batch size and thread count: masks are drawn at random
with the layer densities of the sparse engines' allocations (``uniform``: the same density in every Linear/Conv2d
layer; ``erk``: Erdős–Rényi-Kernel, as ``sparsity.distribution=erk`` allocates them), the sparse-inference model
is built under that batch size and thread count (its per-layer choice is measured then), and the dense model,
the sparse model and every in-process peer are timed on the same input, alternating, ``--repeats`` times. The
table gives medians, the min-max spread, the speed-up over dense PyTorch eager (dense median / median) and beside
it the FLOPs ratio: the FLOPs-weighted density of the Linear/Conv2d layers, with each layer's dense FLOPs counted
by ``torch.utils.flop_counter.FlopCounterMode`` on the dense layer and the input it sees. 1 / FLOPs ratio is the
speed-up a kernel that only paid for its nonzeros would reach. Logits are checked against dense (1e-4; 1e-3 for
the peers, which fuse and reorder).

Peers (``--peers``), each on the masked dense model, what a user would pick instead:

* ``compile``: ``torch.compile`` (inductor; needs a C++ compiler);
* ``onnxruntime``: the model exported to ONNX, ONNX Runtime's CPU provider, all graph optimisations
  (``pip install onnxruntime onnx``);
* ``openvino``: the same ONNX file compiled by OpenVINO for the CPU, latency hint (``pip install openvino``);
* ``deepsparse``: Neural Magic's sparse runtime. It cannot be installed beside the toolkit (numpy<2), so it runs
  from its own virtual environment, ``--deepsparse-python VENV/bin/python`` (``python3 -m venv VENV &&
  VENV/bin/pip install deepsparse==1.8.0 "numpy<2"``), on the same ONNX file, through
  ``benchmarks/deepsparse_timer.py``, in a separate process: its times are not interleaved with the others'.

A peer that is not installed, or fails, is reported as missing with the reason in the log.

The masks are random positions, not trained ones: a trained mask's pattern (not its density) would change
memory access, and the CSR kernels do not exploit structure either way.

Usage::

    python benchmarks/sparse_inference.py                    # the full grid: 2 models x 2 masks x 3 sparsities
                                                             # x batch 1 and 32 x 1 thread, with every peer
    python benchmarks/sparse_inference.py --batches 1 --peers onnxruntime
    python benchmarks/sparse_inference.py --deepsparse-python /path/to/ds-venv/bin/python
    python benchmarks/sparse_inference.py --smoke            # seconds: a test runs it
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from robust_sparse.models import build_model
from robust_sparse.sparse import density as allocation
from robust_sparse.deploy.inference import sparse_inference

log = logging.getLogger("sparse_inference")
CIFAR = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
DISTRIBUTIONS = {"uniform": allocation.uniform, "erk": allocation.erk}


def markdown(table: pd.DataFrame) -> str:
    """``table`` as a markdown table: milliseconds and seconds to 0.1, speed-ups to 0.01, the rest to 3 digits."""
    shown = table.copy()
    for column in [c for c in shown.columns if pd.api.types.is_numeric_dtype(shown[c])]:
        if column.endswith("_ms") or (column.endswith("_s") and not column.endswith("_per_s")):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
        elif column.endswith("speedup"):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
        elif shown[column].dtype == float:
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---:|" * len(shown.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


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


PEERS = ("compile", "onnxruntime", "openvino", "deepsparse")
DEEPSPARSE_TIMER = Path(__file__).with_name("deepsparse_timer.py")


def export_onnx(model: nn.Module, images: torch.Tensor, path: Path) -> Path:
    with torch.no_grad():
        torch.onnx.export(model, (images,), str(path), input_names=["images"], output_names=["logits"],
                          opset_version=17, dynamo=False)
    return path


def in_process_peer(name: str, model: nn.Module, images: torch.Tensor, threads: int,
                    onnx_file: Callable[[], Path]) -> Callable[[], torch.Tensor]:
    """A zero-argument call that runs ``model`` on ``images`` through peer ``name`` and returns the logits."""
    if name == "compile":
        compiled = torch.compile(model)

        def run() -> torch.Tensor:
            with torch.no_grad():
                return compiled(images)
        return run
    array = images.numpy()
    if name == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(str(onnx_file()), options, providers=["CPUExecutionProvider"])
        return lambda: torch.from_numpy(session.run(None, {"images": array})[0])
    if name == "openvino":
        import openvino

        compiled = openvino.Core().compile_model(str(onnx_file()), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        return lambda: torch.from_numpy(request.infer({0: array})[compiled.output(0)].copy())
    raise ValueError(name)


def time_all(calls: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call over ``repeats`` rounds, in turn within a round (drift hits every side alike)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()  # warm-up: allocators, compiled kernels, caches
        for round_number in range(repeats):
            order = list(calls) if round_number % 2 == 0 else list(reversed(calls))
            for name in order:
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
    return times


def deepsparse_times(python: str, onnx_path: Path, images: torch.Tensor, threads: int, repeats: int,
                     expected: torch.Tensor) -> list[float]:
    """DeepSparse's seconds per call, from its own environment; checks its logits against ``expected``."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "images.npy", Path(tmp) / "logits.npy"
        import numpy

        numpy.save(inputs, images.numpy())
        done = subprocess.run([python, str(DEEPSPARSE_TIMER), str(onnx_path), str(inputs), str(outputs),
                               "--threads", str(threads), "--repeats", str(repeats)],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output")
        logits = torch.from_numpy(numpy.load(outputs))
    error = float((logits - expected).abs().max())
    if error > 1e-3:
        raise AssertionError(f"DeepSparse's logits differ by {error}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def run_case(arch, distribution, sparsity, batch, threads, args) -> dict:
    torch.set_num_threads(threads)
    repeats = args.large_batch_repeats if batch > 1 else args.repeats
    build_repeats = args.large_batch_repeats if batch > 1 else args.build_repeats
    model = masked_model(arch, distribution, sparsity)
    images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    fast = sparse_inference(model, images, repeats=build_repeats)
    build_s = time.perf_counter() - start
    with torch.no_grad():
        expected = model(images)
        error = float((fast(images) - expected).abs().max())
    if error > 1e-4:
        raise AssertionError(f"{arch} {distribution} {sparsity}: logits differ by {error}")
    calls: dict[str, Callable[[], torch.Tensor]] = {"dense": lambda: model(images), "sparse": lambda: fast(images)}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"

        def onnx_file() -> Path:
            return onnx_path if onnx_path.exists() else export_onnx(model, images, onnx_path)

        for peer in [p for p in args.peers if p != "deepsparse"]:
            try:
                call = in_process_peer(peer, model, images, threads, onnx_file)
                peer_error = float((call() - expected).abs().max())
                if peer_error > 1e-3:
                    raise AssertionError(f"logits differ by {peer_error}")
                calls[peer] = call
            except Exception as failure:  # a missing or failing peer is reported, not fatal
                log.warning("%s: peer %s left out: %s", arch, peer, str(failure).splitlines()[0][:200])
        times = time_all(calls, repeats)
        if args.deepsparse_python:
            try:
                times["deepsparse"] = deepsparse_times(args.deepsparse_python, onnx_file(), images, threads,
                                                       repeats, expected)
            except Exception as failure:
                log.warning("%s: DeepSparse left out: %s", arch, str(failure).splitlines()[0][:200])
    dense_ms = statistics.median(times["dense"]) * 1e3
    ratio = flops_ratio(model, images[:1])
    report = fast.report()
    row = {"model": arch, "masks": distribution, "sparsity": sparsity, "batch": batch, "threads": threads,
           "flops_speedup": 1 / ratio, "dense_ms": dense_ms,
           "dense_spread_ms": f"{min(times['dense']) * 1e3:.1f}-{max(times['dense']) * 1e3:.1f}"}
    for name in ["sparse", *PEERS]:
        if name in times:
            median = statistics.median(times[name]) * 1e3
            row[f"{name}_ms"] = median
            row[f"{name}_spread_ms"] = f"{min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f}"
            row[f"{name}_speedup"] = dense_ms / median
    row["sparse_layers"] = f"{int(report['sparse'].sum())}/{len(report)}"
    row["build_s"] = build_s
    log.info("%s", row)
    return row


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--distributions", nargs="+", default=["uniform", "erk"], choices=sorted(DISTRIBUTIONS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per case (alternating sides)")
    parser.add_argument("--build-repeats", type=int, default=5, help="rounds per layer in the build's choice")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--large-batch-repeats", type=int, default=5,
                        help="timed rounds and build rounds per case at a batch size above 1")
    parser.add_argument("--large-batch-sparsities", nargs="+", type=float, default=None,
                        help="the sparsities run at batch sizes above 1 (default: all of --sparsities)")
    parser.add_argument("--large-batch-distributions", nargs="+", default=None, choices=sorted(DISTRIBUTIONS),
                        help="the mask distributions run at batch sizes above 1 (default: all)")
    parser.add_argument("--peers", nargs="*", default=["compile", "onnxruntime", "openvino"],
                        choices=[p for p in PEERS if p != "deepsparse"],
                        help="in-process peers timed beside dense and sparse (none: --peers)")
    parser.add_argument("--deepsparse-python", help="python of a virtual environment with deepsparse 1.8.0")
    parser.add_argument("--csv", help="also write the table here")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run at tiny sizes (a test runs it)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.distributions, args.sparsities, args.batches = ["resnet18"], ["erk"], [0.99], [1, 2]
        args.threads, args.repeats, args.build_repeats, args.large_batch_repeats = [1], 1, 1, 1
        args.peers = [p for p in args.peers if p == "onnxruntime"]
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
    print(markdown(table))  # noqa: T201  (a markdown table, as BENCHMARKS.md shows it)
    return table


if __name__ == "__main__":
    main()
