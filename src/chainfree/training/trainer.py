"""THE training loop. Every method and every experiment trains here; a method only decides how a batch
becomes `.grad`, a strategy how the ranks share the work.

    trainer = Trainer(cfg.train, method, device=device, callbacks=[...])
    state = trainer.setup(model)                # prepare, options, strategy wrap, optimizer
    stats = trainer.train_step(state, (x, y))   # one optimizer step (grad_accum micro-batches)
    trainer.fit(state, batch_fn, end)           # steps state.step..end with the callbacks

One optimizer step: lr = schedule(step) -> the global batch split into train.grad_accum micro-batches,
each through method.step (gradient communication only after the last) -> gradients scaled by 1/grad_accum
-> the strategy's gradient sync -> clip -> optimizer -> zero_grad. `train(cfg, out_dir)` is the entry the
CLI uses: token data (deterministic in seed/step) -> Trainer -> eval, JSONL metrics, atomic checkpoints.
Rerunning with the same out_dir resumes from the last checkpoint and, on CPU, reproduces the uninterrupted
run's losses exactly (data and RNG are restored, the schedule is a pure function of the step).
Multi-process runs start under torchrun (NCCL on GPU, gloo on CPU) with the strategy the method picks
for the launch or the one train.strategy names.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from chainfree.checkpoint import has_checkpoint, load_checkpoint
from chainfree.config import RunConfig, TrainConfig, to_toml
from chainfree.logging import plot_losses, read_metrics
from chainfree.methods import Method, StepStats, method_from_config
from chainfree.methods.base import Launch
from chainfree.models import build_model
from chainfree.runtime import resolve_device, sync
from chainfree.training.callbacks import (
    Callback,
    CheckpointCallback,
    EvalCallback,
    MetricsCallback,
    ProgressCallback,
)
from chainfree.training.state import TrainState
from chainfree.training.strategies import Strategy, build_strategy, init_process_group, launch_from_env

Batch = tuple[torch.Tensor, torch.Tensor]


def autocast_context(train: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
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
    """AdamW with weight decay on matrices only (not norms, biases, or 1-d SSM parameters), or SGD.
    AdamW is the fused implementation on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=device.type == "cuda")


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """The batch as `parts` equal micro-batches along dim 0 (the rank's share must divide evenly)."""
    x, y = batch
    if parts == 1:
        return [(x, y)]
    if x.shape[0] % parts:
        from chainfree.errors import ConfigError

        raise ConfigError(f"train.grad_accum={parts} must divide the per-rank batch of {x.shape[0]} rows; "
                          "change train.batch_size or train.grad_accum")
    return list(zip(x.chunk(parts), y.chunk(parts), strict=True))


# methods that cut a model's residual blocks into regions, trees or local blocks: they need the layout
# embed -> blocks -> norm -> head (docs/architecture.md) of chainfree's language models
BLOCK_METHODS = ("lbi", "hbll", "flat_bll")
BLOCK_LAYOUT = ("embed", "blocks", "norm", "head")


def check_layout(method: Method, model: nn.Module) -> None:
    """ConfigError naming the method and the missing part when a block-cutting method (BLOCK_METHODS) meets a
    model without the embed -> blocks -> norm -> head layout (e.g. the character GRU), instead of an
    AttributeError from deep inside its prepare. A model a method already prepared passes."""
    if method.name not in BLOCK_METHODS or getattr(model, "generation_model", None) is not None:
        return
    from chainfree.errors import ConfigError

    missing = [attr for attr in BLOCK_LAYOUT if not hasattr(model, attr)]
    if missing:
        kind = getattr(getattr(model, "cfg", None), "kind", None) or type(model).__name__
        raise ConfigError(f"method {method.name!r} cuts a model's residual blocks and needs embed -> blocks -> norm "
                          f"-> head; {kind} has no .{missing[0]}: use model.kind gpt, mamba2, mamba3 or hybrid")
    size = getattr(getattr(method, "config", None), "block_size", 0)
    if method.name == "hbll" and isinstance(size, int) and size >= 1:  # HBLL stacks its leaves: they must be alike
        kinds = [type(block).__name__ for block in model.blocks]
        leaves = [tuple(kinds[i:i + size]) for i in range(0, len(kinds), size)]
        if len(set(leaves)) > 1:
            period = next(p for p in range(1, len(kinds) + 1) if len(kinds) % p == 0
                          and len({tuple(kinds[i:i + p]) for i in range(0, len(kinds), p)}) == 1)
            raise ConfigError(f"method 'hbll' runs its leaves of method.block_size={size} blocks as one stacked "
                              f"call, so they must be alike, but this model's blocks are {', '.join(kinds)}; set "
                              f"method.block_size to a multiple of {period} (e.g. --set method.block_size={period})")


class Trainer:
    """One optimizer step and the loop around it, shared by every method, model kind and strategy.

    train: the TrainConfig (schedule, optimizer, clipping, grad_accum, dtype, compile/checkpoint options).
    method: anything satisfying chainfree.methods.Method.
    device, launch: default from train.device and torchrun's environment.
    strategy: a Strategy, a registered name, or None for train.strategy ('auto' = the method's choice).
    callbacks: run in order after every step (see chainfree.training.callbacks).
    """

    def __init__(self, train: TrainConfig, method: Method, *, device: torch.device | None = None,
                 launch: Launch | None = None, strategy: Strategy | str | None = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.train, self.method = train, method
        self.launch = launch if launch is not None else launch_from_env()
        self.device = device if device is not None else resolve_device(train.device, self.launch.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        init_process_group(self.launch, self.device)
        if strategy is None or isinstance(strategy, str):
            strategy = build_strategy(strategy or train.strategy, method, self.launch)
        self.strategy: Strategy = strategy
        self.callbacks: list[Callback] = list(callbacks)
        self.options: dict[str, Any] = {}
        self.start = 0
        self.end = train.steps

    # -- setup -------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module) -> TrainState:
        """Prepare `model` (already seeded and on the device) for training: method.prepare, activation
        checkpointing / torch.compile (train.activation_checkpoint, train.compile), the strategy's wrap,
        then the optimizer over the prepared model's parameters."""
        check_layout(self.method, model)
        model = self.method.prepare(model)
        from chainfree.training.options import apply_train_options

        self.options = apply_train_options(model, self.train, self.method.uses_autograd_step)
        step_model = self.strategy.wrap(model, self.method, self.device)
        optimizer = build_optimizer(model, self.train, self.device)
        return TrainState(model=model, step_model=step_model, optimizer=optimizer)

    def resume(self, state: TrainState, ckpt_dir: Path, config: dict[str, Any]) -> bool:
        """Restore state from ckpt_dir when a checkpoint is there (verified by chainfree.checkpoint)."""
        if not has_checkpoint(ckpt_dir):
            return False
        model, optimizer = self.strategy.checkpoint_views(state.model, state.optimizer)
        saved = load_checkpoint(ckpt_dir, model, optimizer, config)
        state.step = int(saved["step"])
        return True

    # -- one step ----------------------------------------------------------------------------------------
    def train_step(self, state: TrainState, batch: Batch) -> StepStats:
        """One optimizer step on `batch` (this rank's share of the global batch); returns the loss (mean
        over ranks and micro-batches), the tokens of the global batch, lr and the pre-clip grad norm."""
        tc, device = self.train, self.device
        lr = lr_at(state.step, tc)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        micro = split_batch(batch, tc.grad_accum)
        losses: list[float] = []
        tokens = 0
        extra: dict[str, float] = {}
        for i, (x, y) in enumerate(micro):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last = i == len(micro) - 1
            with (contextlib.nullcontext() if last else self.strategy.accumulating(state.step_model)):
                if tc.compile:
                    from chainfree.training.options import compile_step_begin

                    compile_step_begin(tc.compile_mode)
                with autocast_context(tc, device):
                    stats = self.method.step(state.step_model, x, y)
            losses.append(stats.loss)
            tokens += stats.tokens
            for key, value in stats.extra.items():
                extra[key] = extra.get(key, 0.0) + value / len(micro)
        if len(micro) > 1:  # each micro-step's loss is a micro-batch mean: the step's gradient is their mean
            for p in state.params:
                if p.grad is not None:
                    p.grad.div_(len(micro))
        self.strategy.finish_gradients(state.model, self.method)
        loss = losses[0] if len(losses) == 1 else sum(losses) / len(losses)
        loss = self.strategy.mean(loss, device)
        clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(state.params, clip)
        full = getattr(norm, "full_tensor", None)
        grad_norm = float(full() if full is not None else norm)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        return StepStats(loss=loss, tokens=tokens * self.strategy.batch_shard()[1], extra=extra, lr=lr,
                         grad_norm=grad_norm)

    # -- the loop ----------------------------------------------------------------------------------------
    def fit(self, state: TrainState, batches: Callable[[int], Batch], end: int | None = None) -> TrainState:
        """Steps state.step .. end (default train.steps); `batches(step)` gives that step's batch. After each
        step the record {step, train_loss, lr, grad_norm, step_time, tokens_per_s, tokens, ...} goes through
        the callbacks. Ctrl-C calls their on_interrupt (the checkpoint callback saves) and re-raises."""
        self.start = state.step
        self.end = self.train.steps if end is None else min(end, self.train.steps)
        for cb in self.callbacks:
            cb.on_fit_begin(self, state)
        try:
            while state.step < self.end:
                t0 = time.perf_counter()
                stats = self.train_step(state, batches(state.step))
                sync(self.device)
                dt = time.perf_counter() - t0
                state.step_times.append(dt)
                if not math.isfinite(stats.loss):
                    raise FloatingPointError(
                        f"training loss became {stats.loss} at step {state.step}; lower train.lr"
                    )
                record: dict[str, Any] = {"step": state.step, "train_loss": stats.loss, "lr": stats.lr,
                                          "grad_norm": stats.grad_norm, "step_time": dt,
                                          "tokens_per_s": stats.tokens / dt, "tokens": state.step * stats.tokens,
                                          **stats.extra}
                for cb in self.callbacks:
                    cb.on_step_end(self, state, record)
        except KeyboardInterrupt:
            for cb in self.callbacks:
                cb.on_interrupt(self, state)
            raise
        except BaseException as error:
            for cb in self.callbacks:
                cb.on_error(self, state, error)
            raise
        for cb in self.callbacks:
            cb.on_fit_end(self, state)
        return state


@torch.no_grad()
def evaluate(method: Method, model: nn.Module, sampler: Any, n_batches: int, device: torch.device,
             train: TrainConfig, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> float:
    """Mean val loss over a fixed set of val batches (the same for every method and every eval), averaged
    over the ranks when several hold different shares. `loss(x, y)` defaults to method.eval_loss(model, x, y);
    bench code passes the model's uncompiled `model.forward` (the compiled wrapper would recompile for eval)."""
    if loss is None:
        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return method.eval_loss(model, x, y)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(n_batches):
        x, y = (t.to(device) for t in sampler.batch("val", i))
        with autocast_context(train, device):
            total += float(loss(x, y))
    model.train(was_training)
    mean = total / n_batches
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([mean], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t) / dist.get_world_size()
    return mean


@contextlib.contextmanager
def main_rank_first(launch: Launch) -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks (for work that fills a shared cache)."""
    if launch.distributed and not launch.is_main:
        dist.barrier()
    yield
    if launch.distributed and launch.is_main:
        dist.barrier()


def seeded_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    """The unprepared model of cfg.model (vocab_size filled in), seeded with train.seed, in fp64 when
    train.dtype='fp64', on `device`: what every run, bench and comparison starts from."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if cfg.train.dtype == "fp64":
        model = model.double()
    return model.to(device)


def run_tokens(cfg: RunConfig) -> Any:
    """The run's token data: the data section's corpus, or for a pretrained model (model.kind='hf') that
    corpus re-tokenised with the model's own tokenizer (which also refuses methods that rebuild the model)."""
    if cfg.model.kind == "hf":
        from chainfree.models.hf import run_tokens as hf_tokens

        return hf_tokens(cfg)
    if cfg.model.kind == "vision":
        from chainfree.errors import ConfigError

        raise ConfigError("model.kind='vision' classifies feature vectors, while train, compare, generate and the "
                          "benches run language models on token data; the vision experiments run through "
                          "`chainfree reproduce hbll`")
    from chainfree.data import load_tokens

    return load_tokens(cfg.data)


def build_run(cfg: RunConfig, device: torch.device) -> tuple[Any, nn.Module, Method]:
    """Data, prepared model (seeded) and method for a config; for callers that drive a model themselves
    (generation, benches). `train` goes through Trainer.setup instead."""
    method = method_from_config(cfg)
    data = run_tokens(cfg)
    cfg.model.fit_vocab(data.vocab_size)
    model = seeded_model(cfg, device)
    check_layout(method, model)
    model = method.prepare(model)
    return data, model, method


RECORDED_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act",
                      "tie_word_embeddings", "torch_dtype")


def run_record(model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """What a run loaded that its settings do not say, for DIR/config.toml's [recorded] section: for a
    pretrained transformers model (`model.hf`), the checkpoint's architecture (class, layers, widths, heads,
    vocabulary, context), its parameter count and the tokenizer (class, vocabulary size, identity hash). Empty
    for chainfree's own models, whose [model] and [data] settings already describe them completely."""
    hf = getattr(model, "hf", None)
    config = getattr(hf, "config", None)
    if config is None:
        return {}
    record: dict[str, Any] = {"architecture": ", ".join(getattr(config, "architectures", None) or [type(hf).__name__])}
    for key in RECORDED_ARCH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, bool | int | float | str):
            record[key] = value
    record["params"] = sum(p.numel() for p in hf.parameters())
    source = getattr(getattr(model, "cfg", None), "pretrained", None)
    if source:
        record["source"] = str(source)
    inner = getattr(tokenizer, "tok", tokenizer)
    record["tokenizer"] = type(inner).__name__
    record["tokenizer_vocab_size"] = int(getattr(tokenizer, "vocab_size", 0))
    identity = getattr(tokenizer, "identity", None)
    if identity:
        record["tokenizer_identity"] = str(identity)
    return record


def train(cfg: RunConfig, out_dir: Path, *, stop_at: int | None = None, progress: bool = True,
          callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg` into `out_dir`; returns the run summary.

    `stop_at` ends the run after that step (checkpointing first) as if it had been interrupted there;
    rerunning continues it. Ctrl-C does the same: a checkpoint is written before the interrupt propagates.
    Extra `callbacks` run after the built-in eval, log and progress callbacks, before the checkpoint.
    """
    from chainfree.data import BatchSampler

    out_dir = Path(out_dir)
    tc = cfg.train
    method = method_from_config(cfg)  # validates the [method] section before any work
    trainer = Trainer(tc, method)
    with main_rank_first(trainer.launch):  # rank 0 builds the token cache, the others then read it
        data = run_tokens(cfg)
    cfg.model.fit_vocab(data.vocab_size)
    state = trainer.setup(seeded_model(cfg, trainer.device))
    sampler = BatchSampler(data, tc.batch_size, cfg.model.seq_len, tc.seed, *trainer.strategy.batch_shard())
    config_dict = cfg.to_dict()
    ckpt_dir = out_dir / "checkpoint"
    resumed = trainer.resume(state, ckpt_dir, config_dict)
    if trainer.launch.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(to_toml(cfg, run_record(state.model, data.tokenizer)))
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    trainer.callbacks = [
        EvalCallback(lambda s: evaluate(method, s.model, sampler, tc.eval_batches, trainer.device, tc),
                     tc.eval_every, tc.steps),
        MetricsCallback(out_dir / "metrics.jsonl", state.step if resumed else None),
        ProgressCallback(f"{cfg.model.kind}/{method.name}", tc.steps, progress),
        *callbacks,
        CheckpointCallback(ckpt_dir, config_dict, tc.ckpt_every),
    ]
    trainer.fit(state, lambda step: sampler.batch("train", step), stop_at)
    summary = summarize(out_dir, cfg, method, state.model, state.step_times, trainer.device,
                        data.unigram_entropy())
    summary["strategy"] = trainer.strategy.name
    summary["world_size"] = trainer.launch.world_size
    summary.update({f"option_{k}": v for k, v in trainer.options.items()})
    if trainer.launch.is_main and state.step >= tc.steps:
        plot_losses({method.name: read_metrics(out_dir / "metrics.jsonl")}, out_dir / "loss.png",
                    title=f"{cfg.model.kind} / {method.name}")
    return summary


def warmup_steps_excluded(n_steps: int, train: TrainConfig) -> int:
    """How many of a session's first steps `summarize` leaves out of the step time: the first step always
    (lazy initialisation, allocator growth, kernel selection, and with train.compile the compilation), and
    with train.compile also the second (a recompile for the changed lr / optimizer state, CUDA-graph
    recording under mode='reduce-overhead'). Capped at the steps that ran."""
    return min(n_steps, 2 if train.compile else 1)


def summarize(out_dir: Path, cfg: RunConfig, method: Method, model: nn.Module, step_times: list[float],
              device: torch.device, unigram: float) -> dict[str, Any]:
    """Run summary from metrics.jsonl and this session's step times.

    Fields (also README, "Command line"): `step_time_s` = median wall time of this session's steps after the
    `warmup_steps_excluded` first ones (see `warmup_steps_excluded`: 1, or 2 with train.compile),
    `timed_steps` = how many steps that median is over, `tokens_per_s` = batch_size * seq_len / step_time_s.
    A session whose only steps are warm-up steps (e.g. a 1-step run) has no honest figure: `step_time_s` and
    `tokens_per_s` are NaN (null in summary.json) and `timed_steps` is 0."""
    records = read_metrics(out_dir / "metrics.jsonl") if (out_dir / "metrics.jsonl").exists() else []
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    skip = warmup_steps_excluded(len(step_times), cfg.train)
    timed = sorted(step_times[skip:])
    median = timed[len(timed) // 2] if timed else float("nan")
    return {
        "model": cfg.model.kind,
        "method": method.describe(),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": records[-1]["step"] if records else 0,
        "final_train_loss": records[-1]["train_loss"] if records else float("nan"),
        "final_val_loss": vals[-1] if vals else float("nan"),
        "unigram_entropy": unigram,
        "step_time_s": median,
        "tokens_per_s": cfg.train.batch_size * cfg.model.seq_len / median if timed else float("nan"),
        "timed_steps": len(timed),
        "warmup_steps_excluded": skip,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
