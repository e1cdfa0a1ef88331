"""SSD scan: the chunked parallel form equals the sequential recurrence (values, final state, gradients) in
float64; it stays finite under extreme decays; bad shapes fail with a clear message."""

from __future__ import annotations

import pytest
import torch

from chainfree.ops.ssd import segsum, ssd_chunked, ssd_scan, ssd_sequential

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(b, l, h, p, g, n, R=None, seed=0, decay=2.0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    rank = () if R is None else (R,)
    x = torch.randn(b, l, *rank, h, p, generator=gen, dtype=f64)
    B = torch.randn(b, l, *rank, g, n, generator=gen, dtype=f64)
    C = torch.randn(b, l, *rank, g, n, generator=gen, dtype=f64)
    a = -decay * torch.rand(b, l, h, generator=gen, dtype=f64)
    h0 = torch.randn(b, h, p, n, generator=gen, dtype=f64)
    out = [x, a, B, C, h0]
    if requires_grad:
        for t in out:
            t.requires_grad_(True)
    return out


def test_segsum_definition():
    a = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=f64)
    S = segsum(a)
    for t in range(4):
        for s in range(4):
            expected = a[s + 1 : t + 1].sum() if s <= t else float("-inf")
            assert S[t, s].item() == pytest.approx(float(expected))


@pytest.mark.parametrize(
    "b,l,h,p,g,n,R,chunk",
    [
        (2, 37, 4, 3, 1, 5, None, 8),  # Mamba-2 layout: one B/C group shared by all heads, ragged last chunk
        (1, 32, 4, 3, 4, 6, None, 8),  # per-head B/C (Mamba-3 SISO), length a multiple of the chunk
        (2, 20, 4, 3, 2, 5, 3, 4),  # MIMO rank 3, two groups
        (2, 5, 2, 4, 1, 3, None, 16),  # chunk longer than the sequence
        (1, 9, 3, 2, 3, 4, 2, 1),  # chunk 1 (pure inter-chunk recurrence)
    ],
)
def test_chunked_equals_sequential(b, l, h, p, g, n, R, chunk):
    x, a, B, C, h0 = make_inputs(b, l, h, p, g, n, R)
    for init in (None, h0):
        y, final = ssd_chunked(x, a, B, C, chunk, init)
        y_ref, final_ref = ssd_sequential(x, a, B, C, init)
        assert y.shape == x.shape
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("R", [None, 2])
def test_chunked_gradients_equal_sequential(R):
    ins = make_inputs(2, 13, 4, 3, 2, 5, R, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    y, final = ssd_chunked(*ins[:4], 4, ins[4])
    wy, wf = torch.randn(y.shape, generator=gen, dtype=f64), torch.randn(final.shape, generator=gen, dtype=f64)
    grads = torch.autograd.grad((y * wy).sum() + (final * wf).sum(), ins)
    y_ref, final_ref = ssd_sequential(*ins[:4], ins[4])
    grads_ref = torch.autograd.grad((y_ref * wy).sum() + (final_ref * wf).sum(), ins)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_extreme_decay_stays_finite():
    """Per-step log-decays of -60 make exp(+sum) overflow if formed; the masked segsum never forms it."""
    x, a, B, C, _ = make_inputs(1, 40, 2, 3, 1, 4, requires_grad=False)
    a = (a * 0 - 60.0).requires_grad_(True)
    x.requires_grad_(True)
    y, final = ssd_chunked(x, a, B, C, 16)
    (y.sum() + final.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(a.grad).all() and torch.isfinite(x.grad).all()
    y_ref, _ = ssd_sequential(x.detach(), a.detach(), B, C)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-10, atol=1e-10)


def test_float32_close_to_float64():
    x, a, B, C, _ = make_inputs(2, 64, 4, 8, 1, 16)
    y64, _ = ssd_chunked(x, a, B, C, 16)
    y32, _ = ssd_chunked(x.float(), a.float(), B.float(), C.float(), 16)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_named():
    x, a, B, C, h0 = make_inputs(1, 8, 4, 3, 3, 5)
    with pytest.raises(ValueError, match="must divide the number of heads"):
        ssd_chunked(x, a, B, C, 4)
    x, a, B, C, h0 = make_inputs(1, 8, 4, 3, 2, 5)
    with pytest.raises(ValueError, match="a must be"):
        ssd_chunked(x, a[:, :4], B, C, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(x, a, B, C, 0)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, a, B, C, 4, h0[:, :2])
    with pytest.raises(ValueError, match="backend"):
        ssd_scan(x, a, B, C, 4, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_eager_and_compiled_match_cpu_reference():
    x, a, B, C, h0 = make_inputs(2, 200, 8, 16, 1, 32)
    y_ref, f_ref = ssd_sequential(x, a, B, C, h0)
    cuda = [t.cuda().float() for t in (x, a, B, C, h0)]
    for backend in ("torch", "compile"):
        y, f = ssd_scan(*cuda[:4], 64, cuda[4], backend=backend)
        torch.testing.assert_close(y.double().cpu(), y_ref, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(f.double().cpu(), f_ref, rtol=2e-3, atol=2e-3)


def test_shared_b_c_are_not_saved_per_head():
    """With one B/C group shared by all heads, autograd saves no tensor of B's or C's size times the head count
    (the head-expanded copies a broadcast matmul would make): n > chunk and p small, so only such a copy reaches
    b * l * h * n elements."""
    b, l, h, p, g, n, chunk = 2, 32, 8, 2, 1, 32, 4
    x, a, B, C, _ = make_inputs(b, l, h, p, g, n, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, final = ssd_chunked(x, a, B, C, chunk)
    assert max(sizes) < b * l * h * n, sorted(sizes)[-3:]
