"""SUS backprop's variance experiment on a pretrained LLM (`chainfree reproduce sus --model smollm2`).

The paper measured its headline number (about 1% more gradient variance at c ~ 25-30, n ~ 2000) on a
pretrained OPT-125m, whose attention is much peakier than that of a small model trained for minutes.
Here the model is a real pretrained transformer (default SmolLM2-135M-Instruct, LLaMA architecture,
30 layers, 9 query / 3 KV heads) and the text is the bundled Shakespeare corpus, which the model was
not fine-tuned on.

Quantity (SPEC §2): for one minibatch b (one sequence of n tokens) let g_b be the exact gradient and
ĝ_b a SUS gradient with fresh masks. SUS is unbiased, so Var_total(SUS) = Var_b(g) + E‖ĝ - g‖², and
the relative variance increase is

    r(n, c) = E_b E_mask ‖ĝ_b - g_b‖²  /  Var_b(g),     Var_b(g) = E_b ‖g_b - E g‖²,

overall and restricted to each parameter group. Var_b(g) is the unbiased sample variance over M
independent sequences (non-overlapping windows of the train split), from the M x M Gram matrix of
their exact gradients; the numerator averages K mask draws per sequence. The standard error is the
jackknife over sequences of the ratio (numerator and denominator left out together).

One forward serves every backward of a sequence: the attention is an autograd Function whose backward
reads its mode (exact, or SUS at keep rate c) when it runs, so the exact gradient and all K·|cs| SUS
gradients come from one retained graph. The SUS backward is the reference semantics (the keep rule
and random source of `chainfree.ops.sus_reference.sampled_weights`, a fresh seed per layer and
backward); a test checks it against `sus_attention_reference` draw for draw and against exact
autograd in float64.

The forward also records the attention sparsity picture: per layer, the fraction of causally visible
attention weights above 1/c (the entries SUS keeps with certainty) and the expected kept fraction
mean(min(1, c·W)).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chainfree.ops.sus_random import draw_seed
from chainfree.ops.sus_reference import sampled_weights


@dataclass
class BackwardMode:
    """What the next backward of every SwitchableAttention does, and what its forward records.

    c: None = exact backward; a number = SUS at that keep rate (`variant` sampling).
    seeds: when not None, seeds are taken from this list in call order (tests); else drawn from `generator`.
    sparsity_cs: keep rates for which the forward counts W > 1/c and sums min(1, c·W) per layer.
    """

    c: float | None = None
    variant: str = "bernoulli"
    generator: torch.Generator | None = None
    seeds: list[int] | None = None
    sparsity_cs: tuple[float, ...] = ()
    counts: dict[int, dict[str, float]] = field(default_factory=dict)
    record: bool = False

    def next_seed(self) -> int:
        return self.seeds.pop(0) if self.seeds is not None else draw_seed(self.generator)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        n_q, n_k = s.shape[-2], s.shape[-1]
        s = s.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).triu(n_k - n_q + 1),
                          float("-inf"))  # fmt: skip
    return s


class SwitchableAttention(torch.autograd.Function):
    """Exact attention forward; backward exact or SUS according to `mode` at backward time.

    q, k, v: [B, H, n, D] (k, v already expanded to the query heads, so autograd sums GQA groups)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, mode, layer):
        w = torch.softmax(_scores(q, k, scale, causal), dim=-1)
        out = torch.matmul(w, v)
        if mode.record and mode.sparsity_cs:
            visible = float((w > 0).sum())
            row = mode.counts.setdefault(layer, {"visible": 0.0})
            row["visible"] += visible
            for c in mode.sparsity_cs:
                row[f"above_{c:g}"] = row.get(f"above_{c:g}", 0.0) + float((w > 1.0 / c).sum())
                row[f"kept_{c:g}"] = row.get(f"kept_{c:g}", 0.0) + float(torch.clamp(c * w, max=1.0).sum())
        ctx.save_for_backward(q, k, v, out)
        ctx.params = (scale, causal, mode)
        return out

    @staticmethod
    def backward(ctx, go):
        q, k, v, out = ctx.saved_tensors
        scale, causal, mode = ctx.params
        w = torch.softmax(_scores(q, k, scale, causal), dim=-1)
        if mode.c is not None:
            B, H, n_q, _ = q.shape
            bh = torch.arange(B * H, device=q.device).reshape(B, H, 1, 1)
            rows = torch.arange(n_q, device=q.device)
            w, _, _ = sampled_weights(w, mode.c, mode.next_seed(), bh, rows, mode.variant)
        delta = (go * out).sum(dim=-1, keepdim=True)  # D_i = dO_i . O_i, exact
        ds = w * (torch.matmul(go, v.transpose(-1, -2)) - delta)
        dv = torch.matmul(w.transpose(-1, -2), go)
        dq = torch.matmul(ds, k) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q) * scale
        return dq, dk, dv, None, None, None, None


class SwitchableAttentionFn:
    """SDPA-convention attention function around SwitchableAttention; numbers layers by call order."""

    def __init__(self, mode: BackwardMode, n_layers: int) -> None:
        self.mode, self.n_layers, self.calls = mode, n_layers, 0

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p:
            raise ValueError("SwitchableAttention supports neither attn_mask nor dropout")
        if k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        layer = self.calls % self.n_layers
        self.calls += 1
        return SwitchableAttention.apply(q, k, v, scale, bool(is_causal), self.mode, layer)


PARAM_GROUPS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "norm", "embed")


def param_group(name: str) -> str:
    for group in PARAM_GROUPS:
        if group in name:
            return group
    return "other"


def _layer_of(name: str) -> int:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "blocks") and b.isdigit():
            return int(b)
    return -1


def jackknife_ratio(num: np.ndarray, gram: np.ndarray) -> tuple[float, float, float]:
    """(ratio, jackknife SE, denominator) of mean(num) / Var, Var the unbiased variance from the Gram matrix.

    num: [M] per-sequence numerators; gram: [M, M] inner products of the per-sequence exact gradients."""
    m = len(num)

    def var(idx: np.ndarray) -> float:
        g = gram[np.ix_(idx, idx)]
        k = len(idx)
        return float((np.trace(g) - g.sum() / k) / (k - 1))

    full = np.arange(m)
    v = var(full)
    ratio = float(num.mean() / v)
    if m < 3:
        return ratio, float("nan"), v
    loo = np.array([num[np.delete(full, i)].mean() / var(np.delete(full, i)) for i in range(m)])
    se = float(math.sqrt((m - 1) / m * ((loo - loo.mean()) ** 2).sum()))
    return ratio, se, v


def sequences(tokens: np.ndarray, n: int, count: int, seed: int) -> list[torch.Tensor]:
    """`count` non-overlapping windows of n + 1 tokens, at random window slots of the token array."""
    slots = (len(tokens) - 1) // (n + 1)
    if slots < count:
        raise ValueError(f"only {slots} windows of {n + 1} tokens in the split; need {count}")
    g = np.random.default_rng(seed)
    picks = np.sort(g.choice(slots, size=count, replace=False))
    return [torch.from_numpy(np.asarray(tokens[p * (n + 1):(p + 1) * (n + 1)], dtype=np.int64)) for p in picks]


def measure(model: nn.Module, seqs: list[torch.Tensor], cs: tuple[float, ...], draws: int, mode: BackwardMode,
            scratch: Path, log=print) -> dict[str, Any]:
    """Per-sequence squared SUS errors (per group/layer unit) and the Gram matrices of the exact gradients."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    units = sorted({(param_group(n), _layer_of(n)) for n, _ in named})
    unit_of = [units.index((param_group(n), _layer_of(n))) for n, _ in named]
    sizes = [p.numel() for p in params]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    m = len(seqs)
    store = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(m, int(offsets[-1])))
    err = np.zeros((len(cs), m, draws, len(units)))
    seconds = []
    for b, seq in enumerate(seqs):
        t0 = time.perf_counter()
        x, y = seq[None, :-1], seq[None, 1:]
        mode.c, mode.record = None, True
        loss = model(x, y)
        mode.record = False
        exact = torch.autograd.grad(loss, params, retain_graph=True)
        for i, g in enumerate(exact):
            store[b, offsets[i]:offsets[i + 1]] = g.reshape(-1).float().numpy()
        total = len(cs) * draws
        for ci, c in enumerate(cs):
            for d in range(draws):
                mode.c = c
                total -= 1
                sus = torch.autograd.grad(loss, params, retain_graph=total > 0)
                for i, (gs, ge) in enumerate(zip(sus, exact, strict=True)):
                    err[ci, b, d, unit_of[i]] += float(((gs - ge).double() ** 2).sum())
        mode.c = None
        seconds.append(time.perf_counter() - t0)
        log(f"    sequence {b + 1}/{m}: loss {float(loss):.3f}, {seconds[-1]:.1f}s")
    store.flush()
    gram = np.zeros((len(units), m, m))
    for i in range(len(params)):
        block = np.asarray(store[:, offsets[i]:offsets[i + 1]], dtype=np.float64)
        gram[unit_of[i]] += block @ block.T
    del store
    scratch.unlink(missing_ok=True)
    return {"units": units, "err": err, "gram": gram, "seconds": seconds}


def summarize(raw: dict[str, Any], n: int, cs: tuple[float, ...]) -> list[dict[str, Any]]:
    """Rows (n, c): overall ratio ± SE and per parameter group, from `measure`'s output."""
    units, err, gram = raw["units"], raw["err"], raw["gram"]
    groups = sorted({g for g, _ in units})
    rows = []
    for ci, c in enumerate(cs):
        per_seq = err[ci].mean(axis=1)  # [M, units], mean over draws
        ratio, se, var = jackknife_ratio(per_seq.sum(axis=1), gram.sum(axis=0))
        row: dict[str, Any] = {"n": n, "c": c, "variance_increase": ratio, "variance_increase_se": se,
                               "var_b_exact": var, "sequences": int(err.shape[1]), "draws": int(err.shape[2]),
                               "groups": {}, "layers": {}}  # fmt: skip
        for group in groups:
            idx = [i for i, (g, _) in enumerate(units) if g == group]
            r, s, v = jackknife_ratio(per_seq[:, idx].sum(axis=1), gram[idx].sum(axis=0))
            row["groups"][group] = {"variance_increase": r, "variance_increase_se": s, "var_b_exact": v}
        for layer in sorted({ly for _, ly in units if ly >= 0}):
            idx = [i for i, (_, ly) in enumerate(units) if ly == layer]
            r, s, _ = jackknife_ratio(per_seq[:, idx].sum(axis=1), gram[idx].sum(axis=0))
            row["layers"][layer] = {"variance_increase": r, "variance_increase_se": s}
        rows.append(row)
    return rows


def sparsity_rows(counts: dict[int, dict[str, float]], n: int, cs: tuple[float, ...]) -> list[dict[str, Any]]:
    rows = []
    for layer in sorted(counts):
        row: dict[str, Any] = {"n": n, "layer": layer}
        vis = counts[layer]["visible"]
        for c in cs:
            row[f"above_1/{c:g}"] = counts[layer][f"above_{c:g}"] / vis
            row[f"kept_c{c:g}"] = counts[layer][f"kept_{c:g}"] / vis
        rows.append(row)
    return rows


def dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=float))


__all__ = ["BackwardMode", "SwitchableAttention", "SwitchableAttentionFn", "jackknife_ratio", "measure",
           "param_group", "sequences", "sparsity_rows", "summarize"]
