"""Registry of gradient methods. Each entry is 'module:Class'; modules are imported on demand so a
method's optional dependencies (e.g. Triton) never slow down or break the others. Each method class
declares its own typed settings (`Config`, a dataclass with `validate`), which `method_config` builds
from the [method] section."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from chainfree.config import RunConfig, build_dataclass
from chainfree.errors import ConfigError

if TYPE_CHECKING:
    from chainfree.methods.base import Launch, Method, StepStats


def __getattr__(name: str) -> Any:
    """Method, StepStats and Launch load chainfree.methods.base (and torch) on first use, so listing the
    registry (`chainfree --help`) stays light."""
    if name in ("Launch", "Method", "StepStats"):
        from chainfree.methods import base

        return getattr(base, name)
    raise AttributeError(f"module 'chainfree.methods' has no attribute {name!r}")


METHODS: dict[str, str] = {
    "exact": "chainfree.methods.exact:Exact",
    "basis": "chainfree.methods.basis:Basis",
    "sus": "chainfree.methods.sus:Sus",
    "lbi": "chainfree.methods.lbi:LBI",
    "hbll": "chainfree.methods.hbll:HBLL",
    "flat_bll": "chainfree.methods.hbll:FlatBlockLocal",  # HBLL's baseline: block-local, no tree
    "hbll_time": "chainfree.methods.hbll_rnn:HBLLTime",  # HBLL over time (model.kind = char_rnn)
    "tbptt": "chainfree.methods.hbll_rnn:TBPTT",  # truncated BPTT, its baseline (model.kind = char_rnn)
}


def available_methods() -> list[str]:
    """Methods whose module is present in this installation."""
    found = []
    for name, target in METHODS.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            found.append(name)
    return found


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method.name {name!r} is unknown; choose one of {', '.join(METHODS)}")
    module_name, cls_name = METHODS[name].split(":")
    if importlib.util.find_spec(module_name) is None:
        raise ConfigError(
            f"method.name {name!r} is not available in this version; available: {', '.join(available_methods())}"
        )
    return getattr(importlib.import_module(module_name), cls_name)


def method_config(name: str, params: dict[str, Any] | None = None) -> Any:
    """The method's own typed Config built from `method.<key>` parameters and validated: the one place
    method settings are checked (unknown keys, wrong types and impossible values name the key)."""
    cls = method_class(name)
    config = build_dataclass(cls.Config, dict(params or {}), "method")
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def build_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Instantiate a method from its name and `method.<key>` parameters (validated, clear errors)."""
    return method_class(name)(method_config(name, params))


def method_from_config(cfg: RunConfig) -> Method:
    """The method of a run's [method] section."""
    return build_method(cfg.method_name, cfg.method_params)


__all__ = ["METHODS", "Launch", "Method", "StepStats", "available_methods", "build_method", "method_class",
           "method_config", "method_from_config"]
