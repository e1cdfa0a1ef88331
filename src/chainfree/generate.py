"""Autoregressive generation for every LanguageModel kind (gpt, mamba2, mamba3, hybrid).

Each block carries its own recurrent state: the KV cache for attention blocks, the conv window + SSM state
(+ rotation angle and previous input for Mamba-3) for Mamba blocks. Every block kind implements
    init_state(batch, device, dtype) -> state
    prefill(x [B, T, d]) -> (y [B, T, d], state)     parallel pass over a prompt
    step(x_t [B, d], state) -> (y_t [B, d], state)   one token, O(1) work for Mamba blocks
so a prompt costs one parallel forward and each new token one step. Tests check that stepping reproduces
the parallel forward's logits (float64) for all four kinds.

Beyond model.seq_len: Mamba blocks run on without limit; attention blocks keep a growing KV cache and
extrapolate RoPE past the trained length (quality there is untested).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from chainfree.errors import ConfigError
from chainfree.models.lm import LanguageModel


def init_states(model: LanguageModel, batch: int, device: torch.device | str, dtype: torch.dtype) -> list[Any]:
    return [block.init_state(batch, device, dtype) for block in model.blocks]


@torch.no_grad()
def prefill(model: LanguageModel, ids: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    """Parallel pass over `ids` [B, T]; returns (logits of the last position [B, V], per-block states)."""
    x = model.embed(ids)
    states = []
    for block in model.blocks:
        x, state = block.prefill(x)
        states.append(state)
    return model.logits(model.norm(x[:, -1])), states


@torch.no_grad()
def step(model: LanguageModel, token: torch.Tensor, states: list[Any]) -> tuple[torch.Tensor, list[Any]]:
    """Feed one token per sequence (`token` [B]); returns (next-token logits [B, V], new states)."""
    x = model.embed(token)
    new_states = []
    for block, state in zip(model.blocks, states, strict=True):
        x, state = block.step(x, state)
        new_states.append(state)
    return model.logits(model.norm(x)), new_states


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    """temperature 0 = greedy; otherwise softmax(logits / temperature) restricted to the top_k tokens."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, max_new_tokens: int) -> None:
    """Refuse sampling settings that have no meaning, with one line naming the option and its range."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0 = greedy, 1 = the model's own "
                          f"distribution), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be >= 1 (1 = greedy; omit it to sample from every token), got {top_k}")
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue `prompt_ids` ([T] or [B, T], at least one token) by `max_new_tokens` sampled tokens.
    Returns prompt + continuation with the prompt's shape convention ([T + n] or [B, T + n])."""
    check_sampling(temperature, top_k, max_new_tokens)
    squeeze = prompt_ids.dim() == 1
    ids = prompt_ids[None] if squeeze else prompt_ids
    if ids.shape[-1] == 0:
        raise ValueError("the prompt must contain at least one token")
    model = generation_model(model)
    cached = getattr(model, "generate_tokens", None)  # a pretrained model decodes with its own KV cache
    if cached is not None:
        result = cached(ids, max_new_tokens, temperature, top_k, generator)
        return result[0] if squeeze else result
    if not _has_recurrent_state(model):
        result = _generate_by_forward(model, ids, max_new_tokens, temperature, top_k, generator)
        return result[0] if squeeze else result
    was_training = model.training
    model.eval()
    try:
        ids = ids.to(model.embed.weight.device)
        logits, states = prefill(model, ids)
        out = [ids]
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_k, generator)
            out.append(token[:, None])
            if i + 1 < max_new_tokens:
                logits, states = step(model, token, states)
    finally:
        model.train(was_training)
    result = torch.cat(out, dim=1)
    return result[0] if squeeze else result


def generation_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module that samples: a method's wrapper (HBLL tree, LBI regions) names it through
    `generation_model()`, or raises ConfigError saying why it cannot generate; any other model samples itself."""
    resolve = getattr(model, "generation_model", None)
    return resolve() if resolve is not None else model


def decode_path(model: torch.nn.Module) -> str:
    """How `generate` produces each new token for `model`, in words (printed by `chainfree generate`):
    a KV cache (pretrained models), per-block recurrent states (chainfree's GPT, Mamba and hybrid models:
    one parallel prefill, then one O(1)-state step per token), or, for a model without either, a full
    forward over the window per token."""
    model = generation_model(model)
    if getattr(model, "generate_tokens", None) is not None:
        return "KV cache"
    if _has_recurrent_state(model):
        return "prefill + per-block KV cache / recurrent state"
    ctx = int(getattr(model, "max_context", 0)) or None
    window = f"the last {ctx} tokens" if ctx else "all tokens so far"
    return f"full forward over {window} per token (this model has no decode state)"


def _has_recurrent_state(model: torch.nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return hasattr(model, "embed") and blocks is not None and all(hasattr(b, "prefill") for b in blocks)


@torch.no_grad()
def _generate_by_forward(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, temperature: float,
                         top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """Sampling from a causal model without per-block states (e.g. an LBI model): every new token re-runs
    the forward over the last `model.max_context` tokens, right-padded to that length when the model asks
    (`pad_to_context`; causality makes the padding invisible to the positions before it)."""
    ctx = int(getattr(model, "max_context", 0)) or None
    pad = bool(getattr(model, "pad_to_context", False)) and ctx is not None
    was_training = model.training
    model.eval()
    try:
        ids = ids.to(next(model.parameters()).device)
        for _ in range(max_new_tokens):
            window = ids[:, -ctx:] if ctx else ids
            n = window.shape[1]
            inp = torch.cat([window, window.new_zeros(window.shape[0], ctx - n)], dim=1) if pad and n < ctx else window
            logits = model(inp)[:, n - 1]
            ids = torch.cat([ids, sample(logits, temperature, top_k, generator)[:, None]], dim=1)
    finally:
        model.train(was_training)
    return ids


def _not_a_run(out_dir: Path) -> ConfigError:
    """The error for a folder without a trained run; names the run folders below it when there are any
    (`chainfree compare --out DIR` writes one run per method into DIR/<method>/)."""
    runs = sorted(p.name for p in out_dir.glob("*") if (p / "config.toml").is_file() and (p / "checkpoint").is_dir())
    if runs:
        return ConfigError(f"{out_dir} holds the runs {', '.join(runs)}, not one run; pass one of them, "
                           f"e.g. --out {out_dir / runs[0]}")
    return ConfigError(f"{out_dir} holds no trained run (config.toml + checkpoint/); train one with "
                       f"`chainfree train --out {out_dir}` first")


def load_trained(out_dir: Path, device: str = "auto") -> tuple[LanguageModel, Any]:
    """(model, tokenizer) of a `chainfree train --out DIR` run, from DIR/config.toml and its checkpoint,
    read through the verified reader (`chainfree.checkpoint.load_model_state`: SHA-256 of every file)."""
    from chainfree.checkpoint import has_checkpoint, load_model_state
    from chainfree.config import load_config
    from chainfree.errors import CheckpointError
    from chainfree.train import build_run

    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint"
    if not (out_dir / "config.toml").is_file() or not has_checkpoint(ckpt):
        raise _not_a_run(out_dir)
    state, _ = load_model_state(ckpt)  # verified before any model is built
    from chainfree.runtime import resolve_device

    dev = resolve_device(device)
    cfg = load_config(out_dir / "config.toml", [f'train.device="{dev}"'])
    data, model, _ = build_run(cfg, dev)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint in {ckpt} does not fit the model of {out_dir / 'config.toml'}: "
                              f"{str(e).splitlines()[0]}") from None
    return model, data.tokenizer
