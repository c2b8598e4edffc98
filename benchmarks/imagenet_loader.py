"""Is the streamed ImageNet loader fast enough not to be the bottleneck? Loader images/s against the training
step's images/s at the same batch size, in one process, and their ratio.

* **loader**: :class:`robust_sparse.datasets.folders.FolderLoader` over an ImageFolder tree (the training split as
  ``data.dataset: imagenet``/``imagefolder`` reads it): JPEG decode, RandomResizedCrop + flip in ``W`` worker
  processes, uint8 batches pinned (CUDA) and moved to the device, scaled to [0, 1] there. Timed from the first
  batch on (worker start-up is paid once per epoch, i.e. once per ~10,000 ImageNet batches), for each ``W`` of
  ``--workers``.
* **step**: the toolkit's own training step, :func:`robust_sparse.train.train_one_epoch` with the objective of
  ``--objective`` (natural, or PGD-AT at L-inf 4/255 with ``--attack-steps`` steps) on ``--model`` (default
  ResNet-50), over ``--batches`` batches of one fixed device batch (the data cost excluded).

The sides alternate (loader with each W, step, loader, step, ...) ``--repeats`` times; the table gives the median
and the range of each, and loader/step: above 1, the loader with W workers feeds the step faster than it trains
(on a real run the workers share the CPU with the step's own host work, so keep a margin).

Without ``--root`` the script writes a tree of ``--classes`` x ``--per-class`` JPEGs of ``--source-size`` pixels
(ImageNet's average is about 400x350) into a temporary directory: random smooth colour fields, so that JPEG
decoding costs about what a photo of that size costs.

Usage::

    python benchmarks/imagenet_loader.py [--root DIR] [--workers 0,2] [--batch-size 32] [--batches 4]
        [--repeats 3] [--model resnet50] [--objective natural|pgd_at] [--attack-steps 2] [--image-size 224]
        [--device auto|cpu|cuda]
    python benchmarks/imagenet_loader.py --smoke     # a seconds-long run at tiny sizes (a test runs it)

``--smoke`` generates a tree of 2 classes x 8 small JPEGs (unless ``--root``) and times the loader with 0 and 1
workers against tiny_cnn's PGD-1 AT step on batches of 2 images of 32 pixels.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from robust_sparse.config import load_config
from robust_sparse.datasets.splits import dataset_info, load_splits
from robust_sparse.distributed import resolve_device
from robust_sparse.datasets.folders import FolderLoader
from robust_sparse.models import build_model
from robust_sparse.objectives import build_objective
from robust_sparse.optim import build_optimization
from robust_sparse.train import train_one_epoch


def write_tree(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        for split, count in (("train", per_class), ("val", 1)):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                coarse = rng.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize(size, Image.BILINEAR)
                noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
                Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{k:04d}.JPEG", quality=90)


class _SameBatch:
    """``count`` copies of one device batch, with the loader interface train_one_epoch reads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, count: int) -> None:
        self.images, self.labels, self.count, self.device = images, labels, count, images.device

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return iter([(self.images, self.labels)] * self.count)


def time_loader(train, workers: int, batch_size: int, batches: int, device: torch.device, epoch: int) -> float:
    loader = FolderLoader(train, batch_size, device, shuffle=True, seed=0, info=object(), augment_batches=True,
                          drop_last=True, workers=workers)
    loader.set_epoch(epoch)
    iterator = iter(loader)
    next(iterator)  # workers started and the first batch in: start the clock
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del iterator
    return batches * batch_size / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="an ImageFolder tree (train/<class>/...); default: a generated one")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--source-size", default="400x350", help="generated JPEGs, WIDTHxHEIGHT")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--objective", default="natural", choices=["natural", "pgd_at"])
    parser.add_argument("--attack-steps", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run at tiny sizes (a test runs it)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.classes, args.per_class, args.source_size, args.workers = 2, 8, "64x56", "0,1"
        args.batch_size, args.batches, args.repeats, args.model = 2, 2, 1, "tiny_cnn"
        args.objective, args.attack_steps, args.image_size, args.device = "pgd_at", 1, 32, "cpu"
    device = resolve_device(args.device)
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.root) if args.root else Path(scratch)
        if not args.root:
            width, height = (int(v) for v in args.source_size.lower().split("x"))
            write_tree(root, args.classes, args.per_class, (width, height))
        classes = sum(1 for p in (root / "train").iterdir() if p.is_dir())
        config = load_config(None, [
            "data.dataset=imagefolder", f"data.root={root}", f"data.num_classes={classes}", "data.val_size=1",
            f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}", f"model.name={args.model}",
            f"objective={args.objective}", "attack.eps=4/255", "attack.step_size=1/255",
            f"attack.steps={args.attack_steps}", "optim.schedule=constant", "optim.epochs=1"])
        train = load_splits(config.data, seed=0).train
        needed = (args.batches + 1) * args.batch_size
        if len(train) < needed:
            raise SystemExit(f"the tree has {len(train)} training images; this run reads {needed} per timing")

        info = dataset_info(config.data)
        torch.manual_seed(0)
        model = build_model(args.model, info.num_classes, 3, info.mean, info.std).to(device)
        objective = build_objective(config, model)
        optimizer, scheduler = build_optimization(config, model, args.batches * (args.repeats + 1))
        images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
        labels = torch.randint(0, info.num_classes, (args.batch_size,), device=device)
        train_one_epoch(model, objective, optimizer, scheduler, _SameBatch(images, labels, 1))  # warm-up

        loader_rates: dict[int, list[float]] = {w: [] for w in workers}
        step_rates: list[float] = []
        for repeat in range(args.repeats):
            for w in workers:
                loader_rates[w].append(time_loader(train, w, args.batch_size, args.batches, device, repeat))
            stats = train_one_epoch(model, objective, optimizer, scheduler,
                                    _SameBatch(images, labels, args.batches))
            step_rates.append(stats.images / stats.seconds)

    step = statistics.median(step_rates)
    what = "natural" if args.objective == "natural" else f"PGD-{args.attack_steps} AT"
    print(f"device: {device} ({platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}); batch {args.batch_size} at {args.image_size} px, {args.batches} batches "
          f"x {args.repeats} alternating repeats")
    print(f"training step ({args.model}, {what}): {step:.1f} img/s [{min(step_rates):.1f}-{max(step_rates):.1f}]")
    print("workers  loader img/s (median [min-max])  loader / step")
    for w, rates in loader_rates.items():
        median = statistics.median(rates)
        print(f"{w:>7}  {median:10.1f} [{min(rates):.1f}-{max(rates):.1f}]  {median / step:13.1f}x")


if __name__ == "__main__":
    main()
