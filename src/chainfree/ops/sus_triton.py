"""SUS attention on the GPU: exact flash forward, sampled O(n c D) backward (Triton), the per-pair kernel v1.

v1 implements the 'bernoulli' contract of `sus_reference.py` (the paper's rule); it samples in the backward.
(A second per-pair kernel, v2, which sampled inside the forward, was removed as dominated at every measured
shape; docs/sus_kernel.md has the measurements.)

Semantics are those of `sus_reference.py` and the random-source contract of `sus_random.py`: the
backward replaces W by W~ (W_ij / q_ij kept with probability q_ij = min(1, c W_ij), else 0) wherever W
appears explicitly; D_i = dO_i . O_i stays exact. Given the same seed this kernel draws the same u_ij
as the reference, so kept sets agree except where u_ij and q_ij differ by float32 rounding of W.

Design (the backward recomputes S once, docs/sus_kernel.md):
- Forward (`_fwd_kernel`): flash attention, tiles of BM query rows x BN keys, online softmax in fp32,
  tensor-core QK^T and PV with fp32 accumulation. Saves Q, K, V, O and LSE [B*H, n] (fp32, natural
  log): O(n D) memory, no n x n tensor. Output equals SDPA to bf16/fp16 rounding.
- Backward step 1, sampler (`_sample_kernel`), same tiling: S = QK^T (the only n^2 D matmul of the
  backward, instead of the four of a flash backward), cW = exp2(S scale log2e - LSE log2e + log2 c), the
  contract hash u per (i, j), keep iff u < cW. Output: each row's kept key indices, ascending, in a buffer
  of CAP slots (CAP = c + 8 sqrt(c) + 16: a row keeps at most c in expectation with variance <= c, so
  overflow has probability < 1e-15 per row), and the un-clipped count. Default sampler "words": the 0/1
  keep tiles of 256 keys are multiplied on the tensor cores by matrices of powers of two, giving 16 words
  of 16 bits per row; only the nonzero words are compacted into the row buffer (slot = prefix count of
  nonzero words, another tensor-core product), and `_words_to_keys_kernel` turns each row's <= CAP words
  into key indices by a prefix sum of popcounts. Per (i, j) this leaves one MMA operand conversion instead
  of a compaction. Variant "prefix": the keep tile times an upper-triangular matrix of ones gives in-row
  prefix counts and every kept key is stored at its slot directly (per-pair work: twice the time).
- Backward step 2 (`_sparse_bwd_kernel`), one program per query row: gathers K_j, V_j of its kept keys,
  recomputes W~_ij = max(W_ij, 1/c) (= W/q for kept entries) from q_i.K_j and LSE, dP_ij = dO_i.V_j,
  dS_ij = W~_ij (dP_ij - D_i), D_i = dO_i.O_i; dQ_i in registers; dK_j += dS_ij Q_i scale and
  dV_j += W~_ij dO_i by fp32 atomics into [B, Hkv, n, D] buffers (GQA sums over the group for free), cast
  to the input dtype at the end. A row whose count exceeded CAP is redone exactly by a dense scan of its
  keys that re-draws the same hashes (rare; keeps the estimator unbiased, needs no host sync).
Numerics: products of bf16/fp16 operands accumulate in fp32; W~, dS, dQ/dK/dV accumulate in fp32. The
keep test u < cW equals the contract's (u < min(1, cW)) | (cW >= 1) except when u == cW == 1.0 exactly.
Kept sets match the reference except where u and cW differ by fp32 rounding of W (~1e-6 relative).
Atomic accumulation order is not deterministic: dK/dV vary run to run at fp32 rounding level.
Cost per backward: one n^2 D matmul + one hash and one exp per (i, j) of the causal triangle + O(n c D)
gathers and atomics; docs/sus_kernel.md has the measured numbers and what limits them.
"""

from __future__ import annotations

import math

import torch

from chainfree.ops.sus_random import draw_seed

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (32, 64, 128)
SAMPLERS = {"prefix": 1, "words": 3}  # the kernel's SAMPLER mode (2: count-only timing probe)
SAMPLER = "words"  # the default; measured against the others by benchmarks/sus_probe.py (docs/sus_kernel.md)
MAX_KEYS_WORDS = 2**19  # "words" entries hold the 16-key word index in 15 bits
KERNELS = ("v1",)
KERNEL = "v1"  # 'bernoulli' draw in the backward (sampler above)
VARIANT_OF = {"v1": "bernoulli"}


def row_capacity(c: float, n_k: int) -> int:
    """Slots per query row in the kept-pair buffer: c + 8 sqrt(c) + 16 (<= n_k), a multiple of 16.

    A row's count is a sum of independent Bernoullis with mean <= c and variance <= c; by Bernstein's
    inequality P(count > c + 8 sqrt(c) + 16) < 1e-15. Overflowed rows are still handled exactly.
    """
    cap = int(math.ceil(c + 8.0 * math.sqrt(c) + 16.0))
    cap = 16 * ((cap + 15) // 16)
    return max(1, min(cap, n_k))


def _kernels():
    try:
        from chainfree.ops import _sus_triton_kernels as kernels
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "sus_attention_triton needs Triton (pip install 'chainfree[gpu]'); "
            "on CPU use chainfree.ops.sus.sus_attention, which falls back to the PyTorch reference"
        ) from exc
    return kernels


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    enable_gqa: bool,
    c: float,
    words: bool = False,
) -> None:
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        raise ValueError(
            "sus_attention_triton needs CUDA tensors; for CPU tensors call "
            "chainfree.ops.sus.sus_attention (PyTorch reference)"
        )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected q, k, v of shape [B, H, n, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"sus_attention_triton supports bfloat16 and float16 (all of q, k, v alike); got "
            f"{q.dtype}, {k.dtype}, {v.dtype}: cast with .to(torch.bfloat16), or use the "
            f"reference for float32/float64"
        )
    B, H, n_q, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS or k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(
            f"head dim must be one of {SUPPORTED_HEAD_DIMS} for q, k and v; got q {d}, "
            f"k {k.shape[-1]}, v {v.shape[-1]}: pad the head dim or use the reference"
        )
    if k.shape != v.shape or k.shape[0] != B:
        raise ValueError(f"k and v must both be [B, Hkv, n_k, D] with q's B; got {tuple(k.shape)}, {tuple(v.shape)}")
    h_kv = k.shape[1]
    if h_kv != H and not enable_gqa:
        raise ValueError(f"q has {H} heads but k/v have {h_kv}: pass enable_gqa=True for grouped-query attention")
    if H % h_kv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({h_kv})")
    if is_causal and k.shape[2] != n_q:
        raise ValueError(f"is_causal needs equal query and key lengths; got {n_q} and {k.shape[2]}")
    if n_q == 0 or k.shape[2] == 0:
        raise ValueError("empty sequence")
    if words and SAMPLER == "words" and k.shape[2] > MAX_KEYS_WORDS:  # raise now, not in the backward
        raise ValueError(
            f"the kernel's 'words' sampler indexes at most {MAX_KEYS_WORDS} keys, got {k.shape[2]}: set "
            "chainfree.ops.sus_triton.SAMPLER = 'prefix' for longer sequences"
        )
    if not (c > 0 and math.isfinite(c)):
        raise ValueError(
            f"c must be a positive finite number (expected kept entries per row), got {c}; "
            "for exact gradients use a huge c such as 1e30, or F.scaled_dot_product_attention"
        )


def supports(q: torch.Tensor, k: torch.Tensor, variant: str = "bernoulli") -> bool:
    """Whether a kernel handles this case and contract (else callers use the PyTorch reference)."""
    if variant not in VARIANT_OF.values() or not q.is_cuda or q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        return False
    try:
        _kernels()
    except RuntimeError:
        return False
    return q.shape[-1] in SUPPORTED_HEAD_DIMS and k.shape[-1] == q.shape[-1]


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _sample_config(d: int) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) of the sampler: measured best of five tilings on an H100."""
    return 64, 64, 4, 3


def _fwd_config(d: int) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) of the forward; BM % BN == 0 (causal split)."""
    if d == 128:
        return 128, 64, 8, 3
    return 128, 64, 4, 3


def flash_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O [B,H,n,D] in q's dtype, LSE [B*H, n] fp32 natural log) by the Triton flash forward."""
    kern = _kernels()
    B, H, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    o = torch.empty(B, H, n_q, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(B * H, n_q, device=q.device, dtype=torch.float32)
    bm, bn, warps, stages = _fwd_config(d)
    grid = (triton_cdiv(n_q, bm), B * H)
    kern._fwd_kernel[grid](
        q,
        k,
        v,
        o,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        o.stride(0),
        o.stride(1),
        o.stride(2),
        H,
        H // h_kv,
        n_q,
        n_k,
        scale * kern.LOG2E,
        CAUSAL=is_causal,
        BM=bm,
        BN=bn,
        D=d,
        num_warps=warps,
        num_stages=stages,
    )
    return o, lse


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def aten_flash_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, LSE [B*H, n] fp32 natural log) from PyTorch's own flash-attention kernel (SDPA's flash backend).

    The alternative forward: same outputs as `flash_forward`, at exactly SDPA's forward speed. GQA is
    served by expanding K/V to the query heads (extra memory traffic), as the op needs equal heads.
    """
    H, h_kv = q.shape[1], k.shape[1]
    if h_kv != H:
        k, v = k.repeat_interleave(H // h_kv, 1), v.repeat_interleave(H // h_kv, 1)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
    o, lse = res[0], res[1]
    B, _, n_q, _ = q.shape
    return o, lse[..., :n_q].reshape(B * H, n_q).float().contiguous()


FORWARDS = {"triton": flash_forward, "aten": aten_flash_forward}


def sample_kept_pairs(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    c: float,
    is_causal: bool,
    scale: float,
    seed: int,
    cap: int,
    sampler: str | None = None,
    probe: bool = False,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward step 1 on the GPU: (idx int32 [B*H*n, cap], count int32 [B*H*n]).

    Slots s < min(count, cap) of row r = bh * n + i hold its kept key indices in ascending order; count is
    un-clipped (count > cap marks an overflowed row). `sampler` (None = SAMPLER): "words" (the keep tiles are
    packed into 16-key words on the tensor cores, the sampler compacts only the row's nonzero words, and
    `_words_to_keys_kernel` turns them into key indices by a prefix sum over <= cap words per row), "prefix"
    (the sampler writes key indices at in-row prefix counts).
    `probe=True` only counts (timing probe: matmul + exp + hash without output).
    `chainfree.ops.sus_sparse` is the PyTorch port of this layout.
    """
    kern = _kernels()
    sampler = sampler or SAMPLER
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if sampler == "words" and k.shape[2] > MAX_KEYS_WORDS:
        raise ValueError(
            f"the 'words' sampler indexes at most {MAX_KEYS_WORDS} keys (got {k.shape[2]}); "
            "use sampler='prefix' or split the sequence"
        )
    B, H, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    idx = torch.empty(B * H * n_q, cap, device=q.device, dtype=torch.int32)
    cnt = torch.empty(B * H * n_q, device=q.device, dtype=torch.int32)
    mode = 2 if probe else SAMPLERS[sampler]
    bm, bn, warps, stages = config or _sample_config(d)
    grid = (triton_cdiv(n_q, bm), B * H)
    kern._sample_kernel[grid](
        q, k, lse, idx, cnt, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        H, H // h_kv, n_q, n_k, scale * kern.LOG2E, math.log2(c), int(seed), cap,
        CAUSAL=is_causal, BM=bm, BN=bn, D=d, SAMPLER=mode, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if mode == 3:
        keys, key_cnt = torch.empty_like(idx), torch.empty_like(cnt)
        rows, per_program = idx.shape[0], 16
        kern._words_to_keys_kernel[(triton_cdiv(rows, per_program),)](
            idx, cnt, keys, key_cnt, rows, cap, R=per_program, WCHUNK=32, num_warps=4
        )
        return keys, key_cnt
    return idx, cnt


def sparse_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    idx: torch.Tensor,
    cnt: torch.Tensor,
    c: float,
    is_causal: bool,
    scale: float,
    seed: int,
    atomics: bool = True,
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward step 2 on the GPU: (dQ, dK, dV) from the kept pairs; overflowed rows are redone densely.

    `atomics=False` skips the dK/dV scatter (a timing probe); `config` = (CHUNK, num_warps) overrides.
    """
    kern = _kernels()
    B, H, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    cap = idx.shape[1]
    dq = torch.empty(B, H, n_q, d, device=q.device, dtype=q.dtype)
    dk = torch.zeros(B, h_kv, n_k, d, device=q.device, dtype=torch.float32)
    dv = torch.zeros(B, h_kv, n_k, d, device=q.device, dtype=torch.float32)
    chunk, warps = config or _sparse_config(d)
    kern._sparse_bwd_kernel[(n_q, B * H)](
        q, k, v, o, do, lse, idx, cnt, dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        H, h_kv, H // h_kv, n_q, n_k, scale, scale * kern.LOG2E, math.log2(c), 1.0 / c, int(seed), cap,
        CAUSAL=is_causal, CHUNK=chunk, D=d, ATOMICS=atomics, num_warps=warps,
    )  # fmt: skip
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _sparse_config(d: int) -> tuple[int, int]:
    """(CHUNK pairs gathered per step, num_warps) of the sparse pass."""
    return 8, 1  # best of (8|16|32, 1|2|4) at n = 16k, D = 64 and 128 on an H100 (benchmarks/sus_probe.py)


class SusAttentionTriton(torch.autograd.Function):
    """Autograd Function: saves (q, k, v, O, LSE) and the seed; backward = sample + sparse pass."""

    @staticmethod
    def forward(ctx, q, k, v, c: float, is_causal: bool, scale: float, seed: int, cap: int, fwd: str):
        q, k, v = _lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v)
        o, lse = FORWARDS[fwd](q, k, v, is_causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.sus = (float(c), bool(is_causal), float(scale), int(seed), int(cap))
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        c, is_causal, scale, seed, cap = ctx.sus
        do = _lastdim_contiguous(do)
        idx, cnt = sample_kept_pairs(q, k, lse, c, is_causal, scale, seed, cap)
        dq, dk, dv = sparse_backward(q, k, v, o, do, lse, idx, cnt, c, is_causal, scale, seed)
        return dq, dk, dv, None, None, None, None, None, None


def sus_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c: float = 32.0,
    is_causal: bool = True,
    scale: float | None = None,
    enable_gqa: bool = False,
    seed: int | None = None,
    cap: int | None = None,
    forward: str = "triton",
    kernel: str | None = None,
) -> torch.Tensor:
    """SUS attention, SDPA calling convention: q [B,H,n,D], k/v [B,Hkv,n_k,D] (CUDA, bf16/fp16).

    Forward output equals SDPA; the backward is the SUS estimator with keep rate c per row.
    `seed` (int in [0, 2^31)) fixes the draws; None draws one from torch's default generator.
    `kernel` (None = KERNEL): "v1", which samples in the backward with the 'bernoulli' contract (the only one).
    `cap` overrides the per-row buffer size (tests use tiny ones to exercise the overflow path). `forward`
    ("triton" or "aten") picks the flash forward.
    """
    kernel = kernel or KERNEL
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {sorted(FORWARDS)}, got {forward!r}")
    _check_inputs(q, k, v, is_causal, enable_gqa, c, words=True)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if seed is None:
        seed = draw_seed()
    if not 0 <= int(seed) < 2**31:
        raise ValueError(f"seed must be in [0, 2^31), got {seed}")
    if cap is None:
        cap = row_capacity(c, k.shape[2])
    return SusAttentionTriton.apply(q, k, v, float(c), bool(is_causal), float(scale), int(seed), int(cap), forward)


__all__ = [
    "KERNEL",
    "KERNELS",
    "SusAttentionTriton",
    "flash_forward",
    "row_capacity",
    "sample_kept_pairs",
    "sparse_backward",
    "supports",
    "sus_attention_triton",
]
