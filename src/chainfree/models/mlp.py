"""Transformer MLP. Its two projections are plain nn.Linear attributes (`up`, `down`) so a method such as
BASIS can swap them for sketching layers without touching the model code."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from chainfree.nn.stacked import Params, batched_forward, sub_params

# call(name, submodule, x): how a block's body applies a submodule -- `module(x)` in the forward, the
# member-batched forward over the submodule's stacked parameters in `batched_forward`
Call = Callable[[str, nn.Module, torch.Tensor], torch.Tensor]


def plain_call(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def stacked_call(params: Params) -> Call:
    """The `Call` of a member-batched forward: submodule `name` runs over params['name.*'] [k, ...]."""
    return lambda name, module, x: batched_forward(module, sub_params(params, name + "."), x)


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.down = nn.Linear(hidden, d_model)

    def _body(self, x: torch.Tensor, call: Call) -> torch.Tensor:
        return call("down", self.down, call("act", self.act, call("up", self.up, x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._body(x, plain_call)

    def batched_forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """k stacked members at once (chainfree.nn.stacked): x [k, ..., d], params[name] [k, ...]."""
        return self._body(x, stacked_call(params))
