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


def _is_transformers(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def apply(model: nn.Module, method: str, **config: Any) -> nn.Module:
    """Prepare `model` (in place) so that `loss.backward()` computes `method`'s gradients; returns it.

    method: 'exact' (unchanged), 'sus' (c, variant, backend), 'basis' (rank or compression, shrink,
    layers, scalars, fuse_mlp; plus filter_fn(module, fqn) -> bool to pick Linear layers yourself).
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
        return model
    if method == "basis":
        from chainfree.methods import basis

        filter_fn = config.pop("filter_fn", None)
        return basis.apply(model, method_config("basis", config), filter_fn=filter_fn)
    cfg = method_config("sus", config)
    if _is_transformers(model):
        return _sus_transformers(model, cfg)
    from chainfree.methods.sus import Sus

    return Sus(cfg).prepare(model)


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
    fn = partial(sus_attention, c=cfg.c, variant=cfg.variant, backend=cfg.backend)
    name = register_attention_function(fn, f"chainfree_sus_{id(model)}", label="SUS attention")
    model.set_attn_implementation(name)
    return model


class _CallableModule(types.ModuleType):
    """`chainfree.apply` is both this module and the function: importing the submodule makes the package
    attribute `chainfree.apply` the module, so the module itself calls `apply`."""

    def __call__(self, model: nn.Module, method: str, **config: Any) -> nn.Module:
        return apply(model, method, **config)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["LAYER_SWAPS", "apply"]
