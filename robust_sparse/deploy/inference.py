"""Sparse inference on the CPU: a pruned model whose Linear and Conv2d layers run as direct sparse convolutions.

A masked model trained by this toolkit still multiplies by dense tensors full of zeros, so a 99%-sparse network
runs at dense speed. :func:`sparse_inference` copies an eval-mode model and gives every Linear and (ungrouped)
Conv2d layer a sparse twin that runs the kernels of :mod:`robust_sparse.kernels`: for each non-zero weight, one
AXPY of a shifted row of the zero-padded input into the output row, over the whole batch at once, cache-blocked
and threaded over tiles of pixels (no im2col matrix; strides and dilations through the polyphase identity; a
Linear layer is a 1x1 convolution over the batch). Its work is proportional to the non-zeros.

Which twin a layer keeps is measured, not guessed: when the module is built each layer is timed dense and
sparse on the input it sees for ``example_input`` (alternating the two, fastest of a few runs), and keeps the
sparse kernel only where it was faster; then the whole model is timed both ways and, should the sparse one lose (layers
interact through memory layout and caches), every layer goes back to dense. The choice holds for the batch
size of ``example_input`` and the thread count at build time; build again for another setting. The kernels run
on as many threads as torch (``torch.set_num_threads``).

The result is for inference only: it refuses train mode and inputs that require a gradient (attacks need the
dense model; training runs its own sparse kernels, ``train.sparse_kernels``). A BatchNorm fed only by a sparse
conv is folded into its values and bias, and a ReLU module fed only by that BatchNorm into its output, so two
passes over the activations are saved per layer; the model's calls are read with ``torch.fx`` (or, for a model
that does not trace, from consecutive children of ``nn.Sequential`` containers), and a functional ``F.relu``
stays where it is.

Saved form (:func:`save_sparse_inference`, :func:`load_sparse_inference`): a ``state_dict`` (each sparse layer's
non-zero positions and values) plus the names that rebuild it, not TorchScript. The file is plain tensors,
strings and numbers, so ``torch.load(..., weights_only=True)`` reads it; the builder is the architecture
(registered, ``torchvision:`` or ``timm:``, with its keyword arguments and CIFAR-stem switch) plus the per-layer
choice, so the file is as portable as the dense export. Files of the first
format (CSR matrices of the im2col kernels) still load: their layers are converted on loading.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import pandas as pd
import torch
from torch import nn

from robust_sparse.kernels import SparsePattern
from robust_sparse.kernels.chains import chains

__all__ = [
    "SPARSE_INFERENCE_FORMAT", "LayerChoice", "SparseConv2d", "SparseInferenceModel", "SparseLinear",
    "load_sparse_inference", "save_sparse_inference", "sparse_inference", "time_alternating",
]

SPARSE_INFERENCE_FORMAT = "robust-sparse-sparse-inference/2"
_FORMAT_V1 = "robust-sparse-sparse-inference/1"  # CSR matrices of the im2col kernels; converted on loading

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


class _SparseLayer(nn.Module):
    """The non-zeros of a weight as buffers: their flat positions (``indices``, ascending) and ``values``, plain
    tensors, so a state_dict loads with ``weights_only``; the kernel's CSR structure is rebuilt from them."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1)) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.weight_shape = tuple(weight.shape)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        indices = weight.reshape(-1).nonzero().squeeze(1)
        self.register_buffer("indices", indices.to(torch.int64))
        self.register_buffer("values", weight.reshape(-1)[indices].clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._pattern: Optional[SparsePattern] = None
        self.relu = False  # a ReLU fused into the output (see _fuse)
        self.eval()  # born for inference: train mode is refused in forward

    def pattern(self) -> SparsePattern:
        if self._pattern is None or self._pattern.nnz != self.indices.numel():
            mask = torch.zeros(math.prod(self.weight_shape), dtype=torch.bool)
            mask[self.indices] = True
            self._pattern = SparsePattern(mask.view(self.weight_shape), self.stride, self.padding, self.dilation)
        return self._pattern

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._pattern = None  # new positions: rebuild the structure on the next call

    @property
    def density(self) -> float:
        return self.values.numel() / math.prod(self.weight_shape)

    def _check_mode(self) -> None:
        if self.training:
            raise RuntimeError(f"{type(self).__name__} is for inference only: call .eval()")

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        self._check_mode()
        out, _, _ = self.pattern().forward(x.detach().float(), self.values, self.bias, relu=self.relu, keep=False)
        return out

    @torch.no_grad()
    def fold(self, norm: nn.BatchNorm2d) -> None:
        """Take an eval-mode BatchNorm that follows this layer into its values and bias."""
        scale = (norm.weight if norm.affine else torch.ones_like(norm.running_var)) / torch.sqrt(
            norm.running_var + norm.eps)
        shift = (norm.bias if norm.affine else torch.zeros_like(norm.running_mean)) - norm.running_mean * scale
        rows = self.indices // math.prod(self.weight_shape[1:])
        self.values = (self.values * scale[rows]).float()
        self.bias = ((self.bias if self.bias is not None else torch.zeros_like(scale)) * scale + shift).float()


class SparseLinear(_SparseLayer):
    """``nn.Linear`` through the CSR kernel (a 1x1 convolution over the batch); built with :meth:`from_dense`."""

    @classmethod
    def from_dense(cls, layer: nn.Linear) -> "SparseLinear":
        return cls(layer.weight, layer.bias)

    @classmethod
    def from_state(cls, layer: nn.Linear, state: Mapping[str, torch.Tensor], prefix: str) -> "SparseLinear":
        sparse = cls(torch.zeros(layer.out_features, layer.in_features), layer.bias)
        _adopt(sparse, state, prefix)
        return sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.weight_shape[1])
        out = self._run(flat[:, :, None, None]).reshape(flat.shape[0], -1)
        return out.reshape(*x.shape[:-1], self.weight_shape[0])


class SparseConv2d(_SparseLayer):
    """``nn.Conv2d`` (groups 1, zero padding) as the direct sparse convolution of :mod:`robust_sparse.kernels`.

    The output has channel-first strides (an ``(N, C, H, W)`` view of a ``(C, N, H, W)`` tensor): elementwise
    layers after it keep them, and the next sparse layer then reads its input with plain copies.
    """

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__(weight, bias, conv.stride, conv.padding, conv.dilation)
        self.out_channels, self.in_channels = conv.out_channels, conv.in_channels
        self.kernel_size = tuple(conv.kernel_size)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)


def _adopt(sparse: _SparseLayer, state: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Replace a freshly built sparse layer's buffers by the stored ones (their lengths differ)."""
    for name in ("indices", "values", "bias"):  # a folded batch-norm gives a bias-free conv its bias
        if prefix + name in state:
            setattr(sparse, name, state[prefix + name].clone())
    sparse._pattern = None


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
                 dense_latency_s: float = math.nan, sparse_latency_s: float = math.nan,
                 fused: Sequence[Sequence[Optional[str]]] = ()) -> None:
        super().__init__()
        self.model = model
        self.choices = list(choices)
        self.fused = [list(entry) for entry in fused]  # [conv, batch-norm, relu or None] folded together
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


def _fuse(model: nn.Module) -> list[list[Optional[str]]]:
    """Fold each BatchNorm2d that only a sparse conv feeds into that conv's values and bias, and the ReLU module
    after it into the conv's output (:func:`robust_sparse.kernels.chains.chains`); they become ``nn.Identity``:
    two passes over the activations fewer per layer. Returns the ``[conv, norm, relu or None]`` names, which a
    saved model records."""
    found = chains(model, lambda module: isinstance(module, SparseConv2d),
                   leaf=lambda module: isinstance(module, _SparseLayer))  # the kernels are not traceable
    found = [chain for chain in found if model.get_submodule(chain[1]).track_running_stats]
    for conv_name, norm_name, relu_name in found:
        model.get_submodule(conv_name).fold(model.get_submodule(norm_name))
        _replace(model, norm_name, nn.Identity())
        if relu_name is not None:
            model.get_submodule(conv_name).relu = True
            _replace(model, relu_name, nn.Identity())
    return found


def sparse_inference(model: nn.Module, example_input: torch.Tensor, *, measure: Optional[Measure] = None,
                     repeats: int = 7, fuse: bool = True) -> SparseInferenceModel:
    """An eval-only copy of ``model`` (left untouched) whose Linear/Conv2d layers run sparse where measured faster.

    ``example_input``: a CPU batch of the size the model will serve (it fixes the shapes timed per layer).
    ``measure(name, dense, sparse) -> (dense_s, sparse_s)`` times the two zero-argument calls; the default
    alternates them ``repeats`` times and takes the fastest of each. A layer keeps its sparse kernel only when
    ``sparse_s < dense_s``; with ``fuse``, each BatchNorm (and ReLU) that follows a sparse conv inside an
    ``nn.Sequential`` is folded into it (:func:`_fuse`); the whole model is then timed under the name ``""`` and
    falls back to all-dense when the sparse one is not faster.
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
        fused = _fuse(sparse_model) if fuse else []
        if not any(choice.sparse for choice in choices):  # nothing changed: one model, timed once, no noisy "speed-up"
            dense_total = measure("", lambda: model(example_input), lambda: model(example_input))[0]
            return SparseInferenceModel(sparse_model, choices, dense_total, dense_total, fused)
        dense_total, sparse_total = measure("", lambda: model(example_input), lambda: sparse_model(example_input))
    if not sparse_total < dense_total:
        choices = [LayerChoice(c.name, c.kind, c.density, c.dense_s, c.sparse_s, False) for c in choices]
        sparse_model, sparse_total, fused = copy.deepcopy(model), dense_total, []
    return SparseInferenceModel(sparse_model, choices, dense_total, sparse_total, fused)


def save_sparse_inference(module: SparseInferenceModel, path: str | Path, architecture: str,
                          num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float],
                          model_kwargs: Optional[Mapping[str, Any]] = None, cifar_stem: bool = False) -> None:
    """Write ``module`` as a state_dict plus what rebuilds it (``build_model``'s arguments: an outside
    ``torchvision:``/``timm:`` model with its keyword arguments and stem too); atomic, loadable with
    ``weights_only=True``."""
    from robust_sparse.files.atomic import atomic_open

    payload = {
        "kind": SPARSE_INFERENCE_FORMAT,
        "architecture": architecture, "num_classes": num_classes, "in_channels": in_channels,
        "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        "model_kwargs": dict(model_kwargs or {}), "cifar_stem": bool(cifar_stem),
        "sparse_layers": module.sparse_layers, "fused": module.fused,
        "dense_latency_s": module.dense_latency_s, "sparse_latency_s": module.sparse_latency_s,
        "state": {name: tensor.detach().cpu() for name, tensor in module.model.state_dict().items()},
    }
    with atomic_open(Path(path), "wb") as stream:
        torch.save(payload, stream)


def load_sparse_inference(path: str | Path) -> SparseInferenceModel:
    """Rebuild a model written by :func:`save_sparse_inference` (no re-measurement: the saved choice holds).

    The file is read with ``weights_only=True`` and everything in it is checked before a model is built (the
    record's bounds and the tensors' shapes, :meth:`~robust_sparse.deploy.pretrained.ModelRecord.build_checked`; the sparse
    layers' positions within their weights): a damaged or hostile file is one :class:`CheckpointError` line."""
    from robust_sparse.files.checkpoint import safe_load
    from robust_sparse.deploy.pretrained import ModelRecord
    from robust_sparse.errors import CheckpointError

    where = str(path)
    payload = safe_load(path, "sparse-inference file")
    if not isinstance(payload, dict) or payload.get("kind") not in (SPARSE_INFERENCE_FORMAT, _FORMAT_V1):
        raise CheckpointError(f"{path} is not a sparse-inference export ({SPARSE_INFERENCE_FORMAT})")
    record = ModelRecord.from_json(payload, where, kwargs_key="model_kwargs")
    state, sparse_layers, fused = payload.get("state"), payload.get("sparse_layers"), payload.get("fused", [])
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no stored state (a dict of tensors); re-export the model")
    if not isinstance(sparse_layers, list) or not all(isinstance(name, str) for name in sparse_layers):
        raise CheckpointError(f"{path}: sparse_layers is not a list of layer names; re-export the model")
    if not isinstance(fused, list) or not all(
            isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)
            and isinstance(entry[1], str) and (entry[2] is None or isinstance(entry[2], str)) for entry in fused):
        raise CheckpointError(f"{path}: fused is not a list of (conv, norm, relu) layer names; re-export the model")
    latency = [payload.get(key) for key in ("dense_latency_s", "sparse_latency_s")]
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in latency):
        raise CheckpointError(f"{path}: dense_latency_s/sparse_latency_s are not numbers; re-export the model")
    # a sparse layer's weight is stored as its positions and values, checked below against the built weight
    model = record.build_checked(where, state, skip=[f"{name}.weight" for name in sparse_layers]).eval()
    try:
        if payload["kind"] == _FORMAT_V1:
            state = _from_v1(model, state, sparse_layers)
        for name in sparse_layers:
            dense = model.get_submodule(name)
            if not isinstance(dense, (nn.Linear, nn.Conv2d)):
                raise CheckpointError(f"{path}: sparse layer {name} is a {type(dense).__name__} in "
                                      f"{record.architecture}, not a Linear or Conv2d; re-export the model")
            _check_positions(path, name, state, dense.weight.numel())
            build = SparseLinear.from_state if isinstance(dense, nn.Linear) else SparseConv2d.from_state
            _replace(model, name, build(dense, state, name + "."))
        for conv_name, norm_name, relu_name in fused:  # the stored values and bias already hold the batch-norm
            _replace(model, norm_name, nn.Identity())
            if relu_name is not None:
                model.get_submodule(conv_name).relu = True
                _replace(model, relu_name, nn.Identity())
        model.load_state_dict(state)
    except (RuntimeError, KeyError, AttributeError, ValueError, TypeError, IndexError) as error:
        # a name the architecture does not have, a tensor of another shape: the file does not fit its record
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: the stored state does not fit {record.architecture} "
                              f"({type(error).__name__}: {reason}); re-export the model") from None
    return SparseInferenceModel(model, (), float(latency[0]), float(latency[1]), [tuple(f) for f in fused])


def _check_positions(path: str | Path, name: str, state: Mapping[str, torch.Tensor], numel: int) -> None:
    """A sparse layer's stored positions: integers, strictly ascending, within its weight; as many values."""
    from robust_sparse.errors import CheckpointError

    indices, values = state.get(f"{name}.indices"), state.get(f"{name}.values")
    if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise CheckpointError(f"{path}: sparse layer {name} has no stored indices and values; re-export the model")
    if (indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1 or values.dim() != 1
            or values.numel() != indices.numel() or indices.numel() > numel
            or (indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel
                                     or not bool((indices[1:] > indices[:-1]).all())))):
        raise CheckpointError(f"{path}: sparse layer {name}'s indices are not ascending positions within its "
                              f"{numel:,} weights, one per value; re-export the model")


def _from_v1(model: nn.Module, state: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """A first-format state with each sparse layer's CSR matrix turned into this format's positions and values.

    The first format stored a Conv2d weight as an ``(O, C * kh * kw)`` CSR matrix, its columns in (kernel row,
    kernel column, channel) order for stride-1, dilation-1 layers (the "shifted rows" kernel) and in
    (channel, kernel row, kernel column) order otherwise; a Linear weight as itself.
    """
    state = dict(state)
    for name in names:
        layer = model.get_submodule(name)
        crow, col, values = (state.pop(f"{name}.{key}") for key in ("crow_indices", "col_indices", "values"))
        rows = crow.numel() - 1
        # check_invariants: the indices come from a file, and to_dense trusts unchecked ones
        matrix = torch.sparse_csr_tensor(crow, col, values, (rows, layer.weight[0].numel()),
                                         check_invariants=True).to_dense()
        weight = matrix.view_as(layer.weight)
        if isinstance(layer, nn.Conv2d):
            out_channels, channels, kh, kw = layer.weight.shape
            shifted = tuple(layer.stride) == (1, 1) and tuple(layer.dilation) == (1, 1)
            weight = (matrix.view(out_channels, kh, kw, channels).permute(0, 3, 1, 2) if shifted
                      else matrix.view(out_channels, channels, kh, kw))
        indices = weight.reshape(-1).nonzero().squeeze(1)
        state[f"{name}.indices"] = indices
        state[f"{name}.values"] = weight.reshape(-1)[indices].contiguous()
    return state
