"""The 'thinned' SUS contract (the GPU kernel's): inclusion probabilities, unbiased gradients, variance against
independent Bernoulli keeps at the same c, kept-count bounds, and the fallback rule, on the PyTorch reference."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from chainfree.ops.sus import sus_attention
from chainfree.ops.sus_random import sus_uniform
from chainfree.ops.sus_reference import SYSTEMATIC_COLUMN, TILE, capacities, sampled_weights, thinned_keep

Z_MAX = 5.0  # two-sided normal tail 5.7e-7 per entry; over a few thousand entries, family-wise error < 2e-3


def _weights(rows: int, n: int, seed: int, late: float = 1.0) -> torch.Tensor:
    """Softmax rows over n keys whose scores grow with the key index (mass arrives late, so the running
    normaliser of early tiles is far below the final one and a >> q there)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, n, generator=g, dtype=torch.float64) + late * torch.linspace(0, 3, n, dtype=torch.float64)
    return torch.softmax(s, -1)


def _draws(w: torch.Tensor, c: float, K: int, caps=None) -> tuple[torch.Tensor, torch.Tensor]:
    """keep [K, rows, n] for K independent draws (distinct bh per draw) and q."""
    bh = torch.arange(K).view(K, 1, 1)
    rows = torch.arange(w.shape[0])
    _, keep, q = sampled_weights(w.expand(K, *w.shape), c, 12345, bh, rows, "thinned", caps)
    return keep, q[0]


def test_running_rate_bounds_q_and_tiles():
    """a_ij = min(1, c W_ij / F_i(t(j))) >= q_ij, equal to q on the last tile, and F is per tile of TILE keys."""
    w = _weights(6, 3 * TILE + 10, 0)
    u = torch.full_like(w, 0.5)
    _, _, a = thinned_keep(w, 4.0, u[:, :1], u, (10**6, 10**6))
    q = torch.clamp(4.0 * w, max=1.0)
    assert (a >= q - 1e-15).all()
    torch.testing.assert_close(a[:, 3 * TILE :], q[:, 3 * TILE :])
    f0 = w[:, :TILE].sum(-1, keepdim=True)
    torch.testing.assert_close(a[:, :TILE], torch.clamp(4.0 * w[:, :TILE] / f0, max=1.0))


def test_inclusion_probabilities_are_q():
    """Over K draws every entry is kept with frequency q_ij (per-entry z-test; CLT holds where K q (1-q) > 10)."""
    K, c = 6000, 4.0
    w = _weights(4, 150, 1)
    keep, q = _draws(w, c, K)
    freq = keep.double().mean(0)
    sd = (q * (1 - q) / K).sqrt()
    clt = K * q * (1 - q) > 10
    z = (freq - q)[clt] / sd[clt]
    assert clt.sum() > 300 and z.abs().max() < Z_MAX, z.abs().max()
    assert (freq[q == 0] == 0).all()
    # power: a 10% error in q is detected
    assert ((freq - 1.1 * q)[clt] / sd[clt]).abs().max() > Z_MAX


def test_kept_count_bounds():
    """Candidates per row <= ceil(sum_j a_ij) (systematic), kept <= candidates, E[kept] = sum_j q_ij <= c."""
    K, c = 400, 8.0
    w = _weights(16, 300, 2)
    bh = torch.arange(K).view(K, 1, 1)
    rows = torch.arange(16)
    u_row = sus_uniform(3, bh, rows[:, None], torch.tensor(SYSTEMATIC_COLUMN))
    u = sus_uniform(3, bh, rows[:, None], torch.arange(300)[None, :])
    keep, cand, a = thinned_keep(w.expand(K, 16, 300), c, u_row, u, (10**6, 10**6))
    assert (cand.sum(-1) <= torch.ceil(a.sum(-1) - 1e-9)).all()
    assert (keep <= cand).all()
    q = torch.clamp(c * w, max=1.0)
    counts, mean = keep.sum(-1).double(), q.sum(-1)
    assert (mean <= c + 1e-9).all()
    var = (q * (1 - q)).sum(-1)  # Bernoulli variance: an upper bound for systematic + independent thinning
    z = (counts.mean(0) - mean) / (var / K).sqrt()
    assert z.abs().max() < Z_MAX


def _samples(variant: str, K: int, n: int, c: float):
    g = torch.Generator().manual_seed(7)
    H, D = 1, 8
    q, k, v = (torch.randn(1, H, n, D, generator=g, dtype=torch.float64) * s for s in (1.0, 1.0, 1.0))
    k = k + torch.linspace(0, 2, n, dtype=torch.float64)[:, None] * q.mean(2, keepdim=True)  # mass arrives late
    go = torch.randn(1, H, n, D, generator=g, dtype=torch.float64)
    reps = [x.repeat(K, 1, 1, 1).requires_grad_() for x in (q, k, v)]
    out = sus_attention(*reps, is_causal=True, c=c, variant=variant, generator=torch.Generator().manual_seed(2))
    samples = torch.autograd.grad(out, reps, go.repeat(K, 1, 1, 1))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    exact = torch.autograd.grad(F.scaled_dot_product_attention(*leaves, is_causal=True), leaves, go)
    return [s.view(K, *e.shape) for s, e in zip(samples, exact, strict=True)], exact


@pytest.mark.slow
def test_gradients_unbiased_and_variance_not_above_bernoulli():
    """Mean of K thinned gradients = exact (z-test per entry), and the summed gradient variance is no larger
    than independent Bernoulli keeps' at the same c (same problem, K draws each).

    Variance comparison: each total variance is estimated from K draws with relative standard error
    <= sqrt(2/(K-1)) (Gaussian bound; the sum over entries only lowers it), so the ratio of two independent
    estimates exceeds 1 + 5 sqrt(4/(K-1)) with probability < 1e-6 when the true ratio is <= 1."""
    K, n, c = 1024, 140, 3.0
    thinned, exact = _samples("thinned", K, n, c)
    bern, _ = _samples("bernoulli", K, n, c)
    for s, e in zip(thinned, exact, strict=True):
        mean, sd = s.mean(0), s.std(0)
        live = sd > 1e-12
        z = (mean - e)[live] / (sd[live] / math.sqrt(K))
        assert z.numel() > 0 and z.abs().max() < Z_MAX, z.abs().max()
        assert (mean - e)[~live].abs().max() < 1e-10 if (~live).any() else True
    ratio = sum(s.var(0).sum() for s in thinned) / sum(b.var(0).sum() for b in bern)
    assert ratio < 1 + 5 * math.sqrt(4 / (K - 1)), ratio


def test_fallback_rows_follow_bernoulli_exactly():
    """A row whose candidate mass exceeds cand_cap - 1, or with more than cap kept, keeps exactly the
    Bernoulli rule's set for the same draws; other rows are untouched."""
    c = 6.0
    w = _weights(32, 200, 3)
    bh = torch.zeros((), dtype=torch.int64)
    rows = torch.arange(32)
    u_row = sus_uniform(9, bh, rows[:, None], torch.tensor(SYSTEMATIC_COLUMN))
    u = sus_uniform(9, bh, rows[:, None], torch.arange(200)[None, :])
    free, _, a = thinned_keep(w, c, u_row, u, (10**6, 10**6))
    bern = (u < torch.clamp(c * w, max=1.0)) | (c * w >= 1)
    cut = float(a.sum(-1).median())
    capped, _, _ = thinned_keep(w, c, u_row, u, (int(cut) + 1, 10**6))
    over = a.sum(-1) > int(cut)
    assert over.any() and (~over).any()
    assert torch.equal(capped[over], bern[over])
    assert torch.equal(capped[~over], free[~over])
    few, _, _ = thinned_keep(w, c, u_row, u, (10**6, 4))
    spill = free.sum(-1) > 4
    assert spill.any()
    assert torch.equal(few[spill], bern[spill]) and torch.equal(few[~spill], free[~spill])


def test_default_capacities():
    cand, cap = capacities(32.0, 16384)
    assert cap == 96 and cand % 16 == 0 and cand >= 32 * (2 + math.log(256))
    assert capacities(32.0, 50) == (64, 50)  # short rows: n_k + 1 candidates (rounded up) can never overflow


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (run with TRITON_INTERPRET=1)")
def test_kernel_matches_reference_in_triton_interpreter(monkeypatch):
    """The v2 Triton kernels under TRITON_INTERPRET=1 on CPU give the reference's gradients (same draws)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU")
    from chainfree.ops import sus_triton as st
    from chainfree.ops.sus_reference import sus_attention_reference

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, n, D, c, seed = 1, 2, 1, 90, 32, 4.0, 77
    q, k, v, do = (torch.randn(B, h, n, D, generator=g).to(torch.float16) for h in (H, Hkv, Hkv, H))
    for caps in (capacities(c, n), (16, 3)):
        o, lse, kept, cnt, keycnt = st.v2_forward(q, k, v, c, True, D**-0.5, seed, caps)
        grads = st.v2_backward(q, k, v, o, do, lse, kept, cnt, keycnt, c, True, D**-0.5, seed)
        leaves = [t.float().requires_grad_() for t in (q, k, v)]
        sus_attention_reference(*leaves, c, True, D**-0.5, seed, variant="thinned", caps=caps).backward(do.float())
        for got, ref in zip(grads, leaves, strict=True):
            assert ((got.double() - ref.grad.double()).norm() / ref.grad.double().norm()) < 3e-3
