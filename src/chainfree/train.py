"""`chainfree.train.train(cfg, out_dir)` and the loop's helpers, kept under their historical import path.

The loop itself is chainfree.training (Trainer, TrainState, callbacks, strategies); this module only
re-exports the entry point and helpers that callers import from here.
"""

from chainfree.training.trainer import (
    autocast_context,
    build_optimizer,
    build_run,
    evaluate,
    lr_at,
    seeded_model,
    summarize,
    train,
)

__all__ = ["autocast_context", "build_optimizer", "build_run", "evaluate", "lr_at", "seeded_model", "summarize",
           "train"]
