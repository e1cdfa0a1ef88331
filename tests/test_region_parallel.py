"""Region-parallel LBI over gloo (CPU processes): gradients equal single-process LBI, bytes are counted."""

from __future__ import annotations

import pytest
import torch

from chainfree.bench.lbi_parallel import RegionRunSpec, build_replica, make_batch, spawn_local
from chainfree.methods.lbi import scan_backward
from chainfree.models.lbi import LBIModel
from chainfree.parallel.region import BACKWARD_CATEGORIES, CANVAS, FORWARD_CANVAS, JACOBIAN, SEED, SHARED

MODEL = dict(kind="gpt", vocab_size=29, seq_len=16, d_model=16, n_heads=2, tie_embeddings=True)


def _single_process_grads(spec: RegionRunSpec) -> tuple[LBIModel, dict[str, torch.Tensor], float]:
    model = build_replica(spec, torch.device("cpu"))
    ids, targets = make_batch(spec, torch.device("cpu"))
    loss = model(ids, targets)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    scan_backward(model, ids, targets, spec.lbi.get("jacobian", "vjp"))
    for n, p in model.named_parameters():  # the single-process scan agrees with autograd
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-10, atol=1e-14)
    return model, ref, float(loss.detach())


@pytest.mark.parametrize(
    "world, interface, shared",
    [(2, "causal_chunk", "allreduce"), (4, "causal_chunk", "allreduce"), (3, "token", "owner")],
)
def test_region_parallel_grads_equal_single_process(world, interface, shared):
    spec = RegionRunSpec(
        model={**MODEL, "n_layers": world},
        lbi={"region_size": 1, "rank": 3, "n_chunks": 4, "interface": interface, "jacobian": "vjp"},
        batch_size=2,
        shared=shared,
    )
    model, ref, loss = _single_process_grads(spec)
    records = spawn_local(spec, world)
    assert records[-1]["loss"] == pytest.approx(loss, rel=1e-12)
    seen: dict[str, torch.Tensor] = {}
    for rec in records:
        for name, g in rec["grads"].items():
            if name in seen:  # shared parameters (allreduce): every rank holds the all-reduced gradient
                torch.testing.assert_close(g, seen[name], rtol=0, atol=0)
            seen[name] = g
    assert set(seen) == {n for n, _ in model.named_parameters()}
    for name, g in seen.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-10, atol=1e-14, msg=name)

    # bytes: exactly what the scan protocol sends (float64 here), per rank
    b, n = 2, 4 * 3  # batch, C * r
    if interface == "token":
        n_batch, n = b * 16, 3
    else:
        n_batch = b
    mat, vec = n_batch * n * n * 8, n_batch * n * 8
    for rank, rec in enumerate(records):
        sent = rec["bytes_sent"]
        if shared == "allreduce":
            assert sent[SHARED] == int(2 * (world - 1) / world * 29 * 16 * 8)
            assert sent.get(CANVAS, 0) == 0
        else:  # canvas [B, T, d] out to every other rank in the forward, cotangents back in the backward
            assert sent.get(SHARED, 0) == 0
            canvas = b * 16 * 16 * 8
            assert sent.get(CANVAS, 0) == (0 if rank == world - 1 else canvas)
            assert sent.get(FORWARD_CANVAS, 0) == (canvas * (world - 1) if rank == world - 1 else 0)
        # Hillis–Steele: rank sends in the round with offset d iff rank >= d; A if its partial composition
        # does not reach the last rank yet, else b; plus the shift of lambda_rank to rank-1 for rank >= 2.
        exp_mat = exp_vec = 0
        ends = list(range(1, world + 1))
        d = 1
        while d < world:
            if rank >= d:
                if ends[rank] == world:
                    exp_vec += vec
                else:
                    exp_mat += mat
            ends = [ends[k + d] if k + d < world else ends[k] for k in range(world)]
            d *= 2
        if rank >= 2:
            exp_vec += vec
        assert sent.get(JACOBIAN, 0) == exp_mat
        assert sent.get(SEED, 0) == exp_vec
        assert rec["backward_bytes"] == sum(sent.get(c, 0) for c in BACKWARD_CATEGORIES)


def test_region_parallel_rejects_wrong_world_size():
    spec = RegionRunSpec(model={**MODEL, "n_layers": 4}, lbi={"region_size": 1, "rank": 2, "n_chunks": 2})
    with pytest.raises(Exception, match="one region per rank"):
        spawn_local(spec, 2)


def test_region_parallel_strategy_in_the_training_loop(tiny, tmp_path):
    """torchrun, 2 CPU ranks, `chainfree train --method lbi --set method.distributed="region"`: the
    'lbi_region' strategy (one region per rank, whole batch on every rank, replicas synced after the step)
    follows the single-process run in float64: losses, gradient norms, val loss and the saved weights."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from chainfree.config import load_config
    from chainfree.logging import read_metrics
    from chainfree.train import train

    over = tiny(**{"model.n_layers": 2, "train.steps": 2, "train.eval_every": 2, "train.ckpt_every": 2,
                   "train.dtype": '"fp64"', "method.region_size": 1, "method.rank": 3})
    train(load_config(overrides=over, method="lbi"), tmp_path / "single", progress=False)
    args = [a for kv in [*over, 'method.distributed="region"'] for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "chainfree.cli", "train", "--method", "lbi", "--out", str(tmp_path / "region"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    par, single = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("region", "single"))
    assert [r["step"] for r in par] == [r["step"] for r in single] == [1, 2]
    for a, b in zip(par, single, strict=True):
        for key in ("train_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert par[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-9)
    weights = []
    for d in ("region", "single"):
        folders = sorted((tmp_path / d / "checkpoint").glob("step*"))
        weights.append(load_file(str(folders[-1] / "model.safetensors")))
    assert set(weights[0]) == set(weights[1])
    for name, w in weights[1].items():
        torch.testing.assert_close(weights[0][name], w, rtol=1e-9, atol=1e-12, msg=name)


def test_pipeline_and_ddp_comparison_harness_gradients_and_bytes():
    """The issue-21 comparison on 2 gloo ranks (float64): GPipe and 1F1B over the same two LBI stages and
    region-parallel LBI give the single-process LBI gradients, as does the single-device mode on rank 0;
    dense DDP gives the dense model's; the backward bytes per rank are what each protocol sends."""
    from chainfree.bench.lbi_pipeline import CompareSpec, spawn_compare, summarize
    from chainfree.config import ModelConfig
    from chainfree.methods.lbi import LBIConfig
    from chainfree.models.lm import LanguageModel

    spec = CompareSpec(model={**MODEL, "n_layers": 2}, lbi={"rank": 3, "n_chunks": 4}, batch_size=4,
                       microbatches=2)
    records = spawn_compare(spec, 2)
    torch.manual_seed(spec.seed)
    lm = LanguageModel(ModelConfig(**spec.model)).double()
    g = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(0, MODEL["vocab_size"], (4, MODEL["seq_len"] + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    dense = {n: p for n, p in lm.named_parameters()}
    lm(x, y).backward()
    dense_ref = {n: p.grad.clone() for n, p in dense.items()}
    lm.zero_grad(set_to_none=True)
    torch.manual_seed(spec.seed)
    model = LBIModel(LanguageModel(ModelConfig(**spec.model)).double(),
                     LBIConfig(region_size=1, rank=3, n_chunks=4, check_separator=False))
    loss = model(x, y)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    single = records[0]["modes"]["single"]
    assert not records[1]["modes"]["single"]["grads"] and single["loss"] == pytest.approx(float(loss.detach()))
    for mode, expect in (("gpipe", ref), ("1f1b", ref), ("region", ref), ("ddp", dense_ref), ("single", ref)):
        seen: dict[str, torch.Tensor] = {}
        for rec in records:
            for name, grad in rec["modes"][mode]["grads"].items():
                if name in seen and mode != "region":  # shared weights: identical after the all-reduce
                    torch.testing.assert_close(grad, seen[name], rtol=0, atol=0)
                seen.setdefault(name, grad)
        assert set(seen) == set(expect), mode
        for name, grad in seen.items():
            torch.testing.assert_close(grad, expect[name], rtol=1e-10, atol=1e-13, msg=f"{mode} {name}")
        if mode not in ("ddp", "single"):
            assert records[-1]["modes"][mode]["loss"] == pytest.approx(float(loss.detach()), rel=1e-12), mode
    # bytes: the last stage sends the gradients of (m_1 [B/2, C, r], canvas [B/2, T, d]) per micro-batch
    mb = 2
    for mode in ("gpipe", "1f1b"):
        sent = records[1]["modes"][mode]["backward_bytes"]
        assert sent["activation_grad_message"] == 2 * mb * 4 * 3 * 8
        assert sent["activation_grad_canvas"] == 2 * mb * 16 * 16 * 8
        assert records[0]["modes"][mode]["backward_bytes"]["activation_grad_canvas"] == 0
    n_params = sum(p.numel() for p in lm.parameters())
    assert records[0]["modes"]["ddp"]["backward_bytes"]["grad_allreduce"] == n_params * 8
    rows = summarize(records)
    assert [r["mode"] for r in rows] == ["region", "gpipe", "1f1b", "ddp", "single"] and rows[3]["vs_ddp"] == 1.0


def test_strategy_choice_and_clear_errors():
    """LBI picks 'lbi_region' under torchrun only with method.distributed='region'; the strategy refuses a
    world size that is not the number of regions, and the autograd backward, with one line naming the fix."""
    from chainfree.errors import ConfigError
    from chainfree.methods.base import Launch
    from chainfree.methods.lbi import LBI, LBIConfig
    from chainfree.parallel.region import RegionParallel

    two = Launch(rank=0, world_size=2)
    assert LBI(LBIConfig(distributed="region")).strategy(two) == "lbi_region"
    assert LBI(LBIConfig()).strategy(two) == "ddp"
    assert LBI(LBIConfig(distributed="region")).strategy(Launch()) == "single"
    spec = RegionRunSpec(model={**MODEL, "n_layers": 4}, lbi={"region_size": 1, "rank": 2, "n_chunks": 2})
    model = build_replica(spec, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"2 processes but 4 regions; set method.region_size"):
        RegionParallel(two).wrap(model, LBI(LBIConfig(region_size=1)), torch.device("cpu"))
    with pytest.raises(ConfigError, match="method.backward='scan'"):
        RegionParallel(Launch(0, 4)).wrap(model, LBI(LBIConfig(backward="autograd")), torch.device("cpu"))
    with pytest.raises(ConfigError, match="method.distributed"):
        LBIConfig(distributed="pipeline").validate()
