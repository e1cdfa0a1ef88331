"""What the speed and memory benches run: one training step of a method, or one isolated module, built
exactly as the training loop builds them (same seed, model, `method.prepare`, optimizer, autocast), so a
ratio against exact differs only in the gradient computation."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median
from typing import Any

import torch
from torch import nn

from chainfree.config import RunConfig
from chainfree.errors import ConfigError
from chainfree.methods import Method, build_method
from chainfree.models.lm import LanguageModel
from chainfree.train import autocast_context, build_optimizer
from chainfree.training.options import apply_train_options, compile_step_begin

OPS = ("step", "block", "attn", "mlp")  # 'attention' (SUS kernel sweep) lives in chainfree.bench.attention


@dataclass
class StepCase:
    """A prepared model + optimizer + batch for one method; `step()` is one full training step."""

    name: str
    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    inputs: torch.Tensor
    targets: torch.Tensor
    cfg: RunConfig
    device: torch.device

    def step(self) -> None:
        """method.step + clip + optimizer.step + zero_grad, as in chainfree.train (learning rate fixed)."""
        if self.cfg.train.compile:
            compile_step_begin(self.cfg.train.compile_mode)
        with autocast_context(self.cfg.train, self.device):
            self.method.step(self.model, self.inputs, self.targets)
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.cfg.train.grad_clip
        torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    """The unprepared model of `cfg`, seeded like the training loop (vocab_size must be set)."""
    if cfg.model.vocab_size <= 0:
        raise ConfigError("model.vocab_size must be set before building a bench model (it comes from the data)")
    torch.manual_seed(cfg.train.seed)
    model = LanguageModel(cfg.model)
    if cfg.train.dtype == "fp64":
        model = model.double()
    return model.to(device)


def build_step_case(cfg: RunConfig, method_name: str, params: dict[str, Any], batch: tuple[torch.Tensor, torch.Tensor],
                    device: torch.device) -> StepCase:
    model = build_model(cfg, device)
    method = build_method(method_name, params)
    model = method.prepare(model)
    apply_train_options(model, cfg.train, method.uses_autograd_step)  # train.compile / activation_checkpoint
    optimizer = build_optimizer(model, cfg.train, device)
    x, y = (t.to(device) for t in batch)
    return StepCase(method_name, model, method, optimizer, x, y, cfg, device)


def op_module(case: StepCase, op: str) -> nn.Module:
    """The first block (op='block'), its attention ('attn') or its MLP ('mlp') of the prepared model."""
    blocks = getattr(case.model, "blocks", None)
    if blocks is None:
        lm = getattr(case.model, "lm", None)
        blocks = getattr(lm, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ConfigError(f"--op {op}: the {case.name} model has no .blocks; use --op step")
    block = blocks[0]
    if op == "block":
        return block
    sub = getattr(block, op, None)
    if sub is None:
        raise ConfigError(f"--op {op}: block 0 ({type(block).__name__}) has no .{op}; use --op block or step")
    return sub


def op_closures(case: StepCase, op: str) -> dict[str, Callable[[], Any]]:
    """fwd and fwd+bwd of an isolated module on a random [B, T, d] input (the module's own parameters)."""
    module = op_module(case, op)
    d = case.cfg.model.d_model
    b, t = case.inputs.shape
    dtype = next(case.model.parameters()).dtype
    gen = torch.Generator(device=case.device).manual_seed(0)
    x = torch.randn(b, t, d, device=case.device, dtype=dtype, generator=gen).requires_grad_(True)
    ctx = lambda: autocast_context(case.cfg.train, case.device)  # noqa: E731

    def fwd() -> None:
        with torch.no_grad(), ctx():
            module(x)

    def fwd_bwd() -> None:
        with ctx():
            out = module(x)
        out.float().square().mean().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 10) -> dict[str, Any]:
    """Median time of fn in ms: CUDA events around each call on a GPU, perf_counter wall time on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    if device.type == "cuda":
        events = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
        timer = "cuda_events"
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        timer = "wall_clock"
    return {"median_ms": median(times), "min_ms": min(times), "max_ms": max(times), "repeats": repeats,
            "warmup": warmup, "timer": timer}


def load_batch(cfg: RunConfig, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch of the configured corpus (sets model.vocab_size from the tokenizer when 0)."""
    from chainfree.data import BatchSampler, load_tokens

    data = load_tokens(cfg.data)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    sampler = BatchSampler(data, cfg.train.batch_size, cfg.model.seq_len, cfg.train.seed)
    return sampler.batch("train", step)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when visible; a clear error when cuda is asked for and absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def shapes(cfg: RunConfig, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """What a result must record about the workload."""
    m = cfg.model
    return {"model": m.kind, "batch": list(batch[0].shape), "seq_len": m.seq_len, "d_model": m.d_model,
            "n_layers": m.n_layers, "n_heads": m.n_heads, "vocab_size": m.vocab_size,
            "dtype": cfg.train.dtype, "optimizer": cfg.train.optimizer}
