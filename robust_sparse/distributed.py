"""Data-parallel training under ``torchrun``: process-group set-up and the few collectives the engines need.

Everything that decides the topology or AGENT's correction must be identical on every rank. Weights and
gradients are kept identical by DistributedDataParallel; on top of that:

* BSR-Net's and the other engines' generators are seeded identically, so identical weights give identical
  pruning and regrowth with no communication;
* the dense gradients RigL grows by, and SNFS's gradient momentum, are computed per rank and all-reduced
  (mean) before a topology update;
* AGENT's snapshot gradient g_old and large-batch gradient g~ are all-reduced, and the per-batch losses of
  its c-hat estimate are gathered from every rank.

The epoch's reported figures (loss, accuracy, images/s) are sums over every rank's examples; only rank 0 logs.
A Slurm job of several tasks (robust_sparse.studies.slurm) sets the same variables torchrun does, so it takes this path.
Without ``torchrun`` (WORLD_SIZE unset or 1) every function here is a no-op. :func:`resolve_device` turns the
``device`` choice (auto, cpu, cuda) into the device a single process, or each rank before :func:`setup`, runs on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from robust_sparse.config import DeviceChoice
from robust_sparse.errors import UserError


def device_name(device: torch.device) -> str:
    """The device as results name it: ``cuda:0 (NVIDIA H100 ...)``, or ``cpu (N threads)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})"


def resolve_device(choice: DeviceChoice | str) -> torch.device:
    """``auto``: CUDA where there is a device, else the CPU; ``cuda`` without one is refused in one line."""
    choice = DeviceChoice(choice)
    if choice is DeviceChoice.CUDA and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA device is available (use --device cpu or auto)")
    if choice is DeviceChoice.CPU or (choice is DeviceChoice.AUTO and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> Context:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA) and pick this rank's device."""
    if world_size_from_env() <= 1:
        return Context(device=device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # torchrun (and a Slurm task that sees the node's GPUs) picks GPU LOCAL_RANK; a Slurm task bound to
        # its own GPU (--gpu-bind, gpus_per_task) sees just that one
        device = torch.device("cuda", local_rank if torch.cuda.device_count() > local_rank else 0)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() != 0:  # the ranks' logs would repeat rank 0's: only errors from the others
        logging.getLogger("robust_sparse").setLevel(logging.ERROR)
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of ranks ((0, 1) without torchrun)."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """In place, the mean over ranks of each tensor."""
    if not active():
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``values`` (a new tensor; ``values`` itself without torchrun)."""
    if not active():
        return values
    total = values.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest ``value`` of any rank (an epoch's wall time is the slowest rank's)."""
    if not active():
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-d tensor of the same length from every rank, in rank order."""
    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank: each rank updated them on its own shard."""
    if not active():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def broadcast(tensor: torch.Tensor) -> None:
    """Rank 0's value of ``tensor`` to every rank (in place)."""
    if active():
        dist.broadcast(tensor, src=0)


def barrier() -> None:
    if active():
        dist.barrier()
