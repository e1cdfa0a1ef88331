"""LanguageModel: token embedding -> residual blocks -> final norm -> linear head.

The block kind of each layer comes from the config (`block_kinds`), so GPT, Mamba-2, Mamba-3 and hybrids
share one class -- and every method and the one training loop work on all of them. Methods reach in only
through `set_attention` (attention function) and by swapping nn.Linear submodules.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from chainfree.config import ModelConfig
from chainfree.ops.cross_entropy import linear_cross_entropy

# block kind -> "module:Class"; constructor signature Block(cfg: ModelConfig, layer_idx: int)
BLOCKS: dict[str, str] = {
    "attn": "chainfree.models.attention:TransformerBlock",
    "mamba2": "chainfree.models.mamba2:Mamba2Block",
    "mamba3": "chainfree.models.mamba3:Mamba3Block",
}


def block_kinds(cfg: ModelConfig) -> list[str]:
    """Per-layer block kinds: hybrid puts attention at every `attn_every`-th layer (1-based)."""
    if cfg.kind == "gpt":
        return ["attn"] * cfg.n_layers
    if cfg.kind in ("mamba2", "mamba3"):
        return [cfg.kind] * cfg.n_layers
    return ["attn" if (i + 1) % cfg.attn_every == 0 else cfg.hybrid_mixer for i in range(cfg.n_layers)]


def block_class(kind: str) -> type[nn.Module]:
    module, name = BLOCKS[kind].split(":")
    return getattr(importlib.import_module(module), name)


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_fn: Callable[..., torch.Tensor] = F.scaled_dot_product_attention):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (it comes from the tokenizer)")
        cfg.validate()  # models built in code get the same clear errors as the CLI
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(block_class(kind)(cfg, i) for i, kind in enumerate(block_kinds(cfg)))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.set_attention(attn_fn)

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, init_std), residual output projections scaled by 1/sqrt(2 L)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj", "down", "out_proj")) else 1
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)

    def set_attention(self, attn_fn: Callable[..., torch.Tensor]) -> int:
        """Use `attn_fn` (SDPA calling convention) in every attention layer; returns how many were set."""
        count = 0
        for module in self.modules():
            if hasattr(module, "attn_fn"):
                module.attn_fn = attn_fn
                count += 1
        return count

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states [B, T, d]."""
        if ids.shape[-1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {ids.shape[-1]} tokens is longer than model.seq_len={self.cfg.seq_len}")
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean CE from hidden states. A plain nn.Linear head uses the chunked fused loss (no full logits);
        a swapped head (e.g. a sketching layer) is called as a module on the hidden states."""
        if type(self.head) is nn.Linear:
            return linear_cross_entropy(h, self.head.weight, self.head.bias, targets)
        fused = getattr(self.head, "linear_cross_entropy", None)
        if fused is not None:  # a swapped head with its own chunked loss (e.g. BasisLinear): no full logits
            return fused(h, targets)
        logits = self.head(h)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(ids)
        if targets is None:
            return self.logits(h)
        return self.loss(h, targets)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n


def build_model(cfg: ModelConfig) -> LanguageModel:
    return LanguageModel(cfg)
