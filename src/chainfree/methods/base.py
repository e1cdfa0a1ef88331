"""The Method protocol: how a way of computing gradients plugs into the one Trainer.

A method may change the model once (`prepare`: swap layers, inject an attention function, wrap blocks
into regions or a tree), decides how one batch turns into `.grad` (`step`), how its model is scored
(`eval_loss`) and how it wants to be distributed over the ranks of a launch (`strategy`). It never
touches the optimizer, the schedule, gradient accumulation, logging or checkpoints: those belong to
chainfree.training, shared by every method, so a comparison against exact backprop differs only in the
gradient computation.

`Method` is a `typing.Protocol`: any object with these members trains. Subclassing it explicitly (as
the bundled methods do) inherits the defaults below: exact autograd through `model(inputs, targets)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class StepStats:
    """What one step reports: the mean token CE of the batch, the tokens it covered, method-specific
    numbers (`extra`); the Trainer fills in the learning rate and gradient norm of its optimizer step."""

    loss: float
    tokens: int
    extra: dict[str, float] = field(default_factory=dict)
    lr: float | None = None
    grad_norm: float | None = None


@dataclass
class NoParams:
    """Config of a method without parameters."""


@dataclass(frozen=True)
class Launch:
    """The process layout of this run: torchrun's RANK / WORLD_SIZE / LOCAL_RANK (1 process otherwise)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@runtime_checkable
class Method(Protocol):
    """A gradient method. Members:

    name, Config      registry name and the dataclass of its `method.<key>` settings (validated once,
                      when the method is built from a config)
    uses_autograd_step  True when `step` is `loss.backward()` through the model's forward, so wrappers
                      that hook autograd (DDP, FSDP2, whole-model torch.compile) apply
    prepare(model)    adapt the model once, before the optimizer is built; returns the model to train
    step(model, x, y) loss of one (micro-)batch, gradients accumulated into `.grad`
    eval_loss(...)    mean token cross-entropy of the model this method trains, without gradients
    strategy(launch)  name of the distribution strategy it wants for this launch (chainfree.training)
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type] = NoParams
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

    def strategy(self, launch: Launch) -> str:
        """The strategy for `launch` when train.strategy is 'auto': one process -> 'single', several ->
        'ddp' (data parallel; gradients averaged by DDP hooks or, for a method with its own backward,
        by one all-reduce after the step)."""
        return "ddp" if launch.distributed else "single"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.config)}
