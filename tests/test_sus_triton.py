"""GPU tests of the SUS Triton kernels (skipped without CUDA; run them on the device machine).

v1 (the default, 'bernoulli' contract, sampled in the backward) and v2 ('thinned', sampled in the forward)
are each checked against the PyTorch reference draw for draw.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chainfree.ops.sus_reference import capacities, sus_attention_reference
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
@pytest.mark.parametrize("kernel", ["v2", "v1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,H_kv,n,D,causal", SHAPES)
def test_forward_matches_sdpa(B, H, H_kv, n, D, causal, dtype, kernel):
    """Output error vs a float64 oracle is within 2x of SDPA's own error (+ one rounding unit), with the
    forward sampling (inputs need grad) and without."""
    q, k, v, _ = _inputs(B, H, H_kv, n, D, dtype, seed=n)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != H_kv)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=H != H_kv)
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for grad in (False, True):
        leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        out = sus_attention_triton(*leaves, c=8.0, is_causal=causal, enable_gqa=H != H_kv, seed=1, kernel=kernel)
        assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
        assert _rel(out, ref) <= 2 * _rel(sdpa, ref) + unit


def _grads_given_keep(q, k, v, do, keep, c, causal, scale):
    """Float64 SUS gradients for a given keep mask [B, H, n_q, n_k] (W~ = W/q on kept entries, D_i exact)."""
    G = q.shape[1] // k.shape[1]
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    ke, ve = k64.repeat_interleave(G, 1), v64.repeat_interleave(G, 1)
    s = q64 @ ke.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    w = torch.softmax(s, -1)
    wt = torch.where(keep, w / torch.clamp(c * w, max=1.0).clamp(min=1e-300), 0.0)
    delta = (do64 * (w @ ve)).sum(-1, keepdim=True)
    ds = wt * (do64 @ ve.transpose(-1, -2) - delta)
    dq = ds @ ke * scale
    dk = (ds.transpose(-1, -2) @ q64 * scale).unflatten(1, (k.shape[1], G)).sum(2)
    dv = (wt.transpose(-1, -2) @ do64).unflatten(1, (k.shape[1], G)).sum(2)
    return dq, dk, dv


def _kernel_keep(q, k, v, c, causal, seed, caps):
    """The v2 kernel's keep mask for a seed: its kept lists, and the Bernoulli rule on its fallback rows."""
    from chainfree.ops import sus_triton as st
    from chainfree.ops.sus_random import keep_mask, sus_uniform

    B, H, n, D = q.shape
    scale = 1 / math.sqrt(D)
    _, lse, kept, cnt, _ = st.v2_forward(q, k, v, c, causal, scale, seed, caps)
    keep = torch.zeros(B * H * n, k.shape[2], dtype=torch.int32, device="cuda")
    slots = torch.arange(kept.shape[1], device="cuda")[None, :] < cnt.clamp(min=0)[:, None]
    keep = keep.scatter_add(1, torch.where(slots, kept, 0).long(), slots.int()) > 0
    G = H // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    w = torch.exp(s - lse.double().view(B, H, n, 1)).float()
    bh = torch.arange(B * H, device="cuda").view(B, H, 1, 1)
    ar = torch.arange(n, device="cuda")
    bern, _ = keep_mask(sus_uniform(seed, bh, ar[:, None], torch.arange(k.shape[2], device="cuda")[None, :]), w, c)
    fallback = (cnt < 0).view(B, H, n, 1)
    return torch.where(fallback, bern, keep.view(B, H, n, -1))


def _grad_check(B, H, H_kv, n, D, causal, dtype, caps):
    """Kernel gradients = float64 gradients of the kernel's own draws (to the dtype's rounding), and those
    draws = the reference's for the same seed except in a few rows (fp32 rounding of W and of the prefix
    sums can flip a decision that sits within rounding of its threshold)."""
    c, seed = 6.0, 987654
    q, k, v, do = _inputs(B, H, H_kv, n, D, dtype, seed=n + 1, spread=1.5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kw = {"cap": caps[1], "cand_cap": caps[0]} if caps else {}
    out = sus_attention_triton(*leaves, c=c, is_causal=causal, enable_gqa=H != H_kv, seed=seed, kernel="v2", **kw)
    out.backward(do)
    ref_leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    ref = sus_attention_reference(*ref_leaves, c, causal, 1 / math.sqrt(D), seed, variant="thinned", caps=caps)
    ref.backward(do.float())
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert got.grad.dtype == dtype and torch.isfinite(got.grad).all()
        assert _rel(got.grad, want.grad) < 3e-2  # a handful of flipped decisions among ~n*H*c pairs
    keep = _kernel_keep(q, k, v, c, causal, seed, caps or capacities(c, n))
    exact = _grads_given_keep(q, k, v, do, keep, c, causal, 1 / math.sqrt(D))
    tol = 1.5e-2 if dtype == torch.bfloat16 else 3e-3
    for got, want in zip(leaves, exact, strict=True):
        assert _rel(got.grad, want) < tol


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,H_kv,n,D,causal", SHAPES[1:])
@pytest.mark.parametrize("caps", [None, (16, 4), (512, 2)])
def test_v2_gradients_match_reference_same_seed(B, H, H_kv, n, D, causal, dtype, caps):
    """Same seed => the same 'thinned' draws as the PyTorch reference (float32 on the same values).

    caps (cand_cap, cap) = (16, 4) sends most rows through both fallback rules (candidate mass above the
    buffer, more kept than cap); (512, 2) only the second: those rows are re-drawn with the Bernoulli rule
    in the backward, exactly as the reference prescribes."""
    _grad_check(B, H, H_kv, n, D, causal, dtype, caps)


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
def test_v2_kept_lists_follow_the_contract(causal):
    """The forward's kept lists: ascending keys, causal mask respected, count <= cap, E[count] = sum q
    (z-test over all rows), per-key counts = the transposed lists, and equal to the reference's kept set."""
    from chainfree.ops import sus_triton as st
    from chainfree.ops.sus_random import sus_uniform
    from chainfree.ops.sus_reference import SYSTEMATIC_COLUMN, thinned_keep

    B, H, n, D, c, seed = 1, 4, 700, 64, 12.0, 4242
    q, k, v, _ = _inputs(B, H, H, n, D, torch.bfloat16, seed=5, spread=1.5)
    scale = 1 / math.sqrt(D)
    caps = capacities(c, n)
    o, lse, kept, cnt, keycnt = st.v2_forward(q, k, v, c, causal, scale, seed, caps)
    assert (cnt >= 0).all() and (cnt <= caps[1]).all()
    slots = torch.arange(caps[1], device="cuda")[None, :] < cnt[:, None]
    keys = torch.where(slots, kept, -1)
    assert (torch.diff(keys, dim=1)[slots[:, 1:]] > 0).all()
    rows = torch.arange(B * H * n, device="cuda") % n
    if causal:
        assert (keys <= rows[:, None]).all()
    owner = (torch.arange(B * H * n, device="cuda") // n * n)[:, None].expand_as(keys)  # key id = head * n + j
    per_key = torch.bincount((keys + owner)[slots], minlength=B * H * n)
    assert torch.equal(per_key.int(), keycnt)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    w = torch.exp(s - lse.view(B, H, n, 1))
    qq = torch.clamp(c * w, max=1.0).reshape(B * H * n, n)
    z = (cnt.double().sum() - qq.double().sum()) / (qq * (1 - qq)).double().sum().sqrt()
    assert abs(z) < 5
    bh = torch.arange(B * H, device="cuda").view(B, H, 1, 1)
    ar = torch.arange(n, device="cuda")
    u_row = sus_uniform(seed, bh, ar[:, None], torch.tensor(SYSTEMATIC_COLUMN, device="cuda"))
    u = sus_uniform(seed, bh, ar[:, None], ar[None, :])
    ref_keep, _, _ = thinned_keep(w, c, u_row, u, caps)
    mine = torch.zeros(B * H * n, n, dtype=torch.int32, device="cuda")
    mine = mine.scatter_add(1, keys.clamp(min=0).long(), slots.int()) > 0
    differ = (mine != ref_keep.reshape(B * H * n, n)).any(1)
    assert differ.sum() <= 3  # fp32 rounding of W and of the prefix sums, see _grad_check


@cuda
@pytest.mark.parametrize("kernel", ["v2", "v1"])
@pytest.mark.parametrize("causal", [True, False])
def test_large_c_is_exact_attention_backward(kernel, causal):
    """c = 1e30 keeps every entry with q = 1, W~ = W: the kernel must give SDPA's exact gradients."""
    B, H, H_kv, n, D = 1, 4, 2, 200, 64
    q, k, v, do = _inputs(B, H, H_kv, n, D, torch.float16, seed=7)
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.double().clone().requires_grad_() for t in (q, k, v)]
    sus_attention_triton(*a, c=1e30, is_causal=causal, enable_gqa=True, seed=5, kernel=kernel).backward(do)
    F.scaled_dot_product_attention(*b, is_causal=causal, enable_gqa=True).backward(do.double())
    for x, y in zip(a, b, strict=True):
        assert _rel(x.grad, y.grad) < 3e-3


@cuda
@pytest.mark.parametrize("caps", [None, (4, 96)])
def test_v2_unbiased_against_exact(caps):
    """Mean over seeds of SUS gradients -> exact gradients, also with the candidate-mass fallback forced
    (cand_cap 4: rows with sum a > 3 re-drawn by the Bernoulli rule; a switch that depends on W only).

    Statistic: ||mean - exact||^2 / sum(var / N) per tensor, which has expectation 1 for an unbiased
    estimator (the exact gradient is the kernel's own c = 1e30 gradient, so rounding bias cancels).
    Element correlations widen its spread; a missing 1/q reweighting gives values in the hundreds.
    """
    B, H, n, D, c, N = 1, 2, 96, 32, 3.0, 400
    q, k, v, do = _inputs(B, H, H, n, D, torch.float16, seed=11, spread=1.5)
    kw = {"cap": caps[1], "cand_cap": caps[0]} if caps else {}

    def grads(cc, seed):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        sus_attention_triton(*leaves, c=cc, is_causal=True, seed=seed, kernel="v2", **kw).backward(do)
        return torch.cat([t.grad.float().flatten() for t in leaves])

    exact = grads(1e30, 0)
    draws = torch.stack([grads(c, s) for s in range(N)])
    mean, var = draws.mean(0), draws.var(0)
    sizes = [t.numel() for t in (q, k, v)]
    for m, e, s2 in zip(mean.split(sizes), exact.split(sizes), var.split(sizes), strict=True):
        ratio = ((m - e) ** 2).sum() / (s2 / N).sum()
        assert ratio < 2.0, ratio


@cuda
def test_long_row_uses_buffers_without_fallback():
    """n = 8192 at c = 32 (realistic buffer sizes): no row falls back, the kept count stays near c."""
    from chainfree.ops import sus_triton as st

    q, k, v, _ = _inputs(1, 2, 2, 8192, 128, torch.bfloat16, seed=3)
    _, _, _, cnt, keycnt = st.v2_forward(q, k, v, 32.0, True, 1 / math.sqrt(128), 77, None)
    assert (cnt >= 0).all()
    assert 20 < cnt[4096:].float().mean() <= 32.5
    assert int(keycnt.sum()) == int(cnt.sum())


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
        sus_attention_triton(q, q, q, kernel="v9")
    assert supports(q, q) and not supports(bad, bad) and not supports(q.float(), q.float())
