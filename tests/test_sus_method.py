"""SUS as a method on the GPT LanguageModel: exact when nothing is cut, clear errors, kept-count stats."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chainfree.config import ModelConfig
from chainfree.errors import ConfigError
from chainfree.methods import build_method
from chainfree.models.lm import LanguageModel


def tiny_gpt(kind: str = "gpt", **kw) -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, vocab_size=50, seq_len=24, d_model=32, n_layers=2, n_heads=4, **kw)
    return LanguageModel(cfg).double()


def grads(model: nn.Module, method, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    method.step(model, x, y)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_sus_method_with_huge_c_equals_exact_backprop():
    x = torch.randint(0, 50, (2, 23), generator=torch.Generator().manual_seed(1))  # odd length
    y = torch.roll(x, -1, dims=1)
    exact_model = tiny_gpt(n_kv_heads=2)
    want = grads(exact_model, build_method("exact"), x, y)
    sus = build_method("sus", {"c": 10**12})
    got = grads(sus.prepare(tiny_gpt(n_kv_heads=2)), sus, x, y)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-12, rtol=1e-9, msg=name)


def test_sus_method_small_c_is_stochastic_and_reports_stats():
    x = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    sus = build_method("sus", {"c": 2})
    model = sus.prepare(tiny_gpt())
    model.zero_grad()
    stats = sus.step(model, x, x)
    assert 0 < stats.extra["sus_kept_per_row"] <= 2 + 1.0  # mean of 2*4*2*24 rows, each with mean <= 2
    assert 0 < stats.extra["sus_kept_fraction"] < 1
    a = grads(model, sus, x, x)
    b = grads(model, sus, x, x)
    assert not torch.equal(a["blocks.0.attn.qkv_proj.weight"], b["blocks.0.attn.qkv_proj.weight"])
    # The forward is exact and no attention lies downstream of the last MLP and the final norm, so their
    # gradients do not depend on the draws.
    assert torch.equal(a["blocks.1.mlp.down.weight"], b["blocks.1.mlp.down.weight"])
    assert torch.equal(a["norm.weight"], b["norm.weight"])


def test_sus_method_errors():
    with pytest.raises(ConfigError, match="no attention blocks"):
        build_method("sus").prepare(tiny_gpt("mamba2", ssm_head_dim=16, d_state=8, chunk_size=8))
    with pytest.raises(ConfigError, match="swappable attention"):
        build_method("sus").prepare(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="method.c"):
        build_method("sus", {"c": 0})
    with pytest.raises(ConfigError, match="method.backend"):
        build_method("sus", {"backend": "cuda"})


def test_variance_grid_zero_when_nothing_is_cut_and_positive_otherwise():
    from chainfree.reproduce.sus import variance_grid, variance_markdown

    model = tiny_gpt().float()
    g = torch.Generator().manual_seed(3)
    batches = {n: [(torch.randint(0, 50, (1, n), generator=g), torch.randint(0, 50, (1, n), generator=g))
                   for _ in range(3)] for n in (8, 16)}  # fmt: skip
    rows = variance_grid(model, batches, (1, 10**9), draws=2, variants={16: ("bernoulli", "systematic")},
                         log=lambda _: None)  # fmt: skip
    assert len(rows) == 2 * 2 + 2
    for r in rows:
        assert 0 < r["kept_fraction"] <= 1 and r["kept_per_row"] <= min(r["c"], r["n"]) + 1e-9 + 3 * r["c"] ** 0.5
        if r["c"] == 10**9:
            assert r["variance_increase"] == 0.0  # every q = 1: SUS gradients are the exact ones
            assert r["kept_fraction"] == 1.0
        else:
            assert r["variance_increase"] > 0 and r["kinds"]["blocks.*.attn"]["variance_increase"] > 0
            assert r["kinds"]["norm"]["variance_increase"] == 0.0  # nothing downstream of the last attention
    md = variance_markdown(rows, {"model": "tiny", "pretrain_steps": 0, "pretrain_val_loss": float("nan"),
                                  "batches": 3, "draws": 2})  # fmt: skip
    assert "| c \\ n | 8 | 16 |" in md and "systematic" in md and "carried gradient" in md


def test_sus_attention_runs_outside_compiled_graphs_without_recompiling():
    """Compiled, a model with SUS attention gets the eager gradients for each fresh seed and compiles once:
    sus_attention is excluded from the graph (its per-call seed is a host int; traced, every new seed would
    recompile until dynamo's limit)."""
    from torch._dynamo.utils import counters

    from chainfree.ops.sus import sus_attention

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).view(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
            return sus_attention(q, k, v, is_causal=True, c=2).sum()

    torch.manual_seed(0)
    eager = Attn()
    compiled_module = Attn()
    compiled_module.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_module, backend="aot_eager")
    x = torch.randn(12, 16)
    for step in range(10):
        for m in (eager, compiled_module):
            m.zero_grad(set_to_none=True)
        torch.manual_seed(step)
        eager(x).backward()
        torch.manual_seed(step)
        compiled(x).backward()
        torch.testing.assert_close(compiled_module.qkv.weight.grad, eager.qkv.weight.grad, rtol=1e-5, atol=1e-6)
    assert counters["frames"]["total"] <= 3  # the frames around the break compile once, not once per seed (11)
    torch._dynamo.reset()
