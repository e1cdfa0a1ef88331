"""SUS backprop for Hugging Face transformers models (optional extra `chainfree[hf]`).

    from chainfree.integrations.hf import register_sus_attention
    name = register_sus_attention(c=32)                       # -> "chainfree_sus"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)   # or model.set_attn_implementation(name)

Registers an attention function in transformers' `AttentionInterface` (and the SDPA mask builder under
the same name in `AttentionMaskInterface`, so padding masks still reach us and are refused rather than
silently dropped). With gradients enabled it runs `chainfree.sus_attention`: the exact forward and the
SUS backward; without gradients (evaluation, generation, KV caches) it defers to transformers' own SDPA
path, whose output SUS's forward equals anyway.
Supported in training: causal self-attention without padding (the mask builder then passes no mask), or a
bidirectional encoder without padding; GQA via the module's `num_key_value_groups`. Attention dropout
must be 0 (SUS is itself the noise): set the config's `attn_pdrop` / `attention_dropout` to 0.
"""

from __future__ import annotations

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
    """transformers attention-function signature: q [B,H,T,D], k/v [B,Hkv,S,D] -> ([B,T,H,D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if not needs_grad:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if dropout:
        raise ValueError(
            f"SUS attention needs attention dropout 0 in training (got {dropout}); set the model config's "
            "attn_pdrop / attention_dropout to 0"
        )
    for unsupported in ("position_bias", "softcap", "sliding_window", "cache"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"SUS attention does not support {unsupported}; use attn_implementation='sdpa'")
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and q_len > 1
    if causal and kv_len != q_len:
        raise ValueError(
            f"SUS attention trains on full sequences (query length {q_len} != key length {kv_len}); "
            "disable the KV cache (use_cache=False) when training"
        )
    if attention_mask is not None and not _mask_is_plain(attention_mask, q_len, kv_len, causal):
        raise ValueError(
            "SUS attention supports causal or full attention only, not padding or custom masks; "
            "train on unpadded (packed) sequences or use attn_implementation='sdpa'"
        )
    out = sus_attention(
        query, key, value, is_causal=causal, scale=scaling, enable_gqa=key.shape[1] != query.shape[1], c=c
    )
    return out.transpose(1, 2).contiguous(), None


def register_sus_attention(c: float = 32, name: str = DEFAULT_NAME) -> str:
    """Register SUS attention (keep rate `c`) with transformers under `name`; returns the name.

    Register several c values under different names to compare them. Raises ImportError naming the
    extra when transformers is missing.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError(
            "chainfree.integrations.hf needs a transformers with AttentionInterface and AttentionMaskInterface "
            "(tested with 5.23): pip install -U 'chainfree[hf]'"
        ) from e
    if not c > 0:
        raise ValueError(f"c must be positive, got {c}")
    AttentionInterface.register(name, partial(sus_attention_forward, c=c))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


__all__ = ["DEFAULT_NAME", "register_sus_attention", "sus_attention_forward"]
