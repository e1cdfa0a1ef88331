"""Fused BASIS sketch on the GPU (Triton): one read of M gives S M, ||M||_F^2 and optionally M's column sums.

Status: opt-in (CHAINFREE_BASIS_TRITON=1), because as written it is *slower* than the PyTorch path it
was meant to replace. Measured on an H100 for M = 16384 x 3072 bf16, R = 32
(benchmarks/results/basis_bench*.md): this kernel 0.167 ms with the norm, 0.20 ms with column sums too
(100 us average per call over a training step's mixed shapes), the PyTorch path (sign-matrix GEMM + a
norm) 0.148 ms, the dW GEMM that BASIS removes 0.108 ms. Reading M once should take ~0.035 ms at HBM
bandwidth, so the kernel is far from its bound: each loop iteration issues a dependent load (perm, then the gathered
rows) with no software pipelining, and the launch goes through Triton's Python launcher. Kept, with
its tests (CPU interpreter and CUDA), as the harness for that tuning.

Tiling: program (r, c, s) owns bucket r, columns [c * BLOCK_N, (c + 1) * BLOCK_N) and the s-th of
`splits` slices of the bucket's rows. Bucket r holds gathered positions i = g * R + r (g = 0..G-1,
G = ceil(B / R)), i.e. input rows perm[i] with signs signs[i] -- the same balanced hash as
chainfree.ops.basis_linear.SketchPlan. The program loads BLOCK_G of its rows at a time as a
(BLOCK_G x BLOCK_N) tile (each row segment contiguous), and accumulates in float32:
    sketch_part[s, r, cols] = sum_i signs[i] * M[perm[i], cols]
    sq_part[s, r, c]        = sum_i sum_cols M[perm[i], cols]^2
    colsum_part[s, r, cols] = sum_i M[perm[i], cols]                       (WITH_COLSUM only)
The partials are summed over s (and r) in PyTorch: deterministic, no atomics. Every element of M is read
exactly once; `splits` is chosen so that there are ~1024 programs whatever R is.
Numerics: float32 accumulation of bf16/fp16/fp32 inputs; the sketch is returned in float32 (the GEMM
path rounds it to the input dtype), so results agree with the reference to float32 rounding.
Saved tensors: none (forward-only helper used inside the autograd Functions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_G = 32
BLOCK_N = 128
TARGET_PROGRAMS = 1024


@triton.jit
def _signed_segment_sum_kernel(
    m_ptr, perm_ptr, sign_ptr, sketch_ptr, sq_ptr, colsum_ptr,
    rows, width, rank, groups_per_split, stride_m, n_col_blocks,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, WITH_COLSUM: tl.constexpr,
):
    r = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.program_id(2)
    cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_first = s * groups_per_split
    for g0 in tl.range(0, groups_per_split, BLOCK_G):
        local = g0 + tl.arange(0, BLOCK_G)
        pos = (g_first + local) * rank + r
        ok = (local < groups_per_split) & (pos < rows)
        row = tl.load(perm_ptr + pos, mask=ok, other=0).to(tl.int64)
        sign = tl.load(sign_ptr + pos, mask=ok, other=0.0).to(tl.float32)
        tile = tl.load(m_ptr + row[:, None] * stride_m + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)
        acc += tl.sum(tile * sign[:, None], axis=0)
        sq += tl.sum(tile * tile, axis=0)
        if WITH_COLSUM:
            colsum += tl.sum(tile, axis=0)
    out = (s * rank + r) * width + cols
    tl.store(sketch_ptr + out, acc, mask=col_ok)
    tl.store(sq_ptr + (s * rank + r) * n_col_blocks + c, tl.sum(sq, axis=0))
    if WITH_COLSUM:
        tl.store(colsum_ptr + out, colsum, mask=col_ok)


def signed_segment_sum(
    m: torch.Tensor, perm: torch.Tensor, signs: torch.Tensor, rank: int, with_colsum: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(S m in float32 (R x N), ||m||_F^2 (0-d float32), column sums of m (N,) float32 or None)."""
    if m.dim() != 2 or m.stride(1) != 1:
        m = m.reshape(-1, m.shape[-1]).contiguous()
    rows, width = m.shape
    groups = -(-rows // rank)
    n_col_blocks = triton.cdiv(width, BLOCK_N)
    splits = max(1, min(groups, -(-TARGET_PROGRAMS // (rank * n_col_blocks))))
    groups_per_split = -(-groups // splits)
    splits = -(-groups // groups_per_split)
    f32 = dict(device=m.device, dtype=torch.float32)
    sketch = torch.empty(splits, rank, width, **f32)
    sq = torch.empty(splits, rank, n_col_blocks, **f32)
    colsum = torch.empty(splits, rank, width, **f32) if with_colsum else sketch
    _signed_segment_sum_kernel[(rank, n_col_blocks, splits)](
        m, perm, signs, sketch, sq, colsum,
        rows, width, rank, groups_per_split, m.stride(0), n_col_blocks,
        BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, WITH_COLSUM=with_colsum, num_warps=4,
    )
    return (
        sketch.sum(0) if splits > 1 else sketch[0],
        sq.sum(),
        colsum.sum((0, 1)) if with_colsum else None,
    )
