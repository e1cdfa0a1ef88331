"""Triton kernels of tile-sampled SUS attention (semantics: `sus_tile_reference.py`; driver: `sus_tile.py`).

- `_stats_kernel`: tile statistic m̂_IJ = max over sampled rows of Σ_{j∈J} W_ij. One program covers TPP
  query tiles × ROWS sampled rows each (ROWS = TILE / STRIDE, TPP·ROWS rows in one tensor-core block), loops
  over the key tiles it can see, one QKᵀ block and one exp2 per pair against the forward's LSE, no PV.
- `_bwd_dq_kernel`: row-major over segments of each query tile's kept key-tile list (≤ L tiles a segment):
  dQ = scale·Σ (W̃ ∘ (dO Vᵀ − D)) K with W̃ = P/π on kept tiles; also writes D_i = dO_i·O_i (segment 0).
- `_bwd_dkdv_kernel`: key-major over segments of each key tile's kept (query head, query tile) list, GQA
  groups in one list: dV = Σ W̃ᵀ dO, dK = scale·Σ dSᵀ Q.
Segments bound the serial chain of a program: a column that every query tile keeps (attention sink) is
split over several programs. A list with one segment stores its result in the output dtype; a list with
several adds fp32 partials into a scratch buffer that `_zero_multi_kernel` clears and `_cast_multi_kernel`
converts, both only for those lists. Both backward kernels are persistent: NPROG programs take the segment
units (segment × sub-block), whose count is read on the device, by a static stride or (DYN) from an atomic
counter, so nothing syncs with the host. FLAT runs one loop over (kept tile, block) pairs, so the loads of
the next block can be pipelined across tiles; the nested form skips causal blocks above the diagonal.
A kept tile's weight 1/π is read from π. The lists come from `_plan_lists_kernel` (per list: kept entries
by a prefix sum, count, segments; the column lists read keep transposed) and `_plan_segments_kernel`
(segment table from the cumulative segment counts): a few launches instead of dozens of small torch ops.
Products of bf16/fp16 operands accumulate in fp32; LSE and D are fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _stats_kernel(
    Q, K, LSE, QID, KID, M,
    sqb, sqh, sqn, skb, skh, skn,
    H, G, n_q, n_k, Tq, Tk, qk_scale,
    CAUSAL: tl.constexpr, DOC: tl.constexpr, TILE: tl.constexpr, STRIDE: tl.constexpr,
    ROWS: tl.constexpr, TPP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    r = tl.arange(0, TPP * ROWS)
    tile_i = pid * TPP + r // ROWS
    row = tile_i * TILE + (r % ROWS) * STRIDE
    row_ok = (row < n_q) & (tile_i < Tq)
    d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + row[:, None] * sqn + d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * n_q + row, mask=row_ok, other=float("inf")) * 1.4426950408889634
    if DOC:
        qid = tl.load(QID + b * n_q + row, mask=row_ok, other=-1)
    j_end = Tk
    if CAUSAL:
        last_row = tl.minimum((pid * TPP + TPP) * TILE - 1, n_q - 1)
        j_end = tl.minimum(Tk, last_row // TILE + 1)
    kbase = K + b * skb + hk * skh
    tiles = pid * TPP + tl.arange(0, TPP)
    for j in range(0, j_end):
        acc = tl.zeros([TPP * ROWS], dtype=tl.float32)
        for c0 in range(0, TILE, BN):
            col = j * TILE + c0 + tl.arange(0, BN)
            col_ok = col < n_k
            kt = tl.load(kbase + col[None, :] * skn + d[:, None], mask=col_ok[None, :], other=0.0)
            s = tl.dot(q, kt) * qk_scale
            ok = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                ok = ok & (col[None, :] <= row[:, None])
            if DOC:
                kid = tl.load(KID + b * n_k + col, mask=col_ok, other=-1)
                ok = ok & (qid[:, None] == kid[None, :]) & (kid[None, :] >= 0)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            acc += tl.sum(p, 1)
        mt = tl.max(tl.reshape(acc, [TPP, ROWS]), 1)
        tl.store(M + (bh * Tq + tiles) * Tk + j, mt, mask=tiles < Tq)


@triton.jit
def _dq_block(
    dq, q, do, lse, delta, qid, rows, rmask, cols, kbase, vbase, KID, b, n_k, skn, svn, wgt, qk_scale, d,
    CAUSAL: tl.constexpr, DOC: tl.constexpr,
):  # fmt: skip
    """dq += (P/π ∘ (dO Vᵀ − D)) K for one key block `cols` (masked pairs contribute 0)."""
    cmask = cols < n_k
    k = tl.load(kbase + cols[:, None] * skn + d[None, :], mask=cmask[:, None], other=0.0)
    v = tl.load(vbase + cols[:, None] * svn + d[None, :], mask=cmask[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    ok = rmask[:, None] & cmask[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    if DOC:
        kid = tl.load(KID + b * n_k + cols, mask=cmask, other=-1)
        ok = ok & (qid[:, None] == kid[None, :]) & (kid[None, :] >= 0)
    p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0) * wgt
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, kid, cols, cmask, rows, Q, DO, LSE, DELTA, QID, b, h, H, n_q,
    sqb, sqh, sqn, sdb, sdh, sdn, wgt, qk_scale, d, CAUSAL: tl.constexpr, DOC: tl.constexpr,
):  # fmt: skip
    """dv += (P/π)ᵀ dO, dk += (P/π ∘ (dO Vᵀ − D))ᵀ Q for one query block `rows` of head h (unscaled)."""
    rmask = rows < n_q
    bh = b * H + h
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + d[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + d[None, :], mask=rmask[:, None], other=0.0)
    lse = tl.load(LSE + bh * n_q + rows, mask=rmask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + bh * n_q + rows, mask=rmask, other=0.0)
    st = tl.dot(k, tl.trans(q)) * qk_scale  # [KB, QB]
    ok = cmask[:, None] & rmask[None, :]
    if CAUSAL:
        ok = ok & (cols[:, None] <= rows[None, :])
    if DOC:
        qid = tl.load(QID + b * n_q + rows, mask=rmask, other=-1)
        ok = ok & (kid[:, None] == qid[None, :]) & (kid[:, None] >= 0)
    pt = tl.where(ok, tl.exp2(st - lse[None, :]), 0.0) * wgt
    dv = dv + tl.dot(pt.to(do.dtype), do)
    dpt = tl.dot(v, tl.trans(do))
    dst = pt * (dpt - delta[None, :])
    dk = dk + tl.dot(dst.to(q.dtype), q)
    return dk, dv


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, QID, KID, PI,
    SEG_LIST, SEG_START, TOTAL, IDX, CNT, NSEG, COUNTER,
    DQ, DQ32,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdb, sdh, sdn,
    H, G, n_q, n_k, Tq, Tk, scale, qk_scale, L, NPROG,
    CAUSAL: tl.constexpr, DOC: tl.constexpr, TILE: tl.constexpr, QB: tl.constexpr, KB: tl.constexpr,
    D: tl.constexpr, FLAT: tl.constexpr, DYN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    SUBS: tl.constexpr = TILE // QB
    RK: tl.constexpr = TILE // KB
    units = tl.load(TOTAL) * SUBS
    d = tl.arange(0, D)
    if DYN:  # dynamic scheduling: each program takes the next unit from a counter
        u = tl.atomic_add(COUNTER, 1)
    else:
        u = pid
    while u < units:
        seg = u // SUBS
        sub = u % SUBS
        lst = tl.load(SEG_LIST + seg)  # = bh * Tq + I
        start = tl.load(SEG_START + seg)
        cnt = tl.load(CNT + lst)
        nseg = tl.load(NSEG + lst)
        i_tile = lst % Tq
        bh = lst // Tq
        b = bh // H
        h = bh % H
        hk = h // G
        rows = i_tile * TILE + sub * QB + tl.arange(0, QB)
        rmask = rows < n_q
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + d[None, :], mask=rmask[:, None], other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + d[None, :], mask=rmask[:, None], other=0.0)
        lse = tl.load(LSE + bh * n_q + rows, mask=rmask, other=float("inf")) * 1.4426950408889634
        o = tl.load(O + b * sob + h * soh + rows[:, None] * son + d[None, :], mask=rmask[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if start == 0:
            tl.store(DELTA + bh * n_q + rows, delta, mask=rmask)
        qid = rows
        if DOC:
            qid = tl.load(QID + b * n_q + rows, mask=rmask, other=-1)
        kbase = K + b * skb + hk * skh
        vbase = V + b * svb + hk * svh
        dq = tl.zeros([QB, D], dtype=tl.float32)
        end = tl.minimum(cnt, start + L)
        row_hi = i_tile * TILE + sub * QB + QB - 1
        if not CAUSAL:
            row_hi = row_hi * 0 + Tk * TILE  # every key tile runs
        if FLAT:  # one loop over (kept tile, key block): the loads of the next block pipeline across tiles
            for t in range(start * RK, end * RK):
                j = tl.load(IDX + lst * Tk + t // RK)
                wgt = 1.0 / tl.load(PI + lst * Tk + j)
                cols = j * TILE + (t % RK) * KB + tl.arange(0, KB)
                dq = _dq_block(dq, q, do, lse, delta, qid, rows, rmask, cols, kbase, vbase, KID, b, n_k, skn, svn,
                               wgt, qk_scale, d, CAUSAL, DOC)  # fmt: skip
        else:  # nested loops; causal blocks above the diagonal are skipped
            for e in range(start, end):
                j = tl.load(IDX + lst * Tk + e)
                wgt = 1.0 / tl.load(PI + lst * Tk + j)
                for c0 in range(0, TILE, KB):
                    if j * TILE + c0 <= row_hi:
                        cols = j * TILE + c0 + tl.arange(0, KB)
                        dq = _dq_block(dq, q, do, lse, delta, qid, rows, rmask, cols, kbase, vbase, KID, b, n_k, skn,
                                       svn, wgt, qk_scale, d, CAUSAL, DOC)  # fmt: skip
        dq = dq * scale
        optr = rows[:, None] * D + d[None, :]
        if nseg == 1:
            tl.store(DQ + bh * n_q * D + optr, dq.to(DQ.dtype.element_ty), mask=rmask[:, None])
        else:
            tl.atomic_add(DQ32 + bh * n_q * D + optr, dq, mask=rmask[:, None])
        if DYN:
            u = tl.atomic_add(COUNTER, 1)
        else:
            u += NPROG


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, QID, KID, PI,
    SEG_LIST, SEG_START, TOTAL, IDX, CNT, NSEG, COUNTER,
    DK, DV, DK32, DV32,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    H, HKV, G, n_q, n_k, Tq, Tk, M, scale, qk_scale, L, NPROG,
    CAUSAL: tl.constexpr, DOC: tl.constexpr, TILE: tl.constexpr, QB: tl.constexpr, KB: tl.constexpr,
    D: tl.constexpr, FLAT: tl.constexpr, DYN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    SUBS: tl.constexpr = TILE // KB
    RQ: tl.constexpr = TILE // QB
    units = tl.load(TOTAL) * SUBS
    d = tl.arange(0, D)
    if DYN:  # dynamic scheduling: each program takes the next unit from a counter
        u = tl.atomic_add(COUNTER, 1)
    else:
        u = pid
    while u < units:
        seg = u // SUBS
        sub = u % SUBS
        lst = tl.load(SEG_LIST + seg)  # = (b * HKV + hk) * Tk + J
        start = tl.load(SEG_START + seg)
        cnt = tl.load(CNT + lst)
        nseg = tl.load(NSEG + lst)
        j_tile = lst % Tk
        bhk = lst // Tk
        b = bhk // HKV
        hk = bhk % HKV
        cols = j_tile * TILE + sub * KB + tl.arange(0, KB)
        cmask = cols < n_k
        k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + d[None, :], mask=cmask[:, None], other=0.0)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + d[None, :], mask=cmask[:, None], other=0.0)
        kid = cols
        if DOC:
            kid = tl.load(KID + b * n_k + cols, mask=cmask, other=-1)
        dk = tl.zeros([KB, D], dtype=tl.float32)
        dv = tl.zeros([KB, D], dtype=tl.float32)
        end = tl.minimum(cnt, start + L)
        col_lo = j_tile * TILE + sub * KB
        if not CAUSAL:
            col_lo = col_lo * 0  # every query block runs
        if FLAT:  # one loop over (kept tile, query block): the loads of the next block pipeline across tiles
            for t in range(start * RQ, end * RQ):
                ent = tl.load(IDX + lst * M + t // RQ)  # = g * Tq + I
                h = hk * G + ent // Tq
                i_tile = ent % Tq
                wgt = 1.0 / tl.load(PI + ((b * H + h) * Tq + i_tile) * Tk + j_tile)
                rows = i_tile * TILE + (t % RQ) * QB + tl.arange(0, QB)
                dk, dv = _dkdv_block(dk, dv, k, v, kid, cols, cmask, rows, Q, DO, LSE, DELTA, QID, b, h, H, n_q,
                                     sqb, sqh, sqn, sdb, sdh, sdn, wgt, qk_scale, d, CAUSAL, DOC)  # fmt: skip
        else:  # nested loops; causal blocks above the diagonal are skipped
            for e in range(start, end):
                ent = tl.load(IDX + lst * M + e)
                h = hk * G + ent // Tq
                i_tile = ent % Tq
                wgt = 1.0 / tl.load(PI + ((b * H + h) * Tq + i_tile) * Tk + j_tile)
                for r0 in range(0, TILE, QB):
                    if i_tile * TILE + r0 + QB - 1 >= col_lo:
                        rows = i_tile * TILE + r0 + tl.arange(0, QB)
                        dk, dv = _dkdv_block(dk, dv, k, v, kid, cols, cmask, rows, Q, DO, LSE, DELTA, QID, b, h,
                                             H, n_q, sqb, sqh, sqn, sdb, sdh, sdn, wgt, qk_scale, d, CAUSAL,
                                             DOC)  # fmt: skip
        dk = dk * scale
        optr = bhk * n_k * D + cols[:, None] * D + d[None, :]
        if nseg == 1:
            tl.store(DK + optr, dk.to(DK.dtype.element_ty), mask=cmask[:, None])
            tl.store(DV + optr, dv.to(DV.dtype.element_ty), mask=cmask[:, None])
        else:
            tl.atomic_add(DK32 + optr, dk, mask=cmask[:, None])
            tl.atomic_add(DV32 + optr, dv, mask=cmask[:, None])
        if DYN:
            u = tl.atomic_add(COUNTER, 1)
        else:
            u += NPROG


@triton.jit
def _zero_multi_kernel(NSEG, A32, B32, n, TILE: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, PAIR: tl.constexpr):
    """Clears the fp32 scratch rows of lists with several segments (list l covers rows l·TILE .. of its head)."""
    lst = tl.program_id(0)
    nt = tl.cdiv(n, TILE)
    if tl.load(NSEG + lst) > 1:
        head = lst // nt
        t = lst % nt
        d = tl.arange(0, D)
        for r0 in range(0, TILE, BR):
            rows = t * TILE + r0 + tl.arange(0, BR)
            ptr = head * n * D + rows[:, None] * D + d[None, :]
            m = (rows < n)[:, None]
            tl.store(A32 + ptr, tl.zeros([BR, D], dtype=tl.float32), mask=m)
            if PAIR:
                tl.store(B32 + ptr, tl.zeros([BR, D], dtype=tl.float32), mask=m)


@triton.jit
def _cast_multi_kernel(
    NSEG, A32, B32, A, B, n, TILE: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, PAIR: tl.constexpr
):
    """Writes the fp32 scratch rows of lists with several segments into the outputs (their dtype)."""
    lst = tl.program_id(0)
    nt = tl.cdiv(n, TILE)
    if tl.load(NSEG + lst) > 1:
        head = lst // nt
        t = lst % nt
        d = tl.arange(0, D)
        for r0 in range(0, TILE, BR):
            rows = t * TILE + r0 + tl.arange(0, BR)
            ptr = head * n * D + rows[:, None] * D + d[None, :]
            m = (rows < n)[:, None]
            tl.store(A + ptr, tl.load(A32 + ptr, mask=m).to(A.dtype.element_ty), mask=m)
            if PAIR:
                tl.store(B + ptr, tl.load(B32 + ptr, mask=m).to(B.dtype.element_ty), mask=m)


@triton.jit
def _plan_lists_kernel(
    KEEP, IDX, CNT, NSEG, N, Tq, Tk, H, HKV, G, seg, COLS: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """One kept list per program: its kept entries in ascending order (stream compaction by a prefix sum),
    its count and its number of segments (≥ 1). Rows: list bh·Tq + I over key tiles J. Columns (COLS): list
    (b·HKV + hk)·Tk + J over entries g·Tq + I of the kv head's query heads, read from keep [B, H, Tq, Tk]."""
    lst = tl.program_id(0)
    e = tl.arange(0, BLOCK)
    emask = e < N
    if COLS:
        j = lst % Tk
        bhk = lst // Tk
        b = bhk // HKV
        hk = bhk % HKV
        off = ((b * H + hk * G + e // Tq) * Tq + e % Tq) * Tk + j
    else:
        off = lst * Tk + e
    kv = tl.load(KEEP + off, mask=emask, other=0).to(tl.int32)
    pos = tl.cumsum(kv, 0) - kv
    cnt = tl.sum(kv, 0)
    tl.store(IDX + lst * N + pos, e, mask=emask & (kv != 0))
    tl.store(CNT + lst, cnt)
    tl.store(NSEG + lst, tl.maximum((cnt + seg - 1) // seg, 1))


@triton.jit
def _plan_segments_kernel(CUM, NSEG, SEG_LIST, SEG_START, seg):
    """Writes list l's segments (l, s·seg) at slots cum[l] − nseg[l] … cum[l] − 1 of the segment table."""
    lst = tl.program_id(0)
    n = tl.load(NSEG + lst)
    base = tl.load(CUM + lst) - n
    for s in range(0, n):
        tl.store(SEG_LIST + base + s, lst)
        tl.store(SEG_START + base + s, s * seg)
