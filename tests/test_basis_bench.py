"""basis_bench's case table and ratio arithmetic (the GPU runs themselves are not CI material)."""

from __future__ import annotations

import math

import pytest

from chainfree.bench.basis_bench import ALL_LINEARS, MLP_ONLY, add_ratios, baseline_cases, basis_cases
from chainfree.config import load_config


def test_cases_are_valid_configs():
    cases = {**baseline_cases(True), **basis_cases({"all": [8], "all-unfused": [2], "mlp": [512]},
                                                   ["basis all-unfused c=2"])}
    assert list(cases) == ["exact", "exact+compile", "exact+ckpt", "exact+sac", "exact+ckpt+compile",
                           "exact+sac+compile", "basis all c=8",
                           "basis all-unfused c=2", "basis mlp c=512", "basis all-unfused c=2+compile"]
    assert cases["basis all c=8"] == ["method.name=basis", "method.compression=8", ALL_LINEARS]
    assert cases["basis mlp c=512"][-1] == MLP_ONLY
    assert "train.compile=true" in cases["basis all-unfused c=2+compile"]
    assert cases["exact+sac+compile"] == ["method.name=exact", "train.activation_checkpoint=selective",
                                          "train.compile=true"]
    assert "exact+sac+compile" not in baseline_cases(False)
    for extra in cases.values():  # every case is a config the loader accepts
        cfg = load_config(None, ["model.kind=gpt", *extra])
        assert cfg.method_name in ("exact", "basis")
    with pytest.raises(SystemExit, match="unknown layer set"):
        basis_cases({"attn": [8]}, [])
    with pytest.raises(SystemExit, match="not one of the cases"):
        basis_cases({"all": [8]}, ["basis all c=4"])


def test_ratios_are_per_step_medians_and_skip_untimed_steps():
    nan = math.nan
    base = {"step_times_s": [9.0, nan, 1, 1, 1, 1, 1, 2, 2, 2], "val_loss": 5.0, "activation_bytes": 100}
    other = {"step_times_s": [9.0, nan, 1, 1, 1, 1, 1, 1, 1, 4], "val_loss": 5.5, "activation_bytes": 40}
    results = {"exact": base, "basis": other}
    add_ratios(results, "exact")
    # timed pairs after the first 5: (1/1, 1/2, 1/2, 4/2) -> median of [1, .5, .5, 2] = 0.75
    assert other["time_ratio"] == pytest.approx(0.75)
    assert base["time_ratio"] == pytest.approx(1.0)
    assert other["delta_val"] == pytest.approx(0.5) and other["activation_ratio"] == pytest.approx(0.4)


def test_compiled_basis_trains_like_eager_basis_with_the_same_draws(one_thread):
    """`basis_bench compiled`: with inductor's fallback_random the compiled step draws eager's signs, so the
    losses agree to float32 rounding (inductor may reassociate sums: ~1e-7 relative on this model)."""
    from chainfree.bench.basis_bench import compiled_check, width_config

    torch = pytest.importorskip("torch")
    torch._dynamo.reset()
    base = [*width_config(16, 1, 4, 16), "train.dtype=fp32"]
    res = compiled_check(base, torch.device("cpu"), compression=4, steps=3, profile=False)
    assert res["max_rel_loss_diff"] < 1e-5
    assert len(res["eager"]["losses"]) == len(res["compiled"]["losses"]) == 3
    assert res["eager"]["losses"][0] != res["eager"]["losses"][-1]  # it trained


def test_equal_time_gives_each_case_the_baselines_training_time():
    from chainfree.bench.basis_bench import equal_time_rows, equal_time_steps

    results = {"exact+compile": {"steps": 60, "step_ms": 40.0, "val_loss": 5.0, "tokens": 600},
               "basis c=2": {"steps": 60, "step_ms": 60.0, "val_loss": 5.1, "tokens": 600},
               "fast": {"steps": 60, "step_ms": 39.9, "val_loss": 5.2, "tokens": 600}}
    counts = equal_time_steps(results, "exact+compile")
    assert counts == {"basis c=2": 40, "fast": 60}  # 60 x 40 ms = 2400 ms; 2400 / 39.9 rounds to 60
    rerun = {"basis c=2": {"steps": 40, "tokens": 400, "val_loss": 5.3}}
    rows = {r["case"]: r for r in equal_time_rows(results, rerun, "exact+compile")}
    assert rows["basis c=2"]["steps"] == 40 and rows["basis c=2"]["delta_val"] == pytest.approx(0.3)
    assert rows["fast"]["steps"] == 60 and rows["fast"]["delta_val"] == pytest.approx(0.2)  # not rerun
    assert rows["exact+compile"]["delta_val"] == 0


def test_run_cases_gives_each_case_its_own_step_count_and_schedule():
    from chainfree.bench.basis_bench import run_cases, width_config

    torch = pytest.importorskip("torch")
    base = [*width_config(16, 1, 2, 16), "train.dtype=fp32", "train.warmup_steps=1", "train.eval_batches=1"]
    cases = {"a": ["method.name=exact"], "b": ["method.name=exact"]}
    res = run_cases(base, cases, {"a": 5, "b": 3}, torch.device("cpu"), warmup=0, measure_step=1, budget_s=1e9)
    assert res["a"]["steps"] == 5 and res["b"]["steps"] == 3
    assert len(res["a"]["step_times_s"]) == 5 and len(res["b"]["step_times_s"]) == 3
    assert res["b"]["tokens"] == 3 * 2 * 16
    # same seed and batches: the first losses agree while the schedules (5 vs 3 steps) differ later
    assert res["a"]["records"][0]["train_loss"] == pytest.approx(res["b"]["records"][0]["train_loss"])


def test_frontier_plot_draws_valid_cases_and_leaves_invalid_ones_out(tmp_path, monkeypatch):
    import chainfree.bench.basis_bench as bb

    drawn = []
    real = bb.pyplot

    def recording_pyplot():
        plt = real()
        orig = plt.Axes.scatter

        def scatter(self, x, y, *a, **k):
            drawn.append((x, y, k.get("facecolors")))
            return orig(self, x, y, *a, **k)

        monkeypatch.setattr(plt.Axes, "scatter", scatter)
        return plt

    monkeypatch.setattr(bb, "pyplot", recording_pyplot)
    results = {"exact+compile": {"step_ms": 40.0, "activation_gib": 5.0, "delta_val": 0.0},
               "basis all c=8+compile": {"step_ms": 37.0, "activation_gib": 3.9, "delta_val": 0.17},
               "basis all c=8": {"step_ms": 57.0, "activation_gib": 3.2, "delta_val": 0.2},
               "basis all c=2+compile": {"step_ms": 99.0, "activation_gib": 9.0, "delta_val": 8.0, "invalid": "bug"}}
    bb.frontier_plot(results, tmp_path / "f.png", "t", "exact+compile")
    assert (tmp_path / "f.png").stat().st_size > 0
    assert sorted((x, y) for x, y, _ in drawn) == [(37.0, 3.9), (40.0, 5.0), (57.0, 3.2)]
    assert {x: face for x, _, face in drawn}[37.0] == "none"  # compiled: hollow
