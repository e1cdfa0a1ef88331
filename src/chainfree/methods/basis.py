"""BASIS as a method: swap chosen nn.Linear layers for BasisLinear; training stays `loss.backward()`.

    from chainfree.methods import basis
    basis.apply(model, rank=32)          # MLP up/down + LM head, as in the paper
    basis.apply(model, rank=32, layers=["*.mlp.*", "*.attn.*_proj", "head"])   # attention too

Which layers: the paper sketches dense layers only (MLP projections and the LM head) and keeps
attention projections and embeddings exact; `layers` (fnmatch patterns over module names such as
`blocks.3.mlp.up`) makes that a choice. Memory only drops if nothing else keeps a layer's input
alive: in our pre-LN MLP (LN -> up -> GELU -> down) GELU saves its input h, not GELU(h), and
LayerNorm saves its own input, so once both projections are BasisLinear neither the LN output nor
GELU(h) is saved by anyone (tests/test_basis.py checks this with saved_tensors_hooks) -- but h
(4d per token) still is. With `fuse_mlp` (default) an MLP whose two projections are both chosen
becomes one BasisMLP that keeps only its input u (d per token, compute dtype) and recomputes h in
backward: 4x less than h, paid by one GEMM out of the two dW GEMMs BASIS removes.

Tied embeddings: BasisLinear reuses the head's Parameter object, so the tie survives the swap and
autograd adds the head's sketched dW to the embedding's exact (index-add) gradient in the same
.grad, which is an unbiased-plus-exact estimate of the true total (exact when R = B, shrink = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from chainfree.errors import ConfigError
from chainfree.methods.base import Method
from chainfree.models.mlp import MLP
from chainfree.ops.basis_linear import BasisLinear, BasisMLP, check_params

# The paper's choice: MLP projections (blocks.N.mlp.up / .down) and the LM head.
DEFAULT_LAYERS: tuple[str, ...] = ("*.mlp.up", "*.mlp.down", "head")


def apply(
    model: nn.Module,
    rank: int = 32,
    shrink: float = 0.01,
    layers: list[str] | tuple[str, ...] | None = None,
    scalars: bool = True,
    fuse_mlp: bool = True,
) -> nn.Module:
    """Replace every nn.Linear whose qualified name matches `layers` by a BasisLinear, in place.

    rank: sketch rows R per layer (R >= rows of a batch falls back to R = rows).
    shrink: lambda, both sketches are multiplied by (1 - lambda) (the reference code's 0.01).
    layers: fnmatch patterns over module names; None = DEFAULT_LAYERS (the paper's set).
    scalars: keep the invariant scalars gamma (norm-preserving; False = unbiased estimator).
    fuse_mlp: an MLP (chainfree.models.mlp.MLP) with both `up` and `down` chosen becomes a BasisMLP.
    Returns the same model object. Raises ConfigError when no nn.Linear matches.
    """
    check_params(rank, shrink)
    patterns = list(DEFAULT_LAYERS if layers is None else layers)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"method.layers must be a non-empty list of module-name patterns, got {layers!r}")
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen = [name for name in linears if any(fnmatchcase(name, p) for p in patterns)]
    if not chosen:
        shown = ", ".join(linears[:12]) + (" ..." if len(linears) > 12 else "") if linears else "none"
        raise ConfigError(
            f"BASIS: no nn.Linear layer matches method.layers={patterns}; the model's Linear layers are: "
            f"{shown}. Pass patterns such as '*.mlp.up' or 'head'."
        )
    sketch = {"rank": rank, "shrink": shrink, "scalars": scalars}
    if fuse_mlp:
        mlps = [name for name, module in model.named_modules() if type(module) is MLP or type(module) is BasisMLP]
        for name in mlps:
            up, down = f"{name}.up", f"{name}.down"
            if up in chosen and down in chosen:
                mlp = model.get_submodule(name)
                _replace(model, name, BasisMLP(mlp, **sketch))
                chosen = [n for n in chosen if n not in (up, down)]
    for name in chosen:
        parent_name = name.rpartition(".")[0]
        if parent_name and isinstance(model.get_submodule(parent_name), BasisMLP):
            raise ConfigError(f"{name} is part of a fused BasisMLP; re-apply with fuse_mlp=True to change it")
        _replace(model, name, BasisLinear.from_linear(model.get_submodule(name), **sketch))
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


@dataclass
class BasisConfig:
    """`method.<key>` settings of BASIS."""

    rank: int = 32
    shrink: float = 0.01
    layers: list[str] | None = None
    scalars: bool = True
    fuse_mlp: bool = True

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"method.rank must be >= 1 (sketch rows per layer, e.g. 32), got {self.rank}")
        if not 0.0 <= self.shrink < 1.0:
            raise ConfigError(f"method.shrink must be in [0, 1) (the paper's code uses 0.01), got {self.shrink}")
        if self.layers is not None and not self.layers:
            raise ConfigError("method.layers must be a non-empty list of patterns (or unset for the paper's set)")


class Basis(Method):
    """BASIS (SPEC §1): sketched dW for the chosen dense layers, exact dX, default autograd step."""

    name = "basis"
    Config = BasisConfig

    def prepare(self, model: nn.Module) -> nn.Module:
        c = self.config
        return apply(model, rank=c.rank, shrink=c.shrink, layers=c.layers, scalars=c.scalars, fuse_mlp=c.fuse_mlp)
