"""BASIS on the memory-time-loss frontier, against exact backprop and its strong baselines, on the one Trainer.

    python -m chainfree.bench.basis_bench micro --out benchmarks/results            # sketch vs dW GEMM per shape
    python -m chainfree.bench.basis_bench frontier --width 768 --steps 100 --out benchmarks/results
    python -m chainfree.bench.basis_bench optim --device cpu --out benchmarks/results  # AdamW/SGD x scalars

`micro` times, per Linear shape of a model (B rows, N_in -> N_out, bf16), the exact weight-gradient GEMM
dY^T X against what BASIS does instead at each compression: the fused sketch of X (forward) and of dY
(backward, with the bias column sums), and the rank-R dW GEMM. Each figure is the mean of 50 back-to-back
calls between two CUDA events, median over rounds (min and max kept).

`frontier` trains every case from the same seed on the same batches for `--steps` steps through
chainfree.training.Trainer.train_step, the cases *interleaved step by step* (case order rotated every
step), so machine load hits all of them alike. Cases: exact eager, exact compiled (train.compile),
exact with full and selective activation checkpointing (train.activation_checkpoint), and BASIS on all
Linears (attention included) and on the MLPs + head, at each compression of `--compressions`, fused
MLP (keeps only the MLP input) or not (keeps GELU's input, no recompute GEMM), eager and compiled.
Measured per case: activation memory of one step (CUDA: peak allocated during the step minus what was
allocated before it minus the gradients; CPU: torch's MemTracker peak minus weights, optimizer state
and gradients), step time (median over steps >= `--warmup`, p10-p90 spread,
median of the per-step ratio to compiled exact), val loss on fixed val windows after the equal token
budget (the model's uncompiled forward on the val windows of chainfree.training.trainer.evaluate).
Writes basis_frontier_d{width}.{json,md} and a memory-vs-time PNG labelled with Δval. With `--equal-time` every
case is then trained again from the same seed for the steps its median step time fits into the baseline's
training time (its own LR schedule over those steps) and the val loss at equal wall-clock gets its own table.

`optim` is `frontier` with optimizer variants instead of baselines (AdamW vs SGD-momentum, invariant
scalars on/off at each compression), for small models on CPU.

`compiled` checks and profiles compiled BASIS against eager BASIS (all Linears, unfused MLP, one compression):
both train the same batches from the same RNG state, and the compiled draw is the eager randint (an opaque op),
so both draw the same hashes and the losses must agree to rounding; it reports both step times and, with
`--profile`, the top ops of one step of each (torch.profiler, by self device time on CUDA, then by host time):
where a compiled step loses time.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from chainfree.bench.cases import setup_training_case
from chainfree.bench.report import markdown_table, write_result
from chainfree.config import load_config
from chainfree.data import BatchSampler, load_tokens
from chainfree.logging import pyplot
from chainfree.training.trainer import Trainer, evaluate, seeded_model

ALL_LINEARS = "method.layers=*.mlp.*,*.attn.*_proj,head"
MLP_ONLY = "method.layers=*.mlp.*,head"


def width_config(width: int, layers: int | None, batch: int, seq: int) -> list[str]:
    """GPT of the given width (head dim 64), bf16 autocast, fused AdamW lr 6e-4, warmup 20, cosine, clip 1."""
    n_layers = layers if layers is not None else 12
    return ["model.kind=gpt", f"model.d_model={width}", f"model.n_layers={n_layers}",
            f"model.n_heads={max(1, width // 64)}", f"model.seq_len={seq}", f"train.batch_size={batch}",
            "train.dtype=bf16", "train.lr=6e-4", "train.warmup_steps=20", "train.eval_batches=8",
            "train.optimizer=adamw"]


# -- micro ---------------------------------------------------------------------------------------------------

def _mean_ms(fn, device: torch.device, calls: int = 50, rounds: int = 5) -> dict[str, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    per_call = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        per_call.append(start.elapsed_time(end) / calls)
    return {"ms": statistics.median(per_call), "min_ms": min(per_call), "max_ms": max(per_call)}


def _graph_ms(fn, device: torch.device, calls: int = 50, rounds: int = 5) -> dict[str, float]:
    """GPU time of fn without host overhead: `calls` calls captured in one CUDA graph, replayed per round."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return _mean_ms(graph.replay, device, calls=1, rounds=rounds) | {"calls_per_replay": calls}


def _per_call(timing: dict[str, float]) -> float:
    return timing["ms"] / timing.get("calls_per_replay", 1)


def layer_shapes(width: int) -> list[tuple[str, int, int]]:
    """(name, N_in, N_out) of a GPT block's Linears: fused qkv, attention out, MLP up, MLP down."""
    return [("qkv", width, 3 * width), ("attn_out", width, width), ("mlp_up", width, 4 * width),
            ("mlp_down", 4 * width, width)]


def micro(device: torch.device, rows: int, widths: list[int], compressions: list[float]) -> list[dict[str, Any]]:
    from chainfree.ops.basis_sketch import draw_plan, resolve_rank, sketch, sketch_ref, supports

    out = []
    bf16 = torch.bfloat16
    for width in widths:
        for name, n_in, n_out in layer_shapes(width):
            x = torch.randn(rows, n_in, device=device, dtype=bf16)
            dy = torch.randn(rows, n_out, device=device, dtype=bf16)
            dw = _mean_ms(lambda: dy.T @ x, device)  # noqa: B023 (timed at once)
            flops = 2 * rows * n_in * n_out
            bound_ms = rows * (n_in + n_out) * 2 / 4.8e12 * 1e3  # one read of X and dY at the H200's 4.8 TB/s
            for c in compressions:
                rank = resolve_rank(rows, None, c)
                plan = draw_plan(rows, rank, device)
                sx = _mean_ms(lambda: sketch(x, plan), device)  # noqa: B023
                sdy = _mean_ms(lambda: sketch(dy, plan, with_colsum=True), device)  # noqa: B023
                x_sk, dy_sk = sketch(x, plan)[0].to(bf16), sketch(dy, plan)[0].to(bf16)  # float32 for small R
                ref = sketch_ref(dy, plan.sign_bits, plan.shift_bits, plan.rank)[0].float()
                rel_err = float((dy_sk.float() - ref).abs().max() / ref.abs().max())
                small = _mean_ms(lambda: dy_sk.t() @ x_sk, device)  # noqa: B023
                draw = _mean_ms(lambda: draw_plan(rows, rank, device), device)  # noqa: B023
                gx = _graph_ms(lambda: sketch(x, plan), device)  # noqa: B023
                gdy = _graph_ms(lambda: sketch(dy, plan, with_colsum=True), device)  # noqa: B023
                gdw = _graph_ms(lambda: dy.T @ x, device)  # noqa: B023
                sketch_gpu_ms = _per_call(gx) + _per_call(gdy)
                sketch_ms = sx["ms"] + sdy["ms"]
                out.append({
                    "width": width, "layer": name, "rows": rows, "n_in": n_in, "n_out": n_out, "compression": c,
                    "rank": rank, "dw_gemm_ms": dw["ms"], "dw_tflops": flops / dw["ms"] / 1e9,
                    "sketch_x_ms": sx["ms"], "sketch_dy_ms": sdy["ms"], "sketch_ms": sketch_ms,
                    "sketch_over_dw": sketch_ms / dw["ms"], "sketch_gbps": rows * (n_in + n_out) * 2 / sketch_ms / 1e6,
                    "read_bound_ms": bound_ms, "rank_dw_gemm_ms": small["ms"], "draw_ms": draw["ms"],
                    "basis_total_over_dw": (sketch_ms + small["ms"] + draw["ms"]) / dw["ms"],
                    "dw_gemm_gpu_ms": _per_call(gdw), "sketch_x_gpu_ms": _per_call(gx),
                    "sketch_dy_gpu_ms": _per_call(gdy), "sketch_gpu_ms": sketch_gpu_ms,
                    "sketch_gpu_over_dw_gpu": sketch_gpu_ms / _per_call(gdw),
                    "sketch_gpu_gbps": rows * (n_in + n_out) * 2 / sketch_gpu_ms / 1e6,
                    "kernel": "triton" if not supports(x) else "torch (" + "; ".join(supports(x)) + ")",
                    "max_rel_err_vs_sketch_ref": rel_err,
                    "spread": {"dw": dw, "sketch_x": sx, "sketch_dy": sdy},
                })
                r = out[-1]
                print(f"d={width} {name} c={c:g} R={rank}: eager dW {r['dw_gemm_ms']:.3f} ms, sketch X+dY "
                      f"{sketch_ms:.3f} ({r['sketch_over_dw']:.2f}x); GPU (graph) dW {r['dw_gemm_gpu_ms']:.3f}, "
                      f"sketch {sketch_gpu_ms:.3f} ({r['sketch_gpu_over_dw_gpu']:.2f}x, "
                      f"{r['sketch_gpu_gbps']:.0f} GB/s); rank-R GEMM {small['ms']:.3f}, draw {draw['ms']:.3f}",
                      flush=True)
    return out


MICRO_COLUMNS = [("width", "d"), ("layer", "layer"), ("compression", "c"), ("rank", "R"),
                 ("dw_gemm_gpu_ms", "exact dW GEMM, GPU (ms)"), ("sketch_x_gpu_ms", "sketch X, GPU"),
                 ("sketch_dy_gpu_ms", "sketch dY+db, GPU"), ("sketch_gpu_over_dw_gpu", "sketches / dW (GPU)"),
                 ("sketch_gpu_gbps", "sketch GB/s (GPU)"),
                 ("dw_gemm_ms", "dW eager (ms)"), ("sketch_ms", "sketches eager"), ("sketch_over_dw", "eager ratio"),
                 ("read_bound_ms", "read bound (ms)"), ("rank_dw_gemm_ms", "rank-R dW"), ("draw_ms", "draw"),
                 ("basis_total_over_dw", "all BASIS work / dW")]


# -- frontier -----------------------------------------------------------------------------------------------

def baseline_cases(compile_exact: bool) -> dict[str, list[str]]:
    cases = {"exact": ["method.name=exact"]}
    if compile_exact:
        cases["exact+compile"] = ["method.name=exact", "train.compile=true"]
    cases["exact+ckpt"] = ["method.name=exact", "train.activation_checkpoint=full"]
    cases["exact+sac"] = ["method.name=exact", "train.activation_checkpoint=selective"]
    if compile_exact:  # checkpointing compiled: the strongest memory-saving exact baselines
        cases["exact+ckpt+compile"] = [*cases["exact+ckpt"], "train.compile=true"]
        cases["exact+sac+compile"] = [*cases["exact+sac"], "train.compile=true"]
    return cases


def basis_cases(sets: dict[str, list[float]], compiled: list[str]) -> dict[str, list[str]]:
    """sets: {'all' (every Linear, fused MLP) | 'all-unfused' | 'mlp' (MLPs + head): compressions};
    compiled: case labels to run compiled as well."""
    layer_sets = {"all": [ALL_LINEARS], "all-unfused": [ALL_LINEARS, "method.fuse_mlp=false"], "mlp": [MLP_ONLY]}
    cases = {}
    for s, compressions in sets.items():
        if s not in layer_sets:
            raise SystemExit(f"--sets: unknown layer set {s!r}; use {', '.join(layer_sets)}")
        for c in compressions:
            name = f"basis {s} c={c:g}"
            cases[name] = ["method.name=basis", f"method.compression={c:g}", *layer_sets[s]]
    for label in compiled:  # e.g. "basis all-unfused c=8"
        if label not in cases:
            raise SystemExit(f"--compile-cases: {label!r} is not one of the cases: {', '.join(cases)}")
        cases[label + "+compile"] = [*cases[label], "train.compile=true"]
    return cases


def _grad_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def cpu_step_memory(trainer: Trainer, state: Any, batch: Any) -> dict[str, Any]:
    """One training step under torch's MemTracker (follows every storage alive during the step): the CPU
    stand-in for the CUDA allocator's peak. activation = peak - (weights, buffers, optimizer state) - grads."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(state.model, state.optimizer)
    with tracker:
        trainer.train_step(state, batch)
    peak = max(int(v.get("Total", 0)) for v in tracker.get_tracker_snapshot("peak").values())
    tensors = [*state.model.parameters(), *state.model.buffers(),
               *(t for st in state.optimizer.state.values() for t in st.values() if torch.is_tensor(t))]
    static = sum(t.numel() * t.element_size() for t in tensors)
    return {"activation_bytes": peak - static - _grad_bytes(state.model), "memory_source": "torch MemTracker"}


def run_cases(base: list[str], cases: dict[str, list[str]], steps: int | dict[str, int], device: torch.device,
              warmup: int, measure_step: int, budget_s: float) -> dict[str, dict[str, Any]]:
    """Train every case through its own Trainer, interleaved step by step; return per-case measurements.

    steps: one step count for all cases, or one per case (each case's LR schedule spans its own count; a
    case that has reached its count sits out the remaining rounds)."""
    n_steps = steps if isinstance(steps, dict) else dict.fromkeys(cases, steps)
    longest = max(n_steps.values())
    cfgs = {name: load_config(None, [*base, f"train.steps={n_steps[name]}", f"train.device={device.type}", *extra])
            for name, extra in cases.items()}
    first = next(iter(cfgs.values()))
    data = load_tokens(first.data)
    runs: dict[str, dict[str, Any]] = {}
    for name, cfg in cfgs.items():
        method, trainer, state, sampler = setup_training_case(cfg, data, device)
        runs[name] = {"cfg": cfg, "trainer": trainer, "state": state, "sampler": sampler, "method": method,
                      "times": [], "losses": [], "result": {"case": name, "overrides": cases[name],
                                                              "options": trainer.options}}
    cuda = device.type == "cuda"
    names = list(runs)
    t_start = time.perf_counter()
    done_steps = 0
    for step in range(longest):
        if step == 1:
            t_start = time.perf_counter()  # the budget counts from step 1: step 0 holds every compile
        if time.perf_counter() - t_start > budget_s and step > measure_step:
            print(f"time budget reached after {step} steps; stopping all cases there", flush=True)
            break
        order = names[step % len(names):] + names[:step % len(names)]  # rotate: no case always runs first
        for name in order:
            if step >= n_steps[name]:
                continue
            r = runs[name]
            batch = r["sampler"].batch("train", step)
            measure = cuda and step == measure_step
            if cuda:
                torch.cuda.synchronize(device)
                if measure:
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
            if not cuda and step == measure_step:
                r["result"].update(cpu_step_memory(r["trainer"], r["state"], batch))
                r["times"].append(math.nan)  # the tracked step is not timed
                r["losses"].append(math.nan)
                continue
            t0 = time.perf_counter()
            stats = r["trainer"].train_step(r["state"], batch)
            if cuda:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if measure:
                peak = torch.cuda.max_memory_allocated(device)
                r["result"]["activation_bytes"] = peak - before - _grad_bytes(r["state"].model)
                r["result"]["step_peak_over_before_bytes"] = peak - before
            r["times"].append(dt)
            r["losses"].append(stats.loss)
        done_steps = step + 1
        if done_steps % 10 == 0:
            print(f"step {done_steps}/{longest} of {len(names)} interleaved cases", flush=True)
    for name, r in runs.items():
        cfg = r["cfg"]
        res = r["result"]
        case_steps = min(done_steps, n_steps[name])
        times = [t for t in r["times"][warmup:] if not math.isnan(t)] or [t for t in r["times"] if not math.isnan(t)]
        qs = statistics.quantiles(times, n=10) if len(times) >= 10 else [min(times)] * 9
        res.update(steps=case_steps, tokens=case_steps * cfg.train.batch_size * cfg.model.seq_len,
                   step_ms=1e3 * statistics.median(times), step_ms_p10=1e3 * qs[0], step_ms_p90=1e3 * qs[-1],
                   first_step_s=r["times"][0], train_loss_last10=statistics.fmean(r["losses"][-10:]),
                   records=[{"step": i + 1, "train_loss": loss} for i, loss in enumerate(r["losses"])
                            if not math.isnan(loss)],
                   # the model's *uncompiled* forward: the compiled wrapper would recompile for eval mode
                   # (tens of seconds per compiled case)
                   val_loss=evaluate(r["method"], r["state"].model, r["sampler"], cfg.train.eval_batches, device,
                                     cfg.train, loss=r["state"].model.forward),
                   method=r["method"].describe() if hasattr(r["method"], "describe") else cfg.method,
                   step_times_s=r["times"])
        if cfg.method_name == "basis":
            from chainfree.methods.basis import summary

            res["swapped"] = summary(r["state"].model)
    for name in list(runs):  # free the models before the next table
        del runs[name]["state"], runs[name]["trainer"]
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {name: r["result"] for name, r in runs.items()}


def add_ratios(results: dict[str, dict[str, Any]], baseline: str) -> None:
    base = results[baseline]
    bt, warm = base["step_times_s"], 0
    for r in results.values():
        n = min(len(r["step_times_s"]), len(bt))
        ratios = [a / b for a, b in zip(r["step_times_s"][warm:n], bt[warm:n], strict=True)
                  if not (math.isnan(a) or math.isnan(b))][5:]
        r["time_ratio"] = statistics.median(ratios) if ratios else math.nan
        r["delta_val"] = r["val_loss"] - base["val_loss"]
        if "activation_bytes" in r and "activation_bytes" in base:
            r["activation_gib"] = r["activation_bytes"] / 2**30
            r["activation_ratio"] = r["activation_bytes"] / base["activation_bytes"]


def equal_time_steps(results: dict[str, dict[str, Any]], baseline: str) -> dict[str, int]:
    """Steps each case fits into the baseline's steady training time (its steps x its median step time)."""
    base = results[baseline]
    budget_ms = base["steps"] * base["step_ms"]
    return {name: max(1, round(budget_ms / r["step_ms"])) for name, r in results.items() if name != baseline}


def equal_time_rows(results: dict[str, dict[str, Any]], rerun: dict[str, dict[str, Any]], baseline: str
                    ) -> list[dict[str, Any]]:
    """Val loss of every case after the baseline's training time: the rerun with its own step count (and LR
    schedule) where that count differs from the equal-token run, else the equal-token run itself."""
    base_val = results[baseline]["val_loss"]
    rows = []
    for name, r in results.items():
        src = rerun.get(name, r)
        rows.append({"case": name, "steps": src["steps"], "tokens": src["tokens"], "val_loss": src["val_loss"],
                     "delta_val": src["val_loss"] - base_val})
    return rows


EQUAL_TIME_COLUMNS = [("case", "case"), ("steps", "steps"), ("tokens", "tokens"), ("val_loss", "val loss"),
                      ("delta_val", "Δ val vs base")]

FRONTIER_COLUMNS = [("case", "case"), ("activation_gib", "activation (GiB)"), ("activation_ratio", "act. vs base"),
                    ("step_ms", "step (ms)"), ("step_ms_p10", "p10"), ("step_ms_p90", "p90"),
                    ("time_ratio", "time vs base"), ("val_loss", "val loss"), ("delta_val", "Δ val vs base"),
                    ("first_step_s", "1st step (s)")]


def frontier_plot(results: dict[str, dict[str, Any]], path: Path, title: str, baseline: str) -> None:
    """Memory vs step time, one point per case labelled with its Δval; compiled cases hollow; cases marked
    invalid left out."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = sorted((r["step_ms"], name, r) for name, r in results.items()
                    if "activation_gib" in r and not r.get("invalid"))
    xs = [x for x, _, _ in points] or [0.0]
    ys = [r["activation_gib"] for _, _, r in points] or [0.0]
    near_x, near_y = 0.06 * (max(xs) - min(xs) or 1), 0.06 * (max(ys) - min(ys) or 1)
    placed: list[tuple[float, float, tuple[int, int]]] = []
    for _, name, r in points:
        kind = "exact" if name.startswith("exact") else ("basis-all" if " all" in name else "basis-mlp")
        marker = {"exact": "s", "basis-all": "o", "basis-mlp": "^"}[kind]
        color = {"exact": "k", "basis-all": "C0", "basis-mlp": "C1"}[kind]
        compiled = name.endswith("+compile")
        ax.scatter(r["step_ms"], r["activation_gib"], marker=marker, s=40, linewidths=1.5,
                   facecolors="none" if compiled else color, edgecolors=color)
        # a label goes to the first corner no close neighbour's label took, so close points do not overprint
        x, y = r["step_ms"], r["activation_gib"]
        taken = {off for px, py, off in placed if abs(px - x) < near_x and abs(py - y) < near_y}
        offset = next((o for o in ((3, 4), (3, -16), (-75, 4), (-75, -16)) if o not in taken), (3, 4))
        placed.append((x, y, offset))
        ax.annotate(f"{name.replace('basis ', '')}\nΔval {r['delta_val']:+.2f}", (x, y),
                    fontsize=6, xytext=offset, textcoords="offset points")
    ax.set_xlabel("step time (ms, median)")
    ax.set_ylabel("activation memory of one step (GiB)")
    ax.set_title(f"{title}\n(label: val loss minus {baseline}'s after the same tokens; hollow: compiled)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_frontier(out: Path, tag: str, title: str, results: dict[str, dict[str, Any]], baseline: str,
                   base: list[str], command: str, extra: dict[str, Any],
                   equal_time: list[dict[str, Any]] | None = None) -> None:
    add_ratios(results, baseline)
    rows = [{k: r.get(k) for k, _ in FRONTIER_COLUMNS} for r in results.values()]
    tokens = next(iter(results.values()))["tokens"]
    md = [f"# {title}: {tokens:,} tokens per case, cases interleaved step by step", "",
          f"Baseline of the ratios: **{baseline}**. Settings: `{' '.join(base)}`.", "",
          markdown_table(rows, FRONTIER_COLUMNS), "",
          "activation = peak allocated during one step − allocated before it − gradients (CPU: MemTracker peak − "
          "weights, optimizer state, gradients); step time: "
          "median over steps after warm-up, p10/p90 spread; time vs base: median of per-step ratios "
          "(interleaved steps); val loss on fixed val windows after the same steps and batches.", ""]
    if equal_time:
        base_r = results[baseline]
        md += [f"## At equal wall-clock: {baseline}'s training time ({base_r['steps']} steps x "
               f"{base_r['step_ms']:.1f} ms)", "",
               markdown_table(equal_time, EQUAL_TIME_COLUMNS), "",
               "Each case trained again from the same seed and batches for the steps its median step time fits into "
               "that time, with its LR schedule over those steps (warm-up and cosine decay complete); compile time "
               "is not counted.", ""]
    for name, r in results.items():
        if r.get("swapped"):
            md.append(f"* {name}: {r['swapped']}")
    payload = {"command": command, "baseline": baseline, "base_overrides": base, "results": results, **extra}
    if equal_time:
        payload["equal_time"] = equal_time
    write_result(out, f"basis_frontier_{tag}", payload, "\n".join(md))
    frontier_plot(results, out / f"basis_frontier_{tag}.png", title, baseline)


# -- fidelity -------------------------------------------------------------------------------------------------

FIDELITY_COLS = [("compression", "c"), ("rank", "R"), ("scalars", "scalars"), ("cosine", "cosine"),
                 ("norm_ratio", "‖ĝ‖/‖g‖"), ("bias_corrected", "bias (noise floor removed)"),
                 ("variance", "rel. variance"), ("sqrt_rows_over_rank", "√(B/R)")]


def fidelity_sweep(base: list[str], device: torch.device, compressions: list[float], k: int, n_batches: int
                   ) -> list[dict[str, Any]]:
    """Gradient fidelity of all-Linears BASIS vs exact autograd at each compression, invariant scalars on/off,
    on the fresh (seeded) model and the same minibatches (chainfree.bench.fidelity.measure_fidelity)."""
    from chainfree.bench.fidelity import measure_fidelity, sample_batches
    from chainfree.methods import build_method
    from chainfree.ops.basis_sketch import resolve_rank

    cfg = load_config(None, [*base, f"train.device={device.type}"])
    data = load_tokens(cfg.data)
    cfg.model.fit_vocab(data.vocab_size)
    sampler = BatchSampler(data, cfg.train.batch_size, cfg.model.seq_len, cfg.train.seed)
    batches = sample_batches(sampler, n_batches, device)
    rows = cfg.train.batch_size * cfg.model.seq_len
    out = []
    for c in compressions:
        for scalars in (True, False):
            method = build_method("basis", {"compression": c, "scalars": scalars,
                                            "layers": ALL_LINEARS.split("=", 1)[1]})
            report = measure_fidelity(lambda: seeded_model(cfg, device), method, batches, k)
            rank = resolve_rank(rows, None, c)
            out.append({"compression": c, "rank": rank, "scalars": scalars, **report.overall,
                        "sqrt_rows_over_rank": math.sqrt(rows / rank)})
            r = out[-1]
            print(f"c={c:g} scalars={scalars}: cosine {r['cosine']:.3f}, norm ratio {r['norm_ratio']:.2f}", flush=True)
    return out


# -- CLI -----------------------------------------------------------------------------------------------------

def compiled_check(base: list[str], device: torch.device, compression: float, steps: int, profile: bool,
                   mode: str = "default") -> dict[str, Any]:
    """Eager vs compiled BASIS (torch.compile mode `mode`) on the same batches and the same draws."""
    from chainfree.runtime import sync

    runs: dict[str, dict[str, Any]] = {}
    overrides = [*base, "method.name=basis", f"method.compression={compression:g}", ALL_LINEARS,
                 "method.fuse_mlp=false", f"train.device={device.type}", f"train.steps={steps}"]
    data = load_tokens(load_config(None, overrides).data)
    for name, extra in (("eager", []), ("compiled", ["train.compile=true", f"train.compile_mode=\"{mode}\""])):
        _, trainer, state, sampler = setup_training_case(load_config(None, [*overrides, *extra]), data, device)
        losses, times = [], []
        for step in range(steps):
            batch = sampler.batch("train", step)
            torch.manual_seed(1000 + step)  # the draws of this step, the same for both runs
            sync(device)
            t0 = time.perf_counter()
            losses.append(trainer.train_step(state, batch).loss)
            sync(device)
            times.append(time.perf_counter() - t0)
        table = None
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch_profile(activities=acts) as prof:
                trainer.train_step(state, sampler.batch("train", steps))
                sync(device)
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=25)
            if device.type == "cuda":  # a host-bound step shows here: host time of the ops that launch work
                table += "\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=15)
        runs[name] = {"losses": losses, "step_times_s": times, "profile": table,
                      "step_ms": 1e3 * statistics.median(times[1:] or times)}
        del state, trainer
        gc.collect()
    e, c = runs["eager"]["losses"], runs["compiled"]["losses"]
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(e, c, strict=True))
    return {"compression": compression, "steps": steps, "compile_mode": mode, "max_rel_loss_diff": worst,
            "eager": runs["eager"], "compiled": runs["compiled"],
            "compiled_over_eager": runs["compiled"]["step_ms"] / runs["eager"]["step_ms"]}


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["micro", "frontier", "optim", "fidelity", "compiled"])
    ap.add_argument("--compression", type=float, default=8.0, help="compiled: the BASIS compression")
    ap.add_argument("--profile", action="store_true", help="compiled: torch.profiler table of one step of each")
    ap.add_argument("--k", type=int, default=6, help="fidelity: estimates per batch")
    ap.add_argument("--batches", type=int, default=3, help="fidelity: minibatches")
    ap.add_argument("--out", type=Path, default=Path("runs/basis_bench"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, default=None, help="blocks (default 12)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compressions", default="2,4,8,32,128,512", help="micro and optim: compressions")
    ap.add_argument("--sets", default="all=2,4,8,32,128,512;mlp=2,4,8,32,128,512",
                    help="BASIS layer sets and their compressions: 'all=2,8;all-unfused=8;mlp=8,512'")
    ap.add_argument("--compile-cases", default="", help="BASIS cases to also run compiled, ';'-separated")
    ap.add_argument("--no-compile-exact", action="store_true")
    ap.add_argument("--widths", default="768,2048", help="micro: model widths")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop the interleaved steps after this long")
    ap.add_argument("--equal-time", action="store_true",
                    help="frontier: also train each case for the baseline's wall-clock time (its own step count)")
    ap.add_argument("--compile-mode", default="default",
                    help="compiled: torch.compile mode of the compiled run (reduce-overhead: CUDA graphs)")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--set", dest="sets_", action="append", default=[], help="config override section.key=value")
    args = ap.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device(args.device)
    command = "python -m chainfree.bench.basis_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    comps = _floats(args.compressions)
    if args.what == "micro":
        rows = args.batch * args.seq
        res = micro(device, rows, [int(w) for w in args.widths.split(",")], comps)
        md = [f"# BASIS sketch cost vs the exact dW GEMM it replaces ({rows} rows, bf16)", "",
              markdown_table(res, MICRO_COLUMNS), "",
              "sketches / dW (GPU): fused sketch of X (forward) + of dY with bias sums (backward) over the exact dW "
              "GEMM dY^T X, both as GPU time (50 calls captured in one CUDA graph, replayed; median of 5 replays: "
              "what a compiled / CUDA-graph step pays). Eager columns: 50 back-to-back calls between two events "
              "(includes the host's launch overhead when that dominates). Read bound: one read of X and dY at "
              "4.8 TB/s. All BASIS work (eager): sketches + rank-R dW GEMM + the draw."]
        write_result(args.out, args.tag or "basis_micro", {"command": command, "rows": res}, "\n".join(md))
        return
    base = [*width_config(args.width, args.layers, args.batch, args.seq), *args.sets_]
    if args.what == "fidelity":
        res = fidelity_sweep(base, device, comps, args.k, args.batches)
        md = [f"# BASIS gradient fidelity vs compression, invariant scalars on/off (all Linears, fresh init, "
              f"{args.batches} minibatches x {args.k} estimates, {args.batch * args.seq} rows)", "",
              markdown_table(res, FIDELITY_COLS), "",
              "cosine: mean cos(ĝ, g) to exact autograd; ‖ĝ‖/‖g‖: norm ratio (≈ √(1 + rel. variance): the noise "
              "inflates the norm with or without the scalars; √(B/R) is its size on uncorrelated rows); rel. "
              "variance: E‖ĝ − Eĝ‖² / ‖g‖²; bias with the sampling noise floor removed (chainfree.bench.fidelity). "
              "Same seed, batches and draws for scalars on and off."]
        write_result(args.out, args.tag or f"basis_fidelity_d{args.width}", {"command": command, "rows": res,
                                                                            "base_overrides": base}, "\n".join(md))
        return
    if args.what == "compiled":
        res = compiled_check(base, device, args.compression, args.steps, args.profile, args.compile_mode)
        md = [f"# Compiled ({args.compile_mode}) vs eager BASIS (all Linears, unfused, compression "
              f"{args.compression:g}), GPT d={args.width} "
              f"L={args.layers or 12} T={args.seq} batch {args.batch}, same batches and draws", "",
              f"step time: eager {res['eager']['step_ms']:.2f} ms, compiled {res['compiled']['step_ms']:.2f} ms "
              f"({res['compiled_over_eager']:.2f}x; medians after the first step)", "",
              f"largest relative loss difference over {args.steps} steps: {res['max_rel_loss_diff']:.2e}"]
        for name in ("eager", "compiled"):
            if res[name]["profile"]:
                md += ["", f"## Top ops of one {name} step", "", "```", res[name]["profile"], "```"]
        write_result(args.out, args.tag or f"basis_compiled_d{args.width}", {"command": command, **res,
                                                                            "base_overrides": base}, "\n".join(md))
        print("\n".join(md[:5]))
        return
    if args.what == "frontier":
        cases = baseline_cases(not args.no_compile_exact)
        compiled = [c.strip() for c in args.compile_cases.split(";") if c.strip()]
        sets = {k.strip(): _floats(v) for k, v in (item.split("=") for item in args.sets.split(";") if item.strip())}
        cases.update(basis_cases(sets, compiled))
        baseline = "exact" if args.no_compile_exact else "exact+compile"
        dtype = [o.split("=", 1)[1] for o in base if o.startswith("train.dtype=")][-1]
        title = (f"BASIS frontier, GPT d={args.width} L={args.layers or 12} T={args.seq} batch {args.batch}, {dtype}"
                 f"{', ' + args.device.upper() if args.device == 'cpu' else ''}")
    else:
        cases = {"exact adamw": ["method.name=exact"],
                 "exact sgd": ["method.name=exact", "train.optimizer=sgd", "train.lr=0.1", "train.momentum=0.9"]}
        for c in comps:
            for opt, extra in (("adamw", []), ("sgd", ["train.optimizer=sgd", "train.lr=0.1", "train.momentum=0.9"])):
                for scalars in ("true", "false"):
                    cases[f"basis c={c:g} {opt} scalars={scalars}"] = [
                        "method.name=basis", f"method.compression={c:g}", ALL_LINEARS, f"method.scalars={scalars}",
                        *extra]
        baseline = "exact adamw"
        title = f"BASIS x optimizer, GPT d={args.width} L={args.layers or 12} T={args.seq} batch {args.batch}"
    results = run_cases(base, cases, args.steps, device, args.warmup, measure_step=3, budget_s=args.budget_s)
    tag = args.tag or (f"d{args.width}" if args.what == "frontier" else f"optim_d{args.width}")
    equal_time = None
    if args.equal_time:
        counts = equal_time_steps(results, baseline)
        again = {name: k for name, k in counts.items() if k != results[name]["steps"]}
        print(f"equal wall-clock: rerunning {len(again)} cases with their own step counts {again}", flush=True)
        rerun = run_cases(base, {n: cases[n] for n in again}, again, device, args.warmup, measure_step=3,
                          budget_s=args.budget_s) if again else {}
        equal_time = equal_time_rows(results, rerun, baseline)
    write_frontier(args.out, tag, title, results, baseline, base, command,
                   {"steps": args.steps, "cases": cases}, equal_time)
    print(json.dumps({n: {k: r.get(k) for k in ("activation_ratio", "step_ms", "time_ratio", "val_loss",
                                                 "delta_val")} for n, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
