"""Tile-sampled SUS attention (`chainfree.ops.sus_tile`): exact forward, unbiased tile-sampled backward.

CPU tests run the float64 reference path; statistical tests use z-scores from the measured spread of many
independent draws with a family-wise bound (Bonferroni over the tested entries, total error < 1e-3), and
each has a power check that the same statistic rejects a small error. The Triton kernels are checked on
the CPU under TRITON_INTERPRET=1 (a subprocess, tiny shapes) and on CUDA against the reference given the
same π and keep set (`gpu` marker).
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from statistics import NormalDist

import pytest
import torch

from chainfree.ops import sus_tile as st
from chainfree.ops.sus_tile_reference import forward_reference, tile_backward_reference, tile_statistic

F64 = torch.float64


def _problem(b, h, h_kv, n, d, seed, doc=False, n_k=None, dtype=F64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n_k = n_k or n
    # a shared positional component makes the attention concentrate near the diagonal, as in real models
    pos = torch.randn(1, 1, max(n, n_k), d, generator=g, dtype=F64)
    pos = torch.cumsum(pos, 2) / math.sqrt(max(n, n_k)) * 3
    q = torch.randn(b, h, n, d, generator=g, dtype=F64) + pos[:, :, :n]
    k = torch.randn(b, h_kv, n_k, d, generator=g, dtype=F64) + pos[:, :, :n_k]
    v = torch.randn(b, h_kv, n_k, d, generator=g, dtype=F64)
    ids = None
    if doc:
        ids = torch.sort(torch.randint(0, 3, (b, n), generator=g)).values
        ids[:, -2:] = -1  # padding keys: no pair; their query rows see no key
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)] + [None if ids is None else ids.to(device)]


def _oracle(q, k, v, causal, ids, scale=None):
    """Plain masked softmax attention (rows without an allowed key output 0)."""
    h = q.shape[1]
    kk, vv = (x.repeat_interleave(h // x.shape[1], 1) for x in (k, v))
    scale = scale or q.shape[-1] ** -0.5
    s = q @ kk.transpose(-1, -2) * scale
    n_q, n_k = q.shape[2], k.shape[2]
    mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
    if causal:
        mask = mask.tril()
    mask = mask[None, None]
    if ids is not None:
        mask = mask & ((ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0))[:, None]
    s = s.masked_fill(~mask, -math.inf)
    w = torch.softmax(s, -1)
    w = torch.where(mask.any(-1, keepdim=True), w, 0.0).masked_fill(~mask, 0.0)
    return w @ vv


def _grads(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, do)


CASES = [  # (B, H, Hkv, n, D, tile, causal, doc)
    (1, 2, 2, 24, 4, 4, True, False),
    (2, 4, 2, 23, 4, 5, True, False),  # GQA, tail
    (1, 2, 1, 20, 6, 6, False, False),  # non-causal, GQA, tail
    (2, 2, 2, 21, 4, 4, True, True),  # document ids with padding (rows without keys)
    (1, 2, 2, 18, 4, 4, False, True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("proposal", ["exact", "rows2"])
def test_forward_exact_and_huge_c_gives_exact_gradients(case, proposal, one_thread):
    b, h, h_kv, n, d, tile, causal, doc = case
    q, k, v, ids = _problem(b, h, h_kv, n, d, seed=1, doc=doc)
    do = torch.randn(b, h, n, d, dtype=F64)
    kw = dict(c=1e300, is_causal=causal, enable_gqa=True, tile=tile, document_ids=ids, proposal=proposal)
    out, grads = _grads(lambda q, k, v: st.sus_tile_attention(q, k, v, **kw), q, k, v, do)
    ref, ref_grads = _grads(lambda q, k, v: _oracle(q, k, v, causal, ids), q, k, v, do)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-12, rtol=0), (got - want).abs().max()
    if doc:  # rows whose query has no key: output 0 and no gradient
        empty = ids < 0
        assert out[empty[:, None].expand(b, h, n)].abs().max() == 0
        assert grads[0][empty[:, None].expand(b, h, n)].abs().max() == 0


def test_pi_one_everywhere_is_exact(one_thread):
    """π = 1 on every tile (keep all) gives autograd's gradients, independent of the statistic."""
    b, h, h_kv, n, d, tile = 1, 4, 2, 19, 8, 3
    q, k, v, _ = _problem(b, h, h_kv, n, d, seed=2)
    do = torch.randn(b, h, n, d, dtype=F64)
    o, lse = forward_reference(q, k, v, True, d**-0.5)
    tq = -(-n // tile)
    pi = torch.ones(b, h, tq, tq, dtype=F64)
    keep = torch.ones(b, h, tq, tq, dtype=torch.bool)
    grads = tile_backward_reference(q, k, v, o, lse, do, pi, keep, is_causal=True, scale=d**-0.5, tile=tile)
    _, want = _grads(lambda q, k, v: _oracle(q, k, v, True, None), q, k, v, do)
    for got, w in zip(grads, want, strict=True):
        assert torch.allclose(got, w, atol=1e-12, rtol=0)


def _z_bound(n_tests: int, family_error: float = 1e-3) -> float:
    return NormalDist().inv_cdf(1 - family_error / (2 * n_tests))


@pytest.mark.parametrize("proposal", ["exact", "rows2"])
def test_inclusion_frequency_equals_pi(proposal, one_thread):
    """Each tile is kept with frequency π (z-test over 4000 independent backward draws)."""
    n_draws = 4000
    b, h, h_kv, n, d, tile = 1, 2, 1, 40, 4, 4
    q, k, v, ids = _problem(b, h, h_kv, n, d, seed=3, doc=True)
    o, lse = forward_reference(q, k, v, True, d**-0.5, ids, ids)
    rep = lambda x: x.expand(n_draws, *x.shape[1:])  # noqa: E731
    torch.manual_seed(0)
    pi, keep = st.sample_tiles(
        rep(q), rep(k), rep(lse), c=1.0, is_causal=True, scale=d**-0.5, tile=tile,
        row_stride=st.proposal_stride(proposal), pi_min=0.05, q_ids=rep(ids), k_ids=rep(ids),
    )  # fmt: skip
    pi = pi[0]
    assert torch.equal(pi, st.sample_tiles(q, k, lse, c=1.0, is_causal=True, scale=d**-0.5, tile=tile,
                                            row_stride=st.proposal_stride(proposal), pi_min=0.05, q_ids=ids,
                                            k_ids=ids)[0][0])  # fmt: skip
    freq = keep.double().mean(0)
    random = (pi > 0) & (pi < 1)
    assert random.sum() >= 5, "the test needs tiles with 0 < π < 1"
    assert not keep[:, pi == 0].any() and keep[:, pi == 1].all()
    se = torch.sqrt(pi * (1 - pi) / n_draws)[random]
    z = ((freq[random] - pi[random]) / se).abs()
    bound = _z_bound(int(random.sum()))
    assert z.max() < bound, (z.max(), bound)
    wrong = (pi * 1.1).clamp(max=1)[random]  # power: a 10 % error in π is rejected
    assert ((freq[random] - wrong) / se).abs().max() > bound


@pytest.mark.parametrize("case", CASES[1:4])
@pytest.mark.parametrize("proposal", ["exact", "rows2"])
def test_gradients_unbiased(case, proposal, one_thread):
    """Mean of 3000 independent tile-sampled gradients = exact gradient (per-entry z-test, Bonferroni)."""
    n_draws = 3000
    b, h, h_kv, n, d, tile, causal, doc = case
    q, k, v, ids = _problem(1, h, h_kv, n, d, seed=4, doc=doc)
    do = torch.randn(1, h, n, d, dtype=F64, generator=torch.Generator().manual_seed(5))
    rep = lambda x: None if x is None else x.repeat(n_draws, *([1] * (x.dim() - 1)))  # noqa: E731
    torch.manual_seed(1)
    kw = dict(c=2.0, is_causal=causal, enable_gqa=True, tile=tile, document_ids=rep(ids), proposal=proposal,
              pi_min=0.1)  # fmt: skip
    _, grads = _grads(lambda q, k, v: st.sus_tile_attention(q, k, v, **kw), rep(q), rep(k), rep(v), rep(do))
    _, exact = _grads(lambda q, k, v: _oracle(q, k, v, causal, ids), q, k, v, do)
    zs, zs_wrong, n_tests = [], [], 0
    density = None
    for got, want in zip(grads, exact, strict=True):
        got = got.view(n_draws, *want.shape[1:])
        mean, sd = got.mean(0), got.std(0)
        fixed = sd < 1e-12  # entries whose every tile had π = 1 (or no tile): exact in each draw
        assert torch.allclose(mean[fixed], want[0][fixed], atol=1e-10, rtol=0)
        se = sd[~fixed] / math.sqrt(n_draws)
        zs.append(((mean[~fixed] - want[0][~fixed]) / se).abs())
        zs_wrong.append(((mean[~fixed] - 0.9 * want[0][~fixed]) / se).abs())
        n_tests += int((~fixed).sum())
        density = fixed.double().mean() if density is None else density
    assert n_tests > 20, "the test needs random entries"
    bound = _z_bound(n_tests)
    assert torch.cat(zs).max() < bound, (torch.cat(zs).max(), bound)
    assert torch.cat(zs_wrong).max() > bound  # power: a 10 % bias is rejected


def test_generator_and_manual_seed_reproduce(one_thread):
    q, k, v, _ = _problem(1, 2, 2, 20, 4, seed=6)
    do = torch.randn(1, 2, 20, 4, dtype=F64)
    f = lambda gen: _grads(  # noqa: E731
        lambda q, k, v: st.sus_tile_attention(q, k, v, c=1.0, is_causal=True, tile=4, generator=gen), q, k, v, do
    )[1]
    a, b = f(torch.Generator().manual_seed(3)), f(torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    torch.manual_seed(9)
    a = f(None)
    torch.manual_seed(9)
    b = f(None)
    c = f(None)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_compile_fullgraph_no_recompile(one_thread):
    """torch.compile traces the custom ops without a graph break; new draws do not recompile; same seed = eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v, _ = _problem(1, 4, 2, 20, 4, seed=7)
    do = torch.randn(1, 4, 20, 4, dtype=F64)

    def f(q, k, v):
        return st.sus_tile_attention(q, k, v, c=1.0, is_causal=True, enable_gqa=True, tile=4) * 2.0

    counter = CompileCounterWithBackend("aot_eager")
    fc = torch.compile(f, backend=counter, fullgraph=True)
    for step in range(3):
        torch.manual_seed(step)
        _, got = _grads(fc, q, k, v, do)
        torch.manual_seed(step)
        _, want = _grads(f, q, k, v, do)
        assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
    assert counter.frame_count == 1


def test_statistic_and_proposal(one_thread):
    """m̂ with row stride s is the max over rows I·T + r·s; stride 1 = the exact statistic ≥ every proposal."""
    q, k, v, _ = _problem(1, 2, 2, 22, 4, seed=8)
    o, lse = forward_reference(q, k, v, True, 0.5)
    w = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(~torch.ones(22, 22).tril().bool(), -math.inf), -1)
    exact = tile_statistic(q, k, lse, is_causal=True, scale=0.5, tile=4)
    sub = tile_statistic(q, k, lse, is_causal=True, scale=0.5, tile=4, row_stride=3)
    for i in range(6):
        for j in range(6):
            rows = list(range(4 * i, min(22, 4 * i + 4)))
            mass = w[0, 1, rows][:, 4 * j : 4 * j + 4].sum(-1)
            assert torch.isclose(exact[0, 1, i, j], mass.max(), atol=1e-14)
            assert torch.isclose(sub[0, 1, i, j], mass[::3].max(), atol=1e-14)
    assert (sub <= exact + 1e-15).all()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernels_match_reference_in_triton_interpreter():
    """The Triton statistics and backward kernels under TRITON_INTERPRET=1 = the reference (same π, keep)."""
    script = textwrap.dedent(
        """
        import torch
        from chainfree.ops import sus_tile as st
        from chainfree.ops.sus_tile_reference import forward_reference, tile_backward_reference, tile_statistic
        torch.manual_seed(0)
        cases = [(1, 2, 1, 40, 16, 16, True, False, 1, 2, 0), (1, 1, 1, 37, 16, 16, False, False, 4, 16, 1),
                 (2, 1, 1, 37, 16, 16, True, True, 1, 1, 0), (1, 2, 1, 40, 16, 32, True, False, 8, 1, 1),
                 (1, 1, 1, 45, 16, 32, False, False, 1, 2, 0)]
        worst = 0.0
        for b, h, hkv, n, d, tile, causal, doc, stride, seg, flat in cases:
            q, k, v = (torch.randn(b, x, n, d).half() for x in (h, hkv, hkv))
            ids = torch.sort(torch.randint(0, 3, (b, n))).values if doc else None
            if doc:
                ids[:, -3:] = -1
            o, lse = forward_reference(q.double(), k.double(), v.double(), causal, d**-0.5, ids, ids)
            o, lse = o.half(), lse.float()
            m_ref = tile_statistic(q.double(), k.double(), lse.double(), is_causal=causal, scale=d**-0.5,
                                   tile=tile, q_ids=ids, k_ids=ids, row_stride=stride)
            m = st.tile_stats(q, k, lse, is_causal=causal, scale=d**-0.5, tile=tile, row_stride=stride,
                              q_ids=ids, k_ids=ids, use_kernel=True)
            assert (m.double() - m_ref).abs().max() < 2e-3, (m.double() - m_ref).abs().max()
            pi = st.keep_probs(m_ref.float(), 2.0, n_q=n, n_k=n, tile=tile, is_causal=causal,
                               row_stride=stride, pi_min=0.1, q_ids=ids, k_ids=ids)
            keep = torch.rand(pi.shape) < pi
            do = torch.randn_like(o)
            want = tile_backward_reference(q.double(), k.double(), v.double(), o.double(), lse.double(),
                                           do.double(), pi.double(), keep, is_causal=causal, scale=d**-0.5,
                                           tile=tile, q_ids=ids, k_ids=ids)
            got = st.tile_backward(q, k, v, o, lse, do, pi, keep, is_causal=causal, scale=d**-0.5, tile=tile,
                                   q_ids=ids, k_ids=ids, use_kernel=True, segment=seg,
                                   configs=((16, 16, 4, 3, flat, flat), (16, 16, 4, 3, flat, 1 - flat)))
            for a, w in zip(got, want):
                err = ((a.double() - w).norm() / w.norm()).item()
                worst = max(worst, err)
                assert err < 3e-3, err
        for b, h, hkv, tq, tk, seg in [(2, 4, 2, 5, 7, 2), (1, 8, 2, 6, 6, 64)]:  # Triton plan = torch plan
            keep = torch.rand(b, h, tq, tk) < 0.4
            g = h // hkv
            for cols in (False, True):
                got = st._lists_triton(keep, cols, hkv, seg)
                k2 = (keep.reshape(b, hkv, g, tq, tk).permute(0, 1, 4, 2, 3).reshape(b * hkv * tk, g * tq) if cols
                      else keep.reshape(b * h * tq, tk))
                want = st._lists(k2, seg)
                assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]) and got[6] == want[6]
                total = int(got[5])
                assert total == int(want[5])
                for lst in range(k2.shape[0]):
                    assert torch.equal(got[0][lst, : got[1][lst]], want[0][lst, : want[1][lst]])
                assert sorted(zip(got[3][:total].tolist(), got[4][:total].tolist())) == sorted(
                    zip(want[3][:total].tolist(), want[4][:total].tolist()))
        print("worst", worst)
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_CASES = [  # (B, H, Hkv, n, D, causal, doc, dtype): each kernel specialisation once (compile time)
    (1, 4, 4, 1024, 128, True, False, torch.bfloat16),
    (2, 4, 2, 1000, 64, True, False, torch.float16),  # GQA, tail
    (1, 4, 4, 777, 128, False, False, torch.bfloat16),  # non-causal, tail
    (2, 4, 2, 900, 64, False, False, torch.bfloat16),
    (2, 4, 2, 1100, 64, True, True, torch.bfloat16),  # document ids, GQA, tail
    (1, 2, 2, 640, 128, False, True, torch.float16),
]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_kernel_matches_reference(case):
    """Forward = float64 attention to the dtype's rounding; statistics and backward kernels = the reference
    (fp32 from the same rounded inputs) given the same π and keep set."""
    b, h, h_kv, n, d, causal, doc, dtype = case
    q, k, v, ids = _problem(b, h, h_kv, n, d, seed=11, doc=doc, device="cuda")
    ql, kl, vl = (x.to(dtype) for x in (q, k, v))
    assert st.supports(ql, kl, vl, 128, causal)
    scale = d**-0.5
    o, lse = st._fwd_op(ql, kl, vl, 1.0, causal, scale, 128, 1, 0.0, ids, ids, None)
    o64, lse64 = forward_reference(ql.double(), kl.double(), vl.double(), causal, scale, ids, ids)
    ok = torch.isfinite(lse64)
    assert ((o.double() - o64).norm() / o64.norm()) < (2e-2 if dtype == torch.bfloat16 else 3e-3)
    assert (lse.double()[ok] - lse64[ok]).abs().max() < 2e-2
    assert torch.equal(torch.isinf(lse), ~ok)
    for stride in (1, 8):
        m = st.tile_stats(ql, kl, lse, is_causal=causal, scale=scale, tile=128, row_stride=stride, q_ids=ids, k_ids=ids)
        m_ref = tile_statistic(ql.float(), kl.float(), lse.float(), is_causal=causal, scale=scale, tile=128,
                               q_ids=ids, k_ids=ids, row_stride=stride)  # fmt: skip
        assert (m - m_ref).abs().max() < 1e-3
    pi = st.keep_probs(m_ref, 2.0, n_q=n, n_k=n, tile=128, is_causal=causal, row_stride=8, pi_min=0.1,
                       q_ids=ids, k_ids=ids)  # fmt: skip
    keep = torch.rand(pi.shape, device="cuda") < pi
    do = torch.randn_like(ql)
    got = st.tile_backward(ql, kl, vl, o, lse, do, pi, keep, is_causal=causal, scale=scale, tile=128,
                           q_ids=ids, k_ids=ids, segment=2)  # fmt: skip
    want = tile_backward_reference(ql.float(), kl.float(), vl.float(), o.float(), lse, do.float(), pi, keep,
                                   is_causal=causal, scale=scale, tile=128, q_ids=ids, k_ids=ids)  # fmt: skip
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for a, w in zip(got, want, strict=True):
        assert a.dtype == dtype
        assert ((a.float() - w).norm() / w.norm()) < tol


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_huge_c_equals_sdpa(causal):
    """c = 1e30 (every tile with mass kept at π = 1) gives SDPA's gradients to bf16 rounding."""
    q, k, v, _ = _problem(1, 8, 2, 1500, 128, seed=12, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(q)
    _, got = _grads(lambda q, k, v: st.sus_tile_attention(q, k, v, c=1e30, is_causal=causal, enable_gqa=True),
                    q, k, v, do)  # fmt: skip
    _, want = _grads(
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
        q.double(), k.double(), v.double(), do.double(),
    )  # fmt: skip
    for a, w in zip(got, want, strict=True):
        assert ((a.double() - w).norm() / w.norm()) < 2e-2


@pytest.mark.gpu
@cuda
def test_gpu_triton_plan_matches_torch_plan():
    """The Triton list-building kernels give the torch plan's lists and segments (and do not fall back)."""
    import warnings

    keep = torch.rand(2, 8, 37, 37, device="cuda") < 0.3
    for cols in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = st._lists_triton(keep, cols, 2, 5)
        k2 = (
            keep.reshape(2, 2, 4, 37, 37).permute(0, 1, 4, 2, 3).reshape(2 * 2 * 37, 4 * 37)
            if cols
            else keep.view(-1, 37)
        )
        want = st._lists(k2, 5)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        total = int(got[5])
        assert total == int(want[5])
        mask = torch.arange(k2.shape[1], device="cuda")[None, :] < got[1][:, None]
        assert torch.equal(got[0][mask], want[0][mask])
        pairs = lambda t, n=total: sorted(zip(t[3][:n].tolist(), t[4][:n].tolist(), strict=True))  # noqa: E731
        assert pairs(got) == pairs(want)
