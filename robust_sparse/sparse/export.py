"""Export a trained sparse model for people who do not use this toolkit.

A checkpoint of one network gets these files:

* ``model_dense.pt``: a plain ``state_dict`` of the masked model, loadable with
  ``torch.load(path, weights_only=True)`` into the ordinary model class (``build_model(...)``);
* ``model_sparse.pt``: a compact checkpoint. Each sparse tensor stores its nonzero values and its mask,
  the mask either as a packed bitmask (1 bit per position) or as int32 positions, whichever is smaller:
  positions win below 1/32 = 3.1% density (99% sparsity), the bitmask above.
* ``model_sparse_inference.pt``: the model for fast CPU inference (:mod:`robust_sparse.deploy.inference`): CSR
  kernels in the layers where they measured faster at export, a state_dict plus the names that rebuild it, read
  back by ``load_sparse_inference`` (which loads with ``weights_only=True``).

``export.json`` records the densities, the file sizes and the protocol the model was trained for (dataset,
number of classes, threat model and eps): ``robust-sparse eval --arch NAME --weights DIR/model_dense.pt`` reads it,
so an exported model is evaluated at its own eps. Under ``sparse_inference`` it records the dense and sparse
latency measured at export (batch 1, the exporting process's threads). Beside them (:mod:`robust_sparse.deploy.pretrained`):

* ``model.safetensors``: the masked weights with the record that rebuilds the model in its metadata
  (``robust_sparse.load_pretrained``);
* ``model_network.pt`` for a ``torchvision:``/``timm:`` model: its library's own state_dict (export.json's
  ``network`` says how to load it with ``strict=True``);
* with ``--hub``, a Hugging Face Hub-style folder ``hub/`` (config.json, model.safetensors, a model card); with
  ``--onnx``, ``model.onnx`` checked against PyTorch.

An AST checkpoint exported without ``--subnet`` becomes one dynamic model holding every sub-net
(:mod:`robust_sparse.deploy.dynamic`: ``model_dynamic.safetensors``, each sub-net's sparse-inference model, and a
latency table per sub-net in export.json). Every file is written atomically.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from robust_sparse.files import rundir
from robust_sparse.files.atomic import atomic_open, write_atomic
from robust_sparse.files.checkpoint import load_checkpoint, save_checkpoint
from robust_sparse.deploy.pretrained import (NETWORK_FILE, ONNX_FILE, SAFETENSORS_FILE, ModelRecord, network_manifest,
                                  network_state, write_hub_folder, write_onnx, write_safetensors)
from robust_sparse.errors import UserError

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
    """The plain ``state_dict`` stored in a compact export.

    Every entry is checked before it is decoded (its shape's size within :data:`~robust_sparse.deploy.pretrained.MAX_ELEMENTS`
    all together, its values and positions or bitmask consistent with it): a shape in the file decides what
    :func:`decode` allocates, so a damaged or hostile file is one :class:`CheckpointError` line, not a huge
    allocation or a traceback."""
    from robust_sparse.deploy.pretrained import MAX_ELEMENTS
    from robust_sparse.errors import CheckpointError

    payload = load_checkpoint(path)
    if payload.get("kind") != COMPACT_FORMAT:
        raise CheckpointError(f"{path} is not a compact sparse export")
    dense, sparse, order = payload.get("dense"), payload.get("sparse"), payload.get("order")
    if (not isinstance(dense, dict) or not isinstance(sparse, dict) or not isinstance(order, list)
            or not all(isinstance(t, torch.Tensor) for t in dense.values())
            or sorted(order, key=str) != sorted([*dense, *sparse], key=str)):
        raise CheckpointError(f"{path}: damaged compact export (dense, sparse and order do not name the same "
                              "tensors); export the checkpoint again")
    total = sum(t.numel() for t in dense.values())
    for name, entry in sparse.items():
        total += _checked_entry(path, name, entry)
        if total > MAX_ELEMENTS:
            raise CheckpointError(f"{path}: the compact export's tensors hold more than {MAX_ELEMENTS:,} elements; "
                                  "not a model this toolkit wrote")
    state = dict(dense)
    state.update({name: decode(entry) for name, entry in sparse.items()})
    return {name: state[name] for name in order}


def _checked_entry(path: str | Path, name: Any, entry: Any) -> int:
    """The number of elements a sparse entry decodes to, after checking that :func:`decode` can decode it."""
    from robust_sparse.errors import CheckpointError

    def bad() -> CheckpointError:
        return CheckpointError(f"{path}: damaged compact export: entry {str(name)[:80]!r} is not a shape with its "
                               "values and positions or bitmask; export the checkpoint again")

    if not isinstance(entry, dict) or not isinstance(entry.get("values"), torch.Tensor):
        raise bad()
    shape, values = entry.get("shape"), entry["values"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in shape) or values.dim() != 1:
        raise bad()
    numel = math.prod(shape)
    if numel > 2**62:  # before any comparison that would allocate; MAX_ELEMENTS is checked by the caller
        raise bad()
    positions, bitmask = entry.get("positions"), entry.get("bitmask")
    if positions is not None:
        if (not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.is_floating_point()
                or positions.numel() != values.numel()
                or (positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= numel))
                or positions.unique().numel() != positions.numel()):
            raise bad()
    elif isinstance(bitmask, torch.Tensor) and bitmask.dtype == torch.uint8 and bitmask.dim() == 1:
        if bitmask.numel() != math.ceil(numel / 8) or values.numel() > numel:
            raise bad()
        ones = int(np.unpackbits(bitmask.numpy(), count=numel).sum())
        if ones != values.numel():
            raise bad()
    else:
        raise bad()
    return numel


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, subnet: int | None = None, *,
                      hub: bool = False, onnx: bool = False, serving_batch: int = 32,
                      evaluation: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Export a checkpoint; for one that holds several sub-nets (AST): sub-net ``subnet``, or with ``subnet``
    None all of them as one dynamic model (:mod:`robust_sparse.deploy.dynamic`).

    ``hub``: also a Hugging Face Hub-style folder ``out/hub`` whose model card shows ``evaluation`` (rows of
    attack, threat_model, eps, n, accuracy); ``onnx``: also ``model.onnx``, checked against PyTorch."""
    from robust_sparse.sparse.methods import pick_view, saved_views

    state = load_checkpoint(checkpoint_path)
    views = saved_views(state)
    record = ModelRecord.from_config(state["config"])
    if views[0].index is not None and subnet is None:
        if hub or onnx:
            raise UserError("export --hub/--onnx: those formats hold one network; pass --subnet K for one of this "
                            f"AST checkpoint's sub-nets (0..{len(views) - 1}), or leave them out for the dynamic model")
        out = rundir.claim(out_dir, rundir.Kind.EXPORT, "export --out")
        return export_dynamic(state, views, record, out, checkpoint_path, serving_batch)
    view = pick_view(views, subnet, checkpoint_path)
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
        "subnet": subnet, "record": record.to_json(),
        "sparse_layers": len(masks),
        "density": sum(active.values()) / sum(total.values()) if masks else 1.0,
        "layer_density": {name: active[name] / total[name] for name in masks},
        "nonzero_parameters": int(sum(int(t.count_nonzero()) for t in model_state.values()
                                      if t.is_floating_point())),
        "dense_file_bytes": dense_path.stat().st_size, "compact_file_bytes": compact_path.stat().st_size,
    }
    summary["compact_to_dense_size"] = summary["compact_file_bytes"] / summary["dense_file_bytes"]
    summary["protocol"] = export_protocol(state["config"])
    history = (state.get("history") or [{}])[-1]
    summary.update({key: history[key] for key in ("inference_flops", "inference_flops_vs_dense")
                    if history.get(key) is not None})
    write_safetensors(out / SAFETENSORS_FILE, model_state, record, {"protocol": summary["protocol"]})
    summary["safetensors"] = {"file": SAFETENSORS_FILE, "file_bytes": (out / SAFETENSORS_FILE).stat().st_size}
    if record.library is not None:  # the library's own state_dict, for people who do not use this toolkit
        with atomic_open(out / NETWORK_FILE, "wb") as stream:
            torch.save(network_state(record, model_state), stream)
        summary["network"] = network_manifest(record)
    summary["sparse_inference"] = export_sparse_inference(model_state, record, out / SPARSE_INFERENCE_FILE,
                                                          summary["protocol"]["image_size"])
    if onnx:
        model = _built(record, model_state)
        summary["onnx"] = write_onnx(model, _example(record, summary["protocol"]["image_size"], 2), out / ONNX_FILE)
    if hub:
        summary["hub"] = str(write_hub_folder(out / "hub", model_state, record, summary, evaluation))
    write_atomic(out / "export.json", json.dumps(summary, indent=2))
    return summary


def _built(record: ModelRecord, model_state: Mapping[str, torch.Tensor]) -> nn.Module:
    model = record.build()
    model.load_state_dict(model_state, strict=True)
    return model.eval()


def _example(record: ModelRecord, image_size: int, batch: int) -> torch.Tensor:
    return torch.rand(batch, record.in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))


def export_dynamic(state: dict[str, Any], views: Sequence[Any], record: ModelRecord, out: Path,
                   checkpoint_path: str | Path, serving_batch: int) -> dict[str, Any]:
    """An AST checkpoint as one switchable artifact plus each sub-net's sparse-inference model, with every
    sub-net's latency measured here (batch 1 and ``serving_batch``, this process's threads)."""
    from robust_sparse.config import config_from_dict
    from robust_sparse.deploy.dynamic import DYNAMIC_FILE, save_dynamic, subnet_inference_file
    from robust_sparse.deploy.inference import save_sparse_inference, sparse_inference

    protocol = export_protocol(state["config"])
    sparsity = state.get("sparsity") or {}
    shared = dict(state["model"])
    shared.update(sparsity.get("full_weights") or {})  # the values outside the active sub-net's mask
    targets = config_from_dict({**state["config"], "data": {**state["config"].get("data", {}), "root": "."}}
                               ).sparsity.section("ast").densities
    latency = []
    for view in views:
        model = _built(record, view.weights)
        fast = sparse_inference(model, _example(record, protocol["image_size"], 1))
        path = out / subnet_inference_file(view.index)
        save_sparse_inference(fast, path, record.architecture, record.num_classes, record.in_channels, record.mean,
                              record.std, record.kwargs, record.cifar_stem)
        serving = sparse_inference(model, _example(record, protocol["image_size"], serving_batch))
        counts = [(int(m.sum()), m.numel()) for m in view.masks.values()]
        latency.append({
            "subnet": view.index, "density": sum(a for a, _ in counts) / sum(t for _, t in counts),
            "batch1_dense_ms": fast.dense_latency_s * 1e3, "batch1_sparse_ms": fast.sparse_latency_s * 1e3,
            "serving_batch": serving_batch, "serving_dense_ms": serving.dense_latency_s * 1e3,
            "serving_sparse_ms": serving.sparse_latency_s * 1e3, "sparse_layers": len(fast.sparse_layers),
            "sparse_inference_file": path.name})
        log.info("sub-net %d: density %.4f, %.2f ms sparse vs %.2f ms dense per image", view.index,
                 latency[-1]["density"], latency[-1]["batch1_sparse_ms"], latency[-1]["batch1_dense_ms"])
    dynamic = save_dynamic(out / DYNAMIC_FILE, record, shared, [view.masks for view in views], targets,
                           sparsity.get("batchnorm"), latency)
    summary = {"checkpoint": str(checkpoint_path), "model": record.architecture, "epoch": state["epoch"],
               "kind": "ast-dynamic", "record": record.to_json(), "protocol": protocol, "dynamic": dynamic,
               "threads": torch.get_num_threads(), "subnets": latency}
    write_atomic(out / "export.json", json.dumps(summary, indent=2))
    return summary


def export_sparse_inference(model_state: dict[str, torch.Tensor], record: ModelRecord, path: Path,
                            image_size: int) -> dict[str, Any]:
    """Write the CPU sparse-inference model (one image per call, this process's threads); its measured latency.
    Skipped (and said so in the returned record) for a model that cannot be rebuilt here (a user-registered
    architecture whose module this process cannot import)."""
    from robust_sparse.deploy.inference import save_sparse_inference, sparse_inference

    try:
        model = _built(record, model_state)
    except UserError as error:
        log.warning("sparse-inference model not written: %s", error)
        return {"file": None, "skipped": str(error)}
    fast = sparse_inference(model, _example(record, image_size, 1))
    save_sparse_inference(fast, path, record.architecture, record.num_classes, record.in_channels,
                          record.mean, record.std, record.kwargs, record.cifar_stem)
    choices = fast.report()
    return {"file": path.name, "batch_size": 1, "threads": torch.get_num_threads(),
            "dense_latency_ms": fast.dense_latency_s * 1e3, "sparse_latency_ms": fast.sparse_latency_s * 1e3,
            "speedup": fast.dense_latency_s / fast.sparse_latency_s,
            "sparse_layers": fast.sparse_layers, "dense_layers": choices.loc[~choices["sparse"], "name"].tolist(),
            "file_bytes": path.stat().st_size}


def export_protocol(config: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation of the exported weights needs to match the run's: dataset, classes, threat model, eps."""
    from robust_sparse.config import config_from_dict
    from robust_sparse.datasets.splits import dataset_info

    run = config_from_dict({**config, "data": {**config.get("data", {}), "root": "."}})  # the root may be gone
    info = dataset_info(run.data)
    return {"architecture": run.model.name, "dataset": run.data.dataset, "num_classes": info.num_classes,
            "in_channels": info.in_channels, "image_size": info.image_size, "norm": run.attack.norm.value,
            "eps": run.eval.eps if run.eval.eps is not None else run.attack.eps, "objective": run.objective.value}
