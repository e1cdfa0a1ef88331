"""Helper run under torchrun by tests/test_strategies.py: several training runs in one launch.

    torchrun --nproc_per_node 2 tests/_dist_train.py OUT_ROOT
writes OUT_ROOT/<case>/metrics.jsonl for every case below (rank 0 writes, every rank trains).
"""

import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_overrides  # noqa: E402

from chainfree.config import load_config  # noqa: E402
from chainfree.train import train  # noqa: E402

CASES = {
    # name: (overrides, method, stop_at of a first, interrupted run or None)
    "ddp": ({"train.strategy": '"ddp"'}, "exact", None),
    "ddp_accum": ({"train.strategy": '"ddp"', "train.grad_accum": 2}, "exact", None),
    "fsdp2_resumed": ({"train.strategy": '"fsdp2"'}, "exact", 2),
    "fsdp2_accum_ckpt": ({"train.strategy": '"fsdp2"', "train.grad_accum": 2, "train.activation_checkpoint": '"full"'},
                         "exact", None),
    "ddp_flat_bll": ({"train.strategy": '"ddp"'}, "flat_bll", None),
}


def case_config(name: str):
    extra, method, _ = CASES[name]
    return load_config(overrides=tiny_overrides(**FP64, **extra), method=method)


FP64 = {"train.dtype": '"fp64"', "train.steps": 4, "train.eval_every": 2, "train.eval_batches": 1,
        "train.ckpt_every": 2}


def main() -> None:
    root = Path(sys.argv[1])
    names = sys.argv[2:] or list(CASES)
    for name in names:
        stop = CASES[name][2]
        if stop is not None:
            train(case_config(name), root / name, stop_at=stop, progress=False)
        train(case_config(name), root / name, progress=False)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
