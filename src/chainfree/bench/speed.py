"""Speed of a method against exact backprop, in one process on one batch.

One training step (method.step + clip + optimizer, as the training loop runs it) or an isolated module of
the prepared model (`op`: 'block', 'attn', 'mlp'; forward and forward+backward on a random input). Every
case gets warm-up calls and the median of repeats; on a GPU each call is bracketed by CUDA events, on CPU
it is wall time (perf_counter) -- the result records which (`timer`), and CPU numbers say nothing about
GPU speed. The exact baseline is always measured in the same process, so ratios cancel the machine.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from chainfree.bench.cases import OPS, StepCase, build_step_case, op_closures, shapes, time_fn
from chainfree.config import RunConfig
from chainfree.errors import ConfigError
from chainfree.training.options import uses_cudagraphs


def _release(case: StepCase | None) -> None:
    del case
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_speed(cfg: RunConfig, methods: list[tuple[str, dict[str, Any]]], batch: tuple[torch.Tensor, torch.Tensor],
                  device: torch.device, op: str = "step", warmup: int = 3, repeats: int = 10) -> dict[str, Any]:
    """Rows (one per method, 'exact' first and always present) with median ms and ratios vs exact."""
    if op not in OPS:
        raise ConfigError(f"--op must be one of {', '.join(OPS)} or 'attention', got {op!r}")
    if warmup < 0 or repeats < 1:
        raise ConfigError("--warmup must be >= 0 and --repeats >= 1")
    if not any(name == "exact" for name, _ in methods):
        methods = [("exact", {}), *methods]
    tokens = batch[0].numel()
    rows: list[dict[str, Any]] = []
    for name, params in methods:
        case = build_step_case(cfg, name, params, batch, device)
        row: dict[str, Any] = {"method": name, "params": params}
        if op == "step":
            t = time_fn(case.step, device, warmup, repeats)
            row.update(step_ms=t["median_ms"], step_min_ms=t["min_ms"], tokens_per_s=tokens / t["median_ms"] * 1e3,
                       timer=t["timer"])
        else:
            for phase, fn in op_closures(case, op).items():
                t = time_fn(fn, device, warmup, repeats)
                row[f"{phase}_ms"] = t["median_ms"]
                row[f"{phase}_min_ms"] = t["min_ms"]
                row["timer"] = t["timer"]
        rows.append(row)
        _release(case)
    base = rows[0]
    for row in rows:
        for key in ("step_ms", "fwd_ms", "fwd_bwd_ms"):
            if key in row:
                row[f"{key.removesuffix('_ms')}_ratio"] = row[key] / base[key]
    return {"bench": "speed", "op": op, "device": str(device), "timer": rows[0]["timer"],
            "cpu_note": "CPU wall time (perf_counter): no GPU speed claim" if device.type == "cpu" else None,
            "warmup": warmup, "repeats": repeats, "shapes": shapes(cfg, batch), "rows": rows}


SPEED_COLUMNS = {
    "step": [("method", "method"), ("step_ms", "step ms (median)"), ("step_min_ms", "min ms"),
             ("tokens_per_s", "tokens/s"), ("step_ratio", "time ratio vs exact")],
    "op": [("method", "method"), ("fwd_ms", "fwd ms"), ("fwd_bwd_ms", "fwd+bwd ms"), ("fwd_ratio", "fwd ratio"),
           ("fwd_bwd_ratio", "fwd+bwd ratio")],
}


def _own_static_bytes(case: StepCase) -> int:
    """Weights, buffers and optimizer state of one case (unique storages)."""
    from chainfree.bench.memory import unique_storage_bytes

    return unique_storage_bytes([*case.model.parameters(), *case.model.buffers(),
                                 *(t for s in case.optimizer.state.values() for t in s.values() if torch.is_tensor(t))])


def _timed_steps(case: StepCase, n: int, device: torch.device) -> list[float]:
    """Seconds of each of `n` consecutive training steps (CUDA events on a GPU, wall time elsewhere)."""
    import time

    if device.type != "cuda":
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            case.step()
            out.append(time.perf_counter() - t0)
        return out
    events = []
    torch.cuda.synchronize(device)
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        case.step()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) / 1e3 for s, e in events]


CUDAGRAPH_MEMORY = ("not measured: under CUDA graphs the step's buffers live in the graphs' private pool across "
                    "steps, so the allocator's per-step peak does not show activation memory")


def measure_entries(cfgs: dict[str, RunConfig], batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                    rounds: int = 5, steps: int = 5, warmup: int = 3, baseline: str = "exact") -> dict[str, Any]:
    """Step time and memory of compare-style entries (`exact`, `exact+compile`, `exact+ckpt`, `basis`, ...; one
    RunConfig each), timed interleaved: every case is built and warmed up (compilation happens there), then
    `rounds` times each case runs `steps` timed steps in turn, the order rotating. Reported per entry: median
    step, min, p10-p90, the per-round ratio to `baseline` (median, min, max, within noise). Memory: one step per
    case with the others idle (their gradients freed), so activation = peak - allocated before - gradients;
    own peak = own weights/optimizer state + gradients + activation."""
    import time

    from chainfree.bench.compare import timing_stats
    from chainfree.bench.memory import case_memory
    from chainfree.bench.report import sdpa_backends

    if baseline not in cfgs:
        raise ConfigError(f"the entries must include the baseline {baseline!r}")
    cases: dict[str, StepCase] = {}
    rows: dict[str, dict[str, Any]] = {}
    failed: list[dict[str, Any]] = []
    for label, cfg in cfgs.items():
        t0 = time.perf_counter()
        options = {k: getattr(cfg.train, k) for k in ("compile", "compile_mode", "compile_scope",
                                                        "activation_checkpoint", "grad_accum")}
        try:
            case = build_step_case(cfg, cfg.method_name, cfg.method_params, batch, device)
            for _ in range(warmup):
                case.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 -- one entry failing (OOM, a compile error) must not lose the others
            if label == baseline:
                raise
            failed.append({"method": label, "options": options, "error": f"{type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}"})
            case = None
            _release(case)
            continue
        cases[label] = case
        rows[label] = {"method": label, "params": cfg.method_params, "warmup_s": time.perf_counter() - t0,
                       "options": options}
        print(f"  {label}: built and warmed up in {rows[label]['warmup_s']:.1f} s", flush=True)
    times: dict[str, list[float]] = {label: [] for label in cases}
    labels = list(cases)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            times[label] += _timed_steps(cases[label], steps, device)
    bounds = [steps * (r + 1) for r in range(rounds)]
    stats = timing_stats(times, bounds, baseline, skip_session_starts=False)  # warm-up was done before
    for label, case in cases.items():
        s = stats[label]
        row = rows[label]
        row.update(step_ms=s["step_time_s"] * 1e3, step_min_ms=min(times[label]) * 1e3,
                   step_p10_ms=s["step_time_p10_s"] * 1e3, step_p90_ms=s["step_time_p90_s"] * 1e3,
                   time_ratio=s.get("time_ratio"), time_ratio_min=s.get("time_ratio_min"),
                   time_ratio_max=s.get("time_ratio_max"), within_noise=s.get("time_ratio_within_noise"),
                   round_time_ratios=s.get("round_time_ratios"), tokens_per_s=batch[0].numel() / s["step_time_s"])
        compiled = bool(case.cfg.train.compile)
        if compiled and device.type == "cuda" and uses_cudagraphs(case.cfg.train.compile_mode):
            # the graphs' private pool holds the step's buffers from one replay to the next, so "peak during
            # the step - allocated before it" is not the step's activation memory (it even comes out negative)
            row.update(activation_bytes=None, memory_source=CUDAGRAPH_MEMORY, sdpa=["compiled graph"])
            continue
        mem = case_memory(case, warmup=0, saved_meter=not compiled)
        own = _own_static_bytes(case)
        row.update({k: mem.get(k) for k in ("activation_bytes", "grad_bytes", "saved_peak_bytes", "memory_source")})
        if mem.get("activation_bytes") is not None:
            row["own_static_bytes"] = own
            row["own_peak_bytes"] = own + mem["grad_bytes"] + mem["activation_bytes"]
        if compiled:  # the modes would make dynamo retrace; inductor calls the same SDPA kernels as eager
            row["sdpa"] = ["compiled graph"]
        else:
            try:
                row["sdpa"] = sdpa_backends(case.step)["backends"]
            except Exception as e:  # noqa: BLE001 -- a method's custom op may refuse the dispatch mode
                row["sdpa"] = [f"not observable ({type(e).__name__})"]
    base = rows[baseline]
    for row in rows.values():
        for key in ("activation_bytes", "own_peak_bytes"):
            if row.get(key) is not None and base.get(key):
                row[key.replace("_bytes", "_ratio")] = row[key] / base[key]
            row[key.replace("_bytes", "_mib")] = row[key] / 2**20 if row.get(key) is not None else None
    for case in cases.values():
        _release(case)
    return {"bench": "baselines", "device": str(device), "timer": "cuda_events" if device.type == "cuda" else
            "wall_clock", "rounds": rounds, "steps_per_round": steps, "warmup": warmup,
            "shapes": shapes(next(iter(cfgs.values())), batch), "rows": list(rows.values()) + failed}


ENTRY_COLUMNS = [("method", "entry"), ("step_ms", "step ms (median)"), ("step_min_ms", "min"),
                 ("time_ratio", "time vs exact"), ("ratio_range", "per round"), ("noise", "noise"),
                 ("own_peak_mib", "peak MiB"), ("own_peak_ratio", "peak vs exact"),
                 ("activation_mib", "activation MiB"), ("activation_ratio", "activation vs exact"),
                 ("sdpa_backend", "SDPA"), ("warmup_s", "build+warm-up s")]
