"""Batched forwards live next to the blocks they batch: for EVERY class in chainfree.models that defines
`batched_forward`, the batched forward over k stacked members equals calling each member's own forward
(values and gradients, float64). A block changed without its batched forward fails here; a new block with
a batched forward is picked up automatically."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
from torch import nn

import chainfree.models
from chainfree.config import ModelConfig
from chainfree.nn.stacked import StackedParams, batched_forward, has_batched_forward, stacked_apply


def classes_with_batched_forward() -> list[type[nn.Module]]:
    found = {}
    for info in pkgutil.iter_modules(chainfree.models.__path__):
        try:
            mod = importlib.import_module(f"chainfree.models.{info.name}")
        except ImportError:  # optional dependencies of other kinds
            continue
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, nn.Module) and "batched_forward" in cls.__dict__:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[k] for k in sorted(found)]


CFG = ModelConfig(vocab_size=8, seq_len=8, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2)


def make(cls: type[nn.Module]) -> tuple[nn.Module, tuple[int, ...]]:
    """An instance with small sizes, and the shape of one member's input."""
    params = inspect.signature(cls).parameters
    if "cfg" in params:
        return cls(CFG), (2, 8, 16)
    return cls(*[16, 24][: len([p for p in params.values() if p.default is inspect.Parameter.empty])]), (2, 5, 16)


def test_the_known_blocks_define_their_batched_forward():
    names = {c.__name__ for c in classes_with_batched_forward()}
    assert {"MLP", "ResidualMLPBlock", "TransformerBlock", "CausalSelfAttention"} <= names


@pytest.mark.parametrize("cls", classes_with_batched_forward(), ids=lambda c: c.__name__)
def test_batched_forward_equals_each_members_forward(cls):
    torch.manual_seed(0)
    members = []
    for _ in range(3):
        m, shape = make(cls)
        m = m.double()
        with torch.no_grad():  # non-trivial norms and biases
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        members.append(m)
    refs = [
        {n: p.detach().clone().requires_grad_(True) for n, p in m.named_parameters()} for m in members
    ]
    stack = StackedParams(members)
    assert has_batched_forward(members[0])
    xs = torch.randn((3, *shape), dtype=torch.float64, requires_grad=True)
    w = torch.randn((3, *shape[:-1], 16), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = batched_forward(members[0], stack.rows(slice(0, 3)), xs)
    (out * w[..., : out.shape[-1]]).sum().backward()
    for i, m in enumerate(members):
        x = xs[i].detach().clone().requires_grad_(True)
        y = torch.func.functional_call(m, refs[i], (x,))
        torch.testing.assert_close(out[i].detach(), y.detach(), rtol=1e-10, atol=1e-12)
        (y * w[i, ..., : y.shape[-1]]).sum().backward()
        torch.testing.assert_close(xs.grad[i], x.grad, rtol=1e-10, atol=1e-12)
        for n in stack.names:
            torch.testing.assert_close(stack.param(n).grad[i], refs[i][n].grad, rtol=1e-10, atol=1e-12, msg=n)


def test_a_subclass_does_not_inherit_the_batched_forward():
    """A subclass may change the forward: it takes the generic vmap path until it defines its own."""
    from chainfree.models.mlp import MLP

    class Scaled(MLP):
        def forward(self, x):
            return 2 * super().forward(x)

    members = [Scaled(16, 24).double() for _ in range(2)]
    assert not has_batched_forward(members[0])
    stack = StackedParams(members)
    xs = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        out = stacked_apply(members[0], stack.rows(slice(0, 2)), xs)
        torch.testing.assert_close(out, torch.stack([m(x) for m, x in zip(members, xs, strict=True)]))
