"""Sparse inference on the CPU: a pruned model whose Linear and Conv2d layers run as sparse matrix products.

A masked model trained by this toolkit still multiplies by dense tensors full of zeros, so a 99%-sparse network
runs at dense speed. :func:`sparse_inference` copies an eval-mode model and gives every Linear and (ungrouped)
Conv2d layer a CSR-sparse twin:

* Linear: ``y = W_csr @ x^T`` (one sparse-dense product);
* Conv2d with stride 1: the "shifted rows" im2col. The zero-padded input is laid out as one row per channel
  over the whole batch, ``(C, N * Hp * Wp)``; the column matrix is the ``kh * kw`` contiguous slices of it at
  offsets ``a * Wp + b``, so it is built by plain copies, about 3x faster than ``F.unfold`` at batch 1 on
  CIFAR shapes, and the output is read off the padded grid. Any other convolution (stride, dilation) uses
  ``F.unfold``. A large batch goes through in chunks of images whose column matrix is cache-sized (4 MiB):
  one matrix for 128 CIFAR images is hundreds of MiB per layer, and chunking made such layers 2-3x faster.

Which twin a layer keeps is measured, not guessed: when the module is built each layer is timed dense and
sparse on the input it sees for ``example_input`` (alternating the two, fastest of a few runs), and keeps the
sparse kernel only where it was faster; then the whole model is timed both ways and, should the sparse one lose (layers
interact through memory layout and caches), every layer goes back to dense. The choice holds for the batch
size of ``example_input`` and the thread count at build time; build again for another setting.

The result is for inference only: it refuses train mode and inputs that require a gradient (attacks need the
dense model). Batch-norm is left as it is: at 99% sparsity the convolutions dominate, and folding it into the
weights would change the logits by float rounding for no measured gain on these models.

Saved form (:func:`save_sparse_inference`, :func:`load_sparse_inference`): a ``state_dict`` plus the names that
rebuild it, not TorchScript. The file is plain tensors, strings and numbers, so ``torch.load(...,
weights_only=True)`` reads it (a TorchScript archive is code, loaded by ``torch.jit.load`` and outside that
guarantee, and scripting CSR tensors is not supported on every torch); the builder is the registered
architecture plus the per-layer choice, so the file is as portable as the dense export.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SPARSE_INFERENCE_FORMAT", "LayerChoice", "SparseConv2d", "SparseInferenceModel", "SparseLinear",
    "load_sparse_inference", "save_sparse_inference", "sparse_inference", "time_alternating",
]

SPARSE_INFERENCE_FORMAT = "robust-sparse-sparse-inference/1"

# measure(name, dense, sparse) -> (dense seconds, sparse seconds); injectable so tests need no wall clock.
Measure = Callable[[str, Callable[[], Any], Callable[[], Any]], "tuple[float, float]"]


def time_alternating(dense: Callable[[], Any], sparse: Callable[[], Any], repeats: int = 7) -> tuple[float, float]:
    """Fastest seconds of ``dense()`` and ``sparse()`` over ``repeats`` calls in turn (drift hits both sides).

    The minimum, not the median: on a shared CPU other processes only ever add time, and a median of a few
    runs that straddle a scheduler slice picks the wrong kernel (we saw 10 ms spikes on 1 ms layers).
    """
    dense(), sparse()  # warm-up: allocator, MKL handles, caches
    dense_times, sparse_times = [], []
    for _ in range(repeats):
        for call, times in ((dense, dense_times), (sparse, sparse_times)):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return min(dense_times), min(sparse_times)


def _csr(matrix: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we test what we use
        warnings.simplefilter("ignore", UserWarning)
        return matrix.to_sparse_csr()


class _SparseLayer(nn.Module):
    """The CSR parts of a 2-D weight as buffers (plain tensors, so a state_dict loads with weights_only)."""

    def __init__(self, matrix: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        csr = _csr(matrix.detach().float())
        self.rows, self.columns = matrix.shape
        self.register_buffer("crow_indices", csr.crow_indices().clone())
        self.register_buffer("col_indices", csr.col_indices().clone())
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.eval()  # born for inference: train mode is refused in forward

    def matrix(self) -> torch.Tensor:
        # Rebuilt per call (microseconds, no copy): it then follows load_state_dict and .to() without hooks.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                           (self.rows, self.columns), check_invariants=False)

    @property
    def density(self) -> float:
        return self.values.numel() / (self.rows * self.columns)

    def _check_mode(self) -> None:
        if self.training:
            raise RuntimeError(f"{type(self).__name__} is for inference only: call .eval()")


class SparseLinear(_SparseLayer):
    """``nn.Linear`` as a CSR product; built from a Linear with :meth:`from_dense`."""

    @classmethod
    def from_dense(cls, layer: nn.Linear) -> "SparseLinear":
        return cls(layer.weight, layer.bias)

    @classmethod
    def from_state(cls, layer: nn.Linear, state: Mapping[str, torch.Tensor], prefix: str) -> "SparseLinear":
        sparse = cls(torch.zeros(layer.out_features, layer.in_features), layer.bias)
        _adopt(sparse, state, prefix)
        return sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_mode()
        flat = x.reshape(-1, self.columns)
        out = (self.matrix() @ flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.rows)


class SparseConv2d(_SparseLayer):
    """``nn.Conv2d`` (groups 1, zero padding) as one CSR product over an im2col matrix.

    Stride-1 layers use the shifted-rows layout (module docstring) and store the weight with columns in
    (kernel row, kernel column, channel) order; others use ``F.unfold`` and the (channel, kernel) order.
    """

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        self.shifted = conv.stride == (1, 1) and conv.dilation == (1, 1)
        order = weight.permute(0, 2, 3, 1) if self.shifted else weight
        super().__init__(order.reshape(weight.shape[0], -1), bias)
        self.out_channels, self.in_channels = conv.out_channels, conv.in_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)

    @staticmethod
    def supports(conv: nn.Conv2d) -> bool:
        return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> "SparseConv2d":
        return cls(conv, conv.weight, conv.bias)

    @classmethod
    def from_state(cls, conv: nn.Conv2d, state: Mapping[str, torch.Tensor], prefix: str) -> "SparseConv2d":
        sparse = cls(conv, torch.zeros_like(conv.weight), conv.bias)
        _adopt(sparse, state, prefix)
        return sparse

    # The column matrix of one chunk of the batch stays about this many floats (4 MiB): cache-sized, where one
    # matrix for a batch of 128 would be hundreds of MiB of memory traffic per layer.
    column_budget = 1 << 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_mode()
        kernel = self._shifted if self.shifted else self._unfolded
        per_image = self.columns * (x.shape[2] + 2 * self.padding[0]) * (x.shape[3] + 2 * self.padding[1])
        chunk = max(1, self.column_budget // per_image)
        out = kernel(x) if chunk >= x.shape[0] else torch.cat([kernel(part) for part in x.split(chunk)])
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def _shifted(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        hp, wp = height + 2 * ph, width + 2 * pw
        grid = batch * hp * wp
        offsets = [a * wp + b for a in range(kh) for b in range(kw)]
        # One zeroed buffer: the padded input as (C, N, Hp, Wp) rows, plus a tail the last offset reads into.
        rows = x.new_zeros(channels, grid + offsets[-1])
        rows[:, :grid].view(channels, batch, hp, wp)[:, :, ph:ph + height, pw:pw + width] = x.transpose(0, 1)
        columns = torch.cat([rows[:, offset:offset + grid] for offset in offsets])
        out = (self.matrix() @ columns).view(self.out_channels, batch, hp, wp)
        return out[:, :, :hp - kh + 1, :wp - kw + 1].transpose(0, 1).contiguous()

    def _unfolded(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        columns = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        columns = columns.transpose(0, 1).reshape(self.columns, -1)  # (C kh kw, N L)
        out = (self.matrix() @ columns).view(self.out_channels, batch, out_h, out_w)
        return out.transpose(0, 1).contiguous()


def _adopt(sparse: _SparseLayer, state: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Replace a freshly built sparse layer's CSR buffers by the stored ones (their lengths differ)."""
    for name in ("crow_indices", "col_indices", "values"):
        setattr(sparse, name, state[prefix + name].clone())


@dataclass(frozen=True)
class LayerChoice:
    """One layer's measurement at build time; ``sparse`` says which kernel it kept."""

    name: str
    kind: str  # "linear" | "conv2d"
    density: float
    dense_s: float
    sparse_s: float
    sparse: bool


class SparseInferenceModel(nn.Module):
    """An eval-only copy of a model with CSR layers where they measured faster (see :func:`sparse_inference`)."""

    def __init__(self, model: nn.Module, choices: Sequence[LayerChoice] = (),
                 dense_latency_s: float = math.nan, sparse_latency_s: float = math.nan) -> None:
        super().__init__()
        self.model = model
        self.choices = list(choices)
        self.dense_latency_s, self.sparse_latency_s = dense_latency_s, sparse_latency_s
        self.eval()

    @property
    def sparse_layers(self) -> list[str]:
        return [name for name, module in self.model.named_modules() if isinstance(module, _SparseLayer)]

    def report(self) -> pd.DataFrame:
        """One row per candidate layer: density, dense and sparse seconds, the kernel kept."""
        return pd.DataFrame([vars(choice) for choice in self.choices],
                            columns=["name", "kind", "density", "dense_s", "sparse_s", "sparse"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("a sparse-inference model runs in eval mode only: call .eval() "
                               "(train the dense model instead)")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("a sparse-inference model computes no gradients: attack or train the dense model")
        with torch.no_grad():
            return self.model(x)


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and SparseConv2d.supports(module))}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _sparse_twin(module: nn.Module) -> _SparseLayer:
    return SparseLinear.from_dense(module) if isinstance(module, nn.Linear) else SparseConv2d.from_dense(module)


def sparse_inference(model: nn.Module, example_input: torch.Tensor, *, measure: Optional[Measure] = None,
                     repeats: int = 7) -> SparseInferenceModel:
    """An eval-only copy of ``model`` (left untouched) whose Linear/Conv2d layers run sparse where measured faster.

    ``example_input``: a CPU batch of the size the model will serve (it fixes the shapes timed per layer).
    ``measure(name, dense, sparse) -> (dense_s, sparse_s)`` times the two zero-argument calls; the default
    alternates them ``repeats`` times and takes the fastest of each. A layer keeps its sparse kernel only when
    ``sparse_s < dense_s``; the whole model is then timed under the name ``""`` and falls back to all-dense
    when the sparse one is not faster.
    """
    if model.training:
        raise ValueError("sparse_inference needs a model in eval mode: call model.eval() first "
                         "(batch-norm statistics are frozen into the sparse model)")
    if example_input.device.type != "cpu":
        raise ValueError(f"sparse_inference runs on the CPU; example_input is on {example_input.device}")
    measure = measure or (lambda _name, dense, sparse: time_alternating(dense, sparse, repeats))
    candidates = _candidates(model)  # timed in place (hooks removed after): one copy, not two, of a big model
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            inputs.setdefault(name, args[0])  # the first call: a layer applied twice is timed on its first input
        return hook

    hooks = [module.register_forward_hook(keep_input(name)) for name, module in candidates.items()]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()

    sparse_model = copy.deepcopy(model)
    choices = []
    with torch.no_grad():
        for name, module in candidates.items():
            if name not in inputs:  # never called on this input: nothing to measure, nothing to gain
                continue
            twin = _sparse_twin(module)
            layer_input = inputs[name]
            dense_s, sparse_s = measure(name, lambda: module(layer_input), lambda: twin(layer_input))
            kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
            choices.append(LayerChoice(name, kind, twin.density, dense_s, sparse_s, sparse_s < dense_s))
            if sparse_s < dense_s:
                _replace(sparse_model, name, twin)
        sparse_model.eval()
        dense_total, sparse_total = measure("", lambda: model(example_input), lambda: sparse_model(example_input))
    if not sparse_total < dense_total:
        choices = [LayerChoice(c.name, c.kind, c.density, c.dense_s, c.sparse_s, False) for c in choices]
        sparse_model, sparse_total = copy.deepcopy(model), dense_total
    return SparseInferenceModel(sparse_model, choices, dense_total, sparse_total)


def save_sparse_inference(module: SparseInferenceModel, path: str | Path, architecture: str,
                          num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
    """Write ``module`` as a state_dict plus what rebuilds it; atomic, loadable with ``weights_only=True``."""
    from robust_sparse.checkpoint import atomic_open

    payload = {
        "kind": SPARSE_INFERENCE_FORMAT,
        "architecture": architecture, "num_classes": num_classes, "in_channels": in_channels,
        "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        "sparse_layers": module.sparse_layers,
        "dense_latency_s": module.dense_latency_s, "sparse_latency_s": module.sparse_latency_s,
        "state": {name: tensor.detach().cpu() for name, tensor in module.model.state_dict().items()},
    }
    with atomic_open(Path(path), "wb") as stream:
        torch.save(payload, stream)


def load_sparse_inference(path: str | Path) -> SparseInferenceModel:
    """Rebuild a model written by :func:`save_sparse_inference` (no re-measurement: the saved choice holds)."""
    from robust_sparse.errors import CheckpointError
    from robust_sparse.models import build_model

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"sparse-inference file not found: {path}") from None
    if not isinstance(payload, dict) or payload.get("kind") != SPARSE_INFERENCE_FORMAT:
        raise CheckpointError(f"{path} is not a sparse-inference export ({SPARSE_INFERENCE_FORMAT})")
    model = build_model(payload["architecture"], payload["num_classes"], payload["in_channels"],
                        payload["mean"], payload["std"]).eval()
    state = payload["state"]
    for name in payload["sparse_layers"]:
        dense = model.get_submodule(name)
        build = SparseLinear.from_state if isinstance(dense, nn.Linear) else SparseConv2d.from_state
        _replace(model, name, build(dense, state, name + "."))
    model.load_state_dict(state)
    return SparseInferenceModel(model, (), payload["dense_latency_s"], payload["sparse_latency_s"])
