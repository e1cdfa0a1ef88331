"""The model factory: one `build_model(cfg)` keyed by `model.kind`, so every experiment -- language
model, vision net, character RNN, pretrained checkpoint -- is built in one place and trains in the one
Trainer instead of forking the loop.

Each kind maps to a builder 'module:function' taking the ModelConfig; the module is imported only when
that kind is built, so `import chainfree.models` stays light and optional dependencies stay optional. A
new kind registers here (or through `register_model_kind`) and, when it needs settings of its own, adds
them to ModelConfig with a check in `ModelConfig.validate`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from chainfree.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from chainfree.config import ModelConfig

# kind -> "module:builder"; builder(cfg: ModelConfig) -> nn.Module
MODEL_BUILDERS: dict[str, str] = {
    "gpt": "chainfree.models.lm:LanguageModel",
    "mamba2": "chainfree.models.lm:LanguageModel",
    "mamba3": "chainfree.models.lm:LanguageModel",
    "hybrid": "chainfree.models.lm:LanguageModel",
    "vision": "chainfree.models:_build_vision",
    "char_rnn": "chainfree.models:_build_char_rnn",
    "hf": "chainfree.models.hf:build",  # pretrained transformers causal LM
}


def register_model_kind(kind: str, target: str) -> None:
    """Make `model.kind = kind` build with `target` ('module:callable' taking the ModelConfig)."""
    MODEL_BUILDERS[kind] = target


def model_builder(kind: str) -> Any:
    if kind not in MODEL_BUILDERS:
        raise ConfigError(f"model.kind {kind!r} is unknown; choose one of {', '.join(MODEL_BUILDERS)}")
    module, name = MODEL_BUILDERS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The (unseeded, CPU, float32) model of a ModelConfig; seeding, dtype and device are the caller's."""
    return model_builder(cfg.kind)(cfg)


def _build_vision(cfg: ModelConfig) -> nn.Module:
    """Residual MLP classifier: in_features -> d_model, n_layers blocks of width mlp_hidden (0 = 2 d)."""
    from chainfree.models.vision import VisionNet

    return VisionNet(cfg.in_features, cfg.n_classes, d=cfg.d_model, n_layers=cfg.n_layers,
                     hidden=cfg.mlp_hidden)


def _build_char_rnn(cfg: ModelConfig) -> nn.Module:
    """One-layer character GRU of width d_model over vocab_size symbols (0 = bytes, 256)."""
    from chainfree.models.char_rnn import CharGRU

    model = CharGRU(cfg.vocab_size or 256, cfg.d_model)
    model.seq_len = cfg.seq_len  # the time tree of method hbll_time is shaped by it
    return model


__all__ = ["MODEL_BUILDERS", "build_model", "model_builder", "register_model_kind"]
