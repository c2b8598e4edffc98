"""Wall time and peak memory of AGENT over the same sparse engine without it, under PGD-10 AT.

One measured unit is a full epoch as ``fit`` runs it: AGENT's snapshot refresh (the large-batch g~ pass and
the c-hat estimate) plus the training steps, each of which adds one forward/backward of the snapshot. Both
sides train the same model on the same real batches (MNIST-5k digits from the embedded dataset), alternating
over ``--repeats`` rounds; the ratio uses medians measured in the same run. The refresh counts as a second
refresh (c_t != 0), the steady state after the first epoch.

The floor is 12/11 per step (one extra unit over 10 attack + 1 update units) plus the refresh pass, about
``full_grad_batches / batches * (1 + 1/3)`` extra units per step-equivalent; ``--full-grad-batches`` trades
g~'s accuracy for that cost.

Peak memory is measured in a fresh subprocess per side: on CUDA ``max_memory_allocated``; on CPU the growth
of the process's high-water mark (``VmHWM``) over its RSS after imports, so the ~1 GiB of libraries does not
drown the training's own memory. Both sides also report the bytes of their persistent training state (model,
optimizer buffers, and for AGENT the snapshots, g~ and g_old), which is exact.

Usage::

    python benchmarks/agent_overhead.py                     # small_cnn, BSR-Net 90%, CPU defaults
    python benchmarks/agent_overhead.py --model vgg16 --batches 20 --device cuda
    python benchmarks/agent_overhead.py --smoke             # a seconds-long run at tiny sizes (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from sparse_overhead import real_batches  # noqa: E402
from throughput import proc_status_mib  # noqa: E402

from robust_sparse.agent import AGENT, full_grad_pass, objective_loss  # noqa: E402
from robust_sparse.config import load_config  # noqa: E402
from robust_sparse.datasets.images import BatchLoader  # noqa: E402
from robust_sparse.models import build_model  # noqa: E402
from robust_sparse.objectives import build_objective  # noqa: E402
from robust_sparse.sparse import build_sparsity  # noqa: E402
from robust_sparse.distributed import resolve_device  # noqa: E402
from robust_sparse.optim import build_optimization  # noqa: E402
from robust_sparse.train import train_one_epoch  # noqa: E402

log = logging.getLogger("agent_overhead")


def measure(args, with_agent: bool, device: torch.device, state: dict | None = None) -> float:
    small = args.model in ("small_cnn", "tiny_cnn")
    data = real_batches(args.batches * args.batch_size, 1 if small else 3, 28 if small else 32)
    overrides = [f"model.name={args.model}", "attack.eps=8/255", "attack.step_size=2/255",
                 f"attack.steps={args.attack_steps}", f"data.batch_size={args.batch_size}", "optim.epochs=1",
                 "optim.optimizer=sgdw", f"sparsity.method={args.engine}", f"sparsity.density={args.density}",
                 f"agent.enabled={str(with_agent).lower()}", "agent.estimator=paper",
                 f"agent.full_grad_batches={args.full_grad_batches}"]
    config = load_config(None, overrides)
    torch.manual_seed(0)
    channels = data.images.shape[1]
    model = build_model(args.model, 10, channels, (0.5,) * channels, (0.25,) * channels).to(device)
    loader = BatchLoader(data, args.batch_size, device, shuffle=True, seed=0, drop_last=True)
    optimizer, scheduler = build_optimization(config, model, len(loader))
    masker = build_sparsity(config.sparsity, model, args.model, optimizer, len(loader) * 4, seed=0)
    objective = build_objective(config, model)
    agent = AGENT(optimizer, model, config.agent, masks=masker.masks if masker else None) if with_agent else None
    stepper = agent or optimizer
    from robust_sparse.datasets.images import ImageSet

    if agent is not None:  # reach the steady state: a previous snapshot exists, so the refresh does its pass
        agent.refresh([], objective_loss(objective))
    train_one_epoch(model, objective, stepper, scheduler,
                    BatchLoader(ImageSet(data.images[: args.batch_size], data.labels[: args.batch_size]),
                                args.batch_size, device), agent=agent)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if agent is not None:
        agent.refresh(full_grad_pass(config, data, objective, device, 0), objective_loss(objective))
        assert agent.full_grads is not None
    train_one_epoch(model, objective, stepper, scheduler, loader, agent=agent)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if state is not None:  # persistent training state, in bytes
        tensors = [*model.state_dict().values(),
                   *(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))]
        if agent is not None:
            tensors += list(agent.snapshot.state_dict().values())  # the previous one lives only during a refresh
            tensors += [g for grads in agent.subnet_full_grads or [] for g in grads]
            tensors += [p for p in model.parameters()]  # g_old, one gradient-sized buffer per step
        state["bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    return elapsed


def child(args) -> None:
    device = resolve_device(args.device)
    setup = proc_status_mib("VmRSS")
    state: dict = {}
    measure(args, args.child == "agent", device, state)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        high_water = proc_status_mib("VmHWM")
        peak = (high_water - setup if high_water is not None and setup is not None
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    sys.stdout.write(json.dumps({"peak_mib": peak, "state_mib": state["bytes"] / 2**20}) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--engine", default="bsrnet")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--full-grad-batches", type=int, default=0, help="0 = as many as the epoch has")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps of the training attack")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run at tiny sizes (a test runs it)")
    parser.add_argument("--child", choices=["base", "agent"], help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.smoke:  # both sides and both memory children, on tiny_cnn with two batches of four digits
        args.model, args.batch_size, args.batches, args.repeats = "tiny_cnn", 4, 2, 1
        args.attack_steps, args.device = 1, "cpu"
    if args.child:
        child(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = resolve_device(args.device)
    seconds = {"base": [], "agent": []}
    for round_number in range(args.repeats):
        for side in seconds:
            seconds[side].append(measure(args, side == "agent", device))
            log.info("round %d %s: %.2f s", round_number + 1, side, seconds[side][-1])
    peaks, states = {}, {}
    for side in seconds:
        command = [sys.executable, __file__, *argv, "--child", side]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[side], states[side] = json.loads(output)["peak_mib"], json.loads(output)["state_mib"]
    base, agent = statistics.median(seconds["base"]), statistics.median(seconds["agent"])
    table = pd.DataFrame([{
        "model": args.model, "engine": args.engine, "density": args.density, "batches": args.batches,
        "g~ batches": args.full_grad_batches or args.batches, "base s/epoch": base, "AGENT s/epoch": agent,
        "time ratio": agent / base, "base peak MiB": peaks["base"], "AGENT peak MiB": peaks["agent"],
        "memory ratio": peaks["agent"] / peaks["base"], "base state MiB": states["base"],
        "AGENT state MiB": states["agent"], "state ratio": states["agent"] / states["base"]}])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))  # noqa: T201


if __name__ == "__main__":
    main()
