"""Run logging: one JSON object per line (metrics.jsonl), a rich progress bar, and the loss plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)


class MetricsLog:
    """Append-only JSONL. On resume, lines past the checkpoint's step are dropped, so the file always
    reads as one uninterrupted run. A fresh start over an existing log never deletes it: the old file is
    kept beside the new one as metrics.jsonl.1 (.2, ... if that exists), with a warning."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path = Path(path)
        if resume_step is not None and path.exists():
            kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(path)
        elif resume_step is None and path.exists():
            if path.stat().st_size == 0:
                path.unlink()
                return
            n = 1
            while path.with_name(f"{path.name}.{n}").exists():
                n += 1
            kept_as = path.with_name(f"{path.name}.{n}")
            path.rename(kept_as)
            console.print(f"warning: {path} belonged to an earlier run with no checkpoint to resume; "
                          f"kept it as {kept_as.name} and started a new log", markup=False, highlight=False)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def progress_bar(disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
    )


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (headless machines, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write as PNG and free a figure: the one way every chainfree plot is saved."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_losses(runs: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """Train (thin) and val (markers) loss vs step, one colour per run."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and math.isfinite(r["val_loss"])]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.35, lw=1, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", lw=2, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
