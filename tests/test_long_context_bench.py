"""The equal-wall-clock long-context benchmark on a tiny CPU model: every case gets a step count from its
calibrated step time, stops at the budget, and reports a val-loss curve that starts from the same point."""

from __future__ import annotations

import json

from chainfree.bench import long_context

TINY = ["model.kind=gpt", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=64",
        "data.corpus=shakespeare", "data.tokenizer=bytes", "data.max_chars=200000", "train.batch_size=2",
        "train.lr=1e-3", "train.eval_batches=1"]  # fmt: skip


def test_equal_time_cases_share_the_start_and_respect_the_budget(tmp_path):
    cases = {"exact": ["method.name=exact"], "sus": ["method.name=sus", "method.c=4"]}
    payload = long_context.run(tmp_path, "lc", "cpu", budget_s=0.6, calib_steps=2, evals=2, cases=cases, base=TINY,
                               log=lambda *_: None)  # fmt: skip
    res = payload["results"]
    starts = {r["curve"][0]["val_loss"] for r in res.values()}
    assert len(starts) == 1  # same seed, same val batches: the same point before training
    for name, r in res.items():
        assert r["steps"] >= 2 and r["steps"] <= r["planned_steps"]
        assert r["curve"][-1]["step"] == r["steps"] and len(r["curve"]) >= 2
        # the last step may overshoot the budget by at most one step's time
        assert r["train_s"] < 0.6 + max(0.6, 3 * payload["calibration"][name]["step_s"])
    saved = json.loads((tmp_path / "lc.json").read_text())
    assert [row["case"] for row in saved["rows"]] == ["exact", "sus"]
    assert (tmp_path / "lc.md").exists() and (tmp_path / "lc.png").exists()


def test_the_command_as_typed_writes_its_table_and_refuses_an_unknown_case(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "chainfree.bench.long_context", "--device", "cpu", "--budget", "0.4",
           "--calib-steps", "1", "--evals", "1", "--cases", "exact", "--out", str(tmp_path), "--name", "lc",
           *[a for kv in TINY for a in ("--set", kv)]]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| exact |" in (tmp_path / "lc.md").read_text()
    bad = subprocess.run([*cmd[:3], "--cases", "exact,sus_tiles"], capture_output=True, text=True)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: unknown case")
