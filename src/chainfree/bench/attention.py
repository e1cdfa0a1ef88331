"""Attention speed benchmark: SUS (Triton kernel) vs torch SDPA (flash backend), same process, same inputs.

Times forward, backward and forward+backward with CUDA events (warm-up, then the median of repeats) for
every (head dim D, sequence length n, keep rate c), model dim fixed (H = model_dim / D heads, batch 1),
and splits the SUS backward into its two kernels (sample = QK^T recompute + hash + compaction; sparse =
gathers + atomics) so the limits are visible. Writes attention_sus.json / .md and a speedup-vs-n PNG.

    python -m chainfree.bench.attention --out benchmarks/results
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chainfree.bench.report import markdown_table, write_result
from chainfree.logging import pyplot, save_figure
from chainfree.ops.sus_triton import SAMPLER

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _time_ms(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Median wall time of fn on the GPU in ms (CUDA events around each call, after warm-up)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _fwd_bwd_times(attn: Callable, q, k, v, do, warmup: int, reps: int) -> dict[str, float]:
    def fwd():
        with torch.no_grad():
            attn(q, k, v)

    out = attn(q, k, v)

    def bwd():
        torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

    def fwd_bwd():
        torch.autograd.grad(attn(q, k, v), (q, k, v), do)

    return {
        "fwd_ms": _time_ms(fwd, warmup, reps),
        "bwd_ms": _time_ms(bwd, warmup, reps),
        "fwd_bwd_ms": _time_ms(fwd_bwd, warmup, reps),
    }


def _bench_shape(
    d: int, H: int, n: int, cs: list[float], causal: bool, tdtype: torch.dtype, forward: str
) -> list[dict[str, Any]]:
    """All rows of one (D, n): SDPA once, then SUS for every c, plus the two backward kernels alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from chainfree.ops import sus_triton as st

    g = torch.Generator(device="cuda").manual_seed(n + d)
    q, k, v, do = (torch.randn(1, H, n, d, generator=g, device="cuda", dtype=tdtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    reps = 20 if n <= 8192 else 10
    warmup = 3
    scale = 1 / math.sqrt(d)
    seed = 1234

    def sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    base = _fwd_bwd_times(sdpa, q, k, v, do, warmup, reps)
    fwd_aten = _time_ms(partial(st.aten_flash_forward, q, k, v, causal, scale), warmup, reps)
    o, lse = st.FORWARDS[forward](q.detach(), k.detach(), v.detach(), causal, scale)
    rows = []
    for c in cs:
        sus = partial(_sus_call, c=c, causal=causal, seed=seed, forward=forward)
        t = _fwd_bwd_times(sus, q, k, v, do, warmup, reps)
        cap = st.row_capacity(c, n)
        sample = partial(st.sample_kept_pairs, q, k, lse, c, causal, scale, seed, cap)
        pairs = sample()
        t_sample = _time_ms(sample, warmup, reps)
        t_sparse = _time_ms(
            partial(st.sparse_backward, q, k, v, o, do, lse, *pairs, c, causal, scale, seed), warmup, reps
        )
        kept = pairs[1].float()
        row = {
            "D": d,
            "H": H,
            "n": n,
            "c": c,
            "sdpa_fwd_ms": base["fwd_ms"],
            "sdpa_bwd_ms": base["bwd_ms"],
            "sdpa_fwd_bwd_ms": base["fwd_bwd_ms"],
            "sus_fwd_ms": t["fwd_ms"],
            "sus_bwd_ms": t["bwd_ms"],
            "sus_fwd_bwd_ms": t["fwd_bwd_ms"],
            "sus_sample_ms": t_sample,
            "sus_sparse_ms": t_sparse,
            "aten_flash_fwd_ms": fwd_aten,
            "fwd_ratio": t["fwd_ms"] / base["fwd_ms"],
            "bwd_speedup": base["bwd_ms"] / t["bwd_ms"],
            "fwd_bwd_speedup": base["fwd_bwd_ms"] / t["fwd_bwd_ms"],
            "kept_per_row": kept.mean().item(),
            "max_kept_row": int(kept.max().item()),
            "row_capacity": cap,
            "overflow_rows": int((kept > cap).sum().item()),
            "sampler": st.SAMPLER,
        }
        rows.append(row)
        print(
            f"D={d} n={n} c={c:g}: sdpa fwd/bwd {base['fwd_ms']:.3f}/{base['bwd_ms']:.3f} ms | sus fwd/bwd "
            f"{t['fwd_ms']:.3f}/{t['bwd_ms']:.3f} ms (sample {t_sample:.3f}, sparse {t_sparse:.3f}; aten fwd "
            f"{fwd_aten:.3f}) | bwd x{row['bwd_speedup']:.2f} fwd ratio {row['fwd_ratio']:.2f} | kept/row "
            f"{row['kept_per_row']:.1f}",
            flush=True,
        )
    return rows


def _sus_call(q, k, v, c: float, causal: bool, seed: int, forward: str):
    from chainfree.ops.sus_triton import sus_attention_triton

    return sus_attention_triton(q, k, v, c=c, is_causal=causal, seed=seed, forward=forward)


def run_attention_bench(
    ns: list[int],
    head_dims: list[int],
    cs: list[float],
    causal: bool = True,
    model_dim: int = 2048,
    dtype: str = "bf16",
    out_dir: Path | str = "benchmarks/results",
    forward: str = "triton",
    name: str = "attention_sus",
    plot: bool = True,
) -> dict[str, Any]:
    """Time SUS vs SDPA (flash) for every (D, n, c); write JSON + markdown (+ PNG) to out_dir.

    Returns the payload written to JSON: {"config": ..., "rows": [one dict per (D, n, c)]}.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the attention speed benchmark needs a CUDA GPU (SDPA flash vs the Triton kernel)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tdtype = DTYPES[dtype]
    rows: list[dict[str, Any]] = []
    for d in head_dims:
        if model_dim % d:
            raise ValueError(f"model_dim {model_dim} is not a multiple of head dim {d}")
        for n in ns:
            rows += _bench_shape(d, model_dim // d, n, cs, causal, tdtype, forward)
            torch.cuda.empty_cache()

    config = {
        "ns": ns,
        "head_dims": head_dims,
        "cs": cs,
        "causal": causal,
        "model_dim": model_dim,
        "batch": 1,
        "dtype": dtype,
        "sus_forward": forward,
        "sus_sampler": SAMPLER,
        "baseline": "torch SDPA, SDPBackend.FLASH_ATTENTION",
        "source_commit": os.environ.get("CHAINFREE_GIT_COMMIT"),  # set where the checkout has no .git
        "timing": "CUDA events, 3 warm-up calls, median of 20 (n<=8192) or 10 repeats",
    }
    payload = {"config": config, "rows": rows}
    columns = [
        ("D", "D"),
        ("n", "n"),
        ("c", "c"),
        ("sdpa_fwd_ms", "SDPA fwd ms"),
        ("sdpa_bwd_ms", "SDPA bwd ms"),
        ("sus_fwd_ms", "SUS fwd ms"),
        ("sus_bwd_ms", "SUS bwd ms"),
        ("sus_sample_ms", "sample ms"),
        ("sus_sparse_ms", "sparse ms"),
        ("fwd_ratio", "fwd SUS/SDPA"),
        ("bwd_speedup", "bwd speedup"),
        ("fwd_bwd_speedup", "fwd+bwd speedup"),
        ("kept_per_row", "kept/row"),
    ]
    title = (
        f"# SUS attention vs SDPA (flash): {'causal' if causal else 'non-causal'}, {dtype}, model dim {model_dim}, "
        f"batch 1\n\nSUS forward: {forward}. bwd = backward only (forward graph kept); sample and sparse are the two "
        "kernels of the SUS backward timed alone.\n\n"
    )
    out_dir = Path(out_dir)
    write_result(out_dir, name, payload, title + markdown_table(rows, columns))
    if plot:
        _plot(rows, out_dir / f"{name}.png", causal, dtype)
    return payload


def _plot(rows: list[dict[str, Any]], path: Path, causal: bool, dtype: str) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    keys = [
        ("bwd_speedup", "backward speedup (SDPA / SUS)"),
        ("fwd_bwd_speedup", "fwd+bwd speedup"),
        ("fwd_ratio", "forward time ratio (SUS / SDPA)"),
    ]
    for ax, (key, label) in zip(axes, keys, strict=True):
        for d in sorted({r["D"] for r in rows}):
            for c in sorted({r["c"] for r in rows}):
                sel = sorted((r for r in rows if r["D"] == d and r["c"] == c), key=lambda r: r["n"])
                ax.plot([r["n"] for r in sel], [r[key] for r in sel], marker="o", label=f"D={d}, c={c:g}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length n")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"SUS attention vs SDPA flash ({'causal' if causal else 'non-causal'}, {dtype}, "
        f"{torch.cuda.get_device_name(0)})"
    )
    save_figure(fig, path)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--ns", type=_ints, default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--head-dims", type=_ints, default=[64, 128])
    p.add_argument("--cs", type=lambda s: [float(x) for x in s.split(",")], default=[16.0, 32.0, 64.0])
    p.add_argument("--model-dim", type=int, default=2048)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--forward", choices=["triton", "aten"], default="triton")
    p.add_argument("--name", default="attention_sus")
    a = p.parse_args(argv)
    run_attention_bench(a.ns, a.head_dims, a.cs, not a.non_causal, a.model_dim, a.dtype, a.out, a.forward, a.name)


if __name__ == "__main__":
    main()
