"""How the training step runs on the device: mixed precision, memory format, compilation (``train:`` config).

``train.precision`` autocasts the *model's forwards* only: the training forward (the objective's loss), the
training attack's forwards (through :attr:`Attack.autocast <robust_sparse.attacks.base.Attack>`), AGENT's
snapshot and large-batch passes, and validation. Everything else stays fp32: weights, gradients, optimizer
state and masks; the attack's perturbation, ascent step, projection onto the eps-ball and the [0, 1] box
(``images + delta`` is formed outside the autocast region, and the logits are cast back to fp32 before any
loss); cross-entropy and KL are fp32 under autocast in any case.

fp16 needs a GradScaler, and needs CUDA: on the CPU use bf16 (same exponent range as fp32, so no scaler).
Under fp16 the loss is scaled before every backward, AGENT's ``g_old`` is taken from the equally scaled
snapshot loss, and the correction is applied in the scaled space (``g_tilde`` times the same scale) before the
scaler unscales, checks and steps, so an overflow in either gradient skips the step. The masker's dense
gradients (RigL's growth criterion) are unscaled before the engine sees them.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from robust_sparse.config import Precision
from robust_sparse.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


class Amp:
    """Autocast (and, for fp16, a GradScaler) for one device.

    ``scaler`` overrides the GradScaler (tests use a fixed power-of-two scale with fp32, where scaling is exact).
    """

    def __init__(self, precision: Precision | str, device: torch.device, *, where: str = "train.precision",
                 channels_last: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        self.precision = Precision(precision)
        self.device = torch.device(device)
        if self.precision is Precision.FP16 and self.device.type != "cuda":
            raise UserError(f"{where} = fp16: needs a CUDA device (fp16 autocast with a GradScaler); use bf16 "
                            f"on {self.device.type}")
        self.dtype = DTYPES.get(self.precision)
        self.channels_last = channels_last
        if scaler is None and self.precision is Precision.FP16:
            scaler = torch.amp.GradScaler(self.device.type)
        self.scaler = scaler
        self._one: torch.Tensor | None = None

    def autocast(self) -> AbstractContextManager:
        """The context for a model forward (fp32: no-op)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale(self) -> torch.Tensor | None:
        """The GradScaler's current scale as a device tensor (no host sync), or None without a scaler."""
        if self.scaler is None:
            return None
        if self._one is None:
            self._one = torch.ones((), device=self.device)
        return self.scaler.scale(self._one)

    def format(self, images: torch.Tensor) -> torch.Tensor:
        """A batch in the model's memory format."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


class CompiledWithFallback(nn.Module):
    """``torch.compile(module)``, running ``module`` eagerly from the first compilation failure on.

    torch.compile compiles lazily, at a forward (and again when a guard fails, e.g. train vs eval mode), so a
    failure shows only there: it is logged once, in one line, and that forward and all later ones run eagerly.
    An error of the model itself is raised again by the eager forward.
    """

    def __init__(self, module: nn.Module, compiled: Any) -> None:
        super().__init__()
        self.module = module
        self.compiled = compiled
        self.failed = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any compiler failure; the eager call re-raises model errors
                self.failed = True
                log.warning("train.compile: torch.compile failed (%s: %s); continuing in eager mode",
                            type(error).__name__, _first_line(error))
        return self.module(*args, **kwargs)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "no message"


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    """``module`` itself, or its compiled forward with the eager fallback (state dicts stay ``module``'s)."""
    if not enabled:
        return module
    try:
        compiled = torch.compile(module)
    except Exception as error:  # noqa: BLE001 - e.g. no compiler backend for this Python or platform
        log.warning("train.compile: torch.compile is unavailable (%s: %s); training in eager mode",
                    type(error).__name__, _first_line(error))
        return module
    return CompiledWithFallback(module, compiled)


__all__ = ["Amp", "CompiledWithFallback", "DTYPES", "maybe_compile"]
