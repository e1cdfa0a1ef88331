"""Distribution strategies: how one training step runs over the processes of a launch.

A Strategy owns everything the ranks must agree on, so the Trainer and the methods stay free of it:

  batch_shard()        which slice of the global batch this rank draws (rank, world) for the sampler
  wrap(model, method)  the module `method.step` receives (a DDP wrapper; FSDP2 shards in place)
  accumulating(model)  context for a micro-batch that is not the last of an optimizer step (no gradient
                       communication yet)
  finish_gradients(m)  after the last micro-batch: gradients a method computed outside autograd hooks are
                       averaged here
  mean(value)          a per-rank scalar (loss) averaged over the ranks that hold different data
  checkpoint_views(m, o)  (model-like, optimizer-like) objects whose state_dict()/load_state_dict() are the
                       full, unsharded states, called on every rank (gathering may be collective)

Bundled: 'single' (one process), 'ddp' (data parallel: DistributedDataParallel for autograd methods,
one flat all-reduce after the step for methods with their own backward), 'fsdp2'
(torch.distributed.fsdp.fully_shard per block and at the root, autograd methods only), 'replicated'
(model parallel inside the method's step: every rank sees the whole batch and the step syncs its own
gradients; the HBLL tree and LBI region strategies build on it). More register with
`register_strategy`. Which one runs: train.strategy, or the method's `strategy(launch)` when it is
'auto'.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from chainfree.errors import ConfigError
from chainfree.methods.base import Launch, Method


def launch_from_env() -> Launch:
    """The layout torchrun describes in the environment (a single process when WORLD_SIZE is unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Launch()
    return Launch(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(launch: Launch, device: torch.device) -> None:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU) once; nothing for one process."""
    if launch.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def close_process_group(wait: bool = True) -> None:
    """Leave the process group after the last collective: every rank waits for the others (`wait`), then the
    group is destroyed, so no rank exits while the backend's threads still run (gloo's then abort the process
    at interpreter exit, "terminate called without an active exception", and torchrun reports a finished run
    as failed). After an error pass wait=False: the other ranks may never reach the barrier."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


@runtime_checkable
class Strategy(Protocol):
    name: str
    launch: Launch

    def batch_shard(self) -> tuple[int, int]: ...

    def wrap(self, model: nn.Module, method: Method, device: torch.device) -> nn.Module: ...

    def accumulating(self, step_model: nn.Module) -> contextlib.AbstractContextManager[Any]: ...

    def finish_gradients(self, model: nn.Module, method: Method) -> None: ...

    def mean(self, value: float, device: torch.device) -> float: ...

    def checkpoint_views(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]: ...


class SingleDevice:
    """One process: the model as it is, no communication."""

    name = "single"

    def __init__(self, launch: Launch) -> None:
        self.launch = launch

    def batch_shard(self) -> tuple[int, int]:
        return (0, 1)

    def wrap(self, model: nn.Module, method: Method, device: torch.device) -> nn.Module:
        return model

    def accumulating(self, step_model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def finish_gradients(self, model: nn.Module, method: Method) -> None:
        return None

    def mean(self, value: float, device: torch.device) -> float:
        return value

    def checkpoint_views(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return model, optimizer


def allreduce_mean_grads(model: nn.Module, world_size: int) -> None:
    """Average `.grad` over ranks in one flat all-reduce (for methods whose backward DDP cannot hook)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def rank_mean(value: float, device: torch.device) -> float:
    """Mean of a per-rank scalar over all ranks (each rank holds an equal share of the global batch)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


class DataParallel(SingleDevice):
    """Each rank trains on its slice of the global batch; gradients are averaged over the ranks."""

    name = "ddp"

    def __init__(self, launch: Launch) -> None:
        super().__init__(launch)
        self._hooked = False

    def batch_shard(self) -> tuple[int, int]:
        return (self.launch.rank, self.launch.world_size)

    def wrap(self, model: nn.Module, method: Method, device: torch.device) -> nn.Module:
        if not self.launch.distributed:
            return model
        self._hooked = bool(method.uses_autograd_step)
        if not self._hooked:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def accumulating(self, step_model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        if isinstance(step_model, nn.parallel.DistributedDataParallel):
            return step_model.no_sync()
        return contextlib.nullcontext()

    def finish_gradients(self, model: nn.Module, method: Method) -> None:
        if self.launch.distributed and not self._hooked:
            allreduce_mean_grads(model, self.launch.world_size)

    def mean(self, value: float, device: torch.device) -> float:
        return rank_mean(value, device) if self.launch.distributed else value


class FullyShardedDataParallel(DataParallel):
    """FSDP2: parameters, gradients and optimizer state sharded over the ranks
    (torch.distributed.fsdp.fully_shard on every residual block -- chainfree blocks of every kind, a
    Hugging Face model's decoder layers -- then on the root, so the embedding, final norm and a tied head
    form one unit). Gradients are reduce-scattered in autograd hooks, so only methods whose
    step is autograd through the model qualify. Checkpoints hold the full, unsharded tensors, in the
    same layout as a single-process run's."""

    name = "fsdp2"

    def wrap(self, model: nn.Module, method: Method, device: torch.device) -> nn.Module:
        if not method.uses_autograd_step:
            raise ConfigError(
                f"train.strategy='fsdp2' shards gradients in autograd hooks, but method {method.name!r} computes "
                "its own backward; use train.strategy='ddp' or 'auto'"
            )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from chainfree.training.options import iter_blocks

        mesh = init_device_mesh(device.type, (self.launch.world_size,))
        blocks = list(iter_blocks(model))  # chainfree blocks of every kind, Hugging Face decoder layers
        if not blocks and isinstance(getattr(model, "blocks", None), nn.ModuleList):
            blocks = list(model.blocks)
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self._hooked = True
        return model

    def accumulating(self, step_model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return _fsdp_no_sync(step_model)

    def finish_gradients(self, model: nn.Module, method: Method) -> None:
        return None

    def checkpoint_views(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """Full-tensor views, gathered here on every rank (collective); loading scatters them back."""
        views = _FullModelState(model), _FullOptimizerState(optimizer)
        for view in views:
            view.gather()
        return views


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    set_sync = getattr(model, "set_requires_gradient_sync", None)
    if set_sync is None:
        yield
        return
    set_sync(False)
    try:
        yield
    finally:
        set_sync(True)


def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


class _FullModelState:
    """state_dict()/load_state_dict() of a fully_shard-ed model as full tensors (collective on all ranks)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._full: dict[str, torch.Tensor] | None = None

    def gather(self) -> None:
        """All-gather the full tensors now (every rank must call it, in the same order)."""
        self._full = {k: _full(v) for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._full is None:
            raise RuntimeError("_FullModelState.gather() must run on every rank before state_dict()")
        return self._full

    def load_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        current = self.model.state_dict()
        missing = sorted(set(current) - set(full))
        unexpected = sorted(set(full) - set(current))
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for key, target in current.items():
                value = full[key]
                if isinstance(target, DTensor):
                    local = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh,
                                              target.placements).to_local()
                    target.to_local().copy_(local)
                else:
                    target.copy_(value)


class _FullOptimizerState:
    """state_dict()/load_state_dict() of an optimizer over DTensor parameters as full tensors."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._full: dict[str, Any] | None = None

    def _params(self) -> list[Any]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def gather(self) -> None:
        """All-gather the full optimizer state now (every rank, same order: the state's parameter order)."""
        sd = self.optimizer.state_dict()
        state = {idx: {k: _full(v) for k, v in s.items()} for idx, s in sorted(sd["state"].items())}
        self._full = {"state": state, "param_groups": sd["param_groups"]}

    def state_dict(self) -> dict[str, Any]:
        if self._full is None:
            raise RuntimeError("_FullOptimizerState.gather() must run on every rank before state_dict()")
        return self._full

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = self._params()
        state = {}
        for idx, s in sd["state"].items():
            p = params[int(idx)]
            entry = {}
            for k, v in s.items():
                if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape:
                    v = distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements)
                entry[k] = v
            state[int(idx)] = entry
        self.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


class Replicated(SingleDevice):
    """Model parallel inside the step: every rank draws the whole global batch, the method's step splits
    the work across the ranks and leaves identical, already synced gradients everywhere."""

    name = "replicated"


STRATEGIES: dict[str, str] = {
    "single": "chainfree.training.strategies:SingleDevice",
    "ddp": "chainfree.training.strategies:DataParallel",
    "fsdp2": "chainfree.training.strategies:FullyShardedDataParallel",
    "replicated": "chainfree.training.strategies:Replicated",
    "hbll_tree": "chainfree.parallel.hbll_tree:TreeParallel",
    "lbi_region": "chainfree.parallel.region:RegionParallel",
}


# Strategies that wrap any autograd model; the others belong to a method and its step.
GENERIC_STRATEGIES = frozenset({"single", "ddp", "fsdp2", "replicated"})


def register_strategy(name: str, target: str) -> None:
    """Make `train.strategy = name` (or a method's `strategy()` answer) build `target` ('module:Class',
    constructed with the Launch)."""
    STRATEGIES[name] = target


def build_strategy(requested: str, method: Method, launch: Launch) -> Strategy:
    """The strategy for this run: `requested` (train.strategy) or, for 'auto', the method's choice."""
    preferred = method.strategy(launch)
    name = preferred if requested == "auto" else requested
    if name != preferred and preferred not in GENERIC_STRATEGIES:
        # The method's step is written for its own strategy (e.g. HBLL splits the tree's rounds across the
        # ranks and gives each the whole batch); under another one it would train on the wrong data.
        raise ConfigError(
            f"train.strategy={name!r} does not fit method {getattr(method, 'name', '?')!r}, which runs as "
            f"{preferred!r} under torchrun with these method settings; leave train.strategy=auto, or set "
            "method.distributed=data for plain data parallelism"
        )
    if name not in STRATEGIES:
        raise ConfigError(f"train.strategy {name!r} is unknown; choose one of auto, {', '.join(STRATEGIES)}")
    if name == "single" and launch.distributed:
        raise ConfigError(
            f"train.strategy='single' but torchrun started {launch.world_size} processes; use 'ddp' or 'auto'"
        )
    module, cls = STRATEGIES[name].split(":")
    strategy = getattr(importlib.import_module(module), cls)(launch)
    strategy.name = name
    return strategy
