"""Associative suffix scan over affine maps f_k(x) = A_k x + b_k with square A_k (batched).

Why: LBI's adjoint recursion  lambda_k = J_kᵀ lambda_{k+1} + g_k  is the composition of K affine maps, read
from the end. Composition of affine maps is associative, so all K suffix compositions
S_k = f_k ∘ f_{k+1} ∘ ... ∘ f_{K-1} come out of a parallel prefix scan in ceil(log2 K) rounds (depth
O(log K)) instead of K dependent steps. With r×r matrices a round costs O(K r³) work: cheap, because the
interface is narrow (the whole point of LBI; with dense d×d Jacobians this would be BPPSA's O(d³)).

Combine order (docs/lbi.md, "(A₂,b₂)∘(A₁,b₁) = (A₁A₂, A₁b₂ + b₁)"): the earlier map is applied last,
    compose(f_earlier, f_later) = f_earlier ∘ f_later = (A_e A_l, A_e b_l + b_e).
Matrix products do not commute, so swapping the arguments gives wrong adjoints for K >= 3; the tests check
both the order and the sequential recursion in float64.

Shapes: A [K, *batch, n, n], b [K, *batch, n]; the K axis is the scan axis, *batch any leading batch
dims (samples, chunks, tokens). Saved tensors: none (the scan is used inside a hand-written backward, never
differentiated itself). Numerics: plain matmuls in the input dtype; Hillis–Steele does O(K log K) combines
(vs K for sequential), which only changes rounding, not the result, in float64.
"""

from __future__ import annotations

import torch


def compose(
    a_earlier: torch.Tensor, b_earlier: torch.Tensor, a_later: torch.Tensor, b_later: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """f_earlier ∘ f_later: x -> A_e (A_l x + b_l) + b_e  =  (A_e A_l, A_e b_l + b_e)."""
    a = a_earlier @ a_later
    b = (a_earlier @ b_later.unsqueeze(-1)).squeeze(-1) + b_earlier
    return a, b


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() < 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"A must be [K, *batch, n, n] with square matrices, got shape {tuple(a.shape)}")
    if b.shape != a.shape[:-1]:
        raise ValueError(f"b must be [K, *batch, n] = {tuple(a.shape[:-1])} to match A, got {tuple(b.shape)}")


def suffix_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All suffix compositions S_k = f_k ∘ ... ∘ f_{K-1}, by Hillis–Steele doubling (ceil(log2 K) rounds).

    Round with offset d: S_k <- S_k ∘ S_{k+d} for every k with k + d < K, all k at once. After the round
    S_k covers maps k .. min(k + 2d, K) - 1, so after ceil(log2 K) rounds it covers k .. K-1.
    Returns (A_suffix, b_suffix) with the shapes of (a, b). If f_{K-1} is the constant map (A = 0, b = seed),
    b_suffix[k] is the adjoint lambda_k for every k.
    """
    _check(a, b)
    k_total = a.shape[0]
    offset = 1
    while offset < k_total:
        head_a, head_b = compose(a[:-offset], b[:-offset], a[offset:], b[offset:])
        a = torch.cat((head_a, a[-offset:]), dim=0)
        b = torch.cat((head_b, b[-offset:]), dim=0)
        offset *= 2
    return a, b


def suffix_scan_sequential(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: S_{K-1} = f_{K-1}, S_k = f_k ∘ S_{k+1}, one step at a time (depth K)."""
    _check(a, b)
    out_a, out_b = [a[-1]], [b[-1]]
    for k in range(a.shape[0] - 2, -1, -1):
        na, nb = compose(a[k], b[k], out_a[-1], out_b[-1])
        out_a.append(na)
        out_b.append(nb)
    return torch.stack(out_a[::-1]), torch.stack(out_b[::-1])


def adjoints(a: torch.Tensor, b: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """lambda_k for the recursion lambda_last = seed, lambda_k = A_k lambda_{k+1} + b_k (k = K-1 .. 0).

    a [K, *batch, n, n], b [K, *batch, n], seed [*batch, n]; returns [K + 1, *batch, n] whose last entry is
    the seed. Implemented as a suffix scan with the seed as a constant map appended at the end.
    """
    _check(a, b)
    zero = torch.zeros_like(a[:1])
    all_a = torch.cat((a, zero), dim=0)
    all_b = torch.cat((b, seed.unsqueeze(0)), dim=0)
    return suffix_scan(all_a, all_b)[1]
