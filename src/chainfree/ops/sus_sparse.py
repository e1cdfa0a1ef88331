"""PyTorch port of the SUS Triton backward's data layout: compacted kept pairs and the sparse pass.

Why this exists: the Triton kernels (`sus_triton.py`) cannot run on CPU, but their algorithm — sample
the kept pairs of each query row into a CAP-slot buffer, then compute dQ/dK/dV from the buffer by
gathers and scatter-adds, redoing overflowed rows densely — can. This port uses the same layout
(row r = bh * n_q + i; idx int32 [rows, cap] ascending, un-clipped count int32 [rows]; W~ recomputed
per pair) and the same draws (`sampled_weights` of the reference), so CPU tests check that the layout
and the sparse pass reproduce the reference gradients exactly, including the overflow path.
The "words" sampler's intermediate layout (nonzero 16-key words per row) and its expansion into key
indices are ported too (`compact_kept_words`, `words_to_keys`).
It is O(rows * n_k) in memory (it samples densely): a test oracle, not a fast path.
"""

from __future__ import annotations

import torch

from chainfree.ops.sus_reference import sampled_weights


def compact_kept_pairs(keep: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact each row of a [rows, n_k] keep mask into (idx int32 [rows, cap], count int32 [rows]).

    Kept keys land in ascending order; count is the full number kept (may exceed cap: overflow). Unused
    slots hold 0 (the kernel leaves them unwritten; nothing reads past the count).
    """
    rows, n_k = keep.shape
    cnt = keep.sum(-1).to(torch.int32)
    pos = torch.cumsum(keep.to(torch.int64), -1) - 1
    r, j = (keep & (pos < cap)).nonzero(as_tuple=True)
    idx = torch.zeros(rows, cap, dtype=torch.int32, device=keep.device)
    idx[r, pos[r, j]] = j.to(torch.int32)
    return idx, cnt


def compact_kept_words(keep: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The "words" layout: each row's nonzero 16-key words as int32 entries (word index << 16) | bits, in
    ascending order, at most `cap` per row, and the un-clipped number of nonzero words (> cap: overflow)."""
    rows, n_k = keep.shape
    n_words = (n_k + 15) // 16
    padded = torch.zeros(rows, n_words * 16, dtype=torch.int64, device=keep.device)
    padded[:, :n_k] = keep.long()
    bits = (padded.reshape(rows, n_words, 16) << torch.arange(16, device=keep.device)).sum(-1)
    entries, cnt = compact_kept_pairs(bits != 0, cap)
    word_bits = torch.gather(bits, 1, entries.long())
    packed = torch.where(
        torch.arange(cap, device=keep.device)[None, :] < cnt[:, None].clamp(max=cap),
        (entries.long() << 16) | word_bits,
        0,
    )
    return packed.to(torch.int32), cnt


def words_to_keep(entries: torch.Tensor, cnt: torch.Tensor, n_k: int) -> torch.Tensor:
    """Dense [rows, n_k] keep mask of the entries of non-overflowed rows ("words" layout)."""
    rows, cap = entries.shape
    live = (torch.arange(cap, device=entries.device)[None, :] < cnt[:, None]) & (cnt <= cap)[:, None]
    e = entries.long()
    bit = ((e & 0xFFFF)[..., None] >> torch.arange(16, device=e.device)) & 1
    keys = (e >> 16)[..., None] * 16 + torch.arange(16, device=e.device)
    on = (bit == 1) & live[..., None]
    keep = torch.zeros(rows, ((n_k + 15) // 16) * 16, dtype=torch.bool, device=e.device)
    r = torch.arange(rows, device=e.device)[:, None, None].expand_as(keys)
    keep[r[on], keys[on]] = True
    return keep[:, :n_k]


def words_to_keys(entries: torch.Tensor, cnt: torch.Tensor, n_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The "words" sampler's second step (`_words_to_keys_kernel`): entries -> (key idx, key count) in the
    key layout of the same cap. Overflow marks: a row with more than cap nonzero words keeps its word count,
    one with more than cap kept keys gets its key count (both > cap, so the sparse pass re-draws them)."""
    cap = entries.shape[1]
    idx, keys = compact_kept_pairs(words_to_keep(entries, cnt, n_k), cap)
    return idx, torch.where(cnt > cap, cnt, keys).to(torch.int32)


def _row_weights(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, is_causal: bool, scale: float) -> torch.Tensor:
    """W [B, H, n_q, n_k] from q, k and the forward's LSE [B*H, n_q] (GQA: head h reads kv head h // G)."""
    B, H, n_q, _ = q.shape
    G = H // k.shape[1]
    s = q @ k.repeat_interleave(G, 1).transpose(-1, -2) * scale
    if is_causal:
        cols = torch.arange(k.shape[2], device=q.device)
        s = s.masked_fill(cols[None, :] > torch.arange(n_q, device=q.device)[:, None], float("-inf"))
    return torch.exp(s - lse.reshape(B, H, n_q, 1))


def sample_kept_pairs(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    c: float,
    is_causal: bool,
    scale: float,
    seed: int,
    cap: int,
    words: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward step 1: the kept keys of every row in the kernel's layout (same draws as the reference);
    `words` goes through the "words" sampler's intermediate layout (same keys, its own overflow marks)."""
    B, H, n_q, _ = q.shape
    w = _row_weights(q, k, lse, is_causal, scale)
    bh = torch.arange(B * H, device=q.device).reshape(B, H, 1, 1)
    _, keep, _ = sampled_weights(w, c, seed, bh, torch.arange(n_q, device=q.device), "bernoulli")
    keep = keep.reshape(B * H * n_q, -1)
    if words:
        return words_to_keys(*compact_kept_words(keep, cap), keep.shape[1])
    return compact_kept_pairs(keep, cap)


def sparse_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    idx: torch.Tensor,
    cnt: torch.Tensor,
    c: float,
    is_causal: bool,
    scale: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward step 2 from the kept keys: W~ = max(W, 1/c) recomputed per pair, dQ by gathers, dK/dV by
    scatter-adds; overflowed rows (count > cap) re-drawn densely. Computes in q's dtype (float64 in tests).
    """
    B, H, n_q, D = q.shape
    H_kv, n_k = k.shape[1], k.shape[2]
    G = H // H_kv
    cap = idx.shape[1]
    rows = B * H * n_q
    dof, qf = do.reshape(rows, D), q.reshape(rows, D)
    delta = (do * o).sum(-1).reshape(rows)  # D_i = dO_i . O_i, exact
    kv_row = torch.arange(B, device=q.device)[:, None] * H_kv + torch.arange(H, device=q.device)[None, :] // G
    kv_row = kv_row.reshape(B * H, 1).expand(B * H, n_q).reshape(rows, 1)
    w_full = _row_weights(q, k, lse, is_causal, scale).reshape(rows, n_k)
    overflow = cnt > cap
    slot_ok = (torch.arange(cap, device=q.device)[None, :] < cnt[:, None]) & ~overflow[:, None]
    w_pair = torch.gather(w_full, 1, idx.long()).clamp_min(1.0 / c)
    w = torch.where(slot_ok, w_pair, torch.zeros((), dtype=q.dtype, device=q.device))
    flat_key = (kv_row * n_k + idx.long()).reshape(-1)  # row of the [B*Hkv*n_k, D] K/V matrices
    kf, vf = k.reshape(-1, D), v.reshape(-1, D)
    kg, vg = kf[flat_key].reshape(rows, cap, D), vf[flat_key].reshape(rows, cap, D)
    ds = w * ((vg * dof[:, None, :]).sum(-1) - delta[:, None])
    dq = (ds[..., None] * kg).sum(1) * scale
    dk = torch.zeros_like(kf).index_add_(0, flat_key, (ds[..., None] * qf[:, None, :] * scale).reshape(-1, D))
    dv = torch.zeros_like(vf).index_add_(0, flat_key, (w[..., None] * dof[:, None, :]).reshape(-1, D))
    if overflow.any():  # the kernel's dense fallback: re-draw the whole row, same hashes
        bh = (torch.arange(rows, device=q.device) // n_q)[:, None]
        i = torch.arange(rows, device=q.device) % n_q
        r = overflow.nonzero(as_tuple=True)[0]
        w_t, _, _ = sampled_weights(w_full[r], c, seed, bh[r], i[r], "bernoulli")
        keys = kv_row[r] * n_k + torch.arange(n_k, device=q.device)[None, :]
        ds_r = w_t * ((vf[keys] * dof[r, None, :]).sum(-1) - delta[r, None])
        dq[r] = (ds_r[..., None] * kf[keys]).sum(1) * scale
        dk.index_add_(0, keys.reshape(-1), (ds_r[..., None] * qf[r, None, :] * scale).reshape(-1, D))
        dv.index_add_(0, keys.reshape(-1), (w_t[..., None] * dof[r, None, :]).reshape(-1, D))
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


__all__ = [
    "compact_kept_pairs",
    "compact_kept_words",
    "sample_kept_pairs",
    "sparse_backward",
    "words_to_keep",
    "words_to_keys",
]
