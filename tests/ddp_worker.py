"""Run by tests/test_distributed.py under torchrun: train, then dump this rank's state for comparison."""

import sys

import torch
from torch.nn.parallel import DistributedDataParallel

import robust_sparse.run_setup as run_setup
import robust_sparse.train as train_module
from robust_sparse.config import load_config
from robust_sparse.train import fit

pass_batches = []  # batches of AGENT's g_tilde pass this rank ran, per refresh
original_full_grad_pass = train_module.full_grad_pass


def counted_full_grad_pass(*args, **kwargs):
    pass_batches.append(0)  # at every refresh; its pass (a generator) may never run

    def counted(batches):
        for batch in batches:
            pass_batches[-1] += 1
            yield batch

    return counted(original_full_grad_pass(*args, **kwargs))


epoch_batches = []  # per epoch, per training batch of this rank: (loss * batch size, correct, batch size)
original_build_objective = run_setup.build_objective
original_train_one_epoch = train_module.train_one_epoch


def recording_build_objective(*args, **kwargs):
    objective = original_build_objective(*args, **kwargs)
    loss = objective.loss

    def recorded(model, images, labels, *rest):
        value, logits = loss(model, images, labels, *rest)
        if isinstance(model, DistributedDataParallel):  # the training forward (not AGENT's snapshot)
            epoch_batches[-1].append([float(value.detach()) * len(labels), int((logits.argmax(1) == labels).sum()),
                                      len(labels)])
        return value, logits

    objective.loss = recorded
    return objective


def recording_train_one_epoch(*args, **kwargs):
    epoch_batches.append([])
    return original_train_one_epoch(*args, **kwargs)


train_module.full_grad_pass = counted_full_grad_pass
run_setup.build_objective = recording_build_objective
train_module.train_one_epoch = recording_train_one_epoch
out, *overrides = sys.argv[1:]
if out == "--cli":  # `robust-sparse train` itself: what each rank prints, and this rank's training batches
    from robust_sparse.cli import main

    out, *arguments = overrides
    code = main(["train", "--no-progress", *arguments])
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({"batches": torch.tensor(epoch_batches, dtype=torch.float64)}, f"{out}/rank{rank}.pt")
    sys.exit(code)
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
