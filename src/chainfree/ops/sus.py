"""`sus_attention`: a drop-in for F.scaled_dot_product_attention whose backward is SUS backprop.

The forward is exact attention; the backward keeps about `c` attention weights per query row per head
(sampled without bias, docs/sus.md), so gradients are unbiased and the backward of a kernel costs O(n·c·D).
Dispatch: CUDA tensors go to the fused Triton kernel (`chainfree.ops.sus_triton`) when it is installed
and supports the case, everything else to the pure-PyTorch reference (`sus_reference`), which defines
the semantics; both consume the same random draws (`sus_random`), so they agree draw for draw.
Masks: `attn_mask` (SDPA's) and `document_ids` (padding and packed documents in compact form) are handled
by the reference; the per-pair CUDA kernels take none, so a masked call that would run on them computes
exact attention with SDPA instead (one warning per process says so).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch
import torch.nn.functional as F

from chainfree.errors import warn_once
from chainfree.ops.sus_random import draw_seed
from chainfree.ops.sus_reference import (
    VARIANTS,
    SusStats,
    check_attn_mask,
    dense_mask,
    normalize_document_ids,
    sus_attention_reference,
)

DocumentIds = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

BACKENDS = ("auto", "reference", "triton")
TILE_VARIANT = "tile"
AUTO_VARIANT = "auto"  # 'tile' where its CUDA kernels take the call, else the per-pair 'bernoulli'
ALL_VARIANTS = (AUTO_VARIANT, *VARIANTS, TILE_VARIANT)
PAIR_DEFAULT_C = 32.0  # per-pair rules: expected kept weights per query row and head
TILE_DEFAULT_C = 4.0  # tile rule: a tile is kept with probability min(1, c * its mass)
KERNEL_VARIANTS = ("bernoulli",)  # contracts a per-pair CUDA kernel implements (v1)


def default_c(variant: str) -> float:
    """The keep rate a variant uses when c is not given (its units differ: weights per row vs tile rate)."""
    return TILE_DEFAULT_C if variant == TILE_VARIANT else PAIR_DEFAULT_C


def resolve_variant(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: int, is_causal: bool,
                    masked: bool = False, backend: str = "auto") -> str:
    """The variant a call runs: 'auto' is 'tile' on CUDA where the tile kernels support the case (no dense
    attn_mask, backend not 'reference'), else 'bernoulli'; any other variant is itself."""
    if variant not in ALL_VARIANTS:
        raise ValueError(f"variant must be one of {ALL_VARIANTS}, got {variant!r}")
    if variant != AUTO_VARIANT:
        return variant
    from chainfree.ops import sus_tile

    use_tile = not masked and backend != "reference" and sus_tile.supports(q, k, v, tile, is_causal)
    return TILE_VARIANT if use_tile else "bernoulli"


def _triton_module() -> Any | None:
    """chainfree.ops.sus_triton when both it and the triton package are importable, else None."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from chainfree.ops import sus_triton
    except ImportError:
        return None
    return sus_triton


def _triton_supports(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> bool:
    """Whether the kernel handles this case (it raises on the others): its own `supports(q, k)` for
    device, dtype and head dim, plus the shape rules of its input check (v like k; causal needs n_q == n_k)."""
    if k.shape != v.shape or (is_causal and q.shape[2] != k.shape[2]):
        return False
    supports = getattr(module, "supports", None)
    if supports is not None:
        return bool(supports(q, k))
    dtypes = getattr(module, "SUPPORTED_DTYPES", (torch.float16, torch.bfloat16))
    head_dims = getattr(module, "SUPPORTED_HEAD_DIMS", (32, 64, 128))
    return q.is_cuda and q.dtype in dtypes and q.shape[-1] in head_dims


def _check_inputs(q, k, v, c, enable_gqa, dropout_p, backend) -> None:
    if dropout_p != 0.0:
        raise ValueError(f"sus_attention needs dropout_p=0 (got {dropout_p}); SUS adds its own sampling noise")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not (isinstance(c, int | float) and c > 0 and math.isfinite(c)):
        raise ValueError(f"c must be a positive number (kept entries per row), got {c!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"sus_attention expects 4-D q, k, v [batch, heads, seq, head_dim]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (add a heads dim with .unsqueeze(1))"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor (float64/32, bf16, fp16), got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need "
            "q [B,H,n_q,D], k [B,Hkv,n_k,D], v [B,Hkv,n_k,Dv]"
        )
    if k.shape[2] == 0:
        raise ValueError("k and v must have at least one key (n_k >= 1)")
    H, H_kv = q.shape[1], k.shape[1]
    if H != H_kv:
        if not enable_gqa:
            raise ValueError(f"q has {H} heads but k/v have {H_kv}; pass enable_gqa=True for grouped-query attention")
        if H % H_kv != 0:
            raise ValueError(f"enable_gqa needs q heads ({H}) to be a multiple of k/v heads ({H_kv})")


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, variant: str, backend: str) -> Any:
    """The per-pair Triton kernel module that runs this call, or None for the reference."""
    if backend == "reference" or variant not in KERNEL_VARIANTS:
        if backend == "triton":
            raise ValueError(f"backend='triton' supports variant in {KERNEL_VARIANTS}, got {variant!r}; "
                             "use backend='auto'")
        return None
    module = _triton_module() if (backend == "triton" or q.is_cuda) else None
    if backend == "triton" and module is None:
        raise ImportError("backend='triton' needs chainfree.ops.sus_triton and triton (pip install 'chainfree[gpu]')")
    if module is not None and (backend == "triton" or _triton_supports(module, q, k, v, is_causal)):
        return module
    return None


def _masks(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, document_ids: DocumentIds | None
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Check attn_mask's shape; document_ids as a (q_ids, k_ids) pair on q's device (None without them)."""
    B, H, n_q, _ = q.shape
    check_attn_mask(attn_mask, B, H, n_q, k.shape[2], q.device)
    ids = normalize_document_ids(document_ids, B, n_q, k.shape[2])
    if ids is not None and ids[0].device != q.device:
        ids = (ids[0].to(q.device), ids[1].to(q.device))
    return ids


def _exact_attention(q, k, v, attn_mask, document_ids, is_causal, scale, enable_gqa) -> torch.Tensor:
    """SDPA with the masks folded into one attn_mask (exact forward and backward)."""
    mask = dense_mask(q.shape[2], k.shape[2], is_causal, attn_mask, document_ids, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


def sus_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    c: float | None = None,
    generator: torch.Generator | None = None,
    variant: str = AUTO_VARIANT,
    backend: str = "auto",
    block_rows: int | None = None,
    stats: SusStats | None = None,
    document_ids: DocumentIds | None = None,
    tile: int = 128,
    proposal: str | None = None,
) -> torch.Tensor:
    """Attention with an exact forward and a SUS (sparse, unbiased, stochastic) backward.

    Same positional convention as F.scaled_dot_product_attention (q [B,H,n_q,D], k/v [B,H_kv,n_k,D]);
    `dropout_p` must be 0. Masks, combined with `is_causal` (top-left aligned) as SDPA combines them:
    `attn_mask` is SDPA's (bool, True = may attend, or additive float with -inf; broadcastable to
    [B,H,n_q,n_k]); `document_ids` is an int tensor [B,n] (n_q == n_k) or a pair (q_ids [B,n_q],
    k_ids [B,n_k]): pair (i, j) may attend iff q_ids[b,i] == k_ids[b,j] and k_ids[b,j] >= 0 (a negative id
    is padding) -- padded and packed batches in compact form. A masked pair has W = 0 and is never kept;
    a row that sees no key gets output 0 and no gradient (SDPA's answer). A float attn_mask that requires
    grad, or any mask on a call the per-pair CUDA kernels would run, is computed exactly by SDPA instead
    (one RuntimeWarning per process names why).
    `c` bounds the expected number of attention weights per query row and head that carry gradient
    (q_ij = min(1, c·W_ij)). One seed is drawn from `generator` (default: torch's CPU generator) per call
    that needs a gradient; the backward replays it.
    `variant`: 'bernoulli' (default: independent keeps; on CUDA the v1 kernel, which samples in the
    backward) or 'systematic' (at most c entries per row with certainty; reference backend only). Both are
    unbiased; `sus_reference` defines them.
    `stats`, if given, accumulates kept-entry counts in the backward (reference backend only; the kernel
    does not report them). No seed is drawn when no gradient is needed, so eval leaves the RNG alone.

    `variant='auto'` (default) runs 'tile' on CUDA where its kernels take the call (bf16/fp16, head dim 64 or
    128, no dense attn_mask) and 'bernoulli' everywhere else (the CPU reference included).
    `variant='tile'` samples whole (query tile x key tile) blocks of edge `tile` instead of single weights:
    a tile is kept with probability min(1, c * m), m = its largest row mass (`chainfree.ops.sus_tile`), and
    its dense backward runs with weight 1/probability. The forward is SDPA-class exact attention and the op
    traces under torch.compile without graph breaks; `proposal` picks the tile statistic ('exact' or 'rowsS',
    see sus_tile). It takes `document_ids`; a dense `attn_mask` runs exact SDPA instead (one warning).
    `c` defaults to 32 for the per-pair variants and 4 for 'tile' (different units: weights per row vs a
    rate on tile mass; with 'auto', a given c is read in the units of the variant that runs -- name the
    variant when you set c). Per-pair variants run outside torch.compile graphs (a host-drawn seed per call).
    """
    variant = resolve_variant(variant, query, key, value, tile, is_causal, masked=attn_mask is not None,
                              backend=backend)
    c = default_c(variant) if c is None else c
    if variant == TILE_VARIANT:
        return _tile_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, c, generator,
                               backend, document_ids, tile, proposal)
    return _per_pair_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                               c=c, generator=generator, variant=variant,
                               backend=backend, block_rows=block_rows, stats=stats, document_ids=document_ids)


def _tile_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, c, generator, backend,
                    document_ids, tile, proposal) -> torch.Tensor:
    """The 'tile' variant: checks, then `sus_tile_attention` (a dense attn_mask falls back to exact SDPA)."""
    from chainfree.ops import sus_tile

    _check_inputs(query, key, value, c, enable_gqa, dropout_p, backend)
    if not (isinstance(tile, int) and tile >= 1):
        raise ValueError(f"tile must be a positive int (the tile edge), got {tile!r}")
    if backend == "triton" and not sus_tile.supports(query, key, value, tile, is_causal):
        raise ValueError(f"backend='triton' with variant='tile' needs CUDA, bf16/fp16, head dim in "
                         f"{sus_tile.SUPPORTED_HEAD_DIMS} and tile in {sus_tile.SUPPORTED_TILES}; use backend='auto'")
    ids = _masks(query, key, attn_mask, document_ids)
    if attn_mask is not None:
        warn_once("mask-tile", "sus_attention: variant='tile' takes document_ids but no dense attn_mask, so calls "
                  "with one run exact SDPA instead of SUS")
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        return _exact_attention(query, key, value, attn_mask, ids, is_causal, scale, enable_gqa)
    return sus_tile.sus_tile_attention(
        query, key, value, c=float(c), is_causal=bool(is_causal), scale=scale, enable_gqa=enable_gqa, tile=tile,
        document_ids=ids, proposal=proposal or sus_tile.DEFAULT_PROPOSAL, generator=generator,
    )  # fmt: skip


# Runs outside torch.compile's graphs (a graph break around each call): the per-call seed is a Python int
# drawn on the host, and a traced call would specialise on it -- a recompile every step until dynamo's
# recompile limit, then eager anyway.
@torch.compiler.disable
def _per_pair_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    c: float = PAIR_DEFAULT_C,
    generator: torch.Generator | None = None,
    variant: str = "bernoulli",
    backend: str = "auto",
    block_rows: int | None = None,
    stats: SusStats | None = None,
    document_ids: DocumentIds | None = None,
) -> torch.Tensor:
    """The per-pair variants (the paper's rule), as documented on `sus_attention`."""
    _check_inputs(query, key, value, c, enable_gqa, dropout_p, backend)
    ids = _masks(query, key, attn_mask, document_ids)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if attn_mask is not None and attn_mask.requires_grad and needs_grad:
        warn_once("mask-grad", "sus_attention: an attn_mask that requires grad (a learned additive bias) gets its "
                  "gradient from exact SDPA: these calls run exact attention, not SUS")
        return _exact_attention(query, key, value, attn_mask, ids, is_causal, scale, enable_gqa)
    seed = draw_seed(generator) if needs_grad else 0
    kernel = _kernel(query, key, value, is_causal, variant, backend)
    if kernel is not None:
        if attn_mask is not None or ids is not None:
            warn_once("mask-kernel", f"sus_attention: the per-pair CUDA kernel (variant={variant!r}) takes no "
                      "attn_mask or document_ids, so masked calls (padded or packed batches) run exact SDPA "
                      "instead of SUS")
            return _exact_attention(query, key, value, attn_mask, ids, is_causal, scale, enable_gqa)
        return kernel.sus_attention_triton(
            query, key, value, c=float(c), is_causal=bool(is_causal), scale=float(scale),
            enable_gqa=enable_gqa, seed=seed,
        )  # fmt: skip
    return sus_attention_reference(
        query, key, value, float(c), bool(is_causal), float(scale), seed, block_rows, variant, stats,
        attn_mask=attn_mask, document_ids=ids,
    )  # fmt: skip


__all__ = ["ALL_VARIANTS", "AUTO_VARIANT", "BACKENDS", "PAIR_DEFAULT_C", "TILE_DEFAULT_C", "TILE_VARIANT",
           "DocumentIds", "SusStats", "default_c", "resolve_variant", "sus_attention"]
