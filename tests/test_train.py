import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chainfree.config import load_config
from chainfree.errors import CheckpointError
from chainfree.logging import read_metrics
from chainfree.methods import METHODS
from chainfree.train import lr_at, train


def losses(out: Path) -> list[tuple[int, float, float | None]]:
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(out / "metrics.jsonl")]


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny, tmp_path):
    cfg = load_config(overrides=tiny())
    train(cfg, tmp_path / "full", progress=False)
    train(load_config(overrides=tiny()), tmp_path / "split", stop_at=3, progress=False)
    assert [s for s, *_ in losses(tmp_path / "split")] == [1, 2, 3]
    train(load_config(overrides=tiny()), tmp_path / "split", progress=False)  # rerun = resume
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    for name in ("config.toml", "metrics.jsonl", "loss.png", "checkpoint/latest"):
        assert (tmp_path / "full" / name).exists()


def test_training_reduces_loss(tiny, tmp_path):
    cfg = load_config(overrides=tiny(**{"train.steps": 30, "train.eval_every": 30, "train.lr": 1e-2}))
    summary = train(cfg, tmp_path, progress=False)
    first = read_metrics(tmp_path / "metrics.jsonl")[0]["train_loss"]
    assert summary["final_val_loss"] < first - 1.0


def test_corrupt_checkpoint_is_refused(tiny, tmp_path):
    train(load_config(overrides=tiny()), tmp_path, stop_at=3, progress=False)
    pointer = json.loads((tmp_path / "checkpoint" / "latest").read_text())
    weights = tmp_path / "checkpoint" / pointer["folder"] / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        train(load_config(overrides=tiny()), tmp_path, progress=False)


def test_mismatched_checkpoint_is_refused(tiny, tmp_path):
    train(load_config(overrides=tiny()), tmp_path, stop_at=3, progress=False)
    with pytest.raises(CheckpointError, match="model.d_model"):
        train(load_config(overrides=tiny(**{"model.d_model": 64})), tmp_path, progress=False)


def test_schedule_warmup_then_cosine():
    cfg = load_config(overrides=["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1"])
    assert lr_at(0, cfg.train) == pytest.approx(0.1)
    assert lr_at(9, cfg.train) == pytest.approx(1.0)
    assert lr_at(100, cfg.train) == pytest.approx(0.1)
    assert lr_at(55, cfg.train) == pytest.approx(0.55)


def test_ddp_on_gloo_matches_single_process(tiny, tmp_path):
    """torchrun with 2 CPU processes (gloo) sees the same global batches and averages gradients, so it
    follows the single-process trajectory up to float reassociation."""
    args = [a for kv in tiny() for a in ("--set", kv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "chainfree.cli", "train", "--out", str(tmp_path / "ddp"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    train(load_config(overrides=tiny()), tmp_path / "single", progress=False)
    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert [s for s, *_ in ddp] == [s for s, *_ in single]
    for (_, a, va), (_, b, vb) in zip(ddp, single):
        assert a == pytest.approx(b, rel=1e-4)
        if va is not None:
            assert va == pytest.approx(vb, rel=1e-4)


# methods over time train the character RNN (model.kind='char_rnn'), the others the tiny GPT
RECURRENT = {name: {"model.kind": '"char_rnn"', "method.chunk": 8, "method.window": 4} if name == "hbll_time"
             else {"model.kind": '"char_rnn"', "method.chunk": 8} for name in ("hbll_time", "tbptt")}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_trains_in_the_one_loop(name, tiny, tmp_path):
    """Each method plugs into chainfree.train (prepare + step) and produces finite, logged losses."""
    extra = RECURRENT.get(name, {})
    cfg = load_config(overrides=tiny(**{"train.steps": 3, "train.eval_every": 3, "train.ckpt_every": 3}, **extra),
                      method=name)
    summary = train(cfg, tmp_path, progress=False)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    assert math.isfinite(summary["final_val_loss"])


def _summary(tmp_path: Path, step_times: list[float], **train: object) -> dict:
    from chainfree.methods import build_method
    from chainfree.training.trainer import summarize

    cfg = load_config(overrides=[f"train.{k}={str(v).lower()}" for k, v in train.items()])
    model = torch.nn.Linear(2, 2)
    return summarize(tmp_path, cfg, build_method("exact"), model, step_times, torch.device("cpu"), 1.0)


def test_summary_step_time_leaves_out_the_warmup_step(tmp_path):
    """The first step of a session (lazy init, compilation) is not the step time: a 2-step run whose first
    step took 10 s and second 1 s reports 1 s (it reported 10 s: the median of two is the larger)."""
    s = _summary(tmp_path, [10.0, 1.0])
    assert s["step_time_s"] == 1.0 and s["timed_steps"] == 1 and s["warmup_steps_excluded"] == 1
    cfg = load_config()
    assert s["tokens_per_s"] == cfg.train.batch_size * cfg.model.seq_len / 1.0
    assert _summary(tmp_path, [10.0, 1.0, 3.0, 2.0])["step_time_s"] == 2.0
    compiled = _summary(tmp_path, [30.0, 9.0, 1.0, 2.0, 3.0], compile=True)  # compile: two warm-up steps
    assert compiled["warmup_steps_excluded"] == 2 and compiled["step_time_s"] == 2.0


def test_summary_of_a_one_step_run_has_no_step_time(tiny, tmp_path):
    """A session of warm-up steps only has no honest step time: NaN in the summary, null in summary.json."""
    from typer.testing import CliRunner

    from chainfree.cli import app

    s = _summary(tmp_path, [10.0])
    assert math.isnan(s["step_time_s"]) and math.isnan(s["tokens_per_s"]) and s["timed_steps"] == 0
    sets = tiny(**{"train.steps": 1, "train.eval_every": 1})
    args = ["train", "--out", str(tmp_path / "run")] + [a for kv in sets for a in ("--set", kv)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    def refuse(token: str) -> None:
        raise AssertionError(f"summary.json holds {token}, which is not JSON")

    written = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=refuse)
    assert written["step_time_s"] is None and written["tokens_per_s"] is None and written["timed_steps"] == 0


@pytest.mark.parametrize("name", ["flat_bll", "hbll", "lbi"])
def test_block_methods_refuse_a_model_without_blocks_in_one_line(name, tmp_path):
    """A method that cuts residual blocks, on the character GRU: one ConfigError naming what is missing (flat_bll
    raised AttributeError: 'CharGRU' object has no attribute 'blocks')."""
    from chainfree.errors import ConfigError

    overrides = ['model.kind="char_rnn"', 'data.tokenizer="bytes"', "model.seq_len=32", "model.d_model=16",
                 "data.max_chars=20000", "train.steps=1", "train.batch_size=2", 'train.device="cpu"']
    with pytest.raises(ConfigError, match=r"needs embed -> blocks -> norm -> head; CharGRU has no \.blocks") as e:
        train(load_config(overrides=overrides, method=name), tmp_path, progress=False)
    assert "\n" not in str(e.value)


def test_hbll_on_a_hybrid_names_the_block_size_that_works(tmp_path):
    """HBLL stacks its leaves, so on a hybrid (attention every 2nd block) one-block leaves differ: the error names
    method.block_size and the value that works (it said 'stacked modules must have one structure; Sequential
    differs'), and that value trains."""
    from chainfree.errors import ConfigError

    sets = ["train.steps=1", "train.batch_size=2", "train.eval_batches=1", 'train.device="cpu"',
            "data.max_chars=20000"]
    with pytest.raises(ConfigError, match=r"--set method\.block_size=2\)$"):
        train(load_config("hybrid-tiny", sets, method="hbll"), tmp_path / "a", progress=False)
    summary = train(load_config("hybrid-tiny", [*sets, "method.block_size=2"], method="hbll"), tmp_path / "b",
                    progress=False)
    assert math.isfinite(summary["final_val_loss"])
