"""Linear head + cross-entropy computed in row chunks, never materialising the full [N, V] fp32 logits.

Why: at V=50k and N=16k tokens the fp32 logits alone are 3.2 GB, larger than every activation a method
like BASIS saves, so a naive loss hides all memory savings. Every method (exact included) uses this same
loss, so comparisons stay fair.

Saved for backward: the hidden states h [N, d], the head weight (a parameter, no copy), targets and the
per-row log-sum-exp [N] (fp32). Backward recomputes each chunk's logits once (one extra N×d×V matmul).
Numerics: logits are computed in the autocast dtype when autocast is on (else the input dtype) and
accumulated in fp32 for the softmax; dW is accumulated in fp32.

`keep_logit_grad=True` trades memory for passes: the forward keeps the logit gradient softmax - onehot
([N, V] in the compute dtype) and the backward is two matmuls, with no recomputation and ~4 instead of ~10
elementwise passes over each [rows, V] chunk. For losses evaluated on many small readouts at once (HBLL's
tree boundaries), where those passes dominate the step and N x V fits in memory.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


def _accum_dtype(cd: torch.dtype) -> torch.dtype:
    return torch.float64 if cd == torch.float64 else torch.float32


def _chunk_rows(vocab: int, budget_elems: int = 1 << 24) -> int:
    return max(1, budget_elems // max(vocab, 1))


def logit_grad_chunks(h, w, b, targets, lse, scale, rows, cd, acc):
    """Yield (start, stop, h_chunk, dlogits_chunk) with dlogits = scale * (softmax - onehot) per row chunk,
    recomputing each chunk's logits from h (cast to `cd`) and the saved log-sum-exp. Shared by every
    chunked-CE backward (exact here, sketched in basis_cross_entropy) so they differ only in what they
    do with each chunk's gradient."""
    for start in range(0, h.shape[0], rows):
        stop = min(start + rows, h.shape[0])
        hc = h[start:stop].to(cd)
        logits = (hc @ w.T).to(acc)
        if b is not None:
            logits = logits + b
        t = targets[start:stop]
        valid = (t != IGNORE_INDEX).to(acc).unsqueeze(1)
        g = torch.exp(logits - lse[start:stop, None])
        g.scatter_add_(1, t.clamp_min(0).unsqueeze(1), -torch.ones_like(g[:, :1]))
        yield start, stop, hc, g * valid * scale


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows):
        cd = _compute_dtype(h, weight)
        acc = _accum_dtype(cd)
        w = weight.to(cd)
        b = bias.to(acc) if bias is not None else None
        n = h.shape[0]
        lse = torch.empty(n, device=h.device, dtype=acc)
        total = torch.zeros((), device=h.device, dtype=acc)
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            logits = (h[start:stop].to(cd) @ w.T).to(acc)
            if b is not None:
                logits = logits + b
            t = targets[start:stop]
            valid = t != IGNORE_INDEX
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
            total += ((lse[start:stop] - picked) * valid).sum()
        count = (targets != IGNORE_INDEX).sum().clamp_min(1)
        ctx.save_for_backward(h, weight, bias if bias is not None else torch.empty(0), targets, lse, count)
        ctx.has_bias = bias is not None
        ctx.chunk_rows = chunk_rows
        ctx.cd = cd
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets, lse, count = ctx.saved_tensors
        cd, rows = ctx.cd, ctx.chunk_rows
        acc = _accum_dtype(cd)
        w = weight.to(cd)
        b = bias.to(acc) if ctx.has_bias else None
        scale = grad_out.to(acc) / count
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=acc) if ctx.needs_input_grad[1] else None
        db = torch.zeros(weight.shape[0], device=weight.device, dtype=acc) if ctx.has_bias else None
        for start, stop, hc, g in logit_grad_chunks(h, w, b, targets, lse, scale, rows, cd, acc):
            if dh is not None:
                dh[start:stop] = (g.to(cd) @ w).to(h.dtype)
            if dw is not None:
                dw += (g.to(cd).T @ hc).to(acc)
            if db is not None:
                db += g.sum(0)
        return (
            dh,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None,
            None,
            None,
        )


class SavedGradLinearCrossEntropy(torch.autograd.Function):
    """The same loss, keeping the logit gradient from the forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows):
        cd = _compute_dtype(h, weight)
        acc = _accum_dtype(cd)
        w = weight.to(cd)
        valid = targets != IGNORE_INDEX
        tgt = targets.clamp_min(0).unsqueeze(1)
        G = torch.empty((h.shape[0], w.shape[0]), device=h.device, dtype=cd)
        total = torch.zeros((), device=h.device, dtype=acc)
        for a in range(0, h.shape[0], chunk_rows):
            b = min(a + chunk_rows, h.shape[0])
            logits = h[a:b].to(cd) @ w.T
            if bias is not None:
                logits = logits.to(acc) + bias.to(acc)
            logp = torch.log_softmax(logits, dim=-1, dtype=acc)  # upcast inside the kernel: no extra pass
            total -= (logp.gather(1, tgt[a:b]).squeeze(1) * valid[a:b]).sum()
            g = logp.exp_()
            g.scatter_add_(1, tgt[a:b], -torch.ones_like(g[:, :1]))
            G[a:b] = g
        count = valid.sum().clamp_min(1)
        ctx.save_for_backward(h, w, G, valid, count)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        h, w, G, valid, count = ctx.saved_tensors
        scale = (grad_out / count).to(G.dtype)
        v = valid.to(G.dtype).unsqueeze(1) * scale  # zero ignored rows, scale on the small side
        dh = ((G @ w) * v).to(h.dtype) if ctx.needs_input_grad[0] else None
        dw = (G.T @ (h.to(G.dtype) * v)).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        db = (v.T @ G).squeeze(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dh, dw, db, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_rows: int = 0,
    keep_logit_grad: bool = False,
) -> torch.Tensor:
    """Mean CE of softmax(h Wᵀ + b) against targets (IGNORE_INDEX rows skipped). h: [..., d].
    keep_logit_grad: keep softmax - onehot from the forward instead of recomputing it (module docstring)."""
    h2 = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1)
    if h2.shape[0] != t.shape[0]:
        raise ValueError(f"hidden rows ({h2.shape[0]}) and targets ({t.shape[0]}) differ in number")
    fn = SavedGradLinearCrossEntropy if keep_logit_grad else LinearCrossEntropy
    return fn.apply(h2, weight, bias, t, chunk_rows or _chunk_rows(weight.shape[0]))
