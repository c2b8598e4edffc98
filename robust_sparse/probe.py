"""The gradient-correlation probe: AGENT's mechanism, observed in any run without changing it (``probe:``).

AGENT (Lei et al., CPAL 2024) rests on one claim: the correlation between the current gradient and a previous
one falls as sparsity grows, so a fixed correction weight stops fitting (the paper's Table 9). This module
measures it in any run (dense, every sparse method, with or without AGENT, any objective) at the end of every
``probe.every``-th epoch, on ``probe.batches`` fixed batches (the first training images, unaugmented), over the
active weights of every Conv/Linear layer (masked by the current mask; all weights in a dense run):

``perturbed_correlation``
    the Table 9 quantity as read here: the Pearson correlation between ``g(theta; B)`` and ``g(theta + delta; B)``
    on the same batch and inputs, ``delta`` Gaussian on the active weights with a standard deviation of
    ``probe.perturbation`` times each layer's active-weight RMS. The paper's text says only "gradient correlation
    after perturbing the weights"; the noise law and scale are this toolkit's choice (docs/papers.md).
``snapshot_cosine``, ``snapshot_correlation``
    cosine and Pearson correlation between ``g(theta_t; B)`` and ``g(theta~; B)``, ``theta~`` the weights at the
    start of the epoch (AGENT's snapshot when it refreshes every epoch), on the same batch and the same
    adversarial inputs (found against ``theta_t``, as AGENT's g_old uses the step's examples): what c_t stands for.
``c_hat``
    AGENT's loss-based estimate (Eq. 4, :func:`robust_sparse.agent.estimate_c`) from the per-batch losses of
    ``theta_t`` and ``theta~`` on the probe batches, with the inputs of AGENT's g_tilde pass
    (``agent.full_grad_inputs``: clean by default). Few batches make it noisy: it is the estimator's value on
    these batches, not AGENT's.

The gradient quantities are the mean over the probe batches; globally (every active weight of every layer) and
per layer (``probe_layers.csv``).

The trajectory is untouched: the probe works on deep copies of the model (BatchNorm in train mode as in training;
the copies absorb the running-statistics updates), draws its attack starts and noise inside
``torch.random.fork_rng`` seeded from ``(probe.seed, epoch)``, and never touches the optimizer, the masker or the
loader, so weights, optimizer state and random streams are bit-identical with the probe on or off. Its FLOPs are
counted apart from training's (:attr:`GradientProbe.flops`, the ``probe_flops`` column) and named in the run's
last line.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from robust_sparse.agent import estimate_c
from robust_sparse.files.atomic import write_atomic
from robust_sparse.config import FullGradInputs, TrainConfig
from robust_sparse.datasets.images import ImageSet
from robust_sparse.datasets.splits import in_memory
from robust_sparse.flops import FlopsCounter, Passes
from robust_sparse.objectives import Objective
from robust_sparse.progress import progress as progress_bar
from robust_sparse.sparse.masker import sparsifiable

log = logging.getLogger(__name__)

#: metrics.csv's columns of the probe (NaN on epochs it did not run)
COLUMNS = ("probe_perturbed_correlation", "probe_snapshot_cosine", "probe_snapshot_correlation", "probe_c_hat")
LAYERS_FILE = "probe_layers.csv"  # per layer and probed epoch, in the run directory


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """a . b / (|a| |b|) of two flat vectors (float64); NaN when either is zero."""
    a, b = a.double(), b.double()
    norms = a.norm() * b.norm()
    return float(a @ b / norms) if norms > 0 else math.nan


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Pearson correlation of the entries of two flat vectors (float64); NaN when either is constant."""
    a, b = a.double(), b.double()
    return cosine(a - a.mean(), b - b.mean()) if a.numel() > 1 else math.nan


@dataclass
class ProbeResult:
    """One probe: the global values (metrics.csv's columns) and one row per layer."""

    values: dict[str, float]
    layers: list[dict[str, float | str | int]]


class GradientProbe:
    """Owns the probe's snapshot (the weights at the start of a probed epoch) and its FLOPs count."""

    def __init__(self, config: TrainConfig, model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
        self.config = config
        self.model = model
        self.masks = masks if masks is not None else {}  # the masker's live dict: it sees topology changes
        self.layers = list(sparsifiable(model))
        self.snapshot: nn.Module | None = None
        self.flops = 0.0
        self.layer_rows: list[dict] = []  # probe_layers.csv, every probed epoch's rows

    @property
    def every(self) -> int:
        return self.config.probe.every

    def due(self, epoch: int) -> bool:
        """Whether the probe runs at the end of 0-based ``epoch``."""
        return self.every > 0 and (epoch + 1) % self.every == 0

    def start_epoch(self, epoch: int) -> None:
        """Before a probed epoch: keep the weights it starts from (its snapshot); nothing otherwise."""
        self.snapshot = copy.deepcopy(self.model) if self.due(epoch) else None

    def resumed(self, history: list[dict], run_dir: Path, start_epoch: int) -> None:
        """Re-derive what a resumed run's probe did so far from its files: the FLOPs count (the last recorded
        ``probe_flops``) and the per-layer rows of the epochs the checkpoint holds."""
        values = [row["probe_flops"] for row in history if _finite(row.get("probe_flops"))]
        self.flops = float(values[-1]) if values else 0.0
        path = run_dir / LAYERS_FILE
        if path.is_file():
            try:
                rows = pd.read_csv(path)
            except (pd.errors.EmptyDataError, pd.errors.ParserError):
                log.warning("%s is damaged; the probe's per-layer rows start afresh", path)
                return
            self.layer_rows = rows[rows["epoch"] <= start_epoch].to_dict("records") if "epoch" in rows else []

    def skipped(self) -> dict[str, float]:
        """The probe's columns on an epoch it did not run: NaN, and the FLOPs so far."""
        return {**{column: math.nan for column in COLUMNS}, "probe_flops": self.flops}

    def _active(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        mask = self.masks.get(name)
        return tensor.flatten() if mask is None else tensor[mask]

    def _gradients(self, model: nn.Module, loss_fn, batch) -> dict[str, torch.Tensor]:
        named = dict(model.named_parameters())
        params = [named[name] for name in self.layers]
        grads = torch.autograd.grad(loss_fn(model, *batch), params, allow_unused=True)
        return {name: self._active(name, torch.zeros_like(p) if g is None else g)
                for name, p, g in zip(self.layers, params, grads)}

    def _perturbed(self, model: nn.Module, generator: torch.Generator) -> nn.Module:
        """A copy of ``model`` with Gaussian noise of ``perturbation`` x each layer's active RMS on its active weights."""
        copy_ = copy.deepcopy(model).train(model.training)
        named = dict(copy_.named_parameters())
        scale = self.config.probe.perturbation
        with torch.no_grad():
            for name in self.layers:
                weight = named[name]
                mask = self.masks.get(name)
                active = weight if mask is None else weight[mask]
                rms = float(active.double().pow(2).mean().sqrt()) if active.numel() else 0.0
                noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype).to(weight.device)
                noise *= scale * rms
                weight.add_(noise if mask is None else noise * mask)
        return copy_

    def measure(self, objective: Objective, train: ImageSet, epoch: int, device: torch.device,
                counter: FlopsCounter | None = None, run_dir: Path | None = None,
                progress: bool = False) -> dict[str, float]:
        """The probe at the end of 0-based ``epoch`` (after :meth:`start_epoch` of the same epoch): metrics.csv's
        columns; the per-layer rows go to ``run_dir/probe_layers.csv`` (and :attr:`layer_rows`). ``progress``: a
        bar over the probe batches (an attacked batch and three gradients each: long on a CPU)."""
        result = self.probe(objective, train, epoch, device, counter, progress)
        self.layer_rows += result.layers
        if run_dir is not None:
            write_atomic(run_dir / LAYERS_FILE, pd.DataFrame(self.layer_rows).to_csv(index=False))
        return result.values

    def probe(self, objective: Objective, train: ImageSet, epoch: int, device: torch.device,
              counter: FlopsCounter | None = None, progress: bool = False) -> ProbeResult:
        """The measurements (see the module's text) without writing anything."""
        if self.snapshot is None:
            raise RuntimeError("GradientProbe.measure needs start_epoch() of the same epoch first")
        config = self.config
        size, count = config.data.batch_size, config.probe.batches
        data = in_memory(train.take(slice(0, size * count)), config.data.workers)
        loss_fn = _loss(objective)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.probe.seed * 1_000_003 + epoch)
            generator = torch.Generator().manual_seed(config.probe.seed * 1_000_003 + epoch)
            current = copy.deepcopy(self.model).train()
            snapshot = self.snapshot.train()
            perturbed = self._perturbed(current, generator)
            sums = {key: {name: 0.0 for name in (*self.layers, "all")} for key in ("perturbed", "cosine", "pearson")}
            current_losses, snapshot_losses, batches = [], [], 0
            starts = range(0, len(data), size)
            for start in progress_bar(starts, enabled=progress, desc="gradient probe", total=len(starts),
                                      unit="batch"):
                images = data.images[start:start + size].to(device).float().div_(255)
                labels = data.labels[start:start + size].to(device)
                if len(labels) < 2:
                    continue
                adversarial = objective.perturb(images, labels)  # against the model, its mode restored
                inputs = images if adversarial is None else adversarial
                batch = (images, labels, inputs)
                grads = self._gradients(current, loss_fn, batch)
                old = self._gradients(snapshot, loss_fn, batch)
                noisy = self._gradients(perturbed, loss_fn, batch)
                for name in self.layers:
                    sums["perturbed"][name] += pearson(grads[name], noisy[name])
                    sums["cosine"][name] += cosine(grads[name], old[name])
                    sums["pearson"][name] += pearson(grads[name], old[name])
                flat = [torch.cat([g[name] for name in self.layers]) for g in (grads, old, noisy)]
                sums["perturbed"]["all"] += pearson(flat[0], flat[2])
                sums["cosine"]["all"] += cosine(flat[0], flat[1])
                sums["pearson"]["all"] += pearson(flat[0], flat[1])
                pass_inputs = inputs if config.agent.full_grad_inputs is FullGradInputs.ADVERSARIAL else images
                with torch.no_grad():
                    current_losses.append(float(loss_fn(current, images, labels, pass_inputs)))
                    snapshot_losses.append(float(loss_fn(snapshot, images, labels, pass_inputs)))
                batches += 1
        if counter is not None:
            self.flops += self._flops(counter, batches * size)
        self.snapshot = None
        mean = {key: {name: value / batches if batches else math.nan for name, value in per.items()}
                for key, per in sums.items()}
        c_hat = estimate_c(current_losses, snapshot_losses) if batches >= 2 else math.nan
        values = {"probe_perturbed_correlation": mean["perturbed"]["all"], "probe_snapshot_cosine": mean["cosine"]["all"],
                  "probe_snapshot_correlation": mean["pearson"]["all"], "probe_c_hat": c_hat,
                  "probe_flops": self.flops}
        layers = [{"epoch": epoch + 1, "layer": name,
                   "density": float(self.masks[name].float().mean()) if name in self.masks else 1.0,
                   "perturbed_correlation": mean["perturbed"][name], "snapshot_cosine": mean["cosine"][name],
                   "snapshot_correlation": mean["pearson"][name]} for name in self.layers]
        log.info("probe (epoch %d): gradient correlation after perturbation %.4f; with the epoch's start: cosine "
                 "%.4f, correlation %.4f; c_hat %.4f", epoch + 1, values["probe_perturbed_correlation"],
                 values["probe_snapshot_cosine"], values["probe_snapshot_correlation"], c_hat)
        return ProbeResult(values, layers)

    def _flops(self, counter: FlopsCounter, examples: int) -> float:
        """The objective's attack, three losses with their gradients and two loss forwards per example, at the
        current masks."""
        loss = counter.loss
        return counter.cost(counter.attack + Passes(3 * loss.forwards + 2, 0, 3 * loss.training_backwards), examples)


def _loss(objective: Objective):
    def loss(model, images, labels, inputs):
        return objective.loss(model, images, labels, inputs)[0]

    return loss


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


__all__ = ["COLUMNS", "LAYERS_FILE", "GradientProbe", "ProbeResult", "cosine", "pearson"]
