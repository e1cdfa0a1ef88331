"""Transformer MLP. Its two projections are plain nn.Linear attributes (`up`, `down`) so a method such as
BASIS can swap them for sketching layers without touching the model code."""

from torch import nn


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.down = nn.Linear(hidden, d_model)

    def forward(self, x):
        return self.down(self.act(self.up(x)))
