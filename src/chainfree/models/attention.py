"""Causal self-attention with rotary embeddings and an injectable attention function.

The attention function follows the calling convention of F.scaled_dot_product_attention
(q [B,H,T,D], k/v [B,Hkv,T,D], is_causal, scale, enable_gqa), so SUS (`chainfree.sus_attention`) or any
other kernel drops in via `LanguageModel.set_attention` without the model knowing which method trains it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from chainfree.config import ModelConfig
from chainfree.models.mlp import MLP, Call, plain_call, stacked_call
from chainfree.nn.stacked import Params

AttnFn = Callable[..., torch.Tensor]


def rope_cache(seq_len: int, head_dim: int, base: float, device, dtype=torch.float32):
    """cos/sin tables [T, head_dim/2] for rotary position embeddings."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) by the position's angle. x: [B, H, T, D]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_fn: AttnFn = F.scaled_dot_product_attention) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rope_base = cfg.rope_base
        # One fused q/k/v projection: under autocast three separate Linears would each save their own
        # low-precision copy of the (shared) input for backward; one Linear saves it once.
        self.qkv_split = [cfg.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2
        self.qkv_proj = nn.Linear(cfg.d_model, sum(self.qkv_split), bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.attn_fn = attn_fn
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].shape[0] < seq_len or self._rope[0].device != device:
            self._rope = rope_cache(max(seq_len, 1), self.head_dim, self.rope_base, device)
        cos, sin = self._rope
        return cos[:seq_len], sin[:seq_len]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B,H,T,D], k and v [B,Hkv,T,D] (before RoPE) from x [B,T,d]."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)
        return (q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2),
                k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2),
                v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2))

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Causal attention of fused projections qkv [..., T, q+k+v] -> [..., T, H*D]; leading dimensions
        (batch, or members x batch in the batched forward) are one batch for the attention function."""
        *lead, T, _ = qkv.shape
        n, H, Hk, D = math.prod(lead), self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = qkv.split(self.qkv_split, dim=-1)
        q = q.reshape(n, T, H, D).transpose(1, 2)
        k = k.reshape(n, T, Hk, D).transpose(1, 2)
        v = v.reshape(n, T, Hk, D).transpose(1, 2)
        cos, sin = self.rope(T, qkv.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = Hk != H
        y = self.attn_fn(q, k, v, is_causal=True, enable_gqa=gqa) if gqa else self.attn_fn(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(*lead, T, H * D)

    def _body(self, x: torch.Tensor, call: Call) -> torch.Tensor:
        return call("o_proj", self.o_proj, self._attend(call("qkv_proj", self.qkv_proj, x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._body(x, plain_call)

    def batched_forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """k stacked members at once (chainfree.nn.stacked): x [k, B, T, d], params[name] [k, ...]; the
        attention function runs once on k*B sequences."""
        return self._body(x, stacked_call(params))

    def decode(self, x: torch.Tensor, cache: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """KV-cached attention for generation: x [B, T_new, d] are the tokens after the `cache`d ones (prefill:
        the prompt on an empty cache; step: one token). Plain SDPA, since methods only change training."""
        B, T, _ = x.shape
        pos = cache["k"].shape[2]
        q, k, v = self.project(x)
        cos, sin = self.rope(pos + T, x.device)
        q, k = apply_rope(q, cos[pos:], sin[pos:]), apply_rope(k, cos[pos:], sin[pos:])
        k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)), {"k": k, "v": v}


class TransformerBlock(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.hidden)

    def _body(self, x: torch.Tensor, call: Call) -> torch.Tensor:
        x = x + call("attn", self.attn, call("ln1", self.ln1, x))
        return x + call("mlp", self.mlp, call("ln2", self.ln2, x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._body(x, plain_call)

    def batched_forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """k stacked members at once (chainfree.nn.stacked): x [k, B, T, d], params[name] [k, ...]."""
        return self._body(x, stacked_call(params))

    # generation (chainfree.generate): the recurrent state of an attention block is its KV cache
    def init_state(self, batch: int, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        empty = torch.zeros(batch, self.attn.n_kv_heads, 0, self.attn.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty}

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._decode(x, self.init_state(x.shape[0], x.device, x.dtype))

    def step(self, x_t: torch.Tensor, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y, state = self._decode(x_t[:, None], state)
        return y[:, 0], state

    def _decode(self, x: torch.Tensor, cache: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a, cache = self.attn.decode(self.ln1(x), cache)
        x = x + a
        return x + self.mlp(self.ln2(x)), cache
