"""The tile rule of the pretrained-model variance experiment (`chainfree reproduce sus --scale tile`):
W~ is unbiased for W, exact where every keep probability is 1, and its kept share is what it draws."""

from __future__ import annotations

import math

import pytest
import torch

from chainfree.reproduce._sus_pretrained import (
    BackwardMode,
    SwitchableAttention,
    TileRule,
    _markdown,
    summarize,
    tile_sampled_weights,
)


def _weights(B: int, H: int, n: int, causal: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = 2.0 * torch.randn(B, H, n, n, generator=g, dtype=torch.float64)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1)


@pytest.mark.parametrize("causal", [True, False])
def test_keep_probability_one_everywhere_is_exact(causal):
    w = _weights(2, 3, 11, causal)
    out, kept, visible = tile_sampled_weights(w, TileRule(c=1e9, tile=4), causal, torch.Generator().manual_seed(1))
    assert torch.equal(out, w)
    assert kept == pytest.approx(visible)  # every visible pair kept, tails included


@pytest.mark.parametrize("rule", [TileRule(c=2.0, tile=4), TileRule(c=1.0, tile=3, stride=2, floor=0.1)])
def test_tile_weights_are_unbiased(rule):
    """z-test per entry over N draws: mean(W~) - W, SE from the sample std; a failing entry would have |z| > 5
    with probability ~6e-7 per entry under the null (a few hundred entries here)."""
    w = _weights(1, 2, 10, causal=True)
    g = torch.Generator().manual_seed(2)
    draws = torch.stack([tile_sampled_weights(w, rule, True, g)[0] for _ in range(1500)])
    mean, sd = draws.mean(0), draws.std(0)
    varying = sd > 0
    z = (mean - w)[varying] / (sd[varying] / math.sqrt(draws.shape[0]))
    assert z.abs().max() < 5
    assert torch.allclose(mean[~varying], w[~varying], atol=1e-12)  # kept with certainty (or never visible)
    assert varying.any()  # the rule really samples at this c


def test_kept_share_is_the_drawn_share_in_expectation():
    w = _weights(1, 2, 16, causal=True)
    rule = TileRule(c=1.5, tile=4, stride=2, floor=0.05)
    g = torch.Generator().manual_seed(3)
    _, expected, visible = tile_sampled_weights(w, rule, True, g)
    drawn = [float(((tile_sampled_weights(w, rule, True, g)[0] > 0) | (w == 0)).logical_and(
        torch.ones(16, 16, dtype=torch.bool).tril()).sum()) for _ in range(400)]
    # visible pairs with w == 0 cannot occur with these scores; every pair of a kept tile is nonzero
    mean = sum(drawn) / len(drawn)
    sd = torch.tensor(drawn).std().item()
    assert abs(mean - expected) < 5 * sd / math.sqrt(len(drawn))
    assert visible == 2 * 16 * 17 / 2


def test_switchable_attention_tile_backward_matches_exact_in_expectation():
    """The harness's backward under a tile rule: gradients averaged over draws approach exact autograd."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mode = BackwardMode(generator=torch.Generator().manual_seed(5))
    out = SwitchableAttention.apply(q, k, v, 0.5, True, mode, 0)
    go = torch.randn_like(out)
    exact = torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
    mode.c = TileRule(c=1e9, tile=4)
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), go, retain_graph=True),
                                                    exact, strict=True))
    mode.c = TileRule(c=1.0, tile=4)
    draws = [torch.autograd.grad(out, (q, k, v), go, retain_graph=True) for _ in range(300)]
    for p in range(3):
        d = torch.stack([x[p] for x in draws])
        sd = d.std(0)
        z = (d.mean(0) - exact[p])[sd > 0] / (sd[sd > 0] / math.sqrt(len(draws)))
        assert z.abs().max() < 5
    assert mode.kept["tile4 c=1"][1] > 0 and 0 < mode.kept["tile4 c=1"][0] < mode.kept["tile4 c=1"][1]


def test_summary_and_markdown_put_tile_rules_beside_per_pair():
    import numpy as np

    m, units = 3, [("q_proj", 0), ("down_proj", 0)]
    rules = (32.0, TileRule(8.0))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(m, 5))
    raw = {"units": units, "err": rng.uniform(0.1, 0.2, size=(2, m, 1, 2)),
           "gram": np.stack([a @ a.T, a @ a.T])}
    rows = summarize(raw, 2048, rules, {"pair c=32": [14.0, 1000.0], "tile128 c=8": [300.0, 1000.0]})
    assert [r["rule"] for r in rows] == ["pair c=32", "tile128 c=8"]
    assert rows[1]["kept_share"] == pytest.approx(0.3) and rows[1]["kind"] == "tile"
    md = _markdown(rows, [], {"model": "m", "text": "t", "draws": 1, "precision": "fp32", "command": "x",
                              "seconds": 1.0})
    assert "| tile128 c=8 | 2048 |" in md and "30.00%" in md and "| pair c=32 | 2048 |" in md


@pytest.mark.parametrize("stride,floor", [(1, 0.0), (2, 0.05)])
def test_dense_tile_rule_is_the_ops_rule(stride, floor):
    """The experiment's dense tile rule gives the same keep probabilities as `chainfree.ops.sus_tile`'s
    reference statistic (so the measured variance is the op's), tails and causal masking included."""
    from chainfree.ops.sus_tile_reference import tile_allowed, tile_probs, tile_statistic

    g = torch.Generator().manual_seed(6)
    q, k = (torch.randn(1, 2, 11, 4, generator=g, dtype=torch.float64) for _ in range(2))
    s = (q @ k.transpose(-1, -2)) * 0.5
    s = s.masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    w = torch.softmax(s, dim=-1)
    rule = TileRule(c=3.0, tile=4, stride=stride, floor=floor)
    m = tile_statistic(q, k, lse, is_causal=True, scale=0.5, tile=4, row_stride=stride)
    allowed = tile_allowed(1, 11, 11, 4, True, None, None, q.device)
    pi_op = tile_probs(m, rule.c, allowed, floor)
    u = torch.rand(pi_op.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out, expected, _ = tile_sampled_weights(w, rule, True, torch.Generator().manual_seed(7))
    keep = (u < pi_op) | (pi_op >= 1)
    weight = torch.where(keep, 1 / pi_op.clamp(min=1e-300), torch.zeros_like(pi_op))
    ref = w * weight.repeat_interleave(4, 2).repeat_interleave(4, 3)[:, :, :11, :11]
    assert torch.allclose(out, ref)
    assert expected > 0


def test_cli_scale_tile_needs_sus_with_a_pretrained_model(tmp_path):
    """`--scale tile` is the pretrained SUS experiment's plan; elsewhere it is refused in one line."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "chainfree.cli", "reproduce", "sus", "--scale", "tile", "--out",
                        str(tmp_path)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "'tile' only with sus --model" in lines[0]
