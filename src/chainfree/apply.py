"""`chainfree.apply(model, method, **config)`: prepare a model for your own training loop.

    import chainfree
    model = chainfree.apply(model, "sus", c=32)        # attention backward by SUS (exact forward)
    model = chainfree.apply(model, "basis", rank=32)   # MLP (SwiGLU or GELU) + head weight grads sketched

For people who keep their trainer (Hugging Face Trainer, Lightning, a plain loop): the model keeps its
forward, loss and parameter names, so the optimizer, schedule and checkpoints of that trainer work
unchanged; only the gradients that `loss.backward()` produces differ. Works on a transformers
`PreTrainedModel` (SUS through transformers' attention registry, BASIS on its MLP projections, e.g.
LLaMA's gate/up/down fused into one SwiGLU layer that keeps only its input) and on chainfree's own
models. `config` takes the method's `method.<key>` settings (the same names as `--set method.<key>=`),
checked by the method's own Config: a typo fails with the key's name.

Wrapped models: a PEFT model (LoRA or any tuner), DDP / DataParallel and torch.compile wrappers are looked
through (`unwrap`), so SUS reaches the transformers model inside in either order (`apply` then
`get_peft_model`, or the other way round); BASIS walks the whole module tree and works in both orders too.

Undo: `chainfree.remove(model)` -- or `chainfree.apply(model, "exact")` -- restores what was there before:
the attention implementation SUS replaced and every module BASIS swapped, with the same Parameters, so
weights, state_dict keys and outputs are the original model's.

Methods that rebuild the network and own their training step (LBI, HBLL) are not layer swaps, so they
cannot be applied to an existing model; they train through `chainfree train`.
"""

from __future__ import annotations

import sys
import types
from functools import partial
from typing import Any

from torch import nn

from chainfree.errors import ConfigError

LAYER_SWAPS = ("exact", "sus", "basis")
UNDO = "_chainfree_undo"  # instance attribute of the (unwrapped) model: what `remove` restores


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside training wrappers: PEFT (PeftModel -> its base model; a tuner such as LoraModel ->
    `.model`), DistributedDataParallel / DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    for _ in range(16):  # wrappers nest a few deep at most
        inner = None
        if callable(getattr(type(model), "get_base_model", None)):  # peft.PeftModel and its task subclasses
            inner = model.get_base_model()
        elif type(model).__module__.startswith("peft.") and isinstance(getattr(model, "model", None), nn.Module):
            inner = model.model  # a peft tuner (LoraModel, ...) passed directly
        elif isinstance(model, DistributedDataParallel | DataParallel):
            inner = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner = model._orig_mod
        if inner is None or inner is model:
            return model
        model = inner
    return model


def _is_transformers(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def apply(model: nn.Module, method: str, **config: Any) -> nn.Module:
    """Prepare `model` (in place) so that `loss.backward()` computes `method`'s gradients; returns it.

    method: 'exact' (undo: `remove(model)`), 'sus' (c, variant, backend), 'basis' (rank or compression,
    shrink, layers, scalars, fuse_mlp; plus filter_fn(module, fqn) -> bool to pick Linear layers yourself).
    PEFT / DDP / torch.compile wrappers are looked through; the wrapper you passed is returned.
    """
    from chainfree.methods import method_config

    if not isinstance(model, nn.Module):
        raise ConfigError(f"chainfree.apply needs a torch.nn.Module, got {type(model).__name__}")
    if method not in LAYER_SWAPS:
        if method in ("lbi", "hbll", "flat_bll"):
            raise ConfigError(
                f"chainfree.apply: {method!r} rebuilds the network and owns its training step, so it cannot be "
                f"applied to an existing model; train with `chainfree train --method {method}` "
                f"(apply supports {', '.join(LAYER_SWAPS)})"
            )
        raise ConfigError(f"chainfree.apply: unknown method {method!r}; choose one of {', '.join(LAYER_SWAPS)}")
    if method == "exact":
        if config:
            raise ConfigError(f"chainfree.apply: 'exact' takes no settings, got {', '.join(config)}")
        return remove(model)
    if method == "basis":
        from chainfree.methods import basis

        filter_fn = config.pop("filter_fn", None)
        return basis.apply(model, method_config("basis", config), filter_fn=filter_fn)
    cfg = method_config("sus", config)
    target = unwrap(model)
    before = _attention_state(target)
    if _is_transformers(target):
        _sus_transformers(target, cfg)
    else:
        from chainfree.methods.sus import Sus

        Sus(cfg).prepare(target)
    target.__dict__.setdefault(UNDO, {}).setdefault("sus", before)  # a second apply keeps the first original
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply` in place and return the model: the attention SUS replaced comes back, and every BASIS
    layer is swapped back for the module it replaced (same Parameters: weights, ties and state_dict keys are
    unchanged). Looks through PEFT / DDP / compile wrappers like `apply`; a model without chainfree
    changes is returned as is."""
    from chainfree.methods import basis

    if not isinstance(model, nn.Module):
        raise ConfigError(f"chainfree.remove needs a torch.nn.Module, got {type(model).__name__}")
    target = unwrap(model)
    state = target.__dict__.pop(UNDO, {}).get("sus")
    if state is not None:
        _restore_attention(target, state)
    basis.remove(model)
    return model


def _attention_state(model: nn.Module) -> tuple[str, Any]:
    """What SUS is about to replace: a transformers attention implementation (of the model or of the
    transformers model a chainfree wrapper holds as `.hf`), or each attention module's `attn_fn`."""
    if _is_transformers(model):
        return "hf", model.config._attn_implementation
    if _is_transformers(getattr(model, "hf", None)):
        return "hf_child", model.hf.config._attn_implementation
    return "fns", {name: m.attn_fn for name, m in model.named_modules() if hasattr(m, "attn_fn")}


def _restore_attention(model: nn.Module, state: tuple[str, Any]) -> None:
    kind, value = state
    if kind == "hf":
        model.set_attn_implementation(value)
    elif kind == "hf_child":
        model.hf.set_attn_implementation(value)
    else:
        for name, fn in value.items():
            model.get_submodule(name).attn_fn = fn


def _sus_transformers(model: nn.Module, cfg: Any) -> nn.Module:
    """SUS in every attention layer of a transformers model, through its attention registry."""
    from chainfree.integrations.hf import register_attention_function
    from chainfree.ops.sus import sus_attention

    for key in ("attention_dropout", "attn_pdrop"):
        value = getattr(model.config, key, 0.0)
        if isinstance(value, float) and value > 0:
            raise ConfigError(
                f"SUS needs attention dropout 0 (SUS is itself the noise); the model config has {key}={value}: "
                f"set model.config.{key} = 0.0 before chainfree.apply"
            )
    fn = partial(sus_attention, c=cfg.keep_rate, variant=cfg.variant, backend=cfg.backend, tile=cfg.tile,
                 proposal=cfg.proposal)  # fmt: skip
    name = register_attention_function(fn, f"chainfree_sus_{id(model)}", label="SUS attention")
    model.set_attn_implementation(name)
    return model


class _CallableModule(types.ModuleType):
    """`chainfree.apply` is both this module and the function: importing the submodule makes the package
    attribute `chainfree.apply` the module, so the module itself calls `apply`."""

    def __call__(self, model: nn.Module, method: str, **config: Any) -> nn.Module:
        return apply(model, method, **config)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["LAYER_SWAPS", "apply", "remove", "unwrap"]
