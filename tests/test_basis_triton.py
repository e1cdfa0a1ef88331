"""The fused Triton sketch against its PyTorch twin (CPU under TRITON_INTERPRET=1, or CUDA), the autograd
Functions on the kernel path, and BASIS layers under torch.compile (traced whole: no graph breaks)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import chainfree.ops.basis_sketch as bs
from chainfree.models.mlp import MLP
from chainfree.nn.basis import BasisLinear, BasisMLP
from chainfree.ops.basis_linear import basis_linear
from chainfree.ops.basis_sketch import draw_plan, sketch_ref

triton_runs = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not triton_runs, reason="needs triton with CUDA (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("rows,width,rank", [(300, 200, 7), (64, 64, 64), (1000, 130, 1), (37, 5, 100),
                                             (513, 70, 32), (700, 65, 300)])
def test_triton_sketch_matches_reference(rows, width, rank):
    from chainfree.ops.basis_sketch_triton import sketch_triton

    gen = torch.Generator().manual_seed(rows + width + rank)
    plan = draw_plan(rows, rank, "cpu", generator=gen)
    m = torch.randn(rows, width, generator=gen)
    sign_bits, shift_bits = plan.sign_bits.to(DEVICE), plan.shift_bits.to(DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        md = m.to(dtype)
        ref = sketch_ref(md.double(), plan.sign_bits, plan.shift_bits, plan.rank, with_colsum=True)  # float64 truth
        sk, stats, colsum = (t.cpu().double() for t in sketch_triton(md.to(DEVICE), sign_bits, shift_bits, plan.rank,
                                                                     with_colsum=True))
        assert sk.shape == (plan.rank, width)
        tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: one rounding of the float32 sum
        torch.testing.assert_close(sk, ref[0], rtol=tol, atol=tol * float(ref[0].abs().max()))
        torch.testing.assert_close(stats, ref[1], rtol=1e-5, atol=0)
        torch.testing.assert_close(colsum, ref[2], rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not triton_runs, reason="needs triton with CUDA (or TRITON_INTERPRET=1)")
def test_functions_on_kernel_path_full_rank_exact(monkeypatch):
    """Through the autograd Functions with the kernel forced (CPU interpreter too): R = B, shrink 0 is exact."""
    monkeypatch.setattr(bs, "supports", lambda m: [] if m.dtype != torch.float64 else ["float64"])
    assert bs._triton_sketch() is not None
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(40, 9, generator=gen), torch.randn(40, 6, generator=gen)
    w, b = torch.randn(6, 9, generator=gen), torch.randn(6, generator=gen)
    x, dy, w, b = (t.to(DEVICE) for t in (x, dy, w, b))
    w.requires_grad_(), b.requires_grad_()
    basis_linear(x, w, b, rank=40, shrink=0.0, scalars=False).backward(dy)
    torch.testing.assert_close(w.grad, dy.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, dy.sum(0), rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    mlp, ref = MLP(9, 12).to(DEVICE), MLP(9, 12).to(DEVICE)
    ref.load_state_dict(mlp.state_dict())
    fused = BasisMLP(mlp, rank=40, shrink=0.0, scalars=False)
    dy_mlp = torch.randn(40, 9, device=DEVICE)
    fused(x).backward(dy_mlp)
    ref(x).backward(dy_mlp)
    for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break: the draw, the custom-op sketch and the Function all trace."""
    torch.manual_seed(0)
    mlp = BasisMLP(MLP(8, 16), rank=4)
    head = BasisLinear(8, 5, compression=3)

    def step(x):
        return head(mlp(x)).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 6, 8)
    loss = compiled(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in [*mlp.parameters(), *head.parameters()])
    torch._dynamo.reset()


GEMMS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default")


def _matmul_dtypes(fn, *args) -> set[tuple[str, str]]:
    """(graph, dtype) of every mm/addmm/bmm in the forward and backward graphs AOTAutograd builds for fn."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen: set[tuple[str, str]] = set()

    def inspect(tag):
        def compiler(gm, example_inputs):
            for n in gm.graph.nodes:
                if n.op == "call_function" and str(n.target) in GEMMS:
                    seen.update((tag, str(a.meta["val"].dtype)) for a in n.args
                                if isinstance(a, torch.fx.Node) and "val" in a.meta)
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    loss = torch.compile(fn, backend=aot_autograd(fw_compiler=inspect("fw"), bw_compiler=inspect("bw")),
                         fullgraph=True)(*args)
    loss.backward()
    torch._dynamo.reset()
    return seen


def test_compiled_layers_keep_the_autocast_dtype_after_the_first():
    """Compiled under autocast, every BASIS layer runs its GEMMs in the autocast dtype, not only the first.

    Regression: the Functions used to run their bodies under `torch.autocast(enabled=False)`; while dynamo
    traced a Function, that context switched autocast off for the rest of the trace, so every later layer
    read 'autocast off' and compiled its GEMMs in float32 (on an H200: 4x slower than eager).
    """
    torch.manual_seed(0)
    first = BasisLinear(8, 8, bias=False, compression=2)
    mlp = BasisMLP(MLP(8, 16), rank=4)
    last = BasisLinear(8, 8, compression=2)
    unfused = MLP(8, 16)
    unfused.up = BasisLinear.from_linear(unfused.up, rank=4)
    unfused.down = BasisLinear.from_linear(unfused.down, rank=4)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = last(unfused(torch.nn.functional.layer_norm(mlp(first(x)), (8,))))
        return y.float().square().sum()

    seen = _matmul_dtypes(step, torch.randn(2, 6, 8, requires_grad=True))
    assert {tag for tag, _ in seen} == {"fw", "bw"}
    assert {dtype for _, dtype in seen} == {"torch.bfloat16"}, seen


def test_compiled_gradients_equal_eager_gradients_from_the_same_rng_state():
    """Inductor-compiled BASIS computes the eager step's weight gradients exactly (same draws, same pairing).

    Regression: with the draw a separate op, the compiler merged equal-looking draws of different layers
    (CSE) and recomputed a layer's draw in backward (min-cut partitioner) when its input was cheap to
    recompute, so that layer sketched dY under a different hash than X: wrong gradients, no error. Four
    layers with equal row counts, one fed by a layer norm (cheap to recompute); unfused and fused GELU MLP,
    fused SwiGLU."""
    import copy

    from chainfree.methods import basis

    class SwiGLU(torch.nn.Module):
        def __init__(self, d, hidden):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(d, hidden), torch.nn.Linear(d, hidden)
            self.down_proj, self.act_fn = torch.nn.Linear(hidden, d), torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class Net(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.a, self.mlp, self.b = torch.nn.Linear(16, 16), mlp, torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.b(torch.nn.functional.layer_norm(self.mlp(self.a(x)), (16,)))

    for fuse, mlp in ((False, MLP), (True, MLP), (True, SwiGLU)):
        torch.manual_seed(0)
        net = Net(mlp(16, 32))
        basis.apply(net, basis.BasisConfig(compression=8, fuse_mlp=fuse, layers=["a", "b", "mlp.*"]))
        twin = copy.deepcopy(net)
        x, dy = torch.randn(64, 16), torch.randn(64, 16)
        torch._dynamo.reset()
        compiled = torch.compile(twin, backend="inductor")
        for step in range(2):  # the first call compiles, the second replays
            for p in (*net.parameters(), *twin.parameters()):
                p.grad = None
            torch.manual_seed(10 + step)
            net(x).backward(dy)
            torch.manual_seed(10 + step)
            compiled(x).backward(dy)
            for (name, p), q in zip(twin.named_parameters(), net.parameters(), strict=True):
                # float32 reassociation by inductor: ~1e-7 of the largest entry; a wrong pairing is O(1)
                err = float((p.grad - q.grad).abs().max() / q.grad.abs().max())
                assert err < 1e-5, f"{type(net.mlp).__name__} step {step} {name}: {err:.2e}"
    torch._dynamo.reset()


def test_compiled_draw_is_the_eager_draw():
    """Under torch.compile the draw is the eager randint (an opaque op): same bits from the same RNG state."""
    from chainfree.ops.basis_sketch import draw_bits

    def draw(x):
        return draw_bits(x.shape[0], 7, x.device, like=x) + 0

    torch._dynamo.reset()
    compiled = torch.compile(draw, backend="inductor", fullgraph=True)
    x = torch.zeros(50)
    torch.manual_seed(3)
    want = [draw(x) for _ in range(2)]
    torch.manual_seed(3)
    got = [compiled(x) for _ in range(2)]
    torch._dynamo.reset()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(got[0], got[1])  # a fresh draw per call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_cpu_reference_in_training_shapes():
    """The kernel on the GPU for GPT-2-small-like shapes at several compressions (bf16)."""
    from chainfree.ops.basis_sketch_triton import sketch_triton

    for rows, width, rank in ((4096, 768, 32), (4096, 3072, 512), (4096, 768, 2048), (4100, 96, 8)):
        plan = draw_plan(rows, rank, "cuda")
        m = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
        ref = sketch_ref(m.double(), plan.sign_bits, plan.shift_bits, plan.rank, True)
        got = sketch_triton(m, plan.sign_bits, plan.shift_bits, plan.rank, True)
        torch.testing.assert_close(got[0].double(), ref[0], rtol=8e-3, atol=8e-3 * float(ref[0].abs().max()))
        for a, b in zip(got[1:], ref[1:], strict=True):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-3)
