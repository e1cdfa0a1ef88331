"""VisionNet: a residual MLP classifier with the LanguageModel's surface (embed -> blocks -> norm -> head),
so methods that wrap `.blocks` (HBLL, flat block-local) train it unchanged. Pre-LN residual blocks make
depth sweeps (N = 8..64 layers) trainable by plain backprop, the baseline."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from chainfree.models.mlp import MLP, Call, plain_call, stacked_call
from chainfree.nn.stacked import Params


class ResidualMLPBlock(nn.Module):
    """x + MLP(LN(x)): one layer of the network."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = MLP(d, hidden)

    def _body(self, x: torch.Tensor, call: Call) -> torch.Tensor:
        return x + call("mlp", self.mlp, call("ln", self.ln, x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._body(x, plain_call)

    def batched_forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """k stacked members at once (chainfree.nn.stacked): x [k, B, d], params[name] [k, ...]."""
        return self._body(x, stacked_call(params))


class VisionNet(nn.Module):
    def __init__(self, in_features: int, n_classes: int, d: int = 256, n_layers: int = 8, hidden: int = 0) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, d)
        self.blocks = nn.ModuleList(ResidualMLPBlock(d, hidden or 2 * d) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear) and name.endswith("down"):
                nn.init.normal_(mod.weight, std=0.02 / math.sqrt(2 * n_layers))
                nn.init.zeros_(mod.bias)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x)
        for block in self.blocks:
            z = block(z)
        return self.norm(z)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(h).float(), targets)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(x)
        return self.head(h) if targets is None else self.loss(h, targets)
