"""FLOPs accounting, the way the RigL paper counts them (Evci et al. 2020, appendix H).

Dense per-layer counts come from ``torch.utils.flop_counter.FlopCounterMode`` on the dense model (one forward of
one example at the run's input shape, attributed to the conv/linear module that owns each weight; matmuls it
finds outside those modules are ``other`` and stay dense). Nothing is written per architecture. Like
FlopCounterMode, only matmuls and convolutions count (a multiply-add is 2 FLOPs): BatchNorm, activations, pooling,
the attack's projection and every other elementwise operation are left out. A transformer's attention matmuls,
q @ kᵀ and attn @ v (4·N²·D per layer for N tokens of width D), have no weight to mask: they are ``other``,
fused (F.scaled_dot_product_attention, :data:`ATTENTION_FORMULAS`) or not.

Conventions, per layer of dense forward cost ``D`` and density ``d`` (the mask's active fraction; 1 for a dense
layer):

* a **forward** costs ``d * D``;
* an **input-gradient backward** (what an attack step needs) costs ``d * D``;
* a **training backward** costs the input gradient plus the weight gradient, ``d * D + d * D``; a weight gradient
  the method needs dense (RigL's growth steps, SNFS's momentum, AST's regrowth: whenever the engine asks for the
  dense gradient) costs ``D``. The input gradient of the first layer, which autograd can skip, is counted too
  (RigL's "backward = 2x forward");
* ``other``, the matmuls between two activations (attention's), is dense, and each of its backward passes, an
  attack's as a training one, costs ``2 * D``: both operands need their gradient, as both depend on the input.

So one training step of PGD-AT with ``k`` attack steps costs ``(k+1)`` forward units, ``(k+1)`` input-gradient
units and one weight-gradient unit: ``(2k+3) x`` a forward for a dense CNN (natural training: 3x; a transformer's
attention, ``3(k+1) x`` its forward). TRADES pays
``k+1`` attack forwards (the clean probabilities, then ``k`` KL steps), ``k`` input-gradient backwards and two
training forwards and backwards (clean and adversarial branches). We count what the algorithm needs at its
densities, not what a dense-tensor implementation executes (masked weights are still multiplied here).

Every extra each method pays:

* RigL / SNFS / AST: the dense weight gradient on the steps the engine asks for it (above); AST's sub-nets each
  train at their own density on their own steps (the masks in use at each step are read after the step before);
* GSE: on each update step, the attack on its class-balanced score batch, one forward and one input-gradient
  backward on it (the layer outputs' gradients) and the candidate gradients, each candidate costing what one
  weight's gradient costs on that batch (a layer at or above GSE's dense threshold: its dense weight gradient);
* SET / ITOP: random growth and magnitude pruning, no extra FLOPs; BSR-Net: its Langevin noise is elementwise,
  O(parameters) per step, counted as none (as FlopCounterMode counts no elementwise operation);
* AGENT: per step, g_old, the objective's loss and its gradient on the snapshot for the same (adversarial)
  batch, at the snapshot's masks; per refresh, the g_tilde pass: each batch's attack (adversarial inputs), the
  loss forward, its gradient (when the pass computes one) and the previous snapshot's forward (the paper
  estimator). Its variance-ratio probe is a diagnostic and not counted.

Validation and the final test evaluation are counted apart (``val_flops``, ``eval_flops``) and never enter the
training cost: a clean forward of every example, then for each example classified correctly (the only ones
attacked) every restart's ``steps`` forwards and input-gradient backwards, the restart check's forwards and the
final forward. ``train_flops_vs_dense`` divides by the same training steps of the dense model with the same
objective and attack (dense PGD-AT for a PGD-AT run) and no method extras. Under torchrun the training batches
are the union of the ranks' shards; work that every rank repeats identically (GSE's score batch, validation) counts
once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from robust_sparse.config import FullGradInputs, ObjectiveName, TrainConfig
from robust_sparse.sparse.gse import GSEEngine
from robust_sparse.sparse.masker import Engine, SparseMasker, sparsifiable

if TYPE_CHECKING:
    from robust_sparse.agent import AGENT

log = logging.getLogger(__name__)

OTHER = "other"  # matmuls outside the conv/linear layers: always dense, no weight


@dataclass(frozen=True)
class DenseProfile:
    """Dense forward FLOPs of one example: per conv/linear weight (by parameter name) and the rest."""

    layers: dict[str, float]  # weight name -> forward FLOPs of one example
    numels: dict[str, int]  # weight name -> number of weights
    other: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.layers.values()) + self.other

    def forward(self, densities: dict[str, float] | None = None) -> float:
        """One example's forward at ``densities`` (layer -> density; a layer not named is dense)."""
        densities = densities or {}
        return sum(densities.get(name, 1.0) * flops for name, flops in self.layers.items()) + self.other

    def vector(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense counts as one float64 tensor: the layers in order, then ``other``."""
        return torch.tensor([*self.layers.values(), self.other], dtype=torch.float64, device=device)

    def names(self) -> list[str]:
        return [*self.layers, OTHER]


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Fused attention: q @ kᵀ and attn @ v, 2·N_q·N_k·d FLOPs each per (batch, head): per layer 4·N²·D for N
    tokens of width D, summed over the heads. (The softmax and the scaling are elementwise and not counted.)"""
    *batch_heads, queries, width = query_shape
    keys, value_width = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch_heads) * queries * keys * (width + value_width)


# FlopCounterMode knows the fused attention kernels of CUDA (flash, memory-efficient, cuDNN) but not the one
# F.scaled_dot_product_attention runs on a CPU, which timm's and torchvision's transformers call: without this its
# matmuls, a transformer's 'other', would count as nothing. (The unfused path, q @ k.transpose, counts as bmm.)
ATTENTION_FORMULAS = {op: _attention_flops for op in (
    getattr(torch.ops.aten, name, None) for name in ("_scaled_dot_product_flash_attention_for_cpu",
                                                      "_scaled_dot_product_fused_attention_overrideable"))
    if op is not None}


def dense_profile(model: nn.Module, input_shape: tuple[int, ...]) -> DenseProfile:
    """The dense model's forward FLOPs per layer for one example of ``input_shape`` (C, H, W), measured by
    FlopCounterMode (one eval-mode forward, no gradient; the model's mode is restored)."""
    parameter = next(model.parameters())
    weights = sparsifiable(model)  # every conv/linear weight, whether or not the run masks it
    owner = {name: name.rsplit(".", 1)[0] if "." in name else "" for name in weights}
    modes = {module: module.training for module in model.modules()}  # each its own (a frozen BatchNorm stays so)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter:
            model(torch.zeros((1, *input_shape), dtype=parameter.dtype, device=parameter.device))
    finally:
        for module, training in modes.items():
            module.training = training
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    layers = {}
    for name, module_name in owner.items():
        key = f"{prefix}.{module_name}" if module_name else prefix
        layers[name] = float(sum(counts.get(key, {}).values()))
    other = max(0.0, float(counter.get_total_flops()) - sum(layers.values()))
    return DenseProfile(layers, {name: weight.numel() for name, weight in weights.items()}, other)


def inference_flops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """One example's forward FLOPs of any model at its weights' zero pattern (a conv/linear weight's density is
    its fraction of non-zero entries), and that against the same model dense."""
    profile = dense_profile(model, input_shape)
    weights = sparsifiable(model)
    densities = {name: int(weights[name].count_nonzero()) / weights[name].numel() for name in profile.layers}
    flops = profile.forward(densities)
    return {"inference_flops": flops, "inference_flops_vs_dense": flops / profile.total if profile.total else math.nan}


@dataclass(frozen=True)
class Passes:
    """Passes over one batch: forwards, input-gradient backwards (attacks) and training backwards (input and
    weight gradients)."""

    forwards: int = 0
    input_backwards: int = 0
    training_backwards: int = 0

    def __add__(self, other: "Passes") -> "Passes":
        return Passes(self.forwards + other.forwards, self.input_backwards + other.input_backwards,
                      self.training_backwards + other.training_backwards)


def attack_passes(objective: ObjectiveName, steps: int) -> Passes:
    """The training attack on one batch: PGD's ``steps`` forward/backward pairs (one random start), TRADES' KL
    ascent likewise after one forward for the clean probabilities; none for natural training."""
    if objective is ObjectiveName.NATURAL:
        return Passes()
    return Passes(steps + (objective is ObjectiveName.TRADES), steps, 0)


def loss_passes(objective: ObjectiveName) -> Passes:
    """The training loss and its gradient on one batch (TRADES: a clean and an adversarial branch)."""
    branches = 2 if objective is ObjectiveName.TRADES else 1
    return Passes(branches, 0, branches)


def step_passes(objective: ObjectiveName, steps: int) -> Passes:
    """One training step: the attack, then the loss and its gradient."""
    return attack_passes(objective, steps) + loss_passes(objective)


def evaluation_passes(examples: int, attacked: int, steps: int, restarts: int, eps: float) -> float:
    """Forward-equivalents of a clean + PGD evaluation (``evaluate_pgd``): a clean forward of every example, then
    for each attacked one (correctly classified) every restart's ``steps`` forward/backward pairs, a forward per
    restart to check it (several restarts) and the final forward."""
    if eps == 0:
        return float(examples)
    per_attacked = restarts * steps * 2 + (restarts if restarts > 1 else 0) + 1
    return float(examples + attacked * per_attacked)


def passes_flops(passes: Passes, examples: float, forward: torch.Tensor, weight_grad: torch.Tensor,
                 second_operand: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, backward) FLOPs per layer of ``passes`` over ``examples`` examples, given one example's forward
    per layer (``forward``), its weight gradient per layer (``weight_grad``) and, for the matmuls between two
    activations (``other``), the gradient of their second operand, which every backward pass computes."""
    backward_passes = passes.input_backwards + passes.training_backwards
    forwards = forward * (passes.forwards * examples)
    backwards = forward * (backward_passes * examples) + weight_grad * (passes.training_backwards * examples)
    if second_operand is not None:
        backwards = backwards + second_operand * (backward_passes * examples)
    return forwards, backwards


# Engines that pay FLOPs of their own in a step, beyond the dense gradient they ask for through the masker's
# protocol: engine class -> cost(counter, engine, step) adding to the counter. Registered methods add theirs.
EngineExtra = Callable[["FlopsCounter", Engine, int], None]
ENGINE_EXTRAS: dict[type, EngineExtra] = {}


def _gse_extra(counter: "FlopsCounter", engine: GSEEngine, step: int) -> None:
    if not engine.is_update_step(step):
        return
    examples = float(getattr(engine, "last_score_examples", 0))
    forward = counter.in_use  # the masks the score batch was scored with (before the update)
    # the attack on the score batch, then the forward and the layer outputs' gradients
    counter.add_training(Passes(1, 1, 0) + counter.attack, examples, forward, torch.zeros_like(forward),
                         repeated=True)
    per_weight = counter.dense / counter.numels  # one weight's gradient on one example
    candidates = torch.zeros_like(counter.dense)
    for index, name in enumerate(counter.profile.layers):
        update = engine.last_update.get(name)
        if update is not None:
            candidates[index] = float(update["candidates"].numel())
    counter.backward += per_weight * candidates * examples


ENGINE_EXTRAS[GSEEngine] = _gse_extra


class FlopsCounter:
    """Training, validation and evaluation FLOPs of one run; the training loop calls :meth:`training_step`
    after every optimizer step, :meth:`agent_refresh` after AGENT's refresh and :meth:`validation` per view.

    Per-layer totals stay on the device (no host sync per step); :meth:`epoch_metrics` reads them.
    """

    def __init__(self, profile: DenseProfile, config: TrainConfig, masker: SparseMasker | None,
                 agent: "AGENT | None" = None, world_size: int = 1) -> None:
        self.profile, self.config, self.masker, self.agent = profile, config, masker, agent
        self.world_size = world_size
        device = next(iter(masker.masks.values())).device if masker is not None else torch.device("cpu")
        self.dense = profile.vector(device)
        # the weightless 'other' entry divides by 1 and never has a weight gradient
        self.numels = torch.tensor([*profile.numels.values(), 1], dtype=torch.float64, device=device)
        self._has_weight = torch.tensor([1.0] * len(profile.layers) + [0.0], dtype=torch.float64, device=device)
        self._two_activations = 1.0 - self._has_weight  # 'other': both operands' gradients in every backward
        self.attack = attack_passes(config.objective, config.attack.steps)
        self.loss = loss_passes(config.objective)
        self.per_step = step_passes(config.objective, config.attack.steps)
        self.forward = torch.zeros_like(self.dense)  # training FLOPs per layer, forward passes
        self.backward = torch.zeros_like(self.dense)  # and backward passes
        self.dense_train = 0.0  # the same steps of the dense model, without method extras
        self.validation_flops = 0.0
        self.complete = True  # False: resumed from a checkpoint written before FLOPs were counted
        self._cache: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self.in_use = self.forward_per_example(masker.masks if masker is not None else {})

    # ---- densities ------------------------------------------------------------------------------------

    def forward_per_example(self, masks: dict[str, torch.Tensor], key: str = "model") -> torch.Tensor:
        """One example's forward per layer at ``masks`` (a device tensor; recomputed only when a mask tensor
        was replaced, which is how engines change the topology)."""
        tensors = [masks[name] for name in self.profile.layers if name in masks]
        cached = self._cache.get(key)
        if cached is not None and len(cached[0]) == len(tensors) and all(a is b for a, b in zip(cached[0], tensors)):
            return cached[1]
        density = torch.ones_like(self.dense)
        for index, name in enumerate(self.profile.layers):
            if name in masks:
                density[index] = masks[name].sum().double() / masks[name].numel()
        value = density * self.dense
        self._cache[key] = (tensors, value)
        return value

    def inference(self, masks: dict[str, torch.Tensor]) -> float:
        """One example's forward FLOPs at ``masks`` (host value)."""
        return float(self.forward_per_example(masks, key="inference").sum())

    # ---- accumulation ---------------------------------------------------------------------------------

    def add_training(self, passes: Passes, examples: float, forward: torch.Tensor, weight_grad: torch.Tensor,
                     repeated: bool = False) -> None:
        """``passes`` over ``examples`` examples (per rank, times the world size unless every rank ``repeated``
        the same work) into the training totals."""
        scale = examples if repeated else examples * self.world_size
        forwards, backwards = passes_flops(passes, scale, forward, weight_grad, forward * self._two_activations)
        self.forward += forwards
        self.backward += backwards

    def cost(self, passes: Passes, examples: float) -> float:
        """FLOPs of ``passes`` over ``examples`` examples at the current masks, not added to any total (work
        that observes the run, such as the gradient probe)."""
        forwards, backwards = passes_flops(passes, examples, self.in_use, self.in_use * self._has_weight,
                                           self.in_use * self._two_activations)
        return float((forwards + backwards).sum())

    def training_step(self, examples: int, previous_gradient: bool = False) -> None:
        """One optimizer step over a batch of ``examples`` (this rank's), with the masks the step used;
        ``previous_gradient``: the optimizer (MVR) also took the loss's gradient at the previous weights."""
        masker, agent = self.masker, self.agent
        forward = self.in_use
        dense_grad = masker is not None and masker.engine.wants_dense_grad(masker.step)
        weight_grad = self.dense * self._has_weight if dense_grad else forward * self._has_weight
        self.add_training(self.per_step, examples, forward, weight_grad)
        if agent is not None and agent.active():  # g_old: the snapshot's loss and gradient on the same batch
            snapshot = self.forward_per_example(agent.snapshot_masks, key="snapshot")
            self.add_training(self.loss, examples, snapshot, snapshot * self._has_weight)
        if previous_gradient:  # MVR: the loss and its gradient at the previous weights (the same masks)
            self.add_training(self.loss, examples, forward, forward * self._has_weight)
        if masker is not None:
            extra = ENGINE_EXTRAS.get(type(masker.engine))
            if extra is not None:
                extra(self, masker.engine, masker.step)
            self.in_use = self.forward_per_example(masker.masks)  # what the next step trains
        step, dense_forward, dense_weights = self.per_step, self.profile.total, sum(self.profile.layers.values())
        backward_passes = step.input_backwards + step.training_backwards
        self.dense_train += examples * self.world_size * (
            (step.forwards + backward_passes) * dense_forward + step.training_backwards * dense_weights
            + backward_passes * self.profile.other)

    def agent_refresh(self, agent: "AGENT") -> None:
        """AGENT's g_tilde pass of the refresh that just ran (``agent.last_pass``), at the new snapshot's masks
        (the views' batches shared out evenly)."""
        record = agent.last_pass
        if record is None or record.batches == 0:
            return
        views = agent.subnet_snapshot_masks
        forward = sum(self.forward_per_example(masks, key=f"refresh{k}") for k, masks in enumerate(views)) / len(views)
        passes = Passes(self.loss.forwards * (1 + record.previous_forward), 0,
                        self.loss.training_backwards if record.gradient else 0)
        if self.config.agent.full_grad_inputs is not FullGradInputs.CLEAN:
            passes = passes + self.attack
        self.add_training(passes, record.batches * self.config.data.batch_size, forward, forward * self._has_weight)

    def validation(self, masks: dict[str, torch.Tensor], examples: int, clean_accuracy: float) -> None:
        """One view's validation (clean forward, PGD on the correctly classified examples)."""
        config = self.config
        self.validation_flops += self.evaluation(masks, examples, clean_accuracy, config.val.pgd_steps, 1,
                                                 config.attack.eps)

    def evaluation(self, masks: dict[str, torch.Tensor], examples: int, clean_accuracy: float, steps: int,
                   restarts: int, eps: float) -> float:
        """FLOPs of a clean + PGD evaluation of ``examples`` examples at ``masks``."""
        attacked = round(clean_accuracy * examples)
        backwards = attacked * restarts * steps if eps else 0  # each pays the attention's second operand too
        return (evaluation_passes(examples, attacked, steps, restarts, eps) * self.inference(masks)
                + backwards * self.profile.other)

    def evaluation_fields(self, masks: dict[str, torch.Tensor], row: dict[str, Any]) -> dict[str, Any]:
        """The FLOPs fields of one evaluated network (``row``: its eval.json fields): the run's training cost,
        its inference cost at ``masks`` (both against dense) and the cost of this evaluation."""
        cost = self.evaluation(masks, row["n_examples"], row["clean_accuracy"], row["pgd_steps"], row["restarts"],
                               row["eps"])
        return {**self.summary(masks), "eval_flops": cost}

    # ---- reading ----------------------------------------------------------------------------------------

    @property
    def train_flops(self) -> float:
        return float((self.forward + self.backward).sum()) if self.complete else math.nan

    def epoch_metrics(self) -> dict[str, float]:
        """metrics.csv's FLOPs columns: cumulative training and validation FLOPs, the training ratio to dense,
        and one example's forward at the current masks (of the first view) against dense."""
        masks = self.masker.views()[0].masks if self.masker is not None else {}
        train = self.train_flops
        ratio = train / self.dense_train if self.dense_train else math.nan
        return {"train_flops": train, "train_flops_vs_dense": ratio,
                "val_flops": self.validation_flops if self.complete else math.nan,
                "inference_flops_vs_dense": self.inference(masks) / self.profile.total}

    def summary(self, masks: dict[str, torch.Tensor]) -> dict[str, float | None]:
        """eval.json's FLOPs fields, for the network of ``masks`` (None where the run's count is incomplete)."""
        inference = self.inference(masks)
        known = self.complete and self.dense_train > 0
        return {"train_flops": self.train_flops if known else None,
                "dense_train_flops": self.dense_train if known else None,
                "train_flops_vs_dense": self.train_flops / self.dense_train if known else None,
                "inference_flops": inference, "dense_inference_flops": self.profile.total,
                "inference_flops_vs_dense": inference / self.profile.total,
                "val_flops": self.validation_flops if self.complete else None}

    def layer_table(self) -> pd.DataFrame:
        """Training FLOPs per layer (forward and backward passes) and one example's dense forward."""
        return pd.DataFrame({"layer": self.profile.names(), "dense_forward_flops": self.dense.tolist(),
                             "train_forward_flops": self.forward.tolist(),
                             "train_backward_flops": self.backward.tolist()})

    def describe(self, masks: dict[str, torch.Tensor]) -> str:
        """The line fit logs at the end: training and inference FLOPs against dense."""
        summary = self.summary(masks)
        train = ("training FLOPs unknown (resumed from a run that did not count them)" if summary["train_flops"] is None
                 else f"training {summary['train_flops']:.3e} FLOPs ({summary['train_flops_vs_dense']:.3f}x dense "
                      f"{self.config.objective.value})")
        return (f"{train}; inference {summary['inference_flops']:.3e} FLOPs per example "
                f"({summary['inference_flops_vs_dense']:.3f}x dense)")

    # ---- persistence ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"forward": self.forward.cpu(), "backward": self.backward.cpu(), "dense_train": self.dense_train,
                "validation": self.validation_flops, "complete": self.complete}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the totals (None: a checkpoint from before FLOPs were counted; the totals stay unknown); the
        masks in use are read afresh (the masker has just loaded its own)."""
        if state is None:
            log.warning("this checkpoint holds no FLOPs count: train_flops is unknown for this run")
            self.complete = False
        else:
            self.forward = state["forward"].to(self.dense)
            self.backward = state["backward"].to(self.dense)
            self.dense_train, self.validation_flops = float(state["dense_train"]), float(state["validation"])
            self.complete = bool(state["complete"])
        self._cache.clear()
        self.in_use = self.forward_per_example(self.masker.masks if self.masker is not None else {})
