"""BASIS as a method: swap chosen nn.Linear layers (and whole MLPs) for sketching layers; training stays
`loss.backward()`.

    from chainfree.methods import basis
    basis.apply(model, rank=32)                                   # MLP Linears + LM head (the paper's set)
    basis.apply(model, compression=8)                             # R = batch*seq / 8 at every call
    basis.apply(model, basis.BasisConfig(rank=32, layers=["*.mlp.*", "*.attn.*_proj", "head"]))
    basis.apply(model, rank=32, filter_fn=lambda module, fqn: fqn.startswith("blocks.0."))

`apply` has the shape of torchao's `quantize_(model, config, filter_fn)`: a frozen config, a walker over
the module tree, and a filter `(module, fqn) -> bool` that is asked about every nn.Linear. It returns
the model (changed in place) and logs one line saying what was swapped (`summary(model)` rebuilds it).

Which layers by default: the paper sketches dense layers only (MLP projections and the LM head) and keeps
attention projections and embeddings exact. "MLP Linear" is decided from the module tree, not from one
naming scheme: a Linear inside a module named like an MLP (mlp, ffn, feed_forward, ...) or itself named
like an MLP projection (up, down, gate, fc1, fc2, c_fc, w1, w2, w3, gate_proj, up_proj, down_proj, ...),
outside attention. `layers` (fnmatch patterns; `*.mlp.up` also matches a top-level `mlp.up`) or
`filter_fn` choose otherwise. A selection that swaps nothing, a pattern that matches nothing, or one
that swaps only the head while the model has MLP Linears is refused with a ConfigError naming the
model's Linear layers.

Fusion (`fuse_mlp`, default): an MLP whose projections are all chosen becomes one fused layer that
keeps only its input and recomputes the hidden activations in backward: up -> GELU -> down becomes a
BasisMLP, down(silu(gate(x)) * up(x)) (transformers' LlamaMLP and friends) a BasisSwiGLU. A candidate
is fused only if its own forward gives the fused layer's output on a small random input (so a module
with dropout or extra terms is left to per-Linear swaps). Without fusion each projection becomes a
BasisLinear, and the activation's saved hidden tensors stay.

Applying twice to the same layers is refused ("BASIS is already applied to ..."; other layers may be added by a
second call); `remove(model)` (also `chainfree.remove`)
swaps every BASIS layer back for the module it replaced, so parameters, state_dict keys and outputs are the
original model's again. A model that is itself one MLP (up/act/down at the root) cannot replace itself, so
its projections are swapped one by one (unfused).

Tied embeddings: BasisLinear reuses the head's Parameter object, so the tie survives the swap and
autograd adds the head's sketched dW to the embedding's exact gradient in the same .grad.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chainfree.errors import ConfigError
from chainfree.methods.base import Method
from chainfree.nn.basis import BasisLinear, BasisMLP, BasisSwiGLU
from chainfree.ops.basis_linear import DEFAULT_RANK, check_params

log = logging.getLogger("chainfree.basis")

FilterFn = Callable[[nn.Module, str], bool]

HEAD_NAMES = ("head", "lm_head")
MLP_CONTAINERS = ("mlp", "ffn", "feed_forward", "feedforward", "ff", "fc", "mlp_block")
MLP_PROJECTIONS = ("up", "down", "gate", "fc1", "fc2", "fc_in", "fc_out", "c_fc", "w1", "w2", "w3", "gate_proj",
                   "up_proj", "down_proj", "wi", "wo", "dense_h_to_4h", "dense_4h_to_h", "gate_up_proj")
ATTENTION_PARTS = ("attn", "attention", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "qkv")
# state-space mixers (Mamba's in/out projections): neither attention nor MLP, not sketched by default
MIXER_PARTS = ("mixer", "in_proj", "out_proj", "x_proj", "dt_proj")
# (up, act, down) and (gate, up, down, act) attribute names of MLPs that can be fused.
GELU_MLPS = (("up", "act", "down"), ("fc1", "act", "fc2"), ("c_fc", "act", "c_proj"), ("fc_in", "act", "fc_out"))
SWIGLU_MLPS = (("gate_proj", "up_proj", "down_proj", "act_fn"), ("gate", "up", "down", "act"),
               ("w1", "w3", "w2", "act"), ("w1", "w3", "w2", "act_fn"))


@dataclass(frozen=True)
class BasisConfig:
    """`method.<key>` settings of BASIS (validated when built; give rank or compression, not both).

    rank: sketch rows R per layer and step (unset with compression unset: 32).
    compression: B*T/R; R = ceil(rows of the call / compression), so it follows batch and context.
    shrink: lambda, both sketches are multiplied by (1 - lambda) (the reference code's 0.01).
    layers: fnmatch patterns over module names; None = MLP Linears + LM head.
    scalars: keep the invariant scalars gamma (norm-preserving; False = the unbiased estimator).
    fuse_mlp: fuse whole MLPs (GELU or SwiGLU) into one layer that keeps only its input.
    """

    rank: int | None = None
    compression: float | None = None
    shrink: float = 0.01
    layers: list[str] | None = None
    scalars: bool = True
    fuse_mlp: bool = True

    def __post_init__(self) -> None:
        if self.rank is not None and self.compression is not None:
            raise ConfigError(f"set one of method.rank ({self.rank}) or method.compression ({self.compression}), "
                              "not both: compression = batch*seq / rank")
        try:
            check_params(self.sketch_kwargs()["rank"], self.shrink, self.compression)
        except ConfigError as e:
            raise ConfigError(f"method: {e}") from None
        if self.layers is not None and (not self.layers or not all(isinstance(p, str) and p for p in self.layers)):
            raise ConfigError(f"method.layers must be a non-empty list of module-name patterns (or unset), "
                              f"got {self.layers!r}")

    def sketch_kwargs(self) -> dict[str, Any]:
        """rank/compression/shrink/scalars as the BASIS layers take them (rank 32 when neither is set)."""
        rank = self.rank if self.rank is not None or self.compression is not None else DEFAULT_RANK
        return {"rank": rank, "compression": self.compression, "shrink": self.shrink, "scalars": self.scalars}


def _make_config(config: BasisConfig | dict[str, Any] | None, kwargs: dict[str, Any]) -> BasisConfig:
    from chainfree.config import build_dataclass  # config imports nothing from methods at module level

    if isinstance(kwargs.get("layers"), tuple):
        kwargs = {**kwargs, "layers": list(kwargs["layers"])}
    if isinstance(config, BasisConfig):
        return dataclasses.replace(config, **kwargs) if kwargs else config
    if config is not None and not isinstance(config, dict):
        raise ConfigError(f"basis.apply: config must be a BasisConfig or a dict, got {type(config).__name__}")
    return build_dataclass(BasisConfig, {**(config or {}), **kwargs}, "method")


def _parts(fqn: str) -> list[str]:
    return fqn.split(".") if fqn else []


def role(fqn: str) -> str:
    """'head', 'attention', 'mixer', 'mlp' or 'other' for a Linear with qualified name fqn."""
    parts = _parts(fqn)
    if parts and parts[-1] in HEAD_NAMES:
        return "head"
    if any(p in ATTENTION_PARTS for p in parts):
        return "attention"
    if any(p in MIXER_PARTS for p in parts):
        return "mixer"
    if any(p in MLP_CONTAINERS for p in parts[:-1]) or (parts and parts[-1] in MLP_PROJECTIONS):
        return "mlp"
    return "other"


def _pattern_match(fqn: str, pattern: str) -> bool:
    # "." + fqn lets "*.mlp.up" match a top-level "mlp.up" as well as "blocks.0.mlp.up"
    return fnmatchcase(fqn, pattern) or fnmatchcase("." + fqn, pattern)


def _describe(linears: list[str]) -> str:
    return ", ".join(linears[:10]) + (f" ... ({len(linears)} in all)" if len(linears) > 10 else "") if linears \
        else "none"


def _sketched(model: nn.Module) -> dict[str, str]:
    """The nn.Linear layers BASIS already sketches -> the BASIS layer that does it (a BasisLinear itself, or a
    fused BasisMLP / BasisSwiGLU for every Linear inside one)."""
    fused = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, BasisMLP | BasisSwiGLU)}
    out = {}
    for name, m in model.named_modules():
        owner = next((f"fused {kind}" for f, kind in fused.items() if name.startswith(f + ".")), None)
        if owner is not None and isinstance(m, nn.Linear):
            out[name] = owner
        elif isinstance(m, BasisLinear):
            out[name] = "BasisLinear"
    return out


def select(model: nn.Module, layers: list[str] | None, filter_fn: FilterFn | None) -> list[str]:
    """Qualified names of the nn.Linear layers to sketch (ConfigError for selections that are surely wrong).

    Linears BASIS already sketches are not candidates; a selection that names only those says that BASIS is
    already applied there."""
    if filter_fn is not None and layers is not None:
        raise ConfigError("basis.apply: give layers (patterns) or filter_fn, not both")
    sketched = _sketched(model)
    every = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    linears = {name: m for name, m in every.items() if name not in sketched}
    names = list(linears)

    def pick(pool: list[str]) -> list[str]:
        if filter_fn is not None:
            return [n for n in pool if filter_fn(every[n], n)]
        if layers is not None:
            return [n for n in pool if any(_pattern_match(n, p) for p in layers)]
        return [n for n in pool if role(n) in ("head", "mlp")]

    chosen = pick(names)
    unmatched = [p for p in layers or () if not any(_pattern_match(n, p) for n in names)]
    if sketched and (not chosen or unmatched):
        again = [n for n in pick(list(sketched)) if not unmatched or any(_pattern_match(n, p) for p in unmatched)]
        if again:
            kinds = " / ".join(sorted({sketched[n] for n in again}))
            raise ConfigError(f"BASIS is already applied to {_compact(again)} ({kinds}); apply it once, or undo it "
                              "first with chainfree.remove(model) to change its settings (fuse_mlp=False then sketches "
                              "an MLP's projections separately)")
    if not chosen:
        raise ConfigError(f"BASIS: no nn.Linear layer was selected; the model's Linear layers are: {_describe(names)}. "
                          "Pass layers=['*.mlp.*', 'head'] style patterns or a filter_fn(module, fqn).")
    if all(role(n) == "head" for n in chosen):
        missed = [n for n in names if n not in chosen and role(n) in (("mlp", "other") if layers is None and
                                                                          filter_fn is None else ("mlp",))]
        if missed:
            raise ConfigError(
                f"BASIS would sketch only the LM head ({', '.join(chosen)}) but the model has other Linear layers: "
                f"{_describe(missed)}. Name them with layers=[...] patterns or filter_fn=lambda module, fqn: ...")
    if unmatched:
        raise ConfigError(f"BASIS: method.layers pattern(s) {unmatched} match no nn.Linear; the model's Linear "
                          f"layers are: {_describe(names)}")
    return chosen


def _same_output(original: nn.Module, fused: nn.Module, in_features: int) -> bool:
    """Does the fused layer compute what the module's own forward computes? (small random input, no grad)"""
    weight = next(original.parameters())
    if weight.device.type == "meta":
        return True  # nothing to run; the structure matched
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, in_features, generator=g).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        try:
            a, b = original(x), fused(x)
        except Exception:  # noqa: BLE001 - a forward that needs more than x is not a plain MLP
            return False
    tol = 1e-6 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol))


def _fusable(module: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    """('gelu', names) or ('swiglu', names) when module's children look like a fusable MLP."""
    for names in GELU_MLPS:
        up, act, down = (getattr(module, n, None) for n in names)
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and isinstance(act, nn.GELU):
            return "gelu", names
    for names in SWIGLU_MLPS:
        gate, up, down, act = (getattr(module, n, None) for n in names)
        silu = isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU") or act is F.silu
        if all(isinstance(m, nn.Linear) for m in (gate, up, down)) and silu:
            return "swiglu", names
    return None


def apply(
    model: nn.Module,
    config: BasisConfig | dict[str, Any] | None = None,
    filter_fn: FilterFn | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Swap the chosen nn.Linear layers (whole MLPs when fusable) for BASIS layers, in place; returns model.

    config: a BasisConfig, a dict of its fields, or None; keyword arguments (rank=32, compression=8,
    layers=[...], shrink, scalars, fuse_mlp) override it. filter_fn(module, fqn) -> bool picks the
    Linear layers instead of `layers`. Logs a one-line summary (see `summary`).
    """
    cfg = _make_config(config, kwargs)
    sketch = cfg.sketch_kwargs()
    chosen = set(select(model, cfg.layers, filter_fn))
    if cfg.fuse_mlp:
        for name, module in list(model.named_modules()):
            if not name and _fusable(module):  # the root cannot replace itself: its Linears are swapped below
                log.info("basis.apply: the model itself is an MLP; its projections are sketched one by one (unfused)")
                continue
            if not (found := _fusable(module)):
                continue
            kind, names = found
            linears = [n for n in names if isinstance(getattr(module, n), nn.Linear)]
            fqns = [f"{name}.{n}" if name else n for n in linears]
            if not all(f in chosen for f in fqns):
                continue
            fused = (BasisMLP if kind == "gelu" else BasisSwiGLU)(module, names=names, **sketch)
            if not _same_output(module, fused, getattr(module, linears[0]).in_features):
                continue
            _replace(model, name, fused)
            chosen -= set(fqns)
    for name in sorted(chosen):  # (select leaves out Linears inside fused BASIS MLPs)
        _replace(model, name, BasisLinear.from_linear(model.get_submodule(name), **sketch))
    log.info(summary(model))
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ConfigError(f"basis.apply: the model itself is the selected {type(model).__name__}, which cannot replace "
                          "itself; wrap it in a module, or use BasisLinear.from_linear(model, rank=...)")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def basis_layers(model: nn.Module) -> list[str]:
    """Names of the BASIS layers in `model` (fused MLPs and BasisLinears outside them)."""
    fused = [n for n, m in model.named_modules() if isinstance(m, BasisMLP | BasisSwiGLU)]
    return fused + [n for n, m in model.named_modules() if isinstance(m, BasisLinear)
                    and not any(n.startswith(f + ".") for f in fused)]


def remove(model: nn.Module) -> int:
    """Swap every BASIS layer in `model` back for the module it replaced (in place); returns how many.

    The original modules come back holding the BASIS layers' current Parameters and children, so weights,
    ties, state_dict keys and the forward are the original model's. A no-op without BASIS layers."""
    names = basis_layers(model)
    for name in names:
        _replace(model, name, model.get_submodule(name).original())
    if names:
        log.info(f"BASIS removed: {len(names)} layer(s) restored")
    return len(names)


def _compact(names: list[str]) -> str:
    """'blocks.{0..11}.mlp' style summary of many similar names."""
    groups: dict[str, list[str]] = {}
    for n in names:
        key = ".".join("#" if p.isdigit() else p for p in n.split("."))
        groups.setdefault(key, []).append(n)
    out = []
    for key, members in groups.items():
        out.append(key.replace("#", "*") + (f" x{len(members)}" if len(members) > 1 else "") if "#" in key else key)
    return ", ".join(out)


def summary(model: nn.Module) -> str:
    """One line: how many BASIS layers of which kind, where, and the sketch size."""
    kinds: dict[str, list[str]] = {"BasisMLP": [], "BasisSwiGLU": [], "BasisLinear": []}
    first = None
    for name, module in model.named_modules():
        if isinstance(module, BasisMLP | BasisSwiGLU | BasisLinear):
            parent = name.rpartition(".")[0]
            if isinstance(module, BasisLinear) and parent and isinstance(model.get_submodule(parent),
                                                                         BasisMLP | BasisSwiGLU):
                continue
            kinds[type(module).__name__].append(name)
            first = first or module
    if first is None:
        return "BASIS: no layer swapped"
    size = f"rank {first.rank}" if first.rank is not None else f"compression {first.compression:g}"
    n_linear = 2 * len(kinds["BasisMLP"]) + 3 * len(kinds["BasisSwiGLU"]) + len(kinds["BasisLinear"])
    parts = [f"{k} {len(v)} ({_compact(v)})" for k, v in kinds.items() if v]
    return f"BASIS ({size}): {n_linear} Linear layers sketched -- " + "; ".join(parts)


class Basis(Method):
    """BASIS: sketched dW for the chosen dense layers, exact dX, default autograd step."""

    name = "basis"
    Config = BasisConfig

    def prepare(self, model: nn.Module) -> nn.Module:
        return apply(model, self.config)
