"""basis.apply on user models: the default selection finds MLP Linears whatever they are called, patterns
match top-level modules, a selection of only the head is refused, filter_fn, the one-line summary, and
the SwiGLU MLP (chainfree's own test module and transformers' LlamaMLP)."""

from __future__ import annotations

import importlib.util
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chainfree.errors import ConfigError
from chainfree.methods import basis
from chainfree.nn.basis import BasisLinear, BasisMLP, BasisSwiGLU

f64 = torch.float64


class FcNet(nn.Module):
    """A user's model: MLP Linears named fc1/fc2, an LM-style head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.fc2(F.relu(self.fc1(x))))


class TopLevelMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.up = nn.Linear(8, 16)
        self.mlp.down = nn.Linear(16, 8)
        self.head = nn.Linear(8, 5)


class OddNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)


def test_fc1_fc2_are_swapped_by_default_and_reported(caplog):
    """The issue: fc1/fc2 were left exact and only `head` was swapped, silently."""
    model = FcNet()
    with caplog.at_level(logging.INFO, logger="chainfree.basis"):
        basis.apply(model, rank=4)
    assert isinstance(model.fc1, BasisLinear) and isinstance(model.fc2, BasisLinear)
    assert isinstance(model.head, BasisLinear)
    line = basis.summary(model)
    assert line in caplog.text
    assert "3 Linear layers sketched" in line and "fc1" in line and "fc2" in line and "head" in line
    assert "\n" not in line


def test_top_level_mlp_matches_star_pattern():
    model = TopLevelMLP()
    basis.apply(model, rank=4, layers=["*.mlp.up", "*.mlp.down"], fuse_mlp=False)
    assert isinstance(model.mlp.up, BasisLinear) and isinstance(model.mlp.down, BasisLinear)


def test_only_head_is_refused_when_model_has_mlp_linears():
    with pytest.raises(ConfigError, match=r"only the LM head \(head\).*fc1, fc2"):
        basis.apply(FcNet(), rank=4, layers=["*.mlp.*", "head"])
    with pytest.raises(ConfigError, match=r"only the LM head.*layer1"):  # default selection, unknown names
        basis.apply(OddNames(), rank=4)
    model = OddNames()  # naming the layer explicitly works
    basis.apply(model, rank=4, layers=["layer1", "head"])
    assert isinstance(model.layer1, BasisLinear)


def test_filter_fn_and_config_object():
    model = FcNet()
    seen = []
    cfg = basis.BasisConfig(compression=2, shrink=0.0)

    def only_fc2(module: nn.Module, fqn: str) -> bool:
        seen.append((type(module), fqn))
        return fqn == "fc2"

    basis.apply(model, cfg, filter_fn=only_fc2)
    assert seen == [(nn.Linear, "fc1"), (nn.Linear, "fc2"), (nn.Linear, "head")]
    assert isinstance(model.fc2, BasisLinear) and model.fc2.compression == 2 and model.fc2.rank is None
    assert type(model.fc1) is nn.Linear and type(model.head) is nn.Linear
    with pytest.raises(ConfigError, match="no nn.Linear layer was selected"):
        basis.apply(FcNet(), filter_fn=lambda m, n: False)
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        basis.apply(FcNet(), rnak=4)


def test_mamba_default_is_head_only_without_error():
    """State-space in/out projections are neither MLP nor unknown: BASIS sketches just the head there."""
    from chainfree.config import ModelConfig
    from chainfree.models import build_model

    model = build_model(ModelConfig(kind="mamba2", vocab_size=32, seq_len=8, d_model=16, n_layers=1, n_heads=2,
                                    ssm_head_dim=8))
    basis.apply(model, rank=4)
    assert isinstance(model.head, BasisLinear)
    assert "BasisLinear 1 (head)" in basis.summary(model)


class SwiGLU(nn.Module):
    """LLaMA's MLP, written out: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=bias)
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d=6, hidden=10, bias=False) -> None:
        super().__init__()
        self.mlp = SwiGLU(d, hidden, bias)
        self.head = nn.Linear(d, 7)

    def forward(self, x):
        return self.head(self.mlp(x))


def _pair(bias: bool):
    torch.manual_seed(0)
    exact = Block(bias=bias).double()
    sketched = Block(bias=bias).double()
    sketched.load_state_dict(exact.state_dict())
    return exact, sketched


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_full_rank_exact_and_dx_exact(bias):
    exact, sketched = _pair(bias)
    keys = list(exact.state_dict())
    basis.apply(sketched, rank=1000, shrink=0.0, scalars=False)
    assert isinstance(sketched.mlp, BasisSwiGLU) and list(sketched.state_dict()) == keys
    x = torch.randn(4, 5, 6, dtype=f64)
    xe, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(4, 5, 7, dtype=f64)
    exact(xe).backward(dy)
    ys = sketched(xs)
    torch.testing.assert_close(ys, exact(x), rtol=1e-12, atol=1e-12)
    ys.backward(dy)
    torch.testing.assert_close(xs.grad, xe.grad, rtol=1e-12, atol=1e-12)
    for (name, pe), (_, ps) in zip(exact.named_parameters(), sketched.named_parameters(), strict=True):
        torch.testing.assert_close(ps.grad, pe.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_swiglu_low_rank_unbiased_and_dx_exact():
    exact, sketched = _pair(True)
    basis.apply(sketched, rank=3, shrink=0.0, scalars=False, layers=["*.mlp.*"])
    x = torch.randn(12, 6, dtype=f64)
    dy = torch.randn(12, 7, dtype=f64)
    xe = x.clone().requires_grad_()
    exact(xe).backward(dy)
    torch.manual_seed(5)
    samples = {n: [] for n in ("gate_proj", "up_proj", "down_proj")}
    for _ in range(1000):
        sketched.zero_grad()
        xs = x.clone().requires_grad_()
        sketched(xs).backward(dy)
        for n in samples:
            samples[n].append(getattr(sketched.mlp, n).weight.grad.clone())
    torch.testing.assert_close(xs.grad, xe.grad, rtol=1e-12, atol=1e-12)
    for n in ("gate_proj", "up_proj", "down_proj"):  # biases exact
        torch.testing.assert_close(getattr(sketched.mlp, n).bias.grad, getattr(exact.mlp, n).bias.grad,
                                   rtol=1e-12, atol=1e-12)
    for n, s in samples.items():
        s = torch.stack(s)
        ref = getattr(exact.mlp, n).weight.grad
        z = (s.mean(0) - ref).abs() / (s.std(0) / math.sqrt(len(s)))
        assert float(z.max()) < 5.0, (n, float(z.max()))


def test_swiglu_saves_only_input_and_sketches():
    torch.manual_seed(0)
    mlp = BasisSwiGLU(SwiGLU(16, 64).double(), rank=4)
    x = torch.randn(30, 16, dtype=f64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = mlp(x)
    rowwise = sorted(tuple(t.shape) for t in saved if t.dim() == 2 and t.shape[0] == 30)
    assert rowwise == [(30, 16)]  # u only: no (30 x 64) gate/up/silu/h tensor
    y.sum().backward()


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_transformers_llama_mlp_is_fused_and_exact_at_full_rank():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=8, intermediate_size=12, hidden_act="silu", num_attention_heads=2,
                      num_key_value_heads=2)
    torch.manual_seed(0)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = LlamaMLP(cfg)

        def forward(self, x):
            return self.mlp(x)

    exact = Holder().double()
    sketched = Holder().double()
    sketched.load_state_dict(exact.state_dict())
    basis.apply(sketched, rank=100, shrink=0.0, scalars=False, layers=["*.mlp.*"])
    assert isinstance(sketched.mlp, BasisSwiGLU)
    assert "BasisSwiGLU 1 (mlp)" in basis.summary(sketched)
    x = torch.randn(2, 9, 8, dtype=f64)
    dy = torch.randn(2, 9, 8, dtype=f64)
    exact(x).backward(dy)
    sketched(x).backward(dy)
    for (name, pe), (_, ps) in zip(exact.named_parameters(), sketched.named_parameters(), strict=True):
        torch.testing.assert_close(ps.grad, pe.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_non_mlp_forward_is_not_fused():
    """A module with the right children but another forward is left to per-Linear swaps."""

    class Residual(SwiGLU):
        def forward(self, x):
            return x + super().forward(x)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Residual(6, 10)

    model = Holder().double()
    basis.apply(model, rank=2, layers=["*.mlp.*"])
    assert type(model.mlp) is Residual and isinstance(model.mlp.gate_proj, BasisLinear)


def test_gelu_mlp_with_fc_names_is_fused():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = Mlp()

    model = Holder()
    basis.apply(model, rank=2)
    assert isinstance(model.ffn, BasisMLP) and model.ffn.names == ("fc1", "act", "fc2")


class GeluMLP(nn.Module):
    """A model that is itself one MLP: up -> GELU -> down at the root."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("layers", [["up", "down"], None])
def test_root_mlp_is_sketched_unfused_and_exact_at_full_rank(layers):
    """Issue 28 item 2: the root cannot replace itself, so its named Linears are swapped one by one."""
    torch.manual_seed(0)
    exact = GeluMLP().double()
    model = GeluMLP().double()
    model.load_state_dict(exact.state_dict())
    basis.apply(model, rank=50, shrink=0.0, scalars=False, layers=layers)
    assert isinstance(model.up, BasisLinear) and isinstance(model.down, BasisLinear)
    x, dy = torch.randn(5, 6, dtype=f64), torch.randn(5, 6, dtype=f64)
    exact(x).backward(dy)
    model(x).backward(dy)  # rank 50 >= 5 rows, no shrink, no scalars: the sketch is exact
    for (name, pe), (_, ps) in zip(exact.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(ps.grad, pe.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_root_linear_says_it_cannot_replace_itself():
    with pytest.raises(ConfigError, match="cannot replace itself"):
        basis.apply(nn.Linear(4, 4), rank=2, filter_fn=lambda module, fqn: True)


@pytest.mark.parametrize("fuse", [True, False])
def test_applying_twice_says_already_applied(fuse):
    """Issue 28 item 6: the second apply named 'no nn.Linear layer was selected' (unfused) or a fused part."""
    model = Block()
    basis.apply(model, rank=2, fuse_mlp=fuse)
    with pytest.raises(ConfigError, match=r"BASIS is already applied to (mlp|head).*chainfree.remove"):
        basis.apply(model, rank=2, fuse_mlp=fuse)


@pytest.mark.parametrize("fuse", [True, False])
def test_remove_restores_modules_weights_keys_and_outputs(fuse):
    """Issue 28 item 5: apply + remove gives back the same modules and Parameters (a tied head stays tied)."""
    torch.manual_seed(0)
    model = Block().double()
    model.emb = nn.Embedding(7, 6).double()
    model.head.weight = model.emb.weight  # tied: the head shares the embedding's Parameter
    x = torch.randn(3, 6, dtype=f64)
    ref = model(x)
    mlp_type, params = type(model.mlp), dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    basis.apply(model, rank=2, fuse_mlp=fuse)
    assert isinstance(model.head, BasisLinear) and list(model.state_dict()) == list(state)
    model(x).sum().backward()
    assert basis.remove(model) == (2 if fuse else 4)
    assert type(model.mlp) is mlp_type and type(model.head) is nn.Linear and type(model.mlp.up_proj) is nn.Linear
    assert model.head.weight is model.emb.weight
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert basis.remove(model) == 0
    basis.apply(model, rank=2, fuse_mlp=fuse)  # applies again after removal
