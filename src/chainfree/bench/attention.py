"""Attention speed benchmark: SUS attention vs the exact attention a user gets from torch SDPA, one process.

The exact baseline is `F.scaled_dot_product_attention` with PyTorch's default backend dispatch (no
`sdpa_kernel` context), which is what a user calls; the backend that dispatch actually ran is read off the
CUDA kernel names of one profiled forward+backward and recorded beside the numbers. Two further exact rows
force the FLASH_ATTENTION and CUDNN_ATTENTION backends so a reader sees both (a backend that refuses the
case is recorded as unavailable). For every (causal, head dim D, sequence length n) all methods run on the
same tensors, and their timings are interleaved: each round times every method's forward, backward and
forward+backward once (CUDA events), so clock and thermal drift hit all methods alike; the table reports the
median over rounds and the spread (min and max). Exact rows carry their achieved TFLOP/s (4·n²·D·H flops per
forward, half of it causal; backward 2.5× the forward). Writes NAME.json / NAME.md and a speedup-vs-n PNG.

    python -m chainfree.bench.attention --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chainfree.bench.report import markdown_table, write_result
from chainfree.logging import pyplot, save_figure

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PHASES = ("fwd", "bwd", "fwd_bwd")
EXACT = ("sdpa", "sdpa_flash", "sdpa_cudnn")  # default dispatch first: every ratio is against it


def _backend_context(name: str):
    """The SDPA backend context of an exact row: none for the default dispatch."""
    if name == "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION if name == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION)


def classify_kernels(names: list[str]) -> str:
    """Which SDPA backend a list of CUDA kernel names belongs to: cudnn, flash, efficient or math."""
    low = " ".join(names).lower()
    if "cudnn" in low:
        return "cudnn"
    if "flash" in low:
        return "flash"
    if "fmha" in low or "efficient" in low or "cutlass" in low:
        return "efficient"
    return "math"


def default_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, causal: bool) -> dict:
    """Backend SDPA's default dispatch runs for these tensors, from the kernels of one profiled fwd+bwd."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.autograd.grad(out, (q, k, v), do)
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")})
    attn = [n for n in names if any(s in n.lower() for s in ("cudnn", "flash", "fmha", "attention", "sdpa"))]
    info = {"backend": classify_kernels(attn), "kernels": attn[:6]}
    with contextlib.suppress(AttributeError, RuntimeError):  # dispatch's own choice, where torch exposes it
        from torch.nn.attention import SDPBackend

        info["fused_sdp_choice"] = SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, causal)).name
    return info


def attention_flops(n_q: int, n_k: int, d: int, heads: int, causal: bool) -> float:
    """Matmul flops of one exact attention forward (QK^T and PV), halved for a causal mask."""
    f = 4.0 * n_q * n_k * d * heads
    return f / 2 if causal else f


def _phase_fns(attn: Callable, q, k, v, do) -> dict[str, Callable[[], Any]]:
    """Closures of the three timed phases. fwd runs with gradients enabled (a training forward: a SUS
    forward samples there); bwd replays the backward of a retained graph; fwd_bwd does both."""
    out = attn(q, k, v)

    def fwd():
        attn(q, k, v)

    def bwd():
        torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

    def fwd_bwd():
        torch.autograd.grad(attn(q, k, v), (q, k, v), do)

    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd_bwd}


def _event_ms(fn: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _time_ms(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Median time of fn on the GPU in ms (CUDA events around each call, after warm-up)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(_event_ms(fn) for _ in range(reps))


def time_interleaved(fns: dict[str, dict[str, Callable]], warmup: int, rounds: int) -> dict[str, dict[str, list]]:
    """{method: {phase: [ms per round]}}: each round times every method's every phase once, in turn."""
    for phases in fns.values():
        for fn in phases.values():
            for _ in range(warmup):
                fn()
    torch.cuda.synchronize()
    times: dict[str, dict[str, list]] = {m: {p: [] for p in phases} for m, phases in fns.items()}
    for _ in range(rounds):
        for m, phases in fns.items():
            for p, fn in phases.items():
                times[m][p].append(_event_ms(fn))
    return times


def _sus_fn(c: float, causal: bool) -> Callable:
    """chainfree.sus_attention(variant='bernoulli') on the per-pair Triton kernel v1 (one seed drawn per call,
    as in training)."""
    from chainfree.ops.sus import sus_attention

    def attn(q, k, v):
        return sus_attention(q, k, v, is_causal=causal, c=c, backend="triton", variant="bernoulli")

    return attn


def _tile_fn(c: float, causal: bool, tile: int = 128, proposal: str | None = None) -> Callable:
    """Tile-sampled SUS (`chainfree.ops.sus_tile`): exact cuDNN-class forward, block-sparse backward."""
    from chainfree.ops.sus_tile import DEFAULT_PROPOSAL, sus_tile_attention

    def attn(q, k, v):
        return sus_tile_attention(q, k, v, c=c, is_causal=causal, tile=tile, proposal=proposal or DEFAULT_PROPOSAL)

    return attn


def _sdpa_fn(name: str, causal: bool) -> Callable:
    def attn(q, k, v):
        with _backend_context(name):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attn


def _bench_shape(
    d: int,
    H: int,
    n: int,
    cs: list[float],
    causal: bool,
    tdtype: torch.dtype,
    warmup: int,
    rounds: int,
    v1_cs: tuple[float, ...] = (),
    tile_cs: tuple[float, ...] = (),
) -> list[dict[str, Any]]:
    """All rows of one (causal, D, n): the three exact rows, then SUS for every c, interleaved."""
    g = torch.Generator(device="cuda").manual_seed(n + d)
    q, k, v, do = (torch.randn(1, H, n, d, generator=g, device="cuda", dtype=tdtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    info = default_backend(q, k, v, do, causal)
    fns: dict[str, dict[str, Callable]] = {}
    unavailable: dict[str, str] = {}
    for name in EXACT:
        try:
            fns[name] = _phase_fns(_sdpa_fn(name, causal), q, k, v, do)
        except RuntimeError as e:  # a forced backend that does not take this case
            unavailable[name] = str(e).splitlines()[0][:200]
    for c in dict.fromkeys([*cs, *v1_cs]):  # both name per-pair v1 rows (the v2 kernel is gone)
        fns[f"sus_v1_c{c:g}"] = _phase_fns(_sus_fn(c, causal), q, k, v, do)
    kept: dict[str, float] = {}
    for c in tile_cs:
        fn = _tile_fn(c, causal)
        fns[f"sus_tile_c{c:g}"] = _phase_fns(fn, q, k, v, do)
        with _tile_density_probe() as rec:
            fn(q, k, v).backward(do)
        kept[f"sus_tile_c{c:g}"] = sum(a for a, _ in rec) / max(1, sum(b for _, b in rec))
    times = time_interleaved(fns, warmup, rounds)
    flops = attention_flops(n, n, d, H, causal)
    base = {p: statistics.median(times["sdpa"][p]) for p in PHASES}
    rows = []
    for name in [*unavailable, *fns]:
        row: dict[str, Any] = {"causal": causal, "D": d, "H": H, "n": n, "method": name}
        if name in unavailable:
            row["note"] = f"unavailable: {unavailable[name]}"
            rows.append(row)
            continue
        for p in PHASES:
            ts = times[name][p]
            row[f"{p}_ms"] = statistics.median(ts)
            row[f"{p}_min_ms"], row[f"{p}_max_ms"] = min(ts), max(ts)
            row[f"{p}_speedup"] = base[p] / row[f"{p}_ms"]
        if name in EXACT:
            mult = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
            for p in PHASES:
                row[f"{p}_tflops"] = flops * mult[p] / (row[f"{p}_ms"] * 1e-3) / 1e12
        if name in kept:
            row["note"] = f"kept tiles {100 * kept[name]:.1f}% (Gaussian q, k: near-uniform attention)"
        if name == "sdpa":
            row["backend"] = info["backend"]
            row["note"] = "default dispatch ran: " + info["backend"]
        rows.append(row)
        print(_line(row), flush=True)
    del fns
    return rows


def _line(row: dict[str, Any]) -> str:
    parts = [f"{'causal' if row['causal'] else 'full'} D={row['D']} n={row['n']} {row['method']}:"]
    for p in PHASES:
        parts.append(f"{p} {row[f'{p}_ms']:.3f} ms (x{row[f'{p}_speedup']:.2f})")
    if "fwd_bwd_tflops" in row:
        parts.append(f"{row['fwd_tflops']:.0f}/{row['bwd_tflops']:.0f} TFLOP/s")
    if "backend" in row:
        parts.append(f"[default = {row['backend']}]")
    return " ".join(parts)


def run_attention_bench(
    ns: list[int],
    head_dims: list[int],
    cs: list[float],
    causal: bool | None = None,
    model_dim: int = 2048,
    dtype: str = "bf16",
    out_dir: Path | str = "benchmarks/results",
    name: str = "attention_sus",
    plot: bool = True,
    warmup: int = 3,
    rounds: int = 0,
    v1_cs: tuple[float, ...] = (),
    tile_cs: tuple[float, ...] = (4.0,),
) -> dict[str, Any]:
    """Time SUS vs SDPA's default dispatch (+ forced FLASH and CUDNN rows) for every (causal, D, n, c); write
    JSON + markdown (+ PNG) to out_dir. `causal=None` runs both masks. `rounds=0` picks 15 rounds for
    n <= 8192, 8 up to 32k and 5 beyond. Returns {"config": ..., "rows": [one dict per (mask, D, n, method)]}.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the attention speed benchmark needs a CUDA GPU (SDPA vs the SUS Triton kernel)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tdtype = DTYPES[dtype]
    masks = [True, False] if causal is None else [causal]
    rows: list[dict[str, Any]] = []
    for d in head_dims:
        if model_dim % d:
            raise ValueError(f"model_dim {model_dim} is not a multiple of head dim {d}")
    for mask in masks:
        for d in head_dims:
            for n in ns:
                r = rounds or (15 if n <= 8192 else 8 if n <= 32768 else 5)
                rows += _bench_shape(d, model_dim // d, n, cs, mask, tdtype, warmup, r, tuple(v1_cs), tuple(tile_cs))
                torch.cuda.empty_cache()
    from chainfree.ops import sus_triton

    config = {
        "ns": ns, "head_dims": head_dims, "cs": cs, "masks": ["causal" if m else "non-causal" for m in masks],
        "model_dim": model_dim, "batch": 1, "dtype": dtype,
        "sus_rows": "sus_v1_c* (c from cs and v1_cs) = sus_attention(variant='bernoulli'): per-pair "
        f"{sus_triton.KERNEL} kernel; sus_tile_c* = chainfree.ops.sus_tile.sus_tile_attention (tile 128, default "
        "proposal)",
        "baseline": "torch F.scaled_dot_product_attention, default backend dispatch (no sdpa_kernel context); "
                    "rows sdpa_flash / sdpa_cudnn force SDPBackend.FLASH_ATTENTION / CUDNN_ATTENTION",
        "timing": "CUDA events per call; methods and phases interleaved round by round after warm-up; "
                  "median over rounds, min and max reported",
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "source_commit": os.environ.get("CHAINFREE_GIT_COMMIT"),  # set where the checkout has no .git
    }  # fmt: skip
    payload = {"config": config, "rows": rows}
    columns = [
        ("causal", "causal"), ("D", "D"), ("n", "n"), ("method", "method"),
        ("fwd_ms", "fwd ms"), ("fwd_speedup", "fwd speedup"), ("bwd_ms", "bwd ms"), ("bwd_min_ms", "bwd min"),
        ("bwd_max_ms", "bwd max"), ("bwd_speedup", "bwd speedup"), ("fwd_bwd_ms", "fwd+bwd ms"),
        ("fwd_bwd_speedup", "fwd+bwd speedup"), ("fwd_tflops", "fwd TFLOP/s"), ("bwd_tflops", "bwd TFLOP/s"),
        ("note", "note"),
    ]  # fmt: skip
    device = torch.cuda.get_device_name(0)
    title = (
        f"# SUS attention vs exact SDPA ({device}, {dtype}, model dim {model_dim}, batch 1)\n\n"
        "Speedups are against `sdpa` = SDPA's default dispatch (the backend it ran is in the note); "
        "`sdpa_flash` / `sdpa_cudnn` force a backend. fwd = training forward (grad enabled), bwd = backward "
        "of a retained graph, fwd+bwd = both. Median over interleaved rounds; bwd min/max = spread.\n\n"
    )
    out_dir = Path(out_dir)
    write_result(out_dir, name, payload, title + markdown_table(rows, columns))
    if plot:
        _plot(rows, out_dir / f"{name}.png", dtype, device)
    return payload


def _plot(rows: list[dict[str, Any]], path: Path, dtype: str, device: str) -> None:
    plt = pyplot()
    masks = sorted({r["causal"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(len(masks), 3, figsize=(15, 4.2 * len(masks)), squeeze=False)
    for mi, mask in enumerate(masks):
        for ax, p in zip(axes[mi], PHASES, strict=True):
            for d in sorted({r["D"] for r in rows}):
                for method in sorted({r["method"] for r in rows if r["method"] != "sdpa"}):
                    sel = sorted(
                        (
                            r
                            for r in rows
                            if r["D"] == d and r["method"] == method and r["causal"] == mask and f"{p}_speedup" in r
                        ),
                        key=lambda r: r["n"],
                    )
                    if sel:
                        style = "--" if method.startswith("sdpa") else "-"
                        ax.plot(
                            [r["n"] for r in sel],
                            [r[f"{p}_speedup"] for r in sel],
                            style,
                            marker="o",
                            label=f"D={d} {method}",
                        )
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length n")
            ax.set_title(f"{'causal' if mask else 'non-causal'} {p}: speedup vs default SDPA")
            ax.grid(alpha=0.3)
        axes[mi][0].legend(fontsize=7)
    fig.suptitle(f"SUS attention vs SDPA default dispatch ({dtype}, {device})")
    save_figure(fig, path)


class _ZeroBackwardAttention(torch.autograd.Function):
    """Exact SDPA forward whose backward returns zeros: the 'limit' row (attention backward for free)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    @staticmethod
    def backward(ctx, do):
        return torch.zeros_like(do), torch.zeros_like(do), torch.zeros_like(do), None


def zero_backward_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA calling convention; forward = default SDPA, backward = zeros (no compute at all)."""
    if attn_mask is not None or dropout_p or scale is not None or enable_gqa:
        raise ValueError("zero_backward_attention takes only q, k, v and is_causal (the GPT step bench's call)")
    return _ZeroBackwardAttention.apply(q, k, v, is_causal)


def _tile_density_probe():
    """Context manager recording, per tile-SUS backward, (kept tiles, tiles with an allowed pair): wraps
    `chainfree.ops.sus_tile.tile_backward` (looked up at call time by the backward op) for untimed steps."""
    from chainfree.ops import sus_tile

    record: list[tuple[int, int]] = []
    inner = sus_tile.tile_backward

    def probe(q, k, v, o, lse, do, pi, keep, **kw):
        record.append((int(keep.sum()), int((pi > 0).sum())))
        return inner(q, k, v, o, lse, do, pi, keep, **kw)

    @contextlib.contextmanager
    def ctx():
        sus_tile.tile_backward = probe
        try:
            yield record
        finally:
            sus_tile.tile_backward = inner

    return ctx()


def _allow_recompiles(n: int = 64) -> None:
    """Every (attention function, T) pair compiles its block once: raise dynamo's per-frame cache limit so
    none of them silently falls back to eager."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(n, getattr(torch._dynamo.config, name)))


def run_step_bench(
    seq_lens: list[int],
    head_dims: list[int],
    c: float = 32.0,
    d_model: int = 768,
    n_layers: int = 12,
    vocab: int = 8192,
    out_dir: Path | str = "benchmarks/results",
    name: str = "step_sus",
    warmup: int = 2,
    rounds: int = 6,
    tile_cs: tuple[float, ...] = (4.0,),
    tile: int = 128,
    proposal: str | None = None,
    modes: tuple[str, ...] = ("eager", "compile"),
    per_pair: bool = True,
) -> dict[str, Any]:
    """GPT training step (batch 1, bf16 autocast, fused AdamW, grad clip, chunked CE) with exact attention
    (SDPA default dispatch), tile-sampled SUS (`chainfree.ops.sus_tile`), the per-pair v1 kernel (eager only:
    it runs outside compiled graphs) and the limit (exact forward, zero attention backward), at every
    (head dim, T) and compile mode: 'eager', or 'compile' = every block compiled on its own (identical blocks
    share one graph; one compile per attention function and T). One model per (D, T), attention swapped
    between steps, methods interleaved round by round. prize_share = (exact - sus) / (exact - limit) within
    a mode; the tile rows record the kept share of tiles with an allowed pair (untimed probe steps)."""
    from functools import partial

    from chainfree.config import ModelConfig
    from chainfree.models.lm import LanguageModel
    from chainfree.ops import sus_tile
    from chainfree.ops.sus import sus_attention

    if not torch.cuda.is_available():
        raise RuntimeError("the SUS step benchmark needs a CUDA GPU")
    proposal = proposal or sus_tile.DEFAULT_PROPOSAL
    _allow_recompiles()
    rows: list[dict[str, Any]] = []
    def tile_attention(c_tile: float):
        fn = partial(sus_tile.sus_tile_attention, c=c_tile, tile=tile, proposal=proposal)

        def attn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            return fn(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

        return attn

    base_fns = {"exact": F.scaled_dot_product_attention,
                **{f"sus_tile_c{tc:g}": tile_attention(tc) for tc in tile_cs}, "limit": zero_backward_attention}
    for d in head_dims:
        for T in seq_lens:
            torch.manual_seed(0)
            cfg = ModelConfig(kind="gpt", vocab_size=vocab, seq_len=T, d_model=d_model, n_layers=n_layers,
                              n_heads=d_model // d)  # fmt: skip
            model = LanguageModel(cfg).cuda()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            ids = torch.randint(0, vocab, (1, T + 1), device="cuda")
            x, y = ids[:, :-1], ids[:, 1:]
            blocks = list(model.blocks)
            eager_fwd = [b.forward for b in blocks]
            compiled_fwd = [torch.compile(f) for f in eager_fwd] if "compile" in modes else eager_fwd

            def step(model=model, opt=opt, x=x, y=y):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(x, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            entries = []
            for mode in modes:
                for m, fn in base_fns.items():
                    entries.append((mode, m, fn))
                if per_pair and mode == "eager":
                    entries.append((mode, "sus_v1", partial(sus_attention, c=c, variant="bernoulli")))

            def use(mode: str, fn, model=model, blocks=blocks, eager_fwd=eager_fwd, compiled_fwd=compiled_fwd):
                model.set_attention(fn)
                for b, ef, cf in zip(blocks, eager_fwd, compiled_fwd, strict=True):
                    b.forward = cf if mode == "compile" else ef

            times: dict[tuple[str, str], list[float]] = {(mode, m): [] for mode, m, _ in entries}
            first: dict[tuple[str, str], float] = {}
            for r in range(warmup + rounds):
                for mode, m, fn in entries:
                    use(mode, fn)
                    t = _event_ms(step)
                    if r == 0:
                        first[(mode, m)] = t
                    if r >= warmup:
                        times[(mode, m)].append(t)
            density: dict[tuple[str, str], float] = {}
            for mode in modes:
                for m, fn in base_fns.items():
                    if m.startswith("sus_tile"):
                        use(mode, fn)
                        with _tile_density_probe() as rec:
                            for _ in range(2):
                                step()
                        density[(mode, m)] = sum(k for k, _ in rec) / max(1, sum(a for _, a in rec))
            for b, ef in zip(blocks, eager_fwd, strict=True):
                b.forward = ef
            med = {key: statistics.median(ts) for key, ts in times.items()}
            for (mode, m), ts in times.items():
                ex, lim = med[(mode, "exact")], med[(mode, "limit")]
                row = {"D": d, "heads": d_model // d, "T": T, "mode": mode, "method": m, "step_ms": med[(mode, m)],
                       "min_ms": min(ts), "max_ms": max(ts), "speedup_vs_exact": ex / med[(mode, m)],
                       "speedup_vs_eager_exact": med[("eager", "exact")] / med[(mode, m)],
                       "first_step_ms": first[(mode, m)]}  # fmt: skip
                if m.startswith("sus"):
                    row["prize_share"] = (ex - med[(mode, m)]) / (ex - lim)
                if (mode, m) in density:
                    row["kept_tile_share"] = density[(mode, m)]
                rows.append(row)
                print(f"step D={d} T={T} {mode} {m}: {med[(mode, m)]:.2f} ms (x{row['speedup_vs_exact']:.2f})"
                      + (f" kept tiles {100 * density[(mode, m)]:.1f}%" if (mode, m) in density else ""), flush=True)
            del model, opt, blocks, eager_fwd, compiled_fwd
            torch.cuda.empty_cache()
    config = {
        "model": f"GPT d={d_model}, {n_layers} layers, vocab {vocab}, batch 1, tied embeddings, chunked CE, "
                 "random init (its attention is far flatter than a trained model's: kept shares differ)",
        "train": "bf16 autocast, fused AdamW, grad clip 1.0",
        "modes": "eager; compile = torch.compile of every block's forward (identical blocks share one graph)",
        "exact": "F.scaled_dot_product_attention default dispatch",
        "sus_tile": f"chainfree.ops.sus_tile.sus_tile_attention c in {list(tile_cs)}, tile={tile}, proposal={proposal}",
        "sus_v1": f"chainfree.sus_attention c={c:g} variant='bernoulli' (per-pair v1 kernel, eager only)",
        "limit": "exact forward, attention backward returns zeros",
        "timing": f"CUDA events per step, {warmup} warm-up rounds, median of {rounds} interleaved rounds",
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "source_commit": os.environ.get("CHAINFREE_GIT_COMMIT"),
    }  # fmt: skip
    payload = {"config": config, "rows": rows}
    columns = [
        ("D", "D"), ("T", "T"), ("mode", "mode"), ("method", "method"), ("step_ms", "step ms"), ("min_ms", "min"),
        ("max_ms", "max"), ("speedup_vs_exact", "speedup vs exact (same mode)"),
        ("speedup_vs_eager_exact", "vs eager exact"), ("prize_share", "share of limit"),
        ("kept_tile_share", "kept tiles"),
    ]  # fmt: skip
    title = (f"# GPT training step: SUS vs exact vs limit ({torch.cuda.get_device_name(0)})\n\n"
             f"{config['model']}; {config['train']}; {config['modes']}. limit = {config['limit']}. "
             f"sus_tile = {config['sus_tile']}.\n\n")  # fmt: skip
    write_result(Path(out_dir), name, payload, title + markdown_table(rows, columns))
    return payload


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--ns", type=_ints, default=[2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--head-dims", type=_ints, default=[64, 128])
    p.add_argument("--cs", type=lambda s: [float(x) for x in s.split(",") if x], default=[16.0, 32.0, 64.0],
                   help="per-pair keep rates (attention bench: sus_v1_c* rows; --step: the first is the v1 row's c)")
    p.add_argument("--model-dim", type=int, default=2048)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--mask", choices=["both", "causal", "non-causal"], default="both")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--v1-cs", type=lambda s: [float(x) for x in s.split(",") if x], default=[],
                   help="more sus_v1_c* rows (the same rows as --cs; kept for older commands)")
    p.add_argument("--name", default=None)
    p.add_argument("--step", action="store_true", help="GPT training step bench instead (--ns = sequence lengths)")
    p.add_argument("--tile-cs", type=lambda s: [float(x) for x in s.split(",") if x], default=[4.0],
                   help="keep rates of the tile-sampled SUS rows (sus_tile_c*; '' for none)")
    p.add_argument("--tile", type=int, default=128, help="--step: tile edge of the tile-sampled SUS rows")
    p.add_argument("--proposal", default=None, help="--step: tile statistic ('exact' or 'rowsS'; default the op's)")
    p.add_argument("--modes", default="eager,compile", help="--step: comma-separated subset of eager,compile")
    p.add_argument("--no-per-pair", action="store_true", help="--step: leave out the per-pair v1 rows")
    a = p.parse_args(argv)
    if a.step:
        run_step_bench(a.ns, a.head_dims, a.cs[0], d_model=a.model_dim, out_dir=a.out, name=a.name or "step_sus",
                       tile_cs=tuple(a.tile_cs), tile=a.tile, proposal=a.proposal,
                       modes=tuple(a.modes.split(",")), per_pair=not a.no_per_pair,
                       **({"rounds": a.rounds} if a.rounds else {}))
        return
    causal = None if a.mask == "both" else a.mask == "causal"
    run_attention_bench(a.ns, a.head_dims, a.cs, causal, a.model_dim, a.dtype, a.out, a.name or "attention_sus",
                        rounds=a.rounds, v1_cs=tuple(a.v1_cs), tile_cs=tuple(a.tile_cs))  # fmt: skip


if __name__ == "__main__":
    main()
