"""HBLL: hierarchical block-local learning -- a training step whose critical path is O(log N) blocks.

Our construction (derivation, measurements and limits in docs/hbll.md), built from the HBLL abstract and
its predecessor, block-local learning: the model's N residual layers are grouped into M = N / block_size
leaf blocks (M a power of two) under a binary tree (chainfree.models.hbll_tree.HBLLTree). Every tree node
owns a shortcut (a copy of `shortcut_layers` layers) estimating the state at its span's right boundary from
the state at its left boundary; every boundary has a small readout.

One step (`HBLL.step`), every round one batched call of same-shape modules:
  prefix rounds   leaf inputs m_j by composing the shortcuts of the binary decomposition of j (log2 M
                  rounds); with `pair_leaves` the last round runs the even leaves themselves and odd leaf
                  2i+1 reads the true F_2i(m_2i).
  corrections     optional Jacobi sweeps m_{j+1} <- F_j(m_j) (no graph), each at most block_size deep.
  leaf round      every leaf on its detached input, plus the shortcuts not on a prefix path.
  suffix rounds   top-down messages delta_b = d(-log p(y | z_b)) / d z_b by VJPs through the right-child
                  shortcuts (never through a leaf), log2 M rounds, from delta_M of the head.
  local backward  one backward of independent local terms: leaf i gets <F_i(m_i), global_weight *
                  delta_{i+1}> (the gradient of the Gaussian match to the posterior mean m - s^2 delta) plus
                  its readout CE (`aux_weight`); shortcuts are distilled onto their span's last leaf output
                  (relative squared error, so growing residual streams do not let them dominate the global
                  clip norm) plus a readout CE (`shortcut_aux_weight`: every tree cut is a classifier).
Critical path (counted by the step, layer evaluations, block_size = shortcut_layers = 1): 2 log2 N + 2,
against 2 N for backprop.

Distributed: under torchrun (world > 1) with `distributed` 'tree'/'auto' the rounds' members are split
across ranks (chainfree.parallel.hbll_tree); 'data' trains the whole tree per rank on its batch shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from chainfree.errors import ConfigError
from chainfree.methods.base import Launch, Method, StepStats
from chainfree.models.hbll_tree import FlatTree, HBLLTree


@dataclass
class HBLLConfig:
    """Parameters of HBLL (`method.<key>`)."""

    block_size: int = 1  # layers per leaf block; n_layers / block_size must be a power of two
    shortcut_layers: int = 1  # layers in every node's shortcut network
    aux_weight: float = 1.0  # leaf readout CE (local likelihood term)
    global_weight: float = 0.1  # weight s^2 of the top-down message (suffix VJPs through the shortcuts)
    shortcut_weight: float = 1.0  # shortcut distillation onto its span's last leaf output
    shortcut_aux_weight: float = 0.1  # readout CE of each shortcut output (keeps sub-networks usable)
    corrections: int = 0  # Jacobi sweeps m_{j+1} <- F_j(m_j) after the tree (each adds block_size)
    pair_leaves: bool = True  # odd leaf 2i+1 reads even leaf 2i's true output (replaces level-0 prefix shortcuts)
    aux_head: str = "auto"  # 'linear' (own Linear per boundary), 'shared' (detached model head), 'auto'
    parallel: str = "auto"  # 'vmap' (one batched call per round), 'loop' (reference), 'auto' (vmap on GPU)
    eval_path: str = "chain"  # inference: 'chain' (all leaves in order) or 'tree' (log-depth path)
    # under torchrun (world > 1): 'tree' splits every round's members across ranks (chainfree.parallel.hbll_tree;
    # all ranks one batch), 'data' runs the whole tree per rank on its shard (data parallel); 'auto' = 'tree'
    distributed: str = "auto"

    def validate(self) -> None:
        if self.block_size < 1:
            raise ConfigError("method.block_size must be >= 1")
        if self.shortcut_layers < 1:
            raise ConfigError("method.shortcut_layers must be >= 1")
        if self.corrections < 0:
            raise ConfigError(f"method.corrections must be >= 0, got {self.corrections}")
        if not isinstance(self.pair_leaves, bool):
            raise ConfigError(f"method.pair_leaves must be true or false, got {self.pair_leaves!r}")
        for key in ("aux_weight", "global_weight", "shortcut_weight", "shortcut_aux_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key} must be >= 0")
        if self.aux_head not in ("auto", "linear", "shared"):
            raise ConfigError("method.aux_head must be 'auto', 'linear' or 'shared'")
        if self.parallel not in ("auto", "vmap", "loop"):
            raise ConfigError("method.parallel must be 'auto', 'vmap' or 'loop'")
        if self.eval_path not in ("chain", "tree"):
            raise ConfigError("method.eval_path must be 'chain' or 'tree'")
        if self.distributed not in ("auto", "tree", "data"):
            raise ConfigError(f"method.distributed must be 'auto', 'tree' or 'data', got {self.distributed!r}")


# ------------------------------------------------------------------------------------------------- method
class HBLL(Method):
    """Hierarchical block-local learning (our construction; see the module docstring)."""

    name = "hbll"
    Config = HBLLConfig
    uses_autograd_step = False

    def prepare(self, model: nn.Module) -> nn.Module:
        if isinstance(model, HBLLTree):
            return model
        for attr in ("embed", "blocks", "norm", "head", "loss"):
            if not hasattr(model, attr):
                raise ConfigError(
                    f"HBLL needs a model with .{attr} (embed -> blocks -> norm -> head); got {type(model).__name__}"
                )
        return HBLLTree(model, self.config)

    def eval_loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(inputs, targets)

    @property
    def tree_parallel(self) -> bool:
        """True when the tree's rounds are split across the ranks of torch.distributed (world > 1)."""
        from chainfree.parallel.hbll_tree import tree_parallel_world

        return self.config.distributed != "data" and tree_parallel_world() > 1

    def strategy(self, launch: Launch) -> str:
        """Tree-parallel rounds over the ranks (every rank gets the whole batch, the step syncs gradients
        itself) unless method.distributed='data' asks for plain data parallelism."""
        if launch.distributed and self.config.distributed != "data":
            return "hbll_tree"
        return super().strategy(launch)

    def step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        tree = model if isinstance(model, HBLLTree) else None
        if tree is None:
            raise ConfigError("HBLL.step needs the model returned by HBLL.prepare (an HBLLTree)")
        if tree.partition is None and self.tree_parallel:  # rounds split across ranks; the same step inside
            from chainfree.parallel.hbll_tree import tree_parallel_step

            return tree_parallel_step(lambda x, y: self.step(tree, x, y), tree, inputs, targets)
        cfg, m, levels = self.config, tree.n_leaves, tree.levels
        bs, sl = cfg.block_size, cfg.shortcut_layers
        depth: dict[str, int] = {}  # critical-path bookkeeping, in sequential layer evaluations

        # -- prefix rounds: inputs of all leaves via binary decomposition (log2 M rounds) ----------------
        z0 = tree.stem(inputs)
        h: list[torch.Tensor | None] = [z0.detach()] + [None] * (m - 1)
        hd = [0] * m
        sc_out: dict[tuple[int, int], torch.Tensor] = {}
        sc_in_depth: dict[tuple[int, int], int] = {}
        pair = cfg.pair_leaves
        for lv in range(levels - 1, 0 if pair else -1, -1):
            ks = list(range(0, m >> lv, 2))
            outs = tree.apply([tree.shortcut((lv, k)) for k in ks], [h[k << lv] for k in ks])
            for k, out in zip(ks, outs, strict=True):
                j = (k + 1) << lv
                sc_out[(lv, k)], sc_in_depth[(lv, k)] = out, hd[k << lv]
                h[j], hd[j] = out.detach(), hd[k << lv] + sl

        # -- paired leaves: the last prefix round runs the even leaves themselves, so odd leaf 2i+1 reads the
        #    true F_{2i}(m_{2i}) instead of the level-0 shortcut's estimate (same number of rounds) ------------
        even_out: list[torch.Tensor] = []
        if pair:
            evens = list(range(0, m, 2))
            even_in = [z0 if i == 0 else h[i] for i in evens]  # leaf 0 keeps the stem in its graph
            with torch.set_grad_enabled(cfg.corrections == 0):  # after corrections the leaf round reruns them
                even_out = tree.apply([tree._leaves[i] for i in evens], even_in)
            for i, out in zip(evens, even_out, strict=True):
                h[i + 1], hd[i + 1] = out.detach(), hd[i] + bs

        # -- optional fixed-point (Jacobi) corrections: m_{j+1} <- F_j(m_j), all j at once, no graph ------
        for sweep in range(cfg.corrections):
            # after pairing, the first sweep's even-leaf outputs are the pairing round's (same inputs): skip them
            js = list(range(1, m - 1, 2)) if pair and sweep == 0 else list(range(m - 1))
            if not js:  # two paired leaves: the pairing round was already the sweep
                continue
            with torch.no_grad():
                outs = tree.apply([tree._leaves[j] for j in js], [h[j] for j in js])
            old_hd, h, hd = hd, list(h), list(hd)
            for j, out in zip(js, outs, strict=True):  # Jacobi: every update reads the previous sweep's states
                h[j + 1], hd[j + 1] = out.detach(), old_hd[j] + bs

        # -- leaf round: every leaf on its tree input; also the shortcuts not on a prefix path ----------
        leaf_in = [z0] + h[1:]  # leaf 0 keeps the stem in its graph: the stem is part of leaf 0
        if pair and cfg.corrections == 0:  # even leaves ran in the pairing round: only the odd ones are left
            odd_out = tree.apply([tree._leaves[i] for i in range(1, m, 2)], leaf_in[1::2])
            leaf_out = [t for pair_out in zip(even_out, odd_out, strict=True) for t in pair_out]
        else:
            leaf_out = tree.apply(tree._leaves, leaf_in)
        ld = [hd[i] + bs for i in range(m)]
        if pair:  # level-0 left shortcuts left the prefix; they still distil (sub-network level 0) on m_{2i}
            ks = list(range(0, m, 2))
            outs = tree.apply([tree.shortcut((0, k)) for k in ks], [h[k] for k in ks])
            for k, out in zip(ks, outs, strict=True):
                sc_out[(0, k)], sc_in_depth[(0, k)] = out, hd[k]
        right: dict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
        for lv in range(levels - 1, -1, -1):  # right children, per level (their VJPs form the suffix rounds)
            ks = list(range(1, m >> lv, 2))
            ins = [h[k << lv].detach().requires_grad_(True) for k in ks]  # an alias, not a copy
            outs = tree.apply([tree.shortcut((lv, k)) for k in ks], ins)
            right[lv] = (ks, ins, outs)
            for k, out in zip(ks, outs, strict=True):
                sc_out[(lv, k)], sc_in_depth[(lv, k)] = out, hd[k << lv]
        (root_out,) = tree.apply([tree.shortcut((levels, 0))], [h[0]])
        sc_out[(levels, 0)], sc_in_depth[(levels, 0)] = root_out, 0

        # -- head on the detached z_M: the top message delta_M ---------------------------------------------
        z_m = leaf_out[-1].detach().requires_grad_(True)
        final = tree.final_ce(z_m, targets)
        final.backward()  # head/norm grads (local) and delta_M
        delta: list[torch.Tensor | None] = [None] * (m + 1)
        dd = [0] * (m + 1)
        delta[m], dd[m] = z_m.grad, ld[-1]

        # -- suffix rounds: delta_j = VJP of the right-child shortcut starting at j (log2 M rounds) --------
        if cfg.global_weight > 0:
            for lv in range(levels - 1, -1, -1):
                ks, ins, outs = right[lv]
                grads_out = [delta[(k + 1) << lv] for k in ks]
                grads = torch.autograd.grad(outs, ins, grads_out, retain_graph=True)
                for k, g in zip(ks, grads, strict=True):
                    j = k << lv
                    delta[j] = g
                    dd[j] = max(dd[(k + 1) << lv], sc_in_depth[(lv, k)] + sl) + sl

        # -- local objectives, one backward (all parts independent: inputs detached) ------------------------
        # leaves: surrogate <F_i(m_i), delta_{i+1}> (= gradient of the Gaussian match to the posterior mean)
        outs = torch.stack(leaf_out)
        weights = [cfg.global_weight] * (m - 1) + [1.0]
        if cfg.global_weight > 0:
            deltas = torch.stack([delta[i + 1] * w for i, w in enumerate(weights)])
        else:
            deltas = torch.zeros_like(outs)
            deltas[-1] = delta[m]
        loss = (outs * deltas.to(outs.dtype)).sum()
        for i in range(m):
            b = i + 1
            dep = max(ld[i], dd[b]) if (cfg.global_weight > 0 or b == m) else ld[i]
            depth[f"leaf{i}"] = dep + bs
        aux_ce = torch.zeros((), device=outs.device)
        if cfg.aux_weight > 0:  # local likelihood: readout CE at boundaries 1..M-1
            aux_ce = tree.readout_ce_many(list(range(1, m)), outs[:-1], targets)
            loss = loss + cfg.aux_weight * (m - 1) * aux_ce
        # shortcuts: distillation onto the span's last leaf output (+ readout CE)
        nodes = list(sc_out)
        sc = torch.stack([sc_out[v] for v in nodes])
        sc_bound = [(k + 1) << lv for lv, k in nodes]
        target = torch.stack([leaf_out[b - 1] for b in sc_bound]).detach()
        # relative squared error: scale-free, so growing residual streams (LMs) do not let the shortcuts'
        # gradients swamp the blocks' under the loop's global gradient clipping
        mse = (sc - target).float().pow(2).flatten(1).mean(1) / (target.float().pow(2).flatten(1).mean(1) + 1e-6)
        loss = loss + cfg.shortcut_weight * mse.sum()
        if cfg.shortcut_aux_weight > 0:
            loss = loss + cfg.shortcut_aux_weight * len(nodes) * tree.readout_ce_many(sc_bound, sc, targets)
        for (lv, k), b in zip(nodes, sc_bound, strict=True):
            depth[f"node{lv}.{k}"] = max(sc_in_depth[(lv, k)] + sl, ld[b - 1]) + sl
        loss.backward()

        critical = max(depth.values())
        return StepStats(
            loss=float(final.detach()),
            tokens=targets.numel(),
            extra={
                "critical_path": float(critical),
                "aux_ce_mean": float(aux_ce.detach()),
                "shortcut_mse_mean": float(mse.detach().mean()),
            },
        )


# ------------------------------------------------------------------------------------ flat block-local
@dataclass
class FlatBLLConfig:
    block_size: int = 1  # layers per block


class FlatBlockLocal(Method):
    """Baseline: blocks in sequence, inputs detached, each block trained by its own readout CE (no tree,
    no top-down message). Critical path N forward + block_size backward; the value of the hierarchy is
    HBLL measured against this."""

    name = "flat_bll"
    Config = FlatBLLConfig
    uses_autograd_step = False

    def prepare(self, model: nn.Module) -> nn.Module:
        if isinstance(model, FlatTree):
            return model
        return FlatTree(model, self.config.block_size)

    def eval_loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(inputs, targets)

    def step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        z = model.model.embed(inputs)
        terms, n = [], len(model.leaves)
        for i, leaf in enumerate(model.leaves):
            out = leaf(z)
            if i + 1 < n:
                terms.append(model.aux[i].ce(out, targets))
            else:
                final = model.model.loss(model.model.norm(out), targets)
                terms.append(final)
            z = out.detach()
        torch.stack(terms).sum().backward()
        return StepStats(
            loss=float(final.detach()), tokens=targets.numel(),
            extra={"critical_path": float(len(model.model.blocks) + model.block_size)},
        )
