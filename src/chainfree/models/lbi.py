"""LBIModel: a LanguageModel rewired into K regions that talk only through a narrow latent interface.

The training step (scan backward, exact for this model) is chainfree.methods.lbi; region-parallel execution
over torch.distributed is chainfree.parallel.region. This module holds the architecture (regions, message
encoders/decoders, the three interfaces) and the per-region Jacobians both of them need. The interfaces and
the equations are described in chainfree.methods.lbi and docs/lbi.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from chainfree.errors import ConfigError, warn_once

INTERFACES = ("causal_chunk", "token", "paper_leaky")
JACOBIANS = ("vjp", "jvp", "replicate", "loop", "prefix")


class RegionSpec(Protocol):
    """The region structure (chainfree.methods.lbi.LBIConfig provides it)."""

    region_size: int
    rank: int
    interface: str
    n_chunks: int
    chunk_len: int
    jacobian_chunk: int
    alpha_init: float
    # (optional) jacobian_memory: float, GiB for the Jacobian passes' directions; 0 = auto (read by getattr)

    def validate(self) -> None: ...


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

    def __init__(self, lm: nn.Module, config: RegionSpec) -> None:
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

    def generation_model(self) -> nn.Module:
        """The model `chainfree generate` samples from: this LBI model (its forward differs from the wrapped
        LanguageModel's), sampled by re-running the causal forward over the window. The 'paper_leaky'
        interface pools over the whole sequence, so a position sees later tokens: it cannot generate."""
        if self.interface == "paper_leaky":
            raise ConfigError(
                "this LBI run uses method.interface='paper_leaky', whose message pools over the whole sequence "
                "(future tokens included), so it cannot generate; train with interface 'causal_chunk' or 'token'"
            )
        return self

    @property
    def retains_block_graphs(self) -> bool:
        """True when the scan backward differentiates a region's forward graph more than once: 'vjp' and
        'loop' take the Jacobian rows from it (retain_graph=True) and then the parameter VJP ('prefix' too once
        its blocks are compiled: it then runs as 'loop'). Read by
        chainfree.training.options.compile_model, which then compiles the blocks with AOTAutograd's donated
        buffers off (a compiled backward with donated buffers frees its saved tensors after one use)."""
        return (
            getattr(self.config, "backward", "scan") == "scan"
            and getattr(self.config, "jacobian", "vjp") in ("vjp", "loop", "prefix")
            and self.n_regions > 2
        )

    def compiled_modules(self, k: int) -> list[nn.Module]:
        """The modules of region k that run torch.compile'd (``nn.Module.compile``)."""
        return [m for mod in self.region_modules(k) for m in mod.modules()
                if getattr(m, "_compiled_call_impl", None) is not None]

    @property
    def max_context(self) -> int:
        """Longest sequence the forward accepts (model.seq_len)."""
        return self.lm.cfg.seq_len

    @property
    def pad_to_context(self) -> bool:
        """causal_chunk cuts the sequence into chunks of seq_len / n_chunks: generation pads the window to the
        full length (the forward is causal, so padding after the last real token changes nothing before it)."""
        return self.interface == "causal_chunk"


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


def check_compiled_region(model: LBIModel, k: int) -> None:
    """Refuse region k if a torch.compile'd module in it was not compiled with donated buffers off (by
    chainfree.training.options.compile_model, which reads `retains_block_graphs` and marks the modules): a
    retain_graph backward through such a graph would run on freed buffers."""
    other = sorted({type(m).__name__ for m in model.compiled_modules(k)
                    if not getattr(m, "_chainfree_keeps_saved_tensors", False)})
    if other:
        raise ConfigError(
            f"LBI region {k} has torch.compile'd modules ({', '.join(other)}) not compiled with donated buffers "
            "off, but its Jacobian backpropagates through them twice; compile with train.compile=true "
            "(chainfree.training.options.compile_model) after LBI.prepare, or use method.jacobian='replicate'"
        )


def retaining_compiled_graphs(model: LBIModel, k: int) -> AbstractContextManager[None]:
    """Context for the retain_graph=True VJPs through region k's compiled modules. AOTAutograd checks
    torch._functorch.config.donated_buffer again at backward time and refuses any retain_graph backward
    while it is on (even for a graph compiled with donation off), so it is switched off around these
    VJPs only, after `check_compiled_region` has made sure the graphs really kept their saved tensors."""
    check_compiled_region(model, k)
    import torch._functorch.config as functorch_config

    return functorch_config.patch(donated_buffer=False)


# Why 'vjp' and 'prefix' run as 'loop' on torch.compile'd blocks (each said once per process)
_AS_LOOP_WHY = {
    "vjp": "LBI method.jacobian='vjp' with torch.compile'd blocks (train.compile=true): a compiled backward "
    "cannot be vmapped (is_grads_batched), so the Jacobian VJPs run one direction at a time, as "
    "jacobian='loop' (same numbers, n sequential backward passes per region); set method.jacobian to "
    "'loop', 'replicate' or 'jvp' to choose explicitly",
    "prefix": "LBI method.jacobian='prefix' with torch.compile'd blocks (train.compile=true): the prefix passes "
    "run each block on n_chunks lengths and several batch sizes, and blocks compiled for fixed shapes "
    "recompile for every one (past torch's recompile limit, and with the memory of each compilation); "
    "the Jacobian VJPs run one direction at a time on the forward graph instead, as jacobian='loop' "
    "(same numbers); set method.jacobian='loop' to silence this, or train.compile=false to use 'prefix'",
}


# ---- bounding the memory of the Jacobian passes ------------------------------------------------------------
# A batched VJP (or replicate / jvp pass) over s directions holds about s copies of the region's activation
# gradients at once: without a bound, n = C r = 64 directions through a Mamba-2 region at batch 32 x 1024 took
# 118 GB on a 140 GB H200 and ran out of memory. So the directions go in passes of `auto_jacobian_chunk`.
_FREE_FRACTION = 0.5  # of free device memory (CUDA) / available RAM (CPU) given to the Jacobian passes
_GUESS_FACTOR = 24  # without a measurement: activation bytes per region ~ 24 x canvas bytes per block (rough)


def jacobian_budget_bytes(model: LBIModel, device: torch.device) -> int:
    """Bytes the Jacobian passes may use: method.jacobian_memory GiB if > 0, else half of what is free now
    (torch.cuda.mem_get_info on CUDA; available physical RAM on CPU), after the forward graphs exist."""
    gib = float(getattr(model.config, "jacobian_memory", 0.0) or 0.0)
    if gib > 0:
        return int(gib * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks cached by PyTorch's allocator are free to it too
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(_FREE_FRACTION * free)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 * 2**30
    return int(_FREE_FRACTION * avail)


def estimate_direction_bytes(model: LBIModel, canvas: torch.Tensor) -> int:
    """A rough guess of one direction's memory when none was measured: `_GUESS_FACTOR` canvas-sized tensors
    per block of the region (attention/MLP/SSM intermediates are a few times d wide)."""
    return _GUESS_FACTOR * model.config.region_size * canvas.numel() * canvas.element_size()


def auto_jacobian_chunk(model: LBIModel, n: int, bytes_per_direction: int, device: torch.device) -> int:
    """Directions per Jacobian pass, in [1, n]: as many as fit the budget at `bytes_per_direction` each."""
    budget = jacobian_budget_bytes(model, device)
    return max(1, min(n, budget // max(1, int(bytes_per_direction))))


class RegionMemoryProbe:
    """Context manager measuring the bytes a region's forward keeps for its backward (the activations one
    Jacobian direction's VJP walks back through): on CUDA the allocator's growth over the forward, elsewhere
    the distinct storages packed by autograd's saved-tensor hooks (parameters excluded). `.bytes` after exit.
    torch.compile'd regions on CPU are not probed (saved-tensor hooks would reach into their graphs);
    `.bytes` stays None and the caller falls back to `estimate_direction_bytes`."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device = device
        self.enabled = enabled
        self.bytes: int | None = None
        self._seen: dict[int, int] = {}
        self._hooks: AbstractContextManager[None] | None = None
        self._start = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not (isinstance(t, nn.Parameter) or (t.is_leaf and t.requires_grad)):
            st = t.untyped_storage()
            self._seen[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self) -> RegionMemoryProbe:
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            self.bytes = max(0, torch.cuda.memory_allocated(self.device) - self._start)
        else:
            assert self._hooks is not None
            self._hooks.__exit__(*exc)
            self.bytes = sum(self._seen.values())


def region_jacobian_t(
    model: LBIModel,
    k: int,
    m_in: torch.Tensor,
    m_out: torch.Tensor | None,
    canvas: torch.Tensor,
    how: str,
    bytes_per_direction: int | None = None,
) -> torch.Tensor:
    """A_k = (dm_{k+1}/dm_k)ᵀ per sample ([B, C r, C r]) or per token ([B, T, r, r] for `token`).

    m_in is the leaf the region was run on; m_out its output with the graph attached (needed by 'vjp' and
    'loop', which differentiate that graph again and keep it for the region's parameter VJP).
    `bytes_per_direction`: what one Jacobian direction costs in memory (the region's activation bytes,
    measured by `RegionMemoryProbe`); without it `estimate_direction_bytes` guesses. With
    method.jacobian_chunk = 0 the directions are split into passes that fit `jacobian_budget_bytes`.
    """
    token_local = model.interface == "token"
    n = m_in.shape[-1] if token_local else m_in.shape[1] * m_in.shape[2]
    basis = _basis(n, m_in, token_local)
    # directions per pass: bounds the memory of vjp/replicate/jvp (explicit jacobian_chunk, else a budget)
    step = model.config.jacobian_chunk or auto_jacobian_chunk(
        model, n, bytes_per_direction if bytes_per_direction is not None else estimate_direction_bytes(model, canvas),
        canvas.device,
    )
    pieces = [basis[i : i + step] for i in range(0, n, step)]
    compiled = how in ("vjp", "loop", "prefix") and bool(model.compiled_modules(k))
    if how in _AS_LOOP_WHY and compiled:
        # vjp: is_grads_batched vmaps the backward, and a compiled block's backward (inductor kernels) cannot
        # run on vmap's batched tensors. prefix: it re-runs the region on C truncated lengths x (one or two)
        # replicated batch sizes, each a new shape for blocks compiled with dynamic=False (a recompilation per
        # shape and block class). Both: the same VJPs on the forward graph, one direction at a time (= 'loop')
        warn_once(f"lbi-{how}-as-loop", _AS_LOOP_WHY[how], UserWarning)
        how = "loop"
    if how == "vjp":
        rows = [
            torch.autograd.grad(m_out, m_in, e.to(m_out.dtype), retain_graph=True, is_grads_batched=True)[0]
            for e in pieces
        ]
        return _transpose_rows(torch.cat(rows), token_local)
    if how == "loop":
        with retaining_compiled_graphs(model, k) if compiled else nullcontext():
            rows = [torch.autograd.grad(m_out, m_in, e.to(m_out.dtype), retain_graph=True)[0] for e in basis]
        return _transpose_rows(torch.stack(rows), token_local)
    canvas = canvas.detach()
    if how == "prefix" and model.interface == "causal_chunk":
        return _prefix_jacobian_t(model, k, m_in, canvas, step)
    if how in ("replicate", "prefix"):  # prefix without chunks (paper_leaky, token): plain replicate
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
    raise ValueError(f"jacobian must be one of {JACOBIANS}, got {how!r}")


def _prefix_jacobian_t(model: LBIModel, k: int, m_in: torch.Tensor, canvas: torch.Tensor, step: int) -> torch.Tensor:
    """'prefix' Jacobian of a causal_chunk region: the rows of output chunk c depend only on the tokens of
    chunks <= c (causal blocks, prefix means, shifted messages), so they come from re-running the region on
    the first (c+1) T/C tokens only, the batch replicated once per direction (as 'replicate'), and one
    input-only backward. Work: sum over c of (c+1)/C = (C+1)/2 full-length passes of r directions, instead of
    C for 'replicate' or for 'vjp' on the full-length graph; and no vmap (whose batched backward runs
    LayerNorm, GELU, SiLU and SDPA backward one direction at a time and stacks the results). Same numbers:
    the truncated run computes the same m_{k+1}[0..c] (tested in float64)."""
    b, c, r = m_in.shape
    tc = canvas.shape[1] // c
    m0 = m_in.detach()
    a = m0.new_zeros(b, c * r, c * r)  # A[b, input coordinate, output coordinate] = J[b, out, in]
    eye = torch.eye(r, device=m0.device, dtype=m0.dtype)
    for cp in range(c):
        m_p, canvas_p = m0[:, : cp + 1], canvas[:, : (cp + 1) * tc]
        for j0 in range(0, r, step):
            s = min(step, r - j0)
            m_rep = m_p.repeat(s, 1, 1).requires_grad_(True)
            out = model.region(k, m_rep, canvas_p.repeat(s, 1, 1))
            cot = torch.zeros(s, b, cp + 1, r, device=out.device, dtype=out.dtype)
            cot[:, :, cp, :] = eye[j0 : j0 + s].to(out.dtype).unsqueeze(1)
            (g,) = torch.autograd.grad(out, m_rep, cot.view_as(out))
            rows = g.reshape(s, b, (cp + 1) * r).permute(1, 2, 0)
            a[:, : (cp + 1) * r, cp * r + j0 : cp * r + j0 + s] = rows.to(a.dtype)
    return a


def accumulate_grads(params: list[torch.Tensor], grads: tuple[torch.Tensor | None, ...]) -> None:
    """Add into .grad like loss.backward() does (a tied parameter receives several contributions)."""
    for p, g in zip(params, grads, strict=True):
        if g is None or not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = g.detach().to(p.dtype).clone()
        else:
            p.grad.add_(g.detach().to(p.dtype))
