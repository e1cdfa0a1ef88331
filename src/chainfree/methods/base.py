"""The Method protocol: how a way of computing gradients plugs into the one training loop.

A method may change the model once (`prepare`: swap layers, inject an attention function, wrap blocks into
regions or a tree) and decides how one batch turns into `.grad` (`step`). It never touches the optimizer,
the schedule, logging or checkpoints: those belong to chainfree.train, shared by every method, so that
comparisons against exact backprop differ only in the gradient computation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class StepStats:
    """What one training step reports back to the loop (loss is the mean token CE of the batch)."""

    loss: float
    tokens: int
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class NoParams:
    """Config of a method without parameters."""


class Method:
    """Base class. Subclasses set `name` and `Config`, and override what they change."""

    name: ClassVar[str] = "base"
    Config: ClassVar[type] = NoParams
    # True when `step` is plain `loss.backward()` on the model's forward, so DDP can wrap the model.
    uses_autograd_step: ClassVar[bool] = True

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def prepare(self, model: nn.Module) -> nn.Module:
        """Adapt the model once, before the optimizer is built. Default: unchanged."""
        return model

    def step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        """Compute the loss of one batch and accumulate gradients into `.grad`."""
        loss = model(inputs, targets)
        loss.backward()
        return StepStats(loss=float(loss.detach()), tokens=targets.numel())

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy under the model this method trains (e.g. the LBI model for LBI)."""
        return model(inputs, targets)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.config)}
