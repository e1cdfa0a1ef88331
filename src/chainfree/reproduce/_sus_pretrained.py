"""SUS backprop's variance experiment on a pretrained LLM (`chainfree reproduce sus --model smollm2`).

The paper measured its headline number (about 1% more gradient variance at c ~ 25-30, n ~ 2000) on a
pretrained OPT-125m, whose attention is much peakier than that of a small model trained briefly.
Here the model is a real pretrained transformer (default SmolLM2-135M-Instruct, LLaMA architecture,
30 layers, 9 query / 3 KV heads) and the text is the bundled Shakespeare corpus, which the model was
not fine-tuned on.

Quantity: for one minibatch b (one sequence of n tokens) let g_b be the exact gradient and
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

import dataclasses
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
from chainfree.ops.sus_tile_reference import draw_keep, tile_probs


@dataclass(frozen=True)
class TileRule:
    """SUS on tiles: query tile I x key tile J (edge `tile`) carries gradient with probability
    pi_IJ = min(1, c * m_IJ), weights 1/pi on a kept tile. m_IJ = max over the tile's statistic rows of the
    row's attention mass in J; the statistic rows are every row (`stride` 1, the exact statistic) or rows
    0, S, 2S, ... of the tile (S = `stride`: a proposal), then pi >= `floor` on every tile with a visible pair so the
    estimator stays unbiased. The same rule as `chainfree.ops.sus_tile`, written on the dense weights."""

    c: float
    tile: int = 128
    stride: int = 1
    floor: float = 0.0

    @property
    def label(self) -> str:
        prop = f"/s{self.stride} floor {self.floor:g}" if self.stride > 1 else ""
        return f"tile{self.tile}{prop} c={self.c:g}"


def rule_label(rule: float | TileRule) -> str:
    return rule.label if isinstance(rule, TileRule) else f"pair c={rule:g}"


def tile_sampled_weights(w: torch.Tensor, rule: TileRule, causal: bool, generator: torch.Generator | None
                         ) -> tuple[torch.Tensor, float, float]:
    """(W~, expected kept pairs, visible pairs) for weights w [B, H, n_q, n_k] under `rule`: W/pi on kept
    tiles, 0 elsewhere; one uniform per (b, h, I, J) from `generator` (CPU) moved to w's device."""
    B, H, n_q, n_k = w.shape
    t = rule.tile
    n_i, n_j = -(-n_q // t), -(-n_k // t)
    wp = torch.nn.functional.pad(w, (0, n_j * t - n_k, 0, n_i * t - n_q)).view(B, H, n_i, t, n_j, t)
    rows = wp.sum(dim=-1)  # [B, H, I, t, J]: each row's mass in each key tile
    if rule.stride > 1:
        rows = rows[:, :, :, :: rule.stride]  # rows 0, S, 2S, ... of each query tile
    mass = rows.amax(dim=3)  # [B, H, I, J]
    i = torch.arange(n_i * t, device=w.device)[:, None]
    j = torch.arange(n_j * t, device=w.device)[None, :]
    visible = (i < n_q) & (j < n_k)
    if causal:
        visible &= j <= i + (n_k - n_q)
    vis = visible.view(n_i, t, n_j, t).sum(dim=(1, 3)).to(w.dtype)  # visible pairs per tile
    pi = tile_probs(mass, rule.c, vis > 0, rule.floor)
    keep = draw_keep(pi, torch.rand(pi.shape, generator=generator, dtype=torch.float64).to(w.device, pi.dtype))
    weight = torch.where(keep, 1.0 / pi.clamp(min=torch.finfo(pi.dtype).tiny), torch.zeros_like(pi))
    out = (wp * weight[:, :, :, None, :, None]).view(B, H, n_i * t, n_j * t)[:, :, :n_q, :n_k]
    return out, float((pi * vis).sum()), float(vis.sum()) * B * H


@dataclass
class BackwardMode:
    """What the next backward of every SwitchableAttention does, and what its forward records.

    c: None = exact backward; a number = per-pair SUS at that keep rate (`variant` sampling); a TileRule =
    SUS on tiles (uniforms from `generator`). `kept` sums, per rule label, (expected kept pairs, visible
    pairs) over the backwards it ran.
    seeds: when not None, seeds are taken from this list in call order (tests); else drawn from `generator`.
    sparsity_cs: keep rates for which the forward counts W > 1/c and sums min(1, c·W) per layer.
    """

    c: float | TileRule | None = None
    variant: str = "bernoulli"
    generator: torch.Generator | None = None
    seeds: list[int] | None = None
    sparsity_cs: tuple[float, ...] = ()
    counts: dict[int, dict[str, float]] = field(default_factory=dict)
    record: bool = False
    kept: dict[str, list[float]] = field(default_factory=dict)

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
        # matmuls in the inputs' dtype (bf16 under autocast), softmax, sampling and dS in fp32 (fp64 stays fp64)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        w = torch.softmax(_scores(q, k, scale, causal).to(acc), dim=-1)
        out = torch.matmul(w.to(q.dtype), v)
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
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        go = go.to(q.dtype)
        w = torch.softmax(_scores(q, k, scale, causal).to(acc), dim=-1)
        if isinstance(mode.c, TileRule):
            w, kept, visible = tile_sampled_weights(w, mode.c, causal, mode.generator)
            acc_kept = mode.kept.setdefault(mode.c.label, [0.0, 0.0])
            acc_kept[0] += kept
            acc_kept[1] += visible
        elif mode.c is not None:
            B, H, n_q, _ = q.shape
            bh = torch.arange(B * H, device=q.device).reshape(B, H, 1, 1)
            rows = torch.arange(n_q, device=q.device)
            visible = float(B * H * (n_q * (n_q + 1) // 2 if causal and n_q == w.shape[-1] else n_q * w.shape[-1]))
            acc_kept = mode.kept.setdefault(rule_label(mode.c), [0.0, 0.0])
            acc_kept[0] += float(torch.clamp(mode.c * w, max=1.0).sum())
            acc_kept[1] += visible
            w, _, _ = sampled_weights(w, mode.c, mode.next_seed(), bh, rows, mode.variant)
        delta = (go.to(acc) * out.to(acc)).sum(dim=-1, keepdim=True)  # D_i = dO_i . O_i, exact
        ds = (w * (torch.matmul(go, v.transpose(-1, -2)).to(acc) - delta)).to(q.dtype)
        dv = torch.matmul(w.to(q.dtype).transpose(-1, -2), go)
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
        if torch.is_autocast_enabled(q.device.type) and q.dtype != torch.float64:
            cdt = torch.get_autocast_dtype(q.device.type)  # rotary embeddings may have upcast q and k
            q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
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
                    err[ci, b, d, unit_of[i]] += float(torch.linalg.vector_norm(gs - ge)) ** 2
        mode.c = None
        seconds.append(time.perf_counter() - t0)
        log(f"    sequence {b + 1}/{m}: loss {float(loss.detach()):.3f}, {seconds[-1]:.1f}s")
    store.flush()
    gram = np.zeros((len(units), m, m))
    for i in range(len(params)):
        block = np.asarray(store[:, offsets[i]:offsets[i + 1]], dtype=np.float64)
        gram[unit_of[i]] += block @ block.T
    del store
    scratch.unlink(missing_ok=True)
    return {"units": units, "err": err, "gram": gram, "seconds": seconds}


def summarize(raw: dict[str, Any], n: int, cs: tuple[float | TileRule, ...],
              kept: dict[str, list[float]] | None = None) -> list[dict[str, Any]]:
    """Rows (n, rule): overall ratio ± SE and per parameter group, from `measure`'s output; `kept` (the
    BackwardMode's record) adds each rule's expected share of visible pairs that carry gradient."""
    units, err, gram = raw["units"], raw["err"], raw["gram"]
    groups = sorted({g for g, _ in units})
    rows = []
    for ci, c in enumerate(cs):
        per_seq = err[ci].mean(axis=1)  # [M, units], mean over draws
        ratio, se, var = jackknife_ratio(per_seq.sum(axis=1), gram.sum(axis=0))
        label = rule_label(c)
        row: dict[str, Any] = {"n": n, "c": c.c if isinstance(c, TileRule) else c, "rule": label,
                               "kind": "tile" if isinstance(c, TileRule) else "pair",
                               "variance_increase": ratio, "variance_increase_se": se,
                               "var_b_exact": var, "sequences": int(err.shape[1]), "draws": int(err.shape[2]),
                               "groups": {}, "layers": {}}  # fmt: skip
        if isinstance(c, TileRule):
            row.update(tile=c.tile, stride=c.stride, floor=c.floor)
        if kept and label in kept and kept[label][1] > 0:
            row["kept_share"] = kept[label][0] / kept[label][1]
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


@dataclass(frozen=True)
class Plan:
    """What to measure, in order: stages (n, cs, M) -- M independent sequences of n tokens, each with one
    exact and `draws` SUS gradients per c in cs. Results are rewritten after every stage, so the first
    stages should be the figures that matter most. `autocast` runs matmuls in bf16 (weights, gradients,
    softmax and sampling stay fp32)."""

    stages: tuple[tuple[int, tuple[float | TileRule, ...], int], ...]
    draws: int
    autocast: bool

    @property
    def cs(self) -> tuple[float, ...]:
        """The per-pair keep rates (the forward's sparsity record counts W > 1/c for these)."""
        return tuple(sorted({c for _, cs, _ in self.stages for c in cs if not isinstance(c, TileRule)}))

    @property
    def max_n(self) -> int:
        return max(n for n, _, _ in self.stages)


GRID_CS = (8.0, 16.0, 32.0, 64.0)
PLANS = {
    # a CPU: c=32 at n=512 (cheap), then the headline cell c=32 at n=2048 (the most expensive per sequence),
    # then the rest of the c grid (stages of one process draw different windows)
    "small": Plan(stages=((512, (32.0,), 4), (2048, (32.0,), 4), (512, (8.0, 16.0, 64.0), 4), (1024, GRID_CS, 3),
                          (2048, (8.0, 16.0, 64.0), 3)), draws=1, autocast=True),
    "full": Plan(stages=((2048, GRID_CS, 32), (4096, GRID_CS, 24), (1024, GRID_CS, 32), (512, GRID_CS, 32)),
                 draws=2, autocast=True),
    # SUS on tiles beside the paper's per-pair rule on the same sequences: the exact tile statistic at three
    # keep rates and two tile edges, and the strided-row proposals (every 16th / 8th row) with a floor
    "tile": Plan(stages=((2048, (32.0, TileRule(4.0), TileRule(8.0), TileRule(16.0), TileRule(8.0, tile=64),
                                 TileRule(8.0, stride=16, floor=1 / 64), TileRule(16.0, stride=16, floor=1 / 64),
                                 TileRule(4.0, stride=8, floor=1 / 64), TileRule(16.0, stride=8, floor=1 / 64)),
                          3),), draws=1, autocast=True),
}


def _rules_table(rows: list[dict[str, Any]]) -> list[str]:
    """Every rule (per-pair and tile) at every n, with the expected share of visible pairs it keeps."""
    lines = ["| rule | n | variance increase ± SE [M] | expected kept share of visible pairs |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["n"], r.get("kind", "pair"), r.get("tile", 0), r.get("stride", 1),
                                         r["c"])):
        share = f"{100 * r['kept_share']:.2f}%" if "kept_share" in r else "not recorded"
        lines.append(f"| {r.get('rule', rule_label(r['c']))} | {r['n']} | {100 * r['variance_increase']:.3g}% ± "
                     f"{100 * r['variance_increase_se']:.2g} [{r['sequences']}] | {share} |")
    return lines


def _markdown(rows: list[dict[str, Any]], sparsity: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    all_rows = rows
    rows = [r for r in rows if r.get("kind", "pair") == "pair"]
    ns = sorted({r["n"] for r in rows})
    cs = sorted({r["c"] for r in rows})
    lines = ["| c \\ n | " + " | ".join(str(n) for n in ns) + " |", "|---|" + "|".join("---" for _ in ns) + "|"]
    for c in cs:
        cells = []
        for n in ns:
            r = next((r for r in rows if r["n"] == n and r["c"] == c), None)
            cells.append(f"{100 * r['variance_increase']:.3g}% ± {100 * r['variance_increase_se']:.2g} "
                         f"[{r['sequences']}]" if r else "not measured")
        lines.append(f"| {c:g} | " + " | ".join(cells) + " |")
    md = [f"# SUS variance on a pretrained LLM: {meta['model']}", "",
          f"Text: {meta['text']}. Per n: M independent sequences (non-overlapping windows), K={meta['draws']} SUS "
          f"draw(s) per sequence and c; {meta['precision']}. Cell: relative gradient-variance increase "
          "100·E‖ĝ−g‖²/Var_b(g) ± jackknife SE over the M sequences [M].", "",
          *lines, "", "Paper: ~1% at c 25-30, n ~2000 (pretrained OPT-125m), decreasing with n.", ""]
    if any(r.get("kind") == "tile" for r in all_rows):
        md += ["## SUS on tiles beside the per-pair rule (same sequences, same exact gradients)", "",
               "tileT c=x: exact tile statistic (max over the tile's rows of the row's mass in the key tile), "
               "keep probability min(1, c·m); /sS floor f: the statistic from every S-th row, probability at "
               "least f on every tile with a visible pair. Kept share: expected fraction of the causally "
               "visible pairs whose gradient is computed (per-pair: mean min(1, c·W); tiles: all pairs of a "
               "kept tile, weighted by its keep probability).", "", *_rules_table(all_rows), ""]
        rows = [r for r in all_rows if r.get("kind", "pair") == "pair"]
    groups = sorted({g for r in all_rows for g in r["groups"]})
    for n in ns:
        md += [f"## Per parameter group at n={n} (%, ± SE)", "",
               "| rule | " + " | ".join(groups) + " |", "|---|" + "|".join("---" for _ in groups) + "|"]
        for r in sorted((r for r in all_rows if r["n"] == n), key=lambda r: (r.get("kind", "pair"), r["c"])):
            md.append(f"| {r.get('rule', rule_label(r['c']))} | " + " | ".join(
                f"{100 * r['groups'][g]['variance_increase']:.3g} ± {100 * r['groups'][g]['variance_increase_se']:.2g}"
                for g in groups) + " |")
        md.append("")
    if sparsity:
        n = max(r["n"] for r in sparsity)
        first = next(r for r in sparsity if r["n"] == n)
        cs = sorted(float(k.split("/")[1]) for k in first if k.startswith("above_1/"))
        md += [f"## Attention sparsity at n={n}: fraction of causally visible weights above 1/c, per layer", "",
               "(entries SUS keeps with certainty; the rest carry gradient with probability c·W; kept = "
               "mean min(1, c·W), the expected share that carries gradient)", "",
               "| layer | " + " | ".join(f"W>1/{c:g}" for c in cs) + " | " + " | ".join(f"kept c={c:g}" for c in cs)
               + " |", "|---|" + "|".join("---" for _ in range(2 * len(cs))) + "|"]
        for r in (r for r in sparsity if r["n"] == n):
            md.append(f"| {r['layer']} | " + " | ".join(f"{100 * r[f'above_1/{c:g}']:.2f}%" for c in cs) + " | "
                      + " | ".join(f"{100 * r[f'kept_c{c:g}']:.2f}%" for c in cs) + " |")
        md.append("")
    if meta.get("precision_check"):
        pc = meta["precision_check"]
        md += [f"bf16-autocast check (one sequence, n={pc['n']}): ‖g_bf16 − g_fp32‖/‖g_fp32‖ = {pc['rel_error']:.3g}; "
               f"‖g_bf16 − g_fp32‖² / Var_b(g) = {100 * pc['sq_over_var']:.3g}% (an upper bound on what rounding can "
               "add to a cell: both gradients of a difference ĝ − g share one forward).", ""]
    md += [f"Command: `{meta['command']}`; {meta['seconds']:.0f} s; environment in the JSON."]
    return "\n".join(md) + "\n"


def _plot(rows: list[dict[str, Any]], sparsity: list[dict[str, Any]], path: Path, title: str) -> None:
    from chainfree.logging import pyplot, save_figure

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    rows = [r for r in rows if r.get("kind", "pair") == "pair"]
    for n in sorted({r["n"] for r in rows}):
        pts = sorted((r for r in rows if r["n"] == n), key=lambda r: r["c"])
        ax.errorbar([r["c"] for r in pts], [100 * r["variance_increase"] for r in pts],
                    yerr=[100 * r["variance_increase_se"] for r in pts], marker="o", capsize=3, label=f"n={n}")
    ax.errorbar([27.5], [1.0], xerr=[[2.5], [2.5]], marker="*", ms=12, color="k", ls="none",
                label="paper: ~1% at c 25-30, n~2000")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("c")
    ax.set_ylabel("relative gradient variance increase (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if sparsity:
        n = max(r["n"] for r in sparsity)
        pts = [r for r in sparsity if r["n"] == n]
        for key in [k for k in pts[0] if k.startswith("above_")]:
            ax2.plot([r["layer"] for r in pts], [100 * r[key] for r in pts], marker=".", label=f"W > {key[6:]}")
        ax2.set_yscale("log")
        ax2.set_xlabel("layer")
        ax2.set_ylabel("% of visible attention weights")
        ax2.set_title(f"attention sparsity, n={n}")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=8)
    save_figure(fig, path)


def merge(json_paths: list[Path], out_json: Path) -> dict[str, Any]:
    """One result from several runs of `run` (e.g. stages run as separate processes): rows concatenated,
    the sparsity table of the first run that measured each n, the commands and seconds of all."""
    payloads = [json.loads(Path(p).read_text()) for p in json_paths]
    meta = dict(payloads[0]["meta"])
    meta["command"] = " ; ".join(p["meta"]["command"] for p in payloads)
    meta["seconds"] = sum(p["meta"]["seconds"] for p in payloads)
    rows = [r for p in payloads for r in p["rows"]]
    sparsity, seen = [], set()
    for p in payloads:
        ns = {r["n"] for r in p["sparsity"]} - seen
        sparsity += [r for r in p["sparsity"] if r["n"] in ns]
        seen |= ns
    merged = {"meta": meta, "environment": payloads[0]["environment"], "rows": rows, "sparsity": sparsity,
              "parts": [p["meta"] for p in payloads]}
    dump(Path(out_json), merged)
    return merged


def render(json_path: Path, md_path: Path, png_path: Path) -> str:
    """Markdown table and PNG from a result JSON written by `run` (e.g. to publish a copy under another name)."""
    payload = json.loads(Path(json_path).read_text())
    md = _markdown(payload["rows"], payload["sparsity"], payload["meta"])
    Path(md_path).write_text(md)
    _plot(payload["rows"], payload["sparsity"], Path(png_path), f"SUS on {payload['meta']['model'].split()[0]}: "
          "variance increase vs c")
    return md


def run(out: Path, pretrained: str, plan: Plan, device: str, command: str, threads: int = 0, log=print) -> None:
    """The experiment of the module docstring; results (JSON, markdown, PNG) rewritten after every n."""
    import contextlib

    from chainfree.bench.report import environment
    from chainfree.config import DataConfig
    from chainfree.models.hf import HFConfig, load_hf_model, token_data

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))  # fmt: skip
    model = load_hf_model(HFConfig(pretrained, seq_len=plan.max_n)).to(dev)
    hf_cfg = model.hf.config
    data = token_data(DataConfig(corpus="shakespeare"), model.tokenizer)
    mode = BackwardMode(generator=torch.Generator().manual_seed(0))
    model.set_attention(SwitchableAttentionFn(mode, hf_cfg.num_hidden_layers))
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if plan.autocast else contextlib.nullcontext

    class Amp(nn.Module):  # the forward under autocast; autograd.grad runs outside it, with explicit dtypes
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            with amp():
                return self.inner(x, y)

    timed = Amp(model)
    meta: dict[str, Any] = {
        "model": f"{pretrained} ({type(model.hf).__name__}, {hf_cfg.num_hidden_layers} layers, "
                 f"d={hf_cfg.hidden_size}, {hf_cfg.num_attention_heads}/{hf_cfg.num_key_value_heads} heads, "
                 f"{model.num_params() / 1e6:.1f}M params)",
        "text": f"Shakespeare (train split, {len(data.train):,} tokens of the model's tokenizer)",
        "draws": plan.draws,
        "precision": "bf16 autocast matmuls, fp32 weights, softmax and gradients" if plan.autocast else "fp32",
        "command": command, "device": str(dev), "plan": dataclasses.asdict(plan),
    }  # fmt: skip
    rows: list[dict[str, Any]] = []
    sparsity: dict[int, dict[int, dict[str, float]]] = {}
    for stage, (n, cs, count) in enumerate(plan.stages):
        log(f"[sus/{pretrained}] n={n}: {count} sequences x (1 exact + {len(cs)}x{plan.draws} SUS), c in {cs}")
        mode.counts = sparsity.setdefault(n, {})
        mode.sparsity_cs = plan.cs
        seqs = [s.to(dev) for s in sequences(data.train, n, count, seed=1000 * stage + n)]
        mode.kept = {}
        raw = measure(timed, seqs, cs, plan.draws, mode, out / f".grads_n{n}.npy", log=log)
        new_rows = summarize(raw, n, cs, mode.kept)
        rows += new_rows
        meta["seconds"] = time.perf_counter() - t_start
        meta.setdefault("seconds_per_sequence", {})[f"{n}:{','.join(rule_label(c) for c in cs)}"] = float(
            np.median(raw["seconds"]))
        for r in new_rows:
            log(f"  n={n} {r['rule']}: +{100 * r['variance_increase']:.3f}% ± {100 * r['variance_increase_se']:.3f}%"
                + (f", kept share {100 * r['kept_share']:.2f}%" if "kept_share" in r else ""))
        table = [r for m, counts in sparsity.items() for r in sparsity_rows(counts, m, plan.cs)]
        payload = {"meta": meta, "environment": environment(), "rows": rows, "sparsity": table}
        dump(out / "sus_pretrained.json", payload)
        (out / "sus_pretrained.md").write_text(_markdown(rows, table, meta))
        _plot(rows, table, out / "sus_pretrained.png", f"SUS on {pretrained}: variance increase vs c")
    log((out / "sus_pretrained.md").read_text())


__all__ = ["PLANS", "BackwardMode", "Plan", "SwitchableAttention", "SwitchableAttentionFn", "TileRule",
           "jackknife_ratio", "measure", "merge", "param_group", "render", "rule_label", "run", "sequences",
           "sparsity_rows", "summarize", "tile_sampled_weights"]
