"""Training: the one Trainer, its state and callbacks, and the distribution strategies.

    from chainfree.training import Trainer, train
"""

from chainfree.training.callbacks import (
    Callback,
    CheckpointCallback,
    EvalCallback,
    MetricsCallback,
    ProgressCallback,
)
from chainfree.training.state import TrainState
from chainfree.training.strategies import STRATEGIES, Strategy, build_strategy, launch_from_env, register_strategy
from chainfree.training.trainer import (
    Trainer,
    autocast_context,
    build_optimizer,
    build_run,
    evaluate,
    lr_at,
    seeded_model,
    train,
)

__all__ = ["STRATEGIES", "Callback", "CheckpointCallback", "EvalCallback", "MetricsCallback", "ProgressCallback",
           "Strategy", "TrainState", "Trainer", "autocast_context", "build_optimizer", "build_run",
           "build_strategy", "evaluate", "launch_from_env", "lr_at", "register_strategy", "seeded_model", "train"]
