"""Triton kernels behind `sus_triton.py` (imported lazily: CPU-only installs have no Triton).

All read [B, H, n, D] tensors through strides (last dim contiguous); `sus_triton.py` documents the design.

- `_fwd_kernel`: flash attention forward. Program = (BM query rows, one (batch, head)); loops over
  BN-key tiles with an online softmax in fp32; writes O (input dtype) and LSE (natural log, fp32).
  Causal programs split the key loop into unmasked off-diagonal tiles and masked diagonal tiles.
- `_sample_kernel`: backward step 1. Same tiling; recomputes S = QK^T once per tile, cW = c exp(S scale
  - LSE), the contract hash u, keep = u < cW; then writes either the row's nonzero 16-key words (SAMPLER 3,
  "words", default: the keep tiles of 256 keys are packed into 16 words on the tensor cores and only the
  words are compacted; `_words_to_keys_kernel` turns them into key indices), or its kept key indices at
  in-row prefix counts (SAMPLER 1, "prefix"); SAMPLER 2 only counts (a timing probe). Prefix counts and
  words are products of 0/1 tiles with constant matrices on the tensor cores.
- `_sparse_bwd_kernel`: backward step 2. Program = one query row. Gathers K_j, V_j of the kept keys
  (CHUNK at a time), recomputes W~ = max(W, 1/c), dP = dO.V_j, dS = W~(dP - D_i), dQ += dS K_j
  (registers, fp32); dK_j, dV_j get dS Q_i and W~ dO_i by fp32 atomics (GQA heads of a group add into
  one K/V head). A row whose count exceeds CAP is redone exactly by a dense scan of its keys that
  re-draws the same hashes: no host synchronisation, no bias.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _uniform(row_term, col_term):
    """Contract uniforms for a [R] row term and [C] column term (uint32, already multiplied)."""
    return _hash_uniform(row_term[:, None] + col_term[None, :])


@triton.jit
def _hash_uniform(x):
    """Contract uniform of an already summed hash input x (uint32, any shape): the murmur3 finaliser."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    # (f + 0.5) * 2^-24 rounded once == f * 2^-24 + 2^-25 in one FMA (power-of-two scaling commutes with rounding)
    return (x >> 8).to(tl.float32) * 5.9604644775390625e-08 + 2.9802322387695312e-08


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
def _keep_tile(
    q, k_base, skn, row_term, lse2c, offs_m, kn, offs_d, N_K, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr
):
    """The contract's keep decisions for query rows offs_m x keys kn: S = q K^T recomputed on the tensor cores,
    c W in one exp2 (lse2c = LSE log2(e) - log2(c); padded rows +inf keep nothing), keep iff u < min(1, cW)
    or cW >= 1, i.e. u < cW (u <= 1: they differ only if u == cW == 1.0)."""
    if MASKED:
        k = tl.load(k_base + kn[:, None] * skn + offs_d[None, :], mask=(kn < N_K)[:, None], other=0.0)
    else:
        k = tl.load(k_base + kn[:, None] * skn + offs_d[None, :])
    cw = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2c[:, None])
    keep = _uniform(row_term, kn.to(tl.uint32) * 0x85EBCA77) < cw
    if MASKED:
        valid = kn[None, :] < N_K
        if CAUSAL:
            valid = valid & (kn[None, :] <= offs_m[:, None])
        keep = keep & valid
    return keep


@triton.jit
def _sample_tiles(
    cnt,
    q,
    k_base,
    skn,
    out_rows,
    ones,
    row_term,
    lse2c,
    offs_m,
    offs_n,
    offs_d,
    start,
    end,
    N_K,
    qk_scale,
    CAP,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    BN: tl.constexpr,
    SAMPLER: tl.constexpr,
):
    for s0 in range(start, end, BN):
        kn = s0 + offs_n
        keep = _keep_tile(q, k_base, skn, row_term, lse2c, offs_m, kn, offs_d, N_K, qk_scale, MASKED, CAUSAL)
        kf = keep.to(tl.float16)
        if SAMPLER == 1:  # prefix: in-row inclusive counts on the tensor cores (keep @ triangular ones)
            pos = (cnt[:, None] + tl.dot(kf, ones) - 1.0).to(tl.int32)
            tl.store(out_rows[:, None] + pos, tl.broadcast_to(kn[None, :], pos.shape), mask=keep & (pos < CAP))
        cnt += tl.sum(kf.to(tl.float32), 1)  # SAMPLER 2 (timing probe) only counts
    return cnt


@triton.jit
def _word_tiles(
    cnt,
    wacc,
    q,
    k_base,
    skn,
    out_rows,
    tri16,
    row_term,
    lse2c,
    offs_m,
    offs_n,
    offs_d,
    start,
    end,
    N_K,
    qk_scale,
    CAP,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    BN: tl.constexpr,
):
    """SAMPLER 3 ("words"): the keep tiles of 256 keys are packed into 16 words of 16 bits on the tensor cores
    (keep @ a [BN, 16] matrix of powers of two, shifted to the tile's 4 columns of the group), then only the
    [BM, 16] words are compacted: nonzero words go to the row's buffer as (word index << 16 | bits), slot =
    in-row prefix count of nonzero words (a [BM,16] x [16,16] tensor-core product). 1/16 of the per-pair
    compaction work of SAMPLER 1; `_words_to_keys_kernel` unpacks the bits."""
    offs_w = tl.arange(0, 16)
    for s0 in range(start, end, BN):
        kn = s0 + offs_n
        keep = _keep_tile(q, k_base, skn, row_term, lse2c, offs_m, kn, offs_d, N_K, qk_scale, MASKED, CAUSAL)
        shift = (s0 % 256) // 16
        pw = tl.where(offs_n[:, None] // 16 + shift == offs_w[None, :], (1 << (offs_n % 16))[:, None], 0)
        wacc = tl.dot(keep.to(tl.float16), pw.to(tl.float16), wacc)  # exact: sums of distinct powers < 2^16
        if ((s0 + BN) % 256 == 0) | (s0 + BN >= end):
            words = wacc.to(tl.int32)
            nz = words != 0
            pos = (cnt[:, None] + tl.dot(nz.to(tl.float16), tri16) - 1.0).to(tl.int32)
            entry = (((s0 // 256) * 16 + offs_w) << 16)[None, :] | words
            tl.store(out_rows[:, None] + pos, entry, mask=nz & (pos < CAP))
            cnt += tl.sum(nz.to(tl.float32), 1)
            wacc = tl.zeros_like(wacc)
    return cnt, wacc


@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(
    Q,
    K,
    LSE,
    OUT,
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
    log2c,
    seed,
    CAP,
    CAUSAL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    D: tl.constexpr,
    SAMPLER: tl.constexpr,
):
    """SAMPLER 1: OUT = key slots int32 [rows, CAP], CNT = counts; 2: CNT = counts only (timing probe);
    3: OUT = nonzero 16-key words int32 [rows, CAP] as (word index << 16 | bits), CNT = nonzero words."""
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
    lse2c = tl.load(LSE + bh * N_Q + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634 - log2c
    k_base = K + b * skb + hk * skh
    row_term = seed.to(tl.uint32) * 0x27D4EB2F + bh.to(tl.uint32) * 0x165667B1 + offs_m.to(tl.uint32) * 0x9E3779B1
    rows = (bh * N_Q + offs_m).to(tl.int64)
    # key range [0, mid) needs no mask; [mid, hi) does (causal: the diagonal block; else: the ragged tail)
    if CAUSAL:  # N_Q == N_K; BM % BN == 0
        mid = pid_m * BM
        hi = tl.minimum((pid_m + 1) * BM, N_K)
    else:
        mid = (N_K // BN) * BN
        hi = N_K
    cnt = tl.zeros([BM], tl.float32)  # exact: counts < 2^24
    if SAMPLER == 3:
        out_rows = OUT + rows * CAP
        offs_w = tl.arange(0, 16)
        tri16 = (offs_w[:, None] <= offs_w[None, :]).to(tl.float16)
        wacc = tl.zeros([BM, 16], tl.float32)
        cnt, wacc = _word_tiles(
            cnt,
            wacc,
            q,
            k_base,
            skn,
            out_rows,
            tri16,
            row_term,
            lse2c,
            offs_m,
            offs_n,
            offs_d,
            0,
            mid,
            N_K,
            qk_scale,
            CAP,
            False,
            CAUSAL,
            BN,
        )
        cnt, wacc = _word_tiles(
            cnt,
            wacc,
            q,
            k_base,
            skn,
            out_rows,
            tri16,
            row_term,
            lse2c,
            offs_m,
            offs_n,
            offs_d,
            mid,
            hi,
            N_K,
            qk_scale,
            CAP,
            True,
            CAUSAL,
            BN,
        )
    else:
        out_rows = OUT + rows * CAP
        ones = (offs_n[:, None] <= offs_n[None, :]).to(tl.float16)
        cnt = _sample_tiles(
            cnt,
            q,
            k_base,
            skn,
            out_rows,
            ones,
            row_term,
            lse2c,
            offs_m,
            offs_n,
            offs_d,
            0,
            mid,
            N_K,
            qk_scale,
            CAP,
            False,
            CAUSAL,
            BN,
            SAMPLER,
        )
        cnt = _sample_tiles(
            cnt,
            q,
            k_base,
            skn,
            out_rows,
            ones,
            row_term,
            lse2c,
            offs_m,
            offs_n,
            offs_d,
            mid,
            hi,
            N_K,
            qk_scale,
            CAP,
            True,
            CAUSAL,
            BN,
            SAMPLER,
        )
    tl.store(CNT + bh * N_Q + offs_m, cnt.to(tl.int32), mask=row_ok)


@triton.jit
def _popc16(x):
    x = x - ((x >> 1) & 0x5555)
    x = (x & 0x3333) + ((x >> 2) & 0x3333)
    x = (x + (x >> 4)) & 0x0F0F
    return (x + (x >> 8)) & 0x1F


@triton.jit
def _words_to_keys_kernel(WORDS, WCNT, IDX, CNT, ROWS, CAP, R: tl.constexpr, WCHUNK: tl.constexpr):
    """SAMPLER 3's word entries of R rows -> their kept key indices (ascending, slots < CAP) and key counts.

    Slot of the p-th set bit of entry e = (set bits in the row's entries before e) + p: a prefix sum over
    <= CAP entries per row instead of a compaction over the row's n keys. Entries are read WCHUNK at a time
    (only as many chunks as the tile's longest row needs); each pass emits the lowest remaining bit of every
    word, so a chunk costs max(popcount) passes (almost always 1: kept keys are sparse). A row whose words
    overflowed keeps its word count (> CAP); a row with more than CAP kept keys gets its key count (> CAP):
    both go to the sparse pass's dense re-draw path."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    offs = tl.arange(0, WCHUNK)
    row_ok = rows < ROWS
    wcnt = tl.load(WCNT + rows, mask=row_ok, other=0)
    live_words = tl.minimum(wcnt, CAP)
    base = rows.to(tl.int64)[:, None] * CAP
    keys = tl.zeros([R], tl.int32)
    for s0 in range(0, tl.max(live_words, 0), WCHUNK):
        slots = s0 + offs
        e = tl.load(WORDS + base + slots[None, :], mask=slots[None, :] < live_words[:, None], other=0)
        bits = e & 0xFFFF
        pc = _popc16(bits)
        slot = keys[:, None] + tl.cumsum(pc, 1) - pc
        for _ in range(0, tl.max(tl.max(pc, 1), 0)):
            low = bits & (0 - bits)
            tl.store(IDX + base + slot, (e >> 16) * 16 + _popc16((low - 1) & 0xFFFF), mask=(bits != 0) & (slot < CAP))
            bits = bits & (bits - 1)
            slot += 1
        keys += tl.sum(pc, 1)
    tl.store(CNT + rows, tl.where(wcnt > CAP, wcnt, keys), mask=row_ok)


@triton.jit
def _pair_update(
    dq,
    j,
    inb,
    qrow,
    dorow,
    Di,
    lse2c,
    inv_c,
    row_term,
    k_base,
    skn,
    v_base,
    svn,
    dk_base,
    dv_base,
    offs_d,
    qk_scale,
    scale,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    REDRAW: tl.constexpr,
    ATOMICS: tl.constexpr,
):
    """dQ/dK/dV contributions of up to CHUNK keys j of one query row.

    W~_ij = max(W_ij, 1/c) is recomputed from the gathered K_j (fp32 dot of the same bf16/fp16 values the
    sampler multiplied on tensor cores: equal up to fp32 summation order). REDRAW: j are all keys of the
    row, and the contract's keep test is redone here (overflow path); else j are the sampled kept keys.
    """
    kk = tl.load(k_base + j[:, None] * skn + offs_d[None, :], mask=inb[:, None], other=0.0).to(tl.float32)
    cw = tl.exp2(tl.sum(kk * qrow[None, :], 1) * qk_scale - lse2c)
    if REDRAW:
        u = tl.reshape(_uniform(row_term + tl.zeros([1], tl.uint32), j.to(tl.uint32) * 0x85EBCA77), [CHUNK])
        keep = inb & (u < cw)
    else:
        keep = inb
    w = tl.where(keep, tl.maximum(cw, 1.0) * inv_c, 0.0)
    vv = tl.load(v_base + j[:, None] * svn + offs_d[None, :], mask=keep[:, None], other=0.0).to(tl.float32)
    ds = w * (tl.sum(vv * dorow[None, :], 1) - Di)
    dq += tl.sum(ds[:, None] * kk, 0)
    off = j[:, None].to(tl.int64) * D + offs_d[None, :]
    if ATOMICS:
        tl.atomic_add(dk_base + off, ds[:, None] * (qrow[None, :] * scale), mask=keep[:, None], sem="relaxed")
        tl.atomic_add(dv_base + off, w[:, None] * dorow[None, :], mask=keep[:, None], sem="relaxed")
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
    log2c,
    inv_c,
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
    lse2c = tl.load(LSE + row) * 1.4426950408889634 - log2c
    row_term = seed.to(tl.uint32) * 0x27D4EB2F + bh.to(tl.uint32) * 0x165667B1 + i.to(tl.uint32) * 0x9E3779B1
    cnt = tl.load(CNT + row)
    dq = tl.zeros([D], tl.float32)
    if cnt <= CAP:
        for s0 in range(0, cnt, CHUNK):
            offs = s0 + offs_c
            m = offs < cnt
            j = tl.load(IDX + row * CAP + offs, mask=m, other=0)
            dq = _pair_update(
                dq,
                j,
                m,
                qrow,
                dorow,
                Di,
                lse2c,
                inv_c,
                row_term,
                k_base,
                skn,
                v_base,
                svn,
                dk_base,
                dv_base,
                offs_d,
                qk_scale,
                scale,
                D,
                CHUNK,
                False,
                ATOMICS,
            )
    else:  # overflowed row buffer: scan all keys of the row, re-draw the same hashes
        hi = N_K
        if CAUSAL:
            hi = tl.minimum(i + 1, N_K)
        for s0 in range(0, hi, CHUNK):
            j = s0 + offs_c
            dq = _pair_update(
                dq,
                j,
                j < hi,
                qrow,
                dorow,
                Di,
                lse2c,
                inv_c,
                row_term,
                k_base,
                skn,
                v_base,
                svn,
                dk_base,
                dv_base,
                offs_d,
                qk_scale,
                scale,
                D,
                CHUNK,
                True,
                ATOMICS,
            )
    tl.store(DQ + b * sdqb + h * sdqh + i * sdqn + offs_d, (dq * scale).to(DQ.dtype.element_ty))
