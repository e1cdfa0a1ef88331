"""SUS backprop for Hugging Face transformers models (optional extra `chainfree[hf]`).

    from chainfree.integrations.hf import register_sus_attention
    name = register_sus_attention(c=32)                       # -> "chainfree_sus"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)   # or model.set_attn_implementation(name)

Registers an attention function in transformers' `AttentionInterface` (and the SDPA mask builder under
the same name in `AttentionMaskInterface`, so the model hands us the same 4-D boolean mask SDPA gets).
With gradients enabled it runs `chainfree.sus_attention`: the exact forward and the SUS backward; without
gradients (evaluation, generation) it defers to transformers' own SDPA path, whose output SUS's forward
equals anyway.
`register_attention_function(fn, name)` does the same for any function with SDPA's calling convention
(q, k, v, attn_mask=, is_causal=, scale=, enable_gqa=): chainfree's HF model wrapper uses it so that a
method's `set_attention` (SUS, or an instrumented attention) reaches a pretrained transformers model unchanged.

Masks in training. What transformers 5.x passes to an attention function (llama, checked with 5.25):
no mask for an unpadded causal batch; for a padded batch (`DataCollatorForLanguageModeling`, a 2-D
`attention_mask`) a bool [B, 1, T, T] mask (True = attend) that is causal AND key-is-not-padding -- a
left-padded query row sees no key at all, a right-padded one sees its document's tokens; for a packed
batch (`DataCollatorWithFlattening`: `position_ids` that restart at 0 per document, optionally
`cu_seq_lens_q/k` and `max_length_q/k`) a block-diagonal causal bool [1, 1, T, T] mask, built by
transformers' mask builder from the restarting `position_ids`. The mask is the truth (SDPA uses it and
ignores the other kwargs), so we read it: a mask that is exactly "causal within documents, padding keys
excluded" becomes `document_ids` (the compact form SUS kernels consume; one pass over the mask, cached
for the layers that share it), a mask equal to the plain causal one is dropped, and any other mask
(sliding window, per-head, custom 4-D) goes to `sus_attention` as a dense `attn_mask`. Everything that
neither SUS nor its masks cover (a learned position bias, a mask that is not a tensor) runs transformers'
SDPA for that call, with one warning per process: a Trainer run never stops on a batch it has not seen.
Attention dropout must be 0 (SUS is itself the noise): set the config's `attn_pdrop` / `attention_dropout`
to 0 (refused at the first training call otherwise). GQA via the module's `num_key_value_groups`.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from chainfree.errors import warn_once
from chainfree.ops.sus import sus_attention

DEFAULT_NAME = "chainfree_sus"

MaskPlan = tuple[str, Any]  # ("plain", None) | ("documents", ids) | ("dense", bool or float mask)
_PLAN_CACHE: list[Any] = []  # [weakref to the last mask, its _version, causal, plan]: layers share one mask


def _allowed(mask: torch.Tensor) -> torch.Tensor | None:
    """The bool 'may attend' form of an SDPA mask (bool, or float that is 0 / -inf / dtype-min only), or None
    when a float mask carries other values (a real additive bias)."""
    if mask.dtype == torch.bool:
        return mask
    blocked = (mask == float("-inf")) | (mask <= torch.finfo(mask.dtype).min)
    return ~blocked if bool(((mask == 0) | blocked).all()) else None


def document_ids_from_mask(allowed: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q_ids, k_ids) [B, T] that reproduce `allowed` [B, T, T] exactly as "(causal and) same document and key
    not padding", or None when the mask says something else.

    A token's id is the index of the first key its row may see (its document's first token); a key is padding
    (id -1) when it may not see itself; a query row that sees nothing gets -1. The ids are checked by
    rebuilding the mask from them, so a mask of any other shape (sliding window, custom) is never mistaken."""
    T = allowed.shape[-1]
    sees_any = allowed.any(-1)
    first = torch.where(sees_any, allowed.to(torch.uint8).argmax(-1), -1)
    k_ids = torch.where(allowed.diagonal(dim1=-2, dim2=-1), first, -1)
    rebuilt = (first[:, :, None] == k_ids[:, None, :]) & (k_ids[:, None, :] >= 0)
    if causal:
        rebuilt &= torch.ones(T, T, dtype=torch.bool, device=allowed.device).tril()
    return (first, k_ids) if torch.equal(rebuilt, allowed) else None


def mask_plan(mask: torch.Tensor, q_len: int, kv_len: int, causal: bool) -> MaskPlan:
    """How a transformers 4-D attention mask [B or 1, 1 or H, q_len, kv_len] reaches `sus_attention`
    (see the module docstring): ('plain', None), ('documents', ids) or ('dense', mask)."""
    if _PLAN_CACHE and _PLAN_CACHE[0]() is mask and _PLAN_CACHE[1:3] == [mask._version, causal]:
        return _PLAN_CACHE[3]
    plan: MaskPlan = ("dense", mask)
    allowed = _allowed(mask)
    if allowed is not None and mask.dim() == 4 and mask.shape[1] == 1 and q_len == kv_len:
        ids = document_ids_from_mask(allowed[:, 0].expand(-1, q_len, kv_len), causal)
        if ids is not None:
            q_ids, k_ids = ids
            if bool((k_ids == 0).all()) and bool((q_ids == 0).all()):
                plan = ("plain", None)  # exactly the causal (or full) mask: nothing to say
            else:
                plan = ("documents", q_ids if torch.equal(q_ids, k_ids) else (q_ids, k_ids))
        elif mask.dtype != torch.bool:
            plan = ("dense", allowed)
    _PLAN_CACHE[:] = [weakref.ref(mask), mask._version, causal, plan]
    return plan


def _unsupported(mask: Any, kwargs: dict[str, Any]) -> str | None:
    """Why a training call cannot run SUS (then it runs transformers' SDPA), or None when it can."""
    if kwargs.get("position_bias") is not None:
        return "a position bias"
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        return f"a {type(mask).__name__} mask"
    if mask.dim() != 4 or not (mask.dtype == torch.bool or mask.is_floating_point()):
        return f"a {mask.dim()}-D {mask.dtype} mask"
    return None


def _takes_document_ids(attn_fn: Callable[..., Any]) -> bool:
    try:
        return "document_ids" in inspect.signature(attn_fn).parameters
    except (TypeError, ValueError):
        return False


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

    With gradients: reads the mask (module docstring) and runs `attn_fn(q, k, v, is_causal=, scale=,
    enable_gqa=)` plus `document_ids=` or `attn_mask=` when the batch is padded or packed. Without
    gradients, or for what `attn_fn` cannot express (position bias, a non-tensor mask): SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    sdpa = partial(sdpa_attention_forward, module, query, key, value, attention_mask, dropout=dropout,
                   scaling=scaling, is_causal=is_causal, **kwargs)  # fmt: skip
    if not needs_grad:
        return sdpa()
    if dropout:
        raise ValueError(
            f"{label} needs attention dropout 0 in training (got {dropout}); set the model config's "
            "attn_pdrop / attention_dropout to 0"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{label} does not support attention logit softcapping; use attn_implementation='eager'")
    why = _unsupported(attention_mask, kwargs)
    if why is not None:
        warn_once(f"hf-{label}-{why}", f"{label}: calls with {why} run transformers' SDPA attention (exact "
                  "gradients) instead")  # fmt: skip
        return sdpa()
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and q_len > 1
    if not (query.dtype == key.dtype == value.dtype):  # e.g. rotary embeddings upcast q, k under autocast
        dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) \
            else query.dtype  # fmt: skip
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    gqa = key.shape[1] != query.shape[1]
    if attention_mask is None:
        if causal and kv_len > q_len:  # a prefill into an empty static cache: the slots after q_len are empty
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        out = attn_fn(query, key, value, is_causal=causal, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    kind, arg = mask_plan(attention_mask, q_len, kv_len, causal)
    if kind == "documents" and not _takes_document_ids(attn_fn):
        kind, arg = "dense", _allowed(attention_mask)
    if kind == "plain":
        out = attn_fn(query, key, value, is_causal=causal, scale=scaling, enable_gqa=gqa)
    elif kind == "documents":
        out = attn_fn(query, key, value, is_causal=causal, scale=scaling, enable_gqa=gqa, document_ids=arg)
    else:  # the mask already holds causality, as in transformers' SDPA path
        out = attn_fn(query, key, value, attn_mask=arg, is_causal=False, scale=scaling, enable_gqa=gqa)
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
    c: float | None = None,
    variant: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`attention_forward` with `chainfree.sus_attention` at keep rate `c` (None: the variant's default)."""
    return attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                             attn_fn=partial(sus_attention, c=c, variant=variant), **kwargs)  # fmt: skip


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


def register_sus_attention(c: float | None = None, name: str = DEFAULT_NAME, variant: str = "auto") -> str:
    """Register SUS attention (keep rate `c`, `variant` as in `chainfree.sus_attention`) with transformers
    under `name`; returns the name.

    Register several c values under different names to compare them. Raises ImportError naming the
    extra when transformers is missing.
    """
    attention, masks, sdpa_mask = _interfaces()
    if c is not None and not c > 0:
        raise ValueError(f"c must be positive, got {c}")
    attention.register(name, partial(sus_attention_forward, c=c, variant=variant))
    masks.register(name, sdpa_mask)
    return name


__all__ = ["DEFAULT_NAME", "attention_forward", "document_ids_from_mask", "mask_plan", "register_attention_function",
           "register_sus_attention", "sus_attention_forward"]
