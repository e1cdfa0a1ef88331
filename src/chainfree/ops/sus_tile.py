"""Tile-sampled SUS attention: exact forward, unbiased block-sparse backward (SPEC §2b).

`sus_tile_attention(q, k, v, c=..., is_causal=...)` computes exact attention. Its backward keeps each
(query tile × key tile) of edge `tile` with probability π_IJ = min(1, c·m̂_IJ) — m̂ a tile mass, see
`sus_tile_reference` for the estimator and why the row maximum — and runs the dense FlashAttention backward
math on the kept tiles with P and dS scaled by 1/π_IJ, D_i = dO_i·O_i exact. Gradients are unbiased; tiles
with π = 1 are exact.

Where m̂ comes from (`proposal`):
- "exact": the statistic itself, from a statistics pass in the backward (one QKᵀ block and exp per pair
  against the forward's LSE, no PV);
- "rowsS" (S in 2..tile, e.g. "rows8"): the same pass over every S-th query row of each query tile only,
  with a floor π ≥ `pi_min` on every tile that may hold an allowed pair, so the estimator stays unbiased.
Both are one kernel (the exact statistic is row stride 1). "rows8" is the default: at equal c the exact
statistic gives several times lower variance, but its pass costs a QKᵀ and an exp per causal pair (more
than the sparse backward itself at 16k-32k), so at equal estimator variance "rows8" with a larger c gave
the faster backward in every measured case (benchmarks/results/sus_tile_micro_h100.md). "rows16" had
clearly higher variance than "rows8" at similar density (CPU comparison at n=2048, same folder).

Implementation: two `torch.library.custom_op`s (forward → (O, LSE); backward → (dQ, dK, dV)) with fake
impls and an autograd formula, so `torch.compile` traces through without graph breaks or recompiles.
The keep uniforms are drawn inside the backward op with `torch.rand` on the tensors' device (CUDA-graph
replays draw afresh; `torch.manual_seed` reproduces), or from `generator` at the forward call.
CUDA, bf16/fp16, head dim 64/128: the forward is cuDNN's (`aten._scaled_dot_product_cudnn_attention`,
K/V expanded for GQA; the flash op if cuDNN refuses; with document ids the memory-efficient op with an
additive mask) and the backward the Triton kernels of `_sus_tile_triton`. Everything else (CPU, float32/64,
other head dims) runs the PyTorch reference, which defines the semantics.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings

import torch

from chainfree.ops.sus_tile_reference import (
    _ids,
    forward_reference,
    tile_allowed,
    tile_backward_reference,
    tile_probs,
    tile_statistic,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_TILES = (16, 32, 64, 128)
DEFAULT_PROPOSAL = "rows8"
DEFAULT_PI_MIN = 1.0 / 64  # floor of π for row-subsampled proposals
SEGMENT = 64  # kept tiles per backward program (longer lists are split across programs)
# (QB, KB, num_warps, num_stages, flat, dyn) of the two backward kernels per head dim; QB, KB are clipped to
# `tile`; flat = one loop over (kept tile, block) pairs instead of nested loops; dyn = programs take work
# units from an atomic counter instead of a static stride (see _sus_tile_triton).
DQ_CONFIG: dict[int, tuple[int, ...]] = {64: (64, 64, 4, 3, 0, 0), 128: (128, 64, 8, 3, 1, 1)}
DKDV_CONFIG: dict[int, tuple[int, ...]] = {64: (64, 64, 4, 3, 0, 0), 128: (64, 128, 8, 3, 1, 1)}
FORWARD_OPS: dict[str, int] = {}  # which aten op served the CUDA forward, with counts (for the benchmarks)


def proposal_stride(proposal: str) -> int:
    """Row stride of a proposal: 'exact' → 1, 'rowsS' → S."""
    if proposal == "exact":
        return 1
    if proposal.startswith("rows") and proposal[4:].isdigit() and int(proposal[4:]) >= 1:
        return int(proposal[4:])
    raise ValueError(f"proposal must be 'exact' or 'rowsS' (S a positive integer, e.g. 'rows8'), got {proposal!r}")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: int, is_causal: bool = False) -> bool:
    """Whether the CUDA path (cuDNN forward + Triton backward) handles this case; else the reference runs."""
    return (
        q.is_cuda
        and q.dtype in SUPPORTED_DTYPES
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and q.shape[-1] in SUPPORTED_HEAD_DIMS
        and k.shape[-1] == q.shape[-1]
        and v.shape[-1] == q.shape[-1]
        and tile in SUPPORTED_TILES
        and not (is_causal and q.shape[2] != k.shape[2])
        and _triton_available()
    )


def _kern():
    from chainfree.ops import _sus_tile_triton

    return _sus_tile_triton


@functools.cache
def _num_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return 4


@functools.cache
def _tile_allowed_cached(n_q: int, n_k: int, tile: int, is_causal: bool, device: torch.device) -> torch.Tensor:
    return tile_allowed(1, n_q, n_k, tile, is_causal, None, None, device=device)


# ---------------------------------------------------------------------------------------------- forward


_CUDNN_LSE_UNIT: dict[int, float | None] = {}


def _cudnn_lse_unit(device: torch.device) -> float | None:
    """Factor turning the cuDNN op's LSE into natural-log units (1.0, or ln 2 for a base-2 LSE), or None if the
    op is unavailable or its LSE matches neither; checked once per device on a small problem."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CUDNN_LSE_UNIT:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 2, 256, 64, device=device, generator=g, dtype=torch.bfloat16) for _ in range(3))
        unit = None
        try:
            lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, True, False, scale=0.125
            )[1]
            s = (q.float() @ k.float().transpose(-1, -2)) * 0.125
            s = s.masked_fill(~torch.ones(256, 256, dtype=torch.bool, device=device).tril(), -math.inf)
            want = torch.logsumexp(s, -1)
            got = lse.reshape(1, 2, -1)[..., :256].float()
            for factor in (1.0, math.log(2.0)):
                if (got * factor - want).abs().max() < 1e-2:
                    unit = factor
                    break
        except RuntimeError:
            unit = None
        _CUDNN_LSE_UNIT[idx] = unit
    return _CUDNN_LSE_UNIT[idx]


def _cuda_forward(q, k, v, is_causal, scale, q_ids, k_ids) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    if k.shape[1] != h:
        k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // k.shape[1], 1)
    if q_ids is None:
        lse_unit = _cudnn_lse_unit(q.device)
        res = None
        if lse_unit is not None:
            try:
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q, k, v, None, True, 0.0, is_causal, False, scale=scale
                )
                op = "cudnn"
            except RuntimeError:
                res = None
        if res is None:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
            op, lse_unit = "flash", 1.0
        o, lse = res[0], res[1]
        if lse_unit != 1.0:
            lse = lse * lse_unit
    else:
        allowed = (q_ids[:, :, None] == k_ids[:, None, :]) & (k_ids[:, None, :] >= 0)
        if is_causal:
            allowed &= torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        pad = -(-n_k // 16) * 16  # the op wants an aligned bias row
        bias = torch.zeros(b, 1, n_q, pad, dtype=q.dtype, device=q.device)
        bias[..., :n_k].masked_fill_(~allowed[:, None], -math.inf)
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias[..., :n_k].expand(b, h, n_q, n_k), True, 0.0, False, scale=scale
        )
        empty = ~allowed.any(-1)[:, None]
        o = res[0].masked_fill(empty[..., None], 0.0)
        lse = res[1][..., :n_q].masked_fill(empty, math.inf)
        op = "efficient+mask"
    FORWARD_OPS[op] = FORWARD_OPS.get(op, 0) + 1
    return o.contiguous(), lse.reshape(b, h, -1)[..., :n_q].float().contiguous()


@torch.library.custom_op("chainfree::sus_tile_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c: float,
    is_causal: bool,
    scale: float,
    tile: int,
    row_stride: int,
    pi_min: float,
    q_ids: torch.Tensor | None,
    k_ids: torch.Tensor | None,
    u: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O [B,H,n_q,D] contiguous, LSE [B,H,n_q]; +inf on rows without keys). c..u are for the backward."""
    if supports(q, k, v, tile, is_causal):
        return _cuda_forward(q, k, v, is_causal, scale, q_ids, k_ids)
    o, lse = forward_reference(q, k, v, is_causal, scale, q_ids, k_ids)
    return o.contiguous(), lse if q.dtype == torch.float64 else lse.float()


@_fwd_op.register_fake
def _(q, k, v, c, is_causal, scale, tile, row_stride, pi_min, q_ids, k_ids, u):
    b, h, n_q, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(b, h, n_q, v.shape[-1]), q.new_empty(b, h, n_q, dtype=lse_dtype)


# -------------------------------------------------------------------------------------- statistics, π


def tile_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    tile: int,
    row_stride: int = 1,
    q_ids: torch.Tensor | None = None,
    k_ids: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """m̂ [B, H, Tq, Tk] (fp32 from the kernel): the Triton statistics pass where supported, else the reference."""
    if use_kernel is None:
        use_kernel = supports(q, k, k, tile, is_causal)
    if not use_kernel:
        return tile_statistic(
            q, k, lse, is_causal=is_causal, scale=scale, tile=tile, q_ids=q_ids, k_ids=k_ids, row_stride=row_stride
        )
    kern = _kern()
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    tq, tk = -(-n_q // tile), -(-n_k // tile)
    stride = min(row_stride, tile)
    rows = max(1, tile // stride)
    tpp = max(1, 128 // rows) if q.is_cuda else max(1, 16 // rows)
    m = torch.zeros(b * h * tq * tk, device=q.device, dtype=torch.float32)
    lse2 = lse.reshape(b * h, n_q).float().contiguous()
    doc = q_ids is not None
    qid = q_ids.contiguous() if doc else lse2
    kid = k_ids.contiguous() if doc else lse2
    bn = min(64, tile)
    warps = 8 if tpp * rows * d >= 128 * 128 else 4
    kern._stats_kernel[(-(-tq // tpp), b * h)](
        q, k, lse2, qid, kid, m, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        h, h // h_kv, n_q, n_k, tq, tk, scale * kern.LOG2E,
        CAUSAL=is_causal, DOC=doc, TILE=tile, STRIDE=stride, ROWS=rows, TPP=tpp, BN=bn, D=d,
        num_warps=warps, num_stages=3,
    )  # fmt: skip
    return m.view(b, h, tq, tk)


def keep_probs(
    m_hat: torch.Tensor,
    c: float,
    *,
    n_q: int,
    n_k: int,
    tile: int,
    is_causal: bool,
    row_stride: int,
    pi_min: float,
    q_ids: torch.Tensor | None = None,
    k_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """π [B, H, Tq, Tk]: min(1, c·m̂) on tiles that may hold an allowed pair, at least `pi_min` there."""
    if q_ids is None:
        allowed = _tile_allowed_cached(n_q, n_k, tile, is_causal, m_hat.device)
    else:
        allowed = tile_allowed(m_hat.shape[0], n_q, n_k, tile, is_causal, q_ids, k_ids, device=m_hat.device)
    return tile_probs(m_hat, c, allowed, pi_min)


def sample_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    c: float,
    is_causal: bool,
    scale: float,
    tile: int,
    row_stride: int,
    pi_min: float,
    q_ids: torch.Tensor | None = None,
    k_ids: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(π, keep) [B, H, Tq, Tk] of one backward: m̂ by the statistics pass, π, keep = u < π.

    u ~ U[0, 1) is drawn here with torch.rand on π's device (its default generator) unless given.
    """
    m_hat = tile_stats(
        q, k, lse, is_causal=is_causal, scale=scale, tile=tile, row_stride=row_stride, q_ids=q_ids, k_ids=k_ids
    )
    pi = keep_probs(
        m_hat, c, n_q=q.shape[2], n_k=k.shape[2], tile=tile, is_causal=is_causal, row_stride=row_stride,
        pi_min=pi_min, q_ids=q_ids, k_ids=k_ids,
    )  # fmt: skip
    if u is None:
        u = torch.rand(pi.shape, device=pi.device, dtype=torch.float32)
    return pi, u.to(pi.device) < pi


# ----------------------------------------------------------------------------------------------- backward


def _lists(keep2d: torch.Tensor, seg: int):
    """Segmented kept lists of the rows of `keep2d` [R, n] (bool), without a host sync.

    Returns idx [R, n] int32 (each row's kept indices first, ascending), cnt [R], nseg [R] (≥ 1: an empty
    list still gets one program, which writes zeros), the segment table (list, start) [S_max] int32 with
    the longest segments first, the device count of segments [1] and the table's length S_max (an upper
    bound, host-known).
    """
    r, n = keep2d.shape
    cnt = keep2d.sum(-1, dtype=torch.int32)
    idx = torch.sort(keep2d.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    nseg = torch.clamp((cnt + seg - 1) // seg, min=1).to(torch.int32)
    cum = torch.cumsum(nseg, 0)
    s_max = r * max(1, -(-n // seg))
    s = torch.arange(s_max, device=keep2d.device)
    lst = torch.searchsorted(cum, s, right=True).clamp_(max=r - 1)
    start = (s - (cum[lst] - nseg[lst])) * seg
    # longest segments first (entries past the device count last), so programs finish together
    length = torch.where(s < cum[-1], torch.clamp(cnt[lst] - start, min=0, max=seg), -1)
    order = torch.sort(length, descending=True, stable=True).indices
    lst, start = lst[order], start[order]
    return idx.contiguous(), cnt, nseg, lst.to(torch.int32), start.to(torch.int32), cum[-1:].to(torch.int32), s_max


PLAN = "triton"  # how the kept lists are built on the kernel path: "triton" (3 launches a list type) or "torch"


def _lists_triton(keep: torch.Tensor, cols: bool, h_kv: int, seg: int):
    """`_lists` by two Triton kernels and a cumsum (few launches), from keep [B, H, Tq, Tk] directly (the
    column lists read it transposed). Same outputs, except that the segment table is in list order and the
    index entries past each list's count are undefined."""
    kern = _kern()
    b, h, tq, tk = keep.shape
    g = h // h_kv
    r, n = (b * h_kv * tk, g * tq) if cols else (b * h * tq, tk)
    dev = keep.device
    idx = torch.empty(r, n, device=dev, dtype=torch.int32)
    cnt = torch.empty(r, device=dev, dtype=torch.int32)
    nseg = torch.empty(r, device=dev, dtype=torch.int32)
    block = max(16, triton_next_pow2(n))
    kern._plan_lists_kernel[(r,)](
        keep.view(torch.uint8) if keep.dtype == torch.bool else keep, idx, cnt, nseg, n, tq, tk, h, h_kv, g, seg,
        COLS=cols, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    cum = torch.cumsum(nseg, 0, dtype=torch.int32)
    s_max = r * max(1, -(-n // seg))
    lst = torch.empty(s_max, device=dev, dtype=torch.int32)
    start = torch.empty(s_max, device=dev, dtype=torch.int32)
    kern._plan_segments_kernel[(r,)](cum, nseg, lst, start, seg, num_warps=1)
    return idx, cnt, nseg, lst, start, cum[-1:], s_max


def _use_torch_plan(exc: Exception) -> None:
    global PLAN
    PLAN = "torch"
    warnings.warn(f"sus_tile: Triton list-building kernels failed ({exc!r}); using the PyTorch plan", stacklevel=3)


def triton_next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def tile_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    pi: torch.Tensor,
    keep: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    tile: int,
    q_ids: torch.Tensor | None = None,
    k_ids: torch.Tensor | None = None,
    use_kernel: bool | None = None,
    segment: int | None = None,
    configs: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    stop_after: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of the tile estimator for a given keep set and π: Triton kernels where supported.

    `segment` (kept tiles per program), `configs` ((QB, KB, warps, stages, flat, dyn) of the dQ and dK/dV
    kernels) override the defaults (benchmarks); `stop_after` ('prep' or 'dq') returns early, a timing probe
    (the outputs are then incomplete).
    """
    if use_kernel is None:
        use_kernel = supports(q, k, v, tile, is_causal)
    if not use_kernel:
        return tile_backward_reference(
            q, k, v, o, lse, do, pi, keep, is_causal=is_causal, scale=scale, tile=tile, q_ids=q_ids, k_ids=k_ids
        )
    kern = _kern()
    if do.stride(-1) != 1:
        do = do.contiguous()
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    g = h // h_kv
    tq, tk = keep.shape[-2], keep.shape[-1]
    dev = q.device
    seg = int(segment or SEGMENT)
    fallback = (64, 64, 4, 3, 0, 0)
    cfg1, cfg2 = configs or (DQ_CONFIG.get(d, fallback), DKDV_CONFIG.get(d, fallback))
    (qb1, kb1, w1, st1, flat1, dyn1), (qb2, kb2, w2, st2, flat2, dyn2) = (
        (tuple(cfg1) + (0,))[:6],
        (tuple(cfg2) + (0,))[:6],
    )
    qb1, kb1, qb2, kb2 = min(qb1, tile), min(kb1, tile), min(qb2, tile), min(kb2, tile)
    pi32 = pi.float().contiguous()  # kernels weight a kept tile by 1 / π (π > 0 wherever keep)
    lse2 = lse.reshape(b * h, n_q).float().contiguous()
    doc = q_ids is not None
    qid = q_ids.contiguous() if doc else lse2
    kid = k_ids.contiguous() if doc else lse2
    nprog_max = _num_programs(dev)

    keep = keep.contiguous()
    plans = None
    if PLAN == "triton":
        try:
            plans = _lists_triton(keep, False, h_kv, seg), _lists_triton(keep, True, h_kv, seg)
        except Exception as exc:  # a Triton build that cannot compile the plan kernels: the torch plan is equal
            _use_torch_plan(exc)
    if plans is not None:
        (r_idx, r_cnt, r_nseg, r_lst, r_start, r_total, r_smax), (c_idx, c_cnt, c_nseg, c_lst, c_start, c_total,
                                                                   c_smax) = plans  # fmt: skip
    else:
        r_idx, r_cnt, r_nseg, r_lst, r_start, r_total, r_smax = _lists(keep.reshape(b * h * tq, tk), seg)
        keep_t = keep.reshape(b, h_kv, g, tq, tk).permute(0, 1, 4, 2, 3).reshape(b * h_kv * tk, g * tq)
        c_idx, c_cnt, c_nseg, c_lst, c_start, c_total, c_smax = _lists(keep_t, seg)

    dq = torch.empty(b, h, n_q, d, device=dev, dtype=q.dtype)
    dk = torch.empty(b, h_kv, n_k, d, device=dev, dtype=k.dtype)
    dv = torch.empty(b, h_kv, n_k, d, device=dev, dtype=v.dtype)
    dq32 = torch.empty(b * h * n_q * d, device=dev, dtype=torch.float32)
    dk32 = torch.empty(b * h_kv * n_k * d, device=dev, dtype=torch.float32)
    dv32 = torch.empty_like(dk32)
    delta = torch.empty(b * h * n_q, device=dev, dtype=torch.float32)
    counters = torch.zeros(2, device=dev, dtype=torch.int32)
    br = min(64, tile)
    if stop_after == "prep":
        return dq, dk, dv
    kern._zero_multi_kernel[(b * h * tq,)](r_nseg, dq32, dq32, n_q, TILE=tile, D=d, BR=br, PAIR=False)
    kern._zero_multi_kernel[(b * h_kv * tk,)](c_nseg, dk32, dv32, n_k, TILE=tile, D=d, BR=br, PAIR=True)

    nprog = min(r_smax * (tile // qb1), nprog_max)
    kern._bwd_dq_kernel[(nprog,)](
        q, k, v, o, do, lse2, delta, qid, kid, pi32,
        r_lst, r_start, r_total, r_idx, r_cnt, r_nseg, counters, dq, dq32,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        h, g, n_q, n_k, tq, tk, scale, scale * kern.LOG2E, seg, nprog,
        CAUSAL=is_causal, DOC=doc, TILE=tile, QB=qb1, KB=kb1, D=d, FLAT=bool(flat1), DYN=bool(dyn1),
        num_warps=w1, num_stages=st1,
    )  # fmt: skip
    if stop_after == "dq":
        return dq, dk, dv
    nprog = min(c_smax * (tile // kb2), nprog_max)
    kern._bwd_dkdv_kernel[(nprog,)](
        q, k, v, do, lse2, delta, qid, kid, pi32,
        c_lst, c_start, c_total, c_idx, c_cnt, c_nseg, counters[1:], dk, dv, dk32, dv32,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        h, h_kv, g, n_q, n_k, tq, tk, g * tq, scale, scale * kern.LOG2E, seg, nprog,
        CAUSAL=is_causal, DOC=doc, TILE=tile, QB=qb2, KB=kb2, D=d, FLAT=bool(flat2), DYN=bool(dyn2),
        num_warps=w2, num_stages=st2,
    )  # fmt: skip
    kern._cast_multi_kernel[(b * h * tq,)](r_nseg, dq32, dq32, dq, dq, n_q, TILE=tile, D=d, BR=br, PAIR=False)
    kern._cast_multi_kernel[(b * h_kv * tk,)](c_nseg, dk32, dv32, dk, dv, n_k, TILE=tile, D=d, BR=br, PAIR=True)
    return dq, dk, dv


@torch.library.custom_op("chainfree::sus_tile_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    c: float,
    is_causal: bool,
    scale: float,
    tile: int,
    row_stride: int,
    pi_min: float,
    q_ids: torch.Tensor | None,
    k_ids: torch.Tensor | None,
    u: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics (or proposal) → π → keep (u < π, u drawn here unless given) → block-sparse backward."""
    pi, keep = sample_tiles(
        q, k, lse, c=c, is_causal=is_causal, scale=scale, tile=tile, row_stride=row_stride, pi_min=pi_min,
        q_ids=q_ids, k_ids=k_ids, u=u,
    )  # fmt: skip
    dq, dk, dv = tile_backward(
        q, k, v, o, lse, do, pi, keep, is_causal=is_causal, scale=scale, tile=tile, q_ids=q_ids, k_ids=k_ids
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, c, is_causal, scale, tile, row_stride, pi_min, q_ids, k_ids, u):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, c, is_causal, scale, tile, row_stride, pi_min, q_ids, k_ids, u = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, q_ids, k_ids, u)
    ctx.params = (c, is_causal, scale, tile, row_stride, pi_min)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, q_ids, k_ids, u = ctx.saved_tensors
    c, is_causal, scale, tile, row_stride, pi_min = ctx.params
    if do is None:
        return (None,) * 12
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, c, is_causal, scale, tile, row_stride, pi_min, q_ids, k_ids, u)
    return (dq, dk, dv) + (None,) * 9


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public


def sus_tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    c: float,
    is_causal: bool,
    scale: float | None = None,
    enable_gqa: bool = False,
    tile: int = 128,
    document_ids: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    proposal: str = DEFAULT_PROPOSAL,
    pi_min: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Exact attention whose backward is the unbiased tile-sampled SUS estimator.

    q [B, H, n_q, D], k/v [B, Hkv, n_k, D] (Hkv < H needs `enable_gqa`). `c`: keep probability per tile
    π = min(1, c·m̂); larger c keeps more tiles (c = ∞ is exact). `tile`: tile edge (any positive int on the
    reference path; 16/32/64/128 on the CUDA kernels). `document_ids`: int tensor [B, n] (or a pair
    (q_ids [B, n_q], k_ids [B, n_k])) of packed sequences; pair (i, j) attends iff the ids match and
    k_ids[j] ≥ 0; rows without keys output 0. `proposal`: 'exact' or 'rowsS' (module docstring);
    `pi_min`: floor of π on tiles that may hold an allowed pair (default DEFAULT_PI_MIN for 'rowsS', which
    needs a positive floor to stay unbiased; 0 for 'exact'). `generator`: draw the keep
    uniforms from it at this call instead of from torch's default generator of the device in the backward.
    Causal masks are top-left aligned like SDPA's.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-D q, k, v [B, H, n, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share a floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, n_q, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[-1] != d:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    h_kv, n_k = k.shape[1], k.shape[2]
    if h_kv != h and (not enable_gqa or h % h_kv != 0):
        raise ValueError(f"q has {h} heads and k/v {h_kv}: GQA needs enable_gqa=True and a multiple")
    if not (c > 0):
        raise ValueError(f"c must be positive, got {c}")
    if not (isinstance(tile, int) and tile >= 1):
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    row_stride = proposal_stride(proposal)
    if pi_min is None:
        pi_min = DEFAULT_PI_MIN if row_stride > 1 else 0.0
    if not (0 <= pi_min <= 1) or (row_stride > 1 and pi_min == 0):
        raise ValueError(f"pi_min must be in [0, 1], and > 0 for a 'rowsS' proposal (keeps it unbiased), got {pi_min}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    q_ids, k_ids = _ids(document_ids, b, n_q, n_k, q.device)
    u = None
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if generator is not None and needs_grad:
        tq, tk = -(-n_q // tile), -(-n_k // tile)
        u = torch.rand(b, h, tq, tk, generator=generator, device=generator.device).to(q.device)
    o, _ = _fwd_op(q, k, v, float(min(c, 1e300)), bool(is_causal), float(scale), tile, row_stride, float(pi_min),
                   q_ids, k_ids, u)  # fmt: skip
    return o


__all__ = [
    "DEFAULT_PI_MIN",
    "DEFAULT_PROPOSAL",
    "keep_probs",
    "proposal_stride",
    "sample_tiles",
    "supports",
    "sus_tile_attention",
    "tile_backward",
    "tile_stats",
]
