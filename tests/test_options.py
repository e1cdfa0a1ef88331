"""Exact-baseline options: activation checkpointing (full / selective) gives exactly the gradients of plain
autograd on every model kind (float64), also through the Trainer with gradient accumulation; selective
recomputes pointwise ops but no matmul; compile runs on CPU and matches eager."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from chainfree.config import ModelConfig, TrainConfig
from chainfree.errors import ConfigError
from chainfree.models.lm import LanguageModel
from chainfree.training.options import (
    SAVED_OPS,
    apply_activation_checkpointing,
    compile_model,
    iter_blocks,
    remove_activation_checkpointing,
)

KINDS = {
    "gpt": {},
    "mamba2": {"ssm_head_dim": 16, "d_state": 8, "chunk_size": 8},
    "mamba3": {"ssm_head_dim": 16, "d_state": 8, "chunk_size": 8},
    "hybrid": {"ssm_head_dim": 16, "d_state": 8, "chunk_size": 8, "attn_every": 2},
}


def _model(kind: str) -> LanguageModel:
    cfg = ModelConfig(kind=kind, vocab_size=61, seq_len=16, d_model=32, n_layers=2, n_heads=4, **KINDS[kind])
    torch.manual_seed(0)
    return LanguageModel(cfg).double()


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _twins(n_layers: int) -> tuple[LanguageModel, LanguageModel]:
    """Two identical tiny GPTs (one to stay eager, one to compile), with dynamo's caches reset."""
    pytest.importorskip("torch._dynamo")
    torch._dynamo.reset()
    cfg = ModelConfig(vocab_size=61, seq_len=16, d_model=16, n_layers=n_layers, n_heads=2)
    torch.manual_seed(0)
    eager = LanguageModel(cfg)
    torch.manual_seed(0)
    return eager, LanguageModel(cfg)


def _assert_same_loss_and_grads(compiled: nn.Module, eager: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """float32 compiled vs eager: equal up to the reassociation inductor may do."""
    loss_e, g_e = _grads(eager, x, y)
    loss_c, g_c = _grads(compiled, x, y)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for n in g_e:
        torch.testing.assert_close(g_c[n], g_e[n], rtol=1e-4, atol=1e-5, msg=n)


class _CountSaved:
    """Total bytes autograd saves for backward during one forward (to show checkpointing saves less)."""

    def __init__(self) -> None:
        self.bytes = 0

    def __enter__(self):
        def pack(t: torch.Tensor) -> torch.Tensor:
            self.bytes += t.numel() * t.element_size()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_exact_gradients(kind: str, mode: str, one_thread) -> None:
    model = _model(kind)
    torch.manual_seed(1)
    x, y = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    loss_ref, ref = _grads(model, x, y)
    with _CountSaved() as plain:
        model(x, y)
    assert apply_activation_checkpointing(model, mode) == 2
    loss, got = _grads(model, x, y)
    with _CountSaved() as ckpt:
        model(x, y)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    assert got.keys() == ref.keys() and len(got) == len(list(model.parameters()))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    # checkpointing is really active: less is saved for backward than without it
    assert ckpt.bytes < plain.bytes
    # parameter names (and so checkpoints) are unchanged, and it can be undone
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in _model(kind).named_parameters()]
    assert remove_activation_checkpointing(model) == 2
    with _CountSaved() as again:
        model(x, y)
    assert again.bytes == plain.bytes


class _CountOps(TorchDispatchMode):
    """ATen op calls by name (to see what backward recomputes)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_selective_recomputes_pointwise_but_not_matmuls(one_thread) -> None:
    """In backward, 'full' reruns the blocks' matmuls; 'selective' reruns only pointwise ops (GELU here)
    and no extra matmul; 'none' reruns nothing."""
    model = _model("gpt")
    x, y = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    counts = {}
    for mode in ("none", "full", "selective"):
        remove_activation_checkpointing(model)
        apply_activation_checkpointing(model, mode)
        loss = model(x, y)
        with _CountOps() as c:
            loss.backward()
        counts[mode] = c.counts
    matmuls = {m: counts[m]["mm"] + counts[m]["addmm"] + counts[m]["bmm"] for m in counts}
    assert matmuls["selective"] == matmuls["none"] < matmuls["full"]
    assert counts["none"]["gelu"] == 0
    assert counts["selective"]["gelu"] == counts["full"]["gelu"] == 2  # one MLP per block, 2 blocks
    assert torch.ops.aten.mm.default in SAVED_OPS


def test_checkpointing_refuses_bad_mode_and_double_application() -> None:
    model = _model("gpt")
    with pytest.raises(ConfigError, match="activation_checkpoint must be one of"):
        apply_activation_checkpointing(model, "some")
    apply_activation_checkpointing(model, "full")
    with pytest.raises(ConfigError, match="already applied"):
        apply_activation_checkpointing(model, "selective")
    with pytest.raises(ConfigError, match="no residual blocks"):
        apply_activation_checkpointing(nn.Sequential(nn.Linear(3, 3)), "full")


def test_blocks_found_inside_wrappers_and_hf_decoder_layers() -> None:
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, h, scale=1.0):
            return h + scale * torch.tanh(self.lin(h))

    class FakeHF(nn.Module):
        _no_split_modules = ["Layer"]

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(3))

        def forward(self, h):
            for layer in self.layers:
                h = layer(h, scale=0.5)  # keyword arguments pass through the checkpoint
            return h.square().sum()

    wrapper = nn.ModuleDict({"inner": _model("gpt")})
    assert len(list(iter_blocks(wrapper))) == 2
    torch.manual_seed(0)
    hf = FakeHF().double()
    h = torch.randn(5, 4, dtype=torch.float64)
    hf(h).backward()
    ref = [p.grad.clone() for p in hf.parameters()]
    hf.zero_grad()
    assert apply_activation_checkpointing(hf, "selective") == 3
    hf(h).backward()
    for p, r in zip(hf.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_trainer_applies_checkpointing_and_keeps_the_trajectory(mode: str, one_thread) -> None:
    """Through the Trainer (train.activation_checkpoint, with grad_accum=2 micro-batches): same losses, grad norms
    and parameters as the plain run after three AdamW steps (float64), and the blocks really are wrapped."""
    from chainfree.config import TrainConfig
    from chainfree.methods import build_method
    from chainfree.training import Trainer

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 61, (4, 17), generator=g) for _ in range(3)]
    runs = []
    for ac in ("none", mode):
        tc = TrainConfig(device="cpu", dtype="fp64", steps=3, warmup_steps=1, lr=1e-2, batch_size=4, grad_accum=2,
                         activation_checkpoint=ac)
        trainer = Trainer(tc, build_method("exact"))
        state = trainer.setup(_model("hybrid"))
        stats = [trainer.train_step(state, (b[:, :-1], b[:, 1:])) for b in batches]
        wrapped = [getattr(blk, "_chainfree_checkpoint", None) for blk in iter_blocks(state.model)]
        runs.append((stats, [p.detach().clone() for p in state.model.parameters()], wrapped))
    (s0, p0, w0), (s1, p1, w1) = runs
    assert w0 == [None, None] and w1 == [mode, mode]
    for a, b in zip(s0, s1, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-12)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-10)
    for a, b in zip(p0, p1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_compile_runs_on_cpu_and_matches_eager(one_thread) -> None:
    eager, compiled = _twins(n_layers=1)
    x, y = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    with pytest.raises(ConfigError, match="compile_mode must be one of"):
        compile_model(compiled, "fastest")
    assert compile_model(compiled, "default") == 1
    # RoPE tables built before compiling (under CUDA graphs a cache built in-graph is overwritten by replays)
    assert compiled.blocks[0].attn._rope is not None and compiled.blocks[0].attn._rope[0].shape[0] == 16
    _assert_same_loss_and_grads(compiled, eager, x, y)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]


def test_compile_scope_blocks_compiles_each_block_and_matches_eager(one_thread) -> None:
    from chainfree.training.options import apply_train_options

    eager, compiled = _twins(n_layers=2)
    done = apply_train_options(compiled, TrainConfig(compile=True, compile_scope="blocks"))
    assert done["compiled_modules"] == 2 and done["compile_scope"] == "blocks"
    _assert_same_loss_and_grads(compiled, eager, torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16)))


def test_compile_scope_model_is_refused_for_a_method_that_runs_blocks_itself() -> None:
    from chainfree.training.options import apply_train_options

    model = LanguageModel(ModelConfig(vocab_size=61, seq_len=16, d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(ConfigError, match="compile_scope='model'"):
        apply_train_options(model, TrainConfig(compile=True, compile_scope="model"), uses_autograd_step=False)
    with pytest.raises(ConfigError, match="train.compile_scope"):
        TrainConfig(compile_scope="layers").validate()
