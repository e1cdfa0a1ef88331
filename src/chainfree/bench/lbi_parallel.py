"""Region-parallel LBI on one machine: `spawn_local` starts one process per region (gloo on CPU, NCCL on
GPUs), runs timed region-parallel steps (chainfree.parallel.region.region_parallel_step: the LBI step
alone, no optimizer) on a fixed batch, and returns per rank the loss, the gradients of what the rank owns,
the bytes it sent by category and the step's wall time. Tests check the gradients against one process;
chainfree.bench.lbi times it against dense backprop and single-device LBI.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chainfree.methods.lbi import LBIConfig
from chainfree.models.lbi import LBIModel
from chainfree.parallel.region import (
    BACKWARD_CATEGORIES,
    CommLog,
    owned_parameters,
    region_parallel_step,
    shared_parameters,
)


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


def init_local_rank(rank: int, world: int, port: int, backend: str) -> torch.device:
    """Set up one rank of a job spawned on this machine: cuda:<rank> under nccl (NVLink multicast off),
    else the CPU; joins the process group at 127.0.0.1:<port>. Returns the rank's device."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return device


def _worker(rank: int, world: int, port: int, spec: RegionRunSpec) -> None:
    device = init_local_rank(rank, world, port, spec.backend)
    use_cuda = device.type == "cuda"
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(spec: RegionRunSpec, world: int) -> list[dict[str, Any]]:
    """Run `world` ranks on this machine (torch.multiprocessing.spawn); returns each rank's record."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = dataclasses.replace(spec, out_dir=spec.out_dir or tmp)
        mp.spawn(_worker, args=(world, free_port(), spec), nprocs=world, join=True)
        return [torch.load(Path(spec.out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
