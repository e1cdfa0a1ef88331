"""TrainState: everything that changes while a run trains, in one object the Trainer passes around."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TrainState:
    """model: the prepared model (parameters, eval, checkpoints); step_model: what `method.step`
    receives (a DDP wrapper of `model`, or `model` itself); step: optimizer steps taken so far."""

    model: nn.Module
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    last_val: float = float("nan")
    step_times: list[float] = field(default_factory=list)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]
