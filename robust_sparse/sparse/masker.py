"""The mask owner and the engine protocol: one boolean mask per sparse parameter, keyed by parameter name.

Mechanics (no monkey-patching):

* a tensor hook on every sparse parameter multiplies its gradient by the mask, after showing the dense
  gradient to the engine when it asks for it (RigL's growth criterion, SNFS's momentum, AST's regrowth);
* an optimizer step-pre-hook lets the engine adjust the gradients the step will use (AST's correction);
* an optimizer step-post-hook counts steps, lets the engine change the topology, and re-masks the weights
  and every per-parameter optimizer buffer of the same shape (momentum, Adam moments, ...).

So between topology updates pruned weights, their gradients and their momentum are exactly zero.

Engines change the topology through the masker's API (:meth:`SparseMasker.set_mask`, :meth:`SparseMasker.reset`,
:meth:`SparseMasker.optimizer_buffers`), never through its dicts or the optimizer's state. A masker offers
:meth:`~SparseMasker.views`: the networks it trains. Every engine but AST trains one, the model itself; AST
trains several sub-nets over one weight tensor, and training, AGENT, export and evaluation iterate the views.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


def has_attention(model: nn.Module) -> bool:
    """Is ``model`` a transformer: does it hold an attention layer? torch's ``nn.MultiheadAttention`` (torchvision's
    ViT) or a module whose class is named ``...Attention`` (timm's ViT, DeiT, BEiT, EVA, Swin, ..., Hugging Face's
    ``ViTSelfAttention``). timm names the attention of its CNNs ``...Attn`` (squeeze-excite, CBAM, selective
    kernels, ResNeSt's split attention), so a CNN stays a CNN here."""
    return any(isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")
               for module in model.modules())


def sparsifiable(model: nn.Module, include_first: bool | None = True,
                 include_last: bool | None = True) -> dict[str, nn.Parameter]:
    """Weights of every Conv and Linear layer, in registration order; biases and BatchNorm stay dense.

    ``include_first``/``include_last`` None (``sparsity.include_first/include_last`` left out) decides by the
    model: a CNN's first conv and classifier are sparse too, as in BSR-Net; a transformer's (:func:`has_attention`)
    patch embedding and head stay dense and the masks go on its blocks' attention and MLP layers, which hold its
    weights and its FLOPs (as SViTE, Chen et al. 2021, sparsifies them). The two ends hold 0.2% of ViT-Tiny's
    weights at 32 px, yet the one is the only layer to see pixels and the other the only one to see classes."""
    found = {f"{module_name}.weight" if module_name else "weight": module.weight
             for module_name, module in model.named_modules()
             if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))}
    if include_first is None or include_last is None:
        transformer = has_attention(model)
        include_first = not transformer if include_first is None else include_first
        include_last = not transformer if include_last is None else include_last
    names = list(found)
    if names and not include_first:
        found.pop(names[0])
    if len(names) > 1 and not include_last:
        found.pop(names[-1])
    return found


@dataclass(frozen=True)
class View:
    """One network a masker trains: the model itself (``index`` None) or sub-net ``index`` of several.

    ``activate()`` is a context inside which the model *is* this network (validation, evaluation);
    ``on(module)`` one inside which ``module``, a copy of the model holding the full weights (AGENT's
    snapshot), is this network.
    """

    index: int | None
    masks: dict[str, torch.Tensor]
    activate: Callable[[], AbstractContextManager] = nullcontext
    on: Callable[[nn.Module], AbstractContextManager] = lambda module: nullcontext()

    def counts(self) -> dict[str, int]:
        return {name: int(mask.sum()) for name, mask in self.masks.items()}

    def density(self) -> float:
        return sum(self.counts().values()) / sum(mask.numel() for mask in self.masks.values())


DENSE_VIEW = View(None, {})  # dense training: the model, no masks


class Engine(ABC):
    """The protocol every engine follows, with the defaults of a single network (every hook but ``after_step``).

    An engine sees the masker after every step and returns whether it changed any mask. Engines keep their
    own state (random generator, BSR-Net's signs, SNFS's gradient momentum) and round-trip it through
    ``state_dict`` so that a resumed run continues exactly. :class:`StaticEngine` never changes the masks.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def attach(self, masker: "SparseMasker") -> None:
        """Called once by the masker, before it first applies the masks."""

    def wants_dense_grad(self, step: int) -> bool:
        """Should the gradient hooks show the engine the dense gradient of the backward before ``step``?"""
        return False

    def observe_dense_grad(self, name: str, grad: torch.Tensor) -> None:
        pass

    def before_step(self, masker: "SparseMasker") -> None:
        """Right before the optimizer step (after DDP's averaging and AGENT's correction of ``.grad``)."""

    @abstractmethod
    def after_step(self, masker: "SparseMasker", step: int) -> bool:
        """After optimizer step ``step`` (1-based): change the topology through the masker; whether it did."""

    def apply(self, masker: "SparseMasker") -> None:
        """Make the model hold the current topology (after every step, after loading, at construction)."""
        masker.mask_weights()

    # the networks the masker trains: one, the model itself, unless an engine trains several
    def views(self, masker: "SparseMasker") -> list[View]:
        return [View(None, masker.masks)]

    @property
    def active_view(self) -> int:
        """The view the next optimizer step trains."""
        return 0

    def full_weights(self, masker: "SparseMasker") -> AbstractContextManager:
        """Inside, the model holds every view's weights (the shared tensor); one view is the model already."""
        return nullcontext()

    def at_target_density(self, masker: "SparseMasker") -> bool:
        """Have the masks reached their final densities? Model selection waits for it (AST prunes gradually)."""
        return True

    # ---- persistence -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()} if self.generator is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])

    def masker_state(self, masker: "SparseMasker") -> dict[str, Any]:
        """Entries this engine adds to the masker's own state dict (AST keeps its sub-nets there)."""
        return {}

    def load_masker_state(self, masker: "SparseMasker", state: dict[str, Any]) -> bool:
        """Restore from the masker's state dict; False: the masker restores its masks itself."""
        return False


class StaticEngine(Engine):
    """Static sparsity: the masks never change (a random ERK mask, magnitude pruning, a plugin's fixed mask)."""

    def after_step(self, masker: "SparseMasker", step: int) -> bool:
        return False


class SparseMasker:
    """Owns the masks of ``params`` and keeps ``optimizer``'s view of them sparse.

    Args:
        params: name -> parameter, the sparse tensors.
        optimizer: the optimizer that updates them (its step hooks drive topology updates).
        masks: name -> bool tensor of the parameter's shape, the initial topology.
        engine: decides topology changes (static, SET/RigL/ITOP, BSR-Net, GSE, AST, ...).
    """

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        optimizer: torch.optim.Optimizer,
        masks: dict[str, torch.Tensor],
        engine: Engine,
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
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        engine.attach(self)
        self.apply()

    # ---- hooks ------------------------------------------------------------------------------------------

    def _gradient_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self.engine.wants_dense_grad(self.step + 1):
                scale = self.grad_scale() if self.grad_scale is not None else None
                self.engine.observe_dense_grad(name, grad if scale is None else grad / scale)
            return grad * self.masks[name]

        return hook

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.engine.before_step(self)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self.engine.after_step(self, self.step):
            for name, mask in self.masks.items():
                self.ever_active[name] |= mask
        self.apply()

    def apply(self) -> None:
        """Make the model hold the topology: zero pruned weights and their optimizer state."""
        self.engine.apply(self)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- the API engines change the topology through -----------------------------------------------------

    def optimizer_buffers(self, param: nn.Parameter) -> dict[str, torch.Tensor]:
        """The optimizer's per-parameter buffers shaped like ``param`` (momentum, Adam moments, ...)."""
        return {key: value for key, value in self.optimizer.state.get(param, {}).items()
                if isinstance(value, torch.Tensor) and value.shape == param.shape}

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Layer ``name``'s new topology; the dict entry is replaced, so holders of ``masks`` see it."""
        self.masks[name] = mask

    def mark_explored(self, name: str, mask: torch.Tensor) -> None:
        """Count ``mask``'s positions of layer ``name`` as having been active (the exploration rate)."""
        self.ever_active[name] |= mask

    @torch.no_grad()
    def mask_weights(self) -> None:
        """Zero pruned weights and the matching entries of every optimizer buffer shaped like them."""
        for name, param in self.params.items():
            mask = self.masks[name]
            param.mul_(mask)
            for value in self.optimizer_buffers(param).values():
                value.mul_(mask)

    @torch.no_grad()
    def reset(self, name: str, positions: torch.Tensor, *, weight: bool = True) -> None:
        """Zero layer ``name``'s optimizer state, and its weight unless ``weight=False``, at ``positions``: a
        bool tensor of the layer's shape, or flat indices (a connection grown there starts afresh)."""
        param = self.params[name]
        tensors = ([param] if weight else []) + list(self.optimizer_buffers(param).values())
        for tensor in tensors:
            if positions.dtype == torch.bool:
                tensor.masked_fill_(positions, 0.0)
            elif tensor.is_contiguous():  # index updates: no weight-sized temporary
                tensor.view(-1)[positions] = 0
            else:  # pragma: no cover - parameters and optimizer buffers are contiguous in practice
                flat = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
                flat[positions] = True
                tensor.masked_fill_(flat.view_as(tensor), 0)

    # ---- the networks this masker trains -----------------------------------------------------------------

    def views(self) -> list[View]:
        return self.engine.views(self)

    @property
    def active_view(self) -> int:
        return self.engine.active_view

    def full_weights(self) -> AbstractContextManager:
        return self.engine.full_weights(self)

    def at_target_density(self) -> bool:
        return self.engine.at_target_density(self)

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
            **self.engine.masker_state(self),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["masks"]) != set(self.masks):
            raise ValueError("the saved masks are for other parameters: "
                             f"{sorted(set(state['masks']) ^ set(self.masks))[:3]}")
        self.step = int(state["step"])
        for name in self.masks:
            self.ever_active[name] = state["ever_active"][name].to(self.masks[name].device, torch.bool)
        if self.engine.load_masker_state(self, state):
            return
        for name in self.masks:
            self.masks[name] = state["masks"][name].to(self.masks[name].device, torch.bool)
        self.engine.load_state_dict(state["engine"])
        self.apply()


def views_of(masker: SparseMasker | None) -> list[View]:
    """The networks trained: the masker's views, or the dense model itself."""
    return masker.views() if masker is not None else [DENSE_VIEW]
