"""Run by tests/test_distributed.py under torchrun: train, then dump this rank's state for comparison."""

import sys

import torch

import robust_sparse.train as train_module
from robust_sparse.config import load_config
from robust_sparse.train import fit

pass_batches = []  # batches of AGENT's g_tilde pass this rank ran, per refresh
original_agent_batches = train_module._agent_batches


def counted_agent_batches(*args, **kwargs):
    pass_batches.append(0)  # at every refresh; its pass (a generator) may never run

    def counted(batches):
        for batch in batches:
            pass_batches[-1] += 1
            yield batch

    return counted(original_agent_batches(*args, **kwargs))


train_module._agent_batches = counted_agent_batches
out, *overrides = sys.argv[1:]
result = fit(load_config(None, overrides))
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
state = {"model": result.model.state_dict(), "masks": result.masker.masks if result.masker else {},
         "ever_active": result.masker.ever_active if result.masker else {}}
if result.masker is not None and len(result.masker.views()) > 1:  # AST: every sub-net's topology, running gradients
    state.update(subnet_masks=result.masker.engine.subnet_masks, running=result.masker.engine._running)
if result.agent is not None:
    state.update(c=torch.tensor(result.agent.c), c_hat=torch.tensor(result.agent.c_hat),
                 full_grads=result.agent.full_grads, subnet_full_grads=result.agent.subnet_full_grads,
                 pass_batches=pass_batches,
                 # parameters only: the snapshot runs in train mode, so its running statistics are never read
                 snapshot={name: p.detach() for name, p in result.agent.snapshot.named_parameters()})
torch.save(state, f"{out}/rank{rank}.pt")
