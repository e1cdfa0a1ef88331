"""Gradient fidelity: how far a method's gradient is from exact backprop on the same model and batch.

For every minibatch b of M we compute the exact gradient g_b and K estimates ĝ_b1..ĝ_bK, each with fresh
randomness (a deterministic method gives K identical ones), and report per parameter group and overall:

  cosine       mean over (b, k) of cos(ĝ_bk, g_b)
  norm_ratio   mean over (b, k) of ‖ĝ_bk‖ / ‖g_b‖            (BASIS's invariant scalars inflate it)
  bias         sqrt(Σ_b ‖ḡ_b − g_b‖² / Σ_b ‖g_b‖²),  ḡ_b = mean_k ĝ_bk
  bias_se      sqrt(Σ_b tr Σ̂_b / K / Σ_b ‖g_b‖²): the RMS length of the sampling error of ḡ_b relative to ‖g‖,
               i.e. what `bias` reads for an unbiased method (E bias² = bias_se² then). A bias well above it
               is real; `bias_corrected` = sqrt(max(0, bias² − bias_se²)) removes the noise floor.
  variance     Σ_b tr Σ̂_b / Σ_b ‖g_b‖²  (tr Σ̂_b = Σ_k ‖ĝ_bk − ḡ_b‖² / (K−1)): E‖ĝ − Eĝ‖² / ‖g‖²; `variance_se`
               is a jackknife over the K estimates of each batch.
  variance_increase  the SUS paper's headline quantity:
               (Var_total(method) − Var_total(exact)) / Var_total(exact), variances over minibatch sampling
               (and the method's own randomness, fresh for every estimate). With
               S_g = between-batch variance of g_b, S_m = that of ḡ_b, W = mean_b tr Σ̂_b (law of total
               variance, Var(ḡ_b) = Var_b(E[ĝ|b]) + W/K):
                 Var_total(exact) = S_g,   Var_total(method) = S_m − W/K + W,
               split into `variance_increase_noise` = W / S_g (the method's own sampling noise) and
               `variance_increase_bias` = (S_m − W/K − S_g) / S_g (the change of the between-batch variance of
               the mean gradient; zero in expectation for an unbiased method, so for SUS the noise term is the
               precise estimate of that quantity and the bias term only adds estimation noise).
               Standard errors: jackknife over the M batches.

What "exact" means depends on what the method does to the model (`reference=`):
  'copy' (default for methods whose step is plain autograd: BASIS, SUS, any layer/attention swap): plain
         autograd through an unprepared copy of the model with the same weights, so the reference is the
         dense model the method approximates.
  'self' (default for methods that own their step: LBI, HBLL): plain autograd `model(x, y).backward()`
         through the prepared model itself -- for LBI this is the exact gradient of the LBI model, so the
         report measures the scan backward's numerical error, not the bottleneck's modelling gap.
All statistics are sums over coordinates of squares and inner products, so a group's sufficient statistics
add up to the overall ones; nothing is averaged over groups.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from chainfree.errors import ConfigError
from chainfree.methods.base import Method

Batch = tuple[torch.Tensor, torch.Tensor]
WRAPPERS = ("lm", "model", "module", "_orig_mod")

METRICS: tuple[str, ...] = (
    "cosine", "cosine_min", "norm_ratio", "bias", "bias_se", "bias_corrected", "variance", "variance_se",
    "minibatch_variance", "variance_increase", "variance_increase_se", "variance_increase_noise",
    "variance_increase_noise_se", "variance_increase_bias", "variance_increase_bias_se",
)

FIDELITY_COLUMNS = [
    ("group", "group"), ("numel", "params"), ("cosine", "cosine"), ("norm_ratio", "‖ĝ‖/‖g‖"), ("bias", "bias"),
    ("bias_se", "bias noise floor"), ("variance", "rel. variance"), ("variance_se", "± se"),
    ("minibatch_variance", "minibatch var (exact)"), ("variance_increase", "var. increase"),
    ("variance_increase_se", "± se"), ("variance_increase_noise", "noise part"),
    ("variance_increase_noise_se", "± se"),
]


def param_group(name: str) -> str:
    """Group of a parameter by module path: 'blocks.3.attn.qkv_proj.weight' -> 'blocks.3.attn',
    'embed.weight' -> 'embed', 'lm.blocks.0.mlp.up.bias' -> 'lm.blocks.0.mlp', 'enc.2.net.0.weight' -> 'enc.2'."""
    parts = name.split(".")[:-1] or name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "blocks" and parts[i + 1].isdigit():
            return ".".join(parts[: i + 3])
    start = 0
    while start < len(parts) - 1 and parts[start] in WRAPPERS:
        start += 1
    end = start + 1
    if end < len(parts) and parts[end].isdigit():
        end += 1
    return ".".join(parts[:end])


def group_kind(group: str) -> str:
    """Layer-independent kind of a group: 'blocks.3.attn' -> 'blocks.*.attn' (for per-kind totals)."""
    return re.sub(r"blocks\.\d+", "blocks.*", group)


@dataclass
class _Stats:
    """Sufficient statistics of one group (or of the whole model): all additive over coordinates."""

    numel: int
    gg: torch.Tensor  # [M]        ‖g_b‖²
    ee: torch.Tensor  # [M, K]     ‖ĝ_bk‖²
    eg: torch.Tensor  # [M, K]     <ĝ_bk, g_b>
    bias_sq: torch.Tensor  # [M]   ‖ḡ_b − g_b‖²
    within: torch.Tensor  # [M, K, K]  Gram of ĝ_bk − ḡ_b
    gram_g: torch.Tensor  # [M, M]  Gram of g_b − mean_b g_b
    gram_m: torch.Tensor  # [M, M]  Gram of ḡ_b − mean_b ḡ_b

    def __add__(self, other: _Stats) -> _Stats:
        return _Stats(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


def _sum_sq_dev(gram: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Σ_{i∈S} ‖x_i − mean_S x‖² from any Gram matrix of the x_i (translation invariant), S = keep mask."""
    g = gram[keep][:, keep]
    return g.diagonal().sum() - g.sum() / keep.sum()


def _jackknife(values: torch.Tensor, full: float) -> float:
    """Jackknife standard error from the leave-one-out values of a statistic."""
    n = values.numel()
    if n < 2 or not math.isfinite(full):
        return float("nan")
    return math.sqrt(float((n - 1) / n * ((values - values.mean()) ** 2).sum()))


def _variance_terms(s: _Stats, drop: int | None = None) -> tuple[float, float, float, float]:
    """(S_g, S_m, W, M') on the batches without `drop`: the between-batch variances and mean within-variance."""
    m, k = s.ee.shape
    keep = torch.ones(m, dtype=torch.bool)
    if drop is not None:
        keep[drop] = False
    n = int(keep.sum())
    s_g = float(_sum_sq_dev(s.gram_g, keep)) / (n - 1) if n > 1 else float("nan")
    s_m = float(_sum_sq_dev(s.gram_m, keep)) / (n - 1) if n > 1 else float("nan")
    w = float(s.within[keep].diagonal(dim1=1, dim2=2).sum()) / n / (k - 1) if k > 1 else float("nan")
    return s_g, s_m, w, n


def _increase(s: _Stats, drop: int | None = None) -> tuple[float, float, float]:
    """(total, noise, bias) parts of the relative variance increase."""
    s_g, s_m, w, _ = _variance_terms(s, drop)
    k = s.ee.shape[1]
    if not s_g > 0:
        return float("nan"), float("nan"), float("nan")
    if k == 1:  # one estimate per batch: only the total is identifiable
        return (s_m - s_g) / s_g, float("nan"), float("nan")
    noise = w / s_g
    bias = (s_m - w / k - s_g) / s_g
    return noise + bias, noise, bias


def summarize(s: _Stats) -> dict[str, float]:
    """Turn sufficient statistics into the reported metrics (see the module docstring)."""
    m, k = s.ee.shape
    gg_total = float(s.gg.sum())
    out: dict[str, float] = {"numel": s.numel, "grad_norm": math.sqrt(gg_total / m)}
    nan = float("nan")
    if gg_total == 0.0:
        out.update({key: nan for key in METRICS})
        return out
    norms = (s.ee * s.gg[:, None]).sqrt()
    cos = torch.where(norms > 0, s.eg / norms.clamp_min(1e-300), torch.zeros_like(s.eg))
    ratio = (s.ee / s.gg[:, None].clamp_min(1e-300)).sqrt()
    valid = s.gg > 0
    out["cosine"] = float(cos[valid].mean())
    out["cosine_min"] = float(cos[valid].min())
    out["norm_ratio"] = float(ratio[valid].mean())
    bias_sq = float(s.bias_sq.sum()) / gg_total
    out["bias"] = math.sqrt(bias_sq)
    if k > 1:
        traces = s.within.diagonal(dim1=1, dim2=2).sum(-1) / (k - 1)  # tr Σ̂_b, [M]
        out["variance"] = float(traces.sum()) / gg_total
        out["bias_se"] = math.sqrt(float(traces.sum()) / k / gg_total)
        out["bias_corrected"] = math.sqrt(max(0.0, bias_sq - out["bias_se"] ** 2))
        if k > 2:  # jackknife over the K estimates of each batch; batches are independent
            var = 0.0
            for b in range(m):
                loo = torch.stack([
                    _sum_sq_dev(s.within[b], torch.arange(k) != i) / (k - 2) for i in range(k)
                ])
                var += _jackknife(loo, float(traces[b])) ** 2
            out["variance_se"] = math.sqrt(var) / gg_total
        else:
            out["variance_se"] = nan
    else:
        for key in ("variance", "variance_se", "bias_se", "bias_corrected"):
            out[key] = nan
    s_g, _, _, _ = _variance_terms(s)
    out["minibatch_variance"] = s_g / (gg_total / m) if m > 1 else nan
    total, noise, bias = _increase(s) if m > 1 else (nan, nan, nan)
    out["variance_increase"], out["variance_increase_noise"], out["variance_increase_bias"] = total, noise, bias
    for key, idx, full in (("variance_increase_se", 0, total), ("variance_increase_noise_se", 1, noise),
                           ("variance_increase_bias_se", 2, bias)):
        if m > 2 and math.isfinite(full):
            loo = torch.tensor([_increase(s, drop=b)[idx] for b in range(m)], dtype=torch.float64)
            out[key] = _jackknife(loo, full)
        else:
            out[key] = nan
    return out


@dataclass
class FidelityReport:
    """Metrics per parameter group, per group kind (layers pooled) and 'overall'; see the module docstring."""

    method: dict[str, Any]
    reference: str
    k: int
    n_batches: int
    batch_shape: list[int]
    groups: dict[str, dict[str, float]]
    kinds: dict[str, dict[str, float]]
    overall: dict[str, float]
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "reference": self.reference, "k": self.k, "n_batches": self.n_batches,
                "batch_shape": self.batch_shape, "overall": self.overall, "kinds": self.kinds,
                "groups": self.groups, "seconds": self.seconds, **self.meta}

    def rows(self, which: str = "groups") -> list[dict[str, Any]]:
        """Table rows: 'overall' first, then the groups (or kinds)."""
        table = self.groups if which == "groups" else self.kinds
        return [{"group": "overall", **self.overall}, *({"group": g, **v} for g, v in table.items())]


def _flat_grads(params: dict[str, nn.Parameter], groups: dict[str, list[str]],
                store: torch.device | None) -> dict[str, torch.Tensor]:
    """Current .grad per group as one flat vector (zeros for unused parameters)."""
    out = {}
    for g, names in groups.items():
        parts = []
        for n in names:
            p = params[n]
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            parts.append(grad.detach().reshape(-1))
        flat = torch.cat(parts)
        out[g] = flat.to(store) if store is not None else flat.clone()
    return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.double(), b.double()).cpu()


def _centered_gram(vs: list[torch.Tensor], mean: torch.Tensor | None = None) -> torch.Tensor:
    """Gram matrix of v_i − mean (default: their float64 mean), one centred vector at a time."""
    mean = _mean64(vs) if mean is None else mean
    n = len(vs)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        di = vs[i].double() - mean
        for j in range(i, n):
            gram[i, j] = gram[j, i] = _dot(di, vs[j].double() - mean)
    return gram


def _mean64(vs: list[torch.Tensor]) -> torch.Tensor:
    """Mean in float64 as v_0 + mean(v_k − v_0): exactly v_0 when all vectors are equal (deterministic methods)."""
    first = vs[0].double()
    total = torch.zeros_like(first)
    for v in vs[1:]:
        total += v.double() - first
    return first + total / len(vs)


def exact_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Plain autograd: the reference gradient (`reference='self'` or on the unprepared copy)."""
    loss = model(inputs, targets)
    loss.backward()
    return float(loss.detach())


def measure_fidelity(
    model: nn.Module | Callable[[], nn.Module],
    method: Method,
    batches: Iterable[Batch],
    k: int = 8,
    *,
    reference: str = "auto",
    seed: int = 0,
    group_fn: Callable[[str], str] = param_group,
    autocast: Callable[[], AbstractContextManager] | None = None,
    store_device: torch.device | str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> FidelityReport:
    """Compare `method`'s gradients with exact backprop on the same weights and batches.

    model: an *unprepared* model (deep-copied; the caller's object is not modified) or a factory returning
      one, with the same weights on every call; `method.prepare` is applied here. A model that a method
      already wrapped (e.g. an LBIModel loaded from an LBI checkpoint) works with reference='self'.
    batches: M (inputs, targets) pairs on the model's device; M >= 2 for the variance increase, M >= 3 for
      its standard error. k: estimates per batch (>= 2 for variance, >= 3 for its standard error).
    reference: 'auto' | 'copy' | 'self' (see the module docstring).
    seed: seeds torch's RNG once, so the whole measurement is reproducible; the K estimates still get
      fresh randomness each, because the method draws from the advancing RNG.
    store_device: where the K + 2M flat gradient copies live (default: the gradients' device).
    """
    import time

    if k < 1:
        raise ConfigError(f"k (estimates per batch) must be >= 1, got {k}")
    if reference not in ("auto", "copy", "self"):
        raise ConfigError(f"reference must be 'auto', 'copy' or 'self', got {reference!r}")
    batches = list(batches)
    if not batches:
        raise ConfigError("measure_fidelity needs at least one batch")
    if reference == "auto":
        reference = "copy" if method.uses_autograd_step else "self"
    factory = model if not isinstance(model, nn.Module) else (lambda: copy.deepcopy(model))
    measured = method.prepare(factory())
    ref_model = factory() if reference == "copy" else measured
    measured.train()
    ref_model.train()
    params = {n: p for n, p in measured.named_parameters() if p.requires_grad}
    ref_params = {n: p for n, p in ref_model.named_parameters() if p.requires_grad}
    if set(params) != set(ref_params):
        only = sorted(set(params) ^ set(ref_params))[:4]
        raise ConfigError(
            f"method {method.name!r} changes the model's parameters ({', '.join(only)} ...), so an unprepared "
            "copy is no exact reference; use reference='self' (plain autograd through the prepared model)"
        )
    if reference == "copy":
        for n, p in params.items():
            if not torch.equal(p.detach(), ref_params[n].detach()):
                raise ConfigError(f"{n} differs between the measured model and the exact reference: prepare() "
                                  "changed it (use reference='self') or the model factory is not deterministic")
    groups: dict[str, list[str]] = {}
    for n in params:
        groups.setdefault(group_fn(n), []).append(n)
    store = torch.device(store_device) if store_device is not None else None
    ctx = autocast or nullcontext
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    per_batch: dict[str, dict[str, list]] = {g: {"gg": [], "ee": [], "eg": [], "bias_sq": [], "within": [],
                                                 "g": [], "m": []} for g in groups}
    for b, (x, y) in enumerate(batches):
        ref_model.zero_grad(set_to_none=True)
        with ctx():
            exact_step(ref_model, x, y)
        g_flat = _flat_grads(ref_params, groups, store)
        ref_model.zero_grad(set_to_none=True)
        estimates: list[dict[str, torch.Tensor]] = []
        for _ in range(k):
            measured.zero_grad(set_to_none=True)
            with ctx():
                method.step(measured, x, y)
            estimates.append(_flat_grads(params, groups, store))
        measured.zero_grad(set_to_none=True)
        for gname in groups:
            g = g_flat[gname]
            ests = [e[gname] for e in estimates]
            mean = _mean64(ests)
            rec = per_batch[gname]
            rec["gg"].append(_dot(g, g))
            rec["ee"].append(torch.stack([_dot(e, e) for e in ests]))
            rec["eg"].append(torch.stack([_dot(e, g) for e in ests]))
            diff = mean - g.double()
            rec["bias_sq"].append(_dot(diff, diff))
            rec["within"].append(_centered_gram(ests, mean))
            rec["g"].append(g)
            rec["m"].append(mean.to(g.dtype))
        del estimates
        if on_batch is not None:
            on_batch(b)
    stats: dict[str, _Stats] = {}
    for gname, rec in per_batch.items():
        stats[gname] = _Stats(
            numel=sum(params[n].numel() for n in groups[gname]),
            gg=torch.stack(rec["gg"]), ee=torch.stack(rec["ee"]), eg=torch.stack(rec["eg"]),
            bias_sq=torch.stack(rec["bias_sq"]), within=torch.stack(rec["within"]),
            gram_g=_centered_gram(rec["g"]), gram_m=_centered_gram(rec["m"]),
        )
        rec.clear()
    kinds: dict[str, _Stats] = {}
    for gname, st in stats.items():
        kind = group_kind(gname)
        kinds[kind] = kinds[kind] + st if kind in kinds else st
    overall = None
    for st in stats.values():
        overall = st if overall is None else overall + st
    assert overall is not None
    x0 = batches[0][0]
    return FidelityReport(
        method=method.describe(), reference=reference, k=k, n_batches=len(batches), batch_shape=list(x0.shape),
        groups={g: summarize(st) for g, st in stats.items()},
        kinds={g: summarize(st) for g, st in kinds.items()} if len(kinds) < len(stats) else {},
        overall=summarize(overall), seconds=time.perf_counter() - t0,
    )


def sample_batches(sampler: Any, n: int, device: torch.device | str, split: str = "train",
                   offset: int = 0) -> Sequence[Batch]:
    """M deterministic minibatches from a chainfree BatchSampler, moved to `device`."""
    return [tuple(t.to(device) for t in sampler.batch(split, offset + i)) for i in range(n)]  # type: ignore[misc]
