"""BASIS vs exact backprop on one GPU: peak and activation memory, step time, val loss after a token budget.

    python -m chainfree.bench.basis_bench --out benchmarks/results [--steps 150] [--set key=value ...]

Every case trains the same model (same seed, same batches, same chunked loss, bf16 autocast, fused
AdamW, the train loop's schedule and clipping) from scratch for `--steps` steps, in one process:
exact, BASIS at each rank of `--ranks` on the paper's layers (MLP up/down fused + head), BASIS at
`--attn-rank` on every Linear (attention projections too), and at `--spec-rank` with the MLP as two
separate BasisLinear layers (fuse_mlp=false: GELU's input h stays saved). Measured per case:

* peak: torch.cuda.max_memory_allocated over one full training step (peak stats reset before it);
* static: bytes of weights + grads + optimizer state; activation = peak - static;
* saved: memory_allocated after the forward minus before it (what autograd keeps for backward),
  and its breakdown by tensor shape/dtype from saved_tensors_hooks (storage-deduplicated, parameters
  excluded), so that what remains can be named;
* step time: median wall time of steps 5.. (synchronised), ratio to exact;
* val loss after the budget on fixed val windows, difference to exact.
A micro-benchmark times the sketch (one (R x B) GEMM) against the dW GEMM it replaces.
Results: basis_bench.json / basis_bench.md (+ basis_bench_loss.png) with device, versions and commit.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chainfree.bench.report import markdown_table, write_result
from chainfree.config import load_config
from chainfree.data import BatchSampler
from chainfree.logging import plot_losses
from chainfree.methods.base import Method
from chainfree.train import autocast_context, build_optimizer, build_run, evaluate, lr_at

GPT2_SMALL = ["model.kind=gpt", "model.d_model=768", "model.n_layers=12", "model.n_heads=12", "model.seq_len=1024",
              "train.batch_size=16", "train.dtype=bf16", "train.lr=6e-4", "train.warmup_steps=20",
              "train.eval_batches=8"]
ALL_LINEARS = ["*.mlp.*", "*.attn.*_proj", "head"]


def saved_tensor_breakdown(model: nn.Module, fn) -> tuple[Any, list[dict[str, Any]]]:
    """Run fn() and group what autograd saves by (shape, dtype); storages counted once, parameters skipped."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[tuple[int, ...], str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen[ptr] = (tuple(t.shape), str(t.dtype).removeprefix("torch."), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    groups: dict[tuple[tuple[int, ...], str], dict[str, Any]] = {}
    for shape, dtype, nbytes in seen.values():
        g = groups.setdefault((shape, dtype), {"shape": list(shape), "dtype": dtype, "count": 0, "bytes": 0})
        g["count"] += 1
        g["bytes"] += nbytes
    return out, sorted(groups.values(), key=lambda g: -g["bytes"])


def static_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights + gradients (one per trainable weight, same dtype) + optimizer state tensors."""
    params = list(model.parameters())
    total = sum(p.numel() * p.element_size() * (2 if p.requires_grad else 1) for p in params)
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def run_case(name: str, overrides: list[str], device: torch.device, steps: int, measure_step: int,
             torch_sketch: bool = False) -> dict[str, Any]:
    """Train one case from scratch; torch_sketch=True disables the fused Triton sketch for this case."""
    import chainfree.ops.basis_linear as basis_ops

    basis_ops._TRITON = False if torch_sketch else None
    try:
        return _run_case(name, overrides, device, steps, measure_step)
    finally:
        basis_ops._TRITON = None


def _run_case(name: str, overrides: list[str], device: torch.device, steps: int, measure_step: int) -> dict[str, Any]:
    cfg = load_config(None, overrides)
    tc = cfg.train
    data, model, method = build_run(cfg, device)
    if type(method).step is not Method.step:
        raise ValueError(f"{name}: this bench assumes the default autograd step")
    sampler = BatchSampler(data, tc.batch_size, cfg.model.seq_len, tc.seed)
    optimizer = build_optimizer(model, tc, device)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    times, records, result = [], [], {"case": name}
    for step in range(steps):
        measure = step == measure_step
        x, y = (t.to(device) for t in sampler.batch("train", step))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc)
        if cuda:
            torch.cuda.synchronize(device)
            if measure:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        with autocast_context(tc, device):
            if measure:
                loss, groups = saved_tensor_breakdown(model, lambda: model(x, y))  # noqa: B023 (called at once)
                result["saved_groups"] = groups[:12]
                result["saved_hooks_bytes"] = sum(g["bytes"] for g in groups)
                if cuda:
                    result["saved_bytes"] = torch.cuda.memory_allocated(device) - before
            else:
                loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if measure:
            result["static_bytes"] = static_bytes(model, optimizer)
            if cuda:
                result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
                result["activation_bytes"] = result["peak_bytes"] - result["static_bytes"]
        elif step >= 5:
            times.append(dt)
        records.append({"step": step + 1, "train_loss": float(loss)})
    result["val_loss"] = evaluate(method, model, sampler, tc.eval_batches, device, tc)
    records[-1]["val_loss"] = result["val_loss"]
    result.update(step_time_s=statistics.median(times) if times else math.nan, final_train_loss=records[-1]
                  ["train_loss"], tokens=steps * tc.batch_size * cfg.model.seq_len, records=records,
                  method=method.describe())
    return result


def sketch_microbench(device: torch.device, rows: int, width: int, rank: int, reps: int = 20) -> dict[str, float]:
    """Time (ms) of the sketch of a (rows x width) bf16 matrix vs the dW GEMM it replaces (d_model = width/4)."""
    import chainfree.ops.basis_linear as basis_ops
    from chainfree.ops.basis_linear import draw_plan, scaled_sketch, sketch_rows_reference

    m = torch.randn(rows, width, device=device, dtype=torch.bfloat16)
    other = torch.randn(rows, width // 4, device=device, dtype=torch.bfloat16)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize(device)
        return 1000 * (time.perf_counter() - t0) / reps

    plan = draw_plan(rows, rank, device, torch.bfloat16)
    triton_sketch_ms = {}
    if basis_ops._triton_kernel() is not None:
        kernel = basis_ops._triton_kernel()
        triton_sketch_ms["triton_sketch_norm_colsum_ms"] = timed(
            lambda: kernel(m, plan.perm, plan.signs, rank, with_colsum=True))
    return {
        "rows": rows, "width": width, "rank": rank,
        "dw_gemm_ms": timed(lambda: m.T @ other),
        "draw_plan_ms": timed(lambda: draw_plan(rows, rank, device, torch.bfloat16)),
        "sketch_with_scalar_ms": timed(lambda: scaled_sketch(m, plan, True, 0.01)),  # Triton path if available
        "gather_sketch_ms": timed(lambda: sketch_rows_reference(m, plan)),
        "norm_only_ms": timed(lambda: torch.linalg.vector_norm(m, dtype=torch.float32)),
        "randperm_ms": timed(lambda: torch.randperm(rows, device=device)),
        "argsort_2_perms_ms": timed(lambda: torch.rand(2, rows, device=device).argsort(dim=1)),
        **triton_sketch_ms,
    }


def profile_case(overrides: list[str], device: torch.device) -> str:
    """torch.profiler table of 3 training steps after 4 warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    cfg = load_config(None, overrides)
    tc = cfg.train
    data, model, method = build_run(cfg, device)
    sampler = BatchSampler(data, tc.batch_size, cfg.model.seq_len, tc.seed)
    optimizer = build_optimizer(model, tc, device)

    def step(i: int) -> None:
        x, y = (t.to(device) for t in sampler.batch("train", i))
        with autocast_context(tc, device):
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(4):
        step(i)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(4, 7):
            step(i)
        torch.cuda.synchronize(device)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)


COLUMNS = [("case", "case"), ("peak_gib", "peak (GiB)"), ("activation_gib", "activation (GiB)"),
           ("activation_saving", "activation saving vs exact"), ("saved_gib", "saved by autograd (GiB)"),
           ("step_time_ms", "step time (ms)"), ("time_ratio", "time ratio"), ("val_loss", "val loss"),
           ("delta_val", "Δ val vs exact")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--ranks", default="1,8,32,128")
    ap.add_argument("--attn-rank", type=int, default=32, help="rank of the all-Linears case (0 = skip it)")
    ap.add_argument("--spec-rank", type=int, default=32, help="rank of the unfused-MLP case (0 = skip it)")
    ap.add_argument("--torch-sketch-rank", type=int, default=0,
                    help="rank of a case with the PyTorch sketch instead of the Triton kernel (0 = skip it)")
    ap.add_argument("--profile", action="store_true", help="also profile 3 steps of exact and BASIS R=32")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override section.key=value")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    base = [*GPT2_SMALL, f"train.steps={args.steps}", f"train.device={args.device}", *args.sets]
    cases = {"exact": ["method.name=exact"]}
    for r in (int(v) for v in args.ranks.split(",") if v):
        cases[f"basis R={r}"] = ["method.name=basis", f"method.rank={r}"]
    if args.spec_rank:  # the MLP as two BasisLinear layers (SPEC §1.6 structure: h stays saved)
        cases[f"basis R={args.spec_rank} unfused MLP"] = [
            "method.name=basis", f"method.rank={args.spec_rank}", "method.fuse_mlp=false"]
    if args.torch_sketch_rank:  # same as the paper-layer case but with the PyTorch (GEMM) sketch
        cases[f"basis R={args.torch_sketch_rank} PyTorch sketch"] = [
            "method.name=basis", f"method.rank={args.torch_sketch_rank}"]
    if args.attn_rank:
        cases[f"basis R={args.attn_rank} all Linears"] = [
            "method.name=basis", f"method.rank={args.attn_rank}", "method.layers=" + ",".join(ALL_LINEARS)]
    results = {}
    for name, extra in cases.items():
        results[name] = run_case(name, [*base, *extra], device, args.steps, measure_step=3,
                                 torch_sketch=name.endswith("PyTorch sketch"))
        gc.collect()  # the case's model and optimizer are unreachable now; free them before the next case
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r = results[name]
        print(f"{name}: peak {r.get('peak_bytes', 0) / 2**30:.2f} GiB, activation "
              f"{r.get('activation_bytes', 0) / 2**30:.2f} GiB, step {1000 * r['step_time_s']:.1f} ms, "
              f"val {r['val_loss']:.4f}", flush=True)
    ex = results["exact"]
    rows = []
    for name, r in results.items():
        row = {"case": name, "step_time_ms": 1000 * r["step_time_s"], "val_loss": r["val_loss"],
               "time_ratio": r["step_time_s"] / ex["step_time_s"], "delta_val": r["val_loss"] - ex["val_loss"]}
        if "peak_bytes" in r:
            row.update(peak_gib=r["peak_bytes"] / 2**30, activation_gib=r["activation_bytes"] / 2**30,
                       saved_gib=r["saved_bytes"] / 2**30,
                       activation_saving=1 - r["activation_bytes"] / ex["activation_bytes"])
        rows.append(row)
    micro = []
    if device.type == "cuda":
        cfg = load_config(None, base)
        n = cfg.train.batch_size * cfg.model.seq_len
        micro = [sketch_microbench(device, n, cfg.model.hidden, r) for r in (1, 32, 128)]
    md = [f"# BASIS vs exact: GPT d=768, 12 layers, T=1024, batch 16, bf16, {args.steps} steps "
          f"({results['exact']['tokens']:,} tokens) per case", "", markdown_table(rows, COLUMNS), "",
          "activation = peak − (weights + grads + AdamW state); saved = allocated after forward − before.", ""]
    for name, r in results.items():
        md.append(f"## What autograd saves: {name} ({r['saved_hooks_bytes'] / 2**30:.3f} GiB in saved tensors)")
        md.append(markdown_table(
            [{"shape": "x".join(map(str, g["shape"])), "dtype": g["dtype"], "count": g["count"],
              "MiB": g["bytes"] / 2**20} for g in r["saved_groups"]],
            [("shape", "shape"), ("dtype", "dtype"), ("count", "count"), ("MiB", "MiB")]))
        md.append("")
    if args.profile and device.type == "cuda":
        for name in ("exact", "basis R=32"):
            if name in cases:
                md += [f"## Profile: {name} (3 steps, top kernels by GPU time)", "", "```",
                       profile_case([*base, *cases[name]], device), "```", ""]
    if micro:
        md += ["## Sketch cost (ms) vs the dW GEMM it replaces (one MLP down-projection input)", "",
               markdown_table(micro, [(k, k) for k in micro[0]])]
    command = "python -m chainfree.bench.basis_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    write_result(args.out, "basis_bench", {"command": command, "rows": rows, "results": results,
                                           "sketch_microbench": micro}, "\n".join(md))
    plot_losses({n: r["records"] for n, r in results.items()}, args.out / "basis_bench_loss.png",
                title="BASIS vs exact, GPT d=768 L=12")
    print("\n".join(md))


if __name__ == "__main__":
    main()
