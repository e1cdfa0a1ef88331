"""THE training loop. Every method trains here; a method only decides how a batch becomes `.grad`.

data (deterministic in seed/step) -> method.step -> clip -> optimizer (lr = schedule(step)) -> eval ->
JSONL metrics -> atomic checkpoint. Rerunning with the same --out resumes from the last checkpoint and, on
CPU, reproduces the uninterrupted run's losses exactly (data and RNG are restored, the schedule is a pure
function of the step). Multi-process data parallel runs under torchrun (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from chainfree.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from chainfree.config import RunConfig, TrainConfig, to_toml
from chainfree.data import BatchSampler, load_tokens
from chainfree.errors import ConfigError
from chainfree.logging import MetricsLog, console, plot_losses, progress_bar, read_metrics
from chainfree.methods import Method, build_method
from chainfree.models.lm import LanguageModel


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun set up (WORLD_SIZE > 1); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(train: TrainConfig, info: DistInfo) -> torch.device:
    want = train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no CUDA GPU is visible; use --device cpu")
        if want == "cuda":
            want = f"cuda:{info.local_rank}"
    return torch.device(want)


def autocast_context(train: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA by default (weights and optimizer stay fp32); nothing on CPU unless asked."""
    use_bf16 = train.dtype == "bf16" or (train.dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warmup to train.lr, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    coeff = 0.5 * (1 + math.cos(math.pi * progress))
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * coeff)


def build_optimizer(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms, biases, or 1-d SSM parameters), or SGD."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=device.type == "cuda")


def allreduce_grads(model: nn.Module, world_size: int) -> None:
    """Average gradients across ranks (for methods that own their step and so cannot use DDP hooks)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def global_mean(value: float, device: torch.device) -> float:
    """Mean of a per-rank scalar over all ranks (each rank holds an equal share of the global batch)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


@torch.no_grad()
def evaluate(method: Method, model: nn.Module, sampler: BatchSampler, n_batches: int, device: torch.device,
             train: TrainConfig) -> float:
    """Mean val loss over a fixed set of val batches (the same for every method and every eval)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(n_batches):
        x, y = (t.to(device) for t in sampler.batch("val", i))
        with autocast_context(train, device):
            total += float(method.eval_loss(model, x, y))
    model.train(was_training)
    mean = total / n_batches
    return global_mean(mean, device) if dist.is_initialized() and dist.get_world_size() > 1 else mean


def build_run(cfg: RunConfig, device: torch.device) -> tuple[Any, LanguageModel, Method]:
    """Data, model (seeded) and method for a config; shared by train, compare and the benches."""
    data = load_tokens(cfg.data)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    elif cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size}; "
            "set it to 0 to use the tokenizer's"
        )
    torch.manual_seed(cfg.train.seed)
    model = LanguageModel(cfg.model)
    if cfg.train.dtype == "fp64":
        model = model.double()
    model = model.to(device)
    method = build_method(cfg.method_name, cfg.method_params)
    model = method.prepare(model)
    return data, model, method


def train(cfg: RunConfig, out_dir: Path, *, stop_at: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg` into `out_dir`; returns the run summary.

    `stop_at` ends the run after that step (checkpointing first) as if it had been interrupted there;
    rerunning continues it. Ctrl-C does the same: a checkpoint is written before the interrupt propagates.
    """
    out_dir = Path(out_dir)
    tc = cfg.train
    info = init_distributed("cuda" if tc.device.startswith("cuda") or
                            (tc.device == "auto" and torch.cuda.is_available()) else "cpu")
    device = resolve_device(tc, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    data, model, method = build_run(cfg, device)
    # a model-parallel method (HBLL's tree-parallel rounds) wants the whole global batch on every rank
    shard = (0, 1) if getattr(method, "replicates_batch", False) else (info.rank, info.world_size)
    sampler = BatchSampler(data, tc.batch_size, cfg.model.seq_len, tc.seed, *shard)
    optimizer = build_optimizer(model, tc, device)
    config_dict = cfg.to_dict()
    ckpt_dir = out_dir / "checkpoint"
    start = 0
    resumed = has_checkpoint(ckpt_dir)
    if resumed:
        state = load_checkpoint(ckpt_dir, model, optimizer, config_dict)
        start = state["step"]
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(to_toml(cfg))
    log = MetricsLog(out_dir / "metrics.jsonl", resume_step=start if resumed else None) if info.is_main else None

    step_model: nn.Module = model
    if info.world_size > 1 and method.uses_autograd_step:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = tc.batch_size * cfg.model.seq_len
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times: list[float] = []
    last_val = float("nan")
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    bar = progress_bar(disable=not (progress and info.is_main))
    step = start
    try:
        with bar:
            task = bar.add_task(f"{cfg.model.kind}/{method.name}", total=tc.steps, completed=start,
                                loss="-", val="-", tps="-")
            for step in range(start, end):
                t0 = time.perf_counter()
                lr = lr_at(step, tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = (t.to(device, non_blocking=True) for t in sampler.batch("train", step))
                with autocast_context(tc, device):
                    stats = method.step(step_model, x, y)
                if info.world_size > 1:
                    if not method.uses_autograd_step and not getattr(method, "syncs_gradients", False):
                        allreduce_grads(model, info.world_size)
                    stats.loss = global_mean(stats.loss, device)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0
                                                                 else float("inf")))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                step_times.append(dt)
                done = step + 1
                record: dict[str, Any] = {"step": done, "train_loss": stats.loss, "lr": lr, "grad_norm": grad_norm,
                                          "step_time": dt, "tokens_per_s": tokens_per_step / dt,
                                          "tokens": done * tokens_per_step, **stats.extra}
                if done % tc.eval_every == 0 or done == tc.steps:
                    last_val = evaluate(method, model, sampler, tc.eval_batches, device, tc)
                    record["val_loss"] = last_val
                if not math.isfinite(stats.loss):
                    raise FloatingPointError(f"training loss became {stats.loss} at step {done}; lower train.lr")
                if log is not None:
                    log.write(record)
                bar.update(task, completed=done, loss=f"{stats.loss:.3f}",
                           val=f"{last_val:.3f}" if math.isfinite(last_val) else "-",
                           tps=f"{tokens_per_step / dt:,.0f}")
                if done % tc.ckpt_every == 0 or done == end:
                    if info.is_main:
                        save_checkpoint(ckpt_dir, done, model, optimizer, config_dict)
                step = done
    except KeyboardInterrupt:
        if info.is_main and step > start:
            save_checkpoint(ckpt_dir, step, model, optimizer, config_dict)
            console.print(f"interrupted: checkpoint saved at step {step}; rerun the same command to resume")
        raise
    summary = summarize(out_dir, cfg, method, model, step_times, device, data.unigram_entropy())
    if info.is_main and step >= tc.steps:
        plot_losses({method.name: read_metrics(out_dir / "metrics.jsonl")}, out_dir / "loss.png",
                    title=f"{cfg.model.kind} / {method.name}")
    return summary


def summarize(out_dir: Path, cfg: RunConfig, method: Method, model: nn.Module, step_times: list[float],
              device: torch.device, unigram: float) -> dict[str, Any]:
    records = read_metrics(out_dir / "metrics.jsonl") if (out_dir / "metrics.jsonl").exists() else []
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    # skip the first steps (allocator warm-up, compilation) when enough steps ran this session
    timed = step_times[2:] if len(step_times) > 4 else step_times
    summary = {
        "model": cfg.model.kind,
        "method": method.describe(),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": records[-1]["step"] if records else 0,
        "final_train_loss": records[-1]["train_loss"] if records else float("nan"),
        "final_val_loss": vals[-1] if vals else float("nan"),
        "unigram_entropy": unigram,
        "step_time_s": sorted(timed)[len(timed) // 2] if timed else float("nan"),
        "tokens_per_s": cfg.train.batch_size * cfg.model.seq_len / (sorted(timed)[len(timed) // 2])
        if timed else float("nan"),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    return summary
