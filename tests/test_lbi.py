"""LBI: exactness of the scan backward (float64 vs autograd through the same LBI model), causality, the
separator property on the autograd graph, and clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from chainfree.bench.lbi import cost_breakdown
from chainfree.config import ModelConfig
from chainfree.errors import ConfigError
from chainfree.methods import build_method
from chainfree.methods.lbi import LBI, LBIConfig, scan_backward, separator_violations
from chainfree.models.lbi import LBIModel
from chainfree.models.lm import BLOCKS, LanguageModel

V, T = 29, 16


def _available(kind: str) -> bool:
    needed = {"gpt": ["attn"], "mamba2": ["mamba2"], "mamba3": ["mamba3"], "hybrid": ["attn", "mamba3"]}[kind]
    return all(importlib.util.find_spec(BLOCKS[b].split(":")[0]) is not None for b in needed)


ARCHS = [
    pytest.param(k, marks=pytest.mark.skipif(not _available(k), reason=f"{k} blocks not in this tree"))
    for k in ("gpt", "mamba2", "mamba3", "hybrid")
]


def tiny_lm(kind: str, n_layers: int, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        kind=kind,
        vocab_size=V,
        seq_len=T,
        d_model=16,
        n_layers=n_layers,
        n_heads=2,
        d_state=8,
        ssm_head_dim=8,
        expand=2,
        chunk_size=8,
        attn_every=2,
        hybrid_mixer="mamba3",
    )
    return LanguageModel(cfg).double()


def batch(seed: int = 1, b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, T), generator=g), torch.randint(0, V, (b, T), generator=g)


def max_rel_err(model: nn.Module, ref: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        scale = ref[name].norm().clamp_min(1e-30)
        worst = max(worst, float((p.grad - ref[name]).norm() / scale))
    return worst


def autograd_grads(model: LBIModel, ids, tgt) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(ids, tgt)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), ref


def check_exact(model: LBIModel, jacobian: str) -> None:
    ids, tgt = batch()
    loss_ref, ref = autograd_grads(model, ids, tgt)
    loss = scan_backward(model, ids, tgt, jacobian)
    assert abs(float(loss) - loss_ref) <= 1e-12 * abs(loss_ref)
    assert max_rel_err(model, ref) <= 1e-10


# ---- (1) exactness -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("k_regions", [1, 2, 3, 4, 8])
def test_scan_backward_equals_autograd(kind, k_regions):
    lm = tiny_lm(kind, n_layers=k_regions)  # region_size 1: K = n_layers
    model = LBI(LBIConfig(region_size=1, rank=3, n_chunks=4)).prepare(lm)
    assert model.n_regions == k_regions
    check_exact(model, "vjp")


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("interface", ["token", "paper_leaky"])
def test_scan_backward_other_interfaces(kind, interface):
    model = LBI(LBIConfig(region_size=1, rank=3, interface=interface, jacobian="vjp")).prepare(tiny_lm(kind, 4))
    check_exact(model, "vjp")


@pytest.mark.parametrize("jacobian", ["vjp", "jvp", "loop", "replicate", "prefix"])
@pytest.mark.parametrize("chunk", [0, 3])
def test_every_jacobian_mode_is_exact(jacobian, chunk):
    config = LBIConfig(region_size=2, rank=2, n_chunks=2, jacobian=jacobian, jacobian_chunk=chunk)
    check_exact(LBI(config).prepare(tiny_lm("gpt", 6)), jacobian)


def test_step_through_registry_fills_grads_like_autograd():
    method = build_method("lbi", {"region_size": 1, "rank": 3, "n_chunks": 4})
    model = method.prepare(tiny_lm("gpt", 3))
    ids, tgt = batch()
    _, ref = autograd_grads(model, ids, tgt)
    stats = method.step(model, ids, tgt)
    assert stats.tokens == tgt.numel()
    assert max_rel_err(model, ref) <= 1e-10
    # accumulates like loss.backward(): a second step doubles the gradient
    method.step(model, ids, tgt)
    torch.testing.assert_close(model.lm.blocks[0].mlp.up.weight.grad, 2 * ref["lm.blocks.0.mlp.up.weight"])


def test_full_width_interface_recovers_nothing_special_but_stays_exact():
    """r = d (the paper's 'full width' ablation) is still an LBI model; the scan stays exact."""
    model = LBI(LBIConfig(region_size=1, rank=16, n_chunks=2, jacobian="vjp")).prepare(tiny_lm("gpt", 3))
    check_exact(model, "vjp")


# ---- (2) causality -------------------------------------------------------------------------------------------
def _max_change_before(model: nn.Module, t: int) -> float:
    ids, _ = batch(seed=5)
    changed = ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert not torch.equal(a[:, t + 1 :], b[:, t + 1 :])  # the change is visible later on
    return float((a[:, : t + 1] - b[:, : t + 1]).abs().max())


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("t", [5, 8, 13])
def test_causal_interfaces_do_not_see_the_future(kind, t):
    lm = tiny_lm(kind, 4)
    assert _max_change_before(lm, t) <= 1e-12  # dense reference
    for interface in ("causal_chunk", "token"):
        model = LBIModel(tiny_lm(kind, 4), LBIConfig(region_size=1, rank=3, interface=interface, n_chunks=4))
        assert _max_change_before(model, t) <= 1e-12, interface


@pytest.mark.parametrize("kind", ARCHS)
def test_paper_leaky_sees_the_future(kind):
    """The authors' pooled message averages the whole sequence: earlier logits move when later tokens do."""
    model = LBIModel(tiny_lm(kind, 4), LBIConfig(region_size=1, rank=3, interface="paper_leaky"))
    assert _max_change_before(model, 5) > 1e-6


# ---- (3) separator property on the autograd graph ----------------------------------------------------------
@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("interface", ["causal_chunk", "token", "paper_leaky"])
def test_interface_is_a_separator(kind, interface):
    model = LBIModel(tiny_lm(kind, 3), LBIConfig(region_size=1, rank=3, interface=interface, n_chunks=4))
    ids, tgt = batch()
    assert separator_violations(model, ids, tgt) == []


class _Holder:
    """A plain object (not a module) through which two blocks pass a tensor behind the interface's back."""

    value: torch.Tensor | None = None


class _Writer(nn.Module):
    def __init__(self, inner: nn.Module, holder: _Holder) -> None:
        super().__init__()
        self.inner, self.holder = inner, holder

    def forward(self, x):
        y = self.inner(x)
        self.holder.value = y
        return y


class _Reader(_Writer):
    def forward(self, x):
        return self.inner(x) + 0.5 * self.holder.value


def test_hidden_cross_region_channel_is_rejected():
    lm = tiny_lm("gpt", 2)
    holder = _Holder()
    lm.blocks[0] = _Writer(lm.blocks[0], holder)
    lm.blocks[1] = _Reader(lm.blocks[1], holder)
    with pytest.raises(ConfigError, match="crossed by something other than the latent interface"):
        LBI(LBIConfig(region_size=1, rank=3)).prepare(lm)
    # the same two blocks inside one region are fine: the stash never crosses a boundary
    LBI(LBIConfig(region_size=2, rank=3)).prepare(lm)


def test_separator_walk_detects_a_dense_stream():
    """Positive control for the walk: a second path from block 0 around a cut tensor is found; without
    that path the cut separates block 0 from the loss."""
    lm = tiny_lm("gpt", 2)
    ids, tgt = batch()
    from chainfree.methods.lbi import _reachable_leaves

    x0 = lm.embed(ids)
    h0 = lm.blocks[0](x0)
    cut = h0 * 1.0
    out = lm.blocks[1](cut) + h0  # a second path from block 0 around the cut
    loss = lm.loss(lm.norm(out), tgt)
    reached = _reachable_leaves(loss.grad_fn, {cut.grad_fn})
    assert any(id(p) in reached for p in lm.blocks[0].parameters())
    out_ok = lm.blocks[1](cut)
    reached_ok = _reachable_leaves(lm.loss(lm.norm(out_ok), tgt).grad_fn, {cut.grad_fn})
    assert not any(id(p) in reached_ok for p in lm.blocks[0].parameters())


def test_shared_parameter_between_regions_is_rejected():
    lm = tiny_lm("gpt", 2)
    lm.blocks[1].mlp.up.weight = lm.blocks[0].mlp.up.weight
    with pytest.raises(ConfigError, match="shared by LBI regions 0 and 1"):
        LBIModel(lm, LBIConfig(region_size=1, rank=3))


# ---- configuration errors, cost breakdown --------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, match",
    [
        ({"region_size": 3}, "not a multiple of method.region_size"),
        ({"n_chunks": 5}, "cannot be cut into method.n_chunks=5"),
        ({"chunk_len": 3}, "not a multiple of method.chunk_len=3"),
        ({"interface": "pooled"}, "method.interface must be one of"),
        ({"jacobian": "magic"}, "method.jacobian must be one of"),
        ({"rank": 0}, "method.rank must be >= 1"),
    ],
)
def test_bad_config_is_a_clear_error(params, match):
    with pytest.raises(ConfigError, match=match):
        build_method("lbi", params).prepare(tiny_lm("gpt", 4))


def test_step_needs_prepared_model():
    with pytest.raises(ConfigError, match="prepare"):
        LBI().step(tiny_lm("gpt", 2), *batch())


def test_cost_breakdown_reports_every_phase():
    model = LBIModel(tiny_lm("gpt", 4), LBIConfig(region_size=1, rank=2, n_chunks=2))
    ids, tgt = batch()
    costs = cost_breakdown(model, ids, tgt, "vjp", repeats=1)
    assert len(costs["forward"]) == 4 and len(costs["vjp"]) == 4
    assert costs["jacobian"][0] == 0.0 and all(t > 0 for t in costs["jacobian"][1:3])
    assert costs["total"] > 0
    assert all(p.grad is None for p in model.parameters())


# ---- the one training loop -----------------------------------------------------------------------------------
def test_lbi_trains_through_the_one_loop(tiny, tmp_path):
    """`chainfree train --method lbi`: the scan backward inside chainfree.train (optimizer, eval, checkpoint)."""
    from chainfree.config import load_config
    from chainfree.logging import read_metrics
    from chainfree.train import train

    over = tiny(
        **{"model.n_layers": 4, "method.name": '"lbi"', "method.region_size": 1, "method.rank": 4, "train.lr": 1e-2}
    )
    summary = train(load_config(overrides=over), tmp_path, progress=False)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert summary["method"]["name"] == "lbi" and summary["method"]["backward"] == "scan"
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert (tmp_path / "checkpoint" / "latest").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("interface", ["causal_chunk", "token"])
def test_scan_backward_on_cuda_matches_autograd(interface):
    """The GPU path is the same code (batched VJPs through SDPA's CUDA kernels); float32, so 1e-4."""
    torch.manual_seed(0)
    cfg = ModelConfig(kind="gpt", vocab_size=V, seq_len=64, d_model=64, n_layers=4, n_heads=4)
    model = LBIModel(LanguageModel(cfg).cuda(), LBIConfig(region_size=1, rank=4, interface=interface, n_chunks=4))
    g = torch.Generator().manual_seed(3)
    ids, tgt = (torch.randint(0, V, (2, 64), generator=g).cuda() for _ in range(2))
    _, ref = autograd_grads(model, ids, tgt)
    scan_backward(model, ids, tgt, "vjp")
    assert max_rel_err(model, ref) <= 1e-4


def test_speed_bench_runs_on_cpu_and_reports_ratios():
    from chainfree.bench.lbi import bench_single, to_markdown

    model_cfg = dict(kind="gpt", vocab_size=V, seq_len=T, d_model=16, n_layers=4, n_heads=2)
    variants = [{"name": "K4", "lbi": dict(region_size=1, rank=2, n_chunks=2)}]
    single = bench_single(model_cfg, 2, variants, torch.device("cpu"), warmup=0, steps=1)
    rec = single["K4"]
    assert "error" not in rec and rec["n_regions"] == 4
    assert rec["scan_over_dense"] == rec["scan"]["median_s"] / single["dense"]["median_s"]
    assert len(rec["breakdown_s"]["jacobian"]) == 3
    md = to_markdown(
        {
            "env": {"device": "cpu", "torch": torch.__version__, "git_commit": ""},
            "model": model_cfg,
            "batch_size": 2,
            "single": single,
        }
    )
    assert "| K4 | 4 | causal_chunk | 2 | 2 | vjp |" in md


# ---- (6) the Jacobian passes bound their memory by themselves ---------------------------------------------
@pytest.mark.parametrize("kind", ["gpt", "mamba2"])
def test_jacobian_passes_fit_the_memory_budget_and_stay_exact(kind, monkeypatch):
    """jacobian_chunk = 0 (default): the directions go in passes sized to method.jacobian_memory from the
    region's measured activation bytes. A budget of ~2.5 directions gives passes of 2 (and a last of 2 of
    n = 6) and float64 gradients equal to autograd; the directions in flight times the measured bytes per
    direction never exceed the budget."""
    import chainfree.models.lbi as lbi_mod

    lm = tiny_lm(kind, 4)
    probe_model = LBI(LBIConfig(region_size=1, rank=3, n_chunks=2)).prepare(lm)
    ids, tgt = batch()
    m_in = torch.zeros(2, 2, 3, dtype=torch.float64, requires_grad=True)
    probe = lbi_mod.RegionMemoryProbe(torch.device("cpu"))
    with probe:
        probe_model.region(1, m_in, probe_model.canvas(ids))
    per_dir = probe.bytes
    assert per_dir is not None and per_dir > 0
    budget = int(2.5 * per_dir)
    model = LBI(LBIConfig(region_size=1, rank=3, n_chunks=2, jacobian_memory=budget / 2**30)).prepare(lm)
    passes: list[int] = []
    chosen: list[int] = []
    measured: list[int] = []
    real_grad, real_auto = torch.autograd.grad, lbi_mod.auto_jacobian_chunk

    def spy_grad(outputs, inputs, grad_outputs=None, **kw):
        if kw.get("is_grads_batched"):
            passes.append(grad_outputs.shape[0])
        return real_grad(outputs, inputs, grad_outputs, **kw)

    def spy_auto(model, n, bytes_per_direction, device):
        chosen.append(real_auto(model, n, bytes_per_direction, device))
        measured.append(bytes_per_direction)  # the step's own probe of this region's graph
        return chosen[-1]

    monkeypatch.setattr(torch.autograd, "grad", spy_grad)
    monkeypatch.setattr(lbi_mod, "auto_jacobian_chunk", spy_auto)
    loss_ref, ref = autograd_grads(model, ids, tgt)
    scan_backward(model, ids, tgt, "vjp")
    assert all(abs(b - per_dir) <= 0.05 * per_dir for b in measured)  # same-size region graphs
    assert chosen == [2, 2]  # two middle regions, floor(2.5) directions each
    assert passes == [2, 2, 2] * 2  # n = 6 directions in passes of 2
    assert all(c * b <= budget for c, b in zip(chosen, measured, strict=True))
    assert max_rel_err(model, ref) <= 1e-10


def test_jacobian_budget_defaults_to_free_memory():
    from chainfree.models.lbi import auto_jacobian_chunk, jacobian_budget_bytes

    model = LBI(LBIConfig(region_size=1, rank=3, n_chunks=2)).prepare(tiny_lm("gpt", 3))
    budget = jacobian_budget_bytes(model, torch.device("cpu"))
    assert budget > 0
    assert auto_jacobian_chunk(model, 64, budget // 5, torch.device("cpu")) == 5
    assert auto_jacobian_chunk(model, 64, 10 * budget, torch.device("cpu")) == 1
    assert auto_jacobian_chunk(model, 4, 1, torch.device("cpu")) == 4


@pytest.mark.parametrize("kind", ARCHS)
def test_prefix_jacobian_is_exact_for_every_architecture(kind):
    """'prefix' re-runs each region on causal prefixes (T/C .. T tokens, ragged against the SSM chunk size):
    the same Jacobian, so the same float64 gradients as autograd."""
    config = LBIConfig(region_size=1, rank=3, n_chunks=4, jacobian="prefix", jacobian_chunk=2)
    check_exact(LBI(config).prepare(tiny_lm(kind, 4)), "prefix")


# ---- (7) the full-scale reproduction's plumbing, at toy size --------------------------------------------------
@pytest.mark.slow  # ~1 min on 2 busy cores: 5 short training runs
def test_full_reproduction_writes_the_issue_table(tmp_path, monkeypatch):
    """`reproduce lbi --scale full` at toy size on CPU: one row with the issue's keys (arch, params = block
    parameters, tokens, dense_val, lbi_r16_val, paper_leaky_val, gap_r16), the scan step time and the
    scan-vs-autograd gradient check, and the loss curves to redraw the PNG from the JSON."""
    import json

    from chainfree.reproduce import lbi as repro

    monkeypatch.setenv("CHAINFREE_CACHE", str(tmp_path / "cache"))
    tiny = ["model.d_model=32", "model.n_layers=4", "model.n_heads=2", "model.seq_len=32", "train.batch_size=2",
            "data.tokenizer=bytes", "data.max_chars=60000", "train.eval_batches=1"]
    row = repro.run_full(tmp_path, "cpu", ["model.kind=gpt", *tiny, "repro.tokens=128", "repro.scan_steps=2"])
    for key in ("arch", "params", "tokens", "dense_val", "lbi_r16_val", "paper_leaky_val", "gap_r16",
                "step_ms_dense", "step_ms_lbi_r16", "step_ms_lbi_r16_scan_vjp", "step_ms_lbi_r16_scan_prefix"):
        assert row.get(key) is not None, key
    assert row["params"] == sum(p.numel() for p in tiny_lm_blocks(tiny))
    assert row["tokens"] == 2 * 2 * 32 and abs(row["gap_r16"] - (row["lbi_r16_val"] - row["dense_val"])) < 1e-12
    assert row["grad_check_max_rel_err_fp32"] < 1e-5
    payload = json.loads((tmp_path / "lbi_full_gpt_cpu.json").read_text())
    assert set(payload["curves"]) == {"dense", "lbi_r16", "paper_leaky_r16"}
    assert repro.plot_json(tmp_path / "lbi_full_gpt_cpu.json").is_file()
    with pytest.raises(ValueError, match="unknown case"):
        repro.run_full(tmp_path, "cpu", ["repro.cases=dense,nope"])


def test_full_reproduction_keeps_cases_of_an_earlier_call(tmp_path, monkeypatch):
    """`repro.keep=1`: a later call with the same settings runs only its own cases and keeps the finished
    ones (dense is not re-run, the gap uses the kept dense); other settings are never mixed in."""
    import json

    from chainfree.reproduce import lbi as repro

    monkeypatch.setenv("CHAINFREE_CACHE", str(tmp_path / "cache"))
    tiny = ["model.kind=gpt", "model.d_model=32", "model.n_layers=4", "model.n_heads=2", "model.seq_len=32",
            "train.batch_size=2", "data.tokenizer=bytes", "data.max_chars=60000", "train.eval_batches=1"]
    first = repro.run_full(tmp_path, "cpu", [*tiny, "repro.tokens=128", "repro.cases=dense", "repro.scan_steps=0"])
    assert first.get("lbi_r16_val") is None
    second = repro.run_full(tmp_path, "cpu", [*tiny, "repro.tokens=128", "repro.cases=lbi_r16",
                                              "repro.scan_steps=0", "repro.keep=1"])
    assert second["kept_from_earlier_call"] == ["dense"]
    assert second["dense_val"] == first["dense_val"]
    assert second["gap_r16"] == second["lbi_r16_val"] - first["dense_val"]
    payload = json.loads((tmp_path / "lbi_full_gpt_cpu.json").read_text())
    assert set(payload["curves"]) == {"dense", "lbi_r16"} and set(payload["summaries"]) == {"dense", "lbi_r16"}
    assert "kept from an earlier call" in (tmp_path / "lbi_full_gpt_cpu.md").read_text()
    # no training case: only the scan's timing and gradient check, against the kept dense row
    scan = repro.run_full(tmp_path, "cpu", [*tiny, "repro.tokens=128", "repro.cases=none", "repro.scan_steps=2",
                                            "repro.keep=1"])
    assert set(scan["kept_from_earlier_call"]) == {"dense", "lbi_r16"} and scan["gap_r16"] == second["gap_r16"]
    assert scan["step_ms_lbi_r16_scan_vjp"] > 0 and scan["grad_check_max_rel_err_fp32"] < 1e-5
    assert set(scan["case_devices"]) == {"dense", "lbi_r16"}  # recorded although no case trained here
    # another token budget: nothing is kept, dense runs again
    third = repro.run_full(tmp_path, "cpu", [*tiny, "repro.tokens=256", "repro.cases=lbi_r16",
                                             "repro.scan_steps=0", "repro.keep=1"])
    assert "kept_from_earlier_call" not in third and third["steps"] == 4


def tiny_lm_blocks(sets: list[str]) -> list[torch.Tensor]:
    from chainfree.config import load_config
    from chainfree.models import build_model

    cfg = load_config("gpt-50m", ["model.vocab_size=256", *sets])
    return list(build_model(cfg.model).blocks.parameters())


def test_full_reproduction_times_only_the_vjp_scan_with_compiled_blocks(tmp_path, monkeypatch):
    """With train.compile=true the scan's 'prefix' Jacobian runs as 'loop' (as 'vjp' does), so the reproduction
    times the vjp scan only and records why prefix was not timed. Training is replaced by a recorder: this
    checks which runs the reproduction asks for, not what they measure (the toy runs above do that)."""
    import json

    from chainfree.reproduce import lbi as repro

    asked = []

    def fake_train(cfg, out, progress=False):
        m = cfg.method  # a dict of the method's keys
        asked.append((m["name"], m.get("backward"), m.get("jacobian"), cfg.train.compile))
        out.mkdir(parents=True, exist_ok=True)
        record = {"step": 1, "tokens": 64, "train_loss": 2.0, "val_loss": 2.0}
        (out / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        return {"final_val_loss": 2.0, "step_time_s": 0.5, "device": "cpu", "torch": torch.__version__}

    import chainfree.train

    monkeypatch.setattr(chainfree.train, "train", fake_train)
    monkeypatch.setattr(repro, "_grad_check", lambda cfg: {"grad_check_max_rel_err_fp32": 0.0})
    monkeypatch.setattr(repro, "_plot_vs_tokens", lambda *a, **k: None)
    monkeypatch.setenv("CHAINFREE_CACHE", str(tmp_path / "cache"))
    tiny = ["model.kind=gpt", "model.d_model=32", "model.n_layers=4", "model.n_heads=2", "model.seq_len=32",
            "train.batch_size=2", "data.tokenizer=bytes", "data.max_chars=60000", "train.eval_batches=1"]
    row = repro.run_full(tmp_path, "cpu", [*tiny, "repro.tokens=128", "repro.cases=dense", "repro.scan_steps=1",
                                           "train.compile=true", "train.compile_scope=blocks"])
    scans = [a for a in asked if a[1] == "scan"]
    assert scans == [("lbi", "scan", "vjp", True)], asked
    assert "step_ms_lbi_r16_scan_prefix" not in row and "runs as 'loop'" in row["scan_prefix_note"]
    assert "Scan (prefix): not timed" in (tmp_path / "lbi_full_gpt_cpu.md").read_text()
    asked.clear()
    eager = repro.run_full(tmp_path / "eager", "cpu", [*tiny, "repro.tokens=128", "repro.cases=dense",
                                                       "repro.scan_steps=1"])
    assert [a[2] for a in asked if a[1] == "scan"] == ["vjp", "prefix"] and eager["step_ms_lbi_r16_scan_prefix"] > 0


def test_full_reproduction_from_the_command_line(tmp_path):
    """What a user types, `chainfree reproduce lbi --scale full`, in a fresh process at toy size (dense only, no
    scan timing): it writes the table and records that command line."""
    import json
    import os
    import subprocess
    import sys

    tiny = ["model.kind=gpt", "model.d_model=32", "model.n_layers=4", "model.n_heads=2", "model.seq_len=32",
            "train.batch_size=2", "data.tokenizer=bytes", "data.max_chars=60000", "train.eval_batches=1",
            "repro.tokens=128", "repro.cases=dense", "repro.scan_steps=0"]
    args = ["reproduce", "lbi", "--scale", "full", "--device", "cpu", "--out", str(tmp_path / "out")]
    for s in tiny:
        args += ["--set", s]
    code = "import sys; from chainfree.cli import main; sys.argv[0] = 'chainfree'; main()"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHAINFREE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    payload = json.loads((tmp_path / "out" / "lbi_full_gpt_cpu.json").read_text())
    assert payload["command"].startswith("chainfree reproduce lbi --scale full --device cpu")
    assert payload["rows"][0]["dense_val"] > 0 and (tmp_path / "out" / "lbi_full_gpt_cpu.md").is_file()
