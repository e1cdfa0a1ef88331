"""HBLL: locality of gradients, exactness of the tree messages where the tree is exact, the O(log N)
critical path counted by the code, sub-networks, vmap == loop reference, and learning above chance."""

from __future__ import annotations

import math

import pytest
import torch

from chainfree.bench.critical_path import count_exact_critical_path
from chainfree.errors import ConfigError
from chainfree.methods.exact import Exact
from chainfree.methods.hbll import HBLL, FlatBlockLocal, HBLLConfig
from chainfree.methods.hbll_rnn import TimeTreeConfig, bptt_step, tbptt_step
from chainfree.models.char_rnn import CharGRU
from chainfree.models.hbll_tree import TimeTree
from chainfree.models.vision import VisionNet


def tiny(n_layers=8, d=16, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return VisionNet(12, 5, d=d, n_layers=n_layers).to(dtype)


def batch(n=32, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_no_gradient_crosses_block_boundaries():
    """Every block input except the stem's output must be a graph leaf (detached) in a training step."""
    method = HBLL(HBLLConfig(parallel="loop"))
    tree = method.prepare(tiny())
    seen = []
    modules = [leaf[0] for leaf in tree._leaves] + [sc[0] for sc in tree.shortcuts]
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, i=i: seen.append((i, args[0]))) for i, m in enumerate(modules)
    ]
    x, y = batch()
    method.step(tree, x, y)
    for h in hooks:
        h.remove()
    assert len(seen) == len(modules)  # every leaf and every shortcut evaluated once
    for i, inp in seen:
        if i == 0:  # leaf 0: the stem is part of leaf 0
            assert inp.grad_fn is not None
        else:
            assert inp.grad_fn is None, f"module {i} receives an input with a graph: gradient would cross"


def test_block_grads_do_not_depend_on_other_blocks_graph():
    """Changing an earlier leaf's weights changes nothing of a later leaf's gradient except through the tree
    messages and inputs, which come from shortcuts: with the shortcuts and messages fixed (global_weight=0
    removes the messages), leaf 3's gradient is independent of leaf 1's weights."""
    cfg = HBLLConfig(parallel="loop", global_weight=0.0)
    x, y = batch()
    out = []
    for bump in (0.0, 1.0):
        method = HBLL(cfg)
        tree = method.prepare(tiny(n_layers=4))
        with torch.no_grad():
            tree._leaves[1][0].mlp.up.weight.add_(bump)
        method.step(tree, x, y)
        out.append(tree.named_model_grads()["blocks.3.mlp.up.weight"].clone())
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_two_leaf_tree_is_exact_backprop_at_init():
    """With 2 leaves of 1 layer, the level-0 shortcuts are initialised as copies of their leaves, so the
    tree input of leaf 1 is its true input and the message delta_1 is the true gradient: every gradient
    of the model (stem, blocks, head) equals exact backprop in float64."""
    x, y = batch(dtype=torch.float64)
    exact_model = tiny(n_layers=2, dtype=torch.float64)
    exact_model(x, y).backward()
    ref = grads(exact_model)
    method = HBLL(HBLLConfig(parallel="loop", global_weight=1.0, aux_weight=0.0, shortcut_aux_weight=0.0))
    tree = method.prepare(tiny(n_layers=2, dtype=torch.float64))
    stats = method.step(tree, x, y)
    got = tree.named_model_grads()  # the stacked leaf gradients under the plain model's names
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    assert abs(stats.loss - float(exact_model(x, y).detach())) < 1e-12


@pytest.mark.parametrize("n_layers", [2, 4, 8, 16, 32])
def test_critical_path_is_logarithmic(n_layers):
    """Counted from the step's data dependencies: 2 log2 N + 2 layer evaluations (block_size = shortcut
    layers = 1), against 2 N counted by hooks for exact backprop."""
    method = HBLL(HBLLConfig(parallel="loop"))
    tree = method.prepare(tiny(n_layers=n_layers, d=8))
    x, y = batch(n=4)
    stats = method.step(tree, x, y)
    assert stats.extra["critical_path"] == 2 * math.log2(n_layers) + 2
    assert count_exact_critical_path(tiny(n_layers=n_layers, d=8), x, y) == 2 * n_layers


@pytest.mark.parametrize("pair", [False, True])
def test_critical_path_with_wider_blocks(pair):
    method = HBLL(HBLLConfig(parallel="loop", block_size=4, shortcut_layers=2, pair_leaves=pair))
    tree = method.prepare(tiny(n_layers=32, d=8))  # 8 leaves, 3 levels
    stats = method.step(tree, *batch(n=4))
    # prefix 3 * 2 + leaf 4 -> delta_M at 10; 3 suffix VJPs of 2 -> 16; leaf 0 backward 4 -> 20. Pairing
    # replaces the last prefix round (a 2-layer shortcut) by an even leaf (4 layers): +2
    assert stats.extra["critical_path"] == (22 if pair else 20)


def test_paired_leaves_get_true_inputs_whatever_the_shortcuts():
    """With pair_leaves, odd leaf 2i+1 reads the true output of even leaf 2i. In a 2-leaf tree the last leaf
    and the head then see exactly the chain's states and the exact top message, so their gradients equal
    backprop's in float64 even after the shortcuts were perturbed away from the leaves; without pairing
    they do not (the leaf reads the level-0 shortcut's estimate)."""
    x, y = batch(dtype=torch.float64)
    exact_model = tiny(n_layers=2, dtype=torch.float64)
    exact_model(x, y).backward()
    ref = grads(exact_model)
    later = [n for n in ref if n.startswith(("blocks.1.", "norm.", "head."))]
    assert len(later) >= 4
    for pair in (True, False):
        method = HBLL(HBLLConfig(parallel="loop", pair_leaves=pair, aux_weight=0.0, shortcut_aux_weight=0.0))
        tree = method.prepare(tiny(n_layers=2, dtype=torch.float64))
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in tree.named_parameters():
                if "shortcut" in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        method.step(tree, x, y)
        got = tree.named_model_grads()
        for name in later:
            if pair:
                torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
            else:
                assert not torch.allclose(got[name], ref[name], rtol=1e-6, atol=1e-9), name


def test_corrections_cost_at_most_one_block_each():
    """A Jacobi sweep after the tree feeds leaf j+1 with F_j(m_j): +0 or +1 block on the critical path."""
    x, y = batch(n=4)
    paths = []
    for c in (0, 1, 2, 3):
        method = HBLL(HBLLConfig(parallel="loop", corrections=c))
        paths.append(method.step(method.prepare(tiny(n_layers=16, d=8)), x, y).extra["critical_path"])
    assert paths[0] == 10  # 2 log2 16 + 2
    assert all(0 <= b - a <= 1 for a, b in zip(paths, paths[1:], strict=False))
    assert paths[-1] > paths[0]


@pytest.mark.parametrize("global_weight", [0.0, 0.1])
def test_first_correction_is_free_on_the_critical_path(global_weight):
    """block_size = shortcut_layers: the first Jacobi sweep reads states that are never the deepest prefix
    state, so it does not lengthen the step's critical path (the docs' claim; measured quality gain there)."""
    x, y = batch(n=4)
    for n_layers in (2, 4, 8, 16, 32):
        paths = []
        for c in (0, 1):
            method = HBLL(HBLLConfig(parallel="vmap", corrections=c, global_weight=global_weight))
            paths.append(method.step(method.prepare(tiny(n_layers=n_layers, d=8)), x, y).extra["critical_path"])
        assert paths[0] == paths[1], (n_layers, paths)


def test_paired_correction_gives_the_jacobi_states():
    """pair_leaves + corrections=1 (the first sweep skips the even leaves, whose outputs the pairing round already
    has): the leaf round must see exactly one Jacobi sweep over the paired tree states, float64."""
    torch.manual_seed(0)
    x, y = batch(n=8, dtype=torch.float64)
    method = HBLL(HBLLConfig(parallel="loop", corrections=1))
    tree = method.prepare(tiny(n_layers=8, d=8, dtype=torch.float64))
    with torch.no_grad():  # expected: prefix shortcuts (levels >= 1), pairing, then one Jacobi sweep
        t = tree.prefix_states(tree.stem(x))
        for i in range(0, 8, 2):
            t[i + 1] = tree._leaves[i](t[i])
        want = [t[0]] + [tree._leaves[j](t[j]) for j in range(7)]
    seen: dict[int, torch.Tensor] = {}
    hooks = [leaf[0].register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach()))
             for i, leaf in enumerate(tree._leaves)]
    method.step(tree, x, y)  # the last call of each leaf is the leaf round
    for hnd in hooks:
        hnd.remove()
    for i in range(1, 8):
        torch.testing.assert_close(seen[i], want[i], rtol=1e-12, atol=1e-12, msg=f"leaf {i}")


def test_vmap_matches_loop_reference():
    x, y = batch(dtype=torch.float64)
    results = []
    for mode in ("loop", "vmap"):
        method = HBLL(HBLLConfig(parallel=mode))
        tree = method.prepare(tiny(n_layers=8, dtype=torch.float64))
        stats = method.step(tree, x, y)
        results.append((stats, grads(tree)))
    (s0, g0), (s1, g1) = results
    assert s0.loss == pytest.approx(s1.loss, rel=1e-12)
    assert set(g0) == set(g1)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-9, atol=1e-12, msg=name)


def test_subnetworks_valid_and_chain_is_the_model():
    tree = HBLL(HBLLConfig()).prepare(tiny(n_layers=8))
    x, _ = batch()
    subs = tree.subnetworks()
    assert [d for _, d in subs] == [1, 2, 4, 8, 4, 8]  # levels 3..0, tree path, chain
    for name, _ in subs:
        logits = tree.model.head(tree.model.norm(tree.subnetwork_hidden(x, name)))
        assert logits.shape == (32, 5) and torch.isfinite(logits).all()
    torch.testing.assert_close(tree(x), tree.model(x))


def test_bad_configs_fail_clearly():
    with pytest.raises(ConfigError, match="power-of-two"):
        HBLL(HBLLConfig()).prepare(tiny(n_layers=6))
    with pytest.raises(ConfigError, match="block_size"):
        HBLL(HBLLConfig(block_size=3)).prepare(tiny(n_layers=8))
    with pytest.raises(ConfigError, match="parallel"):
        HBLLConfig(parallel="threads").validate()
    with pytest.raises(ConfigError, match="corrections"):
        HBLLConfig(corrections=-1).validate()
    with pytest.raises(ConfigError, match="pair_leaves"):
        HBLLConfig(pair_leaves="yes").validate()


def clusters(n, seed, dim=12, classes=5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


@pytest.mark.parametrize("method", [HBLL(HBLLConfig()), FlatBlockLocal(), Exact()])
def test_training_beats_chance(method):
    """Gaussian clusters, 5 classes (chance 0.2); held-out accuracy after 25 steps must exceed 0.6."""
    torch.manual_seed(0)
    model = method.prepare(tiny(n_layers=4, d=16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(25):
        x, y = clusters(64, seed=step)
        opt.zero_grad()
        method.step(model, x, y)
        opt.step()
    x, y = clusters(500, seed=999)
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    print(f"{method.name}: held-out accuracy {acc:.3f}")
    assert acc > 0.6


def test_language_model_step():
    from chainfree.config import ModelConfig
    from chainfree.models.lm import LanguageModel

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, seq_len=16, d_model=32, n_layers=4, n_heads=2)
    method = HBLL(HBLLConfig())
    tree = method.prepare(LanguageModel(cfg))
    ids = torch.randint(0, 32, (4, 17))
    stats = method.step(tree, ids[:, :-1], ids[:, 1:])
    assert math.isfinite(stats.loss) and stats.extra["critical_path"] == 6
    assert all(torch.isfinite(p.grad).all() for p in tree.parameters() if p.grad is not None)
    assert float(method.eval_loss(tree, ids[:, :-1], ids[:, 1:])) == pytest.approx(
        float(tree.model(ids[:, :-1], ids[:, 1:]).detach()), rel=1e-6)


def test_time_tree_trains_and_is_shorter_than_bptt():
    torch.manual_seed(0)
    text = torch.tensor(list(b"abcdefgh" * 20), dtype=torch.long)
    ids, tgt = text[:64].view(1, 64).repeat(4, 1), text[1:65].view(1, 64).repeat(4, 1)
    model = CharGRU(d=32)
    tree = TimeTree(model, TimeTreeConfig(chunk=16, window=8), seq_len=64)
    opt = torch.optim.AdamW(tree.parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        opt.zero_grad()
        stats = tree.step(ids, tgt)
        first = first if first is not None else stats["loss"]
        opt.step()
    assert stats["loss"] < 0.5 * first
    # 2 prefix rounds of 8 steps + 16 forward + 16 backward, against 2 * 64 (BPTT) and 64 + 16 (TBPTT)
    assert stats["critical_path"] == 2 * 8 + 16 + 16 < bptt_step(CharGRU(d=8), ids, tgt)["critical_path"]
    assert tbptt_step(CharGRU(d=8), ids, tgt, chunk=16)["critical_path"] == 64 + 16
    with pytest.raises(ConfigError, match="power of two"):
        TimeTree(CharGRU(d=8), TimeTreeConfig(chunk=16, window=8), seq_len=48)


def test_vmap_matches_loop_for_gpt_blocks():
    """The batched path (math attention under vmap) against the loop path (SDPA), float64."""
    from chainfree.config import ModelConfig
    from chainfree.models.lm import LanguageModel

    cfg = ModelConfig(vocab_size=32, seq_len=16, d_model=16, n_layers=4, n_heads=2)
    ids = torch.randint(0, 32, (2, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for mode in ("loop", "vmap"):
        torch.manual_seed(0)
        method = HBLL(HBLLConfig(parallel=mode))
        tree = method.prepare(LanguageModel(cfg).double())
        stats = method.step(tree, ids[:, :-1], ids[:, 1:])
        results.append((stats.loss, grads(tree)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-9, atol=1e-12, msg=name)
