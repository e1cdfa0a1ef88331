"""SUS backprop, pure-PyTorch reference: exact attention forward, sparse unbiased stochastic backward.

This file defines the semantics every SUS kernel must reproduce (docs/sus.md; random source in `sus_random`).

Forward (identical to exact attention, accumulated in float32, float64 for float64 inputs):
    S = Q Kᵀ·scale (+ causal mask, top-left aligned like SDPA), W = softmax(S), O = W V.
    Saved: q, k, v (input dtype), O and the row log-sum-exp (compute dtype), and one int seed.
Backward (per head, per query row i; W recomputed from q, k and the saved log-sum-exp):
    q_ij = min(1, c·W_ij); keep iff u_ij < q_ij or q_ij >= 1  (u_ij = sus_uniform(seed, bh, i, j))
    W̃_ij = W_ij / q_ij if kept else 0                         (E[W̃] = W: unbiased)
    dV = W̃ᵀ dO;  dP = dO Vᵀ;  D_i = dO_i·O_i (exact);  dS = W̃ ⊙ (dP − D);  dQ = dS K·scale;  dK = dSᵀ Q·scale
    A row keeps Σ_j q_ij <= c entries in expectation (and at most c with certainty-kept q = 1).
Variant 'systematic': the same q_ij used as inclusion probabilities of systematic sampling along the row
(one uniform U_i = sus_uniform(seed, bh, i, 2^32 - 1) per row; key j is kept iff some U_i + k, k ∈ ℕ, falls
in [C_{j-1}, C_j), C = cumsum_j q); still unbiased, and a row keeps at most ceil(Σ_j q_ij) <= c entries
with certainty, not just on average.

Masks (the same as SDPA's, plus a compact form for padded and packed batches):
    `attn_mask` (bool: True = may attend, or additive float with -inf), broadcastable to [B, H, n_q, n_k],
    is added to / applied on S; `document_ids` = (q_ids [B, n_q], k_ids [B, n_k]) lets (i, j) attend iff
    q_ids[i] == k_ids[j] and k_ids[j] >= 0 (negative = padding). Both combine with the causal mask (AND).
    A masked pair has W = 0, so q = 0 and it is never kept. A row that sees no key at all (a left-padded
    query) gets output 0 and gradient 0, as SDPA (torch >= 2.5) gives for a fully masked row; its
    log-sum-exp is stored as +inf so the backward recomputes W = 0 there, never NaN.

Memory: the work is blocked over query rows; a block holds a handful of [B, H, rows, n_k] temporaries, with
rows chosen so a block has about 2^21 entries. So n = 8192 runs on a CPU without any n×n×H tensor.
Cost: this reference is O(n²D) (it recomputes all of S); the point of SUS, O(n·c·D), is the kernel's job.
GQA: query head h reads kv head h // (H / H_kv) (SDPA's `enable_gqa` convention); bh uses the query head.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from chainfree.ops.sus_random import MASK32, keep_mask, sus_uniform

VARIANTS = ("bernoulli", "systematic")
BLOCK_ENTRIES = 2**21  # target number of score entries per query block (about 8 MB in float32)
SYSTEMATIC_COLUMN = MASK32  # the hash column of the one per-row uniform of the systematic variant


_VML_LOCK = threading.Lock()
_VML_RESOLVED = False  # set once the process's oneMKL VML exp/log dispatch has been resolved on one thread


def _resolve_vml_dispatch() -> None:
    """Resolve oneMKL VML's exp/log kernel dispatch on one thread, once per process, before any parallel use.

    ATen runs torch.exp / torch.log on contiguous CPU float tensors through MKL VML (vmdExp/vmsExp, vmdLn/vmsLn,
    accuracy mode HA), one call per OpenMP thread on its chunk. oneMKL 2024.2 (linked by our torch 2.13 CPU build)
    picks each function's kernel lazily on its first call, and when that first call runs on several threads at
    once, one thread can run a low-accuracy kernel (the AVX2 'EP' one, ~1e-9 relative error in float64) for its
    whole chunk of that one call (pytorch/pytorch#188792; the same warm-up is proposed upstream in PR #188791).
    In a fresh process the forward's exp is often that first call, so a few processes in a hundred got
    a float64 output off by ~1e-9 (issue 22). 1-element calls run on the calling thread alone and settle the
    dispatch, after which concurrent calls are exact. Bitwise no-op otherwise; costs four tiny ops per process.
    """
    global _VML_RESOLVED
    if _VML_RESOLVED or torch.compiler.is_compiling():  # compiled code: inductor's own kernels, no VML
        return
    with _VML_LOCK:
        if not _VML_RESOLVED:
            for dtype in (torch.float32, torch.float64):
                one = torch.ones(1, dtype=dtype, device="cpu")
                torch.exp(one)
                torch.log(one)
            _VML_RESOLVED = True


@dataclass
class SusStats:
    """Kept-entry counts accumulated over SUS backward passes (reset by the caller).

    `valid` counts entries with W > 0 that could carry gradient, `certain` those kept with q = 1.
    """

    rows: int = 0
    valid: int = 0
    kept: int = 0
    certain: int = 0
    max_row_kept: int = 0

    def reset(self) -> None:
        self.rows = self.valid = self.kept = self.certain = self.max_row_kept = 0

    @property
    def mean_kept_per_row(self) -> float:
        return self.kept / self.rows if self.rows else 0.0

    @property
    def kept_fraction(self) -> float:
        """Fraction of the attention entries that carry gradient (1 - the 'cut' fraction)."""
        return self.kept / self.valid if self.valid else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "sus_kept_per_row": self.mean_kept_per_row,
            "sus_max_row_kept": float(self.max_row_kept),
            "sus_kept_fraction": self.kept_fraction,
        }


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_block_rows(batch_heads: int, n_k: int, n_q: int) -> int:
    return max(1, min(n_q, BLOCK_ENTRIES // max(1, batch_heads * n_k)))


def _visible_keys(n_k: int, last_row: int, causal: bool) -> int:
    """Keys a block of rows ending at `last_row` can see: causal rows never see keys j > i."""
    return min(n_k, last_row + 1) if causal else n_k


def _scores(
    qb: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    rows: torch.Tensor,
    causal: bool,
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled, masked scores of a query block. qb [B, Hkv, M, D] (M = G*R rows), k [B, Hkv, n_k, D] ->
    [B, Hkv, M, n_k]; `allowed` / `bias` (block layout, from `_block_masks`) are the caller's masks."""
    s = torch.matmul(qb, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if causal:
        cols = torch.arange(k.shape[-2], device=k.device)
        s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def normalize_document_ids(
    document_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None, batch: int, n_q: int, n_k: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q_ids [B', n_q], k_ids [B', n_k]) int64 (B' = 1 or `batch`) from one [B, n] tensor (n_q == n_k) or a
    pair; ValueError naming the shape rule otherwise."""
    if document_ids is None:
        return None
    pair = tuple(document_ids) if isinstance(document_ids, tuple | list) else (document_ids, document_ids)
    if len(pair) != 2 or not all(isinstance(t, torch.Tensor) for t in pair):
        raise ValueError("document_ids must be an int tensor [B, n] or a pair (q_ids [B, n_q], k_ids [B, n_k])")
    q_ids, k_ids = pair
    for name, ids, n in (("q", q_ids, n_q), ("k", k_ids, n_k)):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"document_ids must be integer tensors, got {ids.dtype} for the {name} ids")
        if ids.dim() != 2 or ids.shape[1] != n or ids.shape[0] not in (1, batch):
            raise ValueError(f"document_ids: {name} ids of shape {tuple(ids.shape)} do not fit batch {batch} and "
                             f"{'query' if name == 'q' else 'key'} length {n}; need [B, {n}] (or pass a (q_ids, "
                             "k_ids) pair when n_q != n_k)")
    return q_ids.long(), k_ids.long()


def check_attn_mask(attn_mask: torch.Tensor | None, B: int, H: int, n_q: int, n_k: int, device: torch.device) -> None:
    """ValueError unless `attn_mask` is an SDPA mask (bool or float) broadcastable to [B, H, n_q, n_k]."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        kind = attn_mask.dtype if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
        raise ValueError(f"attn_mask must be a bool (True = may attend) or float (additive) tensor, got {kind}")
    try:
        torch.broadcast_shapes(tuple(attn_mask.shape), (B, H, n_q, n_k))
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, H, n_q, n_k] = "
                         f"{[B, H, n_q, n_k]}") from None
    if attn_mask.dim() > 4 or attn_mask.device != device:
        raise ValueError(f"attn_mask must have at most 4 dims and live on {device}, got {attn_mask.dim()} dims on "
                         f"{attn_mask.device}")


def dense_mask(
    n_q: int,
    n_k: int,
    is_causal: bool,
    attn_mask: torch.Tensor | None,
    document_ids: tuple[torch.Tensor, torch.Tensor] | None,
    device: torch.device,
) -> torch.Tensor | None:
    """One SDPA attn_mask that says what (causal, attn_mask, document_ids) say together (None: no mask):
    bool [B', 1, n_q, n_k] (or attn_mask's shape), or attn_mask's float with -inf where a pair is masked."""
    allowed = None
    if is_causal:
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()
    if document_ids is not None:
        q_ids, k_ids = document_ids
        docs = ((q_ids[:, :, None] == k_ids[:, None, :]) & (k_ids[:, None, :] >= 0))[:, None]
        allowed = docs if allowed is None else allowed & docs
    if attn_mask is None:
        return allowed
    if attn_mask.dtype == torch.bool:
        return attn_mask if allowed is None else attn_mask & allowed
    return attn_mask if allowed is None else attn_mask.masked_fill(~allowed, float("-inf"))


def _block_masks(
    attn_mask: torch.Tensor | None,
    document_ids: tuple[torch.Tensor, torch.Tensor] | None,
    r0: int,
    r1: int,
    nk: int,
    shape: tuple[int, int, int, int],
    H_kv: int,
    cdt: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(allowed, bias) for query rows r0:r1 and keys :nk in the GQA block layout [B, H_kv, G*(r1-r0), nk]:
    bool from document_ids and a bool attn_mask, float from a float attn_mask (None where absent)."""
    B, H, n_q, n_k = shape
    G, R = H // H_kv, r1 - r0
    allowed = bias = None
    if document_ids is not None:
        q_ids, k_ids = document_ids
        docs = (q_ids[:, r0:r1, None] == k_ids[:, None, :nk]) & (k_ids[:, None, :nk] >= 0)  # [B', R, nk]
        allowed = docs[:, None, None].expand(B, H_kv, G, R, nk).reshape(B, H_kv, G * R, nk)
    if attn_mask is not None:
        block = _block(attn_mask.expand(B, H, n_q, n_k)[:, :, r0:r1, :nk], 0, R, H_kv)
        if block.dtype == torch.bool:
            allowed = block if allowed is None else allowed & block
        else:
            bias = block.to(cdt)
    return allowed, bias


def _block(x: torch.Tensor, r0: int, r1: int, H_kv: int) -> torch.Tensor:
    """Rows r0:r1 of x [B, H, n, X] in the GQA block layout [B, H_kv, G*(r1-r0), X] (group-major rows).

    Query head h = kv_head*G + g, so the G heads sharing a kv head become one tall matrix: one plain
    matmul per kv head, and dK, dV sum over the group for free.
    """
    B, H, _, X = x.shape
    return x[:, :, r0:r1].reshape(B, H_kv, (H // H_kv) * (r1 - r0), X)


def _unblock(y: torch.Tensor, H: int, nr: int) -> torch.Tensor:
    """Inverse of `_block`: [B, H_kv, G*nr, X] -> [B, H, nr, X]."""
    return y.reshape(y.shape[0], H, nr, y.shape[-1])


def _systematic(rate: torch.Tensor, u_row: torch.Tensor) -> torch.Tensor:
    """Systematic sampling along the last dim with inclusion probabilities `rate` (<= 1) and one uniform per
    row: j is selected iff a point U + k (k >= 0) lies in [C_{j-1}, C_j), C = cumsum(rate) in float64."""
    cum = torch.cumsum(rate.to(torch.float64), dim=-1)
    hits = torch.clamp(torch.ceil(cum - u_row.to(torch.float64)), min=0)  # points U+k below C_j
    prev = torch.nn.functional.pad(hits[..., :-1], (1, 0))
    return (((hits - prev) > 0) | (rate >= 1.0)) & (rate > 0)


def sampled_weights(
    w: torch.Tensor,
    c: float,
    seed: int,
    bh: torch.Tensor,
    rows: torch.Tensor,
    variant: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W̃, keep, q) for a block of attention weights w [..., M, n_k] whose rows hash as (`bh` [..., M or 1, 1],
    `rows` [M]) (broadcastable). The one place where the SUS sampling rule lives."""
    cols = torch.arange(w.shape[-1], device=w.device)
    if variant == "bernoulli":
        u = sus_uniform(seed, bh, rows[:, None], cols[None, :])
        keep, q = keep_mask(u, w, c)
    elif variant == "systematic":
        q = torch.clamp(c * w, max=1.0)
        u = sus_uniform(seed, bh, rows[:, None], torch.tensor(SYSTEMATIC_COLUMN, device=w.device))
        keep = _systematic(q, u)
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    w_tilde = torch.where(keep, w / torch.where(keep, q, torch.ones_like(q)), torch.zeros_like(w))
    return w_tilde, keep, q


class SusAttentionFunction(torch.autograd.Function):
    """Autograd Function of the reference. Inputs are 4-D: q [B, H, n_q, D], k/v [B, H_kv, n_k, D]."""

    @staticmethod
    def forward(ctx, q, k, v, c, is_causal, scale, seed, block_rows, variant, stats, attn_mask, document_ids):
        B, H, n_q, _ = q.shape
        H_kv, n_k = k.shape[1], k.shape[2]
        G = H // H_kv
        cdt = compute_dtype(q.dtype)
        if q.device.type == "cpu":
            _resolve_vml_dispatch()  # before the first parallel exp/log (see there)
        kc, vc = k.to(cdt), v.to(cdt)
        out = torch.empty(B, H, n_q, v.shape[-1], dtype=cdt, device=q.device)
        lse = torch.empty(B, H, n_q, 1, dtype=cdt, device=q.device)
        R = block_rows or default_block_rows(B * H, n_k, n_q)
        for r0 in range(0, n_q, R):
            r1 = min(r0 + R, n_q)
            rows = torch.arange(r0, r1, device=q.device).repeat(G)
            nk = _visible_keys(n_k, r1 - 1, is_causal)
            allowed, bias = _block_masks(attn_mask, document_ids, r0, r1, nk, (B, H, n_q, n_k), H_kv, cdt)
            s = _scores(_block(q, r0, r1, H_kv).to(cdt), kc[:, :, :nk], scale, rows, is_causal, allowed, bias)
            m = s.amax(dim=-1, keepdim=True)
            m = m.masked_fill(m == float("-inf"), 0.0)  # a row with no visible key: p = 0 below, not NaN
            p = torch.exp(s - m)
            denom = p.sum(dim=-1, keepdim=True)
            seen = denom > 0
            out[:, :, r0:r1] = _unblock(torch.where(seen, torch.matmul(p, vc[:, :, :nk]) / denom, 0.0), H, r1 - r0)
            # +inf for an empty row: the backward's exp(s - lse) is then exp(-inf) = 0, so W = 0 and no gradient
            lse[:, :, r0:r1] = _unblock(torch.where(seen, m + torch.log(denom), float("inf")), H, r1 - r0)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.masks = (attn_mask, document_ids)
        ctx.params = (c, is_causal, scale, seed, R, variant, stats)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        c, is_causal, scale, seed, R, variant, stats = ctx.params
        attn_mask, document_ids = ctx.masks
        B, H, n_q, D = q.shape
        H_kv, n_k = k.shape[1], k.shape[2]
        G = H // H_kv
        cdt = out.dtype
        if q.device.type == "cpu":
            _resolve_vml_dispatch()
        kc, vc = k.to(cdt), v.to(cdt)
        go = grad_out.to(cdt)
        dq = torch.empty(B, H, n_q, D, dtype=cdt, device=q.device)
        dk = torch.zeros(B, H_kv, n_k, D, dtype=cdt, device=q.device)
        dv = torch.zeros(B, H_kv, n_k, v.shape[-1], dtype=cdt, device=q.device)
        heads = torch.arange(B * H, device=q.device).reshape(B, H, 1, 1)  # bh = b*H + query head
        for r0 in range(0, n_q, R):
            r1 = min(r0 + R, n_q)
            nr = r1 - r0
            rows = torch.arange(r0, r1, device=q.device).repeat(G)
            bh = _block(heads.expand(B, H, nr, 1), 0, nr, H_kv)
            qb = _block(q, r0, r1, H_kv).to(cdt)
            gob = _block(go, r0, r1, H_kv)
            nk = _visible_keys(n_k, r1 - 1, is_causal)
            kb, vb = kc[:, :, :nk], vc[:, :, :nk]
            allowed, bias = _block_masks(attn_mask, document_ids, r0, r1, nk, (B, H, n_q, n_k), H_kv, cdt)
            w = torch.exp(_scores(qb, kb, scale, rows, is_causal, allowed, bias) - _block(lse, r0, r1, H_kv))
            w_tilde, keep, _ = sampled_weights(w, c, seed, bh, rows, variant)
            if stats is not None:
                per_row = keep.sum(dim=-1)
                stats.rows += per_row.numel()
                stats.kept += int(per_row.sum())
                stats.max_row_kept = max(stats.max_row_kept, int(per_row.max()))
                stats.valid += int((w > 0).sum())
                stats.certain += int((keep & (c * w >= 1.0)).sum())
            delta = (gob * _block(out, r0, r1, H_kv)).sum(dim=-1, keepdim=True)  # D_i = dO_i . O_i, exact
            ds = w_tilde * (torch.matmul(gob, vb.transpose(-1, -2)) - delta)
            dv[:, :, :nk] += torch.matmul(w_tilde.transpose(-1, -2), gob)
            dq[:, :, r0:r1] = _unblock(torch.matmul(ds, kb) * scale, H, nr)
            dk[:, :, :nk] += torch.matmul(ds.transpose(-1, -2), qb) * scale
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)) + (None,) * 9


def sus_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c: float,
    is_causal: bool,
    scale: float,
    seed: int,
    block_rows: int | None = None,
    variant: str = "bernoulli",
    stats: SusStats | None = None,
    *,
    attn_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference SUS attention on validated 4-D inputs (see `chainfree.ops.sus.sus_attention` for the public API).

    `seed` fixes every draw of the backward; `block_rows` the query rows per block (None = ~2^21 entries);
    `attn_mask` (SDPA's: bool True = may attend, or additive float) and `document_ids` ([B, n] or a
    (q_ids, k_ids) pair; a negative id is padding) mask pairs on top of `is_causal` (module docstring).
    A float attn_mask gets no gradient (use SDPA to learn an additive bias).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    B, H, n_q, _ = q.shape
    check_attn_mask(attn_mask, B, H, n_q, k.shape[2], q.device)
    ids = normalize_document_ids(document_ids, B, n_q, k.shape[2])
    if ids is not None and ids[0].device != q.device:
        ids = (ids[0].to(q.device), ids[1].to(q.device))
    mask = attn_mask.detach() if attn_mask is not None else None
    return SusAttentionFunction.apply(q, k, v, c, is_causal, scale, seed, block_rows, variant, stats, mask, ids)


__all__ = [
    "VARIANTS",
    "SusAttentionFunction",
    "SusStats",
    "check_attn_mask",
    "dense_mask",
    "normalize_document_ids",
    "sampled_weights",
    "sus_attention_reference",
]
