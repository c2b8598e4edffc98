"""Training throughput of dense PGD-10 adversarial training: the toolkit's step against plain PyTorch.

For each model the script times two implementations of the same work in one process:

* **toolkit**: :func:`robust_sparse.train.train_one_epoch` with a :class:`~robust_sparse.datasets.images.BatchLoader`
  over an :class:`~robust_sparse.datasets.images.ImageSet` of exactly ``batches * batch_size`` images, the objective from
  :func:`~robust_sparse.objectives.build_objective` (``pgd_at``: L-inf, eps 8/255, step 2/255, 10 steps,
  random start) and the optimizer and scheduler from :func:`~robust_sparse.optim.build_optimization`;
* **baseline**: the minimal PGD-AT loop in :func:`baseline_epoch` below (model in eval mode for the attack,
  uniform random start, 10 sign steps with ``torch.autograd.grad``, projection onto the eps-ball and [0,1],
  then train mode, cross-entropy on the adversarial batch and an SGD step with momentum 0.9, wd 5e-4).

Both sides get a fresh copy of the same initialised model, the same batches (uint8 on the CPU, moved to the
device and scaled to [0,1] per batch on both sides), the same batch size, learning rate (0.1, constant
schedule: the toolkit's LambdaLR still steps every batch), momentum and weight decay, and no augmentation. Each side first runs ``--warmup`` untimed batches; then the sides alternate
(toolkit, baseline, toolkit, baseline, ...) ``--repeats`` times over the same ``--batches`` batches, and the
table reports the median images/s of each side and the ratio toolkit / baseline. On a shared CPU machine each
timed run also records how many cores it kept busy (process CPU time / wall time); a pair in which either side
kept fewer than 90% of torch's threads busy had its cores taken by another process, and is measured again
(up to ``--retries`` times per model; discarded pairs are kept in the JSON output).

Peak memory is measured per side in a fresh subprocess (this script re-invoked with a hidden ``--child``
flag), so that one side's tensors and allocator caches never count towards the other's: on CUDA it is
``torch.cuda.max_memory_allocated``; on the CPU it is the peak resident set size
of the child, which includes the Python interpreter, the imported libraries (``import torch`` alone is
about 530 MiB resident with a CUDA build) and the data, identical on both sides; the child also reports its
resident size before training, so the JSON output has the training increment too. The child reads the peak
from ``VmHWM`` in ``/proc/self/status`` and also records ``resource.getrusage(RUSAGE_SELF).ru_maxrss``,
which on Linux is *not* the child's own peak: at ``exec`` the kernel folds the high-water mark of the
replaced address space (a copy of, or with vfork the very, address space of the parent) into it, so every
child of a parent that once held 2 GiB reports at least 2 GiB. ``ru_maxrss`` is used only where there is
no ``/proc``.
A child first runs one step on a 2-image batch, so that gradients and momentum buffers exist, and then
``MEMORY_BATCHES`` full batches: the peak is that of a steady-state step without paying for a full warm-up.

Data: the batches are CIFAR-shaped (3x32x32) but real images, not random noise. CIFAR-10 cannot be
downloaded here, so they are built from the embedded MNIST-5k set (:func:`robust_sparse.datasets.mnist5k.load_mnist5k`,
uint8 [N,1,28,28], train then test split): each digit is zero-padded to 32x32 and repeated over 3 channels,
and the set is cycled if more images are needed. Throughput does not depend on the pixel values. Models are
built for 10 classes with CIFAR-10's normalisation constants.

Defaults are chosen per device: on the CPU few batches (a PGD-10 AT step at batch 128 takes about 0.9 s for
small_cnn, 12 s for VGG-16 and 22 s for ResNet-18 on 2 cores), so that all three models finish in about
7 minutes on a quiet machine; on CUDA 20 timed batches and 3 warm-up batches. ``torch.set_num_threads`` is
called only with ``--threads``.

Usage::

    python benchmarks/throughput.py [--models small_cnn,resnet18,vgg16] [--batch-size 128] [--batches N]
        [--warmup 1] [--repeats 3] [--device auto|cpu|cuda] [--threads N] [--retries 6] [--output BENCH.json]
    python benchmarks/throughput.py --smoke      # a seconds-long run at tiny sizes (a test runs it)

``--smoke``: tiny_cnn, one warm-up and one timed batch of 4 images per side, one repeat, no retries, on the CPU;
both memory children still run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from robust_sparse.config import TrainConfig, load_config
from robust_sparse.datasets import DATASETS
from robust_sparse.datasets.images import BatchLoader, ImageSet
from robust_sparse.datasets.mnist5k import load_mnist5k
from robust_sparse.models import MODELS, build_model
from robust_sparse.objectives import Objective, build_objective
from robust_sparse.optim import build_optimization
from robust_sparse.train import train_one_epoch

log = logging.getLogger("throughput")

DEFAULT_MODELS = "small_cnn,resnet18,vgg16"
# Timed batches per repeat on the CPU (2 cores, batch 128): small_cnn ~0.9 s/batch, VGG-16 ~12 s, ResNet-18 ~22 s.
CPU_BATCHES = {"small_cnn": 5, "vgg16": 2, "resnet18": 1}
CPU_BATCHES_OTHER = 1
CUDA_BATCHES = 20
CPU_WARMUP, CUDA_WARMUP = 1, 3
MEMORY_BATCHES = 1  # full batches a memory child runs after its 2-image priming step
PRIME_IMAGES = 2
# On the CPU a timed run that kept fewer than this fraction of torch's threads busy (process CPU time / wall
# time) shared the cores with another process: uncontended runs here keep 1.97-2.00 of 2 busy.
CONTENDED = 0.9
SEED = 0
LR = 0.1
EPS, STEP_SIZE, STEPS = 8 / 255, 2 / 255, 10


# ----------------------------------------------------------------------------------------------------------
# data, config, models


def cifar_shaped_mnist(n: int) -> ImageSet:
    """``n`` real MNIST-5k digits as uint8 [n, 3, 32, 32]: zero-padded to 32x32, repeated over 3 channels."""
    train, test = load_mnist5k()
    images = torch.cat([train.images, test.images])  # [5000, 1, 28, 28] uint8
    labels = torch.cat([train.labels, test.labels])
    images = F.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous()
    index = torch.arange(n) % len(labels)
    return ImageSet(images[index].contiguous(), labels[index].contiguous())


def make_config(model_name: str, batch_size: int, *extra: str) -> TrainConfig:
    """The benchmark's PGD-10 AT config; ``extra`` overrides (``key=value``) go last."""
    return load_config(None, [
        f"model.name={model_name}", "objective=pgd_at", "attack.norm=linf", "attack.eps=8/255",
        "attack.step_size=2/255", f"attack.steps={STEPS}", "attack.random_start=true",
        f"data.batch_size={batch_size}", "data.augment=false", f"optim.lr={LR}", "optim.momentum=0.9",
        "optim.weight_decay=5e-4", "optim.nesterov=false", f"seed={SEED}",
        # Constant: the scheduler still steps every batch, but both sides train with the same learning rate,
        # so neither side's numbers drift into a different regime (say, float underflow) than the other's.
        "optim.schedule=constant", *extra,
    ])


def make_model(name: str, device: torch.device) -> nn.Module:
    info = DATASETS.get("cifar10")
    torch.manual_seed(SEED)
    return build_model(name, info.num_classes, info.in_channels, info.mean, info.std).to(device)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# the two sides


def baseline_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: ImageSet, batch_size: int,
                   device: torch.device, eps: float = EPS, alpha: float = STEP_SIZE, steps: int = STEPS,
                   autocast: Callable[[], AbstractContextManager] = nullcontext) -> None:
    """Plain-PyTorch PGD-AT (Madry et al.) over ``data`` in order, one SGD step per batch; ``autocast`` wraps
    each forward and its loss (bf16 mixed precision; backward outside it, as the PyTorch AMP recipe does)."""
    for start in range(0, len(data), batch_size):
        x = data.images[start:start + batch_size].to(device, non_blocking=True).float().div_(255)
        y = data.labels[start:start + batch_size].to(device, non_blocking=True)
        model.eval()  # BatchNorm on running statistics during the attack
        delta = torch.empty_like(x).uniform_(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(steps):
            delta.requires_grad_(True)
            with autocast():
                loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
        model.train()
        with autocast():
            loss = F.cross_entropy(model(x + delta), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


class ToolkitSide:
    """The toolkit's training step: objective, optimizer and scheduler exactly as ``fit`` builds them."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device, steps_per_epoch: int) -> None:
        self.model, self.config, self.device = model, config, device
        self.optimizer, self.scheduler = build_optimization(config, model, steps_per_epoch)
        self.objective: Objective = build_objective(config, model)

    def run(self, data: ImageSet) -> None:
        loader = BatchLoader(data, self.config.data.batch_size, self.device, shuffle=False, augment_batches=False)
        train_one_epoch(self.model, self.objective, self.optimizer, self.scheduler, loader)


class BaselineSide:
    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.optim.lr, momentum=0.9, weight_decay=5e-4)

    def run(self, data: ImageSet) -> None:
        baseline_epoch(self.model, self.optimizer, data, self.config.data.batch_size, self.device)


def make_side(side: str, model: nn.Module, config: TrainConfig, device: torch.device, batches: int):
    if side == "toolkit":
        return ToolkitSide(model, config, device, steps_per_epoch=batches)
    return BaselineSide(model, config, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[ImageSet], None], data: ImageSet, device: torch.device) -> tuple[float, float]:
    """Wall seconds of ``run(data)``, and the CPU cores it kept busy on average (process CPU time / wall).

    On a shared CPU machine the second number is the tell-tale of contention: well below the thread count
    means other processes took cores during the measurement.
    """
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    run(data)
    sync(device)
    wall = time.perf_counter() - start
    return wall, (time.process_time() - cpu_start) / wall


# ----------------------------------------------------------------------------------------------------------
# memory: one fresh subprocess per side


def proc_status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB; None where there is no /proc."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child_main(args: argparse.Namespace) -> int:
    """Run one side for the memory measurement and print one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    saved = torch.load(args.data_file)
    data = ImageSet(saved["images"], saved["labels"])
    config = make_config(args.models, args.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = make_model(args.models, device)
    side = make_side(args.child, model, config, device, MEMORY_BATCHES)
    setup_rss = proc_status_mib("VmRSS")
    side.run(data.take(slice(0, PRIME_IMAGES)))  # gradients and momentum buffers now exist
    side.run(data.take(slice(0, MEMORY_BATCHES * args.batch_size)))
    sync(device)
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    high_water = proc_status_mib("VmHWM")
    result = {
        "side": args.child,
        "setup_rss_mib": setup_rss,
        # ru_maxrss is max(this process's peak, the parent's peak RSS when it spawned us): Linux folds the
        # replaced address space's high-water mark into it at exec. VmHWM belongs to this address space only.
        "ru_maxrss_mib": ru_maxrss,
        "vm_hwm_mib": high_water,
        "peak_rss_mib": high_water if high_water is not None else ru_maxrss,
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))
    return 0


def measure_memory(side: str, name: str, args: argparse.Namespace, device: torch.device, data_file: str) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--models", name,
               "--batch-size", str(args.batch_size), "--device", device.type, "--data-file", data_file]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child for {name}/{side} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# the benchmark


def benchmark_model(name: str, args: argparse.Namespace, device: torch.device, images: ImageSet,
                    data_file: str) -> dict[str, Any]:
    batches = args.batches or (CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES.get(name, CPU_BATCHES_OTHER))
    warmup = args.warmup if args.warmup is not None else (CUDA_WARMUP if device.type == "cuda" else CPU_WARMUP)
    config = make_config(name, args.batch_size)
    timed_data = images.take(slice(0, batches * args.batch_size))
    warm_data = images.take(slice(0, warmup * args.batch_size))

    reference = make_model(name, device)
    params = count_params(reference)
    sides = {
        "toolkit": make_side("toolkit", copy.deepcopy(reference), config, device, batches),
        "baseline": make_side("baseline", copy.deepcopy(reference), config, device, batches),
    }
    del reference
    log.info("%s: %.2fM params, %d timed batches x %d repeats (+%d warm-up) of %d images on %s",
             name, params / 1e6, batches, args.repeats, warmup, args.batch_size, device)
    if warmup:
        for side_name, side in sides.items():
            seconds, _ = timed(side.run, warm_data, device)
            log.info("%s %-8s warm-up  %6.1f s", name, side_name, seconds)

    rates: dict[str, list[float]] = {"toolkit": [], "baseline": []}
    busy: dict[str, list[float]] = {"toolkit": [], "baseline": []}
    discarded: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    repeat = 0
    while repeat < args.repeats:
        pair = {}
        for side_name, side in sides.items():  # alternate: toolkit, baseline, toolkit, baseline, ...
            seconds, cores = timed(side.run, timed_data, device)
            pair[side_name] = (len(timed_data) / seconds, cores)
            log.info("%s %-8s repeat %d/%d  %6.1f s  %7.1f img/s  (%.2f cores busy, load %.2f)", name, side_name,
                     repeat + 1, args.repeats, seconds, pair[side_name][0], cores, os.getloadavg()[0])
        lowest = min(cores for _, cores in pair.values())
        if device.type == "cpu" and lowest < CONTENDED * threads and len(discarded) < args.retries:
            # Another process took cores during this pair: measure the pair again rather than report it.
            discarded.append({side: {"img_s": rate, "cores_busy": cores} for side, (rate, cores) in pair.items()})
            log.warning("%s repeat %d kept only %.2f of %d threads busy: CPU contention, measuring the pair again "
                        "(retry %d of %d)", name, repeat + 1, lowest, threads, len(discarded), args.retries)
            continue
        for side_name, (rate, cores) in pair.items():
            rates[side_name].append(rate)
            busy[side_name].append(cores)
        repeat += 1
    del sides
    if device.type == "cuda":
        torch.cuda.empty_cache()

    memory = {}
    for side_name in ("toolkit", "baseline"):
        memory[side_name] = measure_memory(side_name, name, args, device, data_file)
        log.info("%s %-8s memory %s", name, side_name, memory[side_name])
    key = "peak_cuda_mib" if device.type == "cuda" else "peak_rss_mib"
    toolkit_rate, baseline_rate = statistics.median(rates["toolkit"]), statistics.median(rates["baseline"])
    result = {
        "model": name, "params": params, "batches": batches, "warmup": warmup,
        "toolkit_img_s": rates["toolkit"], "baseline_img_s": rates["baseline"],
        "toolkit_cores_busy": busy["toolkit"], "baseline_cores_busy": busy["baseline"],
        "discarded_pairs": discarded,
        "toolkit_median_img_s": toolkit_rate, "baseline_median_img_s": baseline_rate,
        "ratio": toolkit_rate / baseline_rate,
        "memory_metric": key, "memory": memory,
        "toolkit_peak_mib": memory["toolkit"][key], "baseline_peak_mib": memory["baseline"][key],
        "memory_ratio": memory["toolkit"][key] / memory["baseline"][key],
    }
    if device.type == "cpu" and all(memory[side]["setup_rss_mib"] is not None for side in memory):
        for side in memory:  # what training adds on top of the interpreter, libraries, model and data
            result[f"{side}_train_increment_mib"] = memory[side]["peak_rss_mib"] - memory[side]["setup_rss_mib"]
    return result


def machine_description(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    described = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
    }
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Dense PGD-10 AT throughput: toolkit vs plain PyTorch.")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches per repeat (default: CUDA 20; CPU small_cnn 5, vgg16 2, resnet18 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches per side (default: CPU 1, CUDA 3)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave alone)")
    parser.add_argument("--retries", type=int, default=6,
                        help="CPU only: measure a toolkit/baseline pair again, up to this many times per model, when "
                             "another process took cores during it (default 6; 0 = keep every pair)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", choices=["toolkit", "baseline"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run at tiny sizes (a test runs it)")
    parser.add_argument("--data-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.batch_size, args.batches, args.warmup = "tiny_cnn", 4, 1, 1
        args.repeats, args.retries, args.device = 1, 0, "cpu"
    if args.batch_size < 1 or args.repeats < 1 or (args.batches is not None and args.batches < 1):
        parser.error("--batch-size, --batches and --repeats must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.retries < 0:
        parser.error("--retries must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def resolve(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve(args.device)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS.names())}")

    cuda = device.type == "cuda"
    most = max(args.batches or (CUDA_BATCHES if cuda else max(CPU_BATCHES.values())),
               args.warmup if args.warmup is not None else (CUDA_WARMUP if cuda else CPU_WARMUP), MEMORY_BATCHES)
    images = cifar_shaped_mnist(most * args.batch_size)
    machine = machine_description(device)
    log.info("machine: %s", machine)
    started = time.time()
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_file = str(Path(tmp) / "batches.pt")
        torch.save({"images": images.images[: MEMORY_BATCHES * args.batch_size].clone(),
                    "labels": images.labels[: MEMORY_BATCHES * args.batch_size].clone()}, data_file)
        for name in names:
            results.append(benchmark_model(name, args, device, images, data_file))
    elapsed = time.time() - started

    table = pd.DataFrame({
        "model": [r["model"] for r in results],
        "params (M)": [r["params"] / 1e6 for r in results],
        "toolkit img/s": [r["toolkit_median_img_s"] for r in results],
        "baseline img/s": [r["baseline_median_img_s"] for r in results],
        "ratio": [r["ratio"] for r in results],
        "toolkit peak MiB": [r["toolkit_peak_mib"] for r in results],
        "baseline peak MiB": [r["baseline_peak_mib"] for r in results],
        "memory ratio": [r["memory_ratio"] for r in results],
    })
    contended = [r["model"] for r in results if device.type == "cpu" and min(
        r["toolkit_cores_busy"] + r["baseline_cores_busy"]) < CONTENDED * torch.get_num_threads()]
    if contended:
        log.warning("CPU contention during the timing of %s: rerun on a quiet machine", ", ".join(contended))
    memory_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS of a fresh process"
    print(f"\nDense PGD-10 AT, batch {args.batch_size}, 3x32x32, median of {args.repeats} alternating repeats "
          f"on {device} ({machine['cpu'] if device.type == 'cpu' else machine.get('gpu')}); memory: {memory_kind}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    log.info("total %.0f s; load average before %s, after %s", elapsed,
             " ".join(f"{v:.2f}" for v in load_before), " ".join(f"{v:.2f}" for v in os.getloadavg()))
    if args.output:
        report = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "seconds": elapsed,
            "machine": machine, "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "batch_size": args.batch_size, "repeats": args.repeats, "memory_batches": MEMORY_BATCHES,
            "attack": {"eps": EPS, "step_size": STEP_SIZE, "steps": STEPS, "random_start": True}, "lr": LR,
            "results": results,
        }
        Path(args.output).write_text(json.dumps(report, indent=2))
        log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
