"""CharGRU: the character-level recurrent model of the HBLL-over-time experiments (model.kind='char_rnn').

Embedding -> one GRU layer -> linear readout; `run` exposes the start and end states so methods that cut
the recurrence into chunks (truncated BPTT, HBLL's time tree) can drive it chunk by chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CharGRU(nn.Module):
    """Embedding -> one GRU layer -> linear readout over bytes."""

    def __init__(self, vocab: int = 256, d: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.head = nn.Linear(d, vocab)
        self.d = d

    def run(self, ids: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs [B, T, d], final state [B, d]) from start state h0 [B, d] (zeros if None)."""
        out, hn = self.gru(self.embed(ids), None if h0 is None else h0.unsqueeze(0).contiguous())
        return out, hn.squeeze(0)

    def ce(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(out).reshape(-1, self.head.out_features).float(), targets.reshape(-1))

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Mean CE against targets, or the logits [B, T, vocab] without them (generation)."""
        out, _ = self.run(ids)
        return self.head(out) if targets is None else self.ce(out, targets)
