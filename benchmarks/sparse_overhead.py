"""Per-epoch cost of each sparse engine against dense training, and compact checkpoint sizes.

Part 1 trains the same model on the same real batches with PGD-10 adversarial training (L-inf 8/255, step
2/255), once dense and once per sparse engine, alternating engines over ``--repeats`` rounds, and reports the
median seconds per epoch and the ratio to dense measured in the same run. Update intervals are scaled so that
SET/RigL/ITOP do at least one topology update per measured epoch (the expensive case); BSR-Net rewires after
every step by definition.

Part 2 builds each model with BSR-Net-style random masks at 90% and 99% sparsity and compares the size of the
compact export (values + bitmask or positions) with the plain dense ``state_dict``.

The batches are real MNIST-5k digits from the embedded dataset, padded to 32x32 and repeated over three
channels when the model expects CIFAR-shaped input: speed does not depend on the pixel values, but we do
not use random noise in place of images.

Usage::

    python benchmarks/sparse_overhead.py                       # small_cnn, all engines, CPU defaults
    python benchmarks/sparse_overhead.py --models vgg16 --batches 3 --device cuda
    python benchmarks/sparse_overhead.py --smoke               # a seconds-long run at tiny sizes (a test runs it)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from robust_sparse.files.checkpoint import save_checkpoint
from robust_sparse.config import load_config, to_dict
from robust_sparse.datasets.images import BatchLoader, ImageSet
from robust_sparse.datasets.splits import dataset_info
from robust_sparse.datasets.mnist5k import load_mnist5k
from robust_sparse.distributed import resolve_device
from robust_sparse.models import build_model
from robust_sparse.objectives import build_objective
from robust_sparse.sparse import build_sparsity
from robust_sparse.sparse.export import export_checkpoint
from robust_sparse.optim import build_optimization
from robust_sparse.train import train_one_epoch

log = logging.getLogger("sparse_overhead")
ENGINES = ["dense", "static", "set", "rigl", "itop", "bsrnet", "gse", "ast"]


def real_batches(count: int, in_channels: int, size: int) -> ImageSet:
    train, _ = load_mnist5k()
    images = train.images[:count]
    if size != 28:
        pad = (size - 28) // 2
        images = torch.nn.functional.pad(images, (pad, size - 28 - pad, pad, size - 28 - pad))
    return ImageSet(images.repeat(1, in_channels, 1, 1), train.labels[:count])


def time_epoch(model_name: str, engine: str, data: ImageSet, args, device: torch.device) -> float:
    overrides = [f"model.name={model_name}", "attack.eps=8/255", "attack.step_size=2/255",
                 f"attack.steps={args.attack_steps}", f"data.batch_size={args.batch_size}", "optim.epochs=1",
                 "device=cpu"]
    if engine != "dense":
        # AST's sub-nets rewire on their own step counts (a third of the batches each with 3 sub-nets)
        every = max(1, args.batches // (6 if engine == "ast" else 2))
        overrides += [f"sparsity.method={engine}", f"sparsity.density={args.density}",
                      f"sparsity.update_every={every}", "sparsity.end_fraction=1.0"]
    config = load_config(None, overrides)
    torch.manual_seed(0)
    in_channels = data.images.shape[1]
    model = build_model(model_name, 10, in_channels, (0.5,) * in_channels, (0.25,) * in_channels).to(device)
    loader = BatchLoader(data, args.batch_size, device, shuffle=True, seed=0)
    optimizer, scheduler = build_optimization(config, model, len(loader))
    score = (data.images[:100].to(device).float() / 255, data.labels[:100].to(device))  # GSE's scoring batch
    build_sparsity(config.sparsity, model, model_name, optimizer, len(loader), seed=0,
                   batch_source=lambda step: score)
    objective = build_objective(config, model)
    warm = BatchLoader(ImageSet(data.images[: args.batch_size], data.labels[: args.batch_size]), args.batch_size,
                       device)
    train_one_epoch(model, objective, optimizer, scheduler, warm)  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_one_epoch(model, objective, optimizer, scheduler, loader)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def checkpoint_sizes(model_name: str, density: float) -> dict:
    # CIFAR-10-shaped: the export rebuilds the model from the checkpoint's config (its dataset's channels)
    config = load_config(None, [f"model.name={model_name}", "data.dataset=cifar10", "sparsity.method=static",
                                f"sparsity.density={density}", "sparsity.distribution=uniform"])
    info = dataset_info(config.data)
    model = build_model(model_name, info.num_classes, info.in_channels, info.mean, info.std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masker = build_sparsity(config.sparsity, model, model_name, optimizer, 1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.pt"
        save_checkpoint({"config": to_dict(config), "epoch": 1, "model": model.state_dict(),
                         "sparsity": masker.state_dict()}, path)
        summary = export_checkpoint(path, Path(tmp) / "export")
    return {"model": model_name, "sparsity": f"{1 - density:.0%}", "density": round(summary["density"], 4),
            "dense_MB": summary["dense_file_bytes"] / 2**20, "compact_MB": summary["compact_file_bytes"] / 2**20,
            "compact/dense": summary["compact_to_dense_size"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=6, help="batches per measured epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sizes", default="vgg16,resnet18,wrn28_4", help="models for the checkpoint-size table")
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps of the training attack")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run at tiny sizes (a test runs it)")
    args = parser.parse_args(argv)
    if args.smoke:  # every engine and both tables, on tiny_cnn; AST's three sub-nets need >= 3 batches
        args.models, args.batch_size, args.batches, args.repeats = "tiny_cnn", 4, 3, 1
        args.attack_steps, args.sizes, args.device = 1, "tiny_cnn", "cpu"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = resolve_device(args.device)

    rows = []
    for model_name in args.models.split(","):
        small_input = model_name in ("small_cnn", "tiny_cnn")
        data = real_batches(args.batches * args.batch_size, 1 if small_input else 3, 28 if small_input else 32)
        seconds: dict[str, list[float]] = {engine: [] for engine in args.engines.split(",")}
        for round_number in range(args.repeats):
            for engine in seconds:  # alternate engines so that drifts in machine load hit them all alike
                seconds[engine].append(time_epoch(model_name, engine, data, args, device))
                log.info("%s %s round %d: %.2f s", model_name, engine, round_number + 1, seconds[engine][-1])
        dense = statistics.median(seconds["dense"])
        for engine, values in seconds.items():
            rows.append({"model": model_name, "engine": engine, "s/epoch (median)": statistics.median(values),
                         "ratio to dense": statistics.median(values) / dense})
    pd.set_option("display.float_format", lambda v: f"{v:.3f}")
    print(pd.DataFrame(rows).to_string(index=False))  # noqa: T201  (a benchmark prints its table)
    sizes = [checkpoint_sizes(name, d) for name in args.sizes.split(",") if name for d in (0.1, 0.01)]
    print(pd.DataFrame(sizes).to_string(index=False))  # noqa: T201


if __name__ == "__main__":
    main()
