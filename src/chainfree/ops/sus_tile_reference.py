"""PyTorch reference of tile-sampled SUS attention (SPEC §2b): tile statistics, keep probabilities, backward.

Per batch × query head, query tile I (rows I·T .. I·T+T−1) × key tile J (keys J·T .. J·T+T−1), T = `tile`:

    W_ij  = exp(s_ij − lse_i)                     exact softmax weights (0 where the pair is masked)
    m_IJ  = max_{i ∈ I} Σ_{j ∈ J} W_ij            tile mass (`tile_statistic`, row_stride = 1)
    π_IJ  = min(1, c · m̂_IJ), floored at π_min on tiles that may hold an allowed pair (`tile_probs`)
    keep_IJ ~ Bernoulli(π_IJ), independent per tile, head and step
    W̃_ij  = W_ij · keep_IJ / π_IJ
    dV = W̃ᵀ dO;  dP = dO Vᵀ;  D_i = dO_i · O_i (exact);  dS = W̃ ∘ (dP − D);  dQ = scale·dS K;  dK = scale·dSᵀ Q

Every gradient is linear in the explicit W̃ and E[W̃] = W wherever π > 0 on tiles with mass, so the gradients
are unbiased; tiles with π = 1 are exact. Why the row maximum: on a tile with π < 1 every row's kept weights
then sum to at most Σ_{j∈J} W_ij / π_IJ ≤ m_IJ / (c·m_IJ) = 1/c, the tile analogue of per-pair SUS's bound
W_ij/q_ij ≤ 1/c, so no single row's gradient can be amplified beyond 1/c of a full softmax row.
m̂ is either the exact statistic or a proposal: the same statistic over every `row_stride`-th query row
only (rows I·T + r·s); any m̂ gives an unbiased estimator provided π > 0 wherever the tile has mass, which
the floor π_min guarantees for a proposal.

Masks: causal is top-left aligned like SDPA (key j visible to query i iff j ≤ i); tails (n not a multiple of
T) are masked; `q_ids`/`k_ids` (document ids, [B, n_q] / [B, n_k]) allow pair (i, j) iff
q_ids[i] == k_ids[j] and k_ids[j] ≥ 0. A row with no allowed key has output 0, LSE = +inf and zero gradient.
"""

from __future__ import annotations

import math

import torch

ROW_BLOCK_ELEMS = 1 << 22  # score entries per block of query rows in the blocked loops below


def _ids(document_ids, b: int, n_q: int, n_k: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(q_ids [B, n_q], k_ids [B, n_k]) int64 from an int tensor [B, n] or a pair, or (None, None)."""
    if document_ids is None:
        return None, None
    if isinstance(document_ids, tuple | list):
        q_ids, k_ids = document_ids
    else:
        q_ids = k_ids = document_ids
    q_ids = torch.as_tensor(q_ids, device=device).long()
    k_ids = torch.as_tensor(k_ids, device=device).long()
    if q_ids.dim() == 1:
        q_ids = q_ids.unsqueeze(0)
    if k_ids.dim() == 1:
        k_ids = k_ids.unsqueeze(0)
    if q_ids.shape != (b, n_q) and q_ids.shape != (1, n_q):
        raise ValueError(f"query document ids must be [B, n_q] = [{b}, {n_q}], got {tuple(q_ids.shape)}")
    if k_ids.shape != (b, n_k) and k_ids.shape != (1, n_k):
        raise ValueError(f"key document ids must be [B, n_k] = [{b}, {n_k}], got {tuple(k_ids.shape)}")
    return q_ids.expand(b, n_q).contiguous(), k_ids.expand(b, n_k).contiguous()


def pair_mask(
    rows: torch.Tensor,
    n_k: int,
    is_causal: bool,
    q_ids: torch.Tensor | None,
    k_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Allowed pairs for query rows `rows` (1-D index tensor) against all keys: bool [B or 1, 1, len(rows), n_k]."""
    cols = torch.arange(n_k, device=rows.device)
    allowed = torch.ones(len(rows), n_k, dtype=torch.bool, device=rows.device)
    if is_causal:
        allowed = cols[None, :] <= rows[:, None]
    allowed = allowed[None, None]
    if q_ids is not None and k_ids is not None:
        doc = (q_ids[:, rows, None] == k_ids[:, None, :]) & (k_ids[:, None, :] >= 0)
        allowed = allowed & doc[:, None]
    return allowed


def tile_allowed(
    b: int, n_q: int, n_k: int, tile: int, is_causal: bool, q_ids: torch.Tensor | None, k_ids: torch.Tensor | None,
    device=None,
) -> torch.Tensor:  # fmt: skip
    """Tiles that may hold an allowed pair: bool [B or 1, 1, Tq, Tk].

    Causal and tails are exact. Document ids use the overlap of the id ranges of the tile's queries and
    keys (keys with id < 0 left out): exact for sorted ids (packed sequences), a superset otherwise. A
    superset only costs work: a kept tile without allowed pairs contributes nothing.
    """
    tq, tk = -(-n_q // tile), -(-n_k // tile)
    i_last = torch.clamp((torch.arange(tq, device=device) + 1) * tile - 1, max=n_q - 1)
    j_first = torch.arange(tk, device=device) * tile
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if is_causal:
        allowed = j_first[None, :] <= i_last[:, None]
    allowed = allowed[None, None]
    if q_ids is not None and k_ids is not None:
        big = torch.iinfo(torch.int64).max
        qp = torch.nn.functional.pad(q_ids, (0, tq * tile - n_q), value=-1).view(b, tq, tile)
        kp = torch.nn.functional.pad(k_ids, (0, tk * tile - n_k), value=-1).view(b, tk, tile)
        q_valid = qp >= 0
        qmin = torch.where(q_valid, qp, big).amin(-1)
        qmax = torch.where(q_valid, qp, -1).amax(-1)
        k_valid = kp >= 0
        kmin = torch.where(k_valid, kp, big).amin(-1)
        kmax = torch.where(k_valid, kp, -1).amax(-1)
        overlap = (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
        allowed = allowed & overlap[:, None]
    return allowed


def _expand_kv(x: torch.Tensor, h: int) -> torch.Tensor:
    return x if x.shape[1] == h else x.repeat_interleave(h // x.shape[1], dim=1)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def forward_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float, q_ids=None, k_ids=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention: (O in q's dtype, LSE [B, H, n_q] in the accumulation dtype; +inf on rows without keys)."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    acc = _acc_dtype(q)
    kk, vv = _expand_kv(k, h).to(acc), _expand_kv(v, h).to(acc)
    o = torch.empty(b, h, n_q, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.empty(b, h, n_q, dtype=acc, device=q.device)
    step = max(1, ROW_BLOCK_ELEMS // max(1, h * n_k))
    for r0 in range(0, n_q, step):
        rows = torch.arange(r0, min(n_q, r0 + step), device=q.device)
        s = torch.matmul(q[:, :, rows].to(acc), kk.transpose(-1, -2)) * scale
        s = s.masked_fill(~pair_mask(rows, n_k, is_causal, q_ids, k_ids), -math.inf)
        m = torch.logsumexp(s, -1)
        empty = torch.isneginf(m)
        w = torch.exp(s - m.masked_fill(empty, 0.0)[..., None])
        o[:, :, rows] = torch.matmul(w, vv)
        lse[:, :, rows] = m.masked_fill(empty, math.inf)
    return o.to(q.dtype), lse


def _weights(q, k, lse, rows, is_causal, scale, q_ids, k_ids, acc) -> torch.Tensor:
    """Exact W for query rows `rows`: [B, H, len(rows), n_k] in `acc` (k already expanded to H heads)."""
    s = torch.matmul(q[:, :, rows].to(acc), k.transpose(-1, -2).to(acc)) * scale
    s = s.masked_fill(~pair_mask(rows, k.shape[2], is_causal, q_ids, k_ids), -math.inf)
    return torch.exp(s - lse[:, :, rows].to(acc)[..., None])


def tile_statistic(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    tile: int,
    q_ids: torch.Tensor | None = None,
    k_ids: torch.Tensor | None = None,
    row_stride: int = 1,
) -> torch.Tensor:
    """m̂_IJ = max over the rows I·T + r·row_stride (r = 0, 1, …, inside the tile and < n_q) of Σ_{j∈J} W_ij.

    row_stride = 1 is the exact tile mass m_IJ. Returns [B, H, Tq, Tk] in the accumulation dtype; 0 on tiles
    without an allowed pair (among the sampled rows).
    """
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    acc = _acc_dtype(q)
    tq, tk = -(-n_q // tile), -(-n_k // tile)
    kk = _expand_kv(k, h)
    out = torch.zeros(b, h, tq, tk, dtype=acc, device=q.device)
    tiles_per_block = max(1, ROW_BLOCK_ELEMS // max(1, h * n_k * tile))
    for i0 in range(0, tq, tiles_per_block):
        i1 = min(tq, i0 + tiles_per_block)
        rows = torch.arange(i0 * tile, min(n_q, i1 * tile), device=q.device)
        w = _weights(q, kk, lse, rows, is_causal, scale, q_ids, k_ids, acc)
        w = torch.nn.functional.pad(w, (0, tk * tile - n_k))
        mass = w.view(b, h, len(rows), tk, tile).sum(-1)  # [B, H, rows, Tk]
        sampled = ((rows % tile) % row_stride) == 0
        mass = mass.masked_fill(~sampled[None, None, :, None], 0.0)
        mass = torch.nn.functional.pad(mass, (0, 0, 0, (i1 - i0) * tile - len(rows)))
        out[:, :, i0:i1] = mass.view(b, h, i1 - i0, tile, tk).amax(3)
    return out


def tile_probs(m_hat: torch.Tensor, c: float, allowed: torch.Tensor, pi_min: float = 0.0) -> torch.Tensor:
    """π = min(1, c·m̂), at least `pi_min` on allowed tiles and 0 on the others (same shape as m̂, float32+)."""
    pi = torch.clamp(m_hat * c, max=1.0)
    if pi_min > 0:
        pi = torch.clamp(pi, min=pi_min)
    return torch.where(allowed, pi, torch.zeros((), dtype=pi.dtype, device=pi.device))


def draw_keep(
    pi: torch.Tensor, u: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """keep = u < π with u ~ U[0, 1) (π = 1 always kept, π = 0 never); `u` if given, else drawn on π's device."""
    if u is None:
        u = torch.rand(pi.shape, device=pi.device, generator=generator)
    return u < pi


def tile_backward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    pi: torch.Tensor,
    keep: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    tile: int,
    q_ids: torch.Tensor | None = None,
    k_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of the tile estimator with keep set `keep` and probabilities `pi` ([B, H, Tq, Tk]).

    Kept tiles carry weight 1/π on P and dS; GQA sums dK/dV over each kv head's query heads. Accumulates
    in float64 for float64 inputs, float32 otherwise; returns the inputs' dtypes.
    """
    b, h, n_q, _ = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    acc = _acc_dtype(q)
    kk, vv = _expand_kv(k, h).to(acc), _expand_kv(v, h).to(acc)
    dof, of = do.to(acc), o.to(acc)
    delta = (dof * of).sum(-1)  # [B, H, n_q]
    weight = torch.where(keep, 1.0 / torch.where(keep, pi, 1.0).to(acc), torch.zeros((), dtype=acc))
    dq = torch.zeros(b, h, n_q, q.shape[-1], dtype=acc, device=q.device)
    dk = torch.zeros(b, h, n_k, k.shape[-1], dtype=acc, device=q.device)
    dv = torch.zeros(b, h, n_k, v.shape[-1], dtype=acc, device=q.device)
    tiles_per_block = max(1, ROW_BLOCK_ELEMS // max(1, h * n_k * tile))
    tq = weight.shape[2]
    for i0 in range(0, tq, tiles_per_block):
        i1 = min(tq, i0 + tiles_per_block)
        rows = torch.arange(i0 * tile, min(n_q, i1 * tile), device=q.device)
        w = _weights(q, kk, lse, rows, is_causal, scale, q_ids, k_ids, acc)
        pair_w = weight[:, :, (rows // tile)].repeat_interleave(tile, dim=-1)[..., :n_k]
        wt = w * pair_w
        dv += wt.transpose(-1, -2) @ dof[:, :, rows]
        dp = dof[:, :, rows] @ vv.transpose(-1, -2)
        ds = wt * (dp - delta[:, :, rows, None])
        dq[:, :, rows] = scale * (ds @ kk)
        dk += scale * (ds.transpose(-1, -2) @ q[:, :, rows].to(acc))
    if h_kv != h:
        dk = dk.view(b, h_kv, h // h_kv, n_k, -1).sum(2)
        dv = dv.view(b, h_kv, h // h_kv, n_k, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


__all__ = [
    "draw_keep",
    "forward_reference",
    "pair_mask",
    "tile_allowed",
    "tile_backward_reference",
    "tile_probs",
    "tile_statistic",
]
