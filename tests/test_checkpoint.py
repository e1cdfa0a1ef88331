"""Checkpoints lose nothing and hand out nothing unverified: a lost `latest` is recovered from the newest step
folder that verifies (or refused), a fresh start never deletes an old metrics log, and every reader (resume,
generation) refuses corrupt pointers, state files and weights with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chainfree.checkpoint import MANIFEST, has_checkpoint, load_model_state, verified_checkpoint
from chainfree.config import load_config
from chainfree.errors import CheckpointError
from chainfree.logging import read_metrics
from chainfree.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def losses(out: Path) -> list[tuple[int, float, float | None]]:
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(out / "metrics.jsonl")]


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def stopped_run(tiny, tmp_path):
    """A tiny run stopped after step 3 (checkpoint at step 3, metrics for steps 1..3)."""
    out = tmp_path / "run"
    train(load_config(overrides=tiny()), out, stop_at=3, progress=False)
    return out


def test_deleted_latest_resumes_from_the_step_folder_and_keeps_history(tiny, tmp_path, stopped_run):
    train(load_config(overrides=tiny()), tmp_path / "full", progress=False)
    (stopped_run / "checkpoint" / "latest").unlink()
    assert has_checkpoint(stopped_run / "checkpoint")
    assert verified_checkpoint(stopped_run / "checkpoint").recovered
    train(load_config(overrides=tiny()), stopped_run, progress=False)
    # resumed at step 3, not restarted: the log reads as the uninterrupted run, steps 1..3 kept
    assert losses(stopped_run) == losses(tmp_path / "full")
    assert (stopped_run / "checkpoint" / "latest").is_file()
    assert not verified_checkpoint(stopped_run / "checkpoint").recovered


def test_lost_latest_with_no_verifiable_folder_is_refused(tiny, stopped_run):
    ckpt = stopped_run / "checkpoint"
    (ckpt / "latest").unlink()
    folder = next(ckpt.glob("step_*"))
    (folder / MANIFEST).unlink()  # as written by a chainfree without per-folder checksums
    before = (stopped_run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="latest is missing and no step folder verifies") as e:
        train(load_config(overrides=tiny()), stopped_run, progress=False)
    assert "delete" in one_line(e)
    assert (stopped_run / "metrics.jsonl").read_text() == before  # refused before touching the history


def test_newest_corrupt_folder_is_skipped_for_an_older_verified_one(stopped_run):
    ckpt = stopped_run / "checkpoint"
    (ckpt / "latest").unlink()
    good = next(ckpt.glob("step_*"))
    newer = ckpt / "step_9999999"
    shutil.copytree(good, newer)
    blob = bytearray((newer / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (newer / "model.safetensors").write_bytes(bytes(blob))
    got = verified_checkpoint(ckpt)
    assert got.folder == good and got.step == 3 and got.recovered


def test_fresh_start_keeps_an_old_metrics_log(tiny, tmp_path, stopped_run):
    shutil.rmtree(stopped_run / "checkpoint")  # nothing to resume from: a new run starts at step 0
    old = (stopped_run / "metrics.jsonl").read_text()
    train(load_config(overrides=tiny()), stopped_run, progress=False)
    assert (stopped_run / "metrics.jsonl.1").read_text() == old
    assert [s for s, *_ in losses(stopped_run)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("target", ["latest", "state.json"])
def test_unreadable_pointer_or_state_is_one_line(stopped_run, target):
    ckpt = stopped_run / "checkpoint"
    path = ckpt / "latest" if target == "latest" else next(ckpt.glob("step_*")) / "state.json"
    path.write_text("{ not json")
    if target == "state.json":  # keep the checksums consistent: only the JSON itself is broken
        pointer = json.loads((ckpt / "latest").read_text())
        from chainfree.checkpoint import _sha256

        pointer["sha256"]["state.json"] = _sha256(path)
        (ckpt / "latest").write_text(json.dumps(pointer))
    with pytest.raises(CheckpointError, match="unreadable") as e:
        load_model_state(ckpt)
    assert str(path) in one_line(e)


def test_byte_flipped_weights_are_refused_by_the_model_reader(stopped_run):
    ckpt = stopped_run / "checkpoint"
    weights = next(ckpt.glob("step_*")) / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_model_state(ckpt)
    one_line(e)


def test_bench_reads_checkpoints_through_the_verified_reader(stopped_run):
    from chainfree.bench.cli import checkpoint_weights

    assert checkpoint_weights(stopped_run)  # intact: the weights
    weights = next((stopped_run / "checkpoint").glob("step_*")) / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0x10
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint_weights(stopped_run)
