"""Suffix scan over affine maps vs the sequential recursion (float64)."""

import math

import pytest
import torch

from chainfree.ops.scan import adjoints, compose, suffix_scan, suffix_scan_sequential


def _maps(k: int, batch: tuple[int, ...], n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, *batch, n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    b = torch.randn(k, *batch, n, generator=g, dtype=torch.float64)
    return a, b


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 13])
@pytest.mark.parametrize("batch", [(), (3,), (2, 4)])
def test_suffix_scan_matches_sequential(k, batch):
    a, b = _maps(k, batch, n=5, seed=k)
    ha, hb = suffix_scan(a, b)
    sa, sb = suffix_scan_sequential(a, b)
    torch.testing.assert_close(ha, sa, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hb, sb, rtol=1e-12, atol=1e-12)


def test_suffix_scan_is_the_composition_of_maps():
    """S_k applied to x equals applying f_{K-1}, ..., f_k to x one after another."""
    a, b = _maps(6, (2,), n=4, seed=1)
    sa, sb = suffix_scan(a, b)
    x = torch.randn(2, 4, dtype=torch.float64)
    for k in range(6):
        y = x.clone()
        for j in range(5, k - 1, -1):
            y = (a[j] @ y.unsqueeze(-1)).squeeze(-1) + b[j]
        torch.testing.assert_close((sa[k] @ x.unsqueeze(-1)).squeeze(-1) + sb[k], y, rtol=1e-12, atol=1e-12)


def test_combine_order_matters():
    """The opposite order gives a different (wrong) result: the test above could fail."""
    a, b = _maps(2, (), n=4, seed=3)
    right = compose(a[0], b[0], a[1], b[1])
    wrong = compose(a[1], b[1], a[0], b[0])
    assert not torch.allclose(right[0], wrong[0])
    torch.testing.assert_close(right[0], a[0] @ a[1])
    torch.testing.assert_close(right[1], a[0] @ b[1] + b[0])


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_adjoints_match_backward_recursion(k):
    a, b = _maps(k, (3,), n=6, seed=10 + k)
    seed = torch.randn(3, 6, dtype=torch.float64)
    lam = adjoints(a, b, seed)
    expect = [seed]
    for j in range(k - 1, -1, -1):
        expect.append((a[j] @ expect[-1].unsqueeze(-1)).squeeze(-1) + b[j])
    torch.testing.assert_close(lam, torch.stack(expect[::-1]), rtol=1e-12, atol=1e-12)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="square"):
        suffix_scan(torch.zeros(3, 2, 4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="b must be"):
        suffix_scan(torch.zeros(3, 4, 4), torch.zeros(3, 5))
