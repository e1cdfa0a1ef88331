"""Markdown tables and environment records shared by `chainfree compare` and every `chainfree bench`.

Every result records where it was measured (device, torch/triton versions, git commit), because a ratio
without its machine is not a result.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """columns: (key, header) pairs."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_result(out_dir: Path, name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write NAME.json (payload + environment) and NAME.md side by side."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), **payload}
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    env = payload["environment"]
    footer = (f"\n\nDevice: {env['cuda_device'] or 'CPU (' + str(env['cpu_threads']) + ' threads)'}; "
              f"torch {env['torch']}; triton {env['triton']}; commit {env['git_commit']}.\n")
    md_path.write_text(markdown + footer)
    return json_path, md_path


def compare_rows(summaries: dict[str, dict[str, Any]], baseline: str = "exact") -> list[dict[str, Any]]:
    """One row per method with differences/ratios against the baseline run of the same comparison."""
    base = summaries.get(baseline)
    rows = []
    for name, s in summaries.items():
        row = {"method": name, "val_loss": s["final_val_loss"], "train_loss": s["final_train_loss"],
               "step_time_s": s["step_time_s"], "peak_memory_gib": (s["peak_memory_bytes"] or 0) / 2**30
               if s.get("peak_memory_bytes") else None}
        if base is not None:
            row["delta_val"] = s["final_val_loss"] - base["final_val_loss"]
            row["time_ratio"] = s["step_time_s"] / base["step_time_s"]
            if s.get("peak_memory_bytes") and base.get("peak_memory_bytes"):
                row["memory_ratio"] = s["peak_memory_bytes"] / base["peak_memory_bytes"]
        rows.append(row)
    return rows


COMPARE_COLUMNS = [("method", "method"), ("val_loss", "final val loss"), ("delta_val", "Δ val vs exact"),
                   ("train_loss", "final train loss"), ("step_time_s", "step time (s)"),
                   ("time_ratio", "step time ratio"), ("peak_memory_gib", "peak memory (GiB)"),
                   ("memory_ratio", "peak memory ratio")]
