"""SUS backprop for Hugging Face transformers models (optional extra `chainfree[hf]`).

    from chainfree.integrations.hf import register_sus_attention
    name = register_sus_attention(c=32)                       # -> "chainfree_sus"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)   # or model.set_attn_implementation(name)

Registers an attention function in transformers' `AttentionInterface` (and the SDPA mask builder under
the same name in `AttentionMaskInterface`, so padding masks still reach us and are refused rather than
silently dropped). With gradients enabled it runs `chainfree.sus_attention`: the exact forward and the
SUS backward; without gradients (evaluation, generation, KV caches) it defers to transformers' own SDPA
path, whose output SUS's forward equals anyway.
`register_attention_function(fn, name)` does the same for any function with SDPA's calling convention
(q, k, v, is_causal=, scale=, enable_gqa=): chainfree's HF model wrapper uses it so that a method's
`set_attention` (SUS, or an instrumented attention) reaches a pretrained transformers model unchanged.
Supported in training: causal self-attention without padding (the mask builder then passes no mask), or a
bidirectional encoder without padding; GQA via the module's `num_key_value_groups`. Attention dropout
must be 0 (SUS is itself the noise): set the config's `attn_pdrop` / `attention_dropout` to 0.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from chainfree.ops.sus import sus_attention

DEFAULT_NAME = "chainfree_sus"


def _mask_is_plain(mask: torch.Tensor, q_len: int, kv_len: int, causal: bool) -> bool:
    """Whether a 4-D HF mask (bool: True = attend; float: 0 = attend) says no more than `causal` does."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    want = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device)
    if causal:
        want = want.tril(kv_len - q_len)
    return bool((allowed == want).all())


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    attn_fn: Callable[..., torch.Tensor],
    label: str = "SUS attention",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: q [B,H,T,D], k/v [B,Hkv,S,D] -> ([B,T,H,D], None).

    With gradients: checks the call is causal/full self-attention without padding, dropout, cache or
    sliding window, then runs `attn_fn(q, k, v, is_causal=, scale=, enable_gqa=)`. Without: SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if not needs_grad:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if dropout:
        raise ValueError(
            f"{label} needs attention dropout 0 in training (got {dropout}); set the model config's "
            "attn_pdrop / attention_dropout to 0"
        )
    for unsupported in ("position_bias", "softcap", "sliding_window", "cache"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"{label} does not support {unsupported}; use attn_implementation='sdpa'")
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and q_len > 1
    if causal and kv_len != q_len:
        raise ValueError(
            f"{label} trains on full sequences (query length {q_len} != key length {kv_len}); "
            "disable the KV cache (use_cache=False) when training"
        )
    if attention_mask is not None and not _mask_is_plain(attention_mask, q_len, kv_len, causal):
        raise ValueError(
            f"{label} supports causal or full attention only, not padding or custom masks; "
            "train on unpadded (packed) sequences or use attn_implementation='sdpa'"
        )
    if not (query.dtype == key.dtype == value.dtype):  # e.g. rotary embeddings upcast q, k under autocast
        dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) \
            else query.dtype  # fmt: skip
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    out = attn_fn(query, key, value, is_causal=causal, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def sus_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    c: float = 32,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`attention_forward` with `chainfree.sus_attention` at keep rate `c`."""
    return attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                             attn_fn=partial(sus_attention, c=c), **kwargs)  # fmt: skip


def _interfaces():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError(
            "chainfree.integrations.hf needs a transformers with AttentionInterface and AttentionMaskInterface "
            "(tested with 5.23): pip install -U 'chainfree[hf]'"
        ) from e
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def register_attention_function(
    attn_fn: Callable[..., torch.Tensor], name: str, label: str = "chainfree attention"
) -> str:
    """Register `attn_fn` (SDPA calling convention) with transformers under `name`; returns the name.

    Training calls go through the checks of `attention_forward`; calls without gradients use SDPA."""
    attention, masks, sdpa_mask = _interfaces()
    attention.register(name, partial(attention_forward, attn_fn=attn_fn, label=label))
    masks.register(name, sdpa_mask)
    return name


def register_sus_attention(c: float = 32, name: str = DEFAULT_NAME) -> str:
    """Register SUS attention (keep rate `c`) with transformers under `name`; returns the name.

    Register several c values under different names to compare them. Raises ImportError naming the
    extra when transformers is missing.
    """
    attention, masks, sdpa_mask = _interfaces()
    if not c > 0:
        raise ValueError(f"c must be positive, got {c}")
    attention.register(name, partial(sus_attention_forward, c=c))
    masks.register(name, sdpa_mask)
    return name


__all__ = ["DEFAULT_NAME", "attention_forward", "register_attention_function", "register_sus_attention",
           "sus_attention_forward"]
