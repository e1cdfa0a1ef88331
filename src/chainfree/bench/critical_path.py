"""The critical path of exact backprop, counted: the baseline for the critical paths that chainfree's
local methods (HBLL, flat block-local) report from their own steps."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def count_exact_critical_path(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Sequential layer evaluations of one exact-backprop step, counted with forward and backward hooks on
    the residual blocks (every one of them is on the single dependency chain). Leaves the gradients in
    `.grad`; zero them if the step is not meant to train."""
    count = [0]

    def bump(*_args):
        count[0] += 1

    handles = []
    for block in model.blocks:
        handles.append(block.register_forward_hook(bump))
        handles.append(block.register_full_backward_hook(bump))
    try:
        loss = loss_fn(model, inputs, targets) if loss_fn else model(inputs, targets)
        loss.backward()
    finally:
        for hnd in handles:
            hnd.remove()
    return count[0]
