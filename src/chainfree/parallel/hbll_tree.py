"""Tree-parallel HBLL over torch.distributed: the members of every tree round split across ranks.

HBLL's step (chainfree.methods.hbll) is a sequence of *rounds*; each round applies k same-shape modules
(leaves or shortcuts) to k independent inputs. Single-process, a round is one batched (vmap) call. Here,
with W ranks (NCCL on GPU, gloo on CPU; one process per GPU, started by torchrun), a round's k members are
split into W contiguous chunks of ceil(k / W) rows of the persistent parameter stack, and rank r evaluates
only its chunk. Every rank holds a full replica of the parameters and runs the same control flow of
`HBLL.step` on the same batch; only `HBLLTree.apply` changes (it calls `TreePartition.apply`):

  forward   rank r evaluates its rows; the outputs are all-gathered (`_GatherRows`), so every rank holds
            every boundary state and the next round can start on any rank. One all_gather per round.
  backward  the cotangent of a gathered output is the same on every rank (everything after a round is
            computed redundantly), so `_GatherRows.backward` keeps its own rows, no communication. The
            input side (`_OwnRows`) all-gathers the input cotangents of the members, so the top-down
            messages delta (VJP rounds through the shortcuts) and the stem's gradient (leaf 0 keeps the stem
            in its graph) reach every rank: one all_gather per round that has inputs requiring grad.
  readouts  the readout CEs (`HBLLTree.readout_ce_many`: one item per boundary, vocabulary-sized for LMs, the
            largest GPU cost of a GPT step) are split by item (`TreePartition.split_loss`): rank r evaluates
            its share, the loss value is summed in the forward, and the cotangent of the readouts' inputs
            is all-reduced in the backward (`_SumGrad`), so every rank gets every item's gradient.
  gradients a stacked leaf/shortcut row gets its gradient only on the rank that evaluated it, a readout
            parameter a part on every rank; both are summed by `sync_gradients`. Everything computed
            redundantly (distillation MSE, head, final norm, stem) gets the same gradient on every rank and
            is averaged (identical up to floating-point order). Afterwards every rank holds the
            single-process gradient, so identical optimizer steps keep the replicas identical. The
            strategy does not average again (`TreeParallel.finish_gradients`).

Collectives inside backward (`_OwnRows`, `_SumGrad`) are matched across ranks because every rank builds the
same graph in the same order and the autograd engine runs nodes in decreasing creation order.

What runs concurrently: the rounds' block evaluations (leaves, shortcuts, their backward and the VJP
rounds) and the readout CEs. Redundant on every rank: the distillation losses, the head CE and the step's
Python control flow (its launch overhead is not divided by W).

The batch: tree parallelism is model parallelism, so all ranks need the same batch. The 'hbll_tree'
strategy (`TreeParallel`, what `HBLL.strategy` picks under torchrun) gives every rank the full global batch,
and `tree_parallel_step` broadcasts rank 0's batch anyway so that a caller passing per-rank batches still
gets one consistent step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from chainfree.errors import ConfigError


def tree_parallel_world() -> int:
    """World size of the initialised default process group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _chunk(k: int, rank: int, world: int) -> tuple[int, int, int]:
    """(start, stop, rows per rank) of rank's contiguous chunk of k rows; ranks past the end get none."""
    per = -(-k // world)
    start = min(rank * per, k)
    return start, min(start + per, k), per


def _all_gather_rows(own: torch.Tensor, k: int, per: int, world: int, group) -> torch.Tensor:
    """Concatenate every rank's rows (padded to `per` rows for the collective) and keep the first k."""
    if own.shape[0] < per:
        own = torch.cat([own, own.new_zeros((per - own.shape[0], *own.shape[1:]))])
    out = own.new_empty((world * per, *own.shape[1:]))
    dist.all_gather_into_tensor(out, own.contiguous(), group=group)
    return out[:k]


class _GatherRows(torch.autograd.Function):
    """Forward: all-gather every rank's output rows. Backward: this rank's rows of the (replicated)
    cotangent -- no communication, see the module docstring."""

    @staticmethod
    def forward(ctx, own: torch.Tensor, k: int, start: int, per: int, world: int, group) -> torch.Tensor:
        ctx.start, ctx.n = start, own.shape[0]
        return _all_gather_rows(own.detach(), k, per, world, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.start : ctx.start + ctx.n], None, None, None, None, None


class _OwnRows(torch.autograd.Function):
    """Forward: stack this rank's inputs out of all k. Backward: all-gather the input cotangents so every
    rank gets the gradient of every member's input (messages delta, the stem's gradient)."""

    @staticmethod
    def forward(ctx, meta: tuple, *xs: torch.Tensor) -> torch.Tensor:
        start, stop, per, world, group = meta
        ctx.meta = (len(xs), per, world, group)
        own = xs[start:stop]
        if own:
            return torch.stack(own)
        return xs[0].new_empty((0, *xs[0].shape))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k, per, world, group = ctx.meta
        full = _all_gather_rows(grad, k, per, world, group)
        return (None, *full.unbind(0))


class _SumGrad(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the cotangent over ranks. Put in front of a loss that
    each rank evaluates on its own share of items: every rank then gets the cotangent of all items."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


@dataclass
class TreePartition:
    """This rank's share of every round; installed on an HBLLTree for one step (`partitioned`)."""

    rank: int
    world: int
    group: object = None

    def apply(
        self, rows: list[int], xs: Sequence[torch.Tensor], run: Callable[[list[int], torch.Tensor], torch.Tensor]
    ) -> list[torch.Tensor]:
        """Evaluate the members at stack rows `rows` (sorted, one per input) on inputs xs, this rank's chunk
        only: run(own_rows, own_inputs [n, ...]) -> own outputs [n, ...]. Returns all k outputs, gathered."""
        k = len(rows)
        start, stop, per = _chunk(k, self.rank, self.world)
        meta = (start, stop, per, self.world, self.group)
        own_in = _OwnRows.apply(meta, *xs)
        if stop > start:
            own_out = run(rows[start:stop], own_in)
        else:  # no rows here this round: the shape of one output, without evaluating anything
            with torch.no_grad():
                probe = run(rows[:1], torch.stack([xs[0].detach()]))
            own_out = probe.new_empty((0, *probe.shape[1:])) + 0 * own_in.sum()
        return list(_GatherRows.apply(own_out, k, start, per, self.world, self.group).unbind(0))

    def share(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [start, stop) of n loss items (may be empty)."""
        start, stop, _ = _chunk(n, self.rank, self.world)
        return start, stop

    def split_loss(self, n: int, zs: torch.Tensor, loss_of: Callable[[int, int, torch.Tensor], torch.Tensor]):
        """Mean over n items of a loss, each rank evaluating only its share: loss_of(start, stop, zs[start:stop])
        is the mean over those items. The cotangent of zs is summed over ranks (`_SumGrad`), so every rank
        gets the gradient of every item; the returned value is the full mean (summed in the forward), its
        gradient this rank's part -- parameters read only here (the readouts) need their gradients summed."""
        start, stop = self.share(n)
        zs = _SumGrad.apply(zs, self.group)
        if stop > start:
            part = loss_of(start, stop, zs[start:stop]) * ((stop - start) / n)
        else:  # nothing here, but the backward all-reduce must still run on this rank
            part = (zs.sum() * 0).float()
        total = part.detach().clone()
        dist.all_reduce(total, group=self.group)
        return part + (total - part).detach()


@contextlib.contextmanager
def partitioned(tree: nn.Module, group=None) -> Iterator[TreePartition]:
    """Within the block, `tree.apply` evaluates only this rank's members of each round."""
    part = TreePartition(dist.get_rank(group), dist.get_world_size(group), group)
    tree.partition = part
    try:
        yield part
    finally:
        tree.partition = None


def sync_gradients(tree: nn.Module, group=None) -> None:
    """Sum the stacked leaf/shortcut gradients (each row computed on one rank) and the readouts' (split by
    item) over ranks, average the others (computed redundantly). A gradient absent on every rank stays
    absent (as in one process)."""
    world = dist.get_world_size(group)
    summed = {id(p) for st in (tree.leaf_stack, tree.shortcut_stack, tree.aux_stack) for p in st.parameters()}
    params = [p for p in tree.parameters() if p.requires_grad]
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
    for p, has in zip(params, present.tolist(), strict=True):
        if has and p.grad is None:
            p.grad = torch.zeros_like(p)
    for want_sum in (True, False):
        grads = [p.grad for p in params if p.grad is not None and (id(p) in summed) == want_sum]
        for dtype in sorted({g.dtype for g in grads}, key=str):  # same order on every rank (set order is not)
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])
            dist.all_reduce(flat, group=group)
            if not want_sum:
                flat /= world
            offset = 0
            for g in same:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def tree_parallel_step(
    step: Callable[[torch.Tensor, torch.Tensor], object],
    tree: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    group=None,
):
    """One HBLL step with the tree's rounds split across the ranks of `group`: rank 0's batch is
    broadcast, `step(inputs, targets)` (the single-process HBLL step) runs with `tree.apply` partitioned,
    and gradients are synchronised so that every rank ends with the single-process gradient."""
    # broadcast writes in place: into contiguous copies, not into the caller's batch
    inputs, targets = (t.clone(memory_format=torch.contiguous_format) for t in (inputs, targets))
    dist.broadcast(inputs, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    dist.broadcast(targets, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    with partitioned(tree, group):
        stats = step(inputs, targets)
    sync_gradients(tree, group)
    return stats


class TreeParallel:
    """Distribution strategy 'hbll_tree' (chainfree.training.strategies protocol): model parallel inside
    `HBLL.step`. Every rank draws the whole global batch, the step splits each round across the ranks and
    leaves the single-process gradient on every rank, so the optimizer, clipping, evaluation and checkpoints
    see identical replicas and need no communication of their own."""

    name = "hbll_tree"

    def __init__(self, launch: Any) -> None:
        self.launch = launch

    def batch_shard(self) -> tuple[int, int]:
        return (0, 1)

    def wrap(self, model: nn.Module, method: Any, device: torch.device) -> nn.Module:
        if not getattr(method, "tree_parallel", False):
            raise ConfigError(
                "train.strategy='hbll_tree' splits HBLL's tree rounds over torchrun's ranks: use method hbll with "
                "method.distributed='tree' (or 'auto') under torchrun --nproc_per_node >= 2"
            )
        return model

    def accumulating(self, step_model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def finish_gradients(self, model: nn.Module, method: Any) -> None:
        return None  # tree_parallel_step already left the single-process gradient on every rank

    def mean(self, value: float, device: torch.device) -> float:
        return value  # every rank computed the same loss on the same batch

    def checkpoint_views(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return model, optimizer
