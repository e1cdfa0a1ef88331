"""Generation from HBLL and LBI runs: every trained run samples, or refuses with a one-line reason.

HBLL (chain inference) samples from the wrapped model itself; the tree path and the LBI model have no
per-block recurrent state and sample by re-running their causal forward. Greedy decoding is checked
against one forward of the finished sequence (float64): by causality, the logits at every position of that
forward must pick the token generated after it."""

from __future__ import annotations

import pytest
import torch

from chainfree.config import ModelConfig, load_config
from chainfree.errors import ConfigError
from chainfree.generate import generate, load_trained
from chainfree.methods.hbll import HBLL, HBLLConfig
from chainfree.methods.lbi import LBI, LBIConfig
from chainfree.models.lm import LanguageModel

V, T = 23, 16


def lm(n_layers: int = 4) -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(kind="gpt", vocab_size=V, seq_len=T, d_model=16, n_layers=n_layers, n_heads=2)
    return LanguageModel(cfg).double()


def perturb(model: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (fresh LBI decoders and shortcut copies would hide mistakes)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def assert_greedy_consistent(model: torch.nn.Module, out: torch.Tensor, prompt_len: int) -> None:
    logits = model(out)  # one causal forward of the whole generated sequence
    picked = logits[:, prompt_len - 1 : -1].argmax(-1)
    assert torch.equal(picked, out[:, prompt_len:])


@pytest.mark.parametrize("interface", ["causal_chunk", "token"])
def test_lbi_model_generates_greedy_consistent_with_its_forward(interface):
    model = LBI(LBIConfig(region_size=2, rank=3, n_chunks=4, interface=interface, check_separator=False)).prepare(lm())
    perturb(model)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, T - 5, temperature=0)
    assert out.shape == (2, T)
    assert torch.equal(out[:, :5], prompt)
    assert_greedy_consistent(model, out, 5)


def test_lbi_paper_leaky_refuses_with_reason():
    model = LBI(LBIConfig(region_size=2, rank=3, interface="paper_leaky", check_separator=False)).prepare(lm())
    with pytest.raises(ConfigError, match="paper_leaky.*cannot generate"):
        generate(model, torch.tensor([1, 2, 3]), 4)


def test_hbll_chain_generates_like_the_wrapped_model():
    base = lm()
    tree = HBLL(HBLLConfig(parallel="loop")).prepare(base)
    perturb(tree)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    out = generate(tree, prompt, 8, temperature=0)
    assert torch.equal(out, generate(tree.model, prompt, 8, temperature=0))
    assert_greedy_consistent(tree.model, out[None], 5)


def test_hbll_tree_path_generates_greedy_consistent_with_its_forward():
    tree = HBLL(HBLLConfig(parallel="loop", eval_path="tree")).prepare(lm())
    perturb(tree)
    prompt = torch.tensor([[2, 7, 1]])
    out = generate(tree, prompt, T - 3, temperature=0)
    assert out.shape == (1, T)
    assert_greedy_consistent(tree, out, 3)
    longer = generate(tree, prompt, T + 4, temperature=0)  # past seq_len: the window slides
    assert longer.shape == (1, T + 7) and torch.equal(longer[:, :T], out)


@pytest.mark.parametrize("method, extra", [
    ("lbi", {}),
    ("hbll", {}),
    ("hbll_time", {"model.kind": '"char_rnn"', "method.chunk": 8, "method.window": 4}),
])
def test_trained_run_generates(method, extra, tiny, tmp_path):
    """`chainfree generate` on a finished LBI / HBLL / HBLL-over-time run (LBI and HBLL raised
    AttributeError: no .embed)."""
    from chainfree.train import train

    over = tiny(**{"train.steps": 2, "train.eval_every": 2, "train.ckpt_every": 2, **extra})
    train(load_config(overrides=over, method=method), tmp_path, progress=False)
    model, tok = load_trained(tmp_path, device="cpu")
    out = generate(model, torch.tensor(tok.encode("ROMEO.")), 12, generator=torch.Generator().manual_seed(0))
    assert out.shape[0] == len(tok.encode("ROMEO.")) + 12
    assert isinstance(tok.decode(out.tolist()), str)
