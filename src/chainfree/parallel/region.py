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

Bytes: `CommLog` counts every byte this rank sends, by category. Point-to-point sends count their
payload; an all-reduce of P bytes counts 2 (W-1)/W P, the per-rank send volume of the ring algorithm
(what NCCL and gloo use for large messages). The paper's ≈56 KB counts the Jacobians only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chainfree.errors import ConfigError
from chainfree.methods.lbi import LBIConfig, LBIModel, accumulate_grads, region_jacobian_t

FORWARD = "forward_message"
FORWARD_CANVAS = "forward_canvas"
JACOBIAN = "scan_jacobian"
SEED = "scan_cotangent"
SHARED = "shared_grad_allreduce"
CANVAS = "canvas_cotangent"
BACKWARD_CATEGORIES = (JACOBIAN, SEED, SHARED, CANVAS)
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


# ---- local launcher (tests, single-machine benchmarks) ---------------------------------------------------
@dataclass
class RegionRunSpec:
    """A region-parallel run on one machine: tiny or full model, fixed batch, timed steps."""

    model: dict[str, Any]
    lbi: dict[str, Any]
    batch_size: int = 2
    seed: int = 0
    steps: int = 1
    warmup: int = 0
    backend: str = "gloo"
    dtype: str = "float64"  # 'float64' | 'float32' | 'bf16' (autocast on CUDA)
    out_dir: str = ""
    save_grads: bool = True
    shared: str = "allreduce"  # 'allreduce' | 'owner' (see region_parallel_step)


def build_replica(spec: RegionRunSpec, device: torch.device) -> LBIModel:
    """Identical replica on every rank: same seed, built on CPU, then moved."""
    from chainfree.config import ModelConfig
    from chainfree.models.lm import LanguageModel

    torch.manual_seed(spec.seed)
    lm = LanguageModel(ModelConfig(**spec.model))
    if spec.dtype == "float64":
        lm = lm.double()
    model = LBIModel(lm, LBIConfig(**spec.lbi))
    return model.to(device)


def make_batch(spec: RegionRunSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed + 1)
    v, t = spec.model["vocab_size"], spec.model["seq_len"]
    ids = torch.randint(0, v, (spec.batch_size, t + 1), generator=g)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def _worker(rank: int, world: int, port: int, spec: RegionRunSpec) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    use_cuda = spec.backend == "nccl"
    device = torch.device(f"cuda:{rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(spec.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = build_replica(spec, device)
        ids, targets = make_batch(spec, device)
        jac = spec.lbi.get("jacobian", "vjp")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda and spec.dtype == "bf16")
        walls, logs, phase = [], [], []
        for i in range(spec.warmup + spec.steps):
            model.zero_grad(set_to_none=True)
            log = CommLog()
            dist.barrier()
            if use_cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with autocast:
                res = region_parallel_step(model, ids, targets, jac, log, spec.shared)
            if use_cuda:
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
            if i >= spec.warmup:
                walls.append(wall)
                logs.append(dict(log.sent))
                phase.append(res["times"])
        wall_t = torch.tensor(walls, dtype=torch.float64, device=device)
        dist.all_reduce(wall_t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
        loss_t = torch.tensor([res["loss"] if rank == world - 1 else 0.0], dtype=torch.float64, device=device)
        dist.broadcast(loss_t, world - 1)  # bookkeeping, not part of the step
        if spec.out_dir:
            grads = {}
            if spec.save_grads:
                shared = shared_parameters(model) if spec.shared == "allreduce" or rank == world - 1 else []
                owned = {id(p) for p in owned_parameters(model, rank) + shared}
                grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if id(p) in owned}
            torch.save(
                {
                    "rank": rank,
                    "loss": float(loss_t),
                    "grads": grads,
                    "bytes_sent": logs[-1],
                    "backward_bytes": sum(logs[-1].get(c, 0) for c in BACKWARD_CATEGORIES),
                    "step_wall_s": wall_t.cpu().tolist(),
                    "phase_times": phase,
                },
                Path(spec.out_dir) / f"rank{rank}.pt",
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(spec: RegionRunSpec, world: int) -> list[dict[str, Any]]:
    """Run `world` ranks on this machine (torch.multiprocessing.spawn); returns each rank's record."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = dataclasses.replace(spec, out_dir=spec.out_dir or tmp)
        mp.spawn(_worker, args=(world, _free_port(), spec), nprocs=world, join=True)
        return [torch.load(Path(spec.out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
