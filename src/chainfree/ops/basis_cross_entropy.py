"""Chunked linear head + cross-entropy whose weight gradient is a BASIS sketch.

Why a separate op: the LM head feeds the loss, and the memory-light loss
(chainfree.ops.cross_entropy.linear_cross_entropy) must keep the head input h [N, d] anyway, because
the softmax gradient dlogits = softmax(h W^T) - onehot depends on h itself. So for the head BASIS
cannot save memory -- any CE backward needs h (or the N x V logits) -- but it does replace the
N x V x d weight-gradient GEMM by a rank-R estimate, and the paper sketches the head, so the
reproduction needs it. Keeping the chunked loss (instead of calling the head as a module, which
would materialise [N, V] fp32 logits) keeps exact and BASIS on the same loss code.

Tiling: rows in chunks of `chunk_rows` (logits chunk <= 2^24 elements), as in linear_cross_entropy.
Saved tensors: h, weight (parameter), bias, targets, per-row fp32 log-sum-exp -- the same as the
exact op. Backward recomputes each chunk's logits, forms its dlogits g_c, writes dh_c = g_c W
(exact) and accumulates the sketch S[:, c] g_c (R x V) and ||g_c||^2; the h sketch S h and ||h||^2
are accumulated in the same loop. dW = (1 - shrink)^2 gamma_g gamma_h (S g)^T (S h); db is exact.
The draw happens once per backward and serves both factors.
"""

from __future__ import annotations

import torch

from chainfree.ops.basis_sketch import GAMMA_EPS, SketchPlan, draw_plan, resolve_rank, sketch, sketch_block_ref
from chainfree.ops.cross_entropy import LinearCrossEntropy, _accum_dtype, _chunk_rows, logit_grad_chunks


def _block_sketch(m: torch.Tensor, plan: SketchPlan, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S[:, start:stop] m in the accumulation dtype, ||m||^2) for a chunk of consecutive rows.

    A chunk that starts on a group boundary is a plan of its own (the fused kernel on CUDA);
    otherwise the signed rows are index-added into their buckets.
    """
    acc = _accum_dtype(m.dtype)
    if start % plan.rank == 0:
        sk, stats, _ = sketch(m, plan.rows_slice(start, start + m.shape[0]))
        return sk.to(acc), stats[0]
    return sketch_block_ref(m.to(acc), plan, start), torch.linalg.vector_norm(m, dtype=acc).square()


class BasisLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows, rank, compression, shrink, scalars):
        # The forward (and what it saves) is exactly the exact op's; only the backward differs.
        loss = LinearCrossEntropy.forward(ctx, h, weight, bias, targets, chunk_rows)
        ctx.sketch = (resolve_rank(h.shape[0], rank, compression), shrink, scalars)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets, lse, count = ctx.saved_tensors
        cd, rows = ctx.cd, ctx.chunk_rows
        rank, shrink, scalars = ctx.sketch
        acc = _accum_dtype(cd)
        w = weight.to(cd)
        b = bias.to(acc) if ctx.has_bias else None
        scale = grad_out.to(acc) / count
        n = h.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[:2]
        dh = torch.empty_like(h) if need_dh else None
        db = torch.zeros(weight.shape[0], device=weight.device, dtype=acc) if ctx.has_bias else None
        if need_dw:
            plan = draw_plan(n, rank, h.device, like=h)
            g_sketch = torch.zeros(plan.rank, weight.shape[0], device=h.device, dtype=acc)
            h_sketch = torch.zeros(plan.rank, weight.shape[1], device=h.device, dtype=acc)
            g_sq = torch.zeros((), device=h.device, dtype=acc)
            h_sq = torch.zeros((), device=h.device, dtype=acc)
        for start, _stop, hc, g in logit_grad_chunks(h, w, b, targets, lse, scale, rows, cd, acc):
            gc = g.to(cd)
            if dh is not None:
                dh[start:_stop] = (gc @ w).to(h.dtype)
            if need_dw:
                for total, sq, m in ((g_sketch, g_sq, gc), (h_sketch, h_sq, hc)):
                    part, part_sq = _block_sketch(m, plan, start)
                    total += part
                    sq += part_sq
            if db is not None:
                db += g.sum(0)
        dw = None
        if need_dw:
            factor = (1.0 - shrink) ** 2
            if scalars:
                gamma_g = g_sq.sqrt() / (torch.linalg.vector_norm(g_sketch) + GAMMA_EPS)
                gamma_h = h_sq.sqrt() / (torch.linalg.vector_norm(h_sketch) + GAMMA_EPS)
                factor = factor * gamma_g * gamma_h
            dw = (g_sketch.to(cd).T @ h_sketch.to(cd)).to(acc).mul_(factor).to(weight.dtype)
        return (dh, dw, db.to(bias.dtype) if db is not None else None, *(None,) * 6)


def basis_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rank: int | None,
    shrink: float = 0.01,
    scalars: bool = True,
    chunk_rows: int = 0,
    compression: float | None = None,
) -> torch.Tensor:
    """Mean CE of softmax(h W^T + b) against targets; dW from sketches (rank or compression), dh and db exact."""
    h2 = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1)
    if h2.shape[0] != t.shape[0]:
        raise ValueError(f"hidden rows ({h2.shape[0]}) and targets ({t.shape[0]}) differ in number")
    rows = chunk_rows or _chunk_rows(weight.shape[0])
    return BasisLinearCrossEntropy.apply(h2, weight, bias, t, rows, rank, compression, shrink, scalars)
