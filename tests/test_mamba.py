"""Mamba-2 / Mamba-3 blocks: each Mamba-3 change (trapezoid, rotation, MIMO) against a sequential reference
of the same math in float64; block causality; the hybrid layout; short CPU training beats the unigram
baseline on the bundled corpus."""

from __future__ import annotations

import pytest
import torch

from chainfree.config import ModelConfig, load_config
from chainfree.errors import ConfigError
from chainfree.models.lm import LanguageModel, block_kinds
from chainfree.models.mamba2 import Mamba2Block, causal_depthwise_conv
from chainfree.models.mamba3 import Mamba3Block, heavy_tail, mamba3_chunked, mamba3_recurrence, rotate_pairs
from chainfree.ops.ssd import ssd_sequential

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def core_inputs(b=2, l=19, R=1, h=3, p=4, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, R, h, p, generator=g, dtype=f64)
    k = torch.randn(b, l, R, h, n, generator=g, dtype=f64)
    q = torch.randn(b, l, R, h, n, generator=g, dtype=f64)
    dt = 0.05 + torch.rand(b, l, h, generator=g, dtype=f64)
    adt = -2 * torch.rand(b, l, h, generator=g, dtype=f64) * dt
    lam = torch.rand(b, l, h, generator=g, dtype=f64)
    D = torch.randn(h, generator=g, dtype=f64)
    return x, adt, dt, lam, k, q, D


@pytest.mark.parametrize("R,chunk", [(1, 4), (1, 32), (3, 4), (2, 1)])
def test_trapezoid_chunked_equals_recurrence(R, chunk):
    """Point 1 + 3: the trapezoidal (and MIMO) SSM through the chunked scan equals the literal recurrence,
    values and gradients."""
    ins = [t.requires_grad_(True) for t in core_inputs(R=R)]
    y, _ = mamba3_chunked(*ins, chunk_size=chunk)
    y_ref = mamba3_recurrence(*ins)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=f64)
    grads = torch.autograd.grad((y * w).sum(), ins)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), ins)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_trapezoid_with_lambda_one_is_euler():
    """lam = 1 removes the delayed term: Mamba-3's update reduces to Mamba-2's exponential-Euler SSD."""
    x, adt, dt, lam, k, q, D = core_inputs(R=1)
    y, _ = mamba3_chunked(x, adt, dt, torch.ones_like(lam), k, q, D * 0, chunk_size=4)
    y_euler, _ = ssd_sequential(x[:, :, 0] * dt[..., None], adt, k[:, :, 0], q[:, :, 0])
    torch.testing.assert_close(y[:, :, 0], y_euler, rtol=1e-10, atol=1e-10)


def test_rotation_is_a_complex_diagonal_state():
    """Point 2: rotating B_s by theta_s and C_t by theta_t gives C_t . R(theta_s - theta_t) B_s, i.e. the
    pairs (2i, 2i+1) behave as complex numbers multiplied by exp(i (theta_s - theta_t)); unrotated dims pass."""
    g = torch.Generator().manual_seed(0)
    n, S = 8, 2
    b, c = torch.randn(n, generator=g, dtype=f64), torch.randn(n, generator=g, dtype=f64)
    ts, tt = torch.randn(S, generator=g, dtype=f64), torch.randn(S, generator=g, dtype=f64)
    got = (rotate_pairs(c, tt) * rotate_pairs(b, ts)).sum()
    bz = torch.complex(b[0 : 2 * S : 2], b[1 : 2 * S : 2])
    cz = torch.complex(c[0 : 2 * S : 2], c[1 : 2 * S : 2])
    want = (cz.conj() * bz * torch.exp(1j * (ts - tt))).real.sum() + (c[2 * S :] * b[2 * S :]).sum()
    assert got.item() == pytest.approx(want.item(), abs=1e-12)


def test_heavy_tail_activation():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 2.0], dtype=f64, requires_grad=True)
    y = heavy_tail(x)
    torch.testing.assert_close(y, torch.tensor([0.25, 1 / 1.5, 1.0, 1.5, 3.0], dtype=f64))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.tensor([1 / 16, 1 / 2.25, 1.0, 1.0, 1.0], dtype=f64))  # C^1 at 0


def block_cfg(**kw) -> ModelConfig:
    base = dict(kind="mamba3", vocab_size=50, d_model=16, n_layers=2, n_heads=4, seq_len=32, d_state=8,
                ssm_head_dim=8, chunk_size=4)
    return ModelConfig(**(base | kw))


def perturbed(block: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its (often symmetric) initial value so the tests exercise all terms."""
    g = torch.Generator().manual_seed(seed)
    block = block.double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return block


@pytest.mark.parametrize("cls,R", [(Mamba2Block, 1), (Mamba3Block, 1), (Mamba3Block, 3)])
def test_block_is_causal_and_shapes(cls, R):
    torch.manual_seed(0)
    block = perturbed(cls(block_cfg(mimo_rank=R), 0))
    x = torch.randn(2, 13, 16, dtype=f64)
    y = block(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, 7:] += torch.randn_like(x2[:, 7:])
    torch.testing.assert_close(block(x2)[:, :7], y[:, :7], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls,R", [(Mamba2Block, 1), (Mamba3Block, 1), (Mamba3Block, 2)])
def test_block_chunk_size_does_not_change_output(cls, R):
    torch.manual_seed(0)
    block = perturbed(cls(block_cfg(mimo_rank=R), 0))
    x = torch.randn(2, 11, 16, dtype=f64)
    y = block(x)
    block.chunk_size = 1
    torch.testing.assert_close(block(x), y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_shifted_conv_equals_grouped_conv1d(K):
    """The token-major shifted-product conv is the causal depthwise Conv1d it replaces (float64, grads too),
    and under bf16 it stays within bf16 rounding of the float64 result."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, K, groups=6, padding=K - 1).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    ref = conv(x.transpose(1, 2))[..., :9].transpose(1, 2)
    out = causal_depthwise_conv(x, conv.weight, conv.bias)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    got = torch.autograd.grad(out, (x, conv.weight, conv.bias), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    half = causal_depthwise_conv(x.detach().bfloat16(), conv.weight.float(), conv.bias.float())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), ref.detach(), rtol=2e-2, atol=2e-2)


def test_hybrid_layout_and_param_counts():
    cfg = ModelConfig(kind="hybrid", vocab_size=8192, d_model=768, n_layers=12, n_heads=12, n_kv_heads=6,
                      mlp_hidden=3072, d_state=128, ssm_head_dim=64, chunk_size=64, attn_every=4)
    assert block_kinds(cfg) == ["mamba3", "mamba3", "mamba3", "attn"] * 3
    cfg2 = block_cfg(kind="hybrid", n_layers=6, attn_every=3, hybrid_mixer="mamba2")
    assert block_kinds(cfg2) == ["mamba2", "mamba2", "attn"] * 2
    model = LanguageModel(cfg2)
    assert [type(b).__name__ for b in model.blocks] == ["Mamba2Block", "Mamba2Block", "TransformerBlock"] * 2


@pytest.mark.parametrize("name", ["mamba2-50m", "mamba3-50m", "hybrid-50m"])
def test_50m_presets_have_paper_sizes(name):
    """The ~50M presets: block parameters (without embeddings) between 45M and 60M (paper: 47-61M)."""
    cfg = load_config(name).model
    cfg.vocab_size = 256  # embedding size is irrelevant to the block count
    with torch.device("meta"):
        model = LanguageModel(cfg)
    blocks = sum(p.numel() for p in model.blocks.parameters())
    assert 45e6 < blocks < 60e6, blocks


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.mimo_rank"):
        load_config(None, ["model.kind='mamba3'", "model.mimo_rank=0"])
    with pytest.raises(ConfigError, match="model.ssd_backend"):
        load_config(None, ["model.kind='mamba2'", "model.ssd_backend='cuda'"])
    with pytest.raises(ConfigError, match="model.ssm_head_dim"):
        load_config(None, ["model.kind='mamba2'", "model.ssm_head_dim=48", "model.d_model=64"])


def train_summary(kind: str, tmp_path, steps: int, *extra: str) -> dict:
    from chainfree.train import train

    cfg = load_config(f"{kind}-tiny", [f"train.steps={steps}", f"train.eval_every={steps}", "train.device='cpu'",
                                       *extra])
    return train(cfg, tmp_path / kind, progress=False)


@pytest.mark.parametrize("kind", ["gpt", "mamba2", "mamba3", "hybrid"])
def test_each_model_beats_unigram(kind, tmp_path):
    """Every kind, 60 CPU steps (~5-10 s) on the bundled Shakespeare (bytes): val loss clearly below the
    unigram entropy, the best a model without context can do. gpt uses the mamba2-tiny sizes."""
    preset, extra = (("mamba2", "model.kind='gpt'") if kind == "gpt" else (kind, "train.seed=1337"))
    s = train_summary(preset, tmp_path, 60, extra)
    assert s["final_val_loss"] < s["unigram_entropy"] - 0.3, s
