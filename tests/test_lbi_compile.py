"""LBI with train.compile=true (issue 16 follow-up): the blocks are compiled one by one (LBI runs them itself)
and the scan backward differentiates a middle region's graph more than once (Jacobian VJPs with
retain_graph=True, then the parameter VJP). Before the fix this failed at the first step with AOTAutograd's
"compiled with non-empty donated buffers which requires ... retain_graph=False". Compiled LBI must train
like eager LBI (same seed, float32).

The training comparisons are marked slow: with a cold inductor cache the one compilation of a GPT block
(forward + backward, C++ on CPU) took ~53 s on 2 cores; warm (cache in /tmp/torchinductor_*) the file runs in
~10 s. The structural tests below them compile nothing and are fast."""

from __future__ import annotations

import pytest
import torch

from chainfree import errors
from chainfree.config import ModelConfig, TrainConfig
from chainfree.errors import ConfigError
from chainfree.methods.lbi import LBI, LBIConfig
from chainfree.models.lm import LanguageModel
from chainfree.training.options import apply_train_options, iter_blocks

pytest.importorskip("torch._dynamo")

V, T = 61, 16


def _lbi(jacobian: str, n_layers: int = 4, compiled: bool = False) -> tuple[LBI, torch.nn.Module]:
    torch.manual_seed(0)
    lm = LanguageModel(ModelConfig(vocab_size=V, seq_len=T, d_model=16, n_layers=n_layers, n_heads=2))
    method = LBI(LBIConfig(region_size=1, rank=3, n_chunks=2, jacobian=jacobian))
    model = method.prepare(lm)
    if compiled:
        done = apply_train_options(model, TrainConfig(compile=True), method.uses_autograd_step)
        assert done["compile_scope"] == "blocks" and done["compiled_modules"] == n_layers
    return method, model


def _train(method: LBI, model: torch.nn.Module, steps: int) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    losses, grads = [], []
    for _ in range(steps):
        x, y = torch.randint(0, V, (2, T), generator=g), torch.randint(0, V, (2, T), generator=g)
        opt.zero_grad(set_to_none=True)
        losses.append(method.step(model, x, y).loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return losses, grads


def _check_same_training(jacobian: str, n_layers: int, steps: int) -> None:
    method_e, eager = _lbi(jacobian, n_layers)
    method_c, compiled = _lbi(jacobian, n_layers, compiled=True)
    assert eager.n_regions == n_layers and eager.n_regions > 2  # middle regions: their Jacobians retain graphs
    assert compiled.retains_block_graphs
    assert all(b._chainfree_keeps_saved_tensors for b in iter_blocks(compiled))
    loss_e, grad_e = _train(method_e, eager, steps)
    loss_c, grad_c = _train(method_c, compiled, steps)
    assert loss_c == pytest.approx(loss_e, rel=1e-5, abs=1e-6)
    for step, (ge, gc) in enumerate(zip(grad_e, grad_c, strict=True)):
        assert ge.keys() == gc.keys() and len(ge) == len(list(eager.parameters()))
        for n in ge:
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-5, msg=f"step {step}: {n}")
    # something was learnt: the steps differ from each other
    assert loss_e[0] != loss_e[-1]


@pytest.mark.slow
def test_compiled_lbi_loop_trains_like_eager(one_thread) -> None:
    """4 layers, region_size 1: 4 regions, 2 of them with retain_graph Jacobians through compiled blocks."""
    _check_same_training("loop", 4, steps=3)


@pytest.mark.slow
def test_compiled_lbi_default_vjp_falls_back_to_unbatched_vjps(one_thread, monkeypatch) -> None:
    """The default jacobian='vjp' vmaps the backward (is_grads_batched), which a compiled backward cannot
    run: it warns and takes the same VJPs one direction at a time."""
    monkeypatch.setattr(errors, "_WARNED", set())
    with pytest.warns(UserWarning, match="cannot be vmapped"):
        _check_same_training("vjp", 4, steps=2)


@pytest.mark.slow
def test_compiled_lbi_six_layers_trains_like_eager(one_thread, monkeypatch) -> None:
    monkeypatch.setattr(errors, "_WARNED", set())
    with pytest.warns(UserWarning, match="cannot be vmapped"):
        _check_same_training("vjp", 6, steps=4)


@pytest.mark.slow
def test_compiled_lbi_prefix_runs_as_loop(one_thread, monkeypatch) -> None:
    """jacobian='prefix' re-runs blocks on truncated, replicated inputs: a new shape, i.e. a recompilation, for
    each one. With compiled blocks it warns and takes the loop VJPs on the forward graph (same gradients)."""
    monkeypatch.setattr(errors, "_WARNED", set())
    with pytest.warns(UserWarning, match="prefix passes"):
        _check_same_training("prefix", 4, steps=2)


def test_donation_stays_on_where_no_graph_is_retained() -> None:
    """Only a model that declares it retains block graphs gets the donation-off backend: a plain
    LanguageModel and LBI with a Jacobian that re-runs the region keep torch's default."""
    _, replicate = _lbi("replicate")
    assert not replicate.retains_block_graphs
    apply_train_options(replicate, TrainConfig(compile=True), uses_autograd_step=False)
    assert not any(b._chainfree_keeps_saved_tensors for b in iter_blocks(replicate))
    torch.manual_seed(0)
    lm = LanguageModel(ModelConfig(vocab_size=V, seq_len=T, d_model=16, n_layers=2, n_heads=2))
    apply_train_options(lm, TrainConfig(compile=True, compile_scope="blocks"))
    assert not any(b._chainfree_keeps_saved_tensors for b in iter_blocks(lm))
    _, two_regions = _lbi("vjp", n_layers=2)  # no middle region: no Jacobian, nothing retained
    assert not two_regions.retains_block_graphs


def test_blocks_compiled_another_way_are_a_clear_error(one_thread) -> None:
    """Blocks compiled directly (default backend, donated buffers on): the retain_graph Jacobian is refused
    with a ConfigError, not run on a graph whose saved tensors may be freed."""
    method, model = _lbi("loop")
    for block in iter_blocks(model):
        block.compile(dynamic=False)
    x = torch.randint(0, V, (2, T))
    with pytest.raises(ConfigError, match="not compiled with donated buffers off"):
        method.step(model, x, x)
