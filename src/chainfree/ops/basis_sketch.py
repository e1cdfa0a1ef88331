"""The BASIS row sketch S M: a balanced signed hash of B rows into R buckets, drawn once per layer-step.

What the estimator needs from S (R x B, S[h(j), j] = s_j): independent Rademacher signs s (so that
E[S^T S] = I and dY^T S^T S X is unbiased for dY^T X), and balanced buckets (each gets floor(B/R) or
ceil(B/R) rows, so no bucket is empty and none is crowded). The variance of the unscaled estimator
X~^T dY~ is sum over pairs i != j of P(h_i = h_j) * (terms of rows i and j): only the pairwise
collision probabilities of h matter.

The hash used here, the *group-shift* hash: rows are cut into G = ceil(B/R) consecutive groups of R
rows, and row k of group g goes to bucket (k + b_g) mod R with b_g uniform on [0, R), independent per
group. Within a group every row has its own bucket; two rows of different groups collide with
probability exactly 1/R. Its total collision mass sum_{i<j} P(h_i = h_j) = B (B/R - 1) / 2 equals that of
the authors' uniform balanced hash (a random permutation of arange(B) mod R), so for rows with no
structure the variance is the same; rows next to each other (neighbouring tokens, the most correlated
ones) never collide, which can only lower it. What it buys is speed and memory: every bucket reads
contiguous runs of rows (no gather through a permutation, no randperm/sort per layer-step), and the
draw is one randint call of B + G int32 (about 4 bytes per row saved for backward).

The draw is made in forward and saved, so X in forward and dY in backward are sketched with the same
(h, s), as the estimator requires. `sketch` returns the unscaled sketch S M, [||M||_F^2, ||S M||_F^2] and
optionally M's column sums (the exact bias gradient, which comes for free with dY's read). On CUDA it
runs the fused Triton kernel (chainfree.ops.basis_sketch_triton), elsewhere `sketch_ref`, its PyTorch
twin; both are wrapped in a torch.library custom op while torch.compile traces, so BASIS layers compile
and capture into CUDA graphs (no host work, no synchronisation).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

import torch

# Guards the invariant scalar against an all-zero sketch.
GAMMA_EPS = 1e-8


@dataclass(frozen=True)
class SketchPlan:
    """One draw of the group-shift hash, as raw random bits (one int32 per row and one per group).

    Row j has sign +1 if bit 0 of sign_bits[j] is set, else -1; row k of group g (row g*R + k) goes to
    bucket (k + shift_bits[g] % R) % R. Keeping the raw bits makes the draw a single randint call and lets
    the kernel read signs and shifts straight from them.
    """

    sign_bits: torch.Tensor  # (B,) int32
    shift_bits: torch.Tensor  # (G,) int32, G = ceil(B / R)
    rank: int

    @classmethod
    def from_bits(cls, bits: torch.Tensor, rows: int, rank: int) -> SketchPlan:
        """The plan stored as one (B + G,) tensor (what the autograd Functions save)."""
        return cls(sign_bits=bits[:rows], shift_bits=bits[rows:], rank=rank)

    @property
    def rows(self) -> int:
        return self.sign_bits.numel()

    @property
    def signs(self) -> torch.Tensor:
        """(B,) int8 +-1 in row order."""
        return ((self.sign_bits & 1) * 2 - 1).to(torch.int8)

    @property
    def shifts(self) -> torch.Tensor:
        """(G,) int64 in [0, R)."""
        return self.shift_bits.long() % self.rank

    def buckets(self) -> torch.Tensor:
        """h: (B,) int64, the bucket of every row."""
        j = torch.arange(self.rows, device=self.sign_bits.device)
        return (j % self.rank + self.shifts[j // self.rank]) % self.rank

    def sign_matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """S: (R, B) dense, S[h(j), j] = s_j (for tests and small problems)."""
        S = torch.zeros(self.rank, self.rows, dtype=dtype, device=self.sign_bits.device)
        S[self.buckets(), torch.arange(self.rows, device=self.sign_bits.device)] = self.signs.to(dtype)
        return S

    def rows_slice(self, start: int, stop: int) -> SketchPlan:
        """The plan restricted to rows [start, stop); start must be a multiple of R (whole groups)."""
        assert start % self.rank == 0, "a row slice of a plan must start at a group boundary"
        g0, g1 = start // self.rank, -(-stop // self.rank)
        return SketchPlan(sign_bits=self.sign_bits[start:stop], shift_bits=self.shift_bits[g0:g1], rank=self.rank)


def resolve_rank(rows: int, rank: int | None, compression: float | None) -> int:
    """Sketch rows R for a batch of `rows`: the fixed rank, or ceil(rows / compression); within [1, rows]."""
    if compression is not None:
        r = math.ceil(rows / compression)
    else:
        assert rank is not None, "either rank or compression must be set"
        r = rank
    return max(1, min(r, rows))


def _draw_size(rows: int, rank: int) -> int:
    """Int32 values in one draw: a sign per row and a shift per group of `rank` rows."""
    return rows + -(-rows // rank)


def _randint_bits(n: int, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, 2**31 - 1, (n,), device=device, generator=generator, dtype=torch.int32)


# Under torch.compile a draw is an opaque op that calls torch.randint eagerly (same bits as the eager step,
# and the compiler's own RNG lowering never sees it). The compiler treats it as pure: its CSE merges calls
# with equal inputs, and its partitioner may *recompute* it in backward instead of saving its output. So a
# layer's draw and the sketch of its input are one op (`_draw_sketch_op`): recomputed, it yields a new hash
# together with the sketch made under it, and backward always pairs a sketch with its own hash. The bare
# draw (`_draw_op`, used where a draw has no sketch beside it) takes the matrix it will sketch as an input,
# so that draws of different layers never look equal.
@torch.library.custom_op("chainfree::basis_draw", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _draw_op(m: torch.Tensor, n: int) -> torch.Tensor:
    return _randint_bits(n, m.device)


@_draw_op.register_fake
def _(m, n):
    return torch.empty(n, device=m.device, dtype=torch.int32)


def draw_bits(rows: int, rank: int, device: torch.device | str, generator: torch.Generator | None = None,
              like: torch.Tensor | None = None) -> torch.Tensor:
    """The random bits of one draw for R = rank (clamped to [1, rows]): (rows + ceil(rows / R),) int32.

    One randint call, reproducible under torch.manual_seed, and the same call compiled or not. Bits are
    uniform on [0, 2^31 - 1): P(sign = +1) = 1/2 - 2^-32, P(shift = k) = 1/R up to R / 2^31.
    `like`: the matrix the draw will sketch; under torch.compile it ties the draw to its layer (see
    `_draw_op`), so it is required there.
    """
    n = _draw_size(rows, max(1, min(rank, rows)))
    if generator is None and torch.compiler.is_compiling():
        if like is None:
            raise ValueError("draw_bits under torch.compile needs like= (the matrix the draw will sketch)")
        return _draw_op(like, n)
    return _randint_bits(n, device, generator)


def draw_plan(rows: int, rank: int, device: torch.device | str, generator: torch.Generator | None = None,
              like: torch.Tensor | None = None) -> SketchPlan:
    """A fresh draw of the hash for `rows` rows and R = rank (clamped to [1, rows]); `like` as in draw_bits."""
    return SketchPlan.from_bits(draw_bits(rows, rank, device, generator, like), rows, max(1, min(rank, rows)))


def _accum(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sketch_ref(
    m: torch.Tensor, sign_bits: torch.Tensor, shift_bits: torch.Tensor, rank: int, with_colsum: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch twin of the fused kernel: (S m in m's dtype, [||m||^2, ||S m||^2], column sums or an empty tensor).

    Norms and column sums are accumulated in float32 (float64 for float64 m); the sketch is summed in
    that precision and rounded to m's dtype once.
    """
    acc = _accum(m.dtype)
    plan = SketchPlan(sign_bits=sign_bits, shift_bits=shift_bits, rank=rank)
    signed = m.to(acc) * plan.signs.to(acc)[:, None]
    sk = torch.zeros(rank, m.shape[1], dtype=acc, device=m.device).index_add_(0, plan.buckets(), signed)
    stats = torch.stack((torch.linalg.vector_norm(m, dtype=acc).square(), sk.square().sum()))
    colsum = m.sum(0, dtype=acc) if with_colsum else m.new_empty(0, dtype=acc)
    return sk.to(m.dtype), stats, colsum


_KERNEL = None


def _triton_sketch():
    """The fused kernel (chainfree.ops.basis_sketch_triton), or None without Triton or with CHAINFREE_BASIS_TRITON=0."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = False
        if os.environ.get("CHAINFREE_BASIS_TRITON", "1") != "0" and importlib.util.find_spec("triton"):
            try:
                from chainfree.ops.basis_sketch_triton import sketch_triton

                _KERNEL = sketch_triton
            except ImportError:  # a triton without a usable backend
                pass
    return _KERNEL or None


def supports(m: torch.Tensor) -> list[str]:
    """Reasons the fused kernel cannot sketch m (empty list: it can)."""
    reasons = []
    if not m.is_cuda:
        reasons.append("not a CUDA tensor")
    if m.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        reasons.append(f"dtype {m.dtype} (kernel handles float32/bfloat16/float16)")
    if _triton_sketch() is None:
        reasons.append("Triton not available (or CHAINFREE_BASIS_TRITON=0)")
    return reasons


def _sketch_impl(m, sign_bits, shift_bits, rank, with_colsum):
    if not supports(m):
        return _triton_sketch()(m, sign_bits, shift_bits, rank, with_colsum)
    return sketch_ref(m, sign_bits, shift_bits, rank, with_colsum)


@torch.library.custom_op("chainfree::basis_sketch", mutates_args=())
def _sketch_op(
    m: torch.Tensor, sign_bits: torch.Tensor, shift_bits: torch.Tensor, rank: int, with_colsum: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sk, stats, colsum = _sketch_impl(m, sign_bits, shift_bits, rank, with_colsum)
    # one output dtype for the compiler; a custom op's outputs may not alias its inputs or each other, and
    # inductor assumes they are 16-byte aligned (the kernel packs stats, column sums and a split sketch into
    # one buffer): copy whatever shares storage or starts off alignment
    return _unaliased([m], [sk.to(m.dtype), stats, colsum])


def _unaliased(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """`outputs`, each cloned if its storage is also an input's or an earlier output's, or if it does not start
    on a 16-byte boundary (a compiled graph reads custom-op outputs with aligned vector loads)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    fresh = []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or (t.storage_offset() * t.element_size()) % 16:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        fresh.append(t)
    return tuple(fresh)


@_sketch_op.register_fake
def _(m, sign_bits, shift_bits, rank, with_colsum):
    acc = _accum(m.dtype)
    return m.new_empty(rank, m.shape[1]), m.new_empty(2, dtype=acc), m.new_empty(m.shape[1] if with_colsum else 0,
                                                                                 dtype=acc)


def sketch(
    m: torch.Tensor, plan: SketchPlan, with_colsum: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(S m (R x N), stats = [||m||_F^2, ||S m||_F^2], column sums of m or None) for a (B, N) matrix m.

    The sketch is in m's dtype, or float32 where the kernel accumulated it across programs (small R: a
    few KB). Eager: calls the kernel (or the reference) directly, with no custom-op dispatch cost; under
    torch.compile: through the custom op, which the compiler treats as one opaque call.
    """
    if m.dim() != 2 or m.shape[0] != plan.rows:
        raise ValueError(f"sketch plan is for {plan.rows} rows, got a matrix of shape {tuple(m.shape)}")
    if m.stride(1) != 1:
        m = m.contiguous()
    call = _sketch_op if torch.compiler.is_compiling() else _sketch_impl
    sk, stats, colsum = call(m, plan.sign_bits, plan.shift_bits, plan.rank, with_colsum)
    return sk, stats, colsum if with_colsum else None


def _draw_sketch_impl(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bits = _randint_bits(_draw_size(m.shape[0], rank), m.device)
    plan = SketchPlan.from_bits(bits, m.shape[0], rank)
    sk, stats, _ = _sketch_impl(m, plan.sign_bits, plan.shift_bits, rank, False)
    return bits, sk, stats


@torch.library.custom_op("chainfree::basis_draw_sketch", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _draw_sketch_op(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bits, sk, stats = _draw_sketch_impl(m, rank)
    return _unaliased([m], [bits, sk.to(m.dtype), stats])


@_draw_sketch_op.register_fake
def _(m, rank):
    return (torch.empty(_draw_size(m.shape[0], rank), device=m.device, dtype=torch.int32),
            m.new_empty(rank, m.shape[1]), m.new_empty(2, dtype=_accum(m.dtype)))


def draw_and_sketch(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fresh draw for m's rows and R = rank (clamped to [1, rows]) and m's sketch under it: (draw bits,
    S m, [||m||_F^2, ||S m||_F^2]) -- draw_bits then sketch, as one op under torch.compile (see `_draw_op`)."""
    if m.dim() != 2:
        raise ValueError(f"draw_and_sketch needs a (rows, N) matrix, got shape {tuple(m.shape)}")
    rank = max(1, min(rank, m.shape[0]))
    if m.stride(1) != 1:
        m = m.contiguous()
    if torch.compiler.is_compiling():
        return _draw_sketch_op(m, rank)
    return _draw_sketch_impl(m, rank)


def gamma(stats: torch.Tensor) -> torch.Tensor:
    """The invariant scalar ||M||_F / (||S M||_F + eps) from sketch stats [||M||^2, ||S M||^2]."""
    root = stats.sqrt()
    return root[0] / (root[1] + GAMMA_EPS)


def scaled_sketch(m: torch.Tensor, plan: SketchPlan, scalars: bool, shrink: float) -> torch.Tensor:
    """(1 - shrink) * gamma * S m in float32 (float64 for float64 m): the estimator's X_hat, for tests and analysis."""
    sk, stats, _ = sketch(m, plan)
    return sk.to(_accum(m.dtype)) * ((gamma(stats) if scalars else 1.0) * (1.0 - shrink))


def sketch_block_ref(m: torch.Tensor, plan: SketchPlan, start: int) -> torch.Tensor:
    """S[:, start:start+len(m)] m: the contribution of a block of consecutive rows (R x N, m's dtype)."""
    stop = start + m.shape[0]
    j = torch.arange(start, stop, device=m.device)
    buckets = (j % plan.rank + plan.shifts[j // plan.rank]) % plan.rank
    signed = m * plan.signs[start:stop, None].to(m.dtype)
    return m.new_zeros(plan.rank, m.shape[1]).index_add_(0, buckets, signed)
