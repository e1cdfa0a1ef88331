"""Fused BASIS sketch (Triton): one read of M gives S M, ||M||_F^2, ||S M||_F^2 and optionally M's column sums.

The hash is chainfree.ops.basis_sketch's group-shift hash: row k of group g (row g*R + k) goes to bucket
(k + b_g) mod R, b_g = shift_bits[g] mod R, with sign +1 if bit 0 of sign_bits[g*R + k] is set, else -1. So
bucket r of group g is row g*R + ((r - b_g) mod R),
and a block of consecutive buckets reads a contiguous run of rows (one wrap-around at most): the kernel
streams M in order, with no index gather and nothing to sort. Sign, shift and bucket sum are one pass.

Tiling: program (pr, pc, ps) owns buckets [pr*BLOCK_R, (pr+1)*BLOCK_R), columns [pc*BLOCK_N, ...) and the
ps-th of `splits` slices of the groups. Each iteration loads BLOCK_G groups x BLOCK_R buckets x BLOCK_N
columns (3-D tile, each row segment contiguous), multiplies by the signs and sums over the groups into a
float32 (BLOCK_R x BLOCK_N) accumulator; ||M||^2 and the column sums come from the same tile. With one
split the program owns whole buckets and writes the sketch in M's dtype and its own ||S M||^2 partial;
with several (few buckets, e.g. R = 32: too few programs otherwise) the programs add their float32
parts atomically. Norms and column sums are added atomically too, so GPU results may differ in the last
float32 bits between runs (the order of the additions is not fixed).
Numerics: float32 accumulation of bf16/fp16/fp32 input; the sketch is rounded to M's dtype once.
Saved tensors: none (a forward-only helper of the autograd Functions in chainfree.ops.basis_linear).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ROWS = 64  # BLOCK_G * BLOCK_R rows per iteration
BLOCK_N = 64


@triton.jit
def _group_shift_sketch_kernel(
    m_ptr, sign_ptr, shift_ptr, sk_ptr, stats_ptr, colsum_ptr,
    rows, width, rank, groups, groups_per_split, stride_m,
    BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    WITH_COLSUM: tl.constexpr, PARTIAL: tl.constexpr,
):
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    ps = tl.program_id(2)
    r = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pc * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = r < rank
    col_ok = cols < width
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_first = ps * groups_per_split
    for g0 in tl.range(0, groups_per_split, BLOCK_G):
        local = g0 + tl.arange(0, BLOCK_G)
        g = g_first + local
        g_ok = (local < groups_per_split) & (g < groups)
        b = tl.load(shift_ptr + g, mask=g_ok, other=0) % rank
        k = (r[None, :] + rank - b[:, None]) % rank  # (BLOCK_G, BLOCK_R): row within the group
        row = g[:, None].to(tl.int64) * rank + k
        ok = g_ok[:, None] & r_ok[None, :] & (row < rows)
        s = ((tl.load(sign_ptr + row, mask=ok, other=0) & 1) * 2 - 1).to(tl.float32)
        ptrs = m_ptr + row[:, :, None] * stride_m + cols[None, None, :]
        tile = tl.load(ptrs, mask=ok[:, :, None] & col_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tile * s[:, :, None], axis=0)
        sq += tl.sum(tl.sum(tile * tile, axis=0), axis=0)
        if WITH_COLSUM:
            colsum += tl.sum(tl.sum(tile, axis=0), axis=0)
    tl.atomic_add(stats_ptr, tl.sum(sq, axis=0))
    out = r[:, None].to(tl.int64) * width + cols[None, :]
    out_mask = r_ok[:, None] & col_ok[None, :]
    if PARTIAL:
        tl.atomic_add(sk_ptr + out, acc, mask=out_mask)
    else:
        tl.store(sk_ptr + out, acc.to(sk_ptr.dtype.element_ty), mask=out_mask)
        tl.atomic_add(stats_ptr + 1, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    if WITH_COLSUM:
        tl.atomic_add(colsum_ptr + cols, colsum, mask=col_ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SM_COUNT: dict[int, int] = {}


def _target_programs(m: torch.Tensor) -> int:
    if not m.is_cuda:
        return 8
    index = m.device.index if m.device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _SM_COUNT[index]


def launch_shape(rows: int, width: int, rank: int, target: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_G, bucket blocks, column blocks, splits) for a (rows x width) M and R buckets."""
    block_r = min(_next_pow2(rank), TILE_ROWS)
    block_g = max(1, TILE_ROWS // block_r)
    n_r = triton.cdiv(rank, block_r)
    n_c = triton.cdiv(width, BLOCK_N)
    groups = triton.cdiv(rows, rank)
    splits = max(1, min(triton.cdiv(groups, block_g), target // (n_r * n_c)))
    return block_r, block_g, n_r, n_c, splits


def sketch_triton(
    m: torch.Tensor, sign_bits: torch.Tensor, shift_bits: torch.Tensor, rank: int, with_colsum: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contract of chainfree.ops.basis_sketch.sketch_ref: (S m, [||m||^2, ||S m||^2], colsum or empty).

    S m is in m's dtype when every program owns whole buckets, else the float32 sum of the programs'
    atomically added parts. One zero-filled float32 buffer holds the stats, the column sums and (split
    case) the sketch: one memset and one kernel launch per call, nothing synchronises with the host.
    """
    assert m.dim() == 2 and m.stride(1) == 1, "sketch_triton needs a row-major 2-D matrix"
    rows, width = m.shape
    groups = triton.cdiv(rows, rank)
    block_r, block_g, n_r, n_c, splits = launch_shape(rows, width, rank, _target_programs(m))
    groups_per_split = triton.cdiv(groups, splits)
    splits = triton.cdiv(groups, groups_per_split)
    partial = splits > 1
    n_col = width if with_colsum else 0
    n_sk = rank * width if partial else 0  # the split sketch first: offset 0 keeps it 16-byte aligned
    buf = torch.zeros(n_sk + 2 + n_col, device=m.device, dtype=torch.float32)
    stats, colsum = buf[n_sk:n_sk + 2], buf[n_sk + 2:n_sk + 2 + n_col]
    sk = buf[:n_sk].view(rank, width) if partial else m.new_empty(rank, width)
    _group_shift_sketch_kernel[(n_r, n_c, splits)](
        m, sign_bits, shift_bits, sk, stats, colsum if with_colsum else buf,
        rows, width, rank, groups, groups_per_split, m.stride(0),
        BLOCK_G=block_g, BLOCK_R=block_r, BLOCK_N=BLOCK_N, WITH_COLSUM=with_colsum, PARTIAL=partial,
        num_warps=4,
    )
    if partial:
        flat = sk.view(-1)
        torch.dot(flat, flat, out=stats[1])
    return sk, stats, colsum
