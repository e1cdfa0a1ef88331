"""BASIS autograd Functions: exact forward and input gradient, weight gradients from rank-R row sketches.

Why: an ordinary linear layer saves its whole input X (B rows x N_in) for the weight gradient
dW = dY^T X. BASIS (arXiv 2604.16324) saves only the sketch X~ = S X of R rows, where S (R x B) is a
balanced signed hash drawn per layer and step (chainfree.ops.basis_sketch). In backward the same S
compresses dY and

    dW = (1 - shrink)^2 * gamma_X * gamma_dY * (S dY)^T (S X),   gamma_M = ||M||_F / (||S M||_F + 1e-8).

E[S^T S] = I over the signs, so without the invariant scalars gamma (scalars=False) and shrink the
estimate is unbiased; with them it is norm-preserving and biased (on weakly correlated rows ||dW||
grows by about sqrt(B / R), like a larger learning rate). With R = B every bucket holds one row, S is a
signed permutation, gamma = 1, and shrink = 0 gives exact dW. dX = dY W and db = sum of dY rows are
always exact.

R is either a fixed `rank` or `ceil(B / compression)`, resolved from the rows of the batch at the call
(B = batch x sequence): compression B/R is what the quality depends on, so it is the knob that carries
over between batch sizes and context lengths.

Saved per sketched projection: the weight (a parameter), the unscaled sketch S X (R x N_in, compute
dtype; float32 for small R), gamma_X (a 0-d tensor), the draw (B + ceil(B/R) random int32): about 4 bytes
per row instead of 2 N_in bytes for a bf16 X. The scalar factor multiplies the small (N_out x N_in) product, so
the dW GEMM runs over R rows in the compute dtype (bf16 tensor cores under autocast).

Fused MLPs: composed of separate BASIS linears an MLP still saves its hidden activations for the
nonlinearity's backward (GELU keeps h, B x 4d; SwiGLU keeps gate, up and silu(gate)). The fused
Functions keep only the MLP input u (B x d, compute dtype) plus the sketches, and recompute the
hidden pre-activations in backward: one GEMM for GELU (5 full-size GEMMs per step instead of exact's
6), two for SwiGLU (8 instead of 9).

Mixed precision: the Functions read the autocast state of the input's device and cast explicitly
(inputs and weights to the autocast dtype, float64 never cast), so autocast, still on around them, has
nothing left to decide; backward reuses the recorded dtype. torch.amp.custom_fwd/custom_bwd bind one device
type at decoration time, and these must behave the same under CPU and CUDA autocast. The bodies do not
switch autocast off themselves: inside torch.compile's trace such a switch leaks past the Function, and
every later layer would read "autocast off" and compile float32 GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chainfree.errors import ConfigError
from chainfree.ops.basis_sketch import SketchPlan, draw_and_sketch, gamma, resolve_rank, sketch

# Sketch rows when neither a rank nor a compression is given (the paper's main setting).
DEFAULT_RANK = 32


def check_params(rank: int | None, shrink: float, compression: float | None = None) -> None:
    """Raise ConfigError unless exactly a valid rank or compression and a valid shrink are given."""
    if (rank is None) == (compression is None):
        raise ConfigError("BASIS needs exactly one of rank (sketch rows R, e.g. 32) or compression (B*T/R, e.g. 8)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"BASIS rank must be an integer >= 1 (rows kept per sketch), got {rank!r}")
    if compression is not None and (isinstance(compression, bool) or not compression >= 1):
        raise ConfigError(f"BASIS compression must be a number >= 1 (batch rows per sketch row), got {compression!r}")
    if not 0.0 <= shrink < 1.0:
        raise ConfigError(f"BASIS shrink must be in [0, 1) (0.01 in the paper's code), got {shrink!r}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would run in: the autocast dtype when autocast is on (float64 excepted)."""
    device_type = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Draw:
    """A layer-step's sketch of its input: the draw (as its raw bits), unscaled sketch S X and gamma_X."""

    def __init__(self, m: torch.Tensor, rank: int, scalars: bool) -> None:
        self.bits, self.sketch, stats = draw_and_sketch(m, rank)
        self.gamma = gamma(stats) if scalars else None

    def saved(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        return self.sketch, self.gamma, self.bits


def _weight_grad(
    dy: torch.Tensor, saved: tuple, rank: int, shrink: float, weight: torch.Tensor, want_db: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dW, db or None) from dY and one layer's saved (S X, gamma_X, draw bits)."""
    x_sk, gamma_x, bits = saved
    plan = SketchPlan.from_bits(bits, dy.shape[0], rank)
    dy_sk, stats, colsum = sketch(dy, plan, with_colsum=want_db)
    factor = (1.0 - shrink) ** 2
    if gamma_x is not None:
        factor = gamma_x * gamma(stats) * factor
    dw = torch.mm(dy_sk.t().to(dy.dtype), x_sk.to(dy.dtype)).to(_acc(dy.dtype)).mul_(factor).to(weight.dtype)
    return dw, colsum


class BasisLinearFunction(torch.autograd.Function):
    """y = x W^T + b; backward: exact dx and db, dW from the sketches of x and dy (one draw per call)."""

    @staticmethod
    def forward(ctx, x, weight, bias, rank, compression, shrink: float, scalars: bool):
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y = F.linear(x2, weight.to(dtype), None if bias is None else bias.to(dtype))
        r = resolve_rank(x2.shape[0], rank, compression)
        draw = _Draw(x2, r, scalars) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(weight, *(draw.saved() if draw else (None,) * 3))
        ctx.meta = (dtype, x.dtype, x.shape, r, shrink, bias is not None)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        weight, *saved = ctx.saved_tensors
        dtype, x_dtype, x_shape, rank, shrink, has_bias = ctx.meta
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = db = None
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        if need_dx:
            dx = (dy2 @ weight.to(dtype)).view(x_shape).to(x_dtype)
        want_db = has_bias and need_db
        if need_dw:
            dw, db = _weight_grad(dy2, tuple(saved), rank, shrink, weight, want_db)
        elif want_db:
            db = dy2.sum(0, dtype=_acc(dtype))
        return dx, dw, None if db is None else db.to(weight.dtype), None, None, None, None


def basis_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    rank: int | None = None,
    shrink: float = 0.01,
    scalars: bool = True,
    compression: float | None = None,
) -> torch.Tensor:
    """Functional BASIS linear (F.linear plus the sketch parameters; rank or compression, default rank 32)."""
    if rank is None and compression is None:
        rank = DEFAULT_RANK
    check_params(rank, shrink, compression)
    return BasisLinearFunction.apply(x, weight, bias, rank, compression, shrink, scalars)


def _bias(b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if b is None else b.to(dtype)


class BasisMLPFunction(torch.autograd.Function):
    """y = down(gelu(up(u))) with both weight gradients sketched; saves u, recomputes h = up(u) in backward.

    Each projection draws its own hash: the up projection's serves u and dh, the down projection's
    serves gelu(h) and dy.
    """

    @staticmethod
    def forward(ctx, u, w1, b1, w2, b2, rank, compression, shrink: float, scalars: bool, approximate: str):
        dtype = compute_dtype(u)
        u2 = u.reshape(-1, u.shape[-1]).to(dtype)
        act = F.gelu(F.linear(u2, w1.to(dtype), _bias(b1, dtype)), approximate=approximate)
        y = F.linear(act, w2.to(dtype), _bias(b2, dtype))
        r = resolve_rank(u2.shape[0], rank, compression)
        up, down = _Draw(u2, r, scalars), _Draw(act, r, scalars)
        ctx.save_for_backward(u2, w1, b1, w2, *up.saved(), *down.saved())
        ctx.meta = (dtype, u.dtype, u.shape, r, shrink, approximate, b2 is not None)
        return y.view(*u.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        u2, w1, b1, w2, *saved = ctx.saved_tensors
        dtype, u_dtype, u_shape, rank, shrink, approximate, has_b2 = ctx.meta
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        w1c = w1.to(dtype)
        hidden = F.linear(u2, w1c, _bias(b1, dtype))
        d_hidden = torch.ops.aten.gelu_backward(dy2 @ w2.to(dtype), hidden, approximate=approximate)
        del hidden
        du = (d_hidden @ w1c).view(u_shape).to(u_dtype) if need[0] else None
        want_db1, want_db2 = b1 is not None and need[2], has_b2 and need[4]
        dw1, db1 = _weight_grad(d_hidden, tuple(saved[:3]), rank, shrink, w1, want_db1) if need[1] else (None, None)
        dw2, db2 = _weight_grad(dy2, tuple(saved[3:]), rank, shrink, w2, want_db2) if need[3] else (None, None)
        if db1 is None and want_db1:
            db1 = d_hidden.sum(0, dtype=_acc(dtype))
        if db2 is None and want_db2:
            db2 = dy2.sum(0, dtype=_acc(dtype))
        return (du, dw1, None if db1 is None else db1.to(w1.dtype), dw2, None if db2 is None else db2.to(w2.dtype),
                None, None, None, None, None)


class BasisSwiGLUFunction(torch.autograd.Function):
    """y = down(silu(gate(u)) * up(u)) (LLaMA's MLP) with all three weight gradients sketched.

    Saves u (compute dtype) and the sketches of u and of h = silu(g) * a; backward recomputes
    g = gate(u) and a = up(u). gate and up read the same input, so they share one draw (like one
    projection onto [gate; up]); down draws its own. Exact autograd would save u (twice under autocast:
    each projection casts its own copy), g, silu(g), a and h: about 2 d + 4 hidden values per row.
    """

    @staticmethod
    def forward(ctx, u, wg, bg, wu, bu, wd, bd, rank, compression, shrink: float, scalars: bool):
        dtype = compute_dtype(u)
        u2 = u.reshape(-1, u.shape[-1]).to(dtype)
        h = F.silu(F.linear(u2, wg.to(dtype), _bias(bg, dtype)))
        h = h.mul_(F.linear(u2, wu.to(dtype), _bias(bu, dtype)))
        y = F.linear(h, wd.to(dtype), _bias(bd, dtype))
        r = resolve_rank(u2.shape[0], rank, compression)
        inp, down = _Draw(u2, r, scalars), _Draw(h, r, scalars)
        ctx.save_for_backward(u2, wg, bg, wu, bu, wd, *inp.saved(), *down.saved())
        ctx.meta = (dtype, u.dtype, u.shape, r, shrink, bd is not None)
        return y.view(*u.shape[:-1], wd.shape[0])

    @staticmethod
    def backward(ctx, dy):
        u2, wg, bg, wu, bu, wd, *saved = ctx.saved_tensors
        dtype, u_dtype, u_shape, rank, shrink, has_bd = ctx.meta
        need = ctx.needs_input_grad
        acc = _acc(dtype)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        wgc, wuc = wg.to(dtype), wu.to(dtype)
        g = F.linear(u2, wgc, _bias(bg, dtype))
        a = F.linear(u2, wuc, _bias(bu, dtype))
        dh = dy2 @ wd.to(dtype)
        da = dh * F.silu(g)
        dg = torch.ops.aten.silu_backward(dh.mul_(a), g)
        del g, a, dh
        du = (dg @ wgc).addmm_(da, wuc).view(u_shape).to(u_dtype) if need[0] else None
        inp = tuple(saved[:3])
        want = (bg is not None and need[2], bu is not None and need[4], has_bd and need[6])
        dwg, dbg = _weight_grad(dg, inp, rank, shrink, wg, want[0]) if need[1] else (None, None)
        dwu, dbu = _weight_grad(da, inp, rank, shrink, wu, want[1]) if need[3] else (None, None)
        dwd, dbd = _weight_grad(dy2, tuple(saved[3:]), rank, shrink, wd, want[2]) if need[5] else (None, None)
        if dbg is None and want[0]:
            dbg = dg.sum(0, dtype=acc)
        if dbu is None and want[1]:
            dbu = da.sum(0, dtype=acc)
        if dbd is None and want[2]:
            dbd = dy2.sum(0, dtype=acc)

        def cast(db, w):
            return None if db is None else db.to(w.dtype)

        return (du, dwg, cast(dbg, wg), dwu, cast(dbu, wu), dwd, cast(dbd, wd), None, None, None, None)
