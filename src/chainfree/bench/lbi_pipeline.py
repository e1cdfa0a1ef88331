"""Region-parallel LBI against pipeline parallelism and data parallelism on the same ranks.

    python -m chainfree.bench.lbi_pipeline --out DIR [--preset tiny|gpt-50m|mamba2-50m] [--world 2]
        [--rank 16] [--microbatches 8] [--steps 5] [--warmup 2]

Modes, all on one model configuration and one global batch, one process per rank (NCCL on GPUs, gloo on
CPU), timed in interleaved rounds (every round runs every mode once per step, so drifts of the host hit
all modes alike):
  region      LBI region-parallel (chainfree.parallel.region): one region per rank, the LBI scan backward
              across ranks, whole batch on every rank.
  gpipe/1f1b  the SAME LBI model split into the same stages (stage k = region k; the first stage also
              embeds the batch and encodes m_0, the last applies the final norm and the head), trained with
              torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B over `microbatches` micro-batches
              (default 4 per stage, enough to fill the pipe). A stage sends (m_{k+1}, canvas) forward and
              receives their gradients backward; the tied embedding/head gradient is all-reduced.
  ddp         the dense LanguageModel (the LBI model's backbone without the interface) trained by
              DistributedDataParallel, each rank on 1/W of the batch.
  single      single-device LBI: rank 0 runs the whole scan backward on the whole batch, the others wait.
Timed: one step (forward + backward, gradients in .grad, no optimizer), synchronised, the max over ranks.
Bytes: region-parallel counts every byte it sends (`CommLog`); for the pipeline, the bytes are the
activation gradients the schedule sends backward (per micro-batch, the shapes of m and canvas: counted from
the shapes, not intercepted) plus the tied-weight all-reduce; DDP sends 2 (W-1)/W of the gradient bytes
(ring all-reduce). The gradients of gpipe, 1f1b and region equal one process's (tests, float64).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from chainfree.bench.lbi_parallel import free_port, init_local_rank
from chainfree.methods.lbi import LBIConfig, scan_backward
from chainfree.models.lbi import LBIModel
from chainfree.parallel.region import BACKWARD_CATEGORIES, CommLog, region_parallel_step, shared_parameters

MODES = ("region", "gpipe", "1f1b", "ddp", "single")

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model=dict(kind="gpt", vocab_size=64, seq_len=32, d_model=32, n_layers=4, n_heads=4),
                 batch_size=8),
    # the bundled gpt-50m preset (8 layers, regions of 2), BPE vocabulary 8192
    "gpt-50m": dict(model=dict(kind="gpt", vocab_size=8192, seq_len=1024, d_model=768, n_layers=8, n_heads=12),
                    batch_size=16),
    "mamba2-50m": dict(model=dict(kind="mamba2", vocab_size=8192, seq_len=1024, d_model=768, n_layers=14,
                                  d_state=64, ssm_head_dim=64, expand=2, conv_kernel=4, chunk_size=128),
                       batch_size=16),
}


@dataclass
class CompareSpec:
    """One comparison: model config (dict of ModelConfig), LBI settings (region_size is set to
    n_layers / world), global batch, micro-batches of the pipeline schedules, timing and dtype."""

    model: dict[str, Any]
    lbi: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    microbatches: int = 0  # 0 = 4 per stage
    modes: tuple[str, ...] = MODES
    steps: int = 1
    warmup: int = 0
    seed: int = 0
    backend: str = "gloo"
    dtype: str = "float64"  # 'float64' | 'float32' | 'bf16' (autocast on CUDA)
    save_grads: bool = True
    out_dir: str = ""


class _Stage(nn.Module):
    """Region k of an LBI model as a pipeline stage: (ids) or (m_k, canvas) -> (m_{k+1}, canvas), the last
    stage -> normalised hidden states (the schedule's loss function applies the head)."""

    def __init__(self, model: LBIModel, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k

    def forward(self, *args: torch.Tensor) -> Any:
        lbi, k = self.model, self.k
        if k == 0:
            canvas = lbi.canvas(args[0])
            m = lbi.first_message(canvas)
        else:
            m, canvas = args
        out = lbi.region(k, m, canvas)
        if k == lbi.n_regions - 1:
            return lbi.lm.norm(out)
        return out, canvas.view_as(canvas)  # the canvas travels on with the message (read by every region)


def _build(spec: CompareSpec, world: int, device: torch.device) -> tuple[LBIModel, torch.Tensor, torch.Tensor]:
    from chainfree.config import ModelConfig
    from chainfree.models.lm import LanguageModel

    torch.manual_seed(spec.seed)
    lm = LanguageModel(ModelConfig(**spec.model))
    if spec.dtype == "float64":
        lm = lm.double()
    lbi = {**spec.lbi, "region_size": spec.model["n_layers"] // world, "check_separator": False}
    model = LBIModel(lm, LBIConfig(**lbi)).to(device)
    g = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(0, spec.model["vocab_size"], (spec.batch_size, spec.model["seq_len"] + 1), generator=g)
    return model, ids[:, :-1].to(device), ids[:, 1:].to(device)


def _allreduce_shared(model: LBIModel) -> int:
    """Sum the tied embedding/head gradient over the ranks (each stage holds a part); returns bytes sent."""
    params = shared_parameters(model)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    world = dist.get_world_size()
    return int(2 * (world - 1) / world * flat.numel() * flat.element_size())


def _worker(rank: int, world: int, port: int, spec: CompareSpec) -> None:
    device = init_local_rank(rank, world, port, spec.backend)
    try:
        _run(rank, world, spec, device)
    finally:
        dist.destroy_process_group()


def _run(rank: int, world: int, spec: CompareSpec, device: torch.device) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and spec.dtype == "bf16")
    n_mb = spec.microbatches or 4 * world
    runs: dict[str, Any] = {}
    last = rank == world - 1
    for mode in spec.modes:
        model, ids, targets = _build(spec, world, device)
        if mode == "region":
            jac = model.config.jacobian

            def step(model=model, ids=ids, targets=targets, jac=jac) -> tuple[float, dict[str, int]]:
                log = CommLog()
                res = region_parallel_step(model, ids, targets, jac, log)
                return res["loss"], {k: v for k, v in log.sent.items() if k in BACKWARD_CATEGORIES}

        elif mode in ("gpipe", "1f1b"):
            if ids.shape[0] % n_mb:
                raise ValueError(f"batch {ids.shape[0]} is not a multiple of {n_mb} micro-batches")
            stage = PipelineStage(_Stage(model, rank), rank, world, device)
            cls = ScheduleGPipe if mode == "gpipe" else Schedule1F1B
            lm = model.lm
            schedule = cls(stage, n_mb, loss_fn=lambda h, y, lm=lm: lm.loss(h, y))
            mb = ids.shape[0] // n_mb
            msg = mb * model.n_chunks(ids.shape[1]) * model.rank  # token interface: n_chunks = T
            canvas = mb * ids.shape[1] * model.lm.cfg.d_model
            elem = torch.finfo(model.lm.embed.weight.dtype if spec.dtype != "bf16" else torch.bfloat16).bits // 8

            def step(model=model, ids=ids, targets=targets, schedule=schedule, msg=msg, canvas=canvas, elem=elem):
                losses: list[torch.Tensor] = []
                if rank == 0:
                    schedule.step(ids)
                elif last:
                    schedule.step(target=targets, losses=losses)
                else:
                    schedule.step()
                sent = {"activation_grad_message": 0, "activation_grad_canvas": 0}
                if rank > 0:  # the gradients of this stage's inputs go back to the previous stage
                    sent = {"activation_grad_message": n_mb * msg * elem,
                            "activation_grad_canvas": n_mb * canvas * elem}
                sent["shared_grad_allreduce"] = _allreduce_shared(model)
                loss = float(torch.stack(losses).detach().mean()) if losses else float("nan")
                return loss, sent

        elif mode == "single":  # rank 0 alone: the single-device scan backward on the whole batch
            jac = model.config.jacobian

            def step(model=model, ids=ids, targets=targets, jac=jac) -> tuple[float, dict[str, int]]:
                if rank != 0:
                    return float("nan"), {}
                return float(scan_backward(model, ids, targets, jac)), {}

        else:  # dense DDP on the LBI model's backbone, 1/W of the batch per rank
            lm = model.lm
            ddp = nn.parallel.DistributedDataParallel(lm, device_ids=[device] if cuda else None)
            share = ids.shape[0] // world
            x, y = ids[rank * share : (rank + 1) * share], targets[rank * share : (rank + 1) * share]
            n_bytes = sum(p.numel() * p.element_size() for p in lm.parameters() if p.requires_grad)

            def step(ddp=ddp, x=x, y=y, n_bytes=n_bytes) -> tuple[float, dict[str, int]]:
                loss = ddp(x, y)
                loss.backward()
                return float(loss.detach()), {"grad_allreduce": int(2 * (world - 1) / world * n_bytes)}

        runs[mode] = {"model": model, "step": step, "times": [], "loss": float("nan"), "bytes": {}}
    for i in range(spec.warmup + spec.steps):  # interleaved: every mode once per round
        for run in runs.values():
            run["model"].zero_grad(set_to_none=True)
            dist.barrier()
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with autocast:
                loss, sent = run["step"]()
            if cuda:
                torch.cuda.synchronize(device)
            wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
            if i >= spec.warmup:
                run["times"].append(float(wall))
            run["loss"], run["bytes"] = loss, sent
    record: dict[str, Any] = {"rank": rank, "modes": {}}
    for mode, run in runs.items():
        has_loss = mode == "ddp" or rank == (0 if mode == "single" else world - 1)
        rec: dict[str, Any] = {"step_s": run["times"], "backward_bytes": run["bytes"],
                               "loss": run["loss"] if has_loss else float("nan")}
        if spec.save_grads:
            params = run["model"].lm.named_parameters() if mode == "ddp" else run["model"].named_parameters()
            rec["grads"] = {n: p.grad.detach().cpu() for n, p in params if p.grad is not None}
        record["modes"][mode] = rec
    torch.save(record, Path(spec.out_dir) / f"rank{rank}.pt")


def spawn_compare(spec: CompareSpec, world: int) -> list[dict[str, Any]]:
    """Run the comparison on `world` local processes; returns each rank's record (per mode: step times,
    backward bytes by category, loss, and the gradients this rank holds)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = dataclasses.replace(spec, out_dir=spec.out_dir or tmp)
        mp.spawn(_worker, args=(world, free_port(), spec), nprocs=world, join=True)
        return [torch.load(Path(spec.out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode: median / min / max step time (max over ranks per step), ratio to DDP, backward
    bytes per rank."""
    rows = []
    for mode, rec in records[0]["modes"].items():
        t = rec["step_s"]
        rows.append({"mode": mode, "step_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
                     "max_ms": 1e3 * max(t),
                     "backward_bytes_per_rank": [sum(r["modes"][mode]["backward_bytes"].values()) for r in records],
                     "bytes_by_category": [r["modes"][mode]["backward_bytes"] for r in records]})
    ref = next((r for r in rows if r["mode"] == "ddp"), None)
    for r in rows:
        r["vs_ddp"] = r["step_ms"] / ref["step_ms"] if ref else None
    return rows


def main(argv: list[str] | None = None) -> None:
    from chainfree.bench.report import environment, markdown_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16, help="LBI interface width r")
    ap.add_argument("--n-chunks", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=0, help="pipeline micro-batches (0 = 4 per stage)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= args.world
    preset = PRESETS[args.preset]
    spec = CompareSpec(model=dict(preset["model"]), lbi={"rank": args.rank, "n_chunks": args.n_chunks},
                       batch_size=preset["batch_size"], microbatches=args.microbatches,
                       modes=tuple(m for m in args.modes.split(",") if m), steps=args.steps, warmup=args.warmup,
                       backend="nccl" if cuda else "gloo", dtype="bf16" if cuda else "float32", save_grads=False)
    records = spawn_compare(spec, args.world)
    rows = summarize(records)
    env = {**environment(), "world_size": args.world, "backend": spec.backend}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"lbi_vs_pipeline_{args.preset}_r{args.rank}"
    command = "python -m chainfree.bench.lbi_pipeline " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"environment": env, "spec": dataclasses.asdict(spec), "rows": rows, "command": command}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
    table = markdown_table(rows, [(k, k) for k in ("mode", "step_ms", "min_ms", "max_ms", "vs_ddp",
                                                   "backward_bytes_per_rank")])
    (args.out / f"{stem}.md").write_text(
        f"# LBI region-parallel vs pipeline (GPipe, 1F1B) vs DDP, {args.world} ranks "
        f"({env.get('cuda_device') or 'CPU'})"
        f"\n\nModel {json.dumps(spec.model)}, LBI r={args.rank}, batch {spec.batch_size}, "
        f"{spec.microbatches or 4 * args.world} micro-batches, dtype {spec.dtype}. Step: forward + backward, no "
        f"optimizer; median / min / max over {spec.steps} interleaved rounds of the slowest rank's time; vs_ddp = "
        f"median / DDP's median; bytes each rank sends in the backward."
        + (" CPU processes (gloo): wall time on a shared CPU, a check of the harness, not a GPU measurement."
           if spec.backend == "gloo" else "") + f"\n\n{table}\n\n"
        f"torch {env.get('torch')}, commit {env.get('git_commit')}, backend {spec.backend}. Command: `{command}`\n")
    print(table, flush=True)


if __name__ == "__main__":
    main()
