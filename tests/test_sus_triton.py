"""GPU tests of the SUS per-pair Triton kernel (skipped without CUDA; run them on the device machine).

v1 ('bernoulli' contract, sampled in the backward) is checked against the PyTorch reference draw for draw.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chainfree.ops.sus_reference import sus_attention_reference
from chainfree.ops.sus_triton import row_capacity, supports, sus_attention_triton

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = [pytest.mark.gpu]


def _inputs(B, H, H_kv, n, D, dtype, seed=0, spread=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: (torch.randn(B, h, n, D, generator=g, device="cuda") * spread).to(dtype)
    return mk(H), mk(H_kv), mk(H_kv), torch.randn(B, H, n, D, generator=g, device="cuda").to(dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SHAPES = [  # B, H, H_kv, n, D, causal
    (1, 2, 2, 1, 64, True),
    (2, 3, 3, 77, 32, True),
    (1, 4, 2, 300, 64, True),
    (1, 2, 2, 257, 128, False),
    (2, 8, 2, 1000, 128, True),
    (1, 2, 1, 130, 32, False),
]


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,H_kv,n,D,causal", SHAPES)
def test_forward_matches_sdpa(B, H, H_kv, n, D, causal, dtype):
    """Output error vs a float64 oracle is within 2x of SDPA's own error (+ one rounding unit), with inputs
    that need grad and without."""
    q, k, v, _ = _inputs(B, H, H_kv, n, D, dtype, seed=n)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != H_kv)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=H != H_kv)
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for grad in (False, True):
        leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        out = sus_attention_triton(*leaves, c=8.0, is_causal=causal, enable_gqa=H != H_kv, seed=1)
        assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
        assert _rel(out, ref) <= 2 * _rel(sdpa, ref) + unit


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,H_kv,n,D,causal", SHAPES[1:])
@pytest.mark.parametrize("cap", [None, 4])
def test_v1_gradients_match_reference_same_seed(B, H, H_kv, n, D, causal, dtype, cap):
    """v1: same seed => the same 'bernoulli' draws as the reference. Kept sets can differ only where u_ij lies
    within float32 rounding of q_ij (expected count ~1e-6 n c), so gradients agree to the dtype's rounding.
    cap=4 forces row-buffer overflow: those rows take the kernel's dense re-draw path."""
    c, seed = 6.0, 987654
    q, k, v, do = _inputs(B, H, H_kv, n, D, dtype, seed=n + 1, spread=1.5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sus_attention_triton(*leaves, c=c, is_causal=causal, enable_gqa=H != H_kv, seed=seed, cap=cap, kernel="v1")
    out.backward(do)
    ref_leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    ref = sus_attention_reference(*ref_leaves, c, causal, 1 / math.sqrt(D), seed)
    ref.backward(do.float())
    tol = 1.5e-2 if dtype == torch.bfloat16 else 3e-3
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert got.grad.dtype == dtype and torch.isfinite(got.grad).all()
        assert _rel(got.grad, want.grad) < tol


@cuda
@pytest.mark.parametrize("sampler", ["prefix", "words"])
@pytest.mark.parametrize("causal", [True, False])
def test_kept_pairs_match_reference_draws(sampler, causal):
    """The sampler's compacted pairs equal the PyTorch port's (same layout, same hashes; "words" through its
    intermediate layout in both)."""
    from chainfree.ops import sus_sparse
    from chainfree.ops import sus_triton as st

    B, H, n, D, c, seed = 1, 4, 333, 64, 5.0, 31337
    q, k, v, _ = _inputs(B, H, H, n, D, torch.bfloat16, seed=3)
    scale = 1 / math.sqrt(D)
    _, lse = st.flash_forward(q, k, v, causal, scale)
    cap = row_capacity(c, n)
    idx, cnt = st.sample_kept_pairs(q, k, lse, c, causal, scale, seed, cap, sampler=sampler)
    idx_r, cnt_r = sus_sparse.sample_kept_pairs(
        q.float().cpu(), k.float().cpu(), lse.cpu(), c, causal, scale, seed, cap, words=sampler == "words"
    )
    same = cnt.cpu() == cnt_r
    assert (~same).sum() <= 2  # see the rounding argument above
    slots = torch.arange(cap)[None, :] < cnt_r[:, None].clamp(max=cap)
    rows = (same & (cnt_r <= cap))[:, None] & slots  # overflowed rows' slots are never read
    assert torch.equal(idx.cpu()[rows], idx_r[rows])


@cuda
@pytest.mark.parametrize("causal", [True, False])
def test_large_c_is_exact_attention_backward(causal):
    """c = 1e30 keeps every entry with q = 1, W~ = W: the kernel must give SDPA's exact gradients."""
    B, H, H_kv, n, D = 1, 4, 2, 200, 64
    q, k, v, do = _inputs(B, H, H_kv, n, D, torch.float16, seed=7)
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.double().clone().requires_grad_() for t in (q, k, v)]
    sus_attention_triton(*a, c=1e30, is_causal=causal, enable_gqa=True, seed=5).backward(do)
    F.scaled_dot_product_attention(*b, is_causal=causal, enable_gqa=True).backward(do.double())
    for x, y in zip(a, b, strict=True):
        assert _rel(x.grad, y.grad) < 3e-3


@cuda
@pytest.mark.parametrize("cap", [None, 4])
def test_v1_unbiased_against_exact(cap):
    """Mean over seeds of SUS gradients -> exact gradients, also with row-buffer overflow forced (cap 4:
    those rows take the kernel's dense re-draw path).

    Statistic: ||mean - exact||^2 / sum(var / N) per tensor, which has expectation 1 for an unbiased
    estimator (the exact gradient is the kernel's own c = 1e30 gradient, so rounding bias cancels).
    Element correlations widen its spread; a missing 1/q reweighting gives values in the hundreds.
    """
    B, H, n, D, c, N = 1, 2, 96, 32, 3.0, 400
    q, k, v, do = _inputs(B, H, H, n, D, torch.float16, seed=11, spread=1.5)

    def grads(cc, seed):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        sus_attention_triton(*leaves, c=cc, is_causal=True, seed=seed, cap=cap).backward(do)
        return torch.cat([t.grad.float().flatten() for t in leaves])

    exact = grads(1e30, 0)
    draws = torch.stack([grads(c, s) for s in range(N)])
    mean, var = draws.mean(0), draws.var(0)
    sizes = [t.numel() for t in (q, k, v)]
    for m, e, s2 in zip(mean.split(sizes), exact.split(sizes), var.split(sizes), strict=True):
        ratio = ((m - e) ** 2).sum() / (s2 / N).sum()
        assert ratio < 2.0, ratio


@cuda
def test_input_errors():
    q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        sus_attention_triton(q.cpu(), q.cpu(), q.cpu())
    with pytest.raises(TypeError, match="bfloat16"):
        sus_attention_triton(q.float(), q.float(), q.float())
    bad = torch.randn(1, 2, 16, 48, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dim"):
        sus_attention_triton(bad, bad, bad)
    with pytest.raises(ValueError, match="enable_gqa"):
        sus_attention_triton(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="kernel"):
        sus_attention_triton(q, q, q, kernel="v2")  # removed (dominated at every measured shape)
    assert supports(q, q) and not supports(bad, bad) and not supports(q.float(), q.float())
