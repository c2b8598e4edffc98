"""AST's sub-nets as one deployed model that changes its computation at run time (Yang et al., NeurIPS 2022).

An AST run trains K sub-nets over one shared weight tensor, so that a deployment can pick the sub-net its
hardware budget allows, and switch when the budget changes. ``robust-sparse export`` of an AST checkpoint writes
that as one artifact, ``model_dynamic.safetensors``:

* ``state.<name>``: every tensor of the model's state_dict, a sparse weight holding the shared values on the union
  of the sub-nets' masks (zero elsewhere);
* ``mask.<k>.<name>``: sub-net ``k``'s mask, bit-packed. When ``M_k`` lies inside ``M_{k-1}`` (nested masks,
  ``sparsity.ast.nested``, and often so without it) it is stored as one bit per position of ``M_{k-1}`` only, so
  K nested masks cost ``N (1 + d_0 + ... + d_{K-2})`` bits for N weights instead of ``K N``;
* ``batchnorm.<k>.<name>``: sub-net ``k``'s BatchNorm statistics when the run kept one set per sub-net;
* metadata: the :class:`~robust_sparse.deploy.pretrained.ModelRecord`, each sub-net's target and measured density, which
  masks are stored within their parent, and the latency table measured at export.

:func:`load_dynamic` returns a :class:`DynamicSubnetModel`: ``use(k)`` or ``at_density(d)`` writes sub-net
``k``'s weights into the one model in place (shared values times its mask, one multiply per sparse tensor; no
reload, no second copy of the model), in eval mode, on [0, 1] inputs. Beside the artifact, export writes each
sub-net's sparse-inference model (``model_sparse_inference_subnet<k>.pt``); with those loaded, a forward without
gradients runs the active sub-net's sparse kernels, and one that needs gradients (an attack) the dense masked
weights, so the same object serves and is evaluated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from robust_sparse.deploy.pretrained import ModelRecord, read_safetensors, write_bytes
from robust_sparse.errors import CheckpointError, UserError

DYNAMIC_FORMAT = "robust-sparse-dynamic/1"
DYNAMIC_FILE = "model_dynamic.safetensors"


def subnet_inference_file(k: int) -> str:
    return f"model_sparse_inference_subnet{k}.pt"


# ---- the masks, packed -------------------------------------------------------------------------------------------


def pack_masks(masks: Sequence[Mapping[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """Bit-packed masks ``mask.<k>.<name>``, each sub-net's within its parent's positions where every one of its
    masks is nested there; returns the tensors and, per sub-net, whether it was stored within its parent."""
    packed: dict[str, torch.Tensor] = {}
    within: list[bool] = []
    for k, current in enumerate(masks):
        parent = masks[k - 1] if k else None
        nested = parent is not None and all(not bool((mask.bool() & ~parent[name].bool()).any())
                                            for name, mask in current.items())
        within.append(nested)
        for name, mask in current.items():
            bits = mask.bool().cpu().flatten()
            if nested:
                bits = bits[parent[name].bool().cpu().flatten()]
            packed[f"mask.{k}.{name}"] = torch.from_numpy(np.packbits(bits.numpy()))
    return packed, within


def unpack_masks(tensors: Mapping[str, torch.Tensor], names: Sequence[str], shapes: Mapping[str, Sequence[int]],
                 within: Sequence[bool]) -> list[dict[str, torch.Tensor]]:
    masks: list[dict[str, torch.Tensor]] = []
    for k, nested in enumerate(within):
        current = {}
        for name in names:
            numel = math.prod(shapes[name])
            parent = masks[k - 1][name].flatten() if nested else None
            count = int(parent.sum()) if parent is not None else numel
            bits = torch.from_numpy(np.unpackbits(tensors[f"mask.{k}.{name}"].numpy(), count=count).astype(bool))
            if parent is not None:
                full = torch.zeros(numel, dtype=torch.bool)
                full[parent] = bits
                bits = full
            current[name] = bits.view(*shapes[name])
        masks.append(current)
    return masks


# ---- writing -----------------------------------------------------------------------------------------------------


def save_dynamic(path: str | Path, record: ModelRecord, state: Mapping[str, torch.Tensor],
                 masks: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[float],
                 batchnorm: Sequence[Mapping[str, torch.Tensor]] | None = None,
                 latency: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Write the artifact (atomically); ``state`` holds the shared weights, ``masks`` the sub-nets' (densest
    first). Returns the summary export.json records."""
    import safetensors.torch

    names = list(masks[0])
    union = {name: torch.stack([m[name].bool().cpu() for m in masks]).any(0) for name in names}
    tensors = {f"state.{key}": (value.detach().cpu() * union[key] if key in union else value.detach().cpu())
               .contiguous().clone() for key, value in state.items()}
    packed, within = pack_masks(masks)
    tensors.update(packed)
    for k, statistics in enumerate(batchnorm or []):
        tensors.update({f"batchnorm.{k}.{key}": value.detach().cpu().contiguous().clone()
                        for key, value in statistics.items()})
    densities = [sum(int(m[n].sum()) for n in names) / sum(m[n].numel() for n in names) for m in masks]
    metadata = {
        "format": DYNAMIC_FORMAT, "model": json.dumps(record.to_json()), "mask_names": json.dumps(names),
        "shapes": json.dumps({name: list(masks[0][name].shape) for name in names}),
        "within_previous": json.dumps(within), "targets": json.dumps([float(t) for t in targets]),
        "densities": json.dumps(densities), "latency": json.dumps(list(latency)),
        "subnet_batchnorm": json.dumps(bool(batchnorm)),
    }
    data = safetensors.torch.save(tensors, metadata=metadata)
    write_bytes(Path(path), data)
    weights = sum(m.numel() for m in masks[0].values())
    mask_bytes = sum(t.numel() for t in packed.values())
    return {"file": Path(path).name, "subnets": len(masks), "densities": densities, "targets": list(targets),
            "masks_within_previous": within, "file_bytes": len(data), "mask_bytes": mask_bytes,
            "mask_bits_per_weight": 8 * mask_bytes / weights}


# ---- the deployed model ---------------------------------------------------------------------------------------


class DynamicSubnetModel(nn.Module):
    """One model, K sub-nets: :meth:`use` (by index, 0 = the densest) or :meth:`at_density` (by budget) switch the
    weights in place. Eval mode only (its BatchNorm statistics are per sub-net or frozen); inputs in [0, 1]."""

    def __init__(self, model: nn.Module, shared: Mapping[str, torch.Tensor],
                 masks: Sequence[Mapping[str, torch.Tensor]], densities: Sequence[float],
                 targets: Sequence[float] = (), batchnorm: Sequence[Mapping[str, torch.Tensor]] | None = None,
                 latency: Sequence[Mapping[str, Any]] = (), fast: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.model = model
        self._shared = dict(shared)
        self._masks = [dict(m) for m in masks]
        self._batchnorm = [dict(b) for b in batchnorm] if batchnorm else None
        self.densities, self.targets = list(densities), list(targets) or list(densities)
        self.latency = list(latency)
        self._fast = list(fast) if fast else None
        self.active = -1
        self.eval()
        self.use(0)

    def __len__(self) -> int:
        return len(self._masks)

    def train(self, mode: bool = True) -> "DynamicSubnetModel":
        if mode:
            raise RuntimeError("a dynamic AST model is for deployment and evaluation (eval mode only); train the "
                               "AST run's checkpoint instead")
        return super().train(False)

    def _apply(self, fn: Any, recurse: bool = True) -> "DynamicSubnetModel":
        super()._apply(fn, recurse)  # the model; the stored sub-nets follow it (device, dtype)
        self._shared = {name: fn(t) for name, t in self._shared.items()}
        self._masks = [{name: fn(m) for name, m in masks.items()} for masks in self._masks]
        if self._batchnorm is not None:
            self._batchnorm = [{name: fn(t) for name, t in stats.items()} for stats in self._batchnorm]
        return self

    @torch.no_grad()
    def use(self, k: int) -> "DynamicSubnetModel":
        """Make the model sub-net ``k`` (0 = the densest): its masked shared weights, in place."""
        if not isinstance(k, int) or not 0 <= k < len(self._masks):
            raise UserError(f"sub-net {k!r}: this model has sub-nets 0..{len(self._masks) - 1} "
                            f"(densities {', '.join(f'{d:.4f}' for d in self.densities)})")
        parameters = dict(self.model.named_parameters())
        for name, shared in self._shared.items():
            torch.mul(shared, self._masks[k][name], out=parameters[name].data)
        if self._batchnorm is not None:
            buffers = dict(self.model.named_buffers())
            for name, value in self._batchnorm[k].items():
                buffers[name].copy_(value)
        self.active = k
        return self

    def at_density(self, density: float) -> "DynamicSubnetModel":
        """The densest sub-net whose density is at most ``density`` (a budget: the fraction of weights kept)."""
        fitting = [k for k, d in enumerate(self.densities) if d <= density * (1 + 1e-9)]
        if not fitting:
            raise UserError(f"density {density}: the sparsest sub-net keeps {min(self.densities):.4f} of the weights "
                            f"(available: {', '.join(f'{d:.4f}' for d in self.densities)})")
        return self.use(fitting[0])

    @property
    def density(self) -> float:
        return self.densities[self.active]

    def subnets(self) -> pd.DataFrame:
        """One row per sub-net: target and measured density, and the latency measured at export."""
        frame = pd.DataFrame({"subnet": range(len(self)), "target_density": self.targets, "density": self.densities})
        if self.latency:
            latency = pd.DataFrame(self.latency).drop(columns=["density"], errors="ignore")
            frame = frame.merge(latency, on="subnet", how="left")
        return frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast is not None and not (torch.is_grad_enabled() and x.requires_grad) and x.device.type == "cpu":
            return self._fast[self.active](x)  # the sub-net's sparse kernels when no gradient is needed
        return self.model(x)


def load_dynamic(path: str | Path, sparse_inference: bool = True) -> DynamicSubnetModel:
    """The deployed AST model from ``model_dynamic.safetensors`` (or the export folder holding it), on sub-net 0.

    ``sparse_inference``: also load each sub-net's sparse-inference model written beside it, so that forwards
    without gradients run sparse kernels (on the CPU); absent files leave the dense masked forward."""
    path = Path(path)
    file = path / DYNAMIC_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{file}: no dynamic AST model here (export an AST checkpoint without --subnet)")
    tensors, meta = read_safetensors(file, DYNAMIC_FORMAT, "a dynamic AST model")
    record = ModelRecord.from_json(meta.get("model"), str(file))
    state = {key[len("state."):]: value for key, value in tensors.items() if key.startswith("state.")}
    model = record.build_checked(str(file), state).eval()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{file}: the weights do not fit {record.architecture} "
                              f"({str(error).splitlines()[0]})") from None
    names, within, densities = _checked_masks(file, meta, tensors, state)
    masks = unpack_masks(tensors, names, {name: list(state[name].shape) for name in names}, within)
    batchnorm = None
    if meta.get("subnet_batchnorm"):
        batchnorm = [{key[len(f"batchnorm.{k}."):]: value for key, value in tensors.items()
                      if key.startswith(f"batchnorm.{k}.")} for k in range(len(masks))]
    fast = None
    files = [file.parent / subnet_inference_file(k) for k in range(len(masks))]
    if sparse_inference and all(f.is_file() for f in files):
        from robust_sparse.deploy.inference import load_sparse_inference

        fast = [load_sparse_inference(f) for f in files]
    try:
        return DynamicSubnetModel(model, {name: state[name] for name in names}, masks, densities,
                                  _numbers(meta.get("targets", ())), batchnorm, meta.get("latency", ()), fast)
    except (RuntimeError, KeyError, ValueError, TypeError) as error:  # e.g. a sub-net's batch-norm statistics
        raise CheckpointError(f"{file}: a sub-net does not fit the model ({type(error).__name__}: "
                              f"{(str(error).splitlines() or [''])[0][:160]}); re-export the model") from None


MAX_SUBNETS = 1024


def _checked_masks(file: Path, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                   state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[bool], list[float]]:
    """The masks' names, nesting and densities from the metadata, each checked against the model's own tensors:
    a mask's shape is the weight's (never the metadata's, which could claim any size) and its packed bits must be
    there, so that unpacking allocates no more than the model itself."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{file}: {what}; re-export the model")

    names, within = meta.get("mask_names"), meta.get("within_previous")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n in state for n in names):
        raise bad("mask_names does not name weights of the model")
    if (not isinstance(within, list) or not 1 <= len(within) <= MAX_SUBNETS or within[0] is not False
            or not all(isinstance(w, bool) for w in within)):
        raise bad(f"within_previous is not a list of 1..{MAX_SUBNETS} true/false flags, the first false")
    shapes = meta.get("shapes")
    if not isinstance(shapes, dict) or any(shapes.get(n) != list(state[n].shape) for n in names):
        raise bad("the masks' shapes differ from the weights' shapes")
    densities = _numbers(meta.get("densities"))
    if len(densities) != len(within) or not all(0 <= d <= 1 for d in densities):
        raise bad(f"densities are not {len(within)} numbers in [0, 1]")
    for k, nested in enumerate(within):
        for name in names:
            packed = tensors.get(f"mask.{k}.{name}")
            # a nested mask holds at most one bit per weight of its parent; a full one, one per weight
            if packed is None or packed.dtype != torch.uint8 or packed.dim() != 1 or (
                    not nested and packed.numel() != math.ceil(state[name].numel() / 8)) or (
                    nested and packed.numel() > math.ceil(state[name].numel() / 8)):
                raise bad(f"mask.{k}.{name} is missing or not the packed bits of {name}")
    return names, within, densities


def _numbers(values: Any) -> list[float]:
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return []
    return [float(v) for v in values]
