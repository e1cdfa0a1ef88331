"""Registry of gradient methods. Each entry is 'module:Class'; modules are imported on demand so a
method's optional dependencies (e.g. Triton) never slow down or break the others."""

from __future__ import annotations

import importlib
from typing import Any

from chainfree.errors import ConfigError
from chainfree.methods.base import Method, StepStats

METHODS: dict[str, str] = {
    "exact": "chainfree.methods.exact:Exact",
    "basis": "chainfree.methods.basis:Basis",
    "sus": "chainfree.methods.sus:Sus",
    "lbi": "chainfree.methods.lbi:LBI",
    "hbll": "chainfree.methods.hbll:HBLL",
    "flat_bll": "chainfree.methods.hbll:FlatBlockLocal",  # HBLL's baseline: block-local, no tree
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


def build_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Instantiate a method from its name and `method.<key>` parameters (validated, clear errors)."""
    from chainfree.config import build_dataclass

    cls = method_class(name)
    config = build_dataclass(cls.Config, dict(params or {}), "method")
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return cls(config)


__all__ = ["METHODS", "Method", "StepStats", "available_methods", "build_method", "method_class"]
