"""Sparse kernels inside training: the masked Conv2d and Linear layers of a model run on the CSR kernels.

:class:`SparseKernels` takes the layers whose weights the mask owner (:class:`~robust_sparse.sparse.SparseMasker`)
keeps sparse and, where it is exact and pays, computes them from the non-zeros only:

* **the attack** (:meth:`SparseKernels.inputs_only`): every PGD step's forward and input gradient, with the
  weights as constants (attacks differentiate with respect to the input only);
* **the training pass** (:meth:`SparseKernels.training_pass`): the forward, the input gradient and the weight
  gradient at the non-zero positions only, on every step on which the engine does not need the dense
  gradient. RigL's growth steps, SNFS's momentum and AST's regrowth ask for it (``Engine.wants_dense_grad``):
  those training passes take the dense kernels, the attack of the same step still runs sparse;
* every other forward without weight gradients (validation, ``torch.no_grad``).

In the attack the model is in eval mode, so a BatchNorm that only a switched conv feeds is an affine map: it is
folded into the conv's values and bias, and the ReLU module that only it feeds into the kernel's output
(:meth:`SparseKernels.folded`), which saves two passes over the activations per layer and attack step.

A forward that needs weight gradients outside :meth:`training_pass` (AGENT's snapshot and full-gradient
passes, GSE's scoring, a user's own loop) takes the dense kernels: a sparse weight gradient is exact only where
the caller wants the masked gradient, and only the training loop knows that. A copy of the model (AGENT's
snapshot, ``copy.deepcopy``) always runs dense.

The structure (which positions are non-zero) follows the mask owner: it is rebuilt when a mask tensor is replaced
(``set_mask``, loading a checkpoint, AST switching sub-nets) or changed in place. Values are read from the dense
parameter on every call, so the optimizer, its state, the checkpoints and resume are untouched: a run with the
kernels on and one with them off differ by float rounding only.

The layers are switched by changing their class to a subclass with the same parameters and buffers (as
``torch.nn.utils.parametrize`` does), so ``state_dict`` keys, DDP and the optimizer see the same module.

``auto`` (the default, ``train.sparse_kernels``) runs a layer sparse where the kernels' cost model says it
pays: ``density * grid / outputs < AUTO_BUDGET``, the non-zeros' share of the dense work times the padded grid's
waste (the kernel computes every pixel of the padded, phased grid; a 2x2 map padded to 4x4 wastes 4x), against
the sparse kernel's measured efficiency relative to dense (``benchmarks/sparse_kernels.py`` measures it per layer,
``benchmarks/sparse_training.py`` end to end). A rule, not a stopwatch: a measured choice would flip with the
machine's load, and a run would then not repeat itself bit for bit, nor resume exactly. ``on`` runs every layer
sparse.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from robust_sparse.kernels.chains import chains
from robust_sparse.kernels.csr_conv import SparsePattern, sparse_conv

__all__ = ["AUTO_BUDGET", "KernelBatchNorm2d", "KernelConv2d", "KernelLinear", "KernelReLU", "SparseKernels",
           "worth_it"]

log = logging.getLogger(__name__)

# density x grid waste below which ``auto`` runs a layer sparse. The CSR kernels reach about a fifth of the dense
# kernels' multiply-add rate (benchmarks/sparse_kernels.py), and the rows' copies, the fresh buffers and the
# gradient's scatter are paid per call whatever the density. End to end (BENCHMARKS.md, "Sparse kernels"), 0.2
# gave a PGD-AT step of VGG-16 ERK 1.0x at 90%, 1.27x at 95% and 2.2x at 99%; 0.08 gave 1.0x, 1.04x and 2.3x
# (the 95% gain lost); the quickstart's small BSR-Net CNN at 90% ran 0.94x under 0.2, so it keeps the dense kernels
AUTO_BUDGET = 0.2


@dataclass
class _Layer:
    name: str  # the parameter's name in the mask owner
    pattern: SparsePattern | None = None
    mask: torch.Tensor | None = None  # the mask the pattern was built from, and its version counter then
    version: int = -1
    worth_it: dict[tuple, bool] = field(default_factory=dict)  # auto: input shape -> the cost model's choice
    norm: nn.BatchNorm2d | None = None  # the BatchNorm only this conv feeds, and the ReLU only it feeds
    relu: nn.ReLU | None = None


class _Shared:
    """A reference every copy of a module shares (``deepcopy`` returns it as is): copies are unknown to the owner."""

    def __init__(self, owner: "SparseKernels") -> None:
        self.owner = owner

    def __deepcopy__(self, memo: dict) -> "_Shared":
        return self


class _KernelLayer:
    _sparse_kernels: _Shared

    def _sparse_pattern(self, x: torch.Tensor) -> tuple[SparsePattern | None, bool]:
        return self._sparse_kernels.owner.pattern_for(self, x)


class KernelConv2d(_KernelLayer, nn.Conv2d):
    """An ``nn.Conv2d`` whose forward goes through the CSR kernels when its owner says so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pattern, weight_grads = self._sparse_pattern(x)
        if pattern is None:
            return nn.Conv2d.forward(self, x)
        if not weight_grads:
            folded = self._sparse_kernels.owner.folded(self, pattern)
            if folded is not None:
                return folded(x)
        return sparse_conv(x, self.weight if weight_grads else self.weight.detach(), self.bias, pattern)


class KernelBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that passes on an input its conv has already normalised (:meth:`SparseKernels.folded`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if getattr(x, "_normalised_by", None) is self else nn.BatchNorm2d.forward(self, x)


class KernelReLU(nn.ReLU):
    """A ReLU that passes on an input its conv has already rectified (:meth:`SparseKernels.folded`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if getattr(x, "_rectified_by", None) is self else nn.ReLU.forward(self, x)


class KernelLinear(_KernelLayer, nn.Linear):
    """An ``nn.Linear`` whose forward goes through the CSR kernels when its owner says so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pattern, weight_grads = self._sparse_pattern(x) if x.dim() == 2 else (None, False)
        if pattern is None:
            return nn.Linear.forward(self, x)
        return sparse_conv(x, self.weight if weight_grads else self.weight.detach(), self.bias, pattern)


_SWAPS = {nn.Conv2d: KernelConv2d, nn.Linear: KernelLinear, nn.BatchNorm2d: KernelBatchNorm2d, nn.ReLU: KernelReLU}
_ORIGINAL = {swapped: original for original, swapped in _SWAPS.items()}


class SparseKernels:
    """Runs ``model``'s masked layers on the CSR kernels (see the module docstring); :meth:`remove` undoes it.

    Args:
        model: the module whose layers are switched (the plain module, not a DDP wrapper).
        masker: the mask owner: its ``params`` name the layers, its ``masks`` give the structure.
        auto: run a layer sparse only where :func:`worth_it` says so (``auto``); False: always (``on``).
    """

    def __init__(self, model: nn.Module, masker: Any, *, auto: bool = True) -> None:
        self.masker = masker
        self.auto = auto
        self._layers: dict[int, _Layer] = {}
        self._modules: list[nn.Module] = []
        self._state = threading.local()
        by_param = {id(param): name for name, param in masker.params.items()}
        for module in model.modules():
            swap = _SWAPS.get(type(module))
            weight = getattr(module, "weight", None)
            if swap is None or weight is None or id(weight) not in by_param:
                continue
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                                  or isinstance(module.padding, str)):
                continue
            module.__class__ = swap
            module._sparse_kernels = _Shared(self)
            self._layers[id(module)] = _Layer(by_param[id(weight)])
            self._modules.append(module)
        self._chain(model)
        log.info("sparse kernels: %d of %d sparse layers on the CSR kernels (%s)", len(self._layers),
                 len(masker.params), "where the cost model says it pays" if auto else "all")

    def _chain(self, model: nn.Module) -> None:
        """Pair each switched conv with the BatchNorm (and ReLU) only it feeds: the attack folds them in."""
        for conv_name, norm_name, relu_name in chains(
                model, lambda module: id(module) in self._layers and isinstance(module, KernelConv2d),
                leaf=lambda module: isinstance(module, _KernelLayer)):
            layer = self._layers[id(model.get_submodule(conv_name))]
            for name in (norm_name, relu_name):
                if name is not None:
                    module = model.get_submodule(name)
                    module.__class__ = _SWAPS[type(module)]
                    self._modules.append(module)
            layer.norm = model.get_submodule(norm_name)
            layer.relu = None if relu_name is None else model.get_submodule(relu_name)

    def remove(self) -> None:
        """Give every layer its own class back."""
        for module in self._modules:
            module.__class__ = _ORIGINAL[type(module)]
            if hasattr(module, "_sparse_kernels"):
                del module._sparse_kernels
        self._modules, self._layers = [], {}

    def folded(self, module: nn.Module, pattern: SparsePattern) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """In the attack, a conv, its eval-mode BatchNorm and its ReLU as one sparse call (None: not here).

        The BatchNorm's scale goes into the values and its shift into the bias, and the ReLU into the kernel's
        output (its gradient mask into the backward): two passes over the activations fewer, forward and
        backward, on every attack step. The output carries marks that make that BatchNorm and ReLU pass it on.
        """
        layer = self._layers.get(id(module))
        norm = None if layer is None else layer.norm
        if getattr(self._state, "mode", None) != "inputs" or norm is None or norm.training \
                or not norm.track_running_stats:
            return None
        with torch.no_grad():
            scale = norm.running_var.add(norm.eps).rsqrt()
            if norm.affine:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.affine:
                shift = shift + norm.bias
            bias = shift if module.bias is None else module.bias.detach() * scale + shift
            values = pattern.values(module.weight) * scale[pattern.rows_of]
        relu = layer.relu

        def call(x: torch.Tensor) -> torch.Tensor:
            out = sparse_conv(x, module.weight.detach(), bias, pattern, relu=relu is not None, values=values)
            out._normalised_by = norm
            if relu is not None:
                out._rectified_by = relu
            return out
        return call

    @property
    def layers(self) -> int:
        return len(self._layers)

    # ---- where sparse weight gradients are wanted --------------------------------------------------------

    @contextmanager
    def inputs_only(self) -> Iterator[None]:
        """Inside, the switched layers treat their weights as constants (an attack: gradients w.r.t. inputs)."""
        previous = getattr(self._state, "mode", None)
        self._state.mode = "inputs"
        try:
            yield
        finally:
            self._state.mode = previous

    @contextmanager
    def training_pass(self) -> Iterator[None]:
        """Inside, weight gradients come from the sparse kernels (the masked gradient), unless the engine wants
        the dense gradient of the coming optimizer step."""
        dense = self.masker.engine.wants_dense_grad(self.masker.step + 1)
        previous = getattr(self._state, "mode", None)
        self._state.mode = "dense" if dense else "train"
        try:
            yield
        finally:
            self._state.mode = previous

    # ---- the per-call decision ----------------------------------------------------------------------------

    def pattern_for(self, module: nn.Module, x: torch.Tensor) -> tuple[SparsePattern | None, bool]:
        """The pattern to run ``module`` on ``x`` with (None: dense), and whether weight gradients flow."""
        layer = self._layers.get(id(module))
        if layer is None or x.device.type != "cpu" or x.dtype != torch.float32 or module.weight.dtype != torch.float32:
            return None, False
        mode = getattr(self._state, "mode", None)
        weight_grads = torch.is_grad_enabled() and module.weight.requires_grad and mode != "inputs"
        if mode == "dense" or (weight_grads and mode != "train"):
            return None, False
        pattern = self._pattern(module, layer)
        if self.auto:
            key = (tuple(x.shape), pattern.nnz)
            if key not in layer.worth_it:
                layer.worth_it[key] = worth_it(pattern, x)
            if not layer.worth_it[key]:
                return None, False
        return pattern, weight_grads

    def _pattern(self, module: nn.Module, layer: _Layer) -> SparsePattern:
        mask = self.masker.masks[layer.name]
        if layer.pattern is None or layer.mask is not mask or layer.version != mask._version:
            if isinstance(module, nn.Conv2d):
                layer.pattern = SparsePattern(mask, module.stride, module.padding, module.dilation)
            else:
                layer.pattern = SparsePattern(mask)
            layer.mask, layer.version = mask, mask._version
        return layer.pattern


def worth_it(pattern: SparsePattern, x: torch.Tensor) -> bool:
    """The cost model of ``auto``: ``density * grid pixels / output pixels < AUTO_BUDGET``."""
    if x.dim() == 2:  # a Linear layer: no grid
        return pattern.density < AUTO_BUDGET
    geometry = pattern.geometry(x)
    (gh, gw), (out_h, out_w) = geometry.grid, geometry.out
    waste = gh * gw / max(1, out_h * out_w)  # the kernel computes every pixel of the (phase) grid
    return pattern.density * waste < AUTO_BUDGET
