"""Structured state-space duality (SSD) scan: chunked parallel form + sequential reference.

The recurrence (per batch b and head h; state H_t is [headdim p, d_state n]):

    H_t = exp(a_t) * H_{t-1} + sum_r x_{t,r} B_{t,r}^T        a_t <= 0 is the log-decay (A * dt)
    y_{t,r} = H_t C_{t,r}

`r` is a MIMO rank index (Mamba-3 MIMO writes R rank-1 updates per step and reads R outputs); plain
Mamba-2 / Mamba-3 SISO is R = 1 and callers may drop that axis. Inputs x are already scaled by the
discretisation (dt for Mamba-2, the trapezoidal weights for Mamba-3). B and C come in `g` groups shared by
`h // g` heads each (Mamba-2: g = 1; Mamba-3: per-head B/C, g = h).

`ssd_chunked` evaluates the same map in O(T * Q) work with chunk length Q, following the SSD algorithm of
Dao & Gu (Mamba-2, arXiv 2405.21060) and the minimal listing in state-spaces/mamba `ssd_minimal.py`:
  1. intra-chunk: a masked "attention" y = (L * (C B^T)) x with L[t, s] = exp(a_{s+1} + ... + a_t);
  2. each chunk's end state from its own inputs, decayed to the chunk end;
  3. inter-chunk: a recurrence over the C = T/Q chunk states (done with the same segment-sum matrix);
  4. each position reads the state entering its chunk, decayed to the position.
Numerics: decays are built with a masked cumsum ("segsum") and exponentiated only where s <= t, so no
exp(+large) ever appears (which would turn into inf * 0 = nan in the backward). Decay arithmetic is done
in float32 (or float64 when the inputs are float64); under CUDA autocast the einsums run in bf16.
Saved tensors: autograd keeps the per-chunk [Q, Q] decay and score matrices (O(T Q) per head), the chunk
states (O(T/Q * p * n)) and the inputs -- no T x T tensor.

`ssd_sequential` is the literal recurrence, one step at a time: the reference the tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T] with out[..., t, s] = a[s+1] + ... + a[t] for s <= t and -inf above.

    Built as a cumsum of a lower-triangular masked copy (not as a difference of cumsums), so it is exact
    for s <= t and never forms exp of a positive number."""
    T = a.shape[-1]
    x = a.unsqueeze(-1).expand(*a.shape, T)  # x[..., u, s] = a[u]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    x = x.masked_fill(~strict, 0.0)
    out = torch.cumsum(x, dim=-2)  # out[..., t, s] = sum_{s < u <= t} a[u]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~causal, float("-inf"))


def _canonical(x, a, B, C):
    """Check shapes; add the MIMO rank axis when absent. Returns (x, B, C, squeeze_rank)."""
    if x.dim() not in (4, 5):
        raise ValueError(f"x must be [b, l, h, p] or [b, l, R, h, p], got shape {tuple(x.shape)}")
    squeeze = x.dim() == 4
    if squeeze:
        x, B, C = x.unsqueeze(2), B.unsqueeze(2), C.unsqueeze(2)
    b, l, R, h, p = x.shape
    if B.dim() != 5 or C.shape != B.shape or B.shape[:3] != (b, l, R):
        raise ValueError(f"B and C must be [b, l, (R,) g, n] matching x; got {tuple(B.shape)}, {tuple(C.shape)}")
    g = B.shape[3]
    if h % g != 0:
        raise ValueError(f"the number of B/C groups ({g}) must divide the number of heads ({h})")
    if a.shape != (b, l, h):
        raise ValueError(f"a must be [b, l, h] = {(b, l, h)}, got {tuple(a.shape)}")
    return x, B, C, squeeze


def ssd_chunked(
    x: torch.Tensor,
    a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan.

    x: [b, l, h, p] (or [b, l, R, h, p]); a: [b, l, h] log-decays; B, C: [b, l, g, n] (or [b, l, R, g, n]);
    initial_state: [b, h, p, n] or None (zeros). Returns (y like x, final_state [b, h, p, n]).
    The sequence is zero-padded to a multiple of `chunk_size`; padded steps have decay 1 and no input, so
    they change neither the outputs kept nor the final state.
    """
    x, B, C, squeeze = _canonical(x, a, B, C)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, l, R, h, p = x.shape
    g, n = B.shape[3], B.shape[4]
    e = h // g
    Q = chunk_size
    pad = (-l) % Q
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
    c = (l + pad) // Q
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32

    # Heads and chunks are batch axes of plain matmuls; a chunk's rows are its (step, rank) pairs, so the
    # MIMO rank R needs no extra einsum axis (R = 1: rows are steps).
    QR = Q * R
    X = x.reshape(b, c, QR, g, e, p)
    Bc = B.reshape(b, c, QR, g, n).permute(0, 3, 1, 2, 4)  # [b, g, c, QR, n]
    Cc = C.reshape(b, c, QR, g, n).permute(0, 3, 1, 2, 4)
    A = a.to(acc).reshape(b, c, Q, g, e).permute(0, 3, 4, 1, 2)  # [b, g, e, c, Q]
    A_cs = torch.cumsum(A, dim=-1)
    A_rows = A_cs.repeat_interleave(R, dim=-1) if R > 1 else A_cs  # [b, g, e, c, QR]

    # 1. intra-chunk: y[t, r] = sum_{s <= t, q} L[t, s] (C[t, r] . B[s, q]) x[s, q], L[t, s] = exp(A_cs[t] - A_cs[s])
    step = torch.arange(Q, device=a.device).repeat_interleave(R)
    causal = step[:, None] >= step[None, :]
    L = (A_rows[..., :, None] - A_rows[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    CB = Cc @ Bc.transpose(-1, -2)  # [b, g, c, QR, QR]
    Xh = X.permute(0, 3, 4, 1, 2, 5)  # [b, g, e, c, QR, p]
    Y = (CB[:, :, None] * L.to(CB.dtype)) @ Xh  # [b, g, e, c, QR, p]

    # 2. each chunk's own contribution to its end state: states[p, n] = sum_s decay(s -> end) x[s, p] B[s, n].
    # The heads sharing a group's B are columns of one matmul ([e * p, QR] @ [QR, n]), so B is never copied per head.
    decay_to_end = torch.exp(A_rows[..., -1:] - A_rows).permute(0, 1, 3, 4, 2)  # [b, g, c, QR, e], all <= 1
    Xg = X.permute(0, 3, 1, 2, 4, 5)  # [b, g, c, QR, e, p]
    Xd = (Xg * decay_to_end[..., None].to(Xg.dtype)).flatten(-2)  # [b, g, c, QR, e * p]
    states = (Xd.transpose(-1, -2) @ Bc).unflatten(-2, (e, p)).transpose(2, 3)  # [b, g, e, c, p, n]

    # 3. inter-chunk recurrence over chunk states (c + 1 entries: the initial state first)
    if initial_state is None:
        init = states.new_zeros(b, g, e, 1, p, n)
    else:
        if initial_state.shape != (b, h, p, n):
            raise ValueError(f"initial_state must be [b, h, p, n] = {(b, h, p, n)}, got {tuple(initial_state.shape)}")
        init = initial_state.to(states.dtype).reshape(b, g, e, 1, p, n)
    states = torch.cat([init, states], dim=3)
    chunk_decay = F.pad(A_cs[..., -1], (1, 0))  # [b, g, e, c + 1]
    Lc = torch.exp(segsum(chunk_decay)).to(states.dtype)  # [b, g, e, c + 1, c + 1]
    states = (Lc @ states.flatten(-2)).unflatten(-1, (p, n))
    entering, final = states[:, :, :, :-1], states[:, :, :, -1]

    # 4. read the state entering each chunk, decayed to each position (again one matmul per group:
    # [QR, n] @ [n, e * p], C not copied per head)
    entering = entering.permute(0, 1, 3, 5, 2, 4).flatten(-2)  # [b, g, c, n, e * p]
    decay_in = torch.exp(A_rows).permute(0, 1, 3, 4, 2)[..., None]  # [b, g, c, QR, e, 1]
    Yoff = (Cc @ entering).unflatten(-1, (e, p)) * decay_in.to(Y.dtype)  # [b, g, c, QR, e, p]

    y = (Y.permute(0, 3, 4, 1, 2, 5) + Yoff.permute(0, 2, 3, 1, 4, 5)).reshape(b, c * Q, R, h, p)[:, :l]
    final = final.reshape(b, h, p, n)
    return (y.squeeze(2) if squeeze else y), final


def ssd_sequential(
    x: torch.Tensor,
    a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence itself, one time step at a time (reference for tests; same signature minus chunks)."""
    x, B, C, squeeze = _canonical(x, a, B, C)
    b, l, R, h, p = x.shape
    e = h // B.shape[3]
    Bh = B.repeat_interleave(e, dim=3)  # [b, l, R, h, n]
    Ch = C.repeat_interleave(e, dim=3)
    n = B.shape[4]
    H = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(l):
        H = torch.exp(a[:, t])[:, :, None, None].to(x.dtype) * H + torch.einsum("brhp,brhn->bhpn", x[:, t], Bh[:, t])
        ys.append(torch.einsum("bhpn,brhn->brhp", H, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    return (y.squeeze(2) if squeeze else y), H


_COMPILED: dict[str, Callable] = {}


def ssd_scan(
    x: torch.Tensor,
    a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: 'torch' = `ssd_chunked` eagerly (CPU and GPU); 'compile' = the same function through
    torch.compile (GPU fast path: fuses the elementwise decay work around the einsums; no custom kernel,
    so it computes exactly the same math)."""
    if backend == "torch":
        return ssd_chunked(x, a, B, C, chunk_size, initial_state)
    if backend == "compile":
        if "ssd" not in _COMPILED:
            _COMPILED["ssd"] = torch.compile(ssd_chunked, dynamic=False)
        return _COMPILED["ssd"](x, a, B, C, chunk_size, initial_state)
    raise ValueError(f"unknown SSD backend {backend!r}; use 'torch' or 'compile'")
