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
