"""Optional experiment tracking: TensorBoard event files and Weights & Biases, fed by the training loop.

``tracking: {tensorboard: true}`` writes under ``<run dir>/tensorboard`` (offline; ``tensorboard --logdir runs``);
``tracking: {wandb: {project: NAME}}`` logs to W&B (``mode: offline`` writes under the run directory for a later
``wandb sync``). Both receive every numeric per-epoch metric (``metrics.csv``'s columns), the resolved config (as
YAML) and the final test accuracies; the evaluation's settings (points, eps, steps) go with the config, not into
the scalars. TensorBoard also plots the validation accuracies against the cumulative training FLOPs
(``vs_train_flops/*``, the FLOPs as the step); ``tracking.step_loss`` adds the training loss of every step to
TensorBoard. A resumed run logs to the same W&B run: its id is kept in ``<run dir>/tracking.json``.

Every tracked run gives TensorBoard its hyper-parameters (the method, density, AGENT's estimator and γ, the
objective and seed, and in a sweep every swept key) against its final accuracies, for the HParams dashboard. A
run of a sweep (``<sweep dir>/runs/<run id>`` beside ``sweep.yaml``) joins the W&B group of its sweep, the sweep
folder's name and a hash of its absolute path (:func:`sweep_group`: two sweeps in folders of one name stay apart),
tagged with its swept ``key=value`` pairs spelled as its run name spells them (robust_sparse.config.spell);
``tracking.wandb.group`` sets the group of any run instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from robust_sparse.files.atomic import write_atomic
from robust_sparse.config import TrackingConfig, TrainConfig, spell, to_dict
from robust_sparse.config.schema import GAMMA_KEY
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


# always in the hyper-parameters of a sweep run, swept or not: what a reader filters a gamma sweep by
HPARAM_FIELDS = ("sparsity.method", "sparsity.density", "agent.enabled", "agent.estimator", GAMMA_KEY,
                 "objective", "seed")
SETTINGS = ("n_examples", "eps", "pgd_steps", "restarts", "epoch")  # of the final evaluation: not metrics
MAX_TAG = 64  # W&B's limit on a tag's length


def _final_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """The final evaluation's measurements (accuracies, seconds), without the settings it ran with."""
    return _scalars({key: value for key, value in evaluation.items() if key not in SETTINGS})


def _field(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _hparam(value: Any) -> Any:
    """A value TensorBoard's HParams accepts: numbers, text and booleans as they are, anything else as YAML."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return "none" if value is None else value
    return yaml.safe_dump(value, default_flow_style=True).strip()


def sweep_group(sweep_dir: Path) -> str:
    """The W&B group of a sweep's runs: the folder's name (what a reader recognises) and a short hash of its
    absolute path (what tells ``a/gamma`` from ``b/gamma``), ``gamma-1a2b3c4d``."""
    digest = hashlib.sha256(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:8]
    # the name cut to 100 characters keeps the group inside tracking.wandb.group's limit (config.validation)
    return f"{Path(sweep_dir).resolve().name[:100]}-{digest}"


def sweep_context(run_dir: Path) -> tuple[str, list[str]] | None:
    """(W&B group, swept keys) when ``run_dir`` is a run of a sweep directory, else None. The swept keys are
    the grid's and the random space's, read from the sweep's own ``sweep.yaml``."""
    sweep_dir = run_dir.parent.parent
    if run_dir.parent.name != "runs" or not (sweep_dir / "sweep.yaml").is_file():
        return None
    try:
        data = yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    keys = [*(data.get("grid") or {}), *((data.get("random") or {}).get("space") or {})]
    return sweep_group(sweep_dir), [str(k) for k in keys]


def hyperparameters(config: dict[str, Any], swept: list[str]) -> dict[str, Any]:
    """The run's swept keys and :data:`HPARAM_FIELDS`, ``dotted.key -> value``."""
    return {key: _hparam(_field(config, key)) for key in dict.fromkeys([*swept, *HPARAM_FIELDS])}


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
        self.step_loss = tracking.step_loss
        resolved = to_dict(config)
        context = sweep_context(run_dir)
        swept = context[1] if context else []
        self.hparams = hyperparameters(resolved, swept)  # a single run's too: HParams compares runs of any origin
        if tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
            self.tensorboard.add_text("config", "```yaml\n" + yaml.safe_dump(resolved, sort_keys=False) + "```")
        if tracking.wandb.project is not None:
            import wandb

            state_path = run_dir / STATE_FILE
            state = json.loads(state_path.read_text()) if state_path.is_file() else {}
            run_id = state.get("wandb_id") or uuid.uuid4().hex[:12]
            write_atomic(state_path, json.dumps({**state, "wandb_id": run_id}))
            group = tracking.wandb.group or (context[0] if context else None)
            self.wandb_run = wandb.init(project=tracking.wandb.project, entity=tracking.wandb.entity,
                                        mode=tracking.wandb.mode.value, dir=str(run_dir), id=run_id, resume="allow",
                                        name=run_dir.name, config=resolved,
                                        **({"group": group} if group else {}),
                                        **({"tags": self._tags(resolved, swept)} if context else {}))
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

    @staticmethod
    def _tags(config: dict[str, Any], swept: list[str]) -> list[str]:
        """``key=value`` per swept key, the value spelled as the run's name spells it (``agent.gamma=0``)."""
        return [f"{key}={spell(_field(config, key))}"[:MAX_TAG] for key in swept]

    def step_logger(self, epoch: int, steps_per_epoch: int) -> Callable[[int, Any], None] | None:
        """With ``tracking.step_loss`` and TensorBoard on, the ``on_step`` callback of epoch ``epoch`` (0-based)
        that logs each step's training loss at its global step; else None (no per-step sync). TensorBoard only:
        W&B's run step is the epoch (``epoch()`` logs with ``step=epoch``), and a per-step record would move it."""
        if not self.step_loss or self.tensorboard is None:
            return None

        def log_step(step: int, loss: Any) -> None:
            self.tensorboard.add_scalar("step/train_loss", float(loss), epoch * steps_per_epoch + step)

        return log_step

    def final(self, evaluation: dict[str, Any]) -> None:
        values = _final_metrics(evaluation)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"test/{key}", value, int(evaluation.get("epoch", 0)))
            self._write_hparams(values)
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.summary.update({f"test/{key}": value for key, value in values.items()})

    def _write_hparams(self, values: dict[str, float]) -> None:
        """The HParams dashboard's record of this run, in its own event file: its hyper-parameters against the
        final metrics (the ``test/...`` scalars just logged, which the dashboard reads by tag)."""
        from torch.utils.tensorboard.summary import hparams

        experiment, start, end = hparams(self.hparams, {f"test/{key}": value for key, value in values.items()})
        writer = self.tensorboard._get_file_writer()
        for summary in (experiment, start, end):
            writer.add_summary(summary)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
