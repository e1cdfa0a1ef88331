"""HBLL over time: a character GRU trained with a tree over time chunks instead of backprop through time.

The chain that HBLL breaks is now the recurrence: the state h_b at the start of chunk b depends on all
earlier chunks, so backprop through time (BPTT) has a critical path of T sequential cell steps, and even
truncated BPTT (TBPTT: chunks in order, state carried forward detached) needs K = T / chunk sequential
chunk evaluations. Our time-tree (our construction; chainfree.models.hbll_tree.TimeTree, docs/hbll.md):

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

from dataclasses import dataclass

import torch
from torch import nn

from chainfree.errors import ConfigError
from chainfree.methods.base import Method, StepStats
from chainfree.models.char_rnn import CharGRU
from chainfree.models.hbll_tree import TimeTree


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


def _need_char_rnn(method: str, model: nn.Module) -> None:
    if not isinstance(model, CharGRU):
        raise ConfigError(f"method {method!r} trains a recurrent model: set model.kind=\"char_rnn\" "
                          f"(got {type(model).__name__})")


class HBLLTime(Method):
    """HBLL over time: the character GRU trained through a TimeTree (see the module docstring). The tree's
    shape depends on the sequence length: `seq_len` here, or the model's `seq_len` attribute."""

    name = "hbll_time"
    Config = TimeTreeConfig
    uses_autograd_step = False

    def __init__(self, config: TimeTreeConfig | None = None, seq_len: int = 0) -> None:
        super().__init__(config)
        self.seq_len = seq_len

    def prepare(self, model: nn.Module) -> nn.Module:
        if isinstance(model, TimeTree):
            return model
        _need_char_rnn(self.name, model)
        seq_len = self.seq_len or getattr(model, "seq_len", 0)
        if seq_len <= 0:
            raise ConfigError("method 'hbll_time' needs the sequence length: set model.seq_len")
        ref = next(model.parameters())
        return TimeTree(model, self.config, seq_len).to(device=ref.device, dtype=ref.dtype)

    def step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        if not isinstance(model, TimeTree):
            raise ConfigError("HBLLTime.step needs the model returned by HBLLTime.prepare (a TimeTree)")
        stats = model.step(inputs, targets)
        loss = stats.pop("loss")
        return StepStats(loss=loss, tokens=targets.numel(), extra=stats)

    def eval_loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.model(inputs, targets)


@dataclass
class TBPTTConfig:
    chunk: int = 32  # characters per truncation window


class TBPTT(Method):
    """Truncated backprop through time, the time tree's baseline (`tbptt_step`)."""

    name = "tbptt"
    Config = TBPTTConfig
    uses_autograd_step = False

    def prepare(self, model: nn.Module) -> nn.Module:
        _need_char_rnn(self.name, model)
        return model

    def step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        stats = tbptt_step(model, inputs, targets, self.config.chunk)
        loss = stats.pop("loss")
        return StepStats(loss=loss, tokens=targets.numel(), extra=stats)
