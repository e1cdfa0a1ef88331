"""CPU tests of the SUS kernel's algorithm (PyTorch port in ops/sus_sparse.py) against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from chainfree.ops.sus_reference import sus_attention_reference
from chainfree.ops.sus_sparse import (
    compact_kept_pairs,
    compact_kept_words,
    sample_kept_pairs,
    sparse_backward,
    words_to_keep,
    words_to_keys,
)
from chainfree.ops.sus_triton import row_capacity


def _setup(B, H, H_kv, n, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, D, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(B, H_kv, n, D, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(B, H_kv, n, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    return q, k, v, do


def test_compaction_layout_and_overflow_counts():
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(50, 40, generator=g) < 0.2
    keep[3] = True  # a row that overflows any cap < 40
    idx, cnt = compact_kept_pairs(keep, cap=9)
    assert torch.equal(cnt, keep.sum(-1).to(torch.int32))
    for r in range(50):
        cols = keep[r].nonzero().flatten()[:9]
        m = len(cols)
        assert torch.equal(idx[r, :m].long(), cols)  # ascending key order, first `cap` kept
        assert torch.all(idx[r, m:] == 0)


def test_words_layout_round_trip_and_overflow():
    """ "words" entries: nonzero 16-key words of a row, ascending, (word << 16) | bits; count = nonzero words."""
    g = torch.Generator().manual_seed(2)
    keep = torch.rand(40, 75, generator=g) < 0.05
    keep[5] = True  # 5 nonzero words: overflows cap 3
    entries, cnt = compact_kept_words(keep, cap=3)
    words = keep.reshape(40, -1)[:, :75]
    nonzero = torch.stack([keep[:, w * 16 : (w + 1) * 16].any(1) for w in range(5)], 1)
    assert torch.equal(cnt, nonzero.sum(1).to(torch.int32))
    for r in range(40):
        live = entries[r, : min(int(cnt[r]), 3)].long()
        assert torch.equal(live >> 16, nonzero[r].nonzero().flatten()[:3])  # ascending word indices
        for e in live.tolist():
            w, bits = e >> 16, e & 0xFFFF
            assert bits == sum(1 << b for b in range(16) if w * 16 + b < 75 and bool(words[r, w * 16 + b]))
    back = words_to_keep(entries, cnt, 75)
    ok = cnt <= 3
    assert torch.equal(back[ok], keep[ok]) and not back[~ok].any()  # overflowed rows are left to the dense path
    idx, keys = words_to_keys(entries, cnt, 75)  # key layout of the same cap: overflow by words or by keys
    idx_direct, keys_direct = compact_kept_pairs(keep, 3)
    assert torch.equal(keys, torch.where(cnt > 3, cnt, keys_direct))
    live = torch.arange(3)[None, :] < keys.clamp(max=3)[:, None]
    assert torch.equal(idx[live & ok[:, None]], idx_direct[live & ok[:, None]])


@pytest.mark.parametrize("words", [False, True])
@pytest.mark.parametrize(
    "B,H,H_kv,n,causal,c,cap",
    [(2, 2, 2, 37, True, 4.0, None), (1, 4, 2, 29, False, 3.0, None), (1, 2, 1, 33, True, 2.0, 3)],
)
def test_sparse_pass_equals_reference_float64(B, H, H_kv, n, causal, c, cap, words):
    """Sampling into the row buffer (directly, or via the "words" layout) + sparse gathers/scatters == the
    reference backward, same seed.

    cap=3 (keys) / 1 (words) forces most rows to overflow, exercising the dense re-draw path of the kernel.
    """
    D, seed = 8, 4242
    scale = 1 / math.sqrt(D)
    q, k, v, do = _setup(B, H, H_kv, n, D)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    o = sus_attention_reference(qr, kr, vr, c, causal, scale, seed)
    o.backward(do)
    G = H // H_kv
    s = q @ k.repeat_interleave(G, 1).transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1).reshape(B * H, n)
    if cap and words:
        cap = 1  # a row spans at most 3 words of 16 keys here: cap 1 makes most of them overflow
    cap = cap or row_capacity(c, n)
    idx, cnt = sample_kept_pairs(q, k, lse, c, causal, scale, seed, cap, words=words)
    if cap <= 3:
        assert (cnt > cap).any() and (cnt <= cap).any()
    dq, dk, dv = sparse_backward(q, k, v, o.detach(), do, lse, idx, cnt, c, causal, scale, seed)
    for got, ref in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_row_capacity_bound():
    """The default capacity exceeds c by >= 8 sqrt(c) + 16 (Bernstein tail < 1e-15) and never exceeds n_k."""
    for c in (1.0, 16.0, 32.0, 64.0):
        cap = row_capacity(c, 10**6)
        assert cap >= c + 8 * math.sqrt(c) + 16 and cap % 16 == 0
        t = cap - c  # P(count >= c + t) <= exp(-t^2 / (2 (c + t/3))) for variance <= c
        assert math.exp(-t * t / (2 * (c + t / 3))) < 1e-15
    assert row_capacity(32.0, 10) == 10


def test_attention_bench_needs_cuda(tmp_path):
    """The speed benchmark refuses to run without a GPU instead of timing something meaningless."""
    from chainfree.bench.attention import run_attention_bench

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        run_attention_bench([256], [64], [8.0], out_dir=tmp_path)
