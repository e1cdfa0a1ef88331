"""Microbenchmark of tile-sampled SUS attention (`chainfree.ops.sus_tile`) on one CUDA GPU.

For each shape (B=1, H=16, causal, bf16; n = 4k/8k/16k/32k at D=128, 16k at D=64) it times, with CUDA-event
medians (and min/max) over interleaved repetitions: SDPA's default forward/backward and the forced cuDNN
backend, our forward (the aten op that returns the LSE), the statistics pass per proposal, our backward
kernels for a given keep set, our whole backward (statistics + draw + kernels), and FlexAttention's
block-sparse backward over the same kept tiles. It reports the density (kept causal pairs / causal pairs)
and the estimator's relative variance E‖g̃ − g‖² / ‖g‖² (mean over a few draws, per dQ/dK/dV) for each
proposal and c. Writes a table to stdout and JSON (+ a markdown table) to --out.

Inputs: not Gaussian q/k (near-uniform attention); q_i = √(β_h √D)·x_i + ε, k_j = √(β_h √D)·x_j + ε', with
x_i = sinusoidal position features (D/2 frequencies log-spaced from 1 to 1e-4 rad/token, x_i·x_j =
mean_f cos(ω_f (i−j))), ε ~ N(0, 1), so the score decays like a power of the distance |i − j|; plus a sink:
a shared unit direction e added with weight √(γ_h √D) to every query and to key 0. β_h ∈ [8, 20] and
γ_h = β_h + [−2, 3] spread over the heads: row entropies ≈ 1–4.6 nats, 2–55 % of each row's mass on key 0
(calibrated at n = 4096 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from chainfree.ops import sus_tile as st


def realistic_qkv(b: int, h: int, n: int, d: int, seed: int = 0, device: str = "cuda") -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    f = d // 2
    omega = torch.logspace(0, -4, f, device=device)
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None] * omega[None, :]
    x = torch.cat([pos.cos(), pos.sin()], -1) / math.sqrt(f)
    beta = torch.linspace(8.0, 20.0, h, device=device).view(1, h, 1, 1)
    gamma = beta + torch.linspace(-2.0, 3.0, h, device=device).view(1, h, 1, 1)
    amp = (beta * math.sqrt(d)).sqrt()
    q = amp * x + torch.randn(b, h, n, d, generator=g, device=device)
    k = amp * x + torch.randn(b, h, n, d, generator=g, device=device)
    e = torch.randn(d, generator=g, device=device)
    e = e / e.norm()
    a = (gamma * math.sqrt(d)).sqrt()
    q = q + a * e
    k[:, :, :1] += a * e
    v = torch.randn(b, h, n, d, generator=g, device=device)
    return [t.to(torch.bfloat16).contiguous() for t in (q, k, v)]


REPS = 15


def timeit(fn, reps: int | None = None, warmup: int = 3, setup=None) -> dict:
    """CUDA-event times (ms) of fn(); `setup` (untimed) runs before each call and its result is fn's argument."""
    times = []
    reps = reps or REPS
    warmup = min(warmup, reps)
    for i in range(warmup + reps):
        arg = setup() if setup is not None else None
        call = (lambda arg=arg: fn(arg)) if setup is not None else fn
        if not torch.cuda.is_available():  # CPU dry run of the script's logic
            t = time.perf_counter()
            call()
            dt = (time.perf_counter() - t) * 1e3
        else:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            call()
            e.record()
            e.synchronize()
            dt = s.elapsed_time(e)
        if i >= warmup:
            times.append(dt)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


_FLEX = None


def flex_bwd(q, k, v, do, keep, tile: int):
    """(setup, fn) timing FlexAttention's backward over the kept tiles (diagonal tiles causal, the others full)."""
    global _FLEX
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    tq = keep.shape[-1]
    diag = torch.eye(tq, dtype=torch.bool, device=keep.device)
    part, full = keep & diag, keep & ~diag

    def lists(m):
        return m.sum(-1, dtype=torch.int32), torch.sort(m.to(torch.int8), dim=-1, descending=True, stable=True)[1].int()

    kn, ki = lists(part)
    fn_, fi = lists(full)
    bm = BlockMask.from_kv_blocks(kn, ki, fn_, fi, BLOCK_SIZE=tile, mask_mod=lambda b, h, qi, ki_: qi >= ki_)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    return {"setup": lambda: _FLEX(*leaves, block_mask=bm), "fn": lambda out: torch.autograd.grad(out, leaves, do)}


def sdpa_bwd(q, k, v, do, backend=None):
    from torch.nn.attention import sdpa_kernel

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def setup():
        if backend is None:
            return torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)

    return {"setup": setup, "fn": lambda out: torch.autograd.grad(out, leaves, do)}


def density(keep: torch.Tensor, n: int, tile: int) -> float:
    tq = keep.shape[-1]
    pairs = torch.full((tq, tq), float(tile * tile), device=keep.device, dtype=torch.float64)
    pairs.diagonal().fill_(tile * (tile + 1) / 2)
    pairs = pairs.tril()
    return float((keep.double() * pairs).sum() / (pairs.sum() * keep.shape[0] * keep.shape[1]))


def default_backend_kernels(q, k, v, do) -> list[str]:
    """Names of the CUDA kernels SDPA's default dispatch runs (forward + backward), to record its backend."""
    from torch.profiler import ProfilerActivity, profile

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
        out.backward(do)
        torch.cuda.synchronize()
    names = sorted({e.key for e in prof.key_averages() if e.device_type.name == "CUDA"})
    return [x[:80] for x in names if any(w in x.lower() for w in ("cudnn", "flash", "fmha", "attn", "sdpa", "mha"))]


def run_shape(n: int, d: int, cs: list[float], proposals: list[str], args, sweep: bool, save=None) -> dict:
    h, tile, dev = args.heads, args.tile, args.device
    scale = d**-0.5
    q, k, v = realistic_qkv(1, h, n, d, device=dev)
    do = torch.randn_like(q)
    from torch.nn.attention import SDPBackend

    row: dict = {"n": n, "D": d, "B": 1, "H": h, "tile": tile}
    row["sdpa_fwd"] = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    try:
        row["cudnn_fwd"] = timeit(
            lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, True, False, scale=scale
            )
        )
    except (RuntimeError, NotImplementedError) as exc:
        row["cudnn_fwd"] = {"error": str(exc)[:200]}
    row["sdpa_bwd"] = timeit(**sdpa_bwd(q, k, v, do))
    try:
        row["cudnn_bwd"] = timeit(**sdpa_bwd(q, k, v, do, SDPBackend.CUDNN_ATTENTION))
    except (RuntimeError, NotImplementedError) as exc:
        row["cudnn_bwd"] = {"error": str(exc)[:200]}
    st.FORWARD_OPS.clear()
    fwd = lambda: st._fwd_op(q, k, v, 1.0, True, scale, tile, 1, 0.0, None, None, None)  # noqa: E731
    row["ours_fwd"] = timeit(fwd)
    row["forward_op"] = dict(st.FORWARD_OPS)
    o, lse = fwd()
    # exact reference gradient of the estimator: every allowed tile kept with π = 1
    tq = -(-n // tile)
    allowed = torch.ones(tq, tq, dtype=torch.bool, device=dev).tril().expand(1, h, tq, tq)
    ones = torch.ones(1, h, tq, tq, device=dev)
    stats = {}
    for prop in proposals:
        stride = st.proposal_stride(prop)
        row[f"stats_{prop}"] = timeit(
            lambda stride=stride: st.tile_stats(q, k, lse, is_causal=True, scale=scale, tile=tile, row_stride=stride)
        )
        stats[prop] = st.tile_stats(q, k, lse, is_causal=True, scale=scale, tile=tile, row_stride=stride)
    if sweep:  # kernel tilings and segment length, on this shape's exact-statistic keep set at the middle c
        c = cs[len(cs) // 2]
        pi = st.keep_probs(stats["exact"], c, n_q=n, n_k=n, tile=tile, is_causal=True, row_stride=1, pi_min=0.0)
        keep = torch.rand(pi.shape, device=dev) < pi
        res = {}
        combos = [((128, 64, 8, 3, 1, 0), (64, 128, 8, 3, 1, 0)), ((128, 64, 8, 3, 1, 1), (64, 128, 8, 3, 1, 1))]
        for qcfg, kcfg in combos:
            for seg in [16, 32, 64]:
                try:
                    t = timeit(
                        lambda qcfg=qcfg, kcfg=kcfg, seg=seg: st.tile_backward(
                            q, k, v, o, lse, do, pi, keep, is_causal=True, scale=scale, tile=tile,
                            segment=seg, configs=(qcfg, kcfg),
                        ), reps=min(7, REPS), warmup=2,
                    )  # fmt: skip
                    res[f"{qcfg}|{kcfg}|{seg}"] = t["median"]
                except Exception as exc:  # a tiling that does not fit the GPU
                    res[f"{qcfg}|{kcfg}|{seg}"] = f"error {type(exc).__name__}"
        best = min((x for x in res.items() if isinstance(x[1], float)), key=lambda x: x[1])
        row["sweep"] = {"c": c, "density": density(keep, n, tile), "ms": res, "best": best}
        qs, ks, seg = best[0].split("|")
        st.DQ_CONFIG[d] = tuple(int(x) for x in qs.strip("()").split(","))
        st.DKDV_CONFIG[d] = tuple(int(x) for x in ks.strip("()").split(","))
        st.SEGMENT = int(seg)
        print("sweep best", best, flush=True)
    row["configs"] = {"dq": st.DQ_CONFIG[d], "dkdv": st.DKDV_CONFIG[d], "segment": st.SEGMENT}
    row["ours_bwd_all_tiles"] = timeit(
        lambda: st.tile_backward(q, k, v, o, lse, do, ones, allowed, is_causal=True, scale=scale, tile=tile)
    )
    g_exact = st.tile_backward(q, k, v, o, lse, do, ones, allowed, is_causal=True, scale=scale, tile=tile)
    if dev == "cuda":  # all tiles kept at π = 1 must equal SDPA's (cuDNN's) gradients to bf16 rounding
        ref = sdpa_bwd(q, k, v, do)
        g_ref = ref["fn"](ref["setup"]())
        row["all_tiles_vs_sdpa_rel_err"] = [
            float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(g_exact, g_ref, strict=True)
        ]
        print("all tiles vs SDPA grads, relative error", row["all_tiles_vs_sdpa_rel_err"], flush=True)
    runs = []
    row["runs"] = runs
    for c in cs:
        for prop in proposals:
            stride = st.proposal_stride(prop)
            pi_min = st.DEFAULT_PI_MIN if stride > 1 else 0.0
            pi = st.keep_probs(
                stats[prop], c, n_q=n, n_k=n, tile=tile, is_causal=True, row_stride=stride, pi_min=pi_min
            )
            keep = torch.rand(pi.shape, device=dev) < pi
            r = {"c": c, "proposal": prop, "pi_min": pi_min, "density": density(keep, n, tile)}
            r["expected_density"] = density(pi, n, tile)
            r["bwd_kernels"] = timeit(
                lambda pi=pi, keep=keep: st.tile_backward(
                    q, k, v, o, lse, do, pi, keep, is_causal=True, scale=scale, tile=tile
                )
            )
            if prop == "exact" and c == cs[len(cs) // 2]:  # where the backward's time goes
                r["stages"] = {
                    stage: timeit(
                        lambda pi=pi, keep=keep, stage=stage: st.tile_backward(
                            q, k, v, o, lse, do, pi, keep, is_causal=True, scale=scale, tile=tile, stop_after=stage
                        )
                    )["median"]
                    for stage in ("prep", "dq")
                }
            r["bwd_total"] = timeit(
                lambda stride=stride, pi_min=pi_min, c=c: st._bwd_op(
                    do, q, k, v, o, lse, c, True, scale, tile, stride, pi_min, None, None, None
                )
            )
            errs = []
            for _ in range(args.draws):
                kp = torch.rand(pi.shape, device=dev) < pi
                g = st.tile_backward(q, k, v, o, lse, do, pi, kp, is_causal=True, scale=scale, tile=tile)
                errs.append([float((a.float() - b.float()).norm() ** 2 / b.float().norm() ** 2) for a, b in
                             zip(g, g_exact, strict=True)])  # fmt: skip
            r["rel_var"] = {"dq": statistics.mean(e[0] for e in errs), "dk": statistics.mean(e[1] for e in errs),
                            "dv": statistics.mean(e[2] for e in errs)}  # fmt: skip
            if prop == "exact" and args.flex and f"{n}:{d}" in args.flex_shapes.split(","):
                try:
                    r["flex_bwd"] = timeit(**flex_bwd(q, k, v, do, keep, tile))
                except Exception as exc:
                    r["flex_bwd"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            runs.append(r)
            if save is not None:  # partial results survive a time limit
                save(row)
            print(
                f"n={n} D={d} c={c} {prop}: density {r['density']:.3f} kernels {r['bwd_kernels']['median']:.3f} "
                f"total {r['bwd_total']['median']:.3f} flex {r.get('flex_bwd', {}).get('median', float('nan')):.3f} "
                f"relvar dq {r['rel_var']['dq']:.4f} dk {r['rel_var']['dk']:.4f} dv {r['rel_var']['dv']:.4f}",
                flush=True,
            )
    row["runs"] = runs
    return row


def to_markdown(res: dict) -> str:
    lines = [
        f"# sus_tile microbenchmark — {res['device']}, torch {res['torch']}, triton {res['triton']}",
        "",
        f"Command: `{res['command']}`; commit {res['commit']}. B=1, causal, bf16; ms, CUDA-event "
        "median (min–max). SDPA default kernels: " + ", ".join(res.get("sdpa_default_kernels", [])),
        "",
        "| n | D | SDPA fwd | cuDNN fwd | ours fwd (op) | SDPA bwd | cuDNN bwd | all-tiles bwd (ours) | "
        + " | ".join(f"stats {p}" for p in res["proposals"])
        + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(res["proposals"]),
    ]

    def f(t):
        return f"{t['median']:.3f} ({t['min']:.3f}–{t['max']:.3f})" if "median" in t else t.get("error", "—")[:40]

    for r in res["rows"]:
        lines.append(
            f"| {r['n']} | {r['D']} | {f(r['sdpa_fwd'])} | {f(r['cudnn_fwd'])} | {f(r['ours_fwd'])} "
            f"{'/'.join(r['forward_op'])} | {f(r['sdpa_bwd'])} | {f(r['cudnn_bwd'])} | {f(r['ours_bwd_all_tiles'])} | "
            + " | ".join(f(r[f"stats_{p}"]) for p in res["proposals"])
            + " |"
        )
    lines += [
        "",
        "| n | D | c | proposal | density | E[density] | ours bwd kernels | ours bwd total | Flex bwd (same tiles) | "
        "× vs SDPA bwd (total) | rel. var dQ / dK / dV |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        for x in r["runs"]:
            sp = r["sdpa_bwd"]["median"] / x["bwd_total"]["median"]
            lines.append(
                f"| {r['n']} | {r['D']} | {x['c']} | {x['proposal']} | {x['density']:.3f} "
                f"| {x['expected_density']:.3f} "
                f"| {f(x['bwd_kernels'])} | {f(x['bwd_total'])} | {f(x['flex_bwd']) if 'flex_bwd' in x else '—'} | "
                f"{sp:.2f} | {x['rel_var']['dq']:.4f} / {x['rel_var']['dk']:.4f} / {x['rel_var']['dv']:.4f} |"
            )
    for r in res["rows"]:
        for x in r["runs"]:
            if "stages" in x:
                st_ = x["stages"]
                lines.append(
                    f"\nBackward breakdown at n={r['n']}, D={r['D']}, c={x['c']} exact (density {x['density']:.3f}): "
                    f"list building etc. {st_['prep']:.3f} ms, + dQ kernel {st_['dq']:.3f}, + dK/dV kernel "
                    f"{x['bwd_kernels']['median']:.3f} (cumulative medians); statistics pass "
                    f"{r['stats_exact']['median']:.3f}."
                )
        if "all_tiles_vs_sdpa_rel_err" in r:
            lines.append(f"\nn={r['n']}, D={r['D']}: all tiles kept (π = 1) vs SDPA gradients, relative error dQ/dK/dV "
                         + " / ".join(f"{e:.2e}" for e in r["all_tiles_vs_sdpa_rel_err"]))  # fmt: skip
    for r in res["rows"]:
        if "sweep" in r:
            sw = r["sweep"]
            lines += ["", f"Kernel sweep at n={r['n']}, D={r['D']}, c={sw['c']} (density {sw['density']:.3f}): "
                      f"best {sw['best']} (dq cfg | dkdv cfg | segment → ms)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="16384:128,32768:128,8192:128,4096:128,16384:64")
    p.add_argument("--cs", default="1,4,16")
    p.add_argument("--proposals", default="exact,rows8,rows16")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--no-flex", dest="flex", action="store_false")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--flex-shapes", default="16384:128,32768:128,16384:64")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--commit", default="")
    p.add_argument("--no-sweep", dest="sweep", action="store_false")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip remaining shapes after this many seconds")
    args = p.parse_args()
    global REPS
    REPS = args.reps
    import subprocess

    import triton

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    res = {
        "device": dev, "torch": torch.__version__, "triton": triton.__version__, "commit": args.commit or commit or "?",
        "command": "python benchmarks/sus_tile_micro.py " + " ".join(f"--{k}={v}" for k, v in vars(args).items()
                                                                      if k != "out"),
        "proposals": args.proposals.split(","), "rows": [],
    }  # fmt: skip
    if args.device == "cuda":
        q, k, v = realistic_qkv(1, 16, 4096, 128)
        res["sdpa_default_kernels"] = default_backend_kernels(q, k, v, torch.randn_like(q))
    tag = "h200" if "H200" in dev else ("h100" if "H100" in dev else dev.replace(" ", "_").lower())
    t0 = time.time()
    cs = [float(x) for x in args.cs.split(",")]
    for i, shape in enumerate(args.shapes.split(",")):
        if time.time() - t0 > args.budget_s:
            print("budget reached; skipping", shape, flush=True)
            continue
        n, d = (int(x) for x in shape.split(":"))

        def save(row, res=res):
            rows = [r for r in res["rows"] if r is not row] + [row]
            out = dict(res, rows=rows)
            with open(os.path.join(args.out, f"sus_tile_micro_{tag}.json"), "w") as fh:
                json.dump(out, fh, indent=1, default=str)
            with open(os.path.join(args.out, f"sus_tile_micro_{tag}.md"), "w") as fh:
                fh.write(to_markdown(out))

        row = run_shape(n, d, cs, res["proposals"], args, sweep=(i == 0 and args.sweep), save=save)
        res["rows"].append(row)
        save(row)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(to_markdown(res))


if __name__ == "__main__":
    main()
