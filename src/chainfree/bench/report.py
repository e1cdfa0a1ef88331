"""Markdown tables, PNG plots and environment records shared by `chainfree compare` and every `chainfree bench`.

Every result records where it was measured (device, torch/triton versions, git commit), because a ratio
without its machine is not a result. Plots: loss curves (compare), a ratio against sequence length
(speed/memory sweeps), and variance per parameter group (fidelity).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from chainfree.logging import plot_losses, pyplot, save_figure


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
    env["git_commit"], env["git_dirty"] = _git_state()
    return env


def _git_state() -> tuple[str | None, bool | None]:
    """Short commit of the source tree and whether tracked files differ from it; CHAINFREE_GIT_COMMIT stands in
    where the code runs from a copy without .git (the GPU machines)."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                                timeout=5).stdout.strip() or None
        dirty = None
        if commit:
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(here.parent)],
                                    capture_output=True, text=True, cwd=here, timeout=10).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    if commit is None and os.environ.get("CHAINFREE_GIT_COMMIT"):
        commit = os.environ["CHAINFREE_GIT_COMMIT"]
    return commit, dirty


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
    dirty = " (+ uncommitted changes)" if env.get("git_dirty") else ""
    footer = (f"\n\nDevice: {env['cuda_device'] or 'CPU (' + str(env['cpu_threads']) + ' threads)'}; "
              f"torch {env['torch']}; triton {env['triton']}; commit {env['git_commit']}{dirty}.\n")
    if payload.get("command"):
        footer += f"Command: `{payload['command']}`\n"
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
                   ("step_time_s", "step time (s)"), ("time_ratio", "step time ratio"),
                   ("peak_memory_gib", "peak memory (GiB)"), ("memory_ratio", "peak memory ratio")]


def write_compare_report(out: Path, summaries: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]],
                         title: str, notes: str = "", command: str | None = None) -> str:
    """`chainfree compare`'s output: report.json/.md (one table vs exact), summary.json and loss.png."""
    rows = compare_rows(summaries)
    cpu = all(s.get("peak_memory_bytes") is None for s in summaries.values())
    md = f"# {title}\n\n" + markdown_table(rows, COMPARE_COLUMNS)
    if cpu:
        md += "\n\nStep times are CPU wall time; peak memory is measured on CUDA only (n/a here)."
    if notes:
        md += "\n\n" + notes
    md += "\n\n![loss curves](loss.png)"
    write_result(out, "report", {"summaries": summaries, "rows": rows, "command": command}, md)
    (out / "summary.json").write_text(json.dumps({"summaries": summaries, "rows": rows}, indent=1, default=str))

    plot_losses(runs, out / "loss.png", title=title)
    return md


def plot_ratio_vs_seq_len(rows: list[dict[str, Any]], keys: list[tuple[str, str]], path: Path, title: str) -> None:
    """One line per (method, key) of `key` (a ratio vs exact) against `seq_len`; 1 = as fast/small as exact."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "exact"]
    for i, method in enumerate(methods):
        for j, (key, label) in enumerate(keys):
            pts = sorted((r["seq_len"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="os^v"[j % 4], color=f"C{i}", ls=("-", "--", ":")[j % 3],
                        label=f"{method}: {label}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("ratio vs exact (same process)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_variance_by_group(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Relative variance and 1 − cosine per parameter group (log scale, jackknife error bars)."""
    plt = pyplot()
    rows = [r for r in rows if r.get("variance") is not None and math.isfinite(r.get("variance", float("nan")))]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.5))
    if not rows:
        ax.text(0.5, 0.5, "no finite variance (k < 2 or zero exact gradient)", ha="center", transform=ax.transAxes)
    else:
        xs = range(len(rows))
        floor = 1e-12  # a log axis cannot show the exact zeros of a deterministic method
        var = [max(r["variance"], floor) for r in rows]
        err = [r.get("variance_se") if r.get("variance_se") is not None and math.isfinite(r["variance_se"]) else 0
               for r in rows]
        inc = [r.get("variance_increase_noise") for r in rows]
        inc = [max(v, floor) if v is not None and math.isfinite(v) else floor for v in inc]
        ax.bar([x - 0.27 for x in xs], var, width=0.27, yerr=err, label="relative variance E‖ĝ−Eĝ‖²/‖g‖²")
        ax.bar(list(xs), inc, width=0.27, label="variance increase over minibatch noise (noise part)")
        ax.bar([x + 0.27 for x in xs], [max(1 - r["cosine"], floor) for r in rows], width=0.27,
               label="1 − cosine to exact")
        ax.set_ylabel(f"(values below {floor:g} drawn at {floor:g})")
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["group"] for r in rows], rotation=60, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)
