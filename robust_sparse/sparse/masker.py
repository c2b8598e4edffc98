"""The mask owner: one boolean mask per sparse parameter, keyed by parameter name.

Mechanics (no monkey-patching):

* a tensor hook on every sparse parameter multiplies its gradient by the mask, after showing the dense
  gradient to the engine when it asks for it (RigL's growth criterion, SNFS's momentum);
* an optimizer step-post-hook counts steps, lets the engine change the topology, and re-masks the weights
  and every per-parameter optimizer buffer of the same shape (momentum, Adam moments, ...).

So between topology updates pruned weights, their gradients and their momentum are exactly zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from robust_sparse.sparse.engines import Engine


def sparsifiable(model: nn.Module, include_first: bool = True, include_last: bool = True) -> dict[str, nn.Parameter]:
    """Weights of every Conv and Linear layer, in registration order; biases and BatchNorm stay dense."""
    found = {f"{module_name}.weight" if module_name else "weight": module.weight
             for module_name, module in model.named_modules()
             if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))}
    names = list(found)
    if names and not include_first:
        found.pop(names[0])
    if len(names) > 1 and not include_last:
        found.pop(names[-1])
    return found


class SparseMasker:
    """Owns the masks of ``params`` and keeps ``optimizer``'s view of them sparse.

    Args:
        params: name -> parameter, the sparse tensors.
        optimizer: the optimizer that updates them (its step-post-hook drives topology updates).
        masks: name -> bool tensor of the parameter's shape, the initial topology.
        engine: decides topology changes (static, SET/RigL/ITOP, BSR-Net, ...).
    """

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        optimizer: torch.optim.Optimizer,
        masks: dict[str, torch.Tensor],
        engine: "Engine",
    ) -> None:
        if not params:
            raise ValueError("SparseMasker needs at least one sparse parameter")
        self.params = params
        self.optimizer = optimizer
        self.masks = {name: masks[name].to(device=p.device, dtype=torch.bool) for name, p in params.items()}
        self.ever_active = {name: mask.clone() for name, mask in self.masks.items()}
        self.engine = engine
        self.step = 0  # optimizer steps taken
        # fp16 training: the GradScaler's current scale (a tensor), which the gradients the hooks see carry;
        # the engine is shown them unscaled
        self.grad_scale: Callable[[], torch.Tensor | None] | None = None
        self._handles = [p.register_hook(self._gradient_hook(name)) for name, p in params.items()]
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        self.apply()

    # ---- hooks ------------------------------------------------------------------------------------------

    def _gradient_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self.engine.wants_dense_grad(self.step + 1):
                scale = self.grad_scale() if self.grad_scale is not None else None
                self.engine.observe_dense_grad(name, grad if scale is None else grad / scale)
            return grad * self.masks[name]

        return hook

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self.engine.after_step(self, self.step):
            for name, mask in self.masks.items():
                self.ever_active[name] |= mask
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero pruned weights and the matching entries of every optimizer buffer shaped like them."""
        for name, param in self.params.items():
            mask = self.masks[name]
            param.mul_(mask)
            for value in self.optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.mul_(mask)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- reporting --------------------------------------------------------------------------------------

    def active_counts(self) -> dict[str, int]:
        return {name: int(mask.sum()) for name, mask in self.masks.items()}

    def layer_densities(self) -> dict[str, float]:
        return {name: count / self.masks[name].numel() for name, count in self.active_counts().items()}

    def global_density(self) -> float:
        return sum(self.active_counts().values()) / sum(m.numel() for m in self.masks.values())

    def exploration_rate(self) -> float:
        """ITOP's in-time over-parameterisation rate: the fraction of sparse positions ever active."""
        return sum(int(m.sum()) for m in self.ever_active.values()) / sum(m.numel() for m in self.masks.values())

    # ---- persistence ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "masks": {name: mask.clone() for name, mask in self.masks.items()},
            "ever_active": {name: mask.clone() for name, mask in self.ever_active.items()},
            "engine": self.engine.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["masks"]) != set(self.masks):
            raise ValueError("the saved masks are for other parameters: "
                             f"{sorted(set(state['masks']) ^ set(self.masks))[:3]}")
        for name in self.masks:
            self.masks[name] = state["masks"][name].to(self.masks[name].device, torch.bool)
            self.ever_active[name] = state["ever_active"][name].to(self.masks[name].device, torch.bool)
        self.step = int(state["step"])
        self.engine.load_state_dict(state["engine"])
        self.apply()
