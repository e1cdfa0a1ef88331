"""Region-parallel LBI: one region per rank over torch.distributed (NCCL on GPU, gloo on CPU).

Every rank holds a replica of the LBI model but computes, and owns the gradients of, only its region k.
One step (W = K ranks):
  forward   every rank embeds the batch (shared='allreduce') or receives the canvas from its owner
            (shared='owner'); rank 0 computes m_0; rank k receives m_k [B, C, r] from rank k-1, runs its
            region and sends m_{k+1} on (a chain: a region cannot start before its message arrives).
  seed      rank K-1 computes the loss and lambda_{K-1} = dL/dm_{K-1} first (one input-only VJP), so the scan
            can start while it computes its parameter gradients.
  Jacobian  ranks 1..K-2 compute A_k = J_kᵀ right after sending their message, i.e. while the later ranks
            are still running their forward (the wait would otherwise be idle).
  scan      a Hillis–Steele suffix scan *across ranks*: ceil(log2 K) rounds; in the round with offset d
            rank k sends its partial composition to rank k-d. Rank 0's element is the identity (its
            Jacobian is never needed), so rank 0 ends with lambda_1; every other rank ends with lambda_k
            and hands it one rank down (one more hop) so that rank k-1 gets its cotangent lambda_k.
            A partial composition that already contains the seed map has A = 0 (only b travels); one
            that does not has b = 0 (only A travels) -- so each message is either an n x n block or an
            n-vector per sample (n = C r; per token n = r for the token interface).
  VJP       every rank: one VJP of its region with cotangent lambda_{k+1}, all ranks at once.
  shared    the token embedding (read by every region through the canvas; tied to the head) gets
            contributions on every rank: either one all-reduce of its gradient (shared='allreduce', V x d),
            or the last rank owns it, sends the canvas in the forward and collects the canvas
            cotangents [B, T, d] in the backward (shared='owner'; fewer bytes whenever B T < V).

Training (`chainfree train` under torchrun, strategy 'lbi_region' = `RegionParallel`): every rank draws the
whole batch and runs the step above; afterwards one all-reduce of the region gradients (each non-zero on
its owner only) gives every rank the full gradient, so the replicas take identical optimizer steps and
clipping, evaluation and checkpoints work unchanged. That sync sends as many bytes as data parallelism's
gradient all-reduce (category `replica_sync`, not a part of the LBI backward); the bare step, as measured
by `spawn_local` and chainfree.bench.lbi, leaves each region's gradient on its owner only.

Bytes: `CommLog` counts every byte this rank sends, by category. Point-to-point sends count their
payload; an all-reduce of P bytes counts 2 (W-1)/W P, the per-rank send volume of the ring algorithm
(what NCCL and gloo use for large messages). The paper's ≈56 KB counts the Jacobians only.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from chainfree.errors import ConfigError
from chainfree.models.lbi import LBIModel, accumulate_grads, region_jacobian_t

FORWARD = "forward_message"
FORWARD_CANVAS = "forward_canvas"
JACOBIAN = "scan_jacobian"
SEED = "scan_cotangent"
SHARED = "shared_grad_allreduce"
CANVAS = "canvas_cotangent"
BACKWARD_CATEGORIES = (JACOBIAN, SEED, SHARED, CANVAS)
REPLICA_SYNC = "replica_sync"
SHARED_MODES = ("allreduce", "owner")


class CommLog:
    """Wraps the torch.distributed calls of a step and counts the bytes this rank sends, by category."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = defaultdict(int)
        self.messages: dict[str, int] = defaultdict(int)
        self._inflight: list[torch.Tensor] = []  # keep sent buffers alive until the step ends

    def isend(self, tensor: torch.Tensor, dst: int, category: str) -> dist.Work:
        tensor = tensor.contiguous()
        self.sent[category] += tensor.numel() * tensor.element_size()
        self.messages[category] += 1
        self._inflight.append(tensor)
        return dist.isend(tensor, dst)

    @staticmethod
    def recv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buf, src)
        return buf

    def all_reduce(self, tensor: torch.Tensor, category: str) -> None:
        world = dist.get_world_size()
        self.sent[category] += int(2 * (world - 1) / world * tensor.numel() * tensor.element_size())
        self.messages[category] += 1
        dist.all_reduce(tensor)

    def backward_bytes(self) -> int:
        return sum(self.sent[c] for c in BACKWARD_CATEGORIES)


def shared_parameters(model: LBIModel) -> list[torch.nn.Parameter]:
    """Parameters every rank reads: the embedding (canvas), including a head weight tied to it."""
    return list({id(p): p for p in model.lm.embed.parameters()}.values())


def owned_parameters(model: LBIModel, rank: int) -> list[torch.nn.Parameter]:
    """Parameters whose gradient only `rank` computes: its region's, plus the message encoder on rank 0."""
    shared = {id(p) for p in shared_parameters(model)}
    params = model.region_parameters(rank) + (list(model.enc_in.parameters()) if rank == 0 else [])
    return [p for p in params if id(p) not in shared]


def _distributed_suffix_scan(
    a: torch.Tensor | None, b: torch.Tensor | None, a_shape, b_shape, dtype, device, log: CommLog
) -> torch.Tensor:
    """Inclusive Hillis–Steele suffix scan over ranks. Rank 0's element is the identity (a=None, b=None
    with `identity`), the last rank's is the constant seed map (a=None meaning 0, b=seed), the others'
    (A_k, b=None meaning 0). Returns the b part of this rank's suffix composition."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ends = list(range(1, world + 1))  # coverage of each rank's partial composition: [k, ends[k])
    identity = rank == 0
    offset = 1
    while offset < world:
        req = None
        if rank - offset >= 0:  # send my current composition down
            payload = b if ends[rank] == world else a
            req = log.isend(payload, rank - offset, JACOBIAN if ends[rank] < world else SEED)
        if rank + offset < world:  # receive and compose: mine ∘ theirs
            covers_seed = ends[rank + offset] == world
            got = log.recv(b_shape if covers_seed else a_shape, dtype, device, rank + offset)
            a_in, b_in = (None, got) if covers_seed else (got, None)
            if identity:
                a, b = a_in, b_in
                identity = False
            elif b_in is not None:  # theirs contains the seed: A_theirs = 0, b_mine = 0
                b = (a @ b_in.unsqueeze(-1)).squeeze(-1)
                a = None
            else:
                a = a @ a_in
        if req is not None:
            req.wait()
        ends = [ends[k + offset] if k + offset < world else ends[k] for k in range(world)]
        offset *= 2
    return b


def region_parallel_step(
    model: LBIModel,
    ids: torch.Tensor,
    targets: torch.Tensor,
    jacobian: str = "vjp",
    log: CommLog | None = None,
    shared: str = "allreduce",
) -> dict[str, Any]:
    """One region-parallel LBI step on this rank; fills `.grad` of owned and shared parameters (accumulating).

    shared='allreduce': every rank embeds the batch itself and the embedding gradient is all-reduced (every
    rank ends with it: replicas stay in sync). shared='owner': the last rank owns the embedding (and the
    tied head), sends the canvas [B, T, d] to the others in the forward and receives their canvas cotangents
    in the backward -- B T d per rank instead of an all-reduce of V d; only the owner gets its gradient.

    Returns {'loss' (on the last rank, NaN elsewhere), 'times' (seconds per phase on this rank)}.
    """
    log = log if log is not None else CommLog()
    rank, world = dist.get_rank(), dist.get_world_size()
    k_total = model.n_regions
    if shared not in SHARED_MODES:
        raise ConfigError(f"shared must be one of {SHARED_MODES}, got {shared!r}")
    if world != k_total:
        raise ConfigError(
            f"region-parallel LBI runs one region per rank: world size {world} != {k_total} regions; set "
            f"method.region_size = n_layers / world_size"
        )
    device = ids.device
    last = rank == k_total - 1
    token_local = model.interface == "token"
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - clock
        clock = now

    b_sz, t_len = ids.shape
    msg_shape = (b_sz, model.n_chunks(t_len), model.rank)
    msg_dtype = model.msg_norm[0].weight.dtype if k_total > 1 else model.lm.embed.weight.dtype
    owner = k_total - 1  # shared='owner': the last rank (it also holds the tied head) owns the embedding
    canvas = canvas_reqs = None
    if shared == "allreduce" or rank == owner:
        canvas = model.canvas(ids)
        if shared == "owner":
            canvas_reqs = [log.isend(canvas.detach(), r, FORWARD_CANVAS) for r in range(k_total) if r != owner]
        canvas_leaf = canvas.detach().requires_grad_(True)
    else:
        emb = model.lm.embed.weight
        canvas_leaf = log.recv((b_sz, t_len, emb.shape[1]), emb.dtype, device, owner).requires_grad_(True)
    m0 = None
    if rank == 0:
        m0 = model.first_message(canvas if shared == "allreduce" else canvas_leaf)
        m = m0.detach()
    else:
        m = log.recv(msg_shape, msg_dtype, device, rank - 1)
    lap("wait_and_stem")
    m_in = m.detach().requires_grad_(True)
    out = model.region(rank, m_in, canvas_leaf)
    send_req = None
    if not last:
        send_req = log.isend(out.detach().to(msg_dtype), rank + 1, FORWARD)
    lap("forward")

    scan_dtype = torch.promote_types(msg_dtype, torch.float32)
    n = model.rank if token_local else msg_shape[1] * model.rank
    batch_shape = (b_sz, t_len) if token_local else (b_sz,)
    a_shape, b_shape = (*batch_shape, n, n), (*batch_shape, n)
    a = b = None
    loss = None
    if last:
        loss = model.head_loss(out, targets)
        (seed,) = torch.autograd.grad(loss, m_in, retain_graph=True)
        b = seed.to(scan_dtype).reshape(b_shape)
        lap("seed")
    elif rank > 0:
        a = region_jacobian_t(model, rank, m_in, out, canvas_leaf, jacobian).to(scan_dtype)
        lap("jacobian")
    lam_here = _distributed_suffix_scan(a, b, a_shape, b_shape, scan_dtype, device, log)
    # shift: rank k (2..K-1) hands lambda_k to rank k-1; rank 0 already holds lambda_1
    cot = lam_here if rank == 0 else None
    req = None
    if rank >= 2:
        req = log.isend(lam_here, rank - 1, SEED)
    if 1 <= rank <= k_total - 2:
        cot = log.recv(b_shape, scan_dtype, device, rank + 1)
    if req is not None:
        req.wait()
    lap("scan")

    shared_params = shared_parameters(model)
    shared_ids = {id(p) for p in shared_params}
    region_params = [p for p in model.region_parameters(rank) if id(p) not in shared_ids]
    shared_in_region = [p for p in model.region_parameters(rank) if id(p) in shared_ids]
    wrt = [*region_params, *shared_in_region, canvas_leaf] + ([m_in] if rank == 0 else [])
    if last:
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    else:
        grads = torch.autograd.grad(out, wrt, cot.view(msg_shape).to(out.dtype), allow_unused=True)
    n_reg, n_sh = len(region_params), len(shared_in_region)
    accumulate_grads(region_params, grads[:n_reg])
    local_shared = {id(p): g for p, g in zip(shared_in_region, grads[n_reg : n_reg + n_sh], strict=True)}
    canvas_cot = grads[n_reg + n_sh]
    if canvas_cot is None:
        canvas_cot = torch.zeros_like(canvas_leaf)
    enc_in = list(model.enc_in.parameters()) if rank == 0 else []
    if rank == 0 and shared == "owner":  # m_0 was computed from the received canvas: its cotangent joins it
        g = torch.autograd.grad(m0, [*enc_in, canvas_leaf], grads[-1].to(m0.dtype), allow_unused=True)
        accumulate_grads(enc_in, g[:-1])
        canvas_cot = canvas_cot + g[-1]
        enc_in = []
    if shared == "owner" and rank != owner:
        req = log.isend(canvas_cot.to(canvas_leaf.dtype), owner, CANVAS)
        lap("vjp")
        req.wait()
        if send_req is not None:
            send_req.wait()
        lap("canvas_send")
        return {"loss": math.nan, "times": times}
    if shared == "owner":  # owner: add every rank's canvas cotangent before the embedding backward
        for r in range(k_total):
            if r != owner:
                canvas_cot = canvas_cot + log.recv(tuple(canvas_leaf.shape), canvas_leaf.dtype, device, r)
    roots, cots = [canvas], [canvas_cot]
    stem = [*shared_params, *enc_in]
    if enc_in:
        roots.append(m0)
        cots.append(grads[-1].to(m0.dtype))
    stem_grads = torch.autograd.grad(roots, stem, cots, allow_unused=True)
    accumulate_grads(enc_in, stem_grads[len(shared_params) :])
    lap("vjp")
    flat = []
    for p, g in zip(shared_params, stem_grads[: len(shared_params)], strict=True):
        total = torch.zeros_like(p) if g is None else g.detach().clone()
        if local_shared.get(id(p)) is not None:
            total += local_shared[id(p)]
        flat.append(total.reshape(-1))
    buf = torch.cat(flat)
    if shared == "allreduce":  # embedding / tied head: sum every rank's contribution in one all-reduce
        log.all_reduce(buf, SHARED)
    offset = 0
    for p in shared_params:
        accumulate_grads([p], (buf[offset : offset + p.numel()].view_as(p),))
        offset += p.numel()
    for req in [send_req, *(canvas_reqs or [])]:
        if req is not None:
            req.wait()
    lap("shared_grads")
    return {"loss": float(loss.detach()) if loss is not None else math.nan, "times": times}


# ---- the training strategy -------------------------------------------------------------------------------
class RegionParallelModel(nn.Module):
    """What `LBI.step` receives under the 'lbi_region' strategy: the LBI model plus its region-parallel
    step (LBI.step calls `region_parallel_step` when the module has one)."""

    def __init__(self, model: LBIModel, shared: str = "allreduce") -> None:
        super().__init__()
        self.model, self.shared = model, shared
        self.log = CommLog()  # bytes of the last step
        self.times: dict[str, float] = {}

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(ids, targets)

    def region_parallel_step(self, ids: torch.Tensor, targets: torch.Tensor, jacobian: str) -> float:
        """One region-parallel step; returns the batch loss on every rank (computed on the last rank)."""
        self.log = CommLog()
        res = region_parallel_step(self.model, ids, targets, jacobian, self.log, self.shared)
        self.times = res["times"]
        loss = torch.tensor([res["loss"]], dtype=torch.float64, device=ids.device)
        dist.broadcast(loss, src=dist.get_world_size() - 1)  # bookkeeping: every rank reports the loss
        return float(loss)


def sync_region_gradients(model: LBIModel, log: CommLog | None = None) -> None:
    """After a region-parallel step: give every rank every region's gradient (one summed all-reduce; each
    region's gradient is non-zero on its owner only; the shared embedding's is already identical on every
    rank). A gradient absent on every rank stays absent, as in one process."""
    shared = {id(p) for p in shared_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in shared]
    if not params:
        return
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    params = [p for p, has in zip(params, present.tolist(), strict=True) if has]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for dtype in sorted({p.grad.dtype for p in params}, key=str):  # same order on every rank
        same = [p.grad for p in params if p.grad.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        if log is not None:
            log.all_reduce(flat, REPLICA_SYNC)
        else:
            dist.all_reduce(flat)
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class RegionParallel:
    """Distribution strategy 'lbi_region' (chainfree.training.strategies protocol): one LBI region per rank
    (world size = number of regions), every rank on the whole global batch; see the module docstring."""

    name = "lbi_region"

    def __init__(self, launch: Any) -> None:
        self.launch = launch
        self._step_model: RegionParallelModel | None = None

    def batch_shard(self) -> tuple[int, int]:
        return (0, 1)

    def wrap(self, model: nn.Module, method: Any, device: torch.device) -> nn.Module:
        if not isinstance(model, LBIModel):
            raise ConfigError("train.strategy='lbi_region' trains an LBI model: use method lbi")
        if getattr(method.config, "backward", "scan") != "scan":
            raise ConfigError("train.strategy='lbi_region' runs the scan backward: set method.backward='scan'")
        world = self.launch.world_size
        if world != model.n_regions:
            raise ConfigError(
                f"region-parallel LBI runs one region per rank: {world} processes but {model.n_regions} regions; "
                f"set method.region_size = model.n_layers / {world}"
            )
        self._step_model = RegionParallelModel(model)
        return self._step_model

    def accumulating(self, step_model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def finish_gradients(self, model: nn.Module, method: Any) -> None:
        log = self._step_model.log if self._step_model is not None else None
        sync_region_gradients(model, log)  # type: ignore[arg-type]

    def mean(self, value: float, device: torch.device) -> float:
        return value  # the last rank's loss, broadcast by the step

    def checkpoint_views(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return model, optimizer
