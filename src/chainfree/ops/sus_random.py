"""SUS backprop's random source: a counter-based hash, so any kernel can match the reference draw for draw.

Contract (the PyTorch reference `sus_reference.py` and the Triton kernel `sus_triton.py` both implement it):

    M = 0xFFFFFFFF; all integer arithmetic is mod 2^32 (mask after every multiply and add)
    x = (seed*0x27D4EB2F + bh*0x165667B1 + i*0x9E3779B1 + j*0x85EBCA77) mod 2^32
    x ^= x >> 16;  x = x*0x85EBCA6B mod 2^32
    x ^= x >> 13;  x = x*0xC2B2AE35 mod 2^32
    x ^= x >> 16
    u = (float32(x >> 8) + 0.5) * 2^-24          # float32 arithmetic; exactly ((x>>8)+0.5)/2^24 rounded once

    bh   = batch_index * H + query_head_index     (H = number of QUERY heads, also under GQA)
    i    = query row, j = key column              (0-based, unpadded)
    seed = one int in [0, 2^31) per forward call: `draw_seed(generator)` below; saved for the backward.

Keep rule (one draw per (bh, i, j); the SAME kept matrix W~ feeds dV and dS):

    q_ij = min(1, c * W_ij)          (float32; W_ij = exp(s_ij - lse_i), 0 for causally masked entries)
    keep iff u_ij < q_ij  or  q_ij >= 1
    W~_ij = W_ij / q_ij if kept else 0
    D_i = dO_i . O_i (exact, no sampling)

Why the `or q_ij >= 1`: the float32 rounding of `+ 0.5` makes u == 1.0 exactly when x >> 8 == 2^24 - 1
(probability 2^-24); `u < q` alone would then drop an entry that must be kept with certainty (q = 1),
a tiny bias and a break of "c large => exact gradients". `keep_mask` below is the one definition.

Why a hash and not torch.rand: a kernel that samples inside its tiles cannot reproduce torch's Philox
stream order, but any kernel can evaluate a pure function of (seed, bh, i, j). The constants are the
xxHash32 primes and the murmur3 32-bit finaliser, so neighbouring (i, j) give independent-looking draws.

Arithmetic: on CPU numpy uint32 (wraps mod 2^32 by definition, and fast); on other devices int64 torch
tensors with 32x32-bit products split into 16-bit halves so no intermediate overflows int64 (no reliance
on signed-overflow wrapping). Both paths are tested to agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
SEED_MUL = 0x27D4EB2F
BH_MUL = 0x165667B1
ROW_MUL = 0x9E3779B1
COL_MUL = 0x85EBCA77
MIX1 = 0x85EBCA6B
MIX2 = 0xC2B2AE35


def _mulmod32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2^32 for 0 <= x < 2^32 held in int64, without overflowing int64."""
    lo = (x & 0xFFFF) * m  # < 2^48
    hi = (((x >> 16) * m) & 0xFFFF) << 16  # only the low 16 bits of the high product survive mod 2^32
    return (lo + hi) & MASK32


def _check_seed(seed: int) -> int:
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2^32), got {seed}")
    return int(seed)


def _sus_hash_torch(seed: int, bh: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Any-device path: int64 tensors, products split so nothing overflows."""
    base = (_check_seed(seed) * SEED_MUL) & MASK32
    x = (base + _mulmod32(bh.long() & MASK32, BH_MUL)) & MASK32
    x = (x + _mulmod32(i.long() & MASK32, ROW_MUL)) & MASK32
    x = (x + _mulmod32(j.long() & MASK32, COL_MUL)) & MASK32
    x = x ^ (x >> 16)
    x = _mulmod32(x, MIX1)
    x = x ^ (x >> 13)
    x = _mulmod32(x, MIX2)
    return x ^ (x >> 16)


def _term_u32(t: torch.Tensor, mul: int) -> np.ndarray:
    """(t * mul) mod 2^32 as uint32 for a (small, un-broadcast) index tensor."""
    a = (t.long().numpy() & MASK32).astype(np.uint64)
    return ((a * np.uint64(mul)) & np.uint64(MASK32)).astype(np.uint32)


def _sus_hash_numpy(seed: int, bh: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> np.ndarray:
    """CPU path: numpy uint32 wraps mod 2^32 by definition and is ~15x faster than int64 torch on CPU."""
    base = np.uint32((_check_seed(seed) * SEED_MUL) & MASK32)
    with np.errstate(over="ignore"):  # wrapping mod 2^32 is the point (numpy warns on 0-d overflow)
        x = (_term_u32(bh, BH_MUL) + base) + _term_u32(i, ROW_MUL)
        x = np.array(x + _term_u32(j, COL_MUL), dtype=np.uint32, ndmin=0)  # the one full-size allocation
    x ^= x >> np.uint32(16)
    x *= np.uint32(MIX1)
    x ^= x >> np.uint32(13)
    x *= np.uint32(MIX2)
    x ^= x >> np.uint32(16)
    return x


def _on_cpu(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in ts)


def sus_hash(seed: int, bh: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash x of the contract, as int64 in [0, 2^32). bh, i, j broadcast (int64 tensors)."""
    if _on_cpu(bh, i, j):
        return torch.from_numpy(_sus_hash_numpy(seed, bh, i, j).astype(np.int64))
    return _sus_hash_torch(seed, bh, i, j)


def sus_uniform(seed: int, bh: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """float32 uniforms u in (0, 1] (1.0 only with probability 2^-24) for broadcast (bh, i, j)."""
    if _on_cpu(bh, i, j):
        x = _sus_hash_numpy(seed, bh, i, j)
        x >>= np.uint32(8)
        u = x.astype(np.float32)
        u += np.float32(0.5)
        u *= np.float32(2.0**-24)
        return torch.from_numpy(u)
    x = _sus_hash_torch(seed, bh, i, j)
    return ((x >> 8).to(torch.float32) + 0.5) * (2.0**-24)


def keep_mask(u: torch.Tensor, w: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, q) for weights w (float32 or float64): q = min(1, c*w), keep = (u < q) | (q >= 1).

    Entries with w == 0 (masked or underflowed) have q = 0 and are never kept.
    """
    q = torch.clamp(c * w, max=1.0)
    keep = (u.to(q.dtype) < q) | (q >= 1.0)
    return keep, q


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One int in [0, 2^31) from `generator` (any device) or torch's default CPU generator.

    Called once per forward; the backward replays the draws from this seed.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**31, (1,), generator=generator, device=device).item())


__all__ = ["draw_seed", "keep_mask", "sus_hash", "sus_uniform"]
