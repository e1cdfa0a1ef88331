"""Region-parallel LBI over gloo (CPU processes): gradients equal single-process LBI, bytes are counted."""

from __future__ import annotations

import pytest
import torch

from chainfree.methods.lbi import LBIModel, scan_backward
from chainfree.parallel.region import (
    BACKWARD_CATEGORIES,
    CANVAS,
    FORWARD_CANVAS,
    JACOBIAN,
    SEED,
    SHARED,
    RegionRunSpec,
    build_replica,
    make_batch,
    spawn_local,
)

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
