"""The GPU check: one script that exercises the toolkit on one accelerator and writes one JSON and one Markdown table.

Sized to finish in under 8 minutes on one H100/H200 (``--device cuda``); ``--tiny --device cpu`` runs the same
code paths at tiny sizes in about a minute (a test runs it). It has not been run on a GPU yet. Sections:

* **quickstart**: ``robust-sparse train`` with no config (the embedded MNIST-5k quickstart: small CNN, BSR-Net 90%,
  PGD-10 AT, then AutoAttack on 100 test points), as a user runs it, on the device;
* **smoke**: short runs of the quickstart in ``train.precision=fp16`` (GradScaler) with AGENT on, with RigL
  (dense-gradient growth), and in bf16 with ``train.compile=true`` and ``train.channels_last=true``: finite
  losses, and whether compilation fell back to eager (CUDA only; skipped with a note on the CPU, where fp16 is
  refused);
* **throughput**: dense PGD-10 AT (L-inf 8/255, step 2/255, random start) of VGG-16 and ResNet-18 at CIFAR shapes
  (3x32x32, 10 classes; the real MNIST-5k digits padded to 32x32 over 3 channels, see throughput.py), batch 128 and
  512, fp32 and bf16: the toolkit's :func:`~robust_sparse.train.train_one_epoch` against the plain PyTorch loop
  of ``benchmarks/throughput.py`` (autocast around each forward and its loss for bf16), alternating
  toolkit/baseline ``repeats`` times after a warm-up, median images/s, and the peak GPU memory of each side's
  timed runs (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; both sides' models and
  optimizers are resident, the same on both sides);
* **agent_overhead**: one epoch as ``fit`` runs it (AGENT's refresh with the g_tilde pass, then the steps with
  g_old) of ResNet-18 with BSR-Net 90%, without AGENT, with the full g_tilde pass (every batch of the epoch) and
  a quarter pass, alternating, median seconds; AGENT uses the ``fixed`` estimator (c = 0.5) so that the pass runs
  at every refresh, the steady state;
* **sparse_overhead**: the same epoch, dense against BSR-Net 90% and RigL 90% (one topology update per epoch);
* **autoattack**: a ResNet-18 PGD-AT (bf16) trained for about a minute on ``../shared/data/cifar10-prefix``
  (relative to the repository root: genuine CIFAR-10 cut to 4,660 training and 932 test images; skipped with a
  note if absent), then the original AutoAttack (standard, fp32) timed on its first 200 test points.

Usage::

    python benchmarks/gpu_check.py --device cuda --output gpu_check.json      # writes gpu_check.md beside it
    python benchmarks/gpu_check.py --tiny --device cpu --output /tmp/tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

# throughput.py is loaded from its file, whatever sys.path holds.
_spec = importlib.util.spec_from_file_location("throughput", Path(__file__).with_name("throughput.py"))
throughput = importlib.util.module_from_spec(_spec)
sys.modules["throughput"] = throughput
_spec.loader.exec_module(throughput)
BaselineSide, ToolkitSide, baseline_epoch = throughput.BaselineSide, throughput.ToolkitSide, throughput.baseline_epoch
cifar_shaped_mnist, count_params = throughput.cifar_shaped_mnist, throughput.count_params
make_config = throughput.make_config
machine_description, make_model, sync, timed = (throughput.machine_description, throughput.make_model, throughput.sync,
                                                throughput.timed)

from robust_sparse import cli  # noqa: E402
from robust_sparse.agent import AGENT, full_grad_pass, objective_loss  # noqa: E402
from robust_sparse.files.atomic import write_atomic  # noqa: E402
from robust_sparse.config import load_config  # noqa: E402
from robust_sparse.datasets.images import BatchLoader, ImageSet  # noqa: E402
from robust_sparse.objectives import build_objective  # noqa: E402
from robust_sparse.precision import Amp  # noqa: E402
from robust_sparse.sparse import build_sparsity  # noqa: E402
from robust_sparse.optim import build_optimization  # noqa: E402
from robust_sparse.train import fit, train_one_epoch  # noqa: E402

log = logging.getLogger("gpu_check")

REPO = Path(__file__).resolve().parent.parent
CIFAR_PREFIX = REPO / ".." / "shared" / "data" / "cifar10-prefix"
SEED = 0


@dataclass
class Sizes:
    models: list[str]
    batch_sizes: list[int]
    precisions: list[str]
    batches: int  # timed batches per repeat
    warmup: int  # untimed batches per side
    repeats: int
    overhead_model: str
    overhead_batch: int
    overhead_batches: int
    quickstart: list[str] = field(default_factory=list)  # --set overrides of the quickstart
    smoke: list[str] = field(default_factory=list)
    aa_train: list[str] = field(default_factory=list)
    aa_points: int = 200


FULL = Sizes(
    models=["vgg16", "resnet18"], batch_sizes=[128, 512], precisions=["fp32", "bf16"], batches=8, warmup=2,
    repeats=3, overhead_model="resnet18", overhead_batch=128, overhead_batches=16,
    smoke=["optim.epochs=2", "data.train_limit=2048", "eval.n_examples=200", "eval.autoattack_examples=0"],
    aa_train=["model.name=resnet18", "optim.epochs=8", "attack.steps=10", "attack.step_size=2/255"],
    aa_points=200,
)
TINY = Sizes(
    models=["tiny_cnn"], batch_sizes=[8, 16], precisions=["fp32", "bf16"], batches=2, warmup=1, repeats=2,
    overhead_model="tiny_cnn", overhead_batch=16, overhead_batches=4,
    quickstart=["model.name=tiny_cnn", "data.train_limit=384", "data.val_size=128", "val.max_examples=64",
                "val.pgd_steps=2", "attack.steps=2", "optim.epochs=1", "eval.n_examples=64", "eval.pgd_steps=3",
                "eval.autoattack_examples=0"],
    smoke=["model.name=tiny_cnn", "optim.epochs=1", "data.train_limit=384", "data.val_size=128",
           "val.max_examples=64", "val.pgd_steps=2", "attack.steps=2", "eval.n_examples=64", "eval.pgd_steps=3",
           "eval.autoattack_examples=0"],
    aa_train=["model.name=tiny_cnn", "optim.epochs=1", "data.train_limit=256", "data.val_size=128",
              "val.max_examples=64", "val.pgd_steps=2", "attack.steps=2"],
    aa_points=8,
)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def alternate(sides: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """Run the sides in turn ``repeats`` times (a, b, c, a, b, c, ...); wall seconds and peak memory of each."""
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    peaks: dict[str, float | None] = {name: None for name in sides}
    for repeat in range(repeats):
        for name, run in sides.items():
            reset_peak(device)
            wall, _ = timed(lambda _: run(), None, device)
            seconds[name].append(wall)
            peak = peak_mib(device)
            peaks[name] = peak if peaks[name] is None else max(peaks[name], peak)
            log.info("  %-14s repeat %d/%d  %.2f s", name, repeat + 1, repeats, wall)
    return {name: {"seconds": seconds[name], "median_seconds": statistics.median(seconds[name]),
                   "peak_mib": peaks[name]} for name in sides}


# ----------------------------------------------------------------------------------------------------------
# sections


def run_quickstart(device: torch.device, sizes: Sizes, work: Path, overrides: list[str], name: str) -> dict[str, Any]:
    """``robust-sparse train`` (no CONFIG: the embedded quickstart) with ``--set`` overrides, as a user runs it."""
    out = work / name
    argv = ["train", "--out", str(out), "--no-progress", "--set", f"device={device.type}"]
    for text in overrides:
        argv += ["--set", text]
    start = time.perf_counter()
    code = cli.main(argv)
    sync(device)
    result: dict[str, Any] = {"command": "robust-sparse " + " ".join(argv[:1] + argv[4:]), "exit_code": code,
                              "seconds": time.perf_counter() - start}
    if (out / "metrics.csv").is_file():
        metrics = pd.read_csv(out / "metrics.csv")
        result["epochs"] = len(metrics)
        result["train_loss"] = metrics["train_loss"].tolist()
        result["images_per_second"] = metrics["images_per_second"].tolist()
    if (out / "eval.json").is_file():
        evaluation = json.loads((out / "eval.json").read_text())
        result.update({key: evaluation.get(key) for key in ("clean_accuracy", "pgd_accuracy", "n_examples")})
    return result


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_smoke(device: torch.device, sizes: Sizes, work: Path) -> dict[str, Any]:
    runs = [("fp16_agent", ["train.precision=fp16", "agent.enabled=true", "agent.full_grad_batches=4"]),
            ("fp16_rigl", ["train.precision=fp16", "sparsity.method=rigl", "sparsity.update_every=4"]),
            ("bf16_compile_channels_last", ["train.precision=bf16", "train.compile=true", "train.channels_last=true",
                                            "optim.epochs=1"])]
    if device.type != "cuda":  # fp16 is refused on the CPU; inductor's CPU compile would cost minutes here
        runs = [("bf16_channels_last", ["train.precision=bf16", "train.channels_last=true"])]
    results = {}
    for name, extra in runs:
        capture = _Capture()
        logging.getLogger("robust_sparse").addHandler(capture)
        try:
            result = run_quickstart(device, sizes, work, [*sizes.smoke, *extra], name)
        finally:
            logging.getLogger("robust_sparse").removeHandler(capture)
        result["finite_losses"] = all(math.isfinite(v) for v in result.get("train_loss", [float("nan")]))
        result["compile_fell_back"] = any("train.compile" in m for m in capture.messages)
        result["warnings"] = capture.messages[:20]
        results[name] = result
    return results


class AmpToolkit(ToolkitSide):
    """throughput.py's toolkit side, with train.precision's autocast."""

    def __init__(self, model, config, device, steps_per_epoch) -> None:
        super().__init__(model, config, device, steps_per_epoch)
        self.amp = Amp(config.train.precision, device)
        self.objective = build_objective(config, model, autocast=self.amp.autocast)

    def run(self, data: ImageSet) -> None:
        loader = BatchLoader(data, self.config.data.batch_size, self.device, shuffle=False, augment_batches=False)
        train_one_epoch(self.model, self.objective, self.optimizer, self.scheduler, loader, amp=self.amp)


class AmpBaseline(BaselineSide):
    """throughput.py's plain PyTorch loop, with autocast around each forward and its loss for bf16."""

    def __init__(self, model, config, device) -> None:
        super().__init__(model, config, device)
        self.amp = Amp(config.train.precision, device)

    def run(self, data: ImageSet) -> None:
        baseline_epoch(self.model, self.optimizer, data, self.config.data.batch_size, self.device,
                       autocast=self.amp.autocast)


def run_throughput(device: torch.device, sizes: Sizes) -> list[dict[str, Any]]:
    rows = []
    images = cifar_shaped_mnist(max(sizes.batches, sizes.warmup) * max(sizes.batch_sizes))
    for name in sizes.models:
        for batch_size in sizes.batch_sizes:
            for precision in sizes.precisions:
                config = make_config(name, batch_size, f"train.precision={precision}")
                timed_data = images.take(slice(0, sizes.batches * batch_size))
                warm_data = images.take(slice(0, sizes.warmup * batch_size))
                reference = make_model(name, device)
                toolkit = AmpToolkit(make_model(name, device), config, device, sizes.batches)
                baseline = AmpBaseline(make_model(name, device), config, device)
                log.info("throughput %s batch %d %s", name, batch_size, precision)
                for side in (toolkit, baseline):
                    side.run(warm_data)
                measured = alternate({"toolkit": lambda: toolkit.run(timed_data),
                                      "baseline": lambda: baseline.run(timed_data)}, sizes.repeats, device)
                rate = {side: len(timed_data) / value["median_seconds"] for side, value in measured.items()}
                rows.append({
                    "model": name, "params": count_params(reference), "batch_size": batch_size,
                    "precision": precision, "batches": sizes.batches, "warmup": sizes.warmup,
                    "repeats": sizes.repeats,
                    "toolkit_img_s": [len(timed_data) / s for s in measured["toolkit"]["seconds"]],
                    "baseline_img_s": [len(timed_data) / s for s in measured["baseline"]["seconds"]],
                    "toolkit_median_img_s": rate["toolkit"], "baseline_median_img_s": rate["baseline"],
                    "ratio": rate["toolkit"] / rate["baseline"],
                    "toolkit_peak_mib": measured["toolkit"]["peak_mib"],
                    "baseline_peak_mib": measured["baseline"]["peak_mib"],
                })
                del toolkit, baseline, reference
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def epoch_runner(config, device: torch.device, data: ImageSet) -> Callable[[], None]:
    """One epoch as ``fit`` runs it: AGENT's refresh (if enabled), then ``train_one_epoch``."""
    model = make_model(config.model.name, device)
    loader = BatchLoader(data, config.data.batch_size, device, shuffle=False, augment_batches=False)
    optimizer, scheduler = build_optimization(config, model, len(loader))
    # a long horizon, so that RigL's updates never reach end_fraction during the measurement
    masker = build_sparsity(config.sparsity, model, config.model.name, optimizer, 1000 * len(loader), SEED)
    objective = build_objective(config, model)
    agent = AGENT(optimizer, model, config.agent, masks=masker.masks if masker is not None else None) \
        if config.agent.enabled else None
    epoch = [0]

    def run() -> None:
        if agent is not None:
            agent.refresh(full_grad_pass(config, data, objective, device, epoch[0]), objective_loss(objective))
        train_one_epoch(model, objective, agent if agent is not None else optimizer, scheduler, loader, agent=agent)
        epoch[0] += 1

    return run


def run_overhead(device: torch.device, sizes: Sizes, variants: dict[str, list[str]], base: str) -> dict[str, Any]:
    name, batch_size, batches = sizes.overhead_model, sizes.overhead_batch, sizes.overhead_batches
    data = cifar_shaped_mnist(batches * batch_size)
    runners = {side: epoch_runner(make_config(name, batch_size, *extra), device, data)
               for side, extra in variants.items()}
    for run in runners.values():  # warm-up: one epoch each (kernels chosen, buffers allocated)
        run()
    measured = alternate(runners, sizes.repeats, device)
    for side, value in measured.items():
        value["ratio"] = value["median_seconds"] / measured[base]["median_seconds"]
        value["overrides"] = variants[side]
    return {"model": name, "batch_size": batch_size, "batches": batches, "repeats": sizes.repeats,
            "baseline_side": base, "sides": measured}


def run_agent_overhead(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    sparse = ["sparsity.method=bsrnet", "sparsity.density=0.1", "sparsity.distribution=erk", "optim.optimizer=sgdw"]
    agent = ["agent.enabled=true", "agent.estimator=fixed", "agent.fixed_c=0.5", "agent.probe_chunks=0"]
    quarter = max(1, sizes.overhead_batches // 4)
    return run_overhead(device, sizes, {
        "bsrnet": sparse,
        "bsrnet+agent_full": [*sparse, *agent, "agent.full_grad_batches=0"],
        "bsrnet+agent_quarter": [*sparse, *agent, f"agent.full_grad_batches={quarter}"],
    }, base="bsrnet")


def run_sparse_overhead(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    every = max(1, sizes.overhead_batches // 2)
    return run_overhead(device, sizes, {
        "dense": [],
        "bsrnet": ["sparsity.method=bsrnet", "sparsity.density=0.1", "sparsity.distribution=erk",
                   "optim.optimizer=sgdw"],
        "rigl": ["sparsity.method=rigl", "sparsity.density=0.1", f"sparsity.update_every={every}"],
    }, base="dense")


def run_autoattack(device: torch.device, sizes: Sizes, work: Path) -> dict[str, Any]:
    root = CIFAR_PREFIX.resolve()
    if not (root / "cifar-10-batches-py").is_dir():
        return {"skipped": f"{CIFAR_PREFIX} is absent: no CIFAR-10 prefix to train and attack on"}
    from robust_sparse.eval.job import autoattack_checkpoint

    out = work / "autoattack"
    config = load_config(None, [
        "data.dataset=cifar10", f"data.root={root}", "data.val_size=500", "objective=pgd_at", "attack.eps=8/255",
        "attack.step_size=5/255", "attack.steps=2", "optim.lr=0.05", "val.pgd_steps=5", "val.max_examples=500",
        f"eval.n_examples={sizes.aa_points}", "eval.pgd_steps=20", "train.precision=bf16", f"device={device.type}",
        f"out_dir={out}", *sizes.aa_train,
    ])
    start = time.perf_counter()
    trained = fit(config)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    outcome = autoattack_checkpoint(out / "best.pt", sizes.aa_points, device=device)
    sync(device)
    seconds = time.perf_counter() - start
    row = outcome.rows[0] if outcome.rows else {}
    return {"model": config.model.name, "train_precision": config.train.precision.value,
            "train_epochs": config.optim.epochs, "train_seconds": train_seconds,
            "pgd_accuracy": trained.evaluation["pgd_accuracy"], "clean_accuracy": trained.evaluation["clean_accuracy"],
            "n_points": sizes.aa_points, "autoattack_seconds": seconds,
            "autoattack_accuracy": row.get("autoattack_acc"), "warnings": list(outcome.warnings)[:10]}


# ----------------------------------------------------------------------------------------------------------
# report


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "n/a" if value is None else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    parts = [f"# GPU check ({'tiny, ' if report['tiny'] else ''}{report['device']}: "
             f"{machine.get('gpu', machine['cpu'])}, torch {machine['torch']})", "",
             f"`{report['command']}`, {report['date']}, {report['seconds']:.0f} s in all.", ""]

    def section(title: str, value: Any, rows: Callable[[], list[dict[str, Any]]]) -> None:
        parts.extend([f"## {title}", ""])
        if isinstance(value, dict) and "skipped" in value:
            parts.extend([f"Skipped: {value['skipped']}.", ""])
        else:
            parts.extend([markdown_table(pd.DataFrame(rows())), ""])

    quick = report["quickstart"]
    section("Quickstart (`robust-sparse train`)", quick, lambda: [{
        "exit": quick["exit_code"], "seconds": quick["seconds"], "epochs": quick.get("epochs"),
        "clean": quick.get("clean_accuracy"), "PGD": quick.get("pgd_accuracy")}])
    smoke = report["smoke"]
    section("Smoke runs (fp16 + AGENT; fp16 + RigL; bf16 + compile + channels_last)", smoke, lambda: [{
        "run": name, "exit": r["exit_code"], "seconds": r["seconds"], "finite losses": r["finite_losses"],
        "compile fell back": r["compile_fell_back"], "clean": r.get("clean_accuracy"), "PGD": r.get("pgd_accuracy")}
        for name, r in smoke.items()])
    section("PGD-10 AT throughput, toolkit vs plain PyTorch (median img/s, peak MiB)", report["throughput"], lambda: [{
        "model": r["model"], "batch": r["batch_size"], "precision": r["precision"],
        "toolkit img/s": r["toolkit_median_img_s"], "baseline img/s": r["baseline_median_img_s"], "ratio": r["ratio"],
        "toolkit peak MiB": r["toolkit_peak_mib"], "baseline peak MiB": r["baseline_peak_mib"]}
        for r in report["throughput"]])
    for key, title in (("agent_overhead", "AGENT overhead"), ("sparse_overhead", "Sparse-engine overhead")):
        value = report[key]
        if "model" in value:
            title += (f" ({value['model']}, batch {value['batch_size']}, {value['batches']} batches per epoch, "
                      f"median of {value['repeats']})")
        section(title, value, lambda value=value: [{
            "side": side, "s/epoch": v["median_seconds"], f"x {value['baseline_side']}": v["ratio"],
            "peak MiB": v["peak_mib"]} for side, v in value["sides"].items()])
    aa = report["autoattack"]
    section("AutoAttack (standard, fp32) on the CIFAR-10 prefix", aa, lambda: [{
        "model": aa["model"], "train s": aa["train_seconds"], "points": aa["n_points"], "clean": aa["clean_accuracy"],
        "PGD-20": aa["pgd_accuracy"], "AutoAttack": aa["autoattack_accuracy"],
        "AutoAttack s": aa["autoattack_seconds"]}])
    return "\n".join(parts)


SECTIONS = ["quickstart", "smoke", "throughput", "agent_overhead", "sparse_overhead", "autoattack"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The GPU check: quickstart, throughput, overheads, AutoAttack.")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the same code paths in about a minute")
    parser.add_argument("--output", default="gpu_check.json", help="JSON path; the Markdown table goes beside it (.md)")
    parser.add_argument("--work-dir", default=None, help="where run directories go (default: a temporary directory)")
    parser.add_argument("--models", default=None, help="throughput: comma-separated models (default: the size's)")
    parser.add_argument("--batch-sizes", default=None, help="throughput: comma-separated batch sizes")
    parser.add_argument("--batches", type=int, default=None, help="throughput: timed batches per repeat")
    parser.add_argument("--repeats", type=int, default=None, help="alternating repeats of every timing")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset to run (default: all of {','.join(SECTIONS)})")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        parser.error(f"--sections: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTIONS)}")
    from robust_sparse.models import MODELS

    args.models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if args.models and any(m not in MODELS for m in args.models):
        parser.error(f"--models: choose from {', '.join(MODELS.names())}")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    except ValueError:
        parser.error(f"--batch-sizes: {args.batch_sizes!r} is not a comma-separated list of integers")
    if min(args.batch_sizes or [1]) < 1 or min(args.batches or 1, args.repeats or 1) < 1:
        parser.error("--batch-sizes, --batches and --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --tiny --device cpu for the CPU run)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    sizes = TINY if args.tiny else FULL
    changes = {"models": args.models, "batch_sizes": args.batch_sizes, "batches": args.batches,
               "repeats": args.repeats}
    sizes = dataclasses.replace(sizes, **{key: value for key, value in changes.items() if value})
    output = Path(args.output)
    machine = machine_description(device)
    log.info("machine: %s", machine)
    started = time.time()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else
        "python benchmarks/gpu_check.py " + " ".join(argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device.type, "tiny": args.tiny,
        "machine": machine, "load_average_before": os.getloadavg(), "section_seconds": {},
    }
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        sections: list[tuple[str, Callable[[], Any]]] = [
            ("quickstart", lambda: run_quickstart(device, sizes, work, sizes.quickstart, "quickstart")),
            ("smoke", lambda: run_smoke(device, sizes, work)),
            ("throughput", lambda: run_throughput(device, sizes)),
            ("agent_overhead", lambda: run_agent_overhead(device, sizes)),
            ("sparse_overhead", lambda: run_sparse_overhead(device, sizes)),
            ("autoattack", lambda: run_autoattack(device, sizes, work)),
        ]
        for key, section in sections:
            if key not in args.sections:
                report[key] = {"skipped": "not in --sections"}
                continue
            start = time.time()
            log.info("== %s", key)
            torch.manual_seed(SEED)
            report[key] = section()
            report["section_seconds"][key] = time.time() - start
            log.info("== %s done in %.0f s", key, report["section_seconds"][key])
    report["seconds"] = time.time() - started
    report["load_average_after"] = os.getloadavg()
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, json.dumps(report, indent=2))
    write_atomic(output.with_suffix(".md"), markdown(report) + "\n")
    log.info("wrote %s and %s (%.0f s)", output, output.with_suffix(".md"), report["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
