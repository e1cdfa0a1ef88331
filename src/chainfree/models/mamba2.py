"""Mamba-2 residual block (Dao & Gu, arXiv 2405.21060), written from the paper and the structure of
state-spaces/mamba `modules/mamba2.py` (Apache-2.0; no code copied).

    u = RMSNorm(x)
    z, xBC, dt = in_proj(u)                  z, x: d_inner = expand * d_model; B, C: d_state (1 group)
    x, B, C = silu(causal depthwise conv(xBC))
    dt = softplus(dt + dt_bias);  A = -exp(A_log)    one scalar A per head ("scalar times identity")
    y = SSD(x * dt, A * dt, B, C) + D * x            H_t = exp(A dt_t) H_{t-1} + dt_t x_t B_t^T, y_t = H_t C_t
    out = x_residual + out_proj(RMSNorm(y * silu(z)))

The scan is `chainfree.ops.ssd` (pure PyTorch, chunked; `model.ssd_backend='compile'` runs it through
torch.compile on GPU). Generation uses the recurrent form: `init_state` / `step` carry the last
conv_kernel-1 conv inputs and the [heads, headdim, d_state] SSM state; `prefill` runs the parallel form
and returns the same state, so a prompt costs one parallel pass.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from chainfree.config import ModelConfig
from chainfree.ops.ssd import ssd_scan

State = dict[str, torch.Tensor]


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight -- Mamba-2 gates *before* normalising (norm_before_gate=False), so
    the gate cannot undo the normalisation of the output that feeds out_proj."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y * F.silu(z)
        dtype = y.dtype
        y = y.float() if dtype in (torch.float16, torch.bfloat16) else y
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(dtype)


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y[:, t] = bias + sum_k weight[:, 0, k] * x[:, t - K + 1 + k] on x [b, l, channels] (zeros before t = 0):
    the causal depthwise conv written as K shifted products in the token-major layout the projections use,
    so no transpose is materialised and torch.compile fuses it into one kernel (a grouped Conv1d needs
    [b, channels, l] and runs a slow depthwise kernel forward and backward). Half-precision inputs
    accumulate in float32."""
    K = weight.shape[-1]
    length = x.shape[1]
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xp = F.pad(x, (0, 0, K - 1, 0))  # kept in x's dtype (saved for backward); the products promote to acc
    w = weight[:, 0, :].to(acc)
    y = xp[:, :length] * w[:, 0]
    for k in range(1, K):
        y = y + xp[:, k:k + length] * w[:, k]
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def init_dt_bias(n_heads: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """dt_bias = softplus^{-1}(dt) with dt log-uniform in [dt_min, dt_max]: every head starts with a
    different time scale (the Mamba initialisation)."""
    dt = torch.exp(torch.rand(n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class SSDBlock(nn.Module, ABC):
    """What the Mamba-2 and Mamba-3 blocks share: the SSD sizes from the config, the pre-norm, and the
    residual forward / prefill around the subclass's `_mix(u) -> (y, state)`."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.d_inner = cfg.expand * cfg.d_model
        self.headdim = cfg.ssm_head_dim
        self.n_heads = self.d_inner // self.headdim
        self.d_state = cfg.d_state
        self.chunk_size = cfg.chunk_size
        self.backend = cfg.ssd_backend
        self.layer_idx = layer_idx
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-5)

    @abstractmethod
    def _mix(self, u: torch.Tensor) -> tuple[torch.Tensor, State]:
        """The block's mixer on normalised input u [B, T, d]: (output [B, T, d], recurrent state after T)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._mix(self.norm(x))[0]

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        """Parallel forward over a prompt that also returns the recurrent state after its last token."""
        y, state = self._mix(self.norm(x))
        return x + y, state


class Mamba2Block(SSDBlock):
    """Pre-norm residual Mamba-2 block: x + Mamba2Mixer(RMSNorm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        d = cfg.d_model
        self.conv_kernel = cfg.conv_kernel
        conv_dim = self.d_inner + 2 * self.d_state
        self.in_proj = nn.Linear(d, 2 * self.d_inner + 2 * self.d_state + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.conv_kernel, groups=conv_dim, padding=cfg.conv_kernel - 1)
        self.dt_bias = nn.Parameter(init_dt_bias(self.n_heads))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_norm = GatedRMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)

    # -- pieces shared by the parallel and the recurrent form -------------------------------------------
    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.d_inner + 2 * self.d_state, self.n_heads], dim=-1)

    def _ssm_inputs(self, xBC: torch.Tensor, dt: torch.Tensor):
        """(x, B, C, dt, A) after the conv+silu; dt in float32 (float64 when the model is float64)."""
        x, B, C = torch.split(xBC, [self.d_inner, self.d_state, self.d_state], dim=-1)
        acc = torch.float64 if dt.dtype == torch.float64 else torch.float32
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))
        A = -torch.exp(self.A_log.to(acc))
        return x, B, C, dt, A

    def _mix(self, u: torch.Tensor, initial: State | None = None) -> tuple[torch.Tensor, State]:
        b, l, _ = u.shape
        z, xBC, dt = self._split(self.in_proj(u))
        K = self.conv_kernel
        conv_in = xBC
        xBC = F.silu(causal_depthwise_conv(xBC, self.conv1d.weight, self.conv1d.bias))
        x, B, C, dt, A = self._ssm_inputs(xBC, dt)
        xh = x.reshape(b, l, self.n_heads, self.headdim)
        y, final = ssd_scan(
            xh * dt[..., None],
            A * dt,
            B.reshape(b, l, 1, self.d_state),
            C.reshape(b, l, 1, self.d_state),
            self.chunk_size,
            backend=self.backend,
        )
        y = y + self.D[:, None].to(y.dtype) * xh
        out = self.out_proj(self.out_norm(y.reshape(b, l, self.d_inner).to(z.dtype), z))
        conv_in = conv_in.transpose(1, 2)  # [b, conv_dim, l]: the recurrent form's window layout
        conv_state = F.pad(conv_in, (K - 1, 0))[..., -(K - 1):] if K > 1 else conv_in[..., :0]
        return out, {"conv": conv_state, "ssm": final}

    # -- public API (forward, prefill: SSDBlock) ------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> State:
        conv_dim = self.d_inner + 2 * self.d_state
        return {
            "conv": torch.zeros(batch, conv_dim, self.conv_kernel - 1, device=device, dtype=dtype),
            "ssm": torch.zeros(batch, self.n_heads, self.headdim, self.d_state, device=device, dtype=dtype),
        }

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: x_t [b, d] -> (y_t [b, d], new state). Does not modify `state` in place."""
        b = x_t.shape[0]
        z, xBC, dt = self._split(self.in_proj(self.norm(x_t)))
        window = torch.cat([state["conv"], xBC[:, :, None]], dim=-1)  # [b, conv_dim, K]
        conv = (window * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias
        x, B, C, dt, A = self._ssm_inputs(F.silu(conv), dt)
        xh = x.reshape(b, self.n_heads, self.headdim)
        H = state["ssm"]
        H = torch.exp(A * dt)[:, :, None, None].to(H.dtype) * H + torch.einsum(
            "bhp,bn->bhpn", (xh * dt[..., None]).to(H.dtype), B.to(H.dtype)
        )
        y = torch.einsum("bhpn,bn->bhp", H, C.to(H.dtype)) + self.D[:, None].to(H.dtype) * xh
        out = self.out_proj(self.out_norm(y.reshape(b, self.d_inner).to(z.dtype), z))
        return x_t + out, {"conv": window[..., 1:], "ssm": H}
