"""Strategies on gloo with 2 CPU processes against one process, in float64: data parallel (DDP, with and
without gradient accumulation, for an autograd method and for one with its own backward) and FSDP2
(fully_shard), including an interrupted-and-resumed FSDP2 run (full-tensor checkpoints) and FSDP2 with
gradient accumulation (no reduce-scatter until the last micro-batch) over checkpointed blocks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chainfree.config import load_config
from chainfree.errors import ConfigError
from chainfree.logging import read_metrics
from chainfree.methods import build_method
from chainfree.methods.base import Launch
from chainfree.train import train
from chainfree.training.strategies import DataParallel, SingleDevice, build_strategy

HELPER = Path(__file__).parent / "_dist_train.py"
sys.path.insert(0, str(Path(__file__).parent))
from _dist_train import CASES, FP64  # noqa: E402


def records(path: Path) -> list[tuple[int, float, float | None, float]]:
    rows = read_metrics(path / "metrics.jsonl")
    return [(r["step"], r["train_loss"], r.get("val_loss"), r["grad_norm"]) for r in rows]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Records of the one-process run of a method (computed once per method)."""
    from conftest import tiny_overrides

    done: dict[str, list] = {}

    def run(method: str) -> list:
        if method not in done:
            out = tmp_path_factory.mktemp(f"single_{method}")
            train(load_config(overrides=tiny_overrides(**FP64), method=method), out, progress=False)
            done[method] = records(out)
        return done[method]

    return run


def launch_two_ranks(root: Path, cases: list[str]) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER),
           str(root), *cases]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


SLOW = list(CASES)  # plain fsdp2 runs in the default suite, through the CLI


@pytest.fixture(scope="module")
def fsdp2_from_the_cli(tmp_path_factory) -> Path:
    """`torchrun --nproc_per_node 2 -m chainfree.cli train --strategy fsdp2` (DDP through the CLI, in float32,
    is tests/test_train.py's)."""
    from conftest import tiny_overrides

    out = tmp_path_factory.mktemp("fsdp2_cli")
    sets = [a for kv in tiny_overrides(**FP64) for a in ("--set", kv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "chainfree.cli", "train", "--out", str(out), "--strategy", "fsdp2", *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    return launch_two_ranks(tmp_path_factory.mktemp("dist"), SLOW)


def assert_same_trajectory(a: list, b: list, rel: float) -> None:
    assert [r[0] for r in a] == [r[0] for r in b]
    for (_, la, va, ga), (_, lb, vb, gb) in zip(a, b, strict=True):
        assert la == pytest.approx(lb, rel=rel, abs=0)
        assert ga == pytest.approx(gb, rel=rel, abs=0)
        assert (va is None) == (vb is None)
        if va is not None:
            assert va == pytest.approx(vb, rel=rel, abs=0)


# float64: two ranks differ from one process only by the order of a few additions (all-reduce /
# reduce-scatter of per-rank gradient sums, micro-batch sums): relative error ~1e-15 per step, amplified
# through 4 AdamW steps by far less than 1e6.
REL = 1e-9


def test_fsdp2_on_two_ranks_follows_the_single_process_trajectory(fsdp2_from_the_cli, single_process):
    assert_same_trajectory(records(fsdp2_from_the_cli), single_process("exact"), REL)
    assert json.loads((fsdp2_from_the_cli / "summary.json").read_text())["strategy"] == "fsdp2"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ddp", "ddp_accum", "fsdp2_resumed", "fsdp2_accum_ckpt"])
def test_two_ranks_follow_the_single_process_trajectory(case, two_ranks, single_process):
    assert_same_trajectory(records(two_ranks / case), single_process("exact"), REL)


@pytest.mark.slow
def test_ddp_all_reduces_the_gradients_of_a_method_with_its_own_backward(two_ranks, single_process):
    assert not build_method("flat_bll").uses_autograd_step
    assert_same_trajectory(records(two_ranks / "ddp_flat_bll"), single_process("flat_bll"), REL)


def test_helper_cases_are_the_ones_tested():
    assert set(CASES) == {"ddp", "ddp_accum", "fsdp2_resumed", "fsdp2_accum_ckpt", "ddp_flat_bll"}


def test_strategy_choice():
    exact = build_method("exact")
    assert isinstance(build_strategy("auto", exact, Launch()), SingleDevice)
    assert isinstance(build_strategy("auto", exact, Launch(0, 2, 0)), DataParallel)
    assert build_strategy("auto", exact, Launch(1, 2, 1)).batch_shard() == (1, 2)
    with pytest.raises(ConfigError, match="train.strategy='single'"):
        build_strategy("single", exact, Launch(0, 2, 0))
    with pytest.raises(ConfigError, match="train.strategy 'nope'"):
        build_strategy("nope", exact, Launch())


def test_fsdp2_refuses_a_method_with_its_own_backward():
    import torch

    lbi = build_method("flat_bll")
    strategy = build_strategy("fsdp2", lbi, Launch(0, 2, 0))
    with pytest.raises(ConfigError, match="fsdp2"):
        strategy.wrap(torch.nn.Linear(2, 2), lbi, torch.device("cpu"))


def test_a_method_owned_strategy_is_not_silently_replaced():
    """HBLL under torchrun splits its tree across the ranks, each rank holding the whole batch; asking for
    'ddp' instead would shard the batch under a step that does not expect it, so it is refused."""
    hbll = build_method("hbll")
    with pytest.raises(ConfigError, match="method.distributed=data"):
        build_strategy("ddp", hbll, Launch(0, 2, 0))
    data_parallel = build_method("hbll", {"distributed": "data"})
    assert isinstance(build_strategy("ddp", data_parallel, Launch(0, 2, 0)), DataParallel)
    lbi_region = build_method("lbi", {"distributed": "region"})
    with pytest.raises(ConfigError, match="lbi_region"):
        build_strategy("ddp", lbi_region, Launch(0, 2, 0))
