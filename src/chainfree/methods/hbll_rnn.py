"""HBLL over time: a character GRU trained with a tree over time chunks instead of backprop through time.

The chain that HBLL breaks is now the recurrence: the state h_b at the start of chunk b depends on all
earlier chunks, so backprop through time (BPTT) has a critical path of T sequential cell steps, and even
truncated BPTT (TBPTT: chunks in order, state carried forward detached) needs K = T / chunk sequential
chunk evaluations. Our time-tree (SPEC section 4, last bullet; our construction, the paper's RNN variant
was not available):

  * leaves = the K chunks (K a power of two); leaf b runs the model's GRU over its chunk from an
    *estimated* detached start state m_b and is trained by its own next-character CE (the local
    likelihood term of the ELBO; every chunk has targets, so no top-down message is needed here).
  * node (l, k) over chunks [k 2^l, (k+1) 2^l) owns a shortcut S_v(h, x_span): a GRU of the same width
    run over only the LAST `window` characters of the span, starting from h. It is trained by
    distillation onto the span's last leaf's end state (fixed-point consistency, as in the depth tree).
  * start states by binary decomposition of b (b = 6 = 4 + 2: S_[0,4) then S_[4,6)): log2 K rounds of
    shortcut evaluations of `window` steps each, then all leaves in parallel (batched along the batch
    axis: the K chunks become K * batch independent sequences in one GRU call).

Critical path per step, in sequential GRU cell steps (counted in `TimeTree.step`):
log2 K * window (prefix) + chunk (leaf forward) + max(chunk, window) (local backward), against 2 T for
BPTT and TBPTT. Every method sees the same batches and processes the same characters forward and
backward once (equal compute up to HBLL's shortcut overhead, which is reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chainfree.errors import ConfigError


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

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out, _ = self.run(ids)
        return self.ce(out, targets)


def bptt_step(model: CharGRU, ids: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Full backprop through time: critical path T forward + T backward cell steps."""
    loss = model(ids, targets)
    loss.backward()
    return {"loss": float(loss.detach()), "critical_path": 2.0 * ids.shape[1]}


def tbptt_step(model: CharGRU, ids: torch.Tensor, targets: torch.Tensor, chunk: int) -> dict[str, float]:
    """Truncated BPTT: chunks in order, state carried forward detached; gradients of all chunks summed
    (scaled so the total is the mean CE). Critical path: every chunk forward in sequence, then the last
    chunk's backward can only start after its forward: T + chunk (backward of chunks overlap forwards)."""
    T = ids.shape[1]
    if T % chunk:
        raise ConfigError(f"sequence length {T} must be a multiple of chunk={chunk}")
    h, total = None, 0.0
    for s in range(0, T, chunk):
        out, h = model.run(ids[:, s : s + chunk], h)
        loss = model.ce(out, targets[:, s : s + chunk]) * (chunk / T)
        loss.backward()
        total += float(loss.detach())
        h = h.detach()
    return {"loss": total, "critical_path": float(T + chunk)}


@dataclass
class TimeTreeConfig:
    chunk: int = 32  # characters per leaf; T / chunk must be a power of two
    window: int = 16  # characters each shortcut reads (the last `window` of its span)
    shortcut_weight: float = 1.0  # distillation of shortcut end states onto leaf end states


class TimeTree(nn.Module):
    """A CharGRU plus one shortcut GRU per tree node over time chunks."""

    def __init__(self, model: CharGRU, cfg: TimeTreeConfig, seq_len: int) -> None:
        super().__init__()
        if seq_len % cfg.chunk:
            raise ConfigError(f"seq_len={seq_len} must be a multiple of chunk={cfg.chunk}")
        k = seq_len // cfg.chunk
        if k < 2 or k & (k - 1):
            raise ConfigError(f"seq_len / chunk = {k} must be a power of two >= 2; change chunk or seq_len")
        if not 1 <= cfg.window <= cfg.chunk:
            raise ConfigError(f"window={cfg.window} must be in [1, chunk={cfg.chunk}]")
        self.model, self.cfg, self.n_chunks, self.levels = model, cfg, k, int(math.log2(k))
        self.nodes = [(lv, j) for lv in range(self.levels) for j in range(0, k >> lv, 2)]  # left children
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.shortcuts = nn.ModuleList(nn.GRU(model.d, model.d, batch_first=True) for _ in self.nodes)
        for sc in self.shortcuts:
            sc.load_state_dict(model.gru.state_dict())

    def shortcut(self, node: tuple[int, int], h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """End state of node's span from start state h, reading the span's last `window` characters."""
        lv, j = node
        c, w = self.cfg.chunk, self.cfg.window
        end = (j + 1) * (c << lv)
        x = self.model.embed(ids[:, end - w : end]).detach()  # the embedding trains through the leaves
        _, hn = self.shortcuts[self.index[node]](x, h.unsqueeze(0).contiguous())
        return hn.squeeze(0)

    def start_states(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], dict, int]:
        """m_b for every chunk by binary decomposition; returns (states, shortcut outputs, depth)."""
        B, k = ids.shape[0], self.n_chunks
        m: list[torch.Tensor | None] = [ids.new_zeros(B, self.model.d, dtype=torch.float32)] + [None] * (k - 1)
        m[0] = m[0].to(self.model.head.weight.dtype)
        outs = {}
        depth = 0
        for lv in range(self.levels - 1, -1, -1):
            for j in range(0, k >> lv, 2):
                out = self.shortcut((lv, j), m[j << lv], ids)
                outs[(lv, j)] = out
                m[(j + 1) << lv] = out.detach()
            depth += self.cfg.window
        return m, outs, depth  # type: ignore[return-value]

    def step(self, ids: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        c, k, B = self.cfg.chunk, self.n_chunks, ids.shape[0]
        m, sc_out, prefix_depth = self.start_states(ids)
        # all leaves at once: K chunks x B sequences as one batch of independent sequences
        x = ids.reshape(B, k, c).transpose(0, 1).reshape(k * B, c)
        y = targets.reshape(B, k, c).transpose(0, 1).reshape(k * B, c)
        h0 = torch.stack(m).reshape(k * B, -1)
        out, hn = self.model.run(x, h0)
        leaf_ce = self.model.ce(out, y)
        end = hn.reshape(k, B, -1)
        distill = sum(
            (sc - end[((j + 1) << lv) - 1].detach()).pow(2).mean() for (lv, j), sc in sc_out.items()
        ) / max(len(sc_out), 1)
        (leaf_ce + self.cfg.shortcut_weight * distill).backward()
        critical = prefix_depth + c + max(c, self.cfg.window)
        return {"loss": float(leaf_ce.detach()), "critical_path": float(critical),
                "shortcut_mse": float(distill.detach())}
