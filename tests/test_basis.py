"""BASIS: exactness limits (float64), balance of the hash, shared draw, unbiasedness (statistical), norm
preservation, exact dX/db, compression, what autograd really saves, autocast, tied heads, and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chainfree.ops.basis_linear as bl
from chainfree.config import ModelConfig
from chainfree.errors import ConfigError
from chainfree.methods import build_method
from chainfree.methods.basis import apply
from chainfree.models.lm import LanguageModel
from chainfree.models.mlp import MLP
from chainfree.nn.basis import BasisLinear, BasisMLP
from chainfree.ops.basis_cross_entropy import basis_linear_cross_entropy
from chainfree.ops.basis_linear import basis_linear
from chainfree.ops.basis_sketch import (
    SketchPlan,
    draw_plan,
    resolve_rank,
    scaled_sketch,
    sketch,
    sketch_block_ref,
    sketch_ref,
)

f64 = torch.float64


def _problem(rows=12, n_in=5, n_out=4, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_in, generator=g, dtype=f64, requires_grad=True)
    w = torch.randn(n_out, n_in, generator=g, dtype=f64, requires_grad=True)
    b = torch.randn(n_out, generator=g, dtype=f64, requires_grad=True) if bias else None
    dy = torch.randn(rows, n_out, generator=g, dtype=f64)
    return x, w, b, dy


def _grads(x, w, b, dy, **kw):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    basis_linear(x, w, b, **kw).backward(dy)
    return x.grad.clone(), w.grad.clone(), None if b is None else b.grad.clone()


@pytest.mark.parametrize("rank", [12, 13, 1000])  # R = B, and R > B falls back to R = B
def test_full_rank_no_shrink_gives_exact_dw(rank):
    x, w, b, dy = _problem()
    exact = dy.T @ x.detach()
    _, dw, _ = _grads(x, w, b, dy, rank=rank, shrink=0.0, scalars=False)
    torch.testing.assert_close(dw, exact, rtol=1e-12, atol=1e-12)
    # with scalars gamma = ||M|| / (||M|| + 1e-8): relative error <= 1e-8 / ||M|| per factor
    _, dw, _ = _grads(x, w, b, dy, rank=rank, shrink=0.0, scalars=True)
    rtol = 1e-8 / float(x.detach().norm()) + 1e-8 / float(dy.norm()) + 1e-12
    torch.testing.assert_close(dw, exact, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("rank", [1, 3, 12])
def test_dx_and_db_always_exact(rank):
    x, w, b, dy = _problem(rows=12)
    dx, _, db = _grads(x, w, b, dy, rank=rank)
    torch.testing.assert_close(dx, dy @ w.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, dy.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows,rank", [(12, 5), (64, 8), (7, 7), (100, 1), (600, 300), (50, 13)])
def test_buckets_balanced_and_sketch_paths_agree(rows, rank):
    gen = torch.Generator().manual_seed(rows * 31 + rank)
    plan = draw_plan(rows, rank, "cpu", generator=gen)
    sizes = torch.bincount(plan.buckets(), minlength=plan.rank)
    assert sizes.numel() == plan.rank
    assert set(sizes.tolist()) <= {rows // rank, math.ceil(rows / rank)}
    assert int(sizes.min()) >= 1
    assert set(plan.signs.tolist()) <= {-1, 1}
    # within a group of R consecutive rows every bucket appears once
    h = plan.buckets()
    for g0 in range(0, rows - rank + 1, rank):
        assert sorted(h[g0:g0 + rank].tolist()) == list(range(rank))
    m = torch.randn(rows, 3, generator=gen, dtype=f64)
    S = plan.sign_matrix()
    dense = S @ m
    sk, stats, colsum = sketch_ref(m, plan.sign_bits, plan.shift_bits, plan.rank, with_colsum=True)
    torch.testing.assert_close(sk, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats[0], m.square().sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats[1], dense.square().sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(colsum, m.sum(0), rtol=1e-12, atol=1e-12)
    # S[h(j), j] = s_j: one nonzero per column, the row's bucket and sign
    assert torch.equal(S.abs().sum(0), torch.ones(rows, dtype=f64))
    assert torch.equal(S.abs().argmax(0), h)
    # chunked callers: block contributions and group-aligned sub-plans add up to the whole sketch
    cut = (rows // 2) // rank * rank or rows
    parts = sketch_block_ref(m[:cut], plan, 0) + (sketch_block_ref(m[cut:], plan, cut) if cut < rows else 0)
    torch.testing.assert_close(parts, dense, rtol=1e-12, atol=1e-12)
    if cut < rows:
        sub = plan.rows_slice(cut, rows)
        torch.testing.assert_close(sketch_ref(m[cut:], sub.sign_bits, sub.shift_bits, rank)[0], S[:, cut:] @ m[cut:])


def _record_plans(monkeypatch) -> list:
    """A live list of (width, plan) of every sketch the BASIS layers make: forward through draw_and_sketch (the
    draw and X's sketch in one call), backward through sketch."""
    seen = []
    real, real_draw = bl.sketch, bl.draw_and_sketch

    def recording(m, plan, with_colsum=False):
        seen.append((m.shape[1], plan))
        return real(m, plan, with_colsum)

    def recording_draw(m, rank):
        bits, sk, stats = real_draw(m, rank)
        seen.append((m.shape[1], SketchPlan.from_bits(bits, m.shape[0], min(rank, m.shape[0]))))
        return bits, sk, stats

    monkeypatch.setattr(bl, "sketch", recording)
    monkeypatch.setattr(bl, "draw_and_sketch", recording_draw)
    return seen


def test_same_draw_for_x_and_dy(monkeypatch):
    recorded = _record_plans(monkeypatch)
    x, w, b, dy = _problem(rows=20)
    torch.manual_seed(3)
    shrink = 0.01
    _, dw, _ = _grads(x, w, b, dy, rank=4, shrink=shrink, scalars=True)
    assert len(recorded) == 2  # forward sketches X, backward sketches dY
    (_, px), (_, pdy) = recorded
    assert torch.equal(px.shifts, pdy.shifts) and torch.equal(px.signs, pdy.signs) and px.rank == pdy.rank == 4
    # and dW is exactly the estimator's formula with that one draw
    S = px.sign_matrix()
    sx, sdy = S @ x.detach(), S @ dy
    gx, gdy = x.detach().norm() / (sx.norm() + 1e-8), dy.norm() / (sdy.norm() + 1e-8)
    expected = (1 - shrink) ** 2 * gx * gdy * (sdy.T @ sx)
    torch.testing.assert_close(dw, expected, rtol=1e-12, atol=1e-12)


def test_fresh_draw_every_step():
    x, w, b, dy = _problem(rows=20)
    torch.manual_seed(0)
    _, dw1, _ = _grads(x, w, b, dy, rank=4)
    _, dw2, _ = _grads(x, w, b, dy, rank=4)
    assert not torch.allclose(dw1, dw2)
    torch.manual_seed(0)
    _, dw1_again, _ = _grads(x, w, b, dy, rank=4)
    assert torch.equal(dw1, dw1_again)  # reproducible under torch.manual_seed


def _assert_unbiased(samples: torch.Tensor, exact: torch.Tensor, z: float = 5.0) -> None:
    """Every entry's mean within z standard errors (sample std / sqrt(n)) of the exact value.

    z = 5 with k entries: false-alarm probability <= k * 5.7e-7 under the CLT.
    """
    n = samples.shape[0]
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(n)
    assert bool((se > 0).all()), "estimator has zero variance: the test would be vacuous"
    zscores = (mean - exact).abs() / se
    assert float(zscores.max()) < z, f"max z-score {float(zscores.max()):.2f}"


def test_unbiased_without_scalars():
    x, w, b, dy = _problem(rows=12, n_in=3, n_out=2, seed=1)
    exact = dy.T @ x.detach()
    torch.manual_seed(1234)
    samples = torch.stack([_grads(x, w, b, dy, rank=3, shrink=0.0, scalars=False)[1] for _ in range(3000)])
    _assert_unbiased(samples, exact)
    # the same test does detect the bias the shrink introduces (factor (1-0.2)^2 = 0.64)
    shrunk = torch.stack([_grads(x, w, b, dy, rank=3, shrink=0.2, scalars=False)[1] for _ in range(3000)])
    with pytest.raises(AssertionError):
        _assert_unbiased(shrunk, exact)


def test_variance_matches_pairwise_collision_formula():
    """Var of the unscaled estimator = sum_{i != j} P(h_i = h_j) (A_ij^2 + A_ij A_ji), A_ij = dy_i x_j^T.

    The group-shift hash has P = 1/R across groups and 0 within a group; the sample variance of 4000 draws
    must match that prediction within 5 standard errors of a variance (sqrt(2/n) relative, Gaussian-ish).
    """
    x, w, b, dy = _problem(rows=12, n_in=2, n_out=2, seed=4)
    rank = 4
    xd = x.detach()
    torch.manual_seed(11)
    samples = torch.stack([_grads(x, w, b, dy, rank=rank, shrink=0.0, scalars=False)[1] for _ in range(4000)])
    A = torch.einsum("io,jn->ijon", dy, xd)  # A[i, j] = dy_i x_j^T
    group = torch.arange(12) // rank
    p = (group[:, None] != group[None, :]).to(f64) / rank
    predicted = torch.einsum("ij,ijon->on", p, A * A + A * A.transpose(0, 1))
    var = samples.var(0)
    rel = (var - predicted).abs() / predicted
    assert float(rel.max()) < 5 * math.sqrt(2 / 4000) * 3, (var, predicted)  # x3: heavy-ish tails of the draws


def test_scalars_restore_norms():
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(50, 7, generator=gen, dtype=f64)
    plan = draw_plan(50, 6, "cpu", generator=gen)
    torch.testing.assert_close(scaled_sketch(m, plan, True, 0.0).norm(), m.norm(), rtol=1e-9, atol=0)
    torch.testing.assert_close(scaled_sketch(m, plan, True, 0.01).norm(), 0.99 * m.norm(), rtol=1e-9, atol=0)
    # without scalars the sketch has its own norm (generally not ||m||)
    assert not torch.isclose(scaled_sketch(m, plan, False, 0.0).norm(), m.norm(), rtol=1e-6)


def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_input_is_not_saved():
    layer = BasisLinear(64, 32, rank=4).double()
    x = torch.randn(2, 50, 64, dtype=f64, requires_grad=True)
    y, saved = _saved_tensors(lambda: layer(x))
    assert not any(_shares_storage(t, x) for t in saved)
    assert not any(t.dim() == 2 and t.shape[0] == 100 for t in saved), [tuple(t.shape) for t in saved]
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(32, 64), (4, 64), (), (125,)])  # W, sketch, gamma, draw bits (B + B/R int32)
    y.sum().backward()


def test_compression_resolves_rank_from_rows():
    layer = BasisLinear(8, 4, compression=4).double()
    for batch, seq in ((2, 50), (3, 7)):
        x = torch.randn(batch, seq, 8, dtype=f64, requires_grad=True)
        y, saved = _saved_tensors(lambda x=x: layer(x))
        sketches = [t for t in saved if t.dim() == 2 and t.shape[1] == 8 and t is not layer.weight]
        assert [t.shape[0] for t in sketches] == [math.ceil(batch * seq / 4)]
        y.sum().backward()
    assert resolve_rank(16384, None, 512) == 32 and resolve_rank(100, None, 3) == 34
    assert resolve_rank(10, 32, None) == 10 and resolve_rank(10, None, 1e9) == 1
    # compression 1 is R = B: exact dW at shrink 0
    x, w, b, dy = _problem(rows=12)
    _, dw, _ = _grads(x, w, b, dy, compression=1, shrink=0.0, scalars=False)
    torch.testing.assert_close(dw, dy.T @ x.detach(), rtol=1e-12, atol=1e-12)


def test_compression_config_boundary():
    method = build_method("basis", {"compression": "8"})
    assert method.config.compression == 8.0 and method.config.rank is None
    model, _ = _tiny_lm()
    method.prepare(model)
    assert model.blocks[0].mlp.compression == 8.0 and model.head.compression == 8.0
    assert build_method("basis", {}).config.sketch_kwargs()["rank"] == 32  # neither given: rank 32
    with pytest.raises(ConfigError, match="one of method.rank .* or method.compression"):
        build_method("basis", {"rank": 4, "compression": 8})
    with pytest.raises(ConfigError, match="compression must be a number >= 1"):
        build_method("basis", {"compression": 0.5})
    with pytest.raises(ConfigError, match="not both"):
        apply(_tiny_lm()[0], rank=4, compression=8)


def _ln_mlp_saved(mode: str, dtype=f64, autocast: bool = False):
    """Saved tensors of LN -> MLP for 30 rows, d=16, hidden 64, with the MLP exact / 2 x BasisLinear / fused."""
    torch.manual_seed(0)
    ln, mlp = nn.LayerNorm(16).to(dtype), MLP(16, 64).to(dtype)
    if mode == "linears":
        mlp.up = BasisLinear.from_linear(mlp.up, rank=4)
        mlp.down = BasisLinear.from_linear(mlp.down, rank=4)
    captured = {}
    ln.register_forward_hook(lambda m, i, o: captured.__setitem__("ln_out", o))
    if mode == "fused":  # GELU runs inside the Function: h and gelu(h) never reach autograd
        mlp = BasisMLP(mlp, rank=4)
    else:
        mlp.act.register_forward_hook(lambda m, i, o: captured.update(h=i[0], gelu_out=o))
    x = torch.randn(3, 10, 16, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, saved = _saved_tensors(lambda: mlp(ln(x)))
    out.float().sum().backward()
    # tensors with one entry per row and feature (B = 30 rows), i.e. what grows with the batch
    rowwise = [t for t in saved if t.numel() >= 30 * 16 and (t.shape[:2] == (3, 10) or t.shape[0] == 30)]
    keeps = {k: any(_shares_storage(t, v) for t in saved) for k, v in captured.items()}
    return keeps, sorted(tuple(t.shape) for t in rowwise)


def test_mlp_saved_tensors():
    """What autograd really saves (saved_tensors_hooks) for exact, two BasisLinear and the fused MLP."""
    keeps, rowwise = _ln_mlp_saved("exact")  # the check sees what exact backprop keeps
    assert keeps == {"ln_out": True, "h": True, "gelu_out": True}
    keeps, rowwise = _ln_mlp_saved("linears")  # two BasisLinear: LN input x and h remain
    assert keeps == {"ln_out": False, "h": True, "gelu_out": False}
    assert rowwise == [(3, 10, 16), (3, 10, 64)]
    keeps, rowwise = _ln_mlp_saved("fused")  # fused: LN input x and u (= LN output in float64) only
    assert rowwise == [(3, 10, 16), (30, 16)]
    keeps, rowwise = _ln_mlp_saved("fused", torch.float32, autocast=True)  # bf16 copy of u, LN output freed
    assert keeps == {"ln_out": False}
    assert rowwise == [(3, 10, 16), (30, 16)]


def test_autocast_bf16_cpu_matches_linear():
    torch.manual_seed(0)
    ref = nn.Linear(32, 16)
    layer = BasisLinear.from_linear(nn.Linear(32, 16), rank=8)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(4, 24, 32)
    xr, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yr, yb = ref(xr), layer(xb)
    assert yb.dtype == yr.dtype == torch.bfloat16
    assert torch.equal(yb, yr)
    g = torch.randn_like(yr)
    yr.backward(g)
    yb.backward(g)
    assert xb.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(xb.grad, xr.grad, rtol=1e-2, atol=1e-2)  # both bf16 GEMMs, same inputs
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-2, atol=1e-2)
    assert torch.isfinite(layer.weight.grad).all()


def test_no_grad_is_plain_linear():
    layer = BasisLinear(8, 4, rank=2)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def _tiny_lm(tie=True, dtype=f64):
    cfg = ModelConfig(vocab_size=40, seq_len=8, d_model=16, n_layers=2, n_heads=2, tie_embeddings=tie)
    torch.manual_seed(0)
    return LanguageModel(cfg).to(dtype), cfg


def test_apply_swaps_paper_layers_and_keeps_state_dict_and_tie():
    model, _ = _tiny_lm()
    keys = list(model.state_dict())
    exact_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply(model, rank=4)
    swapped = sorted(n for n, m in model.named_modules() if isinstance(m, BasisLinear | BasisMLP))
    assert swapped == ["blocks.0.mlp", "blocks.1.mlp", "head"]
    assert list(model.state_dict()) == keys
    model.load_state_dict(exact_state)  # checkpoints load either way
    assert model.head.weight is model.embed.weight
    apply(model, rank=2, layers=["*.attn.*_proj"])
    assert isinstance(model.blocks[1].attn.qkv_proj, BasisLinear) and model.blocks[1].attn.qkv_proj.rank == 2
    with pytest.raises(ConfigError, match="fused BasisMLP"):
        apply(model, layers=["*.mlp.up"], fuse_mlp=False)
    unfused, _ = _tiny_lm()
    apply(unfused, rank=4, fuse_mlp=False)
    assert isinstance(unfused.blocks[0].mlp.up, BasisLinear) and isinstance(unfused.blocks[0].mlp.down, BasisLinear)
    assert list(unfused.state_dict()) == keys


@pytest.mark.parametrize("tie,fuse", [(True, True), (False, True), (True, False)])
def test_full_rank_model_grads_match_exact_including_tied_head(tie, fuse):
    """Every BASIS layer (fused or split MLP, attention, chunked-CE head) at R >= B, shrink 0: exact grads."""
    exact, cfg = _tiny_lm(tie)
    basis, _ = _tiny_lm(tie)
    apply(basis, rank=1000, shrink=0.0, scalars=False, layers=["*.mlp.*", "*.attn.*_proj", "head"], fuse_mlp=fuse)
    ids = torch.randint(0, cfg.vocab_size, (3, 8), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, cfg.vocab_size, (3, 8), generator=torch.Generator().manual_seed(2))
    exact(ids, tgt).backward()
    basis(ids, tgt).backward()
    for (name, pe), (_, pb) in zip(exact.named_parameters(), basis.named_parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pe.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("chunk_rows", [3, 4])  # 4: chunks on group boundaries (sub-plans); 3: block index-add
def test_head_cross_entropy_sketch_unbiased(chunk_rows):
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(10, 3, generator=gen, dtype=f64, requires_grad=True)
    w = torch.randn(5, 3, generator=gen, dtype=f64, requires_grad=True)
    t = torch.randint(0, 5, (10,), generator=gen)
    exact = torch.autograd.grad(F.cross_entropy(h @ w.T, t), w)[0]
    torch.manual_seed(99)
    samples = torch.stack([
        torch.autograd.grad(basis_linear_cross_entropy(h, w, None, t, rank=2, shrink=0.0, scalars=False,
                                                       chunk_rows=chunk_rows), w)[0]
        for _ in range(1200)
    ])
    _assert_unbiased(samples, exact)
    dh = torch.autograd.grad(basis_linear_cross_entropy(h, w, None, t, rank=2), h)[0]
    torch.testing.assert_close(dh, torch.autograd.grad(F.cross_entropy(h @ w.T, t), h)[0], rtol=1e-12, atol=1e-12)
    full = torch.autograd.grad(basis_linear_cross_entropy(h, w, None, t, rank=10, shrink=0.0, scalars=False,
                                                          chunk_rows=chunk_rows), w)[0]
    torch.testing.assert_close(full, exact, rtol=1e-12, atol=1e-12)


def test_method_registry_and_config():
    method = build_method("basis", {"rank": 8, "shrink": 0.0, "layers": "*.mlp.up,head"})
    model, _ = _tiny_lm()
    method.prepare(model)
    assert isinstance(model.blocks[0].mlp.up, BasisLinear) and model.blocks[0].mlp.up.rank == 8
    assert not isinstance(model.blocks[0].mlp.down, BasisLinear)
    with pytest.raises(dataclass_frozen_error()):
        method.config.rank = 3  # frozen: validated once, never changed behind the validation


def dataclass_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_errors():
    model, _ = _tiny_lm()
    with pytest.raises(ConfigError, match="rank"):
        apply(model, rank=0)
    with pytest.raises(ConfigError, match="shrink"):
        apply(model, rank=4, shrink=1.0)
    with pytest.raises(ConfigError, match=r"no nn.Linear layer was selected.*blocks.0.attn.qkv_proj"):
        apply(model, layers=["*.conv"])
    with pytest.raises(ConfigError, match=r"\['\*.conv'\] match no nn.Linear.*blocks.0.attn.qkv_proj"):
        apply(model, layers=["*.mlp.*", "*.conv"])  # a typo among good patterns is refused too
    with pytest.raises(ConfigError, match="non-empty"):
        apply(model, layers=[])
    with pytest.raises(ConfigError, match="method.*rank"):
        build_method("basis", {"rank": -3})
    with pytest.raises(ConfigError, match="rnak"):
        build_method("basis", {"rnak": 3})
    with pytest.raises(ConfigError, match="rank"):
        BasisLinear(4, 4, rank=0)
    with pytest.raises(ConfigError, match="not both"):
        apply(model, layers=["head"], filter_fn=lambda m, n: True)
    with pytest.raises(ValueError, match="rows"):
        sketch(torch.zeros(5, 2), draw_plan(6, 2, "cpu"))


def test_language_model_bf16_autocast_smoke():
    """Whole LM (fused MLP + sketched chunked-CE head, tied) under CPU bf16 autocast: finite fp32 grads."""
    model, cfg = _tiny_lm(dtype=torch.float32)
    apply(model, compression=4)
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, ids)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


def test_fused_mlp_same_draw_per_layer_and_unbiased(monkeypatch):
    """Each fused projection uses one draw for its input and its output gradient; dW1, dW2 unbiased."""
    seen = _record_plans(monkeypatch)
    torch.manual_seed(0)
    mlp = BasisMLP(MLP(3, 4).double(), rank=2, shrink=0.0, scalars=False)
    u = torch.randn(8, 3, dtype=f64, requires_grad=True)
    dy = torch.randn(8, 3, dtype=f64)
    ref = MLP(3, 4).double()
    ref.load_state_dict({k: v for k, v in mlp.state_dict().items()})
    u_ref = u.detach().clone().requires_grad_()
    ref(u_ref).backward(dy)
    samples = {"up": [], "down": []}
    for _ in range(2500):
        seen.clear()
        mlp.zero_grad()
        u.grad = None
        mlp(u).backward(dy)
        samples["up"].append(mlp.up.weight.grad.clone())
        samples["down"].append(mlp.down.weight.grad.clone())
    torch.testing.assert_close(u.grad, u_ref.grad, rtol=1e-12, atol=1e-12)  # du exact
    torch.testing.assert_close(mlp.up.bias.grad, ref.up.bias.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mlp.down.bias.grad, ref.down.bias.grad, rtol=1e-12, atol=1e-12)
    # forward sketches u (width 3) then gelu(h) (width 4); backward sketches dh (width 4) and dy (width 3)
    (_, up_fwd), (_, down_fwd) = seen[:2]
    backward = {width: plan for width, plan in seen[2:]}
    up_bwd, down_bwd = backward[4], backward[3]
    assert torch.equal(up_fwd.shifts, up_bwd.shifts) and torch.equal(up_fwd.signs, up_bwd.signs)
    assert torch.equal(down_fwd.shifts, down_bwd.shifts) and torch.equal(down_fwd.signs, down_bwd.signs)
    _assert_unbiased(torch.stack(samples["up"]), ref.up.weight.grad)
    _assert_unbiased(torch.stack(samples["down"]), ref.down.weight.grad)


def test_sketch_custom_op_outputs_never_alias_inputs_or_each_other(monkeypatch):
    """The fused kernel packs stats, column sums and a split sketch into one buffer; under torch.compile the
    custom op must still return separate tensors (torch refuses aliased custom-op outputs at run time)."""
    import chainfree.ops.basis_sketch as bs

    def packed(m, sign_bits, shift_bits, rank, with_colsum):  # one buffer, the sketch after stats: misaligned
        n_col = m.shape[1] if with_colsum else 0
        buf = torch.zeros(2 + n_col + rank * m.shape[1])
        return buf[2 + n_col:].view(rank, m.shape[1]), buf[:2], buf[2:2 + n_col]

    monkeypatch.setattr(bs, "_sketch_impl", packed)
    m = torch.randn(8, 3)
    bits = torch.zeros(1, dtype=torch.int32)
    for with_colsum in (True, False):
        sk, stats, colsum = torch.ops.chainfree.basis_sketch(m, bits, bits, 4, with_colsum)
        ptrs = [t.untyped_storage().data_ptr() for t in (sk, stats) + ((colsum,) if with_colsum else ())]
        assert len(set(ptrs)) == len(ptrs) and m.untyped_storage().data_ptr() not in ptrs
        assert all(t.storage_offset() * t.element_size() % 16 == 0 for t in (sk, stats, colsum))
        assert sk.shape == (4, 3) and stats.shape == (2,) and colsum.shape == ((3,) if with_colsum else (0,))


def test_two_compiled_basis_models_with_different_compression_in_one_process(one_thread):
    """torch.compile of the same block code with compression 2 and then 8 must specialise on the value (a
    symbolic compression reaches randint's size and dynamo refuses it)."""
    from chainfree.bench.basis_bench import seeded_model
    from chainfree.config import load_config
    from chainfree.methods import method_from_config
    from chainfree.training import Trainer

    torch._dynamo.reset()
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    for compression in (2, 8):
        cfg = load_config(None, ["model.kind=gpt", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
                                 "model.seq_len=16", "model.vocab_size=64", "train.batch_size=4", "train.device=cpu",
                                 "train.dtype=fp32", "method.name=basis", f"method.compression={compression}",
                                 "method.layers=*.mlp.*,*.attn.*_proj", "method.fuse_mlp=false", "train.compile=true"])
        trainer = Trainer(cfg.train, method_from_config(cfg), device=torch.device("cpu"))
        state = trainer.setup(seeded_model(cfg, torch.device("cpu")))
        assert math.isfinite(trainer.train_step(state, (x[:, :-1], x[:, 1:])).loss)
