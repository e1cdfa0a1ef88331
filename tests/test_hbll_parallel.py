"""HBLL's parallel execution: the persistent stacked parameter layout (aliases, .to(), deepcopy, state dict,
checkpoint resume) and the tree-parallel step over torch.distributed (2 gloo ranks, float64) against the
single-process step, directly and through the one training loop under torchrun."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chainfree.bench.lbi_parallel import free_port as _free_port
from chainfree.config import ModelConfig, load_config
from chainfree.logging import read_metrics
from chainfree.methods.hbll import HBLL, HBLLConfig
from chainfree.models.lm import LanguageModel
from chainfree.models.vision import VisionNet
from chainfree.parallel import hbll_tree
from chainfree.train import train

# (name, model kind, n_layers, HBLL config): vmap and loop rounds, wider blocks, no message, corrections
CASES = [
    ("mlp_loop", "mlp", 8, {"parallel": "loop"}),
    ("mlp_vmap_bs2", "mlp", 8, {"parallel": "vmap", "block_size": 2, "corrections": 1}),
    ("mlp_local", "mlp", 8, {"parallel": "vmap", "global_weight": 0.0}),
    ("gpt_vmap", "gpt", 4, {"parallel": "vmap"}),
]


def build(kind: str, n_layers: int, cfg: dict) -> tuple[HBLL, torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        base = VisionNet(12, 5, d=16, n_layers=n_layers)
        x, y = torch.randn(16, 12, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g)
    else:
        base = LanguageModel(ModelConfig(vocab_size=32, seq_len=16, d_model=16, n_layers=n_layers, n_heads=2))
        ids = torch.randint(0, 32, (2, 17), generator=g)
        x, y = ids[:, :-1], ids[:, 1:]
    method = HBLL(HBLLConfig(**cfg))
    return method, method.prepare(base.double()), x, y


def step_and_update(method, tree, x, y) -> dict[str, torch.Tensor]:
    """Gradients of one step and the parameters after one AdamW update, by name."""
    opt = torch.optim.AdamW(tree.parameters(), lr=1e-2)
    stats = method.step(tree, x, y)
    out = {f"grad/{n}": p.grad.clone() for n, p in tree.named_parameters() if p.grad is not None}
    out["loss"] = torch.tensor(stats.loss, dtype=torch.float64)
    out["critical_path"] = torch.tensor(stats.extra["critical_path"])
    opt.step()
    out.update({f"param/{n}": p.detach().clone() for n, p in tree.named_parameters()})
    return out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, kind, n, cfg in CASES:
            method, tree, x, y = build(kind, n, cfg)
            if rank:  # the step must use rank 0's batch: give the other rank a different one
                x = x.flip(0)
            assert method.tree_parallel
            results[name] = step_and_update(method, tree, x, y)
        # work split, not replicated: before the sync every stacked row has a gradient on one rank only
        method, tree, x, y = build("mlp", 8, {"parallel": "vmap"})
        with mock.patch.object(hbll_tree, "sync_gradients", lambda *a, **k: None):
            method.step(tree, x, y)
        results["rows"] = {
            st: (getattr(tree, st).param("0.mlp.up.weight").grad.flatten(1).abs().sum(1) > 0)
            for st in ("leaf_stack", "shortcut_stack")
        }
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tree_parallel_step_equals_single_process(tmp_path):
    """2 gloo ranks split every round: every rank ends with the single-process gradients and update."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for st, own0 in ranks[0]["rows"].items():
        own1 = ranks[1]["rows"][st]
        assert own0.any() and own1.any() and not (own0 & own1).any() and (own0 | own1).all(), st
    for name, kind, n, cfg in CASES:
        method, tree, x, y = build(kind, n, cfg)
        assert not method.tree_parallel
        ref = step_and_update(method, tree, x, y)
        for r, got in enumerate(ranks):
            assert set(got[name]) == set(ref), f"{name} rank {r}"
            for key, val in ref.items():
                torch.testing.assert_close(got[name][key], val, rtol=1e-9, atol=1e-12, msg=f"{name} rank {r} {key}")


def test_tree_parallel_in_the_training_loop(tiny, tmp_path):
    """torchrun, 2 CPU ranks, method hbll: tree-parallel rounds inside chainfree.train follow the
    single-process run (same global batch on every rank, gradients synced by the method, not averaged
    twice by the loop)."""
    over = tiny(
        **{"model.n_layers": 4, "train.steps": 2, "train.eval_every": 2, "train.ckpt_every": 2, "train.dtype": '"fp64"'}
    )
    args = [a for kv in over for a in ("--set", kv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "chainfree.cli",
        "train",
        "--method",
        "hbll",
        "--out",
        str(tmp_path / "tree"),
        *args,
    ]
    # single process first: it also fills the token cache the two ranks would otherwise both write
    train(load_config(overrides=over, method="hbll"), tmp_path / "single", progress=False)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    par, single = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("tree", "single"))
    assert [r["step"] for r in par] == [r["step"] for r in single] == [1, 2]
    for a, b in zip(par, single, strict=True):
        for key in ("train_loss", "grad_norm", "critical_path"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert par[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-9)


def test_stacked_layout_aliases_follow_conversions_and_copies():
    """Leaves and shortcuts live in one [n, ...] parameter per tensor; the modules read aliases of their
    rows, which must follow .to(dtype), deepcopy and load_state_dict."""
    method, tree, x, _ = build("mlp", 8, {"parallel": "loop"})
    stacked = tree.leaf_stack.param("0.mlp.up.weight")
    assert stacked.shape[0] == 8 and not any(n.startswith("model.blocks") for n, _ in tree.named_parameters())
    assert (
        tree.model.blocks[5].mlp.up.weight.data_ptr()
        == stacked[tree.leaf_stack.member_rows([tree._leaves[5]])[0]].data_ptr()
    )
    ref = tree(x)
    torch.testing.assert_close(ref, tree.model(x))  # the plain model reads the stacked weights
    half = copy.deepcopy(tree).float()
    torch.testing.assert_close(half(x.float()), ref.float(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        half.leaf_stack.param("0.mlp.up.weight").zero_()
    assert half.model.blocks[0].mlp.up.weight.abs().sum() == 0  # aliases of the copy, not of the original
    assert tree.model.blocks[0].mlp.up.weight.abs().sum() > 0
    fresh = build("mlp", 8, {"parallel": "loop"})[1]
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(tree.state_dict())
    torch.testing.assert_close(fresh(x), ref, rtol=0, atol=0)


def test_checkpoint_resume_with_stacked_parameters(tiny, tmp_path):
    """An HBLL run interrupted and resumed from its checkpoint (stacked parameters and their AdamW state)
    reproduces the uninterrupted run exactly."""
    over = tiny(**{"model.n_layers": 4, "train.steps": 4, "train.eval_every": 2, "train.ckpt_every": 2})
    train(load_config(overrides=over, method="hbll"), tmp_path / "full", progress=False)
    train(load_config(overrides=over, method="hbll"), tmp_path / "split", stop_at=2, progress=False)
    train(load_config(overrides=over, method="hbll"), tmp_path / "split", progress=False)
    full, split = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "split"))
    assert [(r["step"], r["train_loss"]) for r in full] == [(r["step"], r["train_loss"]) for r in split]


@pytest.mark.parametrize("kind", ["mlp", "gpt", "gpt_gqa", "seq2"])
def test_hand_batched_forward_equals_vmap_and_module(kind):
    """The hand-batched forward of known blocks (bmm linears, SDPA on k*B sequences) against torch.func.vmap
    of functional_call and against calling each member module: values and gradients, float64."""
    from chainfree.models.attention import TransformerBlock
    from chainfree.models.vision import ResidualMLPBlock
    from chainfree.nn.stacked import StackedParams, stacked_apply
    from chainfree.nn.stacked import has_batched_forward as _batchable

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=8, seq_len=8, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2 if kind == "gpt_gqa" else 0
    )

    def block():
        if kind == "mlp":
            return ResidualMLPBlock(16, 24)
        if kind == "seq2":
            return torch.nn.Sequential(ResidualMLPBlock(16, 24), TransformerBlock(cfg))
        return TransformerBlock(cfg)

    members = [block().double() for _ in range(3)]
    for m in members:  # non-trivial norms
        for name, p in m.named_parameters():
            if "ln" in name:
                p.data.normal_()
    stack = StackedParams(members)
    assert _batchable(members[0])
    shape = (3, 5, 16) if kind == "mlp" else (3, 2, 8, 16)
    xs = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    results = []
    for path in ("hand", "vmap", "module"):
        params = stack.rows(slice(0, 3))
        if path == "module":
            out = torch.stack([torch.func.functional_call(m, stack.rows(i), (xs[i],)) for i, m in enumerate(members)])
        else:
            out = stacked_apply(members[0], params, xs, generic=path == "vmap")
        weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        (out * weights).sum().backward()
        results.append((out.detach(), xs.grad.clone(), {n: stack.param(n).grad.clone() for n in stack.names}))
        xs.grad = None
        for n in stack.names:
            stack.param(n).grad = None
    for out, gx, gp in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gx, results[0][1], rtol=1e-10, atol=1e-12)
        for n in gp:
            torch.testing.assert_close(gp[n], results[0][2][n], rtol=1e-10, atol=1e-12, msg=n)


def test_readout_ce_with_saved_gradient_equals_cross_entropy():
    """The readouts' CE (logit gradient kept from the forward, several row chunks) against F.cross_entropy on
    the full logits: value and gradients of h, W and b, float64, with ignored rows."""
    from chainfree.ops.cross_entropy import IGNORE_INDEX, linear_cross_entropy
    from chainfree.ops.cross_entropy import SavedGradLinearCrossEntropy as _SavedGradCE

    def readout_linear_ce(h, w, b, t):
        return linear_cross_entropy(h, w, b, t, keep_logit_grad=True)

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2000, 8, dtype=torch.float64, generator=g, requires_grad=True)  # 8388 rows per chunk: 1 chunk
    b = torch.randn(2000, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 2000, (3, 7), generator=g)
    t[1, 2] = t[2, 5] = IGNORE_INDEX
    results = []
    for fn in (readout_linear_ce, _SavedGradCE, None):
        if fn is _SavedGradCE:  # 5 rows per chunk: 5 chunks
            loss = fn.apply(h.reshape(-1, 8), w, b, t.reshape(-1), 5)
        elif fn is None:
            loss = torch.nn.functional.cross_entropy((h @ w.T + b).reshape(-1, 2000), t.reshape(-1))
        else:
            loss = fn(h, w, b, t)
        results.append((loss.detach(), *torch.autograd.grad(loss * 3.0, (h, w, b))))
    for res in results[:2]:
        for got, ref in zip(res, results[2], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)


def test_tree_parallel_strategy_choice():
    """HBLL picks 'hbll_tree' under torchrun unless method.distributed='data'; the strategy gives every rank
    the whole batch and refuses a method that is not tree-parallel."""
    from chainfree.errors import ConfigError
    from chainfree.methods.base import Launch

    two = Launch(rank=1, world_size=2)
    assert HBLL(HBLLConfig()).strategy(two) == "hbll_tree"
    assert HBLL(HBLLConfig(distributed="data")).strategy(two) == "ddp"
    assert HBLL(HBLLConfig()).strategy(Launch()) == "single"
    strategy = hbll_tree.TreeParallel(two)
    assert strategy.batch_shard() == (0, 1)
    with pytest.raises(ConfigError, match="method.distributed='tree'"):  # no process group here: not tree-parallel
        strategy.wrap(torch.nn.Linear(2, 2), HBLL(HBLLConfig()), torch.device("cpu"))
