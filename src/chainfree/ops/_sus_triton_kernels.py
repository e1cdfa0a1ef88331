"""Triton kernels behind `sus_triton.py` (imported lazily: CPU-only installs have no Triton).

Three kernels, all reading [B, H, n, D] tensors through strides (last dim contiguous):

- `_fwd_kernel`: flash attention forward. Program = (BM query rows, one (batch, head)); loops over
  BN-key tiles with an online softmax in fp32; writes O (input dtype) and LSE (natural log, fp32).
  Causal programs split the key loop into unmasked off-diagonal tiles and masked diagonal tiles.
- `_sample_kernel`: backward step 1. Same tiling; recomputes S = QK^T once per tile (one n^2 D
  matmul), W = exp(S*scale - LSE), draws u with the contract hash, keeps u < min(1, cW) (or q >= 1),
  and compacts each row's kept (key, W~ = max(W, 1/c)) pairs into a CAP-slot row buffer with an
  in-tile prefix sum. The row count is stored un-clipped, so the next kernel can detect overflow.
- `_sparse_bwd_kernel`: backward step 2. Program = one query row. Gathers K_j, V_j of the kept
  pairs (CHUNK at a time): dP = dO.V_j, dS = W~(dP - D_i), dQ += dS K_j (registers, fp32); dK_j,
  dV_j get dS Q_i and W~ dO_i by fp32 atomics (GQA heads of a group add into one K/V head). A row
  whose count exceeds CAP (probability < 1e-15 per row at the default CAP) is redone exactly by a
  dense scan of its keys that re-draws the same hashes: no host synchronisation, no bias.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _uniform(row_term, col_term):
    """Contract uniforms for a [R] row term and [C] column term (uint32, already multiplied)."""
    x = row_term[:, None] + col_term[None, :]
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return ((x >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # * 2^-24


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    skn,
    svn,
    offs_m,
    offs_n,
    offs_d,
    start,
    end,
    N_K,
    qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    BN: tl.constexpr,
):
    for s0 in range(start, end, BN):
        kn = s0 + offs_n
        if MASKED:
            kin = kn < N_K
            k = tl.load(k_base + kn[:, None] * skn + offs_d[None, :], mask=kin[:, None], other=0.0)
            v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :], mask=kin[:, None], other=0.0)
        else:
            k = tl.load(k_base + kn[:, None] * skn + offs_d[None, :])
            v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            valid = kn[None, :] < N_K
            if CAUSAL:
                valid = valid & (kn[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    son,
    H,
    GROUP,
    N_Q,
    N_K,
    qk_scale,
    CAUSAL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    D: tl.constexpr,
):
    # heaviest (causal) row blocks first: better tail balance
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < N_Q
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    if CAUSAL:  # N_Q == N_K; BM % BN == 0 so off-diagonal tiles need no mask
        acc, l_i, m_i = _fwd_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            skn,
            svn,
            offs_m,
            offs_n,
            offs_d,
            0,
            pid_m * BM,
            N_K,
            qk_scale,
            False,
            CAUSAL,
            BN,
        )
        acc, l_i, m_i = _fwd_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            skn,
            svn,
            offs_m,
            offs_n,
            offs_d,
            pid_m * BM,
            tl.minimum((pid_m + 1) * BM, N_K),
            N_K,
            qk_scale,
            True,
            CAUSAL,
            BN,
        )
    else:
        full_end = (N_K // BN) * BN
        acc, l_i, m_i = _fwd_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            skn,
            svn,
            offs_m,
            offs_n,
            offs_d,
            0,
            full_end,
            N_K,
            qk_scale,
            False,
            CAUSAL,
            BN,
        )
        acc, l_i, m_i = _fwd_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            skn,
            svn,
            offs_m,
            offs_n,
            offs_d,
            full_end,
            N_K,
            N_K,
            qk_scale,
            True,
            CAUSAL,
            BN,
        )
    o = acc / l_i[:, None]
    tl.store(
        O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None]
    )
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # log2 -> natural log
    tl.store(LSE + bh * N_Q + offs_m, lse, mask=row_ok)


@triton.jit
def _sample_tiles(
    cnt,
    q,
    k_base,
    skn,
    idx_rows,
    w_rows,
    row_ok,
    row_term,
    lse2,
    offs_m,
    offs_n,
    offs_d,
    start,
    end,
    N_K,
    qk_scale,
    c,
    inv_c,
    CAP,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    BN: tl.constexpr,
    MODE: tl.constexpr,
):
    for s0 in range(start, end, BN):
        kn = s0 + offs_n
        if MASKED:
            k = tl.load(k_base + kn[:, None] * skn + offs_d[None, :], mask=(kn < N_K)[:, None], other=0.0)
        else:
            k = tl.load(k_base + kn[:, None] * skn + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        qp = tl.minimum(p * c, 1.0)
        u = _uniform(row_term, kn.to(tl.uint32) * 0x85EBCA77)
        keep = (u < qp) | (qp >= 1.0)
        if MASKED:
            valid = kn[None, :] < N_K
            if CAUSAL:
                valid = valid & (kn[None, :] <= offs_m[:, None])
            keep = keep & valid
        if MODE == 2:  # timing probe: no hash
            keep = qp >= 0.5
            if MASKED:
                keep = keep & valid
        ki = keep.to(tl.int32)
        if MODE == 0:
            pos = cnt[:, None] + tl.cumsum(ki, 1) - ki
            smask = keep & (pos < CAP) & row_ok[:, None]
            tl.store(idx_rows[:, None] + pos, kn[None, :] + pos * 0, mask=smask)
            tl.store(w_rows[:, None] + pos, tl.maximum(p, inv_c), mask=smask)
        if MODE == 3:  # extract kept entries one per row per step (row reductions only, no scan)
            n_t = tl.sum(ki, 1)
            wtil = tl.maximum(p, inv_c)
            rem = keep
            slot = cnt
            for _ in range(0, tl.max(n_t, 0)):
                jf = tl.min(tl.where(rem, kn[None, :], 2147483647), 1)
                has = jf < 2147483647
                sel = rem & (kn[None, :] == jf[:, None])
                wf = tl.sum(tl.where(sel, wtil, 0.0), 1)
                smask = has & (slot < CAP) & row_ok
                tl.store(idx_rows + slot, jf, mask=smask)
                tl.store(w_rows + slot, wf, mask=smask)
                slot += has.to(tl.int32)
                rem = rem & (~sel)
        cnt += tl.sum(ki, 1)
    return cnt


@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(
    Q,
    K,
    LSE,
    IDX,
    WT,
    CNT,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    H,
    GROUP,
    N_Q,
    N_K,
    qk_scale,
    c,
    seed,
    CAP,
    CAUSAL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    D: tl.constexpr,
    MODE: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < N_Q
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + bh * N_Q + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    k_base = K + b * skb + hk * skh
    row_term = seed.to(tl.uint32) * 0x27D4EB2F + bh.to(tl.uint32) * 0x165667B1 + offs_m.to(tl.uint32) * 0x9E3779B1
    rows64 = (bh * N_Q + offs_m).to(tl.int64) * CAP
    idx_rows = IDX + rows64
    w_rows = WT + rows64
    inv_c = 1.0 / c
    cnt = tl.zeros([BM], tl.int32)
    if CAUSAL:
        cnt = _sample_tiles(
            cnt,
            q,
            k_base,
            skn,
            idx_rows,
            w_rows,
            row_ok,
            row_term,
            lse2,
            offs_m,
            offs_n,
            offs_d,
            0,
            pid_m * BM,
            N_K,
            qk_scale,
            c,
            inv_c,
            CAP,
            False,
            CAUSAL,
            BN,
            MODE,
        )
        cnt = _sample_tiles(
            cnt,
            q,
            k_base,
            skn,
            idx_rows,
            w_rows,
            row_ok,
            row_term,
            lse2,
            offs_m,
            offs_n,
            offs_d,
            pid_m * BM,
            tl.minimum((pid_m + 1) * BM, N_K),
            N_K,
            qk_scale,
            c,
            inv_c,
            CAP,
            True,
            CAUSAL,
            BN,
            MODE,
        )
    else:
        full_end = (N_K // BN) * BN
        cnt = _sample_tiles(
            cnt,
            q,
            k_base,
            skn,
            idx_rows,
            w_rows,
            row_ok,
            row_term,
            lse2,
            offs_m,
            offs_n,
            offs_d,
            0,
            full_end,
            N_K,
            qk_scale,
            c,
            inv_c,
            CAP,
            False,
            CAUSAL,
            BN,
            MODE,
        )
        cnt = _sample_tiles(
            cnt,
            q,
            k_base,
            skn,
            idx_rows,
            w_rows,
            row_ok,
            row_term,
            lse2,
            offs_m,
            offs_n,
            offs_d,
            full_end,
            N_K,
            N_K,
            qk_scale,
            c,
            inv_c,
            CAP,
            True,
            CAUSAL,
            BN,
            MODE,
        )
    tl.store(CNT + bh * N_Q + offs_m, cnt, mask=row_ok)


@triton.jit
def _pair_update(
    dq,
    j,
    w,
    m,
    qrow,
    dorow,
    Di,
    k_base,
    skn,
    v_base,
    svn,
    dk_base,
    dv_base,
    offs_d,
    scale,
    D: tl.constexpr,
    ATOMICS: tl.constexpr,
):
    """dQ/dK/dV contributions of up to CHUNK kept pairs (key j, weight w) of one query row."""
    kk = tl.load(k_base + j[:, None] * skn + offs_d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    vv = tl.load(v_base + j[:, None] * svn + offs_d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    dp = tl.sum(vv * dorow[None, :], 1)
    ds = w * (dp - Di)
    dq += tl.sum(ds[:, None] * kk, 0)
    off = j[:, None].to(tl.int64) * D + offs_d[None, :]
    if ATOMICS:
        tl.atomic_add(dk_base + off, ds[:, None] * (qrow[None, :] * scale), mask=m[:, None], sem="relaxed")
        tl.atomic_add(dv_base + off, w[:, None] * dorow[None, :], mask=m[:, None], sem="relaxed")
    return dq


@triton.jit(do_not_specialize=["seed"])
def _sparse_bwd_kernel(
    Q,
    K,
    V,
    O,
    DO,
    LSE,
    IDX,
    WT,
    CNT,
    DQ,
    DK,
    DV,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    son,
    sdob,
    sdoh,
    sdon,
    sdqb,
    sdqh,
    sdqn,
    H,
    HKV,
    GROUP,
    N_Q,
    N_K,
    scale,
    qk_scale,
    c,
    seed,
    CAP,
    CAUSAL: tl.constexpr,
    CHUNK: tl.constexpr,
    D: tl.constexpr,
    ATOMICS: tl.constexpr,
):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, CHUNK)
    qrow = tl.load(Q + b * sqb + h * sqh + i * sqn + offs_d).to(tl.float32)
    dorow = tl.load(DO + b * sdob + h * sdoh + i * sdon + offs_d).to(tl.float32)
    orow = tl.load(O + b * sob + h * soh + i * son + offs_d).to(tl.float32)
    Di = tl.sum(dorow * orow, 0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    kv_off = (b * HKV + hk).to(tl.int64) * N_K * D
    dk_base = DK + kv_off
    dv_base = DV + kv_off
    row = (bh * N_Q + i).to(tl.int64)
    cnt = tl.load(CNT + row)
    dq = tl.zeros([D], tl.float32)
    if cnt <= CAP:
        for s0 in range(0, cnt, CHUNK):
            offs = s0 + offs_c
            m = offs < cnt
            j = tl.load(IDX + row * CAP + offs, mask=m, other=0)
            w = tl.load(WT + row * CAP + offs, mask=m, other=0.0)
            dq = _pair_update(
                dq, j, w, m, qrow, dorow, Di, k_base, skn, v_base, svn, dk_base, dv_base, offs_d, scale, D, ATOMICS
            )
    else:  # overflowed row buffer: scan all keys, re-draw the same hashes, keep exactly as the sampler
        lse2 = tl.load(LSE + row) * 1.4426950408889634
        hi = N_K
        if CAUSAL:
            hi = tl.minimum(i + 1, N_K)
        row_term = seed.to(tl.uint32) * 0x27D4EB2F + bh.to(tl.uint32) * 0x165667B1 + i.to(tl.uint32) * 0x9E3779B1
        for s0 in range(0, hi, CHUNK):
            j = s0 + offs_c
            inb = j < hi
            kk = tl.load(k_base + j[:, None] * skn + offs_d[None, :], mask=inb[:, None], other=0.0)
            s = tl.sum(kk.to(tl.float32) * qrow[None, :], 1) * qk_scale
            p = tl.exp2(s - lse2)
            qp = tl.minimum(p * c, 1.0)
            u = tl.reshape(_uniform(row_term + tl.zeros([1], tl.uint32), j.to(tl.uint32) * 0x85EBCA77), [CHUNK])
            keep = inb & ((u < qp) | (qp >= 1.0))
            w = tl.where(keep, tl.maximum(p, 1.0 / c), 0.0)
            dq = _pair_update(
                dq, j, w, keep, qrow, dorow, Di, k_base, skn, v_base, svn, dk_base, dv_base, offs_d, scale, D, ATOMICS
            )
    tl.store(DQ + b * sdqb + h * sdqh + i * sdqn + offs_d, (dq * scale).to(DQ.dtype.element_ty))
