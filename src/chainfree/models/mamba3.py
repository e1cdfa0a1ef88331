"""Mamba-3 residual block (Lahoti et al., arXiv 2603.15569), written from the paper and the structure of
state-spaces/mamba `modules/mamba3.py` and the step references in its tests (Apache-2.0; no code copied).

Mamba-3 keeps Mamba-2's SSD backbone (scalar decay per head, outer-product state [headdim, d_state]) and
changes three things, all implemented here:

1. Exponential-trapezoidal discretisation. Mamba-2's update is exponential-Euler,
   H_t = alpha_t H_{t-1} + dt_t B_t x_t^T. Mamba-3 integrates the input with a data-dependent trapezoid:
       H_t = alpha_t H_{t-1} + (1 - lam_t) dt_t alpha_t B_{t-1} x_{t-1}^T + lam_t dt_t B_t x_t^T,
   alpha_t = exp(A_t dt_t), lam_t = sigmoid(trap_t) per head and token. (lam = 1 gives back Euler.)
   Parallel form: an SSD scan whose input at s is scaled by  lam_s dt_s + (1 - lam_{s+1}) dt_{s+1}
   -- the second term is the weight with which x_s re-enters one step later, and its extra alpha_{s+1}
   is exactly the decay from s to s+1 -- minus a diagonal correction, because at t = s that delayed
   term has not arrived yet: y_t -= (1 - lam_{t+1}) dt_{t+1} (C_t . B_t) x_t. This is the "implicit
   width-2 convolution", which is why Mamba-3 drops Mamba-2's short conv.
2. Complex-valued (rotational) state update. The state transition is a per-head decay times a rotation
   by data-dependent angles: with theta_t = sum_{s<=t} dt_s * pi * tanh(w_s) (w from in_proj, shared by
   heads, one angle per pair of state dimensions), B and C are rotated by R(theta_t). Then
   C_t^T R(theta_t)^T R(theta_s) B_s = C_t^T R(theta_s - theta_t) B_s: exactly a diagonal *complex* A
   with phase -(theta_t - theta_s) on each pair -- the "RoPE trick", so the real SSD scan is reused.
   Pairs are adjacent dimensions (2i, 2i+1); `rope_fraction` = 1/2 of the state is rotated (the
   reference default), the rest is real.
3. MIMO (model.mimo_rank = R > 1): each step writes R rank-1 updates and reads R outputs,
       H_t = ... + sum_r B_{t,r} (x_t * W_x[r])^T,  y_{t,r} = H_t C_{t,r},
       y_t = sum_r W_o[r] * (y_{t,r} + D x_{t,r}) * silu(z_t * W_z[r])
   raising arithmetic intensity of decoding at fixed state size. R = 1 is SISO (no W_x, W_z, W_o).
Also from the reference: data-dependent A = -heavy_tail(w) clamped to <= -A_floor; RMSNorm on B and C
followed by learned per-head biases (init 1); D skip; output gated by silu(z) without an extra norm;
no short convolution.

Not included: the reference's fused Triton/TileLang/CuTe kernels (we run the pure-PyTorch chunked scan
of chainfree.ops.ssd, optionally torch.compiled), variable-length packing (cu_seqlens), the optional
output norm (is_outproj_norm), rope_fraction = 1, and angle wrapping mod 2 pi (only matters for very
long fp32 sequences).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from chainfree.config import ModelConfig
from chainfree.models.mamba2 import SSDBlock, init_dt_bias
from chainfree.ops.ssd import ssd_scan

State = dict[str, torch.Tensor]
A_FLOOR = 1e-4
ROPE_FRACTION = 0.5


def heavy_tail(x: torch.Tensor) -> torch.Tensor:
    """1 + x for x >= 0, 1 / (1 - x) for x < 0: positive, C^1, and only linearly growing (stabler than
    exp at high learning rates) -- the reference's activation for the data-dependent decay rate."""
    return torch.where(x >= 0, 1 + x, torch.reciprocal(1 - x.clamp_max(0)))  # where: derivative 1 at 0


def rotate_pairs(v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (v[2i], v[2i+1]) by theta[i] for i < theta.shape[-1]; the other dims pass through.
    v: [..., n]; theta broadcastable to [..., S] with 2 S <= n."""
    S = theta.shape[-1]
    rot, rest = v[..., : 2 * S], v[..., 2 * S :]
    v0, v1 = rot[..., 0::2], rot[..., 1::2]
    cos, sin = torch.cos(theta).to(v.dtype), torch.sin(theta).to(v.dtype)
    rotated = torch.stack([v0 * cos - v1 * sin, v0 * sin + v1 * cos], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)


def mamba3_recurrence(
    x: torch.Tensor,
    adt: torch.Tensor,
    dt: torch.Tensor,
    lam: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """Sequential reference of the Mamba-3 SSM core (trapezoid, already-rotated k/q, MIMO), for tests.
    x: [b, l, R, h, p]; adt, dt, lam: [b, l, h]; k, q: [b, l, R, h, n]. Returns y [b, l, R, h, p] before
    gating: H_t = a_t H_{t-1} + (1-lam_t) dt_t a_t sum_r x_{t-1,r} k_{t-1,r}^T + lam_t dt_t sum_r x_{t,r} k_{t,r}^T,
    y_{t,r} = H_t q_{t,r} + D x_{t,r}."""
    b, l, R, h, p = x.shape
    H = x.new_zeros(b, h, p, k.shape[-1])
    prev = x.new_zeros(b, h, p, k.shape[-1])
    ys = []
    for t in range(l):
        alpha = torch.exp(adt[:, t])[:, :, None, None]
        cur = torch.einsum("brhp,brhn->bhpn", x[:, t], k[:, t])
        beta = ((1 - lam[:, t]) * dt[:, t])[:, :, None, None] * alpha
        gamma = (lam[:, t] * dt[:, t])[:, :, None, None]
        H = alpha * H + beta * prev + gamma * cur
        ys.append(torch.einsum("bhpn,brhn->brhp", H, q[:, t]) + D[:, None] * x[:, t])
        prev = cur
    return torch.stack(ys, dim=1)


def mamba3_chunked(
    x: torch.Tensor,
    adt: torch.Tensor,
    dt: torch.Tensor,
    lam: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel form of `mamba3_recurrence` through the SSD scan (see the module docstring, point 1).
    Returns (y, final SSM state [b, h, p, n]); the final state equals the recurrence's H_T (the delayed
    term of the last token is not in it yet -- the step function adds it from the carried k, x)."""
    gamma = lam * dt
    shifted = F.pad(((1 - lam) * dt)[:, 1:], (0, 0, 0, 1))  # (1 - lam_{t+1}) dt_{t+1}; 0 after the end
    scale = (gamma + shifted)[:, :, None, :, None]
    y, final = ssd_scan(x * scale.to(x.dtype), adt, k, q, chunk_size, backend=backend)
    # per-token dot products as broadcast products + sums: as batched matmuls they become [1, n] x [n, 1]
    # GEMVs, the slowest kernels of the whole step on a GPU. In x's dtype (bf16 under autocast, as the
    # matmuls ran), so what backward keeps is a half-precision copy of q and k, not a float32 one.
    qk = (q.to(x.dtype)[:, :, :, None] * k.to(x.dtype)[:, :, None]).sum(-1)  # [b, l, R, R, h]
    diag = (qk[..., None] * x[:, :, None]).sum(3) * shifted[:, :, None, :, None]
    return y - diag.to(y.dtype) + D[:, None].to(x.dtype) * x, final


class Mamba3Block(SSDBlock):
    """Pre-norm residual Mamba-3 block: x + Mamba3Mixer(RMSNorm(x)) (mixer inlined, see module doc)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        d = cfg.d_model
        self.rank = cfg.mimo_rank
        self.n_angles = max(int(self.d_state * ROPE_FRACTION) // 2, 1)
        h, R, n = self.n_heads, self.rank, self.d_state

        # in_proj order: z, x, B, C, dt, A, trap, angles
        self.sizes = [self.d_inner, self.d_inner, R * n, R * n, h, h, h, self.n_angles]
        self.in_proj = nn.Linear(d, sum(self.sizes), bias=False)
        self.dt_bias = nn.Parameter(init_dt_bias(h))
        self.B_norm = nn.RMSNorm(n, eps=1e-5)
        self.C_norm = nn.RMSNorm(n, eps=1e-5)
        self.B_bias = nn.Parameter(torch.ones(h, R, n))
        self.C_bias = nn.Parameter(torch.ones(h, R, n))
        self.D = nn.Parameter(torch.ones(h))
        for p in (self.dt_bias, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        if R > 1:
            self.mimo_x = nn.Parameter(torch.ones(h, R, self.headdim) / R)
            self.mimo_z = nn.Parameter(torch.ones(h, R, self.headdim))
            self.mimo_o = nn.Parameter(torch.ones(h, R, self.headdim) / R)
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)

    def _project(self, u: torch.Tensor):
        """in_proj and the per-token maps. u: [..., d] (leading dims [b, l] or [b]). Returns
        z, v [.., R, h, p]; B, C [.., R, h, n] (normed + bias, not rotated); dt, adt, lam [.., h];
        dtheta [.., h, S] (this token's rotation increment)."""
        h, R, n, p = self.n_heads, self.rank, self.d_state, self.headdim
        z, x, B, C, dd_dt, dd_A, trap, ang = torch.split(self.in_proj(u), self.sizes, dim=-1)
        lead = u.shape[:-1]
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        dt = F.softplus(dd_dt.to(acc) + self.dt_bias.to(acc))
        A = (-heavy_tail(dd_A.to(acc))).clamp(max=-A_FLOOR)
        lam = torch.sigmoid(trap.to(acc))
        dtheta = (math.pi * torch.tanh(ang.to(acc)))[..., None, :] * dt[..., None]
        # B/C norms in the weights' dtype: under bf16 autocast a dtype mismatch disables the fused RMSNorm
        wdt = self.B_norm.weight.dtype
        B = self.B_norm(B.reshape(*lead, R, n).to(wdt))[..., None, :] + self.B_bias.transpose(0, 1)
        C = self.C_norm(C.reshape(*lead, R, n).to(wdt))[..., None, :] + self.C_bias.transpose(0, 1)
        x = x.reshape(*lead, 1, h, p)
        z = z.reshape(*lead, 1, h, p)
        if R > 1:
            x = x * self.mimo_x.transpose(0, 1).to(x.dtype)
            z = z * self.mimo_z.transpose(0, 1).to(z.dtype)
        return z, x, B, C, dt, A * dt, lam, dtheta

    def _output(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Gate, contract the MIMO ranks, out_proj. y, z: [.., R, h, p]."""
        y = y.to(z.dtype) * F.silu(z)
        if self.rank > 1:
            y = (y * self.mimo_o.transpose(0, 1).to(y.dtype)).sum(-3)
        else:
            y = y.squeeze(-3)
        return self.out_proj(y.flatten(-2))

    def _mix(self, u: torch.Tensor) -> tuple[torch.Tensor, State]:
        z, v, B, C, dt, adt, lam, dtheta = self._project(u)
        theta = torch.cumsum(dtheta, dim=1)  # [b, l, h, S]
        k = rotate_pairs(B, theta[:, :, None])
        q = rotate_pairs(C, theta[:, :, None])
        y, H = mamba3_chunked(v, adt, dt, lam, k, q, self.D, self.chunk_size, self.backend)
        state = {"angle": theta[:, -1], "ssm": H, "k": k[:, -1], "v": v[:, -1]}
        return self._output(y, z), state

    # -- public API (forward, prefill: SSDBlock) ------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> State:
        h, R, n, p = self.n_heads, self.rank, self.d_state, self.headdim
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return {
            "angle": torch.zeros(batch, h, self.n_angles, device=device, dtype=acc),
            "ssm": torch.zeros(batch, h, p, n, device=device, dtype=dtype),
            "k": torch.zeros(batch, R, h, n, device=device, dtype=dtype),
            "v": torch.zeros(batch, R, h, p, device=device, dtype=dtype),
        }

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: x_t [b, d] -> (y_t [b, d], new state); the literal recurrence of the module doc."""
        z, v, B, C, dt, adt, lam, dtheta = self._project(self.norm(x_t))
        theta = state["angle"] + dtheta
        k = rotate_pairs(B, theta[:, None])
        q = rotate_pairs(C, theta[:, None])
        H = state["ssm"]
        alpha = torch.exp(adt)[:, :, None, None]
        beta = ((1 - lam) * dt)[:, :, None, None] * alpha
        gamma = (lam * dt)[:, :, None, None]
        prev = torch.einsum("brhp,brhn->bhpn", state["v"], state["k"])
        cur = torch.einsum("brhp,brhn->bhpn", v, k)
        H = (alpha * H + beta * prev + gamma * cur).to(H.dtype)
        y = torch.einsum("bhpn,brhn->brhp", H, q.to(H.dtype)) + self.D[:, None].to(H.dtype) * v
        return x_t + self._output(y, z), {"angle": theta, "ssm": H, "k": k, "v": v}
