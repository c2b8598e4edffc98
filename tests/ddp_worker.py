"""Run by tests/test_distributed.py under torchrun: train, then dump this rank's state for comparison."""

import sys

import torch

from robust_sparse.config import load_config
from robust_sparse.train import fit

out, *overrides = sys.argv[1:]
result = fit(load_config(None, overrides))
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
state = {"model": result.model.state_dict(), "masks": result.masker.masks if result.masker else {},
         "ever_active": result.masker.ever_active if result.masker else {}}
if hasattr(result.masker, "subnet_masks"):  # AST: every sub-net's topology and its running gradients
    state.update(subnet_masks=result.masker.subnet_masks, running=result.masker._running)
if result.agent is not None:
    state.update(c=torch.tensor(result.agent.c), c_hat=torch.tensor(result.agent.c_hat),
                 full_grads=result.agent.full_grads,
                 # parameters only: the snapshot runs in train mode, so its running statistics are never read
                 snapshot={name: p.detach() for name, p in result.agent.snapshot.named_parameters()})
torch.save(state, f"{out}/rank{rank}.pt")
