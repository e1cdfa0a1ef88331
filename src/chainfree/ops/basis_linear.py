"""BASIS linear layer: exact forward and input gradient, weight gradient from rank-R row sketches.

Why: an ordinary nn.Linear saves its whole input X (B rows x N_in) for the weight gradient
dW = dY^T X. BASIS (arXiv 2604.16324, reference-code variant, see SPEC §1) saves only a sketch
X_hat = gamma_X * (1 - shrink) * S X of R rows, where S (R x B) is a *balanced* signed hash:

* h = random permutation of arange(B) mod R: bucket r receives floor(B/R) or ceil(B/R) rows;
* s in {+1, -1}^B Rademacher signs; S[h(j), j] = s_j, zero elsewhere.

In backward the same S (same h and s: it is saved with the sketch) compresses dY, and
dW = dY_hat^T X_hat with dY_hat = gamma_dY * (1 - shrink) * S dY. Since E[S^T S] = I over the
signs, dY^T S^T S X is an unbiased estimate of dY^T X; the invariant scalars
gamma = ||M||_F / (||S M||_F + 1e-8) restore the Frobenius norm of each factor (biased, but
norm-preserving: on rows with little correlation ||dW|| grows by about sqrt(B / R)). With R = B,
S is a signed permutation, S^T S = I exactly and gamma = 1, so shrink = 0 recovers exact dW.
dX = dY W and db = sum of dY rows are always exact.

Saved tensors per call (the point of the exercise): the weight (a parameter, already alive),
X_hat (R x N_in, float32), the permutation (B int64) and the signs (B, compute dtype).
With bf16 inputs that is 10 bytes per row instead of 2 * N_in bytes for X (0.16% of X for
N_in = 3072, 0.65% for 768). We keep h and s instead of re-drawing them from a saved seed:
regenerating a permutation in every backward costs a randperm per layer (0.09-0.10 ms for
B = 16384 on an H100) to save those few bytes.

Compute: the sketch S M is one GEMM with a dense (R x B) sign matrix in the compute dtype
(fp32 accumulation inside the GEMM, one read of M, no (B x N) temporary). For large R the
dense S would itself be large, so above SIGN_MATRIX_MAX_RANK the sketch is taken by the
permuted gather + fixed-size group sums of the reference (`sketch_rows_reference`), whose
(B x N) gathered copy is freed before the function returns. Both produce identical buckets.
Measured on an H100 for a 16384 x 3072 bf16 M (benchmarks/results/basis_bench*.md): GEMM sketch +
norm 0.14-0.20 ms (R = 1..128), gather sketch 0.27 ms, the dW GEMM that BASIS removes 0.108 ms --
so BASIS trades memory for time here; see docs/basis.md.

Mixed precision: under torch.autocast the function reads the autocast state of the input's
device and casts explicitly (inputs and weight to the autocast dtype, float64 never cast, like
autocast itself), then runs with autocast disabled; backward reuses the dtype recorded in
forward. We do not use torch.amp.custom_fwd/custom_bwd because they are bound to one device
type chosen at decoration time, and this layer must behave the same on CPU and CUDA autocast.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chainfree.errors import ConfigError

# Above this rank the dense (R x B) sign matrix costs more memory traffic than a gather of X.
SIGN_MATRIX_MAX_RANK = 256
# Guards the invariant scalar against an all-zero sketch (SPEC §1 step 3).
GAMMA_EPS = 1e-8


@dataclass(frozen=True)
class SketchPlan:
    """One draw of the balanced signed hash for a layer-step.

    Row `perm[i]` of the input goes to bucket `i % rank` with sign `signs[i]`; hence bucket sizes
    are ceil(B/rank) for the first B % rank buckets and floor(B/rank) for the rest.
    """

    perm: torch.Tensor  # (B,) int64
    signs: torch.Tensor  # (B,) +-1 in the compute dtype, indexed like perm
    rank: int

    @property
    def rows(self) -> int:
        return self.perm.numel()

    def buckets(self) -> torch.Tensor:
        """h: (B,) int64, the bucket of every input row."""
        h = torch.empty_like(self.perm)
        h[self.perm] = torch.arange(self.rows, device=self.perm.device) % self.rank
        return h

    def row_signs(self) -> torch.Tensor:
        """s: (B,) the sign of every input row (in input-row order)."""
        s = torch.empty_like(self.signs)
        s[self.perm] = self.signs
        return s

    def sign_matrix(self) -> torch.Tensor:
        """S: (rank, B) dense, S[h(j), j] = s_j."""
        S = self.signs.new_zeros(self.rank, self.rows)
        slots = torch.arange(self.rows, device=self.perm.device) % self.rank
        S[slots, self.perm] = self.signs
        return S


def effective_rank(rank: int, rows: int) -> int:
    """R = min(rank, B) (a sketch wider than the batch is pointless), and at least 1."""
    return max(1, min(rank, rows))


def draw_plan(
    rows: int, rank: int, device: torch.device | str, dtype: torch.dtype, generator: torch.Generator | None = None
) -> SketchPlan:
    """Draw h (balanced) and s (Rademacher) from torch's RNG (reproducible under torch.manual_seed)."""
    perm = torch.randperm(rows, device=device, generator=generator)
    bits = torch.randint(0, 2, (rows,), device=device, generator=generator, dtype=torch.int8)
    signs = bits.to(dtype).mul_(2).sub_(1)
    return SketchPlan(perm=perm, signs=signs, rank=effective_rank(rank, rows))


def sketch_rows_reference(m: torch.Tensor, plan: SketchPlan) -> torch.Tensor:
    """S m by permuted gather + fixed-size group sums: (B, N) -> (R, N), in m's dtype.

    Gathered row i sits at position (i // R, i % R) of a (ceil(B/R), R, N) view (zero-padded),
    so summing over the first axis adds exactly the rows of each bucket.
    """
    rows, width = m.shape
    groups = math.ceil(rows / plan.rank)
    gathered = m.index_select(0, plan.perm).mul_(plan.signs.to(m.dtype)[:, None])
    pad = groups * plan.rank - rows
    if pad:
        gathered = torch.cat((gathered, gathered.new_zeros(pad, width)))
    return gathered.view(groups, plan.rank, width).sum(0)


def sketch_rows(m: torch.Tensor, plan: SketchPlan) -> torch.Tensor:
    """S m for a (B, N) matrix: a GEMM with the dense sign matrix, or the gather path for large R."""
    if m.shape[0] != plan.rows:
        raise ValueError(f"sketch plan is for {plan.rows} rows, got a matrix with {m.shape[0]}")
    if plan.rank > SIGN_MATRIX_MAX_RANK:
        return sketch_rows_reference(m, plan)
    return plan.sign_matrix().to(m.dtype) @ m


def _triton_kernel():
    """chainfree.ops.basis_sketch_triton.signed_segment_sum if opted in (CHAINFREE_BASIS_TRITON=1), else None.

    Opt-in because, as written, the kernel measured slower than the GEMM sketch on an H100 for a
    16384 x 3072 bf16 matrix at R = 32: 0.167 ms (0.20 ms with column sums) vs 0.148 ms for GEMM + norm
    (benchmarks/results/basis_bench*.md).
    """
    global _TRITON
    if _TRITON is None:
        _TRITON = False
        if os.environ.get("CHAINFREE_BASIS_TRITON") == "1" and importlib.util.find_spec("triton"):
            try:
                from chainfree.ops.basis_sketch_triton import signed_segment_sum

                _TRITON = signed_segment_sum
            except ImportError:  # a triton without a usable backend
                pass
    return _TRITON or None


_TRITON = None


def scaled_sketch_and_colsum(
    m: torch.Tensor, plan: SketchPlan, scalars: bool, shrink: float, with_colsum: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((1 - shrink) * gamma * S m, column sums of m or None), float32 (float64 for float64 input).

    gamma = ||m||_F / (||S m||_F + 1e-8), or 1 without scalars. By default the sketch is `sketch_rows`
    and the norm and column sums are separate reductions; with the opt-in Triton kernel one pass over
    m produces all three.
    """
    acc = torch.float64 if m.dtype == torch.float64 else torch.float32
    on_triton_device = m.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"  # interpreter: CPU tensors
    kernel = _triton_kernel() if on_triton_device and acc == torch.float32 else None
    if kernel is not None:
        sketch, sumsq, colsum = kernel(m, plan.perm, plan.signs, plan.rank, with_colsum)
        norm = sumsq.sqrt() if scalars else None
    else:
        sketch = sketch_rows(m, plan).to(acc)
        norm = torch.linalg.vector_norm(m, dtype=acc) if scalars else None
        colsum = m.sum(0, dtype=acc) if with_colsum else None
    factor = 1.0 - shrink
    if norm is not None:
        sketch = sketch * (norm / (torch.linalg.vector_norm(sketch) + GAMMA_EPS) * factor)
    elif factor != 1.0:
        sketch = sketch * factor
    return sketch, colsum


def scaled_sketch(m: torch.Tensor, plan: SketchPlan, scalars: bool, shrink: float) -> torch.Tensor:
    """(1 - shrink) * gamma * S m in float32 (float64 for float64 input); gamma = 1 without scalars."""
    return scaled_sketch_and_colsum(m, plan, scalars, shrink)[0]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would run in: the autocast dtype when autocast is on (float64 excepted)."""
    device_type = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class BasisLinearFunction(torch.autograd.Function):
    """y = x W^T + b; backward: exact dx and db, dW from the saved (R x N_in) sketch of x."""

    @staticmethod
    def forward(ctx, x, weight, bias, rank: int, shrink: float, scalars: bool):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            y = F.linear(x2, weight.to(dtype), None if bias is None else bias.to(dtype))
            plan = draw_plan(x2.shape[0], rank, x.device, dtype)
            x_hat = scaled_sketch(x2, plan, scalars, shrink)
        ctx.save_for_backward(weight, x_hat, plan.perm, plan.signs)
        ctx.meta = (dtype, x.dtype, x.shape, plan.rank, shrink, scalars, bias is not None)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        weight, x_hat, perm, signs = ctx.saved_tensors
        dtype, x_dtype, x_shape, rank, shrink, scalars, has_bias = ctx.meta
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
            if need_dx:
                dx = (dy2 @ weight.to(dtype)).view(x_shape).to(x_dtype)
            want_db = has_bias and need_db
            if need_dw:
                plan = SketchPlan(perm=perm, signs=signs, rank=rank)
                dy_hat, colsum = scaled_sketch_and_colsum(dy2, plan, scalars, shrink, with_colsum=want_db)
                dw = (dy_hat.t() @ x_hat).to(weight.dtype)
                if want_db:
                    db = colsum.to(weight.dtype)
            elif want_db:
                db = dy2.sum(0, dtype=torch.float64 if dtype == torch.float64 else torch.float32).to(weight.dtype)
        return dx, dw, db, None, None, None


class BasisMLPFunction(torch.autograd.Function):
    """y = down(gelu(up(u))) with both weight gradients sketched; saves u, recomputes h in backward.

    Why fused: composed of two BasisLinear layers, the MLP still saves h = up(u) (B x 4d) for GELU's
    backward. Here the only row-sized tensor kept is u in the compute dtype (B x d: 4x smaller than h;
    under bf16 autocast a bf16 copy, so the fp32 LayerNorm output itself is freed). Backward recomputes
    h = u W1^T + b1 (one GEMM), which the two dW GEMMs that BASIS removes pay for: 5 GEMMs per MLP
    step instead of exact backprop's 6. Each projection draws its own (h, s); the draw of the up
    projection serves u and dh, the draw of the down projection serves gelu(h) and dy.
    Saved: u (B x d_in, compute dtype), W1, b1, W2 (parameters), sketches of u and gelu(h) (R x d_in,
    R x d_hidden, float32), two permutations and sign vectors (B each).
    """

    @staticmethod
    def forward(ctx, u, w1, b1, w2, b2, rank: int, shrink: float, scalars: bool, approximate: str):
        dtype = _compute_dtype(u)
        with torch.autocast(u.device.type, enabled=False):
            u2 = u.reshape(-1, u.shape[-1]).to(dtype)
            hidden = F.linear(u2, w1.to(dtype), None if b1 is None else b1.to(dtype))
            act = F.gelu(hidden, approximate=approximate)
            del hidden
            y = F.linear(act, w2.to(dtype), None if b2 is None else b2.to(dtype))
            rows = u2.shape[0]
            plan_up = draw_plan(rows, rank, u.device, dtype)
            plan_down = draw_plan(rows, rank, u.device, dtype)
            u_hat = scaled_sketch(u2, plan_up, scalars, shrink)
            act_hat = scaled_sketch(act, plan_down, scalars, shrink)
        ctx.save_for_backward(u2, w1, b1, w2, u_hat, act_hat, plan_up.perm, plan_up.signs, plan_down.perm,
                              plan_down.signs)
        ctx.meta = (dtype, u.dtype, u.shape, plan_up.rank, shrink, scalars, approximate, b2 is not None)
        return y.view(*u.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        u2, w1, b1, w2, u_hat, act_hat, perm_up, signs_up, perm_down, signs_down = ctx.saved_tensors
        dtype, u_dtype, u_shape, rank, shrink, scalars, approximate, has_b2 = ctx.meta
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        need = ctx.needs_input_grad
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
            w1c = w1.to(dtype)
            hidden = F.linear(u2, w1c, None if b1 is None else b1.to(dtype))
            d_hidden = torch.ops.aten.gelu_backward(dy2 @ w2.to(dtype), hidden, approximate=approximate)
            del hidden
            du = (d_hidden @ w1c).view(u_shape).to(u_dtype) if need[0] else None
            dw1 = dw2 = db1 = db2 = None
            want_db1, want_db2 = b1 is not None and need[2], has_b2 and need[4]
            if need[1]:
                plan_up = SketchPlan(perm=perm_up, signs=signs_up, rank=rank)
                dh_hat, colsum = scaled_sketch_and_colsum(d_hidden, plan_up, scalars, shrink, want_db1)
                dw1 = (dh_hat.t() @ u_hat).to(w1.dtype)
                db1 = colsum.to(b1.dtype) if want_db1 else None
            elif want_db1:
                db1 = d_hidden.sum(0, dtype=acc).to(b1.dtype)
            if need[3]:
                plan_down = SketchPlan(perm=perm_down, signs=signs_down, rank=rank)
                dy_hat, colsum = scaled_sketch_and_colsum(dy2, plan_down, scalars, shrink, want_db2)
                dw2 = (dy_hat.t() @ act_hat).to(w2.dtype)
                db2 = colsum.to(w2.dtype) if want_db2 else None
            elif want_db2:
                db2 = dy2.sum(0, dtype=acc).to(w2.dtype)
        return du, dw1, db1, dw2, db2, None, None, None, None


def basis_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    rank: int = 32,
    shrink: float = 0.01,
    scalars: bool = True,
) -> torch.Tensor:
    """Functional BASIS linear (same signature as F.linear plus the sketch parameters)."""
    check_params(rank, shrink)
    return BasisLinearFunction.apply(x, weight, bias, rank, shrink, scalars)


def check_params(rank: int, shrink: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"BASIS rank must be an integer >= 1 (rows kept per sketch), got {rank!r}")
    if not 0.0 <= shrink < 1.0:
        raise ConfigError(f"BASIS shrink must be in [0, 1) (0.01 in the paper's code), got {shrink!r}")


class BasisLinear(nn.Linear):
    """nn.Linear whose weight gradient comes from a rank-R sketch of its input (BASIS).

    Same parameters and state_dict keys as nn.Linear, so checkpoints load either way. The sketch
    path is taken whenever a weight gradient will be needed (grad mode on and weight trainable);
    otherwise (eval, no_grad, frozen) this is plain F.linear and saves nothing extra.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        rank: int = 32,
        shrink: float = 0.01,
        scalars: bool = True,
    ) -> None:
        check_params(rank, shrink)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.shrink, self.scalars = rank, shrink, scalars

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, rank: int = 32, shrink: float = 0.01, scalars: bool = True
    ) -> BasisLinear:
        """Wrap an existing Linear, sharing its Parameter objects (keeps weight tying intact)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            rank=rank,
            shrink=shrink,
            scalars=scalars,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return BasisLinearFunction.apply(x, self.weight, self.bias, self.rank, self.shrink, self.scalars)
        return F.linear(x, self.weight, self.bias)

    def linear_cross_entropy(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean CE with this layer as an LM head, chunked (no full logits); LanguageModel.loss calls it.

        The CE backward needs h itself, so as a head BASIS saves compute (the N x V x d dW GEMM),
        not memory; see chainfree.ops.basis_cross_entropy.
        """
        from chainfree.ops.basis_cross_entropy import basis_linear_cross_entropy  # imports this module
        from chainfree.ops.cross_entropy import linear_cross_entropy

        if torch.is_grad_enabled() and self.weight.requires_grad:
            return basis_linear_cross_entropy(
                h, self.weight, self.bias, targets, self.rank, self.shrink, self.scalars
            )
        return linear_cross_entropy(h, self.weight, self.bias, targets)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, shrink={self.shrink}, scalars={self.scalars}"


class BasisMLP(nn.Module):
    """Fused BASIS version of chainfree.models.mlp.MLP (up -> GELU -> down); see BasisMLPFunction.

    Holds the original `up`, `act` and `down` submodules under the same names, so parameters and
    state_dict keys are unchanged. Without a weight gradient to compute (eval, no_grad) it runs the
    plain MLP.
    """

    def __init__(self, mlp: nn.Module, *, rank: int = 32, shrink: float = 0.01, scalars: bool = True) -> None:
        super().__init__()
        check_params(rank, shrink)
        if not (isinstance(mlp.up, nn.Linear) and isinstance(mlp.down, nn.Linear) and isinstance(mlp.act, nn.GELU)):
            raise TypeError("BasisMLP needs an MLP with nn.Linear `up`/`down` and an nn.GELU `act`")
        self.up, self.act, self.down = mlp.up, mlp.act, mlp.down
        self.rank, self.shrink, self.scalars = rank, shrink, scalars
        self.train(mlp.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (self.up.weight.requires_grad or self.down.weight.requires_grad):
            return BasisMLPFunction.apply(x, self.up.weight, self.up.bias, self.down.weight, self.down.bias,
                                          self.rank, self.shrink, self.scalars, self.act.approximate)
        return self.down(self.act(self.up(x)))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, shrink={self.shrink}, scalars={self.scalars}, fused=True"
