"""Speed / memory / fidelity benches on CPU through the CLI: they run, write JSON + markdown (+ PNG) with the
environment, keep an exact baseline in the same run, and count saved-for-backward bytes correctly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from chainfree.bench.memory import SavedTensorMeter
from chainfree.cli import app

TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
        "--set", "model.seq_len=32", "--set", "train.batch_size=2", "--set", "data.tokenizer=bytes",
        "--set", "data.max_chars=200000"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_saved_tensor_meter_counts_unique_storages_and_frees():
    a = torch.randn(1000, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(8, 1000))
    with SavedTensorMeter([w]) as meter:
        b = a.exp()  # saves its output b (4000 bytes)
        loss = (b * b).sum() + F.linear(b, w).sum()  # b saved again (same storage), w is a parameter
    assert meter.peak == 4000
    loss.backward()
    del loss, b
    assert meter.current == 0 and meter.live == {}


def test_speed_step_and_seq_sweep_cpu(tmp_path):
    invoke("bench", "speed", "--model", "gpt", "--method", "basis", "--device", "cpu", *TINY, "--set",
           "method.rank=4", "--warmup", "1", "--repeats", "2", "--seq-lens", "16,32", "--out", str(tmp_path))
    payload = json.loads((tmp_path / "speed_step_gpt_basis_cpu.json").read_text())
    assert payload["environment"]["torch"] == torch.__version__ and "git_commit" in payload["environment"]
    assert payload["timer"] == "wall_clock" and payload["cpu_note"]
    rows = payload["rows"]
    assert [(r["seq_len"], r["method"]) for r in rows] == [(16, "exact"), (16, "basis"), (32, "exact"),
                                                           (32, "basis")]
    assert all(r["step_ms"] > 0 for r in rows)
    assert rows[0]["step_ratio"] == 1.0 and rows[1]["step_ratio"] == rows[1]["step_ms"] / rows[0]["step_ms"]
    md = (tmp_path / "speed_step_gpt_basis_cpu.md").read_text()
    assert "CPU wall time" in md and "| basis |" in md
    assert (tmp_path / "speed_step_gpt_basis_cpu.png").stat().st_size > 0


def test_speed_op_and_memory_cpu(tmp_path):
    invoke("bench", "speed", "--model", "gpt", "--method", "sus", "--device", "cpu", *TINY, "--set", "method.c=4",
           "--op", "attn", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "speed_attn_gpt_sus_cpu.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["exact", "sus"] and all(r["fwd_bwd_ms"] > 0 for r in rows)
    invoke("bench", "memory", "--model", "gpt", "--method", "basis", "--device", "cpu", *TINY,
           "--set", "method.rank=2", "--out", str(tmp_path))
    payload = json.loads((tmp_path / "memory_gpt_basis_cpu.json").read_text())
    exact, basis = payload["rows"]
    assert payload["cpu_note"] and exact["memory_source"] == "torch MemTracker"  # no allocator peak on CPU
    assert exact["saved_peak_bytes"] > 0 and basis["saved_peak_bytes"] > 0
    # peak = static + gradients + activations, and the saved-for-backward bytes are part of the activations
    assert exact["peak_bytes"] == exact["static_bytes"] + exact["grad_bytes"] + exact["activation_bytes"]
    assert exact["activation_bytes"] >= exact["saved_peak_bytes"] > 0
    assert exact["weight_bytes"] == basis["weight_bytes"] and exact["optimizer_bytes"] == 2 * exact["grad_bytes"]
    assert "saved-for-backward" in (tmp_path / "memory_gpt_basis_cpu.md").read_text()


def test_fidelity_at_trained_checkpoint(tmp_path):
    run = tmp_path / "run"
    invoke("train", "--model", "gpt", "--method", "exact", "--device", "cpu", *TINY, "--steps", "2",
           "--set", "train.eval_every=2", "--set", "train.eval_batches=1", "--out", str(run))
    out = tmp_path / "res"
    invoke("bench", "fidelity", "--method", "exact", "--checkpoint", str(run), "--k", "2", "--batches", "2",
           "--out", str(out))
    payload = json.loads((out / "fidelity_gpt_exact_cpu.json").read_text())
    assert "checkpoint" in payload["model_state"]
    assert payload["overall"]["bias"] == 0.0 and payload["overall"]["variance"] == 0.0
    assert (out / "fidelity_gpt_exact_cpu.png").stat().st_size > 0
    result = CliRunner().invoke(app, ["bench", "fidelity", "--method", "exact", "--checkpoint", str(tmp_path),
                                      "--out", str(out)])
    assert result.exit_code != 0 and "not a run folder" in str(result.exception)


def test_attention_op_needs_sus_and_bad_op(tmp_path):
    result = CliRunner().invoke(app, ["bench", "speed", "--method", "basis", "--op", "attention"])
    assert result.exit_code != 0 and "--method sus" in str(result.exception)
    result = CliRunner().invoke(app, ["bench", "speed", "--method", "basis", "--op", "nope", "--device", "cpu",
                                      *TINY, "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--op must be one of" in str(result.exception)


def test_memory_cpu_sees_checkpointing(tmp_path):
    """exact+ckpt's activation memory on CPU (MemTracker) is below exact's; the bench applies train options."""
    rows = {}
    for ac in ("none", "full"):
        invoke("bench", "memory", "--model", "gpt", "--method", "exact", "--device", "cpu", *TINY,
               "--set", f'train.activation_checkpoint="{ac}"', "--out", str(tmp_path), "--name", ac)
        rows[ac] = json.loads((tmp_path / f"{ac}.json").read_text())["rows"][0]
    assert rows["full"]["activation_bytes"] < rows["none"]["activation_bytes"]
    assert rows["full"]["weight_bytes"] == rows["none"]["weight_bytes"]


def test_bench_baselines_interleaved_with_sweep(tmp_path):
    invoke("bench", "baselines", "--device", "cpu", "--entries", "exact,exact+ckpt", *TINY, "--rounds", "2",
           "--steps", "2", "--warmup", "1", "--sweep", "model.n_layers=1,2", "--out", str(tmp_path), "--name", "bl")
    payload = json.loads((tmp_path / "bl.json").read_text())
    rows = payload["rows"]
    assert [(r["model.n_layers"], r["method"]) for r in rows] == [("1", "exact"), ("1", "exact+ckpt"),
                                                                  ("2", "exact"), ("2", "exact+ckpt")]
    for r in rows:
        assert r["step_ms"] > 0 and len(r["round_time_ratios"]) == 2 and r["sdpa"] == ["cpu_flash"]
    assert rows[1]["options"]["activation_checkpoint"] == "full"
    assert rows[3]["activation_bytes"] < rows[2]["activation_bytes"]  # checkpointing seen in the memory figures
    assert "| exact+ckpt |" in (tmp_path / "bl.md").read_text()
