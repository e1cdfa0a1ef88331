"""Trainer callbacks: evaluation, checkpoints, the metrics log and the progress bar.

A callback sees the Trainer, the TrainState and the step's record (a dict that becomes one line of
metrics.jsonl). Hooks run in list order, so an EvalCallback placed before the MetricsCallback adds
`val_loss` to the record that gets logged. Every hook is optional.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from chainfree.checkpoint import save_checkpoint
from chainfree.logging import MetricsLog, console, progress_bar

if TYPE_CHECKING:
    from chainfree.training.state import TrainState
    from chainfree.training.trainer import Trainer


class Callback(Protocol):
    """Hooks: on_fit_begin(trainer, state), on_step_end(trainer, state, record), on_fit_end(trainer,
    state), on_interrupt(trainer, state) (Ctrl-C), on_error(trainer, state, error).
    Subclass to inherit no-op defaults."""

    def on_fit_begin(self, trainer: Trainer, state: TrainState) -> None:
        return None

    def on_step_end(self, trainer: Trainer, state: TrainState, record: dict[str, Any]) -> None:
        return None

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None:
        return None

    def on_interrupt(self, trainer: Trainer, state: TrainState) -> None:
        return None

    def on_error(self, trainer: Trainer, state: TrainState, error: BaseException) -> None:
        return None


class EvalCallback(Callback):
    """Every `every` steps and at `last`: record['val_loss'] = evaluate(state); kept in state.last_val."""

    def __init__(self, evaluate: Callable[[TrainState], float], every: int, last: int) -> None:
        self.evaluate, self.every, self.last = evaluate, every, last

    def on_step_end(self, trainer: Trainer, state: TrainState, record: dict[str, Any]) -> None:
        if state.step % self.every == 0 or state.step == self.last:
            state.last_val = self.evaluate(state)
            record["val_loss"] = state.last_val


class CheckpointCallback(Callback):
    """Atomic checkpoint every `every` steps, at the end of the fit and when interrupted (Ctrl-C).

    Every rank takes part (a sharded strategy gathers full tensors collectively); the main rank writes.
    """

    def __init__(self, root: Path, config: dict[str, Any], every: int) -> None:
        self.root, self.config, self.every = Path(root), config, every
        self.saved_step = -1

    def save(self, trainer: Trainer, state: TrainState) -> None:
        model, optimizer = trainer.strategy.checkpoint_views(state.model, state.optimizer)
        if trainer.launch.is_main:
            save_checkpoint(self.root, state.step, model, optimizer, self.config)
        self.saved_step = state.step

    def on_step_end(self, trainer: Trainer, state: TrainState, record: dict[str, Any]) -> None:
        if state.step % self.every == 0 or state.step == trainer.end:
            self.save(trainer, state)

    def on_interrupt(self, trainer: Trainer, state: TrainState) -> None:
        if state.step > trainer.start and state.step != self.saved_step:
            self.save(trainer, state)
            if trainer.launch.is_main:
                console.print(f"interrupted: checkpoint saved at step {state.step}; rerun the same command to resume")


class MetricsCallback(Callback):
    """One JSON line per step in `path` (main rank only); a resumed run truncates lines past its step."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path, self.resume_step = Path(path), resume_step
        self.log: MetricsLog | None = None

    def on_fit_begin(self, trainer: Trainer, state: TrainState) -> None:
        if trainer.launch.is_main:
            self.log = MetricsLog(self.path, resume_step=self.resume_step)

    def on_step_end(self, trainer: Trainer, state: TrainState, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(record)


class ProgressCallback(Callback):
    """A rich progress bar with loss, val loss and tokens/s (main rank, when enabled)."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.bar: Any = None
        self.task: Any = None

    def on_fit_begin(self, trainer: Trainer, state: TrainState) -> None:
        self.bar = progress_bar(disable=not (self.enabled and trainer.launch.is_main))
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total, completed=state.step, loss="-", val="-",
                                      tps="-")

    def on_step_end(self, trainer: Trainer, state: TrainState, record: dict[str, Any]) -> None:
        val = state.last_val
        self.bar.update(self.task, completed=state.step, loss=f"{record['train_loss']:.3f}",
                        val=f"{val:.3f}" if math.isfinite(val) else "-", tps=f"{record['tokens_per_s']:,.0f}")

    def _stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None:
        self._stop()

    def on_interrupt(self, trainer: Trainer, state: TrainState) -> None:
        self._stop()

    def on_error(self, trainer: Trainer, state: TrainState, error: BaseException) -> None:
        self._stop()
