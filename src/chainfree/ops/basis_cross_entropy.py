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
The (h, s) draw happens once per backward and serves both factors.
"""

from __future__ import annotations

import torch

from chainfree.ops.basis_linear import GAMMA_EPS, SIGN_MATRIX_MAX_RANK, SketchPlan, draw_plan
from chainfree.ops.cross_entropy import LinearCrossEntropy, _accum_dtype, _chunk_rows, logit_grad_chunks


def _block_sketcher(plan: SketchPlan):
    """f(m_c, start, stop) = S[:, start:stop] m_c: the sketch contribution of a block of rows.

    Small R: slice the dense (R x N) sign matrix and GEMM. Large R (where R x N would be big):
    signed index_add into the buckets of those rows.
    """
    if plan.rank <= SIGN_MATRIX_MAX_RANK:
        sign_matrix = plan.sign_matrix()
        return lambda m, start, stop: sign_matrix[:, start:stop].to(m.dtype) @ m
    buckets, signs = plan.buckets(), plan.row_signs()

    def index_add(m: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        out = m.new_zeros(plan.rank, m.shape[1])
        return out.index_add_(0, buckets[start:stop], m * signs[start:stop, None].to(m.dtype))

    return index_add


class BasisLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows, rank, shrink, scalars):
        # The forward (and what it saves) is exactly the exact op's; only the backward differs.
        loss = LinearCrossEntropy.forward(ctx, h, weight, bias, targets, chunk_rows)
        ctx.sketch = (rank, shrink, scalars)
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
            plan = draw_plan(n, rank, h.device, cd)
            sketch_block = _block_sketcher(plan)
            g_sketch = torch.zeros(plan.rank, weight.shape[0], device=h.device, dtype=acc)
            h_sketch = torch.zeros(plan.rank, weight.shape[1], device=h.device, dtype=acc)
            g_sq = torch.zeros((), device=h.device, dtype=acc)
            h_sq = torch.zeros((), device=h.device, dtype=acc)
        for start, stop, hc, g in logit_grad_chunks(h, w, b, targets, lse, scale, rows, cd, acc):
            gc = g.to(cd)
            if dh is not None:
                dh[start:stop] = (gc @ w).to(h.dtype)
            if need_dw:
                g_sketch += sketch_block(gc, start, stop).to(acc)
                h_sketch += sketch_block(hc, start, stop).to(acc)
                g_sq += torch.linalg.vector_norm(gc, dtype=acc) ** 2
                h_sq += torch.linalg.vector_norm(hc, dtype=acc) ** 2
            if db is not None:
                db += g.sum(0)
        dw = None
        if need_dw:
            factor = (1.0 - shrink) ** 2
            if scalars:
                gamma_g = g_sq.sqrt() / (torch.linalg.vector_norm(g_sketch) + GAMMA_EPS)
                gamma_h = h_sq.sqrt() / (torch.linalg.vector_norm(h_sketch) + GAMMA_EPS)
                factor = factor * gamma_g * gamma_h
            dw = (g_sketch.T @ h_sketch * factor).to(weight.dtype)
        return (
            dh,
            dw,
            db.to(bias.dtype) if db is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def basis_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rank: int,
    shrink: float = 0.01,
    scalars: bool = True,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """Mean CE of softmax(h W^T + b) against targets; dW from rank-R sketches, dh and db exact."""
    h2 = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1)
    if h2.shape[0] != t.shape[0]:
        raise ValueError(f"hidden rows ({h2.shape[0]}) and targets ({t.shape[0]}) differ in number")
    rows = chunk_rows or _chunk_rows(weight.shape[0])
    return BasisLinearCrossEntropy.apply(h2, weight, bias, t, rows, rank, shrink, scalars)
