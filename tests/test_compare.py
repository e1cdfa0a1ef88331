"""`chainfree compare`: entry spelling, interleaved timing statistics, the dominated flag, and one tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from chainfree.bench.compare import (
    entry_configs,
    parse_entries,
    parse_entry,
    round_bounds,
    run_compare,
    timing_stats,
)
from chainfree.bench.report import compare_rows, dominated_by, write_compare_report
from chainfree.errors import ConfigError


def test_entries_parse_into_train_overrides() -> None:
    e = parse_entry("exact+ckpt")
    assert (e.method, e.overrides) == ("exact", ['train.activation_checkpoint="full"'])
    e = parse_entry("basis+sac+compile")
    assert e.method == "basis" and 'train.activation_checkpoint="selective"' in e.overrides
    assert "train.compile=true" in e.overrides
    assert parse_entry("exact+cudagraphs").overrides[-1] == 'train.compile_mode="reduce-overhead"'
    assert parse_entry("exact+accum4").overrides == ["train.grad_accum=4"]
    with pytest.raises(ConfigError, match=r"unknown suffix \+fast"):
        parse_entry("exact+fast")
    with pytest.raises(ConfigError, match="conflicts"):
        parse_entry("exact+ckpt+sac")
    labels = [e.label for e in parse_entries("basis,exact+ckpt")]
    assert labels == ["exact", "basis", "exact+ckpt"]  # plain exact always there, first
    with pytest.raises(ConfigError, match="twice"):
        parse_entries("exact,basis,basis")


def test_entry_configs_apply_suffixes_and_route_method_settings(tiny) -> None:
    cfgs = entry_configs(parse_entries("exact,exact+sac+accum2,lbi"), None, tiny() + ["method.rank=4"], None, None,
                         None)
    assert cfgs["exact+sac+accum2"].train.activation_checkpoint == "selective"
    assert cfgs["exact+sac+accum2"].train.grad_accum == 2 and cfgs["exact"].train.grad_accum == 1
    assert cfgs["lbi"].method_params["rank"] == 4 and "rank" not in cfgs["exact"].method_params


def test_round_bounds_cover_every_step() -> None:
    assert round_bounds(10, 4) == [3, 5, 8, 10]
    assert round_bounds(3, 8) == [1, 2, 3]
    with pytest.raises(ConfigError, match="--rounds"):
        round_bounds(10, 0)


def test_timing_stats_ratios_spread_and_noise_flag() -> None:
    bounds = [4, 8, 12]
    # exact: 1.0 s per step; 'slow' is 2x in every round; 'noisy' is faster in one round and slower in another
    exact = [9.0, 1, 1, 1, 5.0, 1, 1, 1, 5.0, 1, 1, 1]  # session starts (0, 4, 8) carry warm-up
    slow = [t * 2 for t in exact]
    noisy = [9.0, 0.8, 0.8, 0.8, 5.0, 1.3, 1.3, 1.3, 5.0, 1.0, 1.0, 1.0]
    stats = timing_stats({"exact": exact, "slow": slow, "noisy": noisy}, bounds)
    assert stats["exact"]["step_time_s"] == 1.0 and stats["exact"]["time_ratio"] == 1.0
    assert stats["slow"]["time_ratio"] == pytest.approx(2.0)
    assert stats["slow"]["time_ratio_within_noise"] is False
    assert stats["noisy"]["round_time_ratios"] == pytest.approx([0.8, 1.3, 1.0])
    assert stats["noisy"]["time_ratio_within_noise"] is True
    # wall-clock: the first step counts as measured, later session starts as the median step
    assert stats["exact"]["wall_clock_s"][-1] == pytest.approx(9.0 + 11 * 1.0)
    assert stats["exact"]["timed_steps"] == 12 - 3  # session starts excluded


def _result(val: float, t: float, act: int, exact: bool) -> dict:
    return {"model": "gpt", "final_val_loss": val, "final_train_loss": val, "step_time_s": t, "is_exact": exact,
            "unigram_entropy": 3.0, "memory": {"peak_bytes": 2 * act, "activation_bytes": act},
            "wall_clock_s": [t, 2 * t]}


def test_report_flags_a_method_dominated_by_a_baseline(tmp_path) -> None:
    """'slowfat' loses to exact+ckpt on loss, time and memory -> dominated; 'lean' uses less memory than every
    exact baseline -> not dominated, even though it is slower and worse."""
    results = {
        "exact": _result(2.0, 1.0, 1000, True),
        "exact+ckpt": _result(2.0, 1.2, 300, True),
        "slowfat": _result(2.1, 1.5, 800, False),
        "lean": _result(2.3, 1.6, 200, False),
    }
    assert dominated_by(results) == {"slowfat": ["exact+ckpt"]}
    runs = {name: [{"step": 1, "train_loss": 3.0, "tokens": 64},
                   {"step": 2, "train_loss": 2.5, "val_loss": r["final_val_loss"], "tokens": 128}]
            for name, r in results.items()}
    md = write_compare_report(tmp_path, results, runs, "compare: constructed", unigram=3.0, rounds=2)
    assert "**Dominated**" in md and "slowfat by exact+ckpt" in md and "lean by" not in md
    rows = {r["method"]: r for r in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert rows["slowfat"]["dominated_by"] == "exact+ckpt" and rows["lean"]["dominated_by"] is None
    assert rows["exact+ckpt"]["activation_ratio"] == pytest.approx(0.3)
    assert rows["lean"]["below_unigram"] == pytest.approx(0.7)
    for png in ("loss_vs_time.png", "loss_vs_tokens.png", "loss.png", "memory_time.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert "How to read this" in md and "unigram" in md


def test_no_flag_when_a_method_wins_on_one_axis() -> None:
    results = {"exact": _result(2.0, 1.0, 1000, True), "fast": _result(2.5, 0.9, 2000, False)}
    assert dominated_by(results) == {}
    assert compare_rows(results)[1]["time_ratio"] == pytest.approx(0.9)


def test_report_names_entries_without_memory_and_noisy_domination(tmp_path) -> None:
    results = {"exact": _result(2.0, 1.0, 1000, True), "slow": _result(2.1, 1.1, 1000, False),
               "opaque": {**_result(2.5, 2.0, 0, False), "memory": {"tracked_note": "MemTracker failed: x"}}}
    results["slow"]["time_ratio_within_noise"] = True
    runs = {n: [{"step": 1, "train_loss": 3.0, "val_loss": r["final_val_loss"], "tokens": 8}]
            for n, r in results.items()}
    md = write_compare_report(tmp_path, results, runs, "compare: constructed", unigram=3.0, rounds=2)
    assert "slow by exact (its time ratio is within noise)" in md
    assert "Memory not measured" in md and "opaque (MemTracker failed: x)" in md and "opaque by" not in md


def test_compare_runs_interleaved_and_reports(tmp_path, tiny, one_thread) -> None:
    out = tmp_path / "cmp"
    md = run_compare(out, "exact,exact+ckpt", overrides=tiny(), rounds=3, progress=False)
    report = json.loads((out / "report.json").read_text())
    res = report["results"]
    # checkpointing changes memory, never the numbers: identical losses at every step
    a = [json.loads(x) for x in (out / "exact" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "exact+ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6, abs=1e-6)
    assert res["exact+ckpt"]["train_overrides"] == ['train.activation_checkpoint="full"']
    assert len(res["exact"]["round_time_ratios"]) == 3
    mem = {k: v["memory"] for k, v in res.items()}
    assert mem["exact+ckpt"]["activation_bytes"] < mem["exact"]["activation_bytes"]
    assert mem["exact"]["sdpa"]["sdpa_calls"] > 0 and mem["exact"]["sdpa"]["backends"]
    assert report["environment"]["sdpa_default_dispatch"]["backends"]
    assert "| exact+ckpt |" in md and (out / "loss_vs_time.png").exists()
    assert torch.get_num_threads() == 1
