"""SUS backprop as a method: every attention layer gets `sus_attention`; training stays `loss.backward()`.

    chainfree train --model gpt --method sus --set method.c=32

Only the attention backward changes (derivation in docs/sus.md): the forward, the loss and every other gradient path are
exact, and the attention gradients are unbiased, so the loop, optimizer and schedule are the exact
baseline's. With the reference backend the step also reports how many attention weights carried gradient
(`sus_kept_per_row`, `sus_kept_fraction`) next to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from chainfree.errors import ConfigError
from chainfree.methods.base import Method, StepStats
from chainfree.ops.sus import ALL_VARIANTS, AUTO_VARIANT, BACKENDS, default_c, sus_attention
from chainfree.ops.sus_reference import SusStats


@dataclass
class SusConfig:
    """`method.<key>` settings of SUS backprop."""

    c: float | None = None  # keep rate: per-pair, weights per query row and head (default 32); tile, rate on mass (4)
    variant: str = "auto"  # 'auto' (tile on CUDA, else bernoulli), 'bernoulli' (per pair), 'systematic', 'tile'
    backend: str = "auto"  # 'auto' (Triton on CUDA when it supports the case), 'reference', 'triton'
    stats: bool = True  # report kept-entry counts (per-pair reference backend only; costs a few reductions)
    tile: int = 128  # variant 'tile': tile edge (the CUDA kernels take 16, 32, 64 or 128)
    proposal: str = "rows8"  # variant 'tile': tile statistic, 'exact' or 'rowsS' (every S-th row, floored)

    @property
    def keep_rate(self) -> float | None:
        """c, or the variant's default when unset (None for 'auto': the variant that runs picks it)."""
        if self.c is not None:
            return float(self.c)
        return None if self.variant == AUTO_VARIANT else default_c(self.variant)

    def validate(self) -> None:
        if self.c is not None and not self.c > 0:
            raise ConfigError(f"method.c must be a positive keep rate, got {self.c}")
        if self.variant not in ALL_VARIANTS:
            raise ConfigError(f"method.variant must be one of {ALL_VARIANTS}, got {self.variant!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"method.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not self.tile >= 1:
            raise ConfigError(f"method.tile must be a positive tile edge, got {self.tile}")
        from chainfree.ops.sus_tile import proposal_stride

        try:
            proposal_stride(self.proposal)
        except ValueError as e:
            raise ConfigError(f"method.proposal: {e}") from None


class Sus(Method):
    name = "sus"
    Config = SusConfig

    def __init__(self, config: SusConfig | None = None) -> None:
        super().__init__(config)  # settings were validated once, when the config was built (method_config)
        self.stats = SusStats()

    def attention_fn(self):
        """The attention function this method installs (SDPA calling convention)."""
        cfg = self.config
        return partial(sus_attention, c=cfg.keep_rate, variant=cfg.variant, backend=cfg.backend, tile=cfg.tile,
                       proposal=cfg.proposal, stats=self.stats if cfg.stats else None)  # fmt: skip

    def prepare(self, model: nn.Module) -> nn.Module:
        set_attention = getattr(model, "set_attention", None)
        if set_attention is None:
            raise ConfigError(
                f"SUS needs a model with swappable attention (chainfree LanguageModel.set_attention); got "
                f"{type(model).__name__}. For Hugging Face models use chainfree.integrations.hf"
            )
        n_attn = set_attention(self.attention_fn())
        if n_attn == 0:
            kind = getattr(getattr(model, "cfg", None), "kind", "?")
            raise ConfigError(
                f"SUS changes the attention backward, but this model (model.kind={kind!r}) has no attention "
                "blocks; use model.kind='gpt' or 'hybrid'"
            )
        n_blocks = len(getattr(model, "blocks", ()))
        if 0 < n_attn < n_blocks:  # e.g. hybrid: the Mamba blocks' gradients stay exact
            from chainfree.logging import console

            attn_every = getattr(getattr(model, "cfg", None), "attn_every", "?")
            console.print(f"note: SUS changes the backward of {n_attn} of the model's {n_blocks} blocks (the "
                          f"attention ones, model.attn_every={attn_every}); the other blocks train exactly, so "
                          "SUS here stays close to exact backprop", markup=False, highlight=False)
        return model

    def step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        self.stats.reset()
        stats = super().step(model, inputs, targets)
        if self.stats.rows:
            stats.extra.update(self.stats.as_dict())
        return stats
