"""What the speed and memory benches run: one training step of a method, or one isolated module, built
exactly as the training loop builds them -- the Trainer's own setup (seeded model from the model factory,
`method.prepare`, train.activation_checkpoint / train.compile, optimizer) and its own `train_step`
(autocast, grad_accum, clip, optimizer, zero_grad) -- so a ratio against exact differs only in the
gradient computation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chainfree.config import RunConfig
from chainfree.data import BatchSampler
from chainfree.errors import ConfigError
from chainfree.methods import Method, build_method, method_from_config
from chainfree.methods.base import Launch
from chainfree.runtime import resolve_device, sync, time_fn
from chainfree.training import Trainer, TrainState, autocast_context, seeded_model

OPS = ("step", "block", "attn", "mlp")  # 'attention' (SUS kernel sweep) lives in chainfree.bench.attention
__all__ = ["OPS", "StepCase", "build_model", "build_step_case", "load_batch", "op_closures", "op_module",
           "resolve_device", "setup_training_case", "shapes", "sync", "time_fn"]


@dataclass
class StepCase:
    """A Trainer set up for one method on one device-resident batch; `step()` is one full training step."""

    name: str
    method: Method
    inputs: torch.Tensor
    targets: torch.Tensor
    cfg: RunConfig
    device: torch.device
    trainer: Trainer
    state: TrainState

    @property
    def model(self) -> nn.Module:
        return self.state.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.state.optimizer

    def step(self) -> None:
        """Trainer.train_step on the case's batch (the learning rate follows the run's schedule)."""
        self.trainer.train_step(self.state, (self.inputs, self.targets))


def setup_training_case(cfg: RunConfig, data: Any, device: torch.device) -> tuple[Method, Trainer, TrainState,
                                                                                   BatchSampler]:
    """(method, trainer, state, sampler) of one case that trains through its own Trainer: its model from the
    run seed, its batches from the run seed (the same for every case of a comparison)."""
    cfg.model.fit_vocab(data.vocab_size)
    method = method_from_config(cfg)
    trainer = Trainer(cfg.train, method, device=device)
    state = trainer.setup(seeded_model(cfg, device))
    return method, trainer, state, BatchSampler(data, cfg.train.batch_size, cfg.model.seq_len, cfg.train.seed)


def build_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    """The unprepared model of `cfg`, seeded like the training loop (vocab_size must be set)."""
    if cfg.model.kind != "vision" and cfg.model.vocab_size <= 0:
        raise ConfigError("model.vocab_size must be set before building a bench model (it comes from the data)")
    return seeded_model(cfg, device)


def build_step_case(cfg: RunConfig, method_name: str, params: dict[str, Any], batch: tuple[torch.Tensor, torch.Tensor],
                    device: torch.device) -> StepCase:
    """One process, one device: the Trainer's single-device strategy whatever the launch."""
    method = build_method(method_name, params)
    trainer = Trainer(cfg.train, method, device=device, launch=Launch(), strategy="single")
    state = trainer.setup(build_model(cfg, device))
    x, y = (t.to(device) for t in batch)
    return StepCase(method_name, method, x, y, cfg, device, trainer, state)


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


def load_batch(cfg: RunConfig, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch of the configured corpus (fills in model.vocab_size from the tokenizer when 0)."""
    from chainfree.data import BatchSampler
    from chainfree.training.trainer import run_tokens

    data = run_tokens(cfg)
    cfg.model.fit_vocab(data.vocab_size)
    sampler = BatchSampler(data, cfg.train.batch_size, cfg.model.seq_len, cfg.train.seed)
    return sampler.batch("train", step)


def shapes(cfg: RunConfig, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """What a result must record about the workload."""
    m = cfg.model
    return {"model": m.kind, "batch": list(batch[0].shape), "seq_len": m.seq_len, "d_model": m.d_model,
            "n_layers": m.n_layers, "n_heads": m.n_heads, "vocab_size": m.vocab_size,
            "dtype": cfg.train.dtype, "optimizer": cfg.train.optimizer}
