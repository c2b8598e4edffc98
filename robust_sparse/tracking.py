"""Optional experiment tracking: TensorBoard event files and Weights & Biases, fed by the training loop.

``tracking: {tensorboard: true}`` writes under ``<run dir>/tensorboard`` (offline; ``tensorboard --logdir runs``);
``tracking: {wandb: {project: NAME}}`` logs to W&B (``mode: offline`` writes under the run directory for a later
``wandb sync``). Both receive every numeric per-epoch metric (``metrics.csv``'s columns), the resolved config and
the final test evaluation; TensorBoard also plots the validation accuracies against the cumulative training FLOPs
(``vs_train_flops/*``, the FLOPs as the step). A resumed run logs to the same W&B run: its id is kept in
``<run dir>/tracking.json``.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any

from robust_sparse.checkpoint import write_atomic
from robust_sparse.config import TrackingConfig, TrainConfig, to_dict
from robust_sparse.errors import ConfigError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
STATE_FILE = "tracking.json"


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (booleans as 0/1; NaN, text and nested values left out)."""
    values = {}
    for key, value in row.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values[key] = float(value)
    return values


def check_trackers(tracking: TrackingConfig) -> None:
    """The trackers' packages are optional: a missing one is a one-line error before any data is read (``fit``
    runs this first), not when a config is read, so a checkpoint trained with tracking evaluates without them."""
    from importlib.util import find_spec

    install = "pip install 'robust-sparse[tracking]'"
    if tracking.tensorboard and find_spec("tensorboard") is None:
        raise ConfigError(f"tracking.tensorboard = true needs the tensorboard package ({install})")
    if tracking.wandb.project is not None and find_spec("wandb") is None:
        raise ConfigError(f"tracking.wandb.project = {tracking.wandb.project!r} needs the wandb package ({install})")


class Tracker:
    """Fans the training loop's records out to the configured trackers; a no-op when none is."""

    def __init__(self, tracking: TrackingConfig, config: TrainConfig, run_dir: Path) -> None:
        self.tensorboard = self.wandb_run = None
        if tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
            self.tensorboard.add_text("config", "```yaml\n" + json.dumps(to_dict(config), indent=2) + "\n```")
        if tracking.wandb.project is not None:
            import wandb

            state_path = run_dir / STATE_FILE
            state = json.loads(state_path.read_text()) if state_path.is_file() else {}
            run_id = state.get("wandb_id") or uuid.uuid4().hex[:12]
            write_atomic(state_path, json.dumps({**state, "wandb_id": run_id}))
            self.wandb_run = wandb.init(project=tracking.wandb.project, entity=tracking.wandb.entity,
                                        mode=tracking.wandb.mode.value, dir=str(run_dir), id=run_id, resume="allow",
                                        name=run_dir.name, config=to_dict(config))
        if self.tensorboard or self.wandb_run:
            log.info("tracking: %s", ", ".join(name for name, on in (("TensorBoard", self.tensorboard),
                                                                      ("W&B", self.wandb_run)) if on))

    def epoch(self, row: dict[str, Any]) -> None:
        step, values = int(row["epoch"]), _scalars(row)
        if self.tensorboard is not None:
            for key, value in values.items():
                if key != "epoch":
                    self.tensorboard.add_scalar(f"epoch/{key}", value, step)
            if "train_flops" in values:  # accuracy against cost: robust_sparse.flops
                for key in ("val_clean_accuracy", "val_pgd_accuracy"):
                    self.tensorboard.add_scalar(f"vs_train_flops/{key}", values[key], int(values["train_flops"]))
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({f"epoch/{key}": value for key, value in values.items()}, step=step)

    def final(self, evaluation: dict[str, Any]) -> None:
        values = _scalars({key: value for key, value in evaluation.items() if key != "epoch"})
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"test/{key}", value, int(evaluation.get("epoch", 0)))
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.summary.update({f"test/{key}": value for key, value in values.items()})

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
