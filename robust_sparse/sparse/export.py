"""Export a trained sparse model for people who do not use this toolkit.

Three files:

* ``model_dense.pt``: a plain ``state_dict`` of the masked model, loadable with
  ``torch.load(path, weights_only=True)`` into the ordinary model class (``build_model(...)``);
* ``model_sparse.pt``: a compact checkpoint. Each sparse tensor stores its nonzero values and its mask,
  the mask either as a packed bitmask (1 bit per position) or as int32 positions, whichever is smaller:
  positions win below 1/32 = 3.1% density (99% sparsity), the bitmask above.
* ``model_sparse_inference.pt``: the model for fast CPU inference (:mod:`robust_sparse.inference`): CSR
  kernels in the layers where they measured faster at export, a state_dict plus the names that rebuild it, read
  back by ``load_sparse_inference`` (which loads with ``weights_only=True``).

``export.json`` records the densities, the file sizes and the protocol the model was trained for (dataset,
number of classes, threat model and eps): ``robust-sparse eval --arch NAME --weights DIR/model_dense.pt`` reads it,
so an exported model is evaluated at its own eps. Under ``sparse_inference`` it records the dense and sparse
latency measured at export (batch 1, the exporting process's threads). Every file is written atomically.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robust_sparse import rundir
from robust_sparse.checkpoint import atomic_open, load_checkpoint, save_checkpoint, write_atomic

log = logging.getLogger(__name__)

COMPACT_FORMAT = "robust-sparse-compact/1"
SPARSE_INFERENCE_FILE = "model_sparse_inference.pt"


def encode(tensor: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    flat_mask = mask.flatten().cpu()
    values = tensor.flatten().cpu()[flat_mask]
    positions = torch.nonzero(flat_mask).flatten().to(torch.int32)
    bitmask_bytes = math.ceil(flat_mask.numel() / 8)
    entry: dict[str, Any] = {"shape": list(tensor.shape), "values": values.clone()}
    if positions.numel() * 4 < bitmask_bytes:
        entry["positions"] = positions
    else:
        entry["bitmask"] = torch.from_numpy(np.packbits(flat_mask.numpy()))
    return entry


def decode(entry: dict[str, Any]) -> torch.Tensor:
    numel = math.prod(entry["shape"])
    if "positions" in entry:
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[entry["positions"].long()] = True
    else:
        mask = torch.from_numpy(np.unpackbits(entry["bitmask"].numpy(), count=numel).astype(bool))
    dense = torch.zeros(numel, dtype=entry["values"].dtype)
    dense[mask] = entry["values"]
    return dense.view(entry["shape"])


def load_compact(path: str | Path) -> dict[str, torch.Tensor]:
    """The plain ``state_dict`` stored in a compact export."""
    payload = load_checkpoint(path)
    if payload.get("kind") != COMPACT_FORMAT:
        from robust_sparse.errors import CheckpointError

        raise CheckpointError(f"{path} is not a compact sparse export")
    state = dict(payload["dense"])
    state.update({name: decode(entry) for name, entry in payload["sparse"].items()})
    return {name: state[name] for name in payload["order"]}


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, subnet: int | None = None) -> dict[str, Any]:
    """Export a checkpoint; for one that holds several sub-nets (AST), sub-net ``subnet`` (required there)."""
    from robust_sparse.sparse.methods import pick_view, saved_views

    state = load_checkpoint(checkpoint_path)
    view = pick_view(saved_views(state), subnet, checkpoint_path)
    weights, mask_source = view.weights, view.masks
    out = rundir.claim(out_dir, rundir.Kind.EXPORT, "export --out")  # absent, empty or an earlier export's
    model_state = {name: tensor.cpu() for name, tensor in weights.items()}
    masks = {name: mask.cpu() for name, mask in mask_source.items()}

    dense_path = out / "model_dense.pt"
    with atomic_open(dense_path, "wb") as stream:  # plain tensors only: any torch loads it with weights_only=True
        torch.save(model_state, stream)

    sparse = {name: encode(model_state[name], mask) for name, mask in masks.items()}
    dense = {name: tensor for name, tensor in model_state.items() if name not in masks}
    compact_path = out / "model_sparse.pt"
    save_checkpoint({"kind": COMPACT_FORMAT, "config": state["config"], "epoch": state["epoch"],
                     "order": list(model_state), "dense": dense, "sparse": sparse}, compact_path)

    active = {name: int(mask.sum()) for name, mask in masks.items()}
    total = {name: mask.numel() for name, mask in masks.items()}
    summary = {
        "checkpoint": str(checkpoint_path), "model": state["config"]["model"]["name"], "epoch": state["epoch"],
        "subnet": subnet,
        "sparse_layers": len(masks),
        "density": sum(active.values()) / sum(total.values()) if masks else 1.0,
        "layer_density": {name: active[name] / total[name] for name in masks},
        "nonzero_parameters": int(sum(int(t.count_nonzero()) for t in model_state.values()
                                      if t.is_floating_point())),
        "dense_file_bytes": dense_path.stat().st_size, "compact_file_bytes": compact_path.stat().st_size,
    }
    summary["compact_to_dense_size"] = summary["compact_file_bytes"] / summary["dense_file_bytes"]
    summary["protocol"] = export_protocol(state["config"])
    summary["sparse_inference"] = export_sparse_inference(model_state, state["config"], out / SPARSE_INFERENCE_FILE)
    write_atomic(out / "export.json", json.dumps(summary, indent=2))
    return summary


def export_sparse_inference(model_state: dict[str, torch.Tensor], config: dict[str, Any],
                            path: Path) -> dict[str, Any]:
    """Write the CPU sparse-inference model (one image per call, this process's threads); its measured latency.
    Skipped (and said so in the returned record) for a model its saved form cannot rebuild by name alone: an
    outside (``torchvision:``/``timm:``), user-registered or keyword-configured architecture."""
    from robust_sparse.config import config_from_dict
    from robust_sparse.data import dataset_info
    from robust_sparse.models import MODELS, build_model
    from robust_sparse.inference import save_sparse_inference, sparse_inference

    run = config_from_dict({**config, "data": {**config.get("data", {}), "root": "."}})  # the root may be gone
    architecture = run.model.name
    if architecture not in MODELS or run.model.kwargs:
        reason = (f"model {architecture!r}" + (" with model.kwargs" if run.model.kwargs else "") +
                  ": the sparse-inference file rebuilds only the toolkit's own architectures by name")
        log.warning("sparse-inference model not written: %s", reason)
        return {"file": None, "skipped": reason}
    info = dataset_info(run.data)
    model = build_model(architecture, info.num_classes, info.in_channels, info.mean, info.std)
    model.load_state_dict(model_state)
    image = torch.rand(1, info.in_channels, info.image_size, info.image_size,
                       generator=torch.Generator().manual_seed(0))
    fast = sparse_inference(model.eval(), image)
    save_sparse_inference(fast, path, architecture, info.num_classes, info.in_channels,
                          info.mean, info.std)
    choices = fast.report()
    return {"file": path.name, "batch_size": 1, "threads": torch.get_num_threads(),
            "dense_latency_ms": fast.dense_latency_s * 1e3, "sparse_latency_ms": fast.sparse_latency_s * 1e3,
            "speedup": fast.dense_latency_s / fast.sparse_latency_s,
            "sparse_layers": fast.sparse_layers, "dense_layers": choices.loc[~choices["sparse"], "name"].tolist(),
            "file_bytes": path.stat().st_size}


def export_protocol(config: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation of the exported weights needs to match the run's: dataset, classes, threat model, eps."""
    from robust_sparse.config import config_from_dict
    from robust_sparse.data import dataset_info

    run = config_from_dict({**config, "data": {**config.get("data", {}), "root": "."}})  # the root may be gone
    info = dataset_info(run.data)
    return {"architecture": run.model.name, "dataset": run.data.dataset.value, "num_classes": info.num_classes,
            "in_channels": info.in_channels, "image_size": info.image_size, "norm": run.attack.norm.value,
            "eps": run.eval.eps if run.eval.eps is not None else run.attack.eps, "objective": run.objective.value}
