"""Swap-in BASIS layers: BasisLinear (any nn.Linear, also an LM head), BasisMLP (up -> GELU -> down) and
BasisSwiGLU (down(silu(gate(x)) * up(x)), LLaMA's MLP), built on the Functions of chainfree.ops.basis_linear.

Each layer holds the original nn.Linear Parameters under the original attribute names, so parameters and
state_dict keys do not change (checkpoints load either way, a tied head stays tied). The sketched path runs
only when a weight gradient will be needed (grad mode on and a weight trainable); otherwise (eval,
no_grad, frozen weights) the layer is the plain module and saves nothing extra.

Undo: a layer made from an existing module keeps a reference to it (not a registered submodule, so neither
parameters nor state_dict keys change), and `original()` gives that module back holding the layer's current
Parameters and children -- `chainfree.remove` / `basis.remove` swap it back in.

Sketch size: `rank` (R rows) or `compression` (R = ceil(rows / compression), resolved from each call's
batch x sequence rows); exactly one of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chainfree.ops.basis_cross_entropy import basis_linear_cross_entropy
from chainfree.ops.basis_linear import (
    BasisLinearFunction,
    BasisMLPFunction,
    BasisSwiGLUFunction,
    check_params,
)
from chainfree.ops.cross_entropy import linear_cross_entropy

ORIGINAL = "_chainfree_original"  # instance attribute (outside _modules) holding the replaced module


class _Sketched:
    """The sketch settings shared by the BASIS layers."""

    rank: int | None
    compression: float | None
    shrink: float
    scalars: bool

    def _set_sketch(self, rank: int | None, compression: float | None, shrink: float, scalars: bool) -> None:
        check_params(rank, shrink, compression)
        self.rank, self.compression, self.shrink, self.scalars = rank, compression, shrink, scalars

    def _sketch_args(self) -> tuple:
        return self.rank, self.compression, self.shrink, self.scalars

    def _sketch_repr(self) -> str:
        size = f"rank={self.rank}" if self.rank is not None else f"compression={self.compression:g}"
        return f"{size}, shrink={self.shrink}, scalars={self.scalars}"


class BasisLinear(nn.Linear, _Sketched):
    """nn.Linear whose weight gradient comes from a sketch of its input (BASIS); dX and db exact."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 rank: int | None = None, compression: float | None = None, shrink: float = 0.01,
                 scalars: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._set_sketch(rank, compression, shrink, scalars)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int | None = None, compression: float | None = None,
                    shrink: float = 0.01, scalars: bool = True) -> BasisLinear:
        """Wrap an existing Linear, sharing its Parameter objects (keeps weight tying intact)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  rank=rank, compression=compression, shrink=shrink, scalars=scalars)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        new.__dict__[ORIGINAL] = linear
        return new

    def original(self) -> nn.Linear:
        """The nn.Linear this layer replaced (a plain one when it was built directly), holding this layer's
        current weight and bias Parameters (a tie survives) and training mode."""
        linear = self.__dict__.get(ORIGINAL)
        if linear is None:
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return BasisLinearFunction.apply(x, self.weight, self.bias, *self._sketch_args())
        return F.linear(x, self.weight, self.bias)

    def linear_cross_entropy(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean CE with this layer as an LM head, chunked (no full logits); LanguageModel.loss calls it.

        The CE backward needs h itself, so as a head BASIS saves compute (the N x V x d dW GEMM), not
        memory; see chainfree.ops.basis_cross_entropy.
        """
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return basis_linear_cross_entropy(h, self.weight, self.bias, targets, self.rank, self.shrink,
                                              self.scalars, compression=self.compression)
        return linear_cross_entropy(h, self.weight, self.bias, targets)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sketch_repr()}"


def _restored(fused: nn.Module) -> nn.Module:
    """The module a fused BASIS MLP replaced, with the fused layer's current children and training mode."""
    mlp = fused.__dict__[ORIGINAL]
    for name in fused.names:
        setattr(mlp, name, getattr(fused, name))
    mlp.train(fused.training)
    return mlp


def _trainable(*linears: nn.Module) -> bool:
    """Whether the fused sketched path runs: a weight gradient is needed and every projection is still a plain
    nn.Linear (one wrapped after BASIS, e.g. by PEFT LoRA, runs its own forward so its adapter is not skipped)."""
    return (torch.is_grad_enabled() and all(isinstance(lin, nn.Linear) for lin in linears)
            and any(lin.weight.requires_grad for lin in linears))


class BasisMLP(nn.Module, _Sketched):
    """Fused BASIS MLP up -> GELU -> down: keeps only its input u and the sketches (BasisMLPFunction).

    `names` are the attribute names of the original module's (up, act, down), kept so that the
    state_dict keys do not change (chainfree's MLP: up/act/down; GPT-2 style: c_fc/act/c_proj).
    """

    def __init__(self, mlp: nn.Module, *, names: tuple[str, str, str] = ("up", "act", "down"),
                 rank: int | None = None, compression: float | None = None, shrink: float = 0.01,
                 scalars: bool = True) -> None:
        super().__init__()
        self._set_sketch(rank, compression, shrink, scalars)
        up, act, down = (getattr(mlp, n) for n in names)
        if not (isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and isinstance(act, nn.GELU)):
            raise TypeError("BasisMLP needs an MLP with nn.Linear up/down projections and an nn.GELU activation")
        self.names = names
        for name, module in zip(names, (up, act, down), strict=True):
            setattr(self, name, module)
        self.train(mlp.training)
        self.__dict__[ORIGINAL] = mlp

    def original(self) -> nn.Module:
        """The MLP module this layer replaced, holding this layer's current children (e.g. LoRA wrappers)."""
        return _restored(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, act, down = (getattr(self, n) for n in self.names)
        if _trainable(up, down):
            return BasisMLPFunction.apply(x, up.weight, up.bias, down.weight, down.bias, *self._sketch_args(),
                                          act.approximate)
        return down(act(up(x)))

    def extra_repr(self) -> str:
        return f"{self._sketch_repr()}, fused=True"


class BasisSwiGLU(nn.Module, _Sketched):
    """Fused BASIS SwiGLU MLP down(silu(gate(x)) * up(x)): keeps only its input and the sketches.

    `names` are the original attribute names of (gate, up, down, act): transformers' LlamaMLP uses
    gate_proj/up_proj/down_proj/act_fn. The activation module is kept (it has no parameters) so the
    module tree looks the same.
    """

    def __init__(self, mlp: nn.Module, *, names: tuple[str, str, str, str] = ("gate_proj", "up_proj", "down_proj",
                                                                               "act_fn"),
                 rank: int | None = None, compression: float | None = None, shrink: float = 0.01,
                 scalars: bool = True) -> None:
        super().__init__()
        self._set_sketch(rank, compression, shrink, scalars)
        modules = [getattr(mlp, n) for n in names]
        if not all(isinstance(m, nn.Linear) for m in modules[:3]):
            raise TypeError("BasisSwiGLU needs nn.Linear gate/up/down projections")
        self.names = names
        for name, module in zip(names, modules, strict=True):
            setattr(self, name, module)
        self.train(mlp.training)
        self.__dict__[ORIGINAL] = mlp

    def original(self) -> nn.Module:
        """The MLP module this layer replaced, holding this layer's current children (e.g. LoRA wrappers)."""
        return _restored(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names[:3])
        if _trainable(gate, up, down):
            return BasisSwiGLUFunction.apply(x, gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias,
                                             *self._sketch_args())
        return down(F.silu(gate(x)) * up(x))

    def extra_repr(self) -> str:
        return f"{self._sketch_repr()}, fused=True"
