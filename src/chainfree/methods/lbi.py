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
backward), 'loop' (n plain VJPs), 'prefix' (causal_chunk: 'replicate' on causal prefixes, output chunk c
from the first c+1 chunks; no vmap). With torch.compile'd blocks 'vjp' and 'prefix' run as 'loop' (a compiled
backward cannot be vmapped; prefix shapes would recompile each block per shape), with a warning.
n = C r (causal_chunk), r (paper_leaky, token). Only regions 1..K-2 need one: region K-1 supplies the seed
lambda_{K-1} by its VJP, region 0's VJP yields lambda_0 for the stem.
Memory: unless `jacobian_chunk` > 0, the n directions run in passes sized to `jacobian_memory` GiB (0 = half
the free device memory / available RAM), at the activation bytes measured on each region's forward.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from chainfree.errors import ConfigError
from chainfree.methods.base import Launch, Method, StepStats
from chainfree.models.lbi import (
    INTERFACES,
    JACOBIANS,
    LBIModel,
    RegionMemoryProbe,
    accumulate_grads,
    check_compiled_region,
    region_jacobian_t,
)
from chainfree.ops.scan import adjoints

BACKWARDS = ("scan", "autograd")


@dataclass
class LBIConfig:
    """`method.<key>` settings of LBI."""

    region_size: int = 2  # blocks per region; K = n_layers / region_size
    rank: int = 16  # r, width of the latent interface
    interface: str = "causal_chunk"  # 'causal_chunk' (C1) | 'token' (C2) | 'paper_leaky' (authors', not causal)
    n_chunks: int = 4  # C for causal_chunk (ignored when chunk_len > 0)
    chunk_len: int = 0  # > 0: C = seq_len / chunk_len
    jacobian: str = "vjp"  # 'vjp' | 'jvp' | 'replicate' | 'loop' | 'prefix' (replicate on causal prefixes)
    jacobian_chunk: int = 0  # > 0: at most this many Jacobian directions per pass; 0 = as many as fit memory
    # GiB the Jacobian passes may use (directions per pass = this / one direction's measured activation bytes);
    # 0 = auto: half of the free device memory (CUDA) or of the available RAM (CPU) at Jacobian time
    jacobian_memory: float = 0.0
    backward: str = "scan"  # 'scan' (Jacobians + suffix scan + per-region VJPs) | 'autograd' (same grads)
    alpha_init: float = 0.5  # tanh(alpha) gates each region's message update (authors' init 0.5)
    check_separator: bool = True  # prepare() walks the autograd graph of a probe batch (see verify_separator)
    # under torchrun: 'data' (each rank trains the whole LBI model on its batch shard, gradients averaged) or
    # 'region' (one region per rank, chainfree.parallel.region; needs world size = number of regions)
    distributed: str = "data"

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
        need(self.distributed in ("data", "region"), "distributed",
             f"must be 'data' or 'region', got {self.distributed!r}")
        need(self.jacobian_chunk >= 0, "jacobian_chunk", f"must be >= 0 (0 = fit memory), got {self.jacobian_chunk}")
        need(self.jacobian_memory >= 0, "jacobian_memory", f"must be >= 0 GiB (0 = auto), got {self.jacobian_memory}")


# ---- the scan backward -----------------------------------------------------------------------------------
def _as_scan_vector(lam: torch.Tensor, token_local: bool) -> torch.Tensor:
    return lam if token_local else lam.reshape(lam.shape[0], -1)


def scan_backward(
    model: LBIModel, ids: torch.Tensor, targets: torch.Tensor, jacobian: str = "vjp", timer: Any = None
) -> torch.Tensor:
    """One LBI step: forward region by region, seed, Jacobians, suffix scan, per-region VJPs, stem backward.

    Fills `.grad` (accumulating) with exactly the gradients `model(ids, targets).backward()` would give.
    Returns the loss (detached). `timer(phase, k)`, a context manager per phase and region (e.g.
    chainfree.bench.lbi.PhaseTimer), times stem_forward/forward/jacobian/scan/vjp/stem_vjp.
    """
    timer = timer or (lambda phase, k: nullcontext())
    k_total = model.n_regions
    for k in range(1, k_total - 1):  # refuse wrongly compiled regions before running (and compiling) anything
        if jacobian in ("vjp", "loop"):
            check_compiled_region(model, k)
    token_local = model.interface == "token"
    with timer("stem_forward", 0):
        canvas = model.canvas(ids)
        canvas_leaf = canvas.detach().requires_grad_(True)  # regions' canvas cotangents collect here
        m0 = model.first_message(canvas)
    m_ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    probes: list[RegionMemoryProbe] = []
    m = m0.detach()
    for k in range(k_total):
        with timer("forward", k):
            m_in = m.detach().requires_grad_(True)
            # middle regions: measure what their graph holds, the memory one Jacobian direction costs
            probe = RegionMemoryProbe(
                canvas.device,
                enabled=0 < k < k_total - 1 and not model.config.jacobian_chunk
                and (canvas.device.type == "cuda" or not model.compiled_modules(k)),
            )
            with probe:
                out = model.region(k, m_in, canvas_leaf)
            probes.append(probe)
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
            mats.append(region_jacobian_t(model, k, m_ins[k], outs[k], canvas_leaf, jacobian, probes[k].bytes))
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

    def strategy(self, launch: Launch) -> str:
        """method.distributed='region' under torchrun: one region per rank ('lbi_region'); else data parallel."""
        if launch.distributed and self.config.distributed == "region":
            return "lbi_region"
        return super().strategy(launch)

    def step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        parallel_step = getattr(model, "region_parallel_step", None)
        if parallel_step is not None:  # the 'lbi_region' strategy's module (chainfree.parallel.region)
            return StepStats(loss=parallel_step(inputs, targets, self.config.jacobian), tokens=targets.numel())
        if not isinstance(model, LBIModel):
            raise ConfigError("LBI.step needs the model returned by LBI.prepare(model)")
        if self.config.backward == "autograd":
            loss = model(inputs, targets)
            loss.backward()
        else:
            loss = scan_backward(model, inputs, targets, self.config.jacobian)
        return StepStats(loss=float(loss.detach()), tokens=targets.numel())
