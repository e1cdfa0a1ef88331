"""LBI — Latent Bounded Interfaces (arXiv 2605.09204): exact, causal scan backpropagation.

The model is cut into K regions of `region_size` consecutive blocks. Regions talk only through a narrow
latent message m_k (the interface); no dense stream crosses a region boundary: every region rebuilds its
input from the static token embedding (the "canvas", shared) plus the decoded message. Then the adjoint
lambda_k = dL/dm_k obeys lambda_k = J_kᵀ lambda_{k+1} with small Jacobians J_k = dm_{k+1}/dm_k, which a
suffix scan (chainfree.ops.scan, depth O(log K)) composes; afterwards each region gets its parameter
gradients from one VJP with cotangent lambda_{k+1}, independently of the others (region-parallel:
chainfree.parallel.region). The gradients are exact *for this LBI model* (its forward is not the dense
model's): `backward='autograd'` gives the same numbers by plain autograd, which the tests check in float64.

Interfaces (`interface=`):
  causal_chunk (C1, default, ours): the authors' region/canvas structure made causal. The sequence is cut
    into C chunks; m_k has shape [B, C, r]; message c summarises only chunks <= c (prefix mean over chunks),
    and the tokens of chunk c are given Dec_k of the message of chunk c-1 (chunk 0: a learned constant).
    So position t never sees a token after t. Per sample J_k is a (C r)x(C r) block-lower-triangular matrix.
      m_0 = Enc_in(prefix_mean(canvas))
      region k: x = canvas + Dec_k(shift(m_k)) per chunk;  x = blocks_k(x)
                m_{k+1} = LayerNorm_k(m_k + tanh(alpha_k) Enc_k(prefix_mean(x)))      (k < K-1)
      loss = CE(head(norm(x of region K-1)))
  token (C2, ours): m_k has shape [B, T, r] and the path m_k -> m_{k+1} is token-local: region k's blocks
    read only the canvas, and the message joins after their token mixing,
      m_{k+1} = LayerNorm_k(m_k + tanh(alpha_k) Enc_k(blocks_k(canvas) + Dec_k(m_k)))      (k < K-1)
    so J_k is r x r per token and costs r VJPs through two small MLPs, never through the blocks. The price:
    only the last region's blocks see what earlier regions computed (weaker model, cheap scan).
  paper_leaky: the authors' LBI-1, m_k in [B, 1, r] pooled over the WHOLE sequence and broadcast to every
    position. Position t sees tokens after t (the answer leaks): kept only to reproduce the paper's numbers.

Jacobians (`jacobian=`): 'vjp' (n batched VJPs on the forward graph, `is_grads_batched`), 'jvp' (n
forward-mode JVPs, torch.func), 'replicate' (re-run the region on the batch replicated n times, one
backward), 'loop' (n plain VJPs). n = C r (causal_chunk), r (paper_leaky, token). Only regions 1..K-2 need
one: region K-1 supplies the seed lambda_{K-1} by its VJP, region 0's VJP yields lambda_0 for the stem.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from chainfree.errors import ConfigError
from chainfree.methods.base import Method, StepStats
from chainfree.ops.scan import adjoints

INTERFACES = ("causal_chunk", "token", "paper_leaky")
JACOBIANS = ("vjp", "jvp", "replicate", "loop")
BACKWARDS = ("scan", "autograd")


@dataclass
class LBIConfig:
    """`method.<key>` settings of LBI."""

    region_size: int = 2  # blocks per region; K = n_layers / region_size
    rank: int = 16  # r, width of the latent interface
    interface: str = "causal_chunk"  # 'causal_chunk' (C1) | 'token' (C2) | 'paper_leaky' (authors', not causal)
    n_chunks: int = 4  # C for causal_chunk (ignored when chunk_len > 0)
    chunk_len: int = 0  # > 0: C = seq_len / chunk_len
    jacobian: str = "vjp"  # 'vjp' | 'jvp' | 'replicate' | 'loop'
    jacobian_chunk: int = 0  # > 0: at most this many Jacobian directions per pass (less memory); 0 = all
    backward: str = "scan"  # 'scan' (Jacobians + suffix scan + per-region VJPs) | 'autograd' (same grads)
    alpha_init: float = 0.5  # tanh(alpha) gates each region's message update (authors' init 0.5)
    check_separator: bool = True  # prepare() walks the autograd graph of a probe batch (see verify_separator)

    def validate(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"method.{key} {msg}")

        need(self.region_size >= 1, "region_size", f"must be >= 1, got {self.region_size}")
        need(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
        need(self.interface in INTERFACES, "interface", f"must be one of {INTERFACES}, got {self.interface!r}")
        need(self.n_chunks >= 1, "n_chunks", f"must be >= 1, got {self.n_chunks}")
        need(self.chunk_len >= 0, "chunk_len", f"must be >= 0 (0 = use n_chunks), got {self.chunk_len}")
        need(self.jacobian in JACOBIANS, "jacobian", f"must be one of {JACOBIANS}, got {self.jacobian!r}")
        need(self.backward in BACKWARDS, "backward", f"must be one of {BACKWARDS}, got {self.backward!r}")
        need(self.jacobian_chunk >= 0, "jacobian_chunk", f"must be >= 0 (0 = all at once), got {self.jacobian_chunk}")


class _Bridge(nn.Module):
    """Linear -> SiLU -> Linear with hidden width d: the encoders/decoders between d and r."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, std: float, out_scale: float = 1.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        nn.init.normal_(self.fc1.weight, std=std)
        nn.init.normal_(self.fc2.weight, std=std * out_scale)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


def prefix_chunk_mean(x: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """[B, T, d] -> [B, C, d]: entry c is the mean of all tokens in chunks 0..c (causal at chunk level)."""
    b, t, d = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)  # bf16 sums over 1000s of tokens would lose digits
    sums = x.reshape(b, n_chunks, t // n_chunks, d).to(acc).sum(2).cumsum(1)
    counts = torch.arange(1, n_chunks + 1, device=x.device, dtype=acc) * (t // n_chunks)
    return (sums / counts.view(1, n_chunks, 1)).to(x.dtype)


class LBIModel(nn.Module):
    """A LanguageModel (embed, blocks, norm, head) rewired into K regions joined by a latent interface.

    `lm` keeps its parameters and names; the interface modules are new parameters. Region k owns blocks
    [k*region_size, (k+1)*region_size), dec[k], and (k < K-1) enc[k], msg_norm[k], alpha[k]; the last region
    also owns norm and head. The stem (embedding, enc_in) is shared by all regions.
    """

    def __init__(self, lm: nn.Module, config: LBIConfig) -> None:
        super().__init__()
        config.validate()
        cfg = lm.cfg
        if cfg.n_layers % config.region_size:
            raise ConfigError(
                f"model.n_layers={cfg.n_layers} is not a multiple of method.region_size={config.region_size}: "
                f"regions must hold whole blocks; pick a region_size that divides n_layers"
            )
        self.lm = lm
        self.config = config
        self.interface = config.interface
        self.n_regions = cfg.n_layers // config.region_size
        d, r, std, k_total = cfg.d_model, config.rank, cfg.init_std, self.n_regions
        self.n_chunks(cfg.seq_len)  # validates the chunking against model.seq_len
        self.enc_in = _Bridge(d, d, r, std)
        self.dec = nn.ModuleList(_Bridge(r, d, d, std, 1 / math.sqrt(2 * cfg.n_layers)) for _ in range(k_total))
        self.enc = nn.ModuleList(_Bridge(d, d, r, std) for _ in range(k_total - 1))
        self.msg_norm = nn.ModuleList(nn.LayerNorm(r) for _ in range(k_total - 1))
        self.alpha = nn.ParameterList(nn.Parameter(torch.tensor(config.alpha_init)) for _ in range(k_total - 1))
        self.m_start = nn.ParameterList(
            nn.Parameter(torch.zeros(r)) for _ in range(k_total if self.interface == "causal_chunk" else 0)
        )
        ref = lm.embed.weight
        self.to(device=ref.device, dtype=ref.dtype)
        self._check_regions_disjoint()

    # ---- structure -------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.config.rank

    def n_chunks(self, seq_len: int) -> int:
        """C: messages per sequence (1 for paper_leaky, T for token)."""
        if self.interface == "paper_leaky":
            return 1
        if self.interface == "token":
            return seq_len
        cl = self.config.chunk_len
        c = seq_len // cl if cl > 0 else self.config.n_chunks
        if cl > 0 and seq_len % cl:
            raise ConfigError(f"sequence length {seq_len} is not a multiple of method.chunk_len={cl}")
        if c < 1 or seq_len % c:
            raise ConfigError(
                f"sequence length {seq_len} cannot be cut into method.n_chunks={c} equal chunks; "
                f"choose n_chunks dividing {seq_len} (or set method.chunk_len)"
            )
        return c

    def region_blocks(self, k: int) -> list[nn.Module]:
        s = self.config.region_size
        return list(self.lm.blocks[k * s : (k + 1) * s])

    def region_modules(self, k: int) -> list[nn.Module]:
        mods = [*self.region_blocks(k), self.dec[k]]
        if k < self.n_regions - 1:
            mods += [self.enc[k], self.msg_norm[k]]
        else:
            mods += [self.lm.norm, self.lm.head]
        return mods

    def region_parameters(self, k: int) -> list[nn.Parameter]:
        """Parameters region k uses (deduplicated; a tied head weight also appears in the stem)."""
        params = [p for m in self.region_modules(k) for p in m.parameters()]
        if k < self.n_regions - 1:
            params.append(self.alpha[k])
        if self.interface == "causal_chunk":
            params.append(self.m_start[k])
        return list({id(p): p for p in params}.values())

    def stem_parameters(self) -> list[nn.Parameter]:
        return list({id(p): p for m in (self.lm.embed, self.enc_in) for p in m.parameters()}.values())

    def _check_regions_disjoint(self) -> None:
        """Reject a parameter object used by two regions. The scan gradients would still be exact (the VJPs
        add up), but region-parallel training gives each region's parameters to one rank, so a shared one
        would silently diverge between ranks; the embedding (stem, canvas) is the one shared input."""
        owner: dict[int, int] = {}
        stem = {id(p) for p in self.stem_parameters()}
        for k in range(self.n_regions):
            for p in self.region_parameters(k):
                if id(p) in stem:
                    continue
                if owner.setdefault(id(p), k) != k:
                    raise ConfigError(
                        f"a parameter of shape {tuple(p.shape)} is shared by LBI regions {owner[id(p)]} and {k}: "
                        f"each region's parameters belong to one rank in region-parallel training; untie it or "
                        f"choose a method.region_size that keeps the sharing blocks in one region"
                    )

    # ---- forward pieces (the scan backward calls them one region at a time) ------------------------------
    def canvas(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] > self.lm.cfg.seq_len:
            raise ValueError(f"sequence of {ids.shape[-1]} tokens is longer than model.seq_len={self.lm.cfg.seq_len}")
        return self.lm.embed(ids)

    def first_message(self, canvas: torch.Tensor) -> torch.Tensor:
        if self.interface == "causal_chunk":
            return self.enc_in(prefix_chunk_mean(canvas, self.n_chunks(canvas.shape[1])))
        if self.interface == "paper_leaky":
            return self.enc_in(canvas.mean(1, keepdim=True))
        return self.enc_in(canvas)

    def _blocks(self, k: int, x: torch.Tensor) -> torch.Tensor:
        for block in self.region_blocks(k):
            x = block(x)
        return x

    def region(self, k: int, m: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        """Region k: message m_k [B, C, r] (+ canvas) -> m_{k+1} (k < K-1) or the last hidden states [B, T, d]."""
        last = k == self.n_regions - 1
        if self.interface == "token" and not last:
            u = self._blocks(k, canvas)
            return self.msg_norm[k](m + torch.tanh(self.alpha[k]) * self.enc[k](u + self.dec[k](m)))
        if self.interface == "causal_chunk":
            b, t, _ = canvas.shape
            c = m.shape[1]
            shifted = torch.cat((self.m_start[k].expand(b, 1, -1).to(m.dtype), m[:, :-1]), dim=1)
            x = canvas + self.dec[k](shifted).repeat_interleave(t // c, dim=1)
        else:  # paper_leaky ([B,1,r] broadcast to every token) and the last region of `token`
            x = canvas + self.dec[k](m)
        x = self._blocks(k, x)
        if last:
            return x
        pooled = prefix_chunk_mean(x, m.shape[1]) if self.interface == "causal_chunk" else x.mean(1, keepdim=True)
        return self.msg_norm[k](m + torch.tanh(self.alpha[k]) * self.enc[k](pooled))

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.lm.loss(self.lm.norm(x), targets)

    def messages(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Plain forward: the messages m_0..m_{K-1} (graph attached) and the last region's hidden states."""
        canvas = self.canvas(ids)
        ms = [self.first_message(canvas)]
        for k in range(self.n_regions - 1):
            ms.append(self.region(k, ms[-1], canvas))
        return ms, self.region(self.n_regions - 1, ms[-1], canvas)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        _, x = self.messages(ids)
        if targets is None:
            return self.lm.logits(self.lm.norm(x))
        return self.head_loss(x, targets)


# ---- Jacobians -------------------------------------------------------------------------------------------
def _basis(n_rows: int, like: torch.Tensor, token_local: bool) -> torch.Tensor:
    """Cotangents/tangents e_i, shaped [n, *like.shape]: one basis vector per message coordinate (coupled) or
    the same r-dim basis vector at every token at once (token-local: the Jacobian is block diagonal)."""
    b, g, r = like.shape
    eye = torch.eye(n_rows, device=like.device, dtype=like.dtype)
    if token_local:
        return eye.view(r, 1, 1, r).expand(r, b, g, r)
    return eye.view(n_rows, 1, g, r).expand(n_rows, b, g, r)


def _transpose_rows(rows: torch.Tensor, token_local: bool) -> torch.Tensor:
    """rows[i] = e_iᵀ J (VJP results, [n, B, G, r]) -> A = Jᵀ in scan layout ([B, n, n] or [B, T, r, r])."""
    n, b, g, r = rows.shape
    if token_local:
        return rows.permute(1, 2, 3, 0)
    return rows.reshape(n, b, g * r).permute(1, 2, 0)


def _transpose_cols(cols: torch.Tensor, token_local: bool) -> torch.Tensor:
    """cols[i] = J e_i (JVP results, [n, B, G, r]) -> A = Jᵀ in scan layout."""
    n, b, g, r = cols.shape
    if token_local:
        return cols.permute(1, 2, 0, 3)
    return cols.reshape(n, b, g * r).permute(1, 0, 2)


def region_jacobian_t(
    model: LBIModel, k: int, m_in: torch.Tensor, m_out: torch.Tensor | None, canvas: torch.Tensor, how: str
) -> torch.Tensor:
    """A_k = (dm_{k+1}/dm_k)ᵀ per sample ([B, C r, C r]) or per token ([B, T, r, r] for `token`).

    m_in is the leaf the region was run on; m_out its output with the graph attached (needed by 'vjp' and
    'loop', which differentiate that graph again and keep it for the region's parameter VJP).
    """
    token_local = model.interface == "token"
    n = m_in.shape[-1] if token_local else m_in.shape[1] * m_in.shape[2]
    basis = _basis(n, m_in, token_local)
    step = model.config.jacobian_chunk or n  # directions per pass: bounds the memory of vjp/replicate/jvp
    pieces = [basis[i : i + step] for i in range(0, n, step)]
    if how == "vjp":
        rows = [
            torch.autograd.grad(m_out, m_in, e.to(m_out.dtype), retain_graph=True, is_grads_batched=True)[0]
            for e in pieces
        ]
        return _transpose_rows(torch.cat(rows), token_local)
    if how == "loop":
        rows = [torch.autograd.grad(m_out, m_in, e.to(m_out.dtype), retain_graph=True)[0] for e in basis]
        return _transpose_rows(torch.stack(rows), token_local)
    canvas = canvas.detach()
    if how == "replicate":
        b = m_in.shape[0]
        rows = []
        for e in pieces:
            m_rep = m_in.detach().repeat(len(e), 1, 1).requires_grad_(True)
            out = model.region(k, m_rep, canvas.repeat(len(e), 1, 1))
            (g,) = torch.autograd.grad(out, m_rep, e.reshape(len(e) * b, *m_in.shape[1:]).to(out.dtype))
            rows.append(g.view(len(e), *m_in.shape))
        return _transpose_rows(torch.cat(rows), token_local)
    if how == "jvp":
        fn: Callable[[torch.Tensor], torch.Tensor] = lambda m: model.region(k, m, canvas)
        m0 = m_in.detach()
        # Fused SDPA kernels have no forward-mode derivative; the math backend (plain matmuls) has one.
        with sdpa_kernel(SDPBackend.MATH):
            jvp_cols = torch.func.vmap(lambda t: torch.func.jvp(fn, (m0,), (t,))[1], chunk_size=step)
            cols = jvp_cols(basis.contiguous())
        return _transpose_cols(cols, token_local)
    raise ConfigError(f"method.jacobian must be one of {JACOBIANS}, got {how!r}")


# ---- the scan backward -----------------------------------------------------------------------------------
class PhaseTimer:
    """Wall time per (phase, region), synchronising the device so GPU work is attributed correctly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, list[float]] = {}

    def __call__(self, phase: str, k: int) -> _Timed:
        return _Timed(self, phase, k)


class _Timed:
    def __init__(self, timer: PhaseTimer, phase: str, k: int) -> None:
        self.timer, self.phase, self.k = timer, phase, k

    def _sync(self) -> None:
        if self.timer.device.type == "cuda":
            torch.cuda.synchronize(self.timer.device)

    def __enter__(self) -> None:
        self._sync()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self._sync()
        slot = self.timer.times.setdefault(self.phase, [])
        slot.extend([0.0] * (self.k + 1 - len(slot)))
        slot[self.k] += time.perf_counter() - self.t0


class _NoTimer:
    def __call__(self, phase: str, k: int) -> _NoTimer:
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def accumulate_grads(params: list[torch.Tensor], grads: tuple[torch.Tensor | None, ...]) -> None:
    """Add into .grad like loss.backward() does (a tied parameter receives several contributions)."""
    for p, g in zip(params, grads, strict=True):
        if g is None or not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = g.detach().to(p.dtype).clone()
        else:
            p.grad.add_(g.detach().to(p.dtype))


def _as_scan_vector(lam: torch.Tensor, token_local: bool) -> torch.Tensor:
    return lam if token_local else lam.reshape(lam.shape[0], -1)


def scan_backward(
    model: LBIModel, ids: torch.Tensor, targets: torch.Tensor, jacobian: str = "vjp", timer: Any = None
) -> torch.Tensor:
    """One LBI step: forward region by region, seed, Jacobians, suffix scan, per-region VJPs, stem backward.

    Fills `.grad` (accumulating) with exactly the gradients `model(ids, targets).backward()` would give.
    Returns the loss (detached). `timer(phase, k)` (a PhaseTimer) records forward/jacobian/scan/vjp times.
    """
    timer = timer or _NoTimer()
    k_total = model.n_regions
    token_local = model.interface == "token"
    with timer("stem_forward", 0):
        canvas = model.canvas(ids)
        canvas_leaf = canvas.detach().requires_grad_(True)  # regions' canvas cotangents collect here
        m0 = model.first_message(canvas)
    m_ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    m = m0.detach()
    for k in range(k_total):
        with timer("forward", k):
            m_in = m.detach().requires_grad_(True)
            out = model.region(k, m_in, canvas_leaf)
            if k == k_total - 1:
                out = model.head_loss(out, targets)
        m_ins.append(m_in)
        outs.append(out)
        m = out
    loss = outs[-1]
    # Seed: the last region's VJP gives its parameter grads and lambda_{K-1} = dL/dm_{K-1}.
    canvas_cot = torch.zeros_like(canvas_leaf)
    lambdas: list[torch.Tensor | None] = [None] * k_total
    with timer("vjp", k_total - 1):
        params = model.region_parameters(k_total - 1)
        grads = torch.autograd.grad(loss, [*params, m_ins[-1], canvas_leaf], allow_unused=True)
        accumulate_grads(params, grads[: len(params)])
        lambdas[-1] = grads[-2]
        if grads[-1] is not None:
            canvas_cot += grads[-1]
    # Jacobians of the middle regions (region 0's and the last region's are never needed).
    mats = []
    for k in range(1, k_total - 1):
        with timer("jacobian", k):
            mats.append(region_jacobian_t(model, k, m_ins[k], outs[k], canvas_leaf, jacobian))
    if mats:
        with timer("scan", 0):
            seed = _as_scan_vector(lambdas[-1], token_local)
            a = torch.stack(mats)
            a = a.to(torch.promote_types(a.dtype, torch.float32))  # bf16 autocast: scan in fp32
            lam = adjoints(a, torch.zeros(a.shape[:-1], device=a.device, dtype=a.dtype), seed.to(a.dtype))
            for k in range(1, k_total - 1):
                lambdas[k] = lam[k - 1].view_as(m_ins[k]).to(outs[k].dtype)
    # Per-region VJPs: cotangent lambda_{k+1} on m_{k+1}; independent of each other.
    lam0 = None
    for k in range(k_total - 2, -1, -1):
        with timer("vjp", k):
            params = model.region_parameters(k)
            grads = torch.autograd.grad(outs[k], [*params, m_ins[k], canvas_leaf], lambdas[k + 1], allow_unused=True)
            accumulate_grads(params, grads[: len(params)])
            if grads[-1] is not None:
                canvas_cot += grads[-1]
            if k == 0:
                lam0 = grads[-2]
    if k_total == 1:
        lam0 = lambdas[0]
    with timer("stem_vjp", 0):
        stem = model.stem_parameters()
        grads = torch.autograd.grad([canvas, m0], stem, [canvas_cot, lam0.to(m0.dtype)], allow_unused=True)
        accumulate_grads(stem, grads)
    return loss.detach()


# ---- the separator property, checked on the autograd graph -----------------------------------------------
def _reachable_leaves(root: Any, stop: set[Any]) -> set[int]:
    """ids of leaf tensors (AccumulateGrad variables) reachable from `root` without entering `stop` nodes."""
    seen: set[Any] = set()
    leaves: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            leaves.add(id(var))
        todo.extend(nxt for nxt, _ in node.next_functions)
    return leaves


def separator_violations(model: LBIModel, ids: torch.Tensor, targets: torch.Tensor) -> list[str]:
    """Walk the grad_fn graph of the plain forward: for every boundary k, each path from the loss (computed
    in region K-1) to a parameter owned by a region < k must pass through m_k's node. Returns the violations
    (empty = the interface is a separator). Parameters shared with the stem are the canvas, not a path."""
    with torch.enable_grad():
        ms, x = model.messages(ids)
        loss = model.head_loss(x, targets)
    stem = {id(p) for p in model.stem_parameters()}
    problems = []
    for k in range(1, model.n_regions):
        reached = _reachable_leaves(loss.grad_fn, {ms[k].grad_fn})
        for j in range(k):
            own = [p for p in model.region_parameters(j) if id(p) not in stem]
            leaked = [p for p in own if id(p) in reached]
            if leaked:
                problems.append(
                    f"{len(leaked)} parameter(s) of region {j} reach the loss without passing the interface m_{k}"
                )
    return problems


def verify_separator(model: LBIModel) -> None:
    """Probe the model with one random sequence; raise ConfigError if anything but the interface crosses."""
    cfg = model.lm.cfg
    device = model.lm.embed.weight.device
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len), generator=g).to(device)
    problems = separator_violations(model, ids, ids)
    if problems:
        raise ConfigError(
            "LBI region boundary crossed by something other than the latent interface: "
            + "; ".join(problems)
            + ". Blocks must be plain residual block(x) -> x modules that keep no state between calls; "
            "use method.region_size so that blocks sharing tensors land in one region"
        )


# ---- the Method ------------------------------------------------------------------------------------------
class LBI(Method):
    """Latent Bounded Interfaces: wrap the model into regions (prepare), train by the scan backward (step)."""

    name: ClassVar[str] = "lbi"
    Config: ClassVar[type] = LBIConfig
    uses_autograd_step: ClassVar[bool] = False

    def prepare(self, model: nn.Module) -> LBIModel:
        if isinstance(model, LBIModel):
            return model
        for attr in ("embed", "blocks", "norm", "head", "cfg"):
            if not hasattr(model, attr):
                raise ConfigError(f"LBI wraps a chainfree LanguageModel; the model has no .{attr}")
        lbi = LBIModel(model, self.config)
        if self.config.check_separator:
            verify_separator(lbi)
            lbi.zero_grad(set_to_none=True)
        return lbi

    def step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        if not isinstance(model, LBIModel):
            raise ConfigError("LBI.step needs the model returned by LBI.prepare(model)")
        if self.config.backward == "autograd":
            loss = model(inputs, targets)
            loss.backward()
        else:
            loss = scan_backward(model, inputs, targets, self.config.jacobian)
        return StepStats(loss=float(loss.detach()), tokens=targets.numel())


def cost_breakdown(
    model: LBIModel, ids: torch.Tensor, targets: torch.Tensor, jacobian: str = "vjp", repeats: int = 3
) -> dict[str, Any]:
    """Per-region wall time of each phase of the scan backward (median over `repeats` after one warm-up).

    Phases: stem_forward, forward[k], jacobian[k] (regions 1..K-2), scan, vjp[k], stem_vjp. Grads are zeroed
    afterwards. Timings synchronise the device around every phase, so they add up to more than an
    unsynchronised step.
    """
    device = ids.device
    runs = []
    for _ in range(repeats + 1):
        timer = PhaseTimer(device)
        scan_backward(model, ids, targets, jacobian, timer)
        runs.append(timer.times)
    model.zero_grad(set_to_none=True)
    runs = runs[1:]
    out: dict[str, Any] = {}
    for phase in runs[0]:
        per_region = list(zip(*(r[phase] for r in runs), strict=True))
        out[phase] = [sorted(v)[len(v) // 2] for v in per_region]
    out["total"] = sum(sum(v) for v in out.values())
    return out
