"""Stacked execution: k same-structure modules stored as one [k, ...] parameter per tensor and applied to k
inputs in one call.

Why: a method that evaluates many independent copies of a block at once (HBLL's tree rounds: leaves or
shortcuts of one level) pays one kernel launch per op instead of k, and its optimizer walks one tensor per
parameter name instead of k.

Two ways to run the k members (`stacked_apply`):
  * a batched forward: the same ops as the module's forward with a leading member dimension (linears as
    (b)addbmm, attention on k*B sequences with the block's own attention function). Torch building blocks
    (Sequential, Linear, LayerNorm, elementwise activations) are batched here; a model block opts in by
    defining `batched_forward(params, x)` on its own class, next to its forward and sharing its code, so a
    change to the block reaches both (tests compare them for every block that defines one). A subclass
    does not inherit the opt-in: it takes the generic path until it defines its own.
  * generic: torch.func.vmap of torch.func.functional_call, for any module; attention layers run
    `math_attention` under vmap (fused SDPA kernels have no efficient batching rule).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from chainfree.errors import ConfigError

Params = dict[str, torch.Tensor]

# torch modules that act elementwise: their batched forward is the forward itself
_ELEMENTWISE = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Identity)


def _split_name(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(owning submodule, attribute) of a dotted parameter name."""
    owner, _, attr = name.rpartition(".")
    return (module.get_submodule(owner) if owner else module), attr


class StackedParams(nn.Module):
    """n same-structure modules stored as ONE parameter per tensor name, shape [n, ...].

    A round of many members takes a slice of each parameter (a view, no copy; `rows`), and gradients
    accumulate in place into slices of the stacked .grad: no torch.stack of parameters per call, no unbind
    and per-member accumulation in the backward.

    The member modules keep working as ordinary modules (inference, sub-networks, hooks): their parameter
    attributes are replaced by detached views (aliases) of their row, re-bound after .to()/.double() and
    deepcopy. Gradients never flow through the aliases: training goes through `rows()`.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        first = modules[0]
        self.names = [name for name, _ in first.named_parameters()]
        for mod in modules[1:]:
            shapes = [(n, p.shape) for n, p in mod.named_parameters()]
            if shapes != [(n, first.get_parameter(n).shape) for n in self.names]:
                raise ConfigError(f"stacked modules must have one structure; {type(mod).__name__} differs")
        self.stacked = nn.ParameterDict({
            n.replace(".", "__"): nn.Parameter(torch.stack([mod.get_parameter(n).detach() for mod in modules]))
            for n in self.names
        })
        self._members = list(modules)  # plain list: the members are registered where they live
        self._index = {id(mod): i for i, mod in enumerate(modules)}
        for mod in modules:
            for n in self.names:
                owner, attr = _split_name(mod, n)
                del owner._parameters[attr]
        self.rebind()

    def __len__(self) -> int:
        return len(self._members)

    def param(self, name: str) -> nn.Parameter:
        """The stacked parameter [n, ...] of a member parameter name (e.g. 'mlp.up.weight')."""
        return self.stacked[name.replace(".", "__")]

    def rebind(self) -> None:
        """Point every member's parameter attributes at (detached) views of its row of the stacked tensors."""
        for i, mod in enumerate(self._members):
            for n in self.names:
                owner, attr = _split_name(mod, n)
                setattr(owner, attr, self.param(n).detach()[i])

    def _apply(self, fn, recurse: bool = True):  # .to(), .double(), .cuda(): new storage -> new aliases
        out = super()._apply(fn, recurse)
        self.rebind()
        return out

    def __setstate__(self, state: dict) -> None:  # deepcopy / unpickle: aliases must follow the copy
        super().__setstate__(state)
        if "_members" in state:
            self.rebind()

    def member(self, row: int) -> nn.Module:
        return self._members[row]

    def member_rows(self, modules: Sequence[nn.Module]) -> list[int] | None:
        """Rows of `modules` in this stack, or None if one of them is not a member."""
        rows = [self._index.get(id(mod)) for mod in modules]
        return None if any(r is None for r in rows) else rows  # type: ignore[return-value]

    def rows(self, index: int | slice | list[int]) -> Params:
        """Parameters of the members at `index` for ONE training call: a row (int) or a [k, ...] block.

        int and slice: fresh autograd leaves over a view of the stacked parameter whose .grad is the
        matching view of the stacked .grad (allocated as zeros if absent), so backward accumulates in place.
        A list (non-contiguous rows) gathers with differentiable indexing (one gather and one index_add per
        tensor). Without grad mode: plain views."""
        out: Params = {}
        for n in self.names:
            p = self.param(n)
            if isinstance(index, list):
                idx = torch.tensor(index, device=p.device)
                out[n] = p.index_select(0, idx) if torch.is_grad_enabled() else p.detach().index_select(0, idx)
                continue
            if not (torch.is_grad_enabled() and p.requires_grad):
                out[n] = p.detach()[index]
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            q = p.detach()[index].requires_grad_(True)
            q.grad = p.grad[index]
            out[n] = q
        return out


# ------------------------------------------------------------------------------------- batched forwards
def sub_params(params: Params, prefix: str) -> Params:
    """The entries of `params` under `prefix` ('mlp.'), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def linear_k(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """k Linears at once: x [k, ..., in], w [k, out, in], b [k, out] -> [k, ..., out] (one (b)addbmm)."""
    k = x.shape[0]
    x2 = x.reshape(k, -1, x.shape[-1])
    wt = w.transpose(1, 2)
    y = torch.bmm(x2, wt) if b is None else torch.baddbmm(b.unsqueeze(1), x2, wt)
    return y.reshape(*x.shape[:-1], w.shape[1])


def layer_norm_k(norm: nn.LayerNorm, p: Params, x: torch.Tensor) -> torch.Tensor:
    """k LayerNorms over the last dimension: x [k, ..., d], p['weight'/'bias'] [k, d]."""
    y = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    if "weight" in p:
        y = y * p["weight"].view(shape)
    return y + p["bias"].view(shape) if "bias" in p else y


def batched_forward(module: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """The forward of k same-structure members at once: x [k, ...], params[name] [k, ...] (names relative
    to `module`). Raises TypeError for a module without a batched forward (see `has_batched_forward`)."""
    kind = type(module)
    if kind is nn.Sequential:
        for i, m in enumerate(module):
            x = batched_forward(m, sub_params(params, f"{i}."), x)
        return x
    if kind is nn.Linear:
        return linear_k(x, params["weight"], params.get("bias"))
    if kind is nn.LayerNorm:
        return layer_norm_k(module, params, x)
    if kind in _ELEMENTWISE:
        return module(x)
    own = kind.__dict__.get("batched_forward")
    if own is None:
        raise TypeError(f"no batched forward for {kind.__name__}")
    return own(module, params, x)


_BATCHABLE: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def has_batched_forward(module: nn.Module) -> bool:
    """True when `batched_forward` handles the module and all its submodules: exact torch building blocks
    (LayerNorm over one dimension), and classes that define `batched_forward` themselves -- not inherited,
    so a subclass, or a layer another method swapped in (e.g. a sketching Linear), takes the vmap path."""
    known = _BATCHABLE.get(module)
    if known is None:
        known = _BATCHABLE[module] = _has_batched_forward(module)
    return known


def _has_batched_forward(module: nn.Module) -> bool:
    kind = type(module)
    if kind is nn.LayerNorm:
        return len(module.normalized_shape) == 1
    if kind in (nn.Sequential, nn.Linear, *_ELEMENTWISE) or "batched_forward" in kind.__dict__:
        return all(has_batched_forward(m) for m in module.children())
    return False


def math_attention(q, k, v, is_causal: bool = True, scale: float | None = None, enable_gqa: bool = False):
    """Attention from matmul + softmax (SDPA calling convention), softmax in fp32. Used inside vmap, where
    every op here has a batching rule; the fused SDPA kernels fall back to a per-sample loop on CPU and are
    not reliable under vmap with bf16 on CUDA."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    if is_causal:
        T, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v


def stacked_apply(template: nn.Module, params: Params, xs: torch.Tensor, generic: bool = False) -> torch.Tensor:
    """`template`'s forward for k members at once: stacked parameters params[name] [k, ...], inputs xs
    [k, ...]. Gradients reach whatever `params` are views of (e.g. `StackedParams.rows`). Modules with a
    batched forward run it; anything else, or generic=True, runs torch.func.vmap of functional_call with
    `math_attention` in every attention layer (modules with an `attn_fn` attribute)."""
    if not generic and has_batched_forward(template):
        return batched_forward(template, params, xs)

    def one(p: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(template, p, (x,))

    attn = [m for m in template.modules() if hasattr(m, "attn_fn")]
    saved = [m.attn_fn for m in attn]
    try:
        for m in attn:
            m.attn_fn = math_attention
        return vmap(one)(params, xs)
    finally:
        for m, fn in zip(attn, saved, strict=True):
            m.attn_fn = fn
